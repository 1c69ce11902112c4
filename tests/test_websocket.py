"""Responses over a WebSocket through the gateway: each response.create
frame one upstream HTTP Responses request relayed as frames, one usage row
per response; the connection's chain expanded for upstreams that did not
store it; warm-ups; errors as error frames; 401/426 before the upgrade."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import Gateway, GatewayFactory, Upstream, config_toml

RESP = "/v1/responses"
TOOL = {"type": "function", "name": "Bash", "parameters": {"type": "object", "properties": {}}}


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "OpenAI-Beta": "responses_websockets=2026-02-06", **extra}


async def create(ws: aiohttp.ClientWebSocketResponse, **body: Any) -> list[dict[str, Any]]:
    """Send one response.create; the events up to the final or error one."""
    await ws.send_str(orjson.dumps({"type": "response.create", "model": "gpt-test", "store": False, **body}).decode())
    out = []
    while True:
        ev = orjson.loads(await asyncio.wait_for(ws.receive_str(), 10))
        out.append(ev)
        if ev["type"] in ("response.completed", "response.incomplete", "response.failed", "error"):
            return out


async def test_codex_like_session_chained_on_the_connection(gateway: Gateway, upstream: Upstream,
                                                            http: aiohttp.ClientSession) -> None:
    """What Codex 0.171 sends: a warm-up, then each turn only its new items
    with previous_response_id and store: false. The upstream gets whole
    requests (it stored nothing)."""
    key = await gateway.key()
    steer = {"x-mock-tool": "Bash", "x-mock-tool-args": '{"command":"ls"}'}
    async with http.ws_connect(gateway.url + RESP, headers=auth(key, **steer)) as ws:
        warm = await create(ws, input=[{"type": "message", "role": "developer", "content": "rules"}], tools=[TOOL],
                            generate=False)
        assert [e["type"] for e in warm] == ["response.created", "response.completed"]
        warm_id = warm[-1]["response"]["id"]
        turn1 = await create(ws, previous_response_id=warm_id, tools=[TOOL],
                             input=[{"type": "message", "role": "user", "content": "list files"}])
        assert turn1[0]["type"] == "response.created" and turn1[-1]["type"] == "response.completed"
        assert [e["sequence_number"] for e in turn1] == list(range(len(turn1)))
        call = turn1[-1]["response"]["output"][0]
        assert call["type"] == "function_call"
        turn2 = await create(ws, previous_response_id=turn1[-1]["response"]["id"], tools=[TOOL],
                             input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "a.txt"}])
        assert turn2[-1]["response"]["output"][0]["content"][0]["text"] == "The tool said: a.txt"
    first, second = (orjson.loads(r.body) for r in upstream.state.requests)
    assert "previous_response_id" not in first and "previous_response_id" not in second
    assert first["stream"] is True and "type" not in first and "generate" not in first
    assert [i.get("role") or i["type"] for i in first["input"]] == ["developer", "user"]
    assert [i.get("role") or i["type"] for i in second["input"]] == [
        "developer", "user", "function_call", "function_call_output"]
    sent = upstream.state.requests[0].headers
    assert "OpenAI-Beta" not in sent and "Sec-WebSocket-Key" not in sent and "Upgrade" not in sent
    rows = await gateway.wait_usage(3)
    assert len(rows) == 3  # one per response, none for the connection itself
    assert [(r["endpoint"], r["stream"], r["status"], r["upstream"]) for r in rows] == [
        (RESP, 1, 200, None), (RESP, 1, 200, "mock"), (RESP, 1, 200, "mock")]
    reported = [u for _, u in upstream.state.reported]
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows[1:]] == [
        (u["input_tokens"], u["output_tokens"]) for u in reported]
    assert rows[1]["response_id"] == turn1[-1]["response"]["id"] and rows[0]["input_tokens"] == 0
    assert len({r["request_id"] for r in rows}) == 3


async def test_refused_before_the_upgrade(make_gateway: GatewayFactory, gateway: Gateway, upstream: Upstream,
                                          http: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await http.ws_connect(gateway.url + RESP, headers=auth("gw-wrong"))
    assert e.value.status == 401
    key = await gateway.key()
    async with http.get(gateway.url + RESP, headers=auth(key)) as r:  # a plain GET, no upgrade
        assert r.status == 426 and r.headers["Upgrade"] == "websocket"
    off = await make_gateway(config_toml(upstream.base_url, "").replace(
        "key_refresh_ms = 100", "key_refresh_ms = 100\nresponses_websocket = false"), "off.toml")
    await off.wait_key_live(key)
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await http.ws_connect(off.url + RESP, headers=auth(key))
    assert e.value.status == 426  # Codex falls back to HTTP at once on this
    # Both gateways write to the same database file: one row per refusal.
    rows = await gateway.wait_usage(3)
    assert sorted(r["status"] for r in rows) == [401, 426, 426]


async def test_error_frames_and_the_connection_goes_on(gateway: Gateway, upstream: Upstream,
                                                       http: aiohttp.ClientSession) -> None:
    key = await gateway.key("acme", rpm=2)
    async with http.ws_connect(gateway.url + RESP, headers=auth(key)) as ws:
        unknown = await create(ws, model="nope", input="x")
        assert unknown == [{"type": "error", "status": 404, "error": {
            "type": "not_found_error", "code": "model_not_found", "message": "The model 'nope' does not exist.",
            "param": "model"}}]
        await ws.send_str("not json")
        bad = orjson.loads(await ws.receive_str())
        assert bad["status"] == 400 and bad["error"]["code"] == "invalid_json"
        await ws.send_str(orjson.dumps({"type": "response.processed", "response_id": "r"}).decode())  # ignored
        ok = await create(ws, input="fine")
        assert ok[-1]["type"] == "response.completed"
        # Chained on the last response, an input that is no list of items (it
        # was dropped: the upstream got the last turn again, with nothing new).
        chained = await create(ws, previous_response_id=ok[-1]["response"]["id"], input={"a": 1})
        assert chained[-1]["status"] == 400 and chained[-1]["error"]["param"] == "input", chained
        upstream.state.steer["x-mock-status"] = "400"
        up_err = await create(ws, input="x")
        assert up_err[-1]["type"] == "error" and up_err[-1]["status"] == 400
        assert up_err[-1]["error"]["message"] == "Mock failure 400."  # the upstream's own error object
        del upstream.state.steer["x-mock-status"]
        limited = await create(ws, input="again")  # the key's third admitted request this minute
        assert limited[-1]["status"] == 429 and limited[-1]["error"]["type"] == "rate_limit_error"
    rows = await gateway.wait_usage(6)
    assert [(r["status"], r["error_type"]) for r in rows] == [
        (404, "model_not_found"), (400, "invalid_json"), (200, None), (400, "invalid_type"), (400, None),
        (429, "rate_limit_exceeded")]
    assert rows[0]["model"] == "nope"


async def test_previous_response_from_elsewhere_goes_to_its_upstream(gateway: Gateway, upstream: Upstream,
                                                                     http: aiohttp.ClientSession) -> None:
    """A previous_response_id that is not this connection's last response is
    sent upstream as it is (the upstream stored it)."""
    key = await gateway.key()
    async with http.ws_connect(gateway.url + RESP, headers=auth(key)) as ws:
        stored = (await create(ws, input="remember this", store=True))[-1]["response"]["id"]
    async with http.ws_connect(gateway.url + RESP, headers=auth(key)) as ws:
        follow = await create(ws, input="go on", previous_response_id=stored)
        assert follow[-1]["type"] == "response.completed"
        lost = await create(ws, input="x", previous_response_id="resp_unknown")
        assert lost[-1]["status"] == 400 and lost[-1]["error"]["code"] == "previous_response_not_found"
    assert orjson.loads(upstream.state.requests[-1].body)["previous_response_id"] == stored


async def test_client_gone_mid_stream_is_499(gateway: Gateway, upstream: Upstream,
                                             http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    ws = await http.ws_connect(gateway.url + RESP, headers=auth(key, **{"x-mock-chunks": "200",
                                                                         "x-mock-delay-ms": "20"}))
    await ws.send_str(json.dumps({"type": "response.create", "model": "gpt-test", "input": "x"}))
    assert orjson.loads(await ws.receive_str())["type"] == "response.created"
    await ws.close()
    (row,) = await gateway.wait_usage(1)
    assert (row["status"], row["error_type"]) == (499, "client_disconnected")
    await asyncio.sleep(0.2)
    assert upstream.state.disconnects == 1  # the upstream request was cancelled too


async def test_shutdown_closes_idle_connections(make_gateway: GatewayFactory, upstream: Upstream,
                                                http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(config_toml(upstream.base_url))
    key = await gw.key()
    ws = await http.ws_connect(gw.url + RESP, headers=auth(key))
    assert (await create(ws, input="x"))[-1]["type"] == "response.completed"
    await asyncio.wait_for(gw.stop(), 5)
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001


async def test_translated_route_over_the_websocket(pgateway: Gateway, upstream: Upstream,
                                                   http: aiohttp.ClientSession) -> None:
    """A model whose route speaks Messages: each frame is translated like an
    HTTP Responses request, and its events come back as Responses frames."""
    key = await pgateway.key()
    async with http.ws_connect(pgateway.url + RESP, headers=auth(key)) as ws:
        first = await create(ws, model="claude-test", input="say hello")
        assert first[0]["type"] == "response.created" and first[-1]["type"] == "response.completed"
        text = "".join(e["delta"] for e in first if e["type"] == "response.output_text.delta")
        assert text == "Hello from the mock upstream"
        second = await create(ws, model="claude-test", input="and again",
                              previous_response_id=first[-1]["response"]["id"])
        assert second[-1]["type"] == "response.completed"
    sent = [orjson.loads(r.body) for r in upstream.state.requests]
    assert [r.path for r in upstream.state.requests] == ["/v1/messages"] * 2
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]  # the chain, whole
    rows = await pgateway.wait_usage(2)
    reported = [u for _, u in upstream.state.reported]
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [
        (u["input_tokens"], u["output_tokens"]) for u in reported]


async def test_a_key_revoked_or_narrowed_mid_connection_is_refused_on_its_next_frame(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession,
) -> None:
    """The key is checked on every frame, not once at the upgrade: a socket
    opened before the key was revoked (or its user disabled, or it expired)
    gets a 401 error frame and is closed, and a narrowed allow-list applies
    at once; nothing more goes upstream."""
    narrowed, revoked = await gateway.key(), await gateway.key()
    async with http.ws_connect(gateway.url + RESP, headers=auth(narrowed)) as ws1, \
            http.ws_connect(gateway.url + RESP, headers=auth(revoked)) as ws2:
        assert (await create(ws1))[-1]["type"] == "response.completed"
        assert (await create(ws2))[-1]["type"] == "response.completed"
        await gateway.write(lambda c: c.execute("UPDATE api_keys SET allowed_models = '[\"renamed\"]' "
                                                "WHERE id = (SELECT MIN(id) FROM api_keys)").connection.commit())
        await gateway.write(lambda c: c.execute("UPDATE api_keys SET revoked_at = 1 "
                                                "WHERE id = (SELECT MAX(id) FROM api_keys)").connection.commit())
        for _ in range(100):  # the key cache reloads every key_refresh_ms (100 ms here)
            async with http.get(gateway.url + "/v1/models", headers=auth(revoked, **{"x-request-id": "keycheck"})) as r:
                if r.status == 401:
                    break
            await asyncio.sleep(0.05)
        sent = len(upstream.state.requests)
        err = (await create(ws1))[-1]
        assert err["status"] == 403 and err["error"]["code"] == "model_not_allowed"
        err = (await create(ws2))[-1]
        assert err["status"] == 401 and err["error"]["type"] == "authentication_error"
        closed = await asyncio.wait_for(ws2.receive(), 5)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws2.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert len(upstream.state.requests) == sent
    await gateway.wait_usage(4)
    rows = [r for r in gateway.usage_rows() if r["endpoint"] == RESP]
    assert sorted(r["status"] for r in rows) == [200, 200, 401, 403]


async def test_events_larger_than_the_http_bound_still_reach_the_client(gateway: Gateway, upstream: Upstream,
                                                                       http: aiohttp.ClientSession) -> None:
    """A tool call with 1.5 MB of arguments: its done events and the final
    response.completed are each past the 1 MiB the HTTP relay holds to parse
    an event. Over the WebSocket every event must still arrive whole (the
    client waits for response.completed), and the row is a clean 200."""
    key = await gateway.key()
    args = orjson.dumps({"command": "x" * 1_500_000}).decode()
    upstream.state.steer.update({"x-mock-tool": "Bash", "x-mock-tool-args": args})
    async with http.ws_connect(gateway.url + RESP, headers=auth(key), max_msg_size=64 << 20) as ws:
        events = await create(ws, tools=[TOOL], input="run it")
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["arguments"] == args
    (row,) = await gateway.wait_usage(1)
    assert (row["status"], row["error_type"]) == (200, None)


async def test_an_event_past_the_frame_bound_ends_the_response_with_an_error(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await gateway.key()
    args = orjson.dumps({"command": "x" * (33 << 20)}).decode()
    upstream.state.steer.update({"x-mock-tool": "Bash", "x-mock-tool-args": args})
    async with http.ws_connect(gateway.url + RESP, headers=auth(key), max_msg_size=64 << 20) as ws:
        events = await create(ws, tools=[TOOL], input="run it")
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "sse_event_too_large"
    (row,) = await gateway.wait_usage(1)
    assert (row["status"], row["error_type"]) == (502, "sse_event_too_large")


def ws_toml(upstream: Upstream, settings: str) -> str:
    return config_toml(upstream.base_url).replace("[server]\n", f"[server]\n{settings}\n", 1)


async def test_idle_and_old_connections_are_closed(make_gateway: GatewayFactory, upstream: Upstream,
                                                   http: aiohttp.ClientSession) -> None:
    """A socket is not held forever: closed (1000) after
    server.websocket_idle_s without a frame, and a frame after
    server.websocket_lifetime_s gets websocket_connection_limit_reached (as
    OpenAI's own limit does, on which clients open a new connection)."""
    gw = await make_gateway(ws_toml(upstream, "websocket_idle_s = 0.5\nwebsocket_lifetime_s = 1"))
    key = await gw.key()
    async with http.ws_connect(gw.url + RESP, headers=auth(key)) as ws:
        assert (await create(ws, input="x"))[-1]["type"] == "response.completed"
        msg = await asyncio.wait_for(ws.receive(), 3)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.OK
    async with http.ws_connect(gw.url + RESP, headers=auth(key, **{"x-mock-head-delay-ms": "1200"})) as ws:
        # Busy past its lifetime: that answer completes, the next frame is refused.
        assert (await create(ws, input="x"))[-1]["type"] == "response.completed"
        err = (await create(ws, input="x"))[-1]
        assert err["type"] == "error" and err["error"]["code"] == "websocket_connection_limit_reached"
        msg = await asyncio.wait_for(ws.receive(), 3)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.OK
    rows = await gw.wait_usage(3)
    assert [r["status"] for r in rows] == [200, 200, 400]
    assert len(upstream.state.requests) == 2


async def test_open_sockets_per_key_are_bounded(make_gateway: GatewayFactory, upstream: Upstream,
                                                http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(ws_toml(upstream, "websockets_per_key = 2"))
    key, other = await gw.key(), await gw.key()
    first = await http.ws_connect(gw.url + RESP, headers=auth(key))
    second = await http.ws_connect(gw.url + RESP, headers=auth(key))
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await http.ws_connect(gw.url + RESP, headers=auth(key))
    assert e.value.status == 429
    async with http.ws_connect(gw.url + RESP, headers=auth(other)) as ws:  # another key is not held back
        assert (await create(ws, input="x"))[-1]["type"] == "response.completed"
    await first.close()
    for _ in range(50):  # the server sees the close a moment later
        try:
            third = await http.ws_connect(gw.url + RESP, headers=auth(key))
            break
        except aiohttp.WSServerHandshakeError:
            await asyncio.sleep(0.05)
    assert (await create(third, input="x"))[-1]["type"] == "response.completed"
    await second.close()
    await third.close()


async def test_upgrades_arriving_together_stay_within_the_cap(make_gateway: GatewayFactory, upstream: Upstream,
                                                             http: aiohttp.ClientSession) -> None:
    """The cap is counted before the upgrade's first await: many upgrades of
    one key at once open exactly ``websockets_per_key``, the rest get 429."""
    gw = await make_gateway(ws_toml(upstream, "websockets_per_key = 3"))
    key = await gw.key()
    conns = [aiohttp.TCPConnector(force_close=True) for _ in range(40)]  # one connection each
    sessions = [aiohttp.ClientSession(connector=c) for c in conns]
    try:
        async def upgrade(s: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse | int:
            try:
                return await s.ws_connect(gw.url + RESP, headers=auth(key))
            except aiohttp.WSServerHandshakeError as e:
                return e.status

        results = await asyncio.gather(*(upgrade(s) for s in sessions))
        opened = [r for r in results if not isinstance(r, int)]
        assert len(opened) == 3 and sorted(r for r in results if isinstance(r, int)) == [429] * 37, results
        for ws in opened:
            assert (await create(ws, input="x"))[-1]["type"] == "response.completed"
            await ws.close()
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
