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

import re
from typing import Any

from ..errors import Protocol as ErrorShape
from .base import Counter, JsonBody, NoUsage, Prepared, Tail, Usage, UsageReader, as_int, last_object

# Where the response id stands: first in the ``response`` object of
# response.created (a stream) or first in the body; failing that, the first
# ``resp_`` id. Only the head of the answer is searched, and only ids made
# of URL-safe characters are taken (they go into upstream paths later).
HEAD_BYTES = 4096
_STREAM_ID = re.compile(rb'"response"\s*:\s*\{\s*"id"\s*:\s*"([\w.:-]{1,256})"')
_BODY_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([\w.:-]{1,256})"')
_ANY_ID = re.compile(rb'"id"\s*:\s*"(resp_[\w.:-]{1,251})"')


def response_id(head: bytes, sse: bool) -> str | None:
    """The id of the response whose answer begins with ``head``."""
    m = (_STREAM_ID if sse else _BODY_ID).search(head) or _ANY_ID.search(head)
    return m.group(1).decode("utf-8", "replace") if m else None


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
    it also notes whether a final event or an ``error`` event went by. With
    ``ids`` it keeps the first 4 KiB too, for the response id."""

    __slots__ = ("_error", "_final", "_head", "_ids", "_sse", "_tail")

    def __init__(self, sse: bool, ids: bool = False) -> None:
        self._tail = Tail()
        self._sse = sse
        self._ids = ids
        self._head = b""
        # As JSON string values ("type":"response.completed"); an escaped
        # copy inside text cannot match.
        self._final = Counter(b'"response.completed"', b'"response.incomplete"', b'"response.failed"')
        self._error = Counter(b'"type":"error"')

    def feed(self, chunk: bytes) -> bytes:
        self._tail.add(chunk)
        if self._ids and len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        if self._sse:
            self._final.feed(chunk)
            self._error.feed(chunk)
        return chunk

    def flush(self) -> bytes:
        return b""

    def finish(self) -> Usage:
        usage = responses_usage(last_object(self._tail.bytes(), b"usage"))
        if self._ids:
            usage.response_id = response_id(self._head, self._sse)
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
        return ResponseUsage(sse, ids=True)


class ResponsesCompact(Responses):
    """Compaction: JSON in, JSON out, usage in the body like a response."""

    name = "responses_compact"
    path = "/v1/responses/compact"

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return ResponseUsage(sse)


class ResponsesInputTokens(Responses):
    """``/v1/responses/input_tokens``: counts a Responses body's input
    tokens; bills nothing (see ``Endpoint.free``)."""

    name = "responses_input_tokens"
    path = "/v1/responses/input_tokens"
    free = True

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return NoUsage()


class StoredResponses(Responses):
    """A stored response named by id (GET, DELETE, input_items, cancel):
    the client's body (if any) goes as sent; nothing is billed, since the
    usage in a fetched response was billed when it was made."""

    name = "responses_stored"
    path = "/v1/responses/{id}"

    def prepare(self, raw: bytes, obj: dict[str, Any], upstream_model: str, public_model: str) -> Prepared:
        return Prepared(raw, False)

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return NoUsage()


__all__ = ["Responses", "ResponsesCompact", "ResponsesInputTokens", "StoredResponses", "response_id", "responses_usage"]
