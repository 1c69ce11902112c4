"""Video task and asset ownership tables, on a connection of their own.

Task state is not on the hot chat path, and its one guarantee must hold in
the database itself, whoever races (client polls, the background poller,
other worker processes): a task is billed at most once, and a finished task
never changes again.

- A task is recorded before the upstream is asked to start it (``begin``:
  status ``creating``, no upstream id) and given its upstream id right after
  (``record_created``, guarded by ``upstream_task_id IS NULL``), so a task
  that exists upstream always has a row. A ``creating`` row whose creator
  is gone is found by the poller once its ``next_poll_at`` (set past any
  upstream timeout) has come.
- An Idempotency-Key is unique per workspace (an index), so of two racing
  creates with one key exactly one inserts.
- Every write that moves a task is an UPDATE guarded by
  ``status IN ('queued', 'running')``, so the first writer of a final state
  wins and later ones change nothing.
- ``succeed`` is the compare-and-swap that bills: in one ``BEGIN IMMEDIATE``
  transaction it flips ``billed`` 0 -> 1 and inserts the billing usage row.
  Only the transaction whose UPDATE matched a row inserts; a crash before
  COMMIT leaves the task unbilled and unfinished, so the next poll bills it.
- One asyncio lock serialises this connection's statements, so one
  coroutine's transaction never interleaves with another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from .. import safejson
from . import rollup
from .dbfile import DatabaseFile
from .rows import INSERT as INSERT_USAGE
from .schema import BUSY_TIMEOUT_MS, connect_async
from .scope import Scope, conditions
from .tx import Tx

CREATING = "creating"  # recorded, upstream asked, upstream id not known yet
ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
_ACTIVE_SQL = "status IN ('queued', 'running')"
_UNRECORDED = "status = 'creating' AND upstream_task_id IS NULL"

_COLUMNS = (
    "id, workspace_id, key_id, model, upstream, upstream_model, upstream_task_id, status, ratio, "
    "video, usage, error, billed, created_at, updated_at, next_poll_at, attempts, account, endpoint, "
    "idempotency_key, request_hash"
)
_PLACEHOLDERS = ", ".join("?" * 21)


@dataclass(frozen=True, slots=True)
class Owners:
    """The account names and endpoints of one provider account (see
    gateway.tasks.service.same_account): the rows of an upstream task id
    under any of them stand for the same upstream task."""

    accounts: tuple[str, ...]
    endpoints: tuple[str, ...]

    def where(self) -> tuple[str, tuple[str, ...]]:
        """The SQL condition (after ``upstream_task_id = ?``) and its arguments."""
        a = ", ".join("?" * len(self.accounts))
        e = ", ".join("?" * len(self.endpoints))
        return f"(account IN ({a}) OR endpoint IN ({e}))", (*self.accounts, *self.endpoints)


@dataclass(slots=True)
class TaskRow:
    """One video task as stored."""

    id: str
    workspace_id: int
    key_id: int
    model: str
    upstream: str
    upstream_model: str
    upstream_task_id: str | None
    status: str
    ratio: float = 1.0
    video: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    billed: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    next_poll_at: float | None = None
    attempts: int = 0
    account: str | None = None  # the provider account the upstream task lives in
    endpoint: str | None = None  # the upstream's normalised base_url
    idempotency_key: str | None = None  # the client's, unique in the workspace
    request_hash: str | None = None  # SHA-256 (hex) of the create body, with an idempotency key

    @property
    def finished(self) -> bool:
        return self.status in FINAL


def _dumps(v: dict[str, Any] | None) -> str | None:
    return None if v is None else orjson.dumps(v).decode()


def _loads(v: str | None) -> dict[str, Any] | None:
    if v is None:
        return None
    obj = safejson.loads(v)
    return obj if isinstance(obj, dict) else None


def _row(r: Sequence[Any]) -> TaskRow:
    return TaskRow(
        id=r[0], workspace_id=r[1], key_id=r[2], model=r[3], upstream=r[4], upstream_model=r[5],
        upstream_task_id=r[6], status=r[7], ratio=r[8], video=_loads(r[9]), usage=_loads(r[10]),
        error=_loads(r[11]), billed=bool(r[12]), created_at=r[13], updated_at=r[14], next_poll_at=r[15],
        attempts=r[16], account=r[17], endpoint=r[18], idempotency_key=r[19], request_hash=r[20],
    )


def _values(t: TaskRow) -> tuple[Any, ...]:
    return (
        t.id, t.workspace_id, t.key_id, t.model, t.upstream, t.upstream_model, t.upstream_task_id, t.status,
        t.ratio, _dumps(t.video), _dumps(t.usage), _dumps(t.error), int(t.billed), t.created_at, t.updated_at,
        t.next_poll_at, t.attempts, t.account, t.endpoint, t.idempotency_key, t.request_hash,
    )


class TaskStore:
    """Task and asset ownership state; see the module docstring for the
    ordering guarantees."""

    def __init__(self, db: aiosqlite.Connection, db_file: DatabaseFile | None = None) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        # Checked before every write: a removed or replaced database file
        # gets no task writes (DatabaseLost) rather than silently losing them.
        self._db_file = db_file

    @classmethod
    async def open(cls, path: Path, db_file: DatabaseFile | None = None,
                   busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> TaskStore:
        return cls(await connect_async(path, busy_timeout_ms), db_file)

    def _check(self) -> None:
        if self._db_file is not None:
            self._db_file.check()

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    async def _one(self, sql: str, args: Sequence[Any]) -> Any:
        async with self._lock, self._db.execute(sql, args) as cur:
            return await cur.fetchone()

    async def _write(self, sql: str, args: Sequence[Any]) -> int:
        self._check()
        async with self._lock, self._db.execute(sql, args) as cur:
            return cur.rowcount

    # ------------------------------------------------------------- tasks

    async def begin(self, t: TaskRow, key_ttl_s: float) -> TaskRow | None:
        """Record a task about to be created upstream (``t.status`` is
        ``creating``). Returns None once it is recorded, or, when
        ``t.idempotency_key`` is held by another task of the workspace, that
        task (nothing is recorded then). A key held longer than
        ``key_ttl_s`` is released first, so it may be used again."""
        idem = t.idempotency_key
        for _ in range(3):  # the holder may be deleted (abandoned) between the two statements
            if idem is not None:
                await self._write(
                    "UPDATE video_tasks SET idempotency_key = NULL "
                    "WHERE workspace_id = ? AND idempotency_key = ? AND created_at < ?",
                    (t.workspace_id, idem, t.created_at - key_ttl_s),
                )
            n = await self._write(
                f"INSERT INTO video_tasks ({_COLUMNS}) VALUES ({_PLACEHOLDERS}) ON CONFLICT DO NOTHING", _values(t)
            )
            if n == 1 or idem is None:
                return None
            r = await self._one(
                f"SELECT {_COLUMNS} FROM video_tasks WHERE workspace_id = ? AND idempotency_key = ?",
                (t.workspace_id, idem),
            )
            if r is not None:
                return _row(r)
        raise RuntimeError(f"video task {t.id}: idempotency key neither free nor held")

    async def record_created(self, t: TaskRow, now: float) -> bool:
        """Give a recorded task the upstream's task id and where it lives
        (``t``'s upstream fields), and make it ``queued``. Also after the
        poller gave up on it (``give_up_creating``): the task exists upstream
        after all, so it is polled and billed. False if it has its id already."""
        n = await self._write(
            "UPDATE video_tasks SET upstream = ?, upstream_model = ?, upstream_task_id = ?, account = ?, "
            "endpoint = ?, status = 'queued', error = NULL, updated_at = ?, next_poll_at = ? "
            "WHERE id = ? AND upstream_task_id IS NULL AND billed = 0",
            (t.upstream, t.upstream_model, t.upstream_task_id, t.account, t.endpoint, now, t.next_poll_at, t.id),
        )
        return n == 1

    async def abandon(self, task_id: str) -> None:
        """Forget a recorded task the upstream certainly did not start."""
        await self._write(f"DELETE FROM video_tasks WHERE id = ? AND {_UNRECORDED}", (task_id,))

    async def give_up_creating(self, task_id: str, upstream: str, error: dict[str, Any], now: float) -> bool:
        """A recorded task whose creation ended without an upstream id and
        without certainty that nothing was started: failed, not billed."""
        n = await self._write(
            f"UPDATE video_tasks SET status = 'failed', upstream = ?, error = ?, updated_at = ?, next_poll_at = NULL "
            f"WHERE id = ? AND {_UNRECORDED}",
            (upstream, _dumps(error), now, task_id),
        )
        return n == 1

    async def adopt(self, t: TaskRow, owners: Owners) -> TaskRow | None:
        """Insert a task first seen by its upstream id, unless a row for
        that upstream task exists already in its provider account
        (``owners``), whatever upstream entry or workspace made it. One
        statement, so two racing adoptions cannot both insert. Returns the
        row that stands for the upstream task (None if the public id is
        taken by another task)."""
        assert t.upstream_task_id is not None
        cond, args = owners.where()
        await self._write(
            f"INSERT INTO video_tasks ({_COLUMNS}) SELECT {_PLACEHOLDERS} WHERE NOT EXISTS "
            f"(SELECT 1 FROM video_tasks WHERE upstream_task_id = ? AND {cond}) ON CONFLICT DO NOTHING",
            (*_values(t), t.upstream_task_id, *args),
        )
        found = await self.find_owned(t.upstream_task_id, owners)
        return found[0] if found else None

    async def find_owned(self, upstream_task_id: str, owners: Owners) -> list[TaskRow]:
        """The rows of this upstream task id in the provider account
        ``owners``, oldest first."""
        cond, args = owners.where()
        async with self._lock, self._db.execute(
            f"SELECT {_COLUMNS} FROM video_tasks WHERE upstream_task_id = ? AND {cond} ORDER BY created_at",
            (upstream_task_id, *args),
        ) as cur:
            return [_row(r) for r in await cur.fetchall()]

    async def backfill(self, accounts: Sequence[tuple[str, str, str]]) -> None:
        """Give rows written before tasks had an account theirs, from the
        config's (upstream, account, endpoint); a row that would then
        duplicate another (a task adopted twice before) keeps none."""
        self._check()
        async with self._lock:
            for upstream, account, endpoint in accounts:
                await self._db.execute(
                    "UPDATE video_tasks SET account = ?, endpoint = ? WHERE upstream = ? AND account IS NULL "
                    "AND NOT EXISTS (SELECT 1 FROM video_tasks o "
                    "WHERE o.upstream_task_id = video_tasks.upstream_task_id AND (o.account = ? OR o.endpoint = ?))",
                    (account, endpoint, upstream, account, endpoint),
                )

    async def get(self, task_id: str) -> TaskRow | None:
        r = await self._one(f"SELECT {_COLUMNS} FROM video_tasks WHERE id = ?", (task_id,))
        return None if r is None else _row(r)

    async def due(self, now: float, limit: int) -> list[TaskRow]:
        """Unfinished tasks whose next poll time has come, oldest first
        (``creating`` ones: those whose creator should have recorded them
        by now)."""
        async with self._lock, self._db.execute(
            f"SELECT {_COLUMNS} FROM video_tasks WHERE next_poll_at IS NOT NULL AND next_poll_at <= ? "
            f"AND status IN ('creating', 'queued', 'running') ORDER BY next_poll_at LIMIT ?",
            (now, limit),
        ) as cur:
            return [_row(r) for r in await cur.fetchall()]

    async def claim_due(self, now: float, limit: int, lease_until: float) -> list[TaskRow]:
        """Due tasks, each claimed (moved a lease ahead); a task another
        poller claimed between the read and the claim is left out."""
        return [t for t in await self.due(now, limit) if await self.claim(t, lease_until)]

    async def claim(self, t: TaskRow, lease_until: float) -> bool:
        """Move a due task's next poll time forward, so that another poller
        (another worker) skips it while this one polls it."""
        n = await self._write(
            "UPDATE video_tasks SET next_poll_at = ? WHERE id = ? AND next_poll_at = ?",
            (lease_until, t.id, t.next_poll_at),
        )
        return n == 1

    async def progress(self, t: TaskRow, status: str, next_poll_at: float, now: float) -> bool:
        """Record a non-final status and when to poll next."""
        n = await self._write(
            # A late answer saying "queued" never moves a running task back.
            f"UPDATE video_tasks SET status = ?, updated_at = ?, next_poll_at = ?, attempts = attempts + 1 "
            f"WHERE id = ? AND {_ACTIVE_SQL} AND (? = 'running' OR status = 'queued')",
            (status, now, next_poll_at, t.id, status),
        )
        return n == 1

    async def reschedule(self, t: TaskRow, next_poll_at: float) -> bool:
        """Poll again later (after a failed poll), leaving the status alone."""
        n = await self._write(
            f"UPDATE video_tasks SET next_poll_at = ?, attempts = attempts + 1 WHERE id = ? AND {_ACTIVE_SQL}",
            (next_poll_at, t.id),
        )
        return n == 1

    async def finish(self, t: TaskRow, status: str, error: dict[str, Any] | None, now: float) -> bool:
        """Move an unfinished task to failed or cancelled (never billed)."""
        assert status in ("failed", "cancelled")
        n = await self._write(
            f"UPDATE video_tasks SET status = ?, error = ?, updated_at = ?, next_poll_at = NULL "
            f"WHERE id = ? AND {_ACTIVE_SQL}",
            (status, _dumps(error), now, t.id),
        )
        return n == 1

    async def succeed(
        self, t: TaskRow, video: dict[str, Any], usage: dict[str, Any], now: float, billing_row: tuple[Any, ...]
    ) -> bool:
        """The billing compare-and-swap: True for the one caller that moved
        the task to succeeded, which also wrote ``billing_row``."""
        self._check()
        async with self._lock:
            db = self._db
            await db.execute("BEGIN IMMEDIATE")
            try:
                async with db.execute(
                    f"UPDATE video_tasks SET status = 'succeeded', billed = 1, video = ?, usage = ?, error = NULL, "
                    f"updated_at = ?, next_poll_at = NULL WHERE id = ? AND billed = 0 AND {_ACTIVE_SQL}",
                    (_dumps(video), _dumps(usage), now, t.id),
                ) as cur:
                    won = cur.rowcount == 1
                if won:
                    async with db.execute("SELECT COALESCE(MAX(id), 0) FROM usage_events") as cur:
                        row = await cur.fetchone()
                    await db.execute(INSERT_USAGE, billing_row)
                    for sql in rollup.SINCE:  # the admin aggregates count video spend too
                        await db.execute(sql, {"since": row[0] if row else 0})
                await db.execute("COMMIT")
            except BaseException:
                # After a cancelled COMMIT there may be nothing to roll back.
                with contextlib.suppress(Exception):
                    await db.execute("ROLLBACK")
                raise
            return won

    # ------------------------------------------------------------ assets

    async def add_group(self, group_id: str, upstream: str, workspace_id: int, platform: str) -> None:
        await self._write(
            "INSERT OR IGNORE INTO asset_groups (id, upstream, workspace_id, platform, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (group_id, upstream, workspace_id, platform, time.time()),
        )

    async def group_owner(self, upstream: str, group_id: str) -> int | None:
        r = await self._one("SELECT workspace_id FROM asset_groups WHERE upstream = ? AND id = ?", (upstream, group_id))
        return None if r is None else int(r[0])

    async def add_asset(self, asset_id: str, upstream: str, workspace_id: int, platform: str, group_id: str) -> None:
        await self._write(
            "INSERT OR IGNORE INTO assets (id, upstream, workspace_id, platform, group_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (asset_id, upstream, workspace_id, platform, group_id, time.time()),
        )

    async def asset_owner(self, upstream: str, asset_id: str) -> int | None:
        r = await self._one("SELECT workspace_id FROM assets WHERE upstream = ? AND id = ?", (upstream, asset_id))
        return None if r is None else int(r[0])

    async def asset_upstreams(self, asset_id: str, workspace_id: int) -> list[str]:
        """The upstreams on which this workspace owns an asset with this id."""
        async with self._lock, self._db.execute(
            "SELECT upstream FROM assets WHERE id = ? AND workspace_id = ? ORDER BY upstream",
            (asset_id, workspace_id),
        ) as cur:
            return [str(r[0]) for r in await cur.fetchall()]


# ------------------------------------------------------------- admin reads
# Synchronous, for the admin API's worker thread (like gateway.store.queries).

_ADMIN_COLUMNS = ("id, workspace_id, key_id, model, upstream, status, video, usage, error, created_at, "
                  "updated_at")


def _admin_task(r: dict[str, Any]) -> dict[str, Any]:
    d = dict(r)
    for col in ("video", "usage", "error"):
        d[col] = _loads(d[col])
    return d


async def list_tasks(tx: Tx, *, scope: Scope | None, workspace_id: int | None = None, key_id: int | None = None,
                     status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Video tasks, newest first, within a console user's scope (the admin
    API; the same SQL on both stores)."""
    where, args = conditions(scope, workspace_id=workspace_id, key_id=key_id, status=status)
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    rows = await tx.fetch(f"SELECT {_ADMIN_COLUMNS} FROM video_tasks{cond} ORDER BY created_at DESC, id LIMIT ?",
                          *args, limit)
    return [_admin_task(r) for r in rows]


async def get_task(tx: Tx, task_id: str) -> dict[str, Any] | None:
    row = await tx.fetchrow(f"SELECT {_ADMIN_COLUMNS} FROM video_tasks WHERE id = ?", task_id)
    return None if row is None else _admin_task(row)
