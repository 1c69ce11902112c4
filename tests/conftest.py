"""The one place tests build gateways and fake upstreams.

Everything runs on real sockets: the mock upstream (gateway.mock.app) and the
gateway itself are started with the same ``start_app`` the CLI uses, with a
real SQLite file in ``tmp_path``. Tests never reach into app internals; they
talk HTTP, read the database, and look at what the mock upstream recorded.

``pytest --db=postgres`` runs every gateway ``make_gateway`` starts on a
fresh PostgreSQL database instead (the machine's server, see
tests/services.py; a copy of one migrated template per SQLite path a test
names, dropped after). ``Gateway.conn`` then speaks PostgreSQL behind
sqlite3's ``execute``. Markers (pyproject.toml), each skipped on PostgreSQL
with its reason: ``sqlite_only`` for tests about SQLite itself,
``pg_pending`` for a failure on PostgreSQL not fixed yet (none left).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from aiohttp import web

from gateway.config import Config, load_config
from gateway.mock.app import create_mock_app
from gateway.mock.common import MOCK, MockState
from gateway.mock.volcengine import MOCK_ACCESS_KEY, MOCK_SECRET_KEY
from gateway.passwords import HASHER
from gateway.server import Running, start_app, start_gateway
from gateway.store import catalog, queries, users
from gateway.store.schema import connect
from gateway.store.sql import numbered
from gateway.store.tx import Tx, run_sqlite

from . import services

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
PASSWORD = "correct horse battery"  # console users made by Gateway.add_user

ON_POSTGRES = "the test suite runs on PostgreSQL (--db=postgres)"
SKIPS = {
    "sqlite_only": "about SQLite itself (its file, locks, WAL, spool of an SQLite install)",
    "pg_pending": "fails on PostgreSQL, not fixed yet",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db", choices=("sqlite", "postgres"), default="sqlite",
        help="database of the gateways tests start: sqlite (a file in tmp_path, the default) or postgres "
             "(a fresh database per test on the machine's PostgreSQL; tests/services.py)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--db") != "postgres":
        return
    for item in items:
        for name, default in SKIPS.items():
            mark = item.get_closest_marker(name)
            if mark is not None:
                reason = mark.args[0] if mark.args else mark.kwargs.get("reason", default)
                item.add_marker(pytest.mark.skip(reason=f"{name}: {reason}"))
                break


# ------------------------------------------------------------------ PostgreSQL for make_gateway


class PgBridge:
    """An event loop in a thread of its own, so that tests can use
    PostgreSQL synchronously (like sqlite3) from inside the test's loop."""

    def __init__(self, template: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pg-bridge", daemon=True)
        self.thread.start()
        # Copies of the template are made ahead and dropped after by threads
        # of their own: either can take a second on a busy server, and no
        # test need wait for it.
        self.template = template
        self.closing = threading.Event()
        # Set while a test that may use PostgreSQL runs: the threads work only
        # then, so that a test without a database (a tracemalloc bound, a
        # timing) never shares the process with them.
        self.active = threading.Event()
        self.ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=2)
        self.maker = threading.Thread(target=self._make, name="pg-maker", daemon=True)
        self.maker.start()
        self.doomed: queue.Queue[str | None] = queue.Queue()
        self.dropper = threading.Thread(target=self._drop, name="pg-dropper", daemon=True)
        self.dropper.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def _idle(self) -> bool:
        """Wait a little for a test that may use PostgreSQL; True while there is none."""
        return not self.active.wait(0.2) and not self.closing.is_set()

    def _make(self) -> None:
        while not self.closing.is_set():
            if self._idle():
                continue
            name = "gwtest_" + uuid.uuid4().hex[:12]
            made: str | BaseException = name
            try:
                services._pg_admin(f"CREATE DATABASE {name} TEMPLATE {self.template}")
            except BaseException as e:
                made = e
            while not self.closing.is_set():
                try:
                    self.ready.put(made, timeout=0.2)
                    break
                except queue.Full:
                    continue
            else:
                if isinstance(made, str):
                    self.doomed.put(made)

    def database(self) -> str:
        """A fresh copy of the template (its name)."""
        made = self.ready.get(timeout=120)
        if isinstance(made, BaseException):
            raise made
        return made

    def _drop(self) -> None:
        while (name := self.doomed.get()) is not None:
            while self._idle():
                pass
            with contextlib.suppress(Exception):
                services._pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        self.closing.set()
        self.maker.join()
        while not self.ready.empty():
            made = self.ready.get()
            if isinstance(made, str):
                self.doomed.put(made)
        self.doomed.put(None)
        self.dropper.join()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class PgRow(tuple[Any, ...]):
    """A row as sqlite3.Row gives it: by index, by name, and ``dict(row)``."""

    names: tuple[str, ...] = ()

    def __getitem__(self, k: Any) -> Any:  # type: ignore[override]
        if isinstance(k, str):
            return tuple.__getitem__(self, self.names.index(k))
        return tuple.__getitem__(self, k)

    def keys(self) -> list[str]:
        return list(self.names)


def _plain(v: Any) -> Any:
    # SUM over BIGINT is NUMERIC in PostgreSQL: back to what SQLite gives.
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return v


class PgCursor:
    def __init__(self, connection: PgConn, rows: list[PgRow], lastrowid: Any = None) -> None:
        self.connection = connection
        self.rows = rows
        self.lastrowid = lastrowid

    def fetchone(self) -> PgRow | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[PgRow]:
        return self.rows

    def __iter__(self) -> Iterator[PgRow]:
        return iter(self.rows)


class PgConn:
    """The part of sqlite3.Connection tests use, on a PostgreSQL database:
    ``execute`` with ``?`` placeholders (autocommit), rows like sqlite3.Row.
    ``store`` is a PgStore on the same database (on the bridge's loop)."""

    def __init__(self, bridge: PgBridge, url: str) -> None:
        import asyncpg

        from gateway.store.postgres.store import PgStore

        self.bridge = bridge
        self.url = url
        # Not PgStore.open: its migration and partition DDL could wait on a
        # transaction of the gateway, which cannot go on while this thread
        # blocks the test's (and so the gateway's) event loop.
        async def pool() -> asyncpg.Pool:
            return await asyncpg.create_pool(url, min_size=1, max_size=2, timeout=10)

        self.store: Any = PgStore(url, bridge.run(pool()))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PgCursor:
        import asyncpg

        sql = numbered(sql)

        async def run() -> tuple[list[PgRow], Any]:
            async with self.store.pool.acquire() as conn:
                lastrowid = None
                if sql.lstrip().upper().startswith("INSERT") and "RETURNING" not in sql.upper():
                    # sqlite3's lastrowid: the id of the row inserted, where the table has one.
                    try:
                        lastrowid = await conn.fetchval(sql + " RETURNING id", *params)
                        return [], lastrowid
                    except asyncpg.UndefinedColumnError:
                        pass
                stmt = await conn.prepare(sql)
                names = tuple(a.name for a in stmt.get_attributes())
                records = await stmt.fetch(*params)
            rows = []
            for r in records:
                row = PgRow(_plain(v) for v in r)
                row.names = names
                rows.append(row)
            return rows, lastrowid

        rows, lastrowid = self.bridge.run(run())
        return PgCursor(self, rows, lastrowid)

    def commit(self) -> None:
        pass

    def close(self) -> None:
        self.bridge.run(self.store.close())


@dataclass
class PgDatabases:
    """The test's PostgreSQL databases, one per SQLite path its gateways
    name (two gateways on one path share one database, as they would share
    the file), each a copy of the session's migrated template."""

    bridge: PgBridge
    by_path: dict[Path, str] = field(default_factory=dict)

    def url_for(self, path: Path) -> str:
        if path not in self.by_path:
            self.by_path[path] = services.pg_url(self.bridge.database())
        return self.by_path[path]

    def drop(self) -> None:
        for url in self.by_path.values():
            self.bridge.doomed.put(url.rsplit("/", 1)[1])
        self.by_path.clear()


def with_database_url(toml: str, url: str) -> str:
    """``toml`` with ``url`` set in its [database] table (added if missing),
    unless it is there already."""
    if url in toml:
        return toml
    if re.search(r"^\[database\]", toml, re.M) is None:
        return toml + f'\n[database]\nurl = "{url}"\n'
    return re.sub(r"^\[database\][^\n]*\n", lambda m: m.group(0) + f'url = "{url}"\n', toml, count=1, flags=re.M)


@pytest.fixture(scope="session")
def pg_template(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """Under --db=postgres, one migrated database per session that each
    test's databases are copied from (CREATE DATABASE ... TEMPLATE)."""
    if request.config.getoption("--db") != "postgres":
        yield None
        return
    if not services.listening(services.PG_HOST, services.PG_PORT):
        services.unavailable(f"PostgreSQL on {services.PG_HOST}:{services.PG_PORT} (--db=postgres)")
    name = "gwtest_tpl_" + uuid.uuid4().hex[:12]
    services._pg_admin(f"CREATE DATABASE {name}")

    async def migrate() -> None:
        import asyncpg

        from gateway.store.postgres import schema, usage

        conn = await asyncpg.connect(services.pg_url(name), timeout=10)
        try:
            await schema.migrate(conn)
            await usage.ahead(conn)
        finally:
            await conn.close()

    try:
        asyncio.run(migrate())
        yield name
    finally:
        services._pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def pg_bridge(pg_template: str | None) -> Iterator[PgBridge | None]:
    if pg_template is None:
        yield None
        return
    bridge = PgBridge(pg_template)
    yield bridge
    bridge.close()


@dataclass
class Upstream:
    """A running mock upstream and what it recorded."""

    running: Running
    state: MockState
    app: web.Application | None = None

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def base_url(self) -> str:
        return self.running.url + "/v1"

    @property
    def port(self) -> int:
        return self.running.port


@dataclass
class Gateway:
    """A running gateway built from a TOML config written to tmp_path."""

    running: Running
    config: Config
    db_path: Path
    _conn: Any = field(default=None, repr=False)  # sqlite3.Connection, or PgConn on PostgreSQL
    bridge: PgBridge | None = field(default=None, repr=False)  # on PostgreSQL

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def postgres(self) -> bool:
        return self.config.database.url is not None

    @property
    def conn(self) -> Any:
        """sqlite3.Connection on the gateway's database; on PostgreSQL a
        PgConn that takes the same ``execute(sql, params)`` calls."""
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> Any:
        if self.config.database.url is None:
            return connect(self.db_path)
        assert self.bridge is not None, "a gateway on PostgreSQL outside make_gateway"
        return PgConn(self.bridge, self.config.database.url)

    def create_key(self, workspace: str = "acme", *, conn: Any = None, **kw: Any) -> str:
        """A new key (plaintext) in ``workspace``, created if missing.
        Keyword arguments: name, group, models, and KeyLimits fields."""
        return create_key(conn or self.conn, workspace, **kw)

    async def add_user(self, email: str, password: str | None = PASSWORD, *, admin: bool = False,
                       name: str = "", **roles: str) -> int:
        """A console user (``password`` None: invited, not yet active), with
        ``workspace=role`` memberships (workspaces created if missing);
        returns the user id. Off the event loop: argon2 takes ~0.1 s."""
        async def body(tx: Tx, hashed: str | None) -> int:
            u = await users.create_user(tx, email, now=time.time(), name=name, password_hash=hashed, is_admin=admin)
            for ws, role in roles.items():
                try:
                    ws_id = (await catalog.find_workspace(tx, ws))["id"]
                except queries.NotFoundError:
                    ws_id = (await catalog.create_workspace(tx, ws))["id"]
                await users.set_membership(tx, u["id"], ws_id, role, time.time())
            return int(u["id"])

        def run(conn: Any) -> int:
            hashed = None if password is None else HASHER.hash(password)
            if isinstance(conn, PgConn):
                return int(conn.bridge.run(conn.store.run(lambda tx: body(tx, hashed), write=True)))
            return run_sqlite(conn, lambda tx: body(tx, hashed), write=True)

        return int(await self.write(run))

    async def write(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(conn)`` on a fresh connection in a thread. A write from the
        event loop thread could wait on the gateway's usage writer, which
        needs that same loop to commit: a deadlock until busy_timeout."""

        def run() -> Any:
            conn = self._connect()
            try:
                return fn(conn)
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    async def key(self, workspace: str = "acme", **kw: Any) -> str:
        """Like create_key (off the event loop), then waits until the running
        gateway knows it."""
        plaintext: str = await self.write(lambda conn: self.create_key(workspace, conn=conn, **kw))
        await self.wait_key_live(plaintext)
        return plaintext

    async def wait_key_live(self, plaintext: str, timeout: float = 5.0) -> None:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                headers = {"Authorization": f"Bearer {plaintext}", "x-request-id": "keycheck"}
                async with s.get(self.url + "/v1/models", headers=headers) as r:
                    if r.status == 200:
                        return
                await asyncio.sleep(0.05)
        raise AssertionError("key never became live")

    def usage_rows(self) -> list[dict[str, Any]]:
        """Usage rows, less those of wait_key_live's own polling."""
        sql = "SELECT * FROM usage_events WHERE request_id != 'keycheck' ORDER BY id"
        return [dict(r) for r in self.conn.execute(sql)]

    def db_bytes(self) -> int:
        """The size of the gateway's tables and indexes: SQLite's pages (WAL
        checkpointed first), or PostgreSQL's relations."""
        if self.postgres:
            sql = ("SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                   "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'")
            return int(self.conn.execute(sql).fetchone()[0])
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        return int(pages * self.conn.execute("PRAGMA page_size").fetchone()[0])

    async def wait_usage(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The usage rows once at least ``n`` are written."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.usage_rows()
            if len(rows) >= n or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.running.runner.server is not None:
            await self.running.runner.cleanup()

    async def reload(self, toml: str) -> Config:
        """Rewrite the config file and reload it as the admin API would."""
        from gateway.reload import reload_config

        assert self.config.source is not None
        if self.config.database.url is not None:
            toml = with_database_url(toml, self.config.database.url)
        self.config.source.write_text(toml)
        return await reload_config(self.running.runner.app)


def create_key(conn: Any, workspace: str = "acme", **kw: Any) -> str:
    """A new key (plaintext) in ``workspace`` (created if missing) on a
    sqlite3 connection or a PgConn; see Gateway.create_key."""
    if isinstance(conn, PgConn):
        return str(conn.bridge.run(_pg_create_key(conn.store, workspace, kw)))
    try:
        ws = queries.find_workspace(conn, workspace)
    except queries.NotFoundError:
        ws = queries.create_workspace(conn, workspace)
    limit_fields = {k: kw.pop(k) for k in list(kw) if k in queries.KeyLimits.__slots__}
    _, plaintext = queries.create_key(conn, ws["id"], limits=queries.KeyLimits(**limit_fields), **kw)
    return plaintext


def revoke_key(conn: Any, key_id: int) -> None:
    """Revoke a key on a sqlite3 connection or a PgConn."""
    if isinstance(conn, PgConn):
        conn.bridge.run(conn.store.run(lambda tx: catalog.revoke_key(tx, key_id), write=True))
    else:
        queries.revoke_key(conn, key_id)


async def _pg_create_key(store: Any, workspace: str, kw: dict[str, Any]) -> str:
    from gateway.store.base import ConflictError, KeyLimits, NotFoundError

    try:
        ws = await store.run(lambda tx: catalog.find_workspace(tx, workspace))
    except NotFoundError:
        try:
            ws = await store.run(lambda tx: catalog.create_workspace(tx, workspace), write=True)
        except ConflictError:
            ws = await store.run(lambda tx: catalog.find_workspace(tx, workspace))
    limit_fields = {k: kw.pop(k) for k in list(kw) if k in KeyLimits.__slots__}
    _, plaintext = await store.run(lambda tx: catalog.create_key(tx, ws["id"], limits=KeyLimits(**limit_fields), **kw),
                                   write=True)
    return str(plaintext)


async def wait_for(pred: Callable[[], object], timeout: float = 15.0) -> None:
    """Poll ``pred`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


class FakeClock:
    """Wall time that only moves when a test says so; passed to the gateway
    (make_gateway(clock=...)) for rate-limit windows, quotas and breakers."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def upstream_toml(name: str, base_url: str, extra: str = "") -> str:
    """One [[upstreams]] entry for a mock upstream; ``extra`` holds more
    ``key = value`` lines (a key given there replaces the default)."""
    keys = {"connect_timeout_s": "2", "first_byte_timeout_s": "10", "idle_timeout_s": "10"}
    for line in extra.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            keys[k.strip()] = v.strip()
    lines = "\n".join(f"{k} = {v}" for k, v in keys.items())
    return f"""
[[upstreams]]
name = "{name}"
kind = "openai"
base_url = "{base_url}"
api_key_env = "MOCK_UPSTREAM_KEY"
{lines}
"""


def wire_upstreams(url: str, *protocols: str) -> str:
    """An ``[[upstreams]]`` entry ``wire-<protocol>`` on the mock at ``url``
    for each protocol named, speaking that one only: ``chat`` and
    ``responses`` (OpenAI), ``messages`` (Anthropic). For translated routes."""
    out = []
    for p in protocols:
        kind, only = ("anthropic", "") if p == "messages" else ("openai", f'protocols = ["{p}"]\n')
        out.append(f'\n[[upstreams]]\nname = "wire-{p}"\nkind = "{kind}"\n{only}base_url = "{url}"\n'
                   'api_key_env = "MOCK_UPSTREAM_KEY"\nidle_timeout_s = 10\n')
    return "".join(out)


def config_toml(upstream_url: str, extra: str = "", *, api_key_env: str = "MOCK_UPSTREAM_KEY") -> str:
    """A small config: one mock upstream and a few models on it."""
    return f"""
[server]
host = "127.0.0.1"
port = 0
max_body_mb = 1
graceful_timeout_s = 10
key_refresh_ms = 100

[database]
path = "gateway.db"

[usage]
flush_interval_ms = 20
batch_max = 500
queue_max = 10000

[[upstreams]]
name = "mock"
kind = "openai"
base_url = "{upstream_url}"
api_key_env = "{api_key_env}"
connect_timeout_s = 2
first_byte_timeout_s = 10
idle_timeout_s = 10

[[models]]
name = "gpt-test"
routes = [{{ upstream = "mock", model = "gpt-test" }}]
price = {{ input = 1.0, output = 2.0, cached_input = 0.5 }}

[[models]]
name = "renamed"
routes = [{{ upstream = "mock", model = "upstream-name" }}]

[[models]]
name = "org/model-with-slash"
routes = [{{ upstream = "mock", model = "org/model-with-slash" }}]

[[groups]]
name = "default"
models = ["*"]
ratio = 1.0

[[groups]]
name = "cheap"
models = ["gpt-*"]
ratio = 0.5
{extra}
"""


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """The bundled mock upstream, requiring UPSTREAM_KEY."""
    app = create_mock_app(UPSTREAM_KEY)
    running = await start_app(app, "127.0.0.1", 0, shutdown_timeout=1.0)
    yield Upstream(running, app[MOCK], app)
    await running.runner.cleanup()


UpstreamFactory = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def make_upstream() -> AsyncIterator[UpstreamFactory]:
    """Start more mock upstreams (``port=`` to restart one where it was);
    ``steer`` sets x-mock-* defaults for everything it answers. Upstreams
    still running at the end of the test are stopped."""
    started: list[Upstream] = []

    async def make(port: int = 0, steer: dict[str, str] | None = None) -> Upstream:
        app = create_mock_app(UPSTREAM_KEY)
        app[MOCK].steer.update(steer or {})
        running = await start_app(app, "127.0.0.1", port, shutdown_timeout=0.5)
        up = Upstream(running, app[MOCK])
        started.append(up)
        return up

    yield make
    for up in started:
        if up.running.runner.server is not None:
            await up.running.runner.cleanup()


GatewayFactory = Callable[..., Awaitable[Gateway]]


# The running test's databases under --db=postgres (one test at a time).
_current: list[PgDatabases] = []


def db_conn(db_path: Path) -> Any:
    """A connection to the database of ``[database] path = db_path``: the
    SQLite file, or under --db=postgres a PgConn on the running test's
    PostgreSQL database for that path (close it after)."""
    if not _current:
        return connect(db_path)
    dbs = _current[0]
    return PgConn(dbs.bridge, dbs.url_for(db_path))


@pytest.fixture
def pg_databases(pg_template: str | None, pg_bridge: PgBridge | None) -> Iterator[PgDatabases | None]:
    """Under --db=postgres, the test's databases (made on first use)."""
    if pg_template is None or pg_bridge is None:
        yield None
        return
    dbs = PgDatabases(pg_bridge)
    _current[:] = [dbs]
    pg_bridge.active.set()
    try:
        yield dbs
    finally:
        pg_bridge.active.clear()
        _current.clear()
        dbs.drop()


@dataclass
class ConfigFiles:
    """Config files in tmp_path for gateways a test starts itself (a
    subprocess, the CLI): under --db=postgres each names its test's
    PostgreSQL database for its ``[database] path``, as make_gateway's do."""

    directory: Path
    databases: PgDatabases | None

    def write(self, toml: str, name: str = "gateway.toml") -> Path:
        path = self.directory / name
        path.write_text(toml)
        if self.databases is not None:
            cfg = load_config(path)
            if cfg.database.url is None:
                path.write_text(with_database_url(toml, self.databases.url_for(cfg.database.path)))
        return path

    def conn(self, path: Path) -> Any:
        """A connection to the database of the config at ``path``: sqlite3,
        or a PgConn taking the same calls; close it after."""
        cfg = load_config(path)
        if cfg.database.url is None:
            return connect(cfg.database.path)
        assert self.databases is not None
        return PgConn(self.databases.bridge, cfg.database.url)

    def conn_for(self, db_path: Path) -> Any:
        """A connection to the database that configs naming ``[database]
        path = db_path`` use (the file itself without --db=postgres)."""
        return db_conn(db_path)

    def key(self, path: Path, workspace: str = "acme", **kw: Any) -> str:
        """A new key in the database of the config at ``path`` (no gateway needed)."""
        conn = self.conn(path)
        try:
            return create_key(conn, workspace, **kw)
        finally:
            conn.close()


@pytest.fixture
def config_files(tmp_path: Path, pg_databases: PgDatabases | None, monkeypatch: pytest.MonkeyPatch) -> ConfigFiles:
    """Configs in tmp_path (see ConfigFiles), and the mock upstreams' credentials in the environment."""
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("MOCK_VOLC_AK", MOCK_ACCESS_KEY)
    monkeypatch.setenv("MOCK_VOLC_SK", MOCK_SECRET_KEY)
    return ConfigFiles(tmp_path, pg_databases)


@pytest.fixture
async def make_gateway(
    config_files: ConfigFiles, pg_databases: PgDatabases | None
) -> AsyncIterator[GatewayFactory]:
    """Start gateways from TOML text; all are stopped at the end of the test.
    Under --db=postgres each runs on a fresh PostgreSQL database (one per
    ``[database] path``), unless the TOML sets a url itself."""
    started: list[Gateway] = []

    async def make(toml: str, name: str = "gateway.toml", *, clock: Callable[[], float] | None = None) -> Gateway:
        cfg = load_config(config_files.write(toml, name))
        running = await start_gateway(cfg, clock=clock)
        gw = Gateway(running, cfg, cfg.database.path, bridge=None if pg_databases is None else pg_databases.bridge)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        await gw.stop()
        if gw._conn is not None:
            gw._conn.close()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    """A gateway in front of the mock upstream with the default test config."""
    return await make_gateway(config_toml(upstream.base_url))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# The mock upstream a second time as an Anthropic-kind account (credential
# sent as x-api-key), with models for the Messages, Responses and Images tests.
PROTOCOL_MODELS = """
[[upstreams]]
name = "mock-anthropic"
kind = "anthropic"
base_url = "{url}"
api_key_env = "MOCK_UPSTREAM_KEY"
connect_timeout_s = 2
first_byte_timeout_s = 10
idle_timeout_s = 10

[[models]]
name = "claude-test"
routes = [{{ upstream = "mock-anthropic", model = "claude-test" }}]
price = {{ input = 3.0, output = 15.0, cached_input = 0.3 }}

[[models]]
name = "claude-renamed"
routes = [{{ upstream = "mock-anthropic", model = "claude-upstream-name" }}]

[[models]]
name = "gpt-image-test"
routes = [{{ upstream = "mock", model = "gpt-image-test" }}]
price = {{ input = 5.0, output = 40.0, image = 0.01 }}

[[models]]
name = "image-renamed"
routes = [{{ upstream = "mock", model = "gpt-image-upstream" }}]
"""


@pytest.fixture
async def pgateway(make_gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    """A gateway with the default test models plus PROTOCOL_MODELS."""
    return await make_gateway(config_toml(upstream.base_url, PROTOCOL_MODELS.format(url=upstream.base_url)))


@pytest.fixture
async def httpx_client() -> AsyncIterator[httpx2.AsyncClient]:
    # No proxy from the environment: the gateway is on 127.0.0.1.
    async with httpx2.AsyncClient(trust_env=False) as c:
        yield c


@pytest.fixture
async def oai(pgateway: Gateway, httpx_client: httpx2.AsyncClient) -> openai.AsyncOpenAI:
    key = await pgateway.key()
    return openai.AsyncOpenAI(base_url=pgateway.url + "/v1", api_key=key, http_client=httpx_client, max_retries=0)


@pytest.fixture
async def claude(pgateway: Gateway, httpx_client: httpx2.AsyncClient) -> anthropic.AsyncAnthropic:
    key = await pgateway.key()
    return anthropic.AsyncAnthropic(base_url=pgateway.url, api_key=key, http_client=httpx_client, max_retries=0)


ADMIN_TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
async def admin_gateway(make_gateway: GatewayFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    """The default test gateway with the admin API enabled (token ADMIN_TOKEN)."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    return await make_gateway(config_toml(upstream.base_url))


@pytest.fixture
def pg_database() -> Iterator[str]:
    """URL of a fresh database on the machine's PostgreSQL (dropped after)."""
    with services.fresh_database() as url:
        yield url
