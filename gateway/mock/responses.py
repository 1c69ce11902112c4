"""Mock OpenAI Responses upstream: ``POST /v1/responses`` (JSON and SSE) and
``POST /v1/responses/compact`` (JSON).

The stream is OpenAI's: ``event: <type>`` + ``data: {..., "sequence_number"}``
for response.created, response.in_progress, response.output_item.added,
response.content_part.added, one response.output_text.delta per word,
response.output_text.done, response.content_part.done,
response.output_item.done and the final response.completed, whose
``response`` carries the usage (``x-mock-chunks + 9`` events).

Steering headers, besides the shared ones of gateway.mock.app:
- ``x-mock-cached: N``, ``x-mock-reasoning: N``  usage details
- ``x-mock-end: incomplete|failed``  end with response.incomplete / response.failed
- ``x-mock-fail: error``     an ``error`` event halfway, then the end
- ``x-mock-fail: truncate``  end cleanly before the final event
- ``x-mock-fail: gzip``      compress the answer although asked for identity
- ``x-mock-fail: midstream`` drop the connection halfway
"""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import orjson
from aiohttp import web

from .common import MOCK, WORDS, _int, count_words, json_body


def input_tokens(obj: dict[str, Any]) -> int:
    inp = obj.get("input")
    if isinstance(inp, str):
        return max(len(inp.split()), 1)
    return count_words(inp)


def usage(request: web.Request, prompt: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _int(request, "x-mock-cached")},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": _int(request, "x-mock-reasoning")},
        "total_tokens": prompt + output,
    }


def response_object(rid: str, model: str, status: str, output: list[Any], u: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status,
        "background": False, "error": None, "incomplete_details": None, "instructions": None,
        "max_output_tokens": None, "model": model, "output": output, "parallel_tool_calls": True,
        "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": True,
        "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
        "top_p": 1.0, "truncation": "disabled", "usage": u, "user": None, "metadata": {},
    }


def message_item(mid: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "" else []
    return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": content}


def _gzip(data: bytes) -> web.Response:
    return web.Response(body=gzip.compress(data), headers={"Content-Encoding": "gzip"},
                        content_type="application/json")




async def responses(request: web.Request) -> web.StreamResponse:
    obj, early = await json_body(request)
    if obj is None:
        assert early is not None
        return early
    model = str(obj.get("model", "mock"))
    n = _int(request, "x-mock-chunks", 5)
    prompt = input_tokens(obj)
    fail = request.headers.get("x-mock-fail")
    rid = f"resp_mock{id(request) & 0xFFFFFF:x}"
    mid = f"msg_mock{id(request) & 0xFFFFFF:x}"
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    text = "".join(words)
    u = usage(request, prompt, n)
    if obj.get("stream") is not True:
        data = orjson.dumps(response_object(rid, model, "completed", [message_item(mid, text, "completed")], u))
        return _gzip(data) if fail == "gzip" else web.Response(body=data, content_type="application/json")

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    delay = _int(request, "x-mock-delay-ms") / 1000
    end = request.headers.get("x-mock-end", "completed")
    state = request.app[MOCK]
    seq = 0

    def ev(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    loc = {"item_id": mid, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    with state.stream():
        await resp.write(ev("response.created", response=response_object(rid, model, "in_progress", [], None)))
        await resp.write(ev("response.in_progress", response=response_object(rid, model, "in_progress", [], None)))
        await resp.write(ev("response.output_item.added", output_index=0,
                            item={"id": mid, "type": "message", "status": "in_progress", "role": "assistant",
                                  "content": []}))
        await resp.write(ev("response.content_part.added", part=part, **loc))
        for i, w in enumerate(words):
            if delay:
                await asyncio.sleep(delay)
            if i == n // 2 and fail in ("midstream", "error"):
                if fail == "midstream":
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                await resp.write(ev("error", code="server_error", message="The server had an error.", param=None))
                await resp.write_eof()
                return resp
            await resp.write(ev("response.output_text.delta", delta=w, logprobs=[], **loc))
        await resp.write(ev("response.output_text.done", text=text, logprobs=[], **loc))
        await resp.write(ev("response.content_part.done", part={**part, "text": text}, **loc))
        item_status = "incomplete" if end == "incomplete" else "completed"
        item = message_item(mid, text, item_status)
        await resp.write(ev("response.output_item.done", output_index=0, item=item))
        if fail != "truncate":
            final = response_object(rid, model, end, [item], u)
            if end == "incomplete":
                final["incomplete_details"] = {"reason": "max_output_tokens"}
            elif end == "failed":
                final["error"] = {"code": "server_error", "message": "The model failed."}
            await resp.write(ev(f"response.{end}", response=final))
        await resp.write_eof()
    return resp


async def compact(request: web.Request) -> web.Response:
    obj, early = await json_body(request)
    if obj is None:
        assert early is not None
        return early
    prompt = input_tokens(obj)
    inp = obj.get("input")
    users = [i for i in inp if isinstance(i, dict) and i.get("role") == "user"] if isinstance(inp, list) else []
    if isinstance(inp, str):
        users = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": inp}]}]
    out = [{"id": f"msg_u{i}", "status": "completed", **u} for i, u in enumerate(users)]
    out.append({"id": f"cmp_mock{id(request) & 0xFFFFFF:x}", "type": "compaction",
                "encrypted_content": "gAAAAmockcompactedstate=="})
    body = {"id": f"resp_cmp{id(request) & 0xFFFFFF:x}", "object": "response.compaction",
            "created_at": int(time.time()), "output": out, "usage": usage(request, prompt, 3)}
    data = orjson.dumps(body)
    if request.headers.get("x-mock-fail") == "gzip":
        return _gzip(data)
    return web.Response(body=data, content_type="application/json")


def register(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/responses/compact", compact)
