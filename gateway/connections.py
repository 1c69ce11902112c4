"""Client connections, below the app: what aiohttp's server leaves unbounded
or says too much about.

- **Header-read timeout** (``server.header_timeout_s``): a connection must
  deliver a whole request head within this time of being accepted, or of
  the first byte of its next request. aiohttp itself waits for a head as
  long as its keep-alive timer allows, so a client sending half a head, or
  nothing, holds a connection (and a file descriptor) for an hour.
- **Idle keep-alive timeout** (``server.keepalive_timeout_s``): between two
  requests; aiohttp's own keep-alive timer, counted here when it closes one.
- **HTTP-layer errors** (a request line or header over the parser's limit,
  a malformed head, a bad body framing): answered with a fixed JSON message
  naming the kind of error, never the bytes that caused it (aiohttp's own
  answer and log line quote them, and a too-long ``Authorization`` header is
  a key), counted in ``gateway_bad_http_requests_total`` and logged at debug
  level without a traceback. Such a request never reaches the app, so it has
  no usage row: its method and path are not known for sure.
- Request bodies are not decompressed by the server (``auto_decompress``
  off): the gateway forwards bytes, and refuses a ``Content-Encoding`` it
  would have to decode (gateway.intake.read_body).

This hooks aiohttp's ``RequestHandler`` (the per-connection protocol) by
subclassing it, because aiohttp has no header timeout nor a hook for its
parser errors; the raw-socket tests in tests/test_connections.py fail if an
aiohttp upgrade changes what it relies on (``_messages``,
``_request_in_progress``, ``_process_keepalive``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import http_exceptions as hx
from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

log = logging.getLogger("gateway.connections")

# Exception class -> (reason label, message). Most specific first.
_REASONS: tuple[tuple[type[BaseException], str, str], ...] = (
    (hx.LineTooLong, "too_long", "The request line or a header is longer than the server accepts."),
    (hx.BadHttpMethod, "bad_method", "The request method is not valid."),
    (hx.BadStatusLine, "bad_request_line", "The request line is malformed."),
    (hx.InvalidHeader, "bad_header", "A request header is malformed."),
    (hx.InvalidURLError, "bad_url", "The request target is not a valid URL."),
    (hx.ContentEncodingError, "bad_encoding", "The request body's Content-Encoding cannot be read."),
    (hx.PayloadEncodingError, "bad_framing", "The request body does not match its framing "
                                             "(Content-Length or chunked encoding)."),
    (hx.BadHttpMessage, "bad_message", "The request is not valid HTTP."),
    (RequestPayloadError, "bad_framing", "The request body does not match its framing "
                                         "(Content-Length or chunked encoding)."),
)


def client_fault(exc: BaseException | None) -> tuple[str, str] | None:
    """(reason, message) when ``exc`` is the client's malformed HTTP, else None."""
    for cls, reason, message in _REASONS:
        if isinstance(exc, cls):
            return reason, message
    if isinstance(exc, hx.HttpProcessingError):
        return "bad_message", "The request is not valid HTTP."
    return None


def _ignore(label: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Timeouts of one server, and where to count what they close."""

    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    on_timeout: Callable[[str], None] = field(default=_ignore)  # phase: header | idle
    on_bad_request: Callable[[str], None] = field(default=_ignore)  # reason label


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol with a header-read deadline and
    HTTP-layer errors that echo nothing (see the module docstring)."""

    __slots__ = ("_head_timer", "_limits")

    def __init__(self, manager: Server, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None

    def _waiting_for_head(self) -> bool:
        return not self._messages and not self._request_in_progress

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._limits.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport is None or not self._waiting_for_head():
            return
        self._limits.on_timeout("header")
        log.debug("closed a connection that sent no complete request head in %gs", self._limits.header_timeout_s)
        self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._waiting_for_head():
            self._cancel_head_timer()  # a whole head arrived: the request is the app's now
        elif data and self._head_timer is None and self.transport is not None:
            self._arm_head_timer()  # the first bytes of the next request on a kept-alive connection

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _process_keepalive(self) -> None:
        was_open = self.transport is not None
        super()._process_keepalive()
        if was_open and self.transport is None:
            self._limits.on_timeout("idle")

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        fault = client_fault(exc)
        if fault is not None:
            reason, text = fault
            status = 400
            self._limits.on_bad_request(reason)
            log.debug("refused malformed HTTP from a client: %s", reason)
        elif exc is not None:
            # Not the client's doing: a bug, logged in full (no request bytes are in it).
            self.logger.error("unhandled error in the HTTP layer: %s", type(exc).__name__, exc_info=exc)
            status, reason, text = 500, "internal_error", "Internal gateway error."
        else:
            reason, text = "http_error", f"The request failed with HTTP {status}."
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun; the connection is closed instead")
        body = {"error": {"message": text, "type": "invalid_request_error" if status < 500 else "api_error",
                          "param": None, "code": "bad_http_request" if status < 500 else reason}}
        resp = web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        fault = client_fault(kw.get("exc_info"))
        if fault is not None:
            # A malformed body seen while discarding it after the answer went
            # out: the client's fault, and its message quotes bytes.
            self._limits.on_bad_request(fault[0])
            log.debug("discarded a malformed request body: %s", fault[0])
            return
        super().log_exception(*args, **kw)


class _GuardedServer(Server):
    """The server aiohttp built for the app, making GuardedRequestHandlers."""

    def __init__(self, base: Server, limits: ConnectionLimits) -> None:
        # Same request handler, factory and per-connection arguments as the
        # server aiohttp made (AppRunner has no hook for the protocol class).
        super().__init__(base.request_handler, request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation, loop=base._loop, **base._kwargs)
        self._limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, self._limits, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections are GuardedRequestHandlers."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout_s, auto_decompress=False, **kwargs)
        self._limits = limits

    async def _make_server(self) -> Server:
        return _GuardedServer(await super()._make_server(), self._limits)
