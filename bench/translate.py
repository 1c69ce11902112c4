"""What translation costs per stream event, side by side with pass-through.

    python bench/translate.py [--duration 8] [--events 200] [--rounds 3]

Two measurements, both printed as one markdown table each:

1. End to end: the gateway (`gateway serve`, one worker) in front of the
   fast mock (gateway.mock.fast), streams of ``--events`` content events,
   driven by wrk at c=8. The same upstream bytes are relayed four ways:
   Anthropic stream to an Anthropic client (pass-through) and to a chat
   client (translated), chat stream to a chat client (pass-through) and to
   an Anthropic client (translated). The gateway's own CPU time per request
   (from /proc, so other load on the machine does not count) is compared;
   the difference divided by the events in a stream is the per-event cost
   of translating. Rounds alternate the modes so drift hits all alike.
2. In process: each of the six pairs' transducers fed a recorded upstream
   stream (text deltas and a tool call), against the wire protocol's own
   pass-through usage reader on the same bytes: microseconds per event.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from run import PY, proc, wrk  # noqa: E402

from gateway.protocols.anthropic import MessageStreamUsage  # noqa: E402
from gateway.protocols.openai import HiddenUsageChunk  # noqa: E402
from gateway.protocols.responses import ResponseUsage  # noqa: E402
from gateway.translate import TranslatedStream, pair  # noqa: E402

MOCK_CHAT, MOCK_ANTH, GW = 19411, 19412, 19413
CLK_TCK = os.sysconf("SC_CLK_TCK")

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
name = "fast-chat"
kind = "openai"
base_url = "http://127.0.0.1:{chat}/v1"
[[upstreams]]
name = "fast-anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:{anth}/v1"
[[models]]
name = "on-chat"
routes = [{{ upstream = "fast-chat", model = "bench-model" }}]
[[models]]
name = "on-anthropic"
routes = [{{ upstream = "fast-anthropic", model = "bench-model" }}]
"""

CHAT_BODY = '{{"model":"{m}","stream":true,"stream_options":{{"include_usage":true}},' \
            '"messages":[{{"role":"user","content":"Stream to the bench."}}]}}'
MSG_BODY = '{{"model":"{m}","max_tokens":512,"stream":true,' \
           '"messages":[{{"role":"user","content":"Stream to the bench."}}]}}'
# (label, path, body, upstream events per stream, translated?)
MODES = [
    ("messages <- anthropic (pass-through)", "/v1/messages", MSG_BODY.format(m="on-anthropic"), "anth", False),
    ("chat <- anthropic (translated)", "/v1/chat/completions", CHAT_BODY.format(m="on-anthropic"), "anth", True),
    ("chat <- chat (pass-through)", "/v1/chat/completions", CHAT_BODY.format(m="on-chat"), "chat", False),
    ("messages <- chat (translated)", "/v1/messages", MSG_BODY.format(m="on-chat"), "chat", True),
]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def end_to_end(duration: float, events: int, rounds: int, only_passthrough: bool = False) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-translate-"))
    cfg = tmp / "bench.toml"
    cfg.write_text(CONFIG.format(gw=GW, chat=MOCK_CHAT, anth=MOCK_ANTH))
    gw_cli = [PY, "-m", "gateway"]
    subprocess.run([*gw_cli, "workspaces", "create", "bench", "--config", str(cfg)], check=True, capture_output=True)
    key = subprocess.run([*gw_cli, "keys", "create", "--workspace", "bench", "--config", str(cfg)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    mock = [PY, "-m", "gateway.mock.fast", "--events", str(events)]
    # Upstream events per stream: the content deltas plus the protocol's frame.
    n_events = {"anth": events + 6, "chat": events + 4}
    modes = [m for m in MODES if not (only_passthrough and m[4])]
    per_req: dict[str, list[float]] = {m[0]: [] for m in modes}
    rps: dict[str, list[float]] = {m[0]: [] for m in modes}
    with proc([*mock, "--port", str(MOCK_CHAT)], MOCK_CHAT), proc([*mock, "--port", str(MOCK_ANTH)], MOCK_ANTH), \
         proc([*gw_cli, "serve", "--config", str(cfg)], GW) as gw:
        for _, path, body, _, _ in modes:  # warm up
            wrk(f"http://127.0.0.1:{GW}{path}", body, 8, 1.0, key)
        for _ in range(rounds):
            for label, path, body, _, _ in modes:
                c0 = cpu_s(gw.pid)
                r = wrk(f"http://127.0.0.1:{GW}{path}", body, 8, duration, key)
                used = cpu_s(gw.pid) - c0
                assert r.errors == 0, (label, r.errors)
                per_req[label].append(used / max(r.sent - 1, 1) * 1e6)
                rps[label].append(r.rps)
    rows = ["| stream (client <- upstream) | req/s | gateway CPU per request (us) | per event over pass-through (us) |",
            "|---|---|---|---|"]
    base: dict[str, float] = {}
    for label, _, _, up, translated in modes:
        cpu = statistics.median(per_req[label])
        extra = ""
        if not translated:
            base[up] = cpu
        else:
            extra = f"{(cpu - base[up]) / n_events[up]:.2f}"
        rows.append(f"| {label} | {statistics.median(rps[label]):,.0f} | {cpu:,.0f} | {extra} |")
    return rows


# ------------------------------------------------------------------ in process


def _sse(name: str | None, obj: object) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def recorded(wire: str, n: int) -> bytes:
    """A realistic upstream stream in ``wire``: n text deltas, then a tool
    call whose arguments come in 10 pieces, then the end with usage."""
    args = [f'{{"k{i}":' if i == 0 else f'"v{i}","k{i}":' for i in range(9)] + ['"end"}']
    if wire == "messages":
        evs = [("message_start", {"type": "message_start", "message": {
            "id": "msg_b", "type": "message", "role": "assistant", "model": "m", "content": [],
            "stop_reason": None, "usage": {"input_tokens": 12, "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}})]
        evs += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": f"tok{i} "}}) for i in range(n)]
        evs += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                    "type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}})]
        evs += [("content_block_delta", {"type": "content_block_delta", "index": 1,
                                         "delta": {"type": "input_json_delta", "partial_json": a}}) for a in args]
        evs += [("content_block_stop", {"type": "content_block_stop", "index": 1}),
                ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                                   "usage": {"output_tokens": n}}), ("message_stop", {"type": "message_stop"})]
        return b"".join(_sse(k, v) for k, v in evs)
    if wire == "chat":
        def chunk(delta: object, finish: str | None = None) -> dict[str, object]:
            return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        cs = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": f"tok{i} "}) for i in range(n)]
        cs.append(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "f", "arguments": ""}}]}))
        cs += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}) for a in args]
        cs.append(chunk({}, "tool_calls"))
        cs.append({"id": "c", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": n}})
        return b"".join(_sse(None, c) for c in cs) + b"data: [DONE]\n\n"
    seq = iter(range(10**6))
    resp = {"id": "resp_b", "object": "response", "model": "m", "status": "in_progress", "output": []}
    ev: list[dict[str, object]] = [{"type": "response.created", "response": resp},
                                   {"type": "response.output_item.added", "output_index": 0, "item": {
                                       "id": "msg_1", "type": "message", "role": "assistant", "content": []}}]
    ev += [{"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0,
            "delta": f"tok{i} "} for i in range(n)]
    ev += [{"type": "response.output_item.done", "output_index": 0, "item": {"id": "msg_1", "type": "message"}},
           {"type": "response.output_item.added", "output_index": 1, "item": {
               "id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "f", "arguments": ""}}]
    ev += [{"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 1, "delta": a}
           for a in args]
    ev += [{"type": "response.output_item.done", "output_index": 1, "item": {
        "id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "f", "arguments": "".join(args)}},
           {"type": "response.completed", "response": {**resp, "status": "completed",
                                                       "usage": {"input_tokens": 12, "output_tokens": n}}}]
    return b"".join(_sse(str(e["type"]), {**e, "sequence_number": next(seq)}) for e in ev)


def passthrough(wire: str) -> object:
    return {"messages": MessageStreamUsage, "chat": HiddenUsageChunk}.get(wire, lambda: ResponseUsage(True))()


def _per_event(make: Callable[[], Any], pieces: list[bytes], events: int, repeat: int) -> float:
    """Best time per event of feeding ``pieces`` through a fresh reader."""
    best = float("inf")
    for _ in range(repeat):
        r = make()
        t0 = time.perf_counter()
        for p in pieces:
            r.feed(p)
        r.flush()
        r.finish()
        best = min(best, time.perf_counter() - t0)
    return best / events * 1e6


def in_process(n: int, repeat: int) -> list[str]:
    rows = ["| client <- wire | events | pass-through reader (us/event) | translated (us/event) | difference |",
            "|---|---|---|---|---|"]
    for client, wire in [(c, w) for c in ("chat", "messages", "responses") for w in ("chat", "messages", "responses")
                         if c != w]:
        data = recorded(wire, n)
        # As the upstream client hands it over: pieces of about one event.
        size = max(len(data) // (n + 20), 64)
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        events = data.count(b"\n\n")

        base = _per_event(lambda wire=wire: passthrough(wire), pieces, events, repeat)
        req = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
               "stream_options": {"include_usage": True}}
        tr = _per_event(lambda c=client, w=wire, r=req: TranslatedStream(pair(c, w).Stream(r, "m")),
                        pieces, events, repeat)
        rows.append(f"| {client} <- {wire} | {events} | {base:.2f} | {tr:.2f} | {tr - base:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--events", type=int, default=200, help="content events per stream")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the four modes")
    ap.add_argument("--skip-e2e", action="store_true", help="only the in-process table")
    ap.add_argument("--passthrough", action="store_true",
                    help="only the pass-through streams, end to end (to compare two versions of the gateway: "
                         "run from each one's source tree)")
    a = ap.parse_args()
    if a.passthrough:
        print("\n".join(end_to_end(a.duration, a.events, a.rounds, only_passthrough=True)))
        return
    print("\n".join(in_process(a.events, 30)))
    if not a.skip_e2e:
        print()
        print("\n".join(end_to_end(a.duration, a.events, a.rounds)))


if __name__ == "__main__":
    main()
