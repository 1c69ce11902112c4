"""The rest of the OpenAI surface the SDK calls, through the same
pass-through path: embeddings, completions, moderations, Responses
input_tokens, audio transcriptions/translations (forms, byte for byte),
speech (audio streamed through) and image variations; usage read where the
upstream reports it, one row each."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from gateway.mock.images import IMAGE_FORMS

from .conftest import Gateway, GatewayFactory, Upstream, config_toml


def reported(upstream: Upstream, path: str) -> list[dict[str, object]]:
    return [u for p, u in upstream.state.reported if p == path]


async def test_embeddings(oai: openai.AsyncOpenAI, pgateway: Gateway, upstream: Upstream) -> None:
    r = await oai.embeddings.create(model="gpt-test", input=["one two three", "four five"], dimensions=4)
    assert [len(d.embedding) for d in r.data] == [4, 4]
    b = await oai.embeddings.create(model="gpt-test", input="x y", encoding_format="base64")
    assert len(base64.b64decode(str(b.data[0].embedding))) == 8 * 4  # 8 float32, as sent
    rows = await pgateway.wait_usage(2)
    assert [r["endpoint"] for r in rows] == ["/v1/embeddings"] * 2
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [
        (u["prompt_tokens"], 0) for u in reported(upstream, "/v1/embeddings")] == [(5, 0), (2, 0)]


async def test_completions_plain_and_streamed_usage_hidden(oai: openai.AsyncOpenAI, pgateway: Gateway,
                                                           upstream: Upstream) -> None:
    r = await oai.completions.create(model="gpt-test", prompt="say this", max_tokens=5)
    assert r.choices[0].text == "Hello from the mock upstream"
    chunks = [c async for c in await oai.completions.create(model="gpt-test", prompt="a b c", stream=True)]
    assert "".join(c.choices[0].text for c in chunks) == "Hello from the mock upstream"
    assert all(c.choices and c.usage is None for c in chunks)  # the usage chunk the gateway asked for is hidden
    assert orjson.loads(upstream.state.requests[-1].body)["stream_options"] == {"include_usage": True}
    rows = await pgateway.wait_usage(2)
    assert [(r["endpoint"], r["stream"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        ("/v1/completions", 0, 2, 5), ("/v1/completions", 1, 3, 5)]


async def test_moderations_and_responses_input_tokens(oai: openai.AsyncOpenAI, pgateway: Gateway,
                                                      http: aiohttp.ClientSession) -> None:
    m = await oai.moderations.create(model="gpt-test", input="hello")
    assert m.results[0].flagged is False
    key = await pgateway.key()
    async with http.post(pgateway.url + "/v1/responses/input_tokens", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "gpt-test", "input": "one two three"}) as r:
        assert r.status == 200 and await r.json() == {"object": "response.input_tokens", "input_tokens": 3}
    rows = await pgateway.wait_usage(2)
    assert [(r["endpoint"], r["status"], r["input_tokens"]) for r in rows] == [
        ("/v1/moderations", 200, 0), ("/v1/responses/input_tokens", 200, 0)]


async def test_audio_transcription_forms_byte_for_byte(oai: openai.AsyncOpenAI, pgateway: Gateway,
                                                       upstream: Upstream, tmp_path: Path) -> None:
    audio = tmp_path / "clip.wav"
    audio.write_bytes(b"RIFF" + bytes(range(256)) * 20)  # 5124 bytes: 51 audio tokens at the mock
    t = await oai.audio.transcriptions.create(model="gpt-test", file=audio)
    assert t.text == "Hello from the mock upstream"
    sent = upstream.state.requests[-1]
    assert sent.path == "/v1/audio/transcriptions" and sent.headers["Content-Type"].startswith("multipart/form-data")
    assert audio.read_bytes() in sent.body
    streamed = [e async for e in await oai.audio.transcriptions.create(model="gpt-test", file=audio, stream=True)]
    assert streamed[-1].type == "transcript.text.done"
    text = await oai.audio.transcriptions.create(model="gpt-test", file=audio, response_format="text")
    assert str(text).strip() == "Hello from the mock upstream"
    with pytest.warns(DeprecationWarning):  # the SDK marks translations deprecated; the API still serves them
        tr = await oai.audio.translations.create(model="gpt-test", file=audio)
    assert tr.text == "Hello from the mock upstream."
    rows = await pgateway.wait_usage(4)
    assert [(r["endpoint"], r["stream"], r["input_tokens"], r["output_tokens"]) for r in rows] == [
        ("/v1/audio/transcriptions", 0, 51, 5), ("/v1/audio/transcriptions", 1, 51, 5),
        ("/v1/audio/transcriptions", 0, 0, 0), ("/v1/audio/translations", 0, 0, 0)]


async def test_audio_form_model_rename_and_bad_forms(make_gateway: GatewayFactory, upstream: Upstream,
                                                     http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(config_toml(upstream.base_url))
    key = await gw.key()
    form = aiohttp.FormData()
    form.add_field("model", "renamed")
    form.add_field("file", b"\x00\x01audio", filename="a.wav", content_type="audio/wav")
    async with http.post(gw.url + "/v1/audio/transcriptions", data=form,
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    assert b'name="model"\r\n\r\nupstream-name\r\n' in upstream.state.requests[-1].body
    async with http.post(gw.url + "/v1/audio/transcriptions", json={"model": "gpt-test"},
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "unsupported_content_type"
    bare = aiohttp.FormData()
    bare.add_field("file", b"x", filename="a.wav")
    async with http.post(gw.url + "/v1/audio/translations", data=bare,
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "missing_model"
    assert len(upstream.state.requests) == 1  # the refused forms never went upstream


async def test_speech_audio_streamed_through(pgateway: Gateway, upstream: Upstream,
                                             http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    headers = {"Authorization": f"Bearer {key}", "x-mock-audio-bytes": "400000"}
    chunks = []
    async with http.post(pgateway.url + "/v1/audio/speech", headers=headers,
                         json={"model": "gpt-test", "input": "say it", "voice": "alloy"}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "audio/mpeg"
        async for chunk in r.content.iter_any():
            chunks.append(chunk)
    audio = b"".join(chunks)
    assert audio == (bytes(range(256)) * 1563)[:400000]
    assert len(chunks) > 1  # relayed as it came, not collected into one answer
    async with http.post(pgateway.url + "/v1/audio/speech", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "gpt-test", "input": "say it now", "voice": "alloy",
                               "stream_format": "sse"}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        await r.read()
    rows = await pgateway.wait_usage(2)
    assert [(r["endpoint"], r["bytes_out"], r["input_tokens"], r["output_tokens"]) for r in rows[:1]] == [
        ("/v1/audio/speech", 400000, 0, 0)]
    (u,) = reported(upstream, "/v1/audio/speech")
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (u["input_tokens"], u["output_tokens"]) == (3, 48)


async def test_image_variations_form(oai: openai.AsyncOpenAI, pgateway: Gateway, upstream: Upstream,
                                     tmp_path: Path) -> None:
    png = tmp_path / "in.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.warns(DeprecationWarning):  # dall-e-2 variations: deprecated in the SDK, still served
        r = await oai.images.create_variation(image=png, n=2, model="gpt-image-test")
    assert len(r.data) == 2
    form = upstream.app[IMAGE_FORMS][-1] if upstream.app is not None else None
    assert form is not None and form.fields["model"] == "gpt-image-test" and form.files[0]["size"] == 72
    rows = await pgateway.wait_usage(1)
    assert (rows[0]["endpoint"], rows[0]["images"], rows[0]["model"]) == ("/v1/images/variations", 2,
                                                                         "gpt-image-test")


async def test_image_variation_form_without_model_routes_as_dall_e_2(pgateway: Gateway,
                                                                     http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    form = aiohttp.FormData()
    form.add_field("image", b"\x89PNG", filename="in.png", content_type="image/png")
    async with http.post(pgateway.url + "/v1/images/variations", data=form,
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 404 and "'dall-e-2'" in (await r.json())["error"]["message"]
    (row,) = await pgateway.wait_usage(1)
    assert row["model"] == "dall-e-2" and row["status"] == 404
