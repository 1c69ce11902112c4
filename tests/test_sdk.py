"""The official ``openai`` and ``anthropic`` SDKs pointed at the gateway
(base URL + a gateway key), against the bundled mock upstream."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import anthropic
import openai

from gateway.mock.images import IMAGE_FORMS

from .conftest import Gateway, Upstream


def write_png(path: Path, w: int = 48, h: int = 32) -> bytes:
    """A real RGB PNG with a gradient, written to ``path``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\0" + b"".join(bytes((x * 5 % 256, y * 7 % 256, (x * y) % 256)) for x in range(w)) for y in range(h)
    )
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    path.write_bytes(data)
    return data


async def test_anthropic_messages_create(claude: anthropic.AsyncAnthropic, pgateway: Gateway) -> None:
    msg = await claude.messages.create(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "hello there you"}],
        extra_headers={"x-mock-cached": "2", "x-mock-cache-creation": "1"},
    )
    assert msg.content[0].type == "text" and msg.content[0].text == "Hello from the mock upstream"
    assert msg.usage.cache_read_input_tokens == 2
    (row,) = await pgateway.wait_usage(1)
    assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"]) == (3 + 1 + 2, 5, 2)


async def test_anthropic_messages_stream(claude: anthropic.AsyncAnthropic, pgateway: Gateway) -> None:
    async with claude.messages.stream(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-chunks": "9", "x-mock-deltas": "2", "x-mock-reasoning": "3"},
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello from the mock upstream. It streams one"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 9
    (row,) = await pgateway.wait_usage(1)
    assert row["stream"] == 1 and row["error_type"] is None
    assert (row["input_tokens"], row["output_tokens"], row["reasoning_tokens"]) == (1, 9, 3)


async def test_openai_responses_create(oai: openai.AsyncOpenAI, pgateway: Gateway) -> None:
    resp = await oai.responses.create(model="gpt-test", input="write a haiku",
                                      extra_headers={"x-mock-reasoning": "4", "x-mock-cached": "1"})
    assert resp.output_text == "Hello from the mock upstream"
    assert resp.usage is not None and resp.usage.output_tokens_details.reasoning_tokens == 4
    (row,) = await pgateway.wait_usage(1)
    assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"], row["reasoning_tokens"]) == (3, 5, 1, 4)


async def test_openai_responses_stream(oai: openai.AsyncOpenAI, pgateway: Gateway) -> None:
    async with oai.responses.stream(model="gpt-test", input="a b c d",
                                    extra_headers={"x-mock-chunks": "6", "x-mock-reasoning": "2"}) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello from the mock upstream."
    (row,) = await pgateway.wait_usage(1)
    assert row["stream"] == 1 and row["error_type"] is None
    assert (row["input_tokens"], row["output_tokens"], row["reasoning_tokens"]) == (4, 6, 2)


async def test_openai_responses_compact(oai: openai.AsyncOpenAI, pgateway: Gateway) -> None:
    out = await oai.responses.compact(model="gpt-test",
                                      input=[{"role": "user", "content": "summarise our long chat"}])
    assert out.object == "response.compaction" and out.output[-1].type == "compaction"
    (row,) = await pgateway.wait_usage(1)
    assert row["endpoint"] == "/v1/responses/compact" and (row["input_tokens"], row["output_tokens"]) == (4, 3)


async def test_openai_images_generate(oai: openai.AsyncOpenAI, pgateway: Gateway) -> None:
    res = await oai.images.generate(model="gpt-image-test", prompt="a lighthouse at dusk", n=2)
    assert res.data is not None and len(res.data) == 2 and res.data[0].b64_json
    assert res.usage is not None and res.usage.output_tokens == 544
    (row,) = await pgateway.wait_usage(1)
    assert row["images"] == 2 and (row["input_tokens"], row["output_tokens"]) == (4, 544)


async def test_openai_images_generate_stream(oai: openai.AsyncOpenAI, pgateway: Gateway) -> None:
    stream = await oai.images.generate(model="gpt-image-test", prompt="a boat", stream=True, partial_images=2)
    kinds = [e.type async for e in stream]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    (row,) = await pgateway.wait_usage(1)
    assert row["stream"] == 1 and row["images"] == 1 and (row["input_tokens"], row["output_tokens"]) == (2, 272)


async def test_openai_images_edit_with_png_file(
    oai: openai.AsyncOpenAI, pgateway: Gateway, upstream: Upstream, tmp_path: Path
) -> None:
    png = write_png(tmp_path / "photo.png")
    with open(tmp_path / "photo.png", "rb") as f:
        res = await oai.images.edit(model="image-renamed", image=f, prompt="make it blue")
    assert res.data is not None and res.data[0].b64_json
    (got,) = upstream.running.runner.app[IMAGE_FORMS]
    assert got.fields["model"] == "gpt-image-upstream" and got.fields["prompt"] == "make it blue"
    (file,) = got.files
    assert file["name"] == "image" and file["filename"] == "photo.png"
    assert file["sha256"] == hashlib.sha256(png).hexdigest() and file["size"] == len(png)
    (row,) = await pgateway.wait_usage(1)
    assert row["model"] == "image-renamed" and row["images"] == 1 and row["input_tokens"] == 3 + 65


async def test_openai_images_edit_with_several_images(
    oai: openai.AsyncOpenAI, pgateway: Gateway, upstream: Upstream, tmp_path: Path
) -> None:
    a, b = write_png(tmp_path / "a.png", 8, 8), write_png(tmp_path / "b.png", 16, 4)
    with open(tmp_path / "a.png", "rb") as fa, open(tmp_path / "b.png", "rb") as fb:
        await oai.images.edit(model="gpt-image-test", image=[fa, fb], prompt="merge")
    (got,) = upstream.running.runner.app[IMAGE_FORMS]
    hashes = [hashlib.sha256(x).hexdigest() for x in (a, b)]
    assert [(f["name"], f["sha256"]) for f in got.files] == [("image[]", hashes[0]), ("image[]", hashes[1])]
    (row,) = await pgateway.wait_usage(1)
    assert row["input_tokens"] == 1 + 2 * 65
