"""Golden conversations through every pair of client protocol and wire
protocol, with the official SDKs as clients and the bundled mock speaking
the upstream's protocol (gateway.mock.script plays the same answer in each).

For each pair (and each same-protocol pass-through, as the control): plain
text, text then a tool call with streamed arguments, parallel tool calls,
reasoning, streaming and not; images in the request; upstream errors; and
streams cut by the upstream and by the client. The assembled SDK objects
(text, tool calls with parsed arguments, stop reason, usage) must equal the
expected ones, and every usage row must hold the same numbers in the
gateway's one meaning whatever the pair.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest

from .conftest import Gateway, GatewayFactory, Upstream, config_toml, wire_upstreams

CLIENTS = ("chat", "messages", "responses")
WIRES = ("chat", "messages", "responses")

WIRE_MODELS = """
[[models]]
name = "via-chat"
routes = [{ upstream = "wire-chat", model = "up-chat" }]

[[models]]
name = "via-messages"
routes = [{ upstream = "wire-messages", model = "up-messages" }]
max_output_tokens = 1000

[[models]]
name = "via-responses"
routes = [{ upstream = "wire-responses", model = "up-responses" }]
"""

USAGE = {"input": 30, "output": 12, "cached": 8, "cache_write": 4, "reasoning": 5}
WEATHER = {"city": "Paris", "days": [1, 2], "units": {"temp": "C"}}
TOOLS = [("get_weather", "Weather for a city"), ("get_time", "Time in a city")]
SCENARIOS: dict[str, dict[str, Any]] = {
    "plain": {"pieces": [{"text": "Hello there, my friend."}], "usage": USAGE},
    "tool": {"pieces": [{"text": "Let me check."}, {"tool": "get_weather", "id": "call_w1", "args": WEATHER}],
             "usage": USAGE},
    "parallel": {"pieces": [{"tool": "get_weather", "id": "call_p1", "args": {"city": "Oslo"}},
                            {"tool": "get_time", "id": "call_p2", "args": {"city": "Lima", "tz": True}}],
                 "usage": USAGE},
    "reasoning": {"pieces": [{"thinking": "The user greets me, so greet back.", "signature": "EqSig0123abc"},
                             {"text": "Hi!"}], "usage": USAGE},
    "length": {"pieces": [{"text": "This answer is cut"}], "stop": "length", "usage": USAGE},
}


@dataclass
class Answer:
    """What a client's SDK assembled, in one shape for every protocol."""

    text: str
    tools: list[tuple[str, Any]]
    stop: str
    usage: tuple[int, int, int]  # input (cached included), output, cached
    thinking: str = ""
    signature: str = ""


def expected(name: str, wire: str) -> Answer:
    s = SCENARIOS[name]
    pieces = s["pieces"]
    text = "".join(p.get("text", "") for p in pieces)
    tools = [(p["tool"], p["args"]) for p in pieces if "tool" in p]
    stop = s.get("stop") or ("tool" if tools else "end")
    u = s["usage"]
    cached = u["cached"]
    return Answer(text, tools, stop, (u["input"], u["output"], cached),
                  "".join(p.get("thinking", "") for p in pieces))


def row_usage(name: str, wire: str) -> dict[str, int]:
    u = SCENARIOS[name]["usage"]
    return {"input_tokens": u["input"], "output_tokens": u["output"], "cached_tokens": u["cached"],
            "reasoning_tokens": u["reasoning"],
            # Only Anthropic reports cache writes; OpenAI counts them as plain input.
            "cache_write_tokens": u["cache_write"] if wire == "messages" else 0}


# ------------------------------------------------------------------ clients


def tool_defs(client: str) -> list[dict[str, Any]]:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    if client == "chat":
        return [{"type": "function", "function": {"name": n, "description": d, "parameters": schema}} for n, d in TOOLS]
    if client == "messages":
        return [{"name": n, "description": d, "input_schema": schema} for n, d in TOOLS]
    return [{"type": "function", "name": n, "description": d, "parameters": schema, "strict": False} for n, d in TOOLS]


CHAT_STOP = {"stop": "end", "tool_calls": "tool", "length": "length", "content_filter": "refusal"}
ANTHROPIC_STOP = {"end_turn": "end", "tool_use": "tool", "max_tokens": "length", "refusal": "refusal"}


def from_chat(c: Any, reasoning: str = "") -> Answer:
    msg = c.choices[0].message
    tools = [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls or ()]
    u = c.usage
    thinking = reasoning or (getattr(msg, "reasoning_content", None) or "")
    sig = "".join(b.get("signature", "") for b in getattr(msg, "thinking_blocks", None) or ())
    return Answer(msg.content or "", tools, CHAT_STOP[c.choices[0].finish_reason],
                  (u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens), thinking, sig)


def from_anthropic(m: Any) -> Answer:
    text = "".join(b.text for b in m.content if b.type == "text")
    tools = [(b.name, b.input) for b in m.content if b.type == "tool_use"]
    thinking = "".join(b.thinking for b in m.content if b.type == "thinking")
    sig = "".join(b.signature for b in m.content if b.type == "thinking")
    u = m.usage
    total = u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    return Answer(text, tools, ANTHROPIC_STOP[m.stop_reason], (total, u.output_tokens, u.cache_read_input_tokens or 0),
                  thinking, sig)


def from_responses(r: Any) -> Answer:
    tools = [(i.name, json.loads(i.arguments)) for i in r.output if i.type == "function_call"]
    thinking = "".join(s.text for i in r.output if i.type == "reasoning" for s in i.summary)
    sig = "".join(i.encrypted_content or "" for i in r.output if i.type == "reasoning")
    if r.status == "incomplete":
        stop = "refusal" if r.incomplete_details.reason == "content_filter" else "length"
    else:
        stop = "tool" if tools else "end"
    u = r.usage
    return Answer(r.output_text, tools, stop, (u.input_tokens, u.output_tokens, u.input_tokens_details.cached_tokens),
                  thinking, sig)


@dataclass
class Clients:
    oai: openai.AsyncOpenAI
    claude: anthropic.AsyncAnthropic
    gw: Gateway
    up: Upstream

    async def ask(self, client: str, model: str, script: dict[str, Any] | None, stream: bool,
                  content: Any = "What is the weather?", **extra: Any) -> Answer:
        headers = {"x-mock-script": orjson.dumps(script).decode()} if script is not None else {}
        if client == "chat":
            kw: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}],
                                  "tools": tool_defs(client), "extra_headers": headers, **extra}
            if not stream:
                return from_chat(await self.oai.chat.completions.create(**kw))
            reasoning: list[str] = []
            async with self.oai.chat.completions.stream(**kw, stream_options={"include_usage": True}) as s:
                async for ev in s:
                    if ev.type == "chunk" and ev.chunk.choices:
                        r = getattr(ev.chunk.choices[0].delta, "reasoning_content", None)
                        reasoning.append(r or "")
                try:
                    final = await s.get_final_completion()
                except openai.LengthFinishReasonError as e:  # the helper's way to say "length"
                    final = e.completion
            return from_chat(final, "".join(reasoning))
        if client == "messages":
            kw = {"model": model, "max_tokens": 500, "messages": [{"role": "user", "content": content}],
                  "tools": tool_defs(client), "extra_headers": headers, **extra}
            if not stream:
                return from_anthropic(await self.claude.messages.create(**kw))
            async with self.claude.messages.stream(**kw) as s:
                return from_anthropic(await s.get_final_message())
        kw = {"model": model, "input": [{"role": "user", "content": content}], "tools": tool_defs(client),
              "extra_headers": headers, **extra}
        if not stream:
            return from_responses(await self.oai.responses.create(**kw))
        async with self.oai.responses.stream(**kw) as rs:
            final = None
            async for ev in rs:
                # get_final_response only knows response.completed; an
                # answer cut by its output limit ends with .incomplete.
                if ev.type in ("response.completed", "response.incomplete"):
                    final = ev.response
            assert final is not None
            return from_responses(final)


@pytest.fixture
async def clients(make_gateway: GatewayFactory, upstream: Upstream) -> AsyncIterator[Clients]:
    gw = await make_gateway(config_toml(upstream.base_url, wire_upstreams(upstream.base_url, *WIRES) + WIRE_MODELS))
    key = await gw.key()
    async with httpx2.AsyncClient(trust_env=False, timeout=20) as http:
        yield Clients(openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, http_client=http, max_retries=0),
                      anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, http_client=http, max_retries=0),
                      gw, upstream)


PAIRS = [(c, w) for c in CLIENTS for w in WIRES]


def wire_of(up: Upstream) -> str:
    path = up.state.requests[-1].path
    return {"/v1/chat/completions": "chat", "/v1/messages": "messages", "/v1/responses": "responses"}[path]


@pytest.mark.parametrize(("client", "wire"), PAIRS, ids=[f"{c}-via-{w}" for c, w in PAIRS])
async def test_golden_conversations(clients: Clients, client: str, wire: str) -> None:
    model = f"via-{wire}"
    n = 0
    for name, script in SCENARIOS.items():
        for stream in (False, True):
            got = await clients.ask(client, model, script, stream)
            n += 1
            assert wire_of(clients.up) == wire
            want = expected(name, wire)
            where = f"{name}, stream={stream}"
            assert (got.text, got.tools, got.stop, got.usage) == (want.text, want.tools, want.stop, want.usage), where
            if name == "reasoning" and not (client == "chat" and wire == "chat" and not stream):
                assert got.thinking == want.thinking, where
                if {client, wire} == {"messages", "responses"}:
                    # Carried across as the reasoning item's encrypted content.
                    assert got.signature.endswith("EqSig0123abc"), where
                elif client == wire == "messages" or (client == "chat" and wire == "messages"):
                    assert got.signature == "EqSig0123abc", where
    rows = await clients.gw.wait_usage(n)
    assert len(rows) == n
    names = [name for name in SCENARIOS for _ in (0, 1)]
    for row, name in zip(rows, names, strict=True):
        assert row["status"] == 200 and row["error_type"] is None, (name, row)
        assert {k: row[k] for k in row_usage(name, wire)} == row_usage(name, wire), name
        assert row["upstream"] == f"wire-{wire}"


@pytest.mark.parametrize(("client", "wire"), PAIRS, ids=[f"{c}-via-{w}" for c, w in PAIRS])
async def test_images_reach_the_upstream_in_its_shape(clients: Clients, client: str, wire: str) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfakepixels").decode()
    data_url = f"data:image/png;base64,{png}"
    http_url = "https://example.test/cat.jpg"
    if client == "chat":
        content: Any = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "image_url", "image_url": {"url": http_url}}]
    elif client == "messages":
        content = [{"type": "text", "text": "Compare"},
                   {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                   {"type": "image", "source": {"type": "url", "url": http_url}}]
    else:
        content = [{"type": "input_text", "text": "Compare"}, {"type": "input_image", "image_url": data_url,
                                                               "detail": "auto"},
                   {"type": "input_image", "image_url": http_url, "detail": "auto"}]
    got = await clients.ask(client, f"via-{wire}", SCENARIOS["plain"], False, content)
    assert got.text == "Hello there, my friend."
    sent = orjson.loads(clients.up.state.requests[-1].body)
    if wire == "chat":
        parts = sent["messages"][-1]["content"]
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        texts = [p["text"] for p in parts if p["type"] == "text"]
    elif wire == "messages":
        parts = sent["messages"][-1]["content"]
        urls = [f"data:{p['source']['media_type']};base64,{p['source']['data']}" if p["source"]["type"] == "base64"
                else p["source"]["url"] for p in parts if p["type"] == "image"]
        texts = [p["text"] for p in parts if p["type"] == "text"]
    else:
        parts = sent["input"][-1]["content"]
        urls = [p["image_url"] for p in parts if p["type"] == "input_image"]
        texts = [p["text"] for p in parts if p["type"] == "input_text"]
    assert (texts, urls) == (["Compare"], [data_url, http_url])


ERRORS = {400: (openai.BadRequestError, anthropic.BadRequestError),
          429: (openai.RateLimitError, anthropic.RateLimitError),
          500: (openai.InternalServerError, anthropic.InternalServerError)}


@pytest.mark.parametrize(("client", "wire"), PAIRS, ids=[f"{c}-via-{w}" for c, w in PAIRS])
async def test_upstream_errors_arrive_in_the_client_shape(clients: Clients, client: str, wire: str) -> None:
    for status, (oai_error, claude_error) in ERRORS.items():
        for stream in (False, True):
            with pytest.raises(claude_error if client == "messages" else oai_error) as e:
                # Retry-After 0: the route is not cooled for the next case.
                steer = {"x-mock-status": str(status), "x-mock-retry-after": "0"}
                await clients.ask(client, f"via-{wire}", None, stream, extra_headers=steer)
            assert e.value.status_code == status
            body = e.value.body
            if client == "messages":
                # The SDK keeps the whole body: Anthropic's shape.
                assert isinstance(body, dict) and body["type"] == "error", body
                assert body["error"]["message"] == f"Mock failure {status}."
            else:
                assert isinstance(body, dict) and body["message"] == f"Mock failure {status}.", body
    rows = await clients.gw.wait_usage(6)
    assert [r["status"] for r in rows] == [400, 400, 429, 429, 500, 500]


@pytest.mark.parametrize(("client", "wire"), PAIRS, ids=[f"{c}-via-{w}" for c, w in PAIRS])
async def test_cut_streams_record_what_was_seen(clients: Clients, client: str, wire: str) -> None:
    # Upstream cut after a few events: the client's stream breaks; the row
    # has the upstream's status and the usage seen (Anthropic says its input
    # count first, OpenAI only at the end).
    script = {**SCENARIOS["tool"], "cut": 6}
    with pytest.raises((openai.APIError, anthropic.APIError, httpx2.HTTPError, RuntimeError)):
        await clients.ask(client, f"via-{wire}", script, True)
    (row,) = await clients.gw.wait_usage(1)
    assert (row["status"], row["error_type"]) == (502, "upstream_disconnected")
    # message_start: the input and a first output token.
    seen = (USAGE["input"], 1) if wire == "messages" else (0, 0)
    assert (row["input_tokens"], row["output_tokens"]) == seen
    assert row["cached_tokens"] == (USAGE["cached"] if wire == "messages" else 0)

    # The client leaves mid-stream: 499, the upstream request cancelled.
    slow = {**SCENARIOS["plain"], "delay_ms": 100}
    gone_before = clients.up.state.disconnects
    task = asyncio.create_task(clients.ask(client, f"via-{wire}", slow, True))
    await asyncio.sleep(0.35)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows = await clients.gw.wait_usage(2)
    assert (rows[1]["status"], rows[1]["error_type"]) == (499, "client_disconnected")
    # Billed for what the client got (gateway.intake.estimate_cut): the
    # input count where the upstream said it (Anthropic, at the start), else
    # the local estimate; at least one output token per event relayed.
    if wire == "messages":
        assert rows[1]["input_tokens"] == USAGE["input"]
    else:
        assert rows[1]["input_tokens"] > 0
    assert rows[1]["output_tokens"] > 0
    for _ in range(100):
        if clients.up.state.disconnects > gone_before:
            break
        await asyncio.sleep(0.02)
    assert clients.up.state.disconnects == gone_before + 1


async def test_a_field_without_counterpart_is_a_400_naming_it(clients: Clients) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await clients.oai.chat.completions.create(model="via-messages", messages=[{"role": "user", "content": "x"}],
                                                  seed=7)
    assert e.value.body["param"] == "seed" and "seed" in e.value.body["message"]  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as ae:
        await clients.claude.messages.create(model="via-responses", max_tokens=10, stop_sequences=["END"],
                                             messages=[{"role": "user", "content": "x"}])
    assert "stop_sequences" in ae.value.message
    with pytest.raises(openai.BadRequestError) as e:
        await clients.oai.responses.create(model="via-chat", input="x", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert clients.up.state.requests == []  # nothing went upstream
    rows = await clients.gw.wait_usage(3)
    assert [r["status"] for r in rows] == [400, 400, 400]
