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
from collections.abc import Callable, Sequence
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


def _observe_many(child: Histogram, values: list[float]) -> None:
    """``child.observe(v)`` for every value, with one increment per bucket
    instead of one locked increment (and a linear bucket scan) per value.
    Uses the histogram child's bucket values, which prometheus-client keeps
    for every value class (including multiprocess mode)."""
    bounds = child._upper_bounds
    per_bucket = Tally(bisect_left(bounds, v) for v in values)
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
        self.rate_limited = Counter(
            "gateway_rate_limit_rejections_total", "Requests rejected by a limit", ["reason"], registry=reg
        )

    def observe_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Feed per-request series from a written batch of usage rows."""
        counts: Tally[tuple[str, str, str]] = Tally()
        upstream: Tally[tuple[str, str]] = Tally()
        errors: Tally[tuple[str, str]] = Tally()
        tokens: Tally[tuple[str, str]] = Tally()
        cost: dict[str, float] = {}
        i_ep, i_model, i_up, i_status = _I["endpoint"], _I["model"], _I["upstream"], _I["status"]
        i_lat, i_ttfb, i_ovh, i_err = _I["latency_ms"], _I["ttfb_ms"], _I["overhead_ms"], _I["error_type"]
        seconds: dict[tuple[Histogram, str], list[float]] = {}
        for r in rows:
            ep, model, status = r[i_ep], r[i_model] or "", str(r[i_status])
            counts[(ep, model, status)] += 1
            seconds.setdefault((self.duration, ep), []).append(r[i_lat] / 1000)
            if r[i_ttfb] is not None:
                seconds.setdefault((self.ttfb, ep), []).append(r[i_ttfb] / 1000)
            if r[i_ovh] is not None:
                seconds.setdefault((self.overhead, ep), []).append(r[i_ovh] / 1000)
            if r[i_up]:
                upstream[(r[i_up], status)] += 1
                if r[i_err] and r[i_err].startswith("upstream"):
                    errors[(r[i_up], r[i_err])] += 1
            if model:
                for kind in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "video_tokens"):
                    v = r[_I[kind]]
                    if v:
                        tokens[(model, kind.removesuffix("_tokens"))] += v
                if r[_I["cost"]]:
                    cost[model] = cost.get(model, 0.0) + r[_I["cost"]]
        for (hist, ep), values in seconds.items():
            _observe_many(hist.labels(ep), values)
        for k, n in counts.items():
            self.requests.labels(*k).inc(n)
        for (up, st), n in upstream.items():
            self.upstream_requests.labels(up, st).inc(n)
        for (up, et), n in errors.items():
            self.upstream_errors.labels(up, et).inc(n)
        for (m, kind), n in tokens.items():
            self.tokens.labels(m, kind).inc(n)
        for name, c in cost.items():
            self.cost.labels(name).inc(c)

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
