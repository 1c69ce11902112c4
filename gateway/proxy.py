"""The one pass-through path shared by every model endpoint.

    authenticate -> read body -> parse model -> resolve model for the key
    -> admit (key limits, gateway.limits) -> route (skipping open breakers
    and cooling routes) -> for each target: pass through or translate
    (decided once per target: does its upstream speak the client's
    protocol?) -> strip + inject headers, forward -> relay (chunk by chunk,
    usage read by the protocol's reader; or translated event by event)

Nothing here awaits the database; the usage row is recorded by the
middleware from the RequestContext this path fills in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from time import perf_counter
from typing import Any
from urllib.parse import quote, unquote

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from . import __version__, safejson
from .auth import KeyInfo
from .bounds import shown
from .config import CHAT_PROTOCOLS, ModelConfig, UpstreamConfig
from .context import CTX, GATEWAY, Gateway, RequestContext
from .errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    NotFound,
    RateLimited,
    ServiceUnavailable,
)
from .errors import Protocol as ErrorShape
from .intake import admit, admit_free, check_body, read_body, resolve_model
from .protocols.base import Counter, Decompressed, Endpoint, Prepared, UsageReader
from .routing import DENIED, NORMAL, Target
from .translate import PATHS, TranslatedStream, client_error, pair
from .translate.common import DEFAULT_MAX_TOKENS, estimate_tokens
from .upstream import UpstreamError, UpstreamResponse, UpstreamTimeout

log = logging.getLogger("gateway.proxy")

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Never forwarded upstream: the client's credential, and what the upstream
# client writes itself (Host, Content-Length; the body is sent whole, so no Expect).
STRIP_REQUEST = HOP_BY_HOP | {
    "authorization", "x-api-key", "cookie", "host", "content-length", "accept-encoding", "expect",
}
STRIP_RESPONSE = HOP_BY_HOP | {"content-length"}
# Bodies up to this size with a Content-Length are answered in one write.
SMALL_BODY = 256 * 1024
USER_AGENT = f"gateway/{__version__}"


# Characters left as they are when the route's own path has to be encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def public_path(path: str) -> str:
    """The public path of a request: ``/v1/v1/...`` (a base URL ending in
    /v1 given to a client that adds /v1 itself) is ``/v1/...``."""
    return path[3:] if path.startswith("/v1/v1/") else path


def upstream_target(request: web.Request) -> tuple[str, str]:
    """The path after ``/v1`` and the query, as the client sent them, byte
    for byte (aiohttp's decoded ``path`` and ``query_string`` would turn
    ``%20`` into a space and cut at ``%23``). The raw path is used when it
    decodes to the path the route matched; otherwise that path, encoded.
    The ``/v1/v1`` alias of Anthropic paths goes upstream as ``/v1``."""
    raw_path, _, raw_query = request.raw_path.partition("?")
    if not raw_path.startswith("/v1/") or ("%" in raw_path and unquote(raw_path) != request.path):
        raw_path = quote(request.path, safe=_PATH_SAFE)
    return public_path(raw_path)[3:], raw_query


def upstream_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str], target: Target) -> list[tuple[str, str]]:
    """The client's end-to-end headers, less its credential, plus the
    upstream's (Authorization or x-api-key: both always stripped above).
    ``anthropic-beta`` flags an upstream does not accept
    (``anthropic_betas``) are dropped for it."""
    named = headers.get("Connection")  # what it names is hop-by-hop too
    drop = STRIP_REQUEST | {t.strip().lower() for t in named.split(",")} if named else STRIP_REQUEST
    out = [(k, v) for k, v in headers.items() if (lk := k.lower()) not in drop and not lk.startswith("proxy-")]
    allowed = target.upstream.anthropic_betas
    if allowed is not None and "anthropic-beta" in headers:
        out = _allowed_betas(out, allowed)
    # Usage is read from the bytes, so ask for them uncompressed.
    out.append(("Accept-Encoding", "identity"))
    if "User-Agent" not in headers:
        out.append(("User-Agent", USER_AGENT))
    out.extend(target.credential)
    return out


_STRIP_RESPONSE_RAW = frozenset(h.encode() for h in STRIP_RESPONSE)


def _allowed_betas(headers: list[tuple[str, str]], allowed: frozenset[str]) -> list[tuple[str, str]]:
    out = []
    for k, v in headers:
        if k.lower() == "anthropic-beta":
            v = ",".join(f for f in (x.strip() for x in v.split(",")) if f in allowed)
            if not v:
                continue
        out.append((k, v))
    return out


def response_headers(
    raw: list[tuple[bytes, bytes]], request_id: str
) -> tuple[CIMultiDict[str], str, str, int | None]:
    """From the upstream's raw headers, in one pass: the headers for the
    client (hop-by-hop and framing dropped, plus ``x-request-id``), and the
    Content-Type, Content-Encoding and Content-Length."""
    out: CIMultiDict[str] = CIMultiDict()
    add = out.add
    ctype = encoding = ""
    length: int | None = None
    named: bytes | None = None
    for k, v in raw:
        lk = k.lower()
        if lk in _STRIP_RESPONSE_RAW or lk.startswith(b"proxy-"):
            if lk == b"content-length" and v.isdigit():
                length = int(v)
            elif lk == b"connection":
                named = v
            continue
        value = v.decode("utf-8", "surrogateescape")
        if lk == b"content-type":
            ctype = value
        elif lk == b"content-encoding":
            encoding = value
        add(k.decode("latin-1"), value)
    if named:  # what the upstream's Connection header names is hop-by-hop too
        for token in named.decode("latin-1").split(","):
            out.popall(token.strip(), None)
    out["x-request-id"] = request_id
    return out, ctype, encoding, length


async def handle_json(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """A model endpoint whose body names a ``model`` (JSON, or a form where
    the endpoint's ``parse`` accepts one)."""
    gw = request.app[GATEWAY]
    ctx = request[CTX]
    ctx.key = key = gw.keys.authenticate(request) or await gw.keys.authenticate_new(request)
    raw = await read_body(request, gw)
    ctx.bytes_in = len(raw)
    obj, model = endpoint.parse(request.headers.get("Content-Type", ""), raw)
    ctx.stream = obj.get("stream") is True
    if ctx.stream and endpoint.name in CHAT_PROTOCOLS:
        ctx.request_obj = obj  # for a stream the client cuts short (intake.estimate_cut)
    ctx.model = model  # recorded (bounded) even when it turns out unknown
    ctx.model_cfg = model_cfg = resolve_model(gw, key, model)
    if endpoint.free:
        admit_free(gw, ctx, key)
    else:
        check_body(obj, model_cfg, endpoint.errors is ErrorShape.ANTHROPIC)
        await admit(gw, ctx, key)
    if endpoint.name == "count_tokens" and not any("messages" in t.upstream.protocols
                                                   for t in gw.router.plan(model_cfg.name)):
        return await count_elsewhere(request, gw, ctx, model_cfg, obj)
    targets = await model_targets(gw, key, endpoint, model_cfg, obj)
    return await forward(request, gw, ctx, endpoint, model_cfg, raw, obj, targets)


async def model_targets(
    gw: Gateway, key: KeyInfo, endpoint: Endpoint, model_cfg: ModelConfig, obj: dict[str, Any]
) -> list[Target]:
    """The targets a request for a model may go to, in order: the model's
    routes, narrowed to upstreams that speak what the endpoint needs
    (count_tokens: Messages) and to the upstream holding the request's
    ``previous_response_id`` (gateway.affinity)."""
    targets = [t for t in gw.router.plan(model_cfg.name) if answers(t.upstream, endpoint)]
    if not targets:
        raise NotFound(f"The model '{model_cfg.name}' has no upstream that answers {endpoint.path}.",
                       code="unsupported_endpoint", param="model")
    prev = obj.get("previous_response_id")
    if prev is None:
        return targets
    if not isinstance(prev, str) or not prev:
        raise BadRequest("'previous_response_id' must be a non-empty string.", code="invalid_value",
                         param="previous_response_id")
    origin = await gw.origins.find(prev, key.workspace_id)
    if origin is None:
        raise BadRequest(f"Previous response with id '{shown(prev)}' not found.",
                         code="previous_response_not_found", param="previous_response_id")
    pinned = [t for t in targets if t.upstream.name == origin.upstream]
    if not pinned:
        raise BadRequest(
            f"Previous response '{shown(prev)}' was made by an upstream that model '{model_cfg.name}' "
            "does not route to; continue it with the model that made it.",
            code="previous_response_not_routable", param="previous_response_id",
        )
    return pinned


def answers(up: UpstreamConfig, endpoint: Endpoint) -> bool:
    """Whether ``up`` can answer ``endpoint``: one needing a chat protocol
    (``speaks``) only if it speaks it; a chat endpoint always (spoken or
    translated, ``Target.bridges``); OpenAI's other endpoints (embeddings,
    images, audio, ...) on any kind but Anthropic's, whose API has none."""
    if endpoint.speaks is not None:
        return endpoint.speaks in up.protocols
    return endpoint.name in CHAT_PROTOCOLS or up.kind != "anthropic"


Relay = Callable[
    [web.Request, RequestContext, Endpoint, Prepared, UpstreamResponse, Target, "Bridge | None"],
    Awaitable[web.StreamResponse],
]


async def relay_http(
    request: web.Request, ctx: RequestContext, endpoint: Endpoint, prepared: Prepared, resp: UpstreamResponse,
    target: Target, bridge: Bridge | None,
) -> web.StreamResponse:
    """The answer to the HTTP client: as sent, or translated (``bridge``)."""
    if bridge is None:
        return await relay(request, ctx, endpoint, prepared, resp, target)
    return await relay_translated(request, ctx, bridge, resp, target)


async def forward(
    request: web.Request,
    gw: Gateway,
    ctx: RequestContext,
    endpoint: Endpoint,
    model_cfg: ModelConfig | None,
    raw: bytes,
    obj: dict[str, Any],
    targets: list[Target],
    *,
    method: str | None = None,
    path: str | None = None,
    headers: CIMultiDictProxy[str] | CIMultiDict[str] | None = None,
    relay_to: Relay = relay_http,
) -> web.StreamResponse:
    """Try ``targets`` in order until one answers, and relay its answer
    (``relay_to``: to the HTTP client by default; the WebSocket door passes
    its own). ``method``, ``path`` (after /v1) and ``headers`` default to
    the client request's; ``model_cfg`` is None for a request naming an
    object rather than a model (it passes through).

    Targets whose breaker is open or whose route is cooling after a 429 are
    skipped (not attempts). A connect error, timeout, 5xx or 429 moves on to
    the next available target while nothing has been sent to the client, up
    to ``routing.max_attempts`` attempts and ``routing.retry_budget_s``.
    The body is replayed from memory on every attempt. A ``free``
    endpoint's 429 is relayed at once and cools nothing (see
    ``Endpoint.free``).

    A Responses object made here is remembered with its upstream
    (gateway.affinity) once its answer has been relayed.
    """
    key = ctx.key
    assert key is not None
    router = gw.router
    client = gw.upstream
    assert client is not None
    clock = gw.clock
    public_model = model_cfg.name if model_cfg is not None else ""
    raw_path, query = upstream_target(request)
    path = path or raw_path
    method = method or request.method
    client_headers = request.headers if headers is None else headers
    deadline = ctx.t0 + router.retry_budget_s
    attempts_left = router.max_attempts
    failure: GatewayError | None = None
    for i, target in enumerate(targets):
        now = clock()
        if now < target.cooldown.until:
            continue
        wire = target.bridges.get(endpoint.name) if target.bridges and model_cfg is not None else None
        bridge: Bridge | None = None
        if wire is not None and model_cfg is not None:
            try:
                bridge = Bridge(endpoint.name, wire, obj, target.route.model, model_cfg)
            except GatewayError as e:  # a field this route's protocol cannot carry
                failure = e
                continue
        up = target.upstream
        if bridge is None:
            prepared = endpoint.prepare(raw, obj, target.route.model, public_model)
            url = target.url(path, query)
            sent = upstream_headers(client_headers, target)
        else:
            prepared = bridge.prepared
            url = target.url(PATHS[bridge.wire], "")  # the client's query string is its protocol's
            sent = bridge.headers(upstream_headers(client_headers, target))
        # Taken once nothing but the upstream call can fail: a grant taken and
        # not given back (a half-open breaker's one probe) would refuse every
        # request to this upstream for good.
        breaker = target.breaker
        grant = breaker.acquire(now)
        if grant == DENIED:
            continue
        attempts_left -= 1
        ctx.upstream = up.name
        ctx.t_upstream = perf_counter()
        try:
            resp = await client.request(
                method, url, sent, prepared.body,
                connect_timeout=up.connect_timeout_s, first_byte_timeout=up.first_byte_timeout_s,
                total_timeout=up.timeout_s,
            )
        except TimeoutError as e:
            breaker.failure(grant, clock())
            log.warning("upstream %s timed out: %s", up.name, _timeout_reason(e, up))
            failure = GatewayTimeout(f"Upstream '{up.name}' timed out.")
            ctx.error_type = "upstream_timeout"
            if not _more(targets, i, attempts_left, deadline, clock):
                break
            continue
        except UpstreamError as e:
            breaker.failure(grant, clock())
            log.warning("upstream %s unreachable: %s", up.name, e)  # host, port and why: never the request
            failure = BadGateway(f"Upstream '{up.name}' is unreachable.", code="upstream_unreachable")
            ctx.error_type = "upstream_unreachable"
            if not _more(targets, i, attempts_left, deadline, clock):
                break
            continue
        except BaseException:
            breaker.release(grant)  # cancelled: the client went away
            raise
        try:
            status = resp.status
            if status == 429 and endpoint.free:
                breaker.success(grant)  # its own limit upstream: generations are not held back
            elif status == 429:
                # Alive but saturated: cool this route, not the breaker.
                breaker.success(grant)
                target.cooldown.until = clock() + _cooldown_s(resp.headers, up)
            elif status >= 500:
                breaker.failure(grant, clock())
            else:
                breaker.success(grant)
            retry = status >= 500 or (status == 429 and not endpoint.free)
            if retry and _more(targets, i, attempts_left, deadline, clock):
                ctx.error_type = f"upstream_{status}"
                # Only raised if every later target turns out unavailable.
                failure = BadGateway(f"Upstream '{up.name}' answered HTTP {status}.", code="upstream_error")
                continue
            if status in (401, 403):
                log.error("upstream %s rejected the gateway's credential (%d)", up.name, status)
                raise BadGateway(
                    f"Upstream '{up.name}' rejected the gateway's credential (HTTP {status}).",
                    code="upstream_auth_failed",
                )
            ctx.error_type = None
            out = await relay_to(request, ctx, endpoint, prepared, resp, target, bridge)
            if ctx.error_type in ("upstream_idle_timeout", "upstream_disconnected"):
                breaker.failure(NORMAL, clock())
            made = ctx.usage.response_id if ctx.usage is not None and bridge is None else None
            if made is not None and ctx.status < 400:
                gw.origins.remember(made, key.workspace_id, up.name, ctx.model)
            return out
        finally:
            resp.release()
    if failure is not None:
        raise failure
    raise _unavailable(gw, public_model, targets, clock())


def _timeout_reason(e: TimeoutError, up: UpstreamConfig) -> str:
    kind = e.kind if isinstance(e, UpstreamTimeout) else None
    if kind == "connect":
        return f"no connection within {up.connect_timeout_s:g} s"
    if kind == "first byte":
        return f"no response head within {up.first_byte_timeout_s:g} s"
    if kind == "total":
        return f"the exchange took longer than {up.timeout_s:g} s"
    return str(e)


def _more(targets: list[Target], i: int, attempts_left: int, deadline: float, clock: Callable[[], float]) -> bool:
    """Whether a failed attempt may move on: attempts and time left, and a
    later target that is not skipped."""
    if attempts_left <= 0 or perf_counter() >= deadline:
        return False
    now = clock()
    return any(t.available(now) for t in targets[i + 1 :])


def _cooldown_s(headers: CIMultiDict[str], up: UpstreamConfig) -> float:
    """How long to skip a route that answered 429: its ``retry-after-ms`` or
    ``Retry-After`` (seconds or an HTTP date), capped, or the upstream's
    default cool-down."""
    ms = headers.get("retry-after-ms")
    retry_after = headers.get("Retry-After")
    if ms:
        with contextlib.suppress(ValueError):
            retry_after = str(float(ms) / 1000)
    if retry_after:
        try:
            wait = float(retry_after)
        except ValueError:
            try:
                wait = parsedate_to_datetime(retry_after).timestamp() - time.time()
            except (TypeError, ValueError, IndexError):
                wait = up.rate_limit_cooldown_s
        if math.isfinite(wait):
            return min(max(wait, 0.0), up.rate_limit_cooldown_max_s)
    return up.rate_limit_cooldown_s


def _unavailable(gw: Gateway, model: str, targets: list[Target], now: float) -> GatewayError:
    """Every route is skipped: 429 if one is only cooling after upstream
    429s, else 503; Retry-After says when the first one comes back."""
    if not targets:
        return ServiceUnavailable(f"No healthy upstream for model '{model}'.")
    back = min(max(t.cooldown.until, t.breaker.until) for t in targets) - now
    headers = {"Retry-After": str(max(1, math.ceil(back)))}
    if any(t.cooldown.until > now and t.breaker.available(now) for t in targets):
        gw.metrics.rate_limited.labels("upstream").inc()
        return RateLimited(f"Every upstream for model '{model}' is rate limited; retry later.",
                           code="upstream_rate_limited", headers=headers)
    return ServiceUnavailable(f"No healthy upstream for model '{model}'.", headers=headers)


def _overhead(ctx: RequestContext, now: float) -> float:
    assert ctx.t_upstream is not None and ctx.t_head is not None
    return ((ctx.t_upstream - ctx.t0) + (now - ctx.t_head)) * 1000


async def relay(
    request: web.Request,
    ctx: RequestContext,
    endpoint: Endpoint,
    prepared: Prepared,
    resp: UpstreamResponse,
    target: Target,
) -> web.StreamResponse:
    """Send the upstream answer to the client as it arrives."""
    ctx.t_head = perf_counter()
    ctx.status = status = resp.status
    headers, ctype, encoding, length = response_headers(resp.raw_headers, ctx.request_id)
    if ctx.rate_headers:
        for k, v in ctx.rate_headers:
            headers[k] = v
    sse = ctype.startswith("text/event-stream")
    reader = endpoint.reader(prepared, sse)
    if encoding and encoding.lower() != "identity":
        # Asked for identity, got compressed: relay as sent, read a copy.
        reader = Decompressed(reader)

    # From the head on, the idle timeout bounds every wait for body bytes.
    resp.set_idle_timeout(target.upstream.idle_timeout_s)
    if not sse and length is not None and length <= SMALL_BODY:
        try:
            body = await resp.read()
        except TimeoutError:
            ctx.error_type = "upstream_idle_timeout"
            raise GatewayTimeout(f"Upstream '{target.upstream.name}' stalled mid-answer.") from None
        except UpstreamError:
            ctx.error_type = "upstream_disconnected"
            raise BadGateway(f"Upstream '{target.upstream.name}' broke off its answer.",
                             code="upstream_disconnected") from None
        reader.feed(body)
        ctx.usage = reader.finish()
        now = perf_counter()
        ctx.overhead_ms = overhead = _overhead(ctx, now)
        ctx.ttfb_ms = (now - ctx.t0) * 1000
        ctx.bytes_out = len(body)
        headers["x-gateway-overhead-ms"] = f"{overhead:.3f}"
        return web.Response(status=status, body=body, headers=headers)

    out = web.StreamResponse(status=status, headers=headers)
    if length is not None and not sse:
        out.content_length = length
    return await pump(request, ctx, reader, resp, out)


async def pump(
    request: web.Request, ctx: RequestContext, reader: UsageReader, resp: UpstreamResponse,
    out: web.StreamResponse,
) -> web.StreamResponse:
    """Send the head, then every body chunk as the reader returns it, as it
    arrives; the usage seen is recorded however the stream ends."""
    ctx.reader = reader
    ctx.overhead_ms = overhead = _overhead(ctx, perf_counter())
    out.headers["x-gateway-overhead-ms"] = f"{overhead:.3f}"
    try:
        await out.prepare(request)
    except ConnectionError:  # the client left while the upstream answered
        ctx.status, ctx.error_type = 499, "client_disconnected"
        resp.close()
        return out
    # A chat stream counts the SSE events relayed (either line ending), what
    # a stream the client cuts is billed by (intake.estimate_cut).
    events = Counter(b"\n\n", b"\r\n\r\n") if ctx.request_obj is not None else None
    try:
        while True:
            chunk = await read_chunk(ctx, resp)
            if chunk is None:
                break
            if not chunk:
                chunk = reader.flush()
                if chunk:
                    await _write(ctx, out, chunk, events)
                break
            data = reader.feed(chunk)
            if data:
                await _write(ctx, out, data, events)
    except ConnectionError:
        ctx.status, ctx.error_type = 499, "client_disconnected"
        resp.close()
        return out
    finally:
        ctx.usage = usage = reader.finish()
    if ctx.error_type is None and usage.error is not None:
        ctx.error_type = usage.error  # relayed in full, but not a clean answer
    elif ctx.error_type is not None:
        resp.close()
        cut = ctx.error_type == "upstream_disconnected" or out.content_length is not None
        if cut and request.transport is not None:
            # Mirror the upstream's failure: the client sees a truncated body
            # rather than a clean end it would take for a complete answer.
            # (An idle timeout ends the stream cleanly instead.)
            request.transport.close()
            return out
    try:
        await out.write_eof()
    except ConnectionError:
        ctx.status, ctx.error_type = 499, "client_disconnected"
    return out


async def read_chunk(ctx: RequestContext, resp: UpstreamResponse) -> bytes | None:
    """The next body bytes of an upstream answer (b"" at its end), or None
    when it stalled or broke off (the row's status and error_type say which)."""
    try:
        return await resp.readany()
    except TimeoutError:
        ctx.status, ctx.error_type = 504, "upstream_idle_timeout"
    except UpstreamError:
        ctx.status, ctx.error_type = 502, "upstream_disconnected"
    return None


async def _write(ctx: RequestContext, out: web.StreamResponse, data: bytes, events: Counter | None) -> None:
    if ctx.ttfb_ms is None:
        ctx.ttfb_ms = (perf_counter() - ctx.t0) * 1000
    ctx.bytes_out += len(data)
    if events is not None:
        events.feed(data)
        ctx.events_out = events.count
    await out.write(data)



class Bridge:
    """One attempt's translation: the client's request in the route's wire
    protocol (built when the route is chosen, so a field the wire protocol
    cannot carry is a 400 before anything is sent), and how to translate
    what comes back (gateway.translate; docs/translation.md)."""

    __slots__ = ("client", "module", "prepared", "public_model", "req", "wire")

    def __init__(self, client: str, wire: str, obj: dict[str, Any], upstream_model: str, model_cfg: ModelConfig,
                 *, count: bool = False):
        self.client, self.wire, self.req = client, wire, obj
        self.module = pair(client, wire)
        self.public_model = model_cfg.name
        if count:  # Anthropic's count_tokens as a Responses input_tokens body (gateway.counting)
            body = self.module.count_request(obj, upstream_model)
        else:
            body = self.module.request(obj, upstream_model, model_cfg.max_output_tokens or DEFAULT_MAX_TOKENS)
        try:
            data = orjson.dumps(body)
        except orjson.JSONEncodeError:  # nested past orjson's 255 levels (it parses up to 1024)
            raise BadRequest("The request is nested too deeply to translate.", code="invalid_request") from None
        self.prepared = Prepared(data, body.get("stream") is True)

    def headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The forwarded headers less the client protocol's own, plus what
        the wire protocol requires (Anthropic's API version)."""
        out = [(k, v) for k, v in headers if not k.lower().startswith(("anthropic-", "content-type"))]
        out.append(("Content-Type", "application/json"))
        if self.wire == "messages":
            version = next((v for k, v in headers if k.lower() == "anthropic-version"), ANTHROPIC_VERSION)
            out.append(("anthropic-version", version))
        return out


ANTHROPIC_VERSION = "2023-06-01"
# A translated answer that is not a stream is parsed whole; bound it.
MAX_TRANSLATED_BODY = 64 * 1024 * 1024


async def relay_translated(
    request: web.Request, ctx: RequestContext, bridge: Bridge, resp: UpstreamResponse, target: Target,
) -> web.StreamResponse:
    """Send the upstream answer to the client in the client's protocol: an
    error in the client's error shape with the upstream's status, a JSON
    answer translated whole, a stream translated event by event as it
    arrives."""
    ctx.t_head = perf_counter()
    ctx.status = status = resp.status
    up = target.upstream
    headers, ctype, encoding, _ = response_headers(resp.raw_headers, ctx.request_id)
    for name in ("Content-Type", "Content-Encoding"):
        headers.popall(name, None)
    if ctx.rate_headers:
        for k, v in ctx.rate_headers:
            headers[k] = v
    compressed = bool(encoding) and encoding.lower() != "identity"
    resp.set_idle_timeout(up.idle_timeout_s)
    if status < 300 and ctype.startswith("text/event-stream") and not compressed:
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        reader = TranslatedStream(bridge.module.Stream(bridge.req, bridge.public_model))
        return await pump(request, ctx, reader, resp, web.StreamResponse(status=status, headers=headers))
    body = await read_whole(resp, ctx, up.name)
    if compressed:
        body = _decompress(body, up.name, ctx)
    if status >= 300:
        ctx.usage = None
        data = client_error(bridge.client, status, body, up.name)
    else:
        try:
            answer = safejson.loads(body)
            if not isinstance(answer, dict):
                raise ValueError
            translated, ctx.usage = bridge.module.response(answer, bridge.req)
            data = orjson.dumps(translated)
        except (ValueError, GatewayError):
            ctx.error_type = "upstream_bad_answer"
            raise BadGateway(f"Upstream '{up.name}' sent an answer that could not be translated.",
                             code="upstream_bad_answer") from None
    now = perf_counter()
    ctx.overhead_ms = overhead = _overhead(ctx, now)
    ctx.ttfb_ms = (now - ctx.t0) * 1000
    ctx.bytes_out = len(data)
    headers["x-gateway-overhead-ms"] = f"{overhead:.3f}"
    headers["Content-Type"] = "application/json"
    return web.Response(status=status, body=data, headers=headers)


async def read_whole(resp: UpstreamResponse, ctx: RequestContext, name: str) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        while chunk := await resp.readany():
            size += len(chunk)
            if size > MAX_TRANSLATED_BODY:
                ctx.error_type = "upstream_bad_answer"
                raise BadGateway(f"Upstream '{name}' sent an answer too large to translate.",
                                 code="upstream_bad_answer")
            parts.append(chunk)
    except TimeoutError:
        ctx.error_type = "upstream_idle_timeout"
        raise GatewayTimeout(f"Upstream '{name}' stalled mid-answer.") from None
    except UpstreamError:
        ctx.error_type = "upstream_disconnected"
        raise BadGateway(f"Upstream '{name}' broke off its answer.", code="upstream_disconnected") from None
    return b"".join(parts)


def _decompress(body: bytes, name: str, ctx: RequestContext) -> bytes:
    """An answer compressed although identity was asked for (gzip or zlib)."""
    z = zlib.decompressobj(47)
    try:
        data = z.decompress(body, MAX_TRANSLATED_BODY)
    except zlib.error:
        data = b""
    if not data or z.unconsumed_tail:
        ctx.error_type = "upstream_bad_answer"
        raise BadGateway(f"Upstream '{name}' sent an answer that could not be translated.", code="upstream_bad_answer")
    return data


# ------------------------------------------------ count_tokens, no Messages upstream
#
# For a model that no Messages upstream serves, the count comes from its
# first available Responses upstream (POST /responses/input_tokens, OpenAI's
# own counting, the body translated), otherwise from a local estimate
# (translate.common.estimate_tokens, said in x-gateway-token-count:
# estimate). A count is advisory: an upstream that cannot count (no such
# endpoint, unreachable, a field with no counterpart) gives way to the
# estimate rather than failing the client. The row bills nothing.

# Statuses that mean "this upstream has no counting endpoint".
NO_COUNTER = frozenset({404, 405, 501})


async def count_elsewhere(
    request: web.Request, gw: Gateway, ctx: RequestContext, model_cfg: ModelConfig, obj: dict[str, Any],
) -> web.StreamResponse:
    now = gw.clock()
    target = next((t for t in gw.router.plan(model_cfg.name)
                   if "responses" in t.upstream.protocols and t.available(now)), None)
    if target is not None:
        answer = await _upstream_count(request, gw, ctx, target, model_cfg, obj)
        if answer is not None:
            return answer
    ctx.status = 200
    body = orjson.dumps({"input_tokens": estimate_tokens([obj.get("system"), obj.get("messages"), obj.get("tools")])})
    return web.Response(body=body, content_type="application/json", headers={"x-gateway-token-count": "estimate"})


async def _upstream_count(
    request: web.Request, gw: Gateway, ctx: RequestContext, target: Target, model_cfg: ModelConfig,
    obj: dict[str, Any],
) -> web.StreamResponse | None:
    up = target.upstream
    try:
        bridge = Bridge("messages", "responses", obj, target.route.model, model_cfg, count=True)
    except GatewayError:
        return None  # a field Responses cannot carry: the estimate still can
    client = gw.upstream
    assert client is not None
    ctx.upstream = up.name
    headers = bridge.headers(upstream_headers(request.headers, target))
    try:
        resp = await client.request(
            "POST", target.url("/responses/input_tokens", ""), headers, bridge.prepared.body,
            connect_timeout=up.connect_timeout_s, first_byte_timeout=up.first_byte_timeout_s,
            total_timeout=up.timeout_s,
        )
    except UpstreamError as e:  # timeouts included
        log.warning("upstream %s could not count tokens: %s", up.name, e)
        return None
    try:
        resp.set_idle_timeout(up.idle_timeout_s)
        try:
            data = await read_whole(resp, ctx, up.name)
        except GatewayError:
            ctx.error_type = None
            return None
        if resp.status in NO_COUNTER:
            return None
        if resp.status in (401, 403):
            # The gateway's credential, not the client's: never relayed as
            # the client's authentication error (nor the upstream's message,
            # which may quote the key it was given).
            log.error("upstream %s rejected the gateway's credential (%d)", up.name, resp.status)
            raise BadGateway(f"Upstream '{up.name}' rejected the gateway's credential (HTTP {resp.status}).",
                             code="upstream_auth_failed")
        if resp.status >= 300:
            ctx.status = resp.status
            return web.Response(status=resp.status, body=client_error("messages", resp.status, data, up.name),
                                content_type="application/json")
        try:
            n = safejson.loads(data).get("input_tokens")
        except (orjson.JSONDecodeError, AttributeError):
            n = None
        if not isinstance(n, int) or isinstance(n, bool):
            return None
        ctx.status = 200
        return web.Response(body=orjson.dumps({"input_tokens": n}), content_type="application/json")
    finally:
        resp.release()
