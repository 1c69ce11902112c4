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
import threading
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


# ------------------------------------------------------------------ PostgreSQL


def _pg_admin(sql: str, port: int = PG_PORT, host: str = PG_HOST) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(host=host, port=port, user=PG_USER, database="postgres", timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    # A thread of its own: the caller may be inside a running event loop.
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(run())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=main)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def pg_url(name: str, port: int = PG_PORT, host: str = PG_HOST) -> str:
    return f"postgresql://{PG_USER}@{host}:{port}/{name}"


@contextlib.contextmanager
def fresh_database(port: int = PG_PORT, host: str = PG_HOST) -> Iterator[str]:
    """A new, empty database on the machine's PostgreSQL, dropped after."""
    if not listening(host, port):
        unavailable(f"PostgreSQL on {host}:{port}")
    name = "gwtest_" + uuid.uuid4().hex[:12]
    _pg_admin(f"CREATE DATABASE {name}", port, host)
    try:
        yield pg_url(name, port, host)
    finally:
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", port, host)


@dataclass
class PgCluster:
    """A PostgreSQL server of the test's own (initdb in a temporary
    directory, a free port), which it may restart."""

    port: int
    directory: Path
    bindir: Path
    user: str | None  # run the server as this user (root may not)

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self.user, "--", *cmd] if self.user else cmd

    def init(self) -> None:
        if self.user:
            shutil.chown(self.directory, self.user)
        subprocess.run(self._cmd("initdb", "-D", str(self.directory / "data"), "-U", PG_USER, "-A", "trust",
                                 "--no-sync"), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(self._cmd("pg_ctl", "-D", str(self.directory / "data"), "-o", opts, "-w", "-l",
                                 str(self.directory / "log"), "start"), check=True, stdout=subprocess.DEVNULL)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(self._cmd("pg_ctl", "-D", str(self.directory / "data"), "-m", mode, "-w", "stop"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def url(self, name: str = "postgres") -> str:
        return pg_url(name, self.port, "127.0.0.1")


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl") or shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    return versions[-1] if versions else None


@contextlib.contextmanager
def own_postgres() -> Iterator[PgCluster]:
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        unavailable("PostgreSQL server binaries (initdb, pg_ctl)")
    assert bindir is not None
    user = "postgres" if os.geteuid() == 0 else None
    directory = Path(tempfile.mkdtemp(prefix="gw-pg-"))
    cluster = PgCluster(free_port(), directory, bindir, user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
