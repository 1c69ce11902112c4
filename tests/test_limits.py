"""Per-key and per-workspace limits and cost, through the real gateway: each
limit rejects at its configured figure with 429 + Retry-After and recovers
when the (injected) clock moves the window."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from typing import Any

import aiohttp
import pytest

from gateway.auth import KeyInfo
from gateway.config import ModelConfig, Price, Route
from gateway.context import RequestContext
from gateway.limits import month_bounds
from gateway.protocols.base import Usage
from gateway.store import queries

from .conftest import FakeClock, Gateway, GatewayFactory, Upstream, UpstreamFactory, config_toml

CHAT = "/v1/chat/completions"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def chat(
    http: aiohttp.ClientSession, gw: Gateway, key: str, *, words: int = 5, chunks: int = 10, **headers: str
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One chat request costing ``words`` input and ``chunks`` output tokens."""
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": " ".join(["w"] * words)}]}
    async with http.post(gw.url + CHAT, json=body,
                         headers={**auth(key), "x-mock-chunks": str(chunks), **headers}) as r:
        names = [k.lower() for k in r.headers]
        assert len(names) == len(set(names)), "no header twice"
        return r.status, dict(r.headers), await r.json()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def gw(make_gateway: GatewayFactory, upstream: Upstream, clock: FakeClock) -> Gateway:
    return await make_gateway(config_toml(upstream.base_url), clock=clock)


async def rejections(gw: Gateway, http: aiohttp.ClientSession) -> dict[str, float]:
    async with http.get(gw.url + "/metrics") as r:
        text = await r.text()
    return {m[1]: float(m[2]) for m in re.finditer(r'gateway_rate_limit_rejections_total\{reason="([^"]+)"\} (\S+)',
                                                   text)}


async def workspace_key(gw: Gateway, name: str, *, spend: float | None = None, tokens: int | None = None) -> str:
    def create(conn: sqlite3.Connection) -> None:
        ws = queries.create_workspace(conn, name)
        conn.execute("UPDATE workspaces SET monthly_spend_limit = ?, monthly_token_limit = ? WHERE id = ?",
                     (spend, tokens, ws["id"]))

    await gw.write(create)
    return await gw.key(workspace=name)


async def test_rpm(gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession, clock: FakeClock) -> None:
    key = await gw.key(rpm=3)
    for remaining, reset in ((2, "1m0s"), (1, "50s"), (0, "40s")):
        status, headers, _ = await chat(http, gw, key)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert headers["x-ratelimit-reset-requests"] == reset  # until the oldest leaves the window
        clock.advance(10)
    status, headers, body = await chat(http, gw, key)
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
    assert "3 requests per minute" in body["error"]["message"]
    assert headers["Retry-After"] == "30"  # the first request leaves the window at t=60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "30s"
    assert len(upstream.state.requests) == 3
    # Another key of the same workspace is not affected.
    other = await gw.key(rpm=3)
    assert (await chat(http, gw, other))[0] == 200

    clock.advance(30)  # the first request ages out: one slot frees
    assert (await chat(http, gw, key))[0] == 200
    assert (await chat(http, gw, key))[0] == 429
    clock.advance(60)
    assert (await chat(http, gw, key))[0] == 200
    rows = await gw.wait_usage(8)
    assert [r["status"] for r in rows if r["key_id"] == rows[0]["key_id"]] == [200, 200, 200, 429, 200, 429, 200]
    assert [r["error_type"] for r in rows if r["status"] == 429] == ["rate_limit_exceeded"] * 2
    assert (await rejections(gw, http))["rpm"] == 2


async def test_tpm_settles_recorded_tokens(gw: Gateway, http: aiohttp.ClientSession, clock: FakeClock) -> None:
    key = await gw.key(tpm=20)
    status, headers, _ = await chat(http, gw, key, words=5, chunks=10)  # 15 tokens
    assert status == 200 and headers["x-ratelimit-remaining-tokens"] == "20"
    assert "x-ratelimit-limit-requests" not in headers
    clock.advance(5)
    status, headers, _ = await chat(http, gw, key, words=5, chunks=10)  # 15 < 20: admitted, now 30
    assert status == 200
    assert headers["x-ratelimit-limit-tokens"] == "20" and headers["x-ratelimit-remaining-tokens"] == "5"
    assert headers["x-ratelimit-reset-tokens"] == "55s"
    status, headers, body = await chat(http, gw, key)
    assert status == 429 and "20 tokens per minute" in body["error"]["message"]
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["Retry-After"] == "55"  # the first 15 age out; 15 left is under 20
    clock.advance(55)
    assert (await chat(http, gw, key, words=1, chunks=1))[0] == 200
    assert (await rejections(gw, http))["tpm"] == 1


async def test_streamed_tokens_count_too(gw: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gw.key(tpm=10)
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "a b c d e f"}]}
    async with http.post(gw.url + CHAT, json=body, headers={**auth(key), "x-mock-chunks": "6"}) as r:
        assert r.status == 200 and r.headers["x-ratelimit-remaining-tokens"] == "10"
        await r.read()
    assert (await chat(http, gw, key))[0] == 429


async def test_concurrency(gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await gw.key(max_concurrency=2)
    slow = [asyncio.create_task(chat(http, gw, key, **{"x-mock-head-delay-ms": "400"})) for _ in range(2)]
    while len(upstream.state.requests) < 2:
        await asyncio.sleep(0.01)
    status, headers, body = await chat(http, gw, key)
    assert status == 429 and body["error"]["code"] == "concurrency_limit_exceeded"
    assert headers["Retry-After"] == "1"
    assert [s for s, _, _ in await asyncio.gather(*slow)] == [200, 200]
    assert (await chat(http, gw, key))[0] == 200  # slots are freed when requests end
    # Failed requests free their slot too.
    for _ in range(3):
        assert (await chat(http, gw, key, **{"x-mock-status": "500"}))[0] == 500
    assert (await chat(http, gw, key))[0] == 200
    assert (await rejections(gw, http))["concurrency"] == 1


async def test_workspace_token_quota_until_next_month(
    gw: Gateway, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    key = await workspace_key(gw, "quota-ws", tokens=30)
    key2 = await gw.key(workspace="quota-ws")
    assert (await chat(http, gw, key))[0] == 200  # 15
    assert (await chat(http, gw, key2))[0] == 200  # 30: the quota is the workspace's
    status, headers, body = await chat(http, gw, key)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    assert "monthly token quota" in body["error"]["message"]
    month_end = month_bounds(clock.now)[1]
    assert int(headers["Retry-After"]) == pytest.approx(month_end - clock.now, abs=1)
    assert (await chat(http, gw, key2))[0] == 429
    other = await gw.key(workspace="someone-else")
    assert (await chat(http, gw, other))[0] == 200
    clock.now = month_end + 1
    assert (await chat(http, gw, key))[0] == 200
    assert (await rejections(gw, http))["workspace_tokens"] == 2


async def test_spend_limits_use_cost_and_survive_restart(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    toml = config_toml(upstream.base_url)
    gw = await make_gateway(toml, clock=clock)
    # gpt-test: 1 USD / 1M input, 2 USD / 1M output; 5 in + 10 out = 25e-6 USD.
    key = await gw.key(spend_limit=40e-6)
    ws_key = await workspace_key(gw, "spend-ws", spend=60e-6)
    for _ in range(2):
        assert (await chat(http, gw, key))[0] == 200
    status, _, body = await chat(http, gw, key)
    assert status == 429 and "monthly spend limit" in body["error"]["message"]
    for _ in range(3):  # 25, 50, 75 (the third is admitted at 50 < 60)
        assert (await chat(http, gw, ws_key))[0] == 200
    status, _, body = await chat(http, gw, ws_key)
    assert status == 429 and "monthly spend quota" in body["error"]["message"]
    await gw.stop()

    # A restart loads this month's spend from the usage table.
    gw2 = await make_gateway(toml, clock=clock)
    await gw2.wait_key_live(key)
    assert (await chat(http, gw2, key))[0] == 429
    assert (await chat(http, gw2, ws_key))[0] == 429
    clock.now = month_bounds(clock.now)[1] + 1
    assert (await chat(http, gw2, key))[0] == 200
    assert (await chat(http, gw2, ws_key))[0] == 200
    assert (await rejections(gw2, http)) == {"key_spend": 1, "workspace_spend": 1}


async def test_cost_on_every_row_with_cached_price_and_group_ratio(gw: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gw.key(group="cheap")  # ratio 0.5
    assert (await chat(http, gw, key, words=5, chunks=10, **{"x-mock-cached": "2"}))[0] == 200
    assert (await chat(http, gw, key, **{"x-mock-status": "500"}))[0] == 500
    assert (await chat(http, gw, "gw-not-a-key"))[0] == 401
    ok, failed, unauth = await gw.wait_usage(3)
    # 3 uncached input at 1.0, 2 cached at 0.5, 10 output at 2.0, per 1M; times 0.5.
    assert ok["cost"] == pytest.approx((3 * 1.0 + 2 * 0.5 + 10 * 2.0) / 1e6 * 0.5)
    assert (ok["input_tokens"], ok["cached_tokens"], ok["output_tokens"]) == (5, 2, 10)
    assert failed["cost"] == 0 and unauth["cost"] == 0


def _key(ratio: float = 1.0) -> KeyInfo:
    return KeyInfo(1, 1, "w", "k", "gw-x", "g", ratio, frozenset(), None, None, None, None, None, None, None)


@pytest.mark.parametrize(
    ("price", "usage", "ratio", "expected"),
    [
        (Price(input=2.0, output=8.0), Usage(input_tokens=1000, output_tokens=500), 1.0, 0.006),
        # No cached price: cached input is billed as input.
        (Price(input=2.0), Usage(input_tokens=1000, cached_tokens=400), 1.0, 0.002),
        (Price(input=2.0, cached_input=0.5), Usage(input_tokens=1000, cached_tokens=400), 1.0, 0.0014),
        # Per image, and per 1M video tokens, times the ratio.
        (Price(image=0.04), Usage(images=3), 2.0, 0.24),
        (Price(video=10.0), Usage(video_tokens=250_000), 0.5, 1.25),
    ],
)
def test_cost_formula(price: Price, usage: Usage, ratio: float, expected: float) -> None:
    ctx = RequestContext("r", 0.0, key=_key(ratio), model_cfg=ModelConfig("m", (Route("u", "m"),), price),
                         usage=usage)
    assert ctx.cost() == pytest.approx(expected)


async def test_key_without_limits_gets_no_ratelimit_headers(gw: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gw.key()
    status, headers, _ = await chat(http, gw, key)
    assert status == 200
    assert not any(h.lower().startswith("x-ratelimit") for h in headers)


async def test_gateway_error_after_admission_still_carries_ratelimit_headers(
    make_gateway: GatewayFactory, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    gone = await make_upstream()
    await gone.running.runner.cleanup()
    gw = await make_gateway(config_toml(gone.base_url))
    key = await gw.key(rpm=5)
    status, headers, body = await chat(http, gw, key)
    assert status == 502 and body["error"]["code"] == "upstream_unreachable"
    assert headers["x-ratelimit-remaining-requests"] == "4"


async def test_rpm_applies_to_video_task_endpoints(make_gateway: GatewayFactory, upstream: Upstream,
                                                   http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(config_toml(upstream.base_url))
    key = await gw.key(rpm=2)
    headers = {"Authorization": f"Bearer {key}"}
    statuses = []
    for _ in range(3):
        async with http.get(gw.url + "/v1/video/tasks/vt_unknown", headers=headers) as r:
            statuses.append(r.status)
    assert statuses == [404, 404, 429]
