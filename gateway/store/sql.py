"""SQL shared by both dialects is written with SQLite's ``?`` placeholders;
``numbered`` spells it for PostgreSQL."""

from __future__ import annotations


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (the shared SQL
    never holds a literal question mark)."""
    parts = sql.split("?")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))
