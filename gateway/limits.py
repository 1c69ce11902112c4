"""Per-key and per-workspace limits, checked in memory on the request path.

- RPM: a sliding 60 s log of admitted requests per key (a deque of times).
- TPM: a sliding 60 s log of settled tokens (input + output) per key; a
  request is admitted while the last minute's settled tokens are below the
  limit (a request's own tokens are unknown until it ends, so one request may
  overshoot; the next ones wait until the window has room again).
- Concurrency: requests of the key in progress.
- Spend and token quotas: this calendar month's (UTC) cost per key and cost
  and tokens per workspace, loaded from ``usage_events`` at startup and kept
  current by ``settle`` from every usage row.

Every check is a few dict and deque operations; nothing awaits. The clock is
passed in (wall time, seconds), so tests move windows without sleeping.
RPM, TPM and concurrency counters are per process. Spend and token quotas
are shared: ``sync`` adds what other processes recorded (see
docs/production.md, "What is shared between workers").

``Limiter`` is what the request path sees; ``LocalLimiter`` (here) keeps
everything in this process, ``gateway.redis_limits.RedisLimiter`` keeps
RPM, TPM, concurrency and quotas in Redis, shared by every instance.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from .auth import KeyInfo
from .errors import RateLimited
from .store.base import Store

WINDOW_S = 60.0

log = logging.getLogger("gateway.limits")

Headers = list[tuple[str, str]]


class _KeyState:
    __slots__ = ("active", "requests", "spend", "token_sum", "tokens")

    def __init__(self) -> None:
        self.requests: deque[float] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.token_sum = 0
        self.active = 0
        self.spend = 0.0


class _WorkspaceState:
    __slots__ = ("spend", "tokens")

    def __init__(self) -> None:
        self.spend = 0.0
        self.tokens = 0


def month_bounds(now: float) -> tuple[float, float]:
    """Start and end (unix seconds) of the UTC calendar month holding ``now``."""
    d = datetime.fromtimestamp(now, UTC)
    start = datetime(d.year, d.month, 1, tzinfo=UTC)
    end = datetime(d.year + d.month // 12, d.month % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp(), end.timestamp()


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    m, s = divmod(seconds, 60)
    return f"{int(m)}m{round(s, 3):g}s"


class Limiter(Protocol):
    """Admission and settlement of a key's requests, as the request path
    uses them: ``admit`` before going upstream (429 ``RateLimited`` when
    over a limit), then exactly one ``release`` per admitted request and
    one ``settle`` with what the request used, once it has ended."""

    async def admit(self, key: KeyInfo) -> Headers | None:
        """Admit one request or raise RateLimited; returns x-ratelimit-* headers."""
        ...

    def release(self, key: KeyInfo) -> None:
        """End of an admitted request (frees its concurrency slot)."""
        ...

    def settle(self, key: KeyInfo, tokens: int, cost: float) -> None:
        """Count a finished request's tokens and cost."""
        ...

    def admit_free(self, key: KeyInfo, rpm: int, concurrency: int) -> None:
        """Admit one request that bills nothing (a token count, a warm-up)
        or raise RateLimited: such requests are counted apart from the
        key's own limits, at most ``rpm`` a minute and ``concurrency`` at
        once per key; each admitted one is ended by ``release_free``."""
        ...

    def release_free(self, key: KeyInfo) -> None:
        """End of a request admitted by ``admit_free``."""
        ...

    async def load(self, store: Store) -> None:
        """This month's spend and tokens from the usage recorded, before serving."""
        ...

    async def run_sync(self, store: Store, writer_id: int, interval_s: float) -> None:
        """Keep quotas current with what other processes record, until cancelled."""
        ...

    async def close(self) -> None:
        """Give back what the limiter holds (connections, leases)."""
        ...


class LocalLimiter:
    """Admission (``admit``/``release``) and settlement (``settle``), all in
    this process."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.clock = clock
        self._keys: dict[int, _KeyState] = {}
        self._workspaces: dict[int, _WorkspaceState] = {}
        self._free: dict[int, _KeyState] = {}  # requests that bill nothing, per key
        self._on_reject = on_reject
        self._month_start, self._month_end = month_bounds(clock())
        self._seen_id = 0  # usage rows up to this id are counted (load, sync)

    # ------------------------------------------------------------ admission

    async def admit(self, key: KeyInfo) -> Headers | None:
        return self.check(key)

    def check(self, key: KeyInfo) -> Headers | None:
        """Admit one request of ``key`` or raise RateLimited (429 with
        Retry-After). Returns the x-ratelimit-* headers for the response, or
        None when the key has no per-minute limit. A key with a concurrency
        cap holds a slot until ``release``."""
        if (
            key.rpm is None and key.tpm is None and key.max_concurrency is None and key.spend_limit is None
            and key.workspace_spend_limit is None and key.workspace_token_limit is None
        ):
            return None
        now = self.clock()
        st = self._state(key.id, now)

        if key.spend_limit is not None and st.spend >= key.spend_limit:
            self._reject("key_spend", "This key has reached its monthly spend limit.", self._month_end - now,
                         "insufficient_quota")
        if key.workspace_spend_limit is not None or key.workspace_token_limit is not None:
            ws = self._workspaces.get(key.workspace_id)
            if ws is not None:
                if key.workspace_spend_limit is not None and ws.spend >= key.workspace_spend_limit:
                    self._reject("workspace_spend", "The workspace has reached its monthly spend quota.",
                                 self._month_end - now, "insufficient_quota")
                if key.workspace_token_limit is not None and ws.tokens >= key.workspace_token_limit:
                    self._reject("workspace_tokens", "The workspace has reached its monthly token quota.",
                                 self._month_end - now, "insufficient_quota")

        headers: Headers | None = None
        if key.tpm is not None:
            used = self._tokens_in_window(st, now)
            reset = st.tokens[0][0] + WINDOW_S - now if st.tokens else 0.0
            if used >= key.tpm:
                wait = self._tpm_wait(st, key.tpm, now)
                self._reject("tpm", f"Rate limit reached: {key.tpm} tokens per minute.", wait,
                             headers=token_headers(key.tpm, used, wait))
            headers = token_headers(key.tpm, used, reset)
        if key.rpm is not None:
            reqs = st.requests
            cutoff = now - WINDOW_S
            while reqs and reqs[0] <= cutoff:
                reqs.popleft()
            if len(reqs) >= key.rpm:
                wait = reqs[0] + WINDOW_S - now
                self._reject("rpm", f"Rate limit reached: {key.rpm} requests per minute.", wait,
                             headers=[*request_headers(key.rpm, 0, wait), *(headers or ())])
            reqs.append(now)
            rh = request_headers(key.rpm, key.rpm - len(reqs), reqs[0] + WINDOW_S - now)
            headers = rh if headers is None else rh + headers
        if key.max_concurrency is not None:
            if st.active >= key.max_concurrency:
                if key.rpm is not None:
                    st.requests.pop()  # not admitted after all
                self._reject("concurrency",
                             f"Too many concurrent requests: this key allows {key.max_concurrency}.", 1.0,
                             "concurrency_limit_exceeded")
            st.active += 1
        return headers

    def within(self, key: KeyInfo) -> bool:
        """Whether ``key``'s token rate and monthly quotas, as this process
        counts them, are below their limits: ``check`` without taking
        anything or refusing (gateway.redis_limits admits on a grant only
        while they are)."""
        now = self.clock()
        if now >= self._month_end:
            return False  # a new month: counters not reset yet; ask Redis
        st = self._keys.get(key.id)
        if st is not None:
            if key.spend_limit is not None and st.spend >= key.spend_limit:
                return False
            if key.tpm is not None and self._tokens_in_window(st, now) >= key.tpm:
                return False
        ws = self._workspaces.get(key.workspace_id)
        return ws is None or not (
            (key.workspace_spend_limit is not None and ws.spend >= key.workspace_spend_limit)
            or (key.workspace_token_limit is not None and ws.tokens >= key.workspace_token_limit))

    def release(self, key: KeyInfo) -> None:
        """End of an admitted request of ``key`` (frees its concurrency slot)."""
        if key.max_concurrency is not None:
            st = self._keys.get(key.id)
            if st is not None and st.active > 0:
                st.active -= 1

    def admit_free(self, key: KeyInfo, rpm: int, concurrency: int) -> None:
        """See ``Limiter.admit_free``. Per process: with several workers or
        instances each bounds its own share."""
        now = self.clock()
        st = self._free.get(key.id)
        if st is None:
            st = self._free[key.id] = _KeyState()
        reqs = st.requests
        while reqs and reqs[0] <= now - WINDOW_S:
            reqs.popleft()
        if st.active >= concurrency:
            self._reject("free_concurrency", f"Too many token counts in progress: this key may have {concurrency} "
                         "at once.", 1.0, "concurrency_limit_exceeded")
        if len(reqs) >= rpm:
            self._reject("free_rpm", f"Too many token counts: this key may make {rpm} a minute.",
                         reqs[0] + WINDOW_S - now)
        reqs.append(now)
        st.active += 1

    def release_free(self, key: KeyInfo) -> None:
        st = self._free.get(key.id)
        if st is not None and st.active > 0:
            st.active -= 1

    # ----------------------------------------------------------- settlement

    def settle(self, key: KeyInfo, tokens: int, cost: float) -> None:
        """Count a finished request's tokens and cost (from its usage row)."""
        if not tokens and not cost:
            return
        now = self.clock()
        st = self._state(key.id, now)
        st.spend += cost
        if key.tpm is not None and tokens:
            st.tokens.append((now, tokens))
            st.token_sum += tokens
        ws = self._workspaces.get(key.workspace_id)
        if ws is None:
            ws = self._workspaces[key.workspace_id] = _WorkspaceState()
        ws.spend += cost
        ws.tokens += tokens

    async def load(self, store: Store) -> None:
        """This month's spend and tokens per key and workspace, from the
        usage already recorded (run once at startup, before serving)."""
        start, _ = month_bounds(self.clock())
        self._seen_id, (keys, workspaces) = await store.quota_load(start)
        for kid, spend in keys.items():
            self._keys.setdefault(kid, _KeyState()).spend = spend
        for wid, (spend, tokens) in workspaces.items():
            ws = self._workspaces.setdefault(wid, _WorkspaceState())
            ws.spend, ws.tokens = spend, tokens

    async def sync(self, store: Store, writer_id: int) -> int:
        """Add the spend and tokens that other processes (other workers,
        other instances) recorded since the last look; returns how many rows
        were added. This process's own rows are skipped: ``settle`` counted
        them already.

        Where row ids grow in commit order (SQLite: one writer at a time),
        ``id > last seen`` finds exactly the new rows. Where they do not
        (PostgreSQL), the month's totals are read from the rollups and each
        counter takes the larger of the two, so it never goes back and lags
        this process's own unwritten rows by at most one flush."""
        start, _ = month_bounds(self.clock())
        delta = await store.quota_since(self._seen_id, start, writer_id)
        if delta is None:
            _, (keys, workspaces) = await store.quota_load(start)
            for kid, spend in keys.items():
                st = self._keys.setdefault(kid, _KeyState())
                st.spend = max(st.spend, spend)
            for wid, (spend, tokens) in workspaces.items():
                ws = self._workspaces.setdefault(wid, _WorkspaceState())
                ws.spend, ws.tokens = max(ws.spend, spend), max(ws.tokens, tokens)
            return 0
        self._seen_id, groups = delta
        n = 0
        for kid, ws_id, spend, tokens, count in groups:
            n += count
            self._keys.setdefault(kid, _KeyState()).spend += spend
            if ws_id is not None:
                ws = self._workspaces.setdefault(ws_id, _WorkspaceState())
                ws.spend += spend
                ws.tokens += tokens
        return n

    async def run_sync(self, store: Store, writer_id: int, interval_s: float) -> None:
        """``sync`` every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync(store, writer_id)
            except Exception as e:  # keep enforcing from what we know
                log.error("quota sync failed: %s", type(e).__name__)

    async def close(self) -> None:
        return None

    def month_totals(self) -> tuple[dict[int, float], dict[int, tuple[float, int]]]:
        """This month's spend per key, and spend and tokens per workspace, as
        this limiter counts them (seeds the shared counters in Redis)."""
        keys = {kid: st.spend for kid, st in self._keys.items() if st.spend}
        return keys, {wid: (ws.spend, ws.tokens) for wid, ws in self._workspaces.items()}

    # -------------------------------------------------------------- helpers

    def spent(self, key_id: int) -> float:
        st = self._keys.get(key_id)
        return st.spend if st else 0.0

    def _tokens_in_window(self, st: _KeyState, now: float) -> int:
        toks = st.tokens
        cutoff = now - WINDOW_S
        while toks and toks[0][0] <= cutoff:
            st.token_sum -= toks.popleft()[1]
        return st.token_sum

    @staticmethod
    def _tpm_wait(st: _KeyState, tpm: int, now: float) -> float:
        # Until enough of the window's tokens have aged out to drop below tpm.
        left = st.token_sum
        for ts, n in st.tokens:
            left -= n
            if left < tpm:
                return ts + WINDOW_S - now
        return WINDOW_S

    def _state(self, key_id: int, now: float) -> _KeyState:
        """The key's counters, after starting a new month if one began."""
        if now >= self._month_end:
            self._new_month(now)
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState()
        return st

    def _new_month(self, now: float) -> None:
        self._month_start, self._month_end = month_bounds(now)
        for st in self._keys.values():
            st.spend = 0.0
        self._workspaces.clear()

    def _reject(
        self, reason: str, message: str, wait: float, code: str = "rate_limit_exceeded",
        headers: Headers | None = None,
    ) -> None:
        if self._on_reject is not None:
            self._on_reject(reason)
        h = dict(headers or ())
        h["Retry-After"] = str(max(1, math.ceil(wait)))
        raise RateLimited(message, code=code, headers=h)


def request_headers(limit: int, remaining: int, reset: float) -> Headers:
    return [
        ("x-ratelimit-limit-requests", str(limit)),
        ("x-ratelimit-remaining-requests", str(max(0, remaining))),
        ("x-ratelimit-reset-requests", duration(max(0.0, reset))),
    ]


def token_headers(limit: int, used: int, reset: float) -> Headers:
    return [
        ("x-ratelimit-limit-tokens", str(limit)),
        ("x-ratelimit-remaining-tokens", str(max(0, limit - used))),
        ("x-ratelimit-reset-tokens", duration(max(0.0, reset))),
    ]
