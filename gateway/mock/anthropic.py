"""Mock Anthropic Messages upstream: ``POST /v1/messages``, JSON and SSE.

The stream is Anthropic's: ``event:`` + ``data:`` lines, in the order
message_start (input usage), content_block_start, ping, one
content_block_delta per word, content_block_stop, message_delta
(cumulative output usage), message_stop. That is ``x-mock-chunks + 6``
events; ``x-mock-chunks: 194`` gives a 200-event stream.

Steering headers, besides the shared ones of gateway.mock.app:
- ``x-mock-cached: N``         ``cache_read_input_tokens``
- ``x-mock-cache-creation: N`` ``cache_creation_input_tokens``
- ``x-mock-cache-creation-1h: N`` of those, written with a 1-hour ttl
  (``cache_creation.ephemeral_1h_input_tokens``; the rest is 5-minute)
- ``x-mock-reasoning: N``      ``output_tokens_details.thinking_tokens``
- ``x-mock-deltas: K``         K message_delta events, cumulative counts
- ``x-mock-fail: error``       an ``error`` event halfway, then the end
- ``x-mock-fail: truncate``    end cleanly before message_delta/message_stop
- ``x-mock-fail: gzip``        compress the answer although asked for identity
- ``x-mock-fail: midstream|stall``  drop the connection / hang halfway
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import orjson
from aiohttp import web

from .common import MOCK, WORDS, _check, _int, count_prompt_tokens


def anthropic_error(status: int, message: str) -> web.Response:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}
    body = {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


async def messages(request: web.Request) -> web.StreamResponse:
    raw, early = await _check(request, anthropic=True)
    if early is not None:
        if early.status >= 400:
            return anthropic_error(early.status, f"Mock failure {early.status}.")
        return early
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return anthropic_error(400, "There was an error parsing the body of your request.")
    if not isinstance(obj, dict):
        return anthropic_error(400, "Request body must be an object.")
    model = obj.get("model", "mock")
    n = _int(request, "x-mock-chunks", 5)
    prompt = count_prompt_tokens(obj)
    cache_read = _int(request, "x-mock-cached")
    cache_creation = _int(request, "x-mock-cache-creation")
    cache_1h = min(_int(request, "x-mock-cache-creation-1h"), cache_creation)
    reasoning = _int(request, "x-mock-reasoning")
    fail = request.headers.get("x-mock-fail")
    mid = f"msg_mock{id(request) & 0xFFFFFF:x}"
    usage: dict[str, Any] = {
        "input_tokens": prompt,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": cache_creation - cache_1h,
                           "ephemeral_1h_input_tokens": cache_1h},
        "output_tokens": n,
        "service_tier": "standard",
    }
    if reasoning:
        usage["output_tokens_details"] = {"thinking_tokens": reasoning}
    message: dict[str, Any] = {
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage,
    }
    if obj.get("stream") is not True:
        text = "".join(WORDS[i % len(WORDS)] for i in range(n))
        message.update(content=[{"type": "text", "text": text}], stop_reason="end_turn")
        data = orjson.dumps(message)
        if fail == "gzip":
            return web.Response(body=gzip.compress(data), headers={"Content-Encoding": "gzip"},
                                content_type="application/json")
        return web.Response(body=data, content_type="application/json")

    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    if fail == "gzip":
        headers["Content-Encoding"] = "gzip"
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    delay = _int(request, "x-mock-delay-ms") / 1000
    deltas = max(_int(request, "x-mock-deltas", 1), 1)
    state = request.app[MOCK]
    out: list[bytes] = []  # gzip: one compressed body at the end

    async def send(data: bytes) -> None:
        if fail == "gzip":
            out.append(data)
        else:
            await resp.write(data)

    start_usage = {**usage, "output_tokens": 1}
    start_usage.pop("output_tokens_details", None)
    with state.stream():
        await send(event("message_start", {"type": "message_start", "message": {**message, "usage": start_usage}}))
        await send(event("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": {"type": "text", "text": ""}}))
        await send(event("ping", {"type": "ping"}))
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            if i == n // 2 and fail in ("midstream", "stall", "error"):
                if fail == "midstream":
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if fail == "stall":
                    await asyncio.sleep(3600)
                await send(event("error", {"type": "error",
                                           "error": {"type": "overloaded_error", "message": "Overloaded"}}))
                await resp.write_eof()
                return resp
            await send(event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta", "text": WORDS[i % len(WORDS)]}}))
        await send(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if fail != "truncate":
            for k in range(1, deltas + 1):
                last = k == deltas
                du: dict[str, Any] = {"output_tokens": n * k // deltas}
                if last and reasoning:
                    du["output_tokens_details"] = {"thinking_tokens": reasoning}
                await send(event("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn" if last else None, "stop_sequence": None},
                    "usage": du,
                }))
            await send(event("message_stop", {"type": "message_stop"}))
        if out:
            await resp.write(gzip.compress(b"".join(out)))
        await resp.write_eof()
    return resp


def register(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
