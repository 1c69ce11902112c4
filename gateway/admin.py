"""Admin API (``/admin/api/...``) and the web console (``/console``).

Every admin route is wrapped by ``_guarded``: it answers 401 unless the
request carries ``Authorization: Bearer <token>`` equal (constant-time) to the
token read from the environment variable named by ``admin.token_env``; when
no token is configured every admin route answers 401. Admin requests are not
/v1 requests, so they produce no usage rows.

Database work runs in a worker thread on its own short-lived sqlite3
connection (``asyncio.to_thread``), so the event loop never waits on SQLite.
Nothing here returns a key hash or an upstream credential: key rows come from
``queries`` (whose columns exclude the hash) and upstreams are described by
name, kind, URL without user info and whether a credential is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
from aiohttp import web

from .bounds import shown
from .config import Config, ConfigError
from .context import GATEWAY
from .errors import BadRequest, GatewayError, NotFound, Protocol, Unauthorized, render
from .intake import read_body
from .reload import reload_config
from .store import analytics, queries
from .store.schema import connect

PREFIX = "/admin/api"
CONSOLE_DIR = Path(__file__).parent / "console"

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CIRCUIT_STATES = {0.0: "closed", 1.0: "half_open", 2.0: "open"}


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


# ------------------------------------------------------------------ plumbing


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _authorised(request: web.Request) -> bool:
    token = request.app[GATEWAY].config.admin.token
    if not token:
        return False
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Digests first, so the comparison does not even reveal the token's length.
    # surrogateescape: header bytes that are not UTF-8 are a mismatch, not an error.
    given = hashlib.sha256(value.strip().encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(given, hashlib.sha256(token.encode()).digest())


def _guarded(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            if not _authorised(request):
                raise Unauthorized("Missing or invalid admin token.", code="invalid_admin_token",
                                   headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)
        except GatewayError as e:
            return render(e, Protocol.OPENAI)
        except (queries.NotFoundError, queries.ConflictError, analytics.QueryError, ValueError) as e:
            return render(_map_error(e), Protocol.OPENAI)

    return guarded


def _map_error(e: Exception) -> GatewayError:
    msg = str(e.args[0]) if e.args else type(e).__name__
    if isinstance(e, queries.NotFoundError):
        return NotFound(msg)
    if isinstance(e, queries.ConflictError):
        return Conflict(msg)
    return BadRequest(msg)


async def _db(request: web.Request, fn: Callable[[sqlite3.Connection], T]) -> T:
    path = request.app[GATEWAY].config.database.path

    def run() -> T:
        conn = connect(path)
        try:
            return fn(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(run)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = orjson.loads(await read_body(request, request.app[GATEWAY]) or b"{}")
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


WORKSPACE_FIELDS = {"default_group": "str", "allowed_models": "list", "monthly_spend_limit": "num",
                    "monthly_token_limit": "int"}
KEY_FIELDS = {"name": "str", "group_name": "str", "allowed_models": "list", "rpm": "int", "tpm": "int",
              "max_concurrency": "int", "spend_limit": "num", "expires_at": "time"}


# ------------------------------------------------------------------ workspaces


async def list_workspaces(request: web.Request) -> web.Response:
    return _json({"data": await _db(request, queries.list_workspaces)})


async def create_workspace(request: web.Request) -> web.Response:
    body = await _body(request)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_MAX:
        raise BadRequest(f"name is required, at most {NAME_MAX} characters", param="name")
    fields = _check_fields(body, WORKSPACE_FIELDS, request.app[GATEWAY].config, ("name",))
    group = fields.pop("default_group", None) or "default"

    def run(conn: sqlite3.Connection) -> dict[str, Any]:
        ws = queries.create_workspace(conn, name.strip(), group)
        return queries.update_workspace(conn, ws["id"], fields) if fields else ws

    return _json(await _db(request, run), status=201)


async def get_workspace(request: web.Request) -> web.Response:
    ws_id = _int_id(request)
    return _json(await _db(request, lambda c: queries.get_workspace(c, ws_id)))


async def update_workspace(request: web.Request) -> web.Response:
    ws_id = _int_id(request)
    fields = _check_fields(await _body(request), WORKSPACE_FIELDS, request.app[GATEWAY].config)
    return _json(await _db(request, lambda c: queries.update_workspace(c, ws_id, fields)))


# ------------------------------------------------------------------ keys


def _key_view(key: dict[str, Any], totals: Mapping[int, Mapping[str, Any]], now: float) -> dict[str, Any]:
    t = totals.get(key["id"], {})
    key = {k: v for k, v in key.items() if k != "key_hash"}
    key["status"] = ("revoked" if key["revoked_at"] else
                     "expired" if key["expires_at"] and key["expires_at"] <= now else "active")
    key["last_used"] = t.get("last_used")
    key["usage"] = {c: t.get(c, 0) for c in ("requests", "input_tokens", "output_tokens", "cost")}
    return key


async def list_keys(request: web.Request) -> web.Response:
    ws_id = _opt_int(request.query, "workspace_id")

    def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        totals, now = queries.key_usage_totals(conn), time.time()
        return [_key_view(k, totals, now) for k in queries.list_keys(conn, ws_id)]

    return _json({"data": await _db(request, run)})


async def get_key(request: web.Request) -> web.Response:
    key_id = _int_id(request)

    def run(conn: sqlite3.Connection) -> dict[str, Any]:
        return _key_view(queries.get_key(conn, key_id), queries.key_usage_totals(conn), time.time())

    return _json(await _db(request, run))


async def create_key(request: web.Request) -> web.Response:
    body = await _body(request)
    cfg = request.app[GATEWAY].config
    ws_ref = body.get("workspace_id", body.get("workspace"))
    if (not isinstance(ws_ref, int | str) or isinstance(ws_ref, bool) or ws_ref == ""
            or (isinstance(ws_ref, int) and not 0 < ws_ref <= INT_MAX)
            or (isinstance(ws_ref, str) and len(ws_ref) > NAME_MAX)):
        raise BadRequest("workspace_id (or workspace name) is required", param="workspace_id")
    f = _check_fields(body, KEY_FIELDS, cfg, ("workspace_id", "workspace"))
    limits = queries.KeyLimits(rpm=f.get("rpm"), tpm=f.get("tpm"), max_concurrency=f.get("max_concurrency"),
                               spend_limit=f.get("spend_limit"), expires_at=f.get("expires_at"))

    def run(conn: sqlite3.Connection) -> dict[str, Any]:
        ws = (queries.get_workspace(conn, ws_ref) if isinstance(ws_ref, int)
              else queries.find_workspace(conn, ws_ref))
        key, plaintext = queries.create_key(
            conn, ws["id"], name=f.get("name") or "", group=f.get("group_name"), models=f.get("allowed_models"),
            limits=limits,
        )
        return {"key": _key_view(key, {}, time.time()), "plaintext": plaintext}

    return _json(await _db(request, run), status=201)


async def update_key(request: web.Request) -> web.Response:
    key_id = _int_id(request)
    fields = _check_fields(await _body(request), KEY_FIELDS, request.app[GATEWAY].config)

    def run(conn: sqlite3.Connection) -> dict[str, Any]:
        return _key_view(queries.update_key(conn, key_id, fields), queries.key_usage_totals(conn), time.time())

    return _json(await _db(request, run))


async def revoke_key(request: web.Request) -> web.Response:
    key_id = _int_id(request)

    def run(conn: sqlite3.Connection) -> dict[str, Any]:
        return _key_view(queries.revoke_key(conn, key_id), queries.key_usage_totals(conn), time.time())

    return _json(await _db(request, run))


# ------------------------------------------------------------------ usage


async def usage(request: web.Request) -> web.Response:
    q = request.query
    now = time.time()
    since = _time(q.get("since"), now - 86400, "since")
    until = _time(q.get("until"), now + 60, "until")
    bucket = q.get("bucket", "hour")
    by = q.get("by") or None
    ws_id, key_id = _opt_int(q, "workspace_id"), _opt_int(q, "key_id")
    model = q.get("model") or None

    def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        return analytics.usage_series(conn, since=since, until=until, bucket=bucket, by=by,
                                      workspace_id=ws_id, key_id=key_id, model=model)

    data = await _db(request, run)
    return _json({"since": since, "until": until, "bucket": bucket, "by": by, "data": data})


async def request_log(request: web.Request) -> web.Response:
    q = request.query
    now = time.time()
    limit = _opt_int(q, "limit") or 50
    if not 1 <= limit <= 500:
        raise BadRequest("limit must be between 1 and 500", param="limit")
    since = _time(q.get("since"), 0.0, "since")
    until = _time(q.get("until"), now + 60, "until")
    ws_id, key_id = _opt_int(q, "workspace_id"), _opt_int(q, "key_id")
    model, status, cursor = q.get("model") or None, q.get("status") or None, q.get("cursor") or None

    def run(conn: sqlite3.Connection) -> dict[str, Any]:
        return analytics.request_log(conn, since=since, until=until, workspace_id=ws_id, key_id=key_id,
                                     model=model, status=status, limit=limit, cursor=cursor)

    return _json(await _db(request, run))


# ------------------------------------------------------------------ upstreams, config


def _public_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    # Drop user info and the query: either may carry a credential.
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def circuit_state(request: web.Request, upstream: str) -> str | None:
    """Circuit state of an upstream as the breaker publishes it in the
    ``gateway_circuit_state`` gauge; None where no breaker reported one."""
    value = request.app[GATEWAY].metrics.registry.get_sample_value("gateway_circuit_state", {"upstream": upstream})
    return None if value is None else CIRCUIT_STATES.get(value, str(value))


async def upstreams(request: web.Request) -> web.Response:
    cfg = request.app[GATEWAY].config
    window = _opt_int(request.query, "window_s") or 900
    since = time.time() - window
    stats = await _db(request, lambda c: analytics.upstream_stats(c, since=since))
    data = []
    for u in cfg.upstreams:
        s = stats.get(u.name, {})
        data.append({
            "name": u.name,
            "kind": u.kind,
            "base_url": _public_url(u.base_url),
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
    """What the console's forms offer: model names and groups."""
    cfg = request.app[GATEWAY].config
    return _json({
        "models": [m.name for m in cfg.models],
        "groups": [{"name": g.name, "models": list(g.models), "ratio": g.ratio} for g in cfg.groups],
        "upstreams": [u.name for u in cfg.upstreams],
        "reload_available": cfg.source is not None,
    })


async def reload(request: web.Request) -> web.Response:
    """Re-read the config file; a bad file is refused and the old config stays."""
    try:
        cfg = await reload_config(request.app)
    except ConfigError as e:
        raise BadRequest(f"config not reloaded: {e}", code="invalid_config") from None
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

ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/workspaces", list_workspaces),
    ("POST", "/workspaces", create_workspace),
    ("GET", "/workspaces/{id}", get_workspace),
    ("PATCH", "/workspaces/{id}", update_workspace),
    ("GET", "/keys", list_keys),
    ("POST", "/keys", create_key),
    ("GET", "/keys/{id}", get_key),
    ("PATCH", "/keys/{id}", update_key),
    ("DELETE", "/keys/{id}", revoke_key),
    ("POST", "/keys/{id}/revoke", revoke_key),
    ("GET", "/usage", usage),
    ("GET", "/requests", request_log),
    ("GET", "/upstreams", upstreams),
    ("GET", "/config", config_summary),
    ("POST", "/reload", reload),
    ("*", "/{tail:.*}", not_found),
)


def register(app: web.Application) -> None:
    """Add the admin API and the console to the gateway app."""
    for method, path, handler in ROUTES:
        app.router.add_route(method, PREFIX + path, _guarded(handler))
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/console", console_redirect)
    app.router.add_get("/console/", console_file)
    app.router.add_get("/console/{path:.+}", console_file)
