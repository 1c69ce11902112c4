"""Redis failing in the ways an outage really does (connections cut while
a request is in flight, a broken or hostile reply), against the promise of
``redis.failure = "closed"``: a key never gets past its limits because
Redis was away, and nothing crashes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest
import redis.asyncio as aioredis

from .conftest import Gateway, GatewayFactory, Upstream, config_toml
from .services import RedisServer, own_redis, unique_prefix
from .test_limits import chat, workspace_key
from .test_redis_limits import redis_section, slow_sync


class Proxy:
    """A TCP proxy in front of Redis that can cut every connection and
    refuse new ones for a while (an outage that leaves Redis's data), or
    lose the next reply Redis sends: ``lose_next = "cut"`` drops it and cuts
    that connection (Redis ran the command, the connection died before its
    answer arrived), ``"late"`` holds it (and what follows) for 0.4 s, past
    the gateway's timeout_ms."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.down = False
        self.lose_next: str | None = None

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

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, replies: bool = False) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    if replies and self.lose_next is not None:
                        lose, self.lose_next = self.lose_next, None
                        if lose == "cut":
                            cw.close()
                            uw.close()
                            return
                        await asyncio.sleep(0.4)
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(cr, uw), pipe(ur, cw, replies=True))

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


def month_key(prefix: str) -> str:
    return f"{prefix}:q:{datetime.now(UTC):%Y%m}"


def workspace_ids(gw: Gateway) -> dict[str, int]:
    return {r[1]: r[0] for r in gw.conn.execute("SELECT id, name FROM workspaces").fetchall()}


@pytest.mark.parametrize("lost", ["cut", "late"])
async def test_settle_whose_reply_is_lost_counts_once(
        make_gateway: GatewayFactory, upstream: Upstream, proxy: Proxy, http: aiohttp.ClientSession,
        lost: str) -> None:
    """Redis applies a settle batch, and its reply never reaches the
    gateway (the connection cut, or the reply later than timeout_ms). The
    batch is sent again: it used to be counted twice (a MULTI/EXEC sent
    anew), so the workspace hit its token quota early: false 429s."""
    prefix = unique_prefix()
    toml = config_toml(upstream.base_url, redis_section(proxy.url, prefix, 'failure = "closed"'))
    gw = await make_gateway(slow_sync(toml))
    key = await workspace_key(gw, "quota", tokens=40)
    assert (await chat(http, gw, key, words=5, chunks=10))[0] == 200  # 15 tokens
    await asyncio.sleep(0.1)  # settled
    slow = asyncio.create_task(chat(http, gw, key, words=5, chunks=10, **{"x-mock-head-delay-ms": "300"}))
    await asyncio.sleep(0.15)  # admitted: the next command is its settle
    proxy.lose_next = lost
    assert (await slow)[0] == 200  # 30 tokens
    await asyncio.sleep(1.2)  # the settle sent again (retry_s 0.2), maybe more than once
    r = aioredis.Redis(port=proxy.port)
    try:
        field = f"w:{workspace_ids(gw)['quota']}:t"
        assert float(await r.hget(month_key(prefix), field) or 0) == 30
    finally:
        await r.aclose()
    assert (await chat(http, gw, key, words=5, chunks=10))[0] == 200  # 30 < 40: admitted, 45 now
    await asyncio.sleep(0.1)
    status, _, body = await chat(http, gw, key)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"


async def test_settle_on_a_key_of_the_wrong_type_is_dropped(
        make_gateway: GatewayFactory, upstream: Upstream, proxy: Proxy, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    """Something else wrote a key the settle batch writes (here a key's
    TPM hash, overwritten with a string while its request ran): Redis
    refuses that one command. The batch used to fail whole and be sent
    again every retry_s, for ever, the rest of it applied each time: other
    keys' and workspaces' tokens counted again and again. Now the refused
    command is dropped with one log line and everything else counts once."""
    prefix = unique_prefix()
    gw = await make_gateway(slow_sync(config_toml(upstream.base_url, redis_section(proxy.url, prefix))))
    bad = await gw.key("a", tpm=100_000)
    good = await gw.key("b", tpm=100_000)
    (bad_id,) = [r[0] for r in gw.conn.execute(
        "SELECT k.id FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id WHERE w.name = 'a'").fetchall()]
    ws = workspace_ids(gw)
    r = aioredis.Redis(port=proxy.port)
    try:
        slow = asyncio.create_task(chat(http, gw, bad, **{"x-mock-head-delay-ms": "300"}))
        await asyncio.sleep(0.15)  # admitted
        await r.set(f"{prefix}:t:{bad_id}", "not a hash")
        assert (await slow)[0] == 200
        assert (await chat(http, gw, good))[0] == 200
        await asyncio.sleep(1.0)  # retry_s (0.2) five times over
        assert (await chat(http, gw, good))[0] == 200
        await asyncio.sleep(0.1)
        month = month_key(prefix)
        assert float(await r.hget(month, f"w:{ws['a']}:t") or 0) == 15
        assert float(await r.hget(month, f"w:{ws['b']}:t") or 0) == 30
    finally:
        await r.aclose()
    refused = [m for m in caplog.messages if "refused a settle" in m]
    assert len(refused) == 1 and f"{prefix}:t:{bad_id}" in refused[0] and "WRONGTYPE" in refused[0]
    assert "redis unreachable" not in caplog.text


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
