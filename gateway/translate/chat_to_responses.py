"""Chat Completions client, Responses upstream (a chat client on a model
that is served only through the Responses API).

Request: chat -> Responses; response and stream: Responses -> chat. The
field table is docs/translation.md.
"""

from __future__ import annotations

from typing import Any

from ..protocols.base import Usage
from .common import (
    CHAT_NOOPS,
    RESPONSES,
    ChatChunks,
    Obj,
    Transducer,
    chat_completion,
    check_fields,
    check_noops,
    choice_from_openai,
    choice_to_responses,
    each,
    expect,
    refuse,
    responses_pieces,
    text_of,
    tools_from_chat,
    tools_to_responses,
    wire_usage,
)

WIRE = RESPONSES

KNOWN = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream", "stream_options",
    "tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort", "verbosity", "user",
    "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "metadata", "service_tier", "store",
    # Accepted at their no-op values only (checked below).
    "n", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "modalities", "stop",
})
PASS = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier", "prompt_cache_key",
        "prompt_cache_retention", "metadata", "service_tier")
# The smallest max_output_tokens the Responses API takes.
MIN_OUTPUT = 16


def request(obj: Obj, model: str, max_tokens: int) -> Obj:
    check_fields(obj, KNOWN, WIRE)
    check_noops(obj, {**CHAT_NOOPS, "stop": ([],)}, WIRE)
    out: Obj = {"model": model, "input": input_items(obj), "store": obj.get("store") is True}
    limit = obj.get("max_completion_tokens")
    if limit is None:
        limit = obj.get("max_tokens")
    if limit is not None:
        out["max_output_tokens"] = max(expect(limit, int, "max_completion_tokens"), MIN_OUTPUT)
    for k in PASS:
        if obj.get(k) is not None:
            out[k] = obj[k]
    if obj.get("tools"):
        out["tools"] = tools_to_responses(tools_from_chat(obj["tools"], WIRE))
    if obj.get("tool_choice") is not None:
        out["tool_choice"] = choice_to_responses(choice_from_openai(obj["tool_choice"], WIRE, False))
    if obj.get("reasoning_effort") is not None:
        out["reasoning"] = {"effort": obj["reasoning_effort"]}
    text: Obj = {}
    fmt = obj.get("response_format")
    if fmt is not None:
        kind = expect(fmt, dict, "response_format").get("type")
        if kind == "json_schema":
            js = expect(fmt.get("json_schema"), dict, "response_format.json_schema")
            text["format"] = {"type": "json_schema", **js}
        else:
            text["format"] = {"type": kind}
    if obj.get("verbosity") is not None:
        text["verbosity"] = obj["verbosity"]
    if text:
        out["text"] = text
    if obj.get("stream") is True:
        out["stream"] = True
    return out


def input_items(obj: Obj) -> list[Obj]:
    out: list[Obj] = []
    for where, m in each(obj.get("messages"), "messages"):
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer"):
            out.append({"type": "message", "role": role, "content": text_of(content, f"{where}.content", WIRE)})
        elif role == "user":
            out.append({"type": "message", "role": "user", "content": _user(content, f"{where}.content")})
        elif role == "assistant":
            # reasoning_content is not replayed: Responses takes reasoning
            # back only as its own encrypted items (docs/translation.md).
            if isinstance(content, list):
                content = "".join(str(p.get("text") or p.get("refusal") or "") for p in content
                                  if isinstance(p, dict))
            if content:
                out.append({"type": "message", "role": "assistant", "content": expect(content, str, where)})
            for k, tc in enumerate(m.get("tool_calls") or ()):
                at = f"{where}.tool_calls[{k}]"
                fn = expect(expect(tc, dict, at).get("function"), dict, f"{at}.function")
                out.append({"type": "function_call", "call_id": str(tc.get("id", "")),
                            "name": str(fn.get("name", "")), "arguments": str(fn.get("arguments") or "{}")})
        elif role == "tool":
            out.append({"type": "function_call_output", "call_id": str(m.get("tool_call_id", "")),
                        "output": text_of(content, f"{where}.content", WIRE)})
        else:
            raise refuse(f"{where}.role", WIRE, f"= {role!r} has no counterpart")
    return out


def _user(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    parts: list[Obj] = []
    for j, p in enumerate(expect(content, list, where)):
        at = f"{where}[{j}]"
        kind = expect(p, dict, at).get("type")
        if kind == "text":
            parts.append({"type": "input_text", "text": str(p.get("text", ""))})
        elif kind == "image_url":
            img = p.get("image_url")
            img = img if isinstance(img, dict) else {"url": img}
            parts.append({"type": "input_image", "image_url": expect(img.get("url"), str, f"{at}.image_url.url"),
                          "detail": img.get("detail") or "auto"})
        elif kind == "file":
            f = expect(p.get("file"), dict, f"{at}.file")
            parts.append({"type": "input_file", **{k: f[k] for k in ("file_data", "file_id", "filename") if k in f}})
        else:
            raise refuse(f"{at}.type", WIRE, f"= {kind!r} has no counterpart")
    return parts


def finish_of(obj: Obj, has_tools: bool) -> str:
    if obj.get("status") == "incomplete":
        reason = (obj.get("incomplete_details") or {}).get("reason")
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if has_tools else "stop"


def response(obj: Obj, req: Obj) -> tuple[Obj, Usage]:
    usage = wire_usage(WIRE, obj.get("usage"))
    pieces, refused = responses_pieces(obj.get("output"))
    finish = "content_filter" if refused else finish_of(obj, any(p.kind == "tool" for p in pieces))
    for p in pieces:
        p.signature = ""  # chat cannot send an encrypted reasoning item back
    cid = str(obj.get("id") or "chatcmpl-translated")
    return chat_completion(cid, str(obj.get("model") or req.get("model")), pieces, finish, usage), usage


class Stream(Transducer):
    """Responses events -> chat chunks: text, reasoning summary and
    function-call argument deltas as they come; the finish chunk (and the
    usage chunk when asked) at the final response event."""

    WIRE = WIRE

    def __init__(self, req: Obj, model: str) -> None:
        so = req.get("stream_options")
        self._include_usage = isinstance(so, dict) and so.get("include_usage") is True
        self._model = model
        self._w: ChatChunks | None = None
        self._usage: Obj | None = None
        self._args: set[str] = set()  # function call items that streamed arguments

    def event(self, ev: Obj | None) -> bytes:
        if ev is None:
            return b""
        kind = ev.get("type")
        w = self._w
        if kind == "response.created" and w is None:
            r = ev.get("response") or {}
            self._w = w = ChatChunks(str(r.get("id") or "chatcmpl-translated"), str(r.get("model") or self._model),
                                     self._include_usage)
            return w.start()
        if w is None or w.stopped:
            return b""
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            return w.text(str(ev.get("delta", "")))
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            return w.reasoning(str(ev.get("delta", "")))
        if kind == "response.function_call_arguments.delta":
            self._args.add(str(ev.get("item_id")))
            return w.tool_args(str(ev.get("item_id")), str(ev.get("delta", "")))
        if kind == "response.output_item.added":
            item = ev.get("item") or {}
            if item.get("type") == "function_call":
                return w.tool(str(item.get("id")), str(item.get("call_id", "")), str(item.get("name", "")))
            return b""
        if kind == "response.output_item.done":
            item = ev.get("item") or {}
            key = str(item.get("id"))
            if item.get("type") == "function_call" and key not in self._args:
                # Arguments sent whole at the end rather than as deltas.
                return w.tool_args(key, str(item.get("arguments") or "{}"))
            return b""
        if kind in ("response.completed", "response.incomplete"):
            r = ev.get("response") or {}
            self._usage = r.get("usage") if isinstance(r.get("usage"), dict) else None
            return w.finish(finish_of(r, w.tool_calls > 0), self.usage())
        if kind in ("response.failed", "error"):
            r = ev.get("response") or {}
            if isinstance(r.get("usage"), dict):
                self._usage = r["usage"]
            err = r.get("error") if kind == "response.failed" else ev
            err = err if isinstance(err, dict) else {}
            self._error = "upstream_stream_error"
            return w.error(str(err.get("message") or "Upstream stream error."), "server_error",
                           str(err.get("code") or "") or None)
        return b""
