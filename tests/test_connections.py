"""The HTTP layer attacked from raw sockets, as an outsider would (issue 11):
unbounded client strings (item 4), slow and idle clients (5), secrets echoed
by parser errors (6), bad input that used to be a 500 (7), and the query
string and path forwarded byte for byte (8)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import ADMIN_TOKEN, Gateway, GatewayFactory, Upstream, config_toml
from .test_production import prod_toml, serve  # noqa: F401 (serve: a fixture)

CHAT = b'{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}'


def request(path: str = "/v1/chat/completions", *, key: str | None = None, body: bytes = CHAT,
            method: str = "POST", headers: dict[str, str] | None = None, close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> Any:
    return orjson.loads(answer.partition(b"\r\n\r\n")[2])


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def metrics_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as r:
        return await r.text()


# ------------------------------------------------------------ item 4


async def test_client_strings_are_bounded_before_they_are_stored_or_logged(
    make_gateway: GatewayFactory, upstream: Upstream, caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url).replace("[server]\n", "[server]\nlog_requests = true\n"))
    key = await gw.key()
    port = gw.running.port
    long_id = "r" * 8000
    caplog.set_level(logging.INFO, logger="gateway.request")
    answers = []
    for headers, auth in (({"x-request-id": long_id}, None), ({"x-request-id": long_id}, key),
                          ({"x-request-id": "has space;\t<tab>"}, key), ({"x-request-id": "ok-id.1:2"}, key)):
        answers.append(await exchange(port, request(key=auth, headers=headers)))
    path = "/v1/" + "p%0Aforged line " * 350  # 7 KB of path, with line breaks once decoded
    answers.append(await exchange(port, request(path.replace(" ", "%20"), key=key, method="GET", body=b"")))
    assert [status_of(a) for a in answers] == [401, 200, 200, 200, 404]
    rows = await gw.wait_usage(5)
    assert len(rows) == 5
    echoed = [a.split(b"x-request-id: ", 1)[1].split(b"\r\n", 1)[0].decode() for a in answers]
    assert [r["request_id"] for r in rows] == echoed
    assert echoed[3] == "ok-id.1:2"  # a plausible id is kept
    for rid in echoed[:3] + echoed[4:]:
        assert len(rid) <= 32 and long_id not in rid and " " not in rid  # the gateway's own
    for r in rows:
        stored = sum(len(str(v)) for v in r.values() if isinstance(v, str))
        assert stored < 400, r
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "gateway.request"]
    assert len(lines) == 5 and all(len(line) < 400 and "\n" not in line for line in lines)


async def test_a_401_flood_stays_small(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    """An unauthenticated client sending 8 KB request ids and paths: one
    small row per request, not 8 KB each (31 MB in 1.2 s before)."""
    gw = await make_gateway(config_toml(upstream.base_url))
    port = gw.running.port
    n = 200
    before = gw.db_bytes()

    async def one(i: int) -> int:
        headers = {"x-request-id": f"{i}-" + "x" * 8000, "Authorization": "Bearer " + "k" * 8000}
        return status_of(await exchange(port, request("/v1/chat/completions", headers=headers)))

    assert set(await asyncio.gather(*(one(i) for i in range(n)))) == {401}
    rows = await gw.wait_usage(n)
    assert len(rows) == n  # every request still has its row
    await asyncio.sleep(0.1)
    grown = gw.db_bytes() - before
    assert grown < n * 1024, grown  # well under 1 KB a request, rollups and indexes included


# ------------------------------------------------------------ item 5

SLOW = """
header_timeout_s = 0.5
keepalive_timeout_s = 2.0
"""


async def held_open(port: int, opening: bytes, seconds: float) -> bool:
    """Whether a connection that sent ``opening`` is still open after ``seconds``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if opening:
            writer.write(opening)
            await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(), seconds)
        except TimeoutError:
            return True
        return data != b""  and not reader.at_eof()
    finally:
        writer.close()


async def test_slow_and_silent_clients_are_cut_off(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url).replace("[server]\n", "[server]\n" + SLOW))
    key = await gw.key()
    port = gw.running.port
    half = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "

    async def trickle() -> bool:
        """One byte every 0.2 s: each byte is in time, the head never is."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for b in request(key=key)[:30]:
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(0.2)
                if reader.at_eof():
                    return False
            return not reader.at_eof()
        except ConnectionError:
            return False
        finally:
            writer.close()

    t0 = time.monotonic()
    held = await asyncio.gather(*[held_open(port, b"", 3.0) for _ in range(30)],
                                *[held_open(port, half, 3.0) for _ in range(30)],
                                *[trickle() for _ in range(5)])
    assert not any(held), held
    assert time.monotonic() - t0 < 20  # each closed after 0.5 s, not after aiohttp's hour

    # A kept-alive connection left idle is closed after keepalive_timeout_s;
    # one used again in time keeps working.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(request(key=key, close=False))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.5)  # idle, but less than keepalive_timeout_s
    assert await asyncio.wait_for(reader.read(), 6.0) == b""
    writer.close()

    # A head sent in pieces, in time, is served.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = request(key=key)
    writer.write(data[:20])
    await asyncio.sleep(0.1)
    writer.write(data[20:])
    assert (await asyncio.wait_for(reader.read(), 3.0)).startswith(b"HTTP/1.1 200")
    writer.close()

    text = await metrics_text(http, gw.url)
    assert metric(text, 'gateway_client_timeouts_total{phase="header"}') >= 65
    assert metric(text, 'gateway_client_timeouts_total{phase="idle"}') >= 1


async def test_workers_cut_off_silent_clients_too(
    serve: Any, upstream: Upstream, tmp_path: Path,  # noqa: F811
) -> None:
    s = serve(prod_toml(upstream, "workers = 2\n" + SLOW))
    held = await asyncio.gather(*[held_open(s.port, b"", 3.0) for _ in range(10)],
                                *[held_open(s.port, b"GET /healthz HTTP/1.1\r\n", 3.0) for _ in range(10)])
    assert not any(held)
    async with aiohttp.ClientSession() as http:
        for _ in range(4):  # /metrics sums over the workers
            text = await metrics_text(http, s.url)
            if metric(text, 'gateway_client_timeouts_total{phase="header"}') >= 20:
                break
            await asyncio.sleep(0.3)
    assert metric(text, 'gateway_client_timeouts_total{phase="header"}') >= 20
    assert s.stop() == 0


# ------------------------------------------------------------ item 6


async def test_http_layer_errors_never_quote_the_request(
    gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    key = await gateway.key()
    caplog.set_level(logging.DEBUG)
    port = gateway.running.port
    bad = [
        request(key=key + "A" * 9000),  # Authorization over the parser's line limit: the key first
        request(key=key, headers={"X-Pad": "v" * 9000}),
        request("/v1/chat/completions?" + key + "q" * 9000, key=key),  # a request line over the limit
        b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer " + key.encode() + b"\r\nBad\x01Header: "
        + key.encode() + b"\r\n\r\n",
        b"G\x00ET /v1/models HTTP/1.1\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer " + key.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz" + key.encode() + b"\r\n",
    ]
    for data in bad:
        answer = await exchange(port, data)
        assert status_of(answer) == 400, answer[:200]
        assert key.encode()[:12] not in answer, answer
        err = body_of(answer)["error"]
        assert err["code"] in ("bad_http_request", "invalid_body"), err
    text = "\n".join(rec.getMessage() + str(rec.exc_info or "") + str(rec.args) for rec in caplog.records)
    assert key[:12] not in text
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    metrics = await metrics_text(http, gateway.url)
    assert metric(metrics, "gateway_bad_http_requests_total") >= 5


# ------------------------------------------------------------ item 7


async def test_bad_input_is_a_4xx_never_a_500(
    admin_gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    gw = admin_gateway
    key = await gw.key()
    port = gw.running.port
    caplog.set_level(logging.WARNING)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    huge = "9" * 25
    cases: list[tuple[bytes, int]] = [
        (request(headers={"x-api-key": "\udcff\udcfe-not-utf8"}), 401),
        (request(headers={"Authorization": "Bearer \udcc3\udcff"}), 401),
        (request(headers={"Authorization": "Bearer ключ"}), 401),
        (request("/admin/api/keys", method="GET", body=b"", headers={"Authorization": "Bearer \udcff"}), 401),
        (request("/console/%00", method="GET", body=b""), 404),
        (request("/console/a%00b.js", method="GET", body=b""), 404),
        (request("/console/%ff%fe", method="GET", body=b""), 404),
        (request(f"/admin/api/keys?workspace_id={huge}", method="GET", body=b"", headers=admin), 400),
        (request(f"/admin/api/keys/{huge}", method="GET", body=b"", headers=admin), 404),
        (request(f"/admin/api/workspaces/{huge}", method="PATCH", body=b"{}", headers=admin), 404),
        (request(f"/admin/api/requests?status={huge}", method="GET", body=b"", headers=admin), 400),
        (request(f"/admin/api/requests?cursor=1_{huge}", method="GET", body=b"", headers=admin), 400),
        (request("/admin/api/requests?cursor=nan_1", method="GET", body=b"", headers=admin), 400),
        (request(f"/admin/api/requests?key_id={huge}", method="GET", body=b"", headers=admin), 400),
        (request(f"/admin/api/usage?since={huge}d", method="GET", body=b"", headers=admin), 400),
        (request("/admin/api/usage?since=1e400", method="GET", body=b"", headers=admin), 400),
        # Integers JSON (and orjson) can carry but SQLite cannot.
        (request("/admin/api/keys", body=b'{"workspace": "acme", "rpm": 18446744073709551615}', headers=admin),
         400),
        (request("/admin/api/keys", body=b'{"workspace_id": 18446744073709551615}', headers=admin), 400),
        (request("/admin/api/workspaces", body=orjson.dumps({"name": "n" * 5000}), headers=admin), 400),
        (request("/admin/api/workspaces/1", method="PATCH", body=b'{"monthly_spend_limit": 1e400}',
                 headers=admin), 400),
        (request(key=key, headers={"Content-Encoding": "gzip"}), 415),
        (request("/admin/api/workspaces", body=b"{}", headers={**admin, "Content-Encoding": "br"}), 415),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + key.encode()
         + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{\"mod\r\nZZ\r\n", 400),
        (request(f"/v1/video/tasks/{'%ff' * 10}", key=key, method="GET", body=b""), 404),
        (request("/v1/models/%00%ff", key=key, method="GET", body=b""), 404),
    ]
    for data, want in cases:
        answer = await exchange(port, data)
        assert status_of(answer) == want, (data[:120], answer[:300])
        if want >= 400 and not data.startswith(b"GET /console"):
            assert b'"error"' in answer.partition(b"\r\n\r\n")[2] or want == 404
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert errors == [], [(r.name, r.getMessage()) for r in errors]


# ------------------------------------------------------------ item 8


async def test_query_and_path_reach_the_upstream_byte_for_byte(gateway: Gateway, upstream: Upstream) -> None:
    key = await gateway.key()
    port = gateway.running.port
    for target, path, query in [
        ("/v1/chat/completions?x=a%20b&y=%23z&z=%2B+&w=%E2%9C%93&e=&&v=1", "/v1/chat/completions",
         "x=a%20b&y=%23z&z=%2B+&w=%E2%9C%93&e=&&v=1"),
        ("/v1/chat/%63ompletions?q=%3D", "/v1/chat/%63ompletions", "q=%3D"),
        ("/v1/chat/completions", "/v1/chat/completions", ""),
    ]:
        answer = await exchange(port, request(target, key=key))
        assert status_of(answer) == 200, answer[:300]
        sent = upstream.state.requests[-1]
        assert sent.target == path + ("?" + query if query else ""), sent.target
        assert sent.query == query
