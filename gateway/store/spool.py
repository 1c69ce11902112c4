"""The usage spool: every usage row is appended to a per-process file the
moment it is recorded, so a worker killed with SIGKILL (or the OOM killer)
loses none of the rows still waiting in its in-memory queue.

- One file per writer, ``<db>.spool/<pid>-<ns>.rows``, one JSON array per
  line. Rows recorded during one turn of the event loop are written with one
  ``write`` at the end of that turn (a callback scheduled with call_soon), so
  under load many requests share a system call; the window in which a
  killed process can lose a row is that one turn, not the usage writer's
  flush interval. No fsync: the kernel keeps the bytes when the process
  dies; a machine crash is what WAL's ``synchronous=NORMAL`` already trades
  away. The writer holds an
  exclusive ``flock`` on its file for its whole life: a file nobody locks
  belongs to a dead process.
- Each batch the usage writer commits stores the spool offset just past its
  last row in ``usage_spool`` *in the same transaction* as the rows, so the
  database always says exactly which rows of the file it holds.
- ``recover`` (at start-up of every gateway process, and in the supervisor
  after a worker dies) takes every unlocked file, inserts the rows past the
  stored offset, records the new offset in the same transaction, then
  deletes the file. Each row therefore lands exactly once.
- A writer whose queue is empty rotates to a fresh file once its file is
  over ``ROTATE_BYTES``; a clean shutdown removes its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path

import orjson

from .dbfile import DatabaseFile
from .rows import insert_rows, pad_row

log = logging.getLogger("gateway.spool")

ROTATE_BYTES = 4 << 20
SET_OFFSET = (
    "INSERT INTO usage_spool (name, offset) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET offset = excluded.offset"
)


def spool_dir(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".spool")


class SpoolFile:
    """This process's spool file. ``append`` runs on the event loop thread."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.name = ""
        self.fd = -1
        self.pos = 0
        self.failed = False  # a write failed: no more rows go to the file
        self._pending: list[bytes] = []
        self.open_new()

    def open_new(self) -> None:
        name = f"{os.getpid()}-{time.time_ns()}.rows"
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.name, self.fd, self.pos = name, fd, 0

    def append(self, row: tuple[object, ...]) -> int:
        """Queue one row for this loop turn's write; returns the offset just
        past it (where it will end in the file)."""
        line = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(line)
        self.pos += len(line)
        return self.pos

    def flush(self) -> None:
        """Write the rows queued so far (called at the end of the loop turn)."""
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


def recover(conn: sqlite3.Connection, directory: Path, db_file: DatabaseFile | None = None) -> int:
    """Insert the rows of dead processes' spool files that the database does
    not hold yet; delete those files. Returns how many rows were inserted.

    ``db_file`` is the database file ``conn`` opened: a spool file is
    deleted only while that file is still the one at its path (DatabaseLost
    otherwise, and the spool file stays for the next recovery)."""
    if not directory.is_dir():
        return 0
    total = 0
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
            data = path.read_bytes()
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT offset FROM usage_spool WHERE name = ?", (path.name,)).fetchone()
                offset = row[0] if row else 0
                # Only whole lines: a write cut short by a crash is not a row.
                end = data.rfind(b"\n") + 1
                rows = [pad_row(orjson.loads(line)) for line in data[offset:end].splitlines() if line]
                if rows:
                    insert_rows(conn, rows)
                conn.execute(SET_OFFSET, (path.name, max(end, offset)))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            total += len(rows)
            if rows:
                log.warning("usage spool %s: recovered %d rows of a stopped process", path.name, len(rows))
            if db_file is not None:
                db_file.check()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            conn.execute("DELETE FROM usage_spool WHERE name = ?", (path.name,))
        finally:
            os.close(fd)
    # Rows of files that are gone (rotated, recovered): nothing refers to them.
    names = [r[0] for r in conn.execute("SELECT name FROM usage_spool")]
    for name in names:
        if not (directory / name).exists():
            conn.execute("DELETE FROM usage_spool WHERE name = ?", (name,))
    return total
