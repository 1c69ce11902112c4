"""Multi-instance bench (docs/scaling.md): the targets of issue 14, measured
side by side in one run on this machine.

    python bench/multinode.py [--duration 10] [--writer-seconds 60] [--writer-rate 20000]
                              [--retention-rows 10000000] [--only gateways,writer,retention] [--out FILE]
    python bench/multinode.py --only cpu --compare DIR [--rounds 3] [--duration 4]

1. gateways: the fast mock upstream; one gateway on SQLite; two gateway
   instances on PostgreSQL + Redis. wrk at c=1 (latency) and c=32
   (throughput) against each, with a key without limits (no Redis call) and
   a key with an RPM limit of 10^9 (Redis grants permits: one Lua round
   trip per 33 requests, see gateway/redis_limits.py). Then both
   PostgreSQL instances loaded at once. Usage rows are counted against
   requests sent.
2. writer: two processes, each a UsageWriter on PostgreSQL recording
   ``writer-rate / 2`` rows a second for ``writer-seconds``; every row
   must arrive, no batch may fail.
3. retention: ``retention-rows`` rows in one day partition, dropped by the
   retention pass; the time of the drop, split into the DETACH and the
   DROP. The day is checkpointed and its files evicted from the page cache
   first, as a day ``retention_days`` old is (``--retention-cached`` keeps
   them cached, as just filled).

cpu (``--only cpu --compare DIR``, DIR holding other code of the gateway,
e.g. ``git archive main | tar -x -C DIR``): a SQLite instance, and a
PostgreSQL + Redis instance of each code (key with RPM 10^9), measured in
turn for ``--rounds`` rounds: c=1 p50, and at c=32 the gateway's CPU per
request (user + system from /proc, which other load on the machine does
not move as it moves req/s) and Redis's (INFO cpu; the machine's shared
Redis, so other clients' work counts too), and Redis's admission scripts
(EVALSHA, settles included) per request.

Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (databases
and key prefixes of its own, removed after) and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import CHAT, PY, WRK_UNSENT, Load, proc, wrk  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432/"
REDIS = "redis://127.0.0.1:6379/0"
MOCK, SQLITE_GW, PG_GW1, PG_GW2, OTHER_GW = 19400, 19401, 19402, 19403, 19404
RPM = 10**9  # the bench key's limit: never refuses, and leaves room for grants
TICK = os.sysconf("SC_CLK_TCK")

CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
[database]
path = "{path}"
{url}
[usage]
flush_interval_ms = 200
batch_max = 2000
queue_max = 50000
{redis}
[[upstreams]]
name = "fast"
kind = "openai"
base_url = "http://127.0.0.1:{mock}/v1"
[[models]]
name = "bench-model"
routes = [{{ upstream = "fast", model = "bench-model" }}]
price = {{ input = 1.0, output = 2.0 }}
"""


def admin_sql(sql: str) -> None:
    subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", sql], check=True,
                   capture_output=True)


def pg_value(url: str, sql: str) -> int:
    import asyncpg

    async def run() -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    return asyncio.run(run())


def drop_redis_prefix(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS)
    keys = list(r.scan_iter(match=prefix + ":*"))
    if keys:
        r.delete(*keys)
    r.close()


def key(cfg: Path, **limits: int) -> str:
    gw = [PY, "-m", "gateway"]
    ws = f"bench-{uuid.uuid4().hex[:6]}"
    subprocess.run([*gw, "workspaces", "create", ws, "--config", str(cfg)], check=True, capture_output=True)
    flags = [f"--{k}={v}" for k, v in limits.items()]
    out = subprocess.run([*gw, "keys", "create", "--workspace", ws, *flags, "--config", str(cfg)], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def instances(kind: str, names: tuple[tuple[str, int, bool], ...]) -> tuple[str, str, dict[str, Path]]:
    """A fresh PostgreSQL database, a Redis key prefix and one config file
    per ``(name, port, shared)`` (shared: on that database and Redis;
    otherwise SQLite). Returns the database, the prefix and the configs."""
    tmp = Path(tempfile.mkdtemp(prefix=f"gateway-bench-{kind}-"))
    db = f"gwbench_{kind}_" + uuid.uuid4().hex[:8]
    prefix = "gwbench-" + uuid.uuid4().hex[:8]
    admin_sql(f"CREATE DATABASE {db}")
    redis = f'[redis]\nurl = "{REDIS}"\nkey_prefix = "{prefix}"'
    cfgs = {}
    for name, port, shared in names:
        d = tmp / name
        d.mkdir()
        cfgs[name] = d / "gateway.toml"
        cfgs[name].write_text(CONFIG.format(port=port, path="gateway.db", url=f'url = "{PG + db}"' if shared else "",
                                            redis=redis if shared else "", mock=MOCK))
    return db, prefix, cfgs


def gateways(duration: float) -> list[str]:
    db, prefix, cfgs = instances("mn", (("sqlite", SQLITE_GW, False), ("pg1", PG_GW1, True), ("pg2", PG_GW2, True)))
    url = PG + db
    keys = {"sqlite": key(cfgs["sqlite"]), "sqlite-rpm": key(cfgs["sqlite"], rpm=RPM),
            "pg": key(cfgs["pg1"]), "pg-rpm": key(cfgs["pg1"], rpm=RPM)}
    chat = "/v1/chat/completions"
    results: list[tuple[str, Load, Load]] = []
    sent = {"sqlite": 0, "pg": 0}
    serve = [PY, "-m", "gateway", "serve", "--config"]
    try:
        with proc([PY, "-m", "gateway.mock.fast", "--port", str(MOCK)], MOCK), \
             proc([*serve, str(cfgs["sqlite"])], SQLITE_GW), \
             proc([*serve, str(cfgs["pg1"])], PG_GW1), proc([*serve, str(cfgs["pg2"])], PG_GW2):
            time.sleep(1.0)
            targets = [
                ("mock upstream, direct", f"http://127.0.0.1:{MOCK}{chat}", "", None),
                ("1 instance, SQLite", f"http://127.0.0.1:{SQLITE_GW}{chat}", keys["sqlite"], "sqlite"),
                ("1 instance, SQLite, key with RPM 10^9", f"http://127.0.0.1:{SQLITE_GW}{chat}", keys["sqlite-rpm"],
                 "sqlite"),
                ("instance 1 of 2, PostgreSQL + Redis", f"http://127.0.0.1:{PG_GW1}{chat}", keys["pg"], "pg"),
                ("instance 1 of 2, PostgreSQL + Redis, key with RPM 10^9 (Redis, grants)", f"http://127.0.0.1:{PG_GW1}{chat}",
                 keys["pg-rpm"], "pg"),
            ]
            for label, target, k, store in targets:
                c1 = wrk(target, CHAT, 1, duration, k)
                c32 = wrk(target, CHAT, 32, duration, k)
                results.append((label, c1, c32))
                if store:
                    sent[store] += c1.sent + c32.sent - 2 * WRK_UNSENT
            # Both PostgreSQL instances under load at once.
            both: list[Load] = []

            def run(port: int, k: str) -> None:
                both.append(wrk(f"http://127.0.0.1:{port}{chat}", CHAT, 32, duration, k))

            import threading
            threads = [threading.Thread(target=run, args=(p, keys["pg-rpm"])) for p in (PG_GW1, PG_GW2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sent["pg"] += sum(b.sent - WRK_UNSENT for b in both)
        # SIGTERM flushed every queue: rows must equal requests.
        pg_rows = pg_value(url, "SELECT COUNT(*) FROM usage_events")
        import sqlite3

        conn = sqlite3.connect(cfgs["sqlite"].parent / "gateway.db")
        sqlite_rows = conn.execute("SELECT COUNT(*) FROM usage_events").fetchone()[0]
        conn.close()
    finally:
        admin_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        drop_redis_prefix(prefix)
    base = results[0][1].p50
    sqlite_c1, sqlite_c32 = results[1][1].p50, results[1][2].rps
    lines = [
        "| target | c=1 p50 (ms) | added vs direct (ms) | vs SQLite at c=1 (ms) | c=32 req/s | vs SQLite c=32 |",
        "|---|---|---|---|---|---|",
    ]
    for label, c1, c32 in results:
        lines.append(f"| {label} | {c1.p50:.3f} | {c1.p50 - base:+.3f} | "
                     f"{c1.p50 - sqlite_c1:+.3f} | {c32.rps:.0f} | {c32.rps / sqlite_c32 * 100:.0f}% |")
    per = sum(b.rps for b in both) / 2
    lines.append(f"| 2 instances, PostgreSQL + Redis, both loaded (per instance; 2 cores shared) | | | | "
                 f"{per:.0f} ({sum(b.rps for b in both):.0f} total) | {per / sqlite_c32 * 100:.0f}% |")
    lines.append("")
    lines.append(f"Usage rows: SQLite {sqlite_rows} for {sent['sqlite']} requests; PostgreSQL {pg_rows} "
                 f"for {sent['pg']} requests.")
    return lines


# ------------------------------------------------------------------ cpu


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def redis_stats() -> tuple[float, int]:
    """Redis's CPU seconds (user + system) and EVALSHA calls so far."""
    import redis

    r = redis.Redis.from_url(REDIS)
    try:
        info = r.info("cpu")
        calls = r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"]), int(calls)
    finally:
        r.close()


def cpu(compare: Path, rounds: int, duration: float) -> list[str]:
    """This code and the code in ``compare`` side by side (see the module
    docstring)."""
    db, prefix, cfgs = instances("c", (("sqlite", SQLITE_GW, False), ("this", PG_GW1, True),
                                       ("other", OTHER_GW, True)))
    here = str(HERE.parent)
    keys = {"sqlite": key(cfgs["sqlite"], rpm=RPM), "pg": key(cfgs["this"], rpm=RPM), "free": key(cfgs["this"])}
    env = {name: {**os.environ, "PYTHONPATH": str(compare) if name == "other" else here} for name in cfgs}
    # -P: the code comes from PYTHONPATH, not from the current directory.
    serve = [PY, "-P", "-m", "gateway", "serve", "--config"]
    targets = [("1 instance, SQLite, key with RPM 10^9", "sqlite", SQLITE_GW, keys["sqlite"]),
               (f"PostgreSQL + Redis, key with RPM 10^9, {compare.name}", "other", OTHER_GW, keys["pg"]),
               ("PostgreSQL + Redis, key with RPM 10^9, this code", "this", PG_GW1, keys["pg"]),
               ("PostgreSQL + Redis, key without limits, this code", "this", PG_GW1, keys["free"])]
    got: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label, *_ in targets}
    chat = "/v1/chat/completions"
    try:
        with proc([PY, "-m", "gateway.mock.fast", "--port", str(MOCK)], MOCK), \
             proc([*serve, str(cfgs["sqlite"])], SQLITE_GW, env["sqlite"]) as p_sqlite, \
             proc([*serve, str(cfgs["other"])], OTHER_GW, env["other"]) as p_other, \
             proc([*serve, str(cfgs["this"])], PG_GW1, env["this"]) as p_this:
            pids = {"sqlite": p_sqlite.pid, "other": p_other.pid, "this": p_this.pid}
            time.sleep(1.0)
            for _label, _name, port, k in targets:  # warm-up
                wrk(f"http://127.0.0.1:{port}{chat}", CHAT, 4, 1, k)
            for _ in range(rounds):
                for label, name, port, k in targets:
                    c1 = wrk(f"http://127.0.0.1:{port}{chat}", CHAT, 1, duration, k)
                    cpu0, (rcpu0, calls0) = cpu_s(pids[name]), redis_stats()
                    c32 = wrk(f"http://127.0.0.1:{port}{chat}", CHAT, 32, duration, k)
                    cpu1, (rcpu1, calls1) = cpu_s(pids[name]), redis_stats()
                    n = c32.sent - WRK_UNSENT
                    got[label].append((c1.p50, (cpu1 - cpu0) / n * 1e6, (rcpu1 - rcpu0) / n * 1e6,
                                       (calls1 - calls0) / n))
    finally:
        admin_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        drop_redis_prefix(prefix)

    def span(xs: list[float], fmt: str) -> str:
        return f"{min(xs):{fmt}}-{max(xs):{fmt}}" if len(xs) > 1 else f"{xs[0]:{fmt}}"

    lines = [
        f"{rounds} rounds, {duration:g} s per cell, the targets in turn (ranges over rounds; vs SQLite: the "
        "difference in each round):", "",
        "| target | c=1 p50 (ms) | c=1 p50 vs SQLite (ms) | gateway CPU / request at c=32 (us) "
        "| Redis CPU / request (us) | EVALSHA / request |",
        "|---|---|---|---|---|---|",
    ]
    base = got[targets[0][0]]
    for label, rows in got.items():
        lines.append(f"| {label} | {span([r[0] for r in rows], '.3f')} | "
                     f"{span([r[0] - b[0] for r, b in zip(rows, base, strict=True)], '+.3f')} | "
                     f"{span([r[1] for r in rows], '.0f')} | {span([r[2] for r in rows], '.0f')} | "
                     f"{span([r[3] for r in rows], '.3f')} |")
    return lines


# ------------------------------------------------------------------ writer


def writer_child(url: str, seconds: float, rate: int, tag: str) -> None:
    """One instance's usage writer, fed ``rate`` rows a second."""
    from gateway.config import UsageConfig
    from gateway.store.columns import COLUMNS
    from gateway.store.postgres.usage import BatchWriter
    from gateway.store.usage import UsageWriter

    failed = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                failed.append(record.getMessage())

    logging.getLogger("gateway").addHandler(Count())

    async def main() -> dict[str, Any]:
        w = UsageWriter(BatchWriter(url), UsageConfig(flush_interval_ms=200, batch_max=5000, queue_max=200000))
        runner = asyncio.create_task(w.run())
        base = dict.fromkeys(COLUMNS, 0)
        base.update(endpoint="/v1/chat/completions", model="bench", upstream="fast", status=200, latency_ms=1.5,
                    ttfb_ms=1.0, upstream_ms=1.0, overhead_ms=0.2, cost=0.0001, error_type=None, response_id=None,
                    workspace_id=1,
                    key_id=1)
        t0 = time.monotonic()
        started = time.time()  # wall clock: compared across the two processes
        n = 0
        tick = 0.01
        while (elapsed := time.monotonic() - t0) < seconds:
            due = int(elapsed * rate)
            now = time.time()
            while n < due:
                base["ts"], base["request_id"] = now, f"{tag}{n}"
                w.record(tuple(base[c] for c in COLUMNS))
                n += 1
            await asyncio.sleep(tick)
        fed = time.time()
        await w.close(60)
        await asyncio.gather(runner, return_exceptions=True)
        return {"recorded": n, "written": w.written, "seconds": time.monotonic() - t0, "errors": failed,
                "started": started, "fed": fed, "done": time.time()}

    import uvloop

    print(json.dumps(uvloop.run(main())))


def writer(seconds: float, rate: int) -> list[str]:
    db = "gwbench_w_" + uuid.uuid4().hex[:8]
    admin_sql(f"CREATE DATABASE {db}")
    url = PG + db
    try:
        from gateway.config import DatabaseConfig
        from gateway.store.base import migrate_schema

        asyncio.run(migrate_schema(DatabaseConfig(Path("unused.db"), url)))
        children = [subprocess.Popen([PY, __file__, "writer-child", url, str(seconds), str(rate // 2), f"w{i}-"],
                                     stdout=subprocess.PIPE, text=True) for i in range(2)]
        t0 = time.monotonic()
        outs = [json.loads(c.communicate()[0]) for c in children]
        wall = time.monotonic() - t0
        rows = pg_value(url, "SELECT COUNT(*) FROM usage_events")
        dupes = pg_value(url, "SELECT COUNT(*) - COUNT(DISTINCT request_id) FROM usage_events")
    finally:
        admin_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    recorded = sum(o["recorded"] for o in outs)
    errors = [e for o in outs for e in o["errors"]]
    # The writers' own window: from the first row recorded to the last one
    # committed (the drain after the feed stopped included), not the
    # processes' start-up.
    window = max(o["done"] for o in outs) - min(o["started"] for o in outs)
    drain = max(o["done"] - o["fed"] for o in outs)
    return [
        "| writer | rows recorded | rows in PostgreSQL | rate (rows/s) | drain after the feed stopped | "
        "failed batches / errors |",
        "|---|---|---|---|---|---|",
        f"| 2 processes x {rate // 2}/s for {seconds:.0f} s | {recorded} | {rows} | {rows / window:.0f} "
        f"(first row recorded to last committed, {window:.1f} s; {rows / wall:.0f} over {wall:.1f} s with "
        f"process start-up) | {drain * 1000:.0f} ms | {len(errors)} |",
        "", f"Lost rows: {recorded - rows}; duplicate rows: {dupes}; errors: {errors[:3]}",
    ]


# ------------------------------------------------------------------ retention


class Timed:
    """A connection whose statements are timed one by one (the split of the
    retention pass into its DETACH and its DROP)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.times: list[tuple[str, float]] = []

    async def fetch(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await self.conn.execute(sql, *args)
        finally:
            self.times.append((sql.split()[0].upper(), time.monotonic() - t0))


async def evict(conn: Any, table: str) -> int:
    """Drop ``table``'s and its indexes' files from the OS page cache
    (posix_fadvise DONTNEED); how many files (0: not readable from here)."""
    import glob

    data = await conn.fetchval("SHOW data_directory")
    paths = await conn.fetch(
        "SELECT pg_relation_filepath(c.oid) AS p FROM pg_class c WHERE c.oid = $1::regclass "
        "OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = $1::regclass)", table)
    n = 0
    for r in paths:
        for f in glob.glob(os.path.join(data, r["p"]) + "*"):
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                return 0
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


def retention(n: int, cold: bool = True, tablespace: str | None = None) -> list[str]:
    import asyncpg

    from gateway.config import DatabaseConfig
    from gateway.store.base import migrate_schema
    from gateway.store.postgres import usage

    db = "gwbench_r_" + uuid.uuid4().hex[:8]
    admin_sql(f"CREATE DATABASE {db}")
    url = PG + db
    space = None
    if tablespace:  # the day's partition on another file system
        space = db + "_ts"
        admin_sql(f"CREATE TABLESPACE {space} LOCATION '{tablespace}'")

    async def run() -> dict[str, Any]:
        await migrate_schema(DatabaseConfig(Path("unused.db"), url))
        conn = await asyncpg.connect(url)
        try:
            if space:
                await conn.execute(f"SET default_tablespace = {space}")
            day = int(time.time() // 86400) - 100
            await usage.ensure_partitions(conn, [day, day + 1])
            t0 = time.monotonic()
            await conn.execute(
                "INSERT INTO usage_events (ts, request_id, workspace_id, key_id, endpoint, model, upstream, status, "
                "input_tokens, output_tokens, cost, latency_ms, ttfb_ms) "
                f"SELECT {day * 86400} + i * 86399.0 / $1, 'r' || i, 1 + i % 50, 1 + i % 500, "
                "'/v1/chat/completions', 'model-' || (i % 8), 'up-' || (i % 3), 200, 10, 20, 0.001, 12.5, 3.5 "
                "FROM generate_series(1, $1) AS i", n)
            await conn.execute(f"INSERT INTO usage_events (ts, request_id, endpoint, status, latency_ms) "
                               f"VALUES ({(day + 1) * 86400 + 10}, 'kept', 'x', 200, 1)")
            fill = time.monotonic() - t0
            size = int(await conn.fetchval(f"SELECT pg_total_relation_size('{usage.partition_name(day)}')"))
            # The day retention drops was written retention_days ago: its
            # pages were written out long since (CHECKPOINT) and have left
            # the OS page cache (evicted here, when this host's PostgreSQL
            # files can be opened); dropping a day just filled also frees
            # its cached pages, which costs about as much again.
            t0 = time.monotonic()
            await conn.execute("CHECKPOINT")
            checkpoint = time.monotonic() - t0
            evicted = await evict(conn, usage.partition_name(day)) if cold else 0
            timed = Timed(conn)
            t0 = time.monotonic()
            dropped = await usage.drop_older_than(timed, (day + 1) * 86400)
            took = time.monotonic() - t0
            left = int(await conn.fetchval("SELECT COUNT(*) FROM usage_events"))
            split = {k: sum(t for s, t in timed.times if s == k) for k in ("ALTER", "DROP", "TRUNCATE")}
            return {"fill": fill, "size": size, "checkpoint": checkpoint, "took": took, "dropped": dropped,
                    "left": left, "split": split, "evicted": evicted}
        finally:
            await conn.close()

    try:
        r = asyncio.run(run())
    finally:
        admin_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        if space:
            admin_sql(f"DROP TABLESPACE IF EXISTS {space}")
    sp = r["split"]
    where = f", tablespace on {tablespace}" if tablespace else ""
    return [
        "| retention | rows in the day | partitions dropped | time to drop | of which DETACH / DROP "
        "| rows left (next day) |",
        "|---|---|---|---|---|---|",
        f"| one UTC day past the cutoff, pages {'not cached' if r['evicted'] else 'cached'}{where} | {n:,} "
        f"({r['size'] / 1e9:.1f} GB with indexes; filled in {r['fill']:.0f} s, CHECKPOINT {r['checkpoint']:.1f} s) "
        f"| {r['dropped']} | {r['took'] * 1000:.0f} ms | "
        f"{sp['ALTER'] * 1000:.0f} / {(sp['DROP'] + sp['TRUNCATE']) * 1000:.0f} ms | {r['left']} |",
    ]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "writer-child":
        writer_child(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--writer-seconds", type=float, default=60.0)
    ap.add_argument("--writer-rate", type=int, default=20000)
    ap.add_argument("--retention-rows", type=int, default=10_000_000)
    ap.add_argument("--retention-cached", action="store_true",
                    help="drop the day with its pages still in the page cache, as just filled")
    ap.add_argument("--retention-tablespace", help="put the day's partition in a tablespace at this directory "
                    "(owned by the postgres user, empty): retention on another file system")
    ap.add_argument("--only", default="gateways,writer,retention")
    ap.add_argument("--compare", type=Path, help="for cpu: a directory holding other code of the gateway")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    parts = a.only.split(",")
    out = [f"Machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    if "gateways" in parts:
        out += [*gateways(a.duration), ""]
    if "writer" in parts:
        out += [*writer(a.writer_seconds, a.writer_rate), ""]
    if "cpu" in parts:
        if a.compare is None:
            ap.error("--only cpu needs --compare DIR")
        out += [*cpu(a.compare.resolve(), a.rounds, a.duration), ""]
    if "retention" in parts:
        out += [*retention(a.retention_rows, cold=not a.retention_cached, tablespace=a.retention_tablespace), ""]
    text = "\n".join(out)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
