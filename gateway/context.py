"""Per-process state (``Gateway``, under one AppKey) and per-request state
(``RequestContext``, which becomes exactly one usage row)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .affinity import ResponseOrigins
from .auth import KeyCache, KeyInfo
from .bounds import bounded
from .config import Config, ModelConfig
from .errors import Protocol as ErrorShape
from .limits import Limiter
from .metrics import Metrics
from .protocols.base import Usage, UsageReader
from .routing import Router

if TYPE_CHECKING:
    from .store.base import Store
    from .store.dbfile import DatabaseFile
    from .store.usage import UsageWriter
    from .upstream import UpstreamClient


@dataclass(slots=True)
class Gateway:
    """Everything a request handler needs; built by ``create_app``.

    ``config`` and ``router`` are replaced together on reload; a request reads
    them once at its start and keeps its own reference, so a reload never
    changes a request midway.
    """

    config: Config
    router: Router
    keys: KeyCache
    metrics: Metrics
    limits: Limiter
    origins: ResponseOrigins = field(default_factory=lambda: ResponseOrigins(settle_s=0.0))
    writer: UsageWriter | None = None
    db_file: DatabaseFile | None = None  # the SQLite file opened, checked before writes
    store: Store | None = None  # opened by create_app's database context
    session: aiohttp.ClientSession | None = None  # tasks and assets
    upstream: UpstreamClient | None = None  # the pass-through path
    in_flight: int = 0
    # The supervisor of this worker process (None: no supervisor). A config
    # reload made here through the admin API is signalled to it, so every
    # worker, and the workers it starts later, run the same config.
    supervisor_pid: int | None = None
    # Wall-clock time for limit windows, breakers and cool-downs; tests pass
    # their own to move time without sleeping.
    clock: Callable[[], float] = time.time
    # Request ids: a random per-process prefix and a counter, unique without
    # the cost of uuid4 on every request.
    id_prefix: str = field(default_factory=lambda: secrets.token_hex(6))
    requests_seen: int = 0

    def new_request_id(self) -> str:
        self.requests_seen += 1
        return f"{self.id_prefix}{self.requests_seen:010x}"


GATEWAY = web.AppKey("gateway", Gateway)


@dataclass(slots=True)
class RequestContext:
    """What one /v1 request did; turned into its usage row at the end."""

    request_id: str
    t0: float
    ts: float = field(default_factory=time.time)
    endpoint: str = ""
    errors: ErrorShape = ErrorShape.OPENAI
    key: KeyInfo | None = None
    model: str | None = None
    model_cfg: ModelConfig | None = None
    upstream: str | None = None
    status: int = 0
    stream: bool = False
    usage: Usage | None = None
    t_upstream: float | None = None  # request sent upstream (last attempt)
    t_head: float | None = None  # upstream response head received
    ttfb_ms: float | None = None
    overhead_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    error_type: str | None = None
    cost_usd: float = 0.0
    admitted: bool = False  # passed the key's limits; released at the end
    admitted_free: bool = False  # a request that bills nothing, admitted apart (Limiter.admit_free)
    rowless: bool = False  # the door recorded this request's rows itself (a WebSocket's responses)
    rate_headers: list[tuple[str, str]] | None = None  # x-ratelimit-* for the response
    seq: int | None = None  # the usage writer's number for it while in flight (UsageWriter.begin)
    # The relay's usage reader while a body is being relayed: a snapshot of
    # a request in flight (the usage spool's) asks it for the usage so far.
    reader: UsageReader | None = None
    # A streamed chat request (Chat Completions, Messages, Responses) and the
    # SSE events relayed for it: what a stream the client cut before the
    # upstream's usage is billed by (gateway.intake.estimate_cut).
    request_obj: dict[str, Any] | None = None
    events_out: int = 0

    def cost(self, usage: Usage | None = None) -> float:
        u, m = usage or self.usage, self.model_cfg
        if u is None or m is None:
            return 0.0
        total = m.price.cost(u)
        return total * (self.key.ratio if self.key else 1.0)

    def row(self, now: float) -> tuple[object, ...]:
        """The usage row; also sets ``cost_usd``. Text a client or an upstream
        chose (a model name, an upstream's error code) is bounded here, so no
        request can store more than a fixed amount."""
        self.cost_usd = self.cost()
        return self._row(now, self.usage, self.cost_usd)

    def snapshot(self, now: float) -> tuple[object, ...]:
        """The row as far as the request has got (for the usage spool, in
        case its process dies): the usage the relay has seen so far, and
        its cost. Changes nothing in the request."""
        usage = self.usage
        if usage is None and self.reader is not None:
            usage = self.reader.finish()  # readers allow it mid-stream (protocols.base)
        return self._row(now, usage, self.cost(usage))

    def start(self, seq: int) -> tuple[object, ...] | None:
        """Its usage spool start record (gateway.store.spool.START): what a
        ``worker_lost`` row holds that recovery cannot fill in, while the
        request has seen nothing from an upstream (None once it has: its
        line is then a full ``snapshot``)."""
        if self.reader is not None or self.usage is not None or self.t_head is not None:
            return None
        return (seq, *self._who(), int(self.stream), self.bytes_in)

    def progress(self) -> tuple[object, ...]:
        """What changes a snapshot, cheap to compare."""
        return self.status, self.bytes_out, self.upstream, self.model

    def _who(self) -> tuple[object, ...]:
        """The row's first columns: when, which request, whose, what, where to."""
        k = self.key
        return (
            self.ts,
            self.request_id,
            k.workspace_id if k else None,
            k.id if k else None,
            self.endpoint,
            None if self.model is None else bounded(self.model),
            self.upstream,
        )

    def _row(self, now: float, usage: Usage | None, cost: float) -> tuple[object, ...]:
        u = usage or Usage()
        upstream_ms = None
        if self.t_upstream is not None:
            upstream_ms = ((self.t_head or now) - self.t_upstream) * 1000
        return (
            *self._who(),
            self.status,
            int(self.stream),
            u.input_tokens,
            u.output_tokens,
            u.cached_tokens,
            u.reasoning_tokens,
            u.images,
            u.video_tokens,
            cost,
            (now - self.t0) * 1000,
            self.ttfb_ms,
            upstream_ms,
            self.overhead_ms,
            self.bytes_in,
            self.bytes_out,
            None if self.error_type is None else bounded(self.error_type, 64),
            u.cache_write_tokens,
            u.cache_write_1h_tokens,
            u.response_id,
        )


CTX = web.RequestKey("ctx", RequestContext)
