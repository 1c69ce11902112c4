"""Moving an SQLite installation to PostgreSQL with the real CLI:
``gateway migrate``, ``gateway import`` and ``gateway export-usage`` as
subprocesses; every row arrives, every key keeps working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from gateway.config import DatabaseConfig
from gateway.store import catalog
from gateway.store.base import open_store
from gateway.store.tx import run_sqlite

from .conftest import UPSTREAM_KEY, Gateway, GatewayFactory, Upstream, config_toml
from .test_accounts import Console


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


@pytest.mark.sqlite_only("moves an SQLite installation (its first gateway runs on SQLite)")
async def test_console_accounts_move_to_postgres(
    pg_database: str, make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """Users keep their passwords, roles and keys, open invitation links keep
    working, the audit log comes along; sessions do not (everyone signs in
    again), and new rows after the move get new ids."""
    old = await make_gateway(config_toml(upstream.base_url))
    await old.add_user("o@example.com", team="owner")
    member = await old.add_user("m@example.com", team="member")
    ws = old.conn.execute("SELECT id FROM workspaces WHERE name = 'team'").fetchone()[0]
    _, key = await old.write(lambda conn: run_sqlite(
        conn, lambda tx: catalog.create_key(tx, ws, name="m's", user_id=member), write=True))
    owner = Console(old)
    try:
        await owner.sign_in("o@example.com")
        made = await owner.call("POST", "/invitations", {"email": "new@example.com", "workspace_id": ws}, expect=201)
        token = made["link"].split("#invite=")[1]
        await old.stop()
        pg_toml = tmp_path / "pg.toml"
        pg_toml.write_text(config_toml(upstream.base_url).replace(
            'path = "gateway.db"', f'path = "pg-spool.db"\nurl = "{pg_database}"'))
        r = cli("import", str(tmp_path / "gateway.db"), "--config", "pg.toml", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "2 users" in r.stdout and "2 memberships" in r.stdout and "1 invitations" in r.stdout, r.stdout

        new = await make_gateway(pg_toml.read_text(), "pg.toml")
        owner.gw = new  # the same browser, the same cookie: the session did not move
        status, _ = await owner.raw("GET", "/session")
        assert status == 401
        await owner.sign_in("o@example.com")
        log = await owner.call("GET", "/audit", workspace_id=ws)
        assert "invitation.create" in [row["action"] for row in log["items"]]
        m = Console(new)
        try:
            me = await m.sign_in("m@example.com")
            assert [(w["name"], w["role"]) for w in me["workspaces"]] == [("team", "member")]
            await new.wait_key_live(key)
            invitee = await m.call("POST", "/invitation/accept", {"token": token, "password": "long enough pw"})
            assert invitee["user"]["id"] > member and invitee["workspaces"][0]["role"] == "member"
        finally:
            await m.close()
        members = await owner.call("GET", f"/workspaces/{ws}/members")
        assert {u["email"] for u in members["data"]} == {"o@example.com", "m@example.com", "new@example.com"}
    finally:
        await owner.close()
    conn = await asyncpg.connect(pg_database)
    try:
        assert await conn.fetchval("SELECT user_id FROM api_keys WHERE name = $1", "m's") == member
    finally:
        await conn.close()
