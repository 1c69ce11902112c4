"""Redis failing in the ways an outage really does (connections cut while
a request is in flight, a broken or hostile reply), against the promise of
``redis.failure = "closed"``: a key never gets past its limits because
Redis was away, and nothing crashes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from .conftest import GatewayFactory, Upstream, config_toml
from .services import RedisServer, own_redis, unique_prefix
from .test_limits import chat, workspace_key
from .test_redis_limits import redis_section


class Proxy:
    """A TCP proxy in front of Redis that can cut every connection and
    refuse new ones for a while (an outage that leaves Redis's data)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.down = False

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.down:
            cw.close()
            return
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers |= {cw, uw}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

    def cut(self) -> None:
        self.down = True
        for w in self.writers:
            w.close()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    server: RedisServer
    with own_redis() as server:
        p = Proxy(server.port)
        await p.start()
        yield p
        await p.close()


async def test_settles_lost_in_an_outage_still_count(
        make_gateway: GatewayFactory, upstream: Upstream, proxy: Proxy, http: aiohttp.ClientSession) -> None:
    """A request admitted before an outage and finished during it: its
    tokens (and spend) used to be dropped with the failed settle pipeline,
    and Redis, which kept its month hash, never learnt them: after the
    outage the workspace got past its quota by that much, with failure =
    "closed". They are sent again once Redis answers."""
    toml = config_toml(upstream.base_url, redis_section(proxy.url, unique_prefix(), 'failure = "closed"'))
    gw = await make_gateway(toml.replace("key_refresh_ms = 100", "key_refresh_ms = 600000"))
    key = await workspace_key(gw, "quota", tokens=40)
    assert (await chat(http, gw, key, words=5, chunks=10))[0] == 200  # 15 tokens
    slow = asyncio.create_task(chat(http, gw, key, words=5, chunks=10, **{"x-mock-head-delay-ms": "400"}))
    await asyncio.sleep(0.2)  # admitted, waiting for its answer
    proxy.cut()
    assert (await slow)[0] == 200  # 30 tokens; its settle fails
    await asyncio.sleep(0.1)
    proxy.down = False
    await asyncio.sleep(0.6)  # past retry_s (0.2): Redis answers again
    assert (await chat(http, gw, key, words=5, chunks=10))[0] == 200  # 30 < 40: admitted, 45 now
    await asyncio.sleep(0.1)
    status, _, body = await chat(http, gw, key)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"


class Hostile:
    """A server on Redis's port that answers every command with ``reply``."""

    def __init__(self) -> None:
        self.reply = b"+OK\r\n"
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while await r.read(65536):
                w.write(self.reply)
                await w.drain()
        w.close()


REPLIES = {
    "status": b"+OK\r\n",
    "short array": b"*2\r\n:0\r\n:0\r\n",
    "strings": b"*7\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n$1\r\ne\r\n$1\r\nf\r\n$1\r\ng\r\n",
    "bad integer": b":abc\r\n",
    "unknown type": b"%1\r\n+a\r\n+b\r\n",
    "nested": b"*1\r\n" * 100_000 + b":1\r\n",
    "huge length": b"$99999999999999999999\r\n",
}


@pytest.mark.parametrize("failure", ["closed", "open"])
async def test_hostile_redis_replies(make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession,
                                     failure: str, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever Redis answers, a limited request is never a 500: a reply
    that is not the admission script's is a Redis failure, refused (503)
    with failure = "closed" and admitted on local limits with "open"."""
    hostile = Hostile()
    await hostile.start()
    try:
        toml = config_toml(upstream.base_url, redis_section(hostile.url, unique_prefix(), f'failure = "{failure}"'))
        gw = await make_gateway(toml)
        key = await gw.key(rpm=1000)
        for name, reply in REPLIES.items():
            hostile.reply = reply
            await asyncio.sleep(0.25)  # past retry_s: Redis is asked again
            status, _, body = await chat(http, gw, key)
            want = 503 if failure == "closed" else 200
            assert status == want, (name, body)
        rows = await gw.wait_usage(len(REPLIES))
        assert all(r["status"] != 500 for r in rows)
        assert "Traceback" not in caplog.text and "unhandled" not in caplog.text
    finally:
        assert hostile.server is not None
        hostile.server.close()


async def test_refused_sign_in_leaves_no_connection_open(
        make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    """A Redis that refuses the configured password (rotated, mistyped):
    each admission used to open a connection, fail its AUTH and leave it
    open, one more every ``retry_s`` for as long as it lasted, until the
    worker (or Redis) ran out of file descriptors."""
    import redis.asyncio as aioredis

    with own_redis() as server:
        admin = aioredis.Redis(port=server.port)
        try:
            await admin.config_set("requirepass", "right-password")
            await admin.execute_command("AUTH", "right-password")
            toml = config_toml(upstream.base_url, redis_section(
                f"redis://:wrong-password@127.0.0.1:{server.port}/0", unique_prefix(), 'failure = "closed"'))
            gw = await make_gateway(toml)
            key = await gw.key(rpm=1000)
            before = (await admin.info("clients"))["connected_clients"]
            for _ in range(8):
                await asyncio.sleep(0.25)  # past retry_s: Redis is asked again
                status, _, body = await chat(http, gw, key)
                assert status == 503 and body["error"]["code"] == "limits_unavailable"
            await asyncio.sleep(0.1)
            after = (await admin.info("clients"))["connected_clients"]
            assert after - before <= 1
        finally:
            await admin.aclose()
