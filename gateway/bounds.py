"""Bounds on client-chosen text that the gateway stores, logs or echoes.

Whatever a client chooses that ends up in a usage row, a log line or an
error message goes through here first: cut to a fixed length, control and
other unprintable characters replaced, so a hostile client can neither fill
the database nor forge a log line. Cheap on the usual input (a length check
and ``str.isprintable``, both in C).
"""

from __future__ import annotations

import re

# x-request-id: kept when it looks like an id (uuid, hex, base64, ulid, a
# dotted trace id), else replaced by the gateway's own.
REQUEST_ID_MAX = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# Model names and other client text stored in a usage row.
STORED_MAX = 200
# Client text quoted in an error message or a log line (paths, names).
SHOWN_MAX = 160


def request_id(value: str | None) -> str | None:
    """The client's request id if it is a plausible one, else None."""
    if value and len(value) <= REQUEST_ID_MAX and _REQUEST_ID.fullmatch(value):
        return value
    return None


def bounded(value: str, limit: int = STORED_MAX) -> str:
    """``value`` cut to ``limit`` characters (a cut one ends in ``...``),
    with every unprintable character (controls, line breaks, lone
    surrogates from undecodable bytes) replaced by U+FFFD."""
    if len(value) <= limit and value.isprintable():
        return value
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    return "".join(c if c.isprintable() else "\ufffd" for c in value)


def shown(value: str) -> str:
    """Client text as quoted in an error message or a log line."""
    return bounded(value, SHOWN_MAX)
