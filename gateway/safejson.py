"""JSON parsing that a client cannot fool: orjson's speed, checked.

orjson keeps the object keys it decodes (up to 64 bytes) in a process-wide
cache of 2,048 slots and finds a key there by its 64-bit xxh3 hash alone,
never comparing the text. xxh3 has no secret, and keys that collide with a
given one are cheap to compute (a few seconds of CPU for 64-byte keys). So
with orjson alone:

- ``{"model": "a", "<K>": "b"}``, ``K`` a key that collides with "model",
  parses as ``{"model": "b"}`` once "model" is cached (every request
  caches it): the gateway routes and bills ``b`` while the upstream reads
  ``a`` and an unknown key.
- A key that lands in "model"'s slot, then ``K`` itself, make every later
  "model" in the process parse as ``K``: every tenant's requests fail, and
  the same done to a usage key ("prompt_tokens") would read every answer
  as free.

``loads`` therefore writes what orjson parsed back out (orjson.dumps keeps
no such cache) and compares: equal bytes mean the object is what the text
says. Coding agents, the official SDKs and the providers' answers write
JSON as orjson does, so that costs a dumps and a memcmp (7 us for a 49 KB
Claude Code request, whose parse is 44 us). Anything else (spaces, ASCII
escapes, a poisoned cache) is parsed again by the standard library's json,
whose key memo compares the text: 1.5-2x orjson's time, on those bodies
only. Nothing in the gateway calls orjson.loads but this module
(tests/test_safejson.py checks)."""

from __future__ import annotations

import json
from typing import Any

import orjson


class TooDeep(orjson.JSONDecodeError):
    """Nested deeper than orjson writes (255 levels; it reads 1,024): the
    gateway could not write such a body again (for another model name, a
    translation), so it takes none."""


def _int(text: str) -> int | float:
    """An integer as orjson reads it: beyond 64 bits, a float (which orjson
    can write again; it cannot write such an int)."""
    n = int(text)
    return n if -(2**63) <= n < 2**64 else float(text)


def parse(raw: bytes) -> tuple[Any, bytes | None]:
    """The JSON value of ``raw``, and ``raw`` itself when it is orjson's
    own spelling of that value, else None. Invalid JSON (as orjson judges
    it: strict RFC 8259) raises orjson.JSONDecodeError (TooDeep for one
    nested too deeply)."""
    obj = orjson.loads(raw)
    try:
        if orjson.dumps(obj) == raw:
            return obj, raw
    except orjson.JSONEncodeError:
        raise TooDeep("nested too deeply", "", 0) from None
    try:
        return json.loads(raw, parse_int=_int), None
    except RecursionError:  # not expected: json's decoder goes about 1,000 levels deep
        raise TooDeep("nested too deeply", "", 0) from None
    except ValueError as e:  # not expected: orjson, stricter, took it
        raise orjson.JSONDecodeError(type(e).__name__, "", 0) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_uncached(raw: bytes) -> Any:
    """The JSON value of ``raw`` parsed without orjson, whose cache a body
    fills: for bodies anyone may send without a key (the console's sign-in,
    sign-up and invitations), so that they cannot slow every later parse
    of the process down (module docstring). As strict as orjson: NaN and
    Infinity, and what orjson cannot write (a lone surrogate, an integer
    beyond 64 bits, nesting beyond 255 levels), are invalid JSON."""
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
        orjson.dumps(obj)
    except (ValueError, RecursionError, orjson.JSONEncodeError) as e:
        raise orjson.JSONDecodeError(type(e).__name__, "", 0) from None
    return obj


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """``orjson.loads``, checked (see the module docstring)."""
    return parse(raw if isinstance(raw, bytes) else raw.encode() if isinstance(raw, str) else bytes(raw))[0]
