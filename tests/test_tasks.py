"""Video tasks through the gateway: the Ark and gateway providers, the
background poller, exactly-once billing under races, tenant isolation,
restarts, and bad input."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.mock.ark import ARK, ArkState
from gateway.mock.volcengine import MOCK_ACCESS_KEY, MOCK_SECRET_KEY
from gateway.store import queries

from .conftest import UPSTREAM_KEY, ConfigFiles, Gateway, GatewayFactory, Upstream, config_toml

TASKS = "/v1/video/tasks"
BILLING = "video.task.billing"
PRICE = 10.0  # USD per 1M video tokens
TOKENS = 108900


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tasks_toml(upstream: Upstream, *, poller: bool = True, timeout_s: float = 30.0, db: str = "gateway.db") -> str:
    extra = f"""
[[groups]]
name = "half"
models = ["*"]
ratio = 0.5

[tasks]
poll_interval_s = 0.05
max_backoff_s = 0.2
max_concurrency = 4
timeout_s = {timeout_s}
poller = {"true" if poller else "false"}

[[upstreams]]
name = "ark"
kind = "ark"
base_url = "{upstream.url}/api/v3"
api_key_env = "MOCK_UPSTREAM_KEY"
account = "acct1"
extra_provider_options = ["mock"]

[[upstreams]]
name = "ark2"
kind = "ark"
base_url = "{upstream.url}/api/v3"
api_key_env = "MOCK_UPSTREAM_KEY"
account = "acct2"
extra_provider_options = ["mock"]

[[upstreams]]
name = "volc"
kind = "volcengine"
base_url = "{upstream.url}"
access_key_env = "MOCK_VOLC_AK"
secret_key_env = "MOCK_VOLC_SK"
account = "acct1"

[[models]]
name = "seedance"
routes = [{{ upstream = "ark2", model = "doubao-seedance-2-0", priority = 0 }},
          {{ upstream = "ark", model = "doubao-seedance-2-0", priority = 1 }}]
price = {{ video = {PRICE} }}

[platforms]
JIMENG = "volc"
"""
    return config_toml(upstream.base_url, extra).replace('path = "gateway.db"', f'path = "{db}"')


def ark(upstream: Upstream) -> ArkState:
    assert upstream.app is not None
    return upstream.app[ARK]


async def create(http: aiohttp.ClientSession, gw: Gateway, key: str, **body: Any) -> dict[str, Any]:
    body = {"model": "seedance", "prompt": "a cat surfing", **body}
    async with http.post(gw.url + TASKS, json=body, headers=auth(key)) as r:
        data = await r.json()
        assert r.status == 200, data
    return data  # type: ignore[no-any-return]


async def poll(http: aiohttp.ClientSession, gw: Gateway, key: str, task_id: str, query: str = "") -> tuple[int, Any]:
    async with http.get(gw.url + TASKS + "/" + task_id + query, headers=auth(key)) as r:
        return r.status, await r.json()


async def poll_until_done(http: aiohttp.ClientSession, gw: Gateway, key: str, task_id: str,
                          query: str = "", timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, data = await poll(http, gw, key, task_id, query)
        assert status == 200, data
        if data["status"] in ("succeeded", "failed", "cancelled"):
            return data  # type: ignore[no-any-return]
        await asyncio.sleep(0.01)
    raise AssertionError("task never finished")


async def keys(gw: Gateway, *workspaces: str) -> list[str]:
    """Keys in several workspaces, all created before any traffic: a
    synchronous write from the test while the gateway's usage writer holds
    its transaction (waiting on this same loop) would stall both."""
    made = [gw.create_key(ws) for ws in workspaces]
    for k in made:
        await gw.wait_key_live(k)
    return made


def billing_rows(gw: Gateway) -> list[dict[str, Any]]:
    return [r for r in gw.usage_rows() if r["endpoint"] == BILLING]


async def wait_billing(gw: Gateway, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = billing_rows(gw)
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.02)
    return billing_rows(gw)


def task_row(gw: Gateway, task_id: str) -> dict[str, Any]:
    return dict(gw.conn.execute("SELECT * FROM video_tasks WHERE id = ?", (task_id,)).fetchone())


# ------------------------------------------------------------------ tests


async def test_race_20_clients_and_poller_bill_exactly_once(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tasks_toml(upstream))
    key = await gw.key()
    task = await create(
        http, gw, key, ratio="16:9", duration=5, resolution="720p", audio=True, watermark=False, seed=7,
        resources=[{"type": "image", "url": "https://img.invalid/a.png", "role": "first_frame"},
                   {"type": "image", "url": "https://img.invalid/b.png", "role": "last_frame"}],
        provider_options={"camera_fixed": True, "mock": {"queued_polls": 4, "running_polls": 4}},
    )
    assert task["object"] == "video.task" and task["status"] == "queued" and task["id"].startswith("vt_")
    assert task["provider"] == "ark" and task["model"] == "seedance" and task["usage"] is None

    # What went upstream: Ark's wire format, with the upstream's own key.
    sent = next(r for r in upstream.state.requests if r.path == "/api/v3/contents/generations/tasks")
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert key not in str(sent.headers) and key.encode() not in sent.body
    body = orjson.loads(sent.body)
    assert body["model"] == "doubao-seedance-2-0"
    assert body["content"] == [
        {"type": "text", "text": "a cat surfing"},
        {"type": "image_url", "image_url": {"url": "https://img.invalid/a.png"}, "role": "first_frame"},
        {"type": "image_url", "image_url": {"url": "https://img.invalid/b.png"}, "role": "last_frame"},
    ]
    assert (body["ratio"], body["duration"], body["resolution"]) == ("16:9", 5, "720p")
    assert (body["generate_audio"], body["watermark"], body["seed"], body["camera_fixed"]) == (True, False, 7, True)
    upstream_id = next(iter(ark(upstream).tasks))
    assert upstream_id not in str(task)

    results = await asyncio.gather(*(poll_until_done(http, gw, key, task["id"]) for _ in range(20)))
    for r in results:
        assert r["status"] == "succeeded"
        assert r["usage"] == {"video_tokens": TOKENS, "completion_tokens": TOKENS, "total_tokens": TOKENS}
        assert r["video"]["url"].endswith(".mp4") and r["video"]["resolution"] == "720p"
        assert r["id"] == task["id"] and upstream_id not in str(r)

    await asyncio.sleep(0.3)  # let the poller run a few more cycles
    await gw.wait_usage(22)
    rows = billing_rows(gw)
    assert len(rows) == 1, rows
    bill = rows[0]
    assert bill["video_tokens"] == TOKENS and bill["request_id"] == task["id"] and bill["upstream"] == "ark2"
    assert bill["cost"] == pytest.approx(TOKENS * PRICE / 1e6)
    # Every HTTP request still has its own row, carrying no tokens.
    http_rows = [r for r in gw.usage_rows() if r["endpoint"] != BILLING]
    assert len(http_rows) >= 21
    assert all(r["video_tokens"] == 0 and r["cost"] == 0 for r in http_rows)
    assert task_row(gw, task["id"])["billed"] == 1
    async with http.get(gw.url + "/metrics") as r:
        metrics = await r.text()
    assert f'gateway_tokens_total{{kind="video",model="seedance"}} {float(TOKENS)}' in metrics
    assert BILLING not in metrics  # a billing event is not a request


async def test_poller_alone_completes_and_bills(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tasks_toml(upstream))
    key = await gw.key(group="half")
    task = await create(http, gw, key, provider_options={"mock": {"queued_polls": 2, "running_polls": 2}})
    rows = await wait_billing(gw)
    assert len(rows) == 1
    assert rows[0]["cost"] == pytest.approx(TOKENS * PRICE / 1e6 * 0.5)  # the key's group ratio
    # The admin aggregates (rollups) count the video spend too.
    for table in ("usage_minute", "usage_hour"):
        tokens, cost = gw.conn.execute(f"SELECT SUM(video_tokens), SUM(cost) FROM {table}").fetchone()
        assert tokens == TOKENS and cost == pytest.approx(rows[0]["cost"]), table
    gets = ark(upstream).gets
    status, data = await poll(http, gw, key, task["id"])
    assert status == 200 and data["status"] == "succeeded" and data["usage"]["video_tokens"] == TOKENS
    assert ark(upstream).gets == gets  # a finished task is answered from the database
    await asyncio.sleep(0.2)
    assert len(billing_rows(gw)) == 1


async def test_failed_cancelled_expired_are_not_billed(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    key = await gw.key()
    for outcome, code in (("failed", "OutputVideoSensitiveContentDetected"), ("cancelled", None),
                          ("expired", "expired")):
        task = await create(http, gw, key, provider_options={"mock": {"outcome": outcome}})
        s1 = (await poll(http, gw, key, task["id"]))[1]["status"]
        s2 = (await poll(http, gw, key, task["id"]))[1]["status"]
        assert (s1, s2) == ("queued", "running")
        done = await poll_until_done(http, gw, key, task["id"])
        assert done["status"] == ("failed" if outcome == "expired" else outcome)
        assert done["usage"] is None
        if code:
            assert done["error"]["code"] == code
    await gw.wait_usage(1)
    assert billing_rows(gw) == []


async def test_upstream_unknown_status_and_errors(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    key = await gw.key()
    weird = await create(http, gw, key, provider_options={"mock": {"queued_polls": 0, "running_polls": 0,
                                                                   "outcome": "transcoding"}})
    status, data = await poll(http, gw, key, weird["id"])
    assert status == 502 and data["error"]["code"] == "upstream_unknown_status"
    assert "transcoding" in data["error"]["message"]
    assert task_row(gw, weird["id"])["status"] == "queued"  # kept, not lost, still polled

    for code in (500, 503):
        broken = await create(http, gw, key, provider_options={"mock": {"get_status": code}})
        status, data = await poll(http, gw, key, broken["id"])
        assert status == code and data["error"]["type"] == "upstream_error"

    garbage = await create(http, gw, key, provider_options={"mock": {"get_fail": "garbage"}})
    status, data = await poll(http, gw, key, garbage["id"])
    assert status == 502 and data["error"]["code"] == "upstream_bad_answer"

    # Create rejected upstream: its status and message; 5xx on one route
    # moves on to the next, then the last answer is the client's.
    async with http.post(gw.url + TASKS, headers=auth(key), json={
        "model": "seedance", "prompt": "x", "provider_options": {"mock": {"create_status": 400}}}) as r:
        data = await r.json()
        assert r.status == 400 and "Mock create failure 400" in data["error"]["message"]
    before = ark(upstream).creates
    async with http.post(gw.url + TASKS, headers=auth(key), json={
        "model": "seedance", "prompt": "x", "provider_options": {"mock": {"create_status": 500}}}) as r:
        assert r.status == 500
    assert ark(upstream).creates == before
    creates = [q for q in upstream.state.requests if q.path.endswith("/generations/tasks")]
    assert len(creates) >= 2  # both routes were tried for the 500
    await gw.wait_usage(1)
    assert billing_rows(gw) == []


async def test_bad_input(make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    key = await gw.key()
    cases: list[tuple[Any, int, str | None]] = [
        (b"{not json", 400, "invalid_json"),
        ({"prompt": "x"}, 400, "missing_model"),
        ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
        ({"model": "gpt-test", "prompt": "x"}, 400, "model_not_video"),
        ({"model": "seedance"}, 400, "missing_prompt"),
        ({"model": "seedance", "prompt": 5}, 400, "invalid_type"),
        ({"model": "seedance", "prompt": "x", "duration": "5"}, 400, "invalid_type"),
        ({"model": "seedance", "prompt": "x", "audio": "yes"}, 400, "invalid_type"),
        ({"model": "seedance", "prompt": "x", "seed": True}, 400, "invalid_type"),
        ({"model": "seedance", "prompt": "x", "resources": {"url": "u"}}, 400, "invalid_type"),
        ({"model": "seedance", "prompt": "x", "resources": [{"type": "gif", "url": "u"}]}, 400, "invalid_value"),
        ({"model": "seedance", "prompt": "x", "resources": [{"type": "image"}]}, 400, "invalid_value"),
        ({"model": "seedance", "resources": [{"type": "image", "url": "u", "asset_id": "a"}]}, 400, "invalid_value"),
        ({"model": "seedance", "resources": [{"type": "image", "url": "u", "role": "middle"}]}, 400, "invalid_value"),
        ({"model": "seedance", "prompt": "x", "provider_options": [1]}, 400, "invalid_type"),
        ({"model": "seedance", "resources": [{"type": "image", "asset_id": "asset-made-up"}]}, 404,
         "asset_not_found"),
    ]
    for body, status, code in cases:
        data_kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with http.post(gw.url + TASKS, headers=auth(key), **data_kw) as r:
            data = await r.json()
            assert r.status == status, (body, data)
            assert data["error"]["code"] == code, (body, data)
    async with http.post(gw.url + TASKS, json={"model": "seedance", "prompt": "x"}) as r:
        assert r.status == 401
    status, data = await poll(http, gw, key, "vt_made_up")
    assert status == 404 and data["error"]["code"] == "task_not_found"
    status, data = await poll(http, gw, key, "cgt-made-up", "?model=seedance")
    assert status == 404
    status, data = await poll(http, gw, key, "cgt-made-up", "?model=nope")
    assert status == 404 and data["error"]["code"] == "model_not_found"
    assert ark(upstream).creates == 0
    rows = await gw.wait_usage(len(cases) + 4)
    assert len(rows) == len(cases) + 4  # one row per request, whatever happened


async def test_other_workspace_gets_404(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    key, other = await keys(gw, "acme", "globex")
    task = await create(http, gw, key)
    upstream_id = next(iter(ark(upstream).tasks))
    status, data = await poll(http, gw, other, task["id"])
    assert status == 404 and data["error"]["code"] == "task_not_found"
    # Nor by the upstream id through ?model=: the task is acme's.
    status, data = await poll(http, gw, other, upstream_id, "?model=seedance")
    assert status == 404
    status, data = await poll(http, gw, key, task["id"])
    assert status == 200 and data["id"] == task["id"]


async def test_restart_resumes_tasks_and_poller_survives_crashes(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    toml = tasks_toml(upstream)
    gw1 = await make_gateway(toml)
    key = await gw1.key()
    # One task whose polls hang (the server stops mid-poll), one whose polls
    # drop the connection (every poll of it fails), one normal but slow.
    slow = await create(http, gw1, key, provider_options={"mock": {"queued_polls": 3, "running_polls": 3,
                                                                   "get_delay_ms": 150}})
    broken = await create(http, gw1, key, provider_options={"mock": {"get_fail": "close"}})
    await asyncio.sleep(0.2)  # the poller is mid-cycle, waiting on the slow task
    await gw1.stop()
    assert task_row(gw1, slow["id"])["status"] in ("queued", "running")
    assert billing_rows(gw1) == []

    gw2 = await make_gateway(toml)  # same database, new process state
    rows = await wait_billing(gw2)
    assert len(rows) == 1 and rows[0]["request_id"] == slow["id"]
    status, data = await poll(http, gw2, key, slow["id"])
    assert status == 200 and data["status"] == "succeeded"
    # The broken task is still there, still scheduled, not billed.
    b = task_row(gw2, broken["id"])
    assert b["status"] in ("queued", "running") and b["next_poll_at"] is not None and b["attempts"] >= 1
    await asyncio.sleep(0.3)
    assert len(billing_rows(gw2)) == 1


async def test_stuck_task_times_out_into_failed(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tasks_toml(upstream, timeout_s=0.4))
    key = await gw.key()
    stuck = await create(http, gw, key, provider_options={"mock": {"queued_polls": 10**6}})
    erroring = await create(http, gw, key, provider_options={"mock": {"get_status": 500}})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(task_row(gw, t["id"])["status"] == "failed" for t in (stuck, erroring)):
            break
        await asyncio.sleep(0.05)
    for t in (stuck, erroring):
        status, data = await poll(http, gw, key, t["id"])
        assert status == 200 and data["status"] == "failed" and data["error"]["code"] == "task_timeout"
    assert billing_rows(gw) == []


async def test_gateway_provider_and_polling_a_task_created_elsewhere(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = await make_gateway(tasks_toml(upstream, poller=False, db="inner.db"), name="inner.toml")
    inner_key = await inner.key("front-door")
    monkeypatch.setenv("INNER_KEY", inner_key)
    outer_extra = f"""
[tasks]
poll_interval_s = 0.05
max_backoff_s = 0.2
poller = false

[[upstreams]]
name = "inner"
kind = "gateway"
base_url = "{inner.url}/v1"
api_key_env = "INNER_KEY"
extra_provider_options = ["mock"]

[[models]]
name = "video-remote"
routes = [{{ upstream = "inner", model = "seedance" }}]
price = {{ video = 20.0 }}
"""
    outer_toml = config_toml(upstream.base_url, outer_extra).replace('path = "gateway.db"', 'path = "outer.db"')
    outer = await make_gateway(outer_toml, name="outer.toml")
    key, other = await keys(outer, "acme", "globex")

    task = await create(http, outer, key, model="video-remote", provider_options={"mock": {"queued_polls": 1}})
    assert task["provider"] == "gateway"
    done = await poll_until_done(http, outer, key, task["id"])
    assert done["status"] == "succeeded" and done["usage"]["video_tokens"] == TOKENS
    assert done["id"] == task["id"] and done["model"] == "video-remote"
    rows = await wait_billing(outer)
    assert len(rows) == 1 and rows[0]["cost"] == pytest.approx(TOKENS * 20.0 / 1e6)
    assert len(await wait_billing(inner)) == 1  # the inner gateway bills its own customer once too

    # A task created directly on the inner gateway, polled through the outer
    # one by its id and a model whose upstream knows it.
    elsewhere = await create(http, inner, inner_key, provider_options={"mock": {"queued_polls": 1}})
    status, data = await poll(http, outer, key, elsewhere["id"])
    assert status == 404
    done = await poll_until_done(http, outer, key, elsewhere["id"], "?model=video-remote")
    assert done["status"] == "succeeded" and done["id"] == elsewhere["id"]
    for _ in range(3):
        status, data = await poll(http, outer, key, elsewhere["id"], "?model=video-remote")
        assert status == 200 and data["status"] == "succeeded"
    rows = await wait_billing(outer, 2)
    await asyncio.sleep(0.1)
    assert [r["request_id"] for r in billing_rows(outer)] == [task["id"], elsewhere["id"]]
    # Another workspace of the outer gateway cannot claim it afterwards.
    status, _ = await poll(http, outer, other, elsewhere["id"], "?model=video-remote")
    assert status == 404


async def test_killed_mid_cycle_loses_no_task_and_bills_once(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, config_files: ConfigFiles
) -> None:
    """A gateway process SIGKILLed while its poller has a poll in flight;
    a new gateway on the same database finishes and bills the task once."""
    toml = tasks_toml(upstream)
    path = config_files.write(toml)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "MOCK_VOLC_AK": MOCK_ACCESS_KEY,
           "MOCK_VOLC_SK": MOCK_SECRET_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        break
            await asyncio.sleep(0.05)
        key = config_files.key(path)
        body = {"model": "seedance", "prompt": "p",
                "provider_options": {"mock": {"queued_polls": 2, "running_polls": 2, "get_delay_ms": 300}}}
        for _ in range(100):
            async with http.post(url + TASKS, json=body, headers=auth(key)) as r:
                if r.status == 200:
                    task = await r.json()
                    break
            await asyncio.sleep(0.05)
        state = ark(upstream)
        while state.gets == 0:  # the poller's first poll is in flight
            await asyncio.sleep(0.01)
    finally:
        proc.kill()
        await proc.wait()

    gw = await make_gateway(toml)  # same database
    assert billing_rows(gw) == []
    rows = await wait_billing(gw)
    assert len(rows) == 1 and rows[0]["request_id"] == task["id"]
    status, data = await poll(http, gw, key, task["id"])
    assert status == 200 and data["status"] == "succeeded"
    await asyncio.sleep(0.2)
    assert len(billing_rows(gw)) == 1


async def test_rejected_upstream_credential_and_poller_switch(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WRONG_ARK_KEY", "sk-not-the-upstream-key")
    toml = tasks_toml(upstream, poller=False).replace(
        'name = "ark2"\nkind = "ark"\nbase_url = "' + upstream.url + '/api/v3"\napi_key_env = "MOCK_UPSTREAM_KEY"',
        'name = "ark2"\nkind = "ark"\nbase_url = "' + upstream.url + '/api/v3"\napi_key_env = "WRONG_ARK_KEY"',
    )
    assert "WRONG_ARK_KEY" in toml
    gw = await make_gateway(toml)
    key = await gw.key()
    # ark2 (first by priority) refuses the gateway's key: the next route takes it.
    task = await create(http, gw, key)
    assert task_row(gw, task["id"])["upstream"] == "ark"
    # With the poller switched off, nothing polls an unpolled task.
    await asyncio.sleep(0.3)
    assert ark(upstream).gets == 0 and task_row(gw, task["id"])["status"] == "queued"

    only_bad = toml.replace('{ upstream = "ark", model = "doubao-seedance-2-0", priority = 1 }',
                            '{ upstream = "ark2", model = "doubao-seedance-2-0", priority = 1 }')
    gw2 = await make_gateway(only_bad.replace('"gateway.db"', '"bad.db"'), name="bad.toml")
    key2 = await gw2.key()
    async with http.post(gw2.url + TASKS, json={"model": "seedance", "prompt": "x"}, headers=auth(key2)) as r:
        data = await r.json()
        assert r.status == 502 and data["error"]["code"] == "upstream_auth_failed"
        assert "ark2" in data["error"]["message"] and "sk-not" not in str(data)


async def test_two_workers_on_one_database_bill_once(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """Two gateways (as two worker processes would) on one database, both
    with pollers, their clients polling the same tasks."""
    toml = tasks_toml(upstream)
    gw1 = await make_gateway(toml)
    gw2 = await make_gateway(toml)
    key = await gw1.key()
    await gw2.wait_key_live(key)
    tasks = [await create(http, gw, key, provider_options={"mock": {"queued_polls": 3, "running_polls": 3}})
             for gw in (gw1, gw2, gw1)]
    polls = [poll_until_done(http, gw, key, t["id"]) for t in tasks for gw in (gw1, gw2) for _ in range(5)]
    for r in await asyncio.gather(*polls):
        assert r["status"] == "succeeded" and r["usage"]["video_tokens"] == TOKENS
    await asyncio.sleep(0.3)
    rows = billing_rows(gw1)
    assert sorted(r["request_id"] for r in rows) == sorted(t["id"] for t in tasks)


def shared_account_toml(upstream: Upstream) -> str:
    """tasks_toml plus two more ways to one mock Ark: ``ark`` (account
    acct1) has the same base_url as ``ark2`` (acct2), and ``ark2-alias``
    reaches ark2's account by another host name with ``account = "acct2"``."""
    alias_url = upstream.url.replace("127.0.0.1", "localhost") + "/api/v3"
    return tasks_toml(upstream, poller=False) + f"""
[[upstreams]]
name = "ark2-alias"
kind = "ark"
base_url = "{alias_url}"
api_key_env = "MOCK_UPSTREAM_KEY"
account = "acct2"

[[models]]
name = "seedance-same-url"
routes = [{{ upstream = "ark", model = "doubao-seedance-2-0" }}]
price = {{ video = {PRICE} }}

[[models]]
name = "seedance-same-account"
routes = [{{ upstream = "ark2-alias", model = "doubao-seedance-2-0" }}]
price = {{ video = {PRICE} }}
"""


async def test_upstream_task_is_never_adopted_by_another_workspace(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """Issue 11, item 3: a task acme created through ark2 is not adopted by
    globex through another upstream entry of the same provider account
    (same base_url, or same ``account``), nor a second time by acme; it is
    one row and one bill."""
    gw = await make_gateway(shared_account_toml(upstream))
    key, other = await keys(gw, "acme", "globex")
    task = await create(http, gw, key, provider_options={"mock": {"queued_polls": 1, "running_polls": 1}})
    assert task_row(gw, task["id"])["upstream"] == "ark2"
    upstream_id = next(iter(ark(upstream).tasks))
    for model in ("seedance", "seedance-same-url", "seedance-same-account"):
        status, data = await poll(http, gw, other, upstream_id, f"?model={model}")
        assert status == 404 and data["error"]["code"] == "task_not_found", (model, data)
    # The owner, by the upstream id through any of them: its own task, not a copy.
    for model in ("seedance-same-url", "seedance-same-account", "seedance"):
        status, data = await poll(http, gw, key, upstream_id, f"?model={model}")
        assert status == 200 and data["id"] == task["id"], (model, data)
    done = await poll_until_done(http, gw, key, task["id"])
    assert done["status"] == "succeeded"
    for model in ("seedance-same-url", "seedance-same-account"):
        status, _ = await poll(http, gw, other, upstream_id, f"?model={model}")
        assert status == 404
    assert gw.conn.execute("SELECT COUNT(*) FROM video_tasks").fetchone()[0] == 1
    owner = task_row(gw, task["id"])["workspace_id"]
    assert [(r["request_id"], r["workspace_id"]) for r in billing_rows(gw)] == [(task["id"], owner)]


async def test_task_created_elsewhere_is_adopted_once_under_a_race(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """A task made directly on the provider, claimed at once by two
    workspaces through two upstream entries of its account: one gets it,
    the other a 404, and it is billed once."""
    gw = await make_gateway(shared_account_toml(upstream))
    key, other = await keys(gw, "acme", "globex")
    body = {"model": "doubao-seedance-2-0", "content": [{"type": "text", "text": "made elsewhere"}],
            "mock": {"queued_polls": 0, "running_polls": 0}}
    async with http.post(upstream.url + "/api/v3/contents/generations/tasks", json=body,
                         headers=auth(UPSTREAM_KEY)) as r:
        upstream_id = (await r.json())["id"]
    who = [(k, m) for _ in range(5) for k, m in ((key, "seedance-same-url"), (other, "seedance"),
                                                  (other, "seedance-same-account"), (key, "seedance-same-account"))]
    results = await asyncio.gather(*(poll(http, gw, k, upstream_id, f"?model={m}") for k, m in who))
    assert {d["id"] for s, d in results if s == 200} == {upstream_id}
    owner = task_row(gw, upstream_id)["workspace_id"]
    owner_key = key if owner == queries.find_workspace(gw.conn, "acme")["id"] else other
    # The owner's every claim (through either entry) is answered, the other's never.
    assert [s for (k, _), (s, _) in zip(who, results, strict=True) if k == owner_key] == [200] * 10
    assert [s for (k, _), (s, _) in zip(who, results, strict=True) if k != owner_key] == [404] * 10
    assert gw.conn.execute("SELECT COUNT(*) FROM video_tasks").fetchone()[0] == 1
    await wait_billing(gw)
    await asyncio.sleep(0.1)
    assert [(r["request_id"], r["workspace_id"]) for r in billing_rows(gw)] == [(upstream_id, owner)]


@pytest.mark.sqlite_only("upgrades an SQLite file of an older schema")
async def test_tasks_recorded_before_the_upgrade_get_their_account(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A task row written by the previous schema (no account) is given its
    upstream's account when the gateway opens the database, so it cannot
    be adopted by another workspace through a sibling upstream entry."""
    import sqlite3

    from gateway.store.schema import MIGRATIONS

    body = {"model": "doubao-seedance-2-0", "content": [{"type": "text", "text": "made before the upgrade"}]}
    async with http.post(upstream.url + "/api/v3/contents/generations/tasks", json=body,
                         headers=auth(UPSTREAM_KEY)) as r:
        upstream_id = (await r.json())["id"]
    old = sqlite3.connect(tmp_path / "gateway.db")
    for i, script in enumerate(MIGRATIONS[:5]):
        old.executescript(script)
        old.execute(f"PRAGMA user_version = {i + 1}")
    old.execute("INSERT INTO workspaces (id, name, created_at) VALUES (1, 'acme', 0)")
    now = time.time()
    old.execute(
        "INSERT INTO video_tasks (id, workspace_id, key_id, model, upstream, upstream_model, upstream_task_id, "
        "status, created_at, updated_at, next_poll_at) VALUES ('vt_old', 1, 1, 'seedance', 'ark2', 'm', "
        "?, 'queued', ?, ?, NULL)", (upstream_id, now, now))
    old.commit()
    old.close()
    gw = await make_gateway(shared_account_toml(upstream))
    row = task_row(gw, "vt_old")
    assert (row["account"], row["endpoint"]) == ("acct2", upstream.url + "/api/v3")
    (other,) = await keys(gw, "globex")
    status, _ = await poll(http, gw, other, upstream_id, "?model=seedance-same-account")
    assert status == 404
    assert gw.conn.execute("SELECT COUNT(*) FROM video_tasks").fetchone()[0] == 1
