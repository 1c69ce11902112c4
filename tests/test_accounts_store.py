"""Console accounts and the audit log on both stores: the shared SQL
(gateway.store.users, audit, catalog) through ``Store.run``, on SQLite (a
file in tmp_path) and PostgreSQL (a fresh database; skipped when there is
none, failed under CI=true). The HTTP side runs on both through the
suite's database option; these check what the database itself must keep:
one transaction per write body, writes serialized across handles, the
constraints, and the key cache leaving a disabled user's keys out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import DatabaseConfig
from gateway.store import audit, catalog, users
from gateway.store.audit import Actor
from gateway.store.base import ConflictError, NotFoundError, Store, open_store
from gateway.store.scope import Scope
from gateway.store.tx import Tx

NOW = time.time()
ACTOR = Actor("admin@example.com", None, "192.0.2.1")


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    url = request.getfixturevalue("pg_database") if request.param == "postgres" else None
    s = await open_store(DatabaseConfig(tmp_path / "gateway.db", url))
    yield s
    await s.close()


async def other_store(store: Store, tmp_path: Path) -> Store:
    """A second handle on the same database (another instance)."""
    return await open_store(DatabaseConfig(tmp_path / "gateway.db", getattr(store, "url", None)))


async def test_users_memberships_and_their_constraints(store: Store) -> None:
    ws = await store.run(lambda tx: catalog.create_workspace(tx, "acme"), write=True)

    async def make(tx: Tx) -> dict[str, Any]:
        u = await users.create_user(tx, "ann@example.com", now=NOW, name="Ann", password_hash="h")
        await users.set_membership(tx, u["id"], ws["id"], "member", NOW)
        await users.set_membership(tx, u["id"], ws["id"], "owner", NOW)  # a change of role, not a second row
        return u

    u = await store.run(make, write=True)
    assert u["email"] == "ann@example.com" and u["is_admin"] is False and u["status"] == "active"
    assert "password_hash" not in u
    assert await store.run(lambda tx: users.roles(tx, u["id"])) == {ws["id"]: "owner"}
    with pytest.raises(ConflictError):
        await store.run(lambda tx: users.create_user(tx, "ann@example.com", now=NOW), write=True)
    if store.kind == "postgres":  # unique whatever the case (the app stores them in lower case anyway)
        with pytest.raises(ConflictError):
            await store.run(lambda tx: users.create_user(tx, "ANN@example.com", now=NOW), write=True)
    with pytest.raises(ValueError, match="role"):
        await store.run(lambda tx: users.set_membership(tx, u["id"], ws["id"], "admin", NOW), write=True)
    assert await store.run(lambda tx: users.password_hash(tx, "ann@example.com")) == (u["id"], "h", False)
    assert await store.run(users.any_user) is True

    # A caller who owns nothing sees themselves only (no empty IN () list).
    only = await store.run(lambda tx: users.list_users(tx, set(), also=u["id"]))
    assert [x["id"] for x in only] == [u["id"]]
    assert await store.run(lambda tx: users.list_invitations(tx, NOW, set())) == []
    everyone = await store.run(users.list_users)
    assert everyone[0]["workspaces"] == [{"workspace_id": ws["id"], "workspace": "acme", "role": "owner"}]


async def test_a_write_body_is_one_transaction(store: Store) -> None:
    """A change and its audit row commit together or not at all."""
    ws = await store.run(lambda tx: catalog.create_workspace(tx, "acme"), write=True)

    async def half(tx: Tx) -> None:
        key, _ = await catalog.create_key(tx, ws["id"], name="k")
        await audit.record(tx, ACTOR, "key.create", now=NOW, target_type="key", target_id=key["id"],
                           workspace_id=ws["id"], after=key)
        raise NotFoundError("stop here")

    with pytest.raises(NotFoundError):
        await store.run(half, write=True)
    assert await store.run(catalog.list_keys) == []
    page = await store.run(lambda tx: audit.query(tx, since=0, until=NOW + 60))
    assert page["items"] == []


async def test_audit_rows_filters_and_scope(store: Store) -> None:
    a = await store.run(lambda tx: catalog.create_workspace(tx, "a"), write=True)
    b = await store.run(lambda tx: catalog.create_workspace(tx, "b"), write=True)

    async def log(tx: Tx) -> None:
        for i, (action, ws) in enumerate([("key.create", a), ("key.revoke", a), ("user.disable", None),
                                          ("key.create", b)]):
            await audit.record(tx, ACTOR, action, now=NOW + i, target_type="key", target_id=i,
                               workspace_id=None if ws is None else ws["id"],
                               before={"key_hash": "secret", "name": "x"}, after={"token": "t", "n": i})

    await store.run(log, write=True)
    page = await store.run(lambda tx: audit.query(tx, since=0, until=NOW + 60, limit=2))
    assert [r["action"] for r in page["items"]] == ["key.create", "user.disable"] and page["next_cursor"]
    assert page["items"][0]["workspace"] == "b" and page["items"][0]["address"] == "192.0.2.1"
    assert page["items"][0]["before"] == {"name": "x"} and page["items"][0]["after"] == {"n": 3}  # no secret
    rest = await store.run(lambda tx: audit.query(tx, since=0, until=NOW + 60, before_id=int(page["next_cursor"])))
    assert [r["action"] for r in rest["items"]] == ["key.revoke", "key.create"] and rest["next_cursor"] is None
    keys = await store.run(lambda tx: audit.query(tx, since=0, until=NOW + 60, action="key."))
    assert len(keys["items"]) == 3
    scoped = await store.run(lambda tx: audit.query(tx, since=0, until=NOW + 60,
                                                    scope=Scope(frozenset({a["id"]}), frozenset())))
    assert {r["workspace_id"] for r in scoped["items"]} == {a["id"]}
    nothing = await store.run(lambda tx: audit.query(tx, since=0, until=NOW + 60, scope=Scope(frozenset(),
                                                                                               frozenset())))
    assert nothing["items"] == []


async def test_throttle_check_and_count_are_serialized(store: Store, tmp_path: Path) -> None:
    """Sign-in attempts sent at once, from two handles (two instances), each
    checking the failure count and adding to it in one write body: exactly
    the limit pass, never more (the check of one cannot run between the
    check and the count of another)."""
    limit, attempts = 5, 24
    second = await other_store(store, tmp_path)
    passed: list[int] = []

    async def attempt(tx: Tx, i: int) -> None:
        n, _ = await users.failures(tx, "address", "192.0.2.7", NOW - 600)
        if n >= limit:
            raise ConflictError("too many")
        if store.kind == "postgres":
            await tx.execute("SELECT pg_sleep(0.01)")  # widen the window a race would need
        await users.add_failure(tx, "address", "192.0.2.7", NOW)
        passed.append(i)

    async def one(i: int) -> None:
        s = store if i % 2 else second
        with contextlib.suppress(ConflictError):
            await s.run(lambda tx: attempt(tx, i), write=True)

    try:
        await asyncio.gather(*(one(i) for i in range(attempts)))
    finally:
        await second.close()
    assert len(passed) == limit
    n, oldest = await store.run(lambda tx: users.failures(tx, "address", "192.0.2.7", NOW - 600))
    assert n == limit and oldest == pytest.approx(NOW)


async def test_failures_rows_dropped_and_pruned(store: Store) -> None:
    async def add(tx: Tx) -> list[int]:
        return [await users.add_failure(tx, "account", "ann@example.com", NOW - age) for age in (900, 10, 5)]

    ids = await store.run(add, write=True)
    assert len(set(ids)) == 3
    await store.run(lambda tx: users.drop_failure(tx, ids[2]), write=True)
    assert (await store.run(lambda tx: users.failures(tx, "account", "ann@example.com", NOW - 600)))[0] == 1
    assert await store.run(lambda tx: users.prune_failures(tx, NOW - 600), write=True) == 1
    await store.run(lambda tx: users.clear_failures(tx, "account", "ann@example.com"), write=True)
    assert await store.run(lambda tx: users.failures(tx, "account", "ann@example.com", 0)) == (0, None)


async def test_sessions_end_and_disabling_suspends_keys(store: Store) -> None:
    ws = await store.run(lambda tx: catalog.create_workspace(tx, "acme"), write=True)

    async def setup(tx: Tx) -> tuple[int, str, str, str]:
        u = await users.create_user(tx, "bob@example.com", now=NOW, password_hash="h")
        await users.set_membership(tx, u["id"], ws["id"], "member", NOW)
        s1, _ = await users.create_session(tx, u["id"], now=NOW, ttl_s=3600, address="192.0.2.1")
        s2, _ = await users.create_session(tx, u["id"], now=NOW, ttl_s=3600, address=None)
        _, plaintext = await catalog.create_key(tx, ws["id"], name="bob's", user_id=u["id"])
        return u["id"], s1, s2, plaintext

    user_id, s1, s2, plaintext = await store.run(setup, write=True)
    h1, h2 = users.token_hash(s1), users.token_hash(s2)
    live = await store.run(lambda tx: users.session(tx, h1, now=NOW + 1, idle_s=600))
    assert live is not None and live["user_id"] == user_id and "id_hash" not in live
    assert await store.run(lambda tx: users.session(tx, h1, now=NOW + 601, idle_s=600)) is None  # idle too long
    # A new password ends the other sessions, not this one.
    assert await store.run(lambda tx: users.end_sessions(tx, user_id, keep=h1), write=True) == 1
    assert await store.run(lambda tx: users.session(tx, h2, now=NOW + 1, idle_s=600)) is None
    assert await store.run(lambda tx: users.session(tx, h1, now=NOW + 1, idle_s=600)) is not None

    key_hash = catalog.hash_key(plaintext)
    assert (await store.fetch_key(key_hash))[1] is not None
    generation = await store.keys_generation()
    after = await store.run(lambda tx: users.update_user(tx, user_id, now=NOW, disabled=True), write=True)
    assert after["status"] == "disabled"
    # Signed out everywhere, the key left out of the cache, and the cache told.
    assert await store.run(lambda tx: users.session(tx, h1, now=NOW + 1, idle_s=600)) is None
    assert (await store.fetch_key(key_hash))[1] is None
    assert await store.keys_generation() > generation
    assert [k["user_suspended"] for k in await store.run(catalog.list_keys)] == [True]

    await store.run(lambda tx: users.update_user(tx, user_id, now=NOW, disabled=False), write=True)
    assert (await store.fetch_key(key_hash))[1] is not None
    # Enabling an enabled user changes nothing: no key cache reload anywhere.
    generation = await store.keys_generation()
    await store.run(lambda tx: users.update_user(tx, user_id, now=NOW, disabled=False), write=True)
    assert await store.keys_generation() == generation
    # Taken out of the workspace: their keys there are revoked.
    revoked = await store.run(lambda tx: users.remove_membership(tx, user_id, ws["id"], NOW), write=True)
    assert len(revoked) == 1 and (await store.fetch_key(key_hash))[1] is None
    with pytest.raises(NotFoundError):
        await store.run(lambda tx: users.remove_membership(tx, user_id, ws["id"], NOW), write=True)


async def test_an_invitation_is_accepted_once(store: Store, tmp_path: Path) -> None:
    ws = await store.run(lambda tx: catalog.create_workspace(tx, "acme"), write=True)
    inv, token = await store.run(lambda tx: users.create_invitation(
        tx, "cy@example.com", workspace_id=ws["id"], role="member", invited_by=None, now=NOW, ttl_s=3600),
        write=True)
    opened = await store.run(lambda tx: users.open_invitation(tx, token, NOW + 1))
    assert opened is not None and opened["id"] == inv["id"] and opened["workspace"] == "acme"
    assert "token_hash" not in opened
    assert await store.run(lambda tx: users.open_invitation(tx, token, NOW + 3601)) is None  # expired
    second = await other_store(store, tmp_path)
    try:
        won = await asyncio.gather(*(s.run(lambda tx: users.close_invitation(tx, inv["id"], NOW, accepted=True),
                                           write=True) for s in (store, second, store, second)))
    finally:
        await second.close()
    assert sorted(won) == [False, False, False, True]
    assert await store.run(lambda tx: users.open_invitation(tx, token, NOW + 1)) is None


async def test_accepting_checks_again_in_its_write_that_the_invitation_is_open(store: Store) -> None:
    """The acceptance reads the invitation, hashes the password (a second or
    more when busy), then writes: whatever happened in between (the inviter
    disabled or demoted, the invitation expired) must stop the write, as
    it would have stopped the read."""
    ws = await store.run(lambda tx: catalog.create_workspace(tx, "acme"), write=True)

    async def setup(tx: Tx) -> tuple[int, int, str]:
        owner = await users.create_user(tx, "o@example.com", now=NOW, password_hash="h")
        await users.set_membership(tx, owner["id"], ws["id"], "owner", NOW)
        inv, token = await users.create_invitation(tx, "cy@example.com", workspace_id=ws["id"], role="member",
                                                   invited_by=owner["id"], now=NOW, ttl_s=3600)
        return owner["id"], inv["id"], token

    owner, inv_id, token = await store.run(setup, write=True)

    async def accept(now: float = NOW + 1) -> bool:
        return await store.run(lambda tx: users.close_invitation(tx, inv_id, now, accepted=True), write=True)

    assert await store.run(lambda tx: users.open_invitation(tx, token, NOW + 1)) is not None  # the read
    await store.run(lambda tx: users.update_user(tx, owner, now=NOW, disabled=True), write=True)
    assert await accept() is False
    await store.run(lambda tx: users.update_user(tx, owner, now=NOW, disabled=False), write=True)
    await store.run(lambda tx: users.set_membership(tx, owner, ws["id"], "member", NOW), write=True)
    assert await accept() is False
    await store.run(lambda tx: users.set_membership(tx, owner, ws["id"], "owner", NOW), write=True)
    assert await accept(NOW + 3601) is False  # expired meanwhile
    assert await accept() is True
    assert await accept() is False


@pytest.mark.parametrize("text", ["ann\x00@example.com", "ann\ud800@example.com"])
async def test_text_postgresql_cannot_hold_is_refused_by_either_store(store: Store, text: str) -> None:
    """A NUL or a lone surrogate (``%00`` in a path, a query string decoded
    with surrogate escapes) is a ValueError, which the admin API answers
    with a 400, on SQLite as on PostgreSQL (where the driver would fail the
    request with a 500)."""
    with pytest.raises(ValueError, match=r"NUL|Unicode"):
        await store.run(lambda tx: users.find_user(tx, text))
    with pytest.raises(ValueError, match=r"NUL|Unicode"):
        await store.run(lambda tx: catalog.create_workspace(tx, text), write=True)
    assert await store.run(catalog.list_workspaces) == []
