"""Usage events: recorded in memory on the request path, written in batches by
one background task.

Ordering and delivery guarantees:
- ``record`` never blocks and never drops: it appends to an in-memory deque.
- Backpressure is applied at admission instead: ``wait_for_room`` makes a new
  request wait while the queue holds ``queue_max`` events (counted in
  ``gateway_usage_backpressure_waits_total``), so the queue is bounded by
  ``queue_max`` plus the requests already in flight.
- One writer task owns the write connection; each batch is one transaction.
  A failed batch is put back at the front of the queue and retried.
- ``close`` drains everything that was recorded before it was called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite

from ..config import UsageConfig
from . import rollup

log = logging.getLogger("gateway.usage")

# Column order of a usage row tuple.
COLUMNS = (
    "ts",
    "request_id",
    "workspace_id",
    "key_id",
    "endpoint",
    "model",
    "upstream",
    "status",
    "stream",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "images",
    "video_tokens",
    "cost",
    "latency_ms",
    "ttfb_ms",
    "upstream_ms",
    "overhead_ms",
    "bytes_in",
    "bytes_out",
    "error_type",
)
Row = tuple[Any, ...]
INSERT = f"INSERT INTO usage_events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class UsageWriter:
    """Bounded-by-admission usage queue with a single batching writer."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        cfg: UsageConfig,
        *,
        on_batch: Callable[[Sequence[Row]], None] | None = None,
        on_flush: Callable[[int, float], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self._db = db
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
            await self._flush_available()

    async def _flush_available(self) -> None:
        while self._queue:
            if not await self._flush_batch():
                await asyncio.sleep(0.5)
                if self._closing:
                    # One more try per call; close() loops until drained.
                    return

    async def _flush_batch(self) -> bool:
        q = self._queue
        n = min(len(q), self._cfg.batch_max)
        batch = [q.popleft() for _ in range(n)]
        t0 = time.perf_counter()
        try:
            await self._db.execute("BEGIN IMMEDIATE")
            await self._db.executemany(INSERT, batch)
            await rollup.apply(self._db, batch)
            await self._db.execute("COMMIT")
        except Exception as e:
            log.error("usage batch of %d failed, will retry: %s", n, type(e).__name__)
            with contextlib.suppress(Exception):
                await self._db.execute("ROLLBACK")
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

    async def close(self, timeout: float = 30.0) -> None:
        """Stop the loop and write everything recorded so far."""
        self._closing = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await self._flush_available()
        if self._queue:
            log.error("usage writer closing with %d events unwritten", len(self._queue))
