"""Attacks on translated routes, as a key holder would try them: usage
that goes unrecorded, fields that change the model or the bill."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import GatewayFactory, Upstream, config_toml, wire_upstreams

WIRES = """
[[models]]
name = "via-responses"
routes = [{ upstream = "wire-responses", model = "up-responses" }]
price = { input = 1.0, output = 2.0 }

[[models]]
name = "via-chat"
routes = [{ upstream = "wire-chat", model = "up-chat" }]
price = { input = 1.0, output = 2.0 }
"""


def _toml(upstream: Upstream) -> str:
    return config_toml(upstream.base_url, wire_upstreams(upstream.base_url, "responses", "chat") + WIRES).replace(
        "max_body_mb = 1", "max_body_mb = 8")


async def _post(http: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01",
               "Content-Type": "application/json"}
    async with http.post(url, data=io.BytesIO(orjson.dumps(body)), headers=headers) as r:
        return r.status, await r.read()


def _events(body: bytes) -> list[dict[str, Any]]:
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(orjson.loads(line[6:]))
    return out


# 1.5 MB of tool description: a Responses upstream echoes the request's
# tools (and instructions) in response.created, .in_progress and the final
# event, so each is past the 1 MiB a translated stream holds per event.
BIG = "word " * 300_000


@pytest.mark.parametrize("client", ["chat", "messages"])
async def test_echoed_tools_do_not_hide_a_translated_streams_usage(
        make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, client: str) -> None:
    """A client that makes a Responses upstream's events too long to hold
    (its own tools echoed back) used to get a row billing nothing, while
    the upstream generated (and billed the gateway's account): the final
    event, with the usage, was dropped unparsed. It is translated from its
    head and tail now: the client gets its answer and the row the usage."""
    gw = await make_gateway(_toml(upstream))
    key = await gw.key()
    if client == "chat":
        status, body = await _post(http, gw.url + "/v1/chat/completions", key, {
            "model": "via-responses", "stream": True, "stream_options": {"include_usage": True},
            "tools": [{"type": "function", "function": {"name": "f", "description": BIG,
                                                        "parameters": {"type": "object"}}}],
            "messages": [{"role": "user", "content": "hi there"}]})
    else:
        status, body = await _post(http, gw.url + "/v1/messages", key, {
            "model": "via-responses", "stream": True, "max_tokens": 100,
            "tools": [{"name": "f", "description": BIG, "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "hi there"}]})
    assert status == 200
    events = _events(body)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")) \
        if client == "chat" else "".join(e["delta"].get("text", "") for e in events
                                         if e.get("type") == "content_block_delta")
    assert text == "Hello from the mock upstream"
    if client == "chat":
        assert events[-1]["usage"]["prompt_tokens"] == 2 and events[-1]["usage"]["completion_tokens"] == 5
    else:
        assert events[-1]["type"] == "message_stop"
    rows = await gw.wait_usage(1)
    row = rows[-1]
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == (200, 2, 5)
    assert row["cost"] > 0
    assert row["error_type"] is None


async def test_count_never_passes_on_the_upstreams_credential_error(
        make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """count_tokens on a model without a Messages upstream is counted by its
    Responses upstream. When that upstream refused the gateway's own
    credential, its 401 went to the client as is: an authentication error
    the client takes for its own key's, carrying the upstream's message
    (OpenAI's quotes the end of the key it was given), and no log line for
    the operator. It is the gateway's credential: 502 upstream_auth_failed
    and an error line, as on every other path."""
    monkeypatch.setenv("WRONG_UPSTREAM_KEY", "sk-not-the-right-one")
    gw = await make_gateway(_toml(upstream).replace(
        'name = "wire-responses"\nkind = "openai"\nprotocols = ["responses"]\nbase_url = "' + upstream.base_url
        + '"\napi_key_env = "MOCK_UPSTREAM_KEY"',
        'name = "wire-responses"\nkind = "openai"\nprotocols = ["responses"]\nbase_url = "' + upstream.base_url
        + '"\napi_key_env = "WRONG_UPSTREAM_KEY"'))
    key = await gw.key()
    status, body = await _post(http, gw.url + "/v1/messages/count_tokens", key, {
        "model": "via-responses", "messages": [{"role": "user", "content": "hi there"}]})
    assert any(r.path.endswith("/responses/input_tokens") for r in upstream.state.requests)
    assert status == 502, body
    err = orjson.loads(body)
    assert err["type"] == "error" and "Incorrect API key" not in err["error"]["message"]
    assert "rejected the gateway's credential" in err["error"]["message"]
    assert "rejected the gateway's credential" in caplog.text
    rows = await gw.wait_usage(1)
    assert (rows[-1]["status"], rows[-1]["error_type"]) == (502, "upstream_auth_failed")
