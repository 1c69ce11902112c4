"""A Tx on an asyncpg connection, and ``Store.run``'s transaction on
PostgreSQL (gateway.store.tx says how a body runs on either store)."""

from __future__ import annotations

from typing import Any, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..sql import numbered
from ..tx import Body, IntegrityError, no_nul

T = TypeVar("T")

# Taken by every write transaction of Store.run on PostgreSQL (gateway.store.tx).
WRITE_LOCK = 0x67617465776179 + 16  # "gateway" + 16: apart from the schema and partition locks

PgConn = asyncpg.Connection | PoolConnectionProxy


class PgTx:
    """A Tx on an asyncpg connection."""

    def __init__(self, conn: PgConn) -> None:
        self.conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        no_nul(args)
        try:
            return [dict(r) for r in await self.conn.fetch(numbered(sql), *args)]
        except asyncpg.IntegrityConstraintViolationError as e:
            raise IntegrityError(str(e)) from e

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        no_nul(args)
        try:
            row = await self.conn.fetchrow(numbered(sql), *args)
        except asyncpg.IntegrityConstraintViolationError as e:
            raise IntegrityError(str(e)) from e
        return None if row is None else dict(row)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        no_nul(args)
        try:
            return await self.conn.fetchval(numbered(sql), *args)
        except asyncpg.IntegrityConstraintViolationError as e:
            raise IntegrityError(str(e)) from e

    async def execute(self, sql: str, *args: Any) -> int:
        no_nul(args)
        try:
            status = await self.conn.execute(numbered(sql), *args)
        except asyncpg.IntegrityConstraintViolationError as e:
            raise IntegrityError(str(e)) from e
        # "UPDATE 3", "DELETE 0", "INSERT 0 1": the count is the last word.
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0


async def run_pg(conn: PgConn, body: Body[T], *, write: bool) -> T:
    """``body`` on ``conn``, in one transaction under WRITE_LOCK if ``write``."""
    if not write:
        return await body(PgTx(conn))
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
        return await body(PgTx(conn))
