"""Where a Responses object was made: the usage row that recorded its id
(``usage_events.response_id``) names the workspace, upstream
and model. Read by gateway.affinity when its in-memory map has no entry."""

from __future__ import annotations

import aiosqlite

FIND = (
    "SELECT workspace_id, upstream, model FROM usage_events "
    "WHERE response_id = ? AND status < 400 ORDER BY id DESC LIMIT 1"
)


async def find_origin(db: aiosqlite.Connection, response_id: str) -> tuple[int | None, str | None, str | None] | None:
    """(workspace id, upstream, model) of the request that made ``response_id``."""
    async with db.execute(FIND, (response_id,)) as cur:
        row = await cur.fetchone()
    return None if row is None else (row[0], row[1], row[2])
