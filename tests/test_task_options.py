"""Video task bodies attacked as an outsider would: ``provider_options``
trying to override what the gateway decided (issue 11, item 1), and another
workspace's asset named by every spelling a provider could read (item 2)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, load_config

from .conftest import Gateway, GatewayFactory, Upstream
from .test_assets import ASSETS, GROUPS, post
from .test_tasks import TASKS, ark, auth, create, keys, tasks_toml

PRO = """
[[models]]
name = "seedance-pro"
routes = [{ upstream = "ark", model = "doubao-seedance-pro" }]
price = { video = 100.0 }
"""


async def refused(http: aiohttp.ClientSession, gw: Gateway, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(gw.url + TASKS, json={"model": "seedance", "prompt": "x", **body}, headers=auth(key)) as r:
        return r.status, await r.json()


async def test_provider_options_cannot_override_what_the_gateway_decides(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tasks_toml(upstream, poller=False) + PRO)
    key = await gw.key(models=["seedance"])  # may not use seedance-pro
    attacks: list[tuple[dict[str, Any], str, str]] = [
        # The expensive model, billed as the cheap one, past the key's model list.
        ({"model": "doubao-seedance-pro"}, "provider_options.model", "option_not_allowed"),
        ({"content": [{"type": "text", "text": "other"}]}, "provider_options.content", "option_not_allowed"),
        ({"callback_url": "https://attacker.invalid/hook"}, "provider_options.callback_url", "option_not_allowed"),
        ({"resources": []}, "provider_options.resources", "option_not_allowed"),
        # A second spelling of a top-level field.
        ({"duration": 12}, "provider_options.duration", "option_not_allowed"),
        ({"generate_audio": True}, "provider_options.generate_audio", "option_not_allowed"),
        # Not on Ark's allow-list (web search is billed apart), or the wrong type.
        ({"tools": [{"type": "web_search"}]}, "provider_options.tools", "option_not_allowed"),
        ({"camera_fixed": "yes"}, "provider_options.camera_fixed", "invalid_type"),
        ({"service_tier": "priority"}, "provider_options.service_tier", "invalid_type"),
    ]
    for options, param, code in attacks:
        status, data = await refused(http, gw, key, {"provider_options": {"camera_fixed": True, **options}})
        assert status == 400, (options, data)
        assert data["error"]["param"] == param and data["error"]["code"] == code, data
        assert param in data["error"]["message"]
    assert ark(upstream).creates == 0  # nothing reached the provider

    # What the allow-list takes goes through, as the right types.
    task = await create(http, gw, key, provider_options={"camera_fixed": True, "return_last_frame": True,
                                                         "frames": 121, "service_tier": "flex"})
    sent = next(iter(ark(upstream).tasks.values())).body
    assert sent["model"] == "doubao-seedance-2-0"
    assert (sent["camera_fixed"], sent["return_last_frame"], sent["frames"]) == (True, True, 121)
    assert "callback_url" not in sent and task["model"] == "seedance"


async def test_extra_provider_options_never_reach_decided_fields(tmp_path: Any, upstream: Upstream) -> None:
    base = tasks_toml(upstream, poller=False)
    for name in ("model", "content", "callback_url", "duration"):
        path = tmp_path / f"{name}.toml"
        path.write_text(base.replace('extra_provider_options = ["mock"]', f'extra_provider_options = ["{name}"]', 1))
        with pytest.raises(ConfigError, match=rf"upstreams\[\d\]\.extra_provider_options\[0\]: '{name}'"):
            load_config(path, env={"MOCK_UPSTREAM_KEY": "k", "MOCK_VOLC_AK": "a", "MOCK_VOLC_SK": "s"})


async def test_a_model_whose_routes_differ_takes_only_what_every_route_takes(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # "ark2" takes "mock" (the test steering field); a route without it makes it refused.
    toml = tasks_toml(upstream, poller=False).replace('account = "acct1"\nextra_provider_options = ["mock"]',
                                                      'account = "acct1"')
    gw = await make_gateway(toml)
    key = await gw.key()
    status, data = await refused(http, gw, key, {"provider_options": {"mock": {"queued_polls": 1}}})
    assert status == 400 and data["error"]["param"] == "provider_options.mock"
    assert ark(upstream).creates == 0


def spellings(asset_id: str) -> list[str]:
    """Ways a client could write ``asset://<id>`` that a provider may read as it."""
    return [
        f"asset://{asset_id}", f"ASSET://{asset_id}", f"Asset://{asset_id}", f"  asset://{asset_id}  ",
        f"\tasset://{asset_id}\n", f"asset:/{asset_id}", f"asset:{asset_id}", f"asset:///{asset_id}",
        f"asset%3A%2F%2F{asset_id}", f"%61sset://{asset_id}", f"asset%253A%252F%252F{asset_id}",
        f"\ufeffasset://{asset_id}", f"asset://{asset_id}%20",
    ]


async def test_another_workspaces_asset_by_every_spelling_is_not_found(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    owner, thief = await keys(gw, "acme", "globex")
    status, data = await post(http, gw, owner, GROUPS, {"platform": "JIMENG", "name": "cast"})
    gid = data["data"]["group_id"]
    status, data = await post(http, gw, owner, ASSETS, {"platform": "JIMENG", "group_id": gid, "name": "hero",
                                                        "url": "https://img.invalid/hero.png", "asset_type": "Image"})
    assert status == 200
    aid = data["data"]["asset_id"]

    for url in spellings(aid):
        status, data = await refused(http, gw, thief, {"resources": [{"type": "image", "url": url}]})
        assert status == 404 and data["error"]["code"] == "asset_not_found", (url, data)
    # Inside provider_options (here the test steering field the config allows).
    for url in spellings(aid)[:4]:
        status, data = await refused(http, gw, thief, {"provider_options": {"mock": {"note": url}}})
        assert status == 400 and data["error"]["param"] == "provider_options.mock", (url, data)
    # A resource URL no provider should fetch for us.
    for url in ("file:///etc/passwd", "tos://bucket/key", "img.invalid/a.png", "javascript:alert(1)"):
        status, data = await refused(http, gw, thief, {"resources": [{"type": "image", "url": url}]})
        assert status == 400 and data["error"]["param"] == "resources[0].url", (url, data)
    assert ark(upstream).creates == 0

    # The owner may use any spelling: it is resolved, routed to the account
    # that holds the asset, and sent in the one form Ark documents.
    task = await create(http, gw, owner, resources=[{"type": "image", "url": f" ASSET%3A//{aid} "}])
    row = gw.conn.execute("SELECT upstream FROM video_tasks WHERE id = ?", (task["id"],)).fetchone()
    assert row["upstream"] == "ark"
    sent = next(iter(ark(upstream).tasks.values())).body
    assert sent["content"][1]["image_url"] == {"url": f"asset://{aid}"}


async def test_gateway_upstream_gets_the_body_as_checked(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``gateway`` upstream (another gateway) gets the body as checked
    here: the same allow-list applies before anything is forwarded, and
    fields outside the unified body are not passed on."""
    inner = await make_gateway(tasks_toml(upstream, poller=False, db="inner.db") + PRO, name="inner.toml")
    monkeypatch.setenv("INNER_KEY", await inner.key("front-door"))
    outer_toml = tasks_toml(upstream, poller=False, db="outer.db") + f"""
[[upstreams]]
name = "inner"
kind = "gateway"
base_url = "{inner.url}/v1"
api_key_env = "INNER_KEY"

[[models]]
name = "video-remote"
routes = [{{ upstream = "inner", model = "seedance" }}]
"""
    outer = await make_gateway(outer_toml, name="outer.toml")
    (key,) = await keys(outer, "acme")
    body = {"model": "video-remote", "prompt": "x", "provider_options": {"model": "doubao-seedance-pro"}}
    async with http.post(outer.url + TASKS, json=body, headers=auth(key)) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "provider_options.model"
    assert ark(upstream).creates == 0
    body = {"model": "video-remote", "prompt": "x", "mock_extra": 1, "provider_options": {"camera_fixed": True}}
    async with http.post(outer.url + TASKS, json=body, headers=auth(key)) as r:
        assert r.status == 200, await r.text()
    sent = next(iter(ark(upstream).tasks.values())).body
    assert sent["model"] == "doubao-seedance-2-0" and sent["camera_fixed"] is True
