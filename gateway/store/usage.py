"""Usage events: recorded in memory on the request path, written in batches by
one background task.

Ordering and delivery guarantees:
- ``record`` never blocks and never drops: it appends to an in-memory deque.
- Backpressure is applied at admission instead: ``wait_for_room`` makes a new
  request wait while the queue holds ``queue_max`` events (counted in
  ``gateway_usage_backpressure_waits_total``), so the queue is bounded by
  ``queue_max`` plus the requests already in flight.
- One writer task owns the write connection, a plain sqlite3 connection
  living on one dedicated thread: each batch is one transaction run in one
  hop to that thread (BEGIN, executemany, COMMIT), so the write lock is never
  held across event-loop turns. A failed batch is put back at the front of
  the queue and retried.
- ``close`` drains everything that was recorded before it was called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import UsageConfig
from . import rollup, schema
from .columns import COLUMNS

log = logging.getLogger("gateway.usage")

Row = tuple[Any, ...]
INSERT = f"INSERT INTO usage_events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class UsageWriter:
    """Bounded-by-admission usage queue with a single batching writer."""

    def __init__(
        self,
        path: Path,
        cfg: UsageConfig,
        *,
        on_batch: Callable[[Sequence[Row]], None] | None = None,
        on_flush: Callable[[int, float], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None  # only touched on the executor thread
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="usage-writer")
        self._cfg = cfg
        self._queue: deque[Row] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._on_batch = on_batch
        self._on_flush = on_flush
        self._on_wait = on_wait
        self.written = 0

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        return len(self._queue) >= self._cfg.queue_max

    def record(self, row: Row) -> None:
        q = self._queue
        q.append(row)
        n = len(q)
        if n >= self._cfg.batch_max:
            self._wake.set()
        if n >= self._cfg.queue_max:
            self._room.clear()

    async def wait_for_room(self) -> None:
        if len(self._queue) < self._cfg.queue_max:
            return
        if self._on_wait is not None:
            self._on_wait()
        while len(self._queue) >= self._cfg.queue_max:
            self._room.clear()
            await self._room.wait()

    async def run(self) -> None:
        interval = self._cfg.flush_interval_ms / 1000
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            # Only what is queued now: events arriving during the write wait
            # for the next interval (or a full batch), so batches stay large.
            await self._flush_available(len(self._queue))

    async def _flush_available(self, limit: int | None = None) -> None:
        left = len(self._queue) if limit is None else limit
        while self._queue and left > 0:
            n = min(left, len(self._queue), self._cfg.batch_max)
            left -= n
            if not await self._flush_batch(n):
                await asyncio.sleep(0.5)
                if self._closing:
                    # One more try per call; close() loops until drained.
                    return

    async def _flush_batch(self, n: int) -> bool:
        q = self._queue
        batch = [q.popleft() for _ in range(n)]
        t0 = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._write, batch)
        except Exception as e:
            log.error("usage batch of %d failed, will retry: %s", n, type(e).__name__)
            q.extendleft(reversed(batch))
            return False
        self.written += n
        if self._on_batch is not None:
            try:
                self._on_batch(batch)
            except Exception:
                log.exception("usage metrics hook failed")
        if self._on_flush is not None:
            self._on_flush(n, time.perf_counter() - t0)
        if len(q) < self._cfg.queue_max:
            self._room.set()
        return True

    def _write(self, batch: list[Row]) -> None:
        if self._conn is None:
            self._conn = schema.connect(self._path)
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(INSERT, batch)
            rollup.apply(c, batch)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self, timeout: float = 30.0) -> None:
        """Stop the loop and write everything recorded so far."""
        self._closing = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await self._flush_available()
        if self._queue:
            log.error("usage writer closing with %d events unwritten", len(self._queue))
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_conn)
        self._executor.shutdown(wait=True)
