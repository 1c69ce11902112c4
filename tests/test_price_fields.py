"""Price flags in the body (docs/security.md): a field that changes what the
provider charges for the same tokens (OpenAI's ``service_tier``, Anthropic's
``service_tier``, ``speed`` and ``inference_geo``) is refused at any value
but its standard ones, on every door (Chat Completions, Messages, Responses
over HTTP and over the WebSocket) and on translated routes, unless the
model's ``allow_fields`` names the value. The row is billed at the model's
configured price, so a client must not make the operator pay a dearer tier
than it is billed for."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.config import PRICE_FIELD_NAMES, ConfigError, parse_config
from gateway.protocols.base import DECIDING_KEYS

from .conftest import PROTOCOL_MODELS, Gateway, GatewayFactory, Upstream, config_toml, wire_upstreams

CHAT = "/v1/chat/completions"
MSG = "/v1/messages"
RESP = "/v1/responses"

EXTRA = """
[[models]]
name = "via-responses"
routes = [{ upstream = "wire-responses", model = "via-responses" }]

[[models]]
name = "via-chat"
routes = [{ upstream = "wire-chat", model = "via-chat" }]

[[models]]
name = "gpt-priority"
routes = [{ upstream = "mock", model = "gpt-priority" }]
price = { input = 2.0, output = 4.0 }
allow_fields = { service_tier = ["priority", "flex"] }

[[models]]
name = "claude-fast"
routes = [{ upstream = "mock-anthropic", model = "claude-fast" }]
price = { input = 30.0, output = 150.0 }
allow_fields = { speed = ["fast"], inference_geo = ["us"] }
"""


@pytest.fixture
async def gw(make_gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    url = upstream.base_url
    extra = PROTOCOL_MODELS.format(url=url) + wire_upstreams(url, "responses", "chat") + EXTRA
    return await make_gateway(config_toml(url, extra))


def body(path: str, model: str, **fields: Any) -> dict[str, Any]:
    if path == CHAT:
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    if path == MSG:
        return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **fields}
    return {"model": model, "input": "hi", **fields}


async def post(http: aiohttp.ClientSession, gw: Gateway, key: str, path: str, raw: bytes) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01",
               "Content-Type": "application/json"}
    async with http.post(gw.url + path, data=io.BytesIO(raw), headers=headers) as r:
        return r.status, orjson.loads(await r.read())


# (door, model, field, value): a dearer (or just other) tier than the
# model's price; direct routes, then translated ones.
REFUSED: list[tuple[str, str, str, Any]] = [
    (CHAT, "gpt-test", "service_tier", "priority"),
    (CHAT, "gpt-test", "service_tier", "fast"),
    (CHAT, "gpt-test", "service_tier", "scale"),
    (CHAT, "gpt-test", "service_tier", "flex"),
    (CHAT, "gpt-test", "service_tier", "Default"),
    (CHAT, "gpt-test", "service_tier", 1),
    (CHAT, "gpt-test", "service_tier", ["default"]),
    (CHAT, "gpt-test", "service_tier", {"tier": "default"}),
    (RESP, "gpt-test", "service_tier", "priority"),
    (RESP, "gpt-test", "service_tier", "flex"),
    (MSG, "claude-test", "speed", "fast"),
    (MSG, "claude-test", "inference_geo", "us"),
    (MSG, "claude-test", "service_tier", "priority"),
    (MSG, "claude-test", "speed", True),
    # Opted in for other values or fields only.
    (CHAT, "gpt-priority", "service_tier", "scale"),
    (MSG, "claude-fast", "service_tier", "priority"),
    # Translated: chat <-> Responses carries service_tier across; the
    # Anthropic pairs drop it, but a refused value is refused all the same.
    (CHAT, "via-responses", "service_tier", "priority"),
    (RESP, "via-chat", "service_tier", "priority"),
    (CHAT, "claude-test", "service_tier", "priority"),
    (RESP, "claude-test", "service_tier", "flex"),
    (MSG, "gpt-test", "speed", "fast"),
    (MSG, "via-responses", "inference_geo", "us"),
]


async def test_price_flags_are_refused_on_every_http_door(gw: Gateway, upstream: Upstream,
                                                          http: aiohttp.ClientSession) -> None:
    key = await gw.key()
    for path, model, name, value in REFUSED:
        for stream in (False, True):
            raw = orjson.dumps(body(path, model, stream=stream, **{name: value}))
            status, data = await post(http, gw, key, path, raw)
            assert status == 400, (path, model, name, value, data)
            err = data["error"]
            assert err["type"] == "invalid_request_error", data
            if path != MSG:  # Anthropic's error object has no code or param
                assert (err["code"], err["param"]) == ("field_not_allowed", name), data
            assert name in err["message"] and model in err["message"], data
            if isinstance(value, str):
                assert f"'{value}'" in err["message"], data
    assert upstream.state.requests == []
    n = 2 * len(REFUSED)
    rows = await gw.wait_usage(n)
    assert len(rows) == n
    assert {(r["status"], r["error_type"]) for r in rows} == {(400, "field_not_allowed")}
    assert [r["model"] for r in rows] == [model for _, model, _, _ in REFUSED for _ in (0, 1)]
    assert all(r["cost"] == 0 for r in rows)


async def test_a_price_flag_given_twice_is_refused(gw: Gateway, upstream: Upstream,
                                                   http: aiohttp.ClientSession) -> None:
    """Parsers differ on which of two equal keys wins: the gateway must not
    check "default" while the upstream runs "priority"."""
    key = await gw.key()
    for path, raw in [
        (CHAT, b'{"service_tier":"priority","model":"gpt-test","messages":[{"role":"user","content":"hi"}],'
               b'"service_tier":"default"}'),
        (RESP, b'{"s\\u0065rvice_tier":"priority","model":"gpt-test","input":"hi","service_tier":"auto"}'),
        (MSG, b'{"model":"claude-test","max_tokens":16,"speed":"fast","speed":"standard",'
              b'"messages":[{"role":"user","content":"hi"}]}'),
        (MSG, b'{"model":"claude-test","max_tokens":16,"inference_geo":"us","inference_geo":"global",'
              b'"messages":[{"role":"user","content":"hi"}]}'),
    ]:
        status, data = await post(http, gw, key, path, raw)
        assert status == 400 and "given twice" in data["error"]["message"], (raw, data)
    assert upstream.state.requests == []
    assert set(DECIDING_KEYS) >= PRICE_FIELD_NAMES


# Standard values: what the model's price is for. They pass as sent.
STANDARD: list[tuple[str, str, dict[str, Any]]] = [
    (CHAT, "gpt-test", {"service_tier": "auto"}),
    (CHAT, "gpt-test", {"service_tier": "default"}),
    (CHAT, "gpt-test", {"service_tier": None}),
    (RESP, "gpt-test", {"service_tier": "default"}),
    (RESP, "gpt-test", {"service_tier": "auto"}),
    (MSG, "claude-test", {"service_tier": "auto"}),
    (MSG, "claude-test", {"service_tier": "standard_only", "speed": "standard", "inference_geo": "global"}),
    # Opted in on the model.
    (CHAT, "gpt-priority", {"service_tier": "priority"}),
    (RESP, "gpt-priority", {"service_tier": "flex"}),
    (MSG, "claude-fast", {"speed": "fast", "inference_geo": "us"}),
]


async def passed_byte_for_byte(gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession,
                               cases: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Each (path, model, fields) answered 200, its bytes upstream as the
    client sent them (odd spacing: not a re-encoding), one 200 row each."""
    key = await gw.key()
    for path, model, fields in cases:
        raw = orjson.dumps(body(path, model, **fields)).replace(b'","', b'", "').replace(b":", b" : ", 2)
        status, data = await post(http, gw, key, path, raw)
        assert status == 200, (path, model, fields, data)
        assert upstream.state.requests[-1].body == raw, (path, model, fields)
    assert len(upstream.state.requests) == len(cases)
    rows = await gw.wait_usage(len(cases))
    assert [(r["status"], r["model"]) for r in rows] == [(200, m) for _, m, _ in cases]


async def test_standard_and_opted_in_values_pass_byte_for_byte(gw: Gateway, upstream: Upstream,
                                                               http: aiohttp.ClientSession) -> None:
    await passed_byte_for_byte(gw, upstream, http, STANDARD)


async def test_translated_routes_carry_only_what_passed(gw: Gateway, upstream: Upstream,
                                                        http: aiohttp.ClientSession) -> None:
    """Between the two OpenAI protocols a standard (or opted-in) tier is
    carried across; the Anthropic pairs drop the other side's tiers."""
    key = await gw.key()
    cases = [
        (CHAT, "via-responses", {"service_tier": "default"}, {"service_tier": "default"}),
        (RESP, "via-chat", {"service_tier": "auto"}, {"service_tier": "auto"}),
        (CHAT, "claude-test", {"service_tier": "default"}, {}),
        (MSG, "gpt-test", {"speed": "standard", "inference_geo": "global", "service_tier": "auto"}, {}),
    ]
    for path, model, sent, carried in cases:
        status, data = await post(http, gw, key, path, orjson.dumps(body(path, model, **sent)))
        assert status == 200, (path, model, data)
        upstream_body = orjson.loads(upstream.state.requests[-1].body)
        assert {k: upstream_body[k] for k in PRICE_FIELD_NAMES if k in upstream_body} == carried, upstream_body


async def ws_create(ws: aiohttp.ClientWebSocketResponse, **frame: Any) -> list[dict[str, Any]]:
    await ws.send_str(orjson.dumps({"type": "response.create", "store": False, "input": "hi", **frame}).decode())
    out = []
    while True:
        ev = orjson.loads(await asyncio.wait_for(ws.receive_str(), 10))
        out.append(ev)
        if ev["type"] in ("response.completed", "response.incomplete", "response.failed", "error"):
            return out


async def test_price_flags_on_the_websocket(gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await gw.key()
    headers = {"Authorization": f"Bearer {key}", "OpenAI-Beta": "responses_websockets=2026-02-06"}
    refused = [("gpt-test", "priority"), ("gpt-test", "flex"), ("gpt-priority", "scale"),
               ("via-chat", "priority"), ("claude-test", "priority"), ("gpt-test", 7)]
    async with http.ws_connect(gw.url + RESP, headers=headers) as ws:
        for model, tier in refused:
            for generate in (True, False):
                events = await ws_create(ws, model=model, service_tier=tier, generate=generate)
                assert len(events) == 1, events
                err = events[0]
                assert err["type"] == "error" and err["status"] == 400, err
                assert (err["error"]["code"], err["error"]["param"]) == ("field_not_allowed", "service_tier"), err
        assert upstream.state.requests == []
        passed = [("gpt-test", "default"), ("gpt-test", "auto"), ("gpt-priority", "priority"),
                  ("via-chat", "default")]
        for model, tier in passed:
            events = await ws_create(ws, model=model, service_tier=tier)
            assert events[-1]["type"] == "response.completed", events
            assert orjson.loads(upstream.state.requests[-1].body)["service_tier"] == tier
    n = 2 * len(refused) + len(passed)
    rows = await gw.wait_usage(n)
    assert len(rows) == n
    assert [(r["status"], r["error_type"]) for r in rows[:2 * len(refused)]] == [(400, "field_not_allowed")] * (
        2 * len(refused))
    assert [r["status"] for r in rows[2 * len(refused):]] == [200] * len(passed)


def test_allow_fields_config() -> None:
    def model(allow: Any) -> dict[str, Any]:
        return {"upstreams": [{"name": "u", "kind": "openai", "base_url": "http://x"}],
                "models": [{"name": "m", "routes": [{"upstream": "u"}], "allow_fields": allow}]}

    cfg = parse_config(model({"service_tier": ["priority", "flex"], "speed": ["fast"]}), env={})
    assert cfg.models[0].allow_fields == {"service_tier": frozenset({"priority", "flex"}),
                                          "speed": frozenset({"fast"})}
    assert parse_config(model({}), env={}).models[0].allow_fields == {}
    for bad, where in [({"model": ["x"]}, "allow_fields.model: not a price field"),
                       ({"service_tier": "priority"}, "allow_fields.service_tier: expected an array"),
                       ({"service_tier": []}, "allow_fields.service_tier: expected an array"),
                       ({"speed": [1]}, "allow_fields.speed: expected an array"),
                       (["service_tier"], "allow_fields: expected a table")]:
        with pytest.raises(ConfigError, match=where):
            parse_config(model(bad), env={})
