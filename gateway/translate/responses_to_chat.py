"""Responses client, Chat Completions upstream (Codex on a model served by
an OpenAI-compatible chat API).

Request: Responses -> chat; response and stream: chat -> Responses. The
translation is stateless: nothing is stored, so ``previous_response_id``
and ``conversation`` are refused (send the whole input, as Codex does with
``store: false``). The field table is docs/translation.md.
"""

from __future__ import annotations

from typing import Any

from ..protocols.base import Usage
from .common import (
    CHAT,
    RESPONSES_NOOPS,
    Obj,
    ResponseEvents,
    Transducer,
    chat_pieces,
    check_fields,
    check_noops,
    choice_from_openai,
    choice_to_chat,
    each,
    expect,
    flat_name,
    namespaces,
    refuse,
    response_object,
    response_output,
    text_of,
    tools_from_responses,
    tools_to_chat,
    wire_usage,
)

WIRE = CHAT

KNOWN = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools", "tool_choice",
    "parallel_tool_calls", "text", "reasoning", "user", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "metadata", "service_tier",
    # Accepted at their no-op values only (checked below).
    "background", "truncation", "top_logprobs",
    # Dropped (docs/translation.md): nothing is stored, no extra output,
    # the client's own bookkeeping (Codex's client_metadata).
    "store", "include", "stream_options", "client_metadata",
})
# metadata is dropped: it tags stored objects, and chat takes it only
# with store on (nothing is stored here).
PASS = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier", "prompt_cache_key",
        "prompt_cache_retention", "service_tier")


def request(obj: Obj, model: str, max_tokens: int) -> Obj:
    check_fields(obj, KNOWN, WIRE)
    check_noops(obj, RESPONSES_NOOPS, WIRE)
    out: Obj = {"model": model, "messages": messages(obj)}
    if obj.get("max_output_tokens") is not None:
        out["max_completion_tokens"] = expect(obj["max_output_tokens"], int, "max_output_tokens")
    for k in PASS:
        if obj.get(k) is not None:
            out[k] = obj[k]
    if obj.get("tools"):
        out["tools"] = tools_to_chat(tools_from_responses(obj["tools"], WIRE))
    if obj.get("tool_choice") is not None:
        out["tool_choice"] = choice_to_chat(choice_from_openai(obj["tool_choice"], WIRE, True))
    reasoning = obj.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        out["reasoning_effort"] = reasoning["effort"]  # summary: chat has none to give
    text = obj.get("text")
    if text is not None:
        expect(text, dict, "text")
        fmt = text.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            js = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            out["response_format"] = {"type": "json_schema", "json_schema": js}
        elif isinstance(fmt, dict) and fmt.get("type") != "text":
            out["response_format"] = {"type": fmt.get("type")}
        if text.get("verbosity") is not None:
            out["verbosity"] = text["verbosity"]
    if obj.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def messages(obj: Obj) -> list[Obj]:
    out: list[Obj] = []
    if obj.get("instructions"):
        out.append({"role": "system", "content": expect(obj["instructions"], str, "instructions")})
    inp = obj.get("input")
    if isinstance(inp, str):
        out.append({"role": "user", "content": inp})
        return out
    for where, item in each(inp, "input"):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            content = item.get("content")
            if role == "assistant":
                text = text_of(_no_refusal(content), f"{where}.content", WIRE)
                if out and out[-1]["role"] == "assistant" and not out[-1].get("content"):
                    out[-1]["content"] = text
                else:
                    out.append({"role": "assistant", "content": text})
            elif role in ("system", "developer"):
                out.append({"role": role, "content": text_of(content, f"{where}.content", WIRE)})
            elif role == "user":
                out.append({"role": "user", "content": _user(content, f"{where}.content")})
            else:
                raise refuse(f"{where}.role", WIRE, f"= {role!r} has no counterpart")
        elif kind == "function_call":
            call = {"id": str(item.get("call_id", "")), "type": "function",
                    "function": {"name": flat_name(item), "arguments": str(item.get("arguments") or "{}")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                        "content": text_of(output, f"{where}.output", WIRE)})
        elif kind == "reasoning":
            continue  # chat takes no reasoning back (docs/translation.md)
        else:
            raise refuse(f"{where}.type", WIRE, f"= {kind!r} has no counterpart")
    return out


def _no_refusal(content: Any) -> Any:
    if isinstance(content, list):
        return [{"type": "output_text", "text": p.get("refusal", "")} if isinstance(p, dict)
                and p.get("type") == "refusal" else p for p in content]
    return content


def _user(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    parts: list[Obj] = []
    for j, p in enumerate(expect(content, list, where)):
        at = f"{where}[{j}]"
        kind = expect(p, dict, at).get("type")
        if kind == "input_text":
            parts.append({"type": "text", "text": str(p.get("text", ""))})
        elif kind == "input_image":
            if not isinstance(p.get("image_url"), str):
                raise refuse(f"{at}.file_id", WIRE, "(an uploaded file) has no counterpart")
            img: Obj = {"url": p["image_url"]}
            if p.get("detail"):
                img["detail"] = p["detail"]
            parts.append({"type": "image_url", "image_url": img})
        elif kind == "input_file":
            f = {k: p[k] for k in ("file_data", "file_id", "filename") if k in p}
            if "file_url" in p:
                raise refuse(f"{at}.file_url", WIRE)
            parts.append({"type": "file", "file": f})
        else:
            raise refuse(f"{at}.type", WIRE, f"= {kind!r} has no counterpart")
    return parts


def incomplete_of(finish: str | None) -> str | None:
    return {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish or "")


def response(obj: Obj, req: Obj) -> tuple[Obj, Usage]:
    usage = wire_usage(WIRE, obj.get("usage"))
    choices = obj.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    pieces = chat_pieces(choice.get("message") or {})
    rid = "resp_" + str(obj.get("id") or "translated")
    incomplete = incomplete_of(choice.get("finish_reason"))
    out = response_object(rid, str(obj.get("model") or req.get("model")), "incomplete" if incomplete else "completed",
                          response_output(pieces, rid, namespaces(req)), usage, req, incomplete)
    return out, usage


class Stream(Transducer):
    """Chat chunks -> Responses events: each run of text, reasoning or one
    tool call becomes an output item, opened at its first delta and done
    when the next begins; ``response.completed`` (or ``.incomplete``)
    after the usage chunk the gateway asked for."""

    WIRE = WIRE

    def __init__(self, req: Obj, model: str) -> None:
        self._req = req
        self._model = model
        self._w: ResponseEvents | None = None
        self._usage: Obj | None = None
        self._finish: str | None = None
        self._tool: int | None = None  # chat index of the tool call being written

    def event(self, ev: Obj | None) -> bytes:
        if ev is None:
            return self._final()
        out = b""
        w = self._w
        if w is None:
            w = self._w = ResponseEvents("resp_" + str(ev.get("id") or "translated"),
                                         str(ev.get("model") or self._model), self._req)
            out = w.start()
        if w.stopped:
            return b""
        err = ev.get("error")
        if isinstance(err, dict):
            self._error = "upstream_stream_error"
            return out + w.failed(str(err.get("code") or "server_error"),
                                  str(err.get("message") or "Upstream stream error."))
        if isinstance(ev.get("usage"), dict):
            self._usage = ev["usage"]
        for choice in ev.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out += w.reasoning(reasoning)
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    out += w.text(text)
            for tc in delta.get("tool_calls") or ():
                if not isinstance(tc, dict):
                    continue
                fn = tc.get("function") or {}
                index = tc.get("index", 0)
                if index != self._tool:
                    self._tool = index
                    out += w.tool(str(tc.get("id") or f"call_{index}"), str(fn.get("name") or ""))
                args = fn.get("arguments")
                if isinstance(args, str):
                    out += w.tool_args(args)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        if self._finish is not None and self._usage is not None:
            out += self._final()
        return out

    def _final(self) -> bytes:
        w = self._w
        if w is None or w.stopped or self._finish is None:
            return b""
        return w.finish(self.usage(), incomplete_of(self._finish))

    def end(self) -> bytes:
        return self._final()
