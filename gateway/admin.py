"""Admin API (``/admin/api/...``) and the web console (``/console``).

Every admin route is wrapped by ``_guarded`` with an access level: ``PUBLIC``
(sign-in, invitations, sign-up: gateway.accounts), ``USER`` (any caller
gateway.access authenticates: the operator token or a console session) or
``ADMIN``. Object-level checks are in the handlers: a workspace, key, task or
user outside the caller's reach is a 404, the same answer as for one that
does not exist; a visible object the caller's role may not change is a 403.
Every change writes its audit row in the same transaction (gateway.store.audit).
Admin requests are not /v1 requests, so they produce no usage rows.

Database work is a body on the gateway's store (``access.db``,
gateway.store.tx): the same SQL on SQLite (in a worker thread) and on
PostgreSQL (on a pooled asyncpg connection); the event loop never waits.
Nothing here returns a key hash or an upstream credential: key rows come from
``queries`` (whose columns exclude the hash) and upstreams are described by
name, kind, URL without user info and whether a credential is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from . import safejson
from .access import (
    FORWARDED_WARNED,
    HASHING,
    HASHING_SLOTS,
    PRINCIPAL,
    DatabaseUnavailable,
    NotAllowed,
    Principal,
    authenticate,
    check_csrf,
)
from .access import db as _db
from .auth import enabled_models
from .bounds import shown
from .config import Config, ConfigError
from .context import GATEWAY
from .errors import BadRequest, GatewayError, NotFound, Protocol, render
from .intake import read_body
from .reload import FORCED, reload_config
from .store import analytics, audit, catalog, queries
from .store import tasks as task_store
from .store.base import Store
from .store.outage import unavailable
from .store.scope import Scope
from .store.tx import Tx

PREFIX = "/admin/api"
CONSOLE_DIR = Path(__file__).parent / "console"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Access levels of admin routes (see the module docstring).
PUBLIC, USER, ADMIN = "public", "user", "admin"

CIRCUIT_STATES = {0.0: "closed", 1.0: "half_open", 2.0: "open"}
log = logging.getLogger("gateway.admin")


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


# ------------------------------------------------------------------ plumbing


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _guarded(handler: Handler, level: str) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            if level != PUBLIC:
                principal = await authenticate(request)
                check_csrf(request, principal)
                if level == ADMIN and not principal.is_admin:
                    raise NotAllowed("Only an admin can do this.")
                request[PRINCIPAL] = principal
            resp = await handler(request)
        except GatewayError as e:
            resp = render(e, Protocol.OPENAI)
        except (queries.NotFoundError, queries.ConflictError, analytics.QueryError, ValueError) as e:
            resp = render(_map_error(e), Protocol.OPENAI)
        except Exception as e:
            if not unavailable(e):
                # A bug: the traceback in the log, a plain 500 to the client
                # (as on /v1, gateway.app).
                log.exception("unhandled error in admin %s %s", request.method, shown(request.path))
                resp = render(GatewayError("Internal gateway error."), Protocol.OPENAI)
            else:
                # PostgreSQL away or restarting, SQLite locked past its
                # timeout or its file gone: a 503 to retry; the cause in one line.
                log.warning("admin %s %s: database unavailable (%s)", request.method, shown(request.path),
                            type(e).__name__)
                resp = render(DatabaseUnavailable("The database is unavailable: try again shortly.",
                                                  headers={"Retry-After": "1"}), Protocol.OPENAI)
        # Answers carry user-controlled strings (names, emails): never let a
        # browser sniff them into HTML.
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp

    return guarded


def _map_error(e: Exception) -> GatewayError:
    msg = str(e.args[0]) if e.args else type(e).__name__
    if isinstance(e, queries.NotFoundError):
        return NotFound(msg)
    if isinstance(e, queries.ConflictError):
        return Conflict(msg)
    return BadRequest(msg)


async def _body(request: web.Request) -> dict[str, Any]:
    # Console bodies come before any key (sign-in): parsed without orjson.
    try:
        data = safejson.loads_uncached(await read_body(request, request.app[GATEWAY]) or b"{}")
    except orjson.JSONDecodeError:
        raise BadRequest("Request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("Request body must be a JSON object.")
    return data


# SQLite integers are signed 64-bit: a larger one fails in the driver, not here.
INT_MAX = 2**63 - 1


def _int_id(request: web.Request, name: str = "id") -> int:
    v = request.match_info[name]
    if not (v.isascii() and v.isdigit() and len(v) <= 19 and int(v) <= INT_MAX):
        raise NotFound(f"{name} must be a positive integer")
    return int(v)


def _time(value: str | None, default: float, field: str, *, spans: bool = True) -> float:
    """Unix seconds, ISO 8601, or (with ``spans``) a span back from now (15m, 24h, 7d)."""
    if not value:
        return default
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    wrong = BadRequest(f"{field}: expected unix seconds, ISO 8601 or a span like 24h", param=field)
    if spans and value[-1] in units and value[:-1].isascii() and value[:-1].isdigit():
        if len(value) > 12:  # more than 30 million years back
            raise wrong
        return time.time() - int(value[:-1]) * units[value[-1]]
    try:
        t = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(t) or abs(t) > 1e12:
            raise wrong
        return t
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise wrong from None
    try:
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    except (OverflowError, ValueError):
        raise wrong from None


def _opt_int(q: Mapping[str, str], name: str) -> int | None:
    v = q.get(name)
    if v in (None, ""):
        return None
    assert v is not None
    digits = v[1:] if v[:1] == "-" else v
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 19 and abs(int(v)) <= INT_MAX):
        raise BadRequest(f"{name} must be an integer", param=name)
    return int(v)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= INT_MAX


def _is_amount(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 1e15 and math.isfinite(x)


# Names an admin gives workspaces and keys: shown in the console and the CLI.
NAME_MAX = 200


# Field kinds of admin bodies: (check, what the message says it must be).
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_count, "a non-negative integer"),
    "num": (_is_amount, "a non-negative number"),
    "str": (lambda x: isinstance(x, str) and len(x) <= NAME_MAX, f"a string of at most {NAME_MAX} characters"),
    "list": (lambda x: isinstance(x, list) and all(isinstance(i, str) and i for i in x), "an array of model names"),
    "time": (lambda x: isinstance(x, int | float | str) and not isinstance(x, bool), "unix seconds or ISO 8601"),
}


def _check_fields(body: Mapping[str, Any], spec: Mapping[str, str], cfg: Config,
                  extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of ``spec`` present in ``body``, checked; null clears a
    field. Unknown fields are refused rather than ignored."""
    unknown = sorted(set(body) - set(spec) - set(extra))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    out: dict[str, Any] = {}
    for name, kind in spec.items():
        if name not in body:
            continue
        v = body[name]
        check, what = _KINDS[kind]
        if v is not None and not check(v):
            raise BadRequest(f"{name} must be {what} or null", param=name)
        if kind == "time" and v is not None:
            v = _time(str(v), 0.0, name, spans=False)
            if name == "expires_at" and v <= time.time():
                raise BadRequest("expires_at is in the past: a key must expire in the future", param=name)
        out[name] = v
    if "name" in out and out["name"] is None:
        out["name"] = ""
    for gname in ("group_name", "default_group"):
        g = out.get(gname)
        if g is not None and cfg.group(g) is None:
            raise BadRequest(f"{gname}: unknown group {g!r}", param=gname)
    if "default_group" in out and out["default_group"] is None:
        raise BadRequest("default_group cannot be null", param="default_group")
    return out


MAX_EMAIL = 254


def text(value: Any, field: str, max_len: int = NAME_MAX) -> str:
    """A name as stored: trimmed, bounded, without control characters."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string", param=field)
    out: str = value.strip()
    if len(out) > max_len:
        raise BadRequest(f"{field} is longer than {max_len} characters", param=field)
    if any(ord(c) < 32 or ord(c) == 127 for c in out):
        raise BadRequest(f"{field} contains control characters", param=field)
    return out


def email_address(value: Any) -> str:
    """An email as stored and compared: trimmed, lower case, one @, no spaces."""
    e = text(value, "email", MAX_EMAIL).lower()
    local, at, domain = e.rpartition("@")
    if not at or not local or "." not in domain.strip(".") or any(c.isspace() for c in e):
        raise BadRequest("email must be an email address", param="email")
    return e


WORKSPACE_FIELDS = {"default_group": "str", "allowed_models": "list", "monthly_spend_limit": "num",
                    "monthly_token_limit": "int"}
KEY_FIELDS = {"name": "str", "group_name": "str", "allowed_models": "list", "rpm": "int", "tpm": "int",
              "max_concurrency": "int", "spend_limit": "num", "expires_at": "time"}


def _principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def _store(request: web.Request) -> Store:
    store = request.app[GATEWAY].store
    if store is None:
        raise DatabaseUnavailable("The database is not open yet: try again shortly.", headers={"Retry-After": "1"})
    return store


def _now(request: web.Request) -> float:
    return request.app[GATEWAY].clock()


# ------------------------------------------------------------------ workspaces


def _patterns(v: list[str] | None) -> tuple[str, ...] | None:
    return None if v is None else tuple(v)


def workspace_view(cfg: Config, ws: dict[str, Any], p: Principal) -> dict[str, Any]:
    """A workspace as a caller sees it: with their role and its models."""
    ws = dict(ws)
    ws["role"] = "admin" if p.is_admin else p.roles.get(ws["id"])
    ws["models"] = sorted(enabled_models(cfg, ws["default_group"], _patterns(ws["allowed_models"]), None))
    return ws


async def list_workspaces(request: web.Request) -> web.Response:
    p, cfg = _principal(request), request.app[GATEWAY].config
    ids = None if p.is_admin else set(p.roles)
    rows = await _db(request, lambda tx: catalog.list_workspaces(tx, ids))
    return _json({"data": [workspace_view(cfg, w, p) for w in rows]})


async def create_workspace(request: web.Request) -> web.Response:
    body = await _body(request)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX:
        raise BadRequest(f"name is required, at most {NAME_MAX} characters", param="name")
    fields = _check_fields(body, WORKSPACE_FIELDS, request.app[GATEWAY].config, ("name",))
    group = fields.pop("default_group", None) or "default"
    actor, now = _principal(request).actor(request), _now(request)

    async def run(tx: Tx) -> dict[str, Any]:
        ws = await catalog.create_workspace(tx, text(name, "name"), group)
        if fields:
            ws = await catalog.update_workspace(tx, ws["id"], fields)
        await audit.record(tx, actor, "workspace.create", now=now, target_type="workspace", target_id=ws["id"],
                           workspace_id=ws["id"], after=ws)
        return ws

    ws = await _db(request, run, write=True)
    return _json(workspace_view(request.app[GATEWAY].config, ws, _principal(request)), 201)


async def get_workspace(request: web.Request) -> web.Response:
    ws_id, p = _int_id(request), _principal(request)
    p.workspace(ws_id)
    ws = await _db(request, lambda tx: catalog.get_workspace(tx, ws_id))
    return _json(workspace_view(request.app[GATEWAY].config, ws, p))


async def update_workspace(request: web.Request) -> web.Response:
    """Default group, model allow-list and monthly quotas: the operator's
    billing controls, so an admin's alone (owners see them)."""
    ws_id, p = _int_id(request), _principal(request)
    p.workspace(ws_id)
    if not p.is_admin:
        raise NotAllowed("Only an admin can change a workspace's group, models or quotas.")
    fields = _check_fields(await _body(request), WORKSPACE_FIELDS, request.app[GATEWAY].config)
    actor, now = p.actor(request), _now(request)

    async def run(tx: Tx) -> dict[str, Any]:
        before = await catalog.get_workspace(tx, ws_id)
        after = await catalog.update_workspace(tx, ws_id, fields)
        await audit.record(tx, actor, "workspace.update", now=now, target_type="workspace", target_id=ws_id,
                           workspace_id=ws_id, before=before, after=after)
        return after

    return _json(workspace_view(request.app[GATEWAY].config, await _db(request, run, write=True), p))


# ------------------------------------------------------------------ keys


def _key_view(key: dict[str, Any], totals: Mapping[int, Mapping[str, Any]], now: float) -> dict[str, Any]:
    t = totals.get(key["id"], {})
    key = {k: v for k, v in key.items() if k != "key_hash"}
    key["status"] = ("revoked" if key["revoked_at"] else
                     "expired" if key["expires_at"] and key["expires_at"] <= now else
                     "suspended" if key["user_suspended"] else "active")
    key["last_used"] = t.get("last_used")
    key["usage"] = {c: t.get(c, 0) for c in ("requests", "input_tokens", "output_tokens", "cost")}
    return key


async def _visible_key(tx: Tx, p: Principal, key_id: int) -> dict[str, Any]:
    """The key, if the caller may see it; otherwise the same 404 as for a
    key that does not exist."""
    key = await catalog.get_key(tx, key_id)
    if not p.sees_key(key):
        raise queries.NotFoundError(f"key {key_id} not found")
    return key


def _key_bounds(cfg: Config, p: Principal, ws: Mapping[str, Any], f: Mapping[str, Any]) -> None:
    """What a non-admin may set on a key: no group of their choosing (a
    group sets the price ratio), a spend limit within the workspace's
    monthly one, and only models the workspace may use."""
    if p.is_admin:
        return
    if f.get("group_name") is not None:
        raise NotAllowed("Only an admin can choose a key's group.", param="group_name")
    ws_limit, spend = ws["monthly_spend_limit"], f.get("spend_limit")
    if ws_limit is not None and spend is not None and spend > ws_limit:
        raise BadRequest(f"spend_limit can be at most the workspace's monthly spend limit ({ws_limit})",
                         param="spend_limit")
    models = enabled_models(cfg, ws["default_group"], _patterns(ws["allowed_models"]), None)
    for pattern in f.get("allowed_models") or ():
        if not any(fnmatchcase(m, pattern) for m in models):
            raise BadRequest(f"allowed_models: {pattern!r} matches no model of this workspace",
                             param="allowed_models")


async def list_keys(request: web.Request) -> web.Response:
    ws_id, p = _opt_int(request.query, "workspace_id"), _principal(request)
    if ws_id is not None:
        p.workspace(ws_id)

    async def run(tx: Tx) -> list[dict[str, Any]]:
        totals, now = await catalog.key_usage_totals(tx), time.time()
        return [_key_view(k, totals, now) for k in await catalog.list_keys(tx, ws_id, scope=await p.scope(tx))]

    return _json({"data": await _db(request, run)})


async def get_key(request: web.Request) -> web.Response:
    key_id, p = _int_id(request), _principal(request)

    async def run(tx: Tx) -> dict[str, Any]:
        return _key_view(await _visible_key(tx, p, key_id), await catalog.key_usage_totals(tx), time.time())

    return _json(await _db(request, run))


async def create_key(request: web.Request) -> web.Response:
    body = await _body(request)
    cfg, p = request.app[GATEWAY].config, _principal(request)
    ws_ref = body.get("workspace_id", body.get("workspace"))
    if (not isinstance(ws_ref, int | str) or isinstance(ws_ref, bool) or ws_ref == ""
            or (isinstance(ws_ref, int) and not 0 < ws_ref <= INT_MAX)
            or (isinstance(ws_ref, str) and len(ws_ref) > NAME_MAX)):
        raise BadRequest("workspace_id (or workspace name) is required", param="workspace_id")
    f = _check_fields(body, KEY_FIELDS, cfg, ("workspace_id", "workspace"))
    name = text(f.get("name") or "", "name")
    limits = queries.KeyLimits(rpm=f.get("rpm"), tpm=f.get("tpm"), max_concurrency=f.get("max_concurrency"),
                               spend_limit=f.get("spend_limit"), expires_at=f.get("expires_at"))
    actor, now = p.actor(request), _now(request)

    async def run(tx: Tx) -> dict[str, Any]:
        ws = (await catalog.get_workspace(tx, ws_ref) if isinstance(ws_ref, int)
              else await catalog.find_workspace(tx, ws_ref))
        if not p.sees(ws["id"]):
            raise queries.NotFoundError(f"workspace {ws_ref!r} not found")
        _key_bounds(cfg, p, ws, f)
        key, plaintext = await catalog.create_key(
            tx, ws["id"], name=name, group=f.get("group_name"), models=f.get("allowed_models"),
            limits=limits, user_id=p.user_id,
        )
        await audit.record(tx, actor, "key.create", now=now, target_type="key", target_id=key["id"],
                           workspace_id=ws["id"], after=key)
        return {"key": _key_view(key, {}, time.time()), "plaintext": plaintext}

    return _json(await _db(request, run, write=True), status=201)


async def update_key(request: web.Request) -> web.Response:
    key_id, p = _int_id(request), _principal(request)
    cfg = request.app[GATEWAY].config
    fields = _check_fields(await _body(request), KEY_FIELDS, cfg)
    if "name" in fields:
        fields["name"] = text(fields["name"], "name")
    actor, now = p.actor(request), _now(request)

    async def run(tx: Tx) -> dict[str, Any]:
        before = await _visible_key(tx, p, key_id)
        _key_bounds(cfg, p, await catalog.get_workspace(tx, before["workspace_id"]), fields)
        after = await catalog.update_key(tx, key_id, fields)
        await audit.record(tx, actor, "key.update", now=now, target_type="key", target_id=key_id,
                           workspace_id=after["workspace_id"], before=before, after=after)
        return _key_view(after, await catalog.key_usage_totals(tx), time.time())

    return _json(await _db(request, run, write=True))


async def revoke_key(request: web.Request) -> web.Response:
    key_id, p = _int_id(request), _principal(request)
    actor, now = p.actor(request), _now(request)

    async def run(tx: Tx) -> dict[str, Any]:
        before = await _visible_key(tx, p, key_id)
        after = await catalog.revoke_key(tx, key_id)
        if before["revoked_at"] is None:
            await audit.record(tx, actor, "key.revoke", now=now, target_type="key", target_id=key_id,
                               workspace_id=after["workspace_id"], before=before, after=after)
        return _key_view(after, await catalog.key_usage_totals(tx), time.time())

    return _json(await _db(request, run, write=True))


# ------------------------------------------------------------------ usage, requests, tasks


async def _scoped_filters(tx: Tx, p: Principal, ws_id: int | None, key_id: int | None) -> Scope | None:
    """The caller's scope, after checking the workspace and key they filter
    on are within it (404 otherwise)."""
    if ws_id is not None and not p.sees(ws_id):
        raise queries.NotFoundError(f"workspace {ws_id} not found")
    if key_id is not None:
        await _visible_key(tx, p, key_id)
    return await p.scope(tx)


async def usage(request: web.Request) -> web.Response:
    q = request.query
    now = time.time()
    since = _time(q.get("since"), now - 86400, "since")
    until = _time(q.get("until"), now + 60, "until")
    bucket = q.get("bucket", "hour")
    by = q.get("by") or None
    ws_id, key_id = _opt_int(q, "workspace_id"), _opt_int(q, "key_id")
    model = q.get("model") or None
    p = _principal(request)

    store = _store(request)
    scope = await _db(request, lambda tx: _scoped_filters(tx, p, ws_id, key_id))
    data = await store.usage_series(since=since, until=until, bucket=bucket, by=by, workspace_id=ws_id,
                                    key_id=key_id, model=model, scope=scope)
    return _json({"since": since, "until": until, "bucket": bucket, "by": by, "data": data})


async def request_log(request: web.Request) -> web.Response:
    q = request.query
    now = time.time()
    limit = _limit(q)
    since = _time(q.get("since"), 0.0, "since")
    until = _time(q.get("until"), now + 60, "until")
    ws_id, key_id = _opt_int(q, "workspace_id"), _opt_int(q, "key_id")
    model, status, cursor = q.get("model") or None, q.get("status") or None, q.get("cursor") or None
    p = _principal(request)

    store = _store(request)
    scope = await _db(request, lambda tx: _scoped_filters(tx, p, ws_id, key_id))
    return _json(await store.request_log(since=since, until=until, workspace_id=ws_id, key_id=key_id, model=model,
                                         status=status, limit=limit, cursor=cursor, scope=scope))


def _limit(q: Mapping[str, str]) -> int:
    limit = _opt_int(q, "limit") or 50
    if not 1 <= limit <= 500:
        raise BadRequest("limit must be between 1 and 500", param="limit")
    return limit


async def list_tasks(request: web.Request) -> web.Response:
    q, p = request.query, _principal(request)
    ws_id, key_id, limit = _opt_int(q, "workspace_id"), _opt_int(q, "key_id"), _limit(q)
    status = q.get("status") or None
    statuses = (task_store.CREATING, *task_store.ACTIVE, *task_store.FINAL)
    if status is not None and status not in statuses:
        raise BadRequest("status must be one of " + ", ".join(statuses), param="status")

    async def run(tx: Tx) -> list[dict[str, Any]]:
        scope = await _scoped_filters(tx, p, ws_id, key_id)
        rows = await task_store.list_tasks(tx, scope=scope, workspace_id=ws_id, key_id=key_id, status=status,
                                           limit=limit)
        return [_task_view(t, p) for t in rows]

    return _json({"data": await _db(request, run)})


async def get_task(request: web.Request) -> web.Response:
    task_id, p = request.match_info["id"], _principal(request)

    async def run(tx: Tx) -> dict[str, Any]:
        t = await task_store.get_task(tx, task_id)
        scope = await p.scope(tx)
        if t is None or (scope is not None and not scope.has_key(t["key_id"], t["workspace_id"])):
            raise queries.NotFoundError(f"task {task_id!r} not found")
        return _task_view(t, p)

    return _json(await _db(request, run))


def _task_view(t: dict[str, Any], p: Principal) -> dict[str, Any]:
    # Which upstream account serves a task is the operator's business.
    return t if p.is_admin else {k: v for k, v in t.items() if k != "upstream"}


# ------------------------------------------------------------------ upstreams, config


def circuit_state(request: web.Request, upstream: str) -> str | None:
    """Circuit state of an upstream as the breaker publishes it in the
    ``gateway_circuit_state`` gauge; None where no breaker reported one."""
    value = request.app[GATEWAY].metrics.registry.get_sample_value("gateway_circuit_state", {"upstream": upstream})
    return None if value is None else CIRCUIT_STATES.get(value, str(value))


async def upstreams(request: web.Request) -> web.Response:
    cfg = request.app[GATEWAY].config
    window = _opt_int(request.query, "window_s") or 900
    since = time.time() - window
    stats = await _store(request).upstream_stats(since=since)
    data = []
    for u in cfg.upstreams:
        s = stats.get(u.name, {})
        data.append({
            "name": u.name,
            "kind": u.kind,
            "base_url": u.public_base_url,
            "credential_configured": bool(u.api_key or u.access_key),
            "timeouts_s": {"connect": u.connect_timeout_s, "first_byte": u.first_byte_timeout_s,
                           "idle": u.idle_timeout_s, "total": u.timeout_s},
            "models": sorted(m.name for m in cfg.models if any(r.upstream == u.name for r in m.routes)),
            "circuit": circuit_state(request, u.name),
            "recent": {"window_s": window, "requests": s.get("requests", 0),
                       "server_errors": s.get("server_errors", 0), "client_errors": s.get("client_errors", 0),
                       "error_rate": s.get("error_rate", 0.0), "p50_latency_ms": s.get("p50_latency_ms"),
                       "p95_latency_ms": s.get("p95_latency_ms"), "p95_ttfb_ms": s.get("p95_ttfb_ms"),
                       "last_minute": s.get("last_minute")},
        })
    return _json({"data": data})


async def config_summary(request: web.Request) -> web.Response:
    """What the console's forms offer: model names and groups. A user who is
    not an admin sees the models and groups of their workspaces only."""
    cfg, p = request.app[GATEWAY].config, _principal(request)
    if p.is_admin:
        return _json({
            "models": [m.name for m in cfg.models],
            "groups": [{"name": g.name, "models": list(g.models), "ratio": g.ratio} for g in cfg.groups],
            "upstreams": [u.name for u in cfg.upstreams],
            "reload_available": cfg.source is not None,
        })
    rows = await _db(request, lambda tx: catalog.list_workspaces(tx, set(p.roles)))
    views = [workspace_view(cfg, w, p) for w in rows]
    names = {w["default_group"] for w in views}
    return _json({
        "models": sorted({m for w in views for m in w["models"]}),
        "groups": [{"name": g.name, "models": list(g.models), "ratio": g.ratio} for g in cfg.groups
                   if g.name in names],
        "upstreams": [],
        "reload_available": False,
    })


async def reload(request: web.Request) -> web.Response:
    """Re-read the config file; a bad file is refused and the old config
    stays. ``?force=true`` applies a config with no upstream or no model."""
    gw = request.app[GATEWAY]
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    try:
        cfg = await reload_config(request.app, actor=_principal(request).actor(request), force=force)
    except ConfigError as e:
        raise BadRequest(f"config not reloaded: {e}", code="invalid_config") from None
    if gw.supervisor_pid is not None:  # this process's sibling workers, through their supervisor
        with contextlib.suppress(ProcessLookupError):
            os.kill(gw.supervisor_pid, signal.SIGUSR1 if force else signal.SIGHUP)
    if gw.store is not None:  # the other instances reload their own files too
        await gw.store.announce_config(gw.id_prefix + (FORCED if force else ""))
    return _json({"status": "reloaded", "upstreams": len(cfg.upstreams), "models": len(cfg.models),
                  "groups": len(cfg.groups)})


async def not_found(request: web.Request) -> web.Response:
    raise NotFound(f"Unknown admin endpoint {shown(request.method)} {shown(request.path)}.", code="unknown_endpoint")


# ------------------------------------------------------------------ console

_CONSOLE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def favicon(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(CONSOLE_DIR / "favicon.ico", headers={"Cache-Control": "max-age=86400"})


async def console_redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/console/")


async def console_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("path") or "index.html"
    if not name.isprintable():  # a NUL or an undecodable byte names no file
        raise web.HTTPNotFound()
    root = CONSOLE_DIR.resolve()
    try:
        path = (root / name).resolve()
        found = path.is_relative_to(root) and path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers=_CONSOLE_HEADERS)


# ------------------------------------------------------------------ routes

Route = tuple[str, str, Handler, str]

ROUTES: tuple[Route, ...] = (
    ("GET", "/workspaces", list_workspaces, USER),
    ("POST", "/workspaces", create_workspace, ADMIN),
    ("GET", "/workspaces/{id}", get_workspace, USER),
    ("PATCH", "/workspaces/{id}", update_workspace, USER),
    ("GET", "/keys", list_keys, USER),
    ("POST", "/keys", create_key, USER),
    ("GET", "/keys/{id}", get_key, USER),
    ("PATCH", "/keys/{id}", update_key, USER),
    ("DELETE", "/keys/{id}", revoke_key, USER),
    ("POST", "/keys/{id}/revoke", revoke_key, USER),
    ("GET", "/usage", usage, USER),
    ("GET", "/requests", request_log, USER),
    ("GET", "/tasks", list_tasks, USER),
    ("GET", "/tasks/{id}", get_task, USER),
    ("GET", "/upstreams", upstreams, ADMIN),
    ("GET", "/config", config_summary, USER),
    ("POST", "/reload", reload, ADMIN),
)


def register(app: web.Application, more: tuple[Route, ...] = ()) -> None:
    """Add the admin API (ROUTES and ``more``: gateway.accounts') and the
    console to the gateway app."""
    app[HASHING] = asyncio.Semaphore(HASHING_SLOTS)
    app[FORWARDED_WARNED] = []
    for method, path, handler, level in (*ROUTES, *more, ("*", "/{tail:.*}", not_found, USER)):
        app.router.add_route(method, PREFIX + path, _guarded(handler, level))
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/console", console_redirect)
    app.router.add_get("/console/", console_file)
    app.router.add_get("/console/{path:.+}", console_file)
