"""The bundled mock speaks tool calls and reasoning in all three protocols,
as the official SDKs parse them (through the gateway, pass-through), and
keeps what it reported so a usage row can be checked against it."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from .conftest import UPSTREAM_KEY, Gateway, Upstream

ARGS = {"command": "echo tool-ok", "description": "print a word"}
STEER = {"x-mock-tool": "Bash", "x-mock-tool-args": json.dumps(ARGS)}


CHAT_TOOL = {"type": "function", "function": {"name": "Bash", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}}}}}
ANTHROPIC_TOOL = {"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}
RESPONSES_TOOL = {"type": "function", "name": "Bash", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}}}}


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_tool_round_trip(oai: openai.AsyncOpenAI, pgateway: Gateway, upstream: Upstream,
                                    stream: bool) -> None:
    messages: list[Any] = [{"role": "user", "content": "run it"}]
    if stream:
        calls: dict[int, dict[str, str]] = {}
        finish = None
        async for chunk in await oai.chat.completions.create(
            model="gpt-test", messages=messages, tools=[CHAT_TOOL], stream=True, extra_headers=STEER,
        ):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for tc in c.delta.tool_calls or ():
                    slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    slot["id"] += tc.id or ""
                    slot["name"] += (tc.function.name or "") if tc.function else ""
                    slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        assert finish == "tool_calls" and len(calls) == 1
        call = calls[0]
    else:
        r = await oai.chat.completions.create(model="gpt-test", messages=messages, tools=[CHAT_TOOL],
                                              extra_headers=STEER)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        tc = r.choices[0].message.tool_calls[0]  # type: ignore[index]
        call = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}  # type: ignore[union-attr]
    assert call["name"] == "Bash" and json.loads(call["arguments"]) == ARGS and call["id"].startswith("call_")
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": "Bash", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "line one\ntool-ok\n"},
    ]
    r2 = await oai.chat.completions.create(model="gpt-test", messages=messages, tools=[CHAT_TOOL],
                                           extra_headers=STEER)
    assert r2.choices[0].message.content == "The tool said: tool-ok"
    assert r2.usage is not None and r2.usage.completion_tokens == 4
    rows = await pgateway.wait_usage(2)
    reported = [u for p, u in upstream.state.reported if p == "/v1/chat/completions"]
    assert [(r["input_tokens"], r["output_tokens"]) for r in rows] == [
        (u["prompt_tokens"], u["completion_tokens"]) for u in reported]


async def test_chat_reasoning_content(gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    headers = {"Authorization": f"Bearer {key}", "x-mock-reasoning": "3", "x-mock-reasoning-content": "on"}
    async with http.post(gateway.url + "/v1/chat/completions", headers=headers,
                         json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}) as r:
        body = await r.json()
    assert body["choices"][0]["message"]["reasoning_content"] == "Let me think"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3


async def test_anthropic_tool_use_and_thinking_stream(claude: anthropic.AsyncAnthropic, pgateway: Gateway,
                                                      upstream: Upstream) -> None:
    headers = {**STEER, "x-mock-reasoning": "4"}
    async with claude.messages.stream(
        model="claude-test", max_tokens=256, tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "run it"}], extra_headers=headers,
    ) as s:
        msg = await s.get_final_message()
    assert msg.stop_reason == "tool_use"
    thinking, use = msg.content
    assert thinking.type == "thinking" and thinking.thinking == "Let me think about" and thinking.signature
    assert use.type == "tool_use" and use.name == "Bash" and use.input == ARGS and use.id.startswith("toolu_")
    follow = await claude.messages.create(
        model="claude-test", max_tokens=256, tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "run it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": "Bash", "input": ARGS}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                          "content": [{"type": "text", "text": "tool-ok"}]}]},
        ],
        extra_headers=STEER,
    )
    assert follow.stop_reason == "end_turn" and follow.content[0].text == "The tool said: tool-ok"  # type: ignore[union-attr]
    rows = await pgateway.wait_usage(2)
    reported = [u for p, u in upstream.state.reported if p == "/v1/messages"]
    assert [(r["input_tokens"], r["output_tokens"], r["reasoning_tokens"]) for r in rows] == [
        (u["input_tokens"], u["output_tokens"], u.get("output_tokens_details", {}).get("thinking_tokens", 0))
        for u in reported]


async def test_anthropic_thinking_omitted_non_stream(claude: anthropic.AsyncAnthropic) -> None:
    msg = await claude.messages.create(
        model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
        extra_body={"thinking": {"type": "adaptive", "display": "omitted"}}, extra_headers={"x-mock-reasoning": "2"},
    )
    thinking, text = msg.content
    assert thinking.type == "thinking" and thinking.thinking == "" and thinking.signature
    assert text.type == "text"


async def test_responses_function_call_and_reasoning_stream(oai: openai.AsyncOpenAI, pgateway: Gateway,
                                                            upstream: Upstream) -> None:
    headers = {**STEER, "x-mock-reasoning": "2"}
    async with oai.responses.stream(
        model="gpt-test", input="run it", tools=[RESPONSES_TOOL],  # type: ignore[list-item]
        reasoning={"summary": "auto"}, include=["reasoning.encrypted_content"], extra_headers=headers,
    ) as s:
        final = await s.get_final_response()
    reasoning, call = final.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "Let me"
    assert reasoning.encrypted_content
    assert call.type == "function_call" and call.name == "Bash" and json.loads(call.arguments) == ARGS
    follow = await oai.responses.create(
        model="gpt-test", previous_response_id=final.id, tools=[RESPONSES_TOOL],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "tool-ok"}], extra_headers=STEER,
    )
    assert follow.output_text == "The tool said: tool-ok" and follow.id != final.id
    assert follow.previous_response_id == final.id
    rows = await pgateway.wait_usage(2)
    reported = [u for p, u in upstream.state.reported if p == "/v1/responses"]
    assert [(r["input_tokens"], r["output_tokens"], r["reasoning_tokens"]) for r in rows] == [
        (u["input_tokens"], u["output_tokens"], u["output_tokens_details"]["reasoning_tokens"]) for u in reported]


async def test_mock_keeps_responses_and_refuses_unknown_previous(upstream: Upstream,
                                                                 http: aiohttp.ClientSession) -> None:
    """Straight at the mock: what a gateway routing by response id relies on."""
    auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    url = upstream.base_url + "/responses"
    async with http.post(url, headers=auth, json={"model": "m", "input": "one two"}) as r:
        first = await r.json()
    async with http.post(url, headers=auth, json={"model": "m", "input": "x", "store": False}) as r:
        unstored = await r.json()
    assert first["id"] != unstored["id"]
    async with http.get(f"{url}/{first['id']}", headers=auth) as r:
        assert r.status == 200 and (await r.json())["id"] == first["id"]
    async with http.get(f"{url}/{first['id']}/input_items", headers=auth) as r:
        items = await r.json()
    assert items["object"] == "list" and items["data"][0]["content"][0]["text"] == "one two"
    async with http.get(f"{url}/{unstored['id']}", headers=auth) as r:
        assert r.status == 404
    follow = {"model": "m", "input": "x", "previous_response_id": unstored["id"]}
    async with http.post(url, headers=auth, json=follow) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "previous_response_not_found"
    async with http.post(f"{url}/{first['id']}/cancel", headers=auth) as r:
        assert (await r.json())["status"] == "cancelled"
    async with http.delete(f"{url}/{first['id']}", headers=auth) as r:
        assert (await r.json()) == {"id": first["id"], "object": "response.deleted", "deleted": True}
    async with http.get(f"{url}/{first['id']}", headers=auth) as r:
        assert r.status == 404
    async with http.post(url + "/input_tokens", headers=auth, json={"model": "m", "input": "a b c"}) as r:
        assert (await r.json()) == {"object": "response.input_tokens", "input_tokens": 3}


async def test_mock_responses_websocket(upstream: Upstream, http: aiohttp.ClientSession) -> None:
    """The mock's Responses WebSocket: a warm-up (generate: false), then
    responses chained on the connection's last one although not stored."""
    upstream.state.steer.update(STEER)
    auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    async with http.ws_connect(upstream.base_url + "/responses", headers=auth) as ws:

        async def create(**body: Any) -> list[dict[str, Any]]:
            await ws.send_str(orjson.dumps({"type": "response.create", "model": "m", "store": False, **body}).decode())
            out = []
            while True:
                ev = orjson.loads(await ws.receive_str())
                out.append(ev)
                if ev["type"] in ("response.completed", "error"):
                    return out

        warm = await create(input=[], tools=[RESPONSES_TOOL], generate=False)
        assert [e["type"] for e in warm] == ["response.created", "response.in_progress", "response.completed"]
        first = await create(input="run it", tools=[RESPONSES_TOOL], previous_response_id=warm[-1]["response"]["id"])
        call = first[-1]["response"]["output"][0]
        assert call["type"] == "function_call" and json.loads(call["arguments"]) == ARGS
        assert [e["sequence_number"] for e in first] == list(range(len(first)))
        second = await create(input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "ok"}],
                              tools=[RESPONSES_TOOL], previous_response_id=first[-1]["response"]["id"])
        assert second[-1]["response"]["output"][0]["content"][0]["text"] == "The tool said: ok"
        stale = await create(input="x", previous_response_id=warm[-1]["response"]["id"])
        assert stale[-1]["type"] == "error" and stale[-1]["status"] == 400
        assert stale[-1]["error"]["code"] == "previous_response_not_found"
    assert [f["type"] for f in upstream.state.ws_frames] == ["response.create"] * 4
    assert [u["output_tokens"] for _, u in upstream.state.reported] == [0, 1 + len(orjson.dumps(ARGS)) // 4, 4]


async def test_mock_count_tokens_matches_messages(upstream: Upstream, http: aiohttp.ClientSession) -> None:
    auth = {"x-api-key": UPSTREAM_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "one two three four"}]}
    async with http.post(upstream.base_url + "/messages/count_tokens", headers=auth, json=body) as r:
        counted = await r.json()
    async with http.post(upstream.base_url + "/messages", headers=auth, json=body) as r:
        billed = (await r.json())["usage"]["input_tokens"]
    assert counted == {"input_tokens": billed} and billed == 4


@pytest.mark.parametrize(("path", "body"), [
    ("/messages", {"model": "c", "max_tokens": 5, "messages": 3.5}),
    ("/messages", {"model": "c", "max_tokens": 5}),
    ("/responses", {"model": "m", "input": True}),
    ("/images/generations", {"model": "i", "prompt": "p", "n": {}}),
    ("/images/generations", {"model": "i", "prompt": "p", "n": 1e308}),
    ("/images/generations", {"model": "i", "prompt": "p", "n": 11}),
])
async def test_mock_answers_a_malformed_body_400(upstream: Upstream, http: aiohttp.ClientSession, path: str,
                                                 body: dict[str, Any]) -> None:
    """As the providers do, never a 500 (a crash the gateway would relay as
    the upstream's) nor an answer as large as a hostile ``n`` asks for."""
    auth = {"x-api-key": UPSTREAM_KEY, "Authorization": f"Bearer {UPSTREAM_KEY}"}
    async with http.post(upstream.base_url + path, headers=auth, json=body) as r:
        assert r.status == 400, await r.text()
