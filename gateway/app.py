"""create_app(cfg): routes, the request middleware, and every long-lived
resource as a cleanup_ctx (database, key cache, usage writer, client session)
so teardown runs only if setup ran, after in-flight handlers finish."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from time import perf_counter
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from . import accounts, admin, bounds, websocket
from .affinity import ResponseOrigins
from .auth import KeyCache
from .config import Config, ConfigError
from .context import CTX, GATEWAY, Gateway, RequestContext
from .errors import BadRequest, GatewayError, MethodNotAllowed, NotFound, Protocol, render
from .intake import finish
from .limits import Limiter, LocalLimiter
from .metrics import Metrics
from .protocols.anthropic import CountTokens, Messages
from .protocols.audio import Speech, Transcriptions, Translations
from .protocols.base import Endpoint
from .protocols.images import ImageEdits, ImageGenerations, ImageVariations
from .protocols.openai import ChatCompletions, Completions, Embeddings, Moderations
from .protocols.responses import Responses, ResponsesCompact, ResponsesInputTokens
from .proxy import handle_json, public_path
from .reload import FORCED, reload_config
from .routing import Health, Router
from .store.base import open_store
from .store.retention import run_retention
from .store.spool import spool_dir
from .store.usage import UsageWriter
from .stored import handle_stored
from .tasks import handlers as tasks
from .upstream import UpstreamClient

# How long a usage batch's commit may take beyond the flush interval (affinity).
SETTLE_COMMIT_S = 0.5

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Long-lived tasks kept by name so they are not garbage collected mid-run.
TASKS = web.AppKey("tasks", dict[str, "asyncio.Task[None]"])
STARTED = web.AppKey("started", float)


def error_shape(path: str) -> Protocol:
    path = public_path(path)
    if path.startswith("/v1/messages"):
        return Protocol.ANTHROPIC
    if path.startswith(("/v1/assets", "/v1/asset-groups")):
        return Protocol.ENVELOPE
    return Protocol.OPENAI


def routing_error(request: web.Request, e: web.HTTPException) -> GatewayError:
    """aiohttp's plain-text 404 and 405, as the gateway's JSON errors."""
    method, path = bounds.shown(request.method), bounds.shown(request.path)
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = " or ".join(sorted(e.allowed_methods))
        return MethodNotAllowed(f"{method} is not allowed on {path}; use {allowed}.",
                                headers={"Allow": ",".join(sorted(e.allowed_methods))})
    if request.path.startswith("/v1/"):
        return NotFound(f"Unknown endpoint {method} {path}.", code="unknown_endpoint")
    return NotFound(f"Nothing at {path}: the API is under /v1 (POST /v1/chat/completions, ...), "
                    "the console at /console/.")


def _endpoint_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return public_path(resource.canonical) if resource is not None else "unmatched"


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id and timing for every request; for /v1, exactly one usage
    row per request, whatever happens (errors, client gone: 499)."""
    t0 = perf_counter()
    gw = request.app[GATEWAY]
    # The client's id is stored, logged and echoed: kept only if it looks like one.
    request_id = bounds.request_id(request.headers.get("x-request-id")) or gw.new_request_id()
    if not request.path.startswith("/v1/"):
        try:
            resp = await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as e:
            resp = render(routing_error(request, e), Protocol.OPENAI)
        if not resp.prepared:
            resp.headers["x-request-id"] = request_id
        return resp

    writer = gw.writer
    assert writer is not None
    if writer.full:
        await writer.wait_for_room()
    ctx = RequestContext(request_id, t0, endpoint=_endpoint_label(request), errors=error_shape(request.path))
    request[CTX] = ctx
    gw.in_flight += 1
    ctx.seq = writer.begin(ctx)
    try:
        try:
            resp = await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as e:
            raise routing_error(request, e) from None
        except web.HTTPException as e:
            raise GatewayError(e.reason, code="http_error", status=e.status) from None
        if not ctx.status:
            ctx.status = resp.status
    except GatewayError as e:
        ctx.status = e.status
        if ctx.error_type is None or not ctx.error_type.startswith("upstream"):
            ctx.error_type = e.code
        resp = render(e, ctx.errors)
        if ctx.rate_headers:  # admitted, then failed upstream: still say where the limits stand
            resp.headers.extend(ctx.rate_headers)
    except asyncio.CancelledError:
        ctx.status, ctx.error_type = 499, "client_disconnected"
        raise
    except Exception:
        log.exception("unhandled error in %s", ctx.endpoint)
        ctx.status, ctx.error_type = 500, "internal_error"
        resp = render(GatewayError("Internal gateway error."), ctx.errors)
    finally:
        gw.in_flight -= 1
        if ctx.rowless:
            writer.end(ctx.seq)
        else:
            finish(gw, ctx, request.method, request.path)
    if not resp.prepared:
        resp.headers["x-request-id"] = request_id
        if ctx.overhead_ms is None:
            resp.headers["x-gateway-overhead-ms"] = f"{(perf_counter() - t0) * 1000:.3f}"
    return resp


def endpoint_handler(endpoint: Endpoint) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await handle_json(request, endpoint)

    return handler


def _model_object(gw: Gateway, name: str, created: int) -> dict[str, object]:
    m = gw.config.model(name)
    return {"id": name, "object": "model", "created": created, "owned_by": m.owned_by if m else "gateway"}


def _anthropic_client(request: web.Request) -> bool:
    """Whether the caller speaks Anthropic's API: it sends
    ``anthropic-version`` (every Anthropic SDK does), or authenticates with
    ``x-api-key`` alone."""
    h = request.headers
    return "anthropic-version" in h or ("x-api-key" in h and "Authorization" not in h)


def _anthropic_model(name: str, created: float) -> dict[str, object]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    return {"type": "model", "id": name, "display_name": name, "created_at": stamp}


def _anthropic_page(request: web.Request, names: list[str], created: float) -> dict[str, object]:
    """One page of Anthropic's model list: ``limit`` (1-1000, default 20)
    after ``after_id`` or before ``before_id``."""
    q = request.query
    try:
        limit = min(max(int(q.get("limit", "20")), 1), 1000)
    except ValueError:
        raise BadRequest("limit: must be an integer from 1 to 1000.", code="invalid_value", param="limit") from None
    after, before = q.get("after_id"), q.get("before_id")
    if before is not None:
        end = names.index(before) if before in names else len(names)
        page = names[max(0, end - limit):end]
        more = end - limit > 0
    else:
        start = names.index(after) + 1 if after in names else 0
        page = names[start:start + limit]
        more = start + limit < len(names)
    return {"data": [_anthropic_model(n, created) for n in page], "has_more": more,
            "first_id": page[0] if page else None, "last_id": page[-1] if page else None}


async def list_models(request: web.Request) -> web.Response:
    """OpenAI's model list, or Anthropic's for an Anthropic client."""
    gw = request.app[GATEWAY]
    ctx = request[CTX]
    anthropic = _anthropic_client(request)
    if anthropic:
        ctx.errors = Protocol.ANTHROPIC
    key = ctx.key = gw.keys.authenticate(request) or await gw.keys.authenticate_new(request)
    names = sorted(key.models)
    if anthropic:
        body = _anthropic_page(request, names, request.app[STARTED])
    else:
        created = int(request.app[STARTED])
        body = {"object": "list", "data": [_model_object(gw, n, created) for n in names]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def get_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ctx = request[CTX]
    anthropic = _anthropic_client(request)
    if anthropic:
        ctx.errors = Protocol.ANTHROPIC
    key = ctx.key = gw.keys.authenticate(request) or await gw.keys.authenticate_new(request)
    name = request.match_info["model"]
    ctx.model = name  # the row bounds it
    if name not in key.models:
        raise NotFound(f"The model '{bounds.shown(name)}' does not exist.", code="model_not_found", param="model")
    started = request.app[STARTED]
    obj = _anthropic_model(name, started) if anthropic else _model_object(gw, name, int(started))
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if gw.db_file is not None and gw.db_file.lost:
        # Serving on would only pile rows up in the spool: let the load
        # balancer (or systemd's watchdog, an operator) move traffic away.
        return web.json_response({"status": "database_lost"}, status=503)
    ready = gw.writer is not None and gw.upstream is not None
    return web.json_response({"status": "ready" if ready else "starting"}, status=200 if ready else 503)


def spawn(app: web.Application, name: str, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` in the background, keeping a reference until it ends."""
    tasks = app[TASKS]
    key = f"{name}-{id(coro)}"
    task = tasks[key] = asyncio.create_task(coro, name=name)
    task.add_done_callback(lambda _: tasks.pop(key, None))


async def reload_quietly(app: web.Application, *, force: bool = False) -> None:
    """A reload asked for by another instance (which audited it): a bad
    file is logged, not raised."""
    try:
        await reload_config(app, force=force, audited=False)
    except ConfigError as e:
        log.error("config reload refused, keeping the running config: %s", e)


def make_limiter(cfg: Config, metrics: Metrics, clock: Callable[[], float]) -> Limiter:
    """Limits in this process, or shared through Redis when ``[redis] url`` is set."""

    def on_reject(reason: str) -> None:
        metrics.rate_limited.labels(reason).inc()

    local = LocalLimiter(clock, on_reject=on_reject)
    if cfg.redis.url is None:
        return local
    from .redis_limits import RedisLimiter

    metrics.redis_up.set(1)
    return RedisLimiter(
        cfg.redis, local, on_reject=on_reject, on_error=lambda op: metrics.redis_errors.labels(op).inc(),
        on_state=lambda up: metrics.redis_up.set(1 if up else 0),
    )


def create_app(
    cfg: Config, *, poller: bool | None = None, retention: bool = False,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The gateway as an aiohttp application, for one worker process.

    ``poller`` runs the background video task poller here (default: the
    config's ``tasks.poller``); ``retention`` runs the usage retention job
    (gateway.store.retention). With several workers only worker 0 runs
    either. ``clock`` (wall time, seconds) drives
    rate-limit windows, monthly quotas, circuit breakers and 429 cool-downs;
    tests pass their own."""
    app = web.Application(middlewares=[request_middleware], client_max_size=cfg.server.max_body_bytes)
    metrics = Metrics()
    health = Health(
        on_change=lambda name, state: metrics.circuit_state.labels(name).set(state),
        on_remove=metrics.circuit_state.remove,
    )
    limits = make_limiter(cfg, metrics, clock)
    # A response id a worker just made reaches the table with the maker's
    # next usage batch and its commit (tens of ms on a busy PostgreSQL): look
    # for it again every two flush intervals, for up to two more and 0.5 s.
    flush_s = cfg.usage.flush_interval_ms / 1000
    origins = ResponseOrigins(settle_s=min(1.0, 2 * flush_s + SETTLE_COMMIT_S), retry_s=max(0.02, 2 * flush_s))
    gw = Gateway(
        config=cfg, router=Router(cfg, health), metrics=metrics, limits=limits, clock=clock,
        keys=KeyCache(cfg, on_lookup=lambda result: metrics.key_lookups.labels(result).inc()),
        origins=origins,
    )
    app[GATEWAY] = gw
    app[STARTED] = time.time()
    app[TASKS] = {}

    async def database(app: web.Application) -> AsyncIterator[None]:
        store = gw.store = await open_store(cfg.database)
        gw.db_file = store.db_file
        spool = spool_dir(cfg.database.path) if cfg.usage.spool else None
        if spool is not None:
            await store.recover_spools(spool)
        await gw.keys.refresh(store)
        await limits.load(store)  # this month's spend and tokens, before serving
        origins.store = store
        writer = UsageWriter(
            store.batch_sink(), cfg.usage, on_batch=metrics.observe_rows, on_flush=metrics.observe_flush,
            on_wait=metrics.backpressure.inc, spool=spool, db_file=store.db_file,
        )
        gw.writer = writer
        tasks = app[TASKS]
        tasks["usage-writer"] = asyncio.create_task(writer.run(), name="usage-writer")
        keys_changed = asyncio.Event()

        def on_config(notice: str) -> None:
            origin, _, forced = notice.partition(FORCED)
            if origin != gw.id_prefix:  # another instance's reload, not this one's own notice
                spawn(app, "config-reload", reload_quietly(app, force=bool(forced)))

        stop_listening = await store.listen(keys_changed.set, on_config)
        tasks["key-refresh"] = asyncio.create_task(
            gw.keys.run(store, cfg.server.key_refresh_ms / 1000, keys_changed), name="key-refresh"
        )
        # Other workers' (and other gateways') spend and tokens into the quotas.
        tasks["quota-sync"] = asyncio.create_task(
            limits.run_sync(store, writer.writer_id, cfg.server.key_refresh_ms / 1000), name="quota-sync"
        )
        if retention:
            tasks["usage-retention"] = asyncio.create_task(
                run_retention(store, cfg.usage.retention_days), name="usage-retention"
            )
        yield
        background = [tasks.pop(name) for name in ("key-refresh", "quota-sync", "usage-retention") if name in tasks]
        for task in background:
            task.cancel()
        # Ended before the store closes: none is left holding a connection.
        await asyncio.gather(*background, return_exceptions=True)
        if stop_listening is not None:
            await stop_listening()
        await writer.close(cfg.server.graceful_timeout_s)
        await asyncio.gather(tasks.pop("usage-writer"), return_exceptions=True)
        await limits.close()
        origins.store = None
        await store.close()

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        gw.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )
        gw.upstream = UpstreamClient()
        yield
        await gw.upstream.close()
        await gw.session.close()

    app.cleanup_ctx.extend([database, client_session])
    tasks.setup(app, gw, poller=cfg.tasks.poller if poller is None else poller)

    def refresh_gauges() -> None:
        metrics.in_flight.set(gw.in_flight)
        metrics.queue_depth.set(len(gw.writer) if gw.writer is not None else 0)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics.handler(refresh_gauges))
    endpoints: tuple[Endpoint, ...] = (
        ChatCompletions(), Completions(), Embeddings(), Moderations(), Messages(), CountTokens(), Responses(),
        ResponsesCompact(), ResponsesInputTokens(), ImageGenerations(), ImageEdits(), ImageVariations(),
        Transcriptions(), Translations(), Speech(),
    )
    for endpoint in endpoints:
        app.router.add_post(endpoint.path, endpoint_handler(endpoint))
    # Anthropic clients add /v1/messages to their base URL themselves; one
    # given ".../v1" sends /v1/v1/messages. Those paths answer too.
    for prefix in ("/v1", "/v1/v1"):
        app.router.add_get(prefix + "/models", list_models)
        app.router.add_get(prefix + "/models/{model:.+}", get_model)
    for endpoint in (Messages(), CountTokens()):
        app.router.add_post("/v1" + endpoint.path, endpoint_handler(endpoint))
    # Responses: the WebSocket door, and objects named by id (routed to the
    # upstream that made them: gateway.affinity).
    websocket.setup(app)
    app.router.add_get("/v1/responses/{id}", handle_stored)
    app.router.add_delete("/v1/responses/{id}", handle_stored)
    app.router.add_get("/v1/responses/{id}/input_items", handle_stored)
    app.router.add_post("/v1/responses/{id}/cancel", handle_stored)
    admin.register(app, accounts.ROUTES)
    return app
