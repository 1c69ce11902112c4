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

Tool calls (``tool_use`` blocks, ``input_json_delta``) and ``thinking``
blocks as described in gateway.mock.tools. ``POST /v1/messages/count_tokens``
answers ``{"input_tokens": N}`` with the N that ``/v1/messages`` would
report for the same body.
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import orjson
from aiohttp import web

from .. import safejson
from .common import MOCK, _check, _int, count_prompt_tokens
from .tools import anthropic_tools, new_id, plan


def anthropic_error(status: int, message: str) -> web.Response:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}
    body = {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _as_anthropic(early: web.Response) -> web.Response:
    """The shared checks' early answer in Anthropic's error shape (its
    Retry-After kept)."""
    if early.status < 400:
        return early
    err = anthropic_error(early.status, f"Mock failure {early.status}.")
    if "Retry-After" in early.headers:
        err.headers["Retry-After"] = early.headers["Retry-After"]
    return err


def event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _thinking_on(obj: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the request turns thinking on, and whether it shows the text."""
    t = obj.get("thinking")
    if not isinstance(t, dict) or t.get("type") not in ("enabled", "adaptive"):
        return False, False
    return True, t.get("display") != "omitted"


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: the input tokens the same body
    would be billed on ``/v1/messages``."""
    raw, early = await _check(request, anthropic=True)
    if early is not None:
        return _as_anthropic(early)
    try:
        obj = safejson.loads(raw)
    except orjson.JSONDecodeError:
        return anthropic_error(400, "There was an error parsing the body of your request.")
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return anthropic_error(400, "messages: Field required")
    return web.Response(body=orjson.dumps({"input_tokens": count_prompt_tokens(obj)}),
                        content_type="application/json")


async def messages(request: web.Request) -> web.StreamResponse:
    raw, early = await _check(request, anthropic=True)
    if early is not None:
        return _as_anthropic(early)
    try:
        obj = safejson.loads(raw)
    except orjson.JSONDecodeError:
        return anthropic_error(400, "There was an error parsing the body of your request.")
    if not isinstance(obj, dict):
        return anthropic_error(400, "Request body must be an object.")
    if not isinstance(obj.get("messages"), list):  # as Anthropic: a 400, whatever else is wrong
        return anthropic_error(400, "messages: Input should be a valid list")
    model = obj.get("model", "mock")
    p = plan(request, *anthropic_tools(obj), call_prefix="toolu_")
    words, call = p.words, p.call
    n = p.output_tokens
    thinking_on, show_thinking = _thinking_on(obj)
    thinking = p.thinking if thinking_on else ()
    prompt = count_prompt_tokens(obj)
    cache_read = _int(request, "x-mock-cached")
    cache_creation = _int(request, "x-mock-cache-creation")
    cache_1h = min(_int(request, "x-mock-cache-creation-1h"), cache_creation)
    reasoning = p.reasoning_tokens
    fail = request.headers.get("x-mock-fail")
    mid = new_id("msg_mock")
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
    state = request.app[MOCK]
    state.report("/v1/messages", usage)
    stop_reason = "tool_use" if call is not None else "end_turn"
    signature = "mocksig" + mid[-8:]
    message: dict[str, Any] = {
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage,
    }
    if obj.get("stream") is not True:
        content: list[dict[str, Any]] = []
        if thinking:
            content.append({"type": "thinking", "thinking": "".join(thinking) if show_thinking else "",
                            "signature": signature})
        if call is not None:
            content.append({"type": "tool_use", "id": call.call_id, "name": call.name, "input": call.input})
        else:
            content.append({"type": "text", "text": "".join(words)})
        message.update(content=content, stop_reason=stop_reason)
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
    out: list[bytes] = []  # gzip: one compressed body at the end

    async def send(data: bytes) -> None:
        if fail == "gzip":
            out.append(data)
        else:
            await resp.write(data)

    def delta(index: int, d: dict[str, Any]) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})

    start_usage = {**usage, "output_tokens": 1}
    start_usage.pop("output_tokens_details", None)
    with state.stream():
        await send(event("message_start", {"type": "message_start", "message": {**message, "usage": start_usage}}))
        index = 0
        if thinking:
            await send(event("content_block_start", {"type": "content_block_start", "index": index,
                                                     "content_block": {"type": "thinking", "thinking": "",
                                                                       "signature": ""}}))
            for w in thinking if show_thinking else ():
                await send(delta(index, {"type": "thinking_delta", "thinking": w}))
            await send(delta(index, {"type": "signature_delta", "signature": signature}))
            await send(event("content_block_stop", {"type": "content_block_stop", "index": index}))
            index += 1
        if call is not None:
            await send(event("content_block_start", {"type": "content_block_start", "index": index,
                                                     "content_block": {"type": "tool_use", "id": call.call_id,
                                                                       "name": call.name, "input": {}}}))
            await send(event("ping", {"type": "ping"}))
            for part in call.halves():
                await send(delta(index, {"type": "input_json_delta", "partial_json": part}))
        else:
            await send(event("content_block_start", {"type": "content_block_start", "index": index,
                                                     "content_block": {"type": "text", "text": ""}}))
            await send(event("ping", {"type": "ping"}))
        for i, w in enumerate(words):
            if delay:
                await asyncio.sleep(delay)
            if i == len(words) // 2 and fail in ("midstream", "stall", "error"):
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
            await send(delta(index, {"type": "text_delta", "text": w}))
        await send(event("content_block_stop", {"type": "content_block_stop", "index": index}))
        if fail != "truncate":
            for k in range(1, deltas + 1):
                last = k == deltas
                # As Anthropic sends it today: the input counts again (they can
                # grow with server tools), and the cumulative output.
                du: dict[str, Any] = {"input_tokens": prompt, "cache_creation_input_tokens": cache_creation,
                                      "cache_read_input_tokens": cache_read, "output_tokens": n * k // deltas}
                if last and reasoning:
                    du["output_tokens_details"] = {"thinking_tokens": reasoning}
                await send(event("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason if last else None, "stop_sequence": None},
                    "usage": du,
                }))
            await send(event("message_stop", {"type": "message_stop"}))
        if out:
            await resp.write(gzip.compress(b"".join(out)))
        await resp.write_eof()
    return resp


def register(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
