"""``POST /v1/messages/count_tokens`` for a model that no Messages upstream
serves: the count comes from the model's first available Responses
upstream (``POST /responses/input_tokens``, OpenAI's own counting, the body
translated), otherwise from a local estimate (gateway.translate.common
.estimate_tokens, said in ``x-gateway-token-count: estimate``). A count is
advisory: an upstream that cannot count (no such endpoint, unreachable,
a field with no counterpart) gives way to the estimate rather than failing
the client. The answer is Anthropic's ``{"input_tokens": N}``; the usage
row bills nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from .config import ModelConfig
from .context import Gateway, RequestContext
from .errors import GatewayError
from .proxy import Bridge, read_whole, upstream_headers
from .routing import Target
from .translate import client_error
from .translate.common import estimate_tokens
from .upstream import UpstreamError

log = logging.getLogger("gateway.counting")

# Statuses that mean "this upstream has no counting endpoint".
NO_COUNTER = frozenset({404, 405, 501})


async def count_elsewhere(
    request: web.Request, gw: Gateway, ctx: RequestContext, model_cfg: ModelConfig, obj: dict[str, Any],
) -> web.StreamResponse:
    now = gw.clock()
    target = next((t for t in gw.router.plan(model_cfg.name)
                   if "responses" in t.upstream.protocols and t.available(now)), None)
    if target is not None:
        answer = await _upstream_count(request, gw, ctx, target, model_cfg, obj)
        if answer is not None:
            return answer
    ctx.status = 200
    body = orjson.dumps({"input_tokens": estimate_tokens([obj.get("system"), obj.get("messages"), obj.get("tools")])})
    return web.Response(body=body, content_type="application/json", headers={"x-gateway-token-count": "estimate"})


async def _upstream_count(
    request: web.Request, gw: Gateway, ctx: RequestContext, target: Target, model_cfg: ModelConfig,
    obj: dict[str, Any],
) -> web.StreamResponse | None:
    up = target.upstream
    try:
        bridge = Bridge("messages", "responses", obj, target.route.model, model_cfg, count=True)
    except GatewayError:
        return None  # a field Responses cannot carry: the estimate still can
    client = gw.upstream
    assert client is not None
    ctx.upstream = up.name
    headers = bridge.headers(upstream_headers(request.headers, target))
    try:
        resp = await client.request(
            "POST", target.url("/responses/input_tokens", ""), headers, bridge.prepared.body,
            connect_timeout=up.connect_timeout_s, first_byte_timeout=up.first_byte_timeout_s,
            total_timeout=up.timeout_s,
        )
    except UpstreamError as e:  # timeouts included
        log.warning("upstream %s could not count tokens: %s", up.name, e)
        return None
    try:
        resp.set_idle_timeout(up.idle_timeout_s)
        try:
            data = await read_whole(resp, ctx, up.name)
        except GatewayError:
            ctx.error_type = None
            return None
        if resp.status in NO_COUNTER:
            return None
        if resp.status >= 300:
            ctx.status = resp.status
            return web.Response(status=resp.status, body=client_error("messages", resp.status, data, up.name),
                                content_type="application/json")
        try:
            n = orjson.loads(data).get("input_tokens")
        except (orjson.JSONDecodeError, AttributeError):
            n = None
        if not isinstance(n, int) or isinstance(n, bool):
            return None
        ctx.status = 200
        return web.Response(body=orjson.dumps({"input_tokens": n}), content_type="application/json")
    finally:
        resp.release()
