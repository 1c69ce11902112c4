"""What every wire protocol module provides, and helpers to read usage from
bytes as they pass without keeping the whole response.

A protocol module describes one family of endpoints:
- ``prepare``: the body to send upstream (the client's bytes unless the model
  name or a streaming option must change) and any per-request state;
- ``parse``: the request body as an object and its ``model`` (JSON for most
  endpoints; multipart/form-data where the protocol allows it), or BadRequest;
- ``reader``: a UsageReader fed every response chunk in order. ``feed`` returns
  the bytes to send to the client (normally the same object, untouched) and
  ``flush`` returns bytes held back (a partial event) at the end, and
  ``finish`` returns the Usage seen. Readers keep a bounded amount of data.
  ``finish`` may also be called mid-stream, any number of times (the usage
  spool snapshots long requests with the usage seen so far): it must not
  change what later ``feed`` calls do or return.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ..errors import BadRequest
from ..errors import Protocol as ErrorShape

TAIL_BYTES = 64 * 1024


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    images: int = 0
    video_tokens: int = 0
    # Prompt-cache writes (part of input_tokens), and the part of them
    # written for one hour where the upstream says so (Anthropic's ttl).
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    # Why a stream that relayed fine is still not a clean answer (the
    # upstream sent an error event, or ended before its usage event); it
    # becomes the usage row's error_type.
    error: str | None = None
    # The id the upstream gave what it made (a Responses ``resp_...``), so
    # later requests naming it go to the same upstream (gateway.affinity).
    response_id: str | None = None


class UsageReader(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes:
        """Bytes still owed to the client when the upstream body ends."""
        ...

    def finish(self) -> Usage: ...


@dataclass(frozen=True, slots=True)
class Prepared:
    """The upstream body and whatever the reader needs to know about it."""

    body: bytes
    stream: bool
    hide_usage_chunk: bool = False


class Endpoint(Protocol):
    """A public endpoint's wire protocol (see the module docstring).

    ``free``: a token-counting endpoint that bills nothing. It is exempt
    from the key's limits (RPM, TPM, concurrency, quotas: a client may send
    dozens at start-up), and an upstream 429 on it is relayed as is: it
    neither cools the route for generations nor fails over.
    """

    name: str
    path: str
    errors: ErrorShape
    free: bool
    speaks: str | None  # only upstreams that speak this chat protocol answer it (None: any)

    def parse(self, content_type: str, raw: bytes) -> tuple[dict[str, Any], str]: ...

    def prepare(self, raw: bytes, obj: dict[str, Any], upstream_model: str, public_model: str) -> Prepared: ...

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader: ...


def parse_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; 400 otherwise."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("Request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    return obj


def parse_json_body(raw: bytes) -> tuple[dict[str, Any], str]:
    """The JSON object of a request body and its ``model``."""
    obj = parse_object(raw)
    return obj, check_model(obj.get("model"))


def check_model(model: Any) -> str:
    if model is None:
        raise BadRequest("Missing required parameter: 'model'.", code="missing_model", param="model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string.", code="invalid_model", param="model")
    return model


class JsonBody:
    """``parse`` and ``prepare`` of an endpoint whose body is a JSON object:
    the client's bytes go upstream unless the model name must change."""

    free = False
    speaks: str | None = None

    def parse(self, content_type: str, raw: bytes) -> tuple[dict[str, Any], str]:
        return parse_json_body(raw)

    def prepare(self, raw: bytes, obj: dict[str, Any], upstream_model: str, public_model: str) -> Prepared:
        stream = obj.get("stream") is True
        if upstream_model == public_model:
            return Prepared(raw, stream)
        return Prepared(orjson.dumps({**obj, "model": upstream_model}), stream)


def as_int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


class Tail:
    """The last ``limit`` bytes of a stream, kept as a list of chunks."""

    __slots__ = ("_chunks", "_limit", "_size", "complete")

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.complete = True  # nothing dropped yet: the tail is the whole stream

    def add(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= self._limit:
            self._size -= len(self._chunks.pop(0))
            self.complete = False

    def bytes(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks = [data]
        return data


_KEY_CACHE: dict[bytes, re.Pattern[bytes]] = {}


def _key_pattern(key: bytes) -> re.Pattern[bytes]:
    p = _KEY_CACHE.get(key)
    if p is None:
        p = _KEY_CACHE[key] = re.compile(b'"' + re.escape(key) + rb'"\s*:\s*\{')
    return p


def body_usage(tail: Tail) -> dict[str, Any] | None:
    """The ``usage`` object of a response: parsed whole when the tail holds
    a complete small JSON body (the common non-streaming answer), otherwise
    the last ``"usage": {...}`` in the tail."""
    data = tail.bytes()
    if tail.complete and data[:1] == b"{":
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            u = obj.get("usage")
            return u if isinstance(u, dict) else None
    return last_object(data, b"usage")


class NoUsage:
    """Relays every chunk untouched and bills nothing: token counts, and
    stored objects fetched again (a response's usage was billed when it
    was made)."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""

    def finish(self) -> Usage:
        return Usage()


class TailUsage:
    """Relays every chunk untouched; usage is the ``usage`` object of a
    small whole JSON body, else the last ``"usage": {...}`` in the final
    64 KiB (where OpenAI and Anthropic put it, in bodies and in streams).
    ``parse`` maps that object (or None) to a Usage."""

    __slots__ = ("_parse", "_tail")

    def __init__(self, parse: Callable[[dict[str, Any] | None], Usage]) -> None:
        self._tail = Tail()
        self._parse = parse

    def feed(self, chunk: bytes) -> bytes:
        self._tail.add(chunk)
        return chunk

    def flush(self) -> bytes:
        return b""

    def finish(self) -> Usage:
        return self._parse(body_usage(self._tail))


_DECODER = json.JSONDecoder()
# A usage object is far smaller than this; the slice keeps decoding cheap.
_OBJECT_WINDOW = 16 * 1024


def last_object(buf: bytes, key: bytes) -> dict[str, Any] | None:
    """The last JSON object value of ``"key": {...}`` in ``buf``, or None.

    Parses only the object itself (the C scanner of ``json`` stops at its
    closing brace), so a large body with usage at its end costs one regex
    scan and a small parse, not a full parse.
    """
    matches = list(_key_pattern(key).finditer(buf))
    for m in reversed(matches):
        start = m.end() - 1
        for window in (_OBJECT_WINDOW, len(buf)):
            text = buf[start : start + window].decode("utf-8", "replace")
            try:
                v, _ = _DECODER.raw_decode(text)
            except ValueError:
                if start + window >= len(buf):
                    break
                continue
            if isinstance(v, dict):
                return v
            break
    return None


class SSEEvents:
    """Splits an SSE byte stream into complete events (``\\n\\n`` or
    ``\\r\\n\\r\\n`` terminated), holding back at most one partial event."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def split(self, chunk: bytes) -> tuple[bytes, list[bytes]]:
        """Returns (complete bytes, the events in them); keeps the rest."""
        data = self._pending + chunk if self._pending else chunk
        end = max(data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n"))
        if end < 0:
            # Bounded by the size of one event: the bytes are owed to the client.
            self._pending = data
            return b"", []
        cut = end + (2 if data[end : end + 2] == b"\n\n" else 4)
        complete, self._pending = data[:cut], data[cut:]
        return complete, re.split(rb"\r?\n\r?\n", complete)[:-1]

    @property
    def pending(self) -> bytes:
        return self._pending


def event_data(event: bytes) -> bytes:
    """The joined ``data:`` lines of one SSE event."""
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            v = line[5:]
            parts.append(v[1:] if v.startswith(b" ") else v)
    return b"\n".join(parts)


def event_name(event: bytes) -> bytes:
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip()
    return b""


class EventScanner:
    """Finds the complete SSE events that mention one of ``markers`` as the
    bytes pass, without holding the stream back or keeping it.

    Only the bytes after the last event boundary are kept (at most ``limit``;
    a longer event is skipped, so a multi-megabyte image event costs nothing),
    and only chunks that contain a marker are split and parsed. Markers are a
    cheap pre-filter (e.g. ``b'"usage"'``); callers check the parsed event.
    ``feed`` returns the ``data:`` objects of the matching events, in order.
    """

    __slots__ = ("_limit", "_markers", "_pending", "_skip")

    def __init__(self, *markers: bytes, limit: int = TAIL_BYTES) -> None:
        self._markers = markers
        self._limit = limit
        self._pending = b""
        self._skip = False

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        data = self._pending + chunk if self._pending else chunk
        end = max(data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n"))
        if end < 0:
            if len(data) > self._limit:
                self._pending, self._skip = b"", True
            else:
                self._pending = data
            return []
        cut = end + (2 if data[end : end + 2] == b"\n\n" else 4)
        complete, rest = data[:cut], data[cut:]
        skip, self._skip = self._skip, len(rest) > self._limit
        self._pending = b"" if self._skip else rest
        markers = self._markers
        if not any(m in complete for m in markers):
            return []
        events = re.split(rb"\r?\n\r?\n", complete)[:-1]
        if skip:
            events = events[1:]  # the end of an event whose start was dropped
        found = []
        for ev in events:
            if not any(m in ev for m in markers):
                continue
            try:
                obj = orjson.loads(event_data(ev))
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                found.append(obj)
        return found


class Counter:
    """Counts occurrences of byte strings across chunk boundaries."""

    __slots__ = ("_carry", "_needles", "_overlap", "count")

    def __init__(self, *needles: bytes) -> None:
        self._needles = needles
        self._overlap = max(len(n) for n in needles) - 1
        self._carry = b""
        self.count = 0

    def feed(self, chunk: bytes) -> None:
        carry = self._carry
        data = carry + chunk
        # What lies wholly in the carry was counted with the previous chunk.
        self.count += sum(data.count(n) - carry.count(n) for n in self._needles)
        self._carry = data[-self._overlap :] if self._overlap else b""


class Decompressed:
    """Wraps a pure pass-through reader for an upstream that compressed its
    answer although asked for identity: the client gets the bytes as sent,
    the reader sees them decompressed (in bounded pieces, so a small
    compressed chunk cannot make a large allocation)."""

    __slots__ = ("_inner", "_z")

    PIECE = 256 * 1024

    def __init__(self, inner: UsageReader) -> None:
        self._inner = inner
        self._z: Any = zlib.decompressobj(47)  # gzip or zlib header, detected

    def feed(self, chunk: bytes) -> bytes:
        z = self._z
        if z is None:
            return chunk
        data = chunk
        try:
            while data:
                self._inner.feed(z.decompress(data, self.PIECE))
                data = z.unconsumed_tail
        except zlib.error:
            self._z = None  # not what it claimed to be: read no further
        return chunk

    def flush(self) -> bytes:
        return b""

    def finish(self) -> Usage:
        self._inner.flush()
        return self._inner.finish()
