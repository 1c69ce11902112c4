"""Config reload (SIGHUP, or the admin API's reload call).

The new file is read and validated off the event loop; if it is bad the
ConfigError propagates and nothing changes. Otherwise the config and a router
built from it are swapped in together, and the key cache recomputes every
key's models and price ratio. Requests in flight keep the config, route and
prices they started with (they hold their own references), so nothing is
dropped. Breaker and cool-down state carries over (see routing.Health).

Settings that need a restart (server, database, usage, admin) are kept from
the running config; a change to them is logged, not applied.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from .config import Config, ConfigError, load_config
from .context import GATEWAY
from .routing import Router

log = logging.getLogger("gateway.reload")

RESTART_ONLY = ("server", "database", "usage", "admin")


async def reload_config(app: web.Application, path: str | Path | None = None) -> Config:
    """Reload the gateway's config from ``path`` (default: the file it was
    started from). Raises ConfigError, leaving the old config in place, if
    the file is missing or invalid. Returns the config now in use."""
    gw = app[GATEWAY]
    old = gw.config
    path = path or old.source
    if path is None:
        raise ConfigError("reload: the gateway was not started from a config file")
    new = await asyncio.to_thread(load_config, path)
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
    return new
