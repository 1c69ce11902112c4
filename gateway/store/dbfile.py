"""Is the database file this process opened still the one at its path?

An SQLite connection holds its file open: if the file is removed (``rm``)
or replaced (``mv backup.db gateway.db``, a restore) under a running
gateway, every write still succeeds, into an inode nobody will ever read
again. ``DatabaseFile`` remembers the (device, inode) of the file when the
process opened the database; a writer calls ``check`` before each write and
after each commit (one ``stat``, a few microseconds), and from the first
mismatch on the process takes the database as lost:

- ``check`` raises ``DatabaseLost`` (an ``sqlite3.OperationalError``, so
  every caller's handling of a failed database applies), now and forever:
  nothing more is written to the dead file;
- /readyz answers 503, and one error is logged;
- the usage writer keeps its rows in its spool file, which is no longer
  deleted (gateway.store.usage), so the next start writes them into the
  file then at the path; spool recovery never deletes a spool file after
  committing it to a file that is not the one at the path.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("gateway.store")


class DatabaseLost(sqlite3.OperationalError):
    """The database file was removed or replaced under this process."""


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class DatabaseFile:
    """The database file as this process opened it. ``check`` may be called
    from any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity = identity(path)
        self._lock = threading.Lock()
        self.lost = False

    def check(self) -> None:
        """Raise DatabaseLost unless ``path`` still names the file opened."""
        if not self.lost and identity(self.path) == self._identity:
            return
        with self._lock:
            first, self.lost = not self.lost, True
        if first:
            log.error(
                "the database file %s was removed or replaced while the gateway ran: nothing more is written "
                "to it; usage rows stay in the spool and /readyz fails. Restart the gateway to write them "
                "into the file now at that path.", self.path,
                extra={"fields": {"event": "database_lost", "path": str(self.path)}},
            )
        raise DatabaseLost(f"the database file {self.path} was removed or replaced")
