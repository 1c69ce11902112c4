"""Scripted answers: the mock says exactly what a test tells it to, in
whichever protocol it is asked in (chat, Anthropic Messages, Responses),
JSON or streamed, so one conversation can be checked through every
translation pair.

A request carrying ``x-mock-script: <JSON>`` is answered from the script
(before the protocol handlers see it):

    {"pieces": [{"thinking": "...", "signature": "..."},   # reasoning
                {"redacted": "..."},                         # redacted thinking
                {"text": "..."},
                {"tool": "name", "id": "call_1", "args": {...}}],
     "stop": "end" | "length" | "refusal" | "stop_sequence",  # default: tool or end
     "usage": {"input": N, "output": N, "cached": N, "cache_write": N, "reasoning": N},
     "cut": N}          # streamed: drop the connection after N events

Usage ``input`` is in the gateway's meaning (cached input and cache writes
included); each protocol reports it its own way. Streams split text and
thinking into words and tool arguments into three pieces, as real upstreams
deliver them. Chat has no place for a signature or redacted thinking; they
are left out there (as an OpenAI-compatible server would).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .. import safejson
from .common import MOCK, _check, openai_error

Obj = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PATHS = {"/v1/chat/completions": "chat", "/v1/messages": "messages", "/v1/responses": "responses"}


def words(s: str) -> list[str]:
    out: list[str] = []
    for w in s.split(" "):
        out.append(w if not out else " " + w)
    return [w for w in out if w]


def thirds(s: str) -> list[str]:
    n = max(len(s) // 3, 1)
    return [s[:n], s[n : 2 * n], s[2 * n :]] if len(s) > 2 else [s]


def _count(u: Obj, name: str, default: int) -> int:
    """A token count of the script, up to 2**62 (garbage to the gateway past
    10**12, and a sum of two that the mock can still write)."""
    return max(0, min(int(u.get(name, default)), 2**62))


class Script:
    def __init__(self, obj: Obj, request: Obj) -> None:
        self.pieces: list[Obj] = list(obj.get("pieces") or [{"text": "Hello from the script."}])
        self.tools = [p for p in self.pieces if "tool" in p]
        self.stop = obj.get("stop") or ("tool" if self.tools else "end")
        u = obj.get("usage") or {}
        self.input = _count(u, "input", 10)
        self.output = _count(u, "output", 20)
        self.cached = _count(u, "cached", 0)
        self.cache_write = _count(u, "cache_write", 0)
        self.reasoning = _count(u, "reasoning", 0)
        self.cut = obj.get("cut")
        self.delay = float(obj.get("delay_ms", 0)) / 1000
        self.request = request
        self.model = str(request.get("model", "mock"))

    def args(self, p: Obj) -> str:
        return orjson.dumps(p.get("args", {})).decode()

    # ------------------------------------------------------------- usage

    def chat_usage(self) -> Obj:
        return {"prompt_tokens": self.input, "completion_tokens": self.output,
                "total_tokens": self.input + self.output,
                "prompt_tokens_details": {"cached_tokens": self.cached},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning}}

    def anthropic_usage(self) -> Obj:
        u: Obj = {"input_tokens": self.input - self.cached - self.cache_write,
                  "cache_creation_input_tokens": self.cache_write, "cache_read_input_tokens": self.cached,
                  "output_tokens": self.output}
        if self.reasoning:
            u["output_tokens_details"] = {"thinking_tokens": self.reasoning}
        return u

    def responses_usage(self) -> Obj:
        return {"input_tokens": self.input, "input_tokens_details": {"cached_tokens": self.cached},
                "output_tokens": self.output, "output_tokens_details": {"reasoning_tokens": self.reasoning},
                "total_tokens": self.input + self.output}

    # ----------------------------------------------------------- answers

    def chat(self) -> Obj:
        text = "".join(p["text"] for p in self.pieces if "text" in p)
        msg: Obj = {"role": "assistant", "content": text or None, "refusal": None}
        thinking = "".join(p["thinking"] for p in self.pieces if "thinking" in p)
        if thinking:
            msg["reasoning_content"] = thinking
        if self.tools:
            msg["tool_calls"] = [{"id": p["id"], "type": "function",
                                  "function": {"name": p["tool"], "arguments": self.args(p)}} for p in self.tools]
        return {"id": "chatcmpl-script", "object": "chat.completion", "created": int(time.time()),
                "model": self.model, "choices": [{"index": 0, "message": msg, "logprobs": None,
                                                  "finish_reason": self.chat_finish()}],
                "usage": self.chat_usage()}

    def chat_finish(self) -> str:
        return {"tool": "tool_calls", "length": "length", "refusal": "content_filter"}.get(self.stop, "stop")

    def anthropic_stop(self) -> str:
        return {"tool": "tool_use", "length": "max_tokens", "refusal": "refusal",
                "stop_sequence": "stop_sequence"}.get(self.stop, "end_turn")

    def anthropic_blocks(self) -> list[Obj]:
        out = []
        for p in self.pieces:
            if "thinking" in p:
                out.append({"type": "thinking", "thinking": p["thinking"], "signature": p.get("signature", "")})
            elif "redacted" in p:
                out.append({"type": "redacted_thinking", "data": p["redacted"]})
            elif "text" in p:
                out.append({"type": "text", "text": p["text"]})
            else:
                out.append({"type": "tool_use", "id": p["id"], "name": p["tool"], "input": p.get("args", {})})
        return out

    def anthropic(self) -> Obj:
        return {"id": "msg_script", "type": "message", "role": "assistant", "model": self.model,
                "content": self.anthropic_blocks(), "stop_reason": self.anthropic_stop(), "stop_sequence": None,
                "usage": self.anthropic_usage()}

    def responses_items(self) -> list[Obj]:
        out = []
        for i, p in enumerate(self.pieces):
            if "thinking" in p or "redacted" in p:
                item: Obj = {"id": f"rs_script{i}", "type": "reasoning",
                             "summary": [{"type": "summary_text", "text": p["thinking"]}] if p.get("thinking") else []}
                if p.get("signature"):
                    item["encrypted_content"] = p["signature"]
                out.append(item)
            elif "text" in p:
                out.append({"id": f"msg_script{i}", "type": "message", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": p["text"], "annotations": [],
                                         "logprobs": []}]})
            elif "tool" in p:
                out.append({"id": f"fc_script{i}", "type": "function_call", "status": "completed",
                            "call_id": p["id"], "name": p["tool"], "arguments": self.args(p)})
        return out

    def response(self, status: str, output: list[Obj], usage: Obj | None) -> Obj:
        r: Obj = {"id": "resp_script", "object": "response", "created_at": int(time.time()), "status": status,
                  "error": None, "incomplete_details": None, "instructions": None, "model": self.model,
                  "output": output, "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto",
                  "tools": [], "top_p": 1.0, "usage": usage, "metadata": {}}
        if status == "incomplete":
            r["incomplete_details"] = {"reason": "content_filter" if self.stop == "refusal" else "max_output_tokens"}
        return r

    def responses(self) -> Obj:
        status = "incomplete" if self.stop in ("length", "refusal") else "completed"
        return self.response(status, self.responses_items(), self.responses_usage())

    # ------------------------------------------------------------ streams

    def chat_events(self) -> list[bytes]:
        def chunk(delta: Obj, finish: str | None = None) -> bytes:
            return b"data: " + orjson.dumps({
                "id": "chatcmpl-script", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}) + b"\n\n"

        out = [chunk({"role": "assistant", "content": ""})]
        index = 0
        for p in self.pieces:
            if "thinking" in p:
                out += [chunk({"reasoning_content": w}) for w in words(p["thinking"])]
            elif "text" in p:
                out += [chunk({"content": w}) for w in words(p["text"])]
            elif "tool" in p:
                out.append(chunk({"tool_calls": [{"index": index, "id": p["id"], "type": "function",
                                                  "function": {"name": p["tool"], "arguments": ""}}]}))
                out += [chunk({"tool_calls": [{"index": index, "function": {"arguments": a}}]})
                        for a in thirds(self.args(p))]
                index += 1
        out.append(chunk({}, self.chat_finish()))
        so = self.request.get("stream_options")
        if isinstance(so, dict) and so.get("include_usage"):
            out.append(b"data: " + orjson.dumps({"id": "chatcmpl-script", "object": "chat.completion.chunk",
                                                 "created": int(time.time()), "model": self.model, "choices": [],
                                                 "usage": self.chat_usage()}) + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out

    def anthropic_events(self) -> list[bytes]:
        def ev(obj: Obj) -> bytes:
            return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

        start_usage = {**self.anthropic_usage(), "output_tokens": 1}
        start_usage.pop("output_tokens_details", None)
        msg = {**self.anthropic(), "content": [], "stop_reason": None, "usage": start_usage}
        out = [ev({"type": "message_start", "message": msg})]
        for i, b in enumerate(self.anthropic_blocks()):
            kind = b["type"]
            start = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "",
                                                                        "signature": ""},
                     "tool_use": {**b, "input": {}}, "redacted_thinking": b}[kind]
            out.append(ev({"type": "content_block_start", "index": i, "content_block": start}))
            if i == 0:
                out.append(ev({"type": "ping"}))
            deltas: list[Obj] = []
            if kind == "text":
                deltas = [{"type": "text_delta", "text": w} for w in words(b["text"])]
            elif kind == "thinking":
                deltas = [{"type": "thinking_delta", "thinking": w} for w in words(b["thinking"])]
                deltas.append({"type": "signature_delta", "signature": b["signature"]})
            elif kind == "tool_use":
                deltas = [{"type": "input_json_delta", "partial_json": a} for a in thirds(orjson.dumps(
                    b["input"]).decode())]
            out += [ev({"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
            out.append(ev({"type": "content_block_stop", "index": i}))
        u: Obj = {"output_tokens": self.output}
        if self.reasoning:
            u["output_tokens_details"] = {"thinking_tokens": self.reasoning}
        out.append(ev({"type": "message_delta", "delta": {"stop_reason": self.anthropic_stop(),
                                                          "stop_sequence": None}, "usage": u}))
        out.append(ev({"type": "message_stop"}))
        return out

    def responses_events(self) -> list[bytes]:
        seq = 0

        def ev(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            data = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        start = self.response("in_progress", [], None)
        out = [ev("response.created", response=start), ev("response.in_progress", response=start)]
        for n, item in enumerate(self.responses_items()):
            kind = item["type"]
            loc = {"item_id": item["id"], "output_index": n}
            if kind == "message":
                text = item["content"][0]["text"]
                out.append(ev("response.output_item.added", output_index=n,
                              item={**item, "status": "in_progress", "content": []}))
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                out.append(ev("response.content_part.added", **loc, content_index=0, part=part))
                out += [ev("response.output_text.delta", **loc, content_index=0, delta=w, logprobs=[])
                        for w in words(text)]
                out.append(ev("response.output_text.done", **loc, content_index=0, text=text, logprobs=[]))
                out.append(ev("response.content_part.done", **loc, content_index=0, part={**part, "text": text}))
            elif kind == "reasoning":
                out.append(ev("response.output_item.added", output_index=n, item={**item, "summary": []}))
                for k, s in enumerate(item["summary"]):
                    out.append(ev("response.reasoning_summary_part.added", **loc, summary_index=k,
                                  part={"type": "summary_text", "text": ""}))
                    out += [ev("response.reasoning_summary_text.delta", **loc, summary_index=k, delta=w)
                            for w in words(s["text"])]
                    out.append(ev("response.reasoning_summary_text.done", **loc, summary_index=k, text=s["text"]))
                    out.append(ev("response.reasoning_summary_part.done", **loc, summary_index=k, part=s))
            else:
                out.append(ev("response.output_item.added", output_index=n,
                              item={**item, "status": "in_progress", "arguments": ""}))
                out += [ev("response.function_call_arguments.delta", **loc, delta=a) for a in thirds(item["arguments"])]
                out.append(ev("response.function_call_arguments.done", **loc, name=item["name"],
                              arguments=item["arguments"]))
            out.append(ev("response.output_item.done", output_index=n, item=item))
        final = self.responses()
        out.append(ev(f"response.{final['status']}", response=final))
        return out


async def answer(request: web.Request, script: Script, protocol: str) -> web.StreamResponse:
    if script.request.get("stream") is not True:
        body = {"chat": script.chat, "messages": script.anthropic, "responses": script.responses}[protocol]()
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    events = {"chat": script.chat_events, "messages": script.anthropic_events,
              "responses": script.responses_events}[protocol]()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    with request.app[MOCK].stream():
        for i, e in enumerate(events):
            if script.cut is not None and i == script.cut:
                assert request.transport is not None
                request.transport.close()
                return resp
            if script.delay:
                await asyncio.sleep(script.delay)
            await resp.write(e)
        await resp.write_eof()
    return resp


@web.middleware
async def scripted(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers requests that carry a script; everything else goes on to the
    protocol handlers."""
    raw = request.headers.get("x-mock-script")
    protocol = PATHS.get(request.path)
    if raw is None or protocol is None or request.method != "POST":
        return await handler(request)
    body, early = await _check(request, anthropic=protocol == "messages")
    if early is not None:
        return early  # the auth check failed: no script is played to a stranger
    try:
        script = Script(safejson.loads(raw), safejson.loads(body))
    except (ValueError, TypeError, AttributeError):  # orjson.JSONDecodeError is a ValueError
        return openai_error(400, "x-mock-script: not a script (see gateway/mock/script.py)")
    return await answer(request, script, protocol)
