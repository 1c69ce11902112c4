"""Video task and asset ownership state on PostgreSQL, with the guarantees
of gateway.store.tasks kept by the database itself:

- Every write that moves a task is an UPDATE guarded by
  ``status IN ('queued', 'running')``. Under READ COMMITTED a second writer
  of the same row waits for the first to commit, then re-checks the guard
  on the new row: the first final state wins and later ones change nothing.
- ``succeed`` flips ``billed`` 0 -> 1 and writes the billing usage row (and
  its rollups) in one transaction; only the transaction whose UPDATE matched
  writes it, so a task is billed once whichever instance polls it.
- ``begin`` records a task before the upstream starts it (``creating``),
  ``record_created`` gives it its upstream id, each guarded as in SQLite;
  an Idempotency-Key is unique per workspace (an index).
- ``claim_due`` takes due tasks with ``FOR UPDATE SKIP LOCKED`` and moves
  them a lease ahead in the same statement: two instances polling at the
  same moment get disjoint tasks, and a task whose poller died is due again
  when its lease runs out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from ..sql import numbered
from ..tasks import _ACTIVE_SQL, _COLUMNS, _PLACEHOLDERS, _UNRECORDED, Owners, TaskRow, _dumps, _row, _values
from . import usage

_INSERT = numbered(f"INSERT INTO video_tasks ({_COLUMNS}) VALUES ({_PLACEHOLDERS})")


def _storable(*texts: str) -> bool:
    """Whether PostgreSQL can hold these strings: a NUL (``%00`` in a path,
    ``\\u0000`` in JSON) or a lone surrogate is refused by the driver or
    the server, so an id holding one names nothing stored: a lookup of it
    finds nothing instead of failing the request."""
    for t in texts:
        if "\x00" in t:
            return False
        try:
            t.encode()
        except UnicodeEncodeError:
            return False
    return True


class PgTaskStore:
    """The TaskStoreProtocol on a connection pool (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._days: set[int] = set()

    async def close(self) -> None:
        return None  # the pool belongs to the PgStore

    async def _task(self, sql: str, *args: Any) -> TaskRow | None:
        r = await self._pool.fetchrow(sql, *args)
        return None if r is None else _row(tuple(r))

    async def _changed(self, sql: str, *args: Any) -> bool:
        status = await self._pool.execute(sql, *args)
        return bool(status.endswith(" 1"))

    async def begin(self, t: TaskRow, key_ttl_s: float) -> TaskRow | None:
        idem = t.idempotency_key
        for _ in range(3):  # the holder may be deleted (abandoned) between the two statements
            if idem is not None:
                await self._pool.execute(
                    "UPDATE video_tasks SET idempotency_key = NULL "
                    "WHERE workspace_id = $1 AND idempotency_key = $2 AND created_at < $3",
                    t.workspace_id, idem, t.created_at - key_ttl_s,
                )
            if await self._changed(_INSERT + " ON CONFLICT DO NOTHING", *_values(t)) or idem is None:
                return None
            held = await self._task(
                f"SELECT {_COLUMNS} FROM video_tasks WHERE workspace_id = $1 AND idempotency_key = $2",
                t.workspace_id, idem,
            )
            if held is not None:
                return held
        raise RuntimeError(f"video task {t.id}: idempotency key neither free nor held")

    async def record_created(self, t: TaskRow, now: float) -> bool:
        return await self._changed(
            "UPDATE video_tasks SET upstream = $1, upstream_model = $2, upstream_task_id = $3, account = $4, "
            "endpoint = $5, status = 'queued', error = NULL, updated_at = $6, next_poll_at = $7 "
            "WHERE id = $8 AND upstream_task_id IS NULL AND billed = 0",
            t.upstream, t.upstream_model, t.upstream_task_id, t.account, t.endpoint, now, t.next_poll_at, t.id,
        )

    async def abandon(self, task_id: str) -> None:
        if not _storable(task_id):
            return
        await self._pool.execute(f"DELETE FROM video_tasks WHERE id = $1 AND {_UNRECORDED}", task_id)

    async def give_up_creating(self, task_id: str, upstream: str, error: dict[str, Any], now: float) -> bool:
        return await self._changed(
            f"UPDATE video_tasks SET status = 'failed', upstream = $1, error = $2, updated_at = $3, "
            f"next_poll_at = NULL WHERE id = $4 AND {_UNRECORDED}",
            upstream, _dumps(error), now, task_id,
        )

    async def adopt(self, t: TaskRow, owners: Owners) -> TaskRow | None:
        # One statement: the unique (account | endpoint, upstream task id)
        # indexes make the second of two racing adoptions insert nothing.
        assert t.upstream_task_id is not None
        cond, args = owners.where()
        await self._pool.execute(numbered(
            f"INSERT INTO video_tasks ({_COLUMNS}) SELECT {_PLACEHOLDERS} WHERE NOT EXISTS "
            f"(SELECT 1 FROM video_tasks WHERE upstream_task_id = ? AND {cond}) ON CONFLICT DO NOTHING"
        ), *_values(t), t.upstream_task_id, *args)
        found = await self.find_owned(t.upstream_task_id, owners)
        return found[0] if found else None

    async def find_owned(self, upstream_task_id: str, owners: Owners) -> list[TaskRow]:
        if not _storable(upstream_task_id):
            return []
        cond, args = owners.where()
        rows = await self._pool.fetch(numbered(
            f"SELECT {_COLUMNS} FROM video_tasks WHERE upstream_task_id = ? AND {cond} ORDER BY created_at"
        ), upstream_task_id, *args)
        return [_row(tuple(r)) for r in rows]

    async def backfill(self, accounts: Sequence[tuple[str, str, str]]) -> None:
        for upstream, account, endpoint in accounts:
            await self._pool.execute(
                "UPDATE video_tasks SET account = $1, endpoint = $2 WHERE upstream = $3 AND account IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM video_tasks o WHERE o.upstream_task_id = video_tasks.upstream_task_id "
                "AND (o.account = $1 OR o.endpoint = $2))", account, endpoint, upstream,
            )

    async def get(self, task_id: str) -> TaskRow | None:
        if not _storable(task_id):
            return None
        return await self._task(f"SELECT {_COLUMNS} FROM video_tasks WHERE id = $1", task_id)

    async def claim_due(self, now: float, limit: int, lease_until: float) -> list[TaskRow]:
        rows = await self._pool.fetch(
            f"UPDATE video_tasks SET next_poll_at = $3 WHERE id IN ("
            "SELECT id FROM video_tasks WHERE next_poll_at IS NOT NULL AND next_poll_at <= $1 "
            "AND status IN ('creating', 'queued', 'running') "
            f"ORDER BY next_poll_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}",
            now, limit, lease_until,
        )
        return sorted((_row(tuple(r)) for r in rows), key=lambda t: t.created_at)

    async def progress(self, t: TaskRow, status: str, next_poll_at: float, now: float) -> bool:
        return await self._changed(
            f"UPDATE video_tasks SET status = $1, updated_at = $2, next_poll_at = $3, attempts = attempts + 1 "
            f"WHERE id = $4 AND {_ACTIVE_SQL} AND ($1 = 'running' OR status = 'queued')",
            status, now, next_poll_at, t.id,
        )

    async def reschedule(self, t: TaskRow, next_poll_at: float) -> bool:
        return await self._changed(
            f"UPDATE video_tasks SET next_poll_at = $1, attempts = attempts + 1 WHERE id = $2 AND {_ACTIVE_SQL}",
            next_poll_at, t.id,
        )

    async def finish(self, t: TaskRow, status: str, error: dict[str, Any] | None, now: float) -> bool:
        assert status in ("failed", "cancelled")
        return await self._changed(
            f"UPDATE video_tasks SET status = $1, error = $2, updated_at = $3, next_poll_at = NULL "
            f"WHERE id = $4 AND {_ACTIVE_SQL}",
            status, _dumps(error), now, t.id,
        )

    async def succeed(
        self, t: TaskRow, video: dict[str, Any], usage_: dict[str, Any], now: float, billing_row: tuple[Any, ...]
    ) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            won = await conn.fetchval(
                f"UPDATE video_tasks SET status = 'succeeded', billed = 1, video = $1, usage = $2, error = NULL, "
                f"updated_at = $3, next_poll_at = NULL WHERE id = $4 AND billed = 0 AND {_ACTIVE_SQL} "
                f"RETURNING true",
                _dumps(video), _dumps(usage_), now, t.id,
            )
            if won:
                await conn.execute(usage.CREATE_STAGE)
                await usage.write_batch(conn, [billing_row], None, None, (), self._days)
            return bool(won)

    # ------------------------------------------------------------ assets

    async def add_group(self, group_id: str, upstream: str, workspace_id: int, platform: str) -> None:
        await self._pool.execute(
            "INSERT INTO asset_groups (id, upstream, workspace_id, platform, created_at) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT DO NOTHING", group_id, upstream, workspace_id, platform, time.time(),
        )

    async def group_owner(self, upstream: str, group_id: str) -> int | None:
        if not _storable(group_id):
            return None
        v = await self._pool.fetchval(
            "SELECT workspace_id FROM asset_groups WHERE upstream = $1 AND id = $2", upstream, group_id
        )
        return None if v is None else int(v)

    async def add_asset(self, asset_id: str, upstream: str, workspace_id: int, platform: str, group_id: str) -> None:
        await self._pool.execute(
            "INSERT INTO assets (id, upstream, workspace_id, platform, group_id, created_at) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            asset_id, upstream, workspace_id, platform, group_id, time.time(),
        )

    async def asset_owner(self, upstream: str, asset_id: str) -> int | None:
        if not _storable(asset_id):
            return None
        v = await self._pool.fetchval("SELECT workspace_id FROM assets WHERE upstream = $1 AND id = $2",
                                      upstream, asset_id)
        return None if v is None else int(v)

    async def asset_upstreams(self, asset_id: str, workspace_id: int) -> list[str]:
        if not _storable(asset_id):
            return []
        rows = await self._pool.fetch(
            "SELECT upstream FROM assets WHERE id = $1 AND workspace_id = $2 ORDER BY upstream", asset_id, workspace_id
        )
        return [str(r[0]) for r in rows]
