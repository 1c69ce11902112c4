"""Anthropic Messages client, Responses upstream (Claude Code on an OpenAI
reasoning model through the Responses API).

Request: Messages -> Responses; response and stream: Responses -> Messages.
Reasoning survives the round trip: the upstream's reasoning item (id and
encrypted content) becomes the thinking block's signature, and a thinking
block sent back with such a signature becomes that item again. The field
table is docs/translation.md.
"""

from __future__ import annotations

from typing import Any

from ..protocols.base import Usage
from .common import (
    RESPONSES,
    AnthropicEvents,
    Obj,
    Transducer,
    anthropic_message,
    anthropic_usage_obj,
    check_fields,
    choice_from_anthropic,
    choice_to_responses,
    dumps,
    each,
    effort_for,
    estimate_tokens,
    expect,
    image_url,
    is_default,
    reasoning_item,
    refuse,
    responses_pieces,
    text_of,
    tools_from_anthropic,
    tools_to_responses,
    wire_usage,
)

WIRE = RESPONSES

KNOWN = frozenset({
    "model", "messages", "system", "max_tokens", "stop_sequences", "stream", "temperature", "top_p", "top_k",
    "tools", "tool_choice", "thinking", "output_config",
    "metadata", "cache_control", "service_tier", "inference_geo", "speed", "context_management",
})
# The smallest max_output_tokens the Responses API takes.
MIN_OUTPUT = 16


def request(obj: Obj, model: str, max_tokens: int) -> Obj:
    check_fields(obj, KNOWN, WIRE)
    if not is_default(obj.get("top_k")):
        raise refuse("top_k", WIRE)
    if obj.get("stop_sequences"):
        raise refuse("stop_sequences", WIRE)
    out: Obj = {"model": model, "input": input_items(obj), "store": False}
    if obj.get("system"):
        out["instructions"] = text_of(obj["system"], "system", WIRE)
    out["max_output_tokens"] = max(expect(obj.get("max_tokens", max_tokens), int, "max_tokens"), MIN_OUTPUT)
    for k in ("temperature", "top_p"):
        if obj.get(k) is not None:
            out[k] = obj[k]
    if obj.get("tools"):
        out["tools"] = tools_to_responses(tools_from_anthropic(obj["tools"], WIRE))
    if obj.get("tool_choice") is not None:
        choice, no_parallel = choice_from_anthropic(obj["tool_choice"])
        out["tool_choice"] = choice_to_responses(choice)
        if no_parallel:
            out["parallel_tool_calls"] = False
    effort = effort_for(obj.get("thinking"), obj.get("output_config"))
    if effort is not None:
        # Summaries are what an Anthropic client shows as thinking; the
        # encrypted content is what lets the reasoning be sent back.
        out["reasoning"] = {"effort": effort, "summary": "auto"}
        out["include"] = ["reasoning.encrypted_content"]
    fmt = obj["output_config"].get("format") if isinstance(obj.get("output_config"), dict) else None
    if fmt is not None:
        schema = expect(expect(fmt, dict, "output_config.format").get("schema"), dict, "output_config.format.schema")
        out["text"] = {"format": {"type": "json_schema", "name": "output", "schema": schema, "strict": True}}
    if obj.get("stream") is True:
        out["stream"] = True
    return out


# What POST /responses/input_tokens takes (OpenAI's own token counting).
COUNT_FIELDS = ("model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "reasoning", "text")


def count_request(obj: Obj, model: str) -> Obj:
    """An Anthropic count_tokens body as a Responses input_tokens body."""
    full = request({**obj, "max_tokens": obj.get("max_tokens") or MIN_OUTPUT, "stream": None}, model, MIN_OUTPUT)
    return {k: full[k] for k in COUNT_FIELDS if k in full}


def input_items(obj: Obj) -> list[Obj]:
    out: list[Obj] = []
    for where, m in each(obj.get("messages"), "messages"):
        role = m.get("role")
        content = m.get("content")
        if role == "system":  # a system message between turns stays there
            out.append({"type": "message", "role": "system", "content": text_of(content, f"{where}.content", WIRE)})
            continue
        if role not in ("user", "assistant"):
            raise refuse(f"{where}.role", WIRE, f"= {role!r} has no counterpart")
        if isinstance(content, str):
            out.append({"type": "message", "role": role, "content": content})
            continue
        parts: list[Obj] = []
        for j, b in enumerate(expect(content, list, f"{where}.content")):
            at = f"{where}.content[{j}]"
            kind = expect(b, dict, at).get("type")
            if kind == "text":
                kind = "input_text" if role == "user" else "output_text"
                parts.append({"type": kind, "text": str(b.get("text", ""))})
            elif kind == "image" and role == "user":
                parts.append({"type": "input_image", "image_url": image_url(b.get("source"), f"{at}.source", WIRE),
                              "detail": "auto"})
            elif kind == "tool_result" and role == "user":
                out.append({"type": "function_call_output", "call_id": str(b.get("tool_use_id", "")),
                            "output": _tool_output(b.get("content"), f"{at}.content")})
            elif kind == "tool_use" and role == "assistant":
                out.extend(_flush(role, parts))
                out.append({"type": "function_call", "call_id": str(b.get("id", "")), "name": str(b.get("name", "")),
                            "arguments": dumps(b.get("input") or {})})
            elif kind == "thinking" and role == "assistant":
                item = reasoning_item(str(b.get("thinking", "")), str(b.get("signature") or ""))
                if item is not None:  # thinking from another provider cannot be replayed
                    out.extend(_flush(role, parts))
                    out.append(item)
            elif kind == "redacted_thinking" and role == "assistant":
                continue
            else:
                raise refuse(f"{at}.type", WIRE, f"= {kind!r} has no counterpart")
        out.extend(_flush(role, parts))
    return out


def _flush(role: str, parts: list[Obj]) -> list[Obj]:
    """The message of the parts gathered so far (emptying the list)."""
    if not parts:
        return []
    # Assistant turns go back as plain text, the form every Responses
    # server takes for history (output_text parts would need item ids).
    content: Any = "".join(p["text"] for p in parts) if role == "assistant" else list(parts)
    msg = {"type": "message", "role": role, "content": content}
    parts.clear()
    return [msg]


def _tool_output(content: Any, where: str) -> Any:
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[Obj] = []
    for k, b in enumerate(expect(content, list, where)):
        kind = expect(b, dict, f"{where}[{k}]").get("type")
        if kind == "text":
            parts.append({"type": "input_text", "text": str(b.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "input_image", "image_url": image_url(b.get("source"), f"{where}[{k}].source", WIRE),
                          "detail": "auto"})
        else:
            raise refuse(f"{where}[{k}].type", WIRE, f"= {kind!r} has no counterpart")
    return parts


def stop_of(obj: Obj, has_tools: bool, refused: bool) -> str:
    if refused:
        return "refusal"
    if obj.get("status") == "incomplete":
        reason = (obj.get("incomplete_details") or {}).get("reason")
        return "refusal" if reason == "content_filter" else "max_tokens"
    return "tool_use" if has_tools else "end_turn"


def response(obj: Obj, req: Obj) -> tuple[Obj, Usage]:
    usage = wire_usage(WIRE, obj.get("usage"))
    pieces, refused = responses_pieces(obj.get("output"))
    stop = stop_of(obj, any(p.kind == "tool" for p in pieces), refused)
    mid = "msg_" + str(obj.get("id") or "translated").removeprefix("resp_")
    return anthropic_message(mid, str(obj.get("model") or req.get("model")), pieces, stop, usage), usage


class Stream(Transducer):
    """Responses events -> Messages events. A reasoning item is one thinking
    block (summary parts joined by a blank line) whose signature is written
    when the item is done; a message item's text one text block; a function
    call one tool_use block. ``message_start`` carries a local estimate of
    the input tokens (Responses says its count only at the end), the final
    ``message_delta`` the exact counts."""

    WIRE = WIRE

    def __init__(self, req: Obj, model: str) -> None:
        self._req = req
        self._model = model
        self._w: AnthropicEvents | None = None
        self._usage: Obj | None = None
        self._args: set[str] = set()
        self._tools = False
        self._refused = False

    def event(self, ev: Obj | None) -> bytes:
        if ev is None:
            return b""
        kind = ev.get("type")
        w = self._w
        if kind == "response.created" and w is None:
            r = ev.get("response") or {}
            mid = "msg_" + str(r.get("id") or "translated").removeprefix("resp_")
            self._w = w = AnthropicEvents(mid, str(r.get("model") or self._model))
            return w.start({"input_tokens": estimate_tokens([self._req.get("system"), self._req.get("messages")]),
                            "output_tokens": 1})
        if w is None or w.stopped:
            return b""
        if kind == "response.output_text.delta":
            return w.text(str(ev.get("delta", "")))
        if kind == "response.refusal.delta":
            self._refused = True
            return w.text(str(ev.get("delta", "")))
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            return w.thinking(str(ev.get("delta", "")))
        if kind == "response.reasoning_summary_part.added" and ev.get("summary_index", 0) > 0:
            return w.thinking("\n\n")
        if kind == "response.function_call_arguments.delta":
            self._args.add(str(ev.get("item_id")))
            return w.tool_args(str(ev.get("delta", "")))
        if kind == "response.output_item.added":
            item = ev.get("item") or {}
            if item.get("type") == "function_call":
                self._tools = True
                return w.tool(str(item.get("call_id", "")), str(item.get("name", "")))
            return b""
        if kind == "response.output_item.done":
            return self._item_done(w, ev.get("item") or {})
        if kind in ("response.completed", "response.incomplete"):
            r = ev.get("response") or {}
            self._usage = r.get("usage") if isinstance(r.get("usage"), dict) else None
            return w.finish(stop_of(r, self._tools, self._refused), anthropic_usage_obj(self.usage()))
        if kind in ("response.failed", "error"):
            r = ev.get("response") or {}
            if isinstance(r.get("usage"), dict):
                self._usage = r["usage"]
            err = r.get("error") if kind == "response.failed" else ev
            err = err if isinstance(err, dict) else {}
            self._error = "upstream_stream_error"
            return w.error("api_error", str(err.get("message") or "Upstream stream error."))
        return b""

    def _item_done(self, w: AnthropicEvents, item: Obj) -> bytes:
        kind = item.get("type")
        out = b""
        if kind == "reasoning":
            enc = item.get("encrypted_content")
            if isinstance(enc, str) and enc:
                out = w.signature(f"{item.get('id', '')}:{enc}")
            elif not item.get("summary"):
                return b""  # nothing to show and nothing to send back
            else:
                out = w.thinking("")
        elif kind == "function_call" and str(item.get("id")) not in self._args:
            out = w.tool_args(str(item.get("arguments") or "{}"))
        return out + w.close()
