"""The Store protocol, the same tests on both implementations: SQLite (a
file in tmp_path) and PostgreSQL (a fresh database on the machine's server;
skipped when there is none, failed under CI=true)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import DatabaseConfig
from gateway.store import catalog
from gateway.store.base import ConflictError, KeyLimits, NotFoundError, Store, open_store
from gateway.store.columns import COLUMNS
from gateway.store.tasks import TaskRow

NOW = time.time()


def row(**kw: Any) -> tuple[Any, ...]:
    """A usage row; keyword arguments override the defaults."""
    values: dict[str, Any] = {
        "ts": NOW, "request_id": "r", "workspace_id": 1, "key_id": 1, "endpoint": "/v1/chat/completions",
        "model": "m", "upstream": "u", "status": 200, "stream": 0, "input_tokens": 10, "output_tokens": 5,
        "cached_tokens": 0, "reasoning_tokens": 0, "images": 0, "video_tokens": 0, "cost": 0.5,
        "latency_ms": 12.0, "ttfb_ms": 3.0, "upstream_ms": 10.0, "overhead_ms": 0.2, "bytes_in": 100,
        "bytes_out": 200, "error_type": None, "cache_write_tokens": 0, "cache_write_1h_tokens": 0, "response_id": None,
    }
    values.update(kw)
    return tuple(values[c] for c in COLUMNS)


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    url = request.getfixturevalue("pg_database") if request.param == "postgres" else None
    s = await open_store(DatabaseConfig(tmp_path / "gateway.db", url))
    yield s
    await s.close()


async def other_store(store: Store, tmp_path: Path) -> Store:
    """A second handle on the same database (another instance)."""
    return await open_store(DatabaseConfig(tmp_path / "gateway.db", getattr(store, "url", None)))


async def write(store: Store, rows: list[tuple[Any, ...]], mark: tuple[str, int] | None = None) -> bool:
    sink = store.batch_sink()
    try:
        return await sink.write(rows, 7, mark, ())
    finally:
        await sink.close()


async def test_workspaces_and_keys(store: Store) -> None:
    ws = await store.run(lambda tx: catalog.create_workspace(tx, "acme", "cheap"), write=True)
    assert ws["name"] == "acme" and ws["default_group"] == "cheap" and ws["allowed_models"] is None
    with pytest.raises(ConflictError):
        await store.run(lambda tx: catalog.create_workspace(tx, "acme"), write=True)
    assert (await store.run(lambda tx: catalog.find_workspace(tx, "acme")))["id"] == ws["id"]
    with pytest.raises(NotFoundError):
        await store.run(lambda tx: catalog.get_workspace(tx, 999))
    ws = await store.run(lambda tx: catalog.update_workspace(
        tx, ws["id"], {"allowed_models": ["gpt-*"], "monthly_token_limit": 1000}), write=True)
    assert ws["allowed_models"] == ["gpt-*"] and ws["monthly_token_limit"] == 1000
    with pytest.raises(ValueError, match="unknown field"):
        await store.run(lambda tx: catalog.update_workspace(tx, ws["id"], {"id": 5}), write=True)

    generation = await store.keys_generation()
    key, plaintext = await store.run(lambda tx: catalog.create_key(
        tx, ws["id"], name="ci", models=["gpt-4o"], limits=KeyLimits(rpm=30)), write=True)
    assert plaintext.startswith("gw-") and len(plaintext) > 40 and key["prefix"] == plaintext[:10]
    assert "key_hash" not in key and key["rpm"] == 30 and key["workspace"] == "acme"
    assert await store.keys_generation() > generation
    other, _ = await store.run(lambda tx: catalog.create_key(tx, ws["id"]), write=True)
    assert [k["id"] for k in await store.run(lambda tx: catalog.list_keys(tx, ws["id"]))] == [key["id"], other["id"]]
    key = await store.run(lambda tx: catalog.update_key(tx, key["id"], {"tpm": 500, "name": "renamed"}), write=True)
    assert key["tpm"] == 500 and key["name"] == "renamed"
    live = {r[0]: r for r in await store.live_keys()}
    assert set(live) == {key["id"], other["id"]}
    assert live[key["id"]][7] == 500  # tpm, in the key cache's column order
    generation, one = await store.fetch_key(live[key["id"]][1])
    assert one == live[key["id"]] and generation == await store.keys_generation()
    assert (await store.fetch_key("0" * 64))[1] is None
    revoked = await store.run(lambda tx: catalog.revoke_key(tx, key["id"]), write=True)
    assert revoked["revoked_at"] is not None
    assert {r[0] for r in await store.live_keys()} == {other["id"]}
    with pytest.raises(NotFoundError):
        await store.run(lambda tx: catalog.get_key(tx, 12345))


async def test_usage_batches_rollups_and_reads(store: Store) -> None:
    rows = [
        row(request_id="a", model="m1", ts=NOW - 120, latency_ms=5.0),
        row(request_id="b", model="m1", ts=NOW - 60, status=500, error_type="upstream_error", ttfb_ms=None),
        row(request_id="c", model="m2", key_id=2, cost=1.25, input_tokens=100, output_tokens=50),
    ]
    assert await write(store, rows)
    await write(store, [row(request_id="d", model="m2", key_id=2, status=429, cost=0.0)])

    total = await store.usage_series(since=NOW - 3600, until=NOW + 60, bucket="total", by="model")
    by_model = {s["model"]: s for s in total}
    assert by_model["m1"]["requests"] == 2 and by_model["m1"]["server_errors"] == 1
    assert by_model["m2"]["requests"] == 2 and by_model["m2"]["errors"] == 1
    assert by_model["m2"]["tokens"] == 165 and by_model["m2"]["cost"] == pytest.approx(1.25)
    assert by_model["m1"]["p50_latency_ms"] is not None
    per_key = await store.usage_series(since=NOW - 3600, until=NOW + 60, bucket="hour", by="key")
    assert sum(s["requests"] for s in per_key if s["key"] == 2) == 2

    page = await store.request_log(since=0, until=NOW + 60, limit=3)
    assert [r["request_id"] for r in page["items"]] == ["d", "c", "b"]
    assert page["next_cursor"]
    rest = await store.request_log(since=0, until=NOW + 60, limit=3, cursor=page["next_cursor"])
    assert [r["request_id"] for r in rest["items"]] == ["a"] and rest["next_cursor"] is None
    errors = await store.request_log(since=0, until=NOW + 60, status="5xx")
    assert [r["request_id"] for r in errors["items"]] == ["b"]

    totals = await store.run(catalog.key_usage_totals)
    assert totals[2]["requests"] == 2 and totals[2]["cost"] == pytest.approx(1.25)
    summary = {s["model"]: s for s in await store.usage_summary(by="model")}
    assert summary["m1"]["requests"] == 2 and summary["m1"]["errors"] == 1
    assert summary["m2"]["input_tokens"] == 110
    stats = await store.upstream_stats(since=NOW - 3600)
    assert stats["u"]["requests"] == 4 and stats["u"]["server_errors"] == 1

    _, (keys, workspaces) = await store.quota_load(NOW - 86400)
    assert keys[2] == pytest.approx(1.25) and keys[1] == pytest.approx(1.0)
    assert workspaces[1] == (pytest.approx(2.25), 195)
    assert len(await store.usage_rows()) == 4


async def test_retention(store: Store) -> None:
    day = 86400
    old = [row(request_id=f"old{i}", ts=NOW - 100 * day + i) for i in range(5)]
    await write(store, [*old, row(request_id="new")])
    removed = await store.retention(NOW - 90 * day)
    assert removed >= 1  # rows (SQLite) or day partitions (PostgreSQL)
    assert [r["request_id"] for r in await store.usage_rows()] == ["new"]
    assert await store.retention(NOW - 90 * day) == 0


def spool_file(directory: Path, name: str, rows: list[tuple[Any, ...]]) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows))
    return path


async def test_spool_recovery_exactly_once(store: Store, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    rows = [row(request_id=f"s{i}") for i in range(10)]
    path = spool_file(spool, "1-1.rows", rows)
    # The dead writer had committed the first 4 rows, with their offset.
    offset = len(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows[:4]))
    await write(store, rows[:4], ("1-1.rows", offset))
    # A live writer's file (locked) is left alone.
    live = spool_file(spool, "2-2.rows", [row(request_id="live")])
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        second = await other_store(store, tmp_path)
        try:
            # Two processes recovering the same directory at once.
            counts = await asyncio.gather(store.recover_spools(spool), second.recover_spools(spool))
        finally:
            await second.close()
    finally:
        os.close(fd)
    assert sum(counts) == 6
    ids = sorted(r["request_id"] for r in await store.usage_rows())
    assert ids == sorted(f"s{i}" for i in range(10))
    assert not path.exists() and live.exists()
    assert await store.recover_spools(spool) == 1  # the live file, once its writer is gone
    assert await store.recover_spools(spool) == 0


async def test_batch_with_a_stored_mark_is_not_written_twice(store: Store) -> None:
    """A retry after a COMMIT whose answer was lost finds its mark stored."""
    if store.kind == "sqlite":
        pytest.skip("SQLite commits locally: no lost-COMMIT retry to guard against")
    batch = [row(request_id="x1"), row(request_id="x2")]
    assert await write(store, batch, ("f.rows", 200))
    assert not await write(store, batch, ("f.rows", 200))
    assert len(await store.usage_rows()) == 2


def task(i: int, now: float) -> TaskRow:
    return TaskRow(id=f"vt_{i}", workspace_id=1, key_id=1, model="video", upstream="ark", upstream_model="v",
                   upstream_task_id=f"up{i}", status="queued", created_at=now, updated_at=now, next_poll_at=now - 1)


async def test_tasks_claimed_once_and_billed_once(store: Store, tmp_path: Path) -> None:
    now = time.time()
    second = await other_store(store, tmp_path)
    a, b = await store.task_store(), await second.task_store()
    try:
        for i in range(6):
            t = task(i, now)
            creating = TaskRow(t.id, 1, 1, "video", "ark", "v", None, "creating", created_at=now, updated_at=now,
                               next_poll_at=now + 600)
            assert await a.begin(creating, 86400) is None
            assert await a.record_created(t, now)
            assert not await b.record_created(t, now)  # it has its upstream id already
        claimed = await asyncio.gather(a.claim_due(now, 4, now + 60), b.claim_due(now, 4, now + 60))
        ids = [t.id for batch in claimed for t in batch]
        assert len(ids) == len(set(ids))  # no task to two pollers
        if store.kind == "postgres":
            assert len(ids) == 6  # SKIP LOCKED: each takes the next free ones
        ids += [t.id for t in await a.claim_due(now, 10, now + 60)]
        assert sorted(ids) == [f"vt_{i}" for i in range(6)]
        assert await a.claim_due(now, 10, now + 60) == []  # leased

        t = await a.get("vt_0")
        assert t is not None
        billing = row(request_id="vt_0", endpoint="video.task.billing", video_tokens=1000, cost=2.0, key_id=1)
        won = await asyncio.gather(*(s.succeed(t, {"url": "u"}, {"video_tokens": 1000}, now, billing)
                                     for s in (a, b, a, b)))
        assert won.count(True) == 1
        assert not await a.finish(t, "failed", {"code": "x"}, now)  # final: nothing moves it
        stored = await b.get("vt_0")
        assert stored is not None and stored.status == "succeeded" and stored.billed
        assert [r["request_id"] for r in await store.usage_rows()] == ["vt_0"]
        assert (await store.run(catalog.key_usage_totals))[1]["cost"] == pytest.approx(2.0)

        await a.add_asset("asset-1", "volc", 1, "JIMENG", "g1")
        await b.add_asset("asset-1", "volc", 2, "JIMENG", "g1")  # taken: the first owner stays
        assert await a.asset_owner("volc", "asset-1") == 1
        assert await b.asset_upstreams("asset-1", 1) == ["volc"]
    finally:
        await a.close()
        await b.close()
        await second.close()


async def test_key_changes_are_announced(store: Store, tmp_path: Path) -> None:
    if store.kind == "sqlite":
        pytest.skip("one machine: workers poll the generation counter")
    seen = asyncio.Event()
    configs: list[str] = []
    stop = await store.listen(seen.set, configs.append)
    assert stop is not None
    try:
        second = await other_store(store, tmp_path)
        ws = await second.run(lambda tx: catalog.create_workspace(tx, "w"), write=True)
        await seen.wait()
        seen.clear()
        key, _ = await second.run(lambda tx: catalog.create_key(tx, ws["id"]), write=True)
        t0 = time.monotonic()
        await second.run(lambda tx: catalog.revoke_key(tx, key["id"]), write=True)
        await asyncio.wait_for(seen.wait(), 1.0)
        assert time.monotonic() - t0 < 0.1
        await second.announce_config("elsewhere")
        await asyncio.sleep(0.1)
        assert configs == ["elsewhere"]
        await second.close()
    finally:
        await stop()
