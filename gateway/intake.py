"""The steps every front door shares, below the pass-through path and the
task handlers: read the body (bounded in size and time), resolve the model
for the key, admit the request against the key's limits.

    authenticate (auth.KeyCache) -> read_body -> parse (protocols)
    -> resolve_model -> admit

Doors: the model endpoints (gateway.proxy), video tasks and assets
(gateway.tasks.handlers), and any door added beside them.
"""

from __future__ import annotations

import asyncio
from time import perf_counter

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .auth import KeyInfo
from .bounds import shown
from .config import ModelConfig
from .context import Gateway, RequestContext
from .errors import BadRequest, Forbidden, NotFound, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from .logs import log_request


async def read_body(request: web.Request, gw: Gateway) -> bytes:
    """The whole request body: 413 before reading past ``server.max_body_mb``,
    408 when the client takes longer than ``server.body_timeout_s`` to send
    it (a slow or stalled client must not hold a request open forever),
    400 when it does not match its framing. A compressed body is refused
    (415): the gateway reads the body it forwards, and decompressing a
    client's bytes is a way to make it hold far more than ``max_body_mb``."""
    server = gw.config.server
    limit = server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body exceeds {limit} bytes.")
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise UnsupportedMediaType(f"Content-Encoding '{shown(encoding)}' is not accepted: send the body "
                                   "uncompressed.")
    try:
        if request.content.is_eof():
            return await request.read()  # all here already (the usual case): no timer needed
        async with asyncio.timeout(server.body_timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body exceeds {limit} bytes.") from None
    except TimeoutError:
        gw.metrics.client_timeouts.labels("body").inc()
        raise RequestTimeout(f"The request body did not arrive within {server.body_timeout_s:g} s.") from None
    except RequestPayloadError:
        raise BadRequest("The request body does not match its framing (Content-Length or chunked encoding).",
                         code="invalid_body") from None


async def admit(gw: Gateway, ctx: RequestContext, key: KeyInfo) -> None:
    """Check the key's limits (429 if over); the middleware releases the
    concurrency slot and settles tokens and spend when the request ends."""
    ctx.rate_headers = await gw.limits.admit(key)
    ctx.admitted = True


def admit_free(gw: Gateway, ctx: RequestContext, key: KeyInfo) -> None:
    """Admit a request that bills nothing (a token count, a warm-up):
    exempt from the key's limits, bounded by ``server.free_rpm`` and
    ``server.free_concurrency`` per key instead (429 past them)."""
    server = gw.config.server
    gw.limits.admit_free(key, server.free_rpm, server.free_concurrency)
    ctx.admitted_free = True


def resolve_model(gw: Gateway, key: KeyInfo, model: str) -> ModelConfig:
    m = gw.config.model(model)
    if m is None:
        raise NotFound(f"The model '{shown(model)}' does not exist.", code="model_not_found", param="model")
    if model not in key.models:
        raise Forbidden(f"This key may not use the model '{shown(model)}'.", code="model_not_allowed",
                        param="model")
    return m


def finish(gw: Gateway, ctx: RequestContext, method: str, path: str) -> None:
    """The end of one /v1 request: its usage row (and log line), its
    concurrency slot released, its tokens and spend settled. The request
    middleware calls it for every request; a door that makes several rows
    from one connection (the Responses WebSocket) calls it for each."""
    writer = gw.writer
    assert writer is not None
    row = ctx.row(perf_counter())
    writer.record(row, ctx.seq)
    if gw.config.server.log_requests:
        log_request(row, method, path)
    key = ctx.key
    if key is not None:
        if ctx.admitted:
            gw.limits.release(key)
        elif ctx.admitted_free:
            gw.limits.release_free(key)
        u = ctx.usage
        if u is not None:
            # Token and spend limits count what was actually recorded.
            gw.limits.settle(key, u.input_tokens + u.output_tokens, ctx.cost_usd)
