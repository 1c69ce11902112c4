"""Usage rows on PostgreSQL: batches by COPY, rollups per batch, day
partitions, spool recovery and retention.

One batch is one transaction on the writer's own connection:

1. ``COPY`` the rows (binary, ``copy_records_to_table``) into a temporary
   table ``usage_batch`` (``ON COMMIT DELETE ROWS``);
2. ``INSERT INTO usage_events SELECT * FROM usage_batch``: one set-based
   statement into the day partitions;
3. add the batch to the rollups, reading ``usage_batch`` (never the big
   table), each upsert ordered by its conflict key so two instances
   updating the same rollup rows lock them in the same order and never
   deadlock;
4. record the spool offset just past the batch's last row, and check it
   first: a batch whose COMMIT was lost with the connection (committed or
   not, the client cannot know) is retried, finds its offset already
   stored, and is skipped. Spooled rows are therefore written exactly once
   even across a PostgreSQL restart.

Partitions (``usage_events_pYYYYMMDD``, UTC days) are created ahead of time
(today-1 .. today+2, at start and on every retention pass) and on demand
for a batch that holds an older or newer day, each time under an advisory
lock and in a transaction of its own, so the DDL's lock on the parent is
held for milliseconds. Retention detaches (CONCURRENTLY: writers are not
blocked) and drops whole partitions: a day of rows goes in one statement,
whatever its size; rows are kept until their whole UTC day is past the
cutoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .. import rollup
from ..columns import COLUMNS
from ..rows import Row
from ..spool import dead_files, read_rows, recovered
from .schema import PARTITION_LOCK

log = logging.getLogger("gateway.usage")

# A connection of its own or one borrowed from the pool.
Conn = asyncpg.Connection | PoolConnectionProxy

DAY = 86400
STAGE = "usage_batch"
WRITE_COLUMNS = (*COLUMNS, "writer")
_PART = re.compile(r"^usage_events_p(\d{8})$")

CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} (LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
SET_RECOVERED = (
    'INSERT INTO usage_spool (name, "offset", recovered) VALUES ($1, $2, 1) '
    'ON CONFLICT (name) DO UPDATE SET "offset" = excluded."offset", recovered = 1'
)
SET_OFFSET = (
    'INSERT INTO usage_spool (name, "offset") VALUES ($1, $2) '
    'ON CONFLICT (name) DO UPDATE SET "offset" = GREATEST(usage_spool."offset", excluded."offset")'
)


ROLLUPS: tuple[str, ...] = (
    rollup.fill_sql("usage_minute", rollup.MINUTE_KEYS, 60, source=STAGE, upsert=True, postgres=True),
    rollup.fill_sql("usage_hour", rollup.HOUR_KEYS, 3600, source=STAGE, upsert=True, postgres=True),
    "INSERT INTO usage_key_totals (key_id, requests, input_tokens, output_tokens, cost, last_used) "
    f"SELECT key_id, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost), MAX(ts) FROM {STAGE} "
    "WHERE key_id IS NOT NULL GROUP BY key_id ORDER BY key_id ON CONFLICT (key_id) DO UPDATE SET "
    "requests = usage_key_totals.requests + excluded.requests, "
    "input_tokens = usage_key_totals.input_tokens + excluded.input_tokens, "
    "output_tokens = usage_key_totals.output_tokens + excluded.output_tokens, "
    "cost = usage_key_totals.cost + excluded.cost, "
    "last_used = GREATEST(COALESCE(usage_key_totals.last_used, 0), excluded.last_used)",
)


def partition_name(day: int) -> str:
    return "usage_events_p" + datetime.fromtimestamp(day * DAY, UTC).strftime("%Y%m%d")


def partition_day(name: str) -> int | None:
    m = _PART.match(name)
    if m is None:
        return None
    return int(datetime.strptime(m[1], "%Y%m%d").replace(tzinfo=UTC).timestamp()) // DAY


async def ensure_partitions(conn: Conn, days: Iterable[int]) -> None:
    """Create the day partitions that do not exist yet (one short
    transaction under the partition lock)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK)
        for day in sorted(set(days)):
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF usage_events "
                f"FOR VALUES FROM ({day * DAY}) TO ({(day + 1) * DAY})"
            )


async def partitions(conn: Conn) -> dict[int, str]:
    """The usage partitions that exist, by day."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'usage_events'::regclass"
    )
    out = {}
    for r in rows:
        day = partition_day(r["relname"])
        if day is not None:
            out[day] = r["relname"]
    return out


async def ahead(conn: Conn, now: float | None = None) -> None:
    """Partitions for yesterday through the day after tomorrow."""
    today = int((time.time() if now is None else now) // DAY)
    await ensure_partitions(conn, range(today - 1, today + 3))


async def drop_older_than(conn: Conn, cutoff: float) -> int:
    """Drop every partition whose whole day is before ``cutoff``; returns how
    many were dropped."""
    n = 0
    for day, name in sorted((await partitions(conn)).items()):
        if (day + 1) * DAY > cutoff:
            continue
        await conn.execute(f"ALTER TABLE usage_events DETACH PARTITION {name} CONCURRENTLY")
        await conn.execute(f"DROP TABLE {name}")
        n += 1
    return n


class BatchWriter:
    """Writes usage batches on one connection of its own (see the module
    docstring); reconnects after any error, the caller retries the batch."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: Conn | None = None
        self._days: set[int] = set()
        # One statement at a time on the connection, in call order: the
        # writer's loop and its close() may both flush (SQLite's single
        # writer thread gives the same order).
        self._lock = asyncio.Lock()

    async def _connection(self) -> Conn:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(self._url, timeout=10)
            try:
                await conn.execute(CREATE_STAGE)
                await ahead(conn)
                self._days = set(await partitions(conn))
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def write(self, batch: Sequence[Row], writer: int | None, mark: tuple[str, int] | None = None,
                    retired: Sequence[str] = ()) -> bool:
        """Write one batch (one transaction). False if the batch's spool
        mark shows it was committed already (a retry after a lost COMMIT)."""
        async with self._lock:
            try:
                conn = await self._connection()
                return await write_batch(conn, batch, writer, mark, retired, self._days)
            except BaseException:
                await self._drop()
                raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
            if not conn.is_closed():
                conn.terminate()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


async def write_batch(
    conn: Conn, batch: Sequence[Row], writer: int | None, mark: tuple[str, int] | None,
    retired: Sequence[str], known_days: set[int], *, with_ids: bool = False,
) -> bool:
    """One batch in one transaction (see the module docstring). With
    ``with_ids`` the rows carry their own id first and writer last (an
    import), else they are usage rows and get ``writer``."""
    ts = 1 if with_ids else 0
    days = {int(r[ts] // DAY) for r in batch} - known_days
    if days:
        await ensure_partitions(conn, days)
        known_days |= days
    async with conn.transaction():
        if mark is not None:
            stored = await conn.fetchval(
                'SELECT "offset" FROM usage_spool WHERE name = $1 FOR UPDATE', mark[0]
            )
            if stored is not None and stored >= mark[1]:
                return False
        if batch:
            if with_ids:
                await conn.copy_records_to_table(STAGE, records=batch, columns=("id", *WRITE_COLUMNS))
            else:
                await conn.copy_records_to_table(STAGE, records=[(*r, writer) for r in batch], columns=WRITE_COLUMNS)
            await conn.execute(f"INSERT INTO usage_events SELECT * FROM {STAGE}")
            for sql in ROLLUPS:
                await conn.execute(sql)
        if mark is not None:
            await conn.execute(SET_OFFSET, *mark)
        if retired:
            await conn.execute("DELETE FROM usage_spool WHERE name = ANY($1::text[])", list(retired))
    return True


async def recover(conn: Conn, directory: Path) -> int:
    """The spool recovery of gateway.store.spool on PostgreSQL: each dead
    process's file is written from its stored offset, exactly once. The file
    lock keeps a live writer's file out; an advisory lock on the file's name
    and the offset read under it keep two recovering processes from both
    writing it."""
    if not directory.is_dir():
        return 0
    await conn.execute(CREATE_STAGE)
    days = set(await partitions(conn))
    total = 0
    for path, data in dead_files(directory):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", path.name)
            row = await conn.fetchrow('SELECT "offset", recovered FROM usage_spool WHERE name = $1', path.name)
            # A file recovered before (then a crash before it was deleted)
            # adds nothing: its unfinished requests are rows already.
            rows, lost = ([], 0) if row and row["recovered"] else read_rows(data, row["offset"] if row else 0)
            await write_batch(conn, rows, None, None, (), days)
            await conn.execute(SET_RECOVERED, path.name, len(data))
        total += len(rows)
        recovered(path, len(rows), lost)
        await conn.execute("DELETE FROM usage_spool WHERE name = $1", path.name)
    names = [r["name"] for r in await conn.fetch("SELECT name FROM usage_spool")]
    gone = [n for n in names if not (directory / n).exists()]
    if gone:
        await conn.execute("DELETE FROM usage_spool WHERE name = ANY($1::text[])", gone)
    return total

