"""Responses client, Anthropic Messages upstream (Codex on a Claude model).

Request: Responses -> Messages; response and stream: Messages -> Responses.
Thinking survives the round trip: a thinking block's signature becomes the
reasoning item's ``encrypted_content`` (redacted thinking behind a
``redacted_thinking:`` prefix), and a reasoning item sent back with it
becomes that block again. Stateless like every pair: ``previous_response_id``
is refused. The field table is docs/translation.md.
"""

from __future__ import annotations

from typing import Any

from ..protocols.base import Usage
from .common import (
    MESSAGES,
    REDACTED,
    RESPONSES_NOOPS,
    Obj,
    ResponseEvents,
    Transducer,
    anthropic_pieces,
    check_fields,
    check_noops,
    choice_from_openai,
    choice_to_anthropic,
    each,
    expect,
    flat_name,
    image_source,
    namespaces,
    parse_arguments,
    refuse,
    response_object,
    response_output,
    text_of,
    thinking_for,
    tool_id,
    tools_from_responses,
    tools_to_anthropic,
    unsigned_tool_turn,
    wire_usage,
)

WIRE = MESSAGES

KNOWN = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools", "tool_choice",
    "parallel_tool_calls", "text", "reasoning", "background", "truncation", "top_logprobs",
    # Dropped (docs/translation.md): nothing is stored, no extra output,
    # OpenAI's caching and routing hints, the client's own bookkeeping.
    "store", "include", "stream_options", "client_metadata", "metadata", "user", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention", "service_tier",
})

STOP_TO_INCOMPLETE = {"max_tokens": "max_output_tokens", "model_context_window_exceeded": "max_output_tokens",
                      "refusal": "content_filter"}


def request(obj: Obj, model: str, max_tokens: int) -> Obj:
    check_fields(obj, KNOWN, WIRE)
    check_noops(obj, RESPONSES_NOOPS, WIRE)
    system, msgs = messages(obj)
    limit = obj.get("max_output_tokens")
    out: Obj = {"model": model, "max_tokens": expect(limit if limit is not None else max_tokens, int,
                                                     "max_output_tokens"), "messages": msgs}
    if system:
        out["system"] = system
    for k in ("temperature", "top_p"):
        if obj.get(k) is not None:
            out[k] = obj[k]
    if obj.get("tools"):
        out["tools"] = tools_to_anthropic(tools_from_responses(obj["tools"], WIRE))
    choice = choice_from_openai(obj["tool_choice"], WIRE, True) if obj.get("tool_choice") is not None else None
    tc = choice_to_anthropic(choice, obj.get("parallel_tool_calls") if obj.get("tools") else None)
    if tc is not None:
        out["tool_choice"] = tc
    reasoning = obj.get("reasoning")
    if isinstance(reasoning, dict):
        thinking = thinking_for(reasoning.get("effort"), out["max_tokens"])
        if thinking is not None and not unsigned_tool_turn(msgs):
            out["thinking"] = thinking
    text = obj.get("text")
    fmt = expect(text, dict, "text").get("format") if text is not None else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["output_config"] = {"format": {"type": "json_schema",
                                           "schema": expect(fmt.get("schema"), dict, "text.format.schema")}}
    elif isinstance(fmt, dict) and fmt.get("type") != "text":
        raise refuse("text.format.type", WIRE, f"= {fmt.get('type')!r} has no counterpart")
    if obj.get("stream") is True:
        out["stream"] = True
    return out


def messages(obj: Obj) -> tuple[list[Obj], list[Obj]]:
    """System blocks (instructions, then the system and developer messages
    before the first turn) and the turns: a later system or developer
    message stays in place as a Messages system message; one role per turn,
    tool results first in theirs."""
    system: list[Obj] = []
    if obj.get("instructions"):
        system.append({"type": "text", "text": expect(obj["instructions"], str, "instructions")})
    turns: list[Obj] = []

    def add(role: str, blocks: list[Obj]) -> None:
        if not blocks:
            return
        last = turns[-1] if turns else None
        if last is not None and last["role"] == role:
            if blocks[0]["type"] == "tool_result" and any(b["type"] != "tool_result" for b in last["content"]):
                turns.append({"role": role, "content": blocks})
            else:
                last["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    inp = obj.get("input")
    if isinstance(inp, str):
        return system, [{"role": "user", "content": [{"type": "text", "text": inp}]}]
    for where, item in each(inp, "input"):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            content = item.get("content")
            if role in ("system", "developer"):
                text = text_of(content, f"{where}.content", WIRE)
                if text and turns:
                    turns.append({"role": "system", "content": text})
                elif text:
                    system.append({"type": "text", "text": text})
            elif role == "user":
                add("user", _user(content, f"{where}.content"))
            elif role == "assistant":
                text = _assistant_text(content, f"{where}.content")
                add("assistant", [{"type": "text", "text": text}] if text else [])
            else:
                raise refuse(f"{where}.role", WIRE, f"= {role!r} has no counterpart")
        elif kind == "function_call":
            args = parse_arguments(item.get("arguments"), f"{where}.arguments")
            add("assistant", [{"type": "tool_use", "id": tool_id(item.get("call_id")), "name": flat_name(item),
                               "input": args}])
        elif kind == "function_call_output":
            add("user", [{"type": "tool_result", "tool_use_id": tool_id(item.get("call_id")),
                          "content": _tool_output(item.get("output"), f"{where}.output")}])
        elif kind == "reasoning":
            add("assistant", _thinking(item))
        else:
            raise refuse(f"{where}.type", WIRE, f"= {kind!r} has no counterpart")
    return system, turns


def _thinking(item: Obj) -> list[Obj]:
    """A reasoning item as the thinking block it came from; reasoning from
    another provider (no Anthropic signature) cannot be replayed."""
    enc = item.get("encrypted_content")
    if not isinstance(enc, str) or not enc or enc.startswith("gAAAA"):  # OpenAI's own encrypted reasoning
        return []
    if enc.startswith(REDACTED):
        return [{"type": "redacted_thinking", "data": enc[len(REDACTED):]}]
    parts = item.get("summary") or item.get("content") or ()
    text = "\n\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
    return [{"type": "thinking", "thinking": text, "signature": enc}]


def _assistant_text(content: Any, where: str) -> str:
    if isinstance(content, list):
        content = [{"type": "output_text", "text": p.get("refusal", "")} if isinstance(p, dict)
                   and p.get("type") == "refusal" else p for p in content]
    return text_of(content, where, WIRE)


def _image(p: Obj, at: str) -> Obj:
    if not isinstance(p.get("image_url"), str):
        raise refuse(f"{at}.file_id", WIRE, "(an uploaded file) has no counterpart")
    return {"type": "image", "source": image_source(p["image_url"], f"{at}.image_url")}


def _user(content: Any, where: str) -> list[Obj]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[Obj] = []
    for j, p in enumerate(expect(content, list, where)):
        at = f"{where}[{j}]"
        kind = expect(p, dict, at).get("type")
        if kind == "input_text":
            blocks.append({"type": "text", "text": str(p.get("text", ""))})
        elif kind == "input_image":
            blocks.append(_image(p, at))
        elif kind == "input_file" and isinstance(p.get("file_data"), str):
            src = image_source(p["file_data"], f"{at}.file_data")
            if src.get("media_type") != "application/pdf":
                raise refuse(f"{at}.file_data", WIRE, "that is not a base64 PDF data URL has no counterpart")
            blocks.append({"type": "document", "source": src})
        else:
            raise refuse(f"{at}.type", WIRE, f"= {kind!r} has no counterpart")
    return blocks


def _tool_output(output: Any, where: str) -> Any:
    if output is None or isinstance(output, str):
        return output or ""
    blocks: list[Obj] = []
    for k, p in enumerate(expect(output, list, where)):
        at = f"{where}[{k}]"
        kind = expect(p, dict, at).get("type")
        if kind in ("input_text", "output_text"):
            blocks.append({"type": "text", "text": str(p.get("text", ""))})
        elif kind == "input_image":
            blocks.append(_image(p, at))
        else:
            raise refuse(f"{at}.type", WIRE, f"= {kind!r} has no counterpart")
    return blocks


def response(obj: Obj, req: Obj) -> tuple[Obj, Usage]:
    usage = wire_usage(WIRE, obj.get("usage"))
    rid = "resp_" + str(obj.get("id") or "translated")
    incomplete = STOP_TO_INCOMPLETE.get(str(obj.get("stop_reason")))
    out = response_object(rid, str(obj.get("model") or req.get("model")), "incomplete" if incomplete else "completed",
                          response_output(anthropic_pieces(obj.get("content")), rid, namespaces(req)), usage, req,
                          incomplete)
    return out, usage


class Stream(Transducer):
    """Messages events -> Responses events: each content block becomes one
    output item (text -> message, thinking -> reasoning with the signature
    as encrypted content, tool_use -> function_call), written as its deltas
    arrive; ``message_stop`` -> ``response.completed`` (or
    ``.incomplete``) with the usage of ``message_start`` and the last
    ``message_delta``."""

    WIRE = WIRE

    def __init__(self, req: Obj, model: str) -> None:
        self._req = req
        self._model = model
        self._w: ResponseEvents | None = None
        self._usage: Obj = {}
        self._stop: str | None = None

    def event(self, ev: Obj | None) -> bytes:
        if ev is None:
            return b""
        kind = ev.get("type")
        w = self._w
        if kind == "message_start" and w is None:
            msg = ev.get("message") or {}
            if isinstance(msg.get("usage"), dict):
                self._usage = dict(msg["usage"])
            self._w = w = ResponseEvents("resp_" + str(msg.get("id") or "translated"),
                                         str(msg.get("model") or self._model), self._req)
            return w.start()
        if w is None or w.stopped:
            return b""
        if kind == "content_block_delta":
            d = ev.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                return w.text(str(d.get("text", "")))
            if dt == "input_json_delta":
                return w.tool_args(str(d.get("partial_json", "")))
            if dt == "thinking_delta":
                return w.reasoning(str(d.get("thinking", "")))
            if dt == "signature_delta":
                return w.signature(str(d.get("signature", "")))
            return b""
        if kind == "content_block_start":
            block = ev.get("content_block") or {}
            bt = block.get("type")
            if bt == "text":
                return w.text(str(block.get("text", "")))
            if bt == "thinking":
                return w.reasoning(str(block.get("thinking", "")))
            if bt == "redacted_thinking":
                return w.signature(REDACTED + str(block.get("data", "")))
            if bt == "tool_use":
                return w.tool(str(block.get("id", "")), str(block.get("name", "")))
            return b""
        if kind == "content_block_stop":
            return w.close()
        if kind == "message_delta":
            delta = ev.get("delta") or {}
            if delta.get("stop_reason"):
                self._stop = str(delta["stop_reason"])
            u = ev.get("usage")
            if isinstance(u, dict):
                self._usage.update((k, v) for k, v in u.items() if v is not None)
            return b""
        if kind == "message_stop":
            return w.finish(self.usage(), STOP_TO_INCOMPLETE.get(self._stop or ""))
        if kind == "error":
            err = ev.get("error") or {}
            self._error = "upstream_stream_error"
            return w.failed(str(err.get("type") or "server_error"), str(err.get("message") or "Upstream stream error."),
                            self.usage())
        return b""
