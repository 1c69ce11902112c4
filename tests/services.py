"""Real PostgreSQL and Redis for the tests: the machine's shared servers
(a fresh database / a unique key prefix per test), or private ones started
on a free port for the tests that stop and restart them.

Absent servers skip the test with a message, except under ``CI=true``,
where they fail it: CI must not pass by running nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_HOST = os.environ.get("GATEWAY_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("GATEWAY_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("GATEWAY_TEST_PG_USER", "postgres")
REDIS_HOST = os.environ.get("GATEWAY_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("GATEWAY_TEST_REDIS_PORT", "6379"))


def unavailable(what: str) -> None:
    """Skip (fail under CI=true) a test whose server is missing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required under CI=true", pytrace=False)
    pytest.skip(f"{what} is not available here")


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ Redis


@dataclass
class RedisServer:
    """A redis-server of the test's own, which it may stop and start."""

    port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not listening("127.0.0.1", self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def own_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server")
    server = RedisServer(free_port(), Path(tempfile.mkdtemp(prefix="gw-redis-")))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


def shared_redis_url() -> str:
    """The machine's Redis (db 0; tests keep apart by key prefix)."""
    if not listening(REDIS_HOST, REDIS_PORT):
        unavailable(f"Redis on {REDIS_HOST}:{REDIS_PORT}")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def unique_prefix() -> str:
    return "gwtest-" + uuid.uuid4().hex[:12]


def drop_prefix(url: str, prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        keys = list(r.scan_iter(match=prefix + ":*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()
