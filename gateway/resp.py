"""A minimal Redis client (RESP2) for the Redis calls of the request path:
the limiter's EVALSHA and the settle batch that follows each request
(gateway.redis_limits).

Why hand-written: redis-py's asyncio client spends 100-150 us of Python on
each call on this machine (pool checkout, command encoding and reply
parsing through several layers) against 20 us for the round trip itself,
which alone would take a limited request past the 0.1 ms the gateway may
add. This client keeps one connection and resolves a future per command
from the reply parser. The commands queued in one turn of the event loop
(the admissions of all the requests that arrived together, a settle
batch) go out in one ``write``: one system call and one wake-up of
Redis for all of them, and their replies come back in order.

Timeouts count from the write. A reply that is already in the socket when
the timeout fires (Redis answered in time, this process's loop was busy and
has not read it yet) is waited for: a busy event loop is not an unreachable
Redis, and must not make the limiter fail open or closed.

Leases, seeding and the shutdown's releases stay on redis-py.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

# After ``timeout``, a reply already in the socket (unread: the event loop
# was busy) is waited for, checked every _RECHECK_S, up to _GRACE times
# ``timeout`` in all.
_RECHECK_S = 0.002
_GRACE = 10


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


class _Incomplete(Exception):
    pass


class ProtocolError(ConnectionError):
    """A reply that is not RESP2 as Redis writes it: the connection cannot
    be trusted to stay in step, so it is dropped (and opened again on the
    next call)."""


# Bounds on a reply: Redis's own proto-max-bulk-len, and far deeper
# nesting than any reply the gateway asks for.
MAX_BULK = 512 * 1024 * 1024
MAX_DEPTH = 8


def _int(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise ProtocolError("malformed integer in a Redis reply") from None


def bulk(a: Any) -> bytes:
    """One argument of a command, as RESP writes it."""
    b = a if isinstance(a, bytes) else str(a).encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def encode(args: tuple[Any, ...]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def parse(buf: bytearray | bytes, pos: int, depth: int = 0) -> tuple[Any, int]:
    """One reply from ``buf`` at ``pos``: (value, position after it).
    Raises _Incomplete when the buffer does not hold all of it yet, and
    ProtocolError for anything Redis would not send (an unknown type, a
    malformed number, a length or nesting past the bounds above)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > 64 * 1024:  # no reply line is this long
            raise ProtocolError("Redis reply line too long")
        raise _Incomplete
    kind, line = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    pos = end + 2
    if kind == b"+":
        return line.decode(errors="replace"), pos
    if kind == b"-":
        return RespError(line.decode(errors="replace")), pos
    if kind == b":":
        return _int(line), pos
    if kind == b"$":
        n = _int(line)
        if n < 0:
            return None, pos
        if n > MAX_BULK:
            raise ProtocolError("Redis reply string too long")
        if len(buf) < pos + n + 2:
            raise _Incomplete
        return bytes(buf[pos:pos + n]), pos + n + 2
    if kind == b"*":
        n = _int(line)
        if n < 0:
            return None, pos
        if depth >= MAX_DEPTH or n > MAX_BULK:
            raise ProtocolError("Redis reply nested too deeply")
        items = []
        for _ in range(n):
            item, pos = parse(buf, pos, depth + 1)
            items.append(item)
        return items, pos
    raise ProtocolError(f"unexpected Redis reply type {kind!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout: float) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.buf = bytearray()
        self.lost: BaseException | None = None
        self.timeout = timeout
        # Commands queued in this turn of the event loop, written together.
        self.out: list[bytes] = []
        self.unsent: list[asyncio.Future[Any]] = []
        self.loop = asyncio.get_running_loop()


    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while pos < len(buf) and self.waiting:
            try:
                value, pos = parse(buf, pos)
            except _Incomplete:
                break
            except ProtocolError as e:
                self._broken(e)
                return
            fut = self.waiting.popleft()
            if fut.done():  # its caller gave up (timeout, cancel): the reply is consumed, not used
                continue
            if isinstance(value, RespError):
                fut.set_exception(value)
            else:
                fut.set_result(value)
        del buf[:pos]

    def _broken(self, exc: ProtocolError) -> None:
        """Out of step with Redis: fail every waiting call and drop the
        connection (no traceback: the caller counts it as a Redis failure)."""
        self.buf.clear()
        self.lost = exc
        self.out.clear()
        self.unsent.clear()
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(ProtocolError(str(exc)))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("connection closed by Redis")
        self.out.clear()
        self.unsent.clear()
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("connection to Redis lost"))

    def queue(self, data: bytes) -> asyncio.Future[Any]:
        """The reply to the command ``data``, written with the others queued
        in this turn of the loop (one write, one wake-up of Redis)."""
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.waiting.append(fut)
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(data)
        self.unsent.append(fut)
        return fut

    def flush(self) -> None:
        if not self.out or self.lost is not None:
            return
        assert self.transport is not None
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        futs = self.unsent
        self.out, self.unsent = [], []
        self.transport.write(data)
        self.loop.call_later(self.timeout, self.expire, futs, self.loop.time() + _GRACE * self.timeout)

    def expire(self, futs: list[asyncio.Future[Any]], last: float) -> None:
        """``timeout`` after a write: the replies not received yet fail with
        TimeoutError, unless they are waiting in the socket to be read. A
        reply that Redis sent in time but that this process has not read yet
        (its event loop was busy: a CPU-starved host, a long callback) is
        not a slow Redis, and must not count as one."""
        if all(f.done() for f in futs):
            return
        if self.lost is None and self.loop.time() < last and self._readable():
            self.loop.call_later(_RECHECK_S, self.expire, futs, last)
            return
        for f in futs:
            if not f.done():
                f.set_exception(TimeoutError("no reply from Redis in time"))

    def _readable(self) -> bool:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return False


class RespClient:
    """One pipelined connection to Redis, opened on first use and again after
    it is lost. ``call`` raises RespError for an error reply, OSError /
    ConnectionError when Redis cannot be reached, TimeoutError past
    ``timeout``."""

    def __init__(self, url: str, timeout: float) -> None:
        u = urlsplit(url)
        self._unix = u.path if u.scheme == "unix" else None
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port or 6379
        self._ssl = ssl.create_default_context() if u.scheme == "rediss" else None
        self._user = unquote(u.username) if u.username else None
        self._password = unquote(u.password) if u.password else None
        db = u.path.strip("/") if u.scheme != "unix" else ""
        self._db = int(db) if db.isdigit() else 0
        self._timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        timeout = self._timeout

        def protocol() -> _Protocol:
            return _Protocol(timeout)

        if self._unix is not None:
            _, proto = await loop.create_unix_connection(protocol, self._unix)
        else:
            _, proto = await loop.create_connection(protocol, self._host, self._port, ssl=self._ssl)
        setup: list[tuple[Any, ...]] = []
        if self._password is not None:
            setup.append(("AUTH", self._user, self._password) if self._user else ("AUTH", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        try:
            for args in setup:
                await proto.queue(encode(args))
        except BaseException:
            # Refused (a wrong password), or the caller's timeout: never
            # leave the connection open behind us (one more on each try).
            if proto.transport is not None:
                proto.transport.close()
            raise
        return proto

    async def _ready(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with asyncio.timeout(self._timeout), self._connecting:
            if self._proto is None or self._proto.lost is not None:
                self._proto = await self._connect()
            return self._proto

    async def call(self, *args: Any) -> Any:
        proto = self._proto
        if proto is None or proto.lost is not None:
            proto = await self._ready()
        return await proto.queue(encode(args))

    async def send(self, command: bytes) -> Any:
        """``call`` for a command already encoded (``encode``)."""
        proto = self._proto
        if proto is None or proto.lost is not None:
            proto = await self._ready()
        return await proto.queue(command)

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.lost = ConnectionError("closed")
            proto.transport.close()
