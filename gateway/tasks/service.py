"""Video task life cycle, shared by the HTTP handlers and the poller:
create upstream, refresh from upstream, apply what was seen to the row
(billing through the store's compare-and-swap), time out the stuck."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..auth import KeyInfo
from ..config import UpstreamConfig
from ..context import Gateway
from ..errors import BadGateway, Conflict, GatewayError, NotFound, ServiceUnavailable, Unprocessable
from ..routing import Target
from ..store.base import TaskStoreProtocol
from ..store.columns import COLUMNS
from ..store.tasks import CREATING, Owners, TaskRow
from .upstream import retryable, took_nothing
from .video import PROVIDERS, Snapshot, VideoProvider, VideoRequest

log = logging.getLogger("gateway.tasks")

BILLING_ENDPOINT = "video.task.billing"
TIMEOUT_ERROR = {"code": "task_timeout", "message": "The task did not finish in time."}
LOST_ERROR = {"code": "upstream_task_not_found", "message": "The upstream no longer knows this task."}
CREATE_UNKNOWN_ERROR = {
    "code": "upstream_create_unknown",
    "message": "The upstream did not confirm the task; it was not retried, to avoid starting it twice.",
}
# How long an Idempotency-Key keeps naming its task (then it may be reused).
IDEMPOTENCY_TTL_S = 24 * 3600
# After the last route's upstream timeout, how long before the poller takes
# a task still without an upstream id as abandoned by its creator.
CREATE_GRACE_S = 60.0

_T = TypeVar("_T")


def _replayed(held: TaskRow, intent: TaskRow) -> TaskRow:
    """The task a repeated Idempotency-Key names, if the request is the same."""
    if held.request_hash != intent.request_hash:
        raise Unprocessable("This Idempotency-Key was used with a different request body.",
                            code="idempotency_key_reused", param="Idempotency-Key")
    if held.status == CREATING:
        raise Conflict("A request with this Idempotency-Key is still being processed; retry shortly.",
                       code="idempotency_key_in_use", param="Idempotency-Key", headers={"Retry-After": "1"})
    return held


def new_task_id() -> str:
    return "vt_" + secrets.token_hex(12)


def provider_for(up: UpstreamConfig) -> VideoProvider | None:
    return PROVIDERS.get(up.kind)


def account_name(up: UpstreamConfig) -> str:
    """The provider account an upstream belongs to: its ``account``
    setting, else its own name."""
    return up.account or up.name


def endpoint_of(up: UpstreamConfig) -> str:
    """The upstream's base_url in one spelling (scheme and host in lower
    case, the default port left out, no trailing slash), so that two
    entries reaching one provider by one URL compare equal."""
    u = urlsplit(up.base_url)
    scheme = u.scheme.lower()
    host = (u.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = u.port
    if port is not None and port != {"http": 80, "https": 443}.get(scheme):
        host = f"{host}:{port}"
    return f"{scheme}://{host}{u.path.rstrip('/')}"


def owner_key(up: UpstreamConfig) -> tuple[str, str]:
    """(account, endpoint): where an upstream's tasks live, as stored with
    each task."""
    return account_name(up), endpoint_of(up)


def same_account(upstreams: Sequence[UpstreamConfig], up: UpstreamConfig) -> Owners:
    """Every account name and endpoint that may reach the same provider
    account as ``up``: entries that share an ``account`` or a base_url with
    it, and so on transitively (A shares a URL with B, B an account with C:
    all three). Task ownership is looked up over all of them, never by the
    upstream entry's name."""
    accounts, endpoints = {account_name(up)}, {endpoint_of(up)}
    grew = True
    while grew:
        grew = False
        for u in upstreams:
            a, e = owner_key(u)
            if (a in accounts) != (e in endpoints):
                accounts.add(a)
                endpoints.add(e)
                grew = True
    return Owners(tuple(sorted(accounts)), tuple(sorted(endpoints)))


def public_task(t: TaskRow, provider: str) -> dict[str, Any]:
    """The poll answer of the public API (a task being created is queued)."""
    return {
        "id": t.id,
        "object": "video.task",
        "model": t.model,
        "provider": provider,
        "status": "queued" if t.status == CREATING else t.status,
        "video": t.video if t.status == "succeeded" else None,
        "usage": t.usage if t.status == "succeeded" else None,
        "error": t.error if t.status in ("failed", "cancelled") else None,
        "created_at": int(t.created_at),
        "updated_at": int(t.updated_at),
    }


class VideoTasks:
    """Operations on video tasks; every state change goes through the
    store's guarded updates (see gateway.store.tasks)."""

    def __init__(self, gw: Gateway, store: TaskStoreProtocol) -> None:
        self.gw = gw
        self.store = store
        # Creates and recordings running on their own (see create); kept so
        # they are not collected mid-run and close() can wait for them.
        self._jobs: set[asyncio.Task[Any]] = set()

    @property
    def _session(self) -> Any:
        session = self.gw.session
        assert session is not None
        return session

    def upstream(self, name: str) -> UpstreamConfig:
        try:
            return self.gw.config.upstream(name)
        except KeyError:
            raise BadGateway(f"Upstream '{name}' is no longer configured.", code="upstream_gone") from None

    def provider_name(self, t: TaskRow) -> str:
        try:
            return self.gw.config.upstream(t.upstream).kind
        except KeyError:
            return "unknown"

    async def create(
        self, key: KeyInfo, req: VideoRequest, targets: list[Target], idempotency_key: str | None = None
    ) -> tuple[TaskRow, bool]:
        """Record the task, then start it upstream on the first target that
        takes it, then record the upstream's task id (see ``_start``).

        With an ``idempotency_key`` already used in the workspace (within
        IDEMPOTENCY_TTL_S) nothing is started: the task made by that first
        request is returned; 409 while that request is still running, 422 if
        its body differed. The flag is True for such a replay.

        The upstream call and its recording run in a task of their own that
        the client leaving does not cancel: a task started upstream is always
        recorded, polled and billed."""
        now = time.time()
        first = targets[0]
        intent = TaskRow(
            id=new_task_id(), workspace_id=key.workspace_id, key_id=key.id, model=req.model,
            upstream=first.upstream.name, upstream_model=first.route.model, upstream_task_id=None,
            status=CREATING, ratio=key.ratio, created_at=now, updated_at=now,
            # When the poller may conclude the creator is gone: after every
            # route's upstream timeout has passed (and a margin).
            next_poll_at=now + sum(t.upstream.timeout_s for t in targets) + CREATE_GRACE_S,
            idempotency_key=idempotency_key,
            request_hash=hashlib.sha256(req.raw).hexdigest() if idempotency_key is not None else None,
        )
        try:
            held = await self.store.begin(intent, IDEMPOTENCY_TTL_S)
        except sqlite3.Error as e:
            log.error("video task not recorded, so not started: %s", e)
            raise ServiceUnavailable("The task database is unavailable; nothing was started. Retry shortly.",
                                     code="task_store_unavailable", headers={"Retry-After": "1"}) from None
        if held is not None:
            return _replayed(held, intent), True
        job = self._spawn(self._start(intent, req, targets), f"video-task-create-{intent.id}")
        return await asyncio.shield(job), False

    async def _start(self, intent: TaskRow, req: VideoRequest, targets: list[Target]) -> TaskRow:
        """Start the recorded task ``intent`` upstream and record its id.

        A target that certainly did not act (no connection, or an error
        answer: 5xx and 429 move on to the next route) leaves nothing
        upstream: once no target is left the record is deleted. A timeout or
        a dropped connection after the request went out may have started
        the task: it is not tried elsewhere (that could start a second one)
        and the record becomes ``failed`` with ``upstream_create_unknown``."""
        failure: GatewayError | None = None
        for i, target in enumerate(targets):
            up = target.upstream
            provider = provider_for(up)
            assert provider is not None
            try:
                upstream_id = await provider.create(self._session, up, target.route.model, req)
            except GatewayError as e:
                if not took_nothing(e):
                    await self._give_up(intent, up.name, e.code)
                    raise
                if retryable(e) and i < len(targets) - 1:
                    failure = e
                    continue
                await self._quietly(self.store.abandon(intent.id), intent)
                raise
            except Exception as e:
                await self._give_up(intent, up.name, type(e).__name__)
                raise
            t = replace(
                intent, upstream=up.name, upstream_model=target.route.model, upstream_task_id=upstream_id,
                status="queued", account=account_name(up), endpoint=endpoint_of(up),
                next_poll_at=time.time() + self.gw.config.tasks.poll_interval_s,
            )
            await self._record(t)
            return t
        assert failure is not None
        raise failure

    async def _record(self, t: TaskRow) -> None:
        """Store the upstream id of a started task. While the database
        refuses (locked, gone), keep trying in the background: the client
        gets its task now, the poller finds it once it is written."""
        try:
            await self.store.record_created(t, time.time())
        except sqlite3.IntegrityError:
            # The upstream gave an id its account already has a row for:
            # that row is polled and billed; this record is not.
            log.error("video task %s: upstream %s answered with task id %s, which is recorded already",
                      t.id, t.upstream, t.upstream_task_id)
            await self._give_up(t, t.upstream, "upstream_duplicate_task")
        except sqlite3.Error as e:
            log.warning("video task %s: started on upstream %s as %s but not recorded yet (%s); retrying",
                        t.id, t.upstream, t.upstream_task_id, e)
            self._spawn(self._record_until_done(t), f"video-task-record-{t.id}")

    async def _record_until_done(self, t: TaskRow) -> None:
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                await self.store.record_created(t, time.time())
            except asyncio.CancelledError:
                log.error("video task %s: started on upstream %s as %s and never recorded (the gateway stopped)",
                          t.id, t.upstream, t.upstream_task_id)
                raise
            except sqlite3.Error as e:
                delay = min(delay * 2, 5.0)
                log.warning("video task %s: still not recorded (%s); retrying", t.id, e)
                continue
            log.info("video task %s: upstream task recorded", t.id)
            return

    async def _give_up(self, t: TaskRow, upstream: str, reason: str | None) -> None:
        log.error("video task %s: upstream %s may have started it (%s); recorded as failed, not billed",
                  t.id, upstream, reason)
        await self._quietly(self.store.give_up_creating(t.id, upstream, CREATE_UNKNOWN_ERROR, time.time()), t)

    async def _quietly(self, write: Awaitable[Any], t: TaskRow) -> None:
        """A clean-up write after a failed create: if the database refuses
        it too, the poller finds the ``creating`` row later (give_up_stale)."""
        try:
            await write
        except sqlite3.Error as e:
            log.warning("video task %s: clean-up write failed (%s); the poller will settle it", t.id, e)

    def _spawn(self, coro: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        job = asyncio.create_task(coro, name=name)
        self._jobs.add(job)
        job.add_done_callback(self._job_done)
        return job

    def _job_done(self, job: asyncio.Task[Any]) -> None:
        self._jobs.discard(job)
        if not job.cancelled():
            job.exception()  # retrieved: the client that awaited it (if any) got it

    async def give_up_stale(self, t: TaskRow) -> None:
        """The poller's due ``creating`` task: its creator is gone (killed,
        stopped) without recording an upstream id."""
        await self._give_up(t, t.upstream, "the creating process is gone")

    async def close(self, timeout: float) -> None:
        """Let creates and recordings in progress finish (up to ``timeout``
        seconds), then cancel the rest."""
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=timeout)
        for job in list(self._jobs):
            job.cancel()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)

    async def refresh(self, t: TaskRow) -> TaskRow:
        """Ask the task's upstream for its state and apply it (a task
        without an upstream id yet is returned as it is)."""
        if t.upstream_task_id is None:
            return t
        up = self.upstream(t.upstream)
        provider = provider_for(up)
        if provider is None:
            raise BadGateway(f"Upstream '{up.name}' does not run video tasks.", code="upstream_gone")
        try:
            snap = await provider.get(self._session, up, t.upstream_task_id)
        except NotFound:
            # The upstream forgot the task (Ark drops old ones): it can
            # never finish now, so it fails rather than being polled forever.
            snap = Snapshot("failed", error=LOST_ERROR)
        return await self.apply(t, snap)

    async def apply(self, t: TaskRow, snap: Snapshot) -> TaskRow:
        """Store what the upstream said; returns the row as stored, which is
        the winner's view if another poller got there first."""
        now = time.time()
        cfg = self.gw.config.tasks
        if snap.status == "succeeded":
            usage = snap.usage or {"video_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            row = self.billing_row(t, usage, now)
            if await self.store.succeed(t, snap.video or {}, usage, now, row):
                self.gw.metrics.observe_billing(t.model, row[COLUMNS.index("video_tokens")], row[COLUMNS.index("cost")])
                log.info("video task %s succeeded and was billed", t.id)
        elif snap.status in ("failed", "cancelled"):
            await self.store.finish(t, snap.status, snap.error, now)
        elif now - t.created_at > cfg.timeout_s:
            await self.store.finish(t, "failed", TIMEOUT_ERROR, now)
        else:
            await self.store.progress(t, snap.status, now + self.backoff(t.attempts), now)
        stored = await self.store.get(t.id)
        assert stored is not None
        return stored

    async def retry_later(self, t: TaskRow) -> None:
        """After a failed poll: back off, or give up once the task is too old."""
        now = time.time()
        if now - t.created_at > self.gw.config.tasks.timeout_s:
            await self.store.finish(t, "failed", TIMEOUT_ERROR, now)
        else:
            await self.store.reschedule(t, now + self.backoff(t.attempts))

    def backoff(self, attempts: int) -> float:
        cfg = self.gw.config.tasks
        return float(min(cfg.poll_interval_s * 1.5 ** min(attempts, 30), cfg.max_backoff_s))

    def billing_row(self, t: TaskRow, usage: dict[str, Any], now: float) -> tuple[Any, ...]:
        """The usage row that bills a task: video tokens at the model's
        ``video`` price (USD per 1M) times the creating key's group ratio."""
        tokens = int(usage.get("video_tokens") or 0)
        m = self.gw.config.model(t.model)
        cost = tokens * (m.price.video if m else 0.0) / 1e6 * t.ratio
        values: dict[str, Any] = {
            "ts": now, "request_id": t.id, "workspace_id": t.workspace_id, "key_id": t.key_id,
            "endpoint": BILLING_ENDPOINT, "model": t.model, "upstream": t.upstream, "status": 200, "stream": 0,
            "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0, "reasoning_tokens": 0, "images": 0,
            "video_tokens": tokens, "cost": cost, "latency_ms": 0.0, "ttfb_ms": None, "upstream_ms": None,
            "overhead_ms": None, "bytes_in": 0, "bytes_out": 0, "error_type": None,
            "cache_write_tokens": 0, "cache_write_1h_tokens": 0, "response_id": None,
        }
        return tuple(values[c] for c in COLUMNS)
