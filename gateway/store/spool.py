"""The usage spool: every usage row is appended to a per-process file the
moment it is recorded, and every request in flight has a line there too, so
a worker killed with SIGKILL (or the OOM killer) loses neither the rows
still waiting in its in-memory queue nor the requests it was serving.

- One file per writer, ``<db>.spool/<pid>-<ns>.rows``, one JSON array per
  line. Lines made during one turn of the event loop are written with one
  ``write`` at the end of that turn (a callback scheduled with call_soon), so
  under load many requests share a system call; the window in which a
  killed process can lose a line is that one turn, not the usage writer's
  flush interval. No fsync: the kernel keeps the bytes when the process
  dies; a machine crash is what WAL's ``synchronous=NORMAL`` already trades
  away. The writer holds an exclusive ``flock`` on its file for its whole
  life: a file nobody locks belongs to a dead process.
- Lines: ``["d", seq, *row]`` a finished request's row (``seq`` numbers
  the process's requests); ``["x", seq]`` a finished request that makes no
  row itself (a WebSocket connection, whose responses have their own rows);
  ``["b", [seq, *start], ...]`` the requests that started in one loop turn
  and were still running at its end, one line for all of them, each with
  only what its ``worker_lost`` row needs and recovery cannot fill in (the
  ``START`` columns: who, what, where to; a request that has seen nothing
  from an upstream has no usage, cost or timings yet); ``["s", seq, *row]``
  a request in flight, as far as it has got (written again while it runs
  long and changes, by the usage writer, and for a request that had already
  heard from its upstream by the end of its first turn); a plain ``[*row]``
  is a finished row of an older version's file. Older versions wrote an
  ``s`` line where ``b`` lines are now: recovery reads both.
- Each batch the usage writer commits stores the spool offset just past its
  last row in ``usage_spool`` *in the same transaction* as the rows, so the
  database always says exactly which finished rows of the file it holds.
- ``recover`` (at start-up of every gateway process, and in the supervisor
  after a worker dies) takes every unlocked file, inserts the finished rows
  past the stored offset, and, for each request with an ``s`` line and no
  ``d`` line anywhere in the file, its last ``b`` or ``s`` row as status
  499 with error_type ``worker_lost`` (with whatever usage it had seen); then it
  marks the file recovered in the same transaction and deletes it. Each row
  therefore lands exactly once.
- A writer whose queue is empty rotates to a fresh file once its file is
  over ``ROTATE_BYTES`` (writing the requests still in flight into the new
  one); a clean shutdown removes its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .. import safejson
from .columns import COLUMNS
from .dbfile import DatabaseFile
from .rows import Row, insert_rows, pad_row

log = logging.getLogger("gateway.spool")

ROTATE_BYTES = 4 << 20
SET_OFFSET = (
    "INSERT INTO usage_spool (name, offset) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET offset = excluded.offset"
)
SET_RECOVERED = (
    "INSERT INTO usage_spool (name, offset, recovered) VALUES (?, ?, 1) "
    "ON CONFLICT (name) DO UPDATE SET offset = excluded.offset, recovered = 1"
)


def spool_dir(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".spool")


class SpoolFile:
    """This process's spool file. Runs on the event loop thread.

    ``before_write`` (the usage writer's) is called at the end of each loop
    turn that has something to write, just before the write, to add the
    lines of requests that started in that turn."""

    def __init__(self, directory: Path, before_write: Callable[[], None] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = ""
        self.fd = -1
        self.pos = 0
        self.failed = False  # a write failed: no more lines go to the file
        self._pending: list[bytes] = []
        self._scheduled = False
        self._before_write = before_write
        self.open_new()

    def open_new(self) -> None:
        name = f"{os.getpid()}-{time.time_ns()}.rows"
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.name, self.fd, self.pos = name, fd, 0

    def wake(self) -> None:
        """Have ``flush`` run at the end of this loop turn."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def append(self, row: Row, seq: int | None = None) -> int:
        """Queue one finished row (of request ``seq``) for this loop turn's
        write; returns the offset just past it (where it will end in the file)."""
        line = orjson.dumps(row if seq is None else ("d", seq, *row), option=orjson.OPT_APPEND_NEWLINE)
        self.wake()
        self._pending.append(line)
        self.pos += len(line)
        return self.pos

    def in_flight(self, seq: int, row: Row) -> None:
        """Queue the row of request ``seq`` as far as it has got."""
        line = orjson.dumps(("s", seq, *row), option=orjson.OPT_APPEND_NEWLINE)
        self.wake()
        self._pending.append(line)
        self.pos += len(line)

    def started(self, records: list[tuple[object, ...]]) -> None:
        """Queue one ``b`` line for the start records of requests in flight
        (``[seq, *START values]`` each). Raises what orjson raises for a
        value it cannot encode, queuing nothing."""
        line = orjson.dumps(("b", *records), option=orjson.OPT_APPEND_NEWLINE)
        self.wake()
        self._pending.append(line)
        self.pos += len(line)

    def ended(self, seq: int) -> None:
        """Queue the end of request ``seq``, which has no row of its own."""
        self.wake()
        line = orjson.dumps(("x", seq), option=orjson.OPT_APPEND_NEWLINE)
        self._pending.append(line)
        self.pos += len(line)

    def flush(self) -> None:
        """Write the lines queued so far (called at the end of the loop turn)."""
        self._scheduled = False
        if self._before_write is not None:
            self._before_write()
        if not self._pending or self.fd < 0:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            n = os.write(self.fd, data)
            if n != len(data):  # a regular file: only on a full disk
                raise OSError(f"short write ({n} of {len(data)} bytes)")
        except OSError as e:
            log.error("usage spool write failed, spooling off for this process: %s", e)
            self.failed = True

    def retire(self) -> str:
        """Close and delete the current file (every row in it is committed).
        Returns its name, whose usage_spool row the caller deletes."""
        self.flush()
        old = self.name
        os.close(self.fd)
        self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            (self.directory / old).unlink()
        return old


def read_rows(data: bytes, offset: int) -> tuple[list[Row], int]:
    """The rows a dead process's spool file adds to a database that holds
    its finished rows up to ``offset``: the finished rows after it, and a
    ``worker_lost`` row for each request that never finished. Returns them
    and how many are of the second kind. Only whole lines count: a write cut
    short by a crash is not a line."""
    rows: list[Row] = []
    finished: set[int] = set()
    unfinished: dict[int, list[Any]] = {}  # the row of each, as far as it got
    pos = 0
    for line in data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]:
        pos += len(line) + 1
        try:
            values = safejson.loads(line)
        except orjson.JSONDecodeError:
            log.error("usage spool: skipped a line that is not JSON (%d bytes)", len(line))
            continue
        if not values or not isinstance(values[0], str):
            if pos > offset:
                rows.append(pad_row(values))
            continue
        tag = values[0]
        if tag == "b":
            for record in values[1:]:
                if record[0] not in finished:
                    unfinished[record[0]] = _started_row(record)
            continue
        seq = values[1]
        if tag in ("d", "x"):
            finished.add(seq)
            unfinished.pop(seq, None)
            if tag == "d" and pos > offset:
                rows.append(pad_row(values[2:]))
        elif seq not in finished:
            unfinished[seq] = list(pad_row(values[2:]))
    lost = [_worker_lost(v) for v in unfinished.values()]
    return rows + lost, len(lost)


# The columns of a ``b`` line's start record, after its seq, and what the
# other columns of such a request's row hold (nothing seen from an upstream).
START = ("ts", "request_id", "workspace_id", "key_id", "endpoint", "model", "upstream", "stream", "bytes_in")
_NOT_STARTED: dict[str, Any] = {
    "status": 0, "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0, "reasoning_tokens": 0, "images": 0,
    "video_tokens": 0, "cost": 0.0, "latency_ms": 0.0, "bytes_out": 0, "cache_write_tokens": 0,
    "cache_write_1h_tokens": 0,
}
_START_AT = [COLUMNS.index(c) for c in START]
_STATUS, _ERROR_TYPE = COLUMNS.index("status"), COLUMNS.index("error_type")


def _started_row(record: list[Any]) -> list[Any]:
    values = [_NOT_STARTED.get(c) for c in COLUMNS]
    for i, v in zip(_START_AT, record[1:], strict=True):
        values[i] = v
    return values


def _worker_lost(values: list[Any]) -> Row:
    values[_STATUS], values[_ERROR_TYPE] = 499, "worker_lost"
    return tuple(values)


def dead_files(directory: Path) -> Iterator[tuple[Path, bytes]]:
    """The spool files no live writer holds, with their bytes, each locked
    (so no other recovering process takes it) until the caller asks for the
    next. Used by recovery on both stores."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.rows")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer's file
            yield path, path.read_bytes()
        finally:
            os.close(fd)


def recovered(path: Path, n: int, lost: int) -> None:
    """Log a recovered file and delete it (its rows are committed)."""
    if n:
        log.warning("usage spool %s: recovered %d rows of a stopped process (%d of requests it never "
                    "finished: status 499, worker_lost)", path.name, n, lost)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def recover(conn: sqlite3.Connection, directory: Path, db_file: DatabaseFile | None = None) -> int:
    """Insert the rows of dead processes' spool files that the database does
    not hold yet; delete those files. Returns how many rows were inserted.

    ``db_file`` is the database file ``conn`` opened: a spool file is
    deleted only while that file is still the one at its path (DatabaseLost
    otherwise, and the spool file stays for the next recovery)."""
    if not directory.is_dir():
        return 0
    total = 0
    for path, data in dead_files(directory):
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT offset, recovered FROM usage_spool WHERE name = ?", (path.name,)).fetchone()
            # A file recovered before (then a crash before it was deleted)
            # adds nothing: its unfinished requests are rows already.
            rows, lost = ([], 0) if row and row[1] else read_rows(data, row[0] if row else 0)
            if rows:
                insert_rows(conn, rows)
            conn.execute(SET_RECOVERED, (path.name, len(data)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        total += len(rows)
        if db_file is not None:
            db_file.check()
        recovered(path, len(rows), lost)
        conn.execute("DELETE FROM usage_spool WHERE name = ?", (path.name,))
    # Rows of files that are gone (rotated, recovered): nothing refers to them.
    names = [r[0] for r in conn.execute("SELECT name FROM usage_spool")]
    for name in names:
        if not (directory / name).exists():
            conn.execute("DELETE FROM usage_spool WHERE name = ?", (name,))
    return total
