"""What a console user who is not an admin may read, as a SQL condition.

A user sees whole workspaces where they are an owner, and only their own keys
in workspaces where they are a member. Usage rows, rollups, tasks and audit
rows carry a workspace id and a key id, so one condition covers them all.
Admins (and the operator token) have no scope: ``None`` everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Scope:
    workspaces: frozenset[int]  # every row of these workspaces
    keys: frozenset[int]  # and the rows of these keys

    def where(self, ws_col: str = "workspace_id", key_col: str | None = "key_id") -> tuple[str, list[Any]]:
        """``(sql, args)``: rows of the scope's workspaces or keys; no row for
        an empty scope. ``key_col=None``: tables without a key column."""
        parts: list[str] = []
        args: list[Any] = []
        if self.workspaces:
            parts.append(f"{ws_col} IN ({marks(self.workspaces)})")
            args.extend(sorted(self.workspaces))
        if self.keys and key_col is not None:
            parts.append(f"{key_col} IN ({marks(self.keys)})")
            args.extend(sorted(self.keys))
        if not parts:
            return "1 = 0", []  # false in both dialects (PostgreSQL has no integer truth)
        return "(" + " OR ".join(parts) + ")", args

    def has_workspace(self, ws_id: int) -> bool:
        return ws_id in self.workspaces

    def has_key(self, key_id: int, ws_id: int) -> bool:
        return ws_id in self.workspaces or key_id in self.keys


def marks(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)


def conditions(scope: Scope | None, **equal: Any) -> tuple[list[str], list[Any]]:
    """``column = ?`` for each column given a value (None: no condition),
    and the scope's condition: the WHERE parts of a scoped read."""
    where = [f"{col} = ?" for col, v in equal.items() if v is not None]
    args = [v for v in equal.values() if v is not None]
    if scope is not None:
        sql, scope_args = scope.where()
        where.append(sql)
        args.extend(scope_args)
    return where, args
