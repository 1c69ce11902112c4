"""Inserting usage rows: the statements shared by the usage writer and spool
recovery (one module below both, so neither imports the other)."""

from __future__ import annotations

import functools
import math
import sqlite3
import time
from collections.abc import Sequence
from itertools import chain
from typing import Any

from . import rollup
from .columns import COLUMNS

Row = tuple[Any, ...]
# Values of the columns added after the first release, in COLUMNS order: a
# spool file written by an older version holds rows without them.
_LATER_DEFAULTS: dict[str, Any] = {"cache_write_tokens": 0, "cache_write_1h_tokens": 0, "response_id": None}


def pad_row(values: list[Any]) -> Row:
    """A spooled row as a full row: trailing columns it predates get their defaults."""
    missing = COLUMNS[len(values):]
    return (*values, *(_LATER_DEFAULTS.get(c) for c in missing))
# What each column may hold: the writer checks rows against this only when
# a batch fails (never on the request path), to tell a row no database can
# take (a bug upstream of the writer) from a database that is unavailable.
_REQUIRED_STR = ("request_id", "endpoint")
_OPTIONAL_STR = ("model", "upstream", "error_type", "response_id")
_OPTIONAL_ID = ("workspace_id", "key_id")
_REAL = ("ts", "cost", "latency_ms")
_OPTIONAL_REAL = ("ttfb_ms", "upstream_ms", "overhead_ms")
_INT_MAX = 2**63 - 1
INVALID = "usage_row_invalid"


def _int_ok(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -_INT_MAX <= v <= _INT_MAX


def _real_ok(v: Any) -> bool:
    return (isinstance(v, float) and math.isfinite(v)) or _int_ok(v)


def _valid(column: str, v: Any) -> bool:
    if column in _REQUIRED_STR:
        return isinstance(v, str)
    if column in _OPTIONAL_STR:
        return v is None or isinstance(v, str)
    if column in _OPTIONAL_ID:
        return v is None or _int_ok(v)
    if column in _REAL:
        return _real_ok(v)
    if column in _OPTIONAL_REAL:
        return v is None or _real_ok(v)
    return _int_ok(v)  # counts, status, stream flag


def _cleared(column: str) -> Any:
    if column in _REQUIRED_STR:
        return ""
    if column in _OPTIONAL_STR or column in _OPTIONAL_ID or column in _OPTIONAL_REAL:
        return None
    return 0.0 if column in _REAL else 0


def clean_row(row: Row) -> Row | None:
    """None if every value of ``row`` fits its column; otherwise the row
    with the values that do not cleared (0, null or empty) and its
    error_type set to ``usage_row_invalid``, so the request keeps its one
    row and the batch it is in can be written."""
    if len(row) == len(COLUMNS) and all(_valid(c, v) for c, v in zip(COLUMNS, row, strict=True)):
        return None
    full = pad_row(list(row[:len(COLUMNS)]))
    values = {c: (v if _valid(c, v) else _cleared(c)) for c, v in zip(COLUMNS, full, strict=True)}
    if values["ts"] == 0.0:
        values["ts"] = time.time()
    values["error_type"] = INVALID
    return tuple(values[c] for c in COLUMNS)


INSERT = f"INSERT INTO usage_events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
# Rows per multi-row INSERT (fewer if SQLite allows fewer parameters).
CHUNK = 256


@functools.cache
def _insert_many(n: int) -> str:
    """INSERT of ``n`` rows, each the usage columns plus the writer column."""
    row = f"({', '.join('?' * (len(COLUMNS) + 1))})"
    return f"INSERT INTO usage_events ({', '.join(COLUMNS)}, writer) VALUES {', '.join([row] * n)}"


def insert_rows(conn: sqlite3.Connection, rows: Sequence[Row], writer: int | None = None) -> None:
    """Insert usage rows (``writer`` in their writer column) and add them to
    the rollups, inside the caller's transaction.

    A few statements per batch, not one per row: each statement binds its
    rows in one call and runs with the GIL released, so a batch written on
    the writer thread takes the GIL a handful of times instead of twice per
    row, which would stall the event loop's thread at every row.
    """
    since = conn.execute("SELECT COALESCE(MAX(id), 0) FROM usage_events").fetchone()[0]
    width = len(COLUMNS) + 1
    chunk = max(1, min(CHUNK, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width))
    w = (writer,)
    i, n = 0, len(rows)
    while i < n:
        # Full chunks, then powers of two: a few statement shapes to cache.
        size = chunk if n - i >= chunk else 1 << ((n - i).bit_length() - 1)
        conn.execute(_insert_many(size), list(chain.from_iterable(tuple(r) + w for r in rows[i:i + size])))
        i += size
    rollup.add_since(conn, since)
