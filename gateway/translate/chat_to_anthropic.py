"""Chat Completions client, Anthropic Messages upstream (the openai SDK on a
Claude model).

Request: chat -> Messages; response and stream: Messages -> chat. The field
table is docs/translation.md.
"""

from __future__ import annotations

from typing import Any

from ..protocols.base import Usage
from .common import (
    CHAT_NOOPS,
    MESSAGES,
    ChatChunks,
    Obj,
    Transducer,
    anthropic_pieces,
    chat_completion,
    check_fields,
    check_noops,
    choice_from_openai,
    choice_to_anthropic,
    each,
    expect,
    image_source,
    parse_arguments,
    refuse,
    text_of,
    thinking_for,
    tool_id,
    tools_from_chat,
    tools_to_anthropic,
    unsigned_tool_turn,
    wire_usage,
)

WIRE = MESSAGES

KNOWN = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "stream_options", "tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort", "user",
    # Accepted at their no-op values only (checked below).
    "n", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "modalities",
    # Dropped (docs/translation.md): storage, caching and routing hints.
    "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    "verbosity",
})

STOP_TO_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
                  "model_context_window_exceeded": "length", "tool_use": "tool_calls", "refusal": "content_filter"}


def request(obj: Obj, model: str, max_tokens: int) -> Obj:
    check_fields(obj, KNOWN, WIRE)
    check_noops(obj, CHAT_NOOPS, WIRE)
    system, msgs = messages(obj)
    limit = obj.get("max_completion_tokens")
    if limit is None:
        limit = obj.get("max_tokens")
    out: Obj = {"model": model, "max_tokens": expect(limit if limit is not None else max_tokens, int,
                                                     "max_completion_tokens"), "messages": msgs}
    if system:
        out["system"] = system
    for k in ("temperature", "top_p"):
        if obj.get(k) is not None:
            out[k] = obj[k]
    stop = obj.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else expect(stop, list, "stop")
    if obj.get("tools"):
        out["tools"] = tools_to_anthropic(tools_from_chat(obj["tools"], WIRE))
    choice = choice_from_openai(obj["tool_choice"], WIRE, False) if obj.get("tool_choice") is not None else None
    tc = choice_to_anthropic(choice, obj.get("parallel_tool_calls") if obj.get("tools") else None)
    if tc is not None:
        out["tool_choice"] = tc
    thinking = thinking_for(obj.get("reasoning_effort"), out["max_tokens"])
    if thinking is not None and not unsigned_tool_turn(msgs):
        out["thinking"] = thinking
    fmt = obj.get("response_format")
    if fmt is not None:
        kind = expect(fmt, dict, "response_format").get("type")
        if kind == "json_schema":
            js = expect(fmt.get("json_schema"), dict, "response_format.json_schema")
            schema = expect(js.get("schema"), dict, "response_format.json_schema.schema")
            out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        elif kind != "text":
            raise refuse("response_format.type", WIRE, f"= {kind!r} has no counterpart")
    if isinstance(obj.get("user"), str):
        out["metadata"] = {"user_id": obj["user"]}
    if obj.get("stream") is True:
        out["stream"] = True
    return out


def messages(obj: Obj) -> tuple[list[Obj], list[Obj]]:
    """System blocks (the system and developer messages before the first
    turn) and the turns: a later system or developer message stays in place
    as a Messages system message; consecutive messages of one role are
    merged into one turn as Anthropic requires."""
    system: list[Obj] = []
    turns: list[Obj] = []

    def add(role: str, blocks: list[Obj]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for where, m in each(obj.get("messages"), "messages"):
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer"):
            text = text_of(content, f"{where}.content", WIRE)
            if text and turns:
                turns.append({"role": "system", "content": text})
            elif text:
                system.append({"type": "text", "text": text})
        elif role == "user":
            add("user", _user(content, f"{where}.content"))
        elif role == "assistant":
            add("assistant", _assistant(m, where))
        elif role == "tool":
            text = text_of(content, f"{where}.content", WIRE)
            block: Obj = {"type": "tool_result", "tool_use_id": tool_id(m.get("tool_call_id")), "content": text}
            # Tool results open the next user turn, before anything the user adds.
            if turns and turns[-1]["role"] == "user" and any(b["type"] != "tool_result"
                                                              for b in turns[-1]["content"]):
                turns.append({"role": "user", "content": [block]})
            else:
                add("user", [block])
        else:
            raise refuse(f"{where}.role", WIRE, f"= {role!r} has no counterpart")
    return system, turns


def _user(content: Any, where: str) -> list[Obj]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks: list[Obj] = []
    for j, p in enumerate(expect(content, list, where)):
        at = f"{where}[{j}]"
        kind = expect(p, dict, at).get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": str(p.get("text", ""))})
        elif kind == "image_url":
            img = p.get("image_url")
            url = img.get("url") if isinstance(img, dict) else img
            blocks.append({"type": "image", "source": image_source(url, f"{at}.image_url.url")})
        elif kind == "file":
            blocks.append(_document(p.get("file"), f"{at}.file"))
        else:
            raise refuse(f"{at}.type", WIRE, f"= {kind!r} has no counterpart")
    return blocks


def _document(f: Any, where: str) -> Obj:
    """A chat file part (a base64 PDF) as an Anthropic document."""
    data = expect(f, dict, where).get("file_data")
    if not isinstance(data, str):
        raise refuse(f"{where}.file_id", WIRE, "(an uploaded file) has no counterpart")
    src = image_source(data, f"{where}.file_data")
    if src["type"] != "base64" or src["media_type"] != "application/pdf":
        raise refuse(f"{where}.file_data", WIRE, "that is not a base64 PDF data URL has no counterpart")
    return {"type": "document", "source": src}


def _assistant(m: Obj, where: str) -> list[Obj]:
    blocks: list[Obj] = []
    # Signed thinking comes back as LiteLLM's thinking_blocks; unsigned
    # reasoning_content cannot be replayed to Anthropic and is dropped.
    for b in m.get("thinking_blocks") or ():
        if isinstance(b, dict) and b.get("type") == "redacted_thinking":
            blocks.append({"type": "redacted_thinking", "data": str(b.get("data", ""))})
        elif isinstance(b, dict) and b.get("signature"):
            blocks.append({"type": "thinking", "thinking": str(b.get("thinking", "")),
                           "signature": str(b["signature"])})
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text") or p.get("refusal") or "") for p in content if isinstance(p, dict))
    if content:
        blocks.append({"type": "text", "text": expect(content, str, f"{where}.content")})
    for k, tc in enumerate(m.get("tool_calls") or ()):
        at = f"{where}.tool_calls[{k}]"
        fn = expect(expect(tc, dict, at).get("function"), dict, f"{at}.function")
        blocks.append({"type": "tool_use", "id": tool_id(tc.get("id")), "name": str(fn.get("name", "")),
                       "input": parse_arguments(fn.get("arguments"), f"{at}.function.arguments")})
    return blocks


def response(obj: Obj, req: Obj) -> tuple[Obj, Usage]:
    usage = wire_usage(WIRE, obj.get("usage"))
    finish = STOP_TO_FINISH.get(str(obj.get("stop_reason")), "stop")
    cid = str(obj.get("id") or "chatcmpl-translated")
    return chat_completion(cid, str(obj.get("model") or req.get("model")), anthropic_pieces(obj.get("content")), finish,
                           usage), usage


class Stream(Transducer):
    """Messages events -> chat chunks: text and thinking deltas as content
    and reasoning_content, each tool_use block as one tool call whose
    arguments stream as they come; the finish chunk at ``message_stop``."""

    WIRE = WIRE

    def __init__(self, req: Obj, model: str) -> None:
        so = req.get("stream_options")
        self._include_usage = isinstance(so, dict) and so.get("include_usage") is True
        self._model = model
        self._w: ChatChunks | None = None
        self._usage: Obj = {}
        self._stop: str | None = None
        self._kind: dict[int, str] = {}
        self._thinking: list[str] = []
        self._signature = ""

    def event(self, ev: Obj | None) -> bytes:
        if ev is None:
            return b""
        kind = ev.get("type")
        w = self._w
        if kind == "message_start" and w is None:
            msg = ev.get("message") or {}
            if isinstance(msg.get("usage"), dict):
                self._usage = dict(msg["usage"])
            self._w = w = ChatChunks(str(msg.get("id") or "chatcmpl-translated"),
                                     str(msg.get("model") or self._model), self._include_usage)
            return w.start()
        if w is None or w.stopped:
            return b""
        if kind == "content_block_delta":
            d = ev.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                return w.text(str(d.get("text", "")))
            if dt == "input_json_delta":
                return w.tool_args(str(ev.get("index")), str(d.get("partial_json", "")))
            if dt == "thinking_delta":
                s = str(d.get("thinking", ""))
                self._thinking.append(s)
                return w.reasoning(s)
            if dt == "signature_delta":
                self._signature = str(d.get("signature", ""))
            return b""
        if kind == "content_block_start":
            block = ev.get("content_block") or {}
            bt = block.get("type")
            self._kind[ev.get("index", 0)] = str(bt)
            if bt == "tool_use":
                return w.tool(str(ev.get("index")), str(block.get("id", "")), str(block.get("name", "")))
            if bt == "text" and block.get("text"):
                return w.text(str(block["text"]))
            if bt == "redacted_thinking":
                return w.thinking_block({"type": "redacted_thinking", "data": block.get("data", "")})
            self._thinking, self._signature = [], ""
            return b""
        if kind == "content_block_stop":
            if self._kind.get(ev.get("index", 0)) == "thinking" and self._signature:
                return w.thinking_block({"type": "thinking", "thinking": "".join(self._thinking),
                                         "signature": self._signature})
            return b""
        if kind == "message_delta":
            delta = ev.get("delta") or {}
            if delta.get("stop_reason"):
                self._stop = STOP_TO_FINISH.get(str(delta["stop_reason"]), "stop")
            u = ev.get("usage")
            if isinstance(u, dict):
                self._usage.update((k, v) for k, v in u.items() if v is not None)
            return b""
        if kind == "message_stop":
            return w.finish(self._stop or "stop", self.usage())
        if kind == "error":
            err = ev.get("error") or {}
            self._error = "upstream_stream_error"
            return w.error(str(err.get("message") or "Upstream stream error."), str(err.get("type") or "api_error"),
                           None)
        return b""

