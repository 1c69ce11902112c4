"""Running the gateway: start an app on a socket, stop it gracefully.

SIGHUP reloads the config file (see gateway.reload).

Shutdown order on SIGTERM/SIGINT: stop accepting, wait ACCEPT_GRACE_S for
connections accepted just before to send their request, let in-flight
requests (including requests that arrive meanwhile on open connections)
and streams finish (up to ``server.graceful_timeout_s``), then the app's
cleanup contexts run: client session closed, usage queue flushed, database
closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .app import create_app
from .config import Config, ConfigError, with_mock_url
from .connections import ConnectionLimits, GatewayRunner
from .context import GATEWAY
from .listener import close_door
from .logs import startup_fields
from .mock.app import create_mock_app
from .reload import SIGHUP, SIGUSR1, reload_config

log = logging.getLogger("gateway")

ACCEPT_GRACE_S = 0.25


class ListenError(OSError):
    """The gateway cannot listen on its address (taken, not permitted, ...)."""

    def __init__(self, cause: OSError, host: str, port: int) -> None:
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        super().__init__(cause.errno, f"cannot listen on {host}:{port}: {reason}")


@dataclass
class Running:
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_app(app: web.Application, host: str, port: int, *, shutdown_timeout: float = 30.0,
                    reuse_port: bool = False, sock: socket.socket | None = None,
                    limits: ConnectionLimits | None = None) -> Running:
    """Serve ``app`` on ``host:port``, or on the listening socket ``sock``
    (a worker under the supervisor: one socket shared by every worker), with
    the header-read and idle timeouts of ``limits`` (gateway.connections)."""
    runner = GatewayRunner(app, limits=limits or ConnectionLimits(), handler_cancellation=True,
                           shutdown_timeout=shutdown_timeout, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock, backlog=4096)
    else:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=4096)
    try:
        await site.start()
    except BaseException as e:
        # Undo the setup (database, writer threads): a process that cannot
        # listen must exit, not hang on threads nobody will stop.
        await runner.cleanup()
        if isinstance(e, OSError):
            raise ListenError(e, host, port) from None
        raise
    server = site._server
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return Running(runner, bound)


async def start_mock(host: str = "127.0.0.1", port: int = 0, api_key: str | None = None) -> Running:
    return await start_app(create_mock_app(api_key, record=False), host, port, shutdown_timeout=1.0)


async def start_gateway(
    cfg: Config, *, port: int | None = None, clock: Callable[[], float] | None = None,
    poller: bool | None = None, retention: bool = False, sock: socket.socket | None = None,
) -> Running:
    kw: dict[str, Any] = {"poller": poller, "retention": retention}
    if clock is not None:
        kw["clock"] = clock
    app = create_app(cfg, **kw)
    metrics = app[GATEWAY].metrics
    limits = ConnectionLimits(
        header_timeout_s=cfg.server.header_timeout_s, keepalive_timeout_s=cfg.server.keepalive_timeout_s,
        on_timeout=lambda phase: metrics.client_timeouts.labels(phase).inc(),
        on_bad_request=lambda reason: metrics.bad_http.labels(reason).inc(),
    )
    return await start_app(
        app, cfg.server.host, cfg.server.port if port is None else port,
        shutdown_timeout=cfg.server.graceful_timeout_s, reuse_port=cfg.server.workers > 1, sock=sock,
        limits=limits,
    )


def stop_event() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_mock(host: str, port: int, on_ready: Callable[[Running], None]) -> None:
    """The bundled mock upstream on its own (``gateway mock``) until SIGTERM
    or SIGINT; it accepts any credential and records nothing."""
    stop = stop_event()
    mock = await start_app(create_mock_app(None, record=False), host, port, shutdown_timeout=1.0)
    on_ready(mock)
    try:
        await stop.wait()
    finally:
        await mock.runner.cleanup()


async def run_until_signal(
    cfg: Config, *, bundled_mock: bool = False, on_ready: Callable[[Config, Running], None] | None = None,
    worker: int | None = None, sock: socket.socket | None = None, ready_fd: int | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT.

    ``bundled_mock``: start the bundled mock upstream in this process first
    and point the config's ``mock`` upstream at it (the embedded default;
    under a supervisor each worker runs its own). ``worker`` is this
    process's index under a supervisor (None: the only process). Only the
    single process or worker 0 runs the video task poller and the usage
    retention job. ``sock`` is the supervisor's listening socket, shared by
    the workers. ``ready_fd`` gets one byte, then is closed, once the socket
    listens (the supervisor waits for it)."""
    loop = asyncio.get_running_loop()
    stop = stop_event()
    mock = None
    if bundled_mock:
        mock = await start_mock()
        cfg = with_mock_url(cfg, mock.url + "/v1")
    first = worker in (None, 0)
    try:
        gw = await start_gateway(
            cfg, poller=cfg.tasks.poller and first, retention=first, sock=sock,
        )
    except BaseException:
        if mock is not None:
            await mock.runner.cleanup()
        raise
    if worker is None:
        log.info(
            "gateway listening on %s:%d; upstreams: %s; models: %s; workers: %d",
            cfg.server.host, gw.port, ", ".join(u.name for u in cfg.upstreams),
            ", ".join(m.name for m in cfg.models), cfg.server.workers,
            extra={"fields": startup_fields(cfg, gw.port, 1)},
        )
    else:
        log.info("worker %d (pid %d) listening on port %d", worker, os.getpid(), gw.port,
                 extra={"fields": {"event": "worker_ready", "port": gw.port}})
    if ready_fd is not None:
        os.write(ready_fd, b"r")
        os.close(ready_fd)
    if on_ready is not None:
        on_ready(cfg, gw)
    reloads: set[asyncio.Task[None]] = set()
    if worker is not None:
        gw.runner.app[GATEWAY].supervisor_pid = os.getppid()

    def on_reload_signal(force: bool) -> None:
        # A worker's reload was asked of its supervisor, which audited it.
        coro = _reload(gw.runner.app, force=force, audited=worker is None)
        task = asyncio.create_task(coro, name="config-reload")
        reloads.add(task)  # keep a reference until it is done
        task.add_done_callback(reloads.discard)

    if cfg.source is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload_signal, False)
        loop.add_signal_handler(signal.SIGUSR1, on_reload_signal, True)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests, flushing usage",
             extra={"fields": {"event": "stopping", "in_flight": gw.runner.app[GATEWAY].in_flight}})
    if sock is None:
        # The listening socket is this process's alone: stop new connections
        # first and serve the ones the kernel has queued, or closing the
        # socket would reset them (gateway.listener). A worker leaves that to
        # its supervisor, which owns the shared socket.
        socks = [s for site in gw.runner.sites for s in getattr(site._server, "sockets", None) or ()]
        await asyncio.to_thread(close_door, socks)
    # Stop accepting, then give connections accepted in the last instant
    # time to send their request: aiohttp's shutdown closes every
    # connection that is not yet handling one.
    for site in list(gw.runner.sites):
        await site.stop()
    await asyncio.sleep(ACCEPT_GRACE_S)
    await gw.runner.cleanup()
    if mock is not None:
        await mock.runner.cleanup()
    log.info("stopped", extra={"fields": {"event": "stopped"}})


async def _reload(app: web.Application, *, force: bool, audited: bool) -> None:
    try:
        await reload_config(app, actor=SIGUSR1 if force else SIGHUP, force=force, audited=audited)
    except ConfigError as e:
        log.error("config reload refused, keeping the running config: %s", e)


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine on uvloop."""
    import uvloop

    uvloop.run(coro)
