"""Video task life cycle, shared by the HTTP handlers and the poller:
create upstream, refresh from upstream, apply what was seen to the row
(billing through the store's compare-and-swap), time out the stuck."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from ..auth import KeyInfo
from ..config import UpstreamConfig
from ..context import Gateway
from ..errors import BadGateway, GatewayError, NotFound
from ..routing import Target
from ..store.columns import COLUMNS
from ..store.tasks import Owners, TaskRow, TaskStore
from .upstream import retryable
from .video import PROVIDERS, Snapshot, VideoProvider, VideoRequest

log = logging.getLogger("gateway.tasks")

BILLING_ENDPOINT = "video.task.billing"
TIMEOUT_ERROR = {"code": "task_timeout", "message": "The task did not finish in time."}
LOST_ERROR = {"code": "upstream_task_not_found", "message": "The upstream no longer knows this task."}


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
    """The poll answer of the public API."""
    return {
        "id": t.id,
        "object": "video.task",
        "model": t.model,
        "provider": provider,
        "status": t.status,
        "video": t.video if t.status == "succeeded" else None,
        "usage": t.usage if t.status == "succeeded" else None,
        "error": t.error if t.status in ("failed", "cancelled") else None,
        "created_at": int(t.created_at),
        "updated_at": int(t.updated_at),
    }


class VideoTasks:
    """Operations on video tasks; every state change goes through the
    store's guarded updates (see gateway.store.tasks)."""

    def __init__(self, gw: Gateway, store: TaskStore) -> None:
        self.gw = gw
        self.store = store

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

    async def create(self, key: KeyInfo, req: VideoRequest, targets: list[Target]) -> tuple[TaskRow, Target]:
        """Start the task on the first target that takes it (5xx, 429 and
        transport errors move on to the next) and store it as queued."""
        failure: GatewayError | None = None
        for i, target in enumerate(targets):
            up = target.upstream
            provider = provider_for(up)
            assert provider is not None
            try:
                upstream_id = await provider.create(self._session, up, target.route.model, req)
            except GatewayError as e:
                if retryable(e) and i < len(targets) - 1:
                    failure = e
                    continue
                raise
            now = time.time()
            t = TaskRow(
                id=new_task_id(), workspace_id=key.workspace_id, key_id=key.id, model=req.model,
                upstream=up.name, upstream_model=target.route.model, upstream_task_id=upstream_id,
                status="queued", ratio=key.ratio, created_at=now, updated_at=now,
                next_poll_at=now + self.gw.config.tasks.poll_interval_s, account=account_name(up),
                endpoint=endpoint_of(up),
            )
            await self.store.insert(t)
            return t, target
        assert failure is not None
        raise failure

    async def refresh(self, t: TaskRow) -> TaskRow:
        """Ask the task's upstream for its state and apply it."""
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
            "cache_write_tokens": 0, "cache_write_1h_tokens": 0,
        }
        return tuple(values[c] for c in COLUMNS)
