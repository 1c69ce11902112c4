"""The background poller: refreshes unfinished video tasks so that every
task is finished and billed even if no client ever polls it.

Each cycle takes the tasks whose ``next_poll_at`` has come, claims each one
(moving its next poll time a lease ahead, so a poller in another process
skips it) and refreshes up to ``tasks.max_concurrency`` at once. A failed
poll backs off; an error in one task never stops the others, and an error
in a whole cycle is logged and the next cycle runs. All state is in the
database, so a crash or restart loses nothing: a claimed task whose poller
died is due again when its lease runs out.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..errors import GatewayError
from ..store.tasks import TaskRow
from .service import VideoTasks

log = logging.getLogger("gateway.tasks.poller")


class Poller:
    """One per process (see create_app's ``poller`` switch)."""

    def __init__(self, tasks: VideoTasks) -> None:
        self.tasks = tasks
        self.cycles = 0

    async def run(self) -> None:
        while True:
            try:
                await self.cycle()
            except Exception:
                log.exception("video task poll cycle failed; retrying next cycle")
            await asyncio.sleep(self.tasks.gw.config.tasks.poll_interval_s)

    async def cycle(self) -> int:
        """One pass over the due tasks; returns how many were polled."""
        cfg = self.tasks.gw.config.tasks
        now = time.time()
        store = self.tasks.store
        # Claimed before polled: on PostgreSQL with FOR UPDATE SKIP LOCKED,
        # so instances polling at once get disjoint tasks.
        due = await store.claim_due(now, cfg.max_concurrency * 8, now + cfg.max_backoff_s)
        gate = asyncio.Semaphore(cfg.max_concurrency)

        async def one(t: TaskRow) -> int:
            async with gate:
                try:
                    if t.upstream_task_id is None:
                        await self.tasks.give_up_stale(t)  # its creator is gone
                    else:
                        await self.tasks.refresh(t)
                except GatewayError as e:
                    log.warning("video task %s poll failed: %s", t.id, e.code)
                    await self.tasks.retry_later(t)
                except Exception:
                    log.exception("video task %s poll failed", t.id)
                    await self.tasks.retry_later(t)
                return 1

        results = await asyncio.gather(*(one(t) for t in due), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.error("video task poll bookkeeping failed: %s", type(r).__name__)
        polled = sum(r for r in results if isinstance(r, int))
        self.cycles += 1
        return polled
