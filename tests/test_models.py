"""/v1/models per key, and the service endpoints (/healthz, /readyz, /metrics)."""

from __future__ import annotations

import asyncio

import aiohttp

from .conftest import Gateway


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def model_ids(http: aiohttp.ClientSession, gw: Gateway, key: str) -> list[str]:
    async with http.get(gw.url + "/v1/models", headers=auth(key)) as r:
        assert r.status == 200
        body = await r.json()
    assert body["object"] == "list"
    for m in body["data"]:
        assert set(m) == {"id", "object", "created", "owned_by"} and m["object"] == "model"
    return [m["id"] for m in body["data"]]


async def test_models_follow_group_workspace_and_key_allow_lists(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    everything = await gateway.key()
    all_ids = await model_ids(http, gateway, everything)
    assert {"gpt-test", "renamed", "org/model-with-slash"} <= set(all_ids)

    cheap = await gateway.key(group="cheap")  # group "cheap" = ["gpt-*"]
    assert await model_ids(http, gateway, cheap) == ["gpt-test"]

    narrowed = await gateway.key(models=["renamed", "org/*"])
    assert await model_ids(http, gateway, narrowed) == ["org/model-with-slash", "renamed"]

    gateway.conn.execute("UPDATE workspaces SET allowed_models = '[\"renamed\"]' WHERE name = 'acme'")
    other = await gateway.key("other-ws")
    # The workspace narrowing applies to every key of the workspace.
    for _ in range(100):
        if await model_ids(http, gateway, everything) == ["renamed"]:
            break
        await asyncio.sleep(0.05)
    assert await model_ids(http, gateway, everything) == ["renamed"]
    assert "gpt-test" in await model_ids(http, gateway, other)


async def test_get_model_with_slash_and_404(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.key(models=["org/*"])
    async with http.get(gateway.url + "/v1/models/org/model-with-slash", headers=auth(key)) as r:
        assert r.status == 200
        assert (await r.json())["id"] == "org/model-with-slash"
    for name in ("gpt-test", "does-not-exist"):
        async with http.get(gateway.url + f"/v1/models/{name}", headers=auth(key)) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "model_not_found"
    async with http.get(gateway.url + "/v1/models") as r:
        assert r.status == 401


async def test_health_ready_metrics(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.url + "/healthz") as r:
        assert r.status == 200 and r.headers["x-request-id"]
    async with http.get(gateway.url + "/readyz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ready"
    key = await gateway.key()
    async with http.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-test", "messages": []},
                         headers=auth(key)) as r:
        assert r.status == 200
    await gateway.wait_usage(1)
    text = ""
    for _ in range(100):
        async with http.get(gateway.url + "/metrics") as r:
            text = await r.text()
        if 'gateway_requests_total{endpoint="/v1/chat/completions",model="gpt-test",status="200"} 1.0' in text:
            break
        await asyncio.sleep(0.05)
    assert 'gateway_requests_total{endpoint="/v1/chat/completions",model="gpt-test",status="200"} 1.0' in text
    assert 'gateway_tokens_total{kind="output",model="gpt-test"} 5.0' in text
    assert "gateway_request_duration_seconds_bucket" in text and "gateway_usage_queue_depth" in text
    assert key not in text and key[:10] not in text, "no per-key labels"
