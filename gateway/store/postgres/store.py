"""PgStore: the Store protocol on PostgreSQL (asyncpg, one pool per
process). The SQL of the read side (series, request log) is shared with
SQLite (gateway.store.analytics builds it with ``?`` placeholders, numbered
here); the rest is PostgreSQL's own spelling of gateway.store.queries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from .. import analytics, origins
from ..base import NO_LIMITS, BatchSink, ConflictError, KeyLimits, MonthTotals, NotFoundError, QuotaDelta
from ..dbfile import DatabaseFile
from ..queries import (
        KEY_FIELDS,
        PREFIX_SHOWN,
    USAGE_GROUPS,
    WORKSPACE_FIELDS,
    hash_key,
    json_list,
    new_key,
    shape_row,
)
from ..sql import numbered
from . import usage
from .schema import CONFIG_CHANNEL, KEYS_CHANNEL, migrate
from .tasks import PgTaskStore

log = logging.getLogger("gateway.store")

# Console accounts (users, sessions, audit) are SQLite-only so far: keys
# here have no owning user (docs/scaling.md, "Not yet on PostgreSQL").
KEY_COLUMNS = """k.id, k.workspace_id, w.name AS workspace, k.name, k.prefix, k.group_name,
    k.allowed_models, k.rpm, k.tpm, k.max_concurrency, k.spend_limit, k.expires_at,
    k.revoked_at, k.created_at"""
LIVE_KEYS = """
SELECT k.id, k.key_hash, k.name, k.prefix, k.group_name, k.allowed_models, k.rpm, k.tpm,
       k.max_concurrency, k.spend_limit, k.expires_at,
       w.id, w.name, w.default_group, w.allowed_models, w.monthly_spend_limit, w.monthly_token_limit
FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id
WHERE k.revoked_at IS NULL
"""


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

    async def _one(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.pool.fetchrow(sql, *args)

    # ------------------------------------------------------------ workspaces

    async def create_workspace(self, name: str, group: str = "default") -> dict[str, Any]:
        try:
            ws_id = await self.pool.fetchval(
                "INSERT INTO workspaces (name, default_group, created_at) VALUES ($1, $2, $3) RETURNING id",
                name, group, time.time(),
            )
        except asyncpg.UniqueViolationError:
            raise ConflictError(f"workspace {name!r} already exists") from None
        return await self.get_workspace(ws_id)

    async def get_workspace(self, ws_id: int) -> dict[str, Any]:
        row = await self._one("SELECT * FROM workspaces WHERE id = $1", ws_id)
        if row is None:
            raise NotFoundError(f"workspace {ws_id} not found")
        return shape_row(row)

    async def find_workspace(self, name: str) -> dict[str, Any]:
        row = await self._one("SELECT * FROM workspaces WHERE name = $1", name)
        if row is None:
            raise NotFoundError(f"workspace {name!r} not found")
        return shape_row(row)

    async def list_workspaces(self) -> list[dict[str, Any]]:
        return [shape_row(r) for r in await self.pool.fetch("SELECT * FROM workspaces ORDER BY id")]

    async def _update(self, table: str, row_id: int, fields: dict[str, Any], allowed: tuple[str, ...]) -> None:
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}")
        if not fields:
            return
        values = [json_list(v) if k == "allowed_models" else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ${i + 1}" for i, k in enumerate(fields))
        await self.pool.execute(f"UPDATE {table} SET {sets} WHERE id = ${len(fields) + 1}", *values, row_id)

    async def update_workspace(self, ws_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        await self.get_workspace(ws_id)
        await self._update("workspaces", ws_id, fields, WORKSPACE_FIELDS)
        return await self.get_workspace(ws_id)

    # ------------------------------------------------------------ keys

    async def create_key(
        self, workspace_id: int, *, name: str = "", group: str | None = None, models: list[str] | None = None,
        limits: KeyLimits = NO_LIMITS,
    ) -> tuple[dict[str, Any], str]:
        await self.get_workspace(workspace_id)
        plaintext = new_key()
        key_id = await self.pool.fetchval(
            """INSERT INTO api_keys (workspace_id, name, prefix, key_hash, group_name, allowed_models,
                   rpm, tpm, max_concurrency, spend_limit, expires_at, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id""",
            workspace_id, name, plaintext[:PREFIX_SHOWN], hash_key(plaintext), group, json_list(models),
            limits.rpm, limits.tpm, limits.max_concurrency, limits.spend_limit, limits.expires_at, time.time(),
        )
        return await self.get_key(key_id), plaintext

    async def get_key(self, key_id: int) -> dict[str, Any]:
        row = await self._one(
            f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id WHERE k.id = $1",
            key_id,
        )
        if row is None:
            raise NotFoundError(f"key {key_id} not found")
        return shape_row(row)

    async def list_keys(self, workspace_id: int | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id"
        if workspace_id is None:
            rows = await self.pool.fetch(sql + " ORDER BY k.id")
        else:
            rows = await self.pool.fetch(sql + " WHERE k.workspace_id = $1 ORDER BY k.id", workspace_id)
        return [shape_row(r) for r in rows]

    async def update_key(self, key_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        await self.get_key(key_id)
        await self._update("api_keys", key_id, fields, KEY_FIELDS)
        return await self.get_key(key_id)

    async def revoke_key(self, key_id: int) -> dict[str, Any]:
        await self.pool.execute(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL", time.time(), key_id
        )
        return await self.get_key(key_id)

    async def key_usage_totals(self) -> dict[int, dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT key_id, requests, input_tokens, output_tokens, cost, last_used FROM usage_key_totals"
        )
        return {r["key_id"]: dict(r) for r in rows}

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
