"""Image generations and edits through the gateway: JSON and multipart
bodies, the form's bytes forwarded unchanged, image SSE, usage and image
counts, large answers, and every kind of bad form."""

from __future__ import annotations

import gzip
import hashlib
import io

import aiohttp
import orjson
import pytest

from gateway.mock.images import IMAGE_FORMS, tiny_png

from .conftest import PROTOCOL_MODELS, Gateway, GatewayFactory, Upstream, config_toml

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
BOUNDARY = "----gwtestBoundary7MA4YWxkTrZu0gW"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def form(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]], boundary: str = BOUNDARY) -> bytes:
    out = b""
    for name, value in fields:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    for name, filename, data in files:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def multipart(boundary: str = BOUNDARY) -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sse_events(raw: bytes) -> list[dict[str, object]]:
    return [orjson.loads(b.split(b"data: ", 1)[1]) for b in raw.split(b"\n\n") if b.strip()]


async def test_generation_json(pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    raw = b'{"model":"gpt-image-test","prompt":"a red fox in snow","n":2,"size":"1024x1024"}'
    async with http.post(pgateway.url + GEN, data=raw, headers=auth(key)) as r:
        assert r.status == 200
        data = await r.json()
    assert len(data["data"]) == 2 and data["usage"]["input_tokens"] == 5
    assert upstream.state.requests[-1].body == raw
    (row,) = await pgateway.wait_usage(1)
    assert row["endpoint"] == GEN and row["images"] == 2 and row["stream"] == 0
    assert (row["input_tokens"], row["output_tokens"]) == (5, 544)
    # 5 in at 5.0, 544 out at 40.0 per 1M tokens, 2 images at 0.01
    assert row["cost"] == pytest.approx((5 * 5.0 + 544 * 40.0) / 1e6 + 2 * 0.01)


async def test_generation_stream(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    body = {"model": "gpt-image-test", "prompt": "a cat", "stream": True, "partial_images": 2}
    async with http.post(pgateway.url + GEN, json=body, headers={**auth(key), "x-mock-delay-ms": "10"}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        evs = sse_events(await r.read())
    assert [e["type"] for e in evs] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    (row,) = await pgateway.wait_usage(1)
    assert row["stream"] == 1 and row["images"] == 1 and row["error_type"] is None
    assert (row["input_tokens"], row["output_tokens"]) == (2, 272)


async def test_generation_stream_without_completed_event(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    body = {"model": "gpt-image-test", "prompt": "a cat", "stream": True, "partial_images": 1}
    async with http.post(pgateway.url + GEN, json=body, headers={**auth(key), "x-mock-fail": "truncate"}) as r:
        evs = sse_events(await r.read())
    assert [e["type"] for e in evs] == ["image_generation.partial_image"]
    (row,) = await pgateway.wait_usage(1)
    assert row["status"] == 200 and row["images"] == 0 and row["error_type"] == "upstream_incomplete_stream"


async def test_twenty_megabyte_answer_relayed_and_counted(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    size = 15_000_000  # base64: 20 MB
    total = 0
    tail = b""
    async with http.post(pgateway.url + GEN, json={"model": "gpt-image-test", "prompt": "big", "n": 1},
                         headers={**auth(key), "x-mock-image-bytes": str(size)}) as r:
        assert r.status == 200 and r.content_length is not None and r.content_length > 20_000_000
        async for chunk in r.content.iter_chunked(1 << 20):
            total += len(chunk)
            tail = (tail + chunk)[-4096:]
    assert total == r.content_length and tail.endswith(b"}")
    (row,) = await pgateway.wait_usage(1)
    assert row["images"] == 1 and (row["input_tokens"], row["output_tokens"]) == (1, 272)
    assert row["bytes_out"] == total


async def test_generation_gzip_despite_identity(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    async with http.post(pgateway.url + GEN, json={"model": "gpt-image-test", "prompt": "x", "n": 3},
                         headers={**auth(key), "x-mock-fail": "gzip"}, auto_decompress=False) as r:
        assert len(orjson.loads(gzip.decompress(await r.read()))["data"]) == 3
    (row,) = await pgateway.wait_usage(1)
    assert row["images"] == 3 and row["output_tokens"] == 3 * 272


async def test_edit_multipart_bytes_forwarded_unchanged(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await pgateway.key()
    png1, png2, mask = tiny_png(), tiny_png() + b"\x00trailer", bytes(range(256)) * 50
    raw = form([("prompt", "add a hat"), ("model", "gpt-image-test"), ("n", "1")],
               [("image[]", "a.png", png1), ("image[]", "b.png", png2), ("mask", "mask.png", mask)])
    async with http.post(pgateway.url + EDIT + "?v=2", data=raw, headers={**auth(key), **multipart()}) as r:
        assert r.status == 200
        assert (await r.json())["data"][0]["b64_json"]
    sent = upstream.state.requests[-1]
    assert sent.body == raw and sent.query == "v=2"
    assert sent.headers["Content-Type"] == f"multipart/form-data; boundary={BOUNDARY}"
    (got,) = upstream.running.runner.app[IMAGE_FORMS]
    assert got.fields == {"prompt": "add a hat", "model": "gpt-image-test", "n": "1"}
    assert [(f["name"], f["filename"], f["sha256"]) for f in got.files] == [
        ("image[]", "a.png", sha(png1)), ("image[]", "b.png", sha(png2)), ("mask", "mask.png", sha(mask))
    ]
    (row,) = await pgateway.wait_usage(1)
    assert row["endpoint"] == EDIT and row["images"] == 1 and row["bytes_in"] == len(raw)
    assert (row["input_tokens"], row["output_tokens"]) == (3 + 2 * 65, 272)


async def test_edit_multipart_renamed_model_rewrites_only_that_part(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await pgateway.key()
    png = tiny_png()
    raw = form([("model", "image-renamed"), ("prompt", "p")], [("image", "x.png", png)])
    async with http.post(pgateway.url + EDIT, data=raw, headers={**auth(key), **multipart()}) as r:
        assert r.status == 200
    sent = upstream.state.requests[-1].body
    assert sent == raw.replace(b"\r\n\r\nimage-renamed\r\n", b"\r\n\r\ngpt-image-upstream\r\n")
    (got,) = upstream.running.runner.app[IMAGE_FORMS]
    assert got.fields["model"] == "gpt-image-upstream" and got.files[0]["sha256"] == sha(png)


async def test_edit_multipart_stream(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    raw = form([("model", "gpt-image-test"), ("prompt", "p q"), ("stream", "true"), ("partial_images", "1")],
               [("image", "x.png", tiny_png())])
    async with http.post(pgateway.url + EDIT, data=raw, headers={**auth(key), **multipart()}) as r:
        evs = sse_events(await r.read())
    assert [e["type"] for e in evs] == ["image_edit.partial_image", "image_edit.completed"]
    (row,) = await pgateway.wait_usage(1)
    assert row["stream"] == 1 and row["images"] == 1 and row["input_tokens"] == 2 + 65


async def test_edit_json(pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    body = {"model": "image-renamed", "prompt": "p", "images": [{"image_url": "https://example.invalid/a.png"}]}
    async with http.post(pgateway.url + EDIT, json=body, headers=auth(key)) as r:
        assert r.status == 200
    assert orjson.loads(upstream.state.requests[-1].body) == {**body, "model": "gpt-image-upstream"}
    (row,) = await pgateway.wait_usage(1)
    assert row["images"] == 1 and row["input_tokens"] == 1 + 65


@pytest.mark.parametrize(
    ("data", "headers", "status", "code"),
    [
        (b"model=gpt-image-test", {"Content-Type": "application/x-www-form-urlencoded"}, 400,
         "unsupported_content_type"),
        (b'{"model":"gpt-image-test"}', {"Content-Type": "text/plain"}, 400, "unsupported_content_type"),
        (form([("prompt", "p")], [("image", "x.png", b"png")]), multipart(), 400, "missing_model"),
        (form([("model", "gpt-image-test")], [("image", "x.png", b"png")])[:-30], multipart(), 400,
         "invalid_multipart"),
        (b"garbage without any boundary", multipart(), 400, "invalid_multipart"),
        (form([("model", "gpt-image-test")], []), {"Content-Type": "multipart/form-data"}, 400, "invalid_multipart"),
        (form([("model", "gpt-image-test")], []).replace(b'; name="model"', b""), multipart(), 400,
         "invalid_multipart"),
        (b'[{"model":"gpt-image-test"}]', {"Content-Type": "application/json"}, 400, "invalid_json"),
        (form([("model", "nope")], []), multipart(), 404, "model_not_found"),
        (form([("model", "gpt-image-test")], [("image", "big.png", b"\x89PNG" + b"\0" * (2 << 20))]), multipart(),
         413, "request_too_large"),
    ],
    ids=["urlencoded", "text-plain", "no-model", "truncated", "garbage", "no-boundary", "nameless-part",
         "json-array", "unknown-model", "too-large"],
)
async def test_bad_edit_bodies(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession,
    data: bytes, headers: dict[str, str], status: int, code: str,
) -> None:
    key = await pgateway.key()
    async with http.post(pgateway.url + EDIT, data=io.BytesIO(data), headers={**auth(key), **headers}) as r:
        assert r.status == status
        err = (await r.json())["error"]
    assert err["code"] == code and err["message"]
    assert upstream.state.requests == []
    (row,) = await pgateway.wait_usage(1)
    assert row["status"] == status and row["error_type"] == code and row["endpoint"] == EDIT


async def test_edit_multipart_of_several_megabytes(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """Above the proxy's large-body threshold the form is sent upstream in
    pieces; still the same bytes, with the client's Content-Type."""
    toml = config_toml(upstream.base_url, PROTOCOL_MODELS.format(url=upstream.base_url))
    gw = await make_gateway(toml.replace("max_body_mb = 1", "max_body_mb = 8"))
    key = await gw.key()
    big = bytes(range(256)) * (3 * 4096)  # 3 MiB
    raw = form([("model", "gpt-image-test"), ("prompt", "p")], [("image", "big.png", big)])
    async with http.post(gw.url + EDIT, data=io.BytesIO(raw), headers={**auth(key), **multipart()}) as r:
        assert r.status == 200
    sent = upstream.state.requests[-1]
    assert sent.body == raw and sent.headers["Content-Type"] == f"multipart/form-data; boundary={BOUNDARY}"
    (got,) = upstream.running.runner.app[IMAGE_FORMS]
    assert got.files[0]["sha256"] == sha(big)


async def test_the_mock_bounds_what_a_client_asks_of_it(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """The bundled mock (the demo's upstream, in the gateway's process)
    answers 400 to counts it cannot serve, as OpenAI does, rather than
    building them: an embedding of 2**63 - 1 dimensions took the demo to
    11.6 GB, 2**63 partial images streamed without end, a partial_images
    that is no integer or a script's usage beyond 64 bits was a 500."""
    key = await pgateway.key()
    url = pgateway.url
    body = {"model": "gpt-test", "input": "x", "dimensions": 2**63 - 1}
    async with http.post(url + "/v1/embeddings", json=body, headers=auth(key)) as r:
        assert r.status == 400 and "dimensions" in (await r.json())["error"]["message"]
    for value in (2**63, 4, "x"):
        body = {"model": "gpt-image-test", "prompt": "a cat", "stream": True, "partial_images": value}
        async with http.post(url + "/v1/images/generations", json=body, headers=auth(key)) as r:
            assert r.status == 400 and "partial_images" in (await r.json())["error"]["message"], value
    raw = form([("model", "gpt-image-test"), ("prompt", "p"), ("stream", "true"), ("partial_images", "x")],
               [("image", "a.png", tiny_png())])
    async with http.post(url + "/v1/images/edits", data=raw, headers={**auth(key), **multipart()}) as r:
        assert r.status == 400, await r.text()
    chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    for script, status in (('{"usage":{"input":18446744073709551615,"output":18446744073709551615}}', 200),
                           ('{"usage":{"input":"many"}}', 400)):
        async with http.post(url + "/v1/chat/completions", json=chat,
                             headers={**auth(key), "x-mock-script": script}) as r:
            assert r.status == status, await r.text()
    rows = await pgateway.wait_usage(7)
    assert [r["status"] for r in rows] == [400] * 5 + [200, 400]
    assert rows[5]["input_tokens"] == rows[5]["output_tokens"] == 0  # beyond 10**12: an upstream's garbage
