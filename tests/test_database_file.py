"""The database file removed or replaced under a running gateway (issue 11,
item 11): the gateway notices (an inode check on every usage batch), fails
/readyz, logs an error, writes nothing more to the dead file, and keeps
every usage row in its spool, which the next start writes into the file
then at the path, exactly once."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from gateway.store.spool import spool_dir

from .conftest import Gateway, GatewayFactory, Upstream, config_toml
from .test_task_records import creates
from .test_tasks import TASKS, tasks_toml

pytestmark = pytest.mark.sqlite_only("the SQLite file removed or replaced under a running gateway")

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def chat(http: aiohttp.ClientSession, gw: Gateway, key: str, rid: str) -> None:
    headers = {"Authorization": f"Bearer {key}", "x-request-id": rid}
    async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
        assert r.status == 200, await r.text()


async def ready(http: aiohttp.ClientSession, gw: Gateway) -> tuple[int, str]:
    async with http.get(gw.url + "/readyz") as r:
        return r.status, (await r.json())["status"]


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with_suffix = path.with_name(path.name + suffix)
        if with_suffix.exists():
            with_suffix.unlink()


def request_ids(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute(
            "SELECT request_id FROM usage_events WHERE request_id NOT IN ('keycheck') ORDER BY id")]
    finally:
        conn.close()


async def test_database_removed_rows_kept_in_spool_and_written_on_next_start(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    toml = tasks_toml(upstream, poller=False)
    gw = await make_gateway(toml)
    key = await gw.key()
    for i in range(5):
        await chat(http, gw, key, f"before-{i}")
    await gw.wait_usage(5)
    assert await ready(http, gw) == (200, "ready")
    gw.conn.close()
    gw._conn = None

    remove_database(gw.db_path)
    with caplog.at_level(logging.ERROR, logger="gateway.store"):
        for i in range(10):
            await chat(http, gw, key, f"after-{i}")  # keys are in memory: still answered
        for _ in range(100):
            if await ready(http, gw) != (200, "ready"):
                break
            await asyncio.sleep(0.02)
    assert await ready(http, gw) == (503, "database_lost")
    assert any("removed or replaced" in r.getMessage() for r in caplog.records)
    # Task writes are refused too, before anything is started upstream.
    async with http.post(gw.url + TASKS, json={"model": "seedance", "prompt": "p"},
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "task_store_unavailable"
    assert creates(upstream) == 0

    await gw.stop()
    spools = list(spool_dir(gw.db_path).iterdir())
    assert len(spools) == 1, "the spool of rows never written to the live file was deleted"

    # The next start writes every row the deleted file took with it, once.
    gw2 = await make_gateway(toml)
    ids = request_ids(gw2.db_path)
    expected = [f"before-{i}" for i in range(5)] + [f"after-{i}" for i in range(10)]
    assert sorted(i for i in ids if i.startswith(("before", "after"))) == sorted(expected)
    assert await ready(http, gw2) == (200, "ready")
    await gw2.stop()
    assert list(spool_dir(gw.db_path).iterdir()) == []
    assert sorted(i for i in request_ids(gw2.db_path) if i.startswith(("before", "after"))) == sorted(expected)


async def test_database_replaced_by_a_backup_rows_written_once_into_it(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """An operator restores a backup taken earlier over the running
    gateway's file: rows the backup lacks (written after it, and after the
    restore) reach the restored file on the next start; rows it has are not
    written twice."""
    toml = config_toml(upstream.base_url)
    gw = await make_gateway(toml)
    key = await gw.key()
    for i in range(5):
        await chat(http, gw, key, f"a-{i}")
    await gw.wait_usage(5)
    backup = gw.db_path.with_name("backup.db")
    dst = sqlite3.connect(backup)
    gw.conn.backup(dst)
    dst.close()
    for i in range(5):
        await chat(http, gw, key, f"b-{i}")
    rows = await gw.wait_usage(10)
    assert [r["request_id"] for r in rows][-5:] == [f"b-{i}" for i in range(5)]
    gw.conn.close()
    gw._conn = None

    remove_database(gw.db_path)
    os.replace(backup, gw.db_path)
    for i in range(5):
        await chat(http, gw, key, f"c-{i}")
    for _ in range(100):
        if (await ready(http, gw))[0] == 503:
            break
        await asyncio.sleep(0.02)
    assert await ready(http, gw) == (503, "database_lost")
    await gw.stop()
    assert request_ids(gw.db_path) == [f"a-{i}" for i in range(5)]  # nothing written into the restored file

    gw2 = await make_gateway(toml)
    ids = [i for i in request_ids(gw2.db_path) if i[:2] in ("a-", "b-", "c-")]
    assert sorted(ids) == sorted(f"{p}-{i}" for p in "abc" for i in range(5))
    assert await ready(http, gw2) == (200, "ready")

