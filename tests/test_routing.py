"""Routing across several real mock upstreams: weights, failover, circuit
breakers, 429 cool-downs, attempt and time bounds, timeouts, cancellation."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.config import ConfigError, RoutingConfig, parse_config

from .conftest import FakeClock, Gateway, GatewayFactory, Upstream, UpstreamFactory, upstream_toml

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def config(upstreams: list[tuple[str, str, str]], routes: str, extra: str = "") -> str:
    """A config with the given (name, base_url, extra keys) upstreams and one
    model ``m`` with ``routes`` (a TOML array body)."""
    ups = "".join(upstream_toml(n, url, x) for n, url, x in upstreams)
    return f"""
[server]
host = "127.0.0.1"
port = 0
key_refresh_ms = 100
[usage]
flush_interval_ms = 20
{extra}
{ups}
[[models]]
name = "m"
routes = [{routes}]
price = {{ input = 1.0, output = 2.0 }}
"""


def route(upstream: str, weight: float = 1, priority: int = 0) -> str:
    return f'{{ upstream = "{upstream}", model = "m", weight = {weight}, priority = {priority} }},'


async def circuit_states(gw: Gateway, http: aiohttp.ClientSession) -> dict[str, float]:
    async with http.get(gw.url + "/metrics") as r:
        text = await r.text()
    return {m[1]: float(m[2]) for m in re.finditer(r'gateway_circuit_state\{upstream="([^"]+)"\} (\S+)', text)}


async def post(http: aiohttp.ClientSession, gw: Gateway, key: str, **headers: str) -> tuple[int, bytes]:
    async with http.post(gw.url + CHAT, json=BODY, headers={**auth(key), **headers}) as r:
        return r.status, await r.read()


async def test_weights_hold_over_2000_requests(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    ups = [await make_upstream() for _ in range(4)]
    names = ["a", "b", "c", "backup"]
    gw = await make_gateway(config(
        [(n, u.base_url, "") for n, u in zip(names, ups, strict=True)],
        route("a", 1) + route("b", 2) + route("c", 5) + route("backup", 100, priority=1),
    ))
    key = await gw.key()
    n = 2000
    sem = asyncio.Semaphore(64)
    statuses: Counter[int] = Counter()

    async def one() -> None:
        async with sem, http.post(gw.url + CHAT, data=b'{"model":"m"}', headers=auth(key)) as r:
            await r.read()
            statuses[r.status] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.monotonic() - t0
    assert statuses == {200: n}
    got = [len(u.state.requests) for u in ups]
    assert sum(got) == n and got[3] == 0, got  # the lower-priority tier is never needed
    for count, weight in zip(got, (1, 2, 5), strict=False):
        assert abs(count / n - weight / 8) < 0.035, (got, elapsed)
    rows = await gw.wait_usage(n)
    assert Counter(r["upstream"] for r in rows) == {"a": got[0], "b": got[1], "c": got[2]}


async def test_dead_upstream_fails_over_opens_breaker_and_probe_closes_it(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    dead = await make_upstream()
    port = dead.port
    await dead.running.runner.cleanup()  # nothing listens there any more
    good = await make_upstream()
    clock = FakeClock()
    gw = await make_gateway(config(
        [("dead", dead.base_url, "breaker_failures = 3\nbreaker_cooldown_s = 30"), ("good", good.base_url, "")],
        route("dead", priority=0) + route("good", priority=1),
    ), clock=clock)
    key = await gw.key()
    assert await circuit_states(gw, http) == {"dead": 0.0, "good": 0.0}

    for _ in range(6):
        status, body = await post(http, gw, key)
        assert status == 200, body  # no client-visible error
    assert len(good.state.requests) == 6
    assert (await circuit_states(gw, http))["dead"] == 2.0  # open
    rows = await gw.wait_usage(6)
    assert [(r["status"], r["upstream"], r["error_type"]) for r in rows] == [(200, "good", None)] * 6

    # The upstream comes back; while the cool-down runs it is still skipped.
    revived = await make_upstream(port=port)
    assert (await post(http, gw, key))[0] == 200
    assert revived.state.requests == []
    # After the cool-down one probe goes to it; success closes the breaker.
    clock.advance(31)
    assert (await post(http, gw, key))[0] == 200
    assert len(revived.state.requests) == 1
    assert (await circuit_states(gw, http))["dead"] == 0.0
    for _ in range(3):
        assert (await post(http, gw, key))[0] == 200
    assert len(revived.state.requests) == 4 and len(good.state.requests) == 7


async def test_breaker_counts_5xx_allows_one_probe_and_reopens_on_failure(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    flaky = await make_upstream(steer={"x-mock-status": "500"})
    good = await make_upstream()
    clock = FakeClock()
    gw = await make_gateway(config(
        [("flaky", flaky.base_url, "breaker_failures = 2\nbreaker_cooldown_s = 10"), ("good", good.base_url, "")],
        route("flaky", priority=0) + route("good", priority=1),
    ), clock=clock)
    key = await gw.key()
    for _ in range(4):
        assert (await post(http, gw, key))[0] == 200
    assert len(flaky.state.requests) == 2  # two failures opened it; then skipped, not tried

    # Probe fails: open again for another cool-down.
    clock.advance(11)
    assert (await post(http, gw, key))[0] == 200
    assert len(flaky.state.requests) == 3
    assert (await circuit_states(gw, http))["flaky"] == 2.0
    assert (await post(http, gw, key))[0] == 200
    assert len(flaky.state.requests) == 3

    # Healthy but slow: of several concurrent requests, exactly one probes it.
    flaky.state.steer = {"x-mock-head-delay-ms": "300"}
    clock.advance(11)
    results = await asyncio.gather(*(post(http, gw, key) for _ in range(5)))
    assert [s for s, _ in results] == [200] * 5
    assert len(flaky.state.requests) == 4
    assert (await circuit_states(gw, http))["flaky"] == 0.0
    flaky.state.steer = {}
    assert (await post(http, gw, key))[0] == 200
    assert len(flaky.state.requests) == 5


async def test_route_answering_429_is_skipped_for_its_cooldown(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    busy = await make_upstream(steer={"x-mock-status": "429", "x-mock-retry-after": "20"})
    other = await make_upstream()
    clock = FakeClock()
    gw = await make_gateway(config(
        [("busy", busy.base_url, "breaker_failures = 1"), ("other", other.base_url, "")],
        route("busy", priority=0) + route("other", priority=1),
    ), clock=clock)
    key = await gw.key()
    for _ in range(4):
        assert (await post(http, gw, key))[0] == 200
    assert len(busy.state.requests) == 1  # Retry-After: 20 honoured
    assert len(other.state.requests) == 4
    assert (await circuit_states(gw, http))["busy"] == 0.0  # a 429 is not a breaker failure
    clock.advance(19)
    assert (await post(http, gw, key))[0] == 200
    assert len(busy.state.requests) == 1
    clock.advance(2)
    busy.state.steer = {}
    assert (await post(http, gw, key))[0] == 200
    assert len(busy.state.requests) == 2


async def test_only_route_429_is_relayed_then_gateway_answers_429_during_cooldown(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    busy = await make_upstream(steer={"x-mock-status": "429"})  # no Retry-After: the default cool-down
    clock = FakeClock()
    gw = await make_gateway(config([("busy", busy.base_url, "rate_limit_cooldown_s = 8")], route("busy")),
                            clock=clock)
    key = await gw.key()
    async with http.post(gw.url + CHAT, json=BODY, headers=auth(key)) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "mock_429"  # the upstream's own answer
    async with http.post(gw.url + CHAT, json=BODY, headers=auth(key)) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "upstream_rate_limited"
        assert r.headers["Retry-After"] == "8"
    assert len(busy.state.requests) == 1
    clock.advance(8)
    busy.state.steer = {}
    assert (await post(http, gw, key))[0] == 200
    rows = await gw.wait_usage(3)
    assert [r["status"] for r in rows] == [429, 429, 200]
    assert rows[1]["error_type"] == "upstream_rate_limited" and rows[1]["upstream"] is None


async def test_attempts_are_bounded_and_body_is_replayed(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    ups = [await make_upstream(steer={"x-mock-status": "503"}) for _ in range(3)]
    gw = await make_gateway(config(
        [(f"u{i}", u.base_url, "") for i, u in enumerate(ups)],
        route("u0", priority=0) + route("u1", priority=1) + route("u2", priority=2),
        extra="[routing]\nmax_attempts = 2",
    ))
    key = await gw.key()
    raw = b'{"model": "m",  "messages": [], "pad": "\xc3\xa9"}'
    async with http.post(gw.url + CHAT, data=raw, headers=auth(key)) as r:
        assert r.status == 503  # the last upstream answer, relayed
        assert (await r.json())["error"]["code"] == "mock_503"
    assert [len(u.state.requests) for u in ups] == [1, 1, 0]
    assert ups[0].state.requests[0].body == ups[1].state.requests[0].body == raw
    (row,) = await gw.wait_usage(1)
    assert (row["status"], row["upstream"]) == (503, "u1")


async def test_retry_budget_stops_further_attempts(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    slow = await make_upstream(steer={"x-mock-status": "500", "x-mock-head-delay-ms": "400"})
    spare = await make_upstream()
    gw = await make_gateway(config(
        [("slow", slow.base_url, ""), ("spare", spare.base_url, "")],
        route("slow", priority=0) + route("spare", priority=1),
        extra="[routing]\nretry_budget_s = 0.2",
    ))
    key = await gw.key()
    status, _ = await post(http, gw, key)
    assert status == 500
    assert spare.state.requests == []


async def test_first_byte_timeout_fails_over(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    stuck = await make_upstream(steer={"x-mock-head-delay-ms": "5000"})
    spare = await make_upstream()
    gw = await make_gateway(config(
        [("stuck", stuck.base_url, "first_byte_timeout_s = 0.3"), ("spare", spare.base_url, "")],
        route("stuck", priority=0) + route("spare", priority=1),
    ))
    key = await gw.key()
    t0 = time.monotonic()
    assert (await post(http, gw, key))[0] == 200
    assert time.monotonic() - t0 < 2
    assert len(stuck.state.requests) == 1 and len(spare.state.requests) == 1


async def test_stalled_stream_is_cut_after_idle_timeout(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    up = await make_upstream()
    gw = await make_gateway(config([("up", up.base_url, "idle_timeout_s = 0.3")], route("up")))
    key = await gw.key()
    body = {"model": "m", "stream": True, "messages": []}
    t0 = time.monotonic()
    async with http.post(gw.url + CHAT, json=body,
                         headers={**auth(key), "x-mock-fail": "stall", "x-mock-chunks": "6"}) as r:
        assert r.status == 200
        data = await r.read()  # the stream ends: no hang, no error
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 2.0
    assert b"Hello" in data and b"[DONE]" not in data
    (row,) = await gw.wait_usage(1)
    assert (row["status"], row["error_type"], row["stream"]) == (504, "upstream_idle_timeout", 1)
    for _ in range(100):
        if up.state.disconnects:
            break
        await asyncio.sleep(0.02)
    assert up.state.disconnects == 1  # the stalled upstream request is closed


async def test_client_disconnect_cancels_slow_non_streaming_request(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await gateway.key()
    timeout = aiohttp.ClientTimeout(total=0.3)
    try:
        async with http.post(gateway.url + CHAT, json={"model": "gpt-test"}, timeout=timeout,
                             headers={**auth(key), "x-mock-head-delay-ms": "5000"}) as r:
            await r.read()
        raise AssertionError("the client should have given up")
    except TimeoutError:
        pass
    t0 = time.monotonic()
    (row,) = await gateway.wait_usage(1)
    assert (row["status"], row["error_type"]) == (499, "client_disconnected")
    while not upstream.state.disconnects and time.monotonic() - t0 < 2:
        await asyncio.sleep(0.02)
    assert upstream.state.disconnects == 1, "the upstream request must be cancelled at once"
    assert time.monotonic() - t0 < 1


async def test_breaker_state_survives_reload(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    flaky = await make_upstream(steer={"x-mock-status": "500"})
    good = await make_upstream()
    ups = [("flaky", flaky.base_url, "breaker_failures = 1\nbreaker_cooldown_s = 60"), ("good", good.base_url, "")]
    toml = config(ups, route("flaky", priority=0) + route("good", priority=1))
    gw = await make_gateway(toml, clock=FakeClock())
    key = await gw.key()
    assert (await post(http, gw, key))[0] == 200
    await gw.reload(toml.replace('name = "m"', 'name = "m"\nowned_by = "reloaded"'))
    assert (await post(http, gw, key))[0] == 200
    assert len(flaky.state.requests) == 1
    async with http.get(gw.url + "/v1/models/m", headers=auth(key)) as r:
        assert orjson.loads(await r.read())["owned_by"] == "reloaded"


def test_routing_and_breaker_keys_are_validated_and_documented() -> None:
    up = {"name": "u", "kind": "openai", "base_url": "http://127.0.0.1:1/v1"}
    cfg = parse_config({"upstreams": [{**up, "breaker_failures": 2, "breaker_cooldown_s": 1.5}],
                        "routing": {"max_attempts": 5, "retry_budget_s": 2}}, env={})
    assert (cfg.upstreams[0].breaker_failures, cfg.upstreams[0].breaker_cooldown_s) == (2, 1.5)
    assert (cfg.routing.max_attempts, cfg.routing.retry_budget_s) == (5, 2.0)
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.breaker_failures: must be >= 1"):
        parse_config({"upstreams": [{**up, "breaker_failures": 0}]}, env={})
    with pytest.raises(ConfigError, match=r"routing\.max_attempts: must be >= 1"):
        parse_config({"routing": {"max_attempts": 0}}, env={})
    with pytest.raises(ConfigError, match=r"routing\.retries: unknown key"):
        parse_config({"routing": {"retries": 1}}, env={})

    root = Path(__file__).resolve().parent.parent
    example = (root / "config.example.toml").read_text()
    doc = (root / "docs" / "routing-limits.md").read_text()
    keys = [f.name for f in fields(RoutingConfig)] + [
        "connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s", "timeout_s", "breaker_failures",
        "breaker_cooldown_s", "rate_limit_cooldown_s", "rate_limit_cooldown_max_s",
    ]
    for k in keys:
        assert k in example and k in doc, k
