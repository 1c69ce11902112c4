"""Limits shared through Redis (gateway.redis_limits): two gateways on one
database and one Redis admit together exactly what one would; Redis going
away fails open (local limits) or closed (503) as configured, and shared
limits resume when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.redis_limits import ADMIT_SHA, GRANT_TTL_S
from gateway.resp import RespClient

from .conftest import FakeClock, Gateway, GatewayFactory, Upstream, config_toml, wait_for
from .services import RedisServer, drop_prefix, own_redis, shared_redis_url, unique_prefix
from .test_limits import chat, workspace_key


def redis_section(url: str, prefix: str, extra: str = "") -> str:
    return f'\n[redis]\nurl = "{url}"\nkey_prefix = "{prefix}"\nretry_s = 0.2\n{extra}\n'


def slow_sync(toml: str) -> str:
    """No quota sync or key refresh through the database within a test:
    whatever one gateway learns of the other's traffic comes from Redis."""
    return toml.replace("key_refresh_ms = 100", "key_refresh_ms = 600000")


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    url, prefix = shared_redis_url(), unique_prefix()
    yield url, prefix
    drop_prefix(url, prefix)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with own_redis() as server:
        yield server


async def metric(gw: Gateway, http: aiohttp.ClientSession, name: str) -> dict[str, float]:
    async with http.get(gw.url + "/metrics") as r:
        text = await r.text()
    return {m[1] or "": float(m[2]) for m in re.finditer(rf'^{name}(?:\{{[^=]+="([^"]*)"\}})? (\S+)$', text, re.M)}


async def statuses(http: aiohttp.ClientSession, gws: list[Gateway], key: str, n: int) -> list[int]:
    """``n`` requests spread over ``gws``, all at once."""
    results = await asyncio.gather(*(chat(http, gws[i % len(gws)], key) for i in range(n)))
    return [r[0] for r in results]


@pytest.fixture
async def pair(
    make_gateway: GatewayFactory, upstream: Upstream, shared_redis: tuple[str, str]
) -> AsyncIterator[tuple[Gateway, Gateway, FakeClock]]:
    clock = FakeClock()
    toml = config_toml(upstream.base_url, redis_section(*shared_redis))
    a = await make_gateway(toml, "a.toml", clock=clock)
    b = await make_gateway(toml, "b.toml", clock=clock)
    yield a, b, clock


async def test_rpm_shared_by_two_gateways(
    pair: tuple[Gateway, Gateway, FakeClock], http: aiohttp.ClientSession
) -> None:
    a, b, clock = pair
    key = await a.key(rpm=5)
    await b.wait_key_live(key)
    got = await statuses(http, [a, b], key, 12)
    assert got.count(200) == 5 and got.count(429) == 7
    status, headers, body = await chat(http, b, key)
    assert status == 429 and "5 requests per minute" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60 and headers["x-ratelimit-remaining-requests"] == "0"
    clock.advance(61)
    got = await statuses(http, [b, a], key, 8)
    assert got.count(200) == 5
    # Every request, admitted or refused, has its usage row.
    rows = await a.wait_usage(21)
    assert sorted(r["status"] for r in rows) == sorted([200] * 10 + [429] * 11)


async def test_concurrency_shared(pair: tuple[Gateway, Gateway, FakeClock], http: aiohttp.ClientSession) -> None:
    a, b, _ = pair
    key = await a.key(max_concurrency=1)
    await b.wait_key_live(key)
    slow = asyncio.create_task(chat(http, a, key, **{"x-mock-head-delay-ms": "600"}))
    await asyncio.sleep(0.2)
    status, _, body = await chat(http, b, key)
    assert status == 429 and body["error"]["code"] == "concurrency_limit_exceeded"
    assert (await slow)[0] == 200
    deadline = time.monotonic() + 2
    while (status := (await chat(http, b, key))[0]) != 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # the release reaches Redis a few ms after the response
    assert status == 200


async def test_workspace_token_quota_across_gateways(
    make_gateway: GatewayFactory, upstream: Upstream, shared_redis: tuple[str, str], http: aiohttp.ClientSession
) -> None:
    setup = await make_gateway(config_toml(upstream.base_url), "setup.toml")
    key_a = await workspace_key(setup, "quota", tokens=20)
    key_b = await setup.key(workspace="quota")
    toml = slow_sync(config_toml(upstream.base_url, redis_section(*shared_redis)))
    a = await make_gateway(toml, "a.toml")  # both know the keys from their start
    b = await make_gateway(toml, "b.toml")
    assert (await chat(http, a, key_a, words=5, chunks=10))[0] == 200  # 15 tokens
    await asyncio.sleep(0.05)  # the settle pipeline (5 ms)
    assert (await chat(http, b, key_b, words=5, chunks=10))[0] == 200  # 15 < 20: admitted, now 30
    # Each admission under 75 % of the quota came with a grant: for
    # GRANT_TTL_S the gateway admits on its own count of the quota (15 for
    # each here). Past it, each asks Redis again and learns of the other's.
    await asyncio.sleep(GRANT_TTL_S + 0.05)
    for gw, key in ((a, key_a), (b, key_b)):
        status, _, body = await chat(http, gw, key)
        assert status == 429 and body["error"]["code"] == "insufficient_quota"
        assert "monthly token quota" in body["error"]["message"]


async def test_quota_seeded_from_database(
    make_gateway: GatewayFactory, upstream: Upstream, shared_redis: tuple[str, str], http: aiohttp.ClientSession
) -> None:
    """Spend recorded before Redis knew of it (another month's hash, a
    flushed Redis) counts: the first gateway to start seeds Redis."""
    a = await make_gateway(config_toml(upstream.base_url), "a.toml")
    key = await workspace_key(a, "seeded", tokens=20)
    assert (await chat(http, a, key, words=5, chunks=10))[0] == 200
    assert (await chat(http, a, key, words=5, chunks=10))[0] == 200  # 30 tokens recorded
    await a.wait_usage(2)
    await a.stop()
    b = await make_gateway(slow_sync(config_toml(upstream.base_url, redis_section(*shared_redis))), "b.toml")
    status, _, body = await chat(http, b, key)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"


async def test_fail_open_then_resume(
    make_gateway: GatewayFactory, upstream: Upstream, private_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    toml = config_toml(upstream.base_url, redis_section(private_redis.url, unique_prefix()))
    a = await make_gateway(toml, "a.toml", clock=clock)
    b = await make_gateway(toml, "b.toml", clock=clock)
    key = await a.key(rpm=3)
    await b.wait_key_live(key)
    assert (await statuses(http, [a, b], key, 4)).count(200) == 3
    await asyncio.sleep(0.05)  # the settles (5 ms) reach Redis: the outage is found by an admission

    private_redis.stop()
    clock.advance(61)
    # Each gateway now admits on its own limits: 3 a minute each.
    assert (await statuses(http, [a], key, 4)).count(200) == 3
    assert (await statuses(http, [b], key, 4)).count(200) == 3
    assert (await metric(a, http, "gateway_redis_up"))[""] == 0
    assert (await metric(a, http, "gateway_redis_errors_total"))["admit"] >= 1

    private_redis.start()  # empty: a new window
    await asyncio.sleep(0.3)  # past retry_s
    clock.advance(61)
    assert (await statuses(http, [a, b], key, 6)).count(200) == 3
    assert (await metric(b, http, "gateway_redis_up"))[""] == 1
    rows = await a.wait_usage(18)
    assert len(rows) == 18  # every request recorded, Redis or not


async def test_fail_closed(
    make_gateway: GatewayFactory, upstream: Upstream, private_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    toml = config_toml(upstream.base_url, redis_section(private_redis.url, unique_prefix(), 'failure = "closed"'))
    gw = await make_gateway(toml)
    limited = await gw.key(rpm=100)
    free = await gw.key()
    assert (await chat(http, gw, limited))[0] == 200
    private_redis.stop()
    # The permits Redis granted with that admission, taken in its window
    # before it went away, may be used for GRANT_TTL_S: then Redis is asked.
    await asyncio.sleep(GRANT_TTL_S + 0.05)
    status, headers, body = await chat(http, gw, limited)
    assert status == 503 and body["error"]["code"] == "limits_unavailable"
    assert headers["Retry-After"] == "1"
    assert (await chat(http, gw, free))[0] == 200  # a key without limits needs no Redis
    private_redis.start()
    await asyncio.sleep(0.3)
    assert (await chat(http, gw, limited))[0] == 200
    rows = await gw.wait_usage(4)
    assert [r["status"] for r in rows] == [200, 503, 200, 200]


async def test_redis_url_database_number(
    make_gateway: GatewayFactory, upstream: Upstream, shared_redis: tuple[str, str], http: aiohttp.ClientSession
) -> None:
    """The admission's own client (gateway.resp) honours the URL's database."""
    import redis.asyncio as aioredis

    url, prefix = shared_redis
    db3 = url.rsplit("/", 1)[0] + "/3"
    gw = await make_gateway(config_toml(upstream.base_url, redis_section(db3, prefix)))
    key = await gw.key(rpm=2)
    assert [(await chat(http, gw, key))[0] for _ in range(3)] == [200, 200, 429]
    r = aioredis.Redis.from_url(db3)
    try:
        assert [k async for k in r.scan_iter(match=prefix + ":r:*")]
        await r.delete(*[k async for k in r.scan_iter(match=prefix + ":*")])
    finally:
        await r.aclose()


async def test_busy_event_loop_is_not_an_unreachable_redis(
    make_gateway: GatewayFactory, upstream: Upstream, shared_redis: tuple[str, str], http: aiohttp.ClientSession
) -> None:
    """A reply that Redis sent in time but that the gateway read late (its
    event loop was busy, as on a CPU-starved host) is no failure of Redis:
    the shared limit holds, nothing fails open. (It did: every admission
    behind a stall longer than timeout_ms was admitted on the local limits
    of the instance, so two gateways let through twice the key's RPM.)"""
    clock = FakeClock()
    toml = config_toml(upstream.base_url, redis_section(*shared_redis, "timeout_ms = 50"))
    a = await make_gateway(toml, "a.toml", clock=clock)
    b = await make_gateway(toml, "b.toml", clock=clock)
    key = await a.key(rpm=2)
    await b.wait_key_live(key)
    busy = True

    async def hog() -> None:
        while busy:
            time.sleep(0.08)  # blocks the event loop for longer than timeout_ms
            await asyncio.sleep(0)

    task = asyncio.create_task(hog())
    try:
        got = await statuses(http, [a, b], key, 4)
    finally:
        busy = False
        await task
    assert got.count(200) == 2 and got.count(429) == 2
    for gw in (a, b):
        assert (await metric(gw, http, "gateway_redis_up"))[""] == 1
        assert "admit" not in await metric(gw, http, "gateway_redis_errors_total")


async def test_reply_read_late_is_not_a_timeout(shared_redis: tuple[str, str]) -> None:
    """The RESP client's timeout counts Redis's slowness only: a reply that
    arrived while the event loop was blocked is used when the loop gets to
    it (it raised TimeoutError)."""
    client = RespClient(shared_redis[0], 0.1)
    try:
        assert await client.call("PING") == "PONG"
        call = asyncio.ensure_future(client.call("PING"))
        await asyncio.sleep(0)  # the command is queued; its write comes next
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # then the loop blocks past the timeout
        assert await call == "PONG"
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def admissions(url: str, prefix: str) -> AsyncIterator[list[str]]:
    """The admission scripts Redis runs for keys under ``prefix`` while the
    block runs (MONITOR: what Redis received, not what the gateway says)."""
    seen: list[str] = []
    r = aioredis.Redis.from_url(url)
    started = asyncio.Event()

    async def watch() -> None:
        async with r.monitor() as m:
            started.set()
            async for c in m.listen():
                if ADMIT_SHA in c["command"] and prefix in c["command"]:
                    seen.append(c["command"])

    task = asyncio.create_task(watch())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.05)
    try:
        yield seen
        await asyncio.sleep(0.05)  # the last ones reach the monitor
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await r.aclose()


async def rpm_300_key(make_gateway: GatewayFactory, upstream: Upstream, shared_redis: tuple[str, str],
                      clock: FakeClock | None = None) -> tuple[Gateway, str, str]:
    """A gateway on the shared Redis, a key with rpm = 300, and the key of
    its RPM window in Redis."""
    url, prefix = shared_redis
    gw = await make_gateway(config_toml(upstream.base_url, redis_section(url, prefix)), clock=clock)
    key = await gw.key(rpm=300)
    (kid,) = [r[0] for r in gw.conn.execute("SELECT id FROM api_keys").fetchall()]
    return gw, key, f"{prefix}:r:{kid}"


async def test_grant_admits_without_asking_redis_until_its_ttl(
    make_gateway: GatewayFactory, upstream: Upstream, shared_redis: tuple[str, str], http: aiohttp.ClientSession
) -> None:
    """A key with rpm = 300: its first admission takes its own place and 32
    permits in the shared window at once; the next requests are admitted on
    them with no call to Redis, each moved to its own time in the window;
    the permits left at GRANT_TTL_S go back, and the next request asks Redis."""
    url, prefix = shared_redis
    gw, key, window = await rpm_300_key(make_gateway, upstream, shared_redis)
    r = aioredis.Redis.from_url(url)
    try:
        async with admissions(url, prefix) as seen:
            started = time.time()
            remaining = []
            for _ in range(10):
                status, headers, _ = await chat(http, gw, key)
                assert status == 200 and headers["x-ratelimit-limit-requests"] == "300"
                remaining.append(int(headers["x-ratelimit-remaining-requests"]))
                assert 0 < parse_duration(headers["x-ratelimit-reset-requests"]) <= 60
            assert remaining == list(range(299, 289, -1))
            assert await r.zcard(window) == 33  # one admission and its grant
            await wait_for(lambda: len(seen) >= 1, 2)  # (MONITOR's copy may come late on a busy host)
            assert len(seen) == 1
            await asyncio.sleep(0.05)  # the settle batch: permits used move to their request's time
            scores = [s for _, s in await r.zrange(window, 0, -1, withscores=True)]
            # The granting request and the 23 permits not used yet at the
            # grant's time; the 9 used, each at its own time: later, but to
            # the millisecond, so two (or the first and the grant) may share one.
            moved = [x for x in scores if x != scores[0]]
            assert 1 <= len(moved) <= 9 and all(x > scores[0] for x in moved)
            assert len(set(moved)) >= 3  # nine requests through a gateway take more than 3 ms
            assert all(started * 1000 <= s <= time.time() * 1000 for s in scores)
            await asyncio.sleep(GRANT_TTL_S)  # the grant ends: its 23 unused permits are given back
            assert await r.zcard(window) == 10
            assert (await chat(http, gw, key))[0] == 200
            assert await r.zcard(window) == 11 + 32  # past its TTL the grant is not used: a new one
            await wait_for(lambda: len(seen) == 2, 2)  # (MONITOR's copy may come late on a busy host)
    finally:
        await r.aclose()


async def test_grant_past_its_ttl_is_not_used_though_its_timer_is_late(
    make_gateway: GatewayFactory, upstream: Upstream, shared_redis: tuple[str, str], http: aiohttp.ClientSession
) -> None:
    """A grant ends GRANT_TTL_S after it was made on the limiter's clock,
    even when its timer has not run yet (a busy event loop runs timers
    late): the next request asks Redis, and the first grant's unused
    permits go back. (The timer alone ended grants: a request that came
    before it ran was admitted on a permit taken more than a TTL ago.)"""
    url, prefix = shared_redis
    clock = FakeClock()
    gw, key, window = await rpm_300_key(make_gateway, upstream, shared_redis, clock)
    r = aioredis.Redis.from_url(url)
    try:
        async with admissions(url, prefix) as seen:
            assert (await chat(http, gw, key))[0] == 200
            assert await r.zcard(window) == 1 + 32
            clock.advance(GRANT_TTL_S)  # the TTL is past on the clock; the real timer has ~1 s to go
            assert (await chat(http, gw, key))[0] == 200
            await wait_for(lambda: len(seen) == 2, 0.5)
        for _ in range(100):  # the first grant's 32 permits go back with the next settle batch
            if await r.zcard(window) == 2 + 32:
                break
            await asyncio.sleep(0.01)
        assert await r.zcard(window) == 2 + 32
    finally:
        await r.aclose()


def parse_duration(text: str) -> float:
    """OpenAI's reset format (gateway.limits.duration) back to seconds."""
    m = re.fullmatch(r"(?:(\d+)m)?([\d.]+)(ms|s)", text)
    assert m, text
    return int(m[1] or 0) * 60 + float(m[2]) / (1000 if m[3] == "ms" else 1)
