"""The translate package on its own (no sockets): property tests that random
valid requests of one protocol translate to valid requests of every other
(checked against the SDK's own request types) and back to the same
conversation, and unit tests of the rules docs/translation.md states."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from anthropic.types import message_create_params as anthropic_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import response_create_params as responses_params

from gateway.errors import BadRequest
from gateway.protocols.base import Usage
from gateway.translate import TranslatedStream, client_error, pair
from gateway.translate.common import anthropic_usage_obj, chat_usage_obj, estimate_tokens, responses_usage_obj

from .sdkcheck import check

Obj = dict[str, Any]
# (non-streaming, streaming) request types of each protocol's SDK.
SDK_TYPES = {
    "chat": (chat_params.CompletionCreateParamsNonStreaming, chat_params.CompletionCreateParamsStreaming),
    "messages": (anthropic_params.MessageCreateParamsNonStreaming, anthropic_params.MessageCreateParamsStreaming),
    "responses": (responses_params.ResponseCreateParamsNonStreaming, responses_params.ResponseCreateParamsStreaming),
}
# Sampling fields Anthropic's API takes that this SDK release no longer lists.
ANTHROPIC_EXTRA = ("temperature", "top_p")
PAIRS = [(c, w) for c in SDK_TYPES for w in SDK_TYPES if c != w]


def valid(obj: Obj, protocol: str) -> None:
    if protocol == "messages":
        obj = {k: v for k, v in obj.items() if k not in ANTHROPIC_EXTRA}
    check(obj, SDK_TYPES[protocol][obj.get("stream") is True])


# --------------------------------------------------------------- strategies

words = st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=12).filter(str.strip)
ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=3, max_size=10)
names = st.sampled_from(["get_weather", "run_shell", "read_file"])
args = st.dictionaries(st.sampled_from(["city", "cmd", "path", "n"]),
                       st.one_of(words, st.integers(0, 99), st.booleans()), max_size=3)
images = st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "https://example.test/a.jpg"])


@st.composite
def conversations(draw: st.DrawFn) -> Obj:
    """A neutral conversation: turns of user text/images, assistant text and
    tool calls each answered by a result, plus request settings."""
    turns: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 3))):
        turns.append(("user", draw(words), draw(st.lists(images, max_size=2))))
        calls = draw(st.lists(st.tuples(ids, names, args), max_size=2, unique_by=lambda c: c[0]))
        if calls or draw(st.booleans()):
            turns.append(("assistant", draw(st.one_of(st.just(""), words)), calls))
            if calls:
                turns.append(("results", [(c[0], draw(words)) for c in calls]))
    if turns[-1][0] == "assistant":
        turns.append(("user", draw(words), []))
    tools = draw(st.lists(names, unique=True, max_size=3))
    effort = draw(st.sampled_from([None, "low", "medium", "high"]))
    return {
        "system": draw(st.one_of(st.none(), words)), "turns": turns, "tools": tools,
        "choice": draw(st.sampled_from(["auto", "none", "required", "fn"])) if tools else None,
        "parallel": draw(st.sampled_from([None, False])) if tools else None,
        "max": 32000 if effort else draw(st.integers(16, 64000)),
        "temperature": draw(st.one_of(st.none(), st.floats(0, 1))),
        "top_p": draw(st.one_of(st.none(), st.floats(0, 1))),
        "effort": effort,
        "schema": draw(st.sampled_from([None, {"type": "object", "properties": {"a": {"type": "string"}}}])),
        "stream": draw(st.booleans()),
    }


SCHEMA = {"type": "object", "properties": {"x": {"type": "string"}}}


def to_chat(c: Obj) -> Obj:
    msgs: list[Obj] = [{"role": "system", "content": c["system"]}] if c["system"] else []
    for t in c["turns"]:
        if t[0] == "user":
            parts = [{"type": "text", "text": t[1]}] + [{"type": "image_url", "image_url": {"url": u}} for u in t[2]]
            msgs.append({"role": "user", "content": parts if t[2] else t[1]})
        elif t[0] == "assistant":
            m: Obj = {"role": "assistant", "content": t[1] or None}
            if t[2]:
                m["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                                   for i, n, a in t[2]]
            msgs.append(m)
        else:
            msgs += [{"role": "tool", "tool_call_id": i, "content": r} for i, r in t[1]]
    req: Obj = {"model": "m", "messages": msgs, "max_completion_tokens": c["max"]}
    if c["tools"]:
        req["tools"] = [{"type": "function", "function": {"name": n, "description": f"does {n}", "parameters": SCHEMA}}
                        for n in c["tools"]]
        ch = c["choice"]
        req["tool_choice"] = {"type": "function", "function": {"name": c["tools"][0]}} if ch == "fn" else ch
        if c["parallel"] is False:
            req["parallel_tool_calls"] = False
    for k in ("temperature", "top_p"):
        if c[k] is not None:
            req[k] = c[k]
    if c["effort"]:
        req["reasoning_effort"] = c["effort"]
    if c["schema"]:
        req["response_format"] = {"type": "json_schema", "json_schema": {"name": "out", "schema": c["schema"]}}
    if c["stream"]:
        req["stream"] = True
    return req


def to_messages(c: Obj) -> Obj:
    msgs: list[Obj] = []

    def add(role: str, blocks: list[Obj]) -> None:
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"].extend(blocks)
        else:
            msgs.append({"role": role, "content": blocks})

    for t in c["turns"]:
        if t[0] == "user":
            blocks: list[Obj] = [{"type": "text", "text": t[1]}]
            for u in t[2]:
                src = ({"type": "base64", "media_type": "image/png", "data": u.split(",", 1)[1]}
                       if u.startswith("data:") else {"type": "url", "url": u})
                blocks.append({"type": "image", "source": src})
            add("user", blocks)
        elif t[0] == "assistant":
            blocks = [{"type": "text", "text": t[1]}] if t[1] else []
            blocks += [{"type": "tool_use", "id": i, "name": n, "input": a} for i, n, a in t[2]]
            add("assistant", blocks or [{"type": "text", "text": "ok"}])
        else:
            add("user", [{"type": "tool_result", "tool_use_id": i, "content": r} for i, r in t[1]])
    req: Obj = {"model": "m", "max_tokens": c["max"], "messages": msgs}
    if c["system"]:
        req["system"] = c["system"]
    if c["tools"]:
        req["tools"] = [{"name": n, "description": f"does {n}", "input_schema": SCHEMA} for n in c["tools"]]
        ch = c["choice"]
        tc: Obj = {"type": {"auto": "auto", "none": "none", "required": "any", "fn": "tool"}[ch]}
        if ch == "fn":
            tc["name"] = c["tools"][0]
        if c["parallel"] is False and ch != "none":
            tc["disable_parallel_tool_use"] = True
        req["tool_choice"] = tc
    for k in ("temperature", "top_p"):
        if c[k] is not None:
            req[k] = c[k]
    if c["effort"]:
        budget = {"low": 2048, "medium": 8192, "high": 24576}[c["effort"]]
        req["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if c["schema"]:
        req["output_config"] = {"format": {"type": "json_schema", "schema": c["schema"]}}
    if c["stream"]:
        req["stream"] = True
    return req


def to_responses(c: Obj) -> Obj:
    items: list[Obj] = []
    for t in c["turns"]:
        if t[0] == "user":
            parts = [{"type": "input_text", "text": t[1]}]
            parts += [{"type": "input_image", "image_url": u, "detail": "auto"} for u in t[2]]
            items.append({"type": "message", "role": "user", "content": parts})
        elif t[0] == "assistant":
            if t[1]:
                items.append({"type": "message", "role": "assistant", "content": t[1]})
            items += [{"type": "function_call", "call_id": i, "name": n, "arguments": json.dumps(a)}
                      for i, n, a in t[2]]
        else:
            items += [{"type": "function_call_output", "call_id": i, "output": r} for i, r in t[1]]
    req: Obj = {"model": "m", "input": items, "max_output_tokens": c["max"]}
    if c["system"]:
        req["instructions"] = c["system"]
    if c["tools"]:
        req["tools"] = [{"type": "function", "name": n, "description": f"does {n}", "parameters": SCHEMA,
                         "strict": False} for n in c["tools"]]
        ch = c["choice"]
        req["tool_choice"] = {"type": "function", "name": c["tools"][0]} if ch == "fn" else ch
        if c["parallel"] is False:
            req["parallel_tool_calls"] = False
    for k in ("temperature", "top_p"):
        if c[k] is not None:
            req[k] = c[k]
    if c["effort"]:
        req["reasoning"] = {"effort": c["effort"]}
    if c["schema"]:
        req["text"] = {"format": {"type": "json_schema", "name": "out", "schema": c["schema"]}}
    if c["stream"]:
        req["stream"] = True
    return req


RENDER = {"chat": to_chat, "messages": to_messages, "responses": to_responses}


# -------------------------------------------------------------- normal form


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or () if p.get("type") in ("text", "input_text", "output_text"))


def _url(p: Obj) -> str:
    if p["type"] == "image_url":
        return str(p["image_url"]["url"])
    if p["type"] == "input_image":
        return str(p["image_url"])
    s = p["source"]
    return f"data:{s['media_type']};base64,{s['data']}" if s["type"] == "base64" else str(s["url"])


def normal(req: Obj, protocol: str) -> tuple[Any, ...]:
    """The conversation and settings of a request, in one form: what a
    round trip must keep."""
    system: list[str] = []
    events: list[tuple[Any, ...]] = []

    def user_parts(content: Any) -> None:
        if isinstance(content, str):
            events.append(("user", content))
            return
        for p in content:
            if p["type"] in ("text", "input_text"):
                events.append(("user", p["text"]))
            elif p["type"] == "tool_result":
                events.append(("result", p["tool_use_id"], _text(p["content"])))
            else:
                events.append(("image", _url(p)))

    if protocol == "chat":
        for m in req["messages"]:
            role = m["role"]
            if role in ("system", "developer"):
                system.append(_text(m["content"]))
            elif role == "user":
                user_parts(m["content"])
            elif role == "assistant":
                if _text(m.get("content")):
                    events.append(("assistant", _text(m["content"])))
                for tc in m.get("tool_calls") or ():
                    events.append(("call", tc["id"], tc["function"]["name"], json.loads(tc["function"]["arguments"])))
            else:
                events.append(("result", m["tool_call_id"], _text(m["content"])))
        limit = req.get("max_completion_tokens", req.get("max_tokens"))
        tools = [(t["function"]["name"], t["function"].get("description"), t["function"]["parameters"])
                 for t in req.get("tools") or ()]
        tc = req.get("tool_choice")
        choice = tc["function"]["name"] if isinstance(tc, dict) else tc
        effort = req.get("reasoning_effort")
        rf = req.get("response_format")
        schema = rf["json_schema"]["schema"] if rf else None
    elif protocol == "messages":
        if req.get("system"):
            system.append(_text(req["system"]))
        for m in req["messages"]:
            if m["role"] == "user":
                user_parts(m["content"])
                continue
            if m["role"] == "system":
                system.append(_text(m["content"]))
                continue
            for b in m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]:
                if b["type"] == "text":
                    events.append(("assistant", b["text"]))
                elif b["type"] == "tool_use":
                    events.append(("call", b["id"], b["name"], b["input"]))
        limit = req["max_tokens"]
        tools = [(t["name"], t.get("description"), t["input_schema"]) for t in req.get("tools") or ()]
        tc = req.get("tool_choice")
        choice = None if tc is None else tc.get("name") or {"any": "required"}.get(tc["type"], tc["type"])
        thinking = req.get("thinking")
        effort = None
        if thinking:
            b = thinking["budget_tokens"]
            effort = "low" if b <= 2048 else "medium" if b <= 8192 else "high"
        oc = req.get("output_config")
        schema = oc["format"]["schema"] if oc else None
    else:
        if req.get("instructions"):
            system.append(req["instructions"])
        inp = req["input"]
        for item in [{"type": "message", "role": "user", "content": inp}] if isinstance(inp, str) else inp:
            kind = item.get("type", "message")
            if kind == "message" and item["role"] in ("system", "developer"):
                system.append(_text(item["content"]))
            elif kind == "message" and item["role"] == "user":
                user_parts(item["content"])
            elif kind == "message":
                events.append(("assistant", _text(item["content"])))
            elif kind == "function_call":
                events.append(("call", item["call_id"], item["name"], json.loads(item["arguments"])))
            elif kind == "function_call_output":
                events.append(("result", item["call_id"], _text(item["output"])))
        limit = req.get("max_output_tokens")
        tools = [(t["name"], t.get("description"), t["parameters"]) for t in req.get("tools") or ()]
        tc = req.get("tool_choice")
        choice = tc["name"] if isinstance(tc, dict) else tc
        effort = (req.get("reasoning") or {}).get("effort")
        fmt = (req.get("text") or {}).get("format")
        schema = fmt["schema"] if fmt else None
    parallel = req.get("parallel_tool_calls")
    if protocol == "messages":
        parallel = False if (req.get("tool_choice") or {}).get("disable_parallel_tool_use") else None
    if choice == "none" or not tools:
        parallel = None
    return ("\n".join(system), events, limit, tools, choice, parallel, req.get("temperature"), req.get("top_p"),
            effort, schema, req.get("stream") is True)


@pytest.mark.parametrize(("client", "wire"), PAIRS, ids=[f"{c}-to-{w}" for c, w in PAIRS])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations())
def test_random_requests_translate_to_valid_requests_and_back(client: str, wire: str, conv: Obj) -> None:
    req = RENDER[client](conv)
    valid(req, client)  # the generator itself speaks the client's protocol
    there = pair(client, wire).request(req, "m", 4096)
    valid(there, wire)
    back = pair(wire, client).request(there, "m", 4096)
    valid(back, client)
    want, got_back, got_there = normal(req, client), normal(back, client), normal(there, wire)
    # The last assistant turn that says anything (an empty one is sent only
    # by the Anthropic renderer, as "ok").
    said = [t for t in conv["turns"] if t[0] == "assistant" and (t[1] or t[2] or client == "messages")]
    if "messages" in (client, wire) and said and said[-1][2]:
        # A tool loop with no signed thinking to send back goes to Anthropic
        # without thinking (docs/translation.md): the effort may be lost.
        want, got_back, got_there = (x[:8] + x[9:] for x in (want, got_back, got_there))
    assert got_back == want
    # The conversation is the same one in the wire protocol's own terms.
    assert got_there[1:] == want[1:]


# -------------------------------------------------------------- unit rules


def test_fields_without_counterpart_are_refused_by_name() -> None:
    cases = [
        ("chat", "messages", {"seed": 3}, "seed"),
        ("chat", "messages", {"n": 2}, "n"),
        ("chat", "messages", {"response_format": {"type": "json_object"}}, "response_format.type"),
        ("chat", "responses", {"stop": ["x"]}, "stop"),
        ("messages", "chat", {"top_k": 5}, "top_k"),
        ("messages", "responses", {"stop_sequences": ["x"]}, "stop_sequences"),
        ("messages", "chat", {"mcp_servers": [{"type": "url"}]}, "mcp_servers"),
        ("messages", "chat", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ("responses", "messages", {"previous_response_id": "resp_1"}, "previous_response_id"),
        ("responses", "chat", {"tools": [{"type": "file_search"}]}, "tools[0].type"),
        ("responses", "chat", {"background": True}, "background"),
        ("responses", "messages", {"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ]
    base = {"chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            "messages": {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
            "responses": {"model": "m", "input": "hi"}}
    for client, wire, extra, field in cases:
        with pytest.raises(BadRequest) as e:
            pair(client, wire).request({**base[client], **extra}, "up", 100)
        assert e.value.status == 400 and e.value.param == field, (client, wire, field)
        assert field.split("[")[0].split(".")[0] in e.value.message


def test_dropped_fields_are_dropped_not_sent() -> None:
    req = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "store": False, "metadata": {"a": "b"},
           "service_tier": "auto", "prompt_cache_key": "k", "n": 1, "logprobs": False, "user": "u1"}
    out = pair("chat", "messages").request(req, "up", 100)
    assert set(out) == {"model", "max_tokens", "messages", "metadata"}
    assert out["metadata"] == {"user_id": "u1"} and out["max_tokens"] == 100
    req = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
        "metadata": {"user_id": "x"}, "cache_control": {"type": "ephemeral"}, "context_management": {"edits": []}}
    out = pair("messages", "chat").request(req, "up", 100)
    assert out == {"model": "up", "max_completion_tokens": 5,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


def test_system_prompts_and_mid_conversation_system_messages() -> None:
    req = {"model": "m", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]}, {"role": "user", "content": "b"}]}
    out = pair("chat", "messages").request(req, "up", 100)
    # The leading one is the system prompt; a later one stays in place.
    assert out["system"] == [{"type": "text", "text": "Be brief."}]
    assert out["messages"] == [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                               {"role": "system", "content": "Use tools."},
                               {"role": "user", "content": [{"type": "text", "text": "b"}]}]
    # Back to chat (and on to Responses) it stays where it was.
    back = pair("messages", "chat").request(out, "up", 100)["messages"]
    assert [m["role"] for m in back] == ["system", "user", "system", "user"]
    there = pair("messages", "responses").request(out, "up", 100)
    assert (there["instructions"], [i["role"] for i in there["input"]]) == ("Be brief.", ["user", "system", "user"])
    resp = {"model": "m", "instructions": "Sys", "input": [
        {"role": "developer", "content": "Dev"}, {"role": "user", "content": "q"}]}
    out = pair("responses", "messages").request(resp, "up", 100)
    assert out["system"] == [{"type": "text", "text": "Sys"}, {"type": "text", "text": "Dev"}]
    out = pair("responses", "chat").request(resp, "up", 100)
    assert [m["role"] for m in out["messages"]] == ["system", "developer", "user"]


def test_tool_results_with_images_and_errors() -> None:
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA="}}
    req = {"model": "m", "max_tokens": 10, "messages": [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": False,
                                      "content": [{"type": "text", "text": "done"}, img]},
                                     {"type": "text", "text": "and?"}]}]}
    chat = pair("messages", "chat").request(req, "up", 100)["messages"]
    assert chat[2] == {"role": "tool", "tool_call_id": "t1", "content": "done"}
    # The image follows in a user message that says where it came from.
    assert chat[3]["content"][0] == {"type": "text", "text": "Images returned by tool call t1:"}
    assert chat[3]["content"][1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA="}}
    assert chat[3]["content"][2] == {"type": "text", "text": "and?"}
    resp = pair("messages", "responses").request(req, "up", 100)["input"]
    assert resp[2] == {"type": "function_call_output", "call_id": "t1", "output": [
        {"type": "input_text", "text": "done"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAA=", "detail": "auto"}]}


def test_reasoning_settings_map_both_ways() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "high",
            "max_completion_tokens": 30000}
    assert pair("chat", "messages").request(chat, "up", 100)["thinking"] == {"type": "enabled", "budget_tokens": 24576}
    # No room for thinking under a small output limit: thinking stays off.
    assert "thinking" not in pair("chat", "messages").request({**chat, "max_completion_tokens": 900}, "up", 100)
    # A tool loop whose client does not send the signed thinking back goes
    # without thinking (Anthropic would refuse the request).
    loop = {**chat, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f",
                                                                                           "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}
    assert "thinking" not in pair("chat", "messages").request(loop, "up", 100)
    msg = {"model": "m", "max_tokens": 4000, "messages": [{"role": "user", "content": "x"}],
           "thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}
    assert pair("messages", "chat").request(msg, "up", 100)["reasoning_effort"] == "xhigh"
    out = pair("messages", "responses").request({**msg, "output_config": None, "thinking": {
        "type": "enabled", "budget_tokens": 1500}}, "up", 100)
    assert out["reasoning"] == {"effort": "low", "summary": "auto"}
    assert out["include"] == ["reasoning.encrypted_content"]


def test_thinking_signatures_round_trip_where_the_target_carries_them() -> None:
    # Responses upstream -> Anthropic client: the item's id and encrypted
    # content become the signature, and come back as the same item.
    answer = {"id": "resp_1", "model": "gpt", "status": "completed", "output": [
        {"type": "reasoning", "id": "rs_abc", "summary": [{"type": "summary_text", "text": "think"}],
         "encrypted_content": "gAAAAenc=="},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": '{"a":1}'}],
        "usage": {"input_tokens": 5, "output_tokens": 3}}
    msg, usage = pair("messages", "responses").response(answer, {"model": "pub"})
    assert (usage.input_tokens, usage.output_tokens) == (5, 3)
    assert msg["content"][0] == {"type": "thinking", "thinking": "think", "signature": "rs_abc:gAAAAenc=="}
    assert msg["stop_reason"] == "tool_use" and msg["content"][1]["input"] == {"a": 1}
    history = {"model": "m", "max_tokens": 100, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": msg["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "ok"}]}]}
    items = pair("messages", "responses").request(history, "up", 100)["input"]
    assert items[1] == {"type": "reasoning", "id": "rs_abc", "encrypted_content": "gAAAAenc==",
                        "summary": [{"type": "summary_text", "text": "think"}]}
    # Anthropic upstream -> Responses client: the signature is the encrypted
    # content; redacted thinking keeps its data behind a prefix.
    claude = {"id": "msg_1", "model": "claude", "stop_reason": "end_turn", "content": [
        {"type": "thinking", "thinking": "hm", "signature": "EqSIG"}, {"type": "redacted_thinking", "data": "RED"},
        {"type": "text", "text": "hi"}], "usage": {"input_tokens": 1, "output_tokens": 2}}
    r, _ = pair("responses", "messages").response(claude, {"model": "pub"})
    assert [i.get("encrypted_content") for i in r["output"][:2]] == ["EqSIG", "redacted_thinking:RED"]
    back = pair("responses", "messages").request({"model": "m", "input": [
        {"role": "user", "content": "q"}, *r["output"], {"role": "user", "content": "again"}]}, "up", 100)
    assert back["messages"][1]["content"] == claude["content"]
    # A chat client gets the signed thinking as thinking_blocks and can send it back.
    c, _ = pair("chat", "messages").response(claude, {"model": "pub"})
    m = c["choices"][0]["message"]
    assert m["reasoning_content"] == "hm" and m["thinking_blocks"][0]["signature"] == "EqSIG"
    back = pair("chat", "messages").request({"model": "m", "messages": [
        {"role": "user", "content": "q"}, m, {"role": "user", "content": "again"}]}, "up", 100)
    assert back["messages"][1]["content"] == claude["content"]


def test_usage_is_one_meaning_in_every_client_shape() -> None:
    u = Usage(input_tokens=100, output_tokens=40, cached_tokens=30, reasoning_tokens=7, cache_write_tokens=20,
              cache_write_1h_tokens=5)
    a = anthropic_usage_obj(u)
    assert a["input_tokens"] + a["cache_read_input_tokens"] + a["cache_creation_input_tokens"] == 100
    assert a["cache_creation"] == {"ephemeral_5m_input_tokens": 15, "ephemeral_1h_input_tokens": 5}
    c = chat_usage_obj(u)
    assert (c["prompt_tokens"], c["prompt_tokens_details"]["cached_tokens"], c["total_tokens"]) == (100, 30, 140)
    assert c["prompt_tokens_details"]["cache_write_tokens"] == 20
    r = responses_usage_obj(u)
    assert (r["input_tokens"], r["input_tokens_details"]["cached_tokens"]) == (100, 30)
    assert r["output_tokens_details"]["reasoning_tokens"] == 7


def test_errors_in_the_client_shape() -> None:
    oai = orjson.dumps({"error": {"message": "bad thing", "type": "invalid_request_error", "code": "x"}})
    assert orjson.loads(client_error("messages", 400, oai, "up")) == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "bad thing"}}
    claude = orjson.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert orjson.loads(client_error("chat", 529, claude, "up"))["error"]["message"] == "busy"
    assert orjson.loads(client_error("messages", 529, claude, "up"))["error"]["type"] == "overloaded_error"
    plain = orjson.loads(client_error("chat", 502, b"<html>", "up"))
    assert plain["error"]["message"] == "Upstream 'up' answered HTTP 502."


def sse_events(raw: bytes) -> list[Obj]:
    out = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(orjson.loads(line[6:]))
    return out


def test_interleaved_parallel_tool_arguments_land_in_their_own_blocks() -> None:
    """Some chat servers interleave the argument pieces of parallel calls;
    each piece still reaches its own tool_use block, in order."""
    def chunk(delta: Obj, finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "c1", "model": "m", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"

    def call(i: int, **fn: Any) -> Obj:
        return {"tool_calls": [{"index": i, **({"id": f"call_{i}", "type": "function"} if "name" in fn else {}),
                                "function": fn}]}

    s = TranslatedStream(pair("messages", "chat").Stream({"messages": []}, "pub"))
    raw = b"".join([chunk({"role": "assistant"}), chunk(call(0, name="a", arguments='{"x":')),
                    chunk(call(1, name="b", arguments='{"y":')), chunk(call(0, arguments='1}')),
                    chunk(call(1, arguments='2}')), chunk({}, "tool_calls"),
                    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n',
                    b"data: [DONE]\n\n"])
    out = b"".join(s.feed(raw[i:i + 7]) for i in range(0, len(raw), 7)) + s.flush()
    events = sse_events(out)
    args: dict[int, str] = {}
    for e in events:
        if e["type"] == "content_block_delta":
            args[e["index"]] = args.get(e["index"], "") + e["delta"]["partial_json"]
    assert args == {0: '{"x":1}', 1: '{"y":2}'}
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-1]["type"] == "message_stop"
    assert events[-2]["usage"]["input_tokens"] == 3 and s.finish().output_tokens == 4


def test_message_start_carries_an_input_estimate_before_the_upstream_count() -> None:
    req = {"messages": [{"role": "user", "content": "word " * 400}]}
    s = TranslatedStream(pair("messages", "responses").Stream(req, "pub"))
    out = s.feed(b'data: {"type":"response.created","response":{"id":"resp_9","model":"m"}}\n\n')
    (start,) = sse_events(out)
    assert start["message"]["usage"]["input_tokens"] == estimate_tokens(req["messages"]) > 300
    assert s.finish().error == "upstream_incomplete_stream"


STARTS = {
    "messages": b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"m",'
                b'"usage":{"input_tokens":9,"output_tokens":1}}}\n\n',
    "chat": b'data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"}}]}\n\n',
    "responses": b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
                 b'"response":{"id":"resp_1","model":"m","status":"in_progress","output":[]}}\n\n',
}
FAILS = {
    "messages": b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"boom"}}\n\n',
    "chat": b'data: {"error":{"message":"boom","type":"server_error"}}\n\n',
    "responses": b'event: error\ndata: {"type":"error","code":"server_error","message":"boom","sequence_number":1}\n\n',
}


@pytest.mark.parametrize(("client", "wire"), PAIRS, ids=[f"{c}-from-{w}" for c, w in PAIRS])
def test_an_upstream_stream_error_reaches_the_client_as_its_own_error(client: str, wire: str) -> None:
    s = TranslatedStream(pair(client, wire).Stream({"messages": [{"role": "user", "content": "x"}]}, "pub"))
    out = s.feed(STARTS[wire]) + s.feed(FAILS[wire]) + s.flush()
    last = sse_events(out)[-1]
    if client == "chat":
        assert last == {"error": {"message": "boom", "type": last["error"]["type"], "param": None,
                                  "code": last["error"]["code"]}}
    elif client == "messages":
        assert last["type"] == "error" and last["error"]["message"] == "boom"
    else:
        assert last["type"] == "response.failed" and last["response"]["error"]["message"] == "boom"
        assert last["response"]["id"] == sse_events(out)[0]["response"]["id"]
    u = s.finish()
    assert u.error == "upstream_stream_error"
    if wire == "messages":
        assert u.input_tokens == 9  # the usage seen before the error is kept
    # Nothing more is written after the error, whatever the upstream sends.
    assert s.feed(STARTS[wire]) == b""


def test_codex_namespaced_tools_and_web_search() -> None:
    """Codex declares tools inside a namespace and the hosted web_search:
    namespaced functions travel flat (namespace__name) and their calls come
    back with their namespace; web_search is left out (documented)."""
    fn = {"type": "function", "name": "spawn", "parameters": {"type": "object", "properties": {}}, "strict": False}
    req = {"model": "m", "client_metadata": {"turn_id": "t"}, "tools": [
        {"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {}}},
        {"type": "namespace", "name": "agents_v1", "description": "Sub-agents", "tools": [fn]},
        {"type": "web_search", "external_web_access": True}],
        "input": [{"role": "user", "content": "go"},
                  {"type": "function_call", "call_id": "c1", "namespace": "agents_v1", "name": "spawn",
                   "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "ok"}]}
    out = pair("responses", "messages").request(req, "up", 100)
    assert [t["name"] for t in out["tools"]] == ["exec_command", "agents_v1__spawn"]
    assert out["messages"][1]["content"][0]["name"] == "agents_v1__spawn"
    assert [t["function"]["name"] for t in pair("responses", "chat").request(req, "up", 100)["tools"]] == [
        "exec_command", "agents_v1__spawn"]
    answer = {"id": "msg_1", "model": "claude", "stop_reason": "tool_use", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "agents_v1__spawn", "input": {}},
        {"type": "tool_use", "id": "toolu_2", "name": "exec_command", "input": {"cmd": "ls"}}],
        "usage": {"input_tokens": 1, "output_tokens": 1}}
    r, _ = pair("responses", "messages").response(answer, req)
    calls = [(i.get("namespace"), i["name"]) for i in r["output"]]
    assert calls == [("agents_v1", "spawn"), (None, "exec_command")]
    s = TranslatedStream(pair("responses", "messages").Stream(req, "pub"))
    raw = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in [
        {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                       "name": "agents_v1__spawn", "input": {}}},
        {"type": "content_block_stop", "index": 0}])
    added = [e for e in sse_events(s.feed(raw)) if e["type"] == "response.output_item.added"]
    assert (added[0]["item"]["namespace"], added[0]["item"]["name"]) == ("agents_v1", "spawn")
    # Any other hosted tool is still refused by name.
    with pytest.raises(BadRequest) as e:
        pair("responses", "messages").request({**req, "tools": [{"type": "file_search"}]}, "up", 100)
    assert e.value.param == "tools[0].type"


def test_count_tokens_body_for_a_responses_upstream() -> None:
    body = {"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "count me"}],
            "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {}}}],
            "thinking": {"type": "enabled", "budget_tokens": 2048}}
    out = pair("messages", "responses").count_request(body, "up")
    assert out == {"model": "up", "input": [{"type": "message", "role": "user", "content": "count me"}],
                   "instructions": "Be brief.",
                   "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}},
                              "strict": False}],
                   "reasoning": {"effort": "low", "summary": "auto"}}
    from openai.types.responses.input_token_count_params import InputTokenCountParams

    check(out, InputTokenCountParams)
