"""Response-id affinity: which upstream made each Responses object, for
which workspace, so that follow-ups reach the upstream account holding it:
``previous_response_id``, ``GET``/``DELETE /v1/responses/{id}``,
``.../input_items`` and ``.../cancel``.

Written: a request whose answer carries a response id (read from the head
of the answer by gateway.protocols.responses) stores it in its own usage
row (``usage_events.response_id``, beside the row's workspace, upstream and
model), through the usage writer and its spool like any row, and in this
process's map. Nothing extra is written on the request path.

Read: the map first, so a conversation served by one worker never awaits
the database. A miss (another worker made it, this one restarted, or the
map let it go: it keeps the latest ``MAX_ENTRIES``) reads the usage table
by its partial index; the maker's writer commits rows every
``usage.flush_interval_ms``, so an id not there yet is looked for again
every two flush intervals until two flush intervals and half a second
have passed (at most a second: the maker's batch must also commit, tens of
ms on a busy PostgreSQL) before it is called unknown. Another workspace's
id is unknown too: it is never routed, so a key cannot reach a
conversation of another tenant that shares the upstream account.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

from .store.base import Store

MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a response was made."""

    workspace_id: int
    upstream: str
    model: str | None


class ResponseOrigins:
    """The in-memory map in front of the usage table (see the module docstring)."""

    def __init__(self, settle_s: float, max_entries: int = MAX_ENTRIES, retry_s: float | None = None) -> None:
        self._map: OrderedDict[str, Origin] = OrderedDict()
        self._max = max_entries
        self.settle_s = settle_s  # how long a just-made id may take to reach the table
        self.retry_s = settle_s if retry_s is None else retry_s  # how often it is looked for meanwhile
        self.store: Store | None = None  # set once the database is open

    def __len__(self) -> int:
        return len(self._map)

    def remember(self, response_id: str, workspace_id: int, upstream: str, model: str | None) -> None:
        m = self._map
        m[response_id] = Origin(workspace_id, upstream, model)
        m.move_to_end(response_id)
        if len(m) > self._max:
            m.popitem(last=False)

    async def find(self, response_id: str, workspace_id: int) -> Origin | None:
        """Where ``response_id`` was made, if this workspace made it."""
        origin = self._map.get(response_id)
        if origin is None:
            origin = await self._load(response_id)
            deadline = time.monotonic() + self.settle_s
            while origin is None and (left := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(self.retry_s, left))
                origin = await self._load(response_id)
            if origin is None:
                return None
        if origin.workspace_id != workspace_id:
            return None
        return origin

    async def _load(self, response_id: str) -> Origin | None:
        if self.store is None:
            return None
        row = await self.store.find_origin(response_id)
        if row is None or row[0] is None or row[1] is None:
            return None
        origin = Origin(row[0], row[1], row[2])
        self.remember(response_id, origin.workspace_id, origin.upstream, origin.model)
        return origin
