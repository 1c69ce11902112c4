"""Cost of one admission on the request path: the in-process limiter vs the
Redis one (one Lua script, one round trip), side by side in one run.

    python bench/limits.py [--redis redis://127.0.0.1:6379/0] [--n 5000]

Times ``admit`` + ``release`` for a key with an RPM, a TPM and a
concurrency cap, sequentially (the latency a request at c=1 pays) and
with 32 admissions in flight (what the event loop pays per admission under
load). Keys without limits skip the limiter entirely in both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from gateway.auth import KeyInfo
from gateway.config import RedisConfig
from gateway.limits import Limiter, LocalLimiter
from gateway.redis_limits import RedisLimiter

KEY = KeyInfo(
    id=1, workspace_id=1, workspace="bench", name="bench", prefix="gw-bench", group="default", ratio=1.0,
    models=frozenset(), rpm=10**9, tpm=10**12, max_concurrency=10**6, spend_limit=None, expires_at=None,
    workspace_spend_limit=None, workspace_token_limit=None,
)


async def sequential(limiter: Limiter, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await limiter.admit(KEY)
        out.append((time.perf_counter() - t0) * 1e6)
        limiter.release(KEY)
        limiter.settle(KEY, 10, 0.0)
    return out


async def concurrent(limiter: Limiter, n: int, width: int = 32) -> float:
    async def one() -> None:
        await limiter.admit(KEY)
        limiter.release(KEY)

    t0 = time.perf_counter()
    for _ in range(n // width):
        await asyncio.gather(*(one() for _ in range(width)))
    return (time.perf_counter() - t0) / n * 1e6


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--n", type=int, default=5000)
    args = p.parse_args()
    prefix = "gwbench-" + uuid.uuid4().hex[:8]
    local = LocalLimiter()
    shared = RedisLimiter(RedisConfig(url=args.redis, key_prefix=prefix), LocalLimiter())
    rows = []
    for name, limiter in (("local", local), ("redis", shared)):
        await sequential(limiter, 200)  # warm up (script loaded, connections open)
        lat = await sequential(limiter, args.n)
        per = await concurrent(limiter, args.n)
        lat.sort()
        rows.append((name, statistics.median(lat), lat[int(len(lat) * 0.99)], per))
    await shared.redis.delete(*[k async for k in shared.redis.scan_iter(match=prefix + ":*")])
    await shared.close()
    print("| limiter | admit p50 (us), c=1 | admit p99 (us), c=1 | event-loop time per admit (us), 32 in flight |")
    print("|---|---|---|---|")
    for name, p50, p99, per in rows:
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {per:.1f} |")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
