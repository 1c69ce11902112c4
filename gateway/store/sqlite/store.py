"""SqliteStore: the Store protocol on one SQLite file.

Reads and writes run on a fresh sqlite3 connection in a worker thread (the
event loop never waits on SQLite), through the functions of
gateway.store.queries and gateway.store.analytics; the usage writer has its
own connection on its own thread (gateway.store.usage.SqliteSink), the task
store its own aiosqlite connection, and the key cache and quota sync read
on one aiosqlite connection held for the store's life.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from .. import analytics, queries
from ..base import BatchSink, MonthTotals, QuotaDelta
from ..dbfile import DatabaseFile
from ..origins import find_origin
from ..retention import delete_older_than
from ..schema import BUSY_TIMEOUT_MS, connect, connect_async
from ..spool import recover
from ..tasks import TaskStore
from ..tx import Body, run_sqlite
from ..usage import SqliteSink

T = TypeVar("T")


class SqliteStore:
    """See the module docstring."""

    kind = "sqlite"
    ordered_ids = True

    def __init__(self, path: Path, db: aiosqlite.Connection, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        # The key cache's and the quota sync's reads, as before the Store.
        self.db = db
        # The file opened: writes check it is still the one at the path.
        self.db_file: DatabaseFile | None = DatabaseFile(path)

    @classmethod
    async def open(cls, path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> SqliteStore:
        # migrated by connect_async
        return cls(path, await connect_async(path, busy_timeout_ms), busy_timeout_ms)

    async def close(self) -> None:
        await self.db.close()

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = connect(self.path, self.busy_timeout_ms)
        try:
            return fn(conn)
        finally:
            conn.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self.run_sync, fn)

    async def run(self, body: Body[T], *, write: bool = False) -> T:
        # The whole body in one worker thread (gateway.store.tx), on the file
        # this process opened: once it was removed or replaced, DatabaseLost
        # (a new empty file at the path is not the gateway's database).
        # Checked before connecting, which would make that file.
        db_file = self.db_file

        def run() -> T:
            if db_file is not None:
                db_file.check()
            return self.run_sync(lambda conn: run_sqlite(conn, body, write=write))

        return await asyncio.to_thread(run)

    # ------------------------------------------------------------ the key cache

    async def keys_generation(self) -> int:
        async with self.db.execute("SELECT value FROM meta WHERE name = 'keys_generation'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def live_keys(self) -> list[tuple[Any, ...]]:
        async with self.db.execute(queries.LIVE_KEYS) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def fetch_key(self, key_hash: str) -> tuple[int, tuple[Any, ...] | None]:
        generation = await self.keys_generation()
        async with self.db.execute(queries.LIVE_KEYS + " AND k.key_hash = ?", (key_hash,)) as cur:
            row = await cur.fetchone()
        return generation, (tuple(row) if row is not None else None)

    # ------------------------------------------------------------ usage

    def batch_sink(self) -> BatchSink:
        return SqliteSink(self.path, self.db_file, self.busy_timeout_ms)

    async def recover_spools(self, directory: Path) -> int:
        return await self._run(lambda c: recover(c, directory, self.db_file))

    async def retention(self, cutoff: float, stop: Callable[[], bool] = lambda: False) -> int:
        return await self._run(lambda c: delete_older_than(c, cutoff, stop=stop))

    async def quota_load(self, start: float) -> tuple[int, MonthTotals]:
        db = self.db
        # The last row id first: the totals then cover exactly the rows up to
        # it (ids grow in commit order), and quota_since takes over from there.
        seen = await self._max_id()
        sql = ("SELECT {col}, SUM(cost), SUM(input_tokens + output_tokens) FROM usage_events "
               "WHERE ts >= ? AND id <= ? AND {col} IS NOT NULL GROUP BY {col}")
        async with db.execute(sql.format(col="key_id"), (start, seen)) as cur:
            keys = {kid: float(spend or 0.0) for kid, spend, _ in await cur.fetchall()}
        async with db.execute(sql.format(col="workspace_id"), (start, seen)) as cur:
            workspaces = {wid: (float(spend or 0.0), int(tokens or 0)) for wid, spend, tokens in await cur.fetchall()}
        return seen, (keys, workspaces)

    async def quota_since(self, seen_id: int, start: float, writer: int) -> QuotaDelta | None:
        hi = await self._max_id()
        if hi <= seen_id:
            return seen_id, []
        async with self.db.execute(
            "SELECT key_id, workspace_id, SUM(cost), SUM(input_tokens + output_tokens), COUNT(*) "
            "FROM usage_events WHERE id > ? AND id <= ? AND ts >= ? AND key_id IS NOT NULL "
            "AND (writer IS NULL OR writer != ?) GROUP BY key_id, workspace_id",
            (seen_id, hi, start, writer),
        ) as cur:
            groups = [(kid, wid, float(spend or 0.0), int(tokens or 0), int(n))
                      for kid, wid, spend, tokens, n in await cur.fetchall()]
        return hi, groups

    async def _max_id(self) -> int:
        async with self.db.execute("SELECT COALESCE(MAX(id), 0) FROM usage_events") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def usage_summary(self, *, since: float = 0.0, by: str = "model") -> list[dict[str, Any]]:
        return await self._run(lambda c: queries.usage_summary(c, since=since, by=by))

    async def usage_series(self, **kw: Any) -> list[dict[str, Any]]:
        return await self._run(lambda c: analytics.usage_series(c, **kw))

    async def request_log(self, **kw: Any) -> dict[str, Any]:
        return await self._run(lambda c: analytics.request_log(c, **kw))

    async def upstream_stats(self, *, since: float) -> dict[str, dict[str, Any]]:
        return await self._run(lambda c: analytics.upstream_stats(c, since=since))

    async def usage_rows(self, *, after_id: int = 0, limit: int = 10000) -> list[dict[str, Any]]:
        return await self._run(lambda c: [dict(r) for r in c.execute(
            "SELECT * FROM usage_events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))])

    async def find_origin(self, response_id: str) -> tuple[int | None, str | None, str | None] | None:
        return await find_origin(self.db, response_id)

    # ------------------------------------------------------------ tasks

    async def task_store(self) -> TaskStore:
        return await TaskStore.open(self.path, self.db_file, self.busy_timeout_ms)

    # ------------------------------------------------------------ notices

    async def listen(
        self, on_keys: Callable[[], None], on_config: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]] | None:
        return None  # one machine: the key refresh polls a counter every key_refresh_ms

    async def announce_config(self, origin: str) -> None:
        return None
