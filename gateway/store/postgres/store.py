"""PgStore: the Store protocol on PostgreSQL (asyncpg, one pool per
process). Workspaces, keys, console accounts and the audit log run the SQL
shared with SQLite (gateway.store.catalog, users, audit through ``run``),
as do the read side's series and request log (gateway.store.analytics);
usage writing, retention and the task store are PostgreSQL's own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from .. import analytics, origins
from ..base import BatchSink, MonthTotals, QuotaDelta
from ..dbfile import DatabaseFile
from ..queries import LIVE_KEYS, USAGE_GROUPS
from ..sql import numbered
from ..tx import Body
from . import usage
from .schema import CONFIG_CHANNEL, KEYS_CHANNEL, migrate
from .tasks import PgTaskStore
from .tx import run_pg

log = logging.getLogger("gateway.store")

T = TypeVar("T")


class PgStore:
    """See the module docstring; ``open`` migrates the schema first."""

    kind = "postgres"
    ordered_ids = False
    db_file: DatabaseFile | None = None  # no local file to lose

    def __init__(self, url: str, pool: asyncpg.Pool) -> None:
        self.url = url
        self.pool = pool

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 4) -> PgStore:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await migrate(conn)
            await usage.ahead(conn)
        finally:
            await conn.close()
        pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size, timeout=10, command_timeout=60)
        return cls(url, pool)

    async def close(self) -> None:
        await self.pool.close()

    async def run(self, body: Body[T], *, write: bool = False) -> T:
        async with self.pool.acquire() as conn:
            return await run_pg(conn, body, write=write)

    # ------------------------------------------------------------ the key cache

    async def keys_generation(self) -> int:
        return int(await self.pool.fetchval("SELECT value FROM meta WHERE name = 'keys_generation'") or 0)

    async def live_keys(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.pool.fetch(LIVE_KEYS)]

    async def fetch_key(self, key_hash: str) -> tuple[int, tuple[Any, ...] | None]:
        # One statement: the generation is read in the same snapshot as the row.
        row = await self.pool.fetchrow(
            f"SELECT g.value AS generation, k.* FROM (SELECT value FROM meta WHERE name = 'keys_generation') g "
            f"LEFT JOIN ({LIVE_KEYS} AND k.key_hash = $1) k ON true", key_hash,
        )
        assert row is not None
        values = tuple(row)
        return int(values[0]), (values[1:] if values[1] is not None else None)

    # ------------------------------------------------------------ usage

    def batch_sink(self) -> BatchSink:
        return usage.BatchWriter(self.url)

    async def recover_spools(self, directory: Path) -> int:
        async with self.pool.acquire() as conn:
            n = await usage.recover(conn, directory)
            # The temporary staging table lives as long as the connection:
            # drop it so the pooled connection comes back as it was.
            await conn.execute(f"DROP TABLE IF EXISTS {usage.STAGE}")
            return n

    async def retention(self, cutoff: float, stop: Callable[[], bool] = lambda: False) -> int:
        async with self.pool.acquire() as conn:
            await usage.ahead(conn)
            return await usage.drop_older_than(conn, cutoff)

    async def quota_since(self, seen_id: int, start: float, writer: int) -> QuotaDelta | None:
        return None

    async def quota_load(self, start: float) -> tuple[int, MonthTotals]:
        return 0, await self._month_totals(start)

    async def _month_totals(self, start: float) -> MonthTotals:
        # From the hourly rollup: every instance's committed rows, whatever
        # their ids (which do not grow in commit order here).
        rows = await self.pool.fetch(
            "SELECT key_id, workspace_id, SUM(cost) AS cost, SUM(input_tokens + output_tokens) AS tokens "
            "FROM usage_hour WHERE bucket >= $1 GROUP BY key_id, workspace_id", int(start // 3600) * 3600,
        )
        keys: dict[int, float] = {}
        workspaces: dict[int, tuple[float, int]] = {}
        for r in rows:
            cost, tokens = float(r["cost"] or 0.0), int(r["tokens"] or 0)
            if r["key_id"]:
                keys[r["key_id"]] = keys.get(r["key_id"], 0.0) + cost
            if r["workspace_id"]:
                s, t = workspaces.get(r["workspace_id"], (0.0, 0))
                workspaces[r["workspace_id"]] = (s + cost, t + tokens)
        return keys, workspaces

    async def usage_summary(self, *, since: float = 0.0, by: str = "model") -> list[dict[str, Any]]:
        col = USAGE_GROUPS[by]
        rows = await self.pool.fetch(
            f"""SELECT {col} AS "{by}", COUNT(*) AS requests,
                    COUNT(*) FILTER (WHERE status >= 400) AS errors,
                    SUM(input_tokens)::bigint AS input_tokens, SUM(output_tokens)::bigint AS output_tokens,
                    SUM(cached_tokens)::bigint AS cached_tokens, SUM(reasoning_tokens)::bigint AS reasoning_tokens,
                    SUM(images)::bigint AS images, SUM(video_tokens)::bigint AS video_tokens,
                    ROUND(SUM(cost)::numeric, 6)::float8 AS cost,
                    ROUND(AVG(latency_ms)::numeric, 3)::float8 AS avg_latency_ms
                FROM usage_events WHERE ts >= $1 GROUP BY {col} ORDER BY requests DESC""",
            since,
        )
        return [dict(r) for r in rows]

    async def usage_series(self, *, by: str | None = None, **kw: Any) -> list[dict[str, Any]]:
        sql, args = analytics.series_query(by=by, **kw)
        # The upper bound compares with BIGINT buckets: an integer (asyncpg
        # binds by the column's type), infinity as the largest one.
        args[1] = 2**62 if args[1] == float("inf") else math.ceil(args[1])
        return analytics.series_items(_ints(await self.pool.fetch(numbered(sql), *args)), by)

    async def request_log(self, *, limit: int = 50, **kw: Any) -> dict[str, Any]:
        sql, args = analytics.log_query(limit=limit, **kw)
        rows = await self.pool.fetch(numbered(sql), *args)
        return analytics.log_page([dict(r) for r in rows], limit)

    async def upstream_stats(self, *, since: float) -> dict[str, dict[str, Any]]:
        series = await self.usage_series(since=since, until=float("inf"), bucket="total", by="upstream")
        rows = await self.pool.fetch(numbered(analytics.UPSTREAM_LAST), int(since // 60) * 60)
        return analytics.upstream_summary(series, {r[0]: r[1] for r in rows})

    async def usage_rows(self, *, after_id: int = 0, limit: int = 10000) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("SELECT * FROM usage_events WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit)
        return [dict(r) for r in rows]

    async def find_origin(self, response_id: str) -> tuple[int | None, str | None, str | None] | None:
        row = await self.pool.fetchrow(numbered(origins.FIND), response_id)
        return None if row is None else (row[0], row[1], row[2])

    # ------------------------------------------------------------ tasks

    async def task_store(self) -> PgTaskStore:
        return PgTaskStore(self.pool)

    # ------------------------------------------------------------ notices

    async def listen(
        self, on_keys: Callable[[], None], on_config: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]] | None:
        """LISTEN on a connection of its own; returns how to stop. A lost
        connection is re-established by ``keep_listening`` (the periodic
        refresh covers the gap)."""
        listener = _Listener(self.url, {KEYS_CHANNEL: lambda _: on_keys(), CONFIG_CHANNEL: on_config}, on_keys)
        await listener.start()
        return listener.stop

    async def announce_config(self, origin: str) -> None:
        await self.pool.execute("SELECT pg_notify($1, $2)", CONFIG_CHANNEL, origin)


class _Listener:
    def __init__(self, url: str, channels: Mapping[str, Callable[[str], None]], missed: Callable[[], None]) -> None:
        self.url = url
        self.channels = channels
        self.missed = missed
        self.conn: asyncpg.Connection | None = None
        self.task: asyncio.Task[None] | None = None

    def _handler(self, callback: Callable[[str], None]) -> Callable[..., None]:
        def on_notice(conn: object, pid: int, channel: str, payload: str) -> None:
            callback(payload)

        return on_notice

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.url, timeout=10)
        for channel, callback in self.channels.items():
            await conn.add_listener(channel, self._handler(callback))
        self.conn = conn

    async def start(self) -> None:
        await self._connect()
        self.task = asyncio.create_task(self._watch(), name="pg-listen")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.conn is not None and not self.conn.is_closed():
                continue
            try:
                await self._connect()
                self.missed()  # key changes made while not listening
                log.info("listening for key and config changes again")
            except (OSError, asyncpg.PostgresError, TimeoutError) as e:
                log.warning("cannot listen for key changes yet: %s", type(e).__name__)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close(timeout=2)


def _ints(rows: Sequence[asyncpg.Record]) -> list[tuple[Any, ...]]:
    # SUM over BIGINT is NUMERIC in PostgreSQL: back to int, as SQLite gives.
    return [tuple(int(v) if isinstance(v, Decimal) else v for v in r) for r in rows]
