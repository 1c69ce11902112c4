"""Workspaces and keys on a ``Tx`` (gateway.store.tx): the one SQL both
stores, the admin API and the CLI use for them. gateway.store.queries keeps
synchronous spellings of these for SQLite callers.

Rows returned never carry the key hash.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Collection
from typing import Any

import orjson

from .. import safejson
from .base import NO_LIMITS, ConflictError, KeyLimits, NotFoundError
from .scope import Scope, marks
from .tx import IntegrityError, Tx

KEY_PREFIX = "gw-"
PREFIX_SHOWN = 10

WORKSPACE_FIELDS = ("default_group", "allowed_models", "monthly_spend_limit", "monthly_token_limit")
KEY_FIELDS = (
    "name", "group_name", "allowed_models", "rpm", "tpm", "max_concurrency", "spend_limit", "expires_at",
)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_key() -> str:
    # 32 random bytes: 256 bits of entropy, 43 url-safe characters.
    return KEY_PREFIX + secrets.token_urlsafe(32)


def json_list(v: list[str] | None) -> str | None:
    return None if v is None else orjson.dumps(v).decode()


def shape_row(row: Any) -> dict[str, Any]:
    """A workspace or key row as a dict, its model allow-list parsed."""
    d = dict(row)
    d["allowed_models"] = None if d["allowed_models"] is None else safejson.loads(d["allowed_models"])
    return d


# ------------------------------------------------------------------ workspaces


async def create_workspace(tx: Tx, name: str, group: str = "default") -> dict[str, Any]:
    try:
        ws_id = await tx.fetchval(
            "INSERT INTO workspaces (name, default_group, created_at) VALUES (?, ?, ?) RETURNING id",
            name, group, time.time(),
        )
    except IntegrityError:
        raise ConflictError(f"workspace {name!r} already exists") from None
    return await get_workspace(tx, int(ws_id))


async def get_workspace(tx: Tx, ws_id: int) -> dict[str, Any]:
    row = await tx.fetchrow("SELECT * FROM workspaces WHERE id = ?", ws_id)
    if row is None:
        raise NotFoundError(f"workspace {ws_id} not found")
    return shape_row(row)


async def find_workspace(tx: Tx, name: str) -> dict[str, Any]:
    row = await tx.fetchrow("SELECT * FROM workspaces WHERE name = ?", name)
    if row is None:
        raise NotFoundError(f"workspace {name!r} not found")
    return shape_row(row)


async def list_workspaces(tx: Tx, ids: Collection[int] | None = None) -> list[dict[str, Any]]:
    """Every workspace, or those of ``ids``."""
    if ids is None:
        return [shape_row(r) for r in await tx.fetch("SELECT * FROM workspaces ORDER BY id")]
    ordered = sorted(ids)
    if not ordered:
        return []
    return [shape_row(r) for r in await tx.fetch(
        f"SELECT * FROM workspaces WHERE id IN ({marks(ordered)}) ORDER BY id", *ordered)]


async def _update(tx: Tx, table: str, row_id: int, fields: dict[str, Any], allowed: tuple[str, ...]) -> int:
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    if not fields:
        return 0
    values = [json_list(v) if k == "allowed_models" else v for k, v in fields.items()]
    sets = ", ".join(f"{k} = ?" for k in fields)
    return await tx.execute(f"UPDATE {table} SET {sets} WHERE id = ?", *values, row_id)


async def update_workspace(tx: Tx, ws_id: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Change a workspace's default group, model allow-list or monthly quotas
    (``None`` clears a quota or the allow-list)."""
    await get_workspace(tx, ws_id)
    await _update(tx, "workspaces", ws_id, fields, WORKSPACE_FIELDS)
    return await get_workspace(tx, ws_id)


# ------------------------------------------------------------------ keys


async def create_key(
    tx: Tx,
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
    await get_workspace(tx, workspace_id)
    plaintext = new_key()
    key_id = await tx.fetchval(
        """INSERT INTO api_keys (workspace_id, name, prefix, key_hash, group_name, allowed_models,
               rpm, tpm, max_concurrency, spend_limit, expires_at, created_at, user_id)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
        workspace_id, name, plaintext[:PREFIX_SHOWN], hash_key(plaintext), group, json_list(models),
        limits.rpm, limits.tpm, limits.max_concurrency, limits.spend_limit, limits.expires_at, time.time(), user_id,
    )
    return await get_key(tx, int(key_id)), plaintext


# user_suspended: the key's user is disabled, so the key cache leaves it out.
KEY_SELECT = """SELECT k.id, k.workspace_id, w.name AS workspace, k.name, k.prefix, k.group_name,
    k.allowed_models, k.rpm, k.tpm, k.max_concurrency, k.spend_limit, k.expires_at,
    k.revoked_at, k.created_at, k.user_id, u.email AS user_email, u.disabled_at IS NOT NULL AS user_suspended
    FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id LEFT JOIN users u ON u.id = k.user_id"""


def _key(row: dict[str, Any]) -> dict[str, Any]:
    d = shape_row(row)
    d["user_suspended"] = bool(d["user_suspended"])
    return d


async def get_key(tx: Tx, key_id: int) -> dict[str, Any]:
    row = await tx.fetchrow(f"{KEY_SELECT} WHERE k.id = ?", key_id)
    if row is None:
        raise NotFoundError(f"key {key_id} not found")
    return _key(row)


async def list_keys(tx: Tx, workspace_id: int | None = None, *, scope: Scope | None = None,
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
    return [_key(r) for r in await tx.fetch(f"{KEY_SELECT}{cond} ORDER BY k.id", *args)]


async def update_key(tx: Tx, key_id: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Change a key's name, group, allowed models or limits (``None`` clears)."""
    await get_key(tx, key_id)
    await _update(tx, "api_keys", key_id, fields, KEY_FIELDS)
    return await get_key(tx, key_id)


async def revoke_key(tx: Tx, key_id: int) -> dict[str, Any]:
    await tx.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", time.time(), key_id)
    return await get_key(tx, key_id)  # NotFoundError if there is no such key


async def key_usage_totals(tx: Tx) -> dict[int, dict[str, Any]]:
    """Lifetime usage totals and last use per key, from the rollup."""
    rows = await tx.fetch("SELECT key_id, requests, input_tokens, output_tokens, cost, last_used FROM usage_key_totals")
    return {r["key_id"]: r for r in rows}
