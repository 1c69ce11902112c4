"""Production behaviour of `gateway serve` as a real subprocess: workers and
their supervisor, graceful shutdown with open streams, JSON request logs,
usage retention, several processes writing one database, the systemd unit."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.store.retention import delete_older_than
from gateway.store.rows import INSERT
from gateway.store.schema import connect

from .conftest import UPSTREAM_KEY, ConfigFiles, Upstream, config_toml, create_key, db_conn

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Served:
    """A `gateway serve` subprocess with JSON logs in ``log``."""

    proc: subprocess.Popen[bytes]
    log: Path
    db: Path
    port: int
    start: dict[str, Any]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_bytes().splitlines():
            try:
                out.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                out.append({"raw": raw.decode(errors="replace")})
        return out

    def wait_line(self, pred: Any, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if pred(line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no such log line; log:\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def rows(self) -> list[Any]:
        conn = db_conn(self.db)
        try:
            return list(conn.execute("SELECT * FROM usage_events WHERE request_id != 'keycheck'"))
        finally:
            conn.close()


def make_key(db: Path) -> str:
    """A key of workspace "prod" in the database of ``[database] path = db``
    (the running test's PostgreSQL database for it under --db=postgres)."""
    conn = db_conn(db)
    try:
        return create_key(conn, "prod", name="prod")
    finally:
        conn.close()


@pytest.fixture
def serve(tmp_path: Path, config_files: ConfigFiles) -> Iterator[Any]:
    started: list[Served] = []

    def start(toml: str) -> Served:
        cfg = config_files.write(toml)
        log = tmp_path / "gateway.log"
        env = {**os.environ, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}
        with log.open("wb") as f:
            p = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
                                 stdout=f, stderr=f, env=env, cwd=tmp_path)
        s = Served(p, log, tmp_path / "gateway.db", 0, {})
        s.start = s.wait_line(lambda x: x.get("event") == "start")
        s.port = s.start["port"]
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def prod_toml(upstream: Upstream, server: str, extra: str = "") -> str:
    toml = config_toml(upstream.base_url, extra)
    return toml.replace("[server]\n", f"[server]\nlog_format = \"json\"\n{server}\n", 1)


async def chat(http: aiohttp.ClientSession, url: str, key: str, rid: str, **kw: Any) -> int:
    headers = {"Authorization": f"Bearer {key}", "x-request-id": rid, **kw.pop("headers", {})}
    async with http.post(url + "/v1/chat/completions", json={**CHAT, **kw}, headers=headers) as r:
        await r.read()
        return r.status


async def test_sigkill_a_worker_under_load(serve: Any, upstream: Upstream, tmp_path: Path) -> None:
    """Two workers; one is SIGKILLed under load. The supervisor starts a new
    worker with the same index, the port keeps answering, and every request
    whose response a client received is recorded exactly once, including
    those whose rows the dead worker had not yet written to the database
    (the supervisor recovers them from its usage spool). A request the dead
    worker was in the middle of has a 499 worker_lost row if it had got past
    its first event-loop turn (see docs/production.md, and test_in_flight.py
    for that case made certain); no row is ever duplicated or invented."""
    key = make_key(tmp_path / "gateway.db")
    # Rows reach the database only every 2 s: the kill always lands with
    # answered requests still in the dead worker's queue.
    s = serve(prod_toml(upstream, "workers = 2\n").replace("flush_interval_ms = 20", "flush_interval_ms = 2000"))
    pids = s.start["worker_pids"]
    assert len(pids) == 2 and s.start["workers"] == 2
    ok: dict[str, float] = {}  # request id -> time answered
    failed: list[str] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        # A new connection per request, as after a worker's connections die.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            i = 0
            while not stop.is_set():
                rid = f"c{n}-{i}"
                i += 1
                try:
                    if await chat(http, s.url, key, rid) == 200:
                        ok[rid] = time.monotonic()
                    else:
                        failed.append(rid)
                except aiohttp.ClientError:
                    failed.append(rid)

    clients = [asyncio.create_task(client(n)) for n in range(8)]
    await asyncio.sleep(1.0)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    replaced = await asyncio.to_thread(s.wait_line, lambda x: x.get("event") == "worker_replaced")
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*clients)
    new_pid = replaced["worker_pid"]
    assert new_pid not in pids
    os.kill(new_pid, 0)  # alive
    assert await asyncio.to_thread(s.stop) == 0

    rows = s.rows()
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a request recorded twice"
    assert set(ids) <= set(ok) | set(failed), "a row for a request nobody sent"
    assert len(ok) > 50
    assert set(ok) <= set(ids), f"{len(set(ok) - set(ids))} answered requests have no row"
    assert all(r["status"] == 200 for r in rows if r["request_id"] in ok)
    recovered = s.wait_line(lambda x: x.get("event") == "usage_recovered")
    assert recovered["rows"] > 0  # the dead worker's queue was not empty: the spool mattered
    assert time.monotonic() > killed_at


async def test_killed_single_process_rows_recovered_on_next_start(
    serve: Any, upstream: Upstream, tmp_path: Path
) -> None:
    """One process, SIGKILLed with every row still in its in-memory queue:
    the next start writes them from the spool, once."""
    key = make_key(tmp_path / "gateway.db")
    toml = prod_toml(upstream, "").replace("flush_interval_ms = 20", "flush_interval_ms = 60000")
    s = serve(toml)
    async with aiohttp.ClientSession() as http:
        for i in range(30):
            assert await chat(http, s.url, key, f"k{i}") == 200
    s.proc.kill()
    s.proc.wait()
    assert s.rows() == []
    s2 = serve(toml)
    rows = s2.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(f"k{i}" for i in range(30))
    assert s2.stop() == 0
    assert len(s2.rows()) == 30
    assert list((tmp_path / "gateway.db.spool").iterdir()) == []


async def test_sigterm_with_100_open_streams(serve: Any, upstream: Upstream, tmp_path: Path) -> None:
    """SIGTERM while 100 streams are open: every stream gets all its chunks
    and [DONE], every one is recorded with status 200, and the exit is 0."""
    key = make_key(tmp_path / "gateway.db")
    s = serve(prod_toml(upstream, "workers = 2\n"))
    headers = {"Authorization": f"Bearer {key}", "x-mock-chunks": "20", "x-mock-delay-ms": "100"}
    started = 0
    all_open = asyncio.Event()

    async def one(http: aiohttp.ClientSession, i: int) -> bytes:
        nonlocal started
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        h = {**headers, "x-request-id": f"s{i}"}
        async with http.post(s.url + "/v1/chat/completions", json=body, headers=h) as r:
            assert r.status == 200
            data = await r.content.readany()
            started += 1
            if started == 100:
                all_open.set()
            return data + await r.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        streams = [asyncio.create_task(one(http, i)) for i in range(100)]
        await asyncio.wait_for(all_open.wait(), 10)
        s.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        bodies = await asyncio.gather(*streams)
        # The streams ran to their natural end (~2 s), not cut at SIGTERM.
        assert time.monotonic() - t0 > 1.0
    assert await asyncio.to_thread(s.proc.wait, 20) == 0
    for b in bodies:
        assert b.rstrip().endswith(b"data: [DONE]")
        assert b.count(b"data: ") == 20 + 4  # 20 content chunks, role, finish, usage, [DONE]
    rows = s.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(f"s{i}" for i in range(100))
    assert all(r["status"] == 200 and r["stream"] == 1 and r["output_tokens"] for r in rows)


async def test_request_log_has_no_body_or_secret(serve: Any, upstream: Upstream, tmp_path: Path) -> None:
    key = make_key(tmp_path / "gateway.db")
    s = serve(prod_toml(upstream, "log_requests = true\n"))
    secret_body = "my-private-prompt-4242"
    async with aiohttp.ClientSession() as http:
        status = await chat(http, s.url, key, "logged-1",
                            messages=[{"role": "user", "content": f"{secret_body} sk-live-abcdef0123456789"}])
        assert status == 200
        bad = "sk-gw-not-a-real-key-but-secret-looking-0123456789"
        async with http.post(s.url + "/v1/chat/completions?api_key=" + bad, json=CHAT,
                             headers={"Authorization": f"Bearer {bad}", "x-request-id": "logged-2"}) as r:
            assert r.status == 401
    line = await asyncio.to_thread(s.wait_line, lambda x: x.get("request_id") == "logged-2")
    first = s.wait_line(lambda x: x.get("request_id") == "logged-1")
    assert s.stop() == 0
    assert first["event"] == "request" and first["status"] == 200 and first["model"] == "gpt-test"
    assert first["path"] == "/v1/chat/completions" and first["input_tokens"] > 0 and first["latency_ms"] > 0
    assert line["status"] == 401
    text = s.log.read_text()
    for secret in (secret_body, "sk-live-abcdef", key, bad, UPSTREAM_KEY):
        assert secret not in text
    start = s.start
    assert start["upstreams"] == ["mock"] and "gpt-test" in start["models"] and start["workers"] == 1


async def test_sighup_reloads_every_worker(serve: Any, upstream: Upstream, tmp_path: Path) -> None:
    key = make_key(tmp_path / "gateway.db")
    s = serve(prod_toml(upstream, "workers = 2\n"))
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(cfg.read_text().replace('name = "renamed"', 'name = "renamed-again"'))
    s.proc.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        deadline = time.monotonic() + 10
        seen: set[str] = set()
        while time.monotonic() < deadline:
            async with http.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                models = {m["id"] for m in (await r.json())["data"]}
            if "renamed-again" in models:
                seen.add("new")
            if len([x for x in s.lines() if "config reloaded" in str(x.get("msg"))]) == 2:
                break
            await asyncio.sleep(0.05)
        # Both workers reloaded; a run of fresh connections sees only the new model.
        for _ in range(20):
            async with http.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                models = {m["id"] for m in (await r.json())["data"]}
            assert "renamed-again" in models and "renamed" not in models
        await asyncio.sleep(0.5)  # usage rows (which feed the counters) are flushed every 20 ms
        async with http.get(s.url + "/metrics") as r:
            metrics = await r.text()
    assert {x.get("worker") for x in s.lines() if "config reloaded" in str(x.get("msg"))} == {0, 1}
    # /metrics on one worker counts the requests of both.
    total = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("gateway_requests_total{") and 'endpoint="/v1/models"' in line)
    assert total >= 21
    # One audit row for the reload (the supervisor's, not one per worker), on
    # either store.
    conn = db_conn(tmp_path / "gateway.db")
    try:
        audited = conn.execute("SELECT actor, after FROM audit_log WHERE action = 'config.reload'").fetchall()
    finally:
        conn.close()
    assert [a for a, _ in audited] == ["SIGHUP"] and "renamed-again" in audited[0][1]
    assert s.stop() == 0


async def test_rolling_restart_loses_nothing(serve: Any, upstream: Upstream, tmp_path: Path) -> None:
    """SIGUSR2: each worker replaced, new before old, while clients keep
    sending (new connection per request): no request fails, every one is
    recorded."""
    key = make_key(tmp_path / "gateway.db")
    s = serve(prod_toml(upstream, "workers = 2\n"))
    old = set(s.start["worker_pids"])
    ok: list[str] = []
    failed: list[str] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            i = 0
            while not stop.is_set():
                rid = f"r{n}-{i}"
                i += 1
                try:
                    (ok if await chat(http, s.url, key, rid) == 200 else failed).append(rid)
                except aiohttp.ClientError:
                    failed.append(rid)
                await asyncio.sleep(0.005)

    clients = [asyncio.create_task(client(n)) for n in range(4)]
    await asyncio.sleep(0.5)
    s.proc.send_signal(signal.SIGUSR2)
    await asyncio.to_thread(s.wait_line, lambda x: x.get("event") == "rolling_restart_done", 30)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)
    assert s.stop() == 0
    exits = {x["worker_pid"] for x in s.lines() if x.get("event") == "worker_exit"}
    assert old <= exits
    assert failed == []
    ids = [r["request_id"] for r in s.rows()]
    assert sorted(ids) == sorted(ok)


@pytest.mark.sqlite_only("SQLite's retention deletes rows in batches (PostgreSQL drops partitions: test_store)")
def test_retention_deletes_old_rows_in_batches(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    conn = connect(db)
    now = time.time()
    row = [0.0, "r", None, None, "/v1/chat/completions", "m", "u", 200, 0] + [0] * 6 + [0.0, 1.0] + [None] * 3 \
        + [0, 0, None, 0, 0, None]
    rows = [tuple([now - 100 * 86400 + i, f"old{i}", *row[2:]]) for i in range(1200)]
    rows += [tuple([now - 3600, f"new{i}", *row[2:]]) for i in range(10)]
    conn.execute("BEGIN")
    conn.executemany(INSERT, rows)
    conn.execute("COMMIT")
    # A second connection inserts between batches: retention never holds the lock long.
    other = connect(db)
    batches = []

    def stop() -> bool:
        batches.append(1)
        other.execute(INSERT, (now, f"during{len(batches)}", *row[2:]))
        return False

    n = delete_older_than(conn, now - 90 * 86400, batch=500, pause_s=0, stop=stop)
    assert n == 1200 and len(batches) == 3
    left = {r[0] for r in conn.execute("SELECT request_id FROM usage_events")}
    assert left == {f"new{i}" for i in range(10)} | {"during1", "during2", "during3"}
    conn.close()
    other.close()


def _write_usage(db: str, worker: int, per_s: int, seconds: float) -> None:
    """One usage writer per process, as a worker runs it (see below)."""
    import asyncio as aio

    from gateway.config import UsageConfig
    from gateway.store.usage import UsageWriter

    async def main() -> None:
        w = UsageWriter(Path(db), UsageConfig(flush_interval_ms=50, batch_max=2000, queue_max=100000))
        task = aio.create_task(w.run())
        t0 = time.monotonic()
        i = 0
        base = [0.0, "", None, None, "/v1/chat/completions", "m", "u", 200, 0] + [1] * 6 + [0.0, 1.0] \
            + [None] * 3 + [0, 0, None, 0, 0, None]
        while (elapsed := time.monotonic() - t0) < seconds:
            due = int(elapsed * per_s)
            while i < due:
                w.record((time.time(), f"w{worker}-{i}", *base[2:]))
                i += 1
            await aio.sleep(0.01)
        await w.close()
        await aio.gather(task)
        print(i, flush=True)

    asyncio.run(main())


@pytest.mark.sqlite_only("four processes' writers on one SQLite file (PostgreSQL: the multinode group)")
def test_four_processes_write_one_database(tmp_path: Path) -> None:
    """4 processes, each with its own UsageWriter (one sqlite3 connection,
    batched transactions, WAL, busy_timeout), 5,000 events/s in total for
    3 s: no `database is locked`, every event written. The bench runs the
    same for a minute (bench/report.py --sqlite)."""
    db = tmp_path / "gateway.db"
    connect(db).close()
    code = "import sys; from tests.test_production import _write_usage as w; " \
           "w(sys.argv[1], int(sys.argv[2]), 1250, 3.0)"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db), str(i)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    sent = 0
    for p in procs:
        out, err = p.communicate(30)
        assert p.returncode == 0, err.decode()
        assert b"locked" not in err and b"failed" not in err, err.decode()
        sent += int(out.split()[-1])
    conn = sqlite3.connect(db)
    assert sent >= 4 * 1250 * 2.5
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM usage_events").fetchone() == (sent, sent)
    conn.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)")
@pytest.mark.parametrize(("name", "config", "instance"), [
    ("gateway.service", "/etc/gateway/config.toml", "gateway.service"),
    # The template of docs/scaling.md: one instance per config file.
    ("gateway@.service", "/etc/gateway/%i.toml", "gateway@a.service"),
])
def test_systemd_unit_verifies(tmp_path: Path, name: str, config: str, instance: str) -> None:
    unit = ROOT / "systemd" / name
    text = unit.read_text()
    for needed in ("ExecStart=", f"gateway serve --config {config}", "User=", "EnvironmentFile=",
                   "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=",
                   "PrivateTmp=yes", "ProtectHome=yes", "LimitNOFILE=", "KillSignal=SIGTERM", "TimeoutStopSec="):
        assert needed in text, needed
    # verify needs the ExecStart binary to exist: point it at a stand-in.
    exe = tmp_path / "gateway"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    copy = tmp_path / instance
    copy.write_text(text.replace("/opt/gateway/venv/bin/gateway", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if (instance in line and str(copy) in line) or "Unknown" in line]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


async def test_workers_die_with_a_killed_supervisor(serve: Any, upstream: Upstream, tmp_path: Path) -> None:
    """SIGKILL to the supervisor (no chance to stop its workers): the workers
    get SIGTERM from the kernel, stop, and free the port."""
    s = serve(prod_toml(upstream, "workers = 2\n"))
    pids = s.start["worker_pids"]
    s.proc.kill()
    s.proc.wait()
    deadline = time.monotonic() + 10
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        await asyncio.sleep(0.05)
    assert alive == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_production_keys_are_validated_and_documented() -> None:
    from dataclasses import fields

    from gateway.config import ConfigError, ServerConfig, UsageConfig, parse_config

    cfg = parse_config({"server": {"workers": 4, "log_format": "json"}, "usage": {"spool": False}}, env={})
    assert (cfg.server.workers, cfg.server.log_format, cfg.usage.spool) == (4, "json", False)
    with pytest.raises(ConfigError, match=r"server\.log_format: must be"):
        parse_config({"server": {"log_format": "xml"}}, env={})
    with pytest.raises(ConfigError, match=r"server\.workers: must be >= 1"):
        parse_config({"server": {"workers": 0}}, env={})
    example = (ROOT / "config.example.toml").read_text()
    doc = (ROOT / "docs" / "production.md").read_text()
    for k in [f.name for f in fields(ServerConfig)] + [f.name for f in fields(UsageConfig)]:
        assert k in example and k in doc, k


async def test_revoked_key_refused_by_every_worker(
    serve: Any, upstream: Upstream, tmp_path: Path
) -> None:
    """`gateway keys revoke` from the CLI: within key_refresh_ms (100 ms
    here) every worker refuses the key."""
    key = make_key(tmp_path / "gateway.db")
    s = serve(prod_toml(upstream, "workers = 2\nlog_requests = true\n"))
    conn = db_conn(s.db)
    key_id = conn.execute("SELECT id FROM api_keys").fetchone()[0]
    conn.close()
    pinned = await pinned_sessions(s, key)  # one connection on each worker
    try:
        before = [await chat(sess, s.url, key, f"before{w}") for w, sess in sorted(pinned.items())]
        r0 = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway", "keys", "revoke", str(key_id), "--config",
                             str(tmp_path / "gateway.toml")], capture_output=True, env={**os.environ,
                             "MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
        assert r0.returncode == 0, r0.stderr
        await asyncio.sleep(0.5)
        statuses = [await chat(sess, s.url, key, f"after{w}") for w, sess in sorted(pinned.items())]
    finally:
        for sess in pinned.values():
            await sess.close()
    assert before == [200, 200]
    assert statuses == [401, 401]
    assert s.stop() == 0


async def test_spend_quota_is_shared_by_workers(serve: Any, upstream: Upstream, tmp_path: Path) -> None:
    """A key's monthly spend limit holds across two workers: each worker
    adds the other's recorded spend (every key_refresh_ms, 100 ms here), so
    the key stops near its limit instead of at up to twice it."""
    s = serve(prod_toml(upstream, "workers = 2\nlog_requests = true\n"))
    probe = await asyncio.to_thread(_create_key, s, {})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        await _wait_live(http, s.url, probe)
        assert await chat(http, s.url, probe, "probe") == 200
        await asyncio.sleep(0.3)
        cost = next(r["cost"] for r in s.rows() if r["request_id"] == "probe")
        assert cost > 0
        key = await asyncio.to_thread(_create_key, s, {"spend_limit": cost * 10.5})
        await _wait_live(http, s.url, key)
    pinned = await pinned_sessions(s, key)
    statuses = []
    try:
        for i in range(30):  # alternate between the workers
            statuses.append(await chat(pinned[i % 2], s.url, key, f"q{i}"))
            await asyncio.sleep(0.06)  # > flush (20 ms) + the other worker's sync (100 ms) over two requests
    finally:
        for sess in pinned.values():
            await sess.close()
    ok = statuses.count(200)
    # Per-worker counting alone would admit about 2 x 11; shared, 11 plus at
    # most a request or two in flight on the other worker.
    assert 11 <= ok <= 13, statuses
    assert statuses[-5:] == [429] * 5
    assert s.stop() == 0


def _create_key(s: Served, limits: dict[str, Any]) -> str:
    conn = db_conn(s.db)
    try:
        return create_key(conn, "quota", **limits)
    finally:
        conn.close()


async def pinned_sessions(s: Served, key: str) -> dict[int, aiohttp.ClientSession]:
    """One keep-alive connection on each of the two workers, told apart by
    the worker field of their request log lines (log_requests = true)."""
    found: dict[int, aiohttp.ClientSession] = {}
    for i in range(60):
        sess = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        rid = f"pin{i}"
        async with sess.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}",
                                                           "x-request-id": rid}) as r:
            await r.read()
        line = await asyncio.to_thread(s.wait_line, lambda x, rid=rid: x.get("request_id") == rid)
        if line["worker"] in found:
            await sess.close()
        else:
            found[line["worker"]] = sess
        if len(found) == 2:
            return found
    for sess in found.values():
        await sess.close()
    raise AssertionError("could not reach both workers")


async def _wait_live(http: aiohttp.ClientSession, url: str, key: str) -> None:
    """Until both workers know the key (a run of fresh connections all pass)."""
    deadline = time.monotonic() + 5
    good = 0
    while good < 10 and time.monotonic() < deadline:
        async with http.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}",
                                                         "x-request-id": "keycheck"}) as r:
            good = good + 1 if r.status == 200 else 0
    assert good >= 10


async def test_admin_reload_reaches_every_worker_and_replacements(
    serve: Any, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload through the admin API, answered by one worker, reaches every
    worker and the supervisor (a worker started after it, replacing a dead
    one, serves the new config too); a forced reload likewise; the audit log
    has one row per reload, not one per worker."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "admin-token-0123456789abcdef")
    admin = {"Authorization": "Bearer admin-token-0123456789abcdef"}
    key = make_key(tmp_path / "gateway.db")
    s = serve(prod_toml(upstream, "workers = 2\n"))
    cfg = tmp_path / "gateway.toml"

    async def models(http: aiohttp.ClientSession) -> list[set[str]]:
        seen = []
        for _ in range(20):  # fresh connections: both workers answer some
            async with http.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                seen.append({m["id"] for m in (await r.json())["data"]} if r.status == 200 else set())
        return seen

    async def settled(http: aiohttp.ClientSession, pred: Any) -> None:
        deadline = time.monotonic() + 10
        while not all(pred(m) for m in await models(http)):
            assert time.monotonic() < deadline, "not every worker reloaded"
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        cfg.write_text(cfg.read_text().replace('name = "renamed"', 'name = "renamed-again"'))
        async with http.post(s.url + "/admin/api/reload", headers=admin) as r:
            assert r.status == 200, await r.text()
        await settled(http, lambda m: "renamed-again" in m and "renamed" not in m)
        os.kill(s.start["worker_pids"][0], signal.SIGKILL)
        s.wait_line(lambda x: x.get("event") == "worker_replaced")
        assert all("renamed-again" in m for m in await models(http))
        # Forced: a config with no model at all, on every worker.
        text = cfg.read_text()
        start = text.index("[[models]]")
        end = text.index("[[groups]]")
        cfg.write_text(text[:start] + text[end:])
        async with http.post(s.url + "/admin/api/reload", headers=admin) as r:
            assert r.status == 400  # refused without force
        async with http.post(s.url + "/admin/api/reload?force=true", headers=admin) as r:
            assert r.status == 200, await r.text()
        await settled(http, lambda m: m == set())
    conn = db_conn(tmp_path / "gateway.db")
    try:
        reloads = conn.execute("SELECT COUNT(*) FROM audit_log WHERE action = 'config.reload'").fetchone()[0]
    finally:
        conn.close()
    assert reloads == 2
    assert s.stop() == 0
