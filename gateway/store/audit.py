"""The audit log: one row per state change, written in the same transaction
as the change (a write body of ``Store.run``: gateway.store.tx), so a change
is never without its row nor a row without its change.

A row says who (``Actor``), what (action, target, workspace), when, from
which address, and the object before and after. ``before``/``after`` are
the rows the admin API shows, which carry no secret; ``record`` drops the
fields that could anyway (hashes, tokens, passwords) as a second line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .. import safejson
from .scope import Scope
from .tx import Tx

SECRET_FIELDS = frozenset({"key_hash", "password_hash", "password", "token_hash", "token", "plaintext",
                           "csrf_token", "id_hash", "link"})
# What the audit rows are read with: a long, bounded text filter is refused.
MAX_FILTER = 200


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: a console user, the operator token, the CLI, a signal."""

    label: str  # an email, "operator token", "cli (root)", "SIGHUP"
    user_id: int | None = None
    address: str | None = None


def _clean(obj: Mapping[str, Any] | None) -> str | None:
    if obj is None:
        return None
    return orjson.dumps({k: v for k, v in obj.items() if k not in SECRET_FIELDS}).decode()


async def record(tx: Tx, actor: Actor, action: str, *, now: float, target_type: str | None = None,
           target_id: object = None, workspace_id: int | None = None, before: Mapping[str, Any] | None = None,
           after: Mapping[str, Any] | None = None) -> None:
    await tx.execute(
        "INSERT INTO audit_log (ts, actor_user_id, actor, address, action, target_type, target_id, workspace_id, "
        "before, after) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        now, actor.user_id, actor.label, actor.address, action, target_type,
        None if target_id is None else str(target_id), workspace_id, _clean(before), _clean(after),
    )


_FILTERS = {"actor_user_id": "actor_user_id = ?", "workspace_id": "workspace_id = ?",
            "target_type": "target_type = ?", "target_id": "target_id = ?"}


async def query(tx: Tx, *, since: float, until: float, scope: Scope | None = None,
          action: str | None = None, actor: str | None = None, limit: int = 50, before_id: int | None = None,
          **filters: Any) -> dict[str, Any]:
    """A page of audit rows, newest first. ``action`` is an exact action or a
    prefix ending in a dot (``key.``); ``actor`` matches the actor's label
    exactly; other filters are the columns of ``_FILTERS``. ``next_cursor``
    (an id) fetches the next page."""
    where = ["ts >= ?", "ts < ?"]
    args: list[Any] = [since, until]
    if scope is not None:
        sql, scope_args = scope.where("workspace_id", None)
        where.append(sql)
        args.extend(scope_args)
    if action:
        if action.endswith("."):
            where.append("substr(action, 1, ?) = ?")
            args.extend([len(action), action])
        else:
            where.append("action = ?")
            args.append(action)
    if actor:
        where.append("actor = ?")
        args.append(actor)
    for name, value in filters.items():
        if value is not None:
            where.append(_FILTERS[name])
            args.append(value)
    if before_id is not None:
        where.append("id < ?")
        args.append(before_id)
    rows = await tx.fetch(
        f"SELECT a.*, w.name AS workspace FROM (SELECT * FROM audit_log WHERE {' AND '.join(where)} "
        "ORDER BY id DESC LIMIT ?) a LEFT JOIN workspaces w ON w.id = a.workspace_id ORDER BY a.id DESC",
        *args, limit + 1,
    )
    for r in rows:
        for col in ("before", "after"):
            r[col] = None if r[col] is None else safejson.loads(r[col])
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = str(rows[-1]["id"])
    return {"items": rows, "next_cursor": next_cursor}
