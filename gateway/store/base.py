"""The store interface: everything the gateway keeps in a database, behind
one typed protocol with two implementations, chosen once from the config
(``open_store``):

- ``gateway.store.sqlite.SqliteStore``: one SQLite file (the default; one
  machine, any number of workers);
- ``gateway.store.postgres.PgStore``: PostgreSQL through asyncpg (any
  number of instances; docs/scaling.md).

Callers (the app, the CLI, the admin API, the task service) never import
a driver. Nothing here is on the request path: the key cache and the usage
queue stand between requests and the database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from ..config import DatabaseConfig
    from .dbfile import DatabaseFile
    from .rows import Row
    from .tasks import Owners, TaskRow
    from .tx import Tx


T = TypeVar("T")


class NotFoundError(LookupError):
    pass


class ConflictError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class KeyLimits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    spend_limit: float | None = None
    expires_at: float | None = None


NO_LIMITS = KeyLimits()

# Month totals: spend per key; spend and tokens per workspace.
MonthTotals = tuple[dict[int, float], dict[int, tuple[float, int]]]
# New high id; (key id, workspace id, spend, tokens, rows) per key.
QuotaDelta = tuple[int, list[tuple[int, int | None, float, int, int]]]


class BatchSink(Protocol):
    """Where the usage writer puts its batches (one transaction each)."""

    async def write(self, batch: Sequence[Row], writer: int | None, mark: tuple[str, int] | None,
                    retired: Sequence[str]) -> bool:
        """Write a batch, its spool mark and retired spool names in one
        transaction; False if the mark shows the batch was written before."""
        ...

    async def close(self) -> None: ...


class TaskStoreProtocol(Protocol):
    """Video task and asset ownership state; every write that moves a task
    is guarded in the database (see gateway.store.tasks for the rules both
    implementations keep)."""

    async def close(self) -> None: ...
    async def begin(self, t: TaskRow, key_ttl_s: float) -> TaskRow | None: ...
    async def record_created(self, t: TaskRow, now: float) -> bool: ...
    async def abandon(self, task_id: str) -> None: ...
    async def give_up_creating(self, task_id: str, upstream: str, error: dict[str, Any], now: float) -> bool: ...
    async def adopt(self, t: TaskRow, owners: Owners) -> TaskRow | None: ...
    async def find_owned(self, upstream_task_id: str, owners: Owners) -> list[TaskRow]: ...
    async def backfill(self, accounts: Sequence[tuple[str, str, str]]) -> None: ...
    async def get(self, task_id: str) -> TaskRow | None: ...
    async def claim_due(self, now: float, limit: int, lease_until: float) -> list[TaskRow]:
        """Unfinished tasks due for a poll, each moved a lease ahead so that
        no other poller (another worker or instance) takes it meanwhile."""
        ...
    async def progress(self, t: TaskRow, status: str, next_poll_at: float, now: float) -> bool: ...
    async def reschedule(self, t: TaskRow, next_poll_at: float) -> bool: ...
    async def finish(self, t: TaskRow, status: str, error: dict[str, Any] | None, now: float) -> bool: ...
    async def succeed(self, t: TaskRow, video: dict[str, Any], usage: dict[str, Any], now: float,
                      billing_row: tuple[Any, ...]) -> bool: ...
    async def add_group(self, group_id: str, upstream: str, workspace_id: int, platform: str) -> None: ...
    async def group_owner(self, upstream: str, group_id: str) -> int | None: ...
    async def add_asset(self, asset_id: str, upstream: str, workspace_id: int, platform: str,
                        group_id: str) -> None: ...
    async def asset_owner(self, upstream: str, asset_id: str) -> int | None: ...
    async def asset_upstreams(self, asset_id: str, workspace_id: int) -> list[str]: ...


class Store(Protocol):
    """Keys, workspaces, usage, rollups, tasks and assets in one database."""

    kind: str  # "sqlite" or "postgres"
    # Whether usage ids grow in commit order (one writer at a time), which
    # the local quota sync relies on (gateway.limits).
    ordered_ids: bool
    # SQLite: the file opened, checked before writes (gateway.store.dbfile);
    # None where there is no local file.
    db_file: DatabaseFile | None

    async def close(self) -> None: ...

    # ---- one unit of work on the shared SQL (gateway.store.tx)
    async def run(self, body: Callable[[Tx], Awaitable[T]], *, write: bool = False) -> T:
        """``body(tx)``: with ``write``, in one transaction that commits when
        the body returns and rolls back when it raises, serialized with
        every other write body (SQLite: BEGIN IMMEDIATE; PostgreSQL: an
        advisory lock); without, each statement on its own. The admin API,
        the console and the CLI make every change and its audit row here."""
        ...

    # ---- the key cache (gateway.auth)
    async def keys_generation(self) -> int: ...
    async def live_keys(self) -> list[tuple[Any, ...]]: ...
    async def fetch_key(self, key_hash: str) -> tuple[int, tuple[Any, ...] | None]:
        """The key generation, then one live key's row (as ``live_keys``
        gives them; None if there is no such key or it is revoked)."""
        ...

    # ---- usage
    def batch_sink(self) -> BatchSink: ...
    async def recover_spools(self, directory: Path) -> int: ...
    async def retention(self, cutoff: float, stop: Callable[[], bool] = lambda: False) -> int: ...
    async def quota_load(self, start: float) -> tuple[int, MonthTotals]:
        """This month's totals (from ``start``), and the usage id they cover
        up to (0 where ids do not grow in commit order)."""
        ...

    async def quota_since(self, seen_id: int, start: float, writer: int) -> QuotaDelta | None:
        """Rows other writers committed after ``seen_id``, summed per key and
        workspace, with the new high id; None where ids do not grow in
        commit order (then the caller re-reads ``quota_load``)."""
        ...
    async def usage_summary(self, *, since: float = 0.0, by: str = "model") -> list[dict[str, Any]]: ...
    async def usage_series(self, **kw: Any) -> list[dict[str, Any]]: ...
    async def request_log(self, **kw: Any) -> dict[str, Any]: ...
    async def upstream_stats(self, *, since: float) -> dict[str, dict[str, Any]]: ...
    async def usage_rows(self, *, after_id: int = 0, limit: int = 10000) -> list[dict[str, Any]]: ...

    async def find_origin(self, response_id: str) -> tuple[int | None, str | None, str | None] | None:
        """(workspace id, upstream, model) of the request that made a
        Responses object (gateway.affinity)."""
        ...

    # ---- tasks and assets
    async def task_store(self) -> TaskStoreProtocol: ...

    # ---- change notices from other instances (None: poll only)
    async def listen(
        self, on_keys: Callable[[], None], on_config: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]] | None:
        """Call ``on_keys`` / ``on_config`` when another process changes keys
        or asks for a config reload; returns how to stop listening."""
        ...
    async def announce_config(self, origin: str) -> None: ...


async def open_store(db: DatabaseConfig) -> Store:
    """The store the config names, migrated to the current schema."""
    if db.url is not None:
        from .postgres.store import PgStore

        return await PgStore.open(db.url, pool_size=db.pool_size)
    from .sqlite.store import SqliteStore

    return await SqliteStore.open(db.path, db.busy_timeout_ms)


def run_on_store(db: DatabaseConfig, fn: Callable[[Store], Awaitable[T]]) -> T:
    """``fn(store)`` from synchronous code (the CLI, the supervisor): opens
    the store on a loop of its own, closes it after."""
    import asyncio

    async def main() -> T:
        store = await open_store(db)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


async def migrate_schema(db: DatabaseConfig) -> tuple[int, int]:
    """Apply every pending migration to the database ``db`` names; returns
    the schema version before and after (``gateway migrate``)."""
    if db.url is not None:
        import asyncpg

        from .postgres import schema as pg

        conn = await asyncpg.connect(db.url, timeout=10)
        try:
            return await pg.migrate(conn), pg.SCHEMA_VERSION
        finally:
            await conn.close()
    import sqlite3

    from . import schema

    before = 0
    if db.path.exists():
        raw = sqlite3.connect(db.path)
        before = int(raw.execute("PRAGMA user_version").fetchone()[0])
        raw.close()
    schema.connect(db.path).close()
    return before, schema.SCHEMA_VERSION
