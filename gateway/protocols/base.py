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

from .. import safejson
from ..bounds import shown
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
    dozens at start-up) and bounded apart instead (gateway.intake.admit_free),
    and an upstream 429 on it is relayed as is: it neither cools the route
    for generations nor fails over.
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
    return _parse_object(raw)[0]


def _parse_object(raw: bytes) -> tuple[dict[str, Any], bytes | None]:
    """parse_object, and safejson.parse's verdict: ``raw`` when it is
    orjson's own spelling of the object."""
    try:
        obj, canon = safejson.parse(raw)
    except safejson.TooDeep:
        raise BadRequest("The request is nested too deeply.", code="invalid_request") from None
    except orjson.JSONDecodeError:
        raise BadRequest("Request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    return obj, canon


# Top-level keys the gateway reads to decide (what to route and bill, how to
# read usage, which price tier, server tool and stored object it lets through:
# config.PRICE_FIELDS, gateway.intake.check_tools), and the nested one inside
# stream_options.
DECIDING_KEYS = ("model", "stream", "stream_options", "service_tier", "speed", "inference_geo",
                 "web_search_options", "conversation", "prompt", "tools")


_NAMES = (*DECIDING_KEYS, "include_usage")
_DECIDING_NAMES = re.compile(rb'"(' + "|".join(_NAMES).encode() + rb')"')


def _escapes_of(chars: str) -> re.Pattern[bytes]:
    """A JSON escape of any of ``chars`` (ASCII): ``\\u006d`` or ``\\u006D``
    for "m". Grouped by the high hex digit: one character class per group
    scans as fast as the plainest pattern."""
    lows: dict[int, list[int]] = {}
    for c in sorted(set(chars)):
        lows.setdefault(ord(c) >> 4, []).append(ord(c) & 15)
    groups = (f"{hi:x}[{''.join(f'{lo:x}{lo:X}' if lo > 9 else f'{lo:x}' for lo in los)}]" for hi, los in lows.items())
    return re.compile(rb"\\u00(?:" + "|".join(groups).encode() + rb")")


# The escapes that can spell a character of those names (the only way to
# write one of them without its plain bytes), or a quote (see
# _maybe_ambiguous). Escaped text in values (non-ASCII, controls, an
# HTML-safe encoder's \u003c) is none of them, and costs no second parse.
_NAME_ESCAPES = _escapes_of("".join(_NAMES) + '"')


def _maybe_ambiguous(raw: bytes, obj: dict[str, Any], canon: bytes | None) -> bool:
    """The cheap checks, on every JSON request, that a key the gateway
    decides on may be given twice in ``raw`` (parsed as ``obj``, where the
    last one won); the careful parse runs only when they say it may.

    - A body that is orjson's own spelling of ``obj`` (``canon`` is
      ``raw``: safejson.parse found it so) has no key twice. Claude Code's
      and Codex's are: that check costs a 49 KB Claude Code body 7 us,
      against 32 us for the scan below and 104 us for the careful parse
      that its tools' "model" and "prompt" properties set off.
    - Otherwise a key given twice needs its name twice, or an escape that
      spells part of it (``"mod\\u0065l"``; JSON encoders never escape
      printable ASCII). A name found twice may be a nested key or a value
      (a tool's "model" property): then the parsed object holds as many of
      it as the body. Every ``"model"`` in a JSON text is the string
      "model" or the end of a string that ends in a quote and "model" (the
      quote escaped); with no escape of a quote or of a letter of the
      name, the body holds exactly the object's, plus those of every
      entry a repeated key dropped."""
    if canon is not None:
        return False
    if b"\\u00" in raw and _NAME_ESCAPES.search(raw) is not None:
        return True
    found = _DECIDING_NAMES.findall(raw)
    if len(found) == len(set(found)):
        return False
    # (safejson.parse has written the object once: it can be written again.)
    return sorted(found) != sorted(_DECIDING_NAMES.findall(orjson.dumps(obj)))


_WS = re.compile(r"[ \t\n\r]*")
# json's C string scanner (not in the type stubs): a key and where it ends.
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _skip_ws(text: str, i: int) -> int:
    m = _WS.match(text, i)
    assert m is not None  # "*": it always matches
    return m.end()


def parse_json_body(raw: bytes) -> tuple[dict[str, Any], str]:
    """The JSON object of a request body and its ``model``; 400 when the body
    is ambiguous: a key the gateway decides on appears twice (parsers differ
    on which one wins, so the gateway could check and bill one value while
    the upstream acts on the other), or ``stream`` is not a boolean (an
    upstream that reads ``1`` or ``"true"`` as true would stream while the
    gateway reads the answer as a plain body)."""
    obj, canon = _parse_object(raw)
    if _maybe_ambiguous(raw, obj, canon):
        refuse_duplicates(raw)
    refuse_variants(obj)
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", code="invalid_type", param="stream")
    return obj, check_model(obj.get("model"))


def refuse_duplicates(raw: bytes, keys: tuple[str, ...] = DECIDING_KEYS) -> None:
    """400 if one of ``keys`` occurs twice at the top level of the JSON
    object ``raw`` (or ``include_usage`` twice inside ``stream_options``).
    ``raw`` is already known to be valid JSON nested at most 255 levels
    (safejson.parse refuses deeper: json's decoder takes about 1,000);
    each top-level value is skipped by the C scanner, so this costs about
    one more parse."""
    text = raw.decode("utf-8")
    spans = _object_keys(text, _skip_ws(text, 0), keys)
    so = spans.get("stream_options")
    if so is not None and text[so] == "{":
        _object_keys(text, so, ("include_usage",), "stream_options.")


def _object_keys(text: str, i: int, keys: tuple[str, ...], prefix: str = "") -> dict[str, int]:
    """Where the values of ``keys`` start in the object at ``text[i]``; 400
    naming the first of them that occurs twice."""
    seen: dict[str, int] = {}
    i = _skip_ws(text, i + 1)
    while text[i] != "}":
        key, i = _scanstring(text, i + 1)
        i = _skip_ws(text, i) + 1  # past the colon
        start = _skip_ws(text, i)
        _, i = _DECODER.raw_decode(text, start)
        if key in keys:
            if key in seen:
                raise BadRequest(f"'{prefix}{key}' is given twice; send it once.", code="duplicate_key",
                                 param=prefix + key)
            seen[key] = start
        i = _skip_ws(text, i)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return seen


# A deciding key spelt otherwise. Go's encoding/json, and decoders built
# like it, match an object key to a field case-insensitively, with Unicode's
# simple folding: "Stream", "STREAM", "\u017ftream" (the long s) all set
# ``stream`` there, the last one given winning, while the gateway reads only
# "stream". So an upstream written in Go would stream, bill another model, a
# price tier or run a server tool the gateway never saw. The folds to ASCII
# letters: the long s and the Kelvin sign (Go), the dotless and dotted i
# (Turkish-locale lower-casing elsewhere), and full case folding's (the
# ligatures: "\ufb06ream" is "stream" to Java's toUpperCase and Python's
# casefold). And a key cut at a NUL ("model\u0000x"), as a decoder that
# keeps keys as C strings reads it.
_FOLD = str.maketrans({"\u017f": "s", "\u212a": "k", "\u0131": "i", "\u0130": "i"})
_VARIANT_NAMES = frozenset(DECIDING_KEYS)


def folded(key: str) -> str:
    """``key`` as a case-insensitive decoder may read it (see ``_FOLD``)."""
    f = key.lower() if key.isascii() else key.translate(_FOLD).casefold()
    return f.partition("\x00")[0] if "\x00" in f else f


def refuse_variants(obj: dict[str, Any]) -> None:
    """400 for a top-level key (or one in ``stream_options``) that is a key
    the gateway decides on spelt otherwise (``_FOLD``). A set lookup per
    key, and a folding for those that are not such a key exactly."""
    names = _VARIANT_NAMES
    for k in obj:
        if k not in names:
            # folded(k), its common case inline (a call per key was a third
            # of this function's time): ASCII without a NUL.
            f = k.lower() if k.isascii() and "\x00" not in k else folded(k)
            if f in names:
                refuse_variant(k, f)
    so = obj.get("stream_options")
    if so.__class__ is dict:
        for k in so:
            if k != "include_usage" and folded(k) == "include_usage":
                refuse_variant(k, "include_usage", "stream_options.")


def refuse_variant(key: str, name: str, prefix: str = "") -> None:
    raise BadRequest(f"'{prefix}{shown(key)}' is '{prefix}{name}' spelt otherwise, which upstreams read as "
                     f"'{name}' or not at all; send '{name}' exactly, once.", code="ambiguous_key",
                     param=prefix + name)


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


# More tokens than any answer has: a count above it is an upstream's garbage
# (it would overflow the database's 64-bit integers, or bill absurdly), read as 0.
MAX_TOKENS = 10**12


def as_int(v: Any) -> int:
    """A token count from an upstream's usage object: a positive integer up
    to MAX_TOKENS, else 0."""
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_TOKENS else 0


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
            obj = safejson.loads(data)
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


def first_object(buf: bytes, key: bytes) -> dict[str, Any] | None:
    """The value of the first ``"key":`` in ``buf`` if it is a JSON object
    (within ``_OBJECT_WINDOW``), else None."""
    m = re.search(b'"' + re.escape(key) + rb'"\s*:\s*', buf)
    if m is None or buf[m.end() : m.end() + 1] != b"{":
        return None
    start = m.end()
    try:
        v, _ = _DECODER.raw_decode(buf[start : start + _OBJECT_WINDOW].decode("utf-8", "replace"))
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


# The most of one SSE event a reader holds back to parse (gateway-hidden
# usage chunks); a longer event is relayed as it arrives, unparsed.
EVENT_MAX = 1024 * 1024


def _last_boundary(data: bytes, start: int) -> int:
    """The end of the last event boundary at or after ``start``, or -1."""
    end = max(data.rfind(b"\n\n", start), data.rfind(b"\r\n\r\n", start))
    if end < 0:
        return -1
    return end + (2 if data[end : end + 2] == b"\n\n" else 4)


def _first_boundary(data: bytes) -> int:
    """The end of the first event boundary in ``data``, or -1."""
    found = [(i, n) for i, n in ((data.find(b"\n\n"), 2), (data.find(b"\r\n\r\n"), 4)) if i >= 0]
    if not found:
        return -1
    i, n = min(found)
    return i + n


class SSEEvents:
    """Splits an SSE byte stream into complete events (``\\n\\n`` or
    ``\\r\\n\\r\\n`` terminated), holding back at most one partial event of
    at most ``limit`` bytes.

    An event longer than that is not held: what was held is released and
    the rest of that event passes through untouched until its end, after
    which splitting resumes; ``overflowed`` records that an event went by
    unparsed. Only the new bytes (and three of the held ones) are searched
    for a boundary, so a long unterminated event costs linear time.

    With ``keep``, the first and last ``TAIL_BYTES`` of each such event are
    kept: ``big`` is (head, tail) of the one that ended in the last
    ``split`` (it comes before that call's complete events), else None.
    A translated stream reads the event's type and usage from them
    (gateway.translate.common.reduced_event)."""

    __slots__ = ("_big_head", "_big_tail", "_keep", "_limit", "_parts", "_size", "_skipping", "_tail", "big",
                 "overflowed")

    def __init__(self, limit: int = EVENT_MAX, *, keep: bool = False) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._tail = b""  # the last bytes seen, where a boundary may begin
        self._limit = limit
        self._skipping = False
        self.overflowed = False
        self._keep = keep
        self._big_head = b""
        self._big_tail: Tail | None = None
        self.big: tuple[bytes, bytes] | None = None

    def split(self, chunk: bytes) -> tuple[bytes, bytes, list[bytes], bytes]:
        """Returns (bytes passed through before, complete bytes, the events
        in them, bytes passed through after); the client gets them in that
        order, the middle one after the reader's changes."""
        before, complete, after = self.cut(chunk)
        return before, complete, split_events(complete), after

    def cut(self, chunk: bytes) -> tuple[bytes, bytes, bytes]:
        """``split`` without the events: (bytes passed through before,
        complete bytes, bytes passed through after), for a caller that
        looks at the events of only some chunks (``split_events``)."""
        before = b""
        if self._keep:
            self.big = None
        if self._skipping:
            # The first boundary: begun in the last bytes seen (it then ends
            # in the chunk's first three), else wholly in the chunk.
            tail = self._tail
            cut = _first_boundary(tail + chunk[:3])
            cut = cut - len(tail) if cut >= 0 else _first_boundary(chunk)
            if cut < 0:
                self._tail = (tail + chunk[-3:])[-3:]
                if self._keep:
                    self._keep_big(chunk)
                return chunk, b"", b""
            before, chunk = chunk[:cut], chunk[cut:]
            self._skipping, self._tail = False, b""
            if self._keep:
                self._keep_big(before)
                assert self._big_tail is not None
                self.big = (self._big_head, self._big_tail.bytes())
                self._big_head, self._big_tail = b"", None
        if self._parts:
            # The last boundary ends in this chunk: in it, or begun in the
            # bytes held (their last three, ``_tail``). Held bytes and the
            # chunk up to it are copied once, into the complete bytes.
            cut = _last_boundary(chunk, 0)
            if cut < 3:
                cut = max(cut, _last_boundary(self._tail + chunk[:3], 0) - len(self._tail))
            if cut < 0:  # nothing ends here: hold on, or give up
                return before + self._hold(chunk), b"", b""
            complete = b"".join((*self._parts, memoryview(chunk)[:cut]))
        else:
            cut = _last_boundary(chunk, 0)
            if cut < 0:
                return before + self._hold(chunk), b"", b""
            complete = chunk[:cut]  # the whole chunk (no copy) when it ends an event
        rest = chunk[cut:]
        self._parts, self._size, self._tail = [], 0, b""
        after = self._hold(rest) if rest else b""
        return before, complete, after

    def _hold(self, data: bytes) -> bytes:
        """Keep ``data`` as part of the partial event; if that makes it too
        long, release all of it (returned) and pass the rest of the event."""
        self._tail = (self._tail + data[-3:])[-3:]
        if self._size + len(data) <= self._limit:
            self._parts.append(data)
            self._size += len(data)
            return b""
        held = b"".join(self._parts) + data
        self._parts, self._size = [], 0
        self._skipping = self.overflowed = True
        if self._keep:
            self._keep_big(held)
        return held

    def _keep_big(self, data: bytes) -> None:
        if self._big_tail is None:
            self._big_tail = Tail()
        if len(self._big_head) < TAIL_BYTES:
            self._big_head += data[: TAIL_BYTES - len(self._big_head)]
        self._big_tail.add(data)

    @property
    def skipping(self) -> bool:
        """Inside an event too long to hold, not yet ended."""
        return self._skipping

    @property
    def pending(self) -> bytes:
        return b"".join(self._parts)


_BOUNDARY = re.compile(rb"\r?\n\r?\n")


def split_events(complete: bytes) -> list[bytes]:
    """The events of complete SSE bytes (``SSEEvents.cut``), without their
    boundaries."""
    return _BOUNDARY.split(complete)[:-1]


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
        events = split_events(complete)
        if skip:
            events = events[1:]  # the end of an event whose start was dropped
        found = []
        for ev in events:
            if not any(m in ev for m in markers):
                continue
            try:
                obj = safejson.loads(event_data(ev))
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
        k = self._overlap
        if not k:
            self.count += sum(chunk.count(n) for n in self._needles)
            return
        carry, head = self._carry, chunk[:k]
        joint = carry + head  # a few bytes: the chunk itself is not copied
        # Wholly in the chunk, plus those across the joint (what lies wholly
        # in the carry was counted with the previous chunk).
        self.count += sum(chunk.count(n) + joint.count(n) - carry.count(n) - head.count(n) for n in self._needles)
        self._carry = (carry + chunk[-k:])[-k:]


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
