"""What every wire protocol module provides, and helpers to read usage from
bytes as they pass without keeping the whole response.

A protocol module describes one family of endpoints:
- ``prepare``: the body to send upstream (the client's bytes unless the model
  name or a streaming option must change) and any per-request state;
- ``reader``: a UsageReader fed every response chunk in order. ``feed`` returns
  the bytes to send to the client (normally the same object, untouched) and
  ``flush`` returns bytes held back (a partial event) at the end, and
  ``finish`` returns the Usage seen. Readers keep a bounded amount of data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

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
    """A public endpoint's wire protocol (see the module docstring)."""

    name: str
    path: str
    errors: ErrorShape

    def prepare(self, raw: bytes, obj: dict[str, Any], upstream_model: str, public_model: str) -> Prepared: ...

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader: ...


def as_int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


class Tail:
    """The last ``limit`` bytes of a stream, kept as a list of chunks."""

    __slots__ = ("_chunks", "_limit", "_size")

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit

    def add(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= self._limit:
            self._size -= len(self._chunks.pop(0))

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


def last_object(buf: bytes, key: bytes) -> dict[str, Any] | None:
    """The last JSON object value of ``"key": {...}`` in ``buf``, or None.

    Scans for the balanced closing brace (skipping strings) and parses only
    that slice, so a large body with usage at its end costs one rfind-like
    scan, not a full parse.
    """
    matches = list(_key_pattern(key).finditer(buf))
    for m in reversed(matches):
        end = _balanced_end(buf, m.end() - 1)
        if end is None:
            continue
        try:
            v = orjson.loads(buf[m.end() - 1 : end])
        except orjson.JSONDecodeError:
            continue
        if isinstance(v, dict):
            return v
    return None


def _balanced_end(buf: bytes, start: int) -> int | None:
    depth = 0
    i = start
    n = len(buf)
    in_str = False
    while i < n:
        c = buf[i]
        if in_str:
            if c == 0x5C:  # backslash
                i += 2
                continue
            if c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
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
