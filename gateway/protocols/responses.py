"""OpenAI Responses (``/v1/responses``) and compaction
(``/v1/responses/compact``): the body goes upstream as sent (model renamed if
the route says so); usage is ``usage.input_tokens``, ``output_tokens``,
``input_tokens_details.cached_tokens`` and
``output_tokens_details.reasoning_tokens``.

In a stream the usage is in the ``response`` object of the final
``response.completed``, ``response.incomplete`` or ``response.failed`` event.
That event repeats the whole output, so it can be far larger than any buffer
we would keep; but ``usage`` comes after ``output`` in the object and earlier
events carry ``"usage": null``, so the last usage object in the final 64 KiB
is the one wanted. Whether a final event arrived at all is counted from its
JSON type string as the bytes pass.
"""

from __future__ import annotations

from typing import Any

from ..errors import Protocol as ErrorShape
from .base import Counter, JsonBody, Prepared, Tail, Usage, UsageReader, as_int, last_object


def responses_usage(u: dict[str, Any] | None) -> Usage:
    if not u:
        return Usage()
    inp = u.get("input_tokens_details")
    out = u.get("output_tokens_details")
    return Usage(
        input_tokens=as_int(u.get("input_tokens")),
        output_tokens=as_int(u.get("output_tokens")),
        cached_tokens=as_int(inp.get("cached_tokens")) if isinstance(inp, dict) else 0,
        reasoning_tokens=as_int(out.get("reasoning_tokens")) if isinstance(out, dict) else 0,
    )


class ResponseUsage:
    """Relays every chunk untouched and keeps the final 64 KiB. For a stream
    it also notes whether a final event or an ``error`` event went by."""

    __slots__ = ("_error", "_final", "_sse", "_tail")

    def __init__(self, sse: bool) -> None:
        self._tail = Tail()
        self._sse = sse
        # As JSON string values ("type":"response.completed"); an escaped
        # copy inside text cannot match.
        self._final = Counter(b'"response.completed"', b'"response.incomplete"', b'"response.failed"')
        self._error = Counter(b'"type":"error"')

    def feed(self, chunk: bytes) -> bytes:
        self._tail.add(chunk)
        if self._sse:
            self._final.feed(chunk)
            self._error.feed(chunk)
        return chunk

    def flush(self) -> bytes:
        return b""

    def finish(self) -> Usage:
        usage = responses_usage(last_object(self._tail.bytes(), b"usage"))
        if self._sse:
            if self._error.count:
                usage.error = "upstream_stream_error"
            elif not self._final.count:
                usage.error = "upstream_incomplete_stream"
        return usage


class Responses(JsonBody):
    name = "responses"
    path = "/v1/responses"
    errors = ErrorShape.OPENAI

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return ResponseUsage(sse)


class ResponsesCompact(Responses):
    """Compaction: JSON in, JSON out, usage in the body like a response."""

    name = "responses_compact"
    path = "/v1/responses/compact"


__all__ = ["Responses", "ResponsesCompact", "responses_usage"]
