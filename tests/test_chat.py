"""Chat completions through the gateway: pass-through, streaming, usage rows,
and every kind of bad input, each with exactly one usage row."""

from __future__ import annotations

import asyncio
import io
import socket

import aiohttp
import orjson
import pytest

from .conftest import UPSTREAM_KEY, Gateway, GatewayFactory, Upstream, config_toml

CHAT = "/v1/chat/completions"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_non_streaming_pass_through(gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    # Odd spacing and key order: the body must arrive byte-identical.
    body = b'{ "messages": [{"role":"user","content":"one two three"}],   "model": "gpt-test", "x":1 }'
    headers = {
        **auth(key), "Content-Type": "application/json", "Cookie": "session=abc", "OpenAI-Beta": "assistants=v2",
        "Idempotency-Key": "idem-1", "User-Agent": "test-agent/1.0", "x-request-id": "req-123",
    }
    async with http.post(gateway.url + CHAT + "?trace=1", data=body, headers=headers) as r:
        assert r.status == 200
        data = await r.json()
        assert r.headers["x-request-id"] == "req-123"
        assert float(r.headers["x-gateway-overhead-ms"]) >= 0
    assert data["object"] == "chat.completion"
    assert data["usage"]["prompt_tokens"] == 3

    sent = upstream.state.requests[-1]
    assert sent.body == body
    assert sent.query == "trace=1"
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert key not in str(sent.headers)
    assert "Cookie" not in sent.headers
    assert sent.headers["OpenAI-Beta"] == "assistants=v2"
    assert sent.headers["Idempotency-Key"] == "idem-1"
    assert sent.headers["User-Agent"] == "test-agent/1.0"
    assert sent.headers["Accept-Encoding"] == "identity"

    (row,) = await gateway.wait_usage(1)
    assert row["status"] == 200 and row["model"] == "gpt-test" and row["upstream"] == "mock"
    assert (row["input_tokens"], row["output_tokens"]) == (3, 5)
    assert row["request_id"] == "req-123"
    assert row["stream"] == 0 and row["error_type"] is None
    # price: 1.0 / 2.0 USD per 1M tokens
    assert row["cost"] == pytest.approx((3 * 1.0 + 5 * 2.0) / 1e6)
    assert row["bytes_in"] == len(body) and row["bytes_out"] > 0
    assert row["ttfb_ms"] is not None and row["upstream_ms"] is not None and row["overhead_ms"] is not None


async def test_x_api_key_header_and_hop_by_hop_stripped(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await gateway.key()
    headers = {"x-api-key": key, "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "TE": "trailers",
               "Proxy-Authorization": "Basic Zm9v"}
    async with http.post(gateway.url + CHAT, json={"model": "gpt-test", "messages": []}, headers=headers) as r:
        assert r.status == 200
    sent = upstream.state.requests[-1].headers
    assert "x-api-key" not in {k.lower() for k in sent}
    for h in ("X-Secret-Hop", "TE", "Proxy-Authorization"):
        assert h not in sent
    assert sent["Authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_upstream_hop_by_hop_response_headers_stripped(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """What the upstream's Connection header names, Keep-Alive and Proxy-*
    stay between the gateway and the upstream; the rest reaches the client."""
    body = orjson.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-test", "choices": [],
                         "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}})

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                      if k.lower() == b"content-length")
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive, X-Up-Hop\r\n"
                     b"X-Up-Hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Agent: up/1\r\nX-Kept: yes\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await make_gateway(config_toml(f"http://127.0.0.1:{port}/v1"))
        key = await gw.key()
        async with http.post(gw.url + CHAT, json={"model": "gpt-test", "messages": []}, headers=auth(key)) as r:
            assert r.status == 200 and await r.read() == body
            assert r.headers["X-Kept"] == "yes" and r.headers["Content-Length"] == str(len(body))
            for h in ("X-Up-Hop", "Keep-Alive", "Proxy-Agent"):
                assert h not in r.headers, h
        row = (await gw.wait_usage(1))[0]
        assert (row["input_tokens"], row["output_tokens"]) == (4, 6)
    finally:
        server.close()
        await server.wait_closed()


async def test_renamed_model_rewrites_only_the_model(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + CHAT, json={"model": "renamed", "messages": [], "temperature": 0.5},
                         headers=auth(key)) as r:
        assert r.status == 200
    sent = orjson.loads(upstream.state.requests[-1].body)
    assert sent == {"model": "upstream-name", "messages": [], "temperature": 0.5}


async def read_sse(r: aiohttp.ClientResponse) -> list[bytes]:
    """Chunks as they arrive, each with its arrival order kept."""
    return [c async for c in r.content.iter_any()]


async def test_streaming_chunks_unmerged_and_usage_hidden(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await gateway.key()
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "a b"}]}
    headers = {**auth(key), "x-mock-chunks": "6", "x-mock-delay-ms": "30", "x-mock-cached": "1"}
    async with http.post(gateway.url + CHAT, json=body, headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        chunks = await read_sse(r)
    # With 30 ms between upstream content chunks, each arrives on its own:
    # nothing is collected (the finish chunk and [DONE] follow the last word
    # at once, so they may share its read).
    assert len(chunks) >= 7
    assert all(c.count(b"data: ") == 1 for c in chunks[:6])
    events = b"".join(chunks).split(b"\n\n")
    datas = [e[6:] for e in events if e.startswith(b"data: ")]
    assert datas[-1] == b"[DONE]"
    parsed = [orjson.loads(d) for d in datas[:-1]]
    assert len(parsed) == 8
    assert all(p["choices"] for p in parsed), "usage-only chunk must be hidden"
    assert all("usage" not in p for p in parsed), "client did not ask for usage"
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in parsed)
    assert text == "Hello from the mock upstream."
    sent = orjson.loads(upstream.state.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}

    (row,) = await gateway.wait_usage(1)
    assert row["stream"] == 1 and row["status"] == 200
    assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"]) == (2, 6, 1)
    assert row["ttfb_ms"] < row["latency_ms"]


async def test_streaming_client_asked_for_usage_gets_it(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await gateway.key()
    raw = orjson.dumps({"model": "gpt-test", "stream": True, "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": "x y z"}]})
    async with http.post(gateway.url + CHAT, data=raw, headers={**auth(key), "x-mock-reasoning": "2"}) as r:
        text = await r.read()
    assert upstream.state.requests[-1].body == raw  # unchanged: nothing to rewrite
    datas = [e[6:] for e in text.split(b"\n\n") if e.startswith(b"data: {")]
    last = orjson.loads(datas[-1])
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == 3
    (row,) = await gateway.wait_usage(1)
    assert (row["input_tokens"], row["output_tokens"], row["reasoning_tokens"]) == (3, 5, 2)


async def test_first_chunk_not_delayed(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    """The first chunk reaches the client while the upstream is still
    waiting to send the second."""
    key = await gateway.key()
    body = {"model": "gpt-test", "stream": True, "messages": []}
    async with http.post(gateway.url + CHAT, json=body, headers={**auth(key), "x-mock-delay-ms": "400"}) as r:
        first = await asyncio.wait_for(r.content.readany(), 0.3)
        assert b"chat.completion.chunk" in first
        await r.read()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'"a string"', 400, "invalid_json"),
        (b'{"messages": []}', 400, "missing_model"),
        (b'{"model": 42}', 400, "invalid_model"),
        (b'{"model": ""}', 400, "invalid_model"),
        (b'{"model": "no-such-model"}', 404, "model_not_found"),
    ],
)
async def test_bad_bodies(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession, body: bytes, status: int, code: str
) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + CHAT, data=body, headers=auth(key)) as r:
        assert r.status == status
        err = (await r.json())["error"]
    assert err["code"] == code and err["message"]
    assert upstream.state.requests == []
    (row,) = await gateway.wait_usage(1)
    assert row["status"] == status and row["error_type"] == code


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer gw-wrong"}, {"x-api-key": "nope"},
                                     {"Authorization": "Basic Zm9vOmJhcg=="}])
async def test_bad_keys_get_401(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async with http.post(gateway.url + CHAT, json={"model": "gpt-test"}, headers=headers) as r:
        assert r.status == 401
        assert (await r.json())["error"]["type"] == "authentication_error"
    assert upstream.state.requests == []
    (row,) = await gateway.wait_usage(1)
    assert row["status"] == 401 and row["key_id"] is None


async def test_expired_key_gets_401(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    import time

    key = gateway.create_key(expires_at=time.time() + 0.5)
    await gateway.wait_key_live(key)
    await asyncio.sleep(0.6)
    async with http.post(gateway.url + CHAT, json={"model": "gpt-test"}, headers=auth(key)) as r:
        assert r.status == 401


async def test_model_not_allowed_for_key_is_403(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.key(models=["renamed"])
    async with http.post(gateway.url + CHAT, json={"model": "gpt-test"}, headers=auth(key)) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "model_not_allowed"
    async with http.post(gateway.url + CHAT, json={"model": "renamed"}, headers=auth(key)) as r:
        assert r.status == 200


async def test_oversize_body_is_413_before_upstream(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await gateway.key()
    big = b'{"model":"gpt-test","pad":"' + b"x" * (2 * 1024 * 1024) + b'"}'
    async with http.post(gateway.url + CHAT, data=io.BytesIO(big), headers=auth(key)) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "request_too_large"
    # Chunked upload, no Content-Length: still refused once past the limit.

    async def gen():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b"x" * 65536

    async with http.post(gateway.url + CHAT, data=gen(), headers=auth(key)) as r:
        assert r.status == 413
    assert upstream.state.requests == []
    rows = await gateway.wait_usage(2)
    assert [r["status"] for r in rows] == [413, 413]


async def test_upstream_garbage_is_relayed_and_recorded(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + CHAT, json={"model": "gpt-test"},
                         headers={**auth(key), "x-mock-fail": "garbage"}) as r:
        assert r.status == 200
        assert await r.read() == b"<html>not json"
    (row,) = await gateway.wait_usage(1)
    assert row["status"] == 200 and row["input_tokens"] == 0


async def test_upstream_error_status_relayed_unchanged(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + CHAT, json={"model": "gpt-test"},
                         headers={**auth(key), "x-mock-status": "400"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "mock_400"
    (row,) = await gateway.wait_usage(1)
    assert row["status"] == 400


async def test_upstream_rejects_gateway_credential_is_502(
    make_gateway, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setenv("WRONG_KEY", "sk-wrong-upstream-key")
    gw = await make_gateway(config_toml(upstream.base_url, api_key_env="WRONG_KEY"))
    key = await gw.key()
    async with http.post(gw.url + CHAT, json={"model": "gpt-test"}, headers=auth(key)) as r:
        assert r.status == 502
        err = (await r.json())["error"]
    assert "mock" in err["message"] and "sk-wrong" not in err["message"]
    (row,) = await gw.wait_usage(1)
    assert row["status"] == 502 and row["error_type"] == "upstream_auth_failed"


async def test_upstream_unreachable_is_502(make_gateway, http: aiohttp.ClientSession) -> None:

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = await make_gateway(config_toml(f"http://127.0.0.1:{port}/v1"))
    key = await gw.key()
    async with http.post(gw.url + CHAT, json={"model": "gpt-test"}, headers=auth(key)) as r:
        assert r.status == 502
        assert (await r.json())["error"]["code"] == "upstream_unreachable"
    (row,) = await gw.wait_usage(1)
    assert row["status"] == 502 and row["error_type"] == "upstream_unreachable"


async def test_upstream_dies_mid_stream(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    body = {"model": "gpt-test", "stream": True, "messages": []}
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(gateway.url + CHAT, json=body,
                             headers={**auth(key), "x-mock-fail": "midstream", "x-mock-chunks": "6"}) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                received += chunk
    assert b"Hello" in received and b"[DONE]" not in received
    (row,) = await gateway.wait_usage(1)
    assert row["status"] == 502 and row["error_type"] == "upstream_disconnected" and row["stream"] == 1


async def test_client_disconnect_mid_stream_is_499_and_cancels_upstream(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await gateway.key()
    body = {"model": "gpt-test", "stream": True, "messages": []}
    r = await http.post(gateway.url + CHAT, json=body,
                        headers={**auth(key), "x-mock-delay-ms": "200", "x-mock-chunks": "20"})
    assert r.status == 200
    await r.content.readany()
    r.close()  # the client goes away mid-stream
    (row,) = await gateway.wait_usage(1)
    assert row["status"] == 499 and row["error_type"] == "client_disconnected"
    for _ in range(100):
        if upstream.state.disconnects:
            break
        await asyncio.sleep(0.02)
    assert upstream.state.disconnects == 1, "upstream request must be cancelled"
    assert upstream.state.completed_streams == 0


async def test_upstream_gzip_relayed_byte_for_byte(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    import gzip

    key = await gateway.key()
    async with http.post(gateway.url + CHAT, json={"model": "gpt-test"},
                         headers={**auth(key), "x-mock-fail": "gzip"}, auto_decompress=False) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        data = await r.read()
    assert orjson.loads(gzip.decompress(data))["object"] == "chat.completion"


async def test_unknown_endpoint_is_404_with_usage_row(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + "/v1/nope", json={}, headers=auth(key)) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "unknown_endpoint"
    (row,) = await gateway.wait_usage(1)
    assert row["status"] == 404


async def test_stalled_request_body_gets_408(
    make_gateway, upstream: Upstream  # type: ignore[no-untyped-def]
) -> None:

    gw = await make_gateway(config_toml(upstream.base_url).replace("key_refresh_ms = 100",
                                                                     "key_refresh_ms = 100\nbody_timeout_s = 0.3"))
    key = await gw.key()
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":".encode())
    await writer.drain()  # ... and the rest never comes
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
    assert upstream.state.requests == []
    (row,) = await gw.wait_usage(1)
    assert row["status"] == 408 and row["error_type"] == "request_timeout"
