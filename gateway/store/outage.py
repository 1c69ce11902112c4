"""Whether an error from either store means the database is away (and a
503 and a retry are the answer), or is a bug."""

from __future__ import annotations

import sqlite3

import asyncpg

from .dbfile import DatabaseLost

# Errors that say the database cannot be reached or used just now, not that
# the statement is wrong.
_UNREACHABLE = (
    OSError, TimeoutError, DatabaseLost, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)
# SQLite's primary result codes for the same: busy or locked past the
# timeout, an I/O error, a file it cannot open, a full disk.
_SQLITE_UNAVAILABLE = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR,
                                 sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_FULL})


def unavailable(e: BaseException) -> bool:
    """Whether ``e`` means the database is away (PostgreSQL down or
    restarting, its connection lost, SQLite locked, unreadable or removed):
    worth a 503 and a retry. Anything else (a missing table, a bad
    statement) is a bug, and must not pass for one."""
    if isinstance(e, _UNREACHABLE):
        return True
    if isinstance(e, sqlite3.OperationalError):
        code = getattr(e, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_UNAVAILABLE
    return False
