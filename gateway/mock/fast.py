"""A fast mock upstream for the bench: a raw asyncio protocol answering with
fixed bodies, so that the mock is never the bottleneck.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length request bodies,
chunked streaming answers) for the gateway, the bare forwarder and wrk:
- POST /v1/chat/completions: a fixed chat completion, or with ``"stream":
  true`` an OpenAI SSE stream of ``--events`` chunks (with the usage chunk
  when the body asks for ``include_usage``);
- POST /v1/messages: a fixed Anthropic message, or an Anthropic SSE stream
  (message_start ... message_stop) of ``--events`` text deltas.
Stream events are written one write per event, ``--interval-ms`` apart.

    python -m gateway.mock.fast --port 9100 [--events 20] [--interval-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

import orjson

CHAT_BODY = orjson.dumps({
    "id": "chatcmpl-fast",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fast mock."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19,
              "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
})
MESSAGE_BODY = orjson.dumps({
    "id": "msg_fast", "type": "message", "role": "assistant", "model": "bench-model",
    "content": [{"type": "text", "text": "Hello from the fast mock."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
})


def _head(status: str, ctype: bytes, length: int | None) -> bytes:
    h = b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype + b"\r\n"
    if length is None:
        return h + b"Transfer-Encoding: chunked\r\n\r\n"
    return h + b"Content-Length: " + str(length).encode() + b"\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def chat_events(n: int, include_usage: bool) -> list[bytes]:
    base = b'{"id":"chatcmpl-fast","object":"chat.completion.chunk","created":1700000000,"model":"bench-model",'
    evs = [b"data: " + base + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
           b'"finish_reason":null}]}\n\n']
    for i in range(n):
        evs.append(b"data: " + base + b'"choices":[{"index":0,"delta":{"content":"tok%d "},' % i
                   + b'"finish_reason":null}]}\n\n')
    evs.append(b"data: " + base + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    if include_usage:
        evs.append(b"data: " + base + b'"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d,'
                   b'"total_tokens":%d}}\n\n' % (n, n + 12))
    evs.append(b"data: [DONE]\n\n")
    return evs


def anthropic_events(n: int) -> list[bytes]:
    def ev(name: str, obj: object) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    evs = [
        ev("message_start", {"type": "message_start", "message": {
            "id": "msg_fast", "type": "message", "role": "assistant", "model": "bench-model", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 1, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0}}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
        ev("ping", {"type": "ping"}),
    ]
    evs += [ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": f"tok{i} "}}) for i in range(n)]
    evs += [
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                             "usage": {"output_tokens": n}}),
        ev("message_stop", {"type": "message_stop"}),
    ]
    return evs


class FastMock(asyncio.Protocol):
    def __init__(self, events: int, interval: float) -> None:
        self.buf = b""
        self.events = events
        self.interval = interval
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            i = head.find(b"content-length:")
            if i >= 0:
                j = head.find(b"\r\n", i)
                length = int(head[i + 15 : j if j >= 0 else None])
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            path = head.split(b" ", 2)[1]
            if not self.respond(path, body):
                return

    def respond(self, path: bytes, body: bytes) -> bool:
        """Answer one request; False if the answer continues asynchronously."""
        t = self.transport
        assert t is not None
        anthropic = path.startswith(b"/v1/messages")
        if b'"stream":true' not in body.replace(b" ", b""):
            data = MESSAGE_BODY if anthropic else CHAT_BODY
            t.write(_head("200 OK", b"application/json", len(data)) + data)
            return True
        evs = anthropic_events(self.events) if anthropic else chat_events(self.events, b'"include_usage"' in body)
        t.write(_head("200 OK", b"text/event-stream", None))
        if not self.interval:
            t.write(b"".join(_chunk(e) for e in evs) + b"0\r\n\r\n")
            return True
        self.busy = True
        self.streaming = asyncio.ensure_future(self.stream(evs))
        return False

    async def stream(self, evs: list[bytes]) -> None:
        t = self.transport
        assert t is not None
        for e in evs:
            if t.is_closing():
                return
            t.write(_chunk(e))
            await asyncio.sleep(self.interval)
        t.write(b"0\r\n\r\n")
        self.busy = False
        self.process()


async def serve(host: str, port: int, events: int, interval_ms: float) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = await loop.create_server(lambda: FastMock(events, interval_ms / 1000), sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description="Fast fixed-answer mock upstream for the bench")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--events", type=int, default=20, help="content events per stream")
    p.add_argument("--interval-ms", type=float, default=0.0, help="pause between stream events")
    p.add_argument("--procs", type=int, default=1, help="processes sharing the port")
    a = p.parse_args()
    import uvloop

    for _ in range(a.procs - 1):
        if os.fork() == 0:
            break
    uvloop.run(serve(a.host, a.port, a.events, a.interval_ms))


if __name__ == "__main__":
    main()
