"""Admin queries at scale: fill a temporary SQLite database with N synthetic
usage rows (default 10 million, all inside the last ``--days`` days, default
1: the day aggregate then covers every row), build the rollups, and time what
the console asks for: a day's aggregate and pages of the request log. Then
measure what the rollups cost the usage writer per row.

    python bench/admin_queries.py                 # 10M rows, ~3-5 minutes
    python bench/admin_queries.py --rows 200000   # quick look

Nothing here talks to the network; the database is deleted at the end
unless --keep is given.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.store import analytics, queries, rollup
from gateway.store.columns import COLUMNS
from gateway.store.rows import INSERT, insert_rows
from gateway.store.schema import MIGRATIONS, connect

COLUMNS_V1 = COLUMNS[:23]
INSERT_V1 = f"INSERT INTO usage_events ({', '.join(COLUMNS_V1)}) VALUES ({', '.join('?' * 23)})"
MODELS = ("gpt-5.5", "gpt-5-mini", "claude-sonnet", "claude-haiku", "gemini-pro", "seedance", "gpt-image", "o4")
UPSTREAMS = ("openai", "anthropic", "ark")
WORKSPACES, KEYS = 20, 200
EVENT_INDEXES = ("usage_ts", "usage_ws_ts", "usage_key_ts", "usage_model_ts", "usage_status_ts")


def fill(conn: sqlite3.Connection, rows: int, days: float, now: float, chunk: int = 1_000_000) -> None:
    """INSERT ... SELECT from a recursive CTE, a million rows per transaction,
    with the event indexes dropped during the load and rebuilt after."""
    ws = [queries.create_workspace(conn, f"ws{i}")["id"] for i in range(WORKSPACES)]
    for k in range(KEYS):
        queries.create_key(conn, ws[k % WORKSPACES], name=f"key{k}")
    index_sql = [r[0] for r in conn.execute(
        f"SELECT sql FROM sqlite_master WHERE type = 'index' AND name IN ({','.join('?' * len(EVENT_INDEXES))})",
        EVENT_INDEXES)]
    for name in EVENT_INDEXES:
        conn.execute(f"DROP INDEX {name}")
    span = days * 86400
    start = now - span
    model_case = "CASE r % 8 " + " ".join(f"WHEN {i} THEN '{m}'" for i, m in enumerate(MODELS)) + " END"
    up_case = "CASE r % 8 WHEN 0 THEN 'openai' WHEN 1 THEN 'openai' WHEN 2 THEN 'anthropic' " \
              "WHEN 3 THEN 'anthropic' WHEN 5 THEN 'ark' ELSE 'openai' END"
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        conn.execute("BEGIN")
        conn.execute(f"""
            WITH RECURSIVE seq(i) AS (SELECT {done} UNION ALL SELECT i + 1 FROM seq WHERE i < {done + n - 1}),
            g AS (SELECT i, abs(random()) AS r, abs(random()) AS r2 FROM seq)
            INSERT INTO usage_events ({', '.join(COLUMNS)})
            SELECT {start} + i * {span / rows}, 'req-' || i, (i * 7919 % {KEYS}) % {WORKSPACES} + 1,
                   i * 7919 % {KEYS} + 1, '/v1/chat/completions', {model_case}, {up_case},
                   CASE WHEN r2 % 100 = 0 THEN 500 WHEN r2 % 100 = 1 THEN 429 WHEN r2 % 200 = 3 THEN 400 ELSE 200 END,
                   r2 % 2, r % 4000, r2 % 1000, r % 500, 0, 0, 0, (r % 4000) * 1.25e-6 + (r2 % 1000) * 1e-5,
                   20 + (r % 1000) * (r2 % 1000) / 50.0, 5 + (r % 1000) * (r2 % 1000) / 400.0,
                   18 + (r % 1000) * (r2 % 1000) / 50.0, 0.15, 800, 4000, NULL, 0, 0, NULL
            FROM g""")
        conn.execute("COMMIT")
        done += n
        print(f"  {done:>11,} rows", flush=True)
    for sql in index_sql:
        conn.execute(sql)


def timed(fn: Callable[[], Any], runs: int = 5) -> tuple[float, Any]:
    """Best and median wall time in ms; returns the median and the last result."""
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), result


def write_cost(batches: int = 200, batch: int = 500) -> list[tuple[str, float]]:
    """Usage writer cost per row on a fresh file: raw insert on the original
    schema, with the new indexes, and with indexes and rollups."""
    rng = random.Random(1)
    now = time.time()
    rows = [
        (now + i * 0.01, f"r{i}", 1 + i % 20, 1 + i % 200, "/v1/chat/completions", MODELS[i % 8],
         UPSTREAMS[i % 3], 200 if i % 50 else 500, i % 2, rng.randint(0, 4000), rng.randint(0, 1000), 0, 0, 0, 0,
         0.001, rng.uniform(20, 5000), rng.uniform(5, 800), 100.0, 0.2, 800, 4000, None, 0, 0, None)
        for i in range(batches * batch)
    ]
    out = []
    with tempfile.TemporaryDirectory() as d:
        for label, schema_v, with_rollup in (("original schema, raw insert", 1, False),
                                             ("+ 2 request-log indexes", 2, False),
                                             ("+ indexes + rollups", 2, True)):
            path = Path(d) / f"w{schema_v}{with_rollup}.db"
            if schema_v == 1:
                c = sqlite3.connect(path, isolation_level=None)
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=NORMAL")
                c.executescript(MIGRATIONS[0])
            else:
                c = connect(path)
            t0 = time.perf_counter()
            for i in range(0, len(rows), batch):
                b = rows[i:i + batch]
                c.execute("BEGIN IMMEDIATE")
                if with_rollup:
                    insert_rows(c, b)  # what the usage writer runs per batch
                elif schema_v == 1:  # the first schema's columns
                    c.executemany(INSERT_V1, [r[:len(COLUMNS_V1)] for r in b])
                else:
                    c.executemany(INSERT, b)
                c.execute("COMMIT")
            out.append((label, (time.perf_counter() - t0) / len(rows) * 1e6))
            c.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--days", type=float, default=1.0)
    p.add_argument("--db", help="database file (default: a temporary file; an existing one is reused)")
    p.add_argument("--keep", action="store_true", help="keep the database")
    p.add_argument("--write-batches", type=int, default=200, help="batches of 500 rows for the write-cost test")
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory()
    path = Path(args.db) if args.db else Path(tmp.name) / "bench.db"
    conn = connect(path)
    now = time.time()
    existing = conn.execute("SELECT MAX(ts) FROM usage_events").fetchone()[0]
    if existing is not None:
        # --db of an earlier --keep run: time the queries only.
        now = existing + 1
        t_fill = t_rollup = 0.0
        print(f"reusing {path}")
    else:
        print(f"filling {path} with {args.rows:,} usage rows over {args.days:g} day(s)")
        t0 = time.perf_counter()
        fill(conn, args.rows, args.days, now)
        t_fill = time.perf_counter() - t0
        t0 = time.perf_counter()
        rollup.rebuild(conn)
        t_rollup = time.perf_counter() - t0
        conn.execute("ANALYZE")
    sizes = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
             for t in ("usage_events", "usage_minute", "usage_hour")}
    print(f"fill {t_fill:.1f} s, rollup rebuild {t_rollup:.1f} s, file {path.stat().st_size / 2**30:.2f} GiB, "
          f"rows: " + ", ".join(f"{t} {n:,}" for t, n in sizes.items()))

    day = dict(since=now - 86400, until=now + 1)
    mid_ts = now - 43200
    middle = conn.execute("SELECT id, ts FROM usage_events WHERE ts <= ? ORDER BY ts DESC LIMIT 1",
                          (mid_ts,)).fetchone()
    cursor = analytics.encode_cursor(middle["ts"], middle["id"])
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("day aggregate: hour buckets by model", lambda: analytics.usage_series(conn, **day, bucket="hour",
                                                                                 by="model")),
        ("day aggregate: minute buckets, all models", lambda: analytics.usage_series(conn, **day, bucket="minute")),
        ("day aggregate: minute buckets by model", lambda: analytics.usage_series(conn, **day, bucket="minute",
                                                                                   by="model")),
        ("day aggregate: total by key", lambda: analytics.usage_series(conn, **day, bucket="total", by="key")),
        ("day aggregate: hour buckets, one workspace", lambda: analytics.usage_series(conn, **day, bucket="hour",
                                                                                       workspace_id=3)),
        ("day aggregate: hour buckets by upstream", lambda: analytics.usage_series(conn, **day, bucket="hour",
                                                                                    by="upstream")),
        ("request log: first page (50)", lambda: analytics.request_log(conn, **day)),
        ("request log: page at mid-day (cursor)", lambda: analytics.request_log(conn, **day, cursor=cursor)),
        ("request log: model filter", lambda: analytics.request_log(conn, **day, model="claude-haiku")),
        ("request log: status 5xx", lambda: analytics.request_log(conn, **day, status="5xx")),
        ("request log: status 500, mid-day cursor", lambda: analytics.request_log(conn, **day, status="500",
                                                                                   cursor=cursor)),
        ("request log: one key", lambda: analytics.request_log(conn, **day, key_id=17)),
        ("request log: one workspace + model", lambda: analytics.request_log(conn, **day, workspace_id=5,
                                                                              model="gpt-5.5")),
        ("key list with usage totals", lambda: queries.key_usage_totals(conn)),
    ]
    print(f"\n{'query':<46} {'median ms':>10} {'rows':>7}")
    for name, fn in cases:
        ms, res = timed(fn)
        n = len(res["items"]) if isinstance(res, dict) and "items" in res else len(res)
        print(f"{name:<46} {ms:>10.1f} {n:>7}")
    ms, _ = timed(lambda: conn.execute(
        "SELECT model, COUNT(*), SUM(input_tokens), SUM(cost) FROM usage_events WHERE ts >= ? GROUP BY model",
        (now - 86400,)).fetchall(), runs=1)
    print(f"{'(for comparison) same day, raw table scan':<46} {ms:>10.1f}")

    plan = conn.execute("EXPLAIN QUERY PLAN SELECT id FROM usage_events WHERE ts >= ? AND ts < ? AND model = ? "
                        "ORDER BY ts DESC, id DESC LIMIT 51", (0, 1, "x")).fetchall()
    print("\nrequest-log plan (model filter):", "; ".join(r[3] for r in plan))

    print(f"\nusage writer cost per row (batches of 500, {args.write_batches * 500:,} rows):")
    for label, us in write_cost(args.write_batches):
        print(f"  {label:<36} {us:6.1f} µs/row")
    conn.close()
    if args.keep:
        print(f"kept {path}")
    else:
        tmp.cleanup()


if __name__ == "__main__":
    main()
