"""Requests in flight when their process is killed outright (issue 11,
item 13): each has a line in the usage spool from the loop turn it started
in, brought up to date while it runs long, so recovery (the next start, or
the supervisor for a dead worker) gives it a row, status 499 and error_type
``worker_lost``, with whatever usage it had seen."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.auth import KeyInfo
from gateway.config import UsageConfig
from gateway.context import RequestContext
from gateway.store.dbfile import DatabaseFile, DatabaseLost
from gateway.store.schema import connect
from gateway.store.spool import recover, spool_dir
from gateway.store.usage import UsageWriter

from .conftest import PROTOCOL_MODELS, Upstream, wait_for
from .test_production import chat, make_key, prod_toml, serve  # noqa: F401 (serve: a fixture)

HANG = {"x-mock-head-delay-ms": "60000"}
CLAUDE = {"model": "claude-test", "max_tokens": 64, "stream": True,
          "messages": [{"role": "user", "content": "four words of prompt"}]}


async def hang(http: aiohttp.ClientSession, url: str, key: str, rid: str) -> None:
    with contextlib.suppress(aiohttp.ClientError):
        await chat(http, url, key, rid, headers=HANG)


async def stall_stream(http: aiohttp.ClientSession, url: str, key: str, rid: str) -> bytes:
    """An Anthropic stream that sends message_start (input usage) and some
    text, then hangs."""
    headers = {"Authorization": f"Bearer {key}", "x-request-id": rid, "x-mock-fail": "stall",
               "x-mock-cached": "3"}
    got = b""
    with contextlib.suppress(aiohttp.ClientError):
        async with http.post(url + "/v1/messages", json=CLAUDE, headers=headers) as r:
            async for chunk in r.content.iter_any():
                got += chunk
    return got


def rows_by_id(rows: list[sqlite3.Row]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        assert r["request_id"] not in out, f"two rows for {r['request_id']}"
        out[r["request_id"]] = dict(r)
    return out


async def test_killed_process_rows_for_requests_in_flight(
    serve: Any, upstream: Upstream, tmp_path: Path,  # noqa: F811
) -> None:
    """One process, SIGKILLed while four requests wait on the upstream and a
    stream is halfway: the next start writes a 499 worker_lost row for each,
    with its key, model and upstream, and the stream's input tokens and cost."""
    key = make_key(tmp_path / "gateway.db")
    toml = prod_toml(upstream, "", PROTOCOL_MODELS.format(url=upstream.base_url))
    s = serve(toml)
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            assert await chat(http, s.url, key, f"done-{i}") == 200
        waiting = [asyncio.create_task(hang(http, s.url, key, f"hang-{i}")) for i in range(4)]
        stream = asyncio.create_task(stall_stream(http, s.url, key, "stream-1"))
        await wait_for(lambda: len(upstream.state.requests) == 3 + 5)
        # Two checkpoints (CHECKPOINT_S apart) later, the stream's line has
        # its usage so far.
        await asyncio.sleep(2.5)
        s.proc.kill()
        s.proc.wait()
        await asyncio.gather(*waiting)
        assert b"message_start" in await stream

    s2 = serve(toml)
    rows = rows_by_id(s2.rows())
    assert s2.stop() == 0
    assert set(rows) == {"done-0", "done-1", "done-2", "hang-0", "hang-1", "hang-2", "hang-3", "stream-1"}
    assert all(rows[f"done-{i}"]["status"] == 200 for i in range(3))
    ws = rows["done-0"]["workspace_id"]
    for i in range(4):
        r = rows[f"hang-{i}"]
        assert (r["status"], r["error_type"]) == (499, "worker_lost")
        assert (r["workspace_id"], r["key_id"], r["model"], r["endpoint"]) == (
            ws, rows["done-0"]["key_id"], "gpt-test", "/v1/chat/completions")
        assert r["upstream"] == "mock" and r["bytes_in"] > 0
    r = rows["stream-1"]
    assert (r["status"], r["error_type"], r["stream"], r["model"]) == (499, "worker_lost", 1, "claude-test")
    assert r["input_tokens"] == 4 + 3 and r["cached_tokens"] == 3  # from message_start
    assert r["cost"] > 0 and r["bytes_out"] > 0 and r["ttfb_ms"] is not None
    assert list(spool_dir(tmp_path / "gateway.db").iterdir()) == []


async def test_killed_workers_rows_recovered_by_the_supervisor(
    serve: Any, upstream: Upstream, tmp_path: Path,  # noqa: F811
) -> None:
    """Two workers, both SIGKILLed while twelve requests wait on the
    upstream: the supervisor replaces them and writes a worker_lost row for
    every one of those requests, while the gateway keeps running."""
    key = make_key(tmp_path / "gateway.db")
    s = serve(prod_toml(upstream, "workers = 2\n"))
    pids = s.start["worker_pids"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        waiting = [asyncio.create_task(hang(http, s.url, key, f"hang-{i}")) for i in range(12)]
        await wait_for(lambda: len(upstream.state.requests) == 12)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*waiting)
        await wait_for(lambda: sum(1 for line in s.lines() if line.get("event") == "worker_replaced") == 2)
        await wait_for(lambda: len(s.rows()) == 12)
        rows = rows_by_id(s.rows())
        assert set(rows) == {f"hang-{i}" for i in range(12)}
        assert all((r["status"], r["error_type"], r["model"]) == (499, "worker_lost", "gpt-test")
                   for r in rows.values())
        assert await chat(http, s.url, key, "after") == 200  # served by the new workers
    assert await asyncio.to_thread(s.stop) == 0
    assert len(s.rows()) == 13


@pytest.mark.sqlite_only("spool recovery into an SQLite file replaced under it")
def test_a_recovered_spool_is_never_recovered_twice(tmp_path: Path) -> None:
    """Recovery commits a file's rows and marks it recovered in one
    transaction; if the file then survives (here: it is kept because the
    database file was replaced in between; likewise a crash before the
    unlink), the next recovery adds nothing, not even the unfinished
    requests, and deletes it."""
    db = tmp_path / "gateway.db"
    connect(db).close()
    spool = spool_dir(db)
    spool.mkdir()
    finished = [time.time(), "r-done", 1, 1, "/v1/chat/completions", "m", "up", 200, 0, 5, 6, 0, 0, 0, 0, 0.1,
                12.0, 3.0, 9.0, 1.0, 10, 20, None, 0, 0]
    running = [time.time(), "r-run", 1, 1, "/v1/chat/completions", "m", "up", 0, 1, 0, 0, 0, 0, 0, 0, 0.0,
               1000.0, None, None, None, 10, 0, None, 0, 0]
    lines = [["s", 1, *running], ["s", 2, *finished], ["d", 2, *finished], ["s", 1, *running]]
    (spool / "1-1.rows").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))

    conn = connect(db)
    replaced = DatabaseFile(db)
    other = tmp_path / "other.db"
    other.write_bytes(b"")
    os.replace(db, tmp_path / "moved.db")
    other.rename(db)
    with pytest.raises(DatabaseLost):
        recover(conn, spool, replaced)
    conn.close()
    os.replace(tmp_path / "moved.db", db)
    assert (spool / "1-1.rows").exists(), "the spool was deleted though its database file was not the live one"

    conn = connect(db)
    got = {r["request_id"]: (r["status"], r["error_type"]) for r in conn.execute("SELECT * FROM usage_events")}
    assert got == {"r-done": (200, None), "r-run": (499, "worker_lost")}
    assert recover(conn, spool, DatabaseFile(db)) == 0
    assert conn.execute("SELECT COUNT(*) FROM usage_events").fetchone()[0] == 2
    assert list(spool.iterdir()) == []
    conn.close()


async def test_killed_process_mid_websocket_response(
    serve: Any, upstream: Upstream, tmp_path: Path,  # noqa: F811
) -> None:
    """A Responses WebSocket whose second response waits on the upstream when
    the process is killed: the first response's row, a worker_lost row for
    the second, and none for the connection itself."""
    key = make_key(tmp_path / "gateway.db")
    toml = prod_toml(upstream, "")
    s = serve(toml)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(s.url + "/v1/responses",
                                   headers={"Authorization": f"Bearer {key}", "x-request-id": "ws-1"})
        frame = {"type": "response.create", "model": "gpt-test", "input": "hi"}
        await ws.send_str(orjson.dumps(frame).decode())
        while orjson.loads(await ws.receive_str())["type"] != "response.completed":
            pass
        upstream.state.steer.update(HANG)
        await ws.send_str(orjson.dumps(frame).decode())
        await wait_for(lambda: len(upstream.state.requests) == 2)
        await asyncio.sleep(0.3)  # the loop turn that spools it has passed
        s.proc.kill()
        s.proc.wait()
        await ws.close()
    s2 = serve(toml)
    rows = rows_by_id(s2.rows())
    assert s2.stop() == 0
    assert set(rows) == {"ws-1.1", "ws-1.2"}
    assert (rows["ws-1.1"]["status"], rows["ws-1.1"]["upstream"]) == (200, "mock")
    lost = rows["ws-1.2"]
    assert (lost["status"], lost["error_type"], lost["model"], lost["endpoint"]) == (
        499, "worker_lost", "gpt-test", "/v1/responses")


@pytest.mark.sqlite_only("the spool lines of a writer on an SQLite file, recovered into it")
async def test_start_lines_one_per_turn_and_recovered(tmp_path: Path) -> None:
    """The requests that start in one loop turn and are still running at
    its end share one compact spool line (a full 26-column row each cost
    the hot path a snapshot and an encode per request); recovery turns each
    of them into a worker_lost row with its key, model, upstream and size,
    and a request that finished after its start line gets only its own row.
    (test_a_recovered_spool_is_never_recovered_twice reads the full ``s``
    lines of files written by the previous version.)"""
    db = tmp_path / "gateway.db"
    connect(db).close()
    writer = UsageWriter(db, UsageConfig(), spool=spool_dir(db))
    spool = writer._spool
    assert spool is not None
    key = KeyInfo(7, 3, "ws", "k", "gw-abc", "default", 1.0, frozenset(), None, None, None, None, None, None, None)
    ctxs = []
    for i in range(40):
        ctx = RequestContext(f"run-{i}", time.perf_counter(), endpoint="/v1/chat/completions", key=key,
                             model="gpt-test", upstream="mock", stream=i % 2 == 1, bytes_in=100 + i)
        ctx.seq = writer.begin(ctx)
        ctxs.append(ctx)
    await asyncio.sleep(0)  # the end of the turn: its lines are written
    done = ctxs.pop(0)
    done.status = 200
    writer.record(done.row(time.perf_counter()), done.seq)
    await asyncio.sleep(0)
    data = (spool.directory / spool.name).read_bytes()
    lines = data.splitlines()
    assert [orjson.loads(line)[0] for line in lines] == ["b", "d"]
    assert len(lines[0]) < 40 * 100, "start records as long as full rows"
    os.close(spool.fd)  # the process dies: its lock goes with it
    conn = connect(db)
    assert recover(conn, spool.directory) == 40
    rows = rows_by_id(conn.execute("SELECT * FROM usage_events").fetchall())
    conn.close()
    assert (rows["run-0"]["status"], rows["run-0"]["error_type"]) == (200, None)
    for i in range(1, 40):
        r = rows[f"run-{i}"]
        assert (r["status"], r["error_type"], r["workspace_id"], r["key_id"], r["model"], r["upstream"]) == (
            499, "worker_lost", 3, 7, "gpt-test", "mock")
        assert (r["endpoint"], r["stream"], r["bytes_in"], r["input_tokens"], r["cost"]) == (
            "/v1/chat/completions", i % 2, 100 + i, 0, 0.0)
        assert r["ts"] == ctxs[i - 1].ts
    await writer._sink.close()
