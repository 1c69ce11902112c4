"""Server tools and stored provider objects (docs/security.md): a tool the
provider runs and may charge per call (OpenAI's web search, file search,
code interpreter, image generation, a hosted shell, MCP; Anthropic's
``web_search_…``, ``web_fetch_…``, ``code_execution_…``, ...) is refused on
every door and on translated routes unless the model's ``allow_tools``
names it, and so is any tool type the gateway does not know for one the
client runs (a new version, another spelling). Responses ``conversation``
and stored ``prompt`` name objects of the shared upstream account that no
workspace owns: refused unless the model's ``allow_stored`` names them.
Function tools, custom tools and the tools Anthropic defines for the client
to run pass byte for byte."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.config import ConfigError, parse_config

from .conftest import PROTOCOL_MODELS, Gateway, GatewayFactory, Upstream, config_toml, wire_upstreams
from .test_price_fields import CHAT, MSG, RESP, body, passed_byte_for_byte, post, ws_create
from .test_price_fields import EXTRA as PRICE_MODELS

# The price flag tests' models (via-chat: a Responses client translated to chat) and two opted in.
EXTRA = PRICE_MODELS + """
[[models]]
name = "gpt-search"
routes = [{ upstream = "mock", model = "gpt-search" }]
allow_tools = ["web_search"]
allow_stored = ["conversation", "prompt"]

[[models]]
name = "claude-search"
routes = [{ upstream = "mock-anthropic", model = "claude-search" }]
allow_tools = ["web_search", "code_execution"]
"""

FN = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
CHAT_FN = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
CLAUDE_FN = {"name": "lookup", "input_schema": {"type": "object", "properties": {}}}


@pytest.fixture
async def gw(make_gateway: GatewayFactory, upstream: Upstream) -> Gateway:
    url = upstream.base_url
    extra = PROTOCOL_MODELS.format(url=url) + wire_upstreams(url, "responses", "chat") + EXTRA
    return await make_gateway(config_toml(url, extra))


# (door, model, fields, param, shown): refused before anything goes upstream.
REFUSED: list[tuple[str, str, dict[str, Any], str, str | None]] = [
    # OpenAI's hosted tools, every wire name, first or after a function.
    (RESP, "gpt-test", {"tools": [{"type": "web_search"}]}, "tools[0].type", "web_search"),
    (RESP, "gpt-test", {"tools": [FN, {"type": "web_search_preview"}]}, "tools[1].type", "web_search_preview"),
    (RESP, "gpt-test", {"tools": [{"type": "web_search_preview_2025_03_11"}]}, "tools[0].type", None),
    (RESP, "gpt-test", {"tools": [{"type": "web_search_2025_08_26"}]}, "tools[0].type", None),
    (RESP, "gpt-test", {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type", None),
    (RESP, "gpt-test", {"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type",
     "code_interpreter"),
    (RESP, "gpt-test", {"tools": [{"type": "image_generation"}]}, "tools[0].type", "image_generation"),
    (RESP, "gpt-test", {"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x"}]},
     "tools[0].type", "mcp"),
    (RESP, "gpt-test", {"tools": [{"type": "shell", "environment": {"type": "container_auto"}}]},
     "tools[0].type", "shell"),
    # Another spelling, an unknown type, no string type: not a client tool.
    (RESP, "gpt-test", {"tools": [{"type": "WEB_SEARCH"}]}, "tools[0].type", "WEB_SEARCH"),
    (RESP, "gpt-test", {"tools": [{"type": "Web_Search"}]}, "tools[0].type", "Web_Search"),
    (RESP, "gpt-test", {"tools": [{"type": "web_search "}]}, "tools[0].type", None),
    (RESP, "gpt-test", {"tools": [{"type": "tool_search"}]}, "tools[0].type", None),
    (RESP, "gpt-test", {"tools": [{"type": ["web_search"]}]}, "tools[0].type", None),
    (RESP, "gpt-test", {"tools": [{"type": "namespace", "name": "n", "tools": [FN, {"type": "web_search"}]}]},
     "tools[0].tools[1].type", "web_search"),
    (RESP, "gpt-test", {"tools": [{"type": "namespace", "name": "n", "tools": [
        {"type": "namespace", "name": "m", "tools": [{"type": "web_search"}]}]}]}, "tools[0].tools[0].type", None),
    (CHAT, "gpt-test", {"web_search_options": {}}, "web_search_options", None),
    (CHAT, "gpt-test", {"tools": [{"type": "web_search"}]}, "tools[0].type", "web_search"),
    # Anthropic's server tools, known and future versions, other spellings.
    (MSG, "claude-test", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type",
     "web_search_20250305"),
    (MSG, "claude-test", {"tools": [CLAUDE_FN, {"type": "web_search_20260101", "name": "web_search"}]},
     "tools[1].type", "web_search_20260101"),
    (MSG, "claude-test", {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]}, "tools[0].type", None),
    (MSG, "claude-test", {"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]},
     "tools[0].type", None),
    (MSG, "claude-test", {"tools": [{"type": "tool_search_tool_regex_20251119", "name": "t"}]}, "tools[0].type",
     None),
    (MSG, "claude-test", {"tools": [{"type": "mcp_toolset", "mcp_server_name": "x"}]}, "tools[0].type", None),
    (MSG, "claude-test", {"tools": [{"type": "WEB_SEARCH_20250305", "name": "web_search"}]}, "tools[0].type",
     "WEB_SEARCH_20250305"),
    (MSG, "claude-test", {"tools": [{"type": "bash_2025", "name": "bash"}]}, "tools[0].type", "bash_2025"),
    (MSG, "claude-test", {"tools": [{"type": "bash_20250124_web_search", "name": "bash"}]}, "tools[0].type", None),
    (MSG, "claude-test", {"tools": [{"type": "Custom", **CLAUDE_FN}]}, "tools[0].type", "Custom"),
    # Opted in for another tool, or another spelling, only.
    (RESP, "gpt-search", {"tools": [{"type": "web_search_preview"}]}, "tools[0].type", None),
    (RESP, "gpt-search", {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type", None),
    (MSG, "claude-search", {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}]}, "tools[0].type", None),
    (MSG, "claude-search", {"tools": [{"type": "Web_Search_20250305", "name": "web_search"}]}, "tools[0].type",
     None),
    # Stored provider objects.
    (RESP, "gpt-test", {"conversation": "conv_6f2a"}, "conversation", None),
    (RESP, "gpt-test", {"conversation": {"id": "conv_6f2a"}}, "conversation", None),
    (RESP, "gpt-test", {"prompt": {"id": "pmpt_6f2a", "version": "2"}}, "prompt", None),
    # Translated routes: the client's body is checked before translation.
    (CHAT, "claude-test", {"web_search_options": {}}, "web_search_options", None),
    (RESP, "claude-test", {"tools": [{"type": "web_search"}]}, "tools[0].type", "web_search"),
    (MSG, "gpt-test", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type", None),
    (RESP, "via-chat", {"conversation": "conv_6f2a"}, "conversation", None),
]


async def test_server_tools_and_stored_objects_are_refused_on_every_http_door(
        gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await gw.key()
    for path, model, fields, param, shown in REFUSED:
        for stream in (False, True):
            status, data = await post(http, gw, key, path, orjson.dumps(body(path, model, stream=stream, **fields)))
            assert status == 400, (path, model, fields, data)
            err = data["error"]
            assert err["type"] == "invalid_request_error", data
            code = "field_not_allowed" if param in ("conversation", "prompt") else "tool_not_allowed"
            if path != MSG:  # Anthropic's error object has no code or param
                assert (err["code"], err["param"]) == (code, param), data
            assert param.split("[")[0].split(".")[0] in err["message"] and model in err["message"], data
            if shown is not None:
                assert f"'{shown}'" in err["message"], data
            assert len(err["message"]) < 400, data
    assert upstream.state.requests == []
    n = 2 * len(REFUSED)
    rows = await gw.wait_usage(n)
    assert len(rows) == n
    assert {(r["status"], r["error_type"]) for r in rows} == {(400, "tool_not_allowed"), (400, "field_not_allowed")}
    assert all(r["cost"] == 0 for r in rows)


async def test_a_long_tool_type_is_shown_bounded(gw: Gateway, upstream: Upstream,
                                                 http: aiohttp.ClientSession) -> None:
    key = await gw.key()
    raw = orjson.dumps(body(RESP, "gpt-test", tools=[{"type": "web_search" + "x" * 100_000}]))
    status, data = await post(http, gw, key, RESP, raw)
    assert status == 400 and len(data["error"]["message"]) < 600, data
    assert upstream.state.requests == []


# (door, model, fields): tools the client runs, and what a model opted in.
PASSED: list[tuple[str, str, dict[str, Any]]] = [
    (CHAT, "gpt-test", {"tools": [CHAT_FN]}),
    (CHAT, "gpt-test", {"tools": [{"type": "custom", "custom": {"name": "patch"}}]}),
    (CHAT, "gpt-test", {"tools": [], "web_search_options": None}),
    (RESP, "gpt-test", {"tools": [FN, {"type": "custom", "name": "apply_patch"}, {"type": "local_shell"},
                                  {"type": "apply_patch"}, {"type": "shell"},
                                  {"type": "shell", "environment": {"type": "local"}},
                                  {"type": "computer_use_preview", "display_width": 1, "display_height": 1,
                                   "environment": "linux"},
                                  {"type": "namespace", "name": "agents", "tools": [FN]}]}),
    (RESP, "gpt-test", {"conversation": None, "prompt": None}),
    (MSG, "claude-test", {"tools": [CLAUDE_FN, {"type": "custom", **CLAUDE_FN},
                                    {"type": "bash_20250124", "name": "bash"},
                                    {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
                                    {"type": "memory_20250818", "name": "memory"},
                                    {"type": "computer_20250124", "name": "computer", "display_width_px": 1,
                                     "display_height_px": 1}]}),
    # Opted in: the tool's name without its version date covers every version.
    (RESP, "gpt-search", {"tools": [FN, {"type": "web_search"}, {"type": "web_search_2025_08_26"}]}),
    (CHAT, "gpt-search", {"web_search_options": {"search_context_size": "low"}}),
    (RESP, "gpt-search", {"conversation": "conv_6f2a", "prompt": {"id": "pmpt_6f2a"}}),
    (MSG, "claude-search", {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
                                      {"type": "web_search_20260209", "name": "web_search"},
                                      {"type": "code_execution_20250825", "name": "code_execution"}]}),
]


async def test_client_tools_and_opted_in_ones_pass_byte_for_byte(gw: Gateway, upstream: Upstream,
                                                                  http: aiohttp.ClientSession) -> None:
    await passed_byte_for_byte(gw, upstream, http, PASSED)


async def test_a_conversation_of_another_workspace_cannot_be_named(gw: Gateway, upstream: Upstream,
                                                                   http: aiohttp.ClientSession) -> None:
    """The gateway does not serve /v1/conversations, so no workspace makes
    or owns a conversation through it; one named by id (the operator's, or
    one a workspace learnt of) is refused for a model not opted in, over
    HTTP and the WebSocket alike."""
    mine, theirs = await gw.key("acme"), await gw.key("globex")
    headers = {"Authorization": f"Bearer {mine}", "Content-Type": "application/json"}
    async with http.post(gw.url + "/v1/conversations", data=b'{"items":[]}', headers=headers) as r:
        assert r.status in (404, 405), r.status
    for key in (mine, theirs):
        status, data = await post(http, gw, key, RESP,
                                  orjson.dumps(body(RESP, "gpt-test", conversation={"id": "conv_6f2a"})))
        assert status == 400 and data["error"]["param"] == "conversation", data
    ws_headers = {"Authorization": f"Bearer {theirs}", "OpenAI-Beta": "responses_websockets=2026-02-06"}
    async with http.ws_connect(gw.url + RESP, headers=ws_headers) as ws:
        events = await ws_create(ws, model="gpt-test", conversation="conv_6f2a")
        assert [e["type"] for e in events] == ["error"] and events[0]["error"]["param"] == "conversation"
    assert upstream.state.requests == []


async def test_server_tools_on_the_websocket(gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    key = await gw.key()
    headers = {"Authorization": f"Bearer {key}", "OpenAI-Beta": "responses_websockets=2026-02-06"}
    refused: list[tuple[str, dict[str, Any], str]] = [
        ("gpt-test", {"tools": [FN, {"type": "web_search", "external_web_access": False}]}, "tools[1].type"),
        ("gpt-test", {"tools": [{"type": "WebSearch"}]}, "tools[0].type"),
        ("gpt-search", {"tools": [{"type": "image_generation"}]}, "tools[0].type"),
        ("claude-test", {"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ("gpt-test", {"prompt": {"id": "pmpt_6f2a"}}, "prompt"),
    ]
    async with http.ws_connect(gw.url + RESP, headers=headers) as ws:
        for model, fields, param in refused:
            for generate in (True, False):
                events = await ws_create(ws, model=model, generate=generate, **fields)
                assert len(events) == 1, events
                err = events[0]
                assert err["type"] == "error" and err["status"] == 400 and err["error"]["param"] == param, err
        assert upstream.state.requests == []
        passed = [("gpt-test", {"tools": [FN, {"type": "namespace", "name": "ns", "tools": [FN]}]}),
                  ("gpt-search", {"tools": [{"type": "web_search", "external_web_access": False}]})]
        for model, fields in passed:
            events = await ws_create(ws, model=model, **fields)
            assert events[-1]["type"] == "response.completed", events
            assert orjson.loads(upstream.state.requests[-1].body)["tools"] == fields["tools"]
    n = 2 * len(refused) + len(passed)
    rows = await gw.wait_usage(n)
    assert [r["status"] for r in rows] == [400] * (2 * len(refused)) + [200] * len(passed)


async def test_a_stored_object_given_twice_is_refused(gw: Gateway, upstream: Upstream,
                                                      http: aiohttp.ClientSession) -> None:
    """Parsers differ on which of two equal keys wins: the gateway must not
    check null while the upstream continues the conversation."""
    key = await gw.key()
    for path, raw in [
        (RESP, b'{"conversation":"conv_6f2a","model":"gpt-test","input":"hi","conversation":null}'),
        (RESP, b'{"c\\u006fnversation":"conv_6f2a","model":"gpt-test","input":"hi","conversation":null}'),
        (CHAT, b'{"web_search_options":{},"model":"gpt-test","messages":[{"role":"user","content":"hi"}],'
               b'"web_search_options":null}'),
        (RESP, b'{"prompt":{"id":"pmpt_6f2a"},"model":"gpt-test","input":"hi","prompt":"hi"}'),
    ]:
        status, data = await post(http, gw, key, path, raw)
        assert status == 400 and "given twice" in data["error"]["message"], (raw, data)
    assert upstream.state.requests == []


def test_allow_tools_and_allow_stored_config() -> None:
    def model(**allow: Any) -> dict[str, Any]:
        return {"upstreams": [{"name": "u", "kind": "openai", "base_url": "http://x"}],
                "models": [{"name": "m", "routes": [{"upstream": "u"}], **allow}]}

    cfg = parse_config(model(allow_tools=["web_search", "code_execution"], allow_stored=["conversation"]), env={})
    assert cfg.models[0].allow_tools == frozenset({"web_search", "code_execution"})
    assert cfg.models[0].allow_stored == frozenset({"conversation"})
    m = parse_config(model(), env={}).models[0]
    assert (m.allow_tools, m.allow_stored) == (frozenset(), frozenset())
    for bad, where in [({"allow_tools": "web_search"}, "allow_tools: expected an array"),
                       ({"allow_tools": ["Web_Search"]}, "allow_tools: expected an array of tool names"),
                       ({"allow_tools": [""]}, "allow_tools: expected an array of tool names"),
                       ({"allow_tools": [1]}, "allow_tools: expected an array of tool names"),
                       ({"allow_stored": ["previous_response_id"]}, "allow_stored: expected an array of"),
                       ({"allow_stored": "conversation"}, "allow_stored: expected an array")]:
        with pytest.raises(ConfigError, match=where):
            parse_config(model(**bad), env={})


async def test_a_key_spelt_otherwise_is_refused(gw: Gateway, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    """Go's encoding/json (and decoders built like it) read "Tools",
    "STREAM" or "\\u017ftream" (the long s folds to s) as the field the
    gateway reads only as "tools" or "stream": an upstream written in Go
    would run the search, the stream, the tier or the model the gateway
    never saw. Refused on every door, before anything goes upstream."""
    key = await gw.key()
    search = [{"type": "web_search"}]
    refused: list[tuple[str, bytes, str]] = [
        (RESP, orjson.dumps({"model": "gpt-test", "input": "hi", "Tools": search}), "tools"),
        (RESP, orjson.dumps({"model": "gpt-test", "input": "hi", "tools": [FN], "TOOLS": search}), "tools"),
        (RESP, b'{"model":"gpt-test","input":"hi","\\u0054ools":[{"type":"web_search"}]}', "tools"),
        (RESP, orjson.dumps({"model": "gpt-test", "input": "hi", "tools": [{**FN, "Type": "web_search"}]}),
         "tools[0].type"),
        (RESP, orjson.dumps({"model": "gpt-test", "input": "hi", "tools": [
            {"type": "shell", "environment": {"type": "local", "TYPE": "container_auto"}}]}),
         "tools[0].environment.type"),
        (MSG, orjson.dumps({"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                            "tools": [{**CLAUDE_FN, "tYpe": "web_search_20250305"}]}), "tools[0].type"),
        (CHAT, orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}],
                             "Web_Search_Options": {}}), "web_search_options"),
        (RESP, orjson.dumps({"model": "gpt-test", "input": "hi", "Conversation": "conv_6f2a"}), "conversation"),
        (RESP, orjson.dumps({"model": "gpt-test", "input": "hi", "\u017ftream": True}), "stream"),
        (RESP, orjson.dumps({"model": "gpt-test", "input": "hi", "serv\u0131ce_tier": "priority"}), "service_tier"),
        # A ligature (full case folding: Java's toUpperCase, Python's casefold),
        # and a key a decoder on C strings cuts at its NUL.
        (RESP, orjson.dumps({"model": "gpt-test", "input": "hi", "\ufb06ream": True}), "stream"),
        (RESP, orjson.dumps({"model": "gpt-test", "input": "hi", "service_tier\u0000x": "priority"}),
         "service_tier"),
        (MSG, orjson.dumps({"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                            "model\u0000": "claude-opus"}), "model"),
        (CHAT, orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                             "stream_options": {"include_usage": True, "Include_Usage": False}}),
         "stream_options.include_usage"),
        (MSG, orjson.dumps({"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                            "Model": "claude-opus"}), "model"),
    ]
    for path, raw, param in refused:
        status, data = await post(http, gw, key, path, raw)
        assert status == 400, (raw, data)
        assert "spelt otherwise" in data["error"]["message"] and len(data["error"]["message"]) < 300, data
        if path != MSG:
            assert (data["error"]["code"], data["error"]["param"]) == ("ambiguous_key", param), data
    headers = {"Authorization": f"Bearer {key}", "OpenAI-Beta": "responses_websockets=2026-02-06"}
    async with http.ws_connect(gw.url + RESP, headers=headers) as ws:
        for fields in ({"Tools": search}, {"tools": [{**FN, "TYPE": "web_search"}]}, {"Prompt": {"id": "pmpt_1"}}):
            events = await ws_create(ws, model="gpt-test", **fields)
            assert [e["type"] for e in events] == ["error"], events
            assert events[0]["error"]["code"] == "ambiguous_key", events
    assert upstream.state.requests == []
    # Other keys, and the same names deeper down, are the client's own.
    fine = orjson.dumps({"model": "gpt-test", "input": "hi", "metadata": {"Stream": "x", "Model": "y"}, "tools": [
        {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"Type": {}}}}]})
    status, data = await post(http, gw, key, RESP, fine)
    assert status == 200, data
    n = len(refused) + 3 + 1
    rows = await gw.wait_usage(n)
    assert [r["status"] for r in rows] == [400] * (n - 1) + [200]
