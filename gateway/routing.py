"""Model -> ordered upstream targets.

A model's routes are grouped by priority (lowest number first); within a
priority the order is weighted random. ``plan`` returns the order in which
the proxy tries them, bounded by MAX_ATTEMPTS.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import aiohttp

from .config import Config, Route, UpstreamConfig

MAX_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Target:
    """One route resolved against its upstream, with what a request needs."""

    route: Route
    upstream: UpstreamConfig
    timeout: aiohttp.ClientTimeout
    credential: tuple[tuple[str, str], ...]


def credential_headers(up: UpstreamConfig) -> tuple[tuple[str, str], ...]:
    """The upstream account's own credential, as its API expects it."""
    if not up.api_key:
        return ()
    if up.kind == "anthropic":
        return (("x-api-key", up.api_key),)
    return (("Authorization", f"Bearer {up.api_key}"),)


def _timeout(up: UpstreamConfig) -> aiohttp.ClientTimeout:
    # sock_read bounds the wait for the response head; the proxy narrows it
    # to the idle timeout once the head has arrived.
    return aiohttp.ClientTimeout(
        total=up.timeout_s, sock_connect=up.connect_timeout_s, sock_read=up.first_byte_timeout_s
    )


class Router:
    """Routes of every configured model, resolved once per config."""

    def __init__(self, cfg: Config, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        ups = {u.name: u for u in cfg.upstreams}
        self._tiers: dict[str, list[list[Target]]] = {}
        for m in cfg.models:
            by_prio: dict[int, list[Target]] = {}
            for r in m.routes:
                up = ups[r.upstream]
                by_prio.setdefault(r.priority, []).append(Target(r, up, _timeout(up), credential_headers(up)))
            self._tiers[m.name] = [by_prio[p] for p in sorted(by_prio)]

    def plan(self, model: str) -> list[Target]:
        """Targets to try, in order: priority tiers, weighted random within."""
        tiers = self._tiers.get(model, [])
        if len(tiers) == 1 and len(tiers[0]) == 1:
            return tiers[0]
        out: list[Target] = []
        for tier in tiers:
            out.extend(self._weighted_order(tier))
            if len(out) >= MAX_ATTEMPTS:
                break
        return out[:MAX_ATTEMPTS]

    def _weighted_order(self, tier: list[Target]) -> list[Target]:
        if len(tier) == 1:
            return tier
        # Efraimidis-Spirakis: sort by u^(1/w); first place is weight-proportional.
        rng = self._rng
        return sorted(tier, key=lambda t: rng.random() ** (1.0 / t.route.weight), reverse=True)
