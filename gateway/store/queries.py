"""Workspace, key and usage queries on a synchronous sqlite3 connection:
gateway.store.catalog's (the one SQL for both stores) run in place, for
the CLI's demo, the tests and the benchmarks that fill an SQLite file. Never on the request path (the key cache
and the usage writer cover that).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from . import catalog
from .base import NO_LIMITS, ConflictError, KeyLimits, NotFoundError
from .catalog import KEY_FIELDS, KEY_PREFIX, PREFIX_SHOWN, WORKSPACE_FIELDS, hash_key, json_list, new_key, shape_row
from .scope import Scope
from .tx import on_conn

# Defined with the Store protocol and gateway.store.catalog, used with these.
__all__ = ["KEY_FIELDS", "KEY_PREFIX", "PREFIX_SHOWN", "WORKSPACE_FIELDS", "ConflictError", "KeyLimits",
           "NotFoundError", "hash_key", "json_list", "new_key", "shape_row"]


def create_workspace(conn: sqlite3.Connection, name: str, group: str = "default") -> dict[str, Any]:
    return on_conn(conn, catalog.create_workspace, name, group)


def find_workspace(conn: sqlite3.Connection, name: str) -> dict[str, Any]:
    return on_conn(conn, catalog.find_workspace, name)


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
    return on_conn(conn, catalog.create_key, workspace_id, name=name, group=group, models=models, limits=limits,
                   user_id=user_id)


def list_keys(conn: sqlite3.Connection, workspace_id: int | None = None, *, scope: Scope | None = None,
              user_id: int | None = None) -> list[dict[str, Any]]:
    """Keys, of one workspace, within a console user's scope, of one user."""
    return on_conn(conn, catalog.list_keys, workspace_id, scope=scope, user_id=user_id)


def revoke_key(conn: sqlite3.Connection, key_id: int) -> dict[str, Any]:
    return on_conn(conn, catalog.revoke_key, key_id)


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


def key_usage_totals(conn: sqlite3.Connection) -> dict[int, dict[str, Any]]:
    """Lifetime usage totals and last use per key, from the rollup."""
    return on_conn(conn, catalog.key_usage_totals)
