"""OpenAI Chat Completions, normal and streaming (steered by the headers
listed in gateway.mock.app)."""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import orjson
from aiohttp import web

from .common import MOCK, WORDS, _int, _steer, chat_usage, count_prompt_tokens, json_body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    obj, early = await json_body(request)
    if early is not None:
        return early
    assert obj is not None
    model = obj.get("model", "mock")
    n = _int(request, "x-mock-chunks", 5)
    prompt = count_prompt_tokens(obj)
    created = int(time.time())
    cid = f"chatcmpl-mock{id(request) & 0xFFFFFF:x}"
    if obj.get("stream") is not True:
        text = "".join(WORDS[i % len(WORDS)] for i in range(n))
        body = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": chat_usage(request, prompt, n),
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
    state = request.app[MOCK]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        c: dict[str, Any] = {
            "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            c["usage"] = None
        return b"data: " + orjson.dumps(c) + b"\n\n"

    with state.stream():
        await resp.write(chunk({"role": "assistant", "content": "", "refusal": None}))
        for i in range(n):
            if delay:
                await asyncio.sleep(delay)
            if fail == "midstream" and i == n // 2:
                # Die without finishing the chunked body.
                assert request.transport is not None
                request.transport.close()
                return resp
            if fail == "stall" and i == n // 2:
                await asyncio.sleep(3600)
            await resp.write(chunk({"content": WORDS[i % len(WORDS)]}))
        await resp.write(chunk({}, "stop"))
        if include_usage:
            u = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "system_fingerprint": "fp_mock", "choices": [], "usage": chat_usage(request, prompt, n)}
            await resp.write(b"data: " + orjson.dumps(u) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    return resp


def register(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
