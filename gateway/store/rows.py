"""Inserting usage rows: the statements shared by the usage writer and spool
recovery (one module below both, so neither imports the other)."""

from __future__ import annotations

import functools
import sqlite3
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
