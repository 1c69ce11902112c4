"""Tenant isolation, walked: every id-bearing endpoint (video tasks, assets,
asset groups, admin resources) with a foreign workspace's key and every
spelling of the id a client could try. None may answer with, change, use or
bill the owner's object; each /v1 request still has its usage row."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from .conftest import ADMIN_TOKEN, Gateway, GatewayFactory, Upstream, config_toml
from .test_assets import ASSETS, GROUPS, post
from .test_task_options import spellings
from .test_tasks import TASKS, ark, auth, create, keys, tasks_toml


def path_spellings(obj_id: str) -> list[str]:
    """Ways to write ``obj_id`` in a URL path that a lax server might read as it."""
    every = "".join(f"%{b:02X}" for b in obj_id.encode())
    return [
        obj_id, quote(obj_id, safe=""), every, every.lower(), "%" + f"{ord(obj_id[0]):02x}" + obj_id[1:],
        obj_id.upper(), obj_id.lower(), obj_id.swapcase(), f"%20{obj_id}", f"{obj_id}%20", f"{obj_id}%09",
        f"{obj_id}%00", f"{obj_id}%0A", f"{obj_id}/", f"./{obj_id}", f"{obj_id}%2F", f"{obj_id}%2F..",
        f"x/..%2F{obj_id}", quote(quote(obj_id, safe=""), safe=""), f"{obj_id}.", f"{obj_id};x=1",
        "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in obj_id),  # fullwidth forms
        f"{obj_id}%E2%80%8B",  # a zero-width space after it
    ]


async def status_and_text(http: aiohttp.ClientSession, method: str, url: str, key: str | None,
                          **kw: Any) -> tuple[int, str]:
    headers = auth(key) if key else {}
    async with http.request(method, url, headers={**headers, **kw.pop("headers", {})}, **kw) as r:
        return r.status, await r.text()


async def test_foreign_workspace_reaches_nothing_by_any_spelling(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: Any,
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    gw: Gateway = await make_gateway(tasks_toml(upstream, poller=False))
    owner, thief = await keys(gw, "acme", "globex")

    # The owner's objects: a task, an asset group, an asset.
    task = await create(http, gw, owner, prompt="owner secret prompt",
                        provider_options={"mock": {"queued_polls": 1, "running_polls": 0}})
    upstream_task = next(iter(ark(upstream).tasks))
    status, data = await post(http, gw, owner, GROUPS, {"platform": "JIMENG", "name": "owner-group"})
    gid = data["data"]["group_id"]
    status, data = await post(http, gw, owner, ASSETS, {"platform": "JIMENG", "group_id": gid, "name": "owner-asset",
                                                        "url": "https://img.invalid/owner.png",
                                                        "asset_type": "Image"})
    aid = data["data"]["asset_id"]
    creates, gets = ark(upstream).creates, ark(upstream).gets
    rows_before = len(await gw.wait_usage(3))
    secrets_of_owner = ("owner secret prompt", "owner-group", "owner-asset", "img.invalid/owner.png", upstream_task)

    sent = 0
    for kind, obj_id, template, queries in (
        ("task", task["id"], TASKS + "/{}", ("", "?model=seedance", "?model=gpt-test", "?model=seedance&model=x")),
        ("task", upstream_task, TASKS + "/{}", ("", "?model=seedance")),  # the upstream's own id
        ("group", gid, GROUPS + "/{}", ("?platform=JIMENG", "?platform=JIMENG&platform=JIMENG")),
        ("asset", aid, ASSETS + "/{}", ("?platform=JIMENG",)),
    ):
        for spelling in path_spellings(obj_id):
            for query in queries:
                url = gw.url + template.format(spelling) + query
                status, text = await status_and_text(http, "GET", url, thief)
                sent += 1
                assert status in (400, 404), (kind, spelling, query, status, text)
                # (An error may quote what the thief sent; nothing else of the owner's.)
                assert not any(s in text for s in secrets_of_owner if s not in obj_id), (kind, spelling, text)

    # Naming the owner's group or asset in a body, in every spelling.
    for spelling in [gid, gid.upper(), f" {gid}", f"{gid} ", quote(gid, safe=""), f"{gid}\u200b"]:
        status, text = await status_and_text(http, "POST", gw.url + ASSETS, thief, json={
            "platform": "JIMENG", "group_id": spelling, "name": "x", "url": "https://img.invalid/x.png",
            "asset_type": "Image"})
        sent += 1
        assert status == 404, (spelling, text)
    for spelling in [aid, aid.upper(), f" {aid}", quote(aid, safe=""), f"{aid}\u200b"]:
        status, text = await status_and_text(http, "POST", gw.url + TASKS, thief, json={
            "model": "seedance", "resources": [{"type": "image", "asset_id": spelling}]})
        sent += 1
        assert status == 404, (spelling, text)
    for url in spellings(aid):
        status, text = await status_and_text(http, "POST", gw.url + TASKS, thief, json={
            "model": "seedance", "resources": [{"type": "image", "url": url}]})
        sent += 1
        assert status == 404, (url, text)

    # Nothing of the owner's was used, polled, adopted or billed for the thief.
    assert (ark(upstream).creates, ark(upstream).gets) == (creates, gets)
    rows = await gw.wait_usage(rows_before + sent)
    assert len(rows) == rows_before + sent  # one row per request, refused or not
    thief_ws = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'globex'").fetchone()[0]
    assert gw.conn.execute("SELECT COUNT(*) FROM video_tasks WHERE workspace_id = ?", (thief_ws,)).fetchone()[0] == 0
    assert all(r["cost"] == 0 for r in rows if r["workspace_id"] == thief_ws)

    # The owner still reaches each of them by its plain id.
    for url in (f"{TASKS}/{task['id']}", f"{GROUPS}/{gid}?platform=JIMENG", f"{ASSETS}/{aid}?platform=JIMENG"):
        status, _ = await status_and_text(http, "GET", gw.url + url, owner)
        assert status == 200, url


async def test_api_keys_reach_no_admin_resource(make_gateway: GatewayFactory, upstream: Upstream,
                                                 http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin API takes the admin token only: no workspace's key, in any
    header, reaches any admin route, including its own workspace's."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    # Each wrong token counts as a failed sign-in from this address: allow
    # more than this walk sends (throttling is tested in test_accounts).
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\nlogin_failures_per_address = 10000\n"))
    key = await gw.key("acme")
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(gw.url + "/admin/api/keys", headers=admin) as r:
        own = (await r.json())["data"][0]
    ws_id, key_id = own["workspace_id"], own["id"]
    routes = [
        ("GET", "/admin/api/workspaces"), ("POST", "/admin/api/workspaces"), ("GET", f"/admin/api/workspaces/{ws_id}"),
        ("PATCH", f"/admin/api/workspaces/{ws_id}"), ("GET", "/admin/api/keys"), ("POST", "/admin/api/keys"),
        ("GET", f"/admin/api/keys/{key_id}"), ("PATCH", f"/admin/api/keys/{key_id}"),
        ("DELETE", f"/admin/api/keys/{key_id}"), ("POST", f"/admin/api/keys/{key_id}/revoke"),
        ("GET", "/admin/api/usage"), ("GET", "/admin/api/requests"), ("GET", "/admin/api/upstreams"),
        ("GET", "/admin/api/config"), ("POST", "/admin/api/reload"), ("GET", f"/admin/api/keys/%3{str(key_id)[0]}"),
    ]
    for method, path in routes:
        for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}, {"Authorization": key},
                        {"Authorization": f"bearer {key}"}, {}):
            async with http.request(method, gw.url + path, headers=headers, json={"name": "x"}) as r:
                assert r.status == 401, (method, path, headers, await r.text())
    # The key was not revoked along the way.
    await asyncio.sleep(0.2)
    async with http.get(gw.url + "/v1/models", headers=auth(key)) as r:
        assert r.status == 200
