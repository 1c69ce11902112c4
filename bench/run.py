"""Side-by-side bench: direct to the mock, through a bare aiohttp forwarder,
through the gateway, measured in one run on this machine.

    python bench/run.py [--duration 10] [--soak 100000] [--out bench/results/latest.md]

Starts the fast mock upstream (gateway.mock.fast, raw asyncio: never the
bottleneck, checked below), the bare forwarder (bench/forwarder.py) and the
gateway (`gateway serve`, one worker, every feature on), drives them with wrk
and a small raw-socket client for time to first byte, and prints one markdown
table. It then stops the gateway with SIGTERM and checks that the number of
usage rows equals the number of requests sent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
MOCK_PORT, MOCK_STREAM_PORT, MOCK_ANTH_PORT = 19100, 19101, 19102
FWD_PORT, FWD_STREAM_PORT, FWD_ANTH_PORT = 19200, 19201, 19202
GW_PORT = 19300
STREAM_EVENTS = 20
ANTH_EVENTS = 200  # message_start, content_block_start, ping, 194 deltas, 3 closing events

CHAT = '{"model":"bench-model","messages":[{"role":"user","content":"Say hello to the bench."}]}'
STREAM = '{"model":"bench-stream","stream":true,"messages":[{"role":"user","content":"Stream to the bench."}]}'
ANTH = ('{"model":"bench-claude","max_tokens":512,"stream":true,'
        '"messages":[{"role":"user","content":"Stream to the bench."}]}')


def agent_body() -> str:
    """A coding agent's request as it looks on the wire: about 50 KB, most
    of it tool definitions (whose schemas name "model" and "prompt" as
    properties, as a sub-agent tool does) and a few turns of history,
    written compactly like Claude Code and Codex write theirs."""
    words = ["the", "file", "read", "write", "edit", "search", "run", "test", "build", "diff", "patch", "shell",
             "command", "output", "line", "path", "function", "class", "module", "error", "result", "model"]

    def text(n: int, seed: int) -> str:
        return " ".join(words[(seed * 7 + i * 13) % len(words)] for i in range(n))

    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": text(220, i),
        "parameters": {"type": "object", "properties": {
            "prompt": {"type": "string", "description": text(20, i + 1)},
            "model": {"type": "string", "enum": ["small", "large"]},
            "path": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["prompt"]}}}
        for i in range(20)]
    messages = [{"role": "system", "content": text(900, 99)}]
    for turn in range(6):
        messages.append({"role": "user", "content": text(250, turn)})
        messages.append({"role": "assistant", "content": text(120, turn + 50)})
    body = {"model": "bench-model", "messages": messages, "tools": tools, "max_tokens": 32000}
    return json.dumps(body, separators=(",", ":"))


AGENT = agent_body()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextmanager
def proc(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    if not port_free(port):
        raise RuntimeError(f"port {port} is taken: is an earlier bench still running?")
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@dataclass
class Load:
    rps: float
    p50: float  # ms
    p99: float  # ms
    sent: int
    errors: int


# wrk calls the script's request() once per run for a request it never sends
# (checked: at c=1, usage rows = responses = SENT - 1 for every run).
WRK_UNSENT = 1


def wrk(url: str, body: str, conns: int, duration: float, key: str = "") -> Load:
    env = {**os.environ, "BENCH_BODY": body, "BENCH_AUTH": key}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(HERE / "post.lua"), url],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m[1])
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return Load(
        rps=rps,
        p50=float(re.search(r"P50 ([\d.]+)", out)[1]) / 1000,  # type: ignore[index]
        p99=float(re.search(r"P99 ([\d.]+)", out)[1]) / 1000,  # type: ignore[index]
        sent=int(re.search(r"SENT (\d+)", out)[1]),  # type: ignore[index]
        errors=errors,
    )


@dataclass
class Stream:
    ttfb: float  # ms, p50
    total: float  # ms, p50
    events: int  # events seen per stream (first request)
    sent: int


def stream_client(port: int, path: str, body: str, n: int, key: str = "") -> Stream:
    """Sequential streaming requests on one keep-alive connection: time to
    the first body byte and to the end of the stream."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n")
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    req = (head + "\r\n" + body).encode()
    ttfbs, totals, events = [], [], 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n):
            t0 = time.perf_counter()
            s.sendall(req)
            buf = b""
            first = None
            while True:
                data = s.recv(65536)
                if not data:
                    raise RuntimeError("connection closed mid-stream")
                buf += data
                hend = buf.find(b"\r\n\r\n")
                if hend >= 0 and not buf.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{path} on port {port}: {buf[:hend].decode()}")
                if first is None and hend >= 0 and len(buf) > hend + 4:
                    first = time.perf_counter()
                if hend >= 0 and buf.endswith(b"0\r\n\r\n"):
                    break
            done = time.perf_counter()
            assert first is not None
            ttfbs.append((first - t0) * 1000)
            totals.append((done - t0) * 1000)
            if i == 0:
                events = buf.count(b"\n\n")
    return Stream(statistics.median(ttfbs), statistics.median(totals), events, n)


def ab(url: str, body: str, conns: int, n: int, key: str, tmp: Path) -> Load:
    """Exactly ``n`` requests with ApacheBench, which waits for every answer:
    the usage rows of this phase must equal ``n`` exactly. Each request is
    tagged ``x-request-id: soak-...`` so its rows can be counted."""
    body_file = tmp / "soak.json"
    body_file.write_text(body)
    out = subprocess.run(
        ["ab", "-q", "-k", "-n", str(n), "-c", str(conns), "-p", str(body_file), "-T", "application/json",
         "-H", f"Authorization: Bearer {key}", "-H", "x-request-id: soak-1", url],
        capture_output=True, text=True, check=True,
    ).stdout
    failed = int(re.search(r"Failed requests:\s+(\d+)", out)[1])  # type: ignore[index]
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    return Load(
        rps=float(re.search(r"Requests per second:\s+([\d.]+)", out)[1]),  # type: ignore[index]
        p50=float(re.search(r"\s50%\s+(\d+)", out)[1]),  # type: ignore[index]
        p99=float(re.search(r"\s99%\s+(\d+)", out)[1]),  # type: ignore[index]
        sent=int(re.search(r"Complete requests:\s+(\d+)", out)[1]),  # type: ignore[index]
        errors=failed + (int(non2xx[1]) if non2xx else 0),
    )


def has_endpoint(port: int, path: str, key: str) -> bool:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                          "x-request-id": "probe"})
    try:
        urllib.request.urlopen(req, timeout=5).close()
    except urllib.error.HTTPError as e:
        return e.code != 404 or b"Unknown endpoint" not in e.read()
    return True


def code_version() -> str:
    """The commit measured (with "+ uncommitted changes" when the tree is
    dirty), so a results file says what code its figures belong to."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {rev}" + (" + uncommitted changes" if dirty else "")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


CONFIG = """
[server]
host = "127.0.0.1"
port = {gw}
[database]
path = "bench.db"
[usage]
flush_interval_ms = 200
batch_max = 2000
queue_max = 50000
[[upstreams]]
name = "fast"
kind = "openai"
base_url = "http://127.0.0.1:{mock}/v1"
[[upstreams]]
name = "fast-stream"
kind = "openai"
base_url = "http://127.0.0.1:{mock_stream}/v1"
[[upstreams]]
name = "fast-anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:{mock_anth}/v1"
[[models]]
name = "bench-model"
routes = [{{ upstream = "fast", model = "bench-model" }}]
price = {{ input = 1.0, output = 2.0 }}
[[models]]
name = "bench-stream"
routes = [{{ upstream = "fast-stream", model = "bench-stream" }}]
price = {{ input = 1.0, output = 2.0 }}
[[models]]
name = "bench-claude"
routes = [{{ upstream = "fast-anthropic", model = "bench-claude" }}]
price = {{ input = 3.0, output = 15.0 }}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--streams", type=int, default=300, help="sequential streams for TTFB")
    ap.add_argument("--soak", type=int, default=100_000, help="requests for the memory check")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    cfg = tmp / "bench.toml"
    cfg.write_text(CONFIG.format(gw=GW_PORT, mock=MOCK_PORT, mock_stream=MOCK_STREAM_PORT, mock_anth=MOCK_ANTH_PORT))
    gw_cli = [PY, "-m", "gateway"]
    subprocess.run([*gw_cli, "workspaces", "create", "bench", "--config", str(cfg)], check=True,
                   capture_output=True)
    key = subprocess.run([*gw_cli, "keys", "create", "--workspace", "bench", "--config", str(cfg)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    mock = [PY, "-m", "gateway.mock.fast"]
    fwd = [PY, str(HERE / "forwarder.py")]
    d = a.duration
    rows: list[str] = []
    sent_to_gateway = 0
    with proc([*mock, "--port", str(MOCK_PORT)], MOCK_PORT), \
         proc([*mock, "--port", str(MOCK_STREAM_PORT), "--events", str(STREAM_EVENTS), "--interval-ms", "1"],
              MOCK_STREAM_PORT), \
         proc([*mock, "--port", str(MOCK_ANTH_PORT), "--events", str(ANTH_EVENTS - 6)], MOCK_ANTH_PORT), \
         proc([*fwd, "--port", str(FWD_PORT), "--upstream", f"http://127.0.0.1:{MOCK_PORT}"], FWD_PORT), \
         proc([*fwd, "--port", str(FWD_STREAM_PORT), "--upstream", f"http://127.0.0.1:{MOCK_STREAM_PORT}"],
              FWD_STREAM_PORT), \
         proc([*fwd, "--port", str(FWD_ANTH_PORT), "--upstream", f"http://127.0.0.1:{MOCK_ANTH_PORT}"],
              FWD_ANTH_PORT), \
         proc([*gw_cli, "serve", "--config", str(cfg)], GW_PORT) as gw:
        targets = {
            "direct": (f"http://127.0.0.1:{MOCK_PORT}/v1/chat/completions", ""),
            "forwarder": (f"http://127.0.0.1:{FWD_PORT}/v1/chat/completions", ""),
            "gateway": (f"http://127.0.0.1:{GW_PORT}/v1/chat/completions", key),
        }
        # Warm up every path (connections, caches).
        for name, (url, k) in targets.items():
            w = wrk(url, CHAT, 8, 1.0, k)
            if name == "gateway":
                sent_to_gateway += w.sent - WRK_UNSENT
        res: dict[tuple[str, int], Load] = {}
        for conns in (1, 32):
            for name, (url, k) in targets.items():
                res[(name, conns)] = r = wrk(url, CHAT, conns, d, k)
        for name, (url, k) in targets.items():
            res[(name, 0)] = wrk(url, AGENT, 1, d, k)  # 0: the agent-sized body, c=1
        for conns in (1, 32):
            for name in targets:
                r = res[(name, conns)]
                rows.append(f"| chat, c={conns} | {name} | {r.rps:,.0f} | {r.p50:.3f} | {r.p99:.3f} | {r.errors} |")
        for name in targets:
            r = res[(name, 0)]
            rows.append(f"| agent-sized chat ({len(AGENT) / 1000:.0f} KB), c=1 | {name} | {r.rps:,.0f} | "
                        f"{r.p50:.3f} | {r.p99:.3f} | {r.errors} |")

        stream_res = {
            "direct": stream_client(MOCK_STREAM_PORT, "/v1/chat/completions", STREAM, a.streams),
            "forwarder": stream_client(FWD_STREAM_PORT, "/v1/chat/completions", STREAM, a.streams),
            "gateway": stream_client(GW_PORT, "/v1/chat/completions", STREAM, a.streams, key),
        }
        anth_res: dict[str, Stream] = {}
        if has_endpoint(GW_PORT, "/v1/messages", key):
            anth_res = {
                "direct": stream_client(MOCK_ANTH_PORT, "/v1/messages", ANTH, a.streams),
                "forwarder": stream_client(FWD_ANTH_PORT, "/v1/messages", ANTH, a.streams),
                "gateway": stream_client(GW_PORT, "/v1/messages", ANTH, a.streams, key),
            }
        sent_to_gateway += 1  # the probe

        # Memory over a long run.
        rss0 = rss_kib(gw.pid)
        soak1 = ab(targets["gateway"][0], CHAT, 32, a.soak, key, tmp)
        rss1 = rss_kib(gw.pid)
        soak2 = ab(targets["gateway"][0], CHAT, 32, a.soak, key, tmp)
        rss2 = rss_kib(gw.pid)
        soak = Load(rps=soak2.rps, p50=soak2.p50, p99=soak2.p99, sent=soak1.sent + soak2.sent,
                    errors=soak1.errors + soak2.errors)
        gw.send_signal(signal.SIGTERM)
        gw.wait(60)
        gw_exit = gw.returncode

    sent_to_gateway += (
        sum(res[("gateway", c)].sent - WRK_UNSENT for c in (0, 1, 32)) + soak.sent
        + stream_res["gateway"].sent + (anth_res["gateway"].sent if anth_res else 0)
    )
    db = sqlite3.connect(tmp / "bench.db")
    total_rows = db.execute("SELECT COUNT(*) FROM usage_events").fetchone()[0]
    soak_rows = db.execute("SELECT COUNT(*) FROM usage_events WHERE request_id LIKE 'soak-%'").fetchone()[0]
    bad_rows = db.execute(
        "SELECT COUNT(*) FROM usage_events WHERE status NOT IN (200, 499) AND request_id != 'probe'"
    ).fetchone()[0]
    db.close()

    g0, f0, d0 = res[("gateway", 0)], res[("forwarder", 0)], res[("direct", 0)]
    g1, f1, d1 = res[("gateway", 1)], res[("forwarder", 1)], res[("direct", 1)]
    g32, f32, d32 = res[("gateway", 32)], res[("forwarder", 32)], res[("direct", 32)]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {code_version()}; wrk -t1, {d:.0f} s per cell; "
        "one gateway worker.",
        "",
        "| scenario | target | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        "| streaming (c=1, sequential) | target | TTFB p50 ms | total p50 ms | events |",
        "|---|---|---:|---:|---:|",
        *[f"| OpenAI SSE, {STREAM_EVENTS} events 1 ms apart | {n} | {s.ttfb:.3f} | {s.total:.3f} | {s.events} |"
          for n, s in stream_res.items()],
        *[f"| Anthropic SSE, {ANTH_EVENTS} events at once | {n} | {s.ttfb:.3f} | {s.total:.3f} | {s.events} |"
          for n, s in anth_res.items()],
        "",
        "| check | value | target |",
        "|---|---:|---|",
        f"| c=1 p50 added vs direct (gateway) | {g1.p50 - d1.p50:.3f} ms | <= 0.35 ms |",
        f"| c=1 p50 added vs direct (forwarder) | {f1.p50 - d1.p50:.3f} ms | (reference) |",
        f"| agent-sized body, c=1 p50 added vs direct (gateway / forwarder) | {g0.p50 - d0.p50:.3f} / "
        f"{f0.p50 - d0.p50:.3f} ms | |",
        f"| c=32 throughput gateway / forwarder | {g32.rps / f32.rps:.1%} | >= 90% |",
        f"| mock alone / gateway throughput (c=32) | {d32.rps / g32.rps:.1f}x | >= 3x |",
        f"| streaming TTFB added vs direct | {stream_res['gateway'].ttfb - stream_res['direct'].ttfb:.3f} ms "
        f"| <= 1 ms |",
        *([f"| Anthropic TTFB added vs direct | {anth_res['gateway'].ttfb - anth_res['direct'].ttfb:.3f} ms | |",
           f"| Anthropic relay cost per event (gateway - direct) | "
           f"{(anth_res['gateway'].total - anth_res['direct'].total) / ANTH_EVENTS * 1000:.1f} us | |"]
          if anth_res else ["| Anthropic scenario | skipped: /v1/messages not served | |"]),
        f"| gateway RSS before / after {soak1.sent:,} / after {soak.sent:,} more requests (ab, c=32) "
        f"| {rss0 / 1024:.1f} / {rss1 / 1024:.1f} / {rss2 / 1024:.1f} MiB | flat |",
        f"| usage rows / requests in the fixed-count soak (ab -n, every answer awaited) | {soak_rows:,} / "
        f"{soak.sent:,} | equal |",
        f"| usage rows / requests sent by wrk (SENT less 1 per run, see WRK_UNSENT; requests wrk cuts at the end "
        f"are rows with status 499) and the stream clients | {total_rows - soak_rows:,} / "
        f"{sent_to_gateway - soak.sent:,} | equal |",
        f"| rows with a status other than 200 (499 = cut by wrk at the end) | {bad_rows} | 0 |",
        f"| gateway exit code after SIGTERM | {gw_exit} | 0 |",
    ]
    table = "\n".join(lines)
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
