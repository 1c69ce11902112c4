"""The steps every front door shares, below the pass-through path and the
task handlers: read the body (bounded in size and time), resolve the model
for the key, admit the request against the key's limits.

    authenticate (auth.KeyCache) -> read_body -> parse (protocols)
    -> resolve_model -> admit

Doors: the model endpoints (gateway.proxy), video tasks and assets
(gateway.tasks.handlers), and any door added beside them.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from time import perf_counter
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .auth import KeyInfo
from .bounds import shown
from .config import PRICE_FIELDS, STORED_FIELDS, ModelConfig
from .context import Gateway, RequestContext
from .errors import BadRequest, Forbidden, NotFound, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from .logs import log_request
from .protocols.base import Usage, refuse_variant
from .translate.common import estimate_tokens


async def read_body(request: web.Request, gw: Gateway) -> bytes:
    """The whole request body: 413 before reading past ``server.max_body_mb``,
    408 when the client takes longer than ``server.body_timeout_s`` to send
    it (a slow or stalled client must not hold a request open forever),
    400 when it does not match its framing. A compressed body is refused
    (415): the gateway reads the body it forwards, and decompressing a
    client's bytes is a way to make it hold far more than ``max_body_mb``."""
    server = gw.config.server
    limit = server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body exceeds {limit} bytes.")
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise UnsupportedMediaType(f"Content-Encoding '{shown(encoding)}' is not accepted: send the body "
                                   "uncompressed.")
    try:
        if request.content.is_eof():
            return await request.read()  # all here already (the usual case): no timer needed
        async with asyncio.timeout(server.body_timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body exceeds {limit} bytes.") from None
    except TimeoutError:
        gw.metrics.client_timeouts.labels("body").inc()
        raise RequestTimeout(f"The request body did not arrive within {server.body_timeout_s:g} s.") from None
    except RequestPayloadError:
        raise BadRequest("The request body does not match its framing (Content-Length or chunked encoding).",
                         code="invalid_body") from None


async def admit(gw: Gateway, ctx: RequestContext, key: KeyInfo) -> None:
    """Check the key's limits (429 if over); the middleware releases the
    concurrency slot and settles tokens and spend when the request ends."""
    ctx.rate_headers = await gw.limits.admit(key)
    ctx.admitted = True


def admit_free(gw: Gateway, ctx: RequestContext, key: KeyInfo) -> None:
    """Admit a request that bills nothing (a token count, a warm-up):
    exempt from the key's limits, bounded by ``server.free_rpm`` and
    ``server.free_concurrency`` per key instead (429 past them)."""
    server = gw.config.server
    gw.limits.admit_free(key, server.free_rpm, server.free_concurrency)
    ctx.admitted_free = True


def resolve_model(gw: Gateway, key: KeyInfo, model: str) -> ModelConfig:
    m = gw.config.model(model)
    if m is None:
        raise NotFound(f"The model '{shown(model)}' does not exist.", code="model_not_found", param="model")
    if model not in key.models:
        raise Forbidden(f"This key may not use the model '{shown(model)}'.", code="model_not_allowed",
                        param="model")
    return m


def check_price_fields(fields: dict[str, frozenset[str]], obj: dict[str, Any], model_cfg: ModelConfig) -> None:
    """400 ``field_not_allowed`` for a body field that changes what the
    provider charges (``fields``: config.PRICE_FIELDS of the client's
    protocol) at a value other than its standard ones or those the model's
    ``allow_fields`` names: the row is billed at the model's configured
    price, so a client must not pick a dearer tier. A few dict lookups on
    the parsed body; the body itself is not touched."""
    for name, standard in fields.items():
        value = obj.get(name)
        if value is None or (isinstance(value, str) and (value in standard
                                                          or value in model_cfg.allow_fields.get(name, ()))):
            continue
        what = f"'{shown(value)}'" if isinstance(value, str) else "a non-string value"
        ok = ", ".join(sorted(standard | model_cfg.allow_fields.get(name, frozenset())))
        raise BadRequest(f"'{name}' = {what} is not allowed on the model '{model_cfg.name}': it changes the "
                         f"provider's price. Send one of {ok}, or leave it out.",
                         code="field_not_allowed", param=name)


OPENAI_PRICE_FIELDS = PRICE_FIELDS["openai"]
ANTHROPIC_PRICE_FIELDS = PRICE_FIELDS["anthropic"]


def check_body(obj: dict[str, Any], model_cfg: ModelConfig, anthropic: bool) -> None:
    """What a billed request's body (the client's, before any translation)
    may ask of the provider beyond tokens at the model's price: its price
    flags, server tools and stored objects (the checks below), each a 400
    before anything goes upstream unless the model allows it. ``anthropic``:
    the body is a Messages request, else an OpenAI one."""
    check_price_fields(ANTHROPIC_PRICE_FIELDS if anthropic else OPENAI_PRICE_FIELDS, obj, model_cfg)
    check_tools(obj, model_cfg, anthropic)


# Server tools (docs/security.md, "Server tools"): a tool the provider runs
# itself (web search and fetch, code execution, file search, image
# generation, a hosted shell, MCP) may be charged per call, which a row billed
# in tokens does not show. A tool passes without the model's allow_tools
# only if its type says the client runs it; any other type, a newer version
# or another spelling of a known one included, is taken for a server tool.
_OPENAI_CLIENT_TOOLS = frozenset({"function", "custom", "local_shell", "apply_patch", "computer",
                                  "computer_use_preview"})
_ANTHROPIC_CLIENT_TOOLS = frozenset({"custom", "function"})
# Tools Anthropic defines and the client runs, by version (bash_20250124).
_ANTHROPIC_CLIENT = re.compile(r"(?:bash|text_editor|computer|memory)_[0-9]{8}")
# A server tool's name in allow_tools: its type without a version date
# (Anthropic's web_search_20250305, OpenAI's web_search_2025_08_26).
_TOOL_NAME = re.compile(r"([a-z][a-z0-9_]*?)(?:_[0-9]{8}|_[0-9]{4}_[0-9]{2}_[0-9]{2})?")
_STORED = tuple(sorted(STORED_FIELDS))  # in a fixed order: the first refused is named


def check_tools(obj: dict[str, Any], model_cfg: ModelConfig, anthropic: bool) -> None:
    """400 ``tool_not_allowed`` for a server tool the model's
    ``allow_tools`` does not name (in ``tools``, or Chat Completions'
    ``web_search_options``), 400 ``field_not_allowed`` for a provider-side
    object (a Responses ``conversation`` or stored ``prompt``) unless its
    ``allow_stored`` names the field. A few dict lookups, and one pass over
    ``tools`` when the request has tools."""
    tools = obj.get("tools")
    if tools.__class__ is list:  # anything else is the upstream's (or the translator's) 400
        _check_list(tools, "tools", model_cfg, anthropic, True)
    if anthropic:
        return
    if obj.get("web_search_options") is not None and "web_search" not in model_cfg.allow_tools:
        raise BadRequest(f"'web_search_options' asks for web search, which is not allowed on the model "
                         f"'{model_cfg.name}': the provider charges for each search. Leave it out.",
                         code="tool_not_allowed", param="web_search_options")
    for name in _STORED:
        value = obj.get(name)
        # Responses' prompt is an object; a string prompt (images, completions) is text.
        if value is None or name in model_cfg.allow_stored or (name == "prompt" and not isinstance(value, dict)):
            continue
        raise BadRequest(f"'{name}' names an object stored at the provider, which is not allowed on the model "
                         f"'{model_cfg.name}'. Send the whole input (or previous_response_id) instead.",
                         code="field_not_allowed", param=name)


def _check_list(tools: list[Any], at: str, model_cfg: ModelConfig, anthropic: bool, top: bool) -> None:
    client = _ANTHROPIC_CLIENT_TOOLS if anthropic else _OPENAI_CLIENT_TOOLS
    for i, t in enumerate(tools):
        # The common case inline: a function tool (no type: OpenAI's function,
        # Anthropic's custom; not a tool at all: the upstream's 400).
        if t.__class__ is not dict:
            continue
        kind = t.get("type")
        if kind is not None and (kind.__class__ is not str or kind not in client):
            _check_tool(t, kind, f"{at}[{i}]", model_cfg, anthropic, top)
        if not _TYPE_VARIANTS.isdisjoint(t):
            _refuse_type_variants(t, f"{at}[{i}].")


# "Type", "TYPE", ... beside (or instead of) a tool's "type": the type a
# case-insensitive decoder reads (protocols.base.folded; no letter of "type"
# has a non-ASCII fold). A set test per tool.
_TYPE_VARIANTS = frozenset(v for v in ("".join(c) for c in itertools.product("tT", "yY", "pP", "eE")) if v != "type")


def _refuse_type_variants(obj: dict[str, Any], at: str) -> None:
    for k in obj:
        if k in _TYPE_VARIANTS:
            refuse_variant(k, "type", at)


def _check_tool(t: dict[str, Any], kind: Any, where: str, model_cfg: ModelConfig, anthropic: bool,
                top: bool) -> None:
    """A tool whose type is not among the client ones: allowed, or a 400."""
    if isinstance(kind, str):
        if anthropic:
            if _ANTHROPIC_CLIENT.fullmatch(kind):
                return
        elif kind == "namespace" and top:  # Responses: functions under one name (one level deep)
            inner = t.get("tools")
            if inner.__class__ is list:
                _check_list(inner, f"{where}.tools", model_cfg, anthropic, False)
            return
        elif kind == "shell":  # the client's shell, unless it asks for a hosted container
            env = t.get("environment")
            if isinstance(env, dict) and not _TYPE_VARIANTS.isdisjoint(env):
                _refuse_type_variants(env, f"{where}.environment.")
            if env is None or (isinstance(env, dict) and env.get("type") == "local"):
                return
        m = _TOOL_NAME.fullmatch(kind)
        if m is not None and m.group(1) in model_cfg.allow_tools:
            return
    what = f"'{shown(kind)}'" if isinstance(kind, str) else "not a string"
    raise BadRequest(f"{where}.type = {what} is a tool the provider runs and may charge for per call, which is not "
                     f"allowed on the model '{model_cfg.name}'. Send function tools only, or leave it out.",
                     code="tool_not_allowed", param=f"{where}.type")


# The fields of a chat request (any of the three protocols) that are its input.
_INPUT_FIELDS = ("system", "instructions", "messages", "input", "tools")


def estimate_cut(ctx: RequestContext, obj: dict[str, Any]) -> None:
    """A stream the client left before the upstream said its usage (OpenAI
    protocols say it only at the end, Anthropic its output only at the end).
    Billed as what was seen, it would be free: a client reads the answer and
    closes just before the final event. What the upstream did not report is
    estimated instead: the input from the request (translate.common's local
    estimate), the output as at least one token per event relayed."""
    u = ctx.usage if ctx.usage is not None else Usage()
    if u.input_tokens == 0:
        u.input_tokens = estimate_tokens([obj.get(k) for k in _INPUT_FIELDS])
    u.output_tokens = max(u.output_tokens, ctx.events_out)
    ctx.usage = u


def finish(gw: Gateway, ctx: RequestContext, method: str, path: str) -> None:
    """The end of one /v1 request: its usage row (and log line), its
    concurrency slot released, its tokens and spend settled. The request
    middleware calls it for every request; a door that makes several rows
    from one connection (the Responses WebSocket) calls it for each."""
    writer = gw.writer
    assert writer is not None
    if ctx.status == 499 and ctx.events_out and ctx.request_obj is not None:
        estimate_cut(ctx, ctx.request_obj)
    row = ctx.row(perf_counter())
    writer.record(row, ctx.seq)
    if gw.config.server.log_requests:
        log_request(row, method, path)
    key = ctx.key
    if key is not None:
        if ctx.admitted:
            gw.limits.release(key)
        elif ctx.admitted_free:
            gw.limits.release_free(key)
        u = ctx.usage
        if u is not None:
            # Token and spend limits count what was actually recorded.
            gw.limits.settle(key, u.input_tokens + u.output_tokens, ctx.cost_usd)
