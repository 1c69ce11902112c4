"""Read-side usage queries for the admin API: aggregates by time bucket, the
request log, per-upstream health. Synchronous sqlite3, run in a worker thread.

Aggregates read only the rollup tables (see ``rollup``), never
``usage_events``, so their cost depends on the number of buckets and series,
not on traffic. The request log reads ``usage_events`` through the
``(ts)``, ``(workspace_id, ts)``, ``(key_id, ts)``, ``(model, ts)`` and
``(status, ts)`` indexes with keyset pagination: a page costs the same at
row 50 as at row 5 million.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from . import rollup
from .scope import Scope, conditions

BUCKETS = {"minute": 60, "hour": 3600, "day": 86400, "total": 0}
BY = {"model": "model", "upstream": "upstream", "key": "key_id", "workspace": "workspace_id"}

_SUM_SQL = ", ".join(f"SUM({c}) AS {c}" for c in rollup.VALUE_COLS)


class QueryError(ValueError):
    """A query the stored aggregates cannot answer; the message says why."""


def _filters(where: list[str], args: list[Any], workspace_id: int | None, key_id: int | None, model: str | None,
             scope: Scope | None) -> None:
    more, more_args = conditions(scope, workspace_id=workspace_id, key_id=key_id, model=model)
    where.extend(more)
    args.extend(more_args)


def _none(v: Any) -> Any:
    # Rollup keys use '' and 0 for "none" (see rollup); show them as null.
    return None if v in ("", 0) else v


def series_query(
    *,
    since: float,
    until: float,
    bucket: str = "hour",
    by: str | None = None,
    workspace_id: int | None = None,
    key_id: int | None = None,
    model: str | None = None,
    scope: Scope | None = None,
) -> tuple[str, list[Any]]:
    """The SQL (``?`` placeholders; the same text runs on SQLite and
    PostgreSQL) and arguments of ``usage_series``."""
    if bucket not in BUCKETS:
        raise QueryError(f"bucket must be one of {', '.join(BUCKETS)}")
    if by is not None and by not in BY:
        raise QueryError(f"by must be one of {', '.join(BY)}")
    per_key = by in ("key", "workspace") or workspace_id is not None or key_id is not None or scope is not None
    if per_key and bucket == "minute":
        raise QueryError("minute buckets are kept per model and upstream only; use hour or day "
                         "when grouping or filtering by key or workspace")
    table, grain = ("usage_hour", 3600) if per_key else ("usage_minute", 60)
    size = BUCKETS[bucket]
    start = int(since // grain) * grain
    where: list[str] = ["bucket >= ?", "bucket < ?"]
    args: list[Any] = [start, until]
    _filters(where, args, workspace_id, key_id, model, scope)
    t_expr = f"(bucket / {size}) * {size}" if size else str(start)
    g_expr = BY[by] if by else "NULL"
    sql = (f"SELECT {t_expr} AS t, {g_expr} AS g, {_SUM_SQL} FROM {table} "
           f"WHERE {' AND '.join(where)} GROUP BY 1, 2 ORDER BY 1, 2")
    return sql, args


def series_items(rows: Iterable[Sequence[Any]], by: str | None) -> list[dict[str, Any]]:
    """The rows of ``series_query`` as the admin API shows them."""
    out = []
    n_sums = len(rollup.SUMS)
    for r in rows:
        row = tuple(r)
        s = dict(zip(rollup.SUMS, row[2:2 + n_sums], strict=True))
        lat = row[2 + n_sums:2 + n_sums + rollup.NBINS]
        ttfb = row[2 + n_sums + rollup.NBINS:]
        item: dict[str, Any] = {"t": row[0]}
        if by:
            item[by] = _none(row[1])
        req, ttfb_n = s["requests"], s["ttfb_count"]
        item.update(
            requests=req,
            errors=s["client_errors"] + s["server_errors"],
            server_errors=s["server_errors"],
            input_tokens=s["input_tokens"],
            output_tokens=s["output_tokens"],
            cached_tokens=s["cached_tokens"],
            reasoning_tokens=s["reasoning_tokens"],
            tokens=s["input_tokens"] + s["output_tokens"],
            images=s["images"],
            video_tokens=s["video_tokens"],
            cost=round(s["cost"], 9),
            avg_latency_ms=s["latency_sum"] / req if req else None,
            p50_latency_ms=rollup.percentile(lat, 0.5),
            p95_latency_ms=rollup.percentile(lat, 0.95),
            avg_ttfb_ms=s["ttfb_sum"] / ttfb_n if ttfb_n else None,
            p50_ttfb_ms=rollup.percentile(ttfb, 0.5),
            p95_ttfb_ms=rollup.percentile(ttfb, 0.95),
        )
        out.append(item)
    return out


def usage_series(conn: sqlite3.Connection, *, by: str | None = None, **kw: Any) -> list[dict[str, Any]]:
    """Usage per time bucket (``total``: one bucket for the whole range) and
    per ``by`` value, within a console user's ``scope``. Times are unix
    seconds, buckets aligned to UTC. Keyword arguments: ``series_query``'s."""
    sql, args = series_query(by=by, **kw)
    return series_items(conn.execute(sql, args), by)


_LOG_COLUMNS = """id, ts, request_id, workspace_id, key_id, endpoint, model, upstream, status, stream,
    input_tokens, output_tokens, cached_tokens, reasoning_tokens, images, video_tokens, cost, latency_ms,
    ttfb_ms, upstream_ms, overhead_ms, bytes_in, bytes_out, error_type"""

_STATUS_CLASSES = {"2xx": (200, 299), "3xx": (300, 399), "4xx": (400, 499), "5xx": (500, 599), "error": (400, 999)}


def encode_cursor(ts: float, row_id: int) -> str:
    return f"{ts!r}_{row_id}"


def decode_cursor(cursor: str) -> tuple[float, int]:
    try:
        ts, row_id = cursor.split("_")
        t, i = float(ts), int(row_id)
    except ValueError:
        raise QueryError("invalid cursor") from None
    if not (math.isfinite(t) and 0 <= i < 2**63):  # SQLite integers are 64-bit
        raise QueryError("invalid cursor")
    return t, i


def log_query(
    *,
    since: float,
    until: float,
    workspace_id: int | None = None,
    key_id: int | None = None,
    model: str | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    scope: Scope | None = None,
) -> tuple[str, list[Any]]:
    """The SQL (``?`` placeholders, both dialects) and arguments of one
    request-log page: ``limit + 1`` rows, newest first. ``status`` is a
    code (``429``) or a class (``2xx``, ``4xx``, ``5xx``, ``error``)."""
    where: list[str] = ["ts >= ?", "ts < ?"]
    args: list[Any] = [since, until]
    _filters(where, args, workspace_id, key_id, model, scope)
    if status:
        if status in _STATUS_CLASSES:
            where.append("status BETWEEN ? AND ?")
            args.extend(_STATUS_CLASSES[status])
        elif status.isascii() and status.isdigit() and len(status) <= 3:
            where.append("status = ?")
            args.append(int(status))
        else:
            raise QueryError("status must be a code or one of " + ", ".join(_STATUS_CLASSES))
    if cursor:
        c_ts, c_id = decode_cursor(cursor)
        if c_ts < until:
            # One upper bound only: SQLite bounds the index range with just
            # one of them, and "ts <= cursor" is the one that skips the
            # pages already seen.
            where[1], args[1] = "ts <= ?", c_ts
        where.append("(ts < ? OR (ts = ? AND id < ?))")
        args.extend([c_ts, c_ts, c_id])
    sql = (f"SELECT e.*, k.prefix AS key_prefix, k.name AS key_name, w.name AS workspace FROM "
           f"(SELECT {_LOG_COLUMNS} FROM usage_events WHERE {' AND '.join(where)} "
           f"ORDER BY ts DESC, id DESC LIMIT ?) e "
           f"LEFT JOIN api_keys k ON k.id = e.key_id LEFT JOIN workspaces w ON w.id = e.workspace_id "
           f"ORDER BY e.ts DESC, e.id DESC")
    return sql, [*args, limit + 1]


def log_page(rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]["ts"], rows[-1]["id"])
    return {"items": rows, "next_cursor": next_cursor}


def request_log(conn: sqlite3.Connection, *, limit: int = 50, **kw: Any) -> dict[str, Any]:
    """One page of requests, newest first; ``next_cursor`` fetches the next.
    Keyword arguments: ``log_query``'s."""
    sql, args = log_query(limit=limit, **kw)
    return log_page([dict(r) for r in conn.execute(sql, args)], limit)


UPSTREAM_LAST = "SELECT upstream, MAX(bucket) FROM usage_minute WHERE bucket >= ? GROUP BY upstream"


def upstream_stats(conn: sqlite3.Connection, *, since: float) -> dict[str, dict[str, Any]]:
    """Recent traffic per upstream from the minute rollup."""
    series = usage_series(conn, since=since, until=float("inf"), bucket="total", by="upstream")
    last = dict(conn.execute(UPSTREAM_LAST, (int(since // 60) * 60,)).fetchall())
    return upstream_summary(series, last)


def upstream_summary(series: list[dict[str, Any]], last: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in series:
        name = s["upstream"]
        if name is None:
            continue
        req = s["requests"]
        out[name] = {
            "requests": req,
            "server_errors": s["server_errors"],
            "client_errors": s["errors"] - s["server_errors"],
            "error_rate": s["server_errors"] / req if req else 0.0,
            "p50_latency_ms": s["p50_latency_ms"],
            "p95_latency_ms": s["p95_latency_ms"],
            "p95_ttfb_ms": s["p95_ttfb_ms"],
            "last_minute": last.get(name),
        }
    return out
