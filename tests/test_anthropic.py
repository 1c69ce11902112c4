"""Anthropic Messages through the gateway: auth, headers and query forwarded,
the upstream's own credential as x-api-key, SSE relayed as it comes, usage
(input = input + cache creation + cache read; output = the last cumulative
message_delta), errors in Anthropic's shape, and bad upstream behaviour."""

from __future__ import annotations

import gzip
import io

import aiohttp
import orjson
import pytest

from .conftest import PROTOCOL_MODELS, UPSTREAM_KEY, Gateway, GatewayFactory, Upstream, config_toml

MSG = "/v1/messages"


def body(model: str = "claude-test", stream: bool = False, text: str = "one two three four") -> dict[str, object]:
    return {"model": model, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": text}]}


def events(raw: bytes) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        out.append((lines[b"event"].decode(), orjson.loads(lines[b"data"])))
    return out


async def test_messages_pass_through_with_x_api_key(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await pgateway.key()
    raw = b'{"model":"claude-test",  "max_tokens":16, "messages":[{"role":"user","content":"a b c"}]}'
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31",
               "Content-Type": "application/json", "x-mock-cached": "7", "x-mock-cache-creation": "5",
               "x-mock-reasoning": "2"}
    async with http.post(pgateway.url + MSG + "?beta=true", data=raw, headers=headers) as r:
        assert r.status == 200
        msg = await r.json()
    assert msg["type"] == "message" and msg["content"][0]["text"] == "Hello from the mock upstream"
    sent = upstream.state.requests[-1]
    assert sent.body == raw and sent.query == "beta=true" and sent.path == MSG
    assert sent.headers["x-api-key"] == UPSTREAM_KEY
    assert "Authorization" not in sent.headers and key not in str(sent.headers)
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    (row,) = await pgateway.wait_usage(1)
    assert row["endpoint"] == MSG and row["status"] == 200 and row["stream"] == 0 and row["error_type"] is None
    assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"], row["reasoning_tokens"]) == (
        3 + 5 + 7, 5, 7, 2
    )
    assert (row["cache_write_tokens"], row["cache_write_1h_tokens"]) == (5, 0)
    # 3 plain at 3.0, 5 cache writes at 1.25 x 3.0, 7 cached at 0.3, 5 out at 15.0 (USD per 1M)
    assert row["cost"] == pytest.approx((3 * 3.0 + 5 * 3.75 + 7 * 0.3 + 5 * 15.0) / 1e6)


async def test_cache_writes_are_priced_apart_five_minute_and_one_hour(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    extra = PROTOCOL_MODELS.format(url=upstream.base_url) + """
[[models]]
name = "claude-priced"
routes = [{ upstream = "mock-anthropic", model = "claude-priced" }]
price = { input = 2.0, output = 10.0, cached_input = 0.2, cache_write = 3.0, cache_write_1h = 5.0 }
"""
    gw = await make_gateway(config_toml(upstream.base_url, extra))
    key = await gw.key()
    for model, stream in (("claude-priced", False), ("claude-priced", True), ("claude-test", False)):
        headers = {"x-api-key": key, "x-mock-cached": "7", "x-mock-cache-creation": "10",
                   "x-mock-cache-creation-1h": "4"}
        async with http.post(gw.url + MSG, json=body(model, stream, "a b c"), headers=headers) as r:
            assert r.status == 200
            await r.read()
    rows = await gw.wait_usage(3)
    for row in rows:
        assert (row["input_tokens"], row["cached_tokens"]) == (3 + 10 + 7, 7)
        assert (row["cache_write_tokens"], row["cache_write_1h_tokens"]) == (10, 4)
    out = 5 * 10.0
    explicit = (3 * 2.0 + 6 * 3.0 + 4 * 5.0 + 7 * 0.2 + out) / 1e6
    assert rows[0]["cost"] == pytest.approx(explicit) and rows[1]["cost"] == pytest.approx(explicit)
    # Unset: 5-minute writes at 1.25x input, 1-hour writes at 2x input.
    assert rows[2]["cost"] == pytest.approx((3 * 3.0 + 6 * 3.75 + 4 * 6.0 + 7 * 0.3 + 5 * 15.0) / 1e6)


async def test_bearer_auth_and_renamed_model(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await pgateway.key()
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(pgateway.url + MSG, json=body("claude-renamed"), headers=headers) as r:
        assert r.status == 200
    sent = orjson.loads(upstream.state.requests[-1].body)
    assert sent["model"] == "claude-upstream-name" and sent["messages"] == body()["messages"]


async def test_stream_relays_every_event_and_takes_last_cumulative_usage(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await pgateway.key()
    headers = {"x-api-key": key, "x-mock-chunks": "6", "x-mock-deltas": "3", "x-mock-cached": "4",
               "x-mock-cache-creation": "1", "x-mock-delay-ms": "10"}
    async with http.post(pgateway.url + MSG, json=body(stream=True), headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        chunks = [c async for c in r.content.iter_any()]
    evs = events(b"".join(chunks))
    names = [n for n, _ in evs]
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * 6,
                     "content_block_stop", "message_delta", "message_delta", "message_delta", "message_stop"]
    assert all(n == d["type"] for n, d in evs)
    assert len(chunks) >= 6, "deltas 10 ms apart arrive one by one"
    # message_delta output counts are cumulative: 2, 4, 6 -> 6, not 12.
    (row,) = await pgateway.wait_usage(1)
    assert row["stream"] == 1 and row["status"] == 200 and row["error_type"] is None
    assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"]) == (4 + 1 + 4, 6, 4)


@pytest.mark.parametrize(
    ("data", "headers", "status", "kind"),
    [
        (b'{"model":"claude-test"}', {}, 401, "authentication_error"),
        (b"{oops", None, 400, "invalid_request_error"),
        (b'[{"model":"claude-test"}]', None, 400, "invalid_request_error"),
        (b'{"max_tokens":1}', None, 400, "invalid_request_error"),
        (b'{"model":"nope"}', None, 404, "not_found_error"),
        (b'{"model":"claude-test","pad":"' + b"x" * (2 << 20) + b'"}', None, 413, "request_too_large"),
    ],
)
async def test_gateway_errors_in_anthropic_shape(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession,
    data: bytes, headers: dict[str, str] | None, status: int, kind: str,
) -> None:
    if headers is None:
        headers = {"x-api-key": await pgateway.key()}
    async with http.post(pgateway.url + MSG, data=io.BytesIO(data), headers=headers) as r:
        assert r.status == status
        err = await r.json()
    assert err["type"] == "error" and err["error"]["type"] == kind and err["error"]["message"]
    assert upstream.state.requests == []
    (row,) = await pgateway.wait_usage(1)
    assert row["status"] == status and row["endpoint"] == MSG


async def test_upstream_error_status_relayed_unchanged(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    async with http.post(pgateway.url + MSG, json=body(), headers={"x-api-key": key, "x-mock-status": "529"}) as r:
        assert r.status == 529
        assert (await r.json())["error"]["type"] == "overloaded_error"
    (row,) = await pgateway.wait_usage(1)
    assert row["status"] == 529


async def test_error_event_mid_stream_is_relayed_and_recorded(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    headers = {"x-api-key": key, "x-mock-fail": "error", "x-mock-chunks": "6", "x-mock-cached": "2"}
    async with http.post(pgateway.url + MSG, json=body(stream=True), headers=headers) as r:
        assert r.status == 200
        evs = events(await r.read())
    assert evs[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert [n for n, _ in evs].count("content_block_delta") == 3
    (row,) = await pgateway.wait_usage(1)
    # What was seen: message_start's input usage and its output count.
    assert row["status"] == 200 and row["error_type"] == "upstream_stream_error"
    assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"]) == (4 + 2, 2, 1)


async def test_stream_without_final_events_is_recorded_as_incomplete(
    pgateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await pgateway.key()
    async with http.post(pgateway.url + MSG, json=body(stream=True),
                         headers={"x-api-key": key, "x-mock-fail": "truncate"}) as r:
        names = [n for n, _ in events(await r.read())]
    assert names[-1] == "content_block_stop"
    (row,) = await pgateway.wait_usage(1)
    assert row["status"] == 200 and row["error_type"] == "upstream_incomplete_stream"
    assert row["input_tokens"] == 4


async def test_upstream_gone_mid_stream_cuts_the_stream(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(pgateway.url + MSG, json=body(stream=True),
                             headers={"x-api-key": key, "x-mock-fail": "midstream", "x-mock-chunks": "8"}) as r:
            async for chunk in r.content.iter_any():
                received += chunk
    assert b"message_start" in received and b"message_stop" not in received
    (row,) = await pgateway.wait_usage(1)
    assert row["status"] == 502 and row["error_type"] == "upstream_disconnected" and row["input_tokens"] == 4


@pytest.mark.parametrize("stream", [False, True])
async def test_gzip_despite_identity_relayed_as_sent_and_usage_read(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession, stream: bool
) -> None:
    key = await pgateway.key()
    async with http.post(pgateway.url + MSG, json=body(stream=stream), auto_decompress=False,
                         headers={"x-api-key": key, "x-mock-fail": "gzip", "x-mock-cached": "3"}) as r:
        assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
        data = gzip.decompress(await r.read())
    assert upstream.state.requests[-1].headers["Accept-Encoding"] == "identity"
    assert (b"message_stop" in data) is stream
    (row,) = await pgateway.wait_usage(1)
    assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"]) == (4 + 3, 5, 3)
    assert row["error_type"] is None


async def test_ten_thousand_event_stream(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    async with http.post(pgateway.url + MSG, json=body(stream=True),
                         headers={"x-api-key": key, "x-mock-chunks": "10000", "x-mock-deltas": "5"}) as r:
        data = await r.read()  # counted whole: a chunk boundary may fall inside "event: "
    assert data.count(b"event: ") == 10000 + 10
    (row,) = await pgateway.wait_usage(1)
    assert row["output_tokens"] == 10000 and row["input_tokens"] == 4 and row["error_type"] is None
