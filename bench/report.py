"""The full bench report: one markdown table in bench/results/.

    python bench/report.py [--duration 5] [--long-seconds 60] [--long-streams 1000]
                           [--sqlite-seconds 60] [--out bench/results/report.md]

For each of workers = 1 and workers = 2 (`gateway serve --workers N`, every
feature on: auth, a key with limits, routing, usage rows, metrics) and for
the mock alone ("direct"), wrk drives three scenarios at concurrency 1, 32
and 256: a non-streaming chat completion, an OpenAI SSE stream (20 events)
and an Anthropic SSE stream (200 events). Each cell gives requests/s, p50 and
p99 latency (whole response), errors, and the gateway's CPU seconds per
1,000 requests (utime + stime of the supervisor and every worker, from
/proc/<pid>/stat). After each gateway run it is stopped with SIGTERM and its
usage rows are counted against the requests wrk sent.

Then:
- long streams: N concurrent streams (default 1,000) held open for the
  whole stream (one event a second for ``--long-seconds``) through one
  gateway worker; every event must arrive, no stream may stall (no gap over
  3 s), and gateway memory per open stream (RSS at the peak minus idle) is
  reported. RLIMIT_NOFILE is raised to its hard limit first;
- SQLite under load: 4 processes, each with the gateway's usage writer,
  writing 5,000 events/s in total for ``--sqlite-seconds``: no
  `database is locked`, no lost row.

First (unless ``--no-core``) it runs bench/run.py and appends its
side-by-side table (direct / bare forwarder / gateway: the core targets).

Reuses bench/run.py's helpers (mock, wrk driver, process handling); run.py's
own side-by-side table is unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ANTH, CHAT, CONFIG, PY, WRK_UNSENT, Load, code_version, proc, rss_kib, wrk

MOCK_PORT, MOCK_STREAM_PORT, MOCK_ANTH_PORT, MOCK_SLOW_PORT = 19500, 19501, 19502, 19503
GW_PORT = 19600
STREAM_EVENTS = 20
ANTH_EVENTS = 200
CONCURRENCY = (1, 32, 256)
STREAM = '{"model":"bench-stream","stream":true,"messages":[{"role":"user","content":"Stream to the bench."}]}'
SLOW = ('{"model":"bench-slow","stream":true,"stream_options":{"include_usage":true},'
        '"messages":[{"role":"user","content":"Hold the line."}]}')
SCENARIOS = (
    ("chat, non-streaming", "/v1/chat/completions", CHAT, MOCK_PORT),
    (f"OpenAI SSE, {STREAM_EVENTS} events", "/v1/chat/completions", STREAM, MOCK_STREAM_PORT),
    (f"Anthropic SSE, {ANTH_EVENTS} events", "/v1/messages", ANTH, MOCK_ANTH_PORT),
)
SLOW_CONFIG = """
[[upstreams]]
name = "fast-slow"
kind = "openai"
base_url = "http://127.0.0.1:{mock_slow}/v1"
[[models]]
name = "bench-slow"
routes = [{{ upstream = "fast-slow", model = "bench-slow" }}]
price = {{ input = 1.0, output = 2.0 }}
"""
TICK = os.sysconf("SC_CLK_TCK")
def sent(load: Load) -> int:
    return load.sent - WRK_UNSENT


def gateway_pids(pid: int) -> list[int]:
    """The gateway process and its workers."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return pids + [int(c) for c in children]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


@dataclass
class Cell:
    load: Load
    cpu_per_1k: float | None = None


@dataclass
class GatewayRun:
    workers: int
    cells: dict[tuple[str, int], Cell] = field(default_factory=dict)
    sent: int = 0
    rows: int = 0
    bad_rows: int = 0
    exit_code: int | None = None


def setup_gateway(tmp: Path, extra: str = "") -> tuple[Path, str]:
    cfg = tmp / "bench.toml"
    cfg.write_text(CONFIG.format(gw=GW_PORT, mock=MOCK_PORT, mock_stream=MOCK_STREAM_PORT, mock_anth=MOCK_ANTH_PORT)
                   + SLOW_CONFIG.format(mock_slow=MOCK_SLOW_PORT) + extra)
    gw_cli = [PY, "-m", "gateway"]
    subprocess.run([*gw_cli, "workspaces", "create", "bench", "--config", str(cfg)], check=True, capture_output=True)
    # Every limit on, set high enough never to refuse: the bench pays for the checks.
    key = subprocess.run(
        [*gw_cli, "keys", "create", "--workspace", "bench", "--config", str(cfg), "--rpm", "100000000",
         "--tpm", "1000000000000", "--concurrency", "100000", "--spend-limit", "1000000000"],
        check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]
    return cfg, key


def wait_workers(pid: int, n: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = gateway_pids(pid)
        if n == 1 or len(pids) == n + 1:
            time.sleep(0.5)
            return gateway_pids(pid)
        time.sleep(0.1)
    raise RuntimeError(f"gateway did not start {n} workers")


def count_rows(db: Path) -> tuple[int, int]:
    conn = sqlite3.connect(db)
    total = conn.execute("SELECT COUNT(*) FROM usage_events").fetchone()[0]
    bad = conn.execute("SELECT COUNT(*) FROM usage_events WHERE status NOT IN (200, 499)").fetchone()[0]
    conn.close()
    return total, bad


def bench_gateway(workers: int, duration: float) -> GatewayRun:
    tmp = Path(tempfile.mkdtemp(prefix=f"gateway-report-w{workers}-"))
    cfg, key = setup_gateway(tmp)
    run = GatewayRun(workers)
    with proc([PY, "-m", "gateway", "serve", "--config", str(cfg), "--workers", str(workers)], GW_PORT) as gw:
        pids = wait_workers(gw.pid, workers)
        for _, path, body, _ in SCENARIOS:  # warm up
            run.sent += sent(wrk(f"http://127.0.0.1:{GW_PORT}{path}", body, 8, 1.0, key))
        for name, path, body, _ in SCENARIOS:
            for c in CONCURRENCY:
                cpu0 = cpu_seconds(pids)
                load = wrk(f"http://127.0.0.1:{GW_PORT}{path}", body, c, duration, key)
                cpu = cpu_seconds(pids) - cpu0
                run.sent += sent(load)
                run.cells[(name, c)] = Cell(load, cpu / max(sent(load), 1) * 1000)
        gw.send_signal(signal.SIGTERM)
        gw.wait(60)
        run.exit_code = gw.returncode
    run.rows, run.bad_rows = count_rows(tmp / "bench.db")
    return run


def bench_direct(duration: float) -> dict[tuple[str, int], Cell]:
    out = {}
    for name, path, body, port in SCENARIOS:
        wrk(f"http://127.0.0.1:{port}{path}", body, 8, 1.0)
        for c in CONCURRENCY:
            out[(name, c)] = Cell(wrk(f"http://127.0.0.1:{port}{path}", body, c, duration))
    return out


# ---- long streams ---------------------------------------------------------

@dataclass
class Held:
    events: int = 0
    max_gap: float = 0.0
    complete: bool = False
    error: str = ""


async def hold_stream(port: int, path: str, body: str, key: str, out: Held) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        out.error = f"connect: {e}"
        return
    try:
        writer.write((head + "\r\n" + body).encode())
        buf = bytearray()
        last = time.monotonic()
        while True:
            data = await reader.read(65536)
            now = time.monotonic()
            if not data:
                break
            out.max_gap = max(out.max_gap, now - last)
            last = now
            buf += data
            if buf.endswith(b"0\r\n\r\n"):
                break
        if not buf.startswith(b"HTTP/1.1 200"):
            out.error = bytes(buf[:80]).decode(errors="replace")
            return
        out.events = buf.count(b"data: ")
        out.complete = buf.endswith(b"0\r\n\r\n") and b"data: [DONE]" in buf
    except OSError as e:
        out.error = str(e)
    finally:
        writer.close()


@dataclass
class LongResult:
    streams: int
    seconds: float
    expected_events: int
    complete: int
    all_events: int
    max_gap: float
    idle_kib: int
    peak_kib: int
    errors: list[str]
    rows: int
    exit_code: int | None

    @property
    def per_stream_kib(self) -> float:
        return (self.peak_kib - self.idle_kib) / max(self.streams, 1)


def long_streams(n: int, seconds: int) -> LongResult:
    tmp = Path(tempfile.mkdtemp(prefix="gateway-report-long-"))
    cfg, key = setup_gateway(tmp)
    mock = [PY, "-m", "gateway.mock.fast", "--port", str(MOCK_SLOW_PORT), "--events", str(seconds),
            "--interval-ms", "1000"]
    with proc(mock, MOCK_SLOW_PORT), \
         proc([PY, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "1"], GW_PORT) as gw:
        pids = wait_workers(gw.pid, 1)
        # Warm the worker (imports, first connection) before measuring idle memory.
        wrk(f"http://127.0.0.1:{GW_PORT}/v1/chat/completions", CHAT.replace("bench-model", "bench-slow"), 1, 1.0, key)
        time.sleep(1.0)
        idle = sum(rss_kib(p) for p in pids)
        peak = idle
        direct, held = Held(), [Held() for _ in range(n)]

        async def drive() -> None:
            nonlocal peak
            tasks = [asyncio.create_task(hold_stream(MOCK_SLOW_PORT, "/v1/chat/completions", SLOW, "", direct))]
            for h in held:
                tasks.append(asyncio.create_task(hold_stream(GW_PORT, "/v1/chat/completions", SLOW, key, h)))
                await asyncio.sleep(0.001)  # open them over ~1 s
            while not all(t.done() for t in tasks[1:]):
                peak = max(peak, sum(rss_kib(p) for p in pids))
                await asyncio.sleep(1.0)
            await asyncio.gather(*tasks)

        t0 = time.monotonic()
        asyncio.run(drive())
        took = time.monotonic() - t0
        gw.send_signal(signal.SIGTERM)
        gw.wait(60)
        code = gw.returncode
    conn = sqlite3.connect(tmp / "bench.db")
    slow_rows = conn.execute("SELECT COUNT(*) FROM usage_events WHERE stream = 1 AND status = 200").fetchone()[0]
    conn.close()
    return LongResult(
        streams=n, seconds=took, expected_events=direct.events,
        complete=sum(1 for h in held if h.complete and h.events == direct.events),
        all_events=sum(h.events for h in held), max_gap=max(h.max_gap for h in held),
        idle_kib=idle, peak_kib=peak, errors=sorted({h.error for h in held if h.error})[:3],
        rows=slow_rows, exit_code=code,
    )


# ---- SQLite under load ------------------------------------------------------

def sqlite_writer(db: str, index: int, per_s: int, seconds: float) -> None:
    """One process with the gateway's usage writer, recording ``per_s`` rows a
    second (what a worker's requests would record)."""
    from gateway.config import UsageConfig
    from gateway.store.usage import UsageWriter

    async def main() -> None:
        w = UsageWriter(Path(db), UsageConfig(), spool=Path(db + ".spool"))
        task = asyncio.create_task(w.run())
        base = (0.0, "", 1, 1, "/v1/chat/completions", "bench-model", "fast", 200, 0, 12, 7, 0, 0, 0, 0,
                0.00002, 1.5, 1.0, 1.2, 0.1, 120, 300, None)
        t0 = time.monotonic()
        i = 0
        while (elapsed := time.monotonic() - t0) < seconds:
            due = int(elapsed * per_s)
            while i < due:
                w.record((time.time(), f"w{index}-{i}", *base[2:]))
                i += 1
            await asyncio.sleep(0.005)
        await w.close()
        await asyncio.gather(task)
        print(i, w.written, flush=True)

    asyncio.run(main())


@dataclass
class SqliteResult:
    procs: int
    rate: int
    seconds: float
    sent: int
    rows: int
    distinct: int
    locked: int


def sqlite_load(seconds: float, procs: int = 4, rate: int = 5000) -> SqliteResult:
    tmp = Path(tempfile.mkdtemp(prefix="gateway-report-sqlite-"))
    db = tmp / "bench.db"
    from gateway.store.schema import connect

    connect(db).close()
    ps = [subprocess.Popen([PY, __file__, "--sqlite-writer", str(db), str(i), str(rate // procs), str(seconds)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(procs)]
    sent, locked = 0, 0
    for p in ps:
        out, err = p.communicate()
        locked += err.count(b"locked") + err.count(b"failed")
        if p.returncode != 0:
            locked += 1
            print(err.decode(), file=sys.stderr)
        else:
            sent += int(out.split()[0])
    conn = sqlite3.connect(db)
    rows, distinct = conn.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM usage_events").fetchone()
    conn.close()
    return SqliteResult(procs, rate, seconds, sent, rows, distinct, locked)


# ---- the report ------------------------------------------------------------

def fmt_cell(label: str, workers: str, c: int, cell: Cell) -> str:
    lo = cell.load
    cpu = "" if cell.cpu_per_1k is None else f"{cell.cpu_per_1k:.3f}"
    return f"| {label} | {workers} | {c} | {lo.rps:,.0f} | {lo.p50:.2f} | {lo.p99:.2f} | {lo.errors} | {cpu} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk cell")
    ap.add_argument("--long-streams", type=int, default=1000)
    ap.add_argument("--long-seconds", type=int, default=60)
    ap.add_argument("--sqlite-seconds", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "report.md")
    ap.add_argument("--no-core", action="store_true", help="skip bench/run.py's side-by-side table")
    ap.add_argument("--sqlite-writer", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.sqlite_writer:
        db, idx, rate, secs = a.sqlite_writer
        sqlite_writer(db, int(idx), int(rate), float(secs))
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    need = 4 * a.long_streams + 500
    if hard < need:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} < {need} needed for {a.long_streams} streams")
    t_start = time.time()
    load_before = os.getloadavg()
    core = ""
    if not a.no_core:
        # The core targets (added latency, throughput vs a bare forwarder, TTFB),
        # measured by bench/run.py in the same session.
        core = subprocess.run([PY, str(Path(__file__).resolve().parent / "run.py"), "--duration", "10"],
                              check=True, capture_output=True, text=True).stdout
    mock = [PY, "-m", "gateway.mock.fast"]
    with proc([*mock, "--port", str(MOCK_PORT)], MOCK_PORT), \
         proc([*mock, "--port", str(MOCK_STREAM_PORT), "--events", str(STREAM_EVENTS)], MOCK_STREAM_PORT), \
         proc([*mock, "--port", str(MOCK_ANTH_PORT), "--events", str(ANTH_EVENTS - 6)], MOCK_ANTH_PORT):
        direct = bench_direct(a.duration)
        runs = {w: bench_gateway(w, a.duration) for w in (1, 2)}
    long = long_streams(a.long_streams, a.long_seconds)
    sq = sqlite_load(a.sqlite_seconds)

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (load generator, mock and gateway share them; "
        f"other people's tests may run at the same time: load average {load_before[0]:.2f} at the start), "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t_start))}, "
        f"{code_version()}. "
        f"wrk -t1, {a.duration:.0f} s per cell; latency is the whole response. Gateway: `gateway serve --workers N`, "
        "auth + a key with every limit + routing + usage rows + metrics. CPU s / 1k req = utime + stime of the "
        "supervisor and all workers over the cell, per 1,000 requests sent.",
        "",
        "| scenario | workers | conc. | req/s | p50 ms | p99 ms | errors | CPU s / 1k req |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _, _, _ in SCENARIOS:
        for c in CONCURRENCY:
            lines.append(fmt_cell(name, "direct (mock)", c, direct[(name, c)]))
            for w in (1, 2):
                lines.append(fmt_cell(name, str(w), c, runs[w].cells[(name, c)]))
    checks = []
    for name, _, _, _ in SCENARIOS:
        for c in (32, 256):
            c1, c2 = runs[1].cells[(name, c)], runs[2].cells[(name, c)]
            assert c1.cpu_per_1k is not None and c2.cpu_per_1k is not None
            checks.append(
                f"| {name}, c={c}: workers 2 / workers 1 | throughput {c2.load.rps / c1.load.rps:.2f}x, "
                f"CPU per request {c2.cpu_per_1k / c1.cpu_per_1k - 1:+.1%} | > 1x, at most +10% |"
            )
    for w in (1, 2):
        r = runs[w]
        checks.append(f"| workers {w}: usage rows / requests sent (wrk SENT less 1 per run, see WRK_UNSENT) "
                      f"| {r.rows:,} / {r.sent:,} | equal |")
        checks.append(f"| workers {w}: rows with status other than 200/499 (499: cut by wrk at the end) "
                      f"| {r.bad_rows} | 0 |")
        checks.append(f"| workers {w}: exit code after SIGTERM | {r.exit_code} | 0 |")
    checks += [
        f"| {long.streams:,} concurrent streams through 1 worker, {a.long_seconds} content events 1 s apart "
        f"({long.expected_events} SSE events each, {long.seconds:.0f} s in all): complete with every event "
        f"| {long.complete:,} / {long.streams:,} | all |",
        f"| long streams: longest gap between reads | {long.max_gap:.2f} s | < 3 s (events every 1 s) |",
        f"| long streams: gateway RSS idle / peak | {long.idle_kib / 1024:.1f} / {long.peak_kib / 1024:.1f} MiB | |",
        f"| long streams: memory per open stream | {long.per_stream_kib:.1f} KiB | <= 128 KiB |",
        f"| long streams: usage rows (status 200, stream) / streams | {long.rows:,} / {long.streams:,} | equal |",
        *([f"| long streams: errors | {'; '.join(long.errors)} | none |"] if long.errors else []),
        f"| SQLite: {sq.procs} processes x usage writer, {sq.rate:,} events/s for {sq.seconds:.0f} s: "
        f"rows / events sent | {sq.rows:,} / {sq.sent:,} (distinct {sq.distinct:,}) | equal |",
        f"| SQLite: `database is locked` or failed batches | {sq.locked} | 0 |",
    ]
    table = "\n".join([*lines, "", "| check | value | target |", "|---|---|---|", *checks])
    if core:
        table += "\n\nCore targets, same session (`python bench/run.py --duration 10`):\n\n" + core.strip()
    print(table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
