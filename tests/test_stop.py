"""A graceful stop under load resets no accepted connection (issue 11, item
14): `gateway serve` (real processes, with and without workers) gets SIGTERM
while clients keep opening connections; the listening socket stops taking
new connections first (they are refused, or wait and are refused), the ones
already accepted by the kernel are served, then the process exits."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import Upstream
from .test_production import CHAT, chat, make_key, prod_toml, serve  # noqa: F401 (serve: a fixture)


@dataclass
class Outcomes:
    ok: int = 0
    refused: int = 0  # never connected: nothing was accepted
    broken: list[str] = field(default_factory=list)  # connected, then no whole answer


def one_request(port: int, key: str, out: Outcomes, lock: threading.Lock) -> None:
    body = orjson.dumps(CHAT)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n")
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except (ConnectionRefusedError, TimeoutError):
        with lock:
            out.refused += 1
        return
    try:
        sock.sendall(head.encode() + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        with lock:
            out.broken.append(f"{type(e).__name__} after {len(data)} bytes")
        return
    finally:
        sock.close()
    head_end = data.find(b"\r\n\r\n")
    complete = data.startswith(b"HTTP/1.1 200") and head_end > 0
    if complete:
        length = int(next(line.split(b":")[1] for line in data[:head_end].split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        complete = len(data) - head_end - 4 == length
    with lock:
        if complete:
            out.ok += 1
        else:
            out.broken.append(f"incomplete answer: {data[:60]!r}")


def load(port: int, key: str, out: Outcomes, stop: threading.Event) -> None:
    """One client: a new connection per request, until ``stop``."""
    lock = threading.Lock()
    while not stop.is_set():
        one_request(port, key, out, lock)


@pytest.mark.parametrize("workers", [2, 1])
async def test_graceful_stop_under_load_resets_nothing(
    serve: Any, upstream: Upstream, tmp_path: Path, workers: int,  # noqa: F811
) -> None:
    key = make_key(tmp_path / "gateway.db")
    s = serve(prod_toml(upstream, f"workers = {workers}\n"))
    out = Outcomes()
    stop = threading.Event()
    clients = [threading.Thread(target=load, args=(s.port, key, out, stop), daemon=True) for _ in range(8)]
    async with aiohttp.ClientSession() as http:
        # Requests that keep the gateway draining for two seconds after
        # SIGTERM: the time in which new connections used to pile up.
        slow = [asyncio.create_task(chat(http, s.url, key, f"slow-{i}", headers={"x-mock-head-delay-ms": "2000"}))
                for i in range(4)]
        deadline = time.monotonic() + 10
        while sum("x-mock-head-delay-ms" in r.headers for r in upstream.state.requests) < 4:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        for t in clients:
            t.start()
        await asyncio.sleep(0.5)
        assert out.ok > 0 and not out.broken
        served_before = out.ok
        s.proc.send_signal(2 if workers == 1 else 15)  # SIGINT or SIGTERM: the same graceful stop
        code = await asyncio.to_thread(s.proc.wait, 30)
        await asyncio.sleep(0.3)
        stop.set()
        for t in clients:
            await asyncio.to_thread(t.join, 15)
        assert [await t for t in slow] == [200] * 4
    assert code == 0
    assert out.broken == [], f"{len(out.broken)} accepted connections got no whole answer: {out.broken[:5]}"
    assert out.refused > 0  # the load did run into the stop
    assert out.ok >= served_before
    rows = [r["request_id"] for r in s.rows()]
    assert {f"slow-{i}" for i in range(4)} <= set(rows)
    assert len(rows) == out.ok + 4  # one row per answered request, none for a refused connection
