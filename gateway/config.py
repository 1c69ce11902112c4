"""Configuration: TOML loaded once into frozen, typed objects.

Every field is validated at load time; a bad file raises ConfigError with a
message naming the field (``upstreams[1].base_url: ...``). Secrets are never
in the file: the file names environment variables and load_config reads them.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from .tasks.options import option_refusal

if TYPE_CHECKING:
    from .protocols.base import Usage

UPSTREAM_KINDS = ("openai", "anthropic", "ark", "volcengine", "gateway")
# The chat wire protocols (public endpoint names) each upstream kind speaks
# unless its ``protocols`` says otherwise; a client of another one is
# translated to the first of them (gateway.translate).
CHAT_PROTOCOLS = ("chat", "messages", "responses")
KIND_PROTOCOLS: dict[str, tuple[str, ...]] = {
    "openai": ("chat", "responses"), "anthropic": ("messages",), "gateway": CHAT_PROTOCOLS,
    "ark": (), "volcengine": (),
}


# Request body fields that change what the provider charges for the same
# tokens, by the client's protocol, with the values that keep its standard
# price (docs/security.md, "Price flags"). Any other value is refused unless
# the model's ``allow_fields`` names it: the row is billed at the model's
# configured price whatever the tier.
PRICE_FIELDS: dict[str, dict[str, frozenset[str]]] = {
    # OpenAI (Chat Completions and Responses): "priority"/"fast" cost more,
    # "flex" less, "scale" draws on reserved units; "auto" is the project's
    # own setting (standard unless the operator changed it).
    "openai": {"service_tier": frozenset({"auto", "default"})},
    # Anthropic Messages: service_tier "auto" uses Priority Tier only where
    # the operator bought it; "fast" speed and "us" inference are premium.
    "anthropic": {
        "service_tier": frozenset({"auto", "standard_only"}),
        "speed": frozenset({"standard"}),
        "inference_geo": frozenset({"global"}),
    },
}
PRICE_FIELD_NAMES = frozenset(k for fields in PRICE_FIELDS.values() for k in fields)
# Responses fields naming an object stored at the provider under the shared
# account (a conversation, a dashboard prompt), which no workspace owns:
# refused unless the model's ``allow_stored`` names the field
# (docs/security.md, "Stored provider objects").
STORED_FIELDS = frozenset({"conversation", "prompt"})
# A name in ``allow_tools``: a server tool's type without its version date
# (web_search, web_search_preview, code_execution, file_search, ...).
TOOL_NAME = re.compile(r"[a-z][a-z0-9_]*")


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending field."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_mb: float = 32.0
    graceful_timeout_s: float = 30.0
    key_refresh_ms: int = 1000
    body_timeout_s: float = 60.0
    # A client must send a whole request head within this time of connecting
    # (or of starting its next request); an idle kept-alive connection is
    # closed after keepalive_timeout_s (gateway.connections).
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    log_requests: bool = False
    log_format: str = "text"  # "text" or "json" (one JSON object per line)
    # Responses over a WebSocket on GET /v1/responses (gateway.websocket);
    # off: the upgrade gets 426 at once, and clients fall back to HTTP.
    responses_websocket: bool = True
    # Requests that bill nothing (token counts, WebSocket warm-ups) are
    # exempt from a key's own limits but bounded per key on their own:
    # at most free_rpm a minute and free_concurrency at once (per process).
    free_rpm: int = 600
    free_concurrency: int = 64
    # A Responses WebSocket is closed after websocket_idle_s without a frame
    # and refuses frames after websocket_lifetime_s; a key may hold at most
    # websockets_per_key of them open at once (per process).
    websocket_idle_s: float = 600.0
    websocket_lifetime_s: float = 3600.0
    websockets_per_key: int = 32

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """SQLite at ``path`` (the default), or PostgreSQL at ``url``
    (``postgresql://...``) when it is set; see docs/scaling.md. With
    PostgreSQL, ``path`` still names where this instance keeps its usage
    spool (``<path>.spool/``), which is local to each instance."""

    path: Path = Path("gateway.db")
    url: str | None = field(default=None, repr=False)  # may hold a password
    pool_size: int = 4
    busy_timeout_ms: int = 10_000  # SQLite: see gateway.store.schema.BUSY_TIMEOUT_MS

    @property
    def postgres(self) -> bool:
        return self.url is not None


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Shared limits across gateway instances (gateway.redis_limits).

    ``failure``: what admission does while Redis cannot be reached:
    ``open`` admits on this instance's own (local) limits, ``closed``
    refuses with 503. Either way a metric counts it and one log line marks
    each change of state."""

    url: str | None = field(default=None, repr=False)
    failure: str = "open"
    timeout_ms: int = 100
    retry_s: float = 1.0
    key_prefix: str = "gw"


@dataclass(frozen=True, slots=True)
class UsageConfig:
    flush_interval_ms: int = 200
    batch_max: int = 1000
    queue_max: int = 20000
    retention_days: int = 90
    spool: bool = True  # append each row to a per-process file first (gateway.store.spool)


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Failover bounds: at most ``max_attempts`` upstream attempts per request,
    and no new attempt once ``retry_budget_s`` has passed since it began."""

    max_attempts: int = 3
    retry_budget_s: float = 60.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token_env: str = "GATEWAY_ADMIN_TOKEN"
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ConsoleConfig:
    """Console accounts (docs/console.md): sign-up, sessions, invitations and
    sign-in throttling."""

    open_signup: bool = False
    public_url: str | None = None  # base of invitation links and of the examples shown to users
    session_hours: float = 12.0  # a session ends this long after sign-in ...
    session_idle_minutes: float = 120.0  # ... or after this long unused
    invitation_hours: float = 168.0
    # Failed sign-ins allowed per account (the email typed) and per client
    # address within login_window_minutes; more get 429 until the window passes.
    login_failures_per_account: int = 5
    login_failures_per_address: int = 20
    login_window_minutes: float = 15.0
    cookie_secure: str = "auto"  # "auto" (when the request came over TLS), "always" or "never"
    # Take the client address from the last X-Forwarded-For entry (only
    # behind a reverse proxy that sets it) for throttling and the audit log.
    trust_forwarded_for: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    kind: str
    base_url: str
    api_key_env: str | None = None
    access_key_env: str | None = None
    secret_key_env: str | None = None
    region: str = "cn-beijing"
    # The provider account this upstream belongs to (default: its own name).
    # An Ark upstream and a Volcengine assets upstream of one account share
    # it, so a video task naming an asset goes to that account.
    account: str | None = None
    # Keys added to the provider kind's ``provider_options`` allow-list for
    # this upstream (a field the provider added since; gateway.tasks.options).
    extra_provider_options: tuple[str, ...] = ()
    # The anthropic-beta flags this upstream accepts; others are stripped
    # from the header before it goes there (None: forward every flag).
    anthropic_betas: frozenset[str] | None = None
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 300.0
    idle_timeout_s: float = 300.0
    # Circuit breaker: this many consecutive failures (connect error, timeout,
    # 5xx) open it for breaker_cooldown_s; then one probe request decides.
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    # A 429 without Retry-After skips the route for this long (a Retry-After
    # is honoured up to rate_limit_cooldown_max_s).
    rate_limit_cooldown_s: float = 5.0
    rate_limit_cooldown_max_s: float = 300.0
    # The chat wire protocols it speaks, in order of preference for
    # translation (default by kind: KIND_PROTOCOLS).
    protocols: tuple[str, ...] = ()
    # Secrets resolved from the environment; kept out of repr so they never
    # reach a log line through an f-string of the config.
    api_key: str | None = field(default=None, repr=False)
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)

    @property
    def public_base_url(self) -> str:
        """``base_url`` without user info and query: either may carry a credential."""
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class Route:
    upstream: str
    model: str
    weight: float = 1.0
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens, per image, per 1M video tokens. Unset prices of
    cached input and cache writes default as the providers bill them:
    cached input at the input price, 5-minute cache writes at 1.25x input,
    1-hour cache writes at 2x input."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None
    image: float = 0.0
    video: float = 0.0
    cache_write: float | None = None
    cache_write_1h: float | None = None

    def cost(self, u: Usage) -> float:
        """USD for one usage (before the group ratio). Input tokens include
        the cached part and the cache writes; each part is priced once."""
        cached = min(u.cached_tokens, u.input_tokens)
        writes = min(u.cache_write_tokens, u.input_tokens - cached)
        writes_1h = min(u.cache_write_1h_tokens, writes)
        cached_price = self.input if self.cached_input is None else self.cached_input
        write_price = self.input * 1.25 if self.cache_write is None else self.cache_write
        write_1h_price = self.input * 2.0 if self.cache_write_1h is None else self.cache_write_1h
        per_token = (
            (u.input_tokens - cached - writes) * self.input + cached * cached_price
            + (writes - writes_1h) * write_price + writes_1h * write_1h_price
            + u.output_tokens * self.output + u.video_tokens * self.video
        )
        return per_token / 1e6 + u.images * self.image


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    routes: tuple[Route, ...]
    price: Price = Price()
    owned_by: str = "gateway"
    # The output limit sent when a client names none and the upstream's
    # protocol needs one (Anthropic's max_tokens, on a translated request).
    max_output_tokens: int | None = None
    # Non-standard values of PRICE_FIELDS a client may send for this model.
    allow_fields: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Server tools (gateway.intake.check_tools) and STORED_FIELDS a client
    # may send for this model.
    allow_tools: frozenset[str] = frozenset()
    allow_stored: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class GroupConfig:
    name: str
    models: tuple[str, ...] = ("*",)
    ratio: float = 1.0


@dataclass(frozen=True, slots=True)
class TasksConfig:
    """Video task polling (see docs/tasks.md)."""

    poll_interval_s: float = 5.0
    max_backoff_s: float = 60.0
    max_concurrency: int = 8
    timeout_s: float = 86400.0
    poller: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    usage: UsageConfig = UsageConfig()
    admin: AdminConfig = AdminConfig()
    console: ConsoleConfig = ConsoleConfig()
    routing: RoutingConfig = RoutingConfig()
    redis: RedisConfig = RedisConfig()
    upstreams: tuple[UpstreamConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    groups: tuple[GroupConfig, ...] = (GroupConfig("default"),)
    platforms: Mapping[str, str] = field(default_factory=dict)
    tasks: TasksConfig = TasksConfig()
    source: Path | None = None

    def upstream(self, name: str) -> UpstreamConfig:
        for u in self.upstreams:
            if u.name == name:
                return u
        raise KeyError(name)

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    def group(self, name: str) -> GroupConfig | None:
        for g in self.groups:
            if g.name == name:
                return g
        return None


# ---------------------------------------------------------------- validation


class _Table:
    """A TOML table being read: typed getters that name the field on error and
    a final check that no unknown key was left over."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.seen: set[str] = set()

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        v = self._get(key, None)
        if v is None:
            if required:
                raise ConfigError(f"{self._path(key)}: required")
            return default
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{self._path(key)}: expected a non-empty string")
        return v

    def num(self, key: str, default: float, *, minimum: float = 0.0, integer: bool = False) -> Any:
        v = self._get(key, default)
        ok = isinstance(v, int) if integer else isinstance(v, int | float)
        if isinstance(v, bool) or not ok or not math.isfinite(v):
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"{self._path(key)}: expected {kind}, got {v!r}")
        if v < minimum:
            raise ConfigError(f"{self._path(key)}: must be >= {minimum}, got {v!r}")
        return v

    def flag(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self._path(key)}: expected true or false")
        return v

    def array(self, key: str) -> list[Any]:
        v = self._get(key, [])
        if not isinstance(v, list):
            raise ConfigError(f"{self._path(key)}: expected an array")
        return v

    def sub(self, key: str) -> _Table:
        v = self._get(key, {})
        return _Table(v, self._path(key))

    def done(self) -> None:
        extra = sorted(set(self.data) - self.seen)
        if extra:
            raise ConfigError(f"{self._path(extra[0])}: unknown key")


class _Secrets:
    """Reads the environment variables a config names, noting every one that
    is missing so that all of them are reported at once."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.missing: list[str] = []

    def get(self, name: str | None, where: str) -> str | None:
        if name is None:
            return None
        value = self.env.get(name)
        if not value:
            self.missing.append(f"{where}: environment variable {name} is not set")
            return None
        return value


def _upstream(t: _Table, env: _Secrets) -> UpstreamConfig:
    kind = t.text("kind", required=True)
    if kind not in UPSTREAM_KINDS:
        raise ConfigError(f"{t.where}.kind: must be one of {', '.join(UPSTREAM_KINDS)}")
    base_url = t.text("base_url", required=True).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{t.where}.base_url: must start with http:// or https://")
    api_key_env = t.text("api_key_env")
    protocols = tuple(t.array("protocols")) or KIND_PROTOCOLS[kind]
    if not all(p in CHAT_PROTOCOLS for p in protocols) or len(set(protocols)) != len(protocols):
        raise ConfigError(f"{t.where}.protocols: expected distinct names among {', '.join(CHAT_PROTOCOLS)}")
    access_key_env = t.text("access_key_env")
    secret_key_env = t.text("secret_key_env")
    if kind == "volcengine" and (access_key_env is None or secret_key_env is None):
        raise ConfigError(f"{t.where}.access_key_env: volcengine needs access_key_env and secret_key_env")
    extra_options = t.array("extra_provider_options")
    if extra_options and kind not in ("ark", "gateway"):
        raise ConfigError(f"{t.where}.extra_provider_options: only video task upstreams (ark, gateway) take options")
    for i, name in enumerate(extra_options):
        problem = option_refusal(name) if isinstance(name, str) and name else "expected a non-empty string"
        if problem:
            raise ConfigError(f"{t.where}.extra_provider_options[{i}]: {problem}")
    betas = None
    if t.data.get("anthropic_betas") is not None:
        raw_betas = t.array("anthropic_betas")
        for i, flag in enumerate(raw_betas):
            if not isinstance(flag, str) or not flag.strip() or "," in flag:
                raise ConfigError(f"{t.where}.anthropic_betas[{i}]: expected a beta flag name")
        betas = frozenset(f.strip() for f in raw_betas)
    else:
        t.array("anthropic_betas")  # absent or null: every flag goes through
    u = UpstreamConfig(
        name=t.text("name", required=True),
        kind=kind,
        base_url=base_url,
        api_key_env=api_key_env,
        access_key_env=access_key_env,
        secret_key_env=secret_key_env,
        region=t.text("region", "cn-beijing"),
        account=t.text("account"),
        extra_provider_options=tuple(extra_options),
        anthropic_betas=betas,
        timeout_s=float(t.num("timeout_s", 600.0)),
        connect_timeout_s=float(t.num("connect_timeout_s", 10.0)),
        first_byte_timeout_s=float(t.num("first_byte_timeout_s", 300.0)),
        idle_timeout_s=float(t.num("idle_timeout_s", 300.0)),
        breaker_failures=int(t.num("breaker_failures", 5, minimum=1, integer=True)),
        breaker_cooldown_s=float(t.num("breaker_cooldown_s", 30.0)),
        rate_limit_cooldown_s=float(t.num("rate_limit_cooldown_s", 5.0)),
        rate_limit_cooldown_max_s=float(t.num("rate_limit_cooldown_max_s", 300.0)),
        protocols=protocols,
        api_key=env.get(api_key_env, f"{t.where}.api_key_env"),
        access_key=env.get(access_key_env, f"{t.where}.access_key_env"),
        secret_key=env.get(secret_key_env, f"{t.where}.secret_key_env"),
    )
    t.done()
    return u


def _model(t: _Table, upstreams: set[str]) -> ModelConfig:
    name = t.text("name", required=True)
    routes = []
    raw_routes = t.array("routes")
    if not raw_routes:
        raise ConfigError(f"{t.where}.routes: at least one route is required")
    for i, raw in enumerate(raw_routes):
        r = _Table(raw, f"{t.where}.routes[{i}]")
        up = r.text("upstream", required=True)
        if up not in upstreams:
            raise ConfigError(f"{r.where}.upstream: unknown upstream {up!r}")
        weight = float(r.num("weight", 1.0))
        if weight <= 0:
            raise ConfigError(f"{r.where}.weight: must be > 0")
        routes.append(Route(up, r.text("model", name), weight, int(r.num("priority", 0, minimum=-1e9, integer=True))))
        r.done()
    p = t.sub("price")

    def optional(name: str) -> float | None:
        return None if p.data.get(name) is None else float(p.num(name, 0.0))

    price = Price(
        input=float(p.num("input", 0.0)),
        output=float(p.num("output", 0.0)),
        cached_input=optional("cached_input"),
        image=float(p.num("image", 0.0)),
        video=float(p.num("video", 0.0)),
        cache_write=optional("cache_write"),
        cache_write_1h=optional("cache_write_1h"),
    )
    p.done()
    limit = t.data.get("max_output_tokens")
    max_output = None if limit is None else int(t.num("max_output_tokens", 0, minimum=1, integer=True))
    t.seen.add("max_output_tokens")
    allow = t.sub("allow_fields")
    allowed: dict[str, frozenset[str]] = {}
    for key in allow.data:
        if key not in PRICE_FIELD_NAMES:
            raise ConfigError(f"{allow.where}.{key}: not a price field (one of {', '.join(sorted(PRICE_FIELD_NAMES))})")
        values = allow.array(key)
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{allow.where}.{key}: expected an array of values (strings)")
        allowed[key] = frozenset(values)
    allow.done()
    tools = t.array("allow_tools")
    if not all(isinstance(v, str) and TOOL_NAME.fullmatch(v) for v in tools):
        raise ConfigError(f"{t.where}.allow_tools: expected an array of tool names (lower case, like \"web_search\")")
    stored = t.array("allow_stored")
    if not all(isinstance(v, str) and v in STORED_FIELDS for v in stored):
        raise ConfigError(f"{t.where}.allow_stored: expected an array of {', '.join(sorted(STORED_FIELDS))}")
    m = ModelConfig(name, tuple(routes), price, t.text("owned_by", "gateway"), max_output, allowed,
                    frozenset(tools), frozenset(stored))
    t.done()
    return m


def parse_config(data: dict[str, Any], *, env: Mapping[str, str] | None = None, base_dir: Path | None = None,
                 secrets: bool = True) -> Config:
    """Validate a parsed TOML document into a Config. With ``secrets`` false,
    the upstream secrets the file names may be unset (left None): for
    commands that only read or write the database."""
    env = os.environ if env is None else env
    upstream_secrets = _Secrets(env)
    base_dir = base_dir or Path.cwd()
    root = _Table(data, "")

    s = root.sub("server")
    server = ServerConfig(
        host=s.text("host", "127.0.0.1"),
        port=int(s.num("port", 8080, integer=True)),
        workers=int(s.num("workers", 1, minimum=1, integer=True)),
        max_body_mb=float(s.num("max_body_mb", 32.0)),
        graceful_timeout_s=float(s.num("graceful_timeout_s", 30.0)),
        key_refresh_ms=int(s.num("key_refresh_ms", 1000, minimum=50, integer=True)),
        body_timeout_s=float(s.num("body_timeout_s", 60.0, minimum=0.01)),
        header_timeout_s=float(s.num("header_timeout_s", 10.0, minimum=0.01)),
        keepalive_timeout_s=float(s.num("keepalive_timeout_s", 75.0, minimum=0.01)),
        log_requests=s.flag("log_requests", False),
        log_format=s.text("log_format", "text"),
        responses_websocket=s.flag("responses_websocket", True),
        free_rpm=int(s.num("free_rpm", 600, minimum=1, integer=True)),
        free_concurrency=int(s.num("free_concurrency", 64, minimum=1, integer=True)),
        websocket_idle_s=float(s.num("websocket_idle_s", 600.0, minimum=0.1)),
        websocket_lifetime_s=float(s.num("websocket_lifetime_s", 3600.0, minimum=0.1)),
        websockets_per_key=int(s.num("websockets_per_key", 32, minimum=1, integer=True)),
    )
    if server.log_format not in ("text", "json"):
        raise ConfigError("server.log_format: must be \"text\" or \"json\"")
    if server.port > 65535:
        raise ConfigError("server.port: must be <= 65535")
    s.done()

    d = root.sub("database")
    db_path = Path(d.text("path", "gateway.db"))
    db_url = d.text("url")
    if db_url is not None and not db_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("database.url: must start with postgresql://")
    database = DatabaseConfig(
        db_path if db_path.is_absolute() else base_dir / db_path, db_url,
        int(d.num("pool_size", 4, minimum=1, integer=True)),
        int(d.num("busy_timeout_ms", 10_000, minimum=1, integer=True)),
    )
    d.done()

    rd = root.sub("redis")
    redis = RedisConfig(
        url=rd.text("url"),
        failure=rd.text("failure", "open"),
        timeout_ms=int(rd.num("timeout_ms", 100, minimum=1, integer=True)),
        retry_s=float(rd.num("retry_s", 1.0, minimum=0.01)),
        key_prefix=rd.text("key_prefix", "gw"),
    )
    if redis.url is not None and not redis.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis.url: must start with redis://, rediss:// or unix://")
    if redis.failure not in ("open", "closed"):
        raise ConfigError('redis.failure: must be "open" or "closed"')
    rd.done()

    u = root.sub("usage")
    usage = UsageConfig(
        flush_interval_ms=int(u.num("flush_interval_ms", 200, minimum=1, integer=True)),
        batch_max=int(u.num("batch_max", 1000, minimum=1, integer=True)),
        queue_max=int(u.num("queue_max", 20000, minimum=1, integer=True)),
        retention_days=int(u.num("retention_days", 90, integer=True)),
        spool=u.flag("spool", True),
    )
    u.done()

    a = root.sub("admin")
    token_env = a.text("token_env", "GATEWAY_ADMIN_TOKEN")
    admin = AdminConfig(token_env, env.get(token_env) or None)
    a.done()

    c = root.sub("console")
    console = ConsoleConfig(
        open_signup=c.flag("open_signup", False),
        public_url=c.text("public_url"),
        session_hours=float(c.num("session_hours", 12.0, minimum=0.01)),
        session_idle_minutes=float(c.num("session_idle_minutes", 120.0, minimum=0.1)),
        invitation_hours=float(c.num("invitation_hours", 168.0, minimum=0.01)),
        login_failures_per_account=int(c.num("login_failures_per_account", 5, minimum=1, integer=True)),
        login_failures_per_address=int(c.num("login_failures_per_address", 20, minimum=1, integer=True)),
        login_window_minutes=float(c.num("login_window_minutes", 15.0, minimum=0.1)),
        cookie_secure=c.text("cookie_secure", "auto"),
        trust_forwarded_for=c.flag("trust_forwarded_for", False),
    )
    if console.cookie_secure not in ("auto", "always", "never"):
        raise ConfigError('console.cookie_secure: must be "auto", "always" or "never"')
    if console.public_url is not None and not console.public_url.startswith(("http://", "https://")):
        raise ConfigError("console.public_url: must start with http:// or https://")
    c.done()

    r = root.sub("routing")
    routing = RoutingConfig(
        max_attempts=int(r.num("max_attempts", 3, minimum=1, integer=True)),
        retry_budget_s=float(r.num("retry_budget_s", 60.0)),
    )
    r.done()

    upstreams = []
    for i, raw in enumerate(root.array("upstreams")):
        upstreams.append(_upstream(_Table(raw, f"upstreams[{i}]"), upstream_secrets))
    names = [x.name for x in upstreams]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ConfigError(f"upstreams[{i}].name: duplicate upstream {n!r}")

    models = []
    for i, raw in enumerate(root.array("models")):
        models.append(_model(_Table(raw, f"models[{i}]"), set(names)))
    mnames = [m.name for m in models]
    for i, n in enumerate(mnames):
        if n in mnames[:i]:
            raise ConfigError(f"models[{i}].name: duplicate model {n!r}")

    groups = []
    for i, raw in enumerate(root.array("groups")):
        g = _Table(raw, f"groups[{i}]")
        gm = g.array("models") or ["*"]
        if not all(isinstance(x, str) and x for x in gm):
            raise ConfigError(f"groups[{i}].models: expected an array of strings")
        groups.append(GroupConfig(g.text("name", required=True), tuple(gm), float(g.num("ratio", 1.0))))
        g.done()
    if not groups:
        groups = [GroupConfig("default")]
    if "default" not in {g.name for g in groups}:
        raise ConfigError("groups: a group named 'default' is required")

    p = root.sub("platforms")
    platforms: dict[str, str] = {}
    for k in list(p.data):
        up = p.text(k, required=True)
        if up not in names:
            raise ConfigError(f"platforms.{k}: unknown upstream {up!r}")
        if upstreams[names.index(up)].kind not in ("volcengine", "gateway"):
            raise ConfigError(f"platforms.{k}: upstream {up!r} must be of kind volcengine or gateway")
        platforms[k] = up
    p.done()

    tk = root.sub("tasks")
    tasks = TasksConfig(
        poll_interval_s=float(tk.num("poll_interval_s", 5.0, minimum=0.01)),
        max_backoff_s=float(tk.num("max_backoff_s", 60.0, minimum=0.01)),
        max_concurrency=int(tk.num("max_concurrency", 8, minimum=1, integer=True)),
        timeout_s=float(tk.num("timeout_s", 86400.0, minimum=0.1)),
        poller=tk.flag("poller", True),
    )
    tk.done()
    root.done()
    if secrets and upstream_secrets.missing:
        raise ConfigError("; ".join(upstream_secrets.missing))
    return Config(
        server=server, database=database, usage=usage, admin=admin, console=console, routing=routing,
        redis=redis,
        upstreams=tuple(upstreams), models=tuple(models), groups=tuple(groups), platforms=platforms, tasks=tasks,
    )


MOCK_UPSTREAM = "mock"
MOCK_MODELS = ("mock-gpt", "mock-gpt-mini")
OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-5", "gpt-5-mini")
# The bundled mock's address is known only once it listens; a process that
# runs the embedded default starts it and puts its address in place of this.
BUNDLED_MOCK_URL = "http://127.0.0.1:0/v1"


def embedded_config(env: Mapping[str, str] | None = None, db_path: Path = Path("gateway.db"),
                    mock_base_url: str = BUNDLED_MOCK_URL) -> Config:
    """The configuration used when no file is given: SQLite in the working
    directory, the bundled mock upstream (models ``mock-gpt``,
    ``mock-gpt-mini``), OpenAI models when ``OPENAI_API_KEY`` is set (all
    allowing web search), and the admin API and console when
    ``GATEWAY_ADMIN_TOKEN`` is set."""
    env = os.environ if env is None else env
    upstreams = [UpstreamConfig(name=MOCK_UPSTREAM, kind="openai", base_url=mock_base_url)]
    # Web search allowed (docs/clients.md): Codex declares it in every
    # request, and the embedded default is meant to work with it as installed.
    search = frozenset({"web_search"})
    models = [
        ModelConfig(m, (Route(MOCK_UPSTREAM, m),), Price(input=1.0, output=2.0, cached_input=0.5), owned_by="mock",
                    allow_tools=search)
        for m in MOCK_MODELS
    ]
    if env.get("OPENAI_API_KEY"):
        upstreams.append(UpstreamConfig(
            name="openai", kind="openai", base_url="https://api.openai.com/v1",
            api_key_env="OPENAI_API_KEY", api_key=env["OPENAI_API_KEY"],
        ))
        models += [ModelConfig(m, (Route("openai", m),), owned_by="openai", allow_tools=search) for m in OPENAI_MODELS]
    admin = AdminConfig()
    return Config(
        database=DatabaseConfig(db_path.resolve()),
        admin=replace(admin, token=env.get(admin.token_env) or None),
        upstreams=tuple(upstreams),
        models=tuple(models),
        groups=(GroupConfig("default"),),
    )


def with_mock_url(cfg: Config, mock_base_url: str) -> Config:
    """``cfg`` with the bundled mock upstream at ``mock_base_url``."""
    ups = tuple(replace(u, base_url=mock_base_url) if u.name == MOCK_UPSTREAM else u for u in cfg.upstreams)
    return replace(cfg, upstreams=ups)


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None, secrets: bool = True) -> Config:
    """Read and validate a TOML file; relative paths in it are relative to it.
    ``secrets``: see parse_config."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    cfg = parse_config(data, env=env, base_dir=path.resolve().parent, secrets=secrets)
    return replace(cfg, source=path.resolve())
