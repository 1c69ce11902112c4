"""What a video task body may ask of the provider, checked before anything
goes upstream:

- ``provider_options``: only the keys of the provider kind's allow-list (plus
  an upstream's ``extra_provider_options``), each of its type. A key the
  gateway decides (the model, the content it builds, a callback address it
  does not own) or one that has a top-level field of its own is refused with
  a 400 naming it: a pass-through field must never override what the gateway
  checked and bills.
- asset references: every spelling a provider could read as an asset
  (``asset://<id>`` in any letter case, with whitespace, percent-encoded) is
  turned into the asset id, so it resolves through the caller's workspace
  like ``asset_id`` does; a resource URL of any other scheme than http,
  https or data is refused, and so is an asset reference inside
  ``provider_options``.

No I/O here; the handlers apply these checks to a parsed body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote

from ..errors import BadRequest

# Decided by the gateway: never settable through provider_options, and not
# addable to an allow-list by config.
DECIDED = frozenset({"model", "content", "callback_url", "resources", "prompt", "provider_options"})
# Options the unified body has its own field for (the Ark name -> ours): one
# way to say each, so what the gateway validated is what the provider reads.
TOP_LEVEL = {
    "ratio": "ratio", "duration": "duration", "resolution": "resolution", "watermark": "watermark",
    "seed": "seed", "generate_audio": "audio", "audio": "audio",
}

Check = Callable[[Any], bool]


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31


def _text(limit: int) -> Check:
    return lambda v: isinstance(v, str) and 0 < len(v) <= limit


def _one_of(*values: str) -> Check:
    return lambda v: v in values


# Ark's create-task fields that the unified body leaves to provider_options.
# Not here on purpose: ``tools`` (web search is billed apart, and the gateway
# bills video tokens only), and anything in DECIDED or TOP_LEVEL.
ARK_OPTIONS: dict[str, tuple[Check, str]] = {
    "camera_fixed": (_bool, "true or false"),
    "return_last_frame": (_bool, "true or false"),
    "draft": (_bool, "true or false"),
    "frames": (_int, "a non-negative integer"),
    "execution_expires_after": (_int, "a non-negative integer"),
    "service_tier": (_one_of("default", "flex"), "one of default, flex"),
    "safety_identifier": (_text(128), "a string of at most 128 characters"),
}
# A ``gateway`` upstream passes provider_options on to its own provider, of
# any kind: the same list.
ALLOWED: Mapping[str, Mapping[str, tuple[Check, str]]] = {"ark": ARK_OPTIONS, "gateway": ARK_OPTIONS}

ASSET_SCHEME = "asset"
URL_SCHEMES = ("http", "https", "data")


def option_refusal(name: str) -> str | None:
    """Why ``name`` may never be a provider option, or None."""
    if name in DECIDED:
        return f"'{name}' is decided by the gateway"
    if name in TOP_LEVEL:
        return f"'{name}' has a top-level field of its own ('{TOP_LEVEL[name]}')"
    return None


def check_provider_options(options: Mapping[str, Any], upstreams: Iterable[tuple[str, tuple[str, ...]]]) -> None:
    """Refuse any key of ``options`` that is not allowed on every candidate
    upstream, given as (kind, extra_provider_options) pairs; 400 naming it."""
    ups = list(upstreams)
    for name, value in options.items():
        param = f"provider_options.{name}"
        refusal = option_refusal(name)
        if refusal is not None:
            raise BadRequest(f"'{param}': {refusal}; it cannot be set in provider_options.",
                             code="option_not_allowed", param=param)
        for kind, extra in ups:
            allowed = ALLOWED.get(kind, {})
            if name in extra:
                continue
            if name not in allowed:
                names = ", ".join(sorted({*allowed, *extra}))
                raise BadRequest(f"'{param}' is not an option this model's provider takes (allowed: {names}).",
                                 code="option_not_allowed", param=param)
            check, what = allowed[name]
            if not check(value):
                raise BadRequest(f"'{param}' must be {what}.", code="invalid_type", param=param)
        if _mentions_asset(value):
            raise BadRequest(f"'{param}' names an asset: name assets in 'resources'.",
                             code="option_not_allowed", param=param)


def _normalised(value: str) -> str:
    """``value`` percent-decoded (repeatedly: double encoding is one more
    spelling) and stripped of whitespace and control characters."""
    for _ in range(4):
        decoded = unquote(value)
        if decoded == value:
            break
        value = decoded
    return value.strip("".join(map(chr, range(33))) + "\x7f\u00a0\u2000\u200b\ufeff")


def resource_url(value: str, where: str) -> tuple[str | None, str]:
    """(asset id, None) if the URL names an asset in any spelling, else
    (None, the URL as given) for an http, https or data URL; 400 otherwise."""
    v = _normalised(value)
    scheme, sep, rest = v.partition(":")
    scheme = scheme.strip().lower()
    if sep and scheme == ASSET_SCHEME:
        asset_id = rest.lstrip("/").strip()
        if not asset_id:
            raise BadRequest(f"'{where}' names no asset.", code="invalid_value", param=where)
        return asset_id, value
    if not sep or scheme not in URL_SCHEMES:
        raise BadRequest(f"'{where}' must be an http, https or data URL, or asset://<asset id>.",
                         code="invalid_value", param=where)
    return None, value


def _mentions_asset(value: Any) -> bool:
    if isinstance(value, str):
        return ASSET_SCHEME + ":" in _normalised(value).lower()
    if isinstance(value, dict):
        return any(_mentions_asset(k) or _mentions_asset(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_mentions_asset(v) for v in value)
    return False
