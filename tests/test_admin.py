"""Admin API: authorisation on every route, workspaces and keys, usage
aggregates, the request log, upstream health, and what it must never show."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import pytest

from gateway.admin import PREFIX
from gateway.store import queries

from .conftest import ADMIN_TOKEN, UPSTREAM_KEY, Gateway, GatewayFactory, Upstream, config_toml

CHAT = "/v1/chat/completions"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# The routes anyone may call: signing in, sign-up, invitations (each does
# its own checks: tests/test_accounts.py). Every other route needs the admin
# token or a console session.
PUBLIC_ROUTES = {("GET", "/signin-options"), ("POST", "/session"), ("POST", "/signup"),
                 ("POST", "/invitation/inspect"), ("POST", "/invitation/accept")}


def admin_routes(gw: Gateway, *, public: bool = False) -> list[tuple[str, str]]:
    """(method, concrete path) for every /admin/api route of the running app
    (the PUBLIC_ROUTES only with ``public``)."""
    out = []
    for route in gw.running.runner.app.router.routes():
        resource = route.resource
        if resource is None or not resource.canonical.startswith(PREFIX + "/"):
            continue
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: "1" if m[1] == "id" else "x", resource.canonical)
        methods = ["GET", "POST", "PATCH", "DELETE"] if route.method == "*" else [route.method]
        out.extend((m, path) for m in methods if public or (m, path[len(PREFIX):]) not in PUBLIC_ROUTES)
    return out


async def api(http: aiohttp.ClientSession, gw: Gateway, method: str, path: str, body: Any = None,
              expect: int = 200, **params: Any) -> Any:
    async with http.request(method, gw.url + PREFIX + path, json=body, headers=ADMIN,
                            params={k: str(v) for k, v in params.items()}) as r:
        data = await r.json()
        assert r.status == expect, data
        return data


async def test_every_admin_route_refuses_missing_or_wrong_token(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    # Hundreds of wrong tokens from one address: more than throttling allows
    # by default (test_accounts tests that).
    admin_gateway = await make_gateway(config_toml(upstream.base_url,
                                                   "[console]\nlogin_failures_per_address = 10000\n"))
    routes = admin_routes(admin_gateway)
    assert len(routes) >= 30
    public = set(admin_routes(admin_gateway, public=True)) - set(routes)
    assert {(m, p[len(PREFIX):]) for m, p in public} == PUBLIC_ROUTES
    bad = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
           {"Authorization": f"Bearer {ADMIN_TOKEN}x"}, {"Authorization": f"Basic {ADMIN_TOKEN}"},
           {"Authorization": ADMIN_TOKEN}, {"x-api-key": ADMIN_TOKEN}]
    for method, path in routes:
        for headers in bad:
            async with http.request(method, admin_gateway.url + path, headers=headers, json={}) as r:
                assert r.status == 401, (method, path, headers)
                assert (await r.json())["error"]["code"] == "invalid_admin_token"
                assert r.headers["X-Content-Type-Options"] == "nosniff"
        async with http.request(method, admin_gateway.url + path, headers=ADMIN, json={}) as r:
            assert r.status != 401, (method, path)
    # Admin traffic is not /v1 traffic: no usage rows.
    await asyncio.sleep(0.1)
    assert admin_gateway.usage_rows() == []


async def test_admin_disabled_without_a_token(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    gw = await make_gateway(config_toml(upstream.base_url))
    for method, path in admin_routes(gw):
        for headers in ({}, ADMIN, {"Authorization": "Bearer "}):
            async with http.request(method, gw.url + path, headers=headers, json={}) as r:
                assert r.status == 401, (method, path)


async def test_workspaces_and_keys_lifecycle(admin_gateway: Gateway, http: aiohttp.ClientSession) -> None:
    gw = admin_gateway
    ws = await api(http, gw, "POST", "/workspaces", {"name": "team-a", "monthly_token_limit": 1000}, expect=201)
    assert ws["name"] == "team-a" and ws["default_group"] == "default" and ws["monthly_token_limit"] == 1000
    await api(http, gw, "POST", "/workspaces", {"name": "team-a"}, expect=409)
    await api(http, gw, "POST", "/workspaces", {"name": ""}, expect=400)
    err = await api(http, gw, "PATCH", f"/workspaces/{ws['id']}", {"default_group": "nope"}, expect=400)
    assert "unknown group" in err["error"]["message"]
    ws = await api(http, gw, "PATCH", f"/workspaces/{ws['id']}",
                   {"default_group": "cheap", "monthly_spend_limit": 12.5, "monthly_token_limit": None})
    assert (ws["default_group"], ws["monthly_spend_limit"], ws["monthly_token_limit"]) == ("cheap", 12.5, None)
    assert [w["name"] for w in (await api(http, gw, "GET", "/workspaces"))["data"]] == ["team-a"]
    await api(http, gw, "GET", "/workspaces/999", expect=404)

    created = await api(http, gw, "POST", "/keys", {
        "workspace_id": ws["id"], "name": "ci", "allowed_models": ["gpt-test"], "rpm": 60, "tpm": 1000,
        "max_concurrency": 2, "spend_limit": 5, "expires_at": "2999-01-01T00:00:00Z",
    }, expect=201)
    plaintext, key = created["plaintext"], created["key"]
    assert plaintext.startswith(key["prefix"]) and len(plaintext) >= 40
    assert (key["rpm"], key["tpm"], key["max_concurrency"], key["spend_limit"]) == (60, 1000, 2, 5)
    assert key["allowed_models"] == ["gpt-test"] and key["status"] == "active"
    await api(http, gw, "POST", "/keys", {"workspace_id": ws["id"], "rpm": -1}, expect=400)
    await api(http, gw, "POST", "/keys", {"workspace_id": 999}, expect=404)
    await api(http, gw, "POST", "/keys", {"workspace_id": ws["id"], "expires_at": "24h"}, expect=400)

    # The key works, limited to its model (the group 'cheap' allows gpt-*).
    await gw.wait_key_live(plaintext)
    async with http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {plaintext}"}) as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["gpt-test"]

    key = await api(http, gw, "PATCH", f"/keys/{key['id']}", {"rpm": 120, "allowed_models": None, "name": "ci-2"})
    assert (key["rpm"], key["allowed_models"], key["name"]) == (120, None, "ci-2")
    await api(http, gw, "PATCH", f"/keys/{key['id']}", {"key_hash": "x"}, expect=400)
    assert (await api(http, gw, "PATCH", f"/keys/{key['id']}", {"name": None}))["name"] == ""
    await api(http, gw, "PATCH", f"/keys/{key['id']}", {"tpm": 1.5}, expect=400)
    await api(http, gw, "PATCH", f"/keys/{key['id']}", {"allowed_models": "gpt-test"}, expect=400)

    listed = (await api(http, gw, "GET", "/keys", workspace_id=ws["id"]))["data"]
    assert [k["id"] for k in listed] == [key["id"]]
    # Its only traffic so far: wait_key_live's and the model list above (GET /v1/models).
    await asyncio.sleep(0.1)  # > usage.flush_interval_ms
    n = gw.conn.execute("SELECT COUNT(*) FROM usage_events WHERE key_id = ?", (key["id"],)).fetchone()[0]
    listed = (await api(http, gw, "GET", "/keys", workspace_id=ws["id"]))["data"]
    assert n >= 2 and listed[0]["usage"] == {"requests": n, "input_tokens": 0, "output_tokens": 0, "cost": 0}
    assert listed[0]["last_used"] is not None

    revoked = await api(http, gw, "DELETE", f"/keys/{key['id']}")
    assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None
    t0 = time.monotonic()
    while True:
        async with http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {plaintext}"}) as r:
            if r.status == 401:
                break
        assert time.monotonic() - t0 < 2.0, "revoked key still works after 2 s"
        await asyncio.sleep(0.05)
    await api(http, gw, "POST", "/keys/12345/revoke", expect=404)


async def chat(http: aiohttp.ClientSession, gw: Gateway, key: str, model: str = "gpt-test",
               headers: dict[str, str] | None = None) -> int:
    async with http.post(gw.url + CHAT, json={"model": model, "messages": [{"role": "user", "content": "a b c"}]},
                         headers={"Authorization": f"Bearer {key}", **(headers or {})}) as r:
        await r.read()
        return r.status


async def test_usage_aggregates_and_request_log(admin_gateway: Gateway, http: aiohttp.ClientSession) -> None:
    gw = admin_gateway
    k1 = await gw.key("acme", name="one")
    k2 = await gw.key("other", name="two")
    statuses = [await chat(http, gw, k1) for _ in range(3)]
    statuses += [await chat(http, gw, k1, "renamed")]
    statuses += [await chat(http, gw, k2, headers={"x-mock-status": "500"}) for _ in range(2)]
    statuses += [await chat(http, gw, "gw-not-a-key")]
    assert statuses == [200, 200, 200, 200, 500, 500, 401]
    await gw.wait_usage(7)
    # Every row, with those of wait_key_live's polling (GET /v1/models).
    rows = [dict(r) for r in gw.conn.execute("SELECT * FROM usage_events")]
    keys = {k["name"]: k for k in (await api(http, gw, "GET", "/keys"))["data"]}

    # The writer's rollups answer the aggregates: wait until they are flushed.
    data = (await api(http, gw, "GET", "/usage", bucket="total", by="model"))["data"]
    by_model = {d["model"]: d for d in data}
    assert by_model["gpt-test"]["requests"] == 5 and by_model["gpt-test"]["errors"] == 2
    assert by_model["gpt-test"]["server_errors"] == 2
    assert by_model["renamed"]["requests"] == 1
    ok_rows = [r for r in rows if r["model"] == "gpt-test" and r["status"] == 200]
    assert by_model["gpt-test"]["input_tokens"] == sum(r["input_tokens"] for r in ok_rows)
    assert by_model["gpt-test"]["cost"] == pytest.approx(sum(r["cost"] for r in rows if r["model"] == "gpt-test"))
    lat = sorted(r["latency_ms"] for r in rows if r["model"] == "gpt-test")
    p50 = by_model["gpt-test"]["p50_latency_ms"]
    assert lat[0] * 0.7 <= p50 <= lat[-1] * 1.4  # a histogram estimate, within one bin
    assert by_model["gpt-test"]["p95_ttfb_ms"] is not None
    assert sum(d["requests"] for d in data) == len(rows)
    assert by_model[None]["requests"] == sum(1 for r in rows if r["model"] is None)

    minute = (await api(http, gw, "GET", "/usage", bucket="minute"))["data"]
    assert sum(d["requests"] for d in minute) == len(rows)
    assert all(d["t"] % 60 == 0 for d in minute)

    by_key = {d["key"]: d for d in (await api(http, gw, "GET", "/usage", bucket="day", by="key"))["data"]}
    def count(key: str, **match: Any) -> int:
        return sum(1 for r in rows if r["key_id"] == keys[key]["id"] and all(r[k] == v for k, v in match.items()))

    assert by_key[keys["one"]["id"]]["requests"] == count("one")
    assert by_key[keys["two"]["id"]]["requests"] == count("two")
    only_two = (await api(http, gw, "GET", "/usage", bucket="hour", key_id=keys["two"]["id"], model="gpt-test"))
    assert sum(d["requests"] for d in only_two["data"]) == count("two", model="gpt-test") == 2
    err = await api(http, gw, "GET", "/usage", bucket="minute", by="key", expect=400)
    assert "minute" in err["error"]["message"]
    await api(http, gw, "GET", "/usage", bucket="week", expect=400)
    await api(http, gw, "GET", "/usage", since="yesterday", expect=400)

    # Key list carries usage totals and last use.
    one = (await api(http, gw, "GET", f"/keys/{keys['one']['id']}"))
    assert one["usage"]["requests"] == count("one") and one["last_used"] == pytest.approx(
        max(r["ts"] for r in rows if r["key_id"] == one["id"]))

    # Request log: pages of 2 cover every row once, newest first.
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = await api(http, gw, "GET", "/requests", **params)
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(r["id"] for r in rows) and len(seen) == len(set(seen))
    first = (await api(http, gw, "GET", "/requests", limit=1))["items"][0]
    assert first["status"] == 401 and first["key_id"] is None
    errors = (await api(http, gw, "GET", "/requests", status="5xx"))["items"]
    assert [e["status"] for e in errors] == [500, 500] and {e["key_name"] for e in errors} == {"two"}
    assert {e["workspace"] for e in errors} == {"other"}
    renamed = (await api(http, gw, "GET", "/requests", model="renamed"))["items"]
    assert len(renamed) == 1 and renamed[0]["upstream"] == "mock"
    by_key_log = (await api(http, gw, "GET", "/requests", key_id=keys["one"]["id"]))["items"]
    assert len(by_key_log) == count("one") and {r["key_prefix"] for r in by_key_log} == {keys["one"]["prefix"]}
    assert (await api(http, gw, "GET", "/requests", since=time.time() + 3600))["items"] == []
    await api(http, gw, "GET", "/requests", cursor="garbage", expect=400)
    await api(http, gw, "GET", "/requests", status="teapot", expect=400)

    up = (await api(http, gw, "GET", "/upstreams"))["data"]
    assert [u["name"] for u in up] == ["mock"]
    assert up[0]["recent"]["requests"] == 6 and up[0]["recent"]["server_errors"] == 2
    assert up[0]["recent"]["error_rate"] == pytest.approx(2 / 6)
    assert up[0]["credential_configured"] is True and "gpt-test" in up[0]["models"]


async def test_admin_never_shows_hashes_or_upstream_secrets(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    # A base URL with user info and a query: neither may be shown.
    url = upstream.base_url.replace("http://", "http://user:pa55word@") + "?token=qs-secret"
    gw = await make_gateway(config_toml(url))
    key = await gw.key()
    await chat(http, gw, key)
    await gw.wait_usage(1)
    await api(http, gw, "POST", "/keys", {"workspace": "acme"}, expect=201)
    hashes = [r[0] for r in gw.conn.execute("SELECT key_hash FROM api_keys")]
    assert len(hashes) == 2
    bodies = []
    for method, path in admin_routes(gw):
        if method == "GET" and not re.search(r"/(1|x)(/|$)", path):
            async with http.get(gw.url + path, headers=ADMIN) as r:
                assert r.status == 200, path
                bodies.append(await r.text())
    for path in ("/keys/1", "/workspaces/1", "/workspaces/1/members"):
        bodies.append(await (await http.get(gw.url + PREFIX + path, headers=ADMIN)).text())
    text = "\n".join(bodies)
    for secret in (*hashes, key, UPSTREAM_KEY, "pa55word", "qs-secret", "key_hash"):
        assert secret not in text
    assert upstream.base_url in text  # the URL itself is shown, cleaned


async def test_console_is_served_from_the_package(admin_gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(admin_gateway.url + "/console", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "/console/"
    async with http.get(admin_gateway.url + "/console/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        html = await r.text()
    # Every script and stylesheet is local: no network needed.
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(not a.startswith(("http:", "https:", "//")) for a in assets)
    for a in assets:
        async with http.get(admin_gateway.url + "/console/" + a) as r:
            assert r.status == 200, a
    async with http.get(admin_gateway.url + "/console/%2e%2e/admin.py") as r:
        assert r.status == 404


def test_key_rows_never_carry_the_hash(tmp_path: Any) -> None:
    from gateway.store.schema import connect

    conn = connect(tmp_path / "k.db")
    ws = queries.create_workspace(conn, "w")
    row, _ = queries.create_key(conn, ws["id"])
    assert "key_hash" not in row and all("key_hash" not in k for k in queries.list_keys(conn))


async def test_reload_applies_a_good_file_and_refuses_a_bad_one(
    admin_gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    assert (await api(http, admin_gateway, "GET", "/config"))["reload_available"] is True
    path = admin_gateway.config.source
    assert path is not None
    async with http.post(admin_gateway.url + "/admin/api/reload") as r:
        assert r.status == 401
    extra = '[[models]]\nname = "added-by-reload"\nroutes = [{ upstream = "mock" }]\n'
    path.write_text(config_toml(upstream.base_url, extra))
    ok = await api(http, admin_gateway, "POST", "/reload")
    assert ok["status"] == "reloaded" and ok["models"] == 4
    assert "added-by-reload" in (await api(http, admin_gateway, "GET", "/config"))["models"]
    path.write_text(config_toml(upstream.base_url).replace('kind = "openai"', 'kind = "bogus"'))
    err = await api(http, admin_gateway, "POST", "/reload", expect=400)
    assert "upstreams[0].kind" in err["error"]["message"]
    assert "added-by-reload" in (await api(http, admin_gateway, "GET", "/config"))["models"]


async def test_a_key_cannot_be_created_or_set_to_expire_in_the_past(
    admin_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    gw = admin_gateway
    ws = await api(http, gw, "POST", "/workspaces", {"name": "past"}, expect=201)
    for past in ("2000-01-01T00:00:00Z", time.time() - 1):
        err = await api(http, gw, "POST", "/keys", {"workspace_id": ws["id"], "expires_at": past}, expect=400)
        assert "in the past" in err["error"]["message"]
    assert (await api(http, gw, "GET", "/keys"))["data"] == []
    key = (await api(http, gw, "POST", "/keys", {"workspace_id": ws["id"]}, expect=201))["key"]
    await api(http, gw, "PATCH", f"/keys/{key['id']}", {"expires_at": "2000-01-01"}, expect=400)
    soon = await api(http, gw, "PATCH", f"/keys/{key['id']}", {"expires_at": time.time() + 3600})
    assert soon["status"] == "active" and soon["expires_at"] > time.time()


async def test_a_bug_is_a_500_and_only_an_unreachable_database_a_503(
    admin_gateway: Gateway, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    """A statement that cannot work (here: a table gone from the schema) is
    a bug: 500 internal_error without a traceback in the answer (it goes to
    the log), not a 503 that would have the client retry for ever."""
    gw = admin_gateway
    await gw.write(lambda conn: conn.execute("ALTER TABLE invitations RENAME TO invitations_gone"))
    async with http.get(gw.url + PREFIX + "/invitations", headers=ADMIN) as r:
        text = await r.text()
        assert r.status == 500 and "Retry-After" not in r.headers
    assert (await r.json(content_type=None))["error"]["code"] == "internal_error"
    assert "Traceback" not in text and "invitations" not in text
    assert any(rec.exc_info and "unhandled error in admin GET" in rec.getMessage() for rec in caplog.records)


@pytest.mark.sqlite_only("the database file removed under a running gateway")
async def test_a_removed_database_file_is_a_503_not_a_fresh_database(
    admin_gateway: Gateway, http: aiohttp.ClientSession,
) -> None:
    """Once the SQLite file is removed, admin reads and writes answer 503
    database_unavailable: they neither see nor write a new empty file made
    at the path (gateway.store.dbfile)."""
    gw = admin_gateway
    await api(http, gw, "POST", "/workspaces", {"name": "acme"}, expect=201)
    for suffix in ("", "-wal", "-shm"):
        gw.db_path.with_name(gw.db_path.name + suffix).unlink(missing_ok=True)
    for method, body in (("GET", None), ("POST", {"name": "other"})):
        async with http.request(method, gw.url + PREFIX + "/workspaces", json=body, headers=ADMIN) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"]["code"] == "database_unavailable"
    assert not gw.db_path.exists()
