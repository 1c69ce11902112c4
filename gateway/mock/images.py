"""Mock OpenAI Images upstream: ``POST /v1/images/generations`` (JSON) and
``POST /v1/images/edits`` (multipart/form-data or JSON), answering with
``b64_json`` images and gpt-image token usage, or with ``stream: true`` the
image SSE events: ``partial_images`` times ``image_generation.partial_image``
(``image_edit.partial_image`` for edits) then ``*.completed`` with usage, per
image.

Edits record what arrived in ``app[IMAGE_FORMS]`` (fields, and for each file
part its field name, filename, content type, size and SHA-256), parsed with
the standard library's MIME parser, independent of the gateway's own.

Steering headers, besides the shared ones of gateway.mock.app:
- ``x-mock-image-bytes: N``  size of each image (default: a real 1x1 PNG);
  the answer is then written in pieces with a Content-Length, as a large
  upstream answer would be
- ``x-mock-fail: truncate``  a stream that ends before its completed event
- ``x-mock-fail: gzip``      compress the answer although asked for identity
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import gzip
import hashlib
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .. import safejson
from .common import MOCK, _check, _int, json_body, openai_error


@dataclass
class ImageForm:
    """One edit request as the mock understood it."""

    content_type: str
    fields: dict[str, str] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)


IMAGE_FORMS = web.AppKey("mock-image-forms", list[ImageForm])


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0\0")) + chunk(
        b"IEND", b""
    )


PNG_B64 = base64.b64encode(tiny_png())


def parse_form(content_type: str, raw: bytes) -> ImageForm | None:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    if not msg.is_multipart() or msg.defects:
        return None
    form = ImageForm(content_type)
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            return None
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        filename = part.get_filename()
        if filename is None:
            form.fields[name] = payload.decode()
        else:
            form.files.append({"name": name, "filename": filename, "content_type": part.get_content_type(),
                               "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    return form


def image_usage(prompt: str, images_in: int, n: int) -> dict[str, Any]:
    text = max(len(prompt.split()), 1)
    image_in = 65 * images_in
    return {"input_tokens": text + image_in, "input_tokens_details": {"text_tokens": text, "image_tokens": image_in},
            "output_tokens": 272 * n, "total_tokens": text + image_in + 272 * n,
            "output_tokens_details": {"text_tokens": 0, "image_tokens": 272 * n}}


N_ERROR = "Invalid 'n': expected an integer from 1 to 10."


def _count(value: Any, low: int = 1, high: int = 10, default: int = 1) -> int | None:
    """``n`` as OpenAI takes it (1 to 10, default 1), or another count with
    other bounds; None if it is not one."""
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    try:
        n = int(value)
    except ValueError:
        return None
    return n if low <= n <= high else None


# The largest image the mock makes when asked (x-mock-image-bytes).
MAX_IMAGE_BYTES = 256 << 20


async def _answer(request: web.Request, params: dict[str, Any], images_in: int, kind: str) -> web.StreamResponse:
    n = _count(params.get("n"))
    if n is None:
        return openai_error(400, N_ERROR)
    partials = _count(params.get("partial_images"), 0, 3, 0)
    if partials is None:
        return openai_error(400, "Invalid 'partial_images': expected an integer from 0 to 3.")
    prompt = str(params.get("prompt", ""))
    u = image_usage(prompt, images_in, n)
    size = min(_int(request, "x-mock-image-bytes"), MAX_IMAGE_BYTES)
    b64 = PNG_B64 if not size else base64.b64encode(bytes(range(256)) * (size // 256 + 1))[: size * 4 // 3]
    fail = request.headers.get("x-mock-fail")
    common = {"background": "opaque", "output_format": "png", "quality": "low", "size": "1024x1024"}
    stream = params.get("stream") in (True, "true")
    if not stream:
        created = int(time.time())
        if size:
            # Written in pieces with a Content-Length, like a large real answer.
            head = b'{"created":%d,"background":"opaque","data":[' % created
            tail = b'],"output_format":"png","quality":"low","size":"1024x1024","usage":' + orjson.dumps(u) + b"}"
            items = [b'{"b64_json":"', b64, b'"}']
            parts = [head, *([*items, b","] * (n - 1)), *items, tail]
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = sum(len(p) for p in parts)
            await resp.prepare(request)
            for p in parts:
                for i in range(0, len(p), 1 << 20):
                    await resp.write(p[i : i + (1 << 20)])
            await resp.write_eof()
            return resp
        body = {"created": created, "data": [{"b64_json": PNG_B64.decode()} for _ in range(n)], **common, "usage": u}
        data = orjson.dumps(body)
        if fail == "gzip":
            return web.Response(body=gzip.compress(data), headers={"Content-Encoding": "gzip"},
                                content_type="application/json")
        return web.Response(body=data, content_type="application/json")

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    delay = _int(request, "x-mock-delay-ms") / 1000
    b64s = b64.decode()
    ev: dict[str, Any]
    for _ in range(n):
        for idx in range(partials):
            if delay:
                await asyncio.sleep(delay)
            ev = {"type": f"{kind}.partial_image", "b64_json": b64s, "created_at": int(time.time()),
                  "partial_image_index": idx, **common}
            await resp.write(b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n")
        if fail == "truncate":
            break
        ev = {"type": f"{kind}.completed", "b64_json": b64s, "created_at": int(time.time()), **common,
              "usage": image_usage(prompt, images_in, 1)}
        await resp.write(b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n")
    await resp.write_eof()
    request.app[MOCK].completed_streams += 1
    return resp


async def generations(request: web.Request) -> web.StreamResponse:
    obj, early = await json_body(request)
    if early is not None:
        return early
    assert obj is not None
    return await _answer(request, obj, 0, "image_generation")


async def edits(request: web.Request) -> web.StreamResponse:
    raw, early = await _check(request)
    if early is not None:
        return early
    ctype = request.headers.get("Content-Type", "")
    if ctype.startswith("multipart/form-data"):
        form = parse_form(ctype, raw)
        if form is None:
            return openai_error(400, "Could not parse multipart form.")
        request.app[IMAGE_FORMS].append(form)
        images_in = sum(1 for f in form.files if f["name"] in ("image", "image[]"))
        return await _answer(request, dict(form.fields), images_in, "image_edit")
    try:
        obj = safejson.loads(raw)
    except orjson.JSONDecodeError:
        return openai_error(400, "Expected multipart/form-data or a JSON body.")
    if not isinstance(obj, dict):
        return openai_error(400, "Request body must be an object.")
    request.app[IMAGE_FORMS].append(ImageForm(ctype, {k: v for k, v in obj.items() if isinstance(v, str)}))
    images = obj.get("images")
    return await _answer(request, obj, len(images) if isinstance(images, list) else 1, "image_edit")


async def variations(request: web.Request) -> web.StreamResponse:
    """dall-e-2 variations: a form with one ``image``; URLs back, no usage."""
    raw, early = await _check(request)
    if early is not None:
        return early
    ctype = request.headers.get("Content-Type", "")
    form = parse_form(ctype, raw) if ctype.startswith("multipart/form-data") else None
    if form is None or not any(f["name"] == "image" for f in form.files):
        return openai_error(400, "Expected a multipart/form-data body with an 'image' file.")
    request.app[IMAGE_FORMS].append(form)
    n = _count(form.fields.get("n"))
    if n is None:
        return openai_error(400, N_ERROR)
    data = [{"url": f"https://mock.invalid/variation-{i}.png"} for i in range(n)]
    return web.Response(body=orjson.dumps({"created": int(time.time()), "data": data}),
                        content_type="application/json")


def register(app: web.Application) -> None:
    app[IMAGE_FORMS] = []
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_post("/v1/images/edits", edits)
    app.router.add_post("/v1/images/variations", variations)
