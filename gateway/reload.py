"""Config reload (SIGHUP, or the admin API's reload call).

The new file is read and validated off the event loop; if it is bad the
ConfigError propagates and nothing changes. Otherwise the config and a router
built from it are swapped in together, and the key cache recomputes every
key's models and price ratio. Requests in flight keep the config, route and
prices they started with (they hold their own references), so nothing is
dropped. Breaker and cool-down state carries over (see routing.Health).

Settings that need a restart (server, database, usage, admin) are kept from
the running config; a change to them is logged, not applied.

Every applied reload is audited (gateway.store.audit): who asked (a console
user, the operator token, SIGHUP), and before/after the parts of the config
that changed, by name (upstreams by kind and cleaned URL, models by routes
and prices, groups by models and ratio; never a secret).

A reload that would leave the gateway with no upstream or no model (an
emptied or half-written file: every request would 404) is refused unless
forced: ``POST /admin/api/reload?force=true``, or SIGUSR1 instead of
SIGHUP. SIGHUP never forces; the supervisor applies the same check before
its workers do.

With workers, a reload reaches them all through the supervisor: SIGHUP
(or SIGUSR1) to the supervisor, which re-reads the file for the workers it
starts later and forwards the signal; an admin API reload, answered by one
worker, signals the supervisor the same way. One reload is one audit row:
written by the process that took the request (the single process, the
worker that answered the API call, or the supervisor for a signal from
outside), never by each worker it was forwarded to.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from .config import Config, ConfigError, DatabaseConfig, load_config
from .context import GATEWAY
from .routing import Router
from .store import audit
from .store.audit import Actor
from .store.base import run_on_store
from .store.schema import connect
from .store.tx import Body, IntegrityError, Tx, run_sqlite

log = logging.getLogger("gateway.reload")

RESTART_ONLY = ("server", "database", "usage", "admin")
SIGHUP = Actor("SIGHUP")
SIGUSR1 = Actor("SIGUSR1 (forced)")
# Appended to the origin of a reload notice to other instances when forced.
FORCED = "!force"


def check_not_emptied(old: Config, new: Config) -> None:
    """ConfigError if ``new`` removes every upstream or every model that
    ``old`` had (see the module docstring)."""
    for what in ("upstreams", "models"):
        if getattr(old, what) and not getattr(new, what):
            raise ConfigError(f"the new config has no {what}: every request would fail; "
                              "reload with force to apply it anyway")


def summary(cfg: Config) -> dict[str, dict[str, Any]]:
    """What a reload can change, keyed by name, without secrets."""
    return {
        "upstreams": {u.name: {"kind": u.kind, "base_url": u.public_base_url} for u in cfg.upstreams},
        "models": {m.name: {"routes": [f"{r.upstream}:{r.model}" for r in m.routes], "price": asdict(m.price)}
                   for m in cfg.models},
        "groups": {g.name: {"models": list(g.models), "ratio": g.ratio} for g in cfg.groups},
        "console": {"console": asdict(cfg.console)},
    }


def changed(old: Config, new: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(before, after)``: the entries that differ, section by section
    (an entry missing on one side was added or removed)."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    a, b = summary(old), summary(new)
    for section in a:
        names = sorted(set(a[section]) | set(b[section]))
        diff = [n for n in names if a[section].get(n) != b[section].get(n)]
        if diff:
            before[section] = {n: a[section][n] for n in diff if n in a[section]}
            after[section] = {n: b[section][n] for n in diff if n in b[section]}
    return before, after


def _audit_body(actor: Actor, source: Path, old: Config, new: Config) -> Body[None]:
    before, after = changed(old, new)

    def body(tx: Tx) -> Awaitable[None]:
        return audit.record(tx, actor, "config.reload", now=time.time(), target_type="config",
                            target_id=str(source), before=before, after=after)

    return body


def record_reload(db: DatabaseConfig, actor: Actor, source: Path, old: Config, new: Config) -> None:
    """The audit row of one applied reload, synchronously (the supervisor,
    which holds no store; a CLI reload with no store open): straight to the
    SQLite file, or through a store opened for it on PostgreSQL."""
    body = _audit_body(actor, source, old, new)
    if db.url is not None:
        run_on_store(db, lambda store: store.run(body, write=True))
        return
    conn = connect(db.path)
    try:
        run_sqlite(conn, body, write=True)
    finally:
        conn.close()


async def reload_config(app: web.Application, path: str | Path | None = None, *,
                        actor: Actor = SIGHUP, force: bool = False, audited: bool = True) -> Config:
    """Reload the gateway's config from ``path`` (default: the file it was
    started from) and, if ``audited``, audit it as ``actor``'s. Raises
    ConfigError, leaving the old config in place, if the file is missing or
    invalid, or (unless ``force``) would remove every upstream or every
    model. Returns the config now in use."""
    gw = app[GATEWAY]
    old = gw.config
    path = path or old.source
    if path is None:
        raise ConfigError("reload: the gateway was not started from a config file")
    new = await asyncio.to_thread(load_config, path)
    if not force:
        check_not_emptied(old, new)
    kept = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
    if kept:
        log.warning("config reload: %s changed; these take effect on restart", ", ".join(kept))
        new = replace(new, server=old.server, database=old.database, usage=old.usage, admin=old.admin)
    router = Router(new, gw.router.health)
    # No await from here on: a request sees either the old pair or the new one.
    gw.config, gw.router = new, router
    gw.keys.set_config(new)
    log.info(
        "config reloaded from %s: %d upstreams, %d models, %d groups",
        path, len(new.upstreams), len(new.models), len(new.groups),
    )
    if not audited:
        return new
    try:
        body = _audit_body(actor, Path(path).resolve(), old, new)
        if gw.store is not None:
            await gw.store.run(body, write=True)
        else:  # no store open (not serving)
            await asyncio.to_thread(record_reload, old.database, actor, Path(path).resolve(), old, new)
    except (sqlite3.Error, asyncpg.PostgresError, IntegrityError, OSError) as e:
        # The reload stands; say loudly that its audit row is missing.
        log.error("config reload applied but not audited: %s", type(e).__name__)
    return new
