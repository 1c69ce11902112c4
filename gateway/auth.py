"""API key authentication from an in-memory cache.

The cache holds every live key by its SHA-256 hash, with the set of models it
may use already computed. A background task polls a generation counter that
triggers bump on every change to keys or workspaces (from any process: another
worker, the CLI, the admin API) and reloads when it moves, so a revocation
takes effect within ``server.key_refresh_ms`` plus one reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import aiosqlite
import orjson
from aiohttp import web

from .config import Config
from .errors import Unauthorized

log = logging.getLogger("gateway.auth")

KEY_MAX = 256  # longer than any key the gateway makes


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the request path needs to know about an authenticated key."""

    id: int
    workspace_id: int
    workspace: str
    name: str
    prefix: str
    group: str
    ratio: float
    models: frozenset[str]
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    spend_limit: float | None
    expires_at: float | None
    workspace_spend_limit: float | None
    workspace_token_limit: int | None


def _patterns(raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    v = orjson.loads(raw)
    return tuple(str(x) for x in v) if isinstance(v, list) else None


def _narrow(models: Iterable[str], patterns: tuple[str, ...] | None) -> list[str]:
    if patterns is None:
        return list(models)
    return [m for m in models if any(fnmatchcase(m, p) for p in patterns)]


def enabled_models(
    cfg: Config, group: str, ws_patterns: tuple[str, ...] | None, key_patterns: tuple[str, ...] | None
) -> frozenset[str]:
    g = cfg.group(group)
    if g is None:
        return frozenset()
    models = _narrow((m.name for m in cfg.models), g.models)
    return frozenset(_narrow(_narrow(models, ws_patterns), key_patterns))


_LOAD = """
SELECT k.id, k.key_hash, k.name, k.prefix, k.group_name, k.allowed_models, k.rpm, k.tpm,
       k.max_concurrency, k.spend_limit, k.expires_at,
       w.id, w.name, w.default_group, w.allowed_models, w.monthly_spend_limit, w.monthly_token_limit
FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id
WHERE k.revoked_at IS NULL
"""


class KeyCache:
    """Live keys by hash; see the module docstring for how it stays fresh."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._by_hash: dict[str, KeyInfo] = {}
        self._rows: list[tuple[Any, ...]] = []
        self._generation: int | None = None

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, plaintext: str) -> KeyInfo | None:
        if len(plaintext) > KEY_MAX:
            return None  # no key is that long: not worth hashing
        # surrogateescape: header bytes that are not UTF-8 hash to a miss, not an error.
        info = self._by_hash.get(hashlib.sha256(plaintext.encode("utf-8", "surrogateescape")).hexdigest())
        if info is None or (info.expires_at is not None and info.expires_at <= time.time()):
            return None
        return info

    def authenticate(self, request: web.Request) -> KeyInfo:
        """The key of a request, from ``Authorization: Bearer`` or ``x-api-key``."""
        headers = request.headers
        auth = headers.get("Authorization")
        token: str | None = None
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                token = value.strip()
        if not token:
            token = headers.get("x-api-key", "").strip()
        if not token:
            raise Unauthorized(
                "Missing API key: send Authorization: Bearer <key> or x-api-key.", code="missing_api_key"
            )
        info = self.lookup(token)
        if info is None:
            raise Unauthorized("Invalid, revoked or expired API key.")
        return info

    def set_config(self, cfg: Config) -> None:
        """Recompute every key's model set for a reloaded config."""
        self._cfg = cfg
        self._build()

    async def refresh(self, db: aiosqlite.Connection) -> bool:
        """Reload from the database if anything changed; True if it did."""
        async with db.execute("SELECT value FROM meta WHERE name = 'keys_generation'") as cur:
            row = await cur.fetchone()
        generation = int(row[0]) if row else 0
        if generation == self._generation:
            return False
        async with db.execute(_LOAD) as cur:
            self._rows = [tuple(r) for r in await cur.fetchall()]
        self._generation = generation
        self._build()
        return True

    def _build(self) -> None:
        cfg = self._cfg
        memo: dict[tuple[Any, ...], frozenset[str]] = {}
        by_hash: dict[str, KeyInfo] = {}
        for (kid, khash, name, prefix, kgroup, kmodels, rpm, tpm, conc, spend, expires,
             wid, wname, wgroup, wmodels, wspend, wtokens) in self._rows:
            group = kgroup or wgroup
            memo_key = (group, wmodels, kmodels)
            models = memo.get(memo_key)
            if models is None:
                models = memo[memo_key] = enabled_models(cfg, group, _patterns(wmodels), _patterns(kmodels))
            g = cfg.group(group)
            by_hash[khash] = KeyInfo(
                id=kid, workspace_id=wid, workspace=wname, name=name, prefix=prefix, group=group,
                ratio=g.ratio if g else 1.0, models=models, rpm=rpm, tpm=tpm, max_concurrency=conc,
                spend_limit=spend, expires_at=expires, workspace_spend_limit=wspend,
                workspace_token_limit=wtokens,
            )
        self._by_hash = by_hash

    async def run(self, db: aiosqlite.Connection, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                if await self.refresh(db):
                    log.info("key cache reloaded: %d live keys", len(self._by_hash))
            except Exception as e:  # keep serving from the last good cache
                log.error("key cache refresh failed: %s", type(e).__name__)
