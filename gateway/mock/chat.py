"""OpenAI Chat Completions, normal and streaming (steered by the headers
listed in gateway.mock.app; tool calls and ``reasoning_content`` as in
gateway.mock.tools)."""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import orjson
from aiohttp import web

from .common import MOCK, _int, _steer, chat_usage, count_prompt_tokens, json_body
from .tools import chat_tools, new_id, plan, reasoning_content_on


async def chat_completions(request: web.Request) -> web.StreamResponse:
    obj, early = await json_body(request)
    if early is not None:
        return early
    assert obj is not None
    model = obj.get("model", "mock")
    p = plan(request, *chat_tools(obj), call_prefix="call_")
    words, call = p.words, p.call
    n = p.output_tokens
    prompt = count_prompt_tokens(obj)
    created = int(time.time())
    cid = new_id("chatcmpl-mock")
    state = request.app[MOCK]
    usage = chat_usage(request, prompt, n)
    state.report("/v1/chat/completions", usage)
    thinking = "".join(p.thinking) if reasoning_content_on(request) else ""
    finish = "tool_calls" if call is not None else "stop"
    if obj.get("stream") is not True:
        text = "".join(words) if call is None else None
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if call is not None:
            message["tool_calls"] = [{"id": call.call_id, "type": "function",
                                      "function": {"name": call.name, "arguments": call.arguments}}]
        if thinking:
            message["reasoning_content"] = thinking
        body = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
            "system_fingerprint": "fp_mock",
        }
        data = orjson.dumps(body)
        if _steer(request, "x-mock-fail") == "gzip":
            return web.Response(body=gzip.compress(data), headers={"Content-Encoding": "gzip"},
                                content_type="application/json")
        return web.Response(body=data, content_type="application/json")

    so = obj.get("stream_options")
    include_usage = isinstance(so, dict) and so.get("include_usage") is True
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    delay = _int(request, "x-mock-delay-ms") / 1000
    fail = _steer(request, "x-mock-fail")
    # Lines ended with CRLF, as the SSE spec allows and some providers and
    # proxies send: events then end with a blank line of "\r\n\r\n".
    eol = b"\r\n" if _steer(request, "x-mock-line-ending") == "crlf" else b"\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        c: dict[str, Any] = {
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            c["usage"] = None
        return b"data: " + orjson.dumps(c) + eol + eol

    with state.stream():
        await resp.write(chunk({"role": "assistant", "content": "" if call is None else None, "refusal": None}))
        if thinking:
            for w in p.thinking:
                await resp.write(chunk({"reasoning_content": w}))
        for i, w in enumerate(words):
            if delay:
                await asyncio.sleep(delay)
            if fail == "midstream" and i == len(words) // 2:
                # Die without finishing the chunked body.
                assert request.transport is not None
                request.transport.close()
                return resp
            if fail == "stall" and i == len(words) // 2:
                await asyncio.sleep(3600)
            await resp.write(chunk({"content": w}))
        if call is not None:
            await resp.write(chunk({"tool_calls": [{"index": 0, "id": call.call_id, "type": "function",
                                                    "function": {"name": call.name, "arguments": ""}}]}))
            for part in call.halves():
                await resp.write(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
        await resp.write(chunk({}, finish))
        if include_usage:
            u = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "system_fingerprint": "fp_mock", "choices": [], "usage": usage}
            await resp.write(b"data: " + orjson.dumps(u) + eol + eol)
        await resp.write(b"data: [DONE]" + eol + eol)
        await resp.write_eof()
    return resp


def register(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
