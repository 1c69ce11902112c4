"""Tool calls and reasoning in the mock upstreams, one shape for all three
protocols (chat, Anthropic Messages, Responses), so a real agent (Claude
Code, Codex) can run its tool loop against the mock.

Steering (headers, or ``MockState.steer`` defaults):
- ``x-mock-tool: NAME``        answer with a call to the tool NAME when the
  request declares it and the conversation does not already end with a
  tool result; a conversation that ends with a tool result is answered
  with text echoing the result's last non-empty line:
  ``The tool said: <line>``, one output token per word.
- ``x-mock-tool-args: JSON``   the call's arguments (default ``{}``).
- ``x-mock-reasoning: N``      reasoning tokens reported in the usage, and
  reasoning content where the protocol carries it: an Anthropic
  ``thinking`` block when the request turns thinking on, a Responses
  ``reasoning`` item (summary text when ``reasoning.summary`` is set,
  ``encrypted_content`` when ``include`` asks for it), a chat
  ``reasoning_content`` delta when ``x-mock-reasoning-content: on``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .. import safejson
from .common import WORDS, _int, _steer

THINKING_WORDS = ("Let", " me", " think", " about", " this", " request", " first", ".")
# The echo of a tool result is bounded, as a model's answer would be.
ECHO_MAX = 200


def new_id(prefix: str) -> str:
    """A unique id (the mock serves many requests; ids must never repeat)."""
    return f"{prefix}{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the protocols carry it
    call_id: str

    def halves(self) -> tuple[str, str]:
        """The arguments in two deltas, as a streamed call arrives."""
        cut = len(self.arguments) // 2
        return self.arguments[:cut], self.arguments[cut:]

    @property
    def input(self) -> Any:
        return safejson.loads(self.arguments)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the mock answers: a tool call, or these words of text."""

    call: ToolCall | None
    words: tuple[str, ...]
    thinking: tuple[str, ...]  # reasoning text words (may be empty)
    reasoning_tokens: int

    @property
    def output_tokens(self) -> int:
        """Output tokens reported: one per word, or for a call about one per
        four characters of its arguments."""
        if self.call is not None:
            return 1 + len(self.call.arguments) // 4
        return len(self.words)


def plan(request: web.Request, declared: list[str], result: str | None, *, call_prefix: str) -> Plan:
    """What to answer for a request that declares the tools ``declared``
    and whose conversation ends with the tool result ``result`` (None: it
    does not end with one)."""
    reasoning = _int(request, "x-mock-reasoning")
    thinking = tuple(THINKING_WORDS[i % len(THINKING_WORDS)] for i in range(min(reasoning, 16)))
    if result is not None:
        lines = [line.strip() for line in result.splitlines() if line.strip()]
        last = lines[-1][:ECHO_MAX] if lines else "(nothing)"
        words = ("The", " tool", " said:", *(" " + w for w in last.split()))
        return Plan(None, words, thinking, reasoning)
    name = _steer(request, "x-mock-tool")
    if name and name in declared:
        raw = _steer(request, "x-mock-tool-args") or "{}"
        try:
            args = orjson.dumps(safejson.loads(raw)).decode()
        except orjson.JSONDecodeError:
            args = "{}"
        return Plan(ToolCall(name, args, new_id(call_prefix)), (), thinking, reasoning)
    n = _int(request, "x-mock-chunks", 5)
    return Plan(None, tuple(WORDS[i % len(WORDS)] for i in range(n)), thinking, reasoning)


def result_text(content: Any) -> str:
    """The text of a tool result: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


# ---------------------------------------------------------------- per protocol


def chat_tools(obj: dict[str, Any]) -> tuple[list[str], str | None]:
    """Declared tool names and the trailing tool result of a chat request."""
    tools = obj.get("tools")
    names = [str(t["function"].get("name")) for t in tools or () if isinstance(t, dict)
             and isinstance(t.get("function"), dict)] if isinstance(tools, list) else []
    msgs = obj.get("messages")
    last = msgs[-1] if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) else {}
    return names, result_text(last.get("content")) if last.get("role") == "tool" else None


def anthropic_tools(obj: dict[str, Any]) -> tuple[list[str], str | None]:
    """Declared tool names and the trailing tool result of a Messages request."""
    tools = obj.get("tools")
    names = [str(t.get("name")) for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    msgs = [m for m in obj.get("messages") or () if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
    last = msgs[-1] if msgs else {}
    content = last.get("content")
    if last.get("role") == "user" and isinstance(content, list):
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if results:
            return names, result_text(results[-1].get("content"))
    return names, None


def responses_tools(obj: dict[str, Any]) -> tuple[list[str], str | None]:
    """Declared tool names (namespaces included) and the trailing tool
    output of a Responses request."""
    names: list[str] = []

    def collect(tools: Any) -> None:
        for t in tools if isinstance(tools, list) else ():
            if isinstance(t, dict):
                if t.get("type") == "namespace":
                    collect(t.get("tools"))
                elif isinstance(t.get("name"), str):
                    names.append(t["name"])

    collect(obj.get("tools"))
    inp = obj.get("input")
    for item in inp if isinstance(inp, list) else ():
        if isinstance(item, dict) and item.get("type") == "additional_tools":
            collect(item.get("tools"))
    last = inp[-1] if isinstance(inp, list) and inp and isinstance(inp[-1], dict) else {}
    if last.get("type") in ("function_call_output", "custom_tool_call_output"):
        return names, result_text(last.get("output"))
    return names, None


def reasoning_content_on(request: web.Request) -> bool:
    return (_steer(request, "x-mock-reasoning-content") or "").lower() in ("on", "1", "true")
