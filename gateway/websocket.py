"""Responses over a WebSocket: ``GET /v1/responses`` upgraded, as Codex's
built-in provider tries first (``OpenAI-Beta: responses_websockets=...``).

    upgrade: authenticate (a bad key is a 401 before the upgrade)
    -> per text frame {"type": "response.create", ...Responses body}:
       parse, resolve the model, admit, route (gateway.proxy.forward)
       -> one upstream ``POST /v1/responses`` with ``stream: true``
       -> each SSE event's data relayed as one text frame
       -> one usage row per response (gateway.intake.finish)

The connection makes no row of its own, unless it carried no response
(then one row, status 101). Frames of another ``type`` are ignored; a frame
that is not a JSON object, or a request the gateway refuses (bad model,
limits), gets an error frame and a row, like the HTTP request it stands for.

What OpenAI's WebSocket mode offers and Codex relies on, over upstreams that
only speak HTTP:

- Connection-local chaining. Codex sends ``store: false`` and, after the
  first turn, only the new input items with ``previous_response_id`` set to
  the connection's last response. An upstream that did not store that
  response cannot continue it, so the gateway keeps the last response's
  full input and output items (up to ``server.max_body_mb``) and sends the
  next request whole, without ``previous_response_id``. A
  ``previous_response_id`` naming anything else goes upstream as sent, to
  the upstream that made it (gateway.affinity).
- Warm-ups. ``"generate": false`` asks to prepare state without a model
  call: answered here (``response.created`` then ``response.completed``
  with no output, id ``resp_gw...``, zero usage, no upstream), its input
  kept as the chain's start.

Bounds: the key is looked up again for every frame (revoked: 401 and
closed); a connection is closed after ``server.websocket_idle_s`` without a
frame, refuses frames after ``server.websocket_lifetime_s``, and a key holds
at most ``server.websockets_per_key`` open (per process).

Errors come as ``{"type": "error", "status": N, "error": {"type", "code",
"message", "param"}}``: the gateway's own, an upstream's error answer with
its status and error object, or a stream cut mid-way (502/504). On
shutdown, idle connections are closed at once (1001) and busy ones after
their response.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import zlib
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

from . import safejson
from .auth import KeyInfo
from .bounds import shown
from .context import CTX, GATEWAY, Gateway, RequestContext
from .errors import BadRequest, GatewayError, RateLimited, Unauthorized
from .errors import Protocol as ErrorShape
from .intake import admit, admit_free, check_body, finish, resolve_model
from .protocols.base import (
    Endpoint,
    Prepared,
    SSEEvents,
    Usage,
    UsageReader,
    check_model,
    event_data,
    parse_object,
    refuse_variants,
)
from .protocols.responses import HEAD_BYTES, Responses, response_id
from .proxy import Bridge, forward, model_targets, read_chunk
from .routing import Target
from .translate import TranslatedStream, client_error
from .upstream import UpstreamResponse

log = logging.getLogger("gateway.websocket")

RESPONSES = Responses()
ENDPOINT = "/v1/responses"
# Frames a client may send ahead while one is answered; more wait unread
# (in the socket's buffers, not here: each may be server.max_body_mb, and
# clients send a turn only after the last one's answer).
PENDING_FRAMES = 1
# Handshake headers that describe the client's WebSocket, not its request.
_WS_HEADERS = frozenset({"upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                         "sec-websocket-extensions", "sec-websocket-protocol"})
_FINAL = (b'"response.completed"', b'"response.incomplete"')
# The largest event relayed as one frame. Unlike the HTTP relay (which may
# pass an event it cannot parse through as raw bytes), a frame needs the
# whole event, and a final response.completed repeats every output item
# (a long tool call, images), so this is far above the HTTP bound. Past it
# the response ends with an error frame rather than a silently lost event.
WS_EVENT_MAX = 32 * 1024 * 1024


@dataclass(eq=False)
class Connection:
    """One client WebSocket and its chain (see the module docstring)."""

    ws: web.WebSocketResponse
    headers: CIMultiDictProxy[str]  # what each upstream request carries from the handshake
    limit: int  # bytes of chain context kept at most
    key_hash: str  # the handshake's key, looked up again for every frame
    key_id: int
    ends: float  # monotonic time after which no frame is answered (server.websocket_lifetime_s)
    busy: bool = False
    closing: bool = False
    close_after: tuple[int, bytes] | None = None  # close code and reason, once the current frame is answered
    last_id: str | None = None
    context: list[Any] | None = None  # input + output items of the last response
    frames: int = 0
    rows: int = 0  # usage rows its frames made

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(obj).decode())

    async def send_error(self, status: int, kind: str, code: str | None, message: str,
                         param: str | None = None) -> None:
        await self.send({"type": "error", "status": status,
                         "error": {"type": kind, "code": code, "message": message, "param": param}})

    def expand(self, body: dict[str, Any]) -> bool:
        """Replace a ``previous_response_id`` naming this connection's last
        response by that response's items. Returns whether the request
        stands on its own (its items may start the next link)."""
        prev = body.get("previous_response_id")
        if prev is not None and prev == self.last_id and self.context is not None:
            body["input"] = [*self.context, *_items(body.get("input"))]
            del body["previous_response_id"]
            return True
        return prev is None and body.get("conversation") is None

    def link(self, response_id: str | None, body: dict[str, Any], output: list[Any], size: int) -> None:
        """The chain's last response is now ``response_id`` (None: broken)."""
        self.last_id = response_id
        fits = response_id is not None and size <= self.limit
        self.context = [*_items(body.get("input")), *output] if fits else None


WEBSOCKETS: web.AppKey[set[Connection]] = web.AppKey("websockets")


def _items(inp: Any) -> list[Any]:
    """A Responses ``input`` as a list of items."""
    if isinstance(inp, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": inp}]}]
    return list(inp) if isinstance(inp, list) else []


def _upstream_headers(request: web.Request) -> CIMultiDictProxy[str]:
    """The handshake's headers as those of an HTTP Responses request."""
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in request.headers.items():
        lk = k.lower()
        if lk in _WS_HEADERS:
            continue
        if lk == "openai-beta":  # the WebSocket flag is about this hop only
            v = ",".join(f for f in (x.strip() for x in v.split(",")) if not f.startswith("responses_websockets"))
            if not v:
                continue
        out.add(k, v)
    out["Content-Type"] = "application/json"
    out["Accept"] = "text/event-stream"
    return CIMultiDictProxy(out)


async def handle_websocket(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    ctx = request[CTX]
    ctx.key = key = gw.keys.authenticate(request) or await gw.keys.authenticate_new(request)
    ws = web.WebSocketResponse(max_msg_size=gw.config.server.max_body_bytes, compress=True)
    if not gw.config.server.responses_websocket or not ws.can_prepare(request).ok:
        raise GatewayError("GET /v1/responses takes a WebSocket upgrade here only when enabled; "
                           "send POST /v1/responses.", code="upgrade_required", status=426,
                           headers={"Upgrade": "websocket"})
    server = gw.config.server
    open_conns = request.app[WEBSOCKETS]
    if sum(1 for c in open_conns if c.key_id == key.id) >= server.websockets_per_key:
        raise RateLimited(f"This key has {server.websockets_per_key} WebSockets open already: close one, or send "
                          "POST /v1/responses.", code="too_many_websockets", headers={"Retry-After": "10"})
    conn = Connection(ws, _upstream_headers(request), server.max_body_bytes, gw.keys.key_hash(request), key.id,
                      time.monotonic() + server.websocket_lifetime_s)
    # Counted before the upgrade's first await, so that upgrades of one key
    # arriving together cannot all pass the check above.
    open_conns.add(conn)
    try:
        await ws.prepare(request)
    except BaseException:
        open_conns.discard(conn)
        raise
    ctx.status = 101
    writer = gw.writer
    assert writer is not None
    # The connection is no request in flight of its own: its responses are
    # (each begins below), so a killed worker leaves a row per unfinished
    # response, not one for the connection.
    writer.end(ctx.seq)
    ctx.seq = None
    # Frames are read here and answered one at a time by ``serve``, so a
    # client that closes mid-answer is seen at once and its upstream
    # request cancelled (status 499), as for HTTP.
    frames: asyncio.Queue[str | None] = asyncio.Queue(PENDING_FRAMES)
    worker = asyncio.create_task(serve(request, gw, conn, key, ctx.request_id, frames), name="ws-frames")
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await frames.put(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await frames.put(None)
        if not conn.closing:
            worker.cancel()  # the client left; a shutdown instead lets the answer finish
        await worker
    except BaseException:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        raise
    finally:
        open_conns.discard(conn)
        ctx.rowless = conn.rows > 0
        if not ws.closed:
            await ws.close(code=WSCloseCode.GOING_AWAY if conn.closing else WSCloseCode.OK)
    return ws


async def serve(request: web.Request, gw: Gateway, conn: Connection, key: KeyInfo, conn_id: str,
                frames: asyncio.Queue[str | None]) -> None:
    """Answers the frames in order until cancelled or shut down; closes the
    connection once it has waited ``server.websocket_idle_s`` for a frame,
    and at the latest that long after its lifetime (frames that ask for no
    answer do not keep it open past that)."""
    idle_s = gw.config.server.websocket_idle_s
    try:
        while True:
            if conn.closing:
                await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                return
            left = conn.ends + idle_s - time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, min(idle_s, left))):
                    text = await frames.get()
            except TimeoutError:
                await conn.ws.close(code=WSCloseCode.OK, message=b"idle" if left > idle_s else b"time limit")
                return
            await respond(request, gw, conn, key, conn_id, text)
            if conn.close_after is not None:
                code, reason = conn.close_after
                await conn.ws.close(code=code, message=reason)
                return
    except asyncio.CancelledError:
        return


async def respond(request: web.Request, gw: Gateway, conn: Connection, key: KeyInfo, conn_id: str,
                  text: str | None) -> None:
    """One frame: a response (or an error frame) and its usage row; a
    frame of another type is ignored and makes none."""
    conn.frames += 1
    ctx = RequestContext(f"{conn_id}.{conn.frames}", perf_counter(), endpoint=ENDPOINT, errors=ErrorShape.OPENAI)
    ctx.key = key
    ctx.stream = True
    writer = gw.writer
    assert writer is not None
    ctx.seq = writer.begin(ctx)
    conn.busy = True
    counted = True
    try:
        if text is None:
            raise BadRequest("Frames must be text: one JSON object each.", code="invalid_frame")
        ctx.bytes_in = len(text)
        frame = parse_object(text.encode())
        refuse_variants(frame)
        kind = frame.get("type")
        if kind != "response.create":
            if isinstance(kind, str):
                counted = False  # acknowledgements and the like: nothing to answer
                return
            raise BadRequest("A frame needs a string 'type' (response.create).", code="invalid_frame")
        # The key as it is now: revoked, expired or its user disabled since
        # the upgrade ends the connection; changed limits and models apply.
        fresh = gw.keys.current(conn.key_hash)
        if fresh is None:
            conn.close_after = (WSCloseCode.POLICY_VIOLATION, b"API key no longer valid")
            raise Unauthorized("Invalid, revoked or expired API key.")
        ctx.key = key = fresh
        if time.monotonic() >= conn.ends:
            conn.close_after = (WSCloseCode.OK, b"connection time limit reached")
            lifetime = gw.config.server.websocket_lifetime_s
            raise BadRequest(f"This WebSocket has been open {lifetime:g} s, the most one may: open a new "
                             "connection and send the request there.", code="websocket_connection_limit_reached")
        model = check_model(frame.get("model"))
        ctx.model = model  # the row bounds it
        ctx.model_cfg = model_cfg = resolve_model(gw, key, model)
        check_body(frame, model_cfg, False)
        body = {k: v for k, v in frame.items() if k not in ("type", "generate")}
        body["stream"] = True
        inp = body.get("input")
        if inp is not None and not isinstance(inp, str | list):
            # (A chained frame's input is joined to the last response's here,
            # where anything else would be dropped without a word.)
            raise BadRequest("'input' must be a string or an array of input items.", code="invalid_type",
                             param="input")
        whole = conn.expand(body)
        ctx.request_obj = body  # for a response the client cuts short (intake.estimate_cut)
        if frame.get("generate") is False:
            admit_free(gw, ctx, key)
            await warm_up(conn, ctx, body, model, whole)
            return
        await admit(gw, ctx, key)
        targets = await model_targets(gw, key, RESPONSES, model_cfg, body)
        raw = orjson.dumps(body)
        relay = Relay(conn)
        await forward(request, gw, ctx, RESPONSES, model_cfg, raw, body, targets, method="POST",
                      path="/responses", headers=conn.headers, relay_to=relay)
        ok = ctx.status == 200 and relay.final
        conn.link(relay.rid if ok and whole else None, body, relay.items, len(raw) + relay.item_bytes)
    except GatewayError as e:
        ctx.status = e.status
        if ctx.error_type is None or not ctx.error_type.startswith("upstream"):
            ctx.error_type = e.code
        await _tell(conn, ctx, e.status, e.type, e.code, e.message, e.param)
    except asyncio.CancelledError:
        ctx.status, ctx.error_type = 499, "client_disconnected"
        raise
    except ConnectionError:
        ctx.status, ctx.error_type = 499, "client_disconnected"
    except Exception:
        log.exception("unhandled error in a Responses WebSocket frame")
        ctx.status, ctx.error_type = 500, "internal_error"
        await _tell(conn, ctx, 500, "api_error", "internal_error", "Internal gateway error.")
    finally:
        conn.busy = False
        if counted:
            conn.rows += 1
            finish(gw, ctx, "WS", ENDPOINT)
        else:
            writer.end(ctx.seq)


async def _tell(conn: Connection, ctx: RequestContext, status: int, kind: str, code: str | None, message: str,
                param: str | None = None) -> None:
    """An error frame, unless the client is gone."""
    try:
        await conn.send_error(status, kind, code, message, param)
    except ConnectionError:
        ctx.status, ctx.error_type = 499, "client_disconnected"


async def warm_up(conn: Connection, ctx: RequestContext, body: dict[str, Any], model: str, whole: bool) -> None:
    """``generate: false``: a response with no output, made here."""
    rid = f"resp_gw{secrets.token_hex(12)}"
    obj: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "model": model, "output": [], "usage": None, "error": None, "incomplete_details": None,
        "previous_response_id": None, "store": False,
    }
    await conn.send({"type": "response.created", "sequence_number": 0, "response": obj})
    ctx.ttfb_ms = (perf_counter() - ctx.t0) * 1000
    usage = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}
    await conn.send({"type": "response.completed", "sequence_number": 1,
                     "response": {**obj, "status": "completed", "usage": usage}})
    ctx.status = 200
    ctx.usage = Usage()
    conn.link(rid if whole else None, body, [], len(orjson.dumps(body.get("input"))))


class Relay:
    """Relays one upstream Responses answer to the WebSocket: each SSE
    event's data as one text frame; keeps the output items (for the chain)
    and reads usage and the response id as the HTTP relay does. A route
    whose upstream speaks another protocol is translated first (``bridge``:
    gateway.translate), as for HTTP."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.items: list[Any] = []
        self.item_bytes = 0
        self.final = False  # response.completed or .incomplete went by
        self.rid: str | None = None  # the id the client was given (translated or not)

    async def __call__(self, request: web.Request, ctx: RequestContext, endpoint: Endpoint, prepared: Prepared,
                       resp: UpstreamResponse, target: Target, bridge: Bridge | None) -> web.StreamResponse:
        ctx.t_head = perf_counter()
        ctx.status = status = resp.status
        up = target.upstream
        resp.set_idle_timeout(up.idle_timeout_s)
        encoding = resp.headers.get("Content-Encoding", "identity").lower()
        inflate = zlib.decompressobj(47) if encoding != "identity" else None
        ctype = resp.headers.get("Content-Type", "")
        ctx.overhead_ms = ((ctx.t_upstream or ctx.t_head) - ctx.t0) * 1000  # up to the upstream request
        if status >= 400 or not ctype.startswith("text/event-stream"):
            await self._whole(ctx, resp, up.name, inflate, bridge)
            return self.conn.ws
        reader: UsageReader = endpoint.reader(prepared, True) if bridge is None else TranslatedStream(
            bridge.module.Stream(bridge.req, bridge.public_model))
        events = SSEEvents(WS_EVENT_MAX)
        try:
            while chunk := await read_chunk(ctx, resp):
                if inflate is not None:
                    chunk = inflate.decompress(chunk)
                await self._events(ctx, events, reader.feed(chunk))
                if events.overflowed:
                    ctx.status, ctx.error_type = 502, "sse_event_too_large"
                    break
            if ctx.error_type is None:
                await self._events(ctx, events, reader.flush())
        finally:
            ctx.usage = reader.finish()
        if ctx.error_type is None and ctx.usage.error is not None:
            ctx.error_type = ctx.usage.error
        elif ctx.error_type is not None:
            resp.close()
            code = ctx.error_type
            await self.conn.send_error(ctx.status, "upstream_error", code,
                                       f"Upstream '{up.name}' broke off its answer ({code}).")
        return self.conn.ws

    async def _events(self, ctx: RequestContext, events: SSEEvents, data: bytes) -> None:
        """Sends the complete events in ``data`` (the client protocol's SSE).
        An event past WS_EVENT_MAX is not sent; the caller sees
        ``events.overflowed`` and ends the response with an error frame."""
        for ev in events.split(data)[2] if data else ():
            await self._event(ctx, event_data(ev))

    async def _event(self, ctx: RequestContext, data: bytes) -> None:
        if not data or data == b"[DONE]":
            return
        if b'"response.output_item.done"' in data:
            try:
                item = safejson.loads(data).get("item")
            except (orjson.JSONDecodeError, AttributeError):
                item = None
            if item is not None:
                self.items.append(item)
                self.item_bytes += len(data)
        elif any(m in data for m in _FINAL):
            self.final = True
        if ctx.ttfb_ms is None:
            ctx.ttfb_ms = (perf_counter() - ctx.t0) * 1000
            self.rid = response_id(data[:HEAD_BYTES], True)  # response.created comes first
        ctx.bytes_out += len(data)
        ctx.events_out += 1
        await self.conn.ws.send_str(data.decode("utf-8", "replace"))

    async def _whole(self, ctx: RequestContext, resp: UpstreamResponse, name: str, inflate: Any,
                     bridge: Bridge | None) -> None:
        """An answer that is not a stream: an error (relayed as an error
        frame with the upstream's status and error object), or a whole
        response (relayed as its final event)."""
        body = b""
        chunks = []
        while chunk := await read_chunk(ctx, resp):
            chunks.append(chunk)
        body = b"".join(chunks)
        if inflate is not None:
            body = inflate.decompress(body)
        status = ctx.status
        if bridge is not None and status >= 300:
            body = client_error(bridge.client, status, body, name)
        ctx.ttfb_ms = (perf_counter() - ctx.t0) * 1000
        ctx.bytes_out = len(body)
        try:
            obj = safejson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if status < 400 and isinstance(obj, dict) and bridge is not None:
            try:
                obj, ctx.usage = bridge.module.response(obj, bridge.req)
            except (ValueError, GatewayError):
                obj = None
        elif status < 400 and isinstance(obj, dict):
            reader = RESPONSES.reader(Prepared(b"", False), False)
            reader.feed(body)
            ctx.usage = reader.finish()
        if status < 400 and isinstance(obj, dict) and obj.get("object") == "response":
            self.items = list(obj.get("output") or [])
            self.final = obj.get("status") in ("completed", "incomplete")
            self.rid = obj.get("id") if isinstance(obj.get("id"), str) else None
            await self.conn.send({"type": f"response.{obj.get('status', 'completed')}", "sequence_number": 0,
                                  "response": obj})
            return
        err = obj.get("error") if isinstance(obj, dict) else None
        if not isinstance(err, dict):
            err = {"type": "upstream_error", "code": ctx.error_type, "param": None,
                   "message": shown(body.decode("utf-8", "replace")) or f"Upstream answered HTTP {status}."}
        if ctx.status < 400:  # a 2xx that is neither a stream nor a response
            ctx.status, ctx.error_type = 502, "upstream_bad_answer"
        await self.conn.send({"type": "error", "status": ctx.status, "error": err})


async def close_websockets(app: web.Application) -> None:
    """On shutdown: close idle connections now; busy ones close after
    their response."""
    conns: set[Connection] = app[WEBSOCKETS]
    for conn in list(conns):
        conn.closing = True
        if not conn.busy and conn.ws.prepared:  # one still upgrading closes when it sees ``closing``
            await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def setup(app: web.Application) -> None:
    app[WEBSOCKETS] = set()
    app.router.add_get(ENDPOINT, handle_websocket)
    app.on_shutdown.append(close_websockets)


__all__ = ["handle_websocket", "setup"]
