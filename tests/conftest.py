"""The one place tests build gateways and fake upstreams.

Everything runs on real sockets: the mock upstream (gateway.mock.app) and the
gateway itself are started with the same ``start_app`` the CLI uses, with a
real SQLite file in ``tmp_path``. Tests never reach into app internals; they
talk HTTP, read the database, and look at what the mock upstream recorded.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from aiohttp import web

from gateway.access import HASHER
from gateway.config import Config, load_config
from gateway.mock.app import create_mock_app
from gateway.mock.common import MOCK, MockState
from gateway.mock.volcengine import MOCK_ACCESS_KEY, MOCK_SECRET_KEY
from gateway.server import Running, start_app, start_gateway
from gateway.store import queries, users
from gateway.store.schema import connect

from . import services

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
PASSWORD = "correct horse battery"  # console users made by Gateway.add_user


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
    _conn: sqlite3.Connection | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.db_path)
        return self._conn

    def create_key(self, workspace: str = "acme", *, conn: sqlite3.Connection | None = None, **kw: Any) -> str:
        """A new key (plaintext) in ``workspace``, created if missing.
        Keyword arguments: name, group, models, and KeyLimits fields."""
        conn = conn or self.conn
        try:
            ws = queries.find_workspace(conn, workspace)
        except queries.NotFoundError:
            ws = queries.create_workspace(conn, workspace)
        limit_fields = {k: kw.pop(k) for k in list(kw) if k in queries.KeyLimits.__slots__}
        _, plaintext = queries.create_key(conn, ws["id"], limits=queries.KeyLimits(**limit_fields), **kw)
        return plaintext

    async def add_user(self, email: str, password: str | None = PASSWORD, *, admin: bool = False,
                       name: str = "", **roles: str) -> int:
        """A console user (``password`` None: invited, not yet active), with
        ``workspace=role`` memberships (workspaces created if missing);
        returns the user id. Off the event loop: argon2 takes ~0.1 s."""

        def run(conn: sqlite3.Connection) -> int:
            hashed = None if password is None else HASHER.hash(password)
            u = users.create_user(conn, email, now=time.time(), name=name, password_hash=hashed, is_admin=admin)
            for ws, role in roles.items():
                try:
                    ws_id = queries.find_workspace(conn, ws)["id"]
                except queries.NotFoundError:
                    ws_id = queries.create_workspace(conn, ws)["id"]
                users.set_membership(conn, u["id"], ws_id, role, time.time())
            return int(u["id"])

        return int(await self.write(run))

    async def write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(conn)`` on a fresh connection in a thread. A write from the
        event loop thread could wait on the gateway's usage writer, which
        needs that same loop to commit: a deadlock until busy_timeout."""

        def run() -> Any:
            conn = connect(self.db_path)
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
        self.config.source.write_text(toml)
        return await reload_config(self.running.runner.app)


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


@pytest.fixture
async def make_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GatewayFactory]:
    """Start gateways from TOML text; all are stopped at the end of the test."""
    started: list[Gateway] = []
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("MOCK_VOLC_AK", MOCK_ACCESS_KEY)
    monkeypatch.setenv("MOCK_VOLC_SK", MOCK_SECRET_KEY)

    async def make(toml: str, name: str = "gateway.toml", *, clock: Callable[[], float] | None = None) -> Gateway:
        path = tmp_path / name
        path.write_text(toml)
        cfg = load_config(path)
        running = await start_gateway(cfg, clock=clock)
        gw = Gateway(running, cfg, cfg.database.path)
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
