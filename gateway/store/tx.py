"""One unit of database work, written once for both stores.

The admin API, the console and the CLI change several rows at once (a key
and its audit row; a sign-in attempt's check and its count), so their SQL
is written as ``async`` functions on a ``Tx``: a connection inside one
transaction (or, for reads, outside any). The SQL keeps to what SQLite and
PostgreSQL both accept (``INSERT ... RETURNING``, ``ON CONFLICT``,
``IS DISTINCT FROM``, ``1 = 0``); only its ``?`` placeholders are numbered
for PostgreSQL (``numbered``, as the analytics queries always were). There
is no dialect translation beyond that: where the dialects differ, the
schema is made to agree (gateway.store.postgres.schema, migration 5). A
broken constraint comes out of either as ``IntegrityError``.

How a body runs (``Store.run``):

- SQLite: the whole body in one worker thread, on a fresh sqlite3
  connection, inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` for writes. The
  ``SqliteTx`` methods are coroutines that never suspend, so the body is
  driven to its end by ``drive`` without an event loop: the event loop
  never waits on SQLite, and the transaction never waits on the event
  loop (a write lock held across loop turns could wait on the usage
  writer, which needs that loop).
- PostgreSQL (gateway.store.postgres.tx: the CLI on SQLite does without
  asyncpg): on the event loop, on a pooled asyncpg connection, inside
  ``conn.transaction()`` for writes. A write transaction first takes one
  transaction-level advisory lock (``WRITE_LOCK``): admin and console
  writes are serialized across every instance as SQLite serializes them,
  so a before-image read in a transaction cannot go stale before its
  update, and a sign-in throttle's check and count cannot interleave with
  another's. They are rare and short; the usage writer, the key cache and
  the task poller never take the lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

Body = Callable[["Tx"], Awaitable[T]]


class IntegrityError(Exception):
    """A statement broke a constraint (unique, foreign key, check), on either
    store; the driver's own error is its ``__cause__``."""


class Tx(Protocol):
    """A connection as the shared SQL sees it: ``?`` placeholders, rows as
    dicts (column name -> value)."""

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...
    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""
        ...


def no_nul(args: tuple[Any, ...]) -> None:
    """PostgreSQL text cannot hold NUL or a lone surrogate (the driver or the
    server refuses them); SQLite's can. Refused the same way from either
    store (gateway.admin answers a ValueError with a 400)."""
    for a in args:
        if isinstance(a, str):
            if "\x00" in a:
                raise ValueError("text must not contain a NUL character")
            try:
                a.encode()
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode") from None


class SqliteTx:
    """A Tx on a sqlite3 connection; its coroutines never suspend (``drive``)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def _execute(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        no_nul(args)
        try:
            return self.conn.execute(sql, args)
        except sqlite3.IntegrityError as e:
            raise IntegrityError(str(e)) from e

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in self._execute(sql, args)]

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = self._execute(sql, args).fetchone()
        return None if row is None else dict(row)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self._execute(sql, args).fetchone()
        return None if row is None else row[0]

    async def execute(self, sql: str, *args: Any) -> int:
        return self._execute(sql, args).rowcount


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (a body on a ``SqliteTx``) to its
    end, here and now. One that does suspend (it awaited something other
    than the Tx) is a programming error, refused rather than left hanging."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a database body awaited something other than its connection")


def run_sqlite(conn: sqlite3.Connection, body: Body[T], *, write: bool) -> T:
    """``body`` on ``conn``, in one write transaction if ``write``
    (BEGIN IMMEDIATE: taken before the first read). Synchronous: the CLI
    calls it directly, the SQLite store from a worker thread."""
    if not write:
        return drive(_coro(body, SqliteTx(conn)))
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = drive(_coro(body, SqliteTx(conn)))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return out


async def _coro(body: Body[T], tx: Tx) -> T:
    return await body(tx)


def on_conn(conn: sqlite3.Connection, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kw: Any) -> T:
    """``fn(tx, *args, **kw)`` on a sqlite3 connection, synchronously, in no
    transaction of its own (the synchronous helpers of
    gateway.store.queries, for the CLI and the tests)."""
    return drive(fn(SqliteTx(conn), *args, **kw))

