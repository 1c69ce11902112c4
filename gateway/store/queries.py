"""Workspace, key and usage queries on a synchronous sqlite3 connection.

Used by the CLI directly and by the admin API through a worker thread; never
on the request path (the key cache and the usage writer cover that).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Collection
from typing import Any

import orjson

from .base import NO_LIMITS, ConflictError, KeyLimits, NotFoundError
from .scope import Scope, marks

__all__ = ["ConflictError", "KeyLimits", "NotFoundError"]  # defined with the Store protocol, used with these

KEY_PREFIX = "gw-"
PREFIX_SHOWN = 10


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_key() -> str:
    # 32 random bytes: 256 bits of entropy, 43 url-safe characters.
    return KEY_PREFIX + secrets.token_urlsafe(32)


def json_list(v: list[str] | None) -> str | None:
    return None if v is None else orjson.dumps(v).decode()


def create_workspace(conn: sqlite3.Connection, name: str, group: str = "default") -> dict[str, Any]:
    try:
        cur = conn.execute(
            "INSERT INTO workspaces (name, default_group, created_at) VALUES (?, ?, ?)",
            (name, group, time.time()),
        )
    except sqlite3.IntegrityError:
        raise ConflictError(f"workspace {name!r} already exists") from None
    return get_workspace(conn, int(cur.lastrowid or 0))


def get_workspace(conn: sqlite3.Connection, ws_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM workspaces WHERE id = ?", (ws_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"workspace {ws_id} not found")
    return _workspace(row)


def find_workspace(conn: sqlite3.Connection, name: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM workspaces WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"workspace {name!r} not found")
    return _workspace(row)


def list_workspaces(conn: sqlite3.Connection, ids: Collection[int] | None = None) -> list[dict[str, Any]]:
    """Every workspace, or those of ``ids``."""
    if ids is None:
        return [_workspace(r) for r in conn.execute("SELECT * FROM workspaces ORDER BY id")]
    ordered = sorted(ids)
    sql = f"SELECT * FROM workspaces WHERE id IN ({marks(ordered)}) ORDER BY id"
    return [_workspace(r) for r in conn.execute(sql, ordered)]


def shape_row(row: Any) -> dict[str, Any]:
    """A workspace or key row as a dict, its model allow-list parsed."""
    d = dict(row)
    d["allowed_models"] = None if d["allowed_models"] is None else orjson.loads(d["allowed_models"])
    return d


_workspace = shape_row


def create_key(
    conn: sqlite3.Connection,
    workspace_id: int,
    *,
    name: str = "",
    group: str | None = None,
    models: list[str] | None = None,
    limits: KeyLimits = NO_LIMITS,
    user_id: int | None = None,
) -> tuple[dict[str, Any], str]:
    """Create a key (``user_id``: the console user it belongs to); returns its
    row and the plaintext, which is not stored."""
    get_workspace(conn, workspace_id)
    plaintext = new_key()
    cur = conn.execute(
        """INSERT INTO api_keys (workspace_id, name, prefix, key_hash, group_name, allowed_models,
               rpm, tpm, max_concurrency, spend_limit, expires_at, created_at, user_id)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            workspace_id,
            name,
            plaintext[:PREFIX_SHOWN],
            hash_key(plaintext),
            group,
            json_list(models),
            limits.rpm,
            limits.tpm,
            limits.max_concurrency,
            limits.spend_limit,
            limits.expires_at,
            time.time(),
            user_id,
        ),
    )
    return get_key(conn, int(cur.lastrowid or 0)), plaintext


# user_suspended: the key's user is disabled, so the key cache leaves it out.
_KEY_SELECT = """SELECT k.id, k.workspace_id, w.name AS workspace, k.name, k.prefix, k.group_name,
    k.allowed_models, k.rpm, k.tpm, k.max_concurrency, k.spend_limit, k.expires_at,
    k.revoked_at, k.created_at, k.user_id, u.email AS user_email, u.disabled_at IS NOT NULL AS user_suspended
    FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id LEFT JOIN users u ON u.id = k.user_id"""


def get_key(conn: sqlite3.Connection, key_id: int) -> dict[str, Any]:
    row = conn.execute(f"{_KEY_SELECT} WHERE k.id = ?", (key_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"key {key_id} not found")
    return _key(row)


def list_keys(conn: sqlite3.Connection, workspace_id: int | None = None, *, scope: Scope | None = None,
              user_id: int | None = None) -> list[dict[str, Any]]:
    """Keys, of one workspace, within a console user's scope, of one user."""
    where: list[str] = []
    args: list[Any] = []
    if workspace_id is not None:
        where.append("k.workspace_id = ?")
        args.append(workspace_id)
    if scope is not None:
        sql, scope_args = scope.where("k.workspace_id", "k.id")
        where.append(sql)
        args.extend(scope_args)
    if user_id is not None:
        where.append("k.user_id = ?")
        args.append(user_id)
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    return [_key(r) for r in conn.execute(f"{_KEY_SELECT}{cond} ORDER BY k.id", args)]


def _key(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["allowed_models"] = None if d["allowed_models"] is None else orjson.loads(d["allowed_models"])
    d["user_suspended"] = bool(d["user_suspended"])
    return d


def revoke_key(conn: sqlite3.Connection, key_id: int) -> dict[str, Any]:
    cur = conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
    )
    key = get_key(conn, key_id)
    if cur.rowcount == 0 and key["revoked_at"] is None:
        raise NotFoundError(f"key {key_id} not found")
    return key


# Live keys with what the key cache needs (gateway.auth builds KeyInfo from
# them); a disabled console user's keys are left out.
LIVE_KEYS = """
SELECT k.id, k.key_hash, k.name, k.prefix, k.group_name, k.allowed_models, k.rpm, k.tpm,
       k.max_concurrency, k.spend_limit, k.expires_at,
       w.id, w.name, w.default_group, w.allowed_models, w.monthly_spend_limit, w.monthly_token_limit
FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id LEFT JOIN users u ON u.id = k.user_id
WHERE k.revoked_at IS NULL AND u.disabled_at IS NULL
"""

USAGE_GROUPS = {"model": "model", "key": "key_id", "workspace": "workspace_id", "upstream": "upstream"}


def usage_summary(conn: sqlite3.Connection, *, since: float = 0.0, by: str = "model") -> list[dict[str, Any]]:
    col = USAGE_GROUPS[by]
    rows = conn.execute(
        f"""SELECT {col} AS {by}, COUNT(*) AS requests,
                SUM(status >= 400) AS errors,
                SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens,
                SUM(cached_tokens) AS cached_tokens, SUM(reasoning_tokens) AS reasoning_tokens,
                SUM(images) AS images, SUM(video_tokens) AS video_tokens,
                ROUND(SUM(cost), 6) AS cost, ROUND(AVG(latency_ms), 3) AS avg_latency_ms
            FROM usage_events WHERE ts >= ? GROUP BY {col} ORDER BY requests DESC""",
        (since,),
    )
    return [dict(r) for r in rows]


WORKSPACE_FIELDS = ("default_group", "allowed_models", "monthly_spend_limit", "monthly_token_limit")
KEY_FIELDS = (
    "name", "group_name", "allowed_models", "rpm", "tpm", "max_concurrency", "spend_limit", "expires_at",
)


def _update(conn: sqlite3.Connection, table: str, row_id: int, fields: dict[str, Any], allowed: tuple[str, ...]) -> int:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    if not fields:
        return 0
    values = [json_list(v) if k == "allowed_models" else v for k, v in fields.items()]
    sets = ", ".join(f"{k} = ?" for k in fields)
    return conn.execute(f"UPDATE {table} SET {sets} WHERE id = ?", (*values, row_id)).rowcount


def update_workspace(conn: sqlite3.Connection, ws_id: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Change a workspace's default group, model allow-list or monthly quotas
    (``None`` clears a quota or the allow-list)."""
    get_workspace(conn, ws_id)
    _update(conn, "workspaces", ws_id, fields, WORKSPACE_FIELDS)
    return get_workspace(conn, ws_id)


def update_key(conn: sqlite3.Connection, key_id: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Change a key's name, group, allowed models or limits (``None`` clears)."""
    get_key(conn, key_id)
    _update(conn, "api_keys", key_id, fields, KEY_FIELDS)
    return get_key(conn, key_id)


def key_usage_totals(conn: sqlite3.Connection) -> dict[int, dict[str, Any]]:
    """Lifetime usage totals and last use per key, from the rollup."""
    rows = conn.execute("SELECT key_id, requests, input_tokens, output_tokens, cost, last_used FROM usage_key_totals")
    return {r["key_id"]: dict(r) for r in rows}
