"""Mock OpenAI Responses upstream: ``POST /v1/responses`` (JSON and SSE),
the same over a WebSocket on ``GET /v1/responses``, ``POST
/v1/responses/compact`` and ``/v1/responses/input_tokens``, and the stored
responses: ``GET``/``DELETE /v1/responses/{id}``, ``GET
/v1/responses/{id}/input_items``, ``POST /v1/responses/{id}/cancel``.

The stream is OpenAI's: ``event: <type>`` + ``data: {..., "sequence_number"}``
for response.created, response.in_progress, response.output_item.added,
response.content_part.added, one response.output_text.delta per word,
response.output_text.done, response.content_part.done,
response.output_item.done and the final response.completed, whose
``response`` carries the usage (``x-mock-chunks + 9`` events). A reasoning
item (``x-mock-reasoning``) and function calls (``x-mock-tool``) come as
OpenAI sends them; see gateway.mock.tools.

Every response gets a fresh id. Unless the request says ``"store": false``
it is kept (in ``MockState.responses``) for the GET/DELETE routes, and a
``previous_response_id`` this mock does not hold is a 400
``previous_response_not_found``, as OpenAI answers: a gateway that sends a
follow-up to the wrong upstream account is caught. On a WebSocket, the
connection's last response is usable as ``previous_response_id`` even when
not stored (OpenAI's connection-local state).

The WebSocket takes text frames ``{"type": "response.create", ...body}``
and answers each with the stream's events as text frames (the ``data`` of
each SSE event); ``"generate": false`` makes a response with no output
(a warm-up). Errors come as ``{"type": "error", "status": N, "error":
{...}}``. Frames are recorded in ``MockState.ws_frames``.

Steering headers, besides the shared ones of gateway.mock.app (on the
WebSocket: those of the upgrade request):
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
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from .. import safejson
from .common import MOCK, MockState, _check, _int, count_words, json_body, openai_error
from .tools import Plan, new_id, plan, responses_tools


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


def response_object(rid: str, model: str, status: str, output: list[Any], u: dict[str, Any] | None,
                    obj: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = obj or {}
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status,
        "background": False, "error": None, "incomplete_details": None, "instructions": obj.get("instructions"),
        "max_output_tokens": None, "model": model, "output": output, "parallel_tool_calls": True,
        "previous_response_id": obj.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
        "store": obj.get("store") is not False, "temperature": 1.0, "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "tools": obj.get("tools") or [], "top_p": 1.0, "truncation": "disabled",
        "usage": u, "user": None, "metadata": {},
    }


def message_item(mid: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "" else []
    return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": content}


def _gzip(data: bytes) -> web.Response:
    return web.Response(body=gzip.compress(data), headers={"Content-Encoding": "gzip"},
                        content_type="application/json")


def not_found_previous(prev: str) -> dict[str, Any]:
    return {"message": f"Previous response with id '{prev}' not found.", "type": "invalid_request_error",
            "param": "previous_response_id", "code": "previous_response_not_found"}


class Run:
    """One response being made: its id, plan, items and usage."""

    def __init__(self, request: web.Request, obj: dict[str, Any], *, generate: bool = True) -> None:
        self.obj = obj
        self.model = str(obj.get("model", "mock"))
        self.rid = new_id("resp_mock")
        self.plan: Plan = plan(request, *responses_tools(obj), call_prefix="call_")
        if not generate:
            self.plan = Plan(None, (), (), 0)
        self.fail = request.headers.get("x-mock-fail") if generate else None
        self.end = request.headers.get("x-mock-end", "completed") if generate else "completed"
        self.delay = _int(request, "x-mock-delay-ms") / 1000
        self.usage = usage(request, input_tokens(obj), self.plan.output_tokens) if generate else {
            "input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}
        self.output: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None

    def reasoning_item(self) -> dict[str, Any] | None:
        if not self.plan.thinking:
            return None
        r = self.obj.get("reasoning")
        summary = isinstance(r, dict) and r.get("summary") not in (None, "none")
        item: dict[str, Any] = {"id": new_id("rs_"), "type": "reasoning",
                                "summary": [{"type": "summary_text", "text": "".join(self.plan.thinking)}]
                                if summary else []}
        include = self.obj.get("include")
        if isinstance(include, list) and "reasoning.encrypted_content" in include:
            item["encrypted_content"] = "gAAAAmockreasoning" + self.rid[-8:]
        return item

    def done(self, state: MockState) -> dict[str, Any]:
        """The final response object; kept unless ``store`` is false."""
        final = response_object(self.rid, self.model, self.end, self.output, self.usage, self.obj)
        if self.end == "incomplete":
            final["incomplete_details"] = {"reason": "max_output_tokens"}
        elif self.end == "failed":
            final["error"] = {"code": "server_error", "message": "The model failed."}
        self.final = final
        if self.obj.get("store") is not False:
            inp = self.obj.get("input")
            items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": inp}]}] \
                if isinstance(inp, str) else [i for i in inp or () if isinstance(i, dict)]
            state.responses[self.rid] = {"response": final, "input": items}
        return final

    def whole(self, state: MockState) -> dict[str, Any]:
        """The answer without streaming."""
        reasoning = self.reasoning_item()
        if reasoning is not None:
            self.output.append(reasoning)
        call = self.plan.call
        if call is not None:
            self.output.append({"id": new_id("fc_"), "type": "function_call", "status": "completed",
                                "arguments": call.arguments, "call_id": call.call_id, "name": call.name})
        elif self.plan.words:
            self.output.append(message_item(new_id("msg_mock"), "".join(self.plan.words), "completed"))
        return self.done(state)

    async def events(self, state: MockState) -> AsyncIterator[dict[str, Any] | None]:
        """The stream's events in order; None where the connection is to be
        dropped (``x-mock-fail: midstream``), after which nothing follows."""
        seq = 0

        def ev(kind: str, **fields: Any) -> dict[str, Any]:
            nonlocal seq
            data = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return data

        model, rid = self.model, self.rid
        yield ev("response.created", response=response_object(rid, model, "in_progress", [], None, self.obj))
        yield ev("response.in_progress", response=response_object(rid, model, "in_progress", [], None, self.obj))
        reasoning = self.reasoning_item()
        if reasoning is not None:
            idx = len(self.output)
            yield ev("response.output_item.added", output_index=idx, item={**reasoning, "summary": []})
            for si, part in enumerate(reasoning["summary"]):
                loc = {"item_id": reasoning["id"], "output_index": idx, "summary_index": si}
                yield ev("response.reasoning_summary_part.added", part={"type": "summary_text", "text": ""}, **loc)
                for w in self.plan.thinking:
                    yield ev("response.reasoning_summary_text.delta", delta=w, **loc)
                yield ev("response.reasoning_summary_text.done", text=part["text"], **loc)
                yield ev("response.reasoning_summary_part.done", part=part, **loc)
            self.output.append(reasoning)
            yield ev("response.output_item.done", output_index=idx, item=reasoning)
        call = self.plan.call
        idx = len(self.output)
        if call is not None:
            item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress", "arguments": "",
                    "call_id": call.call_id, "name": call.name}
            yield ev("response.output_item.added", output_index=idx, item=item)
            for part in call.halves():
                yield ev("response.function_call_arguments.delta", item_id=item["id"], output_index=idx, delta=part)
            yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                     arguments=call.arguments)
            item = {**item, "status": "completed", "arguments": call.arguments}
            self.output.append(item)
            yield ev("response.output_item.done", output_index=idx, item=item)
        elif self.plan.words:
            words = self.plan.words
            mid = new_id("msg_mock")
            loc = {"item_id": mid, "output_index": idx, "content_index": 0}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield ev("response.output_item.added", output_index=idx,
                     item={"id": mid, "type": "message", "status": "in_progress", "role": "assistant", "content": []})
            yield ev("response.content_part.added", part=part, **loc)
            for i, w in enumerate(words):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if i == len(words) // 2 and self.fail in ("midstream", "error"):
                    if self.fail == "midstream":
                        yield None
                        return
                    yield ev("error", code="server_error", message="The server had an error.", param=None)
                    return
                yield ev("response.output_text.delta", delta=w, logprobs=[], **loc)
            text = "".join(words)
            yield ev("response.output_text.done", text=text, logprobs=[], **loc)
            yield ev("response.content_part.done", part={**part, "text": text}, **loc)
            item = message_item(mid, text, "incomplete" if self.end == "incomplete" else "completed")
            self.output.append(item)
            yield ev("response.output_item.done", output_index=idx, item=item)
        if self.fail != "truncate":
            yield ev(f"response.{self.end}", response=self.done(state))


def _previous_known(state: MockState, obj: dict[str, Any], local: str | None = None) -> str | None:
    """The ``previous_response_id`` of a request if this mock cannot use it."""
    prev = obj.get("previous_response_id")
    if prev is None or prev == local or prev in state.responses:
        return None
    return str(prev)


async def responses(request: web.Request) -> web.StreamResponse:
    obj, early = await json_body(request)
    if obj is None:
        assert early is not None
        return early
    state = request.app[MOCK]
    inp = obj.get("input")
    if inp is not None and not isinstance(inp, str | list):
        return openai_error(400, "Invalid type for 'input': expected a string or an array of items.")
    missing = _previous_known(state, obj)
    if missing is not None:
        return web.Response(status=400, body=orjson.dumps({"error": not_found_previous(missing)}),
                            content_type="application/json")
    run = Run(request, obj)
    state.report("/v1/responses", run.usage)
    if obj.get("stream") is not True:
        data = orjson.dumps(run.whole(state))
        return _gzip(data) if run.fail == "gzip" else web.Response(body=data, content_type="application/json")

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    with state.stream():
        async for e in run.events(state):
            if e is None:
                assert request.transport is not None
                request.transport.close()
                return resp
            kind = str(e["type"])
            await resp.write(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n")
        await resp.write_eof()
    return resp


async def websocket(request: web.Request) -> web.StreamResponse:
    """Responses over a WebSocket (see the module docstring)."""
    _, early = await _check(request)
    if early is not None:
        return early
    ws = web.WebSocketResponse(compress=True)
    if not ws.can_prepare(request).ok:
        return openai_error(400, "GET /v1/responses expects a WebSocket upgrade.")
    await ws.prepare(request)
    state = request.app[MOCK]
    last: str | None = None  # the connection's last response: usable unstored
    with state.stream():
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                frame = safejson.loads(msg.data)
            except orjson.JSONDecodeError:
                frame = None
            if not isinstance(frame, dict):
                await ws.send_str(_ws_error(400, "invalid_request_error", "Frame is not a JSON object."))
                continue
            if state.record:
                state.ws_frames.append(frame)
            if frame.get("type") != "response.create":
                continue  # acknowledgements and the like need no answer
            body = {k: v for k, v in frame.items() if k not in ("type", "generate")}
            missing = _previous_known(state, body, last)
            if missing is not None:
                await ws.send_str(orjson.dumps(
                    {"type": "error", "status": 400, "error": not_found_previous(missing)}).decode())
                continue
            run = Run(request, body, generate=frame.get("generate") is not False)
            state.report("/v1/responses", run.usage)
            async for e in run.events(state):
                if e is None:
                    await ws.close()
                    return ws
                await ws.send_str(orjson.dumps(e).decode())
            last = run.rid
    return ws


def _ws_error(status: int, kind: str, message: str) -> str:
    return orjson.dumps({"type": "error", "status": status,
                         "error": {"type": kind, "code": None, "message": message, "param": None}}).decode()


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
    out.append({"id": new_id("cmp_mock"), "type": "compaction", "encrypted_content": "gAAAAmockcompactedstate=="})
    u = usage(request, prompt, 3)
    request.app[MOCK].report("/v1/responses/compact", u)
    body = {"id": new_id("resp_cmp"), "object": "response.compaction",
            "created_at": int(time.time()), "output": out, "usage": u}
    data = orjson.dumps(body)
    if request.headers.get("x-mock-fail") == "gzip":
        return _gzip(data)
    return web.Response(body=data, content_type="application/json")


async def count_input_tokens(request: web.Request) -> web.Response:
    """``POST /v1/responses/input_tokens``: what the body would be billed as input."""
    obj, early = await json_body(request)
    if obj is None:
        assert early is not None
        return early
    return web.Response(body=orjson.dumps({"object": "response.input_tokens", "input_tokens": input_tokens(obj)}),
                        content_type="application/json")


def _not_found(rid: str) -> web.Response:
    return openai_error(404, f"No response found with id '{rid}'.")


async def stored(request: web.Request) -> web.Response:
    """GET and DELETE ``/v1/responses/{id}``, ``.../input_items``, ``.../cancel``."""
    _, early = await _check(request)
    if early is not None:
        return early
    state = request.app[MOCK]
    rid = request.match_info["id"]
    kept = state.responses.get(rid)
    if kept is None:
        return _not_found(rid)
    action = request.match_info.get("action", "")
    if request.method == "DELETE":
        del state.responses[rid]
        body: dict[str, Any] = {"id": rid, "object": "response.deleted", "deleted": True}
    elif action == "input_items":
        items = [{"id": item.get("id") or f"item_{rid[-6:]}_{i}", **item} for i, item in enumerate(kept["input"])]
        body = {"object": "list", "data": items, "has_more": False,
                "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}
    elif action == "cancel":
        kept["response"] = body = {**kept["response"], "status": "cancelled"}
    else:
        body = kept["response"]
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def register(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/responses", websocket)
    app.router.add_post("/v1/responses/compact", compact)
    app.router.add_post("/v1/responses/input_tokens", count_input_tokens)
    app.router.add_get("/v1/responses/{id}", stored)
    app.router.add_delete("/v1/responses/{id}", stored)
    app.router.add_get("/v1/responses/{id}/{action:input_items}", stored)
    app.router.add_post("/v1/responses/{id}/{action:cancel}", stored)
