"""A hostile upstream sending an SSE event that never ends (issue 11, item
10): on the default chat path, where the gateway hides the usage chunk and
so holds back partial events, the held bytes are bounded; past the bound
the event is relayed as it arrives and the row says why its usage may be
incomplete."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.server import Running, start_app

from .conftest import GatewayFactory, config_toml

BIG = 3 * 1024 * 1024  # three times the bound


class Hostile:
    """An OpenAI-style upstream whose stream opens an event it does not end
    until told to (``release``), then sends a usage chunk and [DONE]."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sent_big = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        first = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "a"}}],
                 "usage": None}
        await resp.write(b"data: " + orjson.dumps(first) + b"\n\n")
        await resp.write(b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"')
        piece = b"~" * 4096
        while self.sent_big < BIG:
            await resp.write(piece)
            self.sent_big += len(piece)
        await asyncio.wait_for(self.release.wait(), 20)
        await resp.write(b'"}}]}\n\n')
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9}}
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[Hostile, Running]]:
    h = Hostile()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", h.chat)
    running = await start_app(app, "127.0.0.1", 0, shutdown_timeout=1.0)
    yield h, running
    h.release.set()
    await running.runner.cleanup()


async def test_an_endless_event_is_relayed_not_held(
    make_gateway: GatewayFactory, hostile: tuple[Hostile, Running], http: aiohttp.ClientSession
) -> None:
    h, running = hostile
    gw = await make_gateway(config_toml(running.url + "/v1"))
    key = await gw.key()
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    got = b""
    async with http.post(gw.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
        # The client receives the endless event while the upstream is still
        # in it: the gateway holds at most its bound (1 MiB), not the event.
        while len(got) < 2 * 1024 * 1024:
            chunk = await asyncio.wait_for(r.content.readany(), 10)
            assert chunk, "stream ended early"
            got += chunk
        assert not h.release.is_set()
        h.release.set()
        got += await r.content.read()
    assert got.startswith(b'data: {"id":"c1"') and got.endswith(b"data: [DONE]\n\n")
    assert b'"usage":null' not in got and b'"choices":[]' not in got  # the usage chunk is still hidden
    assert got.count(b"~") == BIG
    rows = await gw.wait_usage(1)
    assert rows[0]["status"] == 200 and rows[0]["error_type"] == "sse_event_too_large"
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (7, 9)  # read after the long event


def test_splitting_gives_back_every_byte_in_order() -> None:
    """However the stream is cut, and whatever the bound, the client gets
    every byte, in order, and no more than the bound is ever held back."""
    from gateway.protocols.base import SSEEvents

    stream = (b"data: 1\n\n" + b"data: " + b"l" * 50 + b"\r\n\r\n" + b"data: 2\n\n" + b": " + b"m" * 30
              + b"\n\ndata: 3\n\ndata: tail")
    for limit in (8, 20, 64, 10**6):
        for size in (1, 2, 3, 5, 7, 64, len(stream)):
            events = SSEEvents(limit)
            out = b""
            parsed: list[bytes] = []
            for i in range(0, len(stream), size):
                before, complete, evs, after = events.split(stream[i : i + size])
                assert len(events.pending) <= limit, (limit, size)
                out += before + complete + after
                parsed += evs
            out += events.pending
            assert out == stream, (limit, size)
            if limit >= 64:
                assert not events.overflowed
                assert parsed == [b"data: 1", b"data: " + b"l" * 50, b"data: 2", b": " + b"m" * 30, b"data: 3"]
            elif size == 1:
                assert events.overflowed and b"data: 1" in parsed


def test_events_counted_however_the_stream_is_cut() -> None:
    """The relay's count of SSE events (what a stream the client cuts is
    billed by) finds every boundary, of either line ending, also where a
    chunk ends inside one."""
    from gateway.protocols.base import Counter

    stream = b"data: 1\n\n" + b"data: 2\r\n\r\n" + b"data: 3\r\n\r\n\n\ndata: 4\n\ndata: half"
    for size in range(1, len(stream) + 1):
        c = Counter(b"\n\n", b"\r\n\r\n")
        for i in range(0, len(stream), size):
            c.feed(stream[i : i + size])
        assert c.count == 5, size


async def test_absurd_usage_numbers_are_not_stored(make_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    """An upstream reporting more tokens than a 64-bit integer holds (found
    by the fuzz suite, on a Responses stream: the row could not be written,
    the request was a 500 and the usage writer stuck): the answer is
    relayed, the absurd count read as 0."""
    async def responses(request: web.Request) -> web.Response:
        event = (b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
                 b'{"input_tokens":99999999999999999999,"output_tokens":3}}}\n\n')
        return web.Response(body=event, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    running = await start_app(app, "127.0.0.1", 0, shutdown_timeout=1.0)
    try:
        gw = await make_gateway(config_toml(running.url + "/v1"))
        key = await gw.key()
        for _ in range(2):
            async with http.post(gw.url + "/v1/responses", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "gpt-test", "input": "hi", "stream": True}) as r:
                assert r.status == 200 and b"99999999999999999999" in await r.read()
        rows = await gw.wait_usage(2)
        assert [(x["status"], x["input_tokens"], x["output_tokens"]) for x in rows] == [(200, 0, 3)] * 2
    finally:
        await running.runner.cleanup()
