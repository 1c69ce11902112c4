"""Requests that name a Responses object by id rather than a model:
``GET``/``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``
and ``POST /v1/responses/{id}/cancel``.

    authenticate -> find where the id was made (gateway.affinity; another
    workspace's id is not found) -> admit -> forward to that upstream only
    -> relay

The answer is relayed as the upstream sends it; nothing is billed (the
response's usage was billed when it was made), and the row names the
response's model.
"""

from __future__ import annotations

from aiohttp import web

from .bounds import shown
from .context import CTX, GATEWAY
from .errors import NotFound
from .intake import admit, read_body
from .protocols.responses import StoredResponses
from .proxy import forward

STORED = StoredResponses()


async def handle_stored(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    ctx = request[CTX]
    ctx.key = key = gw.keys.authenticate(request) or await gw.keys.authenticate_new(request)
    rid = request.match_info["id"]
    raw = await read_body(request, gw)
    ctx.bytes_in = len(raw)
    origin = await gw.origins.find(rid, key.workspace_id)
    target = gw.router.upstream_target(origin.upstream) if origin is not None else None
    if origin is None or target is None:
        raise NotFound(f"No response found with id '{shown(rid)}'.", code="response_not_found")
    ctx.model = origin.model
    ctx.model_cfg = gw.config.model(origin.model) if origin.model else None
    await admit(gw, ctx, key)
    # The id as recorded (URL-safe: protocols.responses), not as the client
    # spelled it; then the route's own suffix (/input_items, /cancel).
    resource = request.match_info.route.resource
    suffix = resource.canonical.partition("{id}")[2] if resource is not None else ""
    path = f"/responses/{rid}{suffix}"
    return await forward(request, gw, ctx, STORED, None, raw, {}, [target], path=path)
