"""Gateway CPU per request, two versions of the code side by side.

    python bench/side_by_side.py OLD_REF [--new DIR] [--rounds 3] [--duration 5] [--conns 32]

Extracts git ref OLD_REF (``git archive``) into a temporary directory and
runs it and the working tree (or ``--new DIR``) in alternation, round after
round, against one fast mock upstream: each run starts ``gateway serve``
(one worker, the bench config of bench/run.py), warms it up for a second,
drives a non-streaming chat completion with wrk at ``--conns`` for
``--duration`` seconds and divides the gateway's CPU time (utime + stime of
the process and its children, from /proc) by the requests wrk sent. On a
shared machine this ratio is steadier than requests per second: it does not
count the time the gateway waits for a core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_seconds, gateway_pids, sent
from run import CHAT, CONFIG, PY, proc, wrk

MOCK_PORT, GW_PORT = 19700, 19701


def extract(ref: str, into: Path) -> Path:
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                          text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", root, "archive", ref, "gateway"], check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def one_run(tree: Path, tmp: Path, conns: int, duration: float) -> tuple[float, int]:
    """CPU seconds of the gateway and requests sent, over one wrk run."""
    tmp.mkdir(parents=True)
    cfg = tmp / "bench.toml"
    cfg.write_text(CONFIG.format(gw=GW_PORT, mock=MOCK_PORT, mock_stream=MOCK_PORT, mock_anth=MOCK_PORT))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    gw = [PY, "-m", "gateway"]
    subprocess.run([*gw, "workspaces", "create", "bench", "--config", str(cfg)], check=True, capture_output=True,
                   env=env, cwd=tmp)
    key = subprocess.run([*gw, "keys", "create", "--workspace", "bench", "--config", str(cfg)], check=True,
                         capture_output=True, text=True, env=env, cwd=tmp).stdout.strip().splitlines()[-1]
    url = f"http://127.0.0.1:{GW_PORT}/v1/chat/completions"
    with proc([*gw, "serve", "--config", str(cfg)], GW_PORT, env=env) as p:
        wrk(url, CHAT, 8, 1.0, key)
        pids = gateway_pids(p.pid)
        c0 = cpu_seconds(pids)
        load = wrk(url, CHAT, conns, duration, key)
        if load.errors:
            print(f"  {load.errors} errors", flush=True)
        return cpu_seconds(pids) - c0, sent(load)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", help="git ref of the old code")
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="source tree of the new code (default: this working tree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=32)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-sbs-"))
    trees = {a.old: extract(a.old, tmp / "old"), "new": a.new.resolve()}
    per: dict[str, list[float]] = {name: [] for name in trees}
    with proc([PY, "-m", "gateway.mock.fast", "--port", str(MOCK_PORT)], MOCK_PORT):
        for r in range(a.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                cpu, n = one_run(trees[name], tmp / f"{name.replace('/', '_')}-{r}", a.conns, a.duration)
                per[name].append(cpu / n * 1e6)
                print(f"round {r + 1} {name}: {cpu / n * 1e6:.1f} us CPU per request ({n:,} requests, "
                      f"{n / a.duration:,.0f} req/s)", flush=True)
    for name, us in per.items():
        print(f"{name}: {', '.join(f'{u:.1f}' for u in us)} us CPU per request (min {min(us):.1f})")


if __name__ == "__main__":
    main()
