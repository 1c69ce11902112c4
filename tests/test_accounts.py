"""Console accounts on the admin API: every route with every role, sessions,
CSRF, sign-in throttling, invitations, members, disabling, the audit log,
and what a user-controlled string can and cannot do."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.admin import PREFIX
from gateway.store.postgres.tx import WRITE_LOCK
from gateway.store.schema import connect
from gateway.store.sql import numbered

from .conftest import ADMIN_TOKEN, PASSWORD, FakeClock, Gateway, GatewayFactory, Upstream, config_toml
from .test_admin import ADMIN, PUBLIC_ROUTES
from .test_admin import api as operator  # calls with the operator token


class Console:
    """What a browser holds for one signed-in user: the cookie jar and the
    CSRF token, sent back on every change as the console does."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf: str | None = None
        self.me: dict[str, Any] = {}

    async def close(self) -> None:
        await self.http.close()

    async def raw(self, method: str, path: str, body: Any = None, *, csrf: bool = True,
                  headers: dict[str, str] | None = None, **params: Any) -> tuple[int, Any]:
        h = dict(headers or {})
        if csrf and self.csrf and method not in ("GET", "HEAD"):
            h["X-CSRF-Token"] = self.csrf
        async with self.http.request(method, self.gw.url + PREFIX + path, json=body, headers=h,
                                     params={k: str(v) for k, v in params.items()}) as r:
            return r.status, await r.json()

    async def call(self, method: str, path: str, body: Any = None, *, expect: int = 200, **kw: Any) -> Any:
        status, data = await self.raw(method, path, body, **kw)
        assert status == expect, (method, path, data)
        return data

    async def sign_in(self, email: str, password: str = PASSWORD, expect: int = 200) -> Any:
        data = await self.call("POST", "/session", {"email": email, "password": password}, expect=expect)
        if expect == 200:
            self.csrf, self.me = data["csrf_token"], data
        return data


@pytest.fixture
async def consoles() -> AsyncIterator[list[Console]]:
    made: list[Console] = []
    yield made
    for c in made:
        await c.close()


async def console(consoles: list[Console], gw: Gateway, email: str | None = None) -> Console:
    c = Console(gw)
    consoles.append(c)
    if email:
        await c.sign_in(email)
    return c


async def chat(http: aiohttp.ClientSession, gw: Gateway, key: str) -> int:
    async with http.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "gpt-test", "messages": [{"role": "user", "content": "a b c"}]}) as r:
        await r.read()
        return r.status


async def wait_status(http: aiohttp.ClientSession, gw: Gateway, key: str, status: int, within: float = 2.0) -> None:
    t0 = time.monotonic()
    while (got := await chat(http, gw, key)) != status:
        assert time.monotonic() - t0 < within, f"key still answers {got}, not {status}, after {within} s"
        await asyncio.sleep(0.05)


def key_id(gw: Gateway, plaintext: str) -> int:
    from gateway.store.queries import hash_key

    return int(gw.conn.execute("SELECT id FROM api_keys WHERE key_hash = ?", (hash_key(plaintext),)).fetchone()[0])


# ------------------------------------------------------------------ two tenants


class Tenants:
    """Workspaces A and B. In A: an owner and a member, each with a key;
    in B: a member with a key, a video task and an open invitation. Plus an
    admin user."""

    ws_a: int
    ws_b: int
    owner_a: int
    member_a: int
    member_b: int
    key_owner_a: str
    key_member_a: str
    key_b: str
    task_b: str
    inv_b: int


async def tenants(gw: Gateway, http: aiohttp.ClientSession) -> Tenants:
    t = Tenants()
    await gw.add_user("admin@example.com", admin=True)
    t.owner_a = await gw.add_user("owner-a@example.com", a="owner")
    t.member_a = await gw.add_user("member-a@example.com", a="member")
    t.member_b = await gw.add_user("member-b@example.com", b="member")
    t.ws_a = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'a'").fetchone()[0]
    t.ws_b = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'b'").fetchone()[0]
    t.key_owner_a = await gw.key("a", name="owner-a-key", user_id=t.owner_a)
    t.key_member_a = await gw.key("a", name="member-a-key", user_id=t.member_a)
    t.key_b = await gw.key("b", name="b-key", user_id=t.member_b)
    for key in (t.key_owner_a, t.key_member_a, t.key_b):
        assert await chat(http, gw, key) == 200
    await gw.wait_usage(3)
    t.task_b = "vt-of-b"
    now = time.time()
    gw.conn.execute(
        "INSERT INTO video_tasks (id, workspace_id, key_id, model, upstream, upstream_model, upstream_task_id, "
        "status, created_at, updated_at) VALUES (?, ?, ?, 'gpt-test', 'mock', 'gpt-test', 'up-1', 'queued', ?, ?)",
        (t.task_b, t.ws_b, key_id(gw, t.key_b), now, now))
    inv = await operator(http, gw, "POST", "/invitations", {"email": "new-b@example.com", "workspace_id": t.ws_b},
                         expect=201)
    t.inv_b = inv["invitation"]["id"]
    return t


def other_tenant_requests(t: Tenants, gw: Gateway) -> dict[tuple[str, str], tuple[str, Any, dict[str, Any]]]:
    """For every admin route: a request (path, body, query) aimed at
    workspace B's objects, or, for routes without an object, the plain call."""
    kb = key_id(gw, t.key_b)
    return {
        ("GET", "/workspaces"): ("/workspaces", None, {}),
        ("POST", "/workspaces"): ("/workspaces", {"name": "made-by-a"}, {}),
        ("GET", "/workspaces/{id}"): (f"/workspaces/{t.ws_b}", None, {}),
        ("PATCH", "/workspaces/{id}"): (f"/workspaces/{t.ws_b}", {"monthly_spend_limit": 1}, {}),
        ("GET", "/keys"): ("/keys", None, {"workspace_id": t.ws_b}),
        ("POST", "/keys"): ("/keys", {"workspace_id": t.ws_b, "name": "sneaky"}, {}),
        ("GET", "/keys/{id}"): (f"/keys/{kb}", None, {}),
        ("PATCH", "/keys/{id}"): (f"/keys/{kb}", {"name": "renamed"}, {}),
        ("DELETE", "/keys/{id}"): (f"/keys/{kb}", None, {}),
        ("POST", "/keys/{id}/revoke"): (f"/keys/{kb}/revoke", None, {}),
        ("GET", "/usage"): ("/usage", None, {"key_id": kb}),
        ("GET", "/requests"): ("/requests", None, {"workspace_id": t.ws_b}),
        ("GET", "/tasks"): ("/tasks", None, {"key_id": kb}),
        ("GET", "/tasks/{id}"): (f"/tasks/{t.task_b}", None, {}),
        ("GET", "/upstreams"): ("/upstreams", None, {}),
        ("GET", "/config"): ("/config", None, {}),
        ("POST", "/reload"): ("/reload", None, {}),
        ("GET", "/session"): ("/session", None, {}),
        ("PATCH", "/session"): ("/session", {}, {}),
        ("DELETE", "/session"): ("/session", None, {}),
        ("GET", "/users"): ("/users", None, {}),
        ("GET", "/users/{id}"): (f"/users/{t.member_b}", None, {}),
        ("PATCH", "/users/{id}"): (f"/users/{t.member_b}", {"disabled": True}, {}),
        ("GET", "/workspaces/{id}/members"): (f"/workspaces/{t.ws_b}/members", None, {}),
        ("PATCH", "/workspaces/{id}/members/{user_id}"):
            (f"/workspaces/{t.ws_b}/members/{t.member_b}", {"role": "owner"}, {}),
        ("DELETE", "/workspaces/{id}/members/{user_id}"): (f"/workspaces/{t.ws_b}/members/{t.member_b}", None, {}),
        ("POST", "/invitations"): ("/invitations", {"email": "x@example.com", "workspace_id": t.ws_b}, {}),
        ("GET", "/invitations"): ("/invitations", None, {"workspace_id": t.ws_b}),
        ("DELETE", "/invitations/{id}"): (f"/invitations/{t.inv_b}", None, {}),
        ("GET", "/audit"): ("/audit", None, {"workspace_id": t.ws_b}),
        ("GET", "/{tail}"): ("/no/such/thing", None, {}),
    }


# What A's member and A's owner get for B's objects: 404 for anything of B
# (the same as for a thing that does not exist), 403 for what their role
# may never do, 200 for calls that concern only themselves.
EXPECT = {
    ("POST", "/workspaces"): 403, ("GET", "/upstreams"): 403, ("POST", "/reload"): 403,
    ("PATCH", "/users/{id}"): 403, ("GET", "/workspaces"): 200, ("GET", "/config"): 200,
    ("GET", "/session"): 200, ("PATCH", "/session"): 200, ("DELETE", "/session"): 200, ("GET", "/users"): 200,
}
# The audit log is for owners: a member is refused outright.
EXPECT_MEMBER = {("GET", "/audit"): 403}


def canonical(path: str) -> str:
    return re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)[len(PREFIX):]


async def test_every_route_with_every_role(
    admin_gateway: Gateway, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    gw = admin_gateway
    t = await tenants(gw, http)
    table = other_tenant_requests(t, gw)

    # The table covers every route the app serves (a new route without an
    # entry fails here), public ones aside.
    routes = {(r.method, canonical(r.resource.canonical)) for r in gw.running.runner.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith(PREFIX + "/")}
    routes = {("GET", "/{tail}") if p == "/{tail}" else (m, p) for m, p in routes}
    assert routes - PUBLIC_ROUTES == set(table)

    # Sign-out last: it ends the session the rest of the walk uses.
    order = sorted(table, key=lambda r: r == ("DELETE", "/session"))
    anonymous = await console(consoles, gw)
    for role, email in (("member", "member-a@example.com"), ("owner", "owner-a@example.com")):
        c = await console(consoles, gw, email)
        for route in order:
            path, body, params = table[route]
            expected = EXPECT_MEMBER.get(route, 0) if role == "member" else 0
            expected = expected or EXPECT.get(route, 404)
            status, data = await anonymous.raw(route[0], path, body, **params)
            assert (status, data["error"]["code"]) == (401, "invalid_admin_token"), (route, data)
            status, data = await c.raw(route[0], path, body, **params)
            assert status == expected, (role, route, data)
            if status == 404:  # the same words as for something that does not exist
                assert "not found" in data["error"]["message"] or route == ("GET", "/{tail}"), data

    # Nothing of B changed, and nothing of B leaked into A's lists.
    b_key = gw.conn.execute("SELECT name, revoked_at FROM api_keys WHERE id = ?", (key_id(gw, t.key_b),)).fetchone()
    assert tuple(b_key) == ("b-key", None)
    assert gw.conn.execute("SELECT role FROM memberships WHERE user_id = ?", (t.member_b,)).fetchone()[0] == "member"
    assert gw.conn.execute("SELECT revoked_at FROM invitations WHERE id = ?", (t.inv_b,)).fetchone()[0] is None
    assert gw.conn.execute("SELECT monthly_spend_limit FROM workspaces WHERE id = ?", (t.ws_b,)).fetchone()[0] is None
    assert gw.conn.execute("SELECT disabled_at FROM users WHERE id = ?", (t.member_b,)).fetchone()[0] is None
    assert gw.conn.execute("SELECT COUNT(*) FROM workspaces WHERE name = 'made-by-a'").fetchone()[0] == 0
    assert await chat(http, gw, t.key_b) == 200

    # The admin (a session of an admin user) reaches all of it.
    admin = await console(consoles, gw, "admin@example.com")
    admin_expect = {("POST", "/workspaces"): 201, ("POST", "/keys"): 201, ("POST", "/invitations"): 201,
                    ("GET", "/{tail}"): 404}
    for route in order:
        path, body, params = table[route]
        status, data = await admin.raw(route[0], path, body, **params)
        # POST .../revoke comes after DELETE of the same key: still 200.
        assert status == admin_expect.get(route, 200), (route, data)


async def test_what_each_role_lists(
    admin_gateway: Gateway, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    gw = admin_gateway
    t = await tenants(gw, http)
    ids = {name: key_id(gw, k) for name, k in
           (("owner_a", t.key_owner_a), ("member_a", t.key_member_a), ("b", t.key_b))}
    member = await console(consoles, gw, "member-a@example.com")
    owner = await console(consoles, gw, "owner-a@example.com")
    assert [w["name"] for w in member.me["workspaces"]] == ["a"] and member.me["workspaces"][0]["role"] == "member"
    assert member.me["user"]["email"] == "member-a@example.com" and member.me["operator"] is False
    assert member.me["base_url"] == gw.url + "/v1"
    assert member.me["workspaces"][0]["models"] == ["gpt-test", "org/model-with-slash", "renamed"]

    # Keys: a member sees their own, an owner every key of the workspace.
    assert [k["id"] for k in (await member.call("GET", "/keys"))["data"]] == [ids["member_a"]]
    assert sorted(k["id"] for k in (await owner.call("GET", "/keys"))["data"]) == sorted(
        [ids["owner_a"], ids["member_a"]])
    await member.call("GET", f"/keys/{ids['owner_a']}", expect=404)  # a co-worker's key
    await owner.call("GET", f"/keys/{ids['member_a']}")

    # Usage and the request log follow the same lines.
    def total(data: dict[str, Any]) -> int:
        return sum(d["requests"] for d in data["data"])

    rows = [dict(r) for r in gw.conn.execute("SELECT key_id FROM usage_events")]  # wait_key_live's too
    count = {n: sum(1 for r in rows if r["key_id"] == i) for n, i in ids.items()}
    assert total(await member.call("GET", "/usage", bucket="total")) == count["member_a"]
    assert total(await owner.call("GET", "/usage", bucket="total")) == count["member_a"] + count["owner_a"]
    assert total(await operator(http, gw, "GET", "/usage", bucket="total")) >= sum(count.values())
    assert {r["key_id"] for r in (await member.call("GET", "/requests"))["items"]} == {ids["member_a"]}
    assert {r["key_id"] for r in (await owner.call("GET", "/requests"))["items"]} == {ids["member_a"], ids["owner_a"]}
    await member.call("GET", "/requests", key_id=ids["owner_a"], expect=404)
    err = await member.call("GET", "/usage", bucket="minute", expect=400)
    assert "minute" in err["error"]["message"]

    # Tasks: B's task is nobody's business in A.
    assert (await owner.call("GET", "/tasks"))["data"] == []
    admin_tasks = (await operator(http, gw, "GET", "/tasks"))["data"]
    assert [x["id"] for x in admin_tasks] == [t.task_b] and admin_tasks[0]["upstream"] == "mock"

    # Users: a member sees themselves; an owner their workspace's members.
    assert [u["email"] for u in (await member.call("GET", "/users"))["data"]] == ["member-a@example.com"]
    assert [u["email"] for u in (await owner.call("GET", "/users"))["data"]] == [
        "owner-a@example.com", "member-a@example.com"]
    await member.call("GET", f"/users/{t.owner_a}", expect=404)
    await member.call("GET", f"/workspaces/{t.ws_a}/members", expect=403)
    members = (await owner.call("GET", f"/workspaces/{t.ws_a}/members"))["data"]
    assert {(m["email"], m["role"]) for m in members} == {("owner-a@example.com", "owner"),
                                                          ("member-a@example.com", "member")}
    assert all("password_hash" not in m for m in members)

    # The config a member sees: their models and group, no upstream names.
    cfg = await member.call("GET", "/config")
    assert cfg["upstreams"] == [] and [g["name"] for g in cfg["groups"]] == ["default"]
    assert cfg["reload_available"] is False


async def test_member_keys_stay_within_the_workspace(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url))
    await gw.add_user("m@example.com", team="member")
    ws = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'team'").fetchone()[0]
    gw.conn.execute("UPDATE workspaces SET monthly_spend_limit = 10, allowed_models = '[\"gpt-*\"]' WHERE id = ?",
                    (ws,))
    m = await console(consoles, gw, "m@example.com")
    err = await m.call("POST", "/keys", {"workspace_id": ws, "spend_limit": 11}, expect=400)
    assert "at most the workspace's monthly spend limit (10" in err["error"]["message"]
    await m.call("POST", "/keys", {"workspace_id": ws, "group_name": "cheap"}, expect=403)
    err = await m.call("POST", "/keys", {"workspace_id": ws, "allowed_models": ["renamed"]}, expect=400)
    assert "matches no model of this workspace" in err["error"]["message"]
    made = await m.call("POST", "/keys", {"workspace_id": ws, "name": "mine", "spend_limit": 10, "rpm": 5,
                                          "allowed_models": ["gpt-test"]}, expect=201)
    key = made["key"]
    assert key["user_email"] == "m@example.com" and key["spend_limit"] == 10
    # Rename and revoke are theirs to do; raising the limit past the workspace's is not.
    assert (await m.call("PATCH", f"/keys/{key['id']}", {"name": "renamed-key"}))["name"] == "renamed-key"
    await m.call("PATCH", f"/keys/{key['id']}", {"spend_limit": 50}, expect=400)
    await m.call("PATCH", f"/keys/{key['id']}", {"group_name": "cheap"}, expect=403)
    await gw.wait_key_live(made["plaintext"])
    assert await chat(http, gw, made["plaintext"]) == 200
    assert (await m.call("DELETE", f"/keys/{key['id']}"))["status"] == "revoked"
    await wait_status(http, gw, made["plaintext"], 401)
    # An owner may not lift the workspace's own quota: that is the operator's.
    await gw.add_user("o@example.com", team="owner")
    o = await console(consoles, gw, "o@example.com")
    await o.call("PATCH", f"/workspaces/{ws}", {"monthly_spend_limit": 1000}, expect=403)


# ------------------------------------------------------------------ sessions and CSRF


async def test_session_cookie_and_csrf(
    admin_gateway: Gateway, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    gw = admin_gateway
    await gw.add_user("m@example.com", team="member")
    ws = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'team'").fetchone()[0]
    async with http.post(gw.url + PREFIX + "/session", json={"email": "m@example.com", "password": PASSWORD}) as r:
        assert r.status == 200
        cookie = r.headers["Set-Cookie"]
    attrs = {a.strip().split("=")[0].lower(): a for a in cookie.split(";")}
    assert "httponly" in attrs and attrs["samesite"].strip().lower() == "samesite=strict"
    assert attrs["path"].strip() == "Path=/admin/api" and "secure" not in attrs
    # Behind a TLS-terminating proxy the cookie is Secure.
    async with http.post(gw.url + PREFIX + "/session", json={"email": "m@example.com", "password": PASSWORD},
                         headers={"X-Forwarded-Proto": "https"}) as r:
        assert "Secure" in r.headers["Set-Cookie"]
    # No form posts: sign-in takes JSON only (a cross-site form cannot send it).
    async with http.post(gw.url + PREFIX + "/session", data={"email": "m@example.com", "password": PASSWORD}) as r:
        assert r.status == 400

    c = await console(consoles, gw, "m@example.com")
    body = {"workspace_id": ws, "name": "k"}
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": c.csrf + "x"}):
        err = await c.call("POST", "/keys", body, csrf=False, headers=headers, expect=403)
        assert err["error"]["code"] == "csrf_failed"
    await c.call("DELETE", "/session", csrf=False, expect=403)  # sign-out too
    assert gw.conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] == 0
    await c.call("POST", "/keys", body, expect=201)
    # Another session's token does not do.
    other = await console(consoles, gw, "m@example.com")
    await c.call("POST", "/keys", body, csrf=False, headers={"X-CSRF-Token": other.csrf or ""}, expect=403)
    # Reads need none; the operator token needs none (it is not a cookie).
    await c.call("GET", "/keys", csrf=False)
    await operator(http, gw, "POST", "/keys", {"workspace_id": ws}, expect=201)
    # A wrong Authorization header is judged alone, even with a good cookie.
    await c.call("GET", "/keys", headers={"Authorization": "Bearer nope"}, expect=401)

    # Sign-out ends the session on the server: the old cookie is refused.
    sid = next(m.value for m in c.http.cookie_jar if m.key == "gateway_session")
    await c.call("DELETE", "/session")
    async with http.get(gw.url + PREFIX + "/session", cookies={"gateway_session": sid}) as r:
        assert r.status == 401
    assert gw.conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 3  # the others'


async def test_session_expiry(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console],
) -> None:
    clock = FakeClock()
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\nsession_hours = 2\n"
                                        "session_idle_minutes = 30\n"), clock=clock)
    await gw.add_user("m@example.com", team="member")
    c = await console(consoles, gw, "m@example.com")
    # Idle for longer than session_idle_minutes: gone.
    clock.advance(31 * 60)
    err = await c.call("GET", "/session", expect=401)
    assert "sign in again" in err["error"]["message"]
    # Active every 20 minutes: lives until session_hours after sign-in, no longer.
    await c.sign_in("m@example.com")
    for _ in range(5):
        clock.advance(20 * 60)
        await c.call("GET", "/keys")
    clock.advance(21 * 60)  # 2 h 1 min after sign-in
    await c.call("GET", "/keys", expect=401)


async def test_disabling_a_user_ends_their_sessions_and_suspends_their_keys(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url))
    await gw.add_user("admin@example.com", admin=True)
    uid = await gw.add_user("m@example.com", team="member")
    key = await gw.key("team", user_id=uid)
    m1, m2 = await console(consoles, gw, "m@example.com"), await console(consoles, gw, "m@example.com")
    admin = await console(consoles, gw, "admin@example.com")
    await admin.call("PATCH", f"/users/{admin.me['user']['id']}", {"disabled": True}, expect=400)
    user = await admin.call("PATCH", f"/users/{uid}", {"disabled": True})
    assert user["status"] == "disabled"
    for c in (m1, m2):
        await c.call("GET", "/session", expect=401)
    await m1.sign_in("m@example.com", expect=401)
    await wait_status(http, gw, key, 401)
    keys = (await admin.call("GET", "/keys"))["data"]
    assert keys[0]["status"] == "suspended"
    # Enabled again: the key comes back; the sessions do not.
    await admin.call("PATCH", f"/users/{uid}", {"disabled": False})
    await wait_status(http, gw, key, 200)
    await m2.call("GET", "/session", expect=401)
    await m1.sign_in("m@example.com")


# ------------------------------------------------------------------ sign-in


async def test_sign_in_throttling_per_account_and_per_address(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console],
) -> None:
    clock = FakeClock()
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\nlogin_failures_per_account = 3\n"
                                        "login_failures_per_address = 7\nlogin_window_minutes = 10\n"), clock=clock)
    await gw.add_user("m@example.com", team="member")
    c = await console(consoles, gw)
    for _ in range(3):
        err = await c.sign_in("m@example.com", "wrong password!", expect=401)
        assert err["error"]["message"] == "Email or password is incorrect."
    # Locked: even the right password gets a 429 that says when to come back.
    async with c.http.post(gw.url + PREFIX + "/session", json={"email": "m@example.com", "password": PASSWORD}) as r:
        assert r.status == 429 and 0 < int(r.headers["Retry-After"]) <= 600
        msg = (await r.json())["error"]["message"]
    assert msg == "Too many failed sign-ins for this account. Try again in 10 minutes."
    # An unknown account is throttled exactly alike (no hint that it is unknown).
    for _ in range(3):
        await c.sign_in("nobody@example.com", "wrong password!", expect=401)
    err = await c.sign_in("nobody@example.com", "wrong password!", expect=429)
    assert err["error"]["message"] == msg
    # Per address: the 7th failure from here, whatever the account.
    await c.sign_in("third@example.com", "wrong password!", expect=401)
    err = await c.sign_in("fourth@example.com", "wrong password!", expect=429)
    assert err["error"]["message"].startswith("Too many failed sign-ins from your address.")
    # The window passes: signing in works, and resets the account's count.
    clock.advance(10 * 60 + 1)
    await c.sign_in("m@example.com")
    assert gw.conn.execute("SELECT COUNT(*) FROM login_failures WHERE scope = 'account' AND subject = ?",
                           ("m@example.com",)).fetchone()[0] == 0


async def test_sign_in_says_nothing_about_which_accounts_exist(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console],
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\nlogin_failures_per_account = 100\n"
                                        "login_failures_per_address = 100\n"))
    await gw.add_user("m@example.com", team="member")
    await gw.add_user("gone@example.com", team="member")
    await gw.add_user("pending@example.com", None, team="member")
    gw.conn.execute("UPDATE users SET disabled_at = 1 WHERE email = 'gone@example.com'")
    c = await console(consoles, gw)
    answers = set()
    for email, password in (("m@example.com", "wrong password!"), ("nobody@example.com", "wrong password!"),
                            ("gone@example.com", PASSWORD), ("pending@example.com", PASSWORD),
                            ("pending@example.com", "")):
        async with c.http.post(gw.url + PREFIX + "/session", json={"email": email, "password": password}) as r:
            answers.add((r.status, await r.text()) if password else (r.status,))
    assert len(answers) == 2 and (400,) in answers  # the empty password is a 400 before any lookup

    async def timed(email: str) -> float:
        t0 = time.perf_counter()
        await c.sign_in(email, "wrong password!", expect=401)
        return time.perf_counter() - t0

    # An unknown account costs the same argon2 work as a real one: without
    # the dummy hash it would answer ~100 times faster. Interleaved, so that
    # load from elsewhere on the machine falls on both alike.
    known, unknown = [], []
    for _ in range(7):
        known.append(await timed("m@example.com"))
        unknown.append(await timed("nobody@example.com"))
    assert statistics.median(unknown) > 0.3 * statistics.median(known), (unknown, known)


# ------------------------------------------------------------------ invitations, members, sign-up


async def test_invitation_to_a_working_session(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    clock = FakeClock()
    gw = await make_gateway(config_toml(upstream.base_url, '[console]\npublic_url = "https://llm.example.com"\n'
                                        "invitation_hours = 24\n"), clock=clock)
    await gw.add_user("o@example.com", team="owner")
    await gw.add_user("m@example.com", team="member", other="owner")
    ws = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'team'").fetchone()[0]
    other = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'other'").fetchone()[0]
    owner, member = await console(consoles, gw, "o@example.com"), await console(consoles, gw, "m@example.com")
    await member.call("POST", "/invitations", {"email": "x@example.com", "workspace_id": ws}, expect=403)
    await owner.call("POST", "/invitations", {"email": "x@example.com", "workspace_id": other}, expect=404)
    await owner.call("POST", "/invitations", {"email": "x@example.com", "role": "admin"}, expect=403)
    await owner.call("POST", "/invitations", {"email": "m@example.com", "workspace_id": ws}, expect=409)
    await owner.call("POST", "/invitations", {"email": "not an email", "workspace_id": ws}, expect=400)
    made = await owner.call("POST", "/invitations", {"email": "New@Example.com", "workspace_id": ws}, expect=201)
    link = made["link"]
    assert link.startswith("https://llm.example.com/console/#invite=")
    token = link.split("#invite=")[1]
    assert made["invitation"]["email"] == "new@example.com" and "token" not in str(made["invitation"])
    assert token not in str(gw.conn.execute("SELECT * FROM invitations").fetchall())
    assert [i["email"] for i in (await owner.call("GET", "/invitations"))["data"]] == ["new@example.com"]

    invitee = await console(consoles, gw)
    info = await invitee.call("POST", "/invitation/inspect", {"token": token})
    assert info == {"email": "new@example.com", "workspace": "team", "role": "member", "account": "new",
                    "expires_at": pytest.approx(clock.now + 86400)}
    await invitee.call("POST", "/invitation/accept", {"token": token, "password": "short"}, expect=400)
    me = await invitee.call("POST", "/invitation/accept", {"token": token, "password": "a long enough secret",
                                                           "name": "New Person"})
    assert me["user"]["email"] == "new@example.com" and me["workspaces"][0]["role"] == "member"
    invitee.csrf = me["csrf_token"]
    made_key = await invitee.call("POST", "/keys", {"workspace_id": ws, "name": "first"}, expect=201)
    await gw.wait_key_live(made_key["plaintext"])
    # The link worked once.
    again = await console(consoles, gw)
    err = await again.call("POST", "/invitation/accept", {"token": token, "password": "a long enough secret"},
                           expect=404)
    assert "used, revoked or has expired" in err["error"]["message"]
    await again.sign_in("new@example.com", "a long enough secret")

    # An existing account joins a second workspace by confirming its password.
    made = await owner.call("POST", "/invitations", {"email": "new@example.com", "workspace_id": ws}, expect=409)
    inv = await member.call("POST", "/invitations", {"email": "new@example.com", "workspace_id": other,
                                                     "role": "owner"}, expect=201)
    token2 = inv["link"].split("#invite=")[1]
    assert (await again.call("POST", "/invitation/inspect", {"token": token2}))["account"] == "existing"
    await again.call("POST", "/invitation/accept", {"token": token2, "password": "not my password"}, expect=401)
    me = await again.call("POST", "/invitation/accept", {"token": token2, "password": "a long enough secret"})
    assert {(w["name"], w["role"]) for w in me["workspaces"]} == {("team", "member"), ("other", "owner")}

    # A revoked link and an expired link are dead.
    inv = await owner.call("POST", "/invitations", {"email": "late@example.com", "workspace_id": ws}, expect=201)
    await owner.call("DELETE", f"/invitations/{inv['invitation']['id']}")
    await again.call("POST", "/invitation/inspect", {"token": inv["link"].split("#invite=")[1]}, expect=404)
    inv = await owner.call("POST", "/invitations", {"email": "later@example.com", "workspace_id": ws}, expect=201)
    clock.advance(24 * 3600 + 1)
    await again.call("POST", "/invitation/accept", {"token": inv["link"].split("#invite=")[1],
                                                    "password": "a long enough secret"}, expect=404)


async def test_owner_manages_members(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url))
    await gw.add_user("o@example.com", team="owner")
    uid = await gw.add_user("m@example.com", team="member")
    ws = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'team'").fetchone()[0]
    key = await gw.key("team", user_id=uid)
    owner, member = await console(consoles, gw, "o@example.com"), await console(consoles, gw, "m@example.com")
    await member.call("PATCH", f"/workspaces/{ws}/members/{uid}", {"role": "owner"}, expect=403)
    await owner.call("PATCH", f"/workspaces/{ws}/members/{uid}", {"role": "admin"}, expect=400)
    assert (await owner.call("PATCH", f"/workspaces/{ws}/members/{uid}", {"role": "owner"}))["role"] == "owner"
    await owner.call("PATCH", f"/workspaces/{ws}/members/{uid}", {"role": "member"})
    # Removing a member revokes the keys they made there.
    out = await owner.call("DELETE", f"/workspaces/{ws}/members/{uid}")
    assert out["revoked_keys"] == [key_id(gw, key)]
    await wait_status(http, gw, key, 401)
    assert (await member.call("GET", "/session"))["workspaces"] == []
    await member.call("GET", "/keys", workspace_id=ws, expect=404)


async def test_open_signup(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console],
) -> None:
    closed = await make_gateway(config_toml(upstream.base_url))
    c = await console(consoles, closed)
    err = await c.call("POST", "/signup", {"email": "a@example.com", "password": "long enough pw"}, expect=403)
    assert err["error"]["message"] == "Sign-up is closed: ask an admin for an invitation."
    assert (await c.call("GET", "/signin-options")) == {"open_signup": False, "admin_token": False,
                                                          "token_first": False}

    gw = await make_gateway(config_toml(upstream.base_url, "[console]\nopen_signup = true\n"), "open.toml")
    c = await console(consoles, gw)
    me = await c.call("POST", "/signup", {"email": "A@example.com", "password": "long enough pw", "name": "A"},
                      expect=201)
    assert me["user"]["email"] == "a@example.com" and [(w["name"], w["role"]) for w in me["workspaces"]] == [
        ("a", "owner")]
    await c.call("POST", "/signup", {"email": "a@example.com", "password": "long enough pw"}, expect=409)
    c.csrf = me["csrf_token"]
    await c.call("POST", "/keys", {"workspace": "a", "name": "k"}, expect=201)


async def test_changing_ones_password_ends_other_sessions(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console],
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url))
    await gw.add_user("m@example.com", team="member")
    c1, c2 = await console(consoles, gw, "m@example.com"), await console(consoles, gw, "m@example.com")
    await c1.call("PATCH", "/session", {"password": "a brand new secret", "current_password": "wrong"}, expect=401)
    await c1.call("PATCH", "/session", {"password": "a brand new secret", "current_password": PASSWORD,
                                        "name": "Em"})
    await c1.call("GET", "/session")
    await c2.call("GET", "/session", expect=401)
    await c2.sign_in("m@example.com", expect=401)
    await c2.sign_in("m@example.com", "a brand new secret")


# ------------------------------------------------------------------ hostile strings

XSS = '<img src=x onerror="alert(1)"><script>alert(2)</script>'


async def test_user_controlled_strings_are_bounded_and_never_html(
    admin_gateway: Gateway, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    gw = admin_gateway
    ws = await operator(http, gw, "POST", "/workspaces", {"name": XSS}, expect=201)
    key = await operator(http, gw, "POST", "/keys", {"workspace_id": ws["id"], "name": XSS}, expect=201)
    inv = await operator(http, gw, "POST", "/invitations",
                         {"email": '"<script>"@example.com', "workspace_id": ws["id"]}, expect=201)
    c = await console(consoles, gw)
    me = await c.call("POST", "/invitation/accept", {"token": inv["link"].split("#invite=")[1],
                                                     "password": "long enough pw", "name": XSS})
    assert me["user"]["name"] == XSS and me["workspaces"][0]["name"] == XSS
    # Stored and answered as data, in JSON that no browser will sniff as HTML.
    for path in ("/workspaces", "/keys", "/users", "/audit", f"/keys/{key['key']['id']}"):
        async with http.get(gw.url + PREFIX + path, headers=ADMIN) as r:
            assert r.content_type == "application/json" and r.headers["X-Content-Type-Options"] == "nosniff"
            assert XSS.replace('"', '\\"') in await r.text()
    # Bounded before stored; control characters refused.
    for body in ({"name": "x" * 201}, {"name": "a\x00b"}, {"name": "line\nbreak"}):
        await operator(http, gw, "PATCH", f"/keys/{key['key']['id']}", body, expect=400)
        await operator(http, gw, "POST", "/workspaces", body, expect=400)
    await operator(http, gw, "POST", "/invitations", {"email": "a" * 250 + "@example.com",
                                                      "workspace_id": ws["id"]}, expect=400)
    c.csrf = me["csrf_token"]
    await c.call("PATCH", "/session", {"name": "\x07bell"}, expect=400)
    async with http.post(gw.url + PREFIX + "/session", json={"email": "x" * 300, "password": "p"}) as r:
        assert r.status == 400


# ------------------------------------------------------------------ audit


async def test_every_change_is_audited_without_secrets(
    admin_gateway: Gateway, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    gw = admin_gateway
    await gw.add_user("o@example.com", team="owner")
    await gw.add_user("x@example.com", elsewhere="owner")
    ws = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'team'").fetchone()[0]
    owner = await console(consoles, gw, "o@example.com")
    made = await owner.call("POST", "/keys", {"workspace_id": ws, "name": "k1", "rpm": 5}, expect=201)
    kid = made["key"]["id"]
    await owner.call("PATCH", f"/keys/{kid}", {"rpm": 10})
    await owner.call("DELETE", f"/keys/{kid}")
    inv = await owner.call("POST", "/invitations", {"email": "n@example.com", "workspace_id": ws}, expect=201)
    newcomer = await console(consoles, gw)
    me = await newcomer.call("POST", "/invitation/accept", {"token": inv["link"].split("#invite=")[1],
                                                            "password": "newcomer password"})
    await owner.call("PATCH", f"/workspaces/{ws}/members/{me['user']['id']}", {"role": "owner"})
    await operator(http, gw, "PATCH", f"/workspaces/{ws}", {"monthly_token_limit": 1000})
    await operator(http, gw, "PATCH", f"/users/{me['user']['id']}", {"disabled": True})
    await operator(http, gw, "POST", "/reload")
    assert gw.config.source is not None
    await gw.reload(gw.config.source.read_text().replace("ratio = 0.5", "ratio = 0.25"))  # as SIGHUP does

    log = (await operator(http, gw, "GET", "/audit", limit=100))["items"]
    actions = [e["action"] for e in reversed(log)]
    assert actions == ["session.create", "key.create", "key.update", "key.revoke", "invitation.create",
                       "invitation.accept", "session.create", "member.role", "workspace.update", "user.disable",
                       "config.reload", "config.reload"]
    by = {e["action"]: e for e in log}
    update = by["key.update"]
    assert update["actor"] == "o@example.com" and update["address"] == "127.0.0.1"
    assert update["before"]["rpm"] == 5 and update["after"]["rpm"] == 10 and update["workspace"] == "team"
    assert by["workspace.update"]["actor"] == "operator token"
    assert by["workspace.update"]["after"]["monthly_token_limit"] == 1000
    assert by["member.role"]["before"] == {"role": "member"} and by["member.role"]["after"] == {"role": "owner"}
    assert by["user.disable"]["after"]["status"] == "disabled"
    sighup = log[0]
    assert sighup["actor"] == "SIGHUP" and sighup["before"] == {"groups": {"cheap": {"models": ["gpt-*"],
                                                                                    "ratio": 0.5}}}
    assert sighup["after"]["groups"]["cheap"]["ratio"] == 0.25
    assert log[1]["actor"] == "operator token" and log[1]["before"] == {} and log[1]["after"] == {}

    # Never a secret: the key, its hash, passwords, the invitation token.
    text = str(gw.conn.execute("SELECT * FROM audit_log").fetchall())
    hashes = [r[0] for r in gw.conn.execute("SELECT key_hash FROM api_keys")]
    for secret in (made["plaintext"], *hashes, PASSWORD, "newcomer password", inv["link"].split("#invite=")[1],
                   "argon2", owner.csrf or "x"):
        assert secret not in text

    # Filters, paging, and what an owner may read.
    keys_only = (await operator(http, gw, "GET", "/audit", action="key."))["items"]
    assert [e["action"] for e in keys_only] == ["key.revoke", "key.update", "key.create"]
    assert [e["action"] for e in (await operator(http, gw, "GET", "/audit", action="key.update"))["items"]] == [
        "key.update"]
    page = await operator(http, gw, "GET", "/audit", limit=5)
    rest = await operator(http, gw, "GET", "/audit", limit=100, cursor=page["next_cursor"])
    assert [e["id"] for e in page["items"] + rest["items"]] == [e["id"] for e in log]
    mine = (await owner.call("GET", "/audit", actor="o@example.com", limit=100))["items"]
    assert {e["action"] for e in mine} == {"key.create", "key.update", "key.revoke", "invitation.create",
                                           "member.role"}
    seen = (await owner.call("GET", "/audit", limit=100))["items"]
    assert all(e["workspace_id"] == ws for e in seen)  # not config reloads, not others' workspaces
    await operator(http, gw, "GET", "/audit", action="x" * 201, expect=400)


# ------------------------------------------------------------------ CLI


def run_cli(*args: str, stdin: str = "", cwd: Any = None) -> tuple[int, str, str]:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin, capture_output=True, text=True,
                       cwd=cwd, timeout=60)
    return p.returncode, p.stdout, p.stderr


async def test_users_cli(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console], tmp_path: Any,
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url))
    cfg = str(gw.config.source)

    def cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
        return run_cli(*args, "--config", cfg, stdin=stdin, cwd=tmp_path)

    rc, out, err = await asyncio.to_thread(cli, "users", "create", "Root@Example.com", "--admin", "--password-stdin",
                                           stdin="root password 1\n")
    assert rc == 0 and "created user 1 root@example.com (admin)" in out, err
    rc, out, err = await asyncio.to_thread(cli, "users", "create", "short@example.com", "--password-stdin",
                                           stdin="short\n")
    assert rc != 0 and "10 to 1024" in err + out
    rc, out, err = await asyncio.to_thread(cli, "users", "create", "x@example.com")  # no terminal, no stdin flag
    assert rc != 0 and "--password-stdin" in err + out
    assert (await asyncio.to_thread(cli, "workspaces", "create", "acme"))[0] == 0
    rc, out, err = await asyncio.to_thread(cli, "users", "invite", "bob@example.com", "--workspace", "acme",
                                           "--role", "owner", "--url", "https://gw.example.com")
    assert rc == 0, err
    link = out.strip().splitlines()[-1]
    assert link.startswith("https://gw.example.com/console/#invite=")
    rc, out, err = await asyncio.to_thread(cli, "users", "invite", "eve@example.com")
    assert rc != 0 and "--workspace is required" in err + out

    c = await console(consoles, gw)
    me = await c.call("POST", "/invitation/accept", {"token": link.split("#invite=")[1],
                                                     "password": "bob's password"})
    assert [(w["name"], w["role"]) for w in me["workspaces"]] == [("acme", "owner")]
    root = await console(consoles, gw)
    await root.sign_in("root@example.com", "root password 1")

    rc, out, err = await asyncio.to_thread(cli, "users", "list")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["id", "email", "name", "admin", "status", "workspaces"]
    assert "root@example.com" in lines[1] and "yes" in lines[1]
    assert "bob@example.com" in lines[2] and "acme:owner" in lines[2] and "active" in lines[2]

    rc, out, err = await asyncio.to_thread(cli, "users", "disable", "bob@example.com")
    assert rc == 0 and "disabled bob@example.com" in out
    await c.call("GET", "/session", expect=401)
    rc, out, err = await asyncio.to_thread(cli, "users", "disable", "nobody@example.com")
    assert rc == 1 and "not found" in err
    rc, out, _ = await asyncio.to_thread(cli, "users", "enable", "bob@example.com")
    assert rc == 0
    await c.sign_in("bob@example.com", "bob's password")

    actors = {r[0] for r in gw.conn.execute("SELECT actor FROM audit_log WHERE actor LIKE 'cli (%'")}
    assert len(actors) == 1
    acts = [r[0] for r in gw.conn.execute("SELECT action FROM audit_log WHERE actor LIKE 'cli (%' ORDER BY id")]
    assert acts == ["user.create", "workspace.create", "invitation.create", "user.disable", "user.enable"]


async def test_sign_in_page_opens_on_the_token_until_there_are_accounts(
    admin_gateway: Gateway, consoles: list[Console],
) -> None:
    c = await console(consoles, admin_gateway)
    assert (await c.call("GET", "/signin-options"))["token_first"] is True
    await admin_gateway.add_user("first@example.com", admin=True)
    assert (await c.call("GET", "/signin-options"))["token_first"] is False


# ------------------------------------------------------------------ attacks (red team)


async def test_concurrent_sign_ins_cannot_outrun_the_throttle(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console],
) -> None:
    """Guesses sent all at once count like guesses sent one by one: each is
    counted before its password is checked, so only the allowed number are
    ever checked and the rest get 429 without costing any argon2 work."""
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\nlogin_failures_per_account = 3\n"
                                        "login_failures_per_address = 5\n"))
    await gw.add_user("m@example.com", team="member")
    c = await console(consoles, gw)

    async def guess(email: str, i: int) -> int:
        status, _ = await c.raw("POST", "/session", {"email": email, "password": f"wrong guess {i:04}"})
        return status

    got = await asyncio.gather(*(guess("m@example.com", i) for i in range(12)))
    assert sorted(got) == [401] * 3 + [429] * 9
    err = await c.sign_in("m@example.com", expect=429)  # locked, even with the right password
    assert err["error"]["code"] == "too_many_sign_in_attempts"
    # Per address too: 2 more from here (5 in all), then 429 whatever the account.
    got = await asyncio.gather(*(guess(f"u{i}@example.com", i) for i in range(10)))
    assert sorted(got) == [401] * 2 + [429] * 8


async def test_a_successful_sign_in_is_not_counted_as_a_failure(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console],
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\nlogin_failures_per_account = 2\n"
                                        "login_failures_per_address = 2\n"))
    await gw.add_user("m@example.com", team="member")
    c = await console(consoles, gw)
    for _ in range(5):
        await c.sign_in("m@example.com")
    await c.sign_in("m@example.com", "wrong password!", expect=401)
    await c.sign_in("m@example.com")
    assert gw.conn.execute("SELECT COUNT(*) FROM login_failures WHERE scope != 'signup'").fetchone()[0] == 1


async def test_concurrent_sign_ups_cannot_outrun_the_address_limit(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console],
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\nopen_signup = true\n"
                                        "login_failures_per_address = 3\n"))
    c = await console(consoles, gw)

    async def sign_up(i: int) -> int:
        status, _ = await c.raw("POST", "/signup", {"email": f"s{i}@example.com", "password": "long enough pw"})
        return status

    got = await asyncio.gather(*(sign_up(i) for i in range(10)))
    assert sorted(got) == [201] * 3 + [429] * 7
    assert gw.conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 3


async def test_an_invitation_dies_with_its_inviters_right_to_make_it(
    admin_gateway: Gateway, http: aiohttp.ClientSession, consoles: list[Console],
) -> None:
    """An owner's invitation links stop working once the owner may no longer
    invite to that workspace (removed, demoted or disabled), and an admin's
    invitation to be an admin once they are no admin: otherwise an owner
    about to be removed could keep an owner's link and come back with it."""
    gw = admin_gateway
    owner = await gw.add_user("o@example.com", team="owner")
    root = await gw.add_user("root@example.com", admin=True)
    ws = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'team'").fetchone()[0]
    o, r = await console(consoles, gw, "o@example.com"), await console(consoles, gw, "root@example.com")

    async def link(c: Console, body: dict[str, Any]) -> str:
        made = await c.call("POST", "/invitations", body, expect=201)
        return str(made["link"].split("#invite=")[1])

    removed = await link(o, {"email": "back-door@example.com", "workspace_id": ws, "role": "owner"})
    demoted = await link(o, {"email": "side-door@example.com", "workspace_id": ws, "role": "owner"})
    admin_link = await link(r, {"email": "new-admin@example.com", "role": "admin"})
    await operator(http, gw, "PATCH", f"/workspaces/{ws}/members/{owner}", {"role": "member"})
    await operator(http, gw, "PATCH", f"/users/{root}", {"is_admin": False})
    invitee = await console(consoles, gw)
    for token in (demoted, admin_link):
        await invitee.call("POST", "/invitation/inspect", {"token": token}, expect=404)
        await invitee.call("POST", "/invitation/accept", {"token": token, "password": "long enough pw"}, expect=404)
    await operator(http, gw, "DELETE", f"/workspaces/{ws}/members/{owner}")
    await invitee.call("POST", "/invitation/accept", {"token": removed, "password": "long enough pw"}, expect=404)
    assert (await operator(http, gw, "GET", "/invitations"))["data"] == []
    # A disabled inviter's links are dead too, and come back with them; the
    # operator token's (no inviter) stand on their own.
    await operator(http, gw, "PATCH", f"/users/{root}", {"is_admin": True})
    kept = await link(r, {"email": "kept@example.com", "workspace_id": ws})
    made = await operator(http, gw, "POST", "/invitations", {"email": "op@example.com", "workspace_id": ws},
                          expect=201)
    await operator(http, gw, "PATCH", f"/users/{root}", {"disabled": True})
    await invitee.call("POST", "/invitation/inspect", {"token": kept}, expect=404)
    listed = await operator(http, gw, "GET", "/invitations")
    assert [i["email"] for i in listed["data"]] == ["op@example.com"]
    await invitee.call("POST", "/invitation/inspect", {"token": made["link"].split("#invite=")[1]})
    await operator(http, gw, "PATCH", f"/users/{root}", {"disabled": False})
    me = await invitee.call("POST", "/invitation/accept", {"token": kept, "password": "long enough pw"})
    assert [(w["name"], w["role"]) for w in me["workspaces"]] == [("team", "member")]
    assert gw.conn.execute("SELECT COUNT(*) FROM users WHERE email LIKE '%door%' OR email LIKE 'new-admin%'"
                           ).fetchone()[0] == 0


async def test_an_ipv6_network_is_throttled_as_one_address(
    make_gateway: GatewayFactory, upstream: Upstream, consoles: list[Console],
) -> None:
    """One host usually holds a whole IPv6 /64: per-address throttling
    counts the /64, or it could guess from 2^64 addresses, each one fresh."""
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\ntrust_forwarded_for = true\n"
                                        "login_failures_per_address = 3\n"))
    c = await console(consoles, gw)
    got = []
    for i in range(1, 6):
        status, _ = await c.raw("POST", "/session", {"email": f"u{i}@example.com", "password": "wrong password!"},
                                headers={"X-Forwarded-For": f"2001:db8:0:7::{i:x}"})
        got.append(status)
    assert got == [401, 401, 401, 429, 429]
    status, _ = await c.raw("POST", "/session", {"email": "v@example.com", "password": "wrong password!"},
                            headers={"X-Forwarded-For": "2001:db8:0:8::1"})  # another /64
    assert status == 401
    for spelling in ("::ffff:198.51.100.7", "198.51.100.7", "198.51.100.7", "::FFFF:c633:6407"):
        status, _ = await c.raw("POST", "/session", {"email": "w@example.com", "password": "wrong password!"},
                                headers={"X-Forwarded-For": spelling})
        got.append(status)
    assert got[-4:] == [401, 401, 401, 429]  # one IPv4 address, however it is written


async def test_guessing_the_operator_token_is_throttled_like_a_password(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wrong admin token counts as a failed sign-in from its address (the
    token is typed into the sign-in page, and may be no stronger than a
    password); past the limit the address gets 429 whatever it sends, so
    the right token does not stand out from the wrong ones."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\ntrust_forwarded_for = true\n"
                                        "login_failures_per_address = 3\n"))

    async def workspaces(token: str, address: str = "203.0.113.9") -> int:
        async with http.get(gw.url + PREFIX + "/workspaces",
                            headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": address}) as r:
            return r.status

    assert [await workspaces(f"guess-{i}") for i in range(4)] == [401, 401, 401, 429]
    assert await workspaces(ADMIN_TOKEN) == 429
    assert await workspaces(ADMIN_TOKEN, "203.0.113.10") == 200
    got = await asyncio.gather(*(workspaces(f"guess-{i}", "203.0.113.11") for i in range(8)))
    assert sorted(got) == [401] * 3 + [429] * 5  # all at once too


Sql = Callable[..., Awaitable[None]]


@contextlib.asynccontextmanager
async def write_lock(gw: Gateway) -> AsyncIterator[Sql]:
    """Hold the database's write lock from another connection, as a long
    admin write (or on SQLite the usage writer) would: SQLite's BEGIN
    IMMEDIATE, PostgreSQL's advisory lock that every write body takes.
    Yields a function running one statement (``?`` placeholders) on that
    connection, committed when the lock is let go."""
    if gw.config.database.url is None:
        conn = connect(gw.db_path)
        conn.execute("BEGIN IMMEDIATE")

        async def lite(sql: str, *args: Any) -> None:
            conn.execute(sql, args)

        try:
            yield lite
        finally:
            conn.execute("COMMIT")
            conn.close()
        return
    pg = await asyncpg.connect(gw.config.database.url)

    async def post(sql: str, *args: Any) -> None:
        await pg.execute(numbered(sql), *args)

    try:
        await pg.execute("SELECT pg_advisory_lock($1)", WRITE_LOCK)
        yield post
    finally:
        await pg.close()  # ends the session, and its lock


async def waiting_for_write_lock(gw: Gateway) -> None:
    """Until a write body waits for the lock write_lock holds. PostgreSQL
    shows it (pg_locks); SQLite's waiter sleeps in its busy handler, out of
    sight, so there a generous pause stands in."""
    if gw.config.database.url is None:
        await asyncio.sleep(1.5)
        return
    pg = await asyncpg.connect(gw.config.database.url)
    try:
        for _ in range(500):
            if await pg.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"):
                return
            await asyncio.sleep(0.02)
    finally:
        await pg.close()
    raise AssertionError("no write body waited for the lock")


async def test_throttled_attempts_do_not_wait_for_the_write_lock(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, consoles: list[Console],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An address already throttled is answered from a read: while the write
    lock is held elsewhere, a flood of wrong tokens, sign-ins and sign-ups
    from it gets its 429s at once instead of queueing for the lock (where
    it would hold up the usage writer and every admin write)."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    gw = await make_gateway(config_toml(upstream.base_url, "[console]\ntrust_forwarded_for = true\n"
                                        "open_signup = true\nlogin_failures_per_address = 3\n"))
    c = await console(consoles, gw)

    async def token(value: str, address: str = "203.0.113.9") -> int:
        async with http.get(gw.url + PREFIX + "/workspaces",
                            headers={"Authorization": f"Bearer {value}", "X-Forwarded-For": address}) as r:
            return r.status

    async def post(path: str, i: int) -> int:
        status, _ = await c.raw("POST", path, {"email": f"u{i}@example.com", "password": "wrong password!"},
                                headers={"X-Forwarded-For": "203.0.113.9"})
        return status

    assert [await token(f"guess-{i}") for i in range(3)] == [401] * 3
    for i in range(3):
        await post("/signup", i)
    waiting: list[asyncio.Future[int]] = []
    try:
        async with write_lock(gw):
            # The lock is real: a guess from a fresh address must count, so it waits.
            fresh = asyncio.ensure_future(token("guess", "203.0.113.77"))
            waiting.append(fresh)
            started = time.monotonic()
            flood = [token(f"guess-{i}") for i in range(10)] + [token(ADMIN_TOKEN)]
            flood += [post("/session", i) for i in range(10)] + [post("/signup", i) for i in range(10, 15)]
            got = await asyncio.wait_for(asyncio.gather(*flood), 5)
            took = time.monotonic() - started
            assert not fresh.done()
        assert got == [429] * len(flood) and took < 2.0
        assert await asyncio.wait_for(fresh, 10) == 401
    finally:
        for f in waiting:
            f.cancel()


async def test_an_invitation_closed_while_the_password_is_hashed_does_not_let_in(
    admin_gateway: Gateway, consoles: list[Console],
) -> None:
    """Accepting reads the invitation, hashes the new password, then writes:
    an inviter disabled (or an invitation revoked) in between stops the
    write with the answer an invalid link gets, and no account is made."""
    gw = admin_gateway
    owner = await gw.add_user("o@example.com", team="owner")
    o = await console(consoles, gw, "o@example.com")
    ws = gw.conn.execute("SELECT id FROM workspaces WHERE name = 'team'").fetchone()[0]
    links = [(await o.call("POST", "/invitations", {"email": f"cy{i}@example.com", "workspace_id": ws},
                           expect=201))["link"].split("#invite=")[1] for i in range(2)]
    invitee = await console(consoles, gw)
    for token, change, args in ((links[0], "UPDATE users SET disabled_at = ? WHERE id = ?", (time.time(), owner)),
                                (links[1], "UPDATE invitations SET revoked_at = ? WHERE email = ?",
                                 (time.time(), "cy1@example.com"))):
        await invitee.call("POST", "/invitation/inspect", {"token": token})  # open until now
        async with write_lock(gw) as sql:
            accepting = asyncio.ensure_future(invitee.raw("POST", "/invitation/accept",
                                                          {"token": token, "password": "long enough pw"}))
            await waiting_for_write_lock(gw)
            await sql(change, *args)
        status, err = await asyncio.wait_for(accepting, 10)
        assert (status, err["error"]["code"]) == (404, "invalid_invitation"), err
        if change.startswith("UPDATE users"):
            await gw.write(lambda conn: conn.execute("UPDATE users SET disabled_at = NULL WHERE id = ?", (owner,)))
    assert gw.conn.execute("SELECT COUNT(*) FROM users WHERE email LIKE 'cy%'").fetchone()[0] == 0


async def test_a_proxy_not_trusted_for_addresses_is_warned_of_once(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Behind a proxy, without ``trust_forwarded_for`` every client has the
    proxy's address: a few wrong guesses from anyone lock every sign-in out,
    the operator token's too (by design: past the limit the right token must
    not stand out). The first admin request that shows a proxy says so in
    the log, once; with the setting on, nothing is said."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    untrusted = await make_gateway(config_toml(upstream.base_url, "[console]\nlogin_failures_per_address = 2\n"))
    trusted = await make_gateway(config_toml(upstream.base_url, "[console]\ntrust_forwarded_for = true\n"
                                             "login_failures_per_address = 2\n"), "trusted.toml")

    async def workspaces(gw: Gateway, token: str, client: str) -> int:
        async with http.get(gw.url + PREFIX + "/workspaces",
                            headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": client}) as r:
            return r.status

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "trust_forwarded_for is false" in r.getMessage()]

    # One client guesses twice; another, with the right token, is locked out too.
    got = [await workspaces(untrusted, f"guess-{i}", "198.51.100.1") for i in range(2)]
    got.append(await workspaces(untrusted, ADMIN_TOKEN, "198.51.100.2"))
    assert got == [401, 401, 429]
    assert len(warnings()) == 1 and warnings()[0].levelno == logging.WARNING
    assert "198.51.100" not in warnings()[0].getMessage()  # the header's content is not logged
    got = [await workspaces(trusted, f"guess-{i}", "198.51.100.1") for i in range(2)]
    assert [*got, await workspaces(trusted, ADMIN_TOKEN, "198.51.100.2")] == [401, 401, 200]
    assert len(warnings()) == 1
