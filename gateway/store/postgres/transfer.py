"""Moving an SQLite installation to PostgreSQL (``gateway import``), and
usage rows out of either (``gateway export-usage``).

The import copies every table the gateway keeps (but console sessions and
other passing state: ``TABLES``), ids included (keys keep their hashes, so
every key keeps working; users their password hashes, so everyone signs in
as before; usage rows keep their ids, so an export and an import can be
compared row by row), in one transaction: it lands whole or not at all. Usage rows go by COPY in batches through the
same staging path as the live writer, so the rollups are built as they
arrive. It refuses a target that already holds usage rows, so running it
twice cannot double anything. At the end it counts: the rows in the
target must equal the rows read, or nothing is committed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from ... import safejson
from ..columns import COLUMNS
from ..schema import connect as sqlite_connect
from ..tasks import _COLUMNS as TASK_COLUMNS
from . import usage

BATCH = 5000
# In an order that meets every foreign key. Not copied: console sessions
# (everyone signs in again on the new database: a session id copied is one
# more place it lives), failed sign-ins (they expire within minutes), the
# rollups (built again from the usage rows), the SQLite spool marks.
TABLES = (
    ("workspaces", ("id", "name", "default_group", "allowed_models", "monthly_spend_limit", "monthly_token_limit",
                    "created_at")),
    ("users", ("id", "email", "name", "password_hash", "is_admin", "disabled_at", "created_at", "last_login_at")),
    ("api_keys", ("id", "workspace_id", "name", "prefix", "key_hash", "group_name", "allowed_models", "rpm", "tpm",
                  "max_concurrency", "spend_limit", "expires_at", "revoked_at", "created_at", "user_id")),
    ("memberships", ("user_id", "workspace_id", "role", "created_at")),
    ("invitations", ("id", "token_hash", "email", "workspace_id", "role", "invited_by", "created_at", "expires_at",
                     "accepted_at", "revoked_at")),
    ("audit_log", ("id", "ts", "actor_user_id", "actor", "address", "action", "target_type", "target_id",
                   "workspace_id", "before", "after")),
    ("video_tasks", tuple(c.strip() for c in TASK_COLUMNS.split(","))),
    ("asset_groups", ("id", "upstream", "workspace_id", "platform", "created_at")),
    ("assets", ("id", "upstream", "workspace_id", "platform", "group_id", "created_at")),
)
USAGE_COLUMNS = ("id", *COLUMNS, "writer")


class TransferError(RuntimeError):
    """The import was refused or did not add up; nothing was committed."""


def usage_batches(conn: sqlite3.Connection, columns: Sequence[str] = USAGE_COLUMNS) -> Iterator[list[tuple[Any, ...]]]:
    """Every usage row of an SQLite database, in id order, ``BATCH`` at a time."""
    last = 0
    while True:
        rows = conn.execute(
            f"SELECT {', '.join(columns)} FROM usage_events WHERE id > ? ORDER BY id LIMIT ?", (last, BATCH)
        ).fetchall()
        if not rows:
            return
        yield [tuple(r) for r in rows]
        last = rows[-1][0]


async def import_sqlite(conn: asyncpg.Connection, path: Path) -> dict[str, int]:
    """Copy the SQLite database at ``path`` into the (migrated) PostgreSQL
    database on ``conn``; returns the rows copied per table."""
    src = sqlite_connect(path)
    try:
        return await _import(conn, src)
    finally:
        src.close()


async def _import(conn: asyncpg.Connection, src: sqlite3.Connection) -> dict[str, int]:
    counts: dict[str, int] = {}
    await conn.execute(usage.CREATE_STAGE)
    days = [int(d) for (d,) in src.execute("SELECT DISTINCT CAST(ts / 86400 AS INTEGER) FROM usage_events")]
    await usage.ensure_partitions(conn, days)
    known = set(await usage.partitions(conn))
    async with conn.transaction():
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM usage_events)"):
            raise TransferError("the target database already holds usage rows: import into an empty one")
        for table, columns in TABLES:
            rows = [tuple(r) for r in src.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY rowid")]
            if rows:
                try:
                    await conn.copy_records_to_table(table, records=rows, columns=columns)
                except asyncpg.IntegrityConstraintViolationError as e:
                    # Emails are unique whatever their case on PostgreSQL only.
                    raise TransferError(f"{table}: {e.__class__.__name__}: {e.detail or e}; nothing committed"
                                        ) from None
            counts[table] = len(rows)
        n = 0
        for batch in usage_batches(src):
            await usage.write_batch(conn, batch, None, None, (), known, with_ids=True)
            n += len(batch)
        counts["usage_events"] = n
        want = src.execute("SELECT COUNT(*) FROM usage_events").fetchone()[0]
        have = await conn.fetchval("SELECT COUNT(*) FROM usage_events")
        if have != want or n != want:
            raise TransferError(f"usage rows do not add up: {want} in the source, {have} written; nothing committed")
        # Sequences past the copied ids, so new rows never reuse one.
        for table in ("workspaces", "api_keys", "users", "invitations", "audit_log"):
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), GREATEST((SELECT MAX(id) FROM {table}), 1))"
            )
        await conn.execute("SELECT setval('usage_events_id_seq', GREATEST((SELECT MAX(id) FROM usage_events), 1))")
    return counts


def export_lines(rows: Sequence[dict[str, Any]]) -> bytes:
    """Usage rows as ``gateway export-usage`` writes them: one JSON object a line."""
    return b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows)


def read_export(path: Path) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of an ``export-usage`` file, ``BATCH`` at a time, as
    (id, usage columns..., writer) tuples."""
    batch: list[tuple[Any, ...]] = []
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            d = safejson.loads(line)
            batch.append(tuple(d.get(c) for c in USAGE_COLUMNS))
            if len(batch) >= BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


async def import_export(conn: asyncpg.Connection, path: Path) -> int:
    """Load an ``export-usage`` file into an empty PostgreSQL usage table
    (one transaction; the count must match the file's)."""
    await conn.execute(usage.CREATE_STAGE)
    known = set(await usage.partitions(conn))
    n = 0
    async with conn.transaction():
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM usage_events)"):
            raise TransferError("the target database already holds usage rows: import into an empty one")
        for batch in read_export(path):
            await usage.write_batch(conn, batch, None, None, (), known, with_ids=True)
            n += len(batch)
        have = await conn.fetchval("SELECT COUNT(*) FROM usage_events")
        if have != n:
            raise TransferError(f"usage rows do not add up: {n} in the file, {have} written; nothing committed")
        await conn.execute("SELECT setval('usage_events_id_seq', GREATEST((SELECT MAX(id) FROM usage_events), 1))")
    return n


def is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00"
