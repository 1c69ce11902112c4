"""The usage writer against rows it cannot store as they are: a value
SQLite or the spool cannot encode (an integer past 64 bits, NaN in a
column that must hold a number) must not stop the writer; the
row is stored with the bad values cleared and flagged, and every other row
of its batch and of later batches is written."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import UsageConfig
from gateway.store.columns import COLUMNS
from gateway.store.schema import connect
from gateway.store.spool import spool_dir
from gateway.store.usage import UsageWriter


def row(request_id: str, **values: Any) -> tuple[Any, ...]:
    base: dict[str, Any] = {c: 0 for c in COLUMNS}
    base.update(ts=time.time(), request_id=request_id, workspace_id=None, key_id=None, endpoint="/v1/chat/completions",
                model="m", upstream="u", status=200, cost=0.0, latency_ms=1.0, ttfb_ms=None, upstream_ms=None,
                overhead_ms=None, error_type=None, response_id=None)
    base.update(values)
    return tuple(base[c] for c in COLUMNS)


@pytest.mark.parametrize("spool", [True, False])
@pytest.mark.parametrize("bad", [
    {"input_tokens": 2**70},
    {"output_tokens": -(2**80)},
    {"latency_ms": float("nan")},
])
async def test_a_row_that_cannot_be_stored_is_cleared_not_retried_forever(
    tmp_path: Path, spool: bool, bad: dict[str, Any]
) -> None:
    db = tmp_path / "gateway.db"
    connect(db).close()
    w = UsageWriter(db, UsageConfig(flush_interval_ms=10, batch_max=100, queue_max=1000),
                    spool=spool_dir(db) if spool else None)
    task = asyncio.create_task(w.run())
    w.record(row("before"))
    w.record(row("bad", **bad))
    w.record(row("after"))
    deadline = time.monotonic() + 5
    while w.written < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    w.record(row("later"))
    await w.close()
    await asyncio.gather(task)
    conn = sqlite3.connect(db)
    got = {r[0]: r[1:] for r in conn.execute(
        "SELECT request_id, error_type, input_tokens, output_tokens, latency_ms, cost FROM usage_events")}
    conn.close()
    assert set(got) == {"before", "bad", "after", "later"}
    assert got["bad"][0] == "usage_row_invalid"
    assert got["before"][0] is None and got["after"][0] is None
    (field,) = bad
    value = dict(zip(("input_tokens", "output_tokens", "latency_ms", "cost"), got["bad"][1:], strict=True))[field]
    assert value in (0, 0.0, None)
