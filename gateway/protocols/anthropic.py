"""Anthropic Messages: the body goes upstream as sent (model renamed if the
route says so); usage is read from the JSON body or from the SSE events as
they pass.

Input counts ``input_tokens + cache_creation_input_tokens +
cache_read_input_tokens``; cached is ``cache_read_input_tokens``; cache
writes are ``cache_creation_input_tokens``, of which
``cache_creation.ephemeral_1h_input_tokens`` were written for an hour; reasoning is
``output_tokens_details.thinking_tokens`` where present. In a stream,
``message_start`` carries the input usage and every ``message_delta`` the
*cumulative* usage so far: the last value wins, nothing is summed.
"""

from __future__ import annotations

from typing import Any

from ..errors import Protocol as ErrorShape
from .base import EventScanner, JsonBody, NoUsage, Prepared, TailUsage, Usage, UsageReader, as_int


def anthropic_usage(u: dict[str, Any] | None) -> Usage:
    if not u:
        return Usage()
    details = u.get("output_tokens_details")
    writes = as_int(u.get("cache_creation_input_tokens"))
    split = u.get("cache_creation")
    writes_1h = as_int(split.get("ephemeral_1h_input_tokens")) if isinstance(split, dict) else 0
    if isinstance(split, dict) and not writes:
        writes = writes_1h + as_int(split.get("ephemeral_5m_input_tokens"))
    return Usage(
        input_tokens=as_int(u.get("input_tokens")) + writes + as_int(u.get("cache_read_input_tokens")),
        output_tokens=as_int(u.get("output_tokens")),
        cached_tokens=as_int(u.get("cache_read_input_tokens")),
        reasoning_tokens=as_int(details.get("thinking_tokens")) if isinstance(details, dict) else 0,
        cache_write_tokens=writes,
        cache_write_1h_tokens=min(writes_1h, writes),
    )


class MessageStreamUsage:
    """A stream: relays every chunk untouched; parses only the events that
    carry usage, the final ``message_stop`` and ``error`` events."""

    __slots__ = ("_error", "_events", "_stopped", "_usage")

    def __init__(self) -> None:
        # JSON string tokens cannot occur unescaped inside text deltas.
        self._events = EventScanner(b'"usage"', b'"message_stop"', b'"error"')
        self._usage: dict[str, Any] = {}
        self._stopped = False
        self._error = False

    def feed(self, chunk: bytes) -> bytes:
        for ev in self._events.feed(chunk):
            kind = ev.get("type")
            if kind == "message_start":
                msg = ev.get("message")
                u = msg.get("usage") if isinstance(msg, dict) else None
                if isinstance(u, dict):
                    self._usage = dict(u)
            elif kind == "message_delta":
                u = ev.get("usage")
                if isinstance(u, dict):
                    # Cumulative: a field present here replaces the earlier value.
                    self._usage.update((k, v) for k, v in u.items() if v is not None)
            elif kind == "message_stop":
                self._stopped = True
            elif kind == "error":
                self._error = True
        return chunk

    def flush(self) -> bytes:
        return b""

    def finish(self) -> Usage:
        usage = anthropic_usage(self._usage)
        if self._error:
            usage.error = "upstream_stream_error"
        elif not self._stopped:
            usage.error = "upstream_incomplete_stream"
        return usage


class Messages(JsonBody):
    name = "messages"
    path = "/v1/messages"
    errors = ErrorShape.ANTHROPIC

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return MessageStreamUsage() if sse else TailUsage(anthropic_usage)


class CountTokens(Messages):
    """``/v1/messages/count_tokens``: what a Messages body would be billed as
    input, answered by an upstream that speaks Messages (relayed as is); a
    model with none is counted by its Responses upstream or estimated
    (gateway.proxy.count_elsewhere). Bills nothing (see ``Endpoint.free``)."""

    name = "count_tokens"
    path = "/v1/messages/count_tokens"
    free = True
    speaks: str | None = "messages"

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return NoUsage()


__all__ = ["CountTokens", "Messages", "anthropic_usage"]
