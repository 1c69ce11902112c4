"""The rest of OpenAI's surface that the SDKs call, in the real wire
formats: ``/v1/embeddings``, ``/v1/completions`` (JSON and SSE, with
``stream_options.include_usage``), ``/v1/moderations``,
``/v1/audio/transcriptions`` and ``/v1/audio/translations`` (multipart
forms; JSON, text or, for transcriptions, SSE answers) and
``/v1/audio/speech`` (audio bytes, or SSE with ``stream_format: "sse"``).

Usage as OpenAI reports it: embeddings ``prompt_tokens``; completions like
chat; transcriptions ``{"type": "tokens", input_tokens, output_tokens}``
(audio input: one token per 100 bytes of file); translations
``{"type": "duration", "seconds"}``; a speech stream's
``speech.audio.done`` ``{input_tokens, output_tokens}``; moderations none.

Steering headers, besides the shared ones of gateway.mock.app:
- ``x-mock-audio-bytes: N``  size of a speech answer (default 48000), sent
  in 16 KiB pieces
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import orjson
from aiohttp import web

from .common import MOCK, WORDS, _check, _int, chat_usage, json_body, openai_error
from .images import parse_form
from .tools import new_id


def _words(value: Any) -> int:
    if isinstance(value, str):
        return max(len(value.split()), 1)
    if isinstance(value, list):
        return max(sum(_words(v) for v in value), 1)
    return 1


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


async def embeddings(request: web.Request) -> web.Response:
    obj, early = await json_body(request)
    if obj is None:
        assert early is not None
        return early
    inputs = obj.get("input")
    if inputs is None:
        return openai_error(400, "'input' is a required property")
    items = inputs if isinstance(inputs, list) and not all(isinstance(x, int) for x in inputs) else [inputs]
    if len(items) > 2048:
        return openai_error(400, "Invalid 'input': at most 2048 inputs.")
    dims = obj.get("dimensions", 8)
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= 4096:
        return openai_error(400, "Invalid 'dimensions': expected an integer from 1 to 4096.")
    data = []
    for i, item in enumerate(items):
        vec = [round(((len(str(item)) + k) % 17) / 17 - 0.5, 6) for k in range(dims)]
        emb: Any = vec
        if obj.get("encoding_format") == "base64":
            emb = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = _words(items)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    request.app[MOCK].report("/v1/embeddings", usage)
    return _json({"object": "list", "data": data, "model": obj.get("model"), "usage": usage})


async def completions(request: web.Request) -> web.StreamResponse:
    obj, early = await json_body(request)
    if obj is None:
        assert early is not None
        return early
    n = _int(request, "x-mock-chunks", 5)
    words = [WORDS[i % len(WORDS)] for i in range(n)]
    prompt = _words(obj.get("prompt"))
    usage = chat_usage(request, prompt, n)
    request.app[MOCK].report("/v1/completions", usage)
    cid, created, model = new_id("cmpl-mock"), int(time.time()), obj.get("model")

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    if obj.get("stream") is not True:
        return _json({"id": cid, "object": "text_completion", "created": created, "model": model,
                      "choices": [choice("".join(words), "length")], "usage": usage})
    so = obj.get("stream_options")
    include_usage = isinstance(so, dict) and so.get("include_usage") is True
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    def chunk(choices: list[Any], u: Any = None) -> bytes:
        c: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                             "choices": choices}
        if include_usage:
            c["usage"] = u
        return b"data: " + orjson.dumps(c) + b"\n\n"

    with request.app[MOCK].stream():
        for i, w in enumerate(words):
            await resp.write(chunk([choice(w, "length" if i == n - 1 else None)]))
        if include_usage:
            await resp.write(chunk([], usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    return resp


async def moderations(request: web.Request) -> web.Response:
    obj, early = await json_body(request)
    if obj is None:
        assert early is not None
        return early
    inputs = obj.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    cats = ("harassment", "hate", "self-harm", "sexual", "violence")
    results = [{"flagged": False, "categories": dict.fromkeys(cats, False),
                "category_scores": dict.fromkeys(cats, 0.0001)} for _ in items]
    return _json({"id": new_id("modr-mock"), "model": obj.get("model") or "omni-moderation-latest",
                  "results": results})


async def _form(request: web.Request) -> tuple[dict[str, str], int] | web.Response:
    """The text fields and the audio file's size of a transcription form."""
    raw, early = await _check(request)
    if early is not None:
        return early
    ctype = request.headers.get("Content-Type", "")
    form = parse_form(ctype, raw) if ctype.startswith("multipart/form-data") else None
    if form is None:
        return openai_error(400, "Expected a multipart/form-data body.")
    files = [f for f in form.files if f["name"] == "file"]
    if not files or "model" not in form.fields:
        return openai_error(400, "'file' and 'model' are required.")
    return form.fields, int(files[0]["size"])


async def transcriptions(request: web.Request) -> web.StreamResponse:
    got = await _form(request)
    if isinstance(got, web.Response):
        return got
    fields, size = got
    words = [WORDS[i % len(WORDS)] for i in range(_int(request, "x-mock-chunks", 5))]
    text = "".join(words).strip()
    audio = max(size // 100, 1)
    usage = {"type": "tokens", "input_tokens": audio, "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
             "output_tokens": len(words), "total_tokens": audio + len(words)}
    request.app[MOCK].report("/v1/audio/transcriptions", usage)
    if fields.get("stream") == "true":
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        with request.app[MOCK].stream():
            for w in words:
                ev = {"type": "transcript.text.delta", "delta": w, "logprobs": None}
                await resp.write(b"data: " + orjson.dumps(ev) + b"\n\n")
            done = {"type": "transcript.text.done", "text": text, "logprobs": None, "usage": usage}
            await resp.write(b"data: " + orjson.dumps(done) + b"\n\n")
            await resp.write_eof()
        return resp
    if fields.get("response_format") == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    return _json({"text": text, "usage": usage})


async def translations(request: web.Request) -> web.Response:
    got = await _form(request)
    if isinstance(got, web.Response):
        return got
    fields, size = got
    text = "Hello from the mock upstream."
    if fields.get("response_format") == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    return _json({"text": text, "usage": {"type": "duration", "seconds": max(size // 16000, 1)}})


async def speech(request: web.Request) -> web.StreamResponse:
    obj, early = await json_body(request)
    if obj is None:
        assert early is not None
        return early
    if not isinstance(obj.get("input"), str) or not obj.get("voice"):
        return openai_error(400, "'input' and 'voice' are required.")
    size = _int(request, "x-mock-audio-bytes", 48000)
    audio = bytes(range(256)) * (size // 256 + 1)
    audio = audio[:size]
    piece = 16 * 1024
    if obj.get("stream_format") == "sse":
        usage = {"input_tokens": _words(obj["input"]), "output_tokens": max(size // 1000, 1)}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        request.app[MOCK].report("/v1/audio/speech", usage)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i in range(0, size, piece):
            ev = {"type": "speech.audio.delta", "audio": base64.b64encode(audio[i:i + piece]).decode()}
            await resp.write(b"data: " + orjson.dumps(ev) + b"\n\n")
        await resp.write(b"data: " + orjson.dumps({"type": "speech.audio.done", "usage": usage}) + b"\n\n")
        await resp.write_eof()
        return resp
    fmt = obj.get("response_format") or "mp3"
    resp = web.StreamResponse(headers={"Content-Type": "audio/mpeg" if fmt == "mp3" else f"audio/{fmt}"})
    await resp.prepare(request)  # chunked: the audio is sent as it is made
    for i in range(0, size, piece):
        await resp.write(audio[i:i + piece])
    await resp.write_eof()
    return resp


def register(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/moderations", moderations)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/translations", translations)
    app.router.add_post("/v1/audio/speech", speech)
