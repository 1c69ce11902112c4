"""Usage rollups: pre-aggregated usage so the admin API answers a day's
aggregate in milliseconds whatever the size of ``usage_events``.

Three tables, kept up to date in SQL in the same transaction as the raw rows
(``add_since``, after each usage batch and each video billing row), and
backfilled from existing rows by the migration:

- ``usage_minute``: per minute, model and upstream. Serves every time series
  by model or upstream (and totals) at minute, hour or day buckets.
- ``usage_hour``: per hour, workspace, key, model and upstream. Serves series
  by key or workspace, and any series filtered by them, at hour or day buckets.
- ``usage_key_totals``: lifetime totals and last use per key.

Latency and time-to-first-byte percentiles cannot be summed, so each rollup
row carries a histogram: 50 log-spaced bins (8 per decade, 1 ms to 1000 s,
plus an underflow and an overflow bin), stored as columns ``l00..l49`` and
``t00..t49``. Bins add up across rows; p50/p95 are read from the merged bins
with geometric interpolation inside the bin, so they are estimates within
the bin's width (about 33 %), exact enough for a dashboard.

Rollup keys never hold NULL (SQLite's UNIQUE treats NULLs as distinct, which
would break the upsert): a missing model or upstream is '' and a missing
workspace or key is 0; ``queries`` maps them back to None.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

# Frozen: the migration below embeds these edges; changing them needs a new
# migration that rebuilds the rollups.
EDGES: tuple[float, ...] = tuple(10 ** (k / 8) for k in range(49))  # 1 ms .. 1e6 ms
NBINS = len(EDGES) + 1
LAT_COLS = tuple(f"l{i:02d}" for i in range(NBINS))
TTFB_COLS = tuple(f"t{i:02d}" for i in range(NBINS))

# Summed metrics, in the order ``_Acc`` keeps them.
SUMS = (
    "requests", "client_errors", "server_errors", "input_tokens", "output_tokens", "cached_tokens",
    "reasoning_tokens", "images", "video_tokens", "cost", "latency_sum", "ttfb_sum", "ttfb_count",
)
VALUE_COLS = (*SUMS, *LAT_COLS, *TTFB_COLS)

MINUTE_KEYS = ("bucket", "model", "upstream")
HOUR_KEYS = ("bucket", "workspace_id", "key_id", "model", "upstream")


def bin_bounds(i: int) -> tuple[float, float]:
    lo = 0.0 if i == 0 else EDGES[i - 1]
    hi = EDGES[i] if i < len(EDGES) else EDGES[-1] * 10
    return lo, hi


def percentile(bins: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram, interpolated inside its bin."""
    n = sum(bins)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    for i, c in enumerate(bins):
        if c and seen + c >= rank:
            lo, hi = bin_bounds(i)
            frac = (rank - seen) / c
            if lo <= 0:
                return hi * frac
            return float(lo * (hi / lo) ** frac)
        seen += c
    return bin_bounds(len(bins) - 1)[0]


# ------------------------------------------------------------------ schema


def _table(name: str, keys: tuple[str, ...]) -> str:
    key_defs = [
        "bucket INTEGER NOT NULL" if k == "bucket"
        else f"{k} INTEGER NOT NULL" if k.endswith("_id") else f"{k} TEXT NOT NULL"
        for k in keys
    ]
    val_defs = [f"{c} {'REAL' if c in ('cost', 'latency_sum', 'ttfb_sum') else 'INTEGER'} NOT NULL DEFAULT 0"
                for c in VALUE_COLS]
    return (f"CREATE TABLE {name} (\n    " + ",\n    ".join(key_defs + val_defs)
            + f",\n    PRIMARY KEY ({', '.join(keys)})\n) WITHOUT ROWID;\n")


def bin_case(col: str, lo: int = 0, hi: int = len(EDGES)) -> str:
    """SQL for the histogram bin of ``col`` (ms): how many EDGES are <= it,
    found by a binary search over EDGES (6 comparisons)."""
    if lo == hi:
        return str(lo)
    mid = (lo + hi + 1) // 2
    return f"CASE WHEN {col} < {EDGES[mid - 1]!r} THEN {bin_case(col, lo, mid - 1)} ELSE {bin_case(col, mid, hi)} END"


# How the two dialects spell the rollup SQL's parts: the bucket of a time,
# the summed metrics (in SUMS order), an alias the derived table needs.
_SQLITE_SUMS = (
    "COUNT(*)", "SUM(status BETWEEN 400 AND 499)", "SUM(status >= 500)", "SUM(input_tokens)",
    "SUM(output_tokens)", "SUM(cached_tokens)", "SUM(reasoning_tokens)", "SUM(images)", "SUM(video_tokens)",
    "SUM(cost)", "SUM(latency_ms)", "TOTAL(ttfb_ms)", "COUNT(ttfb_ms)",
)
_PG_SUMS = (
    "COUNT(*)", "COUNT(*) FILTER (WHERE status BETWEEN 400 AND 499)", "COUNT(*) FILTER (WHERE status >= 500)",
    "SUM(input_tokens)", "SUM(output_tokens)", "SUM(cached_tokens)", "SUM(reasoning_tokens)", "SUM(images)",
    "SUM(video_tokens)", "SUM(cost)", "SUM(latency_ms)", "COALESCE(SUM(ttfb_ms), 0)", "COUNT(ttfb_ms)",
)


def fill_sql(
    name: str, keys: tuple[str, ...], size: int, *, source: str = "usage_events", rows: str = "WHERE true",
    upsert: bool = False, postgres: bool = False,
) -> str:
    """SQL that adds the usage rows of ``source`` picked by ``rows`` to a
    rollup; with ``upsert``, added to what the rollup holds. ``postgres``:
    PostgreSQL's spelling, each upsert in key order (two writers then lock
    the same rollup rows in the same order and never deadlock)."""
    # Three passes over the raw rows, each with few aggregates: the sums per
    # key, then (key, bin) counts for each histogram, pivoted into columns on
    # the much smaller grouped result. One pass with 100 SUM(bin = i)
    # aggregates per row is ten times slower.
    key_exprs = {
        "bucket": f"(floor(ts / {size}) * {size})::bigint" if postgres else f"CAST(ts / {size} AS INTEGER) * {size}",
        "model": "COALESCE(model, '')",
        "upstream": "COALESCE(upstream, '')",
        "workspace_id": "COALESCE(workspace_id, 0)",
        "key_id": "COALESCE(key_id, 0)",
    }
    k_sel = ", ".join(f"{key_exprs[k]} AS {k}" for k in keys)
    k_list = ", ".join(keys)
    sums = _PG_SUMS if postgres else _SQLITE_SUMS
    sum_sel = ", ".join(f"{expr} AS {col}" for expr, col in zip(sums, SUMS, strict=True))
    alias = " x" if postgres else ""

    def pivot(a: str, col: str, names: tuple[str, ...], where: str) -> str:
        cols = ", ".join(f"SUM(CASE WHEN b = {i} THEN n ELSE 0 END) AS {c}" for i, c in enumerate(names))
        return (f"{a} AS (SELECT {k_list}, {cols} FROM (SELECT {k_sel}, {bin_case(col)} AS b, COUNT(*) AS n "
                f"FROM {source} {where} GROUP BY {k_list}, b){alias} GROUP BY {k_list})")

    join = " AND ".join(f"{{a}}.{k} = s.{k}" for k in keys)
    hist = [f"COALESCE(lp.{c}, 0)" for c in LAT_COLS] + [f"COALESCE(tp.{c}, 0)" for c in TTFB_COLS]
    tail = ""
    if upsert and postgres:
        tail = (f"\nORDER BY {', '.join('s.' + k for k in keys)}\nON CONFLICT ({k_list}) DO UPDATE SET "
                + ", ".join(f"{c} = {name}.{c} + excluded.{c}" for c in VALUE_COLS))
    elif upsert:
        # "WHERE true": an upsert's SELECT needs a WHERE clause to parse.
        tail = (f" WHERE true ON CONFLICT ({k_list}) DO UPDATE SET "
                + ", ".join(f"{c} = {c} + excluded.{c}" for c in VALUE_COLS))
    return (
        f"INSERT INTO {name} ({', '.join(keys + VALUE_COLS)})\n"
        f"WITH s AS (SELECT {k_sel}, {sum_sel} FROM {source} {rows} GROUP BY {k_list}),\n"
        f"{pivot('lp', 'latency_ms', LAT_COLS, rows)},\n"
        f"{pivot('tp', 'ttfb_ms', TTFB_COLS, rows + ' AND ttfb_ms IS NOT NULL')}\n"
        f"SELECT {', '.join('s.' + k for k in keys)}, {', '.join('s.' + c for c in SUMS)}, {', '.join(hist)}\n"
        f"FROM s LEFT JOIN lp ON {join.format(a='lp')} LEFT JOIN tp ON {join.format(a='tp')}{tail}"
        + ("" if postgres else ";\n")
    )


def _fill(name: str, keys: tuple[str, ...], size: int, *, since: bool) -> str:
    """SQLite: every row (the backfill), or with ``since`` only rows whose id
    is above the ``:since`` parameter (the writer, once per batch)."""
    return fill_sql(name, keys, size, rows="WHERE id > :since" if since else "WHERE true", upsert=since)


def _totals(*, since: bool) -> str:
    upsert = (
        " ON CONFLICT (key_id) DO UPDATE SET requests = requests + excluded.requests, "
        "input_tokens = input_tokens + excluded.input_tokens, output_tokens = output_tokens + excluded.output_tokens, "
        "cost = cost + excluded.cost, last_used = MAX(COALESCE(last_used, 0), excluded.last_used)"
    ) if since else ""
    return (
        "INSERT INTO usage_key_totals (key_id, requests, input_tokens, output_tokens, cost, last_used)\n"
        "SELECT key_id, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost), MAX(ts)\n"
        # NOT INDEXED: the batch's id range picks the rows, not the key_id
        # index (which would visit every row that has a key, on every batch).
        f"FROM usage_events {'NOT INDEXED WHERE id > :since AND' if since else 'WHERE'} key_id IS NOT NULL "
        f"GROUP BY key_id{upsert};\n"
    )


BACKFILL: tuple[str, ...] = (
    _fill("usage_minute", MINUTE_KEYS, 60, since=False),
    _fill("usage_hour", HOUR_KEYS, 3600, since=False),
    _totals(since=False),
)
# The same for the rows above ``:since``, added to the existing rollups.
SINCE: tuple[str, ...] = (
    _fill("usage_minute", MINUTE_KEYS, 60, since=True),
    _fill("usage_hour", HOUR_KEYS, 3600, since=True),
    _totals(since=True),
)

MIGRATION = (
    "-- Usage rollups (gateway/store/rollup.py) and request-log indexes.\n"
    + _table("usage_minute", MINUTE_KEYS)
    + _table("usage_hour", HOUR_KEYS)
    + """CREATE TABLE usage_key_totals (
    key_id INTEGER PRIMARY KEY,
    requests INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0,
    last_used REAL
);
CREATE INDEX usage_model_ts ON usage_events (model, ts);
CREATE INDEX usage_status_ts ON usage_events (status, ts);
"""
    + "".join(BACKFILL)
)


def rebuild(conn: sqlite3.Connection) -> None:
    """Recompute every rollup from ``usage_events`` (one transaction): after
    a bulk import, or to repair rollups. Blocks writers while it runs."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table in ("usage_minute", "usage_hour", "usage_key_totals"):
            conn.execute(f"DELETE FROM {table}")
        for stmt in BACKFILL:
            conn.execute(stmt)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# ------------------------------------------------------------------ writer


def add_since(conn: sqlite3.Connection, since: int) -> None:
    """Add the usage rows whose id is above ``since`` to the rollups; call
    inside the transaction that inserted them. Runs entirely in SQLite (no
    Python per row, and the GIL released while it runs)."""
    for sql in SINCE:
        conn.execute(sql, {"since": since})
