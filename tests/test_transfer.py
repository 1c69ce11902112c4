"""Moving an SQLite installation to PostgreSQL with the real CLI:
``gateway migrate``, ``gateway import`` and ``gateway export-usage`` as
subprocesses; every row arrives, every key keeps working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.config import DatabaseConfig
from gateway.store import catalog
from gateway.store.base import open_store

from .conftest import UPSTREAM_KEY, Gateway, GatewayFactory, Upstream, config_toml


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


async def traffic(gw: Gateway, key: str, n: int) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(gw.url + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}", "x-request-id": f"t{i}"}) as r:
                assert r.status == 200


@pytest.mark.sqlite_only("moves an SQLite installation (its first gateway runs on SQLite)")
async def test_sqlite_installation_moves_to_postgres(
    pg_database: str, make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    old = await make_gateway(config_toml(upstream.base_url))
    key = await old.key(rpm=100)
    await traffic(old, key, 25)
    await old.wait_usage(25)
    await old.stop()
    sqlite_export = tmp_path / "sqlite.jsonl"
    r = cli("export-usage", "--config", "gateway.toml", "--out", str(sqlite_export), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    exported = [orjson.loads(line) for line in sqlite_export.read_bytes().splitlines()]
    assert len(exported) >= 25

    pg_toml = tmp_path / "pg.toml"
    pg_toml.write_text(config_toml(upstream.base_url).replace(
        'path = "gateway.db"', f'path = "pg-spool.db"\nurl = "{pg_database}"'))
    r = cli("migrate", "--config", "pg.toml", cwd=tmp_path)
    assert r.returncode == 0 and "schema version" in r.stdout and "was 0" in r.stdout, r.stdout + r.stderr
    r = cli("import", str(tmp_path / "gateway.db"), "--config", "pg.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{len(exported)} usage_events" in r.stdout and "1 api_keys" in r.stdout
    # A second import would double the rows: refused, nothing changes.
    r = cli("import", str(tmp_path / "gateway.db"), "--config", "pg.toml", cwd=tmp_path)
    assert r.returncode == 1 and "already holds usage rows" in r.stderr

    pg_export = tmp_path / "pg.jsonl"
    r = cli("export-usage", "--config", "pg.toml", "--out", str(pg_export), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [orjson.loads(line) for line in pg_export.read_bytes().splitlines()] == exported

    # The key works on the new database, and the rollups were built.
    new = await make_gateway(pg_toml.read_text(), "pg.toml")
    await new.wait_key_live(key)
    await traffic(new, key, 1)
    await new.stop()  # flushes its queue
    store = await open_store(DatabaseConfig(tmp_path / "x.db", pg_database))
    try:
        totals = await store.run(catalog.key_usage_totals)
        assert sum(t["requests"] for t in totals.values()) >= 26
        rows = await store.usage_rows(limit=100000)
        assert len(rows) >= len(exported) + 2  # the new keycheck and t0
        assert len({r["id"] for r in rows}) == len(rows)  # new ids start past the imported ones
    finally:
        await store.close()


async def test_export_file_imports_into_postgres(
    pg_database: str, make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url))
    await traffic(gw, await gw.key(), 10)
    await gw.wait_usage(10)
    await gw.stop()
    out = tmp_path / "usage.jsonl"
    assert cli("export-usage", "--config", "gateway.toml", "--out", str(out), cwd=tmp_path).returncode == 0
    (tmp_path / "pg.toml").write_text(config_toml(upstream.base_url).replace(
        'path = "gateway.db"', f'path = "pg-spool.db"\nurl = "{pg_database}"'))
    r = cli("import", str(out), "--config", "pg.toml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    n = len(out.read_bytes().splitlines())
    assert f"imported {n} usage_events" in r.stdout
