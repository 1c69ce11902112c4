"""Response-id affinity: with two routes for one model, a response's
follow-ups (previous_response_id, GET/DELETE by id, input_items, cancel) go
to the upstream that made it, for the workspace that made it only; across
gateway processes through the usage table."""

from __future__ import annotations

from typing import Any

import aiohttp

from .conftest import Gateway, GatewayFactory, UpstreamFactory, config_toml, upstream_toml

RESP = "/v1/responses"


async def two_upstreams(make_gateway: GatewayFactory, make_upstream: UpstreamFactory,
                        name: str = "gateway.toml") -> tuple[Gateway, Any, Any]:
    a, b = await make_upstream(), await make_upstream()
    extra = upstream_toml("b", b.base_url) + """
[[models]]
name = "split"
routes = [{ upstream = "mock", model = "split" }, { upstream = "b", model = "split" }]
"""
    gw = await make_gateway(config_toml(a.base_url, extra), name)
    return gw, a, b


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def create(http: aiohttp.ClientSession, gw: Gateway, key: str, **body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(gw.url + RESP, json={"model": "split", "input": "hello there", **body},
                         headers=auth(key)) as r:
        return r.status, await r.json()


async def test_follow_ups_stay_on_the_upstream_that_made_the_response(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    gw, a, b = await two_upstreams(make_gateway, make_upstream)
    key = await gw.key()
    chains: list[str] = []
    # Start chains until both routes have made a first response (a few
    # starts; 40 at most: all on one route by chance is 1 in 2**39).
    for _ in range(40):
        if len(chains) >= 4 and a.state.responses and b.state.responses:
            break
        status, first = await create(http, gw, key)
        assert status == 200
        rid = first["id"]
        for _ in range(5):  # 5 follow-ups each: at random, 1 in 32 would all land right
            status, nxt = await create(http, gw, key, previous_response_id=rid, input="and then")
            assert status == 200, nxt
            rid = nxt["id"]
        chains.append(rid)
    assert a.state.responses and b.state.responses  # both routes were used...
    for up in (a, b):  # ...and every follow-up found its predecessor where it went
        assert all(r.path == RESP for r in up.state.requests)
    rows = await gw.wait_usage(6 * len(chains))
    assert all(r["response_id"] and r["response_id"].startswith("resp_") for r in rows)
    made_on = {r["response_id"]: r["upstream"] for r in rows}
    assert {made_on[rid] for rid in chains} <= {"mock", "b"}
    assert all(rid in (a if made_on[rid] == "mock" else b).state.responses for rid in chains)


async def test_objects_by_id_are_routed_and_owned(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    gw, a, b = await two_upstreams(make_gateway, make_upstream)
    key = await gw.key()
    other = await gw.key("other-team")
    ids = []
    for _ in range(6):
        ids.append((await create(http, gw, key))[1]["id"])
    for rid in ids:
        async with http.get(f"{gw.url}{RESP}/{rid}", headers=auth(key)) as r:
            assert r.status == 200 and (await r.json())["id"] == rid
        async with http.get(f"{gw.url}{RESP}/{rid}/input_items", headers=auth(key)) as r:
            assert (await r.json())["data"][0]["content"][0]["text"] == "hello there"
        async with http.get(f"{gw.url}{RESP}/{rid}", headers=auth(other)) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "response_not_found"
    rid = ids[0]
    async with http.post(f"{gw.url}{RESP}/{rid}/cancel", headers=auth(key)) as r:
        assert (await r.json())["status"] == "cancelled"
    async with http.delete(f"{gw.url}{RESP}/{rid}", headers=auth(other)) as r:
        assert r.status == 404
    async with http.delete(f"{gw.url}{RESP}/{rid}", headers=auth(key)) as r:
        assert (await r.json())["deleted"] is True
    status, body = await create(http, gw, other, previous_response_id=ids[1])
    assert status == 400 and body["error"]["code"] == "previous_response_not_found"
    status, body = await create(http, gw, key, previous_response_id="resp_never_made")
    assert status == 400 and body["error"]["code"] == "previous_response_not_found"
    async with http.get(f"{gw.url}{RESP}/resp_never_made", headers=auth(key)) as r:
        assert r.status == 404
    # Nothing another workspace asked for, nor anything unknown, reached an upstream.
    assert sum(len(u.state.requests) for u in (a, b)) == 6 + 6 * 2 + 2
    rows = await gw.wait_usage(6 + 6 * 3 + 2 + 2 + 2)
    gets = [r for r in rows if r["endpoint"] == RESP + "/{id}" and r["status"] == 200]
    assert gets and all(r["model"] == "split" and r["input_tokens"] == 0 and r["cost"] == 0 for r in gets)


async def test_affinity_across_processes_through_the_table(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    """Two gateways on one database stand for two workers: a response made
    through one is continued and fetched through the other, whose memory
    has never seen it."""
    gw1, _, _ = await two_upstreams(make_gateway, make_upstream)
    gw2 = await make_gateway(gw1.config.source.read_text(), "second.toml")  # type: ignore[union-attr]
    key = await gw1.key()
    await gw2.wait_key_live(key)
    for _ in range(4):
        status, first = await create(http, gw1, key)
        status, nxt = await create(http, gw2, key, previous_response_id=first["id"], input="more")
        assert status == 200, nxt
        async with http.get(f"{gw2.url}{RESP}/{nxt['id']}", headers=auth(key)) as r:
            assert r.status == 200
