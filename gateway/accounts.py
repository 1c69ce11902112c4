"""Console accounts on the admin API: signing in and out, invitations, open
sign-up, users, workspace members, and the audit log (routes in ``ROUTES``,
registered by gateway.admin with their access levels).

Getting in: an admin (or a workspace's owner, for that workspace) creates an
invitation; its one-time link (``/console/#invite=TOKEN``) is shown once;
whoever opens it sets a password (or, if the email already has an account,
confirms theirs) and is signed in. With ``[console] open_signup`` anyone who
reaches the console may create an account, which comes with a workspace of
their own.

Sign-in answers "Email or password is incorrect." for an unknown email, a
wrong password, a disabled account and an invitation not yet accepted alike,
after the same argon2 work (gateway.access); attempts are counted per email
typed and per address before the password is checked (a success is
uncounted), and past the limit a 429 says when to try again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from .access import (
    NotAllowed,
    Principal,
    TooManyAttempts,
    address_subject,
    attempt,
    clear_session_cookie,
    client_address,
    db,
    guarded,
    hash_password,
    over,
    passed,
    set_session_cookie,
    verify_password,
)
from .admin import (
    ADMIN,
    MAX_EMAIL,
    PUBLIC,
    USER,
    Route,
    _body,
    _int_id,
    _json,
    _limit,
    _now,
    _opt_int,
    _principal,
    _time,
    email_address,
    text,
    workspace_view,
)
from .context import GATEWAY
from .errors import BadRequest, NotFound, Unauthorized
from .passwords import HASHER
from .store import audit, catalog, queries, users
from .store.audit import Actor
from .store.scope import Scope
from .store.tx import Tx

MIN_PASSWORD = 10
MAX_PASSWORD = 1024
INVALID_LINK = "This invitation link is not valid: it was used, revoked or has expired. Ask for a new one."


def _password(value: Any, field: str = "password") -> str:
    if not isinstance(value, str) or not MIN_PASSWORD <= len(value) <= MAX_PASSWORD:
        raise BadRequest(f"{field} must be {MIN_PASSWORD} to {MAX_PASSWORD} characters", param=field)
    return value


def _typed(value: Any, field: str, max_len: int) -> str:
    """A credential as typed: a string, bounded; otherwise 400 (no lookup)."""
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise BadRequest(f"{field} is required", param=field)
    return value


def base_url(request: web.Request) -> str:
    """Where users reach the gateway: ``console.public_url``, else the
    origin this request came to."""
    public = request.app[GATEWAY].config.console.public_url
    return (public or f"{request.scheme}://{request.host}").rstrip("/")


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body of an unauthenticated POST. A JSON content type cannot be
    sent cross-site without a CORS preflight (which the gateway never
    grants), so no other site can make a browser sign in to, or accept an
    invitation on, the gateway."""
    if request.content_type != "application/json":
        raise BadRequest("Content-Type must be application/json.")
    return await _body(request)


# ------------------------------------------------------------------ who am I


async def _me(tx: Tx, request: web.Request, p: Principal) -> dict[str, Any]:
    cfg = request.app[GATEWAY].config
    ids = None if p.is_admin else set(p.roles)
    return {
        "user": None if p.user_id is None else {"id": p.user_id, "email": p.label, "name": p.name,
                                                "is_admin": p.is_admin},
        "operator": p.user_id is None,
        "csrf_token": p.csrf,
        "workspaces": [workspace_view(cfg, w, p) for w in await catalog.list_workspaces(tx, ids)],
        "base_url": base_url(request) + "/v1",
    }


async def whoami(request: web.Request) -> web.Response:
    p = _principal(request)
    return _json(await db(request, lambda tx: _me(tx, request, p)))


async def signin_options(request: web.Request) -> web.Response:
    """What the sign-in page offers. ``token_first``: there is an admin
    token and no account yet (a fresh install, the demo), so the page opens
    on the token form."""
    cfg = request.app[GATEWAY].config
    token = cfg.admin.token is not None
    accounts = await db(request, users.any_user) if token else True
    return _json({"open_signup": cfg.console.open_signup, "admin_token": token, "token_first": not accounts})


async def _start_session(tx: Tx, request: web.Request, user_id: int, now: float) -> tuple[Principal, str]:
    """A new session for a user (inside the caller's transaction): the
    Principal its later requests will be, and the session id for the cookie."""
    cfg = request.app[GATEWAY].config
    # Ended sessions go when new ones come: the table stays the size of the
    # sessions that could still be used.
    await users.prune_sessions(tx, now, cfg.console.session_idle_minutes * 60)
    sid, csrf = await users.create_session(tx, user_id, now=now, ttl_s=cfg.console.session_hours * 3600,
                                           address=client_address(request))
    await users.signed_in(tx, user_id, now)
    u = await users.get_user(tx, user_id)
    p = Principal(u["email"], u["is_admin"], user_id, u["name"], await users.roles(tx, user_id),
                  users.token_hash(sid), csrf)
    await audit.record(tx, p.actor(request), "session.create", now=now, target_type="user", target_id=user_id)
    return p, sid


def _signed_in(request: web.Request, started: tuple[str, dict[str, Any]], status: int = 200) -> web.Response:
    sid, me = started
    resp = _json(me, status)
    set_session_cookie(resp, request, sid)
    return resp


async def _check_password(request: web.Request, email: str, password: str, now: float) -> int:
    """The user id for these credentials, or 401 / 429. Throttled per email
    typed and per address, each attempt counted before the password is
    checked (gateway.access.attempt); the same work whether or not the
    account exists."""

    tried, row = await attempt(request, email, now, lambda tx: users.password_hash(tx, email))
    hashed = row[1] if row is not None and not row[2] else None
    # Always verify (against a dummy hash when there is no usable one), so
    # the time taken does not tell whether the account exists.
    ok = await verify_password(request, hashed, password)
    if not ok or row is None:
        raise Unauthorized("Email or password is incorrect.", code="invalid_credentials")
    user_id = row[0]
    if hashed is not None and HASHER.check_needs_rehash(hashed):
        new_hash = await hash_password(request, password)
        await db(request, lambda tx: users.set_password(tx, user_id, new_hash), write=True)
    await db(request, lambda tx: passed(tx, tried), write=True)
    return user_id


async def sign_in(request: web.Request) -> web.Response:
    body = await _json_body(request)
    email = _typed(body.get("email"), "email", MAX_EMAIL).strip().lower()
    password = _typed(body.get("password"), "password", MAX_PASSWORD)
    now = _now(request)
    user_id = await _check_password(request, email, password, now)

    async def run(tx: Tx) -> tuple[str, dict[str, Any]]:
        p, sid = await _start_session(tx, request, user_id, now)
        return sid, await _me(tx, request, p)

    return _signed_in(request, await db(request, run, write=True))


async def sign_out(request: web.Request) -> web.Response:
    p = _principal(request)
    if p.session is not None:
        session, actor, now = p.session, p.actor(request), _now(request)

        async def run(tx: Tx) -> None:
            await users.end_session(tx, session)
            await audit.record(tx, actor, "session.end", now=now, target_type="user", target_id=p.user_id)

        await db(request, run, write=True)
    resp = _json({"status": "signed out"})
    clear_session_cookie(resp)
    return resp


async def update_self(request: web.Request) -> web.Response:
    """A user's own name and password; a new password ends their other sessions."""
    p = _principal(request)
    if p.user_id is None:
        raise BadRequest("The operator token has no account to change.")
    body = await _body(request)
    unknown = sorted(set(body) - {"name", "password", "current_password"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    name = None if body.get("name") is None else text(body["name"], "name")
    now, user_id = _now(request), p.user_id
    new_hash = None
    if body.get("password") is not None:
        password = _password(body["password"])
        await _check_password(request, p.label, _typed(body.get("current_password"), "current_password",
                                                       MAX_PASSWORD), now)
        new_hash = await hash_password(request, password)
    actor = p.actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        before = await users.get_user(tx, user_id)
        if name is not None:
            after = await users.update_user(tx, user_id, now=now, name=name)
            await audit.record(tx, actor, "user.update", now=now, target_type="user", target_id=user_id,
                               before=before, after=after)
        if new_hash is not None:
            await users.set_password(tx, user_id, new_hash)
            ended = await users.end_sessions(tx, user_id, keep=p.session)
            await audit.record(tx, actor, "user.password", now=now, target_type="user", target_id=user_id,
                               after={"other_sessions_ended": ended})
        return await _me(tx, request, p)

    return _json(await db(request, run, write=True))


# ------------------------------------------------------------------ invitations


async def create_invitation(request: web.Request) -> web.Response:
    p, cfg = _principal(request), request.app[GATEWAY].config
    body = await _body(request)
    unknown = sorted(set(body) - {"email", "workspace_id", "role"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    email = email_address(body.get("email"))
    role = body.get("role", "member")
    ws_id = body.get("workspace_id")
    if role == "admin":
        if not p.is_admin:
            raise NotAllowed("Only an admin can invite an admin.")
        if ws_id is not None:
            raise BadRequest("an admin invitation names no workspace", param="workspace_id")
    elif role in users.ROLES:
        if not isinstance(ws_id, int) or isinstance(ws_id, bool):
            raise BadRequest("workspace_id is required", param="workspace_id")
        p.owner_of(ws_id)
    else:
        raise BadRequest("role must be member, owner or admin", param="role")
    now, actor = _now(request), p.actor(request)

    async def run(tx: Tx) -> tuple[dict[str, Any], str]:
        if ws_id is not None:
            await catalog.get_workspace(tx, ws_id)
        existing = await users.find_user(tx, email)
        if existing is not None:
            if existing["status"] == "disabled":
                raise queries.ConflictError(f"{email} is disabled: enable the account first")
            if ws_id is not None and await users.membership(tx, existing["id"], ws_id) is not None:
                raise queries.ConflictError(f"{email} is already a member of this workspace")
            if ws_id is None and existing["is_admin"]:
                raise queries.ConflictError(f"{email} is already an admin")
        inv, token = await users.create_invitation(tx, email, workspace_id=ws_id, role=role, invited_by=p.user_id,
                                                   now=now, ttl_s=cfg.console.invitation_hours * 3600)
        await audit.record(tx, actor, "invitation.create", now=now, target_type="invitation", target_id=inv["id"],
                           workspace_id=ws_id, after=inv)
        return inv, token

    inv, token = await db(request, run, write=True)
    # The token is in the fragment: browsers never send it to a server or
    # put it in a Referer header.
    return _json({"invitation": inv, "link": f"{base_url(request)}/console/#invite={token}"}, 201)


async def list_invitations(request: web.Request) -> web.Response:
    p = _principal(request)
    ws_id = _opt_int(request.query, "workspace_id")
    if ws_id is not None:
        p.owner_of(ws_id)
    owned = None if p.is_admin else {w for w, r in p.roles.items() if r == "owner"}
    now = _now(request)
    return _json({"data": await db(request, lambda tx: users.list_invitations(tx, now, owned, ws_id))})


async def revoke_invitation(request: web.Request) -> web.Response:
    inv_id, p = _int_id(request), _principal(request)
    now, actor = _now(request), p.actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        inv = await users.get_invitation(tx, inv_id)
        ws = inv["workspace_id"]
        if not (p.is_admin or (ws is not None and p.owns(ws))):
            raise queries.NotFoundError(f"invitation {inv_id} not found")
        if not await users.close_invitation(tx, inv_id, now, accepted=False):
            raise queries.ConflictError(f"invitation {inv_id} was already accepted or revoked")
        after = await users.get_invitation(tx, inv_id)
        await audit.record(tx, actor, "invitation.revoke", now=now, target_type="invitation", target_id=inv_id,
                           workspace_id=ws, before=inv, after=after)
        return after

    return _json(await db(request, run, write=True))


async def inspect_invitation(request: web.Request) -> web.Response:
    """What an invitation link is for, so the page can say so before the
    invitee chooses a password."""
    token = _typed((await _json_body(request)).get("token"), "token", 100)
    now = _now(request)

    async def run(tx: Tx) -> dict[str, Any]:
        inv = await users.open_invitation(tx, token, now)
        if inv is None:
            raise NotFound(INVALID_LINK, code="invalid_invitation")
        user = await users.find_user(tx, inv["email"])
        return {"email": inv["email"], "workspace": inv["workspace"], "role": inv["role"],
                "account": "existing" if user is not None and user["status"] == "active" else "new",
                "expires_at": inv["expires_at"]}

    return _json(await db(request, run))


async def accept_invitation(request: web.Request) -> web.Response:
    """Set a password (new account) or confirm it (existing account), join
    the workspace, and sign in; the link then stops working."""
    body = await _json_body(request)
    token = _typed(body.get("token"), "token", 100)
    password = _typed(body.get("password"), "password", MAX_PASSWORD)
    name = text(body.get("name") or "", "name")
    now = _now(request)

    async def look(tx: Tx) -> tuple[dict[str, Any], dict[str, Any] | None]:
        inv = await users.open_invitation(tx, token, now)
        if inv is None:
            raise NotFound(INVALID_LINK, code="invalid_invitation")
        return inv, await users.find_user(tx, inv["email"])

    inv, user = await db(request, look)
    if user is not None and user["status"] == "disabled":
        raise NotAllowed("This account is disabled.")
    new_hash = None
    if user is not None and user["status"] == "active":
        await _check_password(request, inv["email"], password, now)
    else:
        new_hash = await hash_password(request, _password(password))

    async def run(tx: Tx) -> tuple[str, dict[str, Any]]:
        if not await users.close_invitation(tx, inv["id"], now, accepted=True):
            raise NotFound(INVALID_LINK, code="invalid_invitation")
        u = await users.find_user(tx, inv["email"])
        # Read again in the write: what the checks above saw may have
        # changed while the password was hashed.
        if u is not None and u["status"] == "disabled":
            raise NotAllowed("This account is disabled.")
        if u is not None and u["status"] == "active" and new_hash is not None:
            raise queries.ConflictError("This account has just been activated: open the link again "
                                        "and confirm its password.")
        if u is None:
            u = await users.create_user(tx, inv["email"], now=now, name=name, password_hash=new_hash)
        elif new_hash is not None:
            await users.set_password(tx, u["id"], new_hash)
            if name:
                await users.update_user(tx, u["id"], now=now, name=name)
        actor = Actor(inv["email"], u["id"], client_address(request))
        if inv["role"] == "admin":
            await users.update_user(tx, u["id"], now=now, is_admin=True)
        else:
            await users.set_membership(tx, u["id"], inv["workspace_id"], inv["role"], now)
        await audit.record(tx, actor, "invitation.accept", now=now, target_type="invitation", target_id=inv["id"],
                           workspace_id=inv["workspace_id"],
                           after={"user_id": u["id"], "email": inv["email"], "role": inv["role"]})
        p, sid = await _start_session(tx, request, u["id"], now)
        return sid, await _me(tx, request, p)

    return _signed_in(request, await db(request, run, write=True))


async def sign_up(request: web.Request) -> web.Response:
    """Open sign-up (``[console] open_signup``): an account and a workspace
    of its own, where the new user is the owner. Sign-ups per address count
    against ``login_failures_per_address`` like failed sign-ins, each
    counted before its password is hashed (as sign-in attempts are)."""
    cfg = request.app[GATEWAY].config
    if not cfg.console.open_signup:
        raise NotAllowed("Sign-up is closed: ask an admin for an invitation.", code="signup_closed")
    body = await _json_body(request)
    email = email_address(body.get("email"))
    password = _password(body.get("password"))
    name = text(body.get("name") or "", "name")
    ws_name = text(body.get("workspace") or email.partition("@")[0], "workspace")
    if not ws_name:
        raise BadRequest("workspace is required", param="workspace")
    now, address, subject = _now(request), client_address(request), address_subject(request)

    async def check(tx: Tx) -> TooManyAttempts | None:
        return await over(tx, request, "signup", subject, cfg.console.login_failures_per_address,
                          "Too many sign-ups from your address", now)

    async def count(tx: Tx) -> None:
        await users.add_failure(tx, "signup", subject, now)

    await guarded(request, check, count)
    new_hash = await hash_password(request, password)

    async def run(tx: Tx) -> tuple[str, dict[str, Any]]:
        u = await users.create_user(tx, email, now=now, name=name, password_hash=new_hash)
        ws = await catalog.create_workspace(tx, ws_name)
        await users.set_membership(tx, u["id"], ws["id"], "owner", now)
        actor = Actor(email, u["id"], address)
        await audit.record(tx, actor, "user.signup", now=now, target_type="user", target_id=u["id"],
                           workspace_id=ws["id"], after={"user": u, "workspace": ws})
        p, sid = await _start_session(tx, request, u["id"], now)
        return sid, await _me(tx, request, p)

    return _signed_in(request, await db(request, run, write=True), 201)


# ------------------------------------------------------------------ users and members


def _owned(p: Principal) -> set[int]:
    return {w for w, r in p.roles.items() if r == "owner"}


async def _visible_users(tx: Tx, p: Principal) -> list[dict[str, Any]]:
    """Admins: everyone. Others: themselves and the members of the
    workspaces they own."""
    return await (users.list_users(tx) if p.is_admin else users.list_users(tx, _owned(p), also=p.user_id))


async def list_users(request: web.Request) -> web.Response:
    p = _principal(request)
    return _json({"data": await db(request, lambda tx: _visible_users(tx, p))})


async def get_user(request: web.Request) -> web.Response:
    user_id, p = _int_id(request), _principal(request)

    async def run(tx: Tx) -> dict[str, Any]:
        for u in await _visible_users(tx, p):
            if u["id"] == user_id:
                return u
        raise queries.NotFoundError(f"user {user_id} not found")

    return _json(await db(request, run))


async def update_user(request: web.Request) -> web.Response:
    """Admins: a user's name, admin flag, and disabled flag. Disabling ends
    the user's sessions at once and suspends their keys until re-enabled."""
    user_id, p = _int_id(request), _principal(request)
    body = await _body(request)
    unknown = sorted(set(body) - {"name", "is_admin", "disabled"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    for flag in ("is_admin", "disabled"):
        if flag in body and not isinstance(body[flag], bool):
            raise BadRequest(f"{flag} must be true or false", param=flag)
    if user_id == p.user_id and (body.get("disabled") or body.get("is_admin") is False):
        raise BadRequest("You cannot disable yourself or drop your own admin role.")
    name = None if body.get("name") is None else text(body["name"], "name")
    now, actor = _now(request), p.actor(request)
    action = ("user.disable" if body.get("disabled") else "user.enable" if body.get("disabled") is False
              else "user.update")

    async def run(tx: Tx) -> dict[str, Any]:
        before = await users.get_user(tx, user_id)
        after = await users.update_user(tx, user_id, now=now, name=name, is_admin=body.get("is_admin"),
                                        disabled=body.get("disabled"))
        await audit.record(tx, actor, action, now=now, target_type="user", target_id=user_id,
                           before=before, after=after)
        return after

    return _json(await db(request, run, write=True))


async def list_members(request: web.Request) -> web.Response:
    ws_id, p = _int_id(request), _principal(request)
    p.owner_of(ws_id)
    return _json({"data": await db(request, lambda tx: users.members(tx, ws_id))})


async def _member(tx: Tx, user_id: int, ws_id: int) -> str:
    role = await users.membership(tx, user_id, ws_id)
    if role is None:
        raise queries.NotFoundError(f"user {user_id} is not a member of workspace {ws_id}")
    return role


async def update_member(request: web.Request) -> web.Response:
    ws_id, user_id, p = _int_id(request), _int_id(request, "user_id"), _principal(request)
    p.owner_of(ws_id)
    body = await _body(request)
    role = body.get("role")
    if set(body) != {"role"} or role not in users.ROLES:
        raise BadRequest("send {\"role\": \"owner\"} or {\"role\": \"member\"}", param="role")
    now, actor = _now(request), p.actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        before = await _member(tx, user_id, ws_id)
        await users.set_membership(tx, user_id, ws_id, role, now)
        await audit.record(tx, actor, "member.role", now=now, target_type="user", target_id=user_id,
                           workspace_id=ws_id, before={"role": before}, after={"role": role})
        return {"user_id": user_id, "workspace_id": ws_id, "role": role}

    return _json(await db(request, run, write=True))


async def remove_member(request: web.Request) -> web.Response:
    """Take a user out of a workspace; the keys they made there are revoked."""
    ws_id, user_id, p = _int_id(request), _int_id(request, "user_id"), _principal(request)
    p.owner_of(ws_id)
    now, actor = _now(request), p.actor(request)

    async def run(tx: Tx) -> dict[str, Any]:
        role = await _member(tx, user_id, ws_id)
        revoked = await users.remove_membership(tx, user_id, ws_id, now)
        await audit.record(tx, actor, "member.remove", now=now, target_type="user", target_id=user_id,
                           workspace_id=ws_id, before={"role": role}, after={"revoked_keys": revoked})
        return {"user_id": user_id, "workspace_id": ws_id, "revoked_keys": revoked}

    return _json(await db(request, run, write=True))


# ------------------------------------------------------------------ audit log


async def audit_log(request: web.Request) -> web.Response:
    """Admins read every row; owners the rows of the workspaces they own."""
    q, p = request.query, _principal(request)
    if not p.is_admin and not _owned(p):
        raise NotAllowed("The audit log is for workspace owners and admins.")
    ws_id = _opt_int(q, "workspace_id")
    if ws_id is not None:
        p.owner_of(ws_id)
    filters: dict[str, Any] = {}
    for name in ("action", "actor", "target_type", "target_id"):
        value = q.get(name) or None
        if value is not None and len(value) > audit.MAX_FILTER:
            raise BadRequest(f"{name} is too long", param=name)
        filters[name] = value
    cursor = _opt_int(q, "cursor")
    since = _time(q.get("since"), 0.0, "since")
    until = _time(q.get("until"), time.time() + 60, "until")
    scope = None if p.is_admin else Scope(frozenset(_owned(p)), frozenset())

    def run(tx: Tx) -> Awaitable[dict[str, Any]]:
        return audit.query(tx, since=since, until=until, scope=scope, limit=_limit(q), before_id=cursor,
                           workspace_id=ws_id, actor_user_id=_opt_int(q, "actor_user_id"), **filters)

    return _json(await db(request, run))


ROUTES: tuple[Route, ...] = (
    ("GET", "/signin-options", signin_options, PUBLIC),
    ("POST", "/session", sign_in, PUBLIC),
    ("POST", "/signup", sign_up, PUBLIC),
    ("POST", "/invitation/inspect", inspect_invitation, PUBLIC),
    ("POST", "/invitation/accept", accept_invitation, PUBLIC),
    ("GET", "/session", whoami, USER),
    ("PATCH", "/session", update_self, USER),
    ("DELETE", "/session", sign_out, USER),
    ("GET", "/users", list_users, USER),
    ("GET", "/users/{id}", get_user, USER),
    ("PATCH", "/users/{id}", update_user, ADMIN),
    ("GET", "/workspaces/{id}/members", list_members, USER),
    ("PATCH", "/workspaces/{id}/members/{user_id}", update_member, USER),
    ("DELETE", "/workspaces/{id}/members/{user_id}", remove_member, USER),
    ("POST", "/invitations", create_invitation, USER),
    ("GET", "/invitations", list_invitations, USER),
    ("DELETE", "/invitations/{id}", revoke_invitation, USER),
    ("GET", "/audit", audit_log, USER),
)
