"""Limits shared by every gateway instance, kept in Redis (``[redis] url``).

One Lua script checks and takes in one round trip, atomically, so N
instances admit exactly what one would (but see grants, below):

- RPM: a sliding 60 s log per key (a sorted set of admitted requests,
  scored by time): exact, the same rule as the local limiter. Memory is
  one entry per request of the last minute.
- TPM: settled tokens per key in one-second buckets (a hash); a request is
  admitted while the last 60 s hold fewer tokens than the limit (a
  request's own tokens are known only once it ends, as locally).
- Concurrency: a sorted set of leases per key, scored by their expiry. An
  instance refreshes its leases every third of ``LEASE_MS``; a lease of an
  instance that died (kill -9) expires on its own, so a crash never leaks a
  slot for longer than ``LEASE_MS``.
- Monthly spend (per key) and spend and token quotas (per workspace): one
  hash per UTC month, fields ``k:<key>``, ``w:<ws>:s``, ``w:<ws>:t``. The
  first instance to find the month's hash without its ``seeded`` field adds
  the month's totals from the database (at start, and again after Redis
  lost its data), so Redis holds what the database holds plus what was
  settled since.

Grants. A round trip to Redis on every request costs more than the
gateway may add to a request (0.1 ms), so an admission may also grant this
instance permits to admit the key's next requests on its own, for
GRANT_TTL_S (1 s):

- Only keys without a concurrency limit (every request of such a key
  takes a slot in Redis), and only while every limit of the key has ample
  room: RPM while at least GRANT_MIN_HEADROOM (100) places of the window
  are free, TPM and the quotas while each is at most GRANT_FRACTION (75 %)
  used. At most GRANT_MAX (32) permits, and for RPM at most an eighth of
  the free places, so instances asking at once share what is left.
- RPM permits are taken in the window at once (members
  ``<instance>:<seq>:<i>``, scored at the grant): N instances together
  never admit more than the RPM. A permit used is moved to its request's
  time by the next settle batch (the window stays exact up to the settle
  delay); those left unused when the grant ends are removed by it. An
  instance that dies leaves its unused permits to age out of the window
  within 60 s: fewer admissions, never more.
- TPM and quotas are read, not taken: within a grant an instance adds only
  what it settles itself (its LocalLimiter, which counts every settle, and
  the grant's own token count); what other instances settle meanwhile is
  seen at the next grant. A key may so pass its TPM or a quota by what N
  instances admit in GRANT_TTL_S once it is past 75 %: like the requests
  in flight, whose tokens are unknown until they end.

While one request of a key asks Redis for permits, the key's other
requests on this instance wait for its answer (when the key's last
asking admission got permits) rather than asking too.

Tokens and cost are reconciled after the response (``settle``): settles and
releases are summed per key for a few milliseconds and sent as one batch
(one EVALSHA of the SETTLE script), off the request path. Batches go one at
a time, each with an id that grows; the script records the last id applied
for this instance and skips a batch it has applied already, so a batch
whose reply was lost (a timeout, a connection cut after Redis ran it) is
sent again with the same id and counted once. A command of a batch that
Redis refuses (a key of the wrong type, written by something else) is
dropped with one log line, the rest of the batch applied.

Redis unreachable (``redis.failure``): ``open`` admits on this instance's
own LocalLimiter (which counts every settle all along, so its quotas are
current; its RPM window starts empty), ``closed`` answers 503 to keys
that have limits (keys without limits need no Redis). Either way
``gateway_redis_errors_total`` counts the failure, ``gateway_redis_up``
drops to 0 and one log line marks the change; Redis is tried again every
``redis.retry_s`` and shared limits resume as soon as it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError

from .auth import KeyInfo
from .config import RedisConfig
from .errors import GatewayError, RateLimited
from .limits import Headers, LocalLimiter, month_bounds, request_headers, token_headers
from .resp import RespClient, RespError, bulk
from .store.base import Store

log = logging.getLogger("gateway.redis")

# What a call to Redis may raise when Redis is away or answers nonsense
# (redis-py's parsers raise ValueError on a malformed number, and recurse
# into nested replies): each is a Redis failure, never a crash.
FAILURES = (RedisError, OSError, TimeoutError, ValueError, RecursionError)

LEASE_MS = 60_000
SETTLE_DELAY_S = 0.005
MONTH_TTL_S = 40 * 86400
# How long Redis remembers the last settle batch an instance applied: a
# batch whose reply was lost is sent again within retry_s once Redis
# answers, far sooner than this.
BATCH_TTL_S = 86400

# Grants (see the module docstring): how many permits an admission may add,
# and when. RPM: only while the window has GRANT_MIN_HEADROOM free places,
# and an eighth of what is free at most; TPM and quotas: only while each is
# at most GRANT_FRACTION used.
GRANT_MAX = 32
GRANT_MIN_HEADROOM = 100
GRANT_DIVISOR = 8
GRANT_FRACTION = 0.75
GRANT_TTL_S = 1.0

# KEYS: rpm zset, tpm hash, concurrency zset, month quota hash.
# ARGV: now_ms, rpm, tpm, concurrency, key spend limit, workspace spend
# limit, workspace token limit (-1: none), member, lease_ms, the quota
# hash's field names for the key's spend, the workspace's spend and tokens,
# and 1 when this instance asks for permits (a grant), else 0.
# Returns {code, wait_ms, seeded, tokens_used, tokens_reset_ms, requests,
# requests_reset_ms, permits}; code 0 admits, 1..6 name the limit that
# refused. The permits granted are taken in the RPM window at once, as
# members <member>:1 .. <member>:<permits>.
ADMIT = f"""
local now = tonumber(ARGV[1])
local rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local kspend, wspend, wtok = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local member, lease = ARGV[8], tonumber(ARGV[9])
local seeded = 1
local q = redis.call('HMGET', KEYS[4], 'seeded', ARGV[10], ARGV[11], ARGV[12])
if not q[1] then seeded = 0 end
local ks, ws, wt = tonumber(q[2] or '0'), tonumber(q[3] or '0'), tonumber(q[4] or '0')
if kspend >= 0 and ks >= kspend then return {{1, 0, seeded, 0, 0, 0, 0, 0}} end
if wspend >= 0 and ws >= wspend then return {{2, 0, seeded, 0, 0, 0, 0, 0}} end
if wtok >= 0 and wt >= wtok then return {{3, 0, seeded, 0, 0, 0, 0, 0}} end
local used, treset = 0, 0
if tpm >= 0 then
  local h = redis.call('HGETALL', KEYS[2])
  local cutoff = math.floor(now / 1000) - 60
  local buckets = {{}}
  for i = 1, #h, 2 do
    local s, n = tonumber(h[i]), tonumber(h[i + 1])
    if s <= cutoff then redis.call('HDEL', KEYS[2], h[i])
    else used = used + n; buckets[#buckets + 1] = {{s, n}} end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  if #buckets > 0 then treset = (buckets[1][1] + 60) * 1000 - now end
  if used >= tpm then
    local left, wait = used, 60000
    for _, b in ipairs(buckets) do
      left = left - b[2]
      if left < tpm then wait = (b[1] + 60) * 1000 - now; break end
    end
    return {{4, wait, seeded, used, treset, 0, 0, 0}}
  end
end
local n = 0
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
  n = redis.call('ZCARD', KEYS[1])
  if n >= rpm then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {{5, tonumber(first[2]) + 60000 - now, seeded, used, treset, n, 0, 0}}
  end
end
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then return {{6, 1000, seeded, used, treset, 0, 0, 0}} end
  redis.call('ZADD', KEYS[3], now + lease, member)
  redis.call('PEXPIRE', KEYS[3], lease)
end
local grant = 0
if ARGV[13] == '1' and conc < 0 then
  grant = {GRANT_MAX}
  local f = {GRANT_FRACTION!r}
  if (tpm >= 0 and used > tpm * f) or (kspend >= 0 and ks > kspend * f) or (wspend >= 0 and ws > wspend * f)
      or (wtok >= 0 and wt > wtok * f) then grant = 0 end
  if rpm >= 0 then
    if rpm - n < {GRANT_MIN_HEADROOM} then grant = 0
    else grant = math.min(grant, math.floor((rpm - n - 1) / {GRANT_DIVISOR})) end
  end
end
local rreset = 0
if rpm >= 0 then
  local oldest = now
  if n > 0 then oldest = math.min(now, tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2])) end
  local z = {{now, member}}
  for i = 1, grant do z[#z + 1] = now; z[#z + 1] = member .. ':' .. i end
  redis.call('ZADD', KEYS[1], unpack(z))
  redis.call('PEXPIRE', KEYS[1], 60000)
  n = n + 1
  rreset = oldest + 60000 - now
end
return {{0, 0, seeded, used, treset, n, rreset, grant}}
"""

ADMIT_SHA = hashlib.sha1(ADMIT.encode()).hexdigest()

# KEYS: the month's quota hash. ARGV: field, amount, field, amount, ...
# Adds the database's totals once per hash (the first caller wins).
SEED = f"""
if redis.call('HSETNX', KEYS[1], 'seeded', 1) == 1 then
  for i = 1, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[1], {MONTH_TTL_S})
  return 1
end
return 0
"""

# KEYS: this instance's last applied batch id, then the keys the batch
# writes. ARGV: the batch id, then operations of four arguments each (op,
# index into KEYS, a, b):
#   h  HINCRBY key a b, then EXPIRE 120 s        (b tokens in second a)
#   f  HINCRBYFLOAT key a b, then EXPIRE a month (quota field a)
#   z  ZREM key a                                (a concurrency slot released,
#                                                 a permit given back unused)
#   x  ZADD key XX b a                           (a permit used at time b, ms)
# Returns {0} when the batch was applied before (its reply was lost), else
# {1, then for each operation Redis refused: its number (from 0) and the
# error's first word}. Batches of one
# instance go one at a time, so "applied" is "id <= the last id applied".
SETTLE = f"""
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= last then return {{0}} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', {BATCH_TTL_S})
local out = {{1}}
for i = 2, #ARGV, 4 do
  local op, k, a, b = ARGV[i], KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], ARGV[i + 3]
  local r
  if op == 'h' then
    r = redis.pcall('HINCRBY', k, a, b)
    if type(r) ~= 'table' then redis.call('EXPIRE', k, 120) end
  elseif op == 'f' then
    r = redis.pcall('HINCRBYFLOAT', k, a, b)
    if type(r) ~= 'table' then redis.call('EXPIRE', k, {MONTH_TTL_S}) end
  elseif op == 'x' then
    r = redis.pcall('ZADD', k, 'XX', b, a)
  else
    r = redis.pcall('ZREM', k, a)
  end
  if type(r) == 'table' and r.err then
    out[#out + 1] = (i - 2) / 4
    out[#out + 1] = string.match(r.err, '^%S+')
  end
end
return out
"""

SETTLE_SHA = hashlib.sha1(SETTLE.encode()).hexdigest()

_MESSAGES = {
    1: ("key_spend", "This key has reached its monthly spend limit.", "insufficient_quota"),
    2: ("workspace_spend", "The workspace has reached its monthly spend quota.", "insufficient_quota"),
    3: ("workspace_tokens", "The workspace has reached its monthly token quota.", "insufficient_quota"),
    4: ("tpm", "Rate limit reached: {tpm} tokens per minute.", "rate_limit_exceeded"),
    5: ("rpm", "Rate limit reached: {rpm} requests per minute.", "rate_limit_exceeded"),
    6: ("concurrency", "Too many concurrent requests: this key allows {conc}.", "concurrency_limit_exceeded"),
}


class _Batch:
    """Settles and releases sent to Redis together (the SETTLE script's
    keys and operations), under one id."""

    __slots__ = ("args", "id", "keys")

    def __init__(self, id: int, keys: list[str], args: list[str | int]) -> None:
        self.id = id
        self.keys = keys
        self.args = args


def _limits(key: KeyInfo) -> tuple[object, ...]:
    return (key.rpm, key.tpm, key.max_concurrency, key.spend_limit, key.workspace_spend_limit,
            key.workspace_token_limit)


class _Grant:
    """Permits of one key that this instance may use without asking Redis,
    until GRANT_TTL_S after the grant, and what the grant's reply said
    (for the rate-limit headers of the requests admitted on it)."""

    __slots__ = ("ends", "limits", "member", "permits", "remaining", "rreset_at", "timer", "tokens", "tokens_used",
                 "treset_at", "used")

    def __init__(self, limits: tuple[object, ...], member: str, permits: int, remaining: int, rreset_at: float,
                 tokens_used: int, treset_at: float) -> None:
        self.limits = limits
        self.member = member  # the permits are <member>:1 .. <member>:<permits> in the RPM window
        self.permits = permits
        self.used = 0
        self.remaining = remaining  # requests left in the window after the granting one
        self.rreset_at = rreset_at
        self.tokens_used = tokens_used  # in the TPM window at the grant
        self.ends = 0.0  # the grant's time + GRANT_TTL_S, on the limiter's clock
        self.tokens = 0  # settled by this instance since
        self.treset_at = treset_at
        self.timer: asyncio.TimerHandle | None = None


class LimitsUnavailable(GatewayError):
    """Redis is unreachable and ``redis.failure = "closed"``."""

    status = 503
    type = "service_unavailable"
    code = "limits_unavailable"


def _month(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m")


def _limit(v: float | None) -> float:
    return -1 if v is None else v


class RedisLimiter:
    """Shared limits (see the module docstring), with a LocalLimiter beside
    it that counts everything too, for admission while Redis is away."""

    def __init__(
        self,
        cfg: RedisConfig,
        local: LocalLimiter,
        *,
        on_reject: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        assert cfg.url is not None
        self.cfg = cfg
        self.local = local
        self.clock = local.clock
        timeout = cfg.timeout_ms / 1000
        # One immediate retry on a broken connection (a pooled connection
        # to a Redis that restarted fails once), none on a timeout: a request
        # never waits on Redis much longer than one timeout; the limiter's
        # own retry_s takes over from there.
        self.redis = Redis.from_url(
            cfg.url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)), health_check_interval=0,
        )
        # The admission's own connection: see gateway.resp for why.
        self._fast = RespClient(cfg.url, timeout)
        self._seed = self.redis.register_script(SEED)
        self._prefix = cfg.key_prefix
        self._month_start = self._month_end = 0.0
        self._month = ""
        self._instance = secrets.token_hex(6)
        self._instance_b = self._instance.encode()
        self._commands: dict[tuple[object, ...], tuple[bytes, bytes, bytes]] = {}
        self._seq = 0
        self._held: dict[int, list[str]] = defaultdict(list)  # key id -> this instance's leases
        self._up = True
        self._retry_at = 0.0
        self._on_reject = on_reject
        self._on_error = on_error
        self._on_state = on_state
        # Settles and releases waiting for the next pipeline.
        self._tokens: dict[tuple[int, int], int] = defaultdict(int)  # (key, second) -> tokens
        self._quota: dict[str, float] = defaultdict(float)  # quota hash field -> amount
        self._zrem: list[tuple[str, str]] = []  # (zset, member): slots released, permits given back
        self._rescore: list[tuple[str, str, int]] = []  # (zset, member, ms): permits used
        self._grants: dict[int, _Grant] = {}  # key id -> the permits this instance holds
        self._granting: dict[int, asyncio.Event] = {}  # key id -> set once its admission asking for permits ends
        self._leasable: set[int] = set()  # keys whose last admission that asked got permits
        self._flush: asyncio.TimerHandle | None = None
        self._draining: asyncio.Task[None] | None = None
        self._unsent: _Batch | None = None  # sent, not known to be applied: sent again, same id
        self._batch_id = 0
        self._refused_keys: set[str] = set()
        self._store: Store | None = None
        self._seeding: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------ admission

    async def admit(self, key: KeyInfo) -> Headers | None:
        if (
            key.rpm is None and key.tpm is None and key.max_concurrency is None and key.spend_limit is None
            and key.workspace_spend_limit is None and key.workspace_token_limit is None
        ):
            return None
        grant = self._grants.get(key.id)
        if grant is None and key.id in self._leasable and (coming := self._granting.get(key.id)) is not None:
            await coming.wait()  # another request of this key is asking for permits: use them
            grant = self._grants.get(key.id)
        if grant is not None and (headers := self._use_grant(key, grant)) is not None:
            return headers or None
        if not self._up and time.monotonic() < self._retry_at:
            return self._degraded(key)
        now = self.clock()
        now_ms = int(now * 1000)
        self._seq += 1
        head, mid, tail = self._command(key, self._month_key(now))
        member = b"%s:%d" % (self._instance_b, self._seq)
        # Ask for permits unless another request of the key is asking now.
        ask = key.max_concurrency is None and key.id not in self._granting
        if ask:
            self._granting[key.id] = asyncio.Event()
        cmd = b"%s$%d\r\n%d\r\n%s$%d\r\n%s\r\n%s%s" % (
            head, len(str(now_ms)), now_ms, mid, len(member), member, tail, b"$1\r\n1\r\n" if ask else b"$1\r\n0\r\n")
        try:
            return self._admitted(key, now, member, ask, await self._ask(cmd))
        finally:
            if ask:
                self._granting.pop(key.id).set()

    async def _ask(self, cmd: bytes) -> list[int] | None:
        """The admission script's reply to ``cmd``, or None when Redis
        failed (counted as such)."""
        try:
            try:
                res = await self._fast.send(cmd)
            except RespError as e:
                if not str(e).startswith("NOSCRIPT"):
                    raise
                await self._fast.call("SCRIPT", "LOAD", ADMIT)  # Redis restarted, or flushed its scripts
                res = await self._fast.send(cmd)
        except (RespError, *FAILURES) as e:
            self._failed("admit", e)
            return None
        if not (isinstance(res, list) and len(res) == 8 and all(type(x) is int for x in res)):
            # Not the script's answer: a Redis (or something on its port)
            # that cannot be trusted to have counted anything.
            self._failed("admit", RespError("unexpected reply to the admission script"))
            return None
        self._recovered()
        return res

    def _admitted(self, key: KeyInfo, now: float, member: bytes, ask: bool, res: list[int] | None) -> Headers | None:
        if res is None:
            return self._degraded(key)
        code, wait_ms, seeded, used, treset, requests, rreset, permits = res
        if not seeded:
            self._reseed()
        if ask and not permits:
            self._leasable.discard(key.id)  # its next requests need not wait for permits
        if code:
            reason, message, err = _MESSAGES[code]
            wait = wait_ms / 1000
            headers: Headers = []
            if code in (1, 2, 3):
                wait = month_bounds(now)[1] - now
            if code == 4 and key.tpm is not None:
                headers = token_headers(key.tpm, used, wait)
            if code == 5 and key.rpm is not None:
                headers = request_headers(key.rpm, 0, wait)
                if key.tpm is not None:
                    headers += token_headers(key.tpm, used, treset / 1000)
            self._reject(reason, message.format(rpm=key.rpm, tpm=key.tpm, conc=key.max_concurrency), wait, err,
                         headers)
        if key.max_concurrency is not None:
            self._held[key.id].append(member.decode())
        if permits > 0:
            self._grant(key, member.decode(), permits, now, key.rpm - requests if key.rpm is not None else 0,
                        rreset, used, treset)
        out: Headers | None = None
        if key.tpm is not None:
            out = token_headers(key.tpm, used, treset / 1000)
        if key.rpm is not None:
            rh = request_headers(key.rpm, key.rpm - requests, rreset / 1000)
            out = rh if out is None else rh + out
        return out

    def _grant(self, key: KeyInfo, member: str, permits: int, now: float, remaining: int, rreset_ms: int,
               tokens_used: int, treset_ms: int) -> None:
        """Keep the ``permits`` Redis granted with this admission, for
        GRANT_TTL_S."""
        old = self._grants.get(key.id)
        if old is not None:
            self._end_grant(key.id, old)
        if len(self._leasable) > 10_000:
            self._leasable.clear()
        self._leasable.add(key.id)
        g = _Grant(_limits(key), member, permits, remaining, now + rreset_ms / 1000, tokens_used,
                   now + treset_ms / 1000)
        # The timer gives the unused permits back; a busy loop may run it
        # late, so _use_grant checks ``ends`` too.
        g.ends = now + GRANT_TTL_S
        g.timer = asyncio.get_running_loop().call_later(GRANT_TTL_S, self._end_grant, key.id, g)
        self._grants[key.id] = g

    def _use_grant(self, key: KeyInfo, g: _Grant) -> Headers | None:
        """Admit one request of ``key`` on a permit of ``g``, without asking
        Redis: its rate-limit headers (empty for a key with neither RPM nor
        TPM); None (and the grant given back) when it cannot: the key's
        limits changed, or its token rate or quotas, as this instance counts
        them since the grant, have reached their limits, or its TTL is past."""
        now = self.clock()
        if g.limits != _limits(key) or (key.tpm is not None and g.tokens_used + g.tokens >= key.tpm) \
                or not self.local.within(key) or now >= g.ends:
            self._end_grant(key.id, g)
            return None
        g.used += 1
        if key.rpm is not None:
            # The permit was taken at the grant's time: its place in the
            # window moves to now, the request's own time.
            self._rescore.append((f"{self._prefix}:r:{key.id}", f"{g.member}:{g.used}", int(now * 1000)))
            self._schedule()
        if g.used >= g.permits:
            self._end_grant(key.id, g)
        out: Headers = []
        if key.rpm is not None:
            out = request_headers(key.rpm, g.remaining - g.used, g.rreset_at - now)
        if key.tpm is not None:
            out += token_headers(key.tpm, g.tokens_used + g.tokens, g.treset_at - now)
        return out

    def _end_grant(self, kid: int, g: _Grant) -> None:
        """``g`` is used up, expired or given up: the permits it did not use
        go back to the RPM window (in the next settle batch)."""
        if self._grants.get(kid) is g:
            del self._grants[kid]
        if g.timer is not None:
            g.timer.cancel()
            g.timer = None
        if g.used < g.permits and g.limits[0] is not None:
            rkey = f"{self._prefix}:r:{kid}"
            self._zrem.extend((rkey, f"{g.member}:{i}") for i in range(g.used + 1, g.permits + 1))
            g.used = g.permits
            self._schedule()

    def _command(self, key: KeyInfo, month: str) -> tuple[bytes, bytes, bytes]:
        """The admission's EVALSHA for ``key``, encoded (RESP) but for the
        time and the member: the parts before, between and after them,
        built once per key and limits rather than once per request."""
        spec = (key.id, key.workspace_id, key.rpm, key.tpm, key.max_concurrency, key.spend_limit,
                key.workspace_spend_limit, key.workspace_token_limit, month)
        parts = self._commands.get(spec)
        if parts is None:
            if len(self._commands) > 10_000:
                self._commands.clear()
            p = self._prefix
            head = (b"*20\r\n" + bulk("EVALSHA") + bulk(ADMIT_SHA) + bulk(4)
                    + b"".join(bulk(k) for k in (f"{p}:r:{key.id}", f"{p}:t:{key.id}", f"{p}:c:{key.id}", month)))
            mid = b"".join(bulk(_limit(v)) for v in (key.rpm, key.tpm, key.max_concurrency, key.spend_limit,
                                                     key.workspace_spend_limit, key.workspace_token_limit))
            tail = b"".join(bulk(a) for a in (LEASE_MS, f"k:{key.id}", f"w:{key.workspace_id}:s",
                                              f"w:{key.workspace_id}:t"))
            parts = self._commands[spec] = (head, mid, tail)
        return parts

    def _degraded(self, key: KeyInfo) -> Headers | None:
        if self.cfg.failure == "closed":
            if self._on_reject is not None:
                self._on_reject("limits_unavailable")
            raise LimitsUnavailable("Rate limits cannot be checked right now; try again shortly.",
                                    headers={"Retry-After": str(max(1, math.ceil(self.cfg.retry_s)))})
        return self.local.check(key)

    def _reject(self, reason: str, message: str, wait: float, code: str, headers: Headers) -> None:
        if self._on_reject is not None:
            self._on_reject(reason)
        h = dict(headers)
        h["Retry-After"] = str(max(1, math.ceil(wait)))
        raise RateLimited(message, code=code, headers=h)

    def release(self, key: KeyInfo) -> None:
        if key.max_concurrency is None:
            return
        held = self._held.get(key.id)
        if held:
            self._zrem.append((f"{self._prefix}:c:{key.id}", held.pop(0)))
            if not held:
                del self._held[key.id]
            self._schedule()
        else:  # admitted locally, while Redis was away
            self.local.release(key)

    # ----------------------------------------------------------- settlement

    def settle(self, key: KeyInfo, tokens: int, cost: float) -> None:
        self.local.settle(key, tokens, cost)
        if not tokens and not cost:
            return
        g = self._grants.get(key.id)
        if g is not None:
            g.tokens += tokens
        now = self.clock()
        if key.tpm is not None and tokens:
            self._tokens[(key.id, int(now))] += tokens
        self._quota[f"k:{key.id}"] += cost
        self._quota[f"w:{key.workspace_id}:s"] += cost
        self._quota[f"w:{key.workspace_id}:t"] += tokens
        self._schedule()

    def admit_free(self, key: KeyInfo, rpm: int, concurrency: int) -> None:
        # Bounded per instance: counts bill nothing, and a Redis round trip
        # for each would cost more than the bound is worth.
        self.local.admit_free(key, rpm, concurrency)

    def release_free(self, key: KeyInfo) -> None:
        self.local.release_free(key)

    def _schedule(self) -> None:
        if self._flush is None and (self._draining is None or self._draining.done()):
            self._flush = asyncio.get_running_loop().call_later(SETTLE_DELAY_S, self._send)

    def _send(self) -> None:
        self._flush = None
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain(), name="redis-settle")

    async def _drain(self) -> None:
        """Send the settle batches, one at a time, until none is left. A
        batch that fails is kept (same id) and sent again after retry_s,
        before anything settled since: Redis may have applied it (only its
        reply was lost), and the script skips it then. Dropped instead, it
        would be missing from a month hash that outlives the outage (only a
        fresh hash is seeded from the database), and every key and
        workspace it belongs to would get past its quota by that much."""
        while True:
            batch = self._unsent or self._take()
            if batch is None:
                return
            self._unsent = batch
            if not await self._apply(batch):
                if not self._closing:
                    self._flush = asyncio.get_running_loop().call_later(self.cfg.retry_s, self._send)
                return
            self._unsent = None

    def _take(self) -> _Batch | None:
        """What was settled and released since the last batch, as a batch."""
        tokens, self._tokens = self._tokens, defaultdict(int)
        quota, self._quota = self._quota, defaultdict(float)
        zrem, self._zrem = self._zrem, []
        rescore, self._rescore = self._rescore, []
        p = self._prefix
        keys = [f"{p}:b:{self._instance}"]
        index: dict[str, int] = {}
        args: list[str | int] = []

        def op(code: str, key: str, a: str | int, b: str | int) -> None:
            i = index.get(key)
            if i is None:
                keys.append(key)
                i = index[key] = len(keys)
            args.extend((code, i, a, b))

        for (kid, second), n in tokens.items():
            op("h", f"{p}:t:{kid}", second, n)
        month = self._month_key(self.clock())
        for field, amount in quota.items():
            if amount:
                op("f", month, field, repr(amount))
        for key, member in zrem:
            op("z", key, member, "")
        for key, member, ms in rescore:
            op("x", key, member, ms)
        if not args:
            return None
        self._batch_id += 1
        return _Batch(self._batch_id, keys, args)

    async def _apply(self, batch: _Batch) -> bool:
        """Send ``batch``; True once Redis has applied it (now, or before).
        On the admission's connection (gateway.resp), in the same write as
        whatever admissions are queued in this turn of the loop: none of
        redis-py's layers, no wake-up of Redis of its own."""
        cmd = ("EVALSHA", SETTLE_SHA, len(batch.keys), *batch.keys, batch.id, *batch.args)
        try:
            try:
                res = await self._fast.call(*cmd)
            except RespError as e:
                if not str(e).startswith("NOSCRIPT"):
                    raise
                await self._fast.call("SCRIPT", "LOAD", SETTLE)
                res = await self._fast.call(*cmd)
        except (RespError, *FAILURES) as e:
            self._failed("settle", e)
            return False
        if not (isinstance(res, list) and res and res[0] in (0, 1) and len(res) % 2
                and all(type(n) is int and 0 <= n < len(batch.args) // 4 for n in res[1::2])):
            self._failed("settle", RespError("unexpected reply to the settle script"))
            return False
        for n, err in zip(res[1::2], res[2::2], strict=True):
            self._refused(batch, n, err)
        return True

    def _refused(self, batch: _Batch, n: int, err: object) -> None:
        """Redis refused operation ``n`` of an applied batch (its key holds
        another type: something else wrote it). Sent again it would fail
        again, and the rest of its batch would count once more each time:
        dropped, with one log line per key (names and ids only)."""
        key = batch.keys[int(batch.args[4 * n + 1]) - 1]
        if key in self._refused_keys:
            return
        if len(self._refused_keys) > 1000:
            self._refused_keys.clear()
        self._refused_keys.add(key)
        kind = err.decode(errors="replace")[:40] if isinstance(err, bytes) else "error"
        log.error("redis refused a settle on %s (%s): dropped, the rest of its batch applied", key, kind)

    # ------------------------------------------------------------ shared state

    async def load(self, store: Store) -> None:
        """Load this month's totals locally, then seed Redis with them if
        no instance did yet."""
        self._store = store
        await self.local.load(store)
        await self._seed_from(self.local)
        # Connected now rather than within the first request's timeout_ms.
        with contextlib.suppress(RespError, *FAILURES):
            await self._fast.call("PING")

    async def _seed_from(self, source: LocalLimiter) -> None:
        keys, workspaces = source.month_totals()
        args: list[str | float] = []
        for kid, spend in keys.items():
            args += [f"k:{kid}", spend]
        for wid, (spend, tokens) in workspaces.items():
            args += [f"w:{wid}:s", spend, f"w:{wid}:t", tokens]
        try:
            if await self._seed(keys=[f"{self._prefix}:q:{_month(self.clock())}"], args=args):
                log.info("seeded this month's quotas in Redis from the database")
        except FAILURES as e:
            self._failed("seed", e)

    def _reseed(self) -> None:
        """Redis has no totals for this month (it restarted, or lost its
        data): add the database's, once, in the background."""
        if self._store is None or (self._seeding is not None and not self._seeding.done()):
            return

        async def reseed() -> None:
            assert self._store is not None
            fresh = LocalLimiter(self.clock)
            await fresh.load(self._store)
            await self._seed_from(fresh)

        self._seeding = asyncio.create_task(reseed(), name="redis-reseed")

    async def run_sync(self, store: Store, writer_id: int, interval_s: float) -> None:
        """The local limiter's quota sync (for admission while Redis is
        away) and the refresh of this instance's concurrency leases."""
        await asyncio.gather(self.local.run_sync(store, writer_id, interval_s), self._refresh_leases())

    async def _refresh_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_MS / 3000)
            if not self._held:
                continue
            expiry = int(self.clock() * 1000) + LEASE_MS
            pipe = self.redis.pipeline(transaction=False)
            for kid, members in self._held.items():
                pipe.zadd(f"{self._prefix}:c:{kid}", dict.fromkeys(members, expiry), xx=True)
                pipe.pexpire(f"{self._prefix}:c:{kid}", LEASE_MS)
            try:
                await pipe.execute()
            except FAILURES as e:
                self._failed("lease", e)

    async def close(self) -> None:
        self._closing = True
        for kid, g in list(self._grants.items()):
            self._end_grant(kid, g)
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._draining is not None:
            await asyncio.gather(self._draining, return_exceptions=True)
        await self._drain()  # what is left, once more
        if self._seeding is not None:
            self._seeding.cancel()
            with contextlib.suppress(BaseException):
                await self._seeding
        # Give back this instance's slots now rather than at lease expiry.
        if self._held:
            pipe = self.redis.pipeline(transaction=False)
            for kid, members in self._held.items():
                pipe.zrem(f"{self._prefix}:c:{kid}", *members)
            with contextlib.suppress(*FAILURES):
                await pipe.execute()
        await self._fast.close()
        await self.redis.aclose()

    def _month_key(self, now: float) -> str:
        """The quota hash of the UTC month holding ``now`` (cached: one
        strftime a month, not one a request)."""
        if not self._month_start <= now < self._month_end:
            self._month_start, self._month_end = month_bounds(now)
            self._month = f"{self._prefix}:q:{_month(now)}"
        return self._month

    # ------------------------------------------------------------ health

    def _failed(self, op: str, e: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(op)
        self._retry_at = time.monotonic() + self.cfg.retry_s
        if self._up:
            self._up = False
            if self._on_state is not None:
                self._on_state(False)
            mode = ("admitting on this instance's own limits" if self.cfg.failure == "open"
                    else "refusing limited requests with 503")
            log.error("redis unreachable (%s during %s): %s until it answers again", type(e).__name__, op, mode)

    def _recovered(self) -> None:
        if not self._up:
            self._up = True
            if self._on_state is not None:
                self._on_state(True)
            log.warning("redis reachable again: shared limits resumed")

