"""Model -> ordered upstream targets, and the health of every upstream.

A model's routes are grouped by priority (lowest number first); within a
priority the order is weighted random. ``Router.plan`` returns that order;
the proxy walks it, skipping targets that are not ``available`` (breaker open,
route cooling after a 429) without counting them as attempts.

Health outlives a Router: a config reload builds a new Router on the same
``Health``, so an upstream's breaker state and a route's 429 cool-down carry
over (an upstream whose ``base_url`` changed starts afresh).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from yarl import URL

from .config import CHAT_PROTOCOLS, Config, Route, UpstreamConfig

log = logging.getLogger("gateway.routing")

MAX_ATTEMPTS = 3

# Breaker states, as exported in gateway_circuit_state.
CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = ("closed", "half-open", "open")

# What Breaker.acquire grants.
DENIED, NORMAL, PROBE = 0, 1, 2

Clock = Callable[[], float]


class Breaker:
    """Circuit breaker of one upstream.

    Closed: every request may go; ``threshold`` consecutive failures open it.
    Open: skipped until ``cooldown_s`` has passed; then the first request to
    ``acquire`` it becomes the single half-open probe (others keep skipping it)
    and the probe's outcome closes it or opens it for another cool-down.
    Outcomes of requests other than the probe, reported while the breaker is
    not closed, are ignored: only the probe decides. Single-threaded (one event
    loop), so no locking.
    """

    __slots__ = ("_on_change", "base_url", "cooldown_s", "failures", "name", "probing", "state", "threshold", "until")

    def __init__(self, up: UpstreamConfig, on_change: Callable[[Breaker, int], None]) -> None:
        self.name = up.name
        self.base_url = up.base_url
        self.threshold = up.breaker_failures
        self.cooldown_s = up.breaker_cooldown_s
        self.failures = 0
        self.state = CLOSED
        self.until = 0.0
        self.probing = False
        self._on_change = on_change

    def available(self, now: float) -> bool:
        """Whether a request could be sent now (without claiming the probe)."""
        s = self.state
        if s == CLOSED:
            return True
        if s == OPEN:
            return now >= self.until
        return not self.probing

    def acquire(self, now: float) -> int:
        """DENIED, NORMAL, or PROBE (this request decides the breaker)."""
        s = self.state
        if s == CLOSED:
            return NORMAL
        if s == OPEN:
            if now < self.until:
                return DENIED
            self._set(HALF_OPEN)
        if self.probing:
            return DENIED
        self.probing = True
        return PROBE

    def success(self, grant: int) -> None:
        if self.state == CLOSED:
            self.failures = 0
        elif grant == PROBE:
            self.probing = False
            self.failures = 0
            self._set(CLOSED)

    def failure(self, grant: int, now: float) -> None:
        if self.state == CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self.until = now + self.cooldown_s
                self._set(OPEN)
        elif grant == PROBE:
            self.probing = False
            self.until = now + self.cooldown_s
            self._set(OPEN)

    def release(self, grant: int) -> None:
        """The attempt ended without a verdict (the client went away)."""
        if grant == PROBE and self.state == HALF_OPEN:
            self.probing = False

    def _set(self, state: int) -> None:
        old, self.state = self.state, state
        self._on_change(self, old)


class RouteCooldown:
    """A route (upstream + upstream model) skipped until ``until`` after a 429."""

    __slots__ = ("until",)

    def __init__(self) -> None:
        self.until = 0.0


@dataclass(frozen=True, slots=True)
class Target:
    """One route resolved against its upstream, with what a request needs."""

    route: Route
    upstream: UpstreamConfig
    credential: tuple[tuple[str, str], ...]
    breaker: Breaker
    cooldown: RouteCooldown
    # Client protocol -> the wire protocol it is translated to on this
    # route; a client protocol not in it passes through.
    bridges: dict[str, str] = field(default_factory=dict, compare=False)
    _urls: dict[str, URL] = field(default_factory=dict, compare=False, repr=False)

    def available(self, now: float) -> bool:
        return now >= self.cooldown.until and self.breaker.available(now)

    def url(self, path: str, query: str) -> URL:
        """The upstream URL for a public path (after ``/v1``) and query."""
        if query:
            return URL(f"{self.upstream.base_url}{path}?{query}", encoded=True)
        u = self._urls.get(path)
        if u is None:
            u = URL(self.upstream.base_url + path, encoded=True)
            if len(self._urls) < 256:  # paths with ids (task polls) must not grow it forever
                self._urls[path] = u
        return u


class Health:
    """Breakers by upstream name and 429 cool-downs by route; see the module
    docstring. ``on_change(name, state)`` is called on every breaker change
    (and with CLOSED for a new upstream), ``on_remove(name)`` when a reload
    drops an upstream."""

    def __init__(
        self,
        on_change: Callable[[str, int], None] | None = None,
        on_remove: Callable[[str], None] | None = None,
    ) -> None:
        self.breakers: dict[str, Breaker] = {}
        self._cooldowns: dict[tuple[str, str], RouteCooldown] = {}
        self._notify = on_change
        self._on_remove = on_remove

    def breaker(self, up: UpstreamConfig) -> Breaker:
        b = self.breakers.get(up.name)
        if b is None or b.base_url != up.base_url:
            b = self.breakers[up.name] = Breaker(up, self._changed)
            if self._notify is not None:
                self._notify(up.name, CLOSED)
        else:
            b.threshold, b.cooldown_s = up.breaker_failures, up.breaker_cooldown_s
        return b

    def cooldown(self, route: Route) -> RouteCooldown:
        key = (route.upstream, route.model)
        c = self._cooldowns.get(key)
        if c is None:
            c = self._cooldowns[key] = RouteCooldown()
        return c

    def prune(self, cfg: Config) -> None:
        """Forget upstreams that a reloaded config no longer has."""
        names = {u.name for u in cfg.upstreams}
        for name in [n for n in self.breakers if n not in names]:
            del self.breakers[name]
            if self._on_remove is not None:
                self._on_remove(name)
        for key in [k for k in self._cooldowns if k[0] not in names]:
            del self._cooldowns[key]

    def _changed(self, b: Breaker, old: int) -> None:
        log.warning("circuit breaker of upstream %s: %s -> %s", b.name, STATE_NAMES[old], STATE_NAMES[b.state])
        if self._notify is not None:
            self._notify(b.name, b.state)


def credential_headers(up: UpstreamConfig) -> tuple[tuple[str, str], ...]:
    """The upstream account's own credential, as its API expects it."""
    if not up.api_key:
        return ()
    if up.kind == "anthropic":
        return (("x-api-key", up.api_key),)
    return (("Authorization", f"Bearer {up.api_key}"),)


def bridges(up: UpstreamConfig) -> dict[str, str]:
    """Which client protocols need translating to reach this upstream, and
    to what: every chat protocol it does not speak, to the first it does."""
    if not up.protocols:
        return {}
    return {p: up.protocols[0] for p in CHAT_PROTOCOLS if p not in up.protocols}


class Router:
    """Routes of every configured model, resolved once per config."""

    def __init__(self, cfg: Config, health: Health | None = None, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self.health = health = health or Health()
        health.prune(cfg)
        self.max_attempts = cfg.routing.max_attempts
        self.retry_budget_s = cfg.routing.retry_budget_s
        ups = {u.name: u for u in cfg.upstreams}
        breakers = {u.name: health.breaker(u) for u in cfg.upstreams}
        # One target per upstream for requests that name an object made
        # there rather than a model (GET /v1/responses/{id}).
        self._by_upstream = {
            name: Target(Route(name, ""), up, credential_headers(up), breakers[name], health.cooldown(Route(name, "")))
            for name, up in ups.items()
        }
        self._tiers: dict[str, list[list[Target]]] = {}
        for m in cfg.models:
            by_prio: dict[int, list[Target]] = {}
            for r in m.routes:
                up = ups[r.upstream]
                target = Target(r, up, credential_headers(up), breakers[up.name], health.cooldown(r), bridges(up))
                by_prio.setdefault(r.priority, []).append(target)
            self._tiers[m.name] = [by_prio[p] for p in sorted(by_prio)]

    def upstream_target(self, name: str) -> Target | None:
        """The upstream itself, for a request bound to it by an object id."""
        return self._by_upstream.get(name)

    def plan(self, model: str) -> list[Target]:
        """Every target of the model in the order to try them: priority tiers,
        weighted random within. The caller skips unavailable ones."""
        tiers = self._tiers.get(model)
        if not tiers:
            return []
        if len(tiers) == 1:
            return self._weighted_order(tiers[0])
        out: list[Target] = []
        for tier in tiers:
            out.extend(self._weighted_order(tier))
        return out

    def _weighted_order(self, tier: list[Target]) -> list[Target]:
        if len(tier) == 1:
            return tier
        # Efraimidis-Spirakis: sort by u^(1/w); first place is weight-proportional.
        rng = self._rng
        return sorted(tier, key=lambda t: rng.random() ** (1.0 / t.route.weight), reverse=True)
