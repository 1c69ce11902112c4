"""Anthropic Messages client, Chat Completions upstream (Claude Code on a
model served by an OpenAI-compatible chat API).

Request: Messages -> chat; response and stream: chat -> Messages. The field
table is docs/translation.md.
"""

from __future__ import annotations

from typing import Any

from ..protocols.base import Usage
from .common import (
    CHAT,
    AnthropicEvents,
    Obj,
    Transducer,
    anthropic_message,
    anthropic_usage_obj,
    chat_pieces,
    check_fields,
    choice_from_anthropic,
    choice_to_chat,
    dumps,
    each,
    effort_for,
    estimate_tokens,
    expect,
    image_url,
    is_default,
    refuse,
    text_of,
    tools_from_anthropic,
    tools_to_chat,
    wire_usage,
)

WIRE = CHAT

# Fields handled below; a field outside this set is refused by name.
KNOWN = frozenset({
    "model", "messages", "system", "max_tokens", "stop_sequences", "stream", "temperature", "top_p", "top_k",
    "tools", "tool_choice", "thinking", "output_config",
    # Dropped (docs/translation.md): caching hints, the abuse-tracking id,
    # Anthropic's own routing and context-editing options.
    "metadata", "cache_control", "service_tier", "inference_geo", "speed", "context_management",
})

FINISH_TO_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                  "function_call": "tool_use", "content_filter": "refusal"}


def request(obj: Obj, model: str, max_tokens: int) -> Obj:
    check_fields(obj, KNOWN, WIRE)
    if not is_default(obj.get("top_k")):
        raise refuse("top_k", WIRE)
    out: Obj = {"model": model, "messages": messages(obj)}
    out["max_completion_tokens"] = expect(obj.get("max_tokens", max_tokens), int, "max_tokens")
    for k in ("temperature", "top_p"):
        if obj.get(k) is not None:
            out[k] = obj[k]
    stops = obj.get("stop_sequences")
    if stops:
        out["stop"] = expect(stops, list, "stop_sequences")
    if obj.get("tools"):
        out["tools"] = tools_to_chat(tools_from_anthropic(obj["tools"], WIRE))
    if obj.get("tool_choice") is not None:
        choice, no_parallel = choice_from_anthropic(obj["tool_choice"])
        out["tool_choice"] = choice_to_chat(choice)
        if no_parallel and choice != "none":
            out["parallel_tool_calls"] = False
    effort = effort_for(obj.get("thinking"), obj.get("output_config"))
    if effort is not None:
        out["reasoning_effort"] = effort
    fmt = obj["output_config"].get("format") if isinstance(obj.get("output_config"), dict) else None
    if fmt is not None:
        schema = expect(expect(fmt, dict, "output_config.format").get("schema"), dict, "output_config.format.schema")
        out["response_format"] = {"type": "json_schema",
                                  "json_schema": {"name": "output", "schema": schema, "strict": True}}
    if obj.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def messages(obj: Obj) -> list[Obj]:
    out: list[Obj] = []
    system = obj.get("system")
    if system:
        out.append({"role": "system", "content": text_of(system, "system", WIRE)})
    for where, m in each(obj.get("messages"), "messages"):
        role = m.get("role")
        content = m.get("content")
        if role == "assistant":
            out.append(_assistant(content, where))
        elif role == "user":
            out.extend(_user(content, where))
        elif role == "system":  # a system message between turns stays there
            out.append({"role": "system", "content": text_of(content, f"{where}.content", WIRE)})
        else:
            raise refuse(f"{where}.role", WIRE, f"= {role!r} has no counterpart")
    return out


def _assistant(content: Any, where: str) -> Obj:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    text: list[str] = []
    calls: list[Obj] = []
    for j, b in enumerate(expect(content, list, f"{where}.content")):
        at = f"{where}.content[{j}]"
        kind = expect(b, dict, at).get("type")
        if kind == "text":
            text.append(str(b.get("text", "")))
        elif kind == "tool_use":
            calls.append({"id": str(b.get("id", "")), "type": "function",
                          "function": {"name": str(b.get("name", "")), "arguments": dumps(b.get("input") or {})}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # chat takes no reasoning back (docs/translation.md)
        else:
            raise refuse(f"{at}.type", WIRE, f"= {kind!r} has no counterpart")
    msg: Obj = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _user(content: Any, where: str) -> list[Obj]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[Obj] = []
    parts: list[Obj] = []
    tool_images: list[Obj] = []
    for j, b in enumerate(expect(content, list, f"{where}.content")):
        at = f"{where}.content[{j}]"
        kind = expect(b, dict, at).get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(b.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": image_url(b.get("source"), f"{at}.source", WIRE)}})
        elif kind == "tool_result":
            call_id = str(b.get("tool_use_id", ""))
            text, images = _tool_result(b.get("content"), f"{at}.content")
            tools.append({"role": "tool", "tool_call_id": call_id, "content": text})
            if images:
                # Chat tool messages hold text only: the images follow in a
                # user message that says where they came from.
                tool_images.append({"type": "text", "text": f"Images returned by tool call {call_id}:"})
                tool_images.extend(images)
        else:
            raise refuse(f"{at}.type", WIRE, f"= {kind!r} has no counterpart")
    out = tools
    parts = tool_images + parts
    if parts:
        out.append({"role": "user", "content": parts})
    return out


def _tool_result(content: Any, where: str) -> tuple[str, list[Obj]]:
    if content is None or isinstance(content, str):
        return content or "", []
    text: list[str] = []
    images: list[Obj] = []
    for k, b in enumerate(expect(content, list, where)):
        kind = expect(b, dict, f"{where}[{k}]").get("type")
        if kind == "text":
            text.append(str(b.get("text", "")))
        elif kind == "image":
            images.append({"type": "image_url",
                           "image_url": {"url": image_url(b.get("source"), f"{where}[{k}].source", WIRE)}})
        else:
            raise refuse(f"{where}[{k}].type", WIRE, f"= {kind!r} has no counterpart")
    return "\n".join(text), images


def response(obj: Obj, req: Obj) -> tuple[Obj, Usage]:
    usage = wire_usage(WIRE, obj.get("usage"))
    choices = obj.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    msg = choice.get("message") or {}
    stop = "refusal" if msg.get("refusal") else FINISH_TO_STOP.get(choice.get("finish_reason") or "stop", "end_turn")
    mid = str(obj.get("id") or "msg_translated")
    return anthropic_message(mid, str(obj.get("model") or req.get("model")), chat_pieces(msg), stop, usage), usage


class Stream(Transducer):
    """Chat chunks -> Messages events. ``message_start`` goes out with the
    first chunk; its input count is a local estimate (chat reports usage
    only at the end), replaced by the exact counts in ``message_delta``,
    which waits for the usage chunk the gateway asked for."""

    WIRE = WIRE

    def __init__(self, req: Obj, model: str) -> None:
        self._req = req
        self._model = model
        self._w: AnthropicEvents | None = None
        self._usage: Obj | None = None
        self._stop: str | None = None
        self._tools: dict[int, int] = {}  # chat tool index -> its block index

    def _writer(self, ev: Obj) -> tuple[AnthropicEvents, bytes]:
        w = self._w
        if w is not None:
            return w, b""
        w = self._w = AnthropicEvents(str(ev.get("id") or "msg_translated"), str(ev.get("model") or self._model))
        return w, w.start({"input_tokens": estimate_tokens(self._req.get("messages")), "output_tokens": 1})

    def event(self, ev: Obj | None) -> bytes:
        if ev is None:
            return self._final()
        w, out = self._writer(ev)
        if w.stopped:
            return b""
        err = ev.get("error")
        if isinstance(err, dict):
            self._error = "upstream_stream_error"
            return out + w.error("api_error", str(err.get("message") or "Upstream stream error."))
        usage = ev.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        for choice in ev.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out += w.thinking(reasoning)
            text = delta.get("content")
            if isinstance(text, str) and text:
                out += w.text(text)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._stop = "refusal"
                out += w.text(refusal)
            for tc in delta.get("tool_calls") or ():
                out += self._tool(w, tc)
            finish = choice.get("finish_reason")
            if finish:
                self._stop = self._stop or FINISH_TO_STOP.get(finish, "end_turn")
        if self._stop is not None and self._usage is not None:
            out += self._final()
        return out

    def _tool(self, w: AnthropicEvents, tc: Any) -> bytes:
        if not isinstance(tc, dict):
            return b""
        index = tc.get("index", 0)
        fn = tc.get("function") or {}
        out = b""
        if index not in self._tools:
            out = w.tool(str(tc.get("id") or f"call_{index}"), str(fn.get("name") or ""))
            self._tools[index] = w.index
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            out += w.tool_args(args, self._tools[index])
        return out

    def _final(self) -> bytes:
        w = self._w
        if w is None or w.stopped or self._stop is None:
            return b""
        return w.finish(self._stop, anthropic_usage_obj(self.usage()))

    def end(self) -> bytes:
        return self._final()
