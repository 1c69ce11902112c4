"""A video task that exists upstream is recorded, polled and billed once
(issue 11, item 12): the task is recorded before the upstream is asked and
given its upstream id after; Idempotency-Key on create; a client that goes
away, a database that is locked, an upstream that may or may not have
started the task."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from typing import Any

import aiohttp
import pytest

from .conftest import Gateway, GatewayFactory, Upstream, wait_for
from .test_tasks import TASKS, ark, auth, billing_rows, keys, poll, task_row, tasks_toml, wait_billing

BODY = {"model": "seedance", "prompt": "a cat surfing", "provider_options": {"mock": {"queued_polls": 1}}}


class WriteLock:
    """Holds the database's write lock from a thread of its own, as another
    process (a CLI command, a backup) would."""

    def __init__(self, path: Any) -> None:
        self._path = path
        self._release = threading.Event()
        self._held = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, timeout=10, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        self._held.set()
        self._release.wait(60)
        conn.execute("ROLLBACK")
        conn.close()

    async def __aenter__(self) -> WriteLock:
        self._thread.start()
        assert await asyncio.to_thread(self._held.wait, 15)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        await asyncio.to_thread(self._thread.join, 15)


async def post(http: aiohttp.ClientSession, gw: Gateway, key: str, body: dict[str, Any],
               idem: str | None = None, **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = auth(key)
    if idem is not None:
        headers["Idempotency-Key"] = idem
    async with http.post(gw.url + TASKS, json=body, headers=headers, **kw) as r:
        return r.status, await r.json(), r


def locked_toml(toml: str) -> str:
    """``toml`` with a write that waits 1 s for a lock held elsewhere
    (rather than 10 s) before it gives up: [database] busy_timeout_ms."""
    out = toml.replace("[database]\n", "[database]\nbusy_timeout_ms = 1000\n", 1)
    assert out != toml
    return out


def creates(upstream: Upstream) -> int:
    return ark(upstream).creates


async def test_started_while_the_database_is_locked_is_recorded_polled_and_billed_once(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """The database is locked (another process holds its write lock longer
    than the busy timeout) while the upstream starts the task. The client
    still gets its task; once the lock is gone the task is recorded, polled
    and billed, once; the upstream was asked once."""
    gw = await make_gateway(locked_toml(tasks_toml(upstream)))
    key = await gw.key()
    body = {**BODY, "provider_options": {"mock": {"queued_polls": 1, "create_delay_ms": 300}}}
    answer = asyncio.create_task(post(http, gw, key, body))
    await wait_for(lambda: creates(upstream) == 1)  # started upstream, answer on its way
    async with WriteLock(gw.db_path):
        status, data, _ = await answer
    assert status == 200, data
    assert data["status"] == "queued" and data["id"].startswith("vt_")
    rows = await wait_billing(gw, timeout=15)
    assert [r["request_id"] for r in rows] == [data["id"]]
    assert creates(upstream) == 1
    row = task_row(gw, data["id"])
    assert row["status"] == "succeeded" and row["upstream_task_id"] == next(iter(ark(upstream).tasks))
    await asyncio.sleep(0.2)
    assert len(billing_rows(gw)) == 1


@pytest.mark.sqlite_only("another process holds SQLite's write lock (no such file lock on PostgreSQL)")
async def test_locked_before_the_upstream_call_nothing_is_started(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """If the task cannot be recorded first, the upstream is not asked: a
    503 with Retry-After, and a retry once the lock is gone works."""
    gw = await make_gateway(locked_toml(tasks_toml(upstream, poller=False)))
    key = await gw.key()
    async with WriteLock(gw.db_path):
        started = time.monotonic()
        status, data, r = await post(http, gw, key, BODY)
        assert 0.9 < time.monotonic() - started < 5  # busy_timeout_ms = 1000, not the default 10 s
    assert status == 503 and data["error"]["code"] == "task_store_unavailable", data
    assert r.headers["Retry-After"] == "1"
    assert creates(upstream) == 0
    status, data, _ = await post(http, gw, key, BODY)
    assert status == 200 and creates(upstream) == 1


async def test_client_gone_mid_create_the_task_is_still_recorded_and_billed(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """The client gives up while the upstream answers slowly: the upstream
    has started the task, so the gateway records it anyway and bills it
    once; the client finds it again with its Idempotency-Key."""
    gw = await make_gateway(tasks_toml(upstream))
    key = await gw.key()
    body = {**BODY, "provider_options": {"mock": {"queued_polls": 1, "create_delay_ms": 500}}}
    try:
        await post(http, gw, key, body, "retry-me", timeout=aiohttp.ClientTimeout(total=0.2))
        raise AssertionError("the client should have timed out")
    except TimeoutError:
        pass
    rows = await wait_billing(gw)
    assert len(rows) == 1 and creates(upstream) == 1
    status, data, r = await post(http, gw, key, body, "retry-me")
    assert status == 200 and r.headers["Idempotent-Replayed"] == "true"
    assert data["id"] == rows[0]["request_id"] and creates(upstream) == 1


async def test_idempotency_key(make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    key, key2, other = await keys(gw, "acme", "acme", "globex")

    # A retry gets the same task, from another key of the workspace too.
    s1, first, r1 = await post(http, gw, key, BODY, "order-42")
    s2, again, r2 = await post(http, gw, key2, BODY, "order-42")
    assert s1 == s2 == 200 and again["id"] == first["id"] and creates(upstream) == 1
    assert "Idempotent-Replayed" not in r1.headers and r2.headers["Idempotent-Replayed"] == "true"
    # Polled to success, the replay shows the task as it is now.
    for _ in range(3):
        await poll(http, gw, key, first["id"])
    s3, later, _ = await post(http, gw, key, BODY, "order-42")
    assert s3 == 200 and later["id"] == first["id"] and later["status"] == "succeeded"

    # Another body under the same key: 422, nothing started.
    status, data, _ = await post(http, gw, key, {**BODY, "prompt": "a dog"}, "order-42")
    assert status == 422 and data["error"]["code"] == "idempotency_key_reused", data
    # Scoped to the workspace: globex's "order-42" is its own task.
    status, theirs, _ = await post(http, gw, other, BODY, "order-42")
    assert status == 200 and theirs["id"] != first["id"] and creates(upstream) == 2
    status, _ = await poll(http, gw, other, first["id"])
    assert status == 404

    # Ten at once with a new key: one task upstream, every 200 names it;
    # the others are told the first is still running (409, Retry-After).
    slow = {**BODY, "provider_options": {"mock": {"create_delay_ms": 300}}}
    results = await asyncio.gather(*(post(http, gw, key, slow, "burst") for _ in range(10)))
    assert creates(upstream) == 3
    ids = {d["id"] for s, d, _ in results if s == 200}
    assert len(ids) == 1 and sum(s == 200 for s, _, _ in results) >= 1
    for s, d, r in results:
        assert s in (200, 409), d
        if s == 409:
            assert d["error"]["code"] == "idempotency_key_in_use" and r.headers["Retry-After"] == "1"
    status, data, _ = await post(http, gw, key, slow, "burst")
    assert status == 200 and data["id"] in ids and creates(upstream) == 3

    # Bounded: too long, control characters, two headers: 400, nothing started.
    for bad in ("x" * 256, "tab\there", ""):
        status, data, _ = await post(http, gw, key, BODY, bad)
        assert status == 400 and data["error"]["code"] == "invalid_idempotency_key", (bad, data)
    async with http.post(gw.url + TASKS, json=BODY, headers=[*auth(key).items(), ("Idempotency-Key", "a"),
                                                             ("Idempotency-Key", "b")]) as r:
        assert r.status == 400
    assert creates(upstream) == 3

    # After a day the key names nothing any more: a new task.
    gw.conn.execute("UPDATE video_tasks SET created_at = created_at - 86401 WHERE id = ?", (first["id"],))
    status, fresh, _ = await post(http, gw, key, BODY, "order-42")
    assert status == 200 and fresh["id"] != first["id"] and creates(upstream) == 4
    status, data = await poll(http, gw, key, first["id"])
    assert status == 200 and data["status"] == "succeeded"


async def test_upstream_refusal_frees_the_key_and_leaves_nothing(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """An upstream that answers an error started nothing: no task is kept,
    and a retry with the same key makes the task."""
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    key = await gw.key()
    refused = {**BODY, "provider_options": {"mock": {"create_status": 400}}}
    status, data, _ = await post(http, gw, key, refused, "k1")
    assert status == 400 and data["error"]["type"] == "upstream_error"
    assert gw.conn.execute("SELECT COUNT(*) FROM video_tasks").fetchone()[0] == 0
    status, data, _ = await post(http, gw, key, BODY, "k1")
    assert status == 200 and creates(upstream) == 1


async def test_upstream_that_may_have_started_the_task_is_not_asked_twice(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """The first route times out after the request went out: the task may
    exist there, so the next route is not tried (that could start it twice);
    the task is recorded failed with upstream_create_unknown, never billed,
    and a retry with the same key gets that answer, not a second task."""
    toml = tasks_toml(upstream).replace(
        'name = "ark2"\nkind = "ark"\n', 'name = "ark2"\nkind = "ark"\ntimeout_s = 0.3\n'
    )
    assert "timeout_s = 0.3" in toml
    gw = await make_gateway(toml)
    key = await gw.key()
    body = {**BODY, "provider_options": {"mock": {"create_delay_ms": 1000}}}
    status, data, _ = await post(http, gw, key, body, "slow-1")
    assert status == 504, data
    assert creates(upstream) == 1  # ark2 only; ark (the next route) was not asked
    (row,) = [dict(r) for r in gw.conn.execute("SELECT * FROM video_tasks")]
    assert row["status"] == "failed" and row["upstream"] == "ark2" and row["upstream_task_id"] is None
    status, data, _ = await post(http, gw, key, body, "slow-1")
    assert status == 200 and data["status"] == "failed"
    assert data["error"]["code"] == "upstream_create_unknown" and creates(upstream) == 1
    await asyncio.sleep(0.3)
    assert billing_rows(gw) == []


async def test_poller_settles_a_task_whose_creator_died(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """A task recorded as being created by a process that died before the
    upstream answered: once every upstream timeout has passed, the poller
    records it failed (upstream_create_unknown), not billed."""
    gw = await make_gateway(tasks_toml(upstream))
    key = await gw.key()
    status, task, _ = await post(http, gw, key, BODY)
    ws = task_row(gw, task["id"])["workspace_id"]
    now = time.time()
    gw.conn.execute(
        "INSERT INTO video_tasks (id, workspace_id, key_id, model, upstream, upstream_model, status, "
        "created_at, updated_at, next_poll_at) VALUES ('vt_orphan', ?, 1, 'seedance', 'ark2', 'm', 'creating', "
        "?, ?, ?)", (ws, now - 700, now - 700, now - 1))
    status, data = await poll(http, gw, key, "vt_orphan")
    assert status == 200 and data["status"] in ("queued", "failed")
    await wait_for(lambda: task_row(gw, "vt_orphan")["status"] == "failed")
    status, data = await poll(http, gw, key, "vt_orphan")
    assert data["status"] == "failed" and data["error"]["code"] == "upstream_create_unknown"
    await wait_billing(gw)
    assert [r["request_id"] for r in billing_rows(gw)] == [task["id"]]
