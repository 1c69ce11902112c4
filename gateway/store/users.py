"""Console users, workspace memberships, invitations, sessions and failed
sign-ins, on a ``Tx`` (gateway.store.tx): the same SQL on SQLite and
PostgreSQL, for the admin API, the console and the CLI.

Nothing here hashes or checks a password (gateway.access does, off the
database connection); rows returned never carry ``password_hash``, a session
id or an invitation token: those are stored only as hashes and only compared
in SQL by hash.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from typing import Any

from .base import ConflictError, NotFoundError
from .scope import Scope, marks
from .tx import IntegrityError, Tx

ROLES = ("owner", "member")

_USER_COLUMNS = "id, email, name, is_admin, disabled_at, created_at, last_login_at, password_hash IS NOT NULL AS active"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _user(row: dict[str, Any]) -> dict[str, Any]:
    d = dict(row)
    d["is_admin"] = bool(d["is_admin"])
    # active: has set a password; pending: invited, not yet accepted.
    active = d.pop("active")
    d["status"] = "disabled" if d["disabled_at"] else "active" if active else "pending"
    return d


# ------------------------------------------------------------------ users


async def create_user(tx: Tx, email: str, *, now: float, name: str = "",
                      password_hash: str | None = None, is_admin: bool = False) -> dict[str, Any]:
    try:
        user_id = await tx.fetchval(
            "INSERT INTO users (email, name, password_hash, is_admin, created_at) VALUES (?, ?, ?, ?, ?) "
            "RETURNING id",
            email, name, password_hash, int(is_admin), now,
        )
    except IntegrityError:
        raise ConflictError(f"a user with email {email!r} already exists") from None
    return await get_user(tx, int(user_id))


async def any_user(tx: Tx) -> bool:
    return await tx.fetchrow("SELECT 1 AS one FROM users LIMIT 1") is not None


async def get_user(tx: Tx, user_id: int) -> dict[str, Any]:
    row = await tx.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", user_id)
    if row is None:
        raise NotFoundError(f"user {user_id} not found")
    return _user(row)


async def find_user(tx: Tx, email: str) -> dict[str, Any] | None:
    row = await tx.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE email = ?", email)
    return None if row is None else _user(row)


async def password_hash(tx: Tx, email: str) -> tuple[int, str | None, bool] | None:
    """``(user id, argon2 hash or None, disabled)`` for a sign-in, or None."""
    row = await tx.fetchrow("SELECT id, password_hash, disabled_at FROM users WHERE email = ?", email)
    return None if row is None else (row["id"], row["password_hash"], row["disabled_at"] is not None)


async def user_password_hash(tx: Tx, user_id: int) -> str | None:
    row = await tx.fetchrow("SELECT password_hash FROM users WHERE id = ?", user_id)
    return None if row is None else row["password_hash"]


async def list_users(tx: Tx, workspaces: Iterable[int] | None = None,
                     also: int | None = None) -> list[dict[str, Any]]:
    """Every user (``workspaces`` None), or the members of ``workspaces`` and
    the user ``also``; each with the memberships the caller may see."""
    visible = None if workspaces is None else set(workspaces)
    if visible is None:
        rows = await tx.fetch(f"SELECT {_USER_COLUMNS} FROM users ORDER BY id")
    elif visible:
        ws = sorted(visible)
        rows = await tx.fetch(
            f"SELECT {_USER_COLUMNS} FROM users WHERE id = ? OR id IN "
            f"(SELECT user_id FROM memberships WHERE workspace_id IN ({marks(ws)})) ORDER BY id",
            also, *ws,
        )
    else:
        rows = await tx.fetch(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", also)
    users = [_user(r) for r in rows]
    by_id = {u["id"]: u for u in users}
    for u in users:
        u["workspaces"] = []
    for m in await tx.fetch(
        "SELECT m.user_id, m.workspace_id, w.name AS workspace, m.role FROM memberships m "
        "JOIN workspaces w ON w.id = m.workspace_id ORDER BY m.workspace_id"
    ):
        holder = by_id.get(m["user_id"])
        if holder is not None and (visible is None or m["workspace_id"] in visible or m["user_id"] == also):
            holder["workspaces"].append({"workspace_id": m["workspace_id"], "workspace": m["workspace"],
                                         "role": m["role"]})
    return users


async def update_user(tx: Tx, user_id: int, *, now: float, name: str | None = None,
                      is_admin: bool | None = None, disabled: bool | None = None) -> dict[str, Any]:
    """Change a user; disabling also ends every session of theirs (in the
    same statement batch, so no request authenticates in between once the
    caller commits)."""
    was_disabled = (await get_user(tx, user_id))["disabled_at"] is not None
    if name is not None:
        await tx.execute("UPDATE users SET name = ? WHERE id = ?", name, user_id)
    if is_admin is not None:
        await tx.execute("UPDATE users SET is_admin = ? WHERE id = ?", int(is_admin), user_id)
    # Only a real change touches disabled_at: its trigger reloads the key
    # cache of every instance (on PostgreSQL once per statement, whatever
    # it changed).
    if disabled is True:
        if not was_disabled:
            await tx.execute("UPDATE users SET disabled_at = ? WHERE id = ? AND disabled_at IS NULL", now, user_id)
        await end_sessions(tx, user_id)
    elif disabled is False and was_disabled:
        await tx.execute("UPDATE users SET disabled_at = NULL WHERE id = ?", user_id)
    return await get_user(tx, user_id)


async def set_password(tx: Tx, user_id: int, hashed: str) -> None:
    await tx.execute("UPDATE users SET password_hash = ? WHERE id = ?", hashed, user_id)


async def signed_in(tx: Tx, user_id: int, now: float) -> None:
    await tx.execute("UPDATE users SET last_login_at = ? WHERE id = ?", now, user_id)


# ------------------------------------------------------------------ memberships


async def roles(tx: Tx, user_id: int) -> dict[int, str]:
    """Workspace id -> role of one user."""
    rows = await tx.fetch("SELECT workspace_id, role FROM memberships WHERE user_id = ?", user_id)
    return {r["workspace_id"]: r["role"] for r in rows}


async def members(tx: Tx, ws_id: int) -> list[dict[str, Any]]:
    rows = await tx.fetch(
        "SELECT u.id, u.email, u.name, u.is_admin, u.disabled_at, u.created_at, u.last_login_at, "
        "u.password_hash IS NOT NULL AS active, m.role, m.created_at AS joined_at "
        "FROM memberships m JOIN users u ON u.id = m.user_id WHERE m.workspace_id = ? ORDER BY u.id",
        ws_id,
    )
    return [_user(r) for r in rows]


async def membership(tx: Tx, user_id: int, ws_id: int) -> str | None:
    role = await tx.fetchval("SELECT role FROM memberships WHERE user_id = ? AND workspace_id = ?", user_id, ws_id)
    return None if role is None else str(role)


async def set_membership(tx: Tx, user_id: int, ws_id: int, role: str, now: float) -> None:
    """Add a user to a workspace with ``role``, or change their role there."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    await tx.execute(
        "INSERT INTO memberships (user_id, workspace_id, role, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (user_id, workspace_id) DO UPDATE SET role = excluded.role",
        user_id, ws_id, role, now,
    )


async def remove_membership(tx: Tx, user_id: int, ws_id: int, now: float) -> list[int]:
    """Take a user out of a workspace and revoke the keys they created there;
    returns the ids of the keys revoked."""
    if await tx.execute("DELETE FROM memberships WHERE user_id = ? AND workspace_id = ?", user_id, ws_id) == 0:
        raise NotFoundError(f"user {user_id} is not a member of workspace {ws_id}")
    rows = await tx.fetch(
        "UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND workspace_id = ? AND revoked_at IS NULL "
        "RETURNING id", now, user_id, ws_id)
    return sorted(r["id"] for r in rows)


async def scope_of(tx: Tx, user_id: int, roles: dict[int, str]) -> Scope:
    """The rows a non-admin user may read: see gateway.store.scope."""
    owned = frozenset(ws for ws, r in roles.items() if r == "owner")
    member_of = sorted(ws for ws, r in roles.items() if r != "owner")
    keys: frozenset[int] = frozenset()
    if member_of:
        keys = frozenset(r["id"] for r in await tx.fetch(
            f"SELECT id FROM api_keys WHERE user_id = ? AND workspace_id IN ({marks(member_of)})",
            user_id, *member_of))
    return Scope(owned, keys)


# ------------------------------------------------------------------ invitations

_INVITE_COLUMNS = """i.id, i.email, i.workspace_id, w.name AS workspace, i.role, i.invited_by,
    u.email AS invited_by_email, i.created_at, i.expires_at, i.accepted_at, i.revoked_at"""
_INVITE_FROM = ("invitations i LEFT JOIN workspaces w ON w.id = i.workspace_id "
                "LEFT JOIN users u ON u.id = i.invited_by")
# An invitation can be accepted while it is open and its inviter could still
# make it: the CLI or the operator token (no inviter), or an enabled user who
# is an admin or (for a workspace role) an owner of that workspace. Checked at
# acceptance, not only at creation, so an owner who is removed, demoted or
# disabled cannot come back through a link made beforehand.
_INVITE_OPEN = f"""i.accepted_at IS NULL AND i.revoked_at IS NULL AND i.expires_at > ?
    AND (i.invited_by IS NULL OR (u.disabled_at IS NULL AND (u.is_admin = 1 OR (i.role IN ({marks(ROLES)})
        AND EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = i.invited_by
                    AND m.workspace_id = i.workspace_id AND m.role = 'owner')))))"""


async def create_invitation(tx: Tx, email: str, *, workspace_id: int | None, role: str,
                            invited_by: int | None, now: float, ttl_s: float) -> tuple[dict[str, Any], str]:
    """A one-time invitation; returns its row and the token, which is not stored."""
    token = secrets.token_urlsafe(32)
    inv_id = await tx.fetchval(
        "INSERT INTO invitations (token_hash, email, workspace_id, role, invited_by, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        token_hash(token), email, workspace_id, role, invited_by, now, now + ttl_s,
    )
    return await get_invitation(tx, int(inv_id)), token


async def get_invitation(tx: Tx, inv_id: int) -> dict[str, Any]:
    row = await tx.fetchrow(f"SELECT {_INVITE_COLUMNS} FROM {_INVITE_FROM} WHERE i.id = ?", inv_id)
    if row is None:
        raise NotFoundError(f"invitation {inv_id} not found")
    return row


async def open_invitation(tx: Tx, token: str, now: float) -> dict[str, Any] | None:
    """The invitation a token names, if it can still be accepted (``_INVITE_OPEN``)."""
    return await tx.fetchrow(
        f"SELECT {_INVITE_COLUMNS} FROM {_INVITE_FROM} WHERE i.token_hash = ? AND {_INVITE_OPEN}",
        token_hash(token), now, *ROLES,
    )


async def close_invitation(tx: Tx, inv_id: int, now: float, *, accepted: bool) -> bool:
    """Mark an invitation accepted, if it is still open (``_INVITE_OPEN``),
    or revoked, if it was neither accepted nor revoked; False if not. The
    condition is in the UPDATE, so whatever changed since the caller read
    the invitation (revoked, used, expired, its inviter disabled or
    demoted while the invitee's password was hashed) stops it here, and a
    link works once whoever races."""
    if accepted:
        return await tx.execute(
            f"UPDATE invitations SET accepted_at = ? WHERE id = "
            f"(SELECT i.id FROM {_INVITE_FROM} WHERE i.id = ? AND {_INVITE_OPEN})",
            now, inv_id, now, *ROLES,
        ) == 1
    return await tx.execute(
        "UPDATE invitations SET revoked_at = ? WHERE id = ? AND accepted_at IS NULL AND revoked_at IS NULL",
        now, inv_id,
    ) == 1


async def list_invitations(tx: Tx, now: float, workspaces: Iterable[int] | None = None,
                           workspace_id: int | None = None) -> list[dict[str, Any]]:
    """Open invitations, of ``workspaces`` only when given."""
    sql = f"SELECT {_INVITE_COLUMNS} FROM {_INVITE_FROM} WHERE {_INVITE_OPEN}"
    args: list[Any] = [now, *ROLES]
    if workspaces is not None:
        ws = sorted(workspaces)
        if not ws:
            return []
        sql += f" AND i.workspace_id IN ({marks(ws)})"
        args.extend(ws)
    if workspace_id is not None:
        sql += " AND i.workspace_id = ?"
        args.append(workspace_id)
    return await tx.fetch(sql + " ORDER BY i.id", *args)


# ------------------------------------------------------------------ sessions


async def create_session(tx: Tx, user_id: int, *, now: float, ttl_s: float,
                         address: str | None) -> tuple[str, str]:
    """A new session; returns ``(session id, csrf token)``. Only the id's
    hash is stored."""
    sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    await tx.execute(
        "INSERT INTO sessions (id_hash, user_id, csrf_token, created_at, seen_at, expires_at, address) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        token_hash(sid), user_id, csrf, now, now, now + ttl_s, address,
    )
    return sid, csrf


async def session(tx: Tx, sid_hash: str, *, now: float, idle_s: float) -> dict[str, Any] | None:
    """The live session with this id hash and its user, or None (unknown,
    expired, idle too long, or the user is disabled)."""
    return await tx.fetchrow(
        "SELECT s.user_id, s.csrf_token, s.seen_at, u.email, u.name, u.is_admin FROM sessions s "
        "JOIN users u ON u.id = s.user_id WHERE s.id_hash = ? AND s.expires_at > ? AND s.seen_at > ? "
        "AND u.disabled_at IS NULL",
        sid_hash, now, now - idle_s,
    )


async def touch_session(tx: Tx, sid_hash: str, now: float) -> None:
    await tx.execute("UPDATE sessions SET seen_at = ? WHERE id_hash = ?", now, sid_hash)


async def end_session(tx: Tx, sid_hash: str) -> None:
    await tx.execute("DELETE FROM sessions WHERE id_hash = ?", sid_hash)


async def end_sessions(tx: Tx, user_id: int, keep: str | None = None) -> int:
    """End every session of a user (but ``keep``, a session id hash)."""
    return await tx.execute("DELETE FROM sessions WHERE user_id = ? AND id_hash IS DISTINCT FROM ?", user_id, keep)


async def prune_sessions(tx: Tx, now: float, idle_s: float) -> int:
    return await tx.execute("DELETE FROM sessions WHERE expires_at <= ? OR seen_at <= ?", now, now - idle_s)


# ------------------------------------------------------------------ failed sign-ins
# login_failures rows are named by ``rowid``: SQLite's own row id, and on
# PostgreSQL a column of that name (gateway.store.postgres.schema).


async def failures(tx: Tx, scope: str, subject: str, since: float) -> tuple[int, float | None]:
    """How many failed sign-ins for ``subject`` since ``since``, and the oldest's time."""
    row = await tx.fetchrow(
        "SELECT COUNT(*) AS n, MIN(ts) AS oldest FROM login_failures WHERE scope = ? AND subject = ? AND ts > ?",
        scope, subject, since,
    )
    assert row is not None
    return int(row["n"]), row["oldest"]


async def add_failure(tx: Tx, scope: str, subject: str, now: float) -> int:
    """Count one failure; returns its row id (for ``drop_failure``)."""
    return int(await tx.fetchval(
        "INSERT INTO login_failures (scope, subject, ts) VALUES (?, ?, ?) RETURNING rowid", scope, subject, now))


async def drop_failure(tx: Tx, row_id: int) -> None:
    await tx.execute("DELETE FROM login_failures WHERE rowid = ?", row_id)


async def clear_failures(tx: Tx, scope: str, subject: str) -> None:
    await tx.execute("DELETE FROM login_failures WHERE scope = ? AND subject = ?", scope, subject)


async def prune_failures(tx: Tx, before: float) -> int:
    return await tx.execute("DELETE FROM login_failures WHERE ts <= ?", before)
