"""Console users, workspace memberships, invitations, sessions and failed
sign-ins, on a synchronous sqlite3 connection (CLI, and the admin API through
a worker thread).

Nothing here hashes or checks a password (gateway.access does, off the
database connection); rows returned never carry ``password_hash``, a session
id or an invitation token: those are stored only as hashes and only compared
in SQL by hash.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Iterable
from typing import Any

from .queries import ConflictError, NotFoundError
from .scope import Scope, marks

ROLES = ("owner", "member")

_USER_COLUMNS = "id, email, name, is_admin, disabled_at, created_at, last_login_at, password_hash IS NOT NULL AS active"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _user(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["is_admin"] = bool(d["is_admin"])
    # active: has set a password; pending: invited, not yet accepted.
    active = d.pop("active")
    d["status"] = "disabled" if d["disabled_at"] else "active" if active else "pending"
    return d


# ------------------------------------------------------------------ users


def create_user(conn: sqlite3.Connection, email: str, *, now: float, name: str = "",
                password_hash: str | None = None, is_admin: bool = False) -> dict[str, Any]:
    try:
        cur = conn.execute(
            "INSERT INTO users (email, name, password_hash, is_admin, created_at) VALUES (?, ?, ?, ?, ?)",
            (email, name, password_hash, int(is_admin), now),
        )
    except sqlite3.IntegrityError:
        raise ConflictError(f"a user with email {email!r} already exists") from None
    return get_user(conn, int(cur.lastrowid or 0))


def any_user(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None


def get_user(conn: sqlite3.Connection, user_id: int) -> dict[str, Any]:
    row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"user {user_id} not found")
    return _user(row)


def find_user(conn: sqlite3.Connection, email: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE email = ?", (email,)).fetchone()
    return None if row is None else _user(row)


def password_hash(conn: sqlite3.Connection, email: str) -> tuple[int, str | None, bool] | None:
    """``(user id, argon2 hash or None, disabled)`` for a sign-in, or None."""
    row = conn.execute("SELECT id, password_hash, disabled_at FROM users WHERE email = ?", (email,)).fetchone()
    return None if row is None else (row[0], row[1], row[2] is not None)


def user_password_hash(conn: sqlite3.Connection, user_id: int) -> str | None:
    row = conn.execute("SELECT password_hash FROM users WHERE id = ?", (user_id,)).fetchone()
    return None if row is None else row[0]


def list_users(conn: sqlite3.Connection, workspaces: Iterable[int] | None = None,
               also: int | None = None) -> list[dict[str, Any]]:
    """Every user (``workspaces`` None), or the members of ``workspaces`` and
    the user ``also``; each with the memberships the caller may see."""
    visible = None if workspaces is None else set(workspaces)
    if visible is None:
        rows = conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY id").fetchall()
    else:
        ws = sorted(visible)
        rows = conn.execute(
            f"SELECT {_USER_COLUMNS} FROM users WHERE id = ? OR id IN "
            f"(SELECT user_id FROM memberships WHERE workspace_id IN ({marks(ws)})) ORDER BY id",
            (also, *ws),
        ).fetchall()
    users = [_user(r) for r in rows]
    by_id = {u["id"]: u for u in users}
    for u in users:
        u["workspaces"] = []
    for m in conn.execute(
        "SELECT m.user_id, m.workspace_id, w.name AS workspace, m.role FROM memberships m "
        "JOIN workspaces w ON w.id = m.workspace_id ORDER BY m.workspace_id"
    ):
        holder = by_id.get(m["user_id"])
        if holder is not None and (visible is None or m["workspace_id"] in visible or m["user_id"] == also):
            holder["workspaces"].append({"workspace_id": m["workspace_id"], "workspace": m["workspace"],
                                    "role": m["role"]})
    return users


def update_user(conn: sqlite3.Connection, user_id: int, *, now: float, name: str | None = None,
                is_admin: bool | None = None, disabled: bool | None = None) -> dict[str, Any]:
    """Change a user; disabling also ends every session of theirs (in the
    same statement batch, so no request authenticates in between once the
    caller commits)."""
    get_user(conn, user_id)
    if name is not None:
        conn.execute("UPDATE users SET name = ? WHERE id = ?", (name, user_id))
    if is_admin is not None:
        conn.execute("UPDATE users SET is_admin = ? WHERE id = ?", (int(is_admin), user_id))
    if disabled is True:
        conn.execute("UPDATE users SET disabled_at = ? WHERE id = ? AND disabled_at IS NULL", (now, user_id))
        end_sessions(conn, user_id)
    elif disabled is False:
        conn.execute("UPDATE users SET disabled_at = NULL WHERE id = ?", (user_id,))
    return get_user(conn, user_id)


def set_password(conn: sqlite3.Connection, user_id: int, hashed: str) -> None:
    conn.execute("UPDATE users SET password_hash = ? WHERE id = ?", (hashed, user_id))


def signed_in(conn: sqlite3.Connection, user_id: int, now: float) -> None:
    conn.execute("UPDATE users SET last_login_at = ? WHERE id = ?", (now, user_id))


# ------------------------------------------------------------------ memberships


def roles(conn: sqlite3.Connection, user_id: int) -> dict[int, str]:
    """Workspace id -> role of one user."""
    return {r[0]: r[1] for r in conn.execute(
        "SELECT workspace_id, role FROM memberships WHERE user_id = ?", (user_id,))}


def members(conn: sqlite3.Connection, ws_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT u.id, u.email, u.name, u.is_admin, u.disabled_at, u.created_at, u.last_login_at, "
        "u.password_hash IS NOT NULL AS active, m.role, m.created_at AS joined_at "
        "FROM memberships m JOIN users u ON u.id = m.user_id WHERE m.workspace_id = ? ORDER BY u.id",
        (ws_id,),
    )
    return [_user(r) for r in rows]


def membership(conn: sqlite3.Connection, user_id: int, ws_id: int) -> str | None:
    row = conn.execute("SELECT role FROM memberships WHERE user_id = ? AND workspace_id = ?",
                       (user_id, ws_id)).fetchone()
    return None if row is None else str(row[0])


def set_membership(conn: sqlite3.Connection, user_id: int, ws_id: int, role: str, now: float) -> None:
    """Add a user to a workspace with ``role``, or change their role there."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    conn.execute(
        "INSERT INTO memberships (user_id, workspace_id, role, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (user_id, workspace_id) DO UPDATE SET role = excluded.role",
        (user_id, ws_id, role, now),
    )


def remove_membership(conn: sqlite3.Connection, user_id: int, ws_id: int, now: float) -> list[int]:
    """Take a user out of a workspace and revoke the keys they created there;
    returns the ids of the keys revoked."""
    if conn.execute("DELETE FROM memberships WHERE user_id = ? AND workspace_id = ?",
                    (user_id, ws_id)).rowcount == 0:
        raise NotFoundError(f"user {user_id} is not a member of workspace {ws_id}")
    ids = [r[0] for r in conn.execute(
        "SELECT id FROM api_keys WHERE user_id = ? AND workspace_id = ? AND revoked_at IS NULL", (user_id, ws_id))]
    conn.execute("UPDATE api_keys SET revoked_at = ? WHERE user_id = ? AND workspace_id = ? AND revoked_at IS NULL",
                 (now, user_id, ws_id))
    return ids


def scope_of(conn: sqlite3.Connection, user_id: int, roles: dict[int, str]) -> Scope:
    """The rows a non-admin user may read: see gateway.store.scope."""
    owned = frozenset(ws for ws, r in roles.items() if r == "owner")
    member_of = sorted(ws for ws, r in roles.items() if r != "owner")
    keys: frozenset[int] = frozenset()
    if member_of:
        keys = frozenset(r[0] for r in conn.execute(
            f"SELECT id FROM api_keys WHERE user_id = ? AND workspace_id IN ({marks(member_of)})",
            (user_id, *member_of)))
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


def create_invitation(conn: sqlite3.Connection, email: str, *, workspace_id: int | None, role: str,
                      invited_by: int | None, now: float, ttl_s: float) -> tuple[dict[str, Any], str]:
    """A one-time invitation; returns its row and the token, which is not stored."""
    token = secrets.token_urlsafe(32)
    cur = conn.execute(
        "INSERT INTO invitations (token_hash, email, workspace_id, role, invited_by, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (token_hash(token), email, workspace_id, role, invited_by, now, now + ttl_s),
    )
    return get_invitation(conn, int(cur.lastrowid or 0)), token


def get_invitation(conn: sqlite3.Connection, inv_id: int) -> dict[str, Any]:
    row = conn.execute(f"SELECT {_INVITE_COLUMNS} FROM {_INVITE_FROM} WHERE i.id = ?", (inv_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"invitation {inv_id} not found")
    return dict(row)


def open_invitation(conn: sqlite3.Connection, token: str, now: float) -> dict[str, Any] | None:
    """The invitation a token names, if it can still be accepted (``_INVITE_OPEN``)."""
    row = conn.execute(
        f"SELECT {_INVITE_COLUMNS} FROM {_INVITE_FROM} WHERE i.token_hash = ? AND {_INVITE_OPEN}",
        (token_hash(token), now, *ROLES),
    ).fetchone()
    return None if row is None else dict(row)


def close_invitation(conn: sqlite3.Connection, inv_id: int, now: float, *, accepted: bool) -> bool:
    """Mark an open invitation accepted (or revoked); False if it was no
    longer open: the guard makes a link work once, whoever races."""
    col = "accepted_at" if accepted else "revoked_at"
    return conn.execute(
        f"UPDATE invitations SET {col} = ? WHERE id = ? AND accepted_at IS NULL AND revoked_at IS NULL",
        (now, inv_id),
    ).rowcount == 1


def list_invitations(conn: sqlite3.Connection, now: float, workspaces: Iterable[int] | None = None,
                     workspace_id: int | None = None) -> list[dict[str, Any]]:
    """Open invitations, of ``workspaces`` only when given."""
    sql = f"SELECT {_INVITE_COLUMNS} FROM {_INVITE_FROM} WHERE {_INVITE_OPEN}"
    args: list[Any] = [now, *ROLES]
    if workspaces is not None:
        ws = sorted(workspaces)
        sql += f" AND i.workspace_id IN ({marks(ws)})"
        args.extend(ws)
    if workspace_id is not None:
        sql += " AND i.workspace_id = ?"
        args.append(workspace_id)
    return [dict(r) for r in conn.execute(sql + " ORDER BY i.id", args)]


# ------------------------------------------------------------------ sessions


def create_session(conn: sqlite3.Connection, user_id: int, *, now: float, ttl_s: float,
                   address: str | None) -> tuple[str, str]:
    """A new session; returns ``(session id, csrf token)``. Only the id's
    hash is stored."""
    sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO sessions (id_hash, user_id, csrf_token, created_at, seen_at, expires_at, address) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (token_hash(sid), user_id, csrf, now, now, now + ttl_s, address),
    )
    return sid, csrf


def session(conn: sqlite3.Connection, sid_hash: str, *, now: float, idle_s: float) -> dict[str, Any] | None:
    """The live session with this id hash and its user, or None (unknown,
    expired, idle too long, or the user is disabled)."""
    row = conn.execute(
        "SELECT s.user_id, s.csrf_token, s.seen_at, u.email, u.name, u.is_admin FROM sessions s "
        "JOIN users u ON u.id = s.user_id WHERE s.id_hash = ? AND s.expires_at > ? AND s.seen_at > ? "
        "AND u.disabled_at IS NULL",
        (sid_hash, now, now - idle_s),
    ).fetchone()
    return None if row is None else dict(row)


def touch_session(conn: sqlite3.Connection, sid_hash: str, now: float) -> None:
    conn.execute("UPDATE sessions SET seen_at = ? WHERE id_hash = ?", (now, sid_hash))


def end_session(conn: sqlite3.Connection, sid_hash: str) -> None:
    conn.execute("DELETE FROM sessions WHERE id_hash = ?", (sid_hash,))


def end_sessions(conn: sqlite3.Connection, user_id: int, keep: str | None = None) -> int:
    """End every session of a user (but ``keep``, a session id hash)."""
    return conn.execute("DELETE FROM sessions WHERE user_id = ? AND id_hash IS NOT ?", (user_id, keep)).rowcount


def prune_sessions(conn: sqlite3.Connection, now: float, idle_s: float) -> int:
    return conn.execute("DELETE FROM sessions WHERE expires_at <= ? OR seen_at <= ?", (now, now - idle_s)).rowcount


# ------------------------------------------------------------------ failed sign-ins


def failures(conn: sqlite3.Connection, scope: str, subject: str, since: float) -> tuple[int, float | None]:
    """How many failed sign-ins for ``subject`` since ``since``, and the oldest's time."""
    row = conn.execute(
        "SELECT COUNT(*), MIN(ts) FROM login_failures WHERE scope = ? AND subject = ? AND ts > ?",
        (scope, subject, since),
    ).fetchone()
    return int(row[0]), row[1]


def add_failure(conn: sqlite3.Connection, scope: str, subject: str, now: float) -> int:
    """Count one failure; returns its row id (for ``drop_failure``)."""
    cur = conn.execute("INSERT INTO login_failures (scope, subject, ts) VALUES (?, ?, ?)", (scope, subject, now))
    return int(cur.lastrowid or 0)


def drop_failure(conn: sqlite3.Connection, row_id: int) -> None:
    conn.execute("DELETE FROM login_failures WHERE rowid = ?", (row_id,))


def clear_failures(conn: sqlite3.Connection, scope: str, subject: str) -> None:
    conn.execute("DELETE FROM login_failures WHERE scope = ? AND subject = ?", (scope, subject))


def prune_failures(conn: sqlite3.Connection, before: float) -> int:
    return conn.execute("DELETE FROM login_failures WHERE ts <= ?", (before,)).rowcount
