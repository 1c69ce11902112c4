"""Usage retention: delete usage rows older than ``usage.retention_days``.

Runs in one process only (worker 0, or the single process; on PostgreSQL
every instance may run it: dropping a partition twice is a no-op).
The SQLite way is below; PostgreSQL drops whole day partitions instead
(gateway.store.postgres.usage). Each batch is
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

from .base import Store

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
    store: Store, days: int, *, interval_s: float = 3600.0, clock: Callable[[], float] = time.time,
) -> None:
    """Every ``interval_s`` (first run right away), delete rows older than
    ``days`` days (SQLite: in short batches; PostgreSQL: whole day
    partitions). ``days <= 0`` keeps everything. Runs until cancelled; a
    cancel stops it between batches."""
    if days <= 0:
        return
    stopping = False
    try:
        while True:
            try:
                n = await store.retention(clock() - days * 86400, lambda: stopping)
                if n:
                    log.info("usage retention: deleted %d %s older than %d days", n,
                             "rows" if store.kind == "sqlite" else "day partitions", days)
            except Exception as e:
                log.error("usage retention failed, will retry: %s", e)
            await asyncio.sleep(interval_s)
    finally:
        stopping = True
