"""Usage events: recorded in memory on the request path, written in batches by
one background task.

Ordering and delivery guarantees:
- ``record`` never blocks and never drops: it appends to an in-memory deque.
- Backpressure is applied at admission instead: ``wait_for_room`` makes a new
  request wait while the queue holds ``queue_max`` events (counted in
  ``gateway_usage_backpressure_waits_total``), so the queue is bounded by
  ``queue_max`` plus the requests already in flight.
- One writer task owns the write connection, through a ``BatchSink``: on
  SQLite (``SqliteSink``) a plain sqlite3 connection living on one dedicated
  thread, each batch one transaction run in one hop to that thread (BEGIN,
  executemany, COMMIT), so the write lock is never held across event-loop
  turns; on PostgreSQL a COPY per batch (gateway.store.postgres.usage). A
  failed batch is put back at the front of the queue and retried.
- ``close`` drains everything that was recorded before it was called.
- Requests in flight: ``begin`` registers one (it costs a dict insert; its
  spool start record is made at the end of the loop turn, when its key and
  model are known, and skipped if it finished within that turn; the records
  of one turn share one line), ``record(row, seq)``
  ends it. The run loop snapshots requests running longer than
  ``CHECKPOINT_S`` whose progress changed (status, bytes, usage seen) at
  most once per ``CHECKPOINT_S``. So if the process dies, spool recovery
  turns each unfinished request into a 499 ``worker_lost`` row with what it
  had seen (gateway.store.spool).
- With a spool directory, ``record`` also appends the row to this process's
  spool file (gateway.store.spool) and each batch stores the spool offset in
  the same transaction as its rows: a process killed outright loses no row;
  the next start (or the supervisor) recovers them exactly once.
- With a ``db_file`` (gateway.store.dbfile), each batch checks before it
  writes and after it commits that the database file is still the one at
  its path. Once it is not (removed, replaced), no batch is written again:
  spooled rows are dropped from memory, kept in the spool file, which is
  neither rotated nor deleted, so the next start writes them into the file
  then at the path (exactly once: the offsets are that file's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter
from typing import Protocol

from ..bounds import shown
from ..config import UsageConfig
from . import schema
from .base import BatchSink
from .columns import COLUMNS
from .dbfile import DatabaseFile, DatabaseLost
from .rows import Row, clean_row, insert_rows
from .spool import ROTATE_BYTES, SET_OFFSET, SpoolFile

log = logging.getLogger("gateway.usage")
_REQUEST_ID = COLUMNS.index("request_id")
_ERROR_TYPE = COLUMNS.index("error_type")

# How often a long request's spool line is brought up to date, at most.
CHECKPOINT_S = 1.0


class InFlight(Protocol):
    """A request being served, as the usage spool sees it (RequestContext)."""

    t0: float  # perf_counter at its start

    def snapshot(self, now: float) -> Row:
        """Its row as far as it has got."""
        ...

    def start(self, seq: int) -> tuple[object, ...] | None:
        """Its spool start record (gateway.store.spool.START), or None once
        it has heard from an upstream."""
        ...

    def progress(self) -> tuple[object, ...]:
        """Changes whenever its snapshot would."""
        ...


class SqliteSink:
    """Usage batches into one SQLite file, each one transaction on a
    connection that lives on one dedicated thread; with a ``db_file``, each
    batch checks before it writes and after it commits that the file is
    still the one at its path (DatabaseLost otherwise)."""

    def __init__(self, path: Path, db_file: DatabaseFile | None = None,
                 busy_timeout_ms: int = schema.BUSY_TIMEOUT_MS) -> None:
        self._path = path
        self._db_file = db_file
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None  # only touched on the executor thread
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="usage-writer")

    async def write(self, batch: Sequence[Row], writer: int | None, mark: tuple[str, int] | None = None,
                    retired: Sequence[str] = ()) -> bool:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, batch, writer, mark, retired)
        return True

    def _write(self, batch: Sequence[Row], writer: int | None, mark: tuple[str, int] | None,
               retired: Sequence[str]) -> None:
        db_file = self._db_file
        if db_file is not None:
            db_file.check()
        if self._conn is None:
            self._conn = schema.connect(self._path, self._busy_timeout_ms)
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if batch:
                insert_rows(c, batch, writer)
            if mark is not None:
                c.execute(SET_OFFSET, mark)
            for name in retired:
                c.execute("DELETE FROM usage_spool WHERE name = ?", (name,))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        if db_file is not None:
            # Replaced while this batch was written: it went to the old file,
            # so it counts as not written (the spool keeps it).
            db_file.check()

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_conn)
        self._executor.shutdown(wait=True)


class UsageWriter:
    """Bounded-by-admission usage queue with a single batching writer."""

    def __init__(
        self,
        sink: BatchSink | Path,
        cfg: UsageConfig,
        *,
        on_batch: Callable[[Sequence[Row]], None] | None = None,
        on_flush: Callable[[int, float], None] | None = None,
        on_wait: Callable[[], None] | None = None,
        spool: Path | None = None,
        db_file: DatabaseFile | None = None,
    ) -> None:
        self._db_file = db_file
        self._sink: BatchSink = SqliteSink(sink, db_file) if isinstance(sink, Path) else sink
        # Marks the rows this process inserts (usage_events.writer), so its
        # limiter can tell them from other workers' rows.
        self.writer_id = secrets.randbits(62)
        self._spool = SpoolFile(spool, self._write_started) if spool is not None else None
        # Requests in flight by number, those started this loop turn, and the
        # progress of each at its last spool line.
        self._seq = 0
        self._in_flight: dict[int, InFlight] = {}
        self._started: list[int] = []
        self._spooled: dict[int, tuple[object, ...]] = {}
        self._checkpoint_at = 0.0
        # Spool offset just past each queued row (None: not spooled), in queue order.
        self._ends: deque[int | None] = deque()
        self._retired: list[str] = []
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

    def begin(self, req: InFlight) -> int:
        """A request starts; returns its number for ``record``."""
        self._seq = seq = self._seq + 1
        spool = self._spool
        if spool is not None and not spool.failed:
            self._in_flight[seq] = req
            self._started.append(seq)
            spool.wake()
        return seq

    def record(self, row: Row, seq: int | None = None) -> None:
        """Queue a finished request's row (``seq`` from ``begin``)."""
        q = self._queue
        spool = self._spool
        if seq is not None and self._in_flight.pop(seq, None) is not None:
            self._spooled.pop(seq, None)
        end = None
        if spool is not None and not spool.failed:
            try:
                end = spool.append(row, seq)
            except (TypeError, ValueError):  # a value the spool cannot encode (orjson)
                row = self._cleaned(row)
                end = spool.append(row, seq)
        q.append(row)
        self._ends.append(end)
        n = len(q)
        if n >= self._cfg.batch_max:
            self._wake.set()
        if n >= self._cfg.queue_max:
            self._room.clear()

    def end(self, seq: int | None) -> None:
        """A request ends that makes no row of its own (a door that
        recorded its rows itself)."""
        spool = self._spool
        if seq is not None and self._in_flight.pop(seq, None) is not None:
            self._spooled.pop(seq, None)
            if spool is not None and not spool.failed:
                spool.ended(seq)

    async def wait_for_room(self) -> None:
        if len(self._queue) < self._cfg.queue_max:
            return
        if self._on_wait is not None:
            self._on_wait()
        while len(self._queue) >= self._cfg.queue_max:
            self._room.clear()
            await self._room.wait()

    def _spool_in_flight(self, seq: int, req: InFlight, now: float) -> None:
        spool = self._spool
        assert spool is not None
        self._spooled[seq] = req.progress()
        row = req.snapshot(now)
        try:
            spool.in_flight(seq, row)
        except (TypeError, ValueError):  # a value the spool cannot encode (orjson)
            spool.in_flight(seq, self._cleaned(row))

    def _write_started(self) -> None:
        """One spool line for the requests started this loop turn and still
        running (called by the spool just before its write): their start
        records, built and encoded together, a small fraction of full rows'
        cost (most requests end before a checkpoint, so no progress() is
        kept either)."""
        started, self._started = self._started, []
        if not started:
            return
        in_flight = self._in_flight
        spool = self._spool
        assert spool is not None
        records = []
        for seq in started:
            req = in_flight.get(seq)
            if req is not None:
                record = req.start(seq)
                if record is not None:
                    records.append(record)
                else:  # heard from its upstream already: all it has seen
                    self._spool_in_flight(seq, req, perf_counter())
        if records:
            try:
                spool.started(records)
            except (TypeError, ValueError):  # a value the spool cannot encode (orjson): full rows, cleared
                now = perf_counter()
                for record in records:
                    n = record[0]
                    assert isinstance(n, int)
                    self._spool_in_flight(n, in_flight[n], now)

    def _checkpoint(self) -> None:
        """Bring the spool lines of long requests up to date (those whose
        progress changed since their last line)."""
        spool = self._spool
        now = perf_counter()
        if spool is None or spool.failed or now < self._checkpoint_at:
            return
        self._checkpoint_at = now + CHECKPOINT_S
        old = now - CHECKPOINT_S
        spooled = self._spooled
        for seq, req in self._in_flight.items():
            if req.t0 < old and spooled.get(seq) != req.progress():
                self._spool_in_flight(seq, req, now)

    async def run(self) -> None:
        interval = self._cfg.flush_interval_ms / 1000
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            self._checkpoint()
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

    @property
    def lost(self) -> bool:
        """The database file was removed or replaced: nothing is written."""
        return self._db_file is not None and self._db_file.lost

    def _shed(self, n: int) -> bool:
        """With the database lost: the next ``n`` rows leave memory if the
        spool holds them (the next start writes them); unspooled ones stay."""
        q, ends = self._queue, self._ends
        kept: list[tuple[Row, int | None]] = []
        for _ in range(n):
            row, end = q.popleft(), ends.popleft()
            if end is None:
                kept.append((row, end))
        for row, end in reversed(kept):
            q.appendleft(row)
            ends.appendleft(end)
        if len(q) < self._cfg.queue_max:
            self._room.set()
        return not kept

    async def _flush_batch(self, n: int) -> bool:
        if self.lost:
            return self._shed(n)
        q = self._queue
        batch = [q.popleft() for _ in range(n)]
        ends = [self._ends.popleft() for _ in range(n)]
        spooled = [e for e in ends if e is not None]
        mark = (self._spool_name, spooled[-1]) if spooled else None
        retired, self._retired = self._retired, []
        t0 = time.perf_counter()
        try:
            await self._sink.write(batch, self.writer_id, mark, retired)
        except Exception as e:
            q.extendleft(reversed(batch))
            self._ends.extendleft(reversed(ends))
            self._retired = retired + self._retired
            if isinstance(e, DatabaseLost):
                return self._shed(n)
            if self._clean_queued(n):
                return True  # a row no database takes: cleared, the batch is tried again now
            log.error("usage batch of %d failed, will retry: %s", n, type(e).__name__)
            return False
        self.written += n
        spool = self._spool
        if spool is not None and not spool.failed and not q and spool.pos > ROTATE_BYTES and self._live():
            # Every row of the file is committed, to the live file: start a
            # fresh one, with the requests still in flight.
            self._retired.append(spool.retire())
            spool.open_new()
            now = perf_counter()
            for seq, req in self._in_flight.items():
                self._spool_in_flight(seq, req, now)
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

    def _cleaned(self, row: Row) -> Row:
        cleaned = clean_row(row)
        if cleaned is None:
            return row
        log.error("usage row %s held values its columns cannot take; stored cleared, as %s",
                  shown(cleaned[_REQUEST_ID]), cleaned[_ERROR_TYPE])
        return cleaned

    def _clean_queued(self, n: int) -> bool:
        """After a failed batch: clear the values of any of the first ``n``
        queued rows that no database can take. True if there were some
        (the batch failed for them, not for the database)."""
        q = self._queue
        changed = False
        for i in range(min(n, len(q))):
            cleaned = self._cleaned(q[i])
            if cleaned is not q[i]:
                q[i] = cleaned
                changed = True
        return changed

    @property
    def _spool_name(self) -> str:
        return self._spool.name if self._spool is not None else ""

    def _live(self) -> bool:
        try:
            if self._db_file is not None:
                self._db_file.check()
        except DatabaseLost:
            return False
        return True

    async def close(self, timeout: float = 30.0) -> None:
        """Stop the loop and write everything recorded so far. The spool
        file is deleted only when every row in it is committed to the
        database file that is at the path now."""
        self._closing = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self._queue and not self.lost and time.monotonic() < deadline:
            await self._flush_available()
        if self.lost:
            self._shed(len(self._queue))
        retired, self._retired = self._retired, []
        spool, self._spool = self._spool, None
        if spool is not None and not self._queue and self._live():
            retired.append(spool.retire())
        else:
            if self._queue:
                log.error("usage writer closing with %d events unwritten%s", len(self._queue),
                          "; they stay in the spool for the next start" if spool is not None else "")
            if spool is not None:
                spool.flush()
                os.close(spool.fd)
                if self.lost:
                    log.error("usage rows of this process kept in %s for the next start (the database file "
                              "was removed or replaced)", spool.directory / spool.name)
        try:
            if retired and not self.lost:
                await self._sink.write([], self.writer_id, None, retired)
        except Exception as e:  # the next start's recovery removes them
            log.error("could not remove retired spool entries: %s", type(e).__name__)
        finally:
            await self._sink.close()
