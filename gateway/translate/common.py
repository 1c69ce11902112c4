"""What every translation pair shares: refusing fields, tool schemas and tool
choice, images, reasoning effort, usage in one meaning, the three client
answer shapes (built whole, or written event by event) and the SSE framing.

The pair modules (``<client>_to_<wire>.py``) decide what maps to what; this
module only knows how each protocol spells a piece once it is decided, so an
event sequence is produced in one place per client protocol and stays the
one its SDK expects.

Usage in one meaning (the gateway's, see gateway.protocols): ``input_tokens``
includes cached input and cache writes, ``cached_tokens`` is the cached part,
``cache_write_tokens`` the written part. Each client shape is derived from
that: Anthropic's ``input_tokens`` excludes both parts, OpenAI's includes them.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from .. import safejson
from ..errors import BadRequest
from ..protocols.anthropic import anthropic_usage
from ..protocols.base import SSEEvents, Usage, event_data, first_object, last_object
from ..protocols.openai import chat_usage
from ..protocols.responses import responses_usage

CHAT, MESSAGES, RESPONSES = "chat", "messages", "responses"
PROTOCOL_NAMES = {CHAT: "Chat Completions", MESSAGES: "Anthropic Messages", RESPONSES: "Responses"}

# When a client names no output limit and the wire protocol needs one
# (Anthropic's max_tokens is required), and the model config sets none.
DEFAULT_MAX_TOKENS = 8192

Obj = dict[str, Any]


# ------------------------------------------------------------------ refusals


def refuse(field: str, wire: str, why: str = "has no counterpart") -> BadRequest:
    """The 400 for a client field the wire protocol cannot carry. Field
    names and values come from the client: bounded before they are echoed."""
    field, why = _bound(field), _bound(why)
    return BadRequest(
        f"'{field}' {why} when this model's upstream speaks {PROTOCOL_NAMES[wire]}; "
        "remove it or use a model whose upstream speaks your API.",
        code="unsupported_parameter", param=field,
    )


def _bound(s: str, limit: int = 120) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def check_fields(obj: Obj, known: frozenset[str], wire: str, where: str = "") -> None:
    """Every field set (not null) must be one the pair handles."""
    for k, v in obj.items():
        if v is not None and k not in known:
            raise refuse(f"{where}{k}", wire)


def is_default(v: Any, *defaults: Any) -> bool:
    return v is None or any(v == d and type(v) is type(d) for d in defaults)


# Fields accepted only at values that change nothing (or unset).
CHAT_NOOPS: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0), "logit_bias": ({},), "modalities": (["text"],),
}
RESPONSES_NOOPS: dict[str, tuple[Any, ...]] = {"background": (False,), "truncation": ("disabled",),
                                               "top_logprobs": (0,)}


def check_noops(obj: Obj, noops: dict[str, tuple[Any, ...]], wire: str) -> None:
    for k, ok in noops.items():
        if not is_default(obj.get(k), *ok):
            raise refuse(k, wire, f"= {obj[k]!r} has no counterpart")


def expect(v: Any, kind: type | tuple[type, ...], field: str) -> Any:
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BadRequest(f"'{field}' must be {_article(names)}.", code="invalid_request", param=field)
    return v


def each(items: Any, field: str) -> Iterator[tuple[str, Obj]]:
    """The objects of a list field with where each one is (``messages[3]``)."""
    for i, item in enumerate(expect(items, list, field)):
        where = f"{field}[{i}]"
        yield where, expect(item, dict, where)


def _article(names: str) -> str:
    return {"dict": "an object", "list": "an array", "str": "a string", "int": "an integer"}.get(names, names)


def text_of(content: Any, field: str, wire: str) -> str:
    """Text of a content that may only hold text (a string or text parts)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    parts = []
    for i, p in enumerate(expect(content, list, field)):
        expect(p, dict, f"{field}[{i}]")
        if p.get("type") not in ("text", "input_text", "output_text"):
            raise refuse(f"{field}[{i}].type", wire, f"= {p.get('type')!r} is not text and has no counterpart here")
        parts.append(str(p.get("text", "")))
    return "".join(parts)


# ---------------------------------------------------------------- tool calls

_ID_BAD = re.compile(r"[^a-zA-Z0-9_-]")


def tool_id(v: Any) -> str:
    """A tool call id every protocol accepts (Anthropic allows [a-zA-Z0-9_-]):
    the same function on the way out and back, so ids still pair up."""
    s = str(v or "")
    return _ID_BAD.sub("_", s) if s else "call_0"


def parse_arguments(args: Any, field: str) -> Obj:
    """A tool call's JSON arguments as the object Anthropic's ``input`` needs."""
    if isinstance(args, dict):
        return args
    if args in (None, ""):
        return {}
    try:
        v = safejson.loads(args)
    except (orjson.JSONDecodeError, TypeError):
        v = None
    if not isinstance(v, dict):
        raise BadRequest(f"'{field}' must be a JSON object.", code="invalid_request", param=field)
    return v


def dumps(v: Any) -> str:
    return orjson.dumps(v).decode()


@dataclass(frozen=True, slots=True)
class FnTool:
    """A function tool, whichever protocol defined it."""

    name: str
    description: str | None
    parameters: Obj
    strict: bool | None = None


EMPTY_SCHEMA: Obj = {"type": "object", "properties": {}}


def _fn_tool(t: Obj, name_key: Obj, params_key: str, field: str) -> FnTool:
    name = expect(name_key.get("name"), str, f"{field}.name")
    params = name_key.get(params_key)
    if params is None:
        params = EMPTY_SCHEMA
    expect(params, dict, f"{field}.{params_key}")
    desc = name_key.get("description")
    strict = name_key.get("strict")
    return FnTool(name, desc if isinstance(desc, str) else None, params, strict if isinstance(strict, bool) else None)


def tools_from_chat(tools: Any, wire: str) -> list[FnTool]:
    out = []
    for i, t in enumerate(expect(tools, list, "tools")):
        expect(t, dict, f"tools[{i}]")
        if t.get("type", "function") != "function":
            raise refuse(f"tools[{i}].type", wire, f"= {t.get('type')!r} has no counterpart")
        fn = expect(t.get("function"), dict, f"tools[{i}].function")
        out.append(_fn_tool(t, fn, "parameters", f"tools[{i}].function"))
    return out


# A function inside a Responses namespace tool travels as one flat function
# named namespace + NS_SEP + name (Anthropic tool names allow [a-zA-Z0-9_-]);
# calls to it come back to the Responses client with their namespace.
NS_SEP = "__"
# Hosted tools left out (docs/translation.md) rather than refused: the model
# answers without searching the web. Every other hosted tool is refused.
DROPPED_HOSTED = frozenset({"web_search", "web_search_preview"})


def tools_from_responses(tools: Any, wire: str) -> list[FnTool]:
    out = []
    for i, t in enumerate(expect(tools, list, "tools")):
        kind = expect(t, dict, f"tools[{i}]").get("type")
        if kind == "function":
            out.append(_fn_tool(t, t, "parameters", f"tools[{i}]"))
        elif kind == "namespace":
            ns = expect(t.get("name"), str, f"tools[{i}].name")
            for j, f in enumerate(expect(t.get("tools"), list, f"tools[{i}].tools")):
                at = f"tools[{i}].tools[{j}]"
                if expect(f, dict, at).get("type", "function") != "function":
                    raise refuse(f"{at}.type", wire, f"= {f.get('type')!r} has no counterpart")
                fn = _fn_tool(f, f, "parameters", at)
                out.append(FnTool(ns + NS_SEP + fn.name, fn.description, fn.parameters, fn.strict))
        elif kind not in DROPPED_HOSTED:
            raise refuse(f"tools[{i}].type", wire, f"= {kind!r} (a hosted tool) has no counterpart")
    return out


def flat_name(item: Obj) -> str:
    """The flat tool name of a Responses function call (see NS_SEP)."""
    name, ns = str(item.get("name", "")), item.get("namespace")
    return f"{ns}{NS_SEP}{name}" if isinstance(ns, str) and ns else name


def namespaces(req: Obj) -> frozenset[str]:
    tools = req.get("tools")
    return frozenset(str(t.get("name")) for t in tools if isinstance(t, dict) and t.get("type") == "namespace"
                     ) if isinstance(tools, list) else frozenset()


def split_name(name: str, spaces: frozenset[str]) -> tuple[str | None, str]:
    """(namespace, name) of a flat tool name, for a namespace the client declared."""
    if spaces:
        ns, sep, rest = name.partition(NS_SEP)
        if sep and ns in spaces and rest:
            return ns, rest
    return None, name


# Anthropic tool fields that only steer Anthropic's own handling of a tool.
_ANTHROPIC_TOOL_DROP = frozenset({"cache_control", "defer_loading", "eager_input_streaming", "input_examples"})


def tools_from_anthropic(tools: Any, wire: str) -> list[FnTool]:
    out = []
    for i, t in enumerate(expect(tools, list, "tools")):
        expect(t, dict, f"tools[{i}]")
        if t.get("type", "custom") != "custom":
            raise refuse(f"tools[{i}].type", wire, f"= {t.get('type')!r} (a server tool) has no counterpart")
        check_fields(t, frozenset({"name", "description", "input_schema", "type", "strict"}) | _ANTHROPIC_TOOL_DROP,
                     wire, f"tools[{i}].")
        out.append(_fn_tool(t, t, "input_schema", f"tools[{i}]"))
    return out


def tools_to_chat(tools: list[FnTool]) -> list[Obj]:
    out = []
    for t in tools:
        fn: Obj = {"name": t.name, "parameters": t.parameters}
        if t.description is not None:
            fn["description"] = t.description
        if t.strict is not None:
            fn["strict"] = t.strict
        out.append({"type": "function", "function": fn})
    return out


def tools_to_responses(tools: list[FnTool]) -> list[Obj]:
    out = []
    for t in tools:
        # Responses defaults strict to true; an unset strict stays unset
        # on the other side, so say false rather than change the schema rules.
        fn: Obj = {"type": "function", "name": t.name, "parameters": t.parameters,
                   "strict": bool(t.strict)}
        if t.description is not None:
            fn["description"] = t.description
        out.append(fn)
    return out


def tools_to_anthropic(tools: list[FnTool]) -> list[Obj]:
    out = []
    for t in tools:
        schema = t.parameters if t.parameters.get("type") == "object" else {**t.parameters, "type": "object"}
        tool: Obj = {"name": t.name, "input_schema": schema}
        if t.description is not None:
            tool["description"] = t.description
        if t.strict:
            tool["strict"] = True
        out.append(tool)
    return out


# Tool choice, normalised: "auto" | "none" | "required" | ("function", name)
Choice = str | tuple[str, str]


def choice_from_openai(tc: Any, wire: str, responses: bool) -> Choice:
    if isinstance(tc, str):
        if tc not in ("auto", "none", "required"):
            raise refuse("tool_choice", wire, f"= {tc!r} has no counterpart")
        return tc
    expect(tc, dict, "tool_choice")
    if tc.get("type") != "function":
        raise refuse("tool_choice.type", wire, f"= {tc.get('type')!r} has no counterpart")
    holder = tc if responses else expect(tc.get("function"), dict, "tool_choice.function")
    return ("function", expect(holder.get("name"), str, "tool_choice.name"))


def choice_from_anthropic(tc: Any) -> tuple[Choice, bool]:
    """The choice and whether parallel tool use is disabled."""
    expect(tc, dict, "tool_choice")
    kind = tc.get("type")
    off = tc.get("disable_parallel_tool_use") is True
    if kind == "auto":
        return "auto", off
    if kind == "any":
        return "required", off
    if kind == "none":
        return "none", off
    if kind == "tool":
        return ("function", expect(tc.get("name"), str, "tool_choice.name")), off
    raise BadRequest(f"Unknown tool_choice.type {kind!r}.", code="invalid_request", param="tool_choice.type")


def choice_to_chat(c: Choice) -> Any:
    return c if isinstance(c, str) else {"type": "function", "function": {"name": c[1]}}


def choice_to_responses(c: Choice) -> Any:
    return c if isinstance(c, str) else {"type": "function", "name": c[1]}


def choice_to_anthropic(c: Choice | None, parallel: bool | None) -> Obj | None:
    if c is None:
        return {"type": "auto", "disable_parallel_tool_use": True} if parallel is False else None
    if c == "none":
        return {"type": "none"}
    out: Obj = {"type": {"auto": "auto", "required": "any"}[c]} if isinstance(c, str) else {"type": "tool",
                                                                                              "name": c[1]}
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


# -------------------------------------------------------------------- images

_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.S)


def image_source(url: Any, field: str) -> Obj:
    """An OpenAI image URL (http(s) or a base64 data URL) as Anthropic's source."""
    url = expect(url, str, field)
    m = _DATA_URL.fullmatch(url)
    if m:
        return {"type": "base64", "media_type": m.group(1), "data": m.group(2)}
    if url.startswith(("http://", "https://")):
        return {"type": "url", "url": url}
    raise BadRequest(f"'{field}' must be an http(s) URL or a base64 data URL.", code="invalid_request", param=field)


def image_url(source: Any, field: str, wire: str) -> str:
    """Anthropic's image source as an OpenAI image URL."""
    expect(source, dict, field)
    kind = source.get("type")
    if kind == "url":
        return str(expect(source.get("url"), str, f"{field}.url"))
    if kind == "base64":
        media = expect(source.get("media_type"), str, f"{field}.media_type")
        data = expect(source.get("data"), str, f"{field}.data")
        return f"data:{media};base64,{data}"
    raise refuse(f"{field}.type", wire, f"= {kind!r} has no counterpart")


def pdf_data(url: str) -> bool:
    try:
        return base64.b64decode(url[:8], validate=False).startswith(b"%PDF")
    except (binascii.Error, ValueError):
        return False


# ----------------------------------------------------------------- reasoning

# Thinking budget for an OpenAI reasoning effort, and back (documented in
# docs/translation.md). Anthropic needs 1024 <= budget < max_tokens.
EFFORT_BUDGET = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576, "xhigh": 32768, "max": 32768}


def effort_of_budget(budget: int) -> str:
    if budget <= 2048:
        return "low"
    if budget <= 8192:
        return "medium"
    return "high"


def thinking_for(effort: Any, max_tokens: int) -> Obj | None:
    """Anthropic's ``thinking`` for an OpenAI reasoning effort (None: off)."""
    if effort is None or effort == "none":
        return None
    budget = EFFORT_BUDGET.get(effort)
    if budget is None:
        raise BadRequest(f"Unknown reasoning effort {effort!r}.", code="invalid_request", param="reasoning_effort")
    budget = min(budget, max_tokens - 1)
    if budget < 1024:
        return None  # the output limit leaves no room for thinking
    return {"type": "enabled", "budget_tokens": budget}


def unsigned_tool_turn(turns: list[Obj]) -> bool:
    """Whether the last assistant turn called tools without its signed
    thinking: Anthropic refuses thinking then (the block must come back
    with the calls), so the request goes without thinking instead."""
    last = next((t for t in reversed(turns) if t["role"] == "assistant"), None)
    if last is None:
        return False
    kinds = {b.get("type") for b in last["content"]}
    return "tool_use" in kinds and not kinds & {"thinking", "redacted_thinking"}


def effort_for(thinking: Any, output_config: Any) -> str | None:
    """An OpenAI reasoning effort for Anthropic's ``thinking`` and
    ``output_config.effort`` (None: leave the model's default)."""
    effort = output_config.get("effort") if isinstance(output_config, dict) else None
    if effort is not None:
        return "xhigh" if effort == "max" else str(effort)
    if not isinstance(thinking, dict):
        return None
    kind = thinking.get("type")
    if kind == "enabled":
        return effort_of_budget(int(expect(thinking.get("budget_tokens"), int, "thinking.budget_tokens")))
    return None  # adaptive: the model decides; disabled: nothing to ask


# Anthropic redacted thinking rides in a Responses reasoning item's
# encrypted_content behind this prefix (signatures and OpenAI's encrypted
# content never contain ':'), so it comes back as redacted_thinking.
REDACTED = "redacted_thinking:"


# --------------------------------------------------------------------- usage


def wire_usage(wire: str, u: Any) -> Usage:
    """The upstream's usage object in the gateway's one meaning."""
    u = u if isinstance(u, dict) else None
    if wire == MESSAGES:
        return anthropic_usage(u)
    if wire == CHAT:
        return chat_usage(u)
    return responses_usage(u)


def chat_usage_obj(u: Usage) -> Obj:
    details = {"cached_tokens": u.cached_tokens}
    if u.cache_write_tokens:
        details["cache_write_tokens"] = u.cache_write_tokens
    return {
        "prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": details,
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def responses_usage_obj(u: Usage) -> Obj:
    return {
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": u.cache_write_tokens},
        "output_tokens": u.output_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.input_tokens + u.output_tokens,
    }


def anthropic_usage_obj(u: Usage) -> Obj:
    writes = u.cache_write_tokens
    out: Obj = {
        "input_tokens": max(u.input_tokens - u.cached_tokens - writes, 0),
        "cache_creation_input_tokens": writes,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": writes - u.cache_write_1h_tokens,
                           "ephemeral_1h_input_tokens": u.cache_write_1h_tokens},
        "output_tokens": u.output_tokens,
    }
    if u.reasoning_tokens:
        out["output_tokens_details"] = {"thinking_tokens": u.reasoning_tokens}
    return out


def estimate_tokens(obj: Any) -> int:
    """A local estimate of a request's input tokens: about four characters of
    text per token, a flat 1,600 per image or document (what a
    1-megapixel image costs at Anthropic and OpenAI alike), JSON structure
    and base64 payloads not counted. Used where the upstream has no counter
    (docs/translation.md) and for ``message_start`` before the upstream has
    said its count (the final ``message_delta`` carries the exact one)."""
    chars = 0
    media = 0
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            chars += len(v)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            kind = v.get("type")
            if kind in ("image", "image_url", "input_image", "document", "file", "input_file"):
                media += 1
                continue
            for k, x in v.items():
                if k not in ("type", "id", "model", "role", "signature", "encrypted_content", "cache_control"):
                    stack.append(x)
    return max(1, chars // 4 + media * 1600)


# ------------------------------------------------------------- answer pieces


@dataclass(slots=True)
class Piece:
    """One part of an assistant answer, as any protocol can hold it:
    ``text``, ``thinking`` (with its signature), ``redacted`` (opaque
    thinking data) or ``tool`` (id, name, JSON arguments)."""

    kind: str
    text: str = ""
    signature: str = ""
    id: str = ""
    name: str = ""


def pieces_text(pieces: list[Piece], kind: str = "text") -> str:
    return "".join(p.text for p in pieces if p.kind == kind)


def chat_pieces(msg: Obj) -> list[Piece]:
    """The pieces of a chat answer's message, in Anthropic's order:
    thinking, text, tool calls."""

    out: list[Piece] = []
    blocks = msg.get("thinking_blocks")
    if isinstance(blocks, list) and blocks:
        for b in blocks:
            if isinstance(b, dict) and b.get("type") == "redacted_thinking":
                out.append(Piece("redacted", str(b.get("data", ""))))
            elif isinstance(b, dict):
                out.append(Piece("thinking", str(b.get("thinking", "")), str(b.get("signature") or "")))
    else:
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out.append(Piece("thinking", reasoning))
    content = msg.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    text = (content or "") + (msg.get("refusal") or "")
    if text:
        out.append(Piece("text", text))
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") or {}
        out.append(Piece("tool", str(fn.get("arguments") or "{}"), id=str(tc.get("id", "")),
                         name=str(fn.get("name", ""))))
    return out


def anthropic_pieces(content: Any) -> list[Piece]:
    out = []
    for b in content if isinstance(content, list) else ():
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            out.append(Piece("text", str(b.get("text", ""))))
        elif kind == "thinking":
            out.append(Piece("thinking", str(b.get("thinking", "")), str(b.get("signature") or "")))
        elif kind == "redacted_thinking":
            out.append(Piece("redacted", str(b.get("data", ""))))
        elif kind == "tool_use":
            out.append(Piece("tool", dumps(b.get("input") or {}), id=str(b.get("id", "")), name=str(b.get("name", ""))))
    return out


def responses_pieces(output: Any) -> tuple[list[Piece], bool]:
    """The pieces of a Responses answer's output items, and whether the
    model refused. A reasoning item's id and encrypted content become one
    signature (``rs_id:content``) so the item can be rebuilt when the client
    sends the thinking back (``reasoning_item``)."""
    out: list[Piece] = []
    refused = False
    for item in output if isinstance(output, list) else ():
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "reasoning":
            parts = item.get("summary") or item.get("content") or ()
            text = "\n\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
            enc = item.get("encrypted_content")
            out.append(Piece("thinking", text, f"{item.get('id', '')}:{enc}" if isinstance(enc, str) and enc else ""))
        elif kind == "message":
            for part in item.get("content") or ():
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "refusal":
                    refused = True
                    out.append(Piece("text", str(part.get("refusal", ""))))
                else:
                    out.append(Piece("text", str(part.get("text", ""))))
        elif kind == "function_call":
            out.append(Piece("tool", str(item.get("arguments") or "{}"), id=str(item.get("call_id", "")),
                             name=str(item.get("name", ""))))
    return out, refused


_SIGNED_ITEM = re.compile(r"(rs_[A-Za-z0-9_-]+):(.+)", re.S)


def reasoning_item(thinking: str, signature: str) -> Obj | None:
    """The Responses reasoning item a thinking block's signature came from
    (see responses_pieces), or None for thinking that no Responses upstream
    can take back (Anthropic's own signatures)."""
    m = _SIGNED_ITEM.fullmatch(signature)
    if m is None:
        return None
    item: Obj = {"type": "reasoning", "id": m.group(1), "summary": [], "encrypted_content": m.group(2)}
    if thinking:
        item["summary"] = [{"type": "summary_text", "text": thinking}]
    return item


def chat_completion(cid: str, model: str, pieces: list[Piece], finish: str, usage: Usage) -> Obj:
    text = pieces_text(pieces)
    msg: Obj = {"role": "assistant", "content": text or None, "refusal": None}
    thinking = [p for p in pieces if p.kind in ("thinking", "redacted")]
    if thinking:
        msg["reasoning_content"] = pieces_text(pieces, "thinking")
        if any(p.signature or p.kind == "redacted" for p in thinking):
            # Chat has no standard place for signed thinking; this field (as
            # LiteLLM spells it) lets a client that keeps it send it back.
            msg["thinking_blocks"] = [
                {"type": "redacted_thinking", "data": p.text} if p.kind == "redacted"
                else {"type": "thinking", "thinking": p.text, "signature": p.signature} for p in thinking
            ]
    calls = [{"id": p.id, "type": "function", "function": {"name": p.name, "arguments": p.text}}
             for p in pieces if p.kind == "tool"]
    if calls:
        msg["tool_calls"] = calls
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
        "usage": chat_usage_obj(usage),
    }


def anthropic_block(p: Piece) -> Obj:
    if p.kind == "text":
        return {"type": "text", "text": p.text}
    if p.kind == "thinking":
        return {"type": "thinking", "thinking": p.text, "signature": p.signature}
    if p.kind == "redacted":
        return {"type": "redacted_thinking", "data": p.text}
    return {"type": "tool_use", "id": tool_id(p.id), "name": p.name,
            "input": parse_arguments(p.text, "tool arguments")}


def anthropic_message(mid: str, model: str, pieces: list[Piece], stop_reason: str, usage: Usage) -> Obj:
    return {
        "id": mid, "type": "message", "role": "assistant", "model": model,
        "content": [anthropic_block(p) for p in pieces], "stop_reason": stop_reason, "stop_sequence": None,
        "usage": anthropic_usage_obj(usage),
    }


def response_ids(base: str) -> Callable[[str], str]:
    """Item ids for a translated response: ``msg_``/``rs_``/``fc_`` + the
    upstream id's tail + a counter, unique within the response."""
    tail = base.split("_", 1)[-1].split("-", 1)[-1][:40] or "0"
    n = 0

    def next_id(prefix: str) -> str:
        nonlocal n
        n += 1
        return f"{prefix}_{tail}{n:03d}"

    return next_id


def function_call(item_id: str, call_id: str, name: str, arguments: str, status: str,
                  spaces: frozenset[str]) -> Obj:
    ns, name = split_name(name, spaces)
    item: Obj = {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
                 "status": status}
    if ns is not None:
        item["namespace"] = ns
    return item


def response_item(p: Piece, item_id: str, status: str = "completed", spaces: frozenset[str] = frozenset()) -> Obj:
    if p.kind == "tool":
        return function_call(item_id, p.id, p.name, p.text, status, spaces)
    if p.kind in ("thinking", "redacted"):
        item: Obj = {"type": "reasoning", "id": item_id, "summary": []}
        if p.kind == "thinking" and p.text:
            item["summary"] = [{"type": "summary_text", "text": p.text}]
        enc = REDACTED + p.text if p.kind == "redacted" else p.signature
        if enc:
            item["encrypted_content"] = enc
        return item
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": p.text, "annotations": [], "logprobs": []}]}


def response_object(rid: str, model: str, status: str, output: list[Obj], usage: Usage | None, req: Obj,
                    incomplete: str | None = None, error: Obj | None = None, created: int | None = None) -> Obj:
    """A Responses ``response`` object, echoing the request's settings as
    OpenAI's own answers do."""
    text: Obj = req["text"] if isinstance(req.get("text"), dict) else {}
    return {
        "id": rid, "object": "response", "created_at": created or int(time.time()), "status": status,
        "background": False, "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": req.get("instructions"), "max_output_tokens": req.get("max_output_tokens"),
        "model": model, "output": output, "parallel_tool_calls": req.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": req.get("reasoning") or {"effort": None, "summary": None},
        "store": False, "temperature": req.get("temperature", 1.0),
        "text": {**text, "format": text.get("format") or {"type": "text"}},
        "tool_choice": req.get("tool_choice", "auto"), "tools": req.get("tools") or [],
        "top_p": req.get("top_p", 1.0), "truncation": "disabled",
        "usage": responses_usage_obj(usage) if usage is not None else None,
        "user": req.get("user"), "metadata": req.get("metadata") or {},
    }


def response_output(pieces: list[Piece], base: str, spaces: frozenset[str] = frozenset()) -> list[Obj]:
    """Output items: consecutive text pieces share one message item."""
    next_id = response_ids(base)
    out: list[Obj] = []
    for p in pieces:
        if p.kind == "text" and out and out[-1]["type"] == "message":
            out[-1]["content"].append({"type": "output_text", "text": p.text, "annotations": [], "logprobs": []})
            continue
        prefix = {"text": "msg", "tool": "fc"}.get(p.kind, "rs")
        out.append(response_item(p, next_id(prefix), spaces=spaces))
    return out


# -------------------------------------------------------- errors, both ways

# Anthropic's error type for a status, and OpenAI's.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    504: "timeout_error", 529: "overloaded_error",
}
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                      404: "not_found_error", 429: "rate_limit_error"}


def error_parts(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(message, type, code) of an upstream error body in either shape."""
    try:
        obj = safejson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return None, None, None
    msg, kind, code = err.get("message"), err.get("type"), err.get("code")
    return (msg if isinstance(msg, str) else None, kind if isinstance(kind, str) else None,
            code if isinstance(code, str) else None)


def client_error(client: str, status: int, body: bytes, upstream: str) -> bytes:
    """An upstream error answer in the client's error shape (the upstream's
    message kept, its status kept by the caller)."""
    msg, kind, code = error_parts(body)
    msg = msg or f"Upstream '{upstream}' answered HTTP {status}."
    if client == MESSAGES:
        at = kind if kind in ANTHROPIC_ERROR_TYPES.values() else ANTHROPIC_ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error")
        return orjson.dumps({"type": "error", "error": {"type": at, "message": msg}})
    ot = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": msg, "type": ot, "param": None, "code": code or kind}})


# ----------------------------------------------------------------- streaming


def sse(name: str, obj: Obj) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class AnthropicEvents:
    """Writes an Anthropic Messages stream: message_start (with usage),
    content blocks opened and closed one at a time with increasing
    indexes, message_delta, message_stop."""

    __slots__ = ("_args", "_id", "_index", "_model", "_open", "started", "stopped")

    def __init__(self, mid: str, model: str) -> None:
        self._id, self._model = mid, model
        self._index = -1
        self._open: str | None = None
        self._args = False  # the open tool block got argument bytes
        self.started = self.stopped = False

    def start(self, usage: Obj) -> bytes:
        self.started = True
        msg: Obj = {"id": self._id, "type": "message", "role": "assistant", "model": self._model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": usage}
        return sse("message_start", {"type": "message_start", "message": msg})

    def _block(self, kind: str, block: Obj) -> bytes:
        out = self.close()
        self._index += 1
        self._open = kind
        self._args = False
        return out + sse("content_block_start", {"type": "content_block_start", "index": self._index,
                                                 "content_block": block})

    def _delta(self, delta: Obj) -> bytes:
        return sse("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def text(self, s: str) -> bytes:
        out = b"" if self._open == "text" else self._block("text", {"type": "text", "text": ""})
        return out + self._delta({"type": "text_delta", "text": s}) if s else out

    def thinking(self, s: str) -> bytes:
        out = b"" if self._open == "thinking" else self._block("thinking", {"type": "thinking", "thinking": "",
                                                                            "signature": ""})
        return out + self._delta({"type": "thinking_delta", "thinking": s}) if s else out

    def signature(self, sig: str) -> bytes:
        out = b"" if self._open == "thinking" else self.thinking("")
        return out + self._delta({"type": "signature_delta", "signature": sig})

    def redacted(self, data: str) -> bytes:
        return self._block("redacted", {"type": "redacted_thinking", "data": data}) + self.close()

    @property
    def index(self) -> int:
        return self._index

    def tool(self, call_id: str, name: str) -> bytes:
        return self._block("tool", {"type": "tool_use", "id": tool_id(call_id), "name": name, "input": {}})

    def tool_args(self, s: str, block: int | None = None) -> bytes:
        """Argument bytes of the open tool block, or of an earlier one
        (``block``) when an upstream interleaves parallel calls: SDKs
        assemble input by block index, so late bytes still land in place."""
        if not s:
            return b""
        if block is not None and block != self._index:
            return sse("content_block_delta", {"type": "content_block_delta", "index": block,
                                               "delta": {"type": "input_json_delta", "partial_json": s}})
        if self._open != "tool":
            return b""
        self._args = True
        return self._delta({"type": "input_json_delta", "partial_json": s})

    def close(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "tool" and not self._args:
            out = self._delta({"type": "input_json_delta", "partial_json": "{}"})
        self._open = None
        return out + sse("content_block_stop", {"type": "content_block_stop", "index": self._index})

    def finish(self, stop_reason: str, usage: Obj, stop_sequence: str | None = None) -> bytes:
        self.stopped = True
        return (self.close()
                + sse("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                        "usage": usage})
                + sse("message_stop", {"type": "message_stop"}))

    def error(self, kind: str, message: str) -> bytes:
        self.stopped = True
        return sse("error", {"type": "error", "error": {"type": kind, "message": message}})


class ChatChunks:
    """Writes a Chat Completions stream: a role chunk, delta chunks, a
    finish chunk, the usage chunk only when the client asked for it, and
    ``[DONE]``."""

    __slots__ = ("_head", "_include_usage", "_tools", "started", "stopped")

    def __init__(self, cid: str, model: str, include_usage: bool) -> None:
        self._head = (b'data: {"id":' + orjson.dumps(cid) + b',"object":"chat.completion.chunk","created":'
                      + str(int(time.time())).encode() + b',"model":' + orjson.dumps(model))
        self._include_usage = include_usage
        self._tools: dict[str, int] = {}  # upstream tool key -> chat tool index
        self.started = self.stopped = False

    def _chunk(self, delta: Obj, finish: str | None = None) -> bytes:
        return (self._head + b',"choices":[{"index":0,"delta":' + orjson.dumps(delta)
                + b',"logprobs":null,"finish_reason":' + (orjson.dumps(finish) if finish else b"null") + b"}]}\n\n")

    def start(self) -> bytes:
        self.started = True
        return self._chunk({"role": "assistant", "content": ""})

    def text(self, s: str) -> bytes:
        return self._chunk({"content": s}) if s else b""

    def reasoning(self, s: str) -> bytes:
        return self._chunk({"reasoning_content": s}) if s else b""

    def thinking_block(self, block: Obj) -> bytes:
        return self._chunk({"thinking_blocks": [block]})

    def tool(self, key: str, call_id: str, name: str) -> bytes:
        index = self._tools[key] = len(self._tools)
        return self._chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})

    def tool_args(self, key: str, s: str) -> bytes:
        index = self._tools.get(key)
        if index is None or not s:
            return b""
        return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": s}}]})

    @property
    def tool_calls(self) -> int:
        return len(self._tools)

    def finish(self, reason: str, usage: Usage) -> bytes:
        self.stopped = True
        out = self._chunk({}, reason)
        if self._include_usage:
            out += self._head + b',"choices":[],"usage":' + orjson.dumps(chat_usage_obj(usage)) + b"}\n\n"
        return out + b"data: [DONE]\n\n"

    def error(self, message: str, kind: str, code: str | None) -> bytes:
        # What OpenAI itself sends when a stream fails after its head:
        # the SDKs raise it as an APIError.
        self.stopped = True
        return b"data: " + orjson.dumps({"error": {"message": message, "type": kind, "param": None,
                                                   "code": code}}) + b"\n\n"


class ResponseEvents:
    """Writes a Responses stream: response.created, response.in_progress,
    each output item added / its parts and deltas / done (one item open at a
    time, output_index increasing), then response.completed (or
    .incomplete / .failed) carrying the whole output; every event with the
    next sequence_number. Keeps the output items for that final event."""

    __slots__ = ("_created", "_id", "_ids", "_item", "_model", "_open", "_req", "_seq", "_spaces", "_text",
                 "output", "started", "stopped")

    def __init__(self, rid: str, model: str, req: Obj) -> None:
        self._id, self._model, self._req = rid, model, req
        self._spaces = namespaces(req)
        self._ids = response_ids(rid)
        self._seq = 0
        self._created = int(time.time())
        self.output: list[Obj] = []
        self._open: str | None = None
        self._item: Obj = {}
        self._text: list[str] = []
        self.started = self.stopped = False

    def _ev(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse(kind, data)

    def _response(self, status: str, usage: Usage | None = None, incomplete: str | None = None,
                  error: Obj | None = None) -> Obj:
        return response_object(self._id, self._model, status, self.output if status != "in_progress" else [],
                               usage, self._req, incomplete, error, self._created)

    def start(self) -> bytes:
        self.started = True
        r = self._response("in_progress")
        return self._ev("response.created", response=r) + self._ev("response.in_progress", response=r)

    def _add(self, kind: str, item: Obj) -> bytes:
        out = self.close()
        self._open = kind
        self._item = item
        self._text = []
        return out + self._ev("response.output_item.added", output_index=len(self.output), item=item)

    def _loc(self) -> Obj:
        return {"item_id": self._item["id"], "output_index": len(self.output)}

    def text(self, s: str) -> bytes:
        out = b""
        if self._open != "message":
            out = self._add("message", {"id": self._ids("msg"), "type": "message", "status": "in_progress",
                                        "role": "assistant", "content": []})
            out += self._ev("response.content_part.added", **self._loc(), content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        if s:
            self._text.append(s)
            out += self._ev("response.output_text.delta", **self._loc(), content_index=0, delta=s, logprobs=[])
        return out

    def reasoning(self, s: str) -> bytes:
        out = b""
        if self._open != "reasoning":
            out = self._add("reasoning", {"id": self._ids("rs"), "type": "reasoning", "summary": []})
            out += self._ev("response.reasoning_summary_part.added", **self._loc(), summary_index=0,
                            part={"type": "summary_text", "text": ""})
        if s:
            self._text.append(s)
            out += self._ev("response.reasoning_summary_text.delta", **self._loc(), summary_index=0, delta=s)
        return out

    def signature(self, enc: str) -> bytes:
        """The encrypted content of the reasoning item being written."""
        out = b"" if self._open == "reasoning" else self.reasoning("")
        if enc:
            self._item["encrypted_content"] = enc
        return out

    def tool(self, call_id: str, name: str) -> bytes:
        return self._add("function_call", function_call(self._ids("fc"), call_id, name, "", "in_progress",
                                                        self._spaces))

    def tool_args(self, s: str) -> bytes:
        if self._open != "function_call" or not s:
            return b""
        self._text.append(s)
        return self._ev("response.function_call_arguments.delta", **self._loc(), delta=s)

    def close(self) -> bytes:
        kind = self._open
        if kind is None:
            return b""
        item, loc = self._item, self._loc()
        text = "".join(self._text)
        out = b""
        if kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out += self._ev("response.output_text.done", **loc, content_index=0, text=text, logprobs=[])
            out += self._ev("response.content_part.done", **loc, content_index=0, part=part)
            item = {**item, "status": "completed", "content": [part]}
        elif kind == "reasoning":
            part = {"type": "summary_text", "text": text}
            out += self._ev("response.reasoning_summary_text.done", **loc, summary_index=0, text=text)
            out += self._ev("response.reasoning_summary_part.done", **loc, summary_index=0, part=part)
            item = {**item, "summary": [part] if text else []}
        else:
            text = text or "{}"
            out += self._ev("response.function_call_arguments.done", **loc, name=item["name"], arguments=text)
            item = {**item, "status": "completed", "arguments": text}
        out += self._ev("response.output_item.done", output_index=loc["output_index"], item=item)
        self.output.append(item)
        self._open = None
        return out

    def finish(self, usage: Usage, incomplete: str | None = None) -> bytes:
        self.stopped = True
        out = self.close()
        if incomplete:
            return out + self._ev("response.incomplete", response=self._response("incomplete", usage, incomplete))
        return out + self._ev("response.completed", response=self._response("completed", usage))

    def failed(self, code: str, message: str, usage: Usage | None = None) -> bytes:
        self.stopped = True
        out = self.close()
        err = {"code": code, "message": message}
        return out + self._ev("response.failed", response=self._response("failed", usage, error=err))


class Transducer(ABC):
    """A stream translation: one upstream event (its parsed ``data``; None
    for chat's ``[DONE]``) in, the client's SSE bytes out. ``end`` is called
    when the upstream body ends; ``usage`` is what the upstream reported so
    far, in the gateway's meaning, and ``error`` why the stream is not a
    clean answer (None if it is: the client got its final event)."""

    WIRE = CHAT
    _w: AnthropicEvents | ChatChunks | ResponseEvents | None = None
    _usage: Obj | None = None
    _error: str | None = None

    @abstractmethod
    def event(self, ev: Obj | None) -> bytes: ...

    def end(self) -> bytes:
        return b""

    def usage(self) -> Usage:
        return wire_usage(self.WIRE, self._usage)

    def error(self) -> str | None:
        if self._error:
            return self._error
        return None if self._w is not None and self._w.stopped else "upstream_incomplete_stream"


_EVENT_TYPE = re.compile(rb'"type"\s*:\s*"([\w.]{1,64})"')
_CHAT_CHUNK = re.compile(rb'^\s*\{[^{]*"object"\s*:\s*"chat\.completion\.chunk"')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"(\w{1,32})"')


def _first_string(buf: bytes, key: str) -> str | None:
    m = re.search(rb'"' + key.encode() + rb'"\s*:\s*"([^"\\]{1,256})"', buf)
    return m.group(1).decode("utf-8", "replace") if m else None


def reduced_event(head: bytes, tail: bytes) -> Obj | None:
    """What a transducer needs of an event too long to hold (SSEEvents'
    bound), from its first and last bytes: a Responses event's type and its
    response's id, model, status, incomplete_details, error and usage (the
    final event repeats the whole output and echoes the request's
    instructions and tools, so a client can make it any size); a chat
    chunk's usage and finish reason. Without this the usage of such a
    stream would be lost, and the row would bill nothing."""
    start = head.find(b"data:")
    if start < 0:
        return None
    head = head[start + 5:]
    if _CHAT_CHUNK.match(head):
        usage = last_object(tail, b"usage")
        finish = _FINISH.findall(tail)
        chunk: Obj = {"object": "chat.completion.chunk", "id": _first_string(head, "id"),
                      "model": _first_string(head, "model"), "choices": []}
        if finish:
            chunk["choices"] = [{"index": 0, "delta": {}, "finish_reason": finish[-1].decode()}]
        if usage is not None:
            chunk["usage"] = usage
        return chunk
    m = _EVENT_TYPE.search(head)
    if m is None:
        return None
    ev: Obj = {"type": m.group(1).decode()}
    at = head.find(b'"response"')
    if at >= 0:
        r = head[at:]
        ev["response"] = {
            "id": _first_string(r, "id"), "model": _first_string(r, "model"), "status": _first_string(r, "status"),
            "incomplete_details": first_object(r, b"incomplete_details"), "error": first_object(r, b"error"),
            "usage": last_object(tail, b"usage"),
        }
    return ev


# Responses events whose size is their echo of the request (instructions,
# tools) or their repeat of the output already streamed: their reduced form
# (reduced_event) loses nothing a transducer reads.
_ECHOES = frozenset({"response.created", "response.in_progress", "response.completed", "response.incomplete",
                     "response.failed"})


class TranslatedStream:
    """A UsageReader that translates: splits the upstream's SSE bytes into
    events as they arrive, hands each to the pair's transducer and returns
    what the client gets for them. Holds back at most one partial event;
    one longer than that is translated from its head and tail
    (``reduced_event``): its type and usage are never lost."""

    __slots__ = ("_events", "_lost", "_t")

    def __init__(self, t: Transducer) -> None:
        self._events = SSEEvents(keep=True)
        self._t = t
        self._lost = False  # an event too long to hold lost more than an echo

    def _reduce(self, head: bytes, tail: bytes) -> bytes:
        ev = reduced_event(head, tail)
        if ev is None or ev.get("type") not in _ECHOES:
            self._lost = True
        return self._t.event(ev) if ev is not None else b""

    def feed(self, chunk: bytes) -> bytes:
        # An event too long to hold (SSEEvents' bound) passes unparsed; what
        # matters of it (type, usage) is read from its head and tail.
        _, _, events, _ = self._events.split(chunk)
        out = []
        t = self._t
        big = self._events.big
        if big is not None:
            out.append(self._reduce(*big))
        for ev in events:
            data = event_data(ev)
            if not data:
                continue
            if data == b"[DONE]":
                obj = None
            else:
                try:
                    obj = safejson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(obj, dict):
                    continue
            b = t.event(obj)
            if b:
                out.append(b)
        return b"".join(out)

    def flush(self) -> bytes:
        return self._t.end()

    def finish(self) -> Usage:
        u = self._t.usage()
        u.error = self._t.error() or ("sse_event_too_large" if self._lost or self._events.skipping else None)
        return u
