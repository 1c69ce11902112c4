"""A client that reads a streamed answer and closes the connection just
before the upstream's final event (where OpenAI's protocols put the usage,
and Anthropic's the output tokens) must not get the answer for free."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from .conftest import Gateway, GatewayFactory, Upstream, config_toml, wire_upstreams
from .test_translate_attacks import WIRES


async def read_then_cut(gw: Gateway, path: str, body: dict[str, Any], headers: dict[str, str],
                        eol: bytes = b"\n") -> dict[str, Any]:
    """Read 30 of the 40 content events of a stream (each line ending with
    ``eol``), close the connection, and return the request's usage row."""
    got = 0
    async with aiohttp.ClientSession() as s, s.post(gw.url + path, json=body, headers={
            **headers, "x-mock-chunks": "40", "x-mock-delay-ms": "20"}) as r:
        assert r.status == 200
        async for line in r.content:
            assert line.endswith(eol)
            if line.startswith(b"data:") and (b'"text_delta"' in line or b'"content":"' in line):
                got += 1
            if got >= 30:
                break
        r.close()
    for _ in range(100):
        rows = gw.usage_rows()
        if rows and rows[-1]["status"]:
            break
        await asyncio.sleep(0.05)
    return rows[-1]


@pytest.mark.parametrize("path,model", [("/v1/chat/completions", "gpt-test"), ("/v1/messages", "via-chat"),
                                        ("/v1/chat/completions", "via-responses")])
async def test_a_stream_cut_before_its_usage_is_still_billed(
        make_gateway: GatewayFactory, upstream: Upstream, path: str, model: str) -> None:
    """Read 30 of 40 content events, then close: the row billed nothing
    (0 input, 0 output tokens) although the client had most of the answer.
    What the upstream did not get to report is estimated now: the input
    from the request, the output as one token per event relayed."""
    url = upstream.base_url
    gw = await make_gateway(config_toml(url, wire_upstreams(url, "responses", "chat") + WIRES))
    key = await gw.key()
    body = {"model": model, "stream": True, "max_tokens": 500,
            "messages": [{"role": "user", "content": "hello " * 200}]}
    row = await read_then_cut(gw, path, body, {"Authorization": f"Bearer {key}"})
    assert (row["status"], row["error_type"]) == (499, "client_disconnected")
    assert row["input_tokens"] >= 200  # "hello " * 200 is 1,200 characters: about 300 tokens
    assert row["output_tokens"] >= 30
    assert row["cost"] > 0


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_cut_crlf_stream_is_billed_an_estimate(
        make_gateway: GatewayFactory, upstream: Upstream, include_usage: bool) -> None:
    """The same with an upstream whose SSE lines end with CRLF (events end
    with "\\r\\n\\r\\n", as the spec allows): the events relayed were not
    counted, so the cut stream was billed nothing. Both readers: the one
    that hides the usage chunk the gateway asked for, and the plain relay
    when the client asked for it itself."""
    gw = await make_gateway(config_toml(upstream.base_url))
    key = await gw.key()
    body: dict[str, Any] = {"model": "gpt-test", "stream": True,
                               "messages": [{"role": "user", "content": "hello " * 200}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    row = await read_then_cut(gw, "/v1/chat/completions", body,
                              {"Authorization": f"Bearer {key}", "x-mock-line-ending": "crlf"}, b"\r\n")
    assert (row["status"], row["error_type"]) == (499, "client_disconnected")
    assert row["input_tokens"] >= 200 and row["output_tokens"] >= 30 and row["cost"] > 0, row
