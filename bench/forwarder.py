"""The bare aiohttp forwarder: the Python ceiling the gateway is compared to.

No auth, no routing, no accounting: read the body, send it upstream with the
same aiohttp client settings, relay the answer (chunk by chunk for SSE).

    python bench/forwarder.py --port 9200 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with session.post(request.app[UPSTREAM] + request.path, data=body, headers=headers) as resp:
        if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": resp.headers["Content-Type"]})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out
        data = await resp.read()
        return web.Response(status=resp.status, body=data, content_type=resp.content_type)


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
    )
    yield
    await app[SESSION].close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=9200)
    p.add_argument("--upstream", default="http://127.0.0.1:9100")
    a = p.parse_args()
    app = web.Application()
    app[UPSTREAM] = a.upstream
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{tail:.*}", forward)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=a.port, access_log=None, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
