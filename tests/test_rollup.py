"""Rollups: what the usage writer adds per batch equals what the migration's
SQL computes from the raw rows, and histogram percentiles stay within a bin."""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from pathlib import Path
from typing import Any

import pytest

from gateway.store import analytics, rollup
from gateway.store.columns import COLUMNS
from gateway.store.rows import INSERT, insert_rows
from gateway.store.schema import MIGRATIONS, connect


def synthetic_rows(n: int, seed: int = 7) -> list[tuple[Any, ...]]:
    rng = random.Random(seed)
    t0 = 1_790_000_000.0
    rows = []
    for i in range(n):
        lat = math.exp(rng.gauss(5.5, 1.2))  # ~250 ms median, long tail
        ttfb = None if rng.random() < 0.2 else lat * rng.random()
        status = rng.choice([200] * 30 + [400, 401, 429, 500, 502, 499])
        rec = {
            "ts": t0 + rng.random() * 3 * 86400, "request_id": f"r{i}", "workspace_id": rng.choice([None, 1, 2]),
            "key_id": rng.choice([None, 1, 2, 3]), "endpoint": "/v1/chat/completions",
            "model": rng.choice([None, "a", "b", "c/d"]), "upstream": rng.choice([None, "u1", "u2"]),
            "status": status, "stream": rng.randint(0, 1), "input_tokens": rng.randint(0, 2000),
            "output_tokens": rng.randint(0, 800), "cached_tokens": rng.randint(0, 50), "reasoning_tokens": 0,
            "images": rng.randint(0, 1), "video_tokens": 0, "cost": rng.random() / 100, "latency_ms": lat,
            "ttfb_ms": ttfb, "upstream_ms": lat / 2, "overhead_ms": 0.2, "bytes_in": 100, "bytes_out": 1000,
            "error_type": None if status < 400 else "x", "cache_write_tokens": 0, "cache_write_1h_tokens": 0,
            "response_id": None,
        }
        rows.append(tuple(rec[c] for c in COLUMNS))
    return rows


def snapshot(conn: Any) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for table in ("usage_minute", "usage_hour", "usage_key_totals"):
        rows = conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()
        out[table] = [tuple(round(v, 6) if isinstance(v, float) else v for v in r) for r in rows]
    return out


def test_writer_rollups_equal_sql_backfill(tmp_path: Path) -> None:
    conn = connect(tmp_path / "r.db")
    rows = synthetic_rows(3000)
    # As the writer does, one transaction per batch; sizes that take every
    # path: one row, powers of two, full chunks and a remainder.
    start = 0
    for size in (1, 250, 700, 2049):
        conn.execute("BEGIN")
        insert_rows(conn, rows[start:start + size], writer=5)
        conn.execute("COMMIT")
        start += size
    assert tuple(conn.execute("SELECT COUNT(*), MIN(writer), MAX(writer) FROM usage_events").fetchone()) == (3000, 5, 5)
    stored = [tuple(r) for r in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM usage_events ORDER BY id")]
    assert stored == rows  # every row once, in order, every column as given
    incremental = snapshot(conn)
    assert len(incremental["usage_minute"]) > 1000 and len(incremental["usage_key_totals"]) == 3
    rollup.rebuild(conn)
    assert snapshot(conn) == incremental


def test_migration_backfills_existing_usage(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(MIGRATIONS[0])
    old.execute("PRAGMA user_version = 1")
    rows = synthetic_rows(500, seed=3)
    first = COLUMNS[:23]  # the columns of the first schema
    old.executemany(f"INSERT INTO usage_events ({', '.join(first)}) VALUES ({', '.join('?' * len(first))})",
                    [r[:23] for r in rows])
    old.close()
    conn = connect(path)  # migrates, backfilling the rollups
    total = analytics.usage_series(conn, since=0, until=2e9, bucket="total")
    assert total[0]["requests"] == 500
    assert total[0]["input_tokens"] == sum(r[COLUMNS.index("input_tokens")] for r in rows)
    by_key = analytics.usage_series(conn, since=0, until=2e9, bucket="day", by="key")
    assert sum(r["requests"] for r in by_key) == 500


@pytest.mark.parametrize("q", [0.5, 0.95])
def test_histogram_percentiles_within_a_bin(tmp_path: Path, q: float) -> None:
    conn = connect(tmp_path / "p.db")
    rows = synthetic_rows(5000, seed=11)
    conn.executemany(INSERT, rows)
    rollup.rebuild(conn)
    est = analytics.usage_series(conn, since=0, until=2e9, bucket="total")[0]
    lat = sorted(r[COLUMNS.index("latency_ms")] for r in rows)
    exact = lat[int(q * (len(lat) - 1))]
    got = est[f"p{int(q * 100)}_latency_ms"]
    width = 10 ** (1 / 8)  # one bin
    assert exact / width <= got <= exact * width
    ttfb = sorted(r[COLUMNS.index("ttfb_ms")] for r in rows if r[COLUMNS.index("ttfb_ms")] is not None)
    exact_t = ttfb[int(q * (len(ttfb) - 1))]
    assert exact_t / width <= est[f"p{int(q * 100)}_ttfb_ms"] <= exact_t * width


def test_bins_match_sql_case_at_edges(tmp_path: Path) -> None:
    conn = connect(tmp_path / "e.db")
    values = [0.0, 0.5, *rollup.EDGES, *(e * 0.999999 for e in rollup.EDGES), 1e7]
    case = rollup.bin_case("v")
    for v in values:
        expected = bisect_right(rollup.EDGES, v)  # how many edges are <= v
        assert conn.execute(f"SELECT {case} FROM (SELECT ? AS v)", (v,)).fetchone()[0] == expected, v


def test_admin_bench_runs_small(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "bench" / "admin_queries.py"
    out = subprocess.run(
        [sys.executable, str(script), "--rows", "20000", "--write-batches", "4", "--db", str(tmp_path / "b.db")],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "usage_events 20,000" in out
    assert "day aggregate: hour buckets by model" in out and "µs/row" in out


def test_writer_rollups_read_only_the_batch(tmp_path: Path) -> None:
    """Each batch's rollup statements reach usage_events through the id
    range alone: a plan that walked an index instead would visit every row
    stored so far, on every batch, and the writer would slow down as the
    table grows."""
    conn = connect(tmp_path / "q.db")
    for sql in rollup.SINCE:
        plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, {"since": 0})]
        reads = [step for step in plan if "usage_events" in step]
        assert reads and all(step == "SEARCH usage_events USING INTEGER PRIMARY KEY (rowid>?)" for step in reads), plan


@pytest.mark.parametrize("mixed", [False, True])
def test_metrics_from_a_batch_equal_one_update_per_row(mixed: bool) -> None:
    """Metrics.observe_rows (columns at a time, once per written batch) gives
    the same series as updating every metric once per request."""
    from prometheus_client import Counter as PCounter
    from prometheus_client import Histogram as PHistogram

    from gateway.metrics import Metrics

    def setting(r: tuple[Any, ...], **values: Any) -> tuple[Any, ...]:
        return tuple(values.get(c, v) for c, v in zip(COLUMNS, r, strict=True))

    endpoints = ["/v1/chat/completions", "/v1/messages"] if mixed else ["/v1/chat/completions"]
    errors = [None, "upstream_timeout", "upstream_500", "bad_request"]
    rows = [setting(r, endpoint=endpoints[i % len(endpoints)], error_type=errors[i % 4])
            for i, r in enumerate(synthetic_rows(2000, seed=5))]
    if not mixed:  # the usual batch: one endpoint and one model
        rows = [setting(r, model="a") for r in rows]
    batched, reference = Metrics(), Metrics()
    batched.observe_rows(rows)
    col = {name: i for i, name in enumerate(COLUMNS)}
    for r in rows:
        rec = {name: r[i] for name, i in col.items()}
        model = rec["model"] or ""
        reference.requests.labels(rec["endpoint"], model, str(rec["status"])).inc()
        reference.duration.labels(rec["endpoint"]).observe(rec["latency_ms"] / 1000)
        for hist, name in ((reference.ttfb, "ttfb_ms"), (reference.overhead, "overhead_ms")):
            if rec[name] is not None:
                hist.labels(rec["endpoint"]).observe(rec[name] / 1000)
        if rec["upstream"]:
            reference.upstream_requests.labels(rec["upstream"], str(rec["status"])).inc()
            if rec["error_type"] and rec["error_type"].startswith("upstream"):
                reference.upstream_errors.labels(rec["upstream"], rec["error_type"]).inc()
        if model:
            for kind in ("input", "output", "cached", "reasoning", "video"):
                if rec[f"{kind}_tokens"]:
                    reference.tokens.labels(model, kind).inc(rec[f"{kind}_tokens"])
            if rec["cost"]:
                reference.cost.labels(model).inc(rec["cost"])

    def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for metric in (m.requests, m.duration, m.ttfb, m.overhead, m.upstream_requests, m.upstream_errors,
                       m.tokens, m.cost):
            assert isinstance(metric, (PCounter, PHistogram))
            for family in metric.collect():
                for s in family.samples:
                    if not s.name.endswith("_created"):
                        out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    got, want = samples(batched), samples(reference)
    assert got.keys() == want.keys() and len(got) > 50
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k
