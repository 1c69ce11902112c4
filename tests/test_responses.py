"""OpenAI Responses and compaction through the gateway: pass-through, SSE
relayed, usage from the body or the final response.* event, and bad input."""

from __future__ import annotations

import gzip

import aiohttp
import orjson
import pytest

from .conftest import UPSTREAM_KEY, Gateway, Upstream

RESP = "/v1/responses"
COMPACT = "/v1/responses/compact"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def events(raw: bytes) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.strip():
            lines = dict(line.split(b": ", 1) for line in block.split(b"\n"))
            out.append((lines[b"event"].decode(), orjson.loads(lines[b"data"])))
    return out


async def test_response_pass_through_and_usage(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    key = await gateway.key()
    raw = b'{"model": "gpt-test", "input": "tell me a story", "openai_extra": [1]}'
    headers = {**auth(key), "OpenAI-Beta": "responses=v1", "x-mock-cached": "2", "x-mock-reasoning": "3"}
    async with http.post(gateway.url + RESP + "?x=1", data=raw, headers=headers) as r:
        assert r.status == 200
        data = await r.json()
    assert data["object"] == "response" and data["status"] == "completed"
    sent = upstream.state.requests[-1]
    assert sent.body == raw and sent.query == "x=1" and sent.headers["OpenAI-Beta"] == "responses=v1"
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    (row,) = await gateway.wait_usage(1)
    assert row["endpoint"] == RESP and row["status"] == 200 and row["stream"] == 0
    assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"], row["reasoning_tokens"]) == (4, 5, 2, 3)


async def test_renamed_model(gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + RESP, json={"model": "renamed", "input": "x"}, headers=auth(key)) as r:
        assert r.status == 200
    assert orjson.loads(upstream.state.requests[-1].body) == {"model": "upstream-name", "input": "x"}


@pytest.mark.parametrize("end", ["completed", "incomplete", "failed"])
async def test_stream_usage_from_final_event(gateway: Gateway, http: aiohttp.ClientSession, end: str) -> None:
    key = await gateway.key()
    headers = {**auth(key), "x-mock-chunks": "7", "x-mock-cached": "1", "x-mock-reasoning": "4", "x-mock-end": end}
    async with http.post(gateway.url + RESP, json={"model": "gpt-test", "input": "a b", "stream": True},
                         headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        evs = events(await r.read())
    assert evs[0][0] == "response.created" and evs[-1][0] == f"response.{end}"
    assert [d["sequence_number"] for _, d in evs] == list(range(len(evs)))
    assert sum(n == "response.output_text.delta" for n, _ in evs) == 7
    (row,) = await gateway.wait_usage(1)
    assert row["stream"] == 1 and row["error_type"] is None
    assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"], row["reasoning_tokens"]) == (2, 7, 1, 4)


async def test_stream_with_final_event_larger_than_the_tail(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    """response.completed repeats the whole output (here > 64 KiB); usage
    follows it and is still found."""
    key = await gateway.key()
    async with http.post(gateway.url + RESP, json={"model": "gpt-test", "input": "a", "stream": True},
                         headers={**auth(key), "x-mock-chunks": "30000"}) as r:
        evs = events(await r.read())
    assert len(orjson.dumps(evs[-1][1])) > 128 * 1024
    (row,) = await gateway.wait_usage(1)
    assert (row["input_tokens"], row["output_tokens"]) == (1, 30000) and row["error_type"] is None


@pytest.mark.parametrize(("fail", "error_type"), [("error", "upstream_stream_error"),
                                                  ("truncate", "upstream_incomplete_stream")])
async def test_stream_error_event_or_no_final_event(
    gateway: Gateway, http: aiohttp.ClientSession, fail: str, error_type: str
) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + RESP, json={"model": "gpt-test", "input": "a", "stream": True},
                         headers={**auth(key), "x-mock-fail": fail, "x-mock-chunks": "6"}) as r:
        assert r.status == 200
        evs = events(await r.read())
    assert evs[-1][0] == ("error" if fail == "error" else "response.output_item.done")
    (row,) = await gateway.wait_usage(1)
    assert row["status"] == 200 and row["error_type"] == error_type
    assert (row["input_tokens"], row["output_tokens"]) == (0, 0)


async def test_gzip_despite_identity(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + RESP, json={"model": "gpt-test", "input": "a b c"}, auto_decompress=False,
                         headers={**auth(key), "x-mock-fail": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert orjson.loads(gzip.decompress(await r.read()))["object"] == "response"
    (row,) = await gateway.wait_usage(1)
    assert (row["input_tokens"], row["output_tokens"]) == (3, 5)


async def test_compact(gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    raw = orjson.dumps({"model": "gpt-test", "input": [{"role": "user", "content": "one two three"}]})
    async with http.post(gateway.url + COMPACT, data=raw, headers={**auth(key), "x-mock-cached": "2"}) as r:
        assert r.status == 200
        data = await r.json()
    assert data["object"] == "response.compaction" and data["output"][-1]["type"] == "compaction"
    assert upstream.state.requests[-1].path == COMPACT and upstream.state.requests[-1].body == raw
    (row,) = await gateway.wait_usage(1)
    assert row["endpoint"] == COMPACT and row["stream"] == 0
    assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"]) == (3, 3, 2)


@pytest.mark.parametrize(
    ("path", "data", "ctype", "code"),
    [
        (RESP, b"[1]", "application/json", "invalid_json"),
        (RESP, b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-test\r\n--x--\r\n",
         "multipart/form-data; boundary=x", "invalid_json"),
        (COMPACT, b'{"input": []}', "application/json", "missing_model"),
        (COMPACT, b"not json", "text/plain", "invalid_json"),
    ],
)
async def test_bad_bodies(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession, path: str, data: bytes, ctype: str, code: str
) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + path, data=data, headers={**auth(key), "Content-Type": ctype}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == code
    assert upstream.state.requests == []
    (row,) = await gateway.wait_usage(1)
    assert row["status"] == 400 and row["error_type"] == code
