"""The usage readers on their own: fed real wire bytes split at awkward
places, and kept within bounded memory for long streams and large bodies."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import orjson
import pytest

from gateway.errors import GatewayError
from gateway.protocols.anthropic import MessageStreamUsage
from gateway.protocols.base import Counter, EventScanner, Usage, UsageReader
from gateway.protocols.forms import parse_multipart
from gateway.protocols.images import ImageUsage
from gateway.protocols.responses import ResponseUsage


def ev(name: str, obj: dict[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def anthropic_stream(n: int) -> Iterator[bytes]:
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 20, "output_tokens": 1}
    yield ev("message_start", {"type": "message_start", "message": {"id": "m", "usage": usage}})
    yield ev("ping", {"type": "ping"})
    for i in range(n):
        yield ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": f"w{i} \"usage\" "}})
        if i % 1000 == 999:
            yield ev("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": i + 1}})
    yield ev("message_stop", {"type": "message_stop"})


def run(reader: UsageReader, chunks: Iterator[bytes]) -> tuple[Usage, int]:
    """Feeds every chunk; returns the usage and the peak traced memory."""
    tracemalloc.start()
    try:
        for c in chunks:
            assert reader.feed(c) is c, "pass-through readers relay the very same bytes"
        usage = reader.finish()
        return usage, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def rechunk(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    buf = b""
    for c in chunks:
        data = buf + c
        end = len(data) - len(data) % size
        for i in range(0, end, size):
            yield data[i : i + size]
        buf = data[end:]
    if buf:
        yield buf


def test_anthropic_ten_thousand_events_bounded() -> None:
    usage, peak = run(MessageStreamUsage(), rechunk(anthropic_stream(10_000), 7))
    assert usage == Usage(input_tokens=33, output_tokens=10_000, cached_tokens=20, cache_write_tokens=3)
    assert peak < 256 * 1024


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 4096])
def test_anthropic_events_split_anywhere(size: int) -> None:
    usage, _ = run(MessageStreamUsage(), rechunk(anthropic_stream(1500), size))
    assert (usage.input_tokens, usage.output_tokens, usage.error) == (33, 1000, None)


def test_anthropic_crlf_events() -> None:
    data = b"".join(anthropic_stream(3)).replace(b"\n", b"\r\n")
    usage, _ = run(MessageStreamUsage(), rechunk(iter([data]), 11))
    assert usage.input_tokens == 33 and usage.error is None


def test_images_twenty_megabytes_bounded() -> None:
    def body() -> Iterator[bytes]:
        yield b'{"created":1,"data":[{"b64_json":"'
        for _ in range(320):
            yield b"QUFB" * 16384  # 64 KiB pieces, 20 MiB in all
        yield b'"},{"url":"https://x"}],"usage":{"input_tokens":7,"output_tokens":9}}'

    usage, peak = run(ImageUsage(False), body())
    assert (usage.images, usage.input_tokens, usage.output_tokens) == (2, 7, 9)
    assert peak < 1024 * 1024


def test_responses_final_event_usage_and_big_events_skipped() -> None:
    big = "x" * 300_000
    stream = (ev("response.created", {"type": "response.created", "response": {"usage": None}})
              + ev("response.output_text.delta", {"type": "response.output_text.delta", "delta": big})
              + ev("response.completed", {"type": "response.completed", "response": {
                  "output": [{"text": big}],
                  "usage": {"input_tokens": 5, "output_tokens": 6, "input_tokens_details": {"cached_tokens": 1},
                            "output_tokens_details": {"reasoning_tokens": 2}}}}))
    usage, peak = run(ResponseUsage(True), rechunk(iter([stream]), 8192))
    assert usage == Usage(5, 6, 1, 2)
    assert peak < 512 * 1024


def test_event_scanner_skips_oversized_event_then_recovers() -> None:
    scan = EventScanner(b'"usage"', limit=100)
    found = scan.feed(b'data: {"usage":{"a":1},"pad":"' + b"x" * 200)
    found += scan.feed(b'"}\n\ndata: {"usage":{"b":2}}\n\n')
    assert found == [{"usage": {"b": 2}}]


def test_counter_across_boundaries() -> None:
    c = Counter(b'"url":', b'"b64_json":')
    data = b'[{"url":"a"},{"b64_json":"b"},{"url":"c"}]'
    for i in range(len(data)):
        c.feed(data[i : i + 1])
    assert c.count == 3


def test_multipart_parse_preamble_quoted_boundary_and_offsets() -> None:
    raw = (b"preamble\r\n--b 1\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm-1\r\n"
           b"--b 1\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n\x89PNG\r\n"
           b"--b 1--\r\nepilogue")
    fields = parse_multipart('multipart/form-data; boundary="b 1"', raw)
    assert dict(fields) == {"model": "m-1"}
    start, end = fields.model_span
    assert raw[start:end] == b"m-1"


@pytest.mark.parametrize("raw", [b"", b"--b\r\n", b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--",
                                 b"--bXX\r\n\r\n", b"no boundary at all"])
def test_multipart_parse_rejects_broken_forms(raw: bytes) -> None:
    with pytest.raises(GatewayError) as e:
        parse_multipart("multipart/form-data; boundary=b", raw)
    assert e.value.status == 400
