"""HTTP handlers for video tasks and assets, and ``setup`` which adds their
routes and their long-lived state (task store, poller) to the app.

Each request reads top to bottom: authenticate -> read and validate the body
-> pick the upstream -> call it -> store ownership / state -> answer. The
request middleware records the request's own usage row as for any /v1
request; a task's billing row is written by whoever wins the task's
compare-and-swap into ``succeeded`` (see gateway.store.tasks).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..auth import KeyInfo
from ..config import UpstreamConfig
from ..context import CTX, GATEWAY, Gateway
from ..errors import BadRequest, NotFound, ServiceUnavailable
from ..intake import admit, read_body, resolve_model
from ..protocols.base import parse_object
from ..routing import Target
from ..store.tasks import TaskRow
from .assets import ASSET_PROVIDERS, AssetProvider, parse_asset_body, parse_group_body, text_field
from .options import check_provider_options
from .poller import Poller
from .service import VideoTasks, account_name, endpoint_of, owner_key, provider_for, public_task, same_account
from .video import ID_MAX, parse_video_request


@dataclass(slots=True)
class TaskState:
    """What the task routes share; filled in by the cleanup context."""

    service: VideoTasks | None = None
    poller: Poller | None = None


TASK_STATE = web.AppKey("task_state", TaskState)
MAX_IDEMPOTENCY_KEY = 255


def _service(request: web.Request) -> VideoTasks:
    svc = request.app[TASK_STATE].service
    assert svc is not None
    return svc


def _session(gw: Gateway) -> aiohttp.ClientSession:
    assert gw.session is not None
    return gw.session


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


def _envelope(data: dict[str, Any]) -> web.Response:
    return _json({"code": 200, "msg": "OK", "data": data})


# The upstream task ids a poll may adopt: the providers' own form (Ark's
# "cgt-20250507173314-t4pkt", a gateway's "vt_<hex>"), nothing a lax upstream
# could normalise into another id.
ADOPTABLE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,255}")


def task_not_found() -> NotFound:
    return NotFound("Video task not found.", code="task_not_found")


# ------------------------------------------------------------ video tasks


async def _admitted_body(request: web.Request) -> tuple[Gateway, KeyInfo, bytes]:
    """Authenticate, admit against the key's limits, read the body."""
    gw = request.app[GATEWAY]
    ctx = request[CTX]
    ctx.key = key = gw.keys.authenticate(request) or await gw.keys.authenticate_new(request)
    await admit(gw, ctx, key)
    raw = await read_body(request, gw)
    ctx.bytes_in = len(raw)
    return gw, key, raw


async def create_video_task(request: web.Request) -> web.Response:
    gw, key, raw = await _admitted_body(request)
    ctx = request[CTX]
    req = parse_video_request(raw)
    ctx.model_cfg = resolve_model(gw, key, req.model)
    ctx.model = req.model
    targets = video_targets(gw, req.model)
    if req.asset_ids:
        targets = await asset_targets(_service(request), key, req.model, req.asset_ids, targets)
    if req.provider_options:
        check_provider_options(req.provider_options,
                               ((t.upstream.kind, t.upstream.extra_provider_options) for t in targets))
    svc = _service(request)
    t, replayed = await svc.create(key, req, targets, idempotency_key(request))
    ctx.upstream = t.upstream
    resp = _json(public_task(t, svc.provider_name(t)))
    if replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


def idempotency_key(request: web.Request) -> str | None:
    """The client's Idempotency-Key: at most one, 1 to 255 printable ASCII
    characters (it is stored, and compared per workspace)."""
    values = request.headers.getall("Idempotency-Key", [])
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("Send one Idempotency-Key header, not several.", code="invalid_idempotency_key",
                         param="Idempotency-Key")
    key = values[0]
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not all(" " <= c <= "~" for c in key):
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters.",
                         code="invalid_idempotency_key", param="Idempotency-Key")
    return key


def video_targets(gw: Gateway, model: str) -> list[Target]:
    plan = gw.router.plan(model)
    if not plan:
        raise ServiceUnavailable(f"No healthy upstream for model '{model}'.")
    targets = [t for t in plan if provider_for(t.upstream) is not None]
    if not targets:
        raise BadRequest(f"The model '{model}' does not run video tasks.", code="model_not_video", param="model")
    return targets


async def asset_targets(
    svc: VideoTasks, key: KeyInfo, model: str, asset_ids: list[str], targets: list[Target]
) -> list[Target]:
    """The targets on the provider account that owns every named asset."""
    cfg = svc.gw.config
    for asset_id in asset_ids:
        owners = await svc.store.asset_upstreams(asset_id, key.workspace_id)
        if not owners:
            raise NotFound(f"Asset '{asset_id}' not found.", code="asset_not_found", param="resources")
        accounts = {account_name(u) for u in cfg.upstreams if u.name in owners}
        targets = [t for t in targets if account_name(t.upstream) in accounts]
        if not targets:
            raise BadRequest(
                f"No route of model '{model}' reaches the account that owns asset '{asset_id}'.",
                code="asset_not_routable", param="resources",
            )
    return targets


async def get_video_task(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ctx = request[CTX]
    ctx.key = key = gw.keys.authenticate(request) or await gw.keys.authenticate_new(request)
    await admit(gw, ctx, key)
    svc = _service(request)
    task_id = request.match_info["id"]
    if len(task_id) > ID_MAX:  # never stored, never sent upstream
        raise task_not_found()
    t = await svc.store.get(task_id)
    if t is not None:
        if t.workspace_id != key.workspace_id:
            raise task_not_found()
    elif "model" in request.query:
        if not ADOPTABLE_ID.fullmatch(task_id):
            # Another spelling of an id (case, padding, encoding) that an
            # upstream might read as a task some workspace owns: never asked.
            raise task_not_found()
        t = await adopt_task(request, gw, svc, key, request.query["model"], task_id)
    else:
        raise task_not_found()
    ctx.model, ctx.upstream = t.model, t.upstream
    if not t.finished:
        t = await svc.refresh(t)
    return _json(public_task(t, svc.provider_name(t)))


async def adopt_task(
    request: web.Request, gw: Gateway, svc: VideoTasks, key: KeyInfo, model: str, upstream_id: str
) -> TaskRow:
    """A task created elsewhere, polled by its upstream id on a model's
    upstreams; stored on first sight so it is billed once like any other.

    An upstream task that has a row already, in any provider account the
    model's routes reach (made by a create here, or adopted through any
    upstream entry of that account), is never adopted again: its owner
    gets that row, every other workspace a 404."""
    ctx = request[CTX]
    ctx.model_cfg = resolve_model(gw, key, model)
    ctx.model = model
    targets = video_targets(gw, model)
    upstreams = gw.config.upstreams
    for target in targets:
        known = await svc.store.find_owned(upstream_id, same_account(upstreams, target.upstream))
        if known:
            if known[0].workspace_id != key.workspace_id:
                raise task_not_found()
            return known[0]
    for target in targets:
        up = target.upstream
        provider = provider_for(up)
        assert provider is not None
        ctx.upstream = up.name
        try:
            snap = await provider.get(_session(gw), up, upstream_id)
        except NotFound:
            continue
        now = time.time()
        row = TaskRow(
            id=upstream_id, workspace_id=key.workspace_id, key_id=key.id, model=model, upstream=up.name,
            upstream_model=target.route.model, upstream_task_id=upstream_id, status="queued", ratio=key.ratio,
            created_at=now, updated_at=now, next_poll_at=now + gw.config.tasks.poll_interval_s,
            account=account_name(up), endpoint=endpoint_of(up),
        )
        stored = await svc.store.adopt(row, same_account(upstreams, up))
        if stored is None or stored.workspace_id != key.workspace_id:
            raise task_not_found()
        return await svc.apply(stored, snap)
    raise task_not_found()


# ----------------------------------------------------------------- assets


def platform_upstream(gw: Gateway, platform: str | None) -> tuple[UpstreamConfig, AssetProvider]:
    if not platform:
        raise BadRequest("Missing required parameter: 'platform'.", code="missing_field", param="platform")
    name = gw.config.platforms.get(platform)
    if name is None:
        raise BadRequest(f"Unknown platform '{platform[:64]}'.", code="unknown_platform", param="platform")
    up = gw.config.upstream(name)
    return up, ASSET_PROVIDERS[up.kind]


async def _asset_body(request: web.Request) -> tuple[Gateway, KeyInfo, dict[str, Any]]:
    gw, key, raw = await _admitted_body(request)
    return gw, key, parse_object(raw)


async def create_asset_group(request: web.Request) -> web.Response:
    gw, key, obj = await _asset_body(request)
    platform = text_field(obj, "platform", required=True)
    up, provider = platform_upstream(gw, platform)
    parse_group_body(obj)
    request[CTX].upstream = up.name
    data = await provider.create_group(_session(gw), up, obj)
    assert platform is not None
    await _service(request).store.add_group(data["group_id"], up.name, key.workspace_id, platform)
    return _envelope(data)


async def _owned_lookup(request: web.Request, kind: str) -> tuple[Gateway, UpstreamConfig, AssetProvider, str]:
    """Authenticate a GET of a group or asset and check that the key's
    workspace owns the id on the platform's upstream (404 otherwise)."""
    gw = request.app[GATEWAY]
    ctx = request[CTX]
    ctx.key = key = gw.keys.authenticate(request) or await gw.keys.authenticate_new(request)
    await admit(gw, ctx, key)
    up, provider = platform_upstream(gw, request.query.get("platform"))
    obj_id = request.match_info["id"]
    store = _service(request).store
    owner = store.group_owner if kind == "group" else store.asset_owner
    if await owner(up.name, obj_id) != key.workspace_id:
        label = "Asset group" if kind == "group" else "Asset"
        raise NotFound(f"{label} not found.", code=f"{kind}_not_found")
    ctx.upstream = up.name
    return gw, up, provider, obj_id


async def get_asset_group(request: web.Request) -> web.Response:
    gw, up, provider, group_id = await _owned_lookup(request, "group")
    return _envelope(await provider.get_group(_session(gw), up, group_id, request.query["platform"]))


async def create_asset(request: web.Request) -> web.Response:
    gw, key, obj = await _asset_body(request)
    platform = text_field(obj, "platform", required=True)
    up, provider = platform_upstream(gw, platform)
    parse_asset_body(obj)
    store = _service(request).store
    if await store.group_owner(up.name, obj["group_id"]) != key.workspace_id:
        raise NotFound("Asset group not found.", code="group_not_found", param="group_id")
    request[CTX].upstream = up.name
    data = await provider.create_asset(_session(gw), up, obj)
    assert platform is not None
    await store.add_asset(data["asset_id"], up.name, key.workspace_id, platform, obj["group_id"])
    return _envelope(data)


async def get_asset(request: web.Request) -> web.Response:
    gw, up, provider, asset_id = await _owned_lookup(request, "asset")
    return _envelope(await provider.get_asset(_session(gw), up, asset_id, request.query["platform"]))


# ------------------------------------------------------------------ setup


def setup(app: web.Application, gw: Gateway, *, poller: bool) -> None:
    """Add the task and asset routes, and the task store (plus the
    background poller when ``poller``) as a cleanup context. Append after
    the contexts that open the client session."""
    state = TaskState()
    app[TASK_STATE] = state

    async def task_store(app: web.Application) -> AsyncIterator[None]:
        assert gw.store is not None  # the database context runs first
        store = await gw.store.task_store()
        await store.backfill([(u.name, *owner_key(u)) for u in gw.config.upstreams if provider_for(u) is not None])
        state.service = svc = VideoTasks(gw, store)
        runner: asyncio.Task[None] | None = None
        if poller:
            state.poller = Poller(svc)
            runner = asyncio.create_task(state.poller.run(), name="video-task-poller")
        yield
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await svc.close(gw.config.server.graceful_timeout_s)
        await store.close()

    app.cleanup_ctx.append(task_store)
    app.router.add_post("/v1/video/tasks", create_video_task)
    app.router.add_get("/v1/video/tasks/{id}", get_video_task)
    app.router.add_post("/v1/asset-groups", create_asset_group)
    app.router.add_get("/v1/asset-groups/{id}", get_asset_group)
    app.router.add_post("/v1/assets", create_asset)
    app.router.add_get("/v1/assets/{id}", get_asset)
