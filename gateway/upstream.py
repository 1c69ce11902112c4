"""A lean HTTP/1.1 client for the pass-through hot path.

Why not aiohttp's client here: profiled under load (one worker, c=32), the
aiohttp client accounted for 71-93 us of CPU per proxied request, most of
it generic machinery the proxy does not need (cookie jar, redirects,
tracing, per-request ClientRequest/ClientResponse objects, URL
normalisation, a sock_read timer rescheduled on every read). This client
does only what a pass-through needs: one keep-alive connection pool per
(scheme, host, port), the request written in one call, the response parsed
by llhttp (httptools), body chunks handed over as they arrive with flow
control, and the three timeouts of an upstream (connect, first byte, idle
between chunks) plus a total deadline. aiohttp's client is still used for
the task and asset calls, where speed does not matter.

Timeouts cost no timer per request: each connection keeps at most one
timer, and a request only writes its deadlines into the connection. The
timer, when it fires, checks the deadlines of the exchange in progress and
either times it out or sets itself for the next one; it is replaced only
when a request needs an earlier wake-up than the one already set (uvloop's
call_later plus cancel is about 1.7 us, and a stream waits many times).

Guarantees:
- A response body is either read to its end (then the connection goes back
  to the pool if the upstream allows keep-alive) or the connection is
  closed; a connection is never reused mid-message.
- ``readany`` returns b"" only at the true end of the body; a connection
  lost before that raises UpstreamPayloadError, a silence longer than the
  idle timeout raises UpstreamTimeout.
- A pooled connection that the upstream had already closed (keep-alive
  race) is detected by the response failing before its first byte; the
  request is then sent once more on a fresh connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import httptools
from multidict import CIMultiDict
from yarl import URL

# Buffered response bytes above which the upstream socket stops being read
# until the client side catches up.
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the exchange."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Connect, first-byte, idle or total timeout (``kind``)."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind  # connect | first byte | idle | total


class UpstreamPayloadError(UpstreamError):
    """The connection ended before the response body did."""


def connect_failure(e: BaseException) -> str:
    """Why a connection could not be made, for a log line: refused, DNS,
    TLS, or the system's words for it (never anything from the request)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({getattr(e, 'verify_message', None) or 'verify failed'})"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed ({e.reason or type(e).__name__})"
    if isinstance(e, socket.gaierror):
        return f"DNS lookup failed ({e.strerror})"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno).lower()
    return type(e).__name__


class _Stale(Exception):
    """A reused connection failed before any response byte."""


class _Conn(asyncio.Protocol):
    """One upstream connection; parses one response at a time."""

    def __init__(self, pool: UpstreamClient, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.last_used = 0.0
        self.reused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self.parser: Any = None
        self.active = False
        self.received = 0
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] | None = None
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.done = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.keep_alive = False
        # Deadlines of the exchange in progress (loop time), checked by _on_timer.
        self.first_byte_at: float | None = None
        self.total_at: float | None = None
        self.idle_at: float | None = None  # only while waiting for body bytes

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes on an idle connection: the upstream is confused; drop it.
            self.close()
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamPayloadError(f"invalid HTTP response: {type(e).__name__}"))
            self.close()

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        if self.active and not self.done:
            if self.head is not None and self.head.done() and self._until_close():
                # A body with neither a length nor chunking ends at EOF.
                self.done = True
                self._wake()
            if not self.done:
                if self.received == 0 and self.reused:
                    self._fail(_Stale())
                else:
                    self._fail(UpstreamPayloadError("upstream closed the connection mid-response"))

    def _until_close(self) -> bool:
        names = {k.lower() for k, _ in self.raw_headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status < 200:
            return  # an interim (1xx) answer: the real one follows
        self.first_byte_at = None
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status < 200:
            self.raw_headers = []
            return
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.done = True
        self._wake()

    # -- helpers

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: a cancelled request may never await it
        self._wake()

    def timeout(self, what: str) -> None:
        self._fail(UpstreamTimeout(f"upstream {what} timeout", kind=what))
        self.close()

    def arm(self, at: float) -> None:
        """Make sure the timer fires no later than ``at`` (loop time)."""
        timer = self._timer
        if timer is not None:
            if self._timer_at <= at:
                return
            timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self.active or self.lost:
            return
        due = [(at, what) for at, what in ((self.first_byte_at, "first byte"), (self.idle_at, "idle"),
                                           (self.total_at, "total")) if at is not None]
        if not due:
            return
        at, what = min(due)
        if self.loop.time() >= at - 0.001:  # the loop's clock has millisecond steps
            self.timeout(what)
        else:
            self.arm(at)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def start(self, data: bytes) -> asyncio.Future[None]:
        self._reset()
        self.active = True
        self.parser = httptools.HttpResponseParser(self)
        self.head = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        return self.head


class UpstreamResponse:
    """The head of an upstream answer and its body as it arrives."""

    __slots__ = ("_conn", "_headers", "_idle", "raw_headers", "status")

    def __init__(self, conn: _Conn, idle: float | None) -> None:
        self._conn: _Conn | None = conn
        self._idle = idle
        self.status = conn.status
        self.raw_headers = conn.raw_headers  # as received: (name, value) bytes
        self._headers: CIMultiDict[str] | None = None

    @property
    def headers(self) -> CIMultiDict[str]:
        """The headers, decoded (built on first use; the relay reads the raw ones)."""
        if self._headers is None:
            h: CIMultiDict[str] = CIMultiDict()
            for k, v in self.raw_headers:
                h.add(k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
            self._headers = h
        return self._headers

    @property
    def content_length(self) -> int | None:
        cl = self.headers.get("Content-Length")
        return int(cl) if cl is not None and cl.isdigit() else None

    def set_idle_timeout(self, seconds: float | None) -> None:
        """The longest silence allowed between two body chunks from now on."""
        self._idle = seconds

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some), or b"" at the end."""
        conn = self._conn
        if conn is None:
            return b""
        while not conn.body:
            if conn.error is not None:
                raise conn.error
            if conn.done:
                return b""
            conn.waiter = w = conn.loop.create_future()
            if self._idle:
                conn.idle_at = at = conn.loop.time() + self._idle
                conn.arm(at)
            try:
                await w
            finally:
                conn.waiter = None
                conn.idle_at = None
        body = conn.body
        data = body.popleft() if len(body) == 1 else b"".join([body.popleft() for _ in range(len(body))])
        conn.buffered -= len(data)
        if conn.paused and conn.buffered < LOW_WATER and conn.transport is not None:
            conn.paused = False
            conn.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: the connection is pooled if the body was
        read to its end and the upstream allows keep-alive, else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.total_at = None
        if conn.done and conn.keep_alive and conn.error is None and not conn.lost:
            conn.pool._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the response; the connection is closed."""
        conn = self._conn
        if conn is not None:
            conn.close()
        self.release()


class UpstreamClient:
    """Keep-alive connection pools for the pass-through path."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, idle_s: float = 15.0,
                 max_idle_per_host: int = 256) -> None:
        self._ssl = ssl_context
        self._idle_s = idle_s
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _put(self, conn: _Conn) -> None:
        conn.active = False
        conn.parser = None
        if conn.paused and conn.transport is not None:
            conn.paused = False
            conn.transport.resume_reading()
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= self._max_idle:
            conn.close()
            return
        conn.last_used = time.monotonic()
        idle.append(conn)

    async def _connect(self, key: tuple[str, str, int], timeout: float | None) -> _Conn:
        idle = self._idle.get(key)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.lost and now - conn.last_used < self._idle_s:
                    conn.reused = True
                    return conn
                conn.close()
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        ssl_ctx = self._ssl_context() if scheme == "https" else None
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self, key), host, port, ssl=ssl_ctx,
                                       server_hostname=host if ssl_ctx else None),
                timeout,
            )
        except TimeoutError:
            raise UpstreamTimeout(f"connect to {host}:{port} timed out", kind="connect") from None
        except (OSError, ssl.SSLError) as e:
            raise UpstreamError(f"cannot connect to {host}:{port}: {connect_failure(e)}") from None
        return proto

    async def request(
        self,
        method: str,
        url: URL,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        connect_timeout: float | None = None,
        first_byte_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; returns once the response head has arrived."""
        host = url.raw_host or ""
        port = url.port or (443 if url.scheme == "https" else 80)
        key = (url.scheme, host, port)
        bracketed = f"[{host}]" if ":" in host else host
        host_header = bracketed if url.is_default_port() else f"{bracketed}:{port}"
        lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"Host: {host_header}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        text = "\r\n".join(lines)
        # No CR or LF but the line ends: a header cannot smuggle in another.
        if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
            bad = next((k for k, v in headers if "\n" in v or "\r" in v or "\n" in k or "\r" in k), "?")
            raise UpstreamError(f"header {bad} has a line break")
        head = text.encode("utf-8", "surrogateescape")
        data = head + body if len(body) < 65536 else None
        for attempt in (0, 1):
            conn = await self._connect(key, connect_timeout)
            try:
                fut = conn.start(data if data is not None else head)
                if data is None:
                    assert conn.transport is not None
                    conn.transport.write(body)
                if first_byte_timeout or total_timeout:
                    now = conn.loop.time()
                    if total_timeout:
                        conn.total_at = now + total_timeout
                    if first_byte_timeout:
                        conn.first_byte_at = now + first_byte_timeout
                    conn.arm(min(now + t for t in (first_byte_timeout, total_timeout) if t))
                await fut
            except _Stale:
                if attempt == 0:
                    continue
                raise UpstreamPayloadError("upstream closed the connection before answering") from None
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(conn, None)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
