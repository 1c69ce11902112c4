"""Usage retention: delete usage rows older than ``usage.retention_days``.

Runs in one process only (worker 0, or the single process). Each batch is
one short DELETE of at most ``batch`` rows in its own transaction, on its own
connection in a thread, with a pause between batches: the write lock is held
for milliseconds at a time, so the usage writers of every worker (which wait
up to busy_timeout for it) never see ``database is locked``. The ``usage_ts``
index makes each batch find its rows without a scan.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from .schema import connect

log = logging.getLogger("gateway.retention")

DELETE_BATCH = (
    "DELETE FROM usage_events WHERE id IN "
    "(SELECT id FROM usage_events WHERE ts < ? ORDER BY ts LIMIT ?)"
)


def delete_older_than(
    conn: sqlite3.Connection, cutoff: float, *, batch: int = 500, pause_s: float = 0.02,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Delete every usage row with ``ts < cutoff``, ``batch`` rows per
    transaction. Returns how many were deleted."""
    total = 0
    while not stop():
        n = conn.execute(DELETE_BATCH, (cutoff, batch)).rowcount
        total += n
        if n < batch:
            break
        time.sleep(pause_s)
    return total


async def run_retention(
    path: Path, days: int, *, interval_s: float = 3600.0, batch: int = 500,
    clock: Callable[[], float] = time.time,
) -> None:
    """Every ``interval_s`` (first run right away), delete rows older than
    ``days`` days. ``days <= 0`` keeps everything. Runs until cancelled; a
    cancel stops it between batches."""
    if days <= 0:
        return
    stopping = False

    def sweep() -> int:
        conn = connect(path)
        try:
            return delete_older_than(conn, clock() - days * 86400, batch=batch, stop=lambda: stopping)
        finally:
            conn.close()

    try:
        while True:
            try:
                n = await asyncio.to_thread(sweep)
                if n:
                    log.info("usage retention: deleted %d rows older than %d days", n, days)
            except sqlite3.Error as e:
                log.error("usage retention failed, will retry: %s", e)
            await asyncio.sleep(interval_s)
    finally:
        stopping = True
