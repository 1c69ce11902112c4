"""Who is calling the admin API, and what they may touch.

Two ways in: the operator token (``Authorization: Bearer``, compared in
constant time; an admin) or a console session (an HttpOnly, SameSite=Strict
cookie holding a random session id; the database keeps only its SHA-256).
Every session request that changes state must echo the session's CSRF token
in ``X-CSRF-Token``. A session is looked up on every request, so disabling a
user or signing out ends it on every worker at once.

Passwords are argon2id hashes (gateway.passwords). Hashing runs in a worker
thread, at most ``HASHING_SLOTS`` at a time per process: each takes 64 MiB and
about 0.1 s of CPU, and sign-in is the one unauthenticated door that costs
that. A sign-in for an unknown, disabled or not yet activated account
verifies against a fixed dummy hash of the same cost, so neither the answer
nor its timing says whether the account exists.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web

from .context import GATEWAY
from .errors import GatewayError, NotFound, Unauthorized
from .passwords import HASHER, matches
from .store import users
from .store.audit import Actor
from .store.scope import Scope
from .store.tx import Body, Tx

T = TypeVar("T")
log = logging.getLogger("gateway.access")

COOKIE = "gateway_session"
COOKIE_PATH = "/admin/api"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HASHING_SLOTS = 2
# Touch a session's last-seen time at most this often (a write per request
# would make every console click a database write).
TOUCH_EVERY_S = 60.0

HASHING = web.AppKey("hashing", asyncio.Semaphore)
# Whether this process has warned of an untrusted X-Forwarded-For (once).
FORWARDED_WARNED = web.AppKey("forwarded_warned", list[bool])


class NotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class TooManyAttempts(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_sign_in_attempts"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of an admin request. ``roles``: workspace id -> owner or
    member (empty for the operator token, which is an admin)."""

    label: str
    is_admin: bool
    user_id: int | None = None
    name: str = ""
    roles: Mapping[int, str] = field(default_factory=dict)
    session: str | None = None  # the session id's hash
    csrf: str | None = None

    def sees(self, ws_id: int) -> bool:
        return self.is_admin or ws_id in self.roles

    def owns(self, ws_id: int) -> bool:
        return self.is_admin or self.roles.get(ws_id) == "owner"

    def workspace(self, ws_id: int) -> None:
        """404 for a workspace the caller is not in: the same answer as for
        one that does not exist."""
        if not self.sees(ws_id):
            raise NotFound(f"workspace {ws_id} not found")

    def owner_of(self, ws_id: int) -> None:
        self.workspace(ws_id)
        if not self.owns(ws_id):
            raise NotAllowed("Only an owner of this workspace or an admin can do this.")

    def sees_key(self, key: Mapping[str, object]) -> bool:
        ws = key["workspace_id"]
        assert isinstance(ws, int)
        return self.owns(ws) or (self.sees(ws) and self.user_id is not None and key["user_id"] == self.user_id)

    async def scope(self, tx: Tx) -> Scope | None:
        """What a non-admin may read (gateway.store.scope); None for admins."""
        if self.is_admin:
            return None
        assert self.user_id is not None
        return await users.scope_of(tx, self.user_id, dict(self.roles))

    def actor(self, request: web.Request) -> Actor:
        return Actor(self.label, self.user_id, client_address(request))


OPERATOR = Principal("operator token", True)
PRINCIPAL = web.RequestKey("principal", Principal)


# ------------------------------------------------------------------ plumbing


class DatabaseUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "database_unavailable"


async def db(request: web.Request, body: Body[T], *, write: bool = False) -> T:
    """``body(tx)`` on the gateway's store (gateway.store.tx): with
    ``write``, one transaction, serialized with every other write. On
    SQLite it runs in a worker thread, on PostgreSQL on a pooled
    connection: the event loop never waits on the database either way."""
    store = request.app[GATEWAY].store
    if store is None:
        raise DatabaseUnavailable("The database is not open yet: try again shortly.", headers={"Retry-After": "1"})
    return await store.run(body, write=write)


def client_address(request: web.Request) -> str:
    """The peer's address, or behind a trusted proxy the last
    X-Forwarded-For entry (the one that proxy added)."""
    if request.app[GATEWAY].config.console.trust_forwarded_for:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
        if forwarded:
            return forwarded[:64]
    elif "X-Forwarded-For" in request.headers and not request.app[FORWARDED_WARNED]:
        request.app[FORWARDED_WARNED].append(True)
        log.warning(
            "an admin request came through a proxy (X-Forwarded-For), but console.trust_forwarded_for is "
            "false: sign-in throttling counts every client behind that proxy as one address (%s), so a few "
            "wrong guesses from anyone there get every sign-in through it a 429, the operator token's "
            "included. If the proxy is yours, set console.trust_forwarded_for = true (docs/security.md).",
            request.remote, extra={"fields": {"event": "forwarded_for_untrusted"}})
    return request.remote or "unknown"


def address_subject(request: web.Request) -> str:
    """The client address as per-address throttling counts it: an IPv6
    address stands for its /64 (one host usually holds a whole /64, and
    each of its addresses would otherwise count apart), an IPv4 address
    written as IPv6 for itself."""
    address = client_address(request)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _digest(value: str) -> bytes:
    # surrogateescape: header bytes that are not UTF-8 are a mismatch, not an error.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _operator(request: web.Request) -> bool | None:
    """True/False for a Bearer token that is/is not the operator token; None
    when the request carries no Authorization header."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    token = request.app[GATEWAY].config.admin.token
    scheme, _, value = header.partition(" ")
    if not token or scheme.lower() != "bearer":
        return False
    # Digests first, so the comparison does not even reveal the token's length.
    return hmac.compare_digest(_digest(value.strip()), _digest(token))


def _unauthorized(message: str = "Sign in, or send the admin token as Authorization: Bearer.") -> Unauthorized:
    return Unauthorized(message, code="invalid_admin_token", headers={"WWW-Authenticate": "Bearer"})


async def _check_operator(request: web.Request, right: bool) -> None:
    """Throttle guesses at the operator token like failed sign-ins from the
    same address (it is typed into the sign-in page and may be no stronger
    than a password): a wrong token counts, and past the limit the address
    gets 429 whatever it sends, so the right token does not stand out."""
    gw = request.app[GATEWAY]
    if gw.config.admin.token is None:
        return
    now = gw.clock()

    async def over(tx: Tx) -> TooManyAttempts | None:
        return await _over_address(tx, request, now)

    async def count(tx: Tx) -> None:
        await users.add_failure(tx, "address", address_subject(request), now)
        await users.prune_failures(tx, now - _window_s(request))

    if right:
        err = await db(request, over)
        if err is not None:
            raise err
    else:
        await guarded(request, over, count)


async def authenticate(request: web.Request) -> Principal:
    """The operator (by token) or a session's user (by cookie); 401 otherwise.
    A request with an Authorization header is judged by it alone."""
    operator = _operator(request)
    if operator is not None:
        await _check_operator(request, operator)
        if not operator:
            raise _unauthorized("Missing or invalid admin token.")
        return OPERATOR
    sid = request.cookies.get(COOKIE)
    if not sid:
        raise _unauthorized()
    gw = request.app[GATEWAY]
    now, idle_s = gw.clock(), gw.config.console.session_idle_minutes * 60
    sid_hash = users.token_hash(sid)

    async def load(tx: Tx) -> Principal | None:
        s = await users.session(tx, sid_hash, now=now, idle_s=idle_s)
        if s is None:
            return None
        if now - s["seen_at"] > TOUCH_EVERY_S:
            await users.touch_session(tx, sid_hash, now)
        return Principal(s["email"], bool(s["is_admin"]), s["user_id"], s["name"],
                         await users.roles(tx, s["user_id"]), sid_hash, s["csrf_token"])

    principal = await db(request, load)
    if principal is None:
        raise _unauthorized("Your session has ended: sign in again.")
    return principal


def check_csrf(request: web.Request, principal: Principal) -> None:
    """A session request that changes state must carry the session's CSRF
    token (the operator token is not a cookie, so it needs none)."""
    if principal.session is None or request.method in SAFE_METHODS:
        return
    given = request.headers.get(CSRF_HEADER, "")
    if not principal.csrf or not hmac.compare_digest(_digest(given), _digest(principal.csrf)):
        raise NotAllowed(f"Missing or wrong {CSRF_HEADER} header: reload the console.", code="csrf_failed")


def set_session_cookie(resp: web.StreamResponse, request: web.Request, sid: str) -> None:
    console = request.app[GATEWAY].config.console
    secure = console.cookie_secure == "always" or (
        console.cookie_secure == "auto"
        and (request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"))
    resp.set_cookie(COOKIE, sid, path=COOKIE_PATH, httponly=True, samesite="Strict", secure=secure,
                    max_age=int(console.session_hours * 3600))


def clear_session_cookie(resp: web.StreamResponse) -> None:
    resp.del_cookie(COOKIE, path=COOKIE_PATH)


# ------------------------------------------------------------------ passwords


async def hash_password(request: web.Request, password: str) -> str:
    async with request.app[HASHING]:
        return await asyncio.to_thread(HASHER.hash, password)


async def verify_password(request: web.Request, hashed: str | None, password: str) -> bool:
    """Check a password against ``hashed``; with None, against the dummy hash
    (same cost) and False whatever it says (gateway.passwords.matches)."""
    async with request.app[HASHING]:
        return await asyncio.to_thread(matches, hashed, password)


# ------------------------------------------------------------------ sign-in throttling


@dataclass(frozen=True, slots=True)
class Attempt:
    """A sign-in attempt, counted as a failure until it succeeds (``passed``)."""

    email: str
    address_row: int


def _window_s(request: web.Request) -> float:
    return request.app[GATEWAY].config.console.login_window_minutes * 60


async def over(tx: Tx, request: web.Request, scope: str, subject: str, limit: int, what: str,
               now: float) -> TooManyAttempts | None:
    """A 429 saying when to come back if ``subject`` has ``limit`` failures
    (rows of ``scope``) within the sign-in window, else None. ``what``
    begins the message ("Too many failed sign-ins for this account")."""
    window = _window_s(request)
    count, oldest = await users.failures(tx, scope, subject, now - window)
    if count < limit or oldest is None:
        return None
    wait = max(1, math.ceil(oldest + window - now))
    minutes = (wait + 59) // 60
    return TooManyAttempts(f"{what}. Try again in {minutes} minute{'s' * (minutes != 1)}.",
                           headers={"Retry-After": str(wait)})


async def _over_address(tx: Tx, request: web.Request, now: float) -> TooManyAttempts | None:
    limit = request.app[GATEWAY].config.console.login_failures_per_address
    return await over(tx, request, "address", address_subject(request), limit,
                      "Too many failed sign-ins from your address", now)


async def throttled(tx: Tx, request: web.Request, email: str, now: float) -> TooManyAttempts | None:
    """The error to answer if this account or this address has failed too
    often within the window, else None. Keyed by the email as typed, so an
    unknown account is throttled exactly like a real one."""
    limit = request.app[GATEWAY].config.console.login_failures_per_account
    return (await over(tx, request, "account", email, limit, "Too many failed sign-ins for this account", now)
            or await _over_address(tx, request, now))


async def guarded(request: web.Request, check: Body[TooManyAttempts | None], count: Body[T]) -> T:
    """``count(tx)`` in a write transaction, unless ``check(tx)`` gives a
    429 (raised). ``check`` runs first in a plain read: a flood of
    attempts that are already throttled never takes the write lock, so it
    cannot queue ahead of the usage writer (SQLite) or of admin writes
    (PostgreSQL). It runs again inside the write, with the count: attempts
    sent all at once cannot all pass the check before any of them is
    counted (and make argon2 work for each)."""
    err = await db(request, check)
    if err is not None:
        raise err

    async def checked(tx: Tx) -> T:
        err = await check(tx)
        if err is not None:
            raise err
        return await count(tx)

    return await db(request, checked, write=True)


async def attempt(request: web.Request, email: str, now: float, also: Body[T]) -> tuple[Attempt, T]:
    """Count a sign-in attempt for ``email`` from this address before its
    password is checked, or raise TooManyAttempts (gateway.access.guarded);
    ``also(tx)`` runs in the same transaction (the password hash's lookup)."""

    async def check(tx: Tx) -> TooManyAttempts | None:
        return await throttled(tx, request, email, now)

    async def count(tx: Tx) -> tuple[Attempt, T]:
        await users.add_failure(tx, "account", email, now)
        row = await users.add_failure(tx, "address", address_subject(request), now)
        await users.prune_failures(tx, now - _window_s(request))
        return Attempt(email, row), await also(tx)

    return await guarded(request, check, count)


async def passed(tx: Tx, attempt: Attempt) -> None:
    """The attempt succeeded: it is no failure, and the account's count
    starts again. Run it in a write body."""
    await users.clear_failures(tx, "account", attempt.email)
    await users.drop_failure(tx, attempt.address_row)
