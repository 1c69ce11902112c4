"""The pass-through HTTP/1.1 client (gateway/upstream.py) against raw
servers on real sockets that answer with exact bytes."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from yarl import URL

from gateway.upstream import UpstreamClient, UpstreamError, UpstreamPayloadError, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """Answers each request with whatever ``answer`` writes; counts connections."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                await self.answer(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> URL:
        assert self.server is not None
        return URL(f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/x")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(answer: Handler) -> RawServer:
        s = RawServer(answer)
        s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
        servers.append(s)
        return s

    yield start
    for s in servers:
        assert s.server is not None
        s.server.close()
        await s.server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    yield c
    await c.close()


def fixed(raw: bytes) -> Handler:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()

    return answer


async def test_content_length_and_keep_alive_reuse(serve, client: UpstreamClient) -> None:  # type: ignore[no-untyped-def]
    s = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Up: 1\r\nContent-Length: 7\r\n\r\n"
                          b'{"a":1}'))
    for _ in range(5):
        r = await client.request("POST", s.url.with_query("q=1"), [("Authorization", "Bearer k")], b'{"m":1}')
        assert r.status == 200 and r.headers["x-up"] == "1" and r.content_length == 7
        assert await r.read() == b'{"a":1}'
        r.release()
    assert s.connections == 1, "one keep-alive connection serves every request"
    sent = s.requests[0]
    assert sent.startswith(b"POST /v1/x?q=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Authorization: Bearer k\r\n" in sent and b"Content-Length: 7\r\n\r\n{\"m\":1}" in sent


async def test_chunked_body_arrives_chunk_by_chunk(serve, client: UpstreamClient) -> None:  # type: ignore[no-untyped-def]
    gate = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"6\r\ndata:1\r\n")
        await writer.drain()
        await gate.wait()
        writer.write(b"6\r\ndata:2\r\n0\r\n\r\n")
        await writer.drain()

    s = await serve(answer)
    r = await client.request("POST", s.url, [], b"{}")
    assert await r.readany() == b"data:1"  # before the upstream sent the rest
    gate.set()
    assert await r.readany() == b"data:2"
    assert await r.readany() == b""
    r.release()


async def test_body_until_close_and_no_reuse(serve, client: UpstreamClient) -> None:  # type: ignore[no-untyped-def]
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    s = await serve(answer)
    for _ in range(2):
        r = await client.request("POST", s.url, [], b"")
        assert await r.read() == b"all of it"
        r.release()
    assert s.connections == 2


async def test_cut_mid_body_is_a_payload_error(serve, client: UpstreamClient) -> None:  # type: ignore[no-untyped-def]
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    s = await serve(answer)
    r = await client.request("POST", s.url, [], b"")
    assert await r.readany() == b"only part"
    with pytest.raises(UpstreamPayloadError):
        await r.readany()
    r.release()


async def test_stale_pooled_connection_is_retried_once(serve, client: UpstreamClient) -> None:  # type: ignore[no-untyped-def]
    per_conn: dict[int, int] = {}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = per_conn[id(writer)] = per_conn.get(id(writer), 0) + 1
        if n == 2:
            writer.close()  # keep-alive race: the server gave up on the idle connection
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    s = await serve(answer)
    for _ in range(2):
        r = await client.request("POST", s.url, [], b"")
        assert await r.read() == b"ok"
        r.release()
    assert s.connections == 2, "the second request went out on the pooled connection, then on a fresh one"
    assert len(s.requests) == 3


async def test_timeouts(serve, client: UpstreamClient) -> None:  # type: ignore[no-untyped-def]
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    s = await serve(silent)
    with pytest.raises(UpstreamTimeout):
        await client.request("POST", s.url, [], b"", first_byte_timeout=0.2)
    s2 = await serve(stalls)
    r = await client.request("POST", s2.url, [], b"", first_byte_timeout=1)
    r.set_idle_timeout(0.2)
    assert await r.readany() == b"abc"
    with pytest.raises(UpstreamTimeout):
        await r.readany()
    r.release()


async def test_timeouts_on_a_reused_connection(serve, client: UpstreamClient) -> None:  # type: ignore[no-untyped-def]
    """Deadlines live on the connection and its one timer: a later request
    with a shorter timeout still times out on time, a connection that sat in
    the pool past an earlier request's deadlines is not cut, and the total
    deadline holds while chunks keep arriving (so the idle one never fires)."""
    loop = asyncio.get_running_loop()
    answers = 0

    async def quick_then_silent_then_trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answers
        answers += 1
        if answers in (1, 2):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif answers == 3:
            await asyncio.sleep(5)  # never answers
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(100):
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)

    s = await serve(quick_then_silent_then_trickle)
    r = await client.request("POST", s.url, [], b"", first_byte_timeout=0.3, total_timeout=0.4)
    assert await r.read() == b"ok"
    r.release()
    await asyncio.sleep(0.6)  # past both deadlines, idle in the pool
    r = await client.request("POST", s.url, [], b"", first_byte_timeout=30)
    assert await r.read() == b"ok"
    r.release()
    assert s.connections == 1
    t0 = loop.time()
    with pytest.raises(UpstreamTimeout, match="first byte"):
        await client.request("POST", s.url, [], b"", first_byte_timeout=0.2)
    assert 0.15 < loop.time() - t0 < 1.0
    t0 = loop.time()
    r = await client.request("POST", s.url, [], b"", first_byte_timeout=30, total_timeout=0.5)
    r.set_idle_timeout(0.2)
    got = b""
    with pytest.raises(UpstreamTimeout, match="total"):
        while True:
            got += await r.readany()
    r.release()
    assert 0.45 < loop.time() - t0 < 1.5 and 3 <= len(got) <= 12


async def test_connect_refused(client: UpstreamClient) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamError) as e:
        await client.request("POST", URL(f"http://127.0.0.1:{port}/v1/x"), [], b"")
    assert not isinstance(e.value, UpstreamTimeout)


async def test_interim_100_is_skipped_and_line_breaks_refused(serve, client: UpstreamClient) -> None:  # type: ignore[no-untyped-def]
    s = await serve(fixed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx"))
    r = await client.request("POST", s.url, [], b"")
    assert r.status == 201 and await r.read() == b"x"
    r.release()
    with pytest.raises(UpstreamError):
        await client.request("POST", s.url, [("X-Evil", "a\r\nInjected: 1")], b"")


async def test_large_body_is_read_with_bounded_memory(serve, client: UpstreamClient) -> None:  # type: ignore[no-untyped-def]
    size = 20 * 1024 * 1024
    block = b"x" * 65536

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    s = await serve(answer)
    tracemalloc.start()
    try:
        r = await client.request("POST", s.url, [], b"")
        got = 0
        while chunk := await r.readany():
            got += len(chunk)
            await asyncio.sleep(0)  # a consumer slower than loopback
        r.release()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == size
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes: the upstream socket must be paused, not buffered"


async def test_https_upstream(tmp_path: Path) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"tls": request.secure, "body": (await request.read()).decode()})

    app = web.Application()
    app.router.add_post("/v1/x", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client = UpstreamClient(ssl_context=client_ctx)
    try:
        r = await client.request("POST", URL(f"https://localhost:{port}/v1/x"), [], b"hi")
        assert r.status == 200 and await r.read() == b'{"tls": true, "body": "hi"}'
        r.release()
        with pytest.raises(UpstreamError):  # a certificate we do not trust
            await UpstreamClient().request("POST", URL(f"https://localhost:{port}/v1/x"), [], b"")
    finally:
        await client.close()
        await runner.cleanup()
