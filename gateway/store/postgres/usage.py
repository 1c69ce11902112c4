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
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from .. import rollup
from ..columns import COLUMNS
from ..rows import Row, pad_row
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
SET_OFFSET = (
    'INSERT INTO usage_spool (name, "offset") VALUES ($1, $2) '
    'ON CONFLICT (name) DO UPDATE SET "offset" = GREATEST(usage_spool."offset", excluded."offset")'
)


def _fill(name: str, keys: tuple[str, ...], size: int) -> str:
    """Add the staged batch to one rollup (PostgreSQL's spelling of
    gateway.store.rollup's fill: the same bins, sums and keys)."""
    key_exprs = {
        "bucket": f"(floor(ts / {size}) * {size})::bigint",
        "model": "COALESCE(model, '')",
        "upstream": "COALESCE(upstream, '')",
        "workspace_id": "COALESCE(workspace_id, 0)",
        "key_id": "COALESCE(key_id, 0)",
    }
    k_sel = ", ".join(f"{key_exprs[k]} AS {k}" for k in keys)
    k_list = ", ".join(keys)
    sums = [
        "COUNT(*)", "COUNT(*) FILTER (WHERE status BETWEEN 400 AND 499)", "COUNT(*) FILTER (WHERE status >= 500)",
        "SUM(input_tokens)", "SUM(output_tokens)", "SUM(cached_tokens)", "SUM(reasoning_tokens)", "SUM(images)",
        "SUM(video_tokens)", "SUM(cost)", "SUM(latency_ms)", "COALESCE(SUM(ttfb_ms), 0)", "COUNT(ttfb_ms)",
    ]
    sum_sel = ", ".join(f"{expr} AS {col}" for expr, col in zip(sums, rollup.SUMS, strict=True))

    def pivot(alias: str, col: str, names: tuple[str, ...], where: str) -> str:
        cols = ", ".join(f"SUM(CASE WHEN b = {i} THEN n ELSE 0 END) AS {c}" for i, c in enumerate(names))
        return (f"{alias} AS (SELECT {k_list}, {cols} FROM (SELECT {k_sel}, {rollup.bin_case(col)} AS b, "
                f"COUNT(*) AS n FROM {STAGE} {where} GROUP BY {k_list}, b) x GROUP BY {k_list})")

    join = " AND ".join(f"{{a}}.{k} = s.{k}" for k in keys)
    hist = [f"COALESCE(lp.{c}, 0)" for c in rollup.LAT_COLS] + [f"COALESCE(tp.{c}, 0)" for c in rollup.TTFB_COLS]
    return (
        f"INSERT INTO {name} ({', '.join(keys + rollup.VALUE_COLS)})\n"
        f"WITH s AS (SELECT {k_sel}, {sum_sel} FROM {STAGE} GROUP BY {k_list}),\n"
        f"{pivot('lp', 'latency_ms', rollup.LAT_COLS, '')},\n"
        f"{pivot('tp', 'ttfb_ms', rollup.TTFB_COLS, 'WHERE ttfb_ms IS NOT NULL')}\n"
        f"SELECT {', '.join('s.' + k for k in keys)}, {', '.join('s.' + c for c in rollup.SUMS)}, {', '.join(hist)}\n"
        f"FROM s LEFT JOIN lp ON {join.format(a='lp')} LEFT JOIN tp ON {join.format(a='tp')}\n"
        f"ORDER BY {', '.join('s.' + k for k in keys)}\n"
        f"ON CONFLICT ({k_list}) DO UPDATE SET "
        + ", ".join(f"{c} = {name}.{c} + excluded.{c}" for c in rollup.VALUE_COLS)
    )


ROLLUPS: tuple[str, ...] = (
    _fill("usage_minute", rollup.MINUTE_KEYS, 60),
    _fill("usage_hour", rollup.HOUR_KEYS, 3600),
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
    for path in sorted(directory.glob("*.rows")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", path.name)
                offset = await conn.fetchval('SELECT "offset" FROM usage_spool WHERE name = $1', path.name) or 0
                rows = [pad_row(orjson.loads(line)) for line in data[offset:end].splitlines() if line]
                await write_batch(conn, rows, None, (path.name, max(end, offset)), (), days)
            total += len(rows)
            if rows:
                log.warning("usage spool %s: recovered %d rows of a stopped process", path.name, len(rows))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            await conn.execute("DELETE FROM usage_spool WHERE name = $1", path.name)
        finally:
            os.close(fd)
    names = [r["name"] for r in await conn.fetch("SELECT name FROM usage_spool")]
    gone = [n for n in names if not (directory / n).exists()]
    if gone:
        await conn.execute("DELETE FROM usage_spool WHERE name = ANY($1::text[])", gone)
    return total

