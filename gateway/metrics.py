"""Prometheus metrics (prefix ``gateway_``) and the /metrics handler.

Per-request series are fed from usage rows by the usage writer after each
batch, so the request path pays nothing for them. Labels are bounded: model
names come from the config, never from the client, and there are no per-key
labels.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .store.columns import COLUMNS

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

_I = {name: i for i, name in enumerate(COLUMNS)}
_TOKEN_KINDS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "video_tokens",
                "cache_write_tokens")


def _groups(col: Sequence[Any]) -> Mapping[Any, list[int] | None]:
    """Row indices by value, or None for "every row" when all are equal
    (the usual batch: one endpoint, one model)."""
    if col.count(col[0]) == len(col):
        return {col[0]: None}
    out: dict[Any, list[int]] = {}
    for i, v in enumerate(col):
        out.setdefault(v, []).append(i)
    return out


def _pick(col: Sequence[Any], idx: list[int] | None) -> Sequence[Any]:
    return col if idx is None else [col[i] for i in idx]


def _observe_many(child: Histogram, values: list[float]) -> None:
    """``child.observe(v)`` for every value, with one increment per bucket
    instead of one locked increment (and a linear bucket scan) per value.
    Uses the histogram child's bucket values, which prometheus-client keeps
    for every value class (including multiprocess mode)."""
    bounds = child._upper_bounds
    per_bucket = Tally(map(bisect_left, repeat(bounds), values))
    for i, n in per_bucket.items():
        child._buckets[i].inc(n)
    child._sum.inc(sum(values))


class Metrics:
    """All metric objects of one gateway process, in their own registry."""

    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self.multiprocess else self.registry
        self.requests = Counter(
            "gateway_requests_total", "Requests by endpoint, model and status", ["endpoint", "model", "status"],
            registry=reg,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Total request duration", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds", "Time to the first response byte", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds", "Time spent in the gateway itself, upstream excluded", ["endpoint"],
            buckets=_OVERHEAD_BUCKETS, registry=reg,
        )
        self.tokens = Counter("gateway_tokens_total", "Tokens by model and kind", ["model", "kind"], registry=reg)
        self.cost = Counter("gateway_cost_usd_total", "Cost in USD by model", ["model"], registry=reg)
        self.upstream_requests = Counter(
            "gateway_upstream_requests_total", "Requests sent upstream, by upstream and status",
            ["upstream", "status"], registry=reg,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total", "Failed upstream requests by upstream and error type",
            ["upstream", "type"], registry=reg,
        )
        self.circuit_state = Gauge(
            "gateway_circuit_state", "Circuit breaker state per upstream (0 closed, 1 half-open, 2 open)",
            ["upstream"], registry=reg, multiprocess_mode="max",
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being handled", registry=reg, multiprocess_mode="livesum"
        )
        self.queue_depth = Gauge(
            "gateway_usage_queue_depth", "Usage events waiting to be written", registry=reg,
            multiprocess_mode="livesum",
        )
        self.flush_seconds = Histogram(
            "gateway_usage_flush_seconds", "Time to write one usage batch", buckets=(*_OVERHEAD_BUCKETS, 0.25, 1, 5),
            registry=reg,
        )
        self.events_written = Counter("gateway_usage_events_written_total", "Usage events written", registry=reg)
        self.backpressure = Counter(
            "gateway_usage_backpressure_waits_total", "Requests that waited for room in the usage queue",
            registry=reg,
        )
        self.client_timeouts = Counter(
            "gateway_client_timeouts_total",
            "Slow or idle clients cut off, by phase: header (no whole request head in server.header_timeout_s), "
            "idle (kept-alive connection unused for server.keepalive_timeout_s), body (408)",
            ["phase"], registry=reg,
        )
        self.bad_http = Counter(
            "gateway_bad_http_requests_total", "Requests refused as malformed HTTP before reaching the gateway",
            ["reason"], registry=reg,
        )
        self.rate_limited = Counter(
            "gateway_rate_limit_rejections_total", "Requests rejected by a limit", ["reason"], registry=reg
        )
        self.key_lookups = Counter(
            "gateway_key_lookups_total",
            "Database lookups of keys missing from the cache, by result (found, unknown, throttled: refused "
            "without a lookup, failed)", ["result"], registry=reg,
        )
        self.redis_errors = Counter(
            "gateway_redis_errors_total", "Failed Redis calls of the shared limits, by operation", ["op"],
            registry=reg,
        )
        self.redis_up = Gauge(
            "gateway_redis_up", "1 while the shared limits' Redis answers (0: local limits or refusal)",
            registry=reg, multiprocess_mode="liveall",
        )

    def observe_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Feed per-request series from a written batch of usage rows.

        Runs on the event loop once per batch, so it works column by column
        (C-level counting and sums, one metric update per label set) rather
        than row by row: a 1,000-row batch takes well under a millisecond."""
        if not rows:
            return
        cols = list(zip(*rows, strict=True))
        ep, model, up, status = cols[_I["endpoint"]], cols[_I["model"]], cols[_I["upstream"]], cols[_I["status"]]
        for (e, m, st), n in Tally(zip(ep, model, status, strict=True)).items():
            self.requests.labels(e, m or "", str(st)).inc(n)
        lat, ttfb, ovh = cols[_I["latency_ms"]], cols[_I["ttfb_ms"]], cols[_I["overhead_ms"]]
        for e, idx in _groups(ep).items():
            for hist, col in ((self.duration, lat), (self.ttfb, ttfb), (self.overhead, ovh)):
                seconds = [v / 1000 for v in _pick(col, idx) if v is not None]
                if seconds:
                    _observe_many(hist.labels(e), seconds)
        for (u, st), n in Tally(zip(up, status, strict=True)).items():
            if u:
                self.upstream_requests.labels(u, str(st)).inc(n)
        for (u, et), n in Tally(zip(up, cols[_I["error_type"]], strict=True)).items():
            if u and et and et.startswith("upstream"):
                self.upstream_errors.labels(u, et).inc(n)
        for m, idx in _groups(model).items():
            if not m:
                continue
            for kind in _TOKEN_KINDS:
                total = sum(_pick(cols[_I[kind]], idx))
                if total:
                    self.tokens.labels(m, kind.removesuffix("_tokens")).inc(total)
            cost = sum(_pick(cols[_I["cost"]], idx))
            if cost:
                self.cost.labels(m).inc(cost)

    def observe_billing(self, model: str, video_tokens: int, cost: float) -> None:
        """A video task billed (not a request: only its tokens and cost)."""
        if video_tokens:
            self.tokens.labels(model, "video").inc(video_tokens)
        if cost:
            self.cost.labels(model).inc(cost)

    def observe_flush(self, n: int, seconds: float) -> None:
        self.events_written.inc(n)
        self.flush_seconds.observe(seconds)

    def handler(self, refresh: Callable[[], None]) -> Callable[[web.Request], Any]:
        async def metrics(request: web.Request) -> web.Response:
            refresh()
            if self.multiprocess:
                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
                body = generate_latest(registry)
            else:
                body = generate_latest(self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        return metrics
