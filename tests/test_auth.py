"""Key authentication: a key works on its first request, before any cache
refresh, in every worker; unknown keys cannot make the gateway flood its
database; revoked and expired keys stay refused."""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.auth import LOOKUPS_PER_S
from gateway.store import queries

from .conftest import ADMIN_TOKEN, ConfigFiles, Gateway, GatewayFactory, Upstream, config_toml
from .test_cli import ENV, free_port, gw, wait_http, write_config

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
# The cache refreshes once a minute: anything that works within the test
# worked without a refresh.
SLOW_REFRESH = "key_refresh_ms = 60000"


async def slow_gateway(make_gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    return await make_gateway(config_toml(upstream.base_url).replace("key_refresh_ms = 100", SLOW_REFRESH))


async def status(http: aiohttp.ClientSession, url: str, key: str, *, new_connection: bool = False) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    if new_connection:
        headers["Connection"] = "close"
    async with http.post(url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
        await r.read()
        return r.status


async def lookups(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return {m[1]: float(m[2]) for m in re.finditer(r'^gateway_key_lookups_total\{result="(\w+)"\} (\S+)$', text, re.M)}


def random_key() -> str:
    return queries.new_key()


async def test_a_new_key_works_on_its_first_request(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """Before the fix a key was refused (401) until the next refresh."""
    gw = await slow_gateway(make_gateway, upstream)
    key = await gw.write(lambda conn: gw.create_key("acme", conn=conn))
    assert await status(http, gw.url, key) == 200
    async with http.get(gw.url + "/v1/models", headers={"x-api-key": key}) as r:
        assert r.status == 200
    # On PostgreSQL the key's NOTIFY may bring it into the cache first.
    found = (await lookups(http, gw.url)).get("found")
    assert found == 1.0 or (gw.postgres and found is None), "looked up once, then served from memory"


async def test_a_key_from_the_admin_api_works_at_once(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    gw = await slow_gateway(make_gateway, upstream)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.post(gw.url + "/admin/api/workspaces", json={"name": "acme"}, headers=admin) as r:
        ws = await r.json()
    async with http.post(gw.url + "/admin/api/keys", json={"workspace_id": ws["id"]}, headers=admin) as r:
        key = (await r.json())["plaintext"]
    assert await status(http, gw.url, key) == 200


async def test_concurrent_first_requests_share_one_lookup(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await slow_gateway(make_gateway, upstream)
    key = await gw.write(lambda conn: gw.create_key("acme", conn=conn))
    assert await asyncio.gather(*(status(http, gw.url, key) for _ in range(20))) == [200] * 20
    found = (await lookups(http, gw.url)).get("found")
    assert found == 1.0 or (gw.postgres and found is None)  # NOTIFY may come first on PostgreSQL


async def test_unknown_keys_cannot_flood_the_database(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await slow_gateway(make_gateway, upstream)
    # Not the shape of a key: refused without a lookup.
    for bad in ("sk-not-ours", "gw-short", "gw-" + "!" * 43, random_key() + "x", random_key()[:-1]):
        assert await status(http, gw.url, bad) == 401
    assert await lookups(http, gw.url) == {}

    # Well-formed, unknown, all at once: a bounded number reach the database.
    keys = [random_key() for _ in range(200)]
    assert set(await asyncio.gather(*(status(http, gw.url, k) for k in keys))) == {401}
    seen = await lookups(http, gw.url)
    assert 1 <= seen["unknown"] <= 2 * LOOKUPS_PER_S, seen  # at most two one-second windows
    assert seen["throttled"] == 200 - seen["unknown"]

    # An unknown key asked again is answered from the negative cache.
    await asyncio.sleep(1.1)  # a fresh window
    repeated = random_key()
    for _ in range(10):
        assert await status(http, gw.url, repeated) == 401
    again = await lookups(http, gw.url)
    assert again["unknown"] == seen["unknown"] + 1 and again["throttled"] == seen["throttled"]


async def test_revoked_and_expired_keys_are_not_brought_back(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await slow_gateway(make_gateway, upstream)

    def revoked(conn: object) -> str:
        key = gw.create_key("acme", conn=conn)  # type: ignore[arg-type]
        conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = 1", (time.time(),))  # type: ignore[attr-defined]
        return key

    key = await gw.write(revoked)
    if gw.postgres:  # the insert's NOTIFY may have brought it into the cache: the revocation's follows
        deadline = time.monotonic() + 1.0
        while await status(http, gw.url, key) != 401 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    for _ in range(3):
        assert await status(http, gw.url, key) == 401
    # Expired: known to the database, refused, and asked for only once.
    expired = await gw.write(lambda conn: gw.create_key("acme", conn=conn, expires_at=time.time() + 0.5))
    assert await status(http, gw.url, expired) == 200
    await asyncio.sleep(0.6)
    for _ in range(5):
        assert await status(http, gw.url, expired) == 401
    # On PostgreSQL the key's NOTIFY may bring it into the cache first.
    found = (await lookups(http, gw.url)).get("found")
    assert found == 1.0 or (gw.postgres and found is None), "looked up once at most, then refused from memory"


async def test_a_new_key_works_at_once_in_every_worker(
    tmp_path: Path, upstream: Upstream, config_files: ConfigFiles
) -> None:
    """Two workers, each with its own cache; every first request on a new
    connection lands on one or the other."""
    port = free_port()
    cfg = write_config(tmp_path, upstream, port, config_files)
    cfg.write_text(cfg.read_text().replace("key_refresh_ms = 100", SLOW_REFRESH) + "\n")
    text = cfg.read_text().replace("[server]\n", "[server]\nworkers = 2\n", 1)
    cfg.write_text(text)
    server = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)], cwd=tmp_path,
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + "/readyz")
        gw("workspaces", "create", "acme", "--config", str(cfg), cwd=tmp_path)
        keys = [gw("keys", "create", "--workspace", "acme", "--config", str(cfg), cwd=tmp_path)
                .stdout.strip().splitlines()[-1] for _ in range(3)]
        async with aiohttp.ClientSession() as http:
            for key in keys:
                got = [await status(http, base, key, new_connection=True) for _ in range(8)]
                assert got == [200] * 8
    finally:
        server.terminate()
        assert server.wait(30) == 0


def test_the_key_shape_is_the_one_keys_are_made_in() -> None:
    from gateway.auth import well_formed

    assert all(well_formed(queries.new_key()) for _ in range(200))
    assert not well_formed("gw-" + secrets.token_urlsafe(31))
