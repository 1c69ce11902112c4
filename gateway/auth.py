"""API key authentication from an in-memory cache.

The cache holds every live key by its SHA-256 hash, with the set of models it
may use already computed. A background task polls a generation counter that
triggers bump on every change to keys or workspaces (from any process: another
worker, the CLI, the admin API) and reloads when it moves, so a revocation
takes effect within ``server.key_refresh_ms`` plus one reload. The keys of a
disabled console user are left out (users' trigger bumps the counter too).

A key created since the last reload works on its first request anyway: a
well-formed key the cache does not hold is looked up once in the database
(``KeyCache.authenticate_new``). Known keys never wait on anything. The
lookups are bounded so that made-up keys cannot turn into database load:
concurrent requests for one key share one lookup, an unknown key is
remembered for MISS_TTL_S (until the next reload), and at most
LOOKUPS_PER_S lookups run per second per process; past that, an unknown
key is refused without one (it works within ``key_refresh_ms`` anyway).

On PostgreSQL the same triggers NOTIFY every instance, which reloads at once
(a few ms); the poll stays as the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from aiohttp import web

from . import safejson
from .config import Config
from .errors import ServiceUnavailable, Unauthorized
from .store.base import Store

log = logging.getLogger("gateway.auth")

KEY_MAX = 256  # longer than any key the gateway makes
# The shape of every key the gateway makes (store.queries.new_key): "gw-"
# and 32 random bytes in url-safe base64. Only such a token is worth a
# database lookup.
_KEY_SHAPE = re.compile(r"gw-[A-Za-z0-9_-]{43}")
LOOKUPS_PER_S = 20
MISS_TTL_S = 30.0
MISS_MAX = 10_000


def well_formed(token: str) -> bool:
    return _KEY_SHAPE.fullmatch(token) is not None


def _hash(token: str) -> str:
    # surrogateescape: header bytes that are not UTF-8 hash to a miss, not an error.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


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
    v = safejson.loads(raw)
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


class KeyCache:
    """Live keys by hash; see the module docstring for how it stays fresh
    and how a key it does not hold yet is found."""

    def __init__(self, cfg: Config, on_lookup: Callable[[str], None] = lambda result: None) -> None:
        self._cfg = cfg
        self._by_hash: dict[str, KeyInfo] = {}
        self._rows: list[tuple[Any, ...]] = []
        self._generation: int | None = None
        self._store: Store | None = None
        self._on_lookup = on_lookup  # found | unknown | throttled | failed
        self._unknown: dict[str, float] = {}  # hash -> monotonic time until which it stays unknown
        self._pending: dict[str, asyncio.Task[KeyInfo | None]] = {}
        self._window_end = 0.0
        self._window_lookups = 0

    def __len__(self) -> int:
        return len(self._by_hash)

    @staticmethod
    def _token(request: web.Request) -> str:
        """The key a request carries, from ``Authorization: Bearer`` or ``x-api-key``."""
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
        return token

    def authenticate(self, request: web.Request) -> KeyInfo | None:
        """The key of a request, from memory. None: a well-formed key this
        process does not hold yet; ``await authenticate_new(request)`` then
        looks it up (callers write ``authenticate(r) or await
        authenticate_new(r)``, so a known key costs no await)."""
        token = self._token(request)
        if len(token) > KEY_MAX:
            raise _invalid()  # no key is that long: not worth hashing
        info = self._by_hash.get(_hash(token))
        if info is not None:
            if info.expires_at is not None and info.expires_at <= time.time():
                raise _invalid()
            return info
        if not well_formed(token):
            raise _invalid()
        return None

    def key_hash(self, request: web.Request) -> str:
        """The hash of the key a request carries (for ``current``)."""
        return _hash(self._token(request))

    def current(self, key_hash: str) -> KeyInfo | None:
        """The live key with this hash as the cache holds it now (None once
        it is revoked, its user disabled, or it expired): for a connection
        that outlives the request that authenticated it."""
        info = self._by_hash.get(key_hash)
        if info is None or (info.expires_at is not None and info.expires_at <= time.time()):
            return None
        return info

    async def authenticate_new(self, request: web.Request) -> KeyInfo:
        """A well-formed key missing from the cache, looked up once in the
        database (bounded: see the module docstring); 401 if unknown."""
        key_hash = _hash(self._token(request))
        info = self._by_hash.get(key_hash)  # a reload or another request may have found it meanwhile
        if info is None:
            task = self._pending.get(key_hash)
            if task is None:
                now = time.monotonic()
                if self._unknown.get(key_hash, 0.0) > now:
                    raise _invalid()
                if not self._may_look_up(now):
                    self._on_lookup("throttled")
                    raise _invalid()
                task = asyncio.create_task(self._look_up(key_hash), name="key-lookup")
                self._pending[key_hash] = task
                task.add_done_callback(self._lookup_done)
            # Shielded: a client that goes away does not cancel the lookup
            # other requests for the same key are waiting on.
            info = await asyncio.shield(task)
        if info is None or (info.expires_at is not None and info.expires_at <= time.time()):
            raise _invalid()
        return info

    def _lookup_done(self, task: asyncio.Task[KeyInfo | None]) -> None:
        for key_hash, t in list(self._pending.items()):
            if t is task:
                del self._pending[key_hash]
        if not task.cancelled():
            task.exception()  # retrieved here, in case every waiter went away

    def _may_look_up(self, now: float) -> bool:
        if now >= self._window_end:
            self._window_end, self._window_lookups = now + 1.0, 0
        if self._window_lookups >= LOOKUPS_PER_S:
            return False
        self._window_lookups += 1
        return True

    async def _look_up(self, key_hash: str) -> KeyInfo | None:
        try:
            generation, row = await self.fetch_key(key_hash)
        except Exception as e:
            self._on_lookup("failed")
            log.error("key lookup failed: %s", type(e).__name__)
            raise ServiceUnavailable("The API key could not be checked; retry.", code="key_lookup_failed") from None
        if row is None:
            self._on_lookup("unknown")
            if len(self._unknown) >= MISS_MAX:
                self._unknown.clear()
            self._unknown[key_hash] = time.monotonic() + MISS_TTL_S
            return None
        self._on_lookup("found")
        info = self._info(row, {})
        # Keep it only if the cache holds nothing newer than what was read:
        # a reload that saw a later change (a revocation) wins, and the next
        # reload would not come to take back a stale entry.
        if self._generation is None or generation >= self._generation:
            self._rows.append(row)
            self._by_hash[key_hash] = info
        return info

    async def fetch_key(self, key_hash: str) -> tuple[int, tuple[Any, ...] | None]:
        """The key generation, then the live key's row (None if there is no
        such key or it is revoked), as ``refresh`` reads them."""
        if self._store is None:
            raise RuntimeError("the key cache has not been loaded")
        return await self._store.fetch_key(key_hash)

    def set_config(self, cfg: Config) -> None:
        """Recompute every key's model set for a reloaded config."""
        self._cfg = cfg
        self._build()

    async def refresh(self, store: Store) -> bool:
        """Reload from the database if anything changed; True if it did."""
        self._store = store
        generation = await store.keys_generation()
        if generation == self._generation:
            return False
        self._rows = await store.live_keys()
        self._generation = generation
        self._build()
        self._unknown.clear()  # a key created since is in the reloaded set
        return True

    def _info(self, row: tuple[Any, ...], memo: dict[tuple[Any, ...], frozenset[str]]) -> KeyInfo:
        """A KeyInfo from a row of store.queries.LIVE_KEYS; ``memo`` shares model sets between
        keys of one group and allow-lists."""
        cfg = self._cfg
        (kid, _, name, prefix, kgroup, kmodels, rpm, tpm, conc, spend, expires,
         wid, wname, wgroup, wmodels, wspend, wtokens) = row
        group = kgroup or wgroup
        memo_key = (group, wmodels, kmodels)
        models = memo.get(memo_key)
        if models is None:
            models = memo[memo_key] = enabled_models(cfg, group, _patterns(wmodels), _patterns(kmodels))
        g = cfg.group(group)
        return KeyInfo(
            id=kid, workspace_id=wid, workspace=wname, name=name, prefix=prefix, group=group,
            ratio=g.ratio if g else 1.0, models=models, rpm=rpm, tpm=tpm, max_concurrency=conc,
            spend_limit=spend, expires_at=expires, workspace_spend_limit=wspend,
            workspace_token_limit=wtokens,
        )

    def _build(self) -> None:
        memo: dict[tuple[Any, ...], frozenset[str]] = {}
        self._by_hash = {row[1]: self._info(row, memo) for row in self._rows}

    async def run(self, store: Store, interval_s: float, wake: asyncio.Event | None = None) -> None:
        """Refresh every ``interval_s``, or at once when ``wake`` is set (a
        change notice from another instance)."""
        wake = wake or asyncio.Event()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), interval_s)
            wake.clear()
            try:
                if await self.refresh(store):
                    log.info("key cache reloaded: %d live keys", len(self._by_hash))
            except Exception as e:  # keep serving from the last good cache
                log.error("key cache refresh failed: %s", type(e).__name__)


def _invalid() -> Unauthorized:
    return Unauthorized("Invalid, revoked or expired API key.")
