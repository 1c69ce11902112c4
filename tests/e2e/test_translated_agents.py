"""The real coding-agent CLIs on a model whose upstream speaks another
protocol (``pytest -m e2e``): Claude Code (Messages) on a chat-only and on a
Responses-only upstream, Codex (Responses) on an Anthropic and on a
chat-only upstream, each running a shell tool loop through the gateway's
translation (docs/translation.md) against the bundled mock. Each run
asserts the wire protocol the upstream was spoken to in, that the tool's
output went back to the model in that protocol's shape, that no request
failed, and that every usage row holds what the mock reported, in the
gateway's one meaning.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from ..conftest import Gateway, GatewayFactory, Upstream, UpstreamFactory, config_toml
from .test_agents import ECHO, MARKER, binary, claude_env, codex_env, run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

WIRES = """
[[upstreams]]
name = "chat-only"
kind = "openai"
protocols = ["chat"]
base_url = "{url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[[upstreams]]
name = "responses-only"
kind = "openai"
protocols = ["responses"]
base_url = "{url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[[upstreams]]
name = "messages-only"
kind = "anthropic"
base_url = "{url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[[models]]
name = "e2e-on-chat"
routes = [{{ upstream = "chat-only" }}]

[[models]]
name = "e2e-on-responses"
routes = [{{ upstream = "responses-only" }}]

[[models]]
name = "e2e-on-messages"
routes = [{{ upstream = "messages-only" }}]
"""

PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}


def one_meaning(wire: str, u: dict[str, Any]) -> tuple[int, int, int]:
    """(input with cached and cache writes, output, cached) of a usage the
    mock reported in ``wire``'s own shape."""
    if wire == "chat":
        return (u["prompt_tokens"], u["completion_tokens"],
                (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    if wire == "responses":
        return (u["input_tokens"], u["output_tokens"], (u.get("input_tokens_details") or {}).get("cached_tokens", 0))
    cached = u.get("cache_read_input_tokens", 0)
    return (u["input_tokens"] + u.get("cache_creation_input_tokens", 0) + cached, u["output_tokens"], cached)


def tool_outputs(up: Upstream, wire: str) -> list[Any]:
    """The tool results carrying the marker that went back to the model, in
    the wire protocol's shape."""
    found = []
    for q in up.state.requests:
        body = orjson.loads(q.body)
        if wire == "chat":
            found += [m for m in body.get("messages") or () if m.get("role") == "tool" and MARKER in str(m)]
        elif wire == "responses":
            found += [i for i in body.get("input") or () if isinstance(i, dict)
                      and i.get("type") == "function_call_output" and MARKER in str(i.get("output"))]
        else:
            found += [b for m in body.get("messages") or () if isinstance(m.get("content"), list)
                      for b in m["content"] if b.get("type") == "tool_result" and MARKER in str(b.get("content"))]
    return found


async def setup(make_gateway: GatewayFactory, make_upstream: UpstreamFactory, tool: str,
                args: dict[str, Any]) -> tuple[Gateway, Upstream, str]:
    up = await make_upstream(steer={"x-mock-tool": tool, "x-mock-tool-args": orjson.dumps(args).decode()})
    gw = await make_gateway(config_toml(up.base_url, WIRES.format(url=up.base_url)))
    return gw, up, await gw.key("e2e")


async def check_session(gw: Gateway, up: Upstream, wire: str, client_path: str) -> list[dict[str, Any]]:
    await asyncio.sleep(0.3)
    rows = gw.usage_rows()
    assert [(r["endpoint"], r["status"], r["error_type"]) for r in rows if r["status"] >= 400] == []
    assert {q.path for q in up.state.requests} == {PATHS[wire]}, "the upstream was spoken to in another protocol"
    assert tool_outputs(up, wire), "the tool's output never came back to the model"
    billed = [r for r in rows if r["endpoint"] == client_path and r["upstream"]]
    got = Counter((r["input_tokens"], r["output_tokens"], r["cached_tokens"]) for r in billed)
    want = Counter(one_meaning(wire, u) for p, u in up.state.reported if p == PATHS[wire])
    assert got == want and len(billed) >= 2  # the call, then the answer to its result
    return rows


@pytest.mark.parametrize("wire", ["chat", "responses"])
async def test_claude_code_tool_loop_on_an_openai_upstream(make_gateway: GatewayFactory,
                                                           make_upstream: UpstreamFactory, tmp_path: Path,
                                                           wire: str) -> None:
    claude = binary("claude")
    gw, up, key = await setup(make_gateway, make_upstream, "Bash",
                              {"command": f"echo {MARKER}", "description": "Print a marker"})
    env = claude_env(tmp_path, gw, key)
    for k in [k for k in env if k.startswith("ANTHROPIC_") and k.endswith("MODEL")]:
        env[k] = f"e2e-on-{wire}"
    work = tmp_path / "work"
    work.mkdir()
    r = await run([str(claude), "-p", "Print the marker with the Bash tool.", "--allowedTools", "Bash"], env, work)
    assert r.rc == 0, r.err + r.out
    assert ECHO in r.out
    rows = await check_session(gw, up, wire, "/v1/messages")
    print(f"\nclaude -p with a Bash call on a {wire} upstream: {r.seconds:.2f} s, {len(rows)} rows")


@pytest.mark.parametrize("wire", ["messages", "chat"])
async def test_codex_tool_loop_on_another_upstream(make_gateway: GatewayFactory, make_upstream: UpstreamFactory,
                                                   tmp_path: Path, wire: str) -> None:
    codex = binary("codex")
    gw, up, key = await setup(make_gateway, make_upstream, "exec_command", {"cmd": f"echo {MARKER}"})
    env = {**await codex_env(tmp_path, key, login=False), "GATEWAY_API_KEY": key}
    work = tmp_path / "work"
    work.mkdir()
    cmd = [str(codex), "exec", "--skip-git-repo-check", "-m", f"e2e-on-{wire}",
           "-c", 'model_provider="gateway"', "-c", 'model_providers.gateway.name="gateway"',
           "-c", f'model_providers.gateway.base_url="{gw.url}/v1"',
           "-c", 'model_providers.gateway.env_key="GATEWAY_API_KEY"',
           "-c", 'model_providers.gateway.wire_api="responses"',
           # Codex asks for OpenAI's hosted web search by default, which the
           # gateway refuses unless the model allows it (docs/clients.md).
           "-c", 'web_search="disabled"']
    r = await run([*cmd, "Print the marker with a shell command."], env, work)
    assert r.rc == 0, r.err + r.out
    assert ECHO in r.out
    rows = await check_session(gw, up, wire, "/v1/responses")
    print(f"\ncodex exec on a {wire} upstream: {r.seconds:.2f} s, {len(rows)} rows")


@pytest.mark.parametrize("wire", ["chat", "responses"])
async def test_claude_code_context_counts_on_an_openai_upstream(make_gateway: GatewayFactory,
                                                                make_upstream: UpstreamFactory, tmp_path: Path,
                                                                wire: str) -> None:
    """``/context`` counts tokens: a Responses upstream counts with its own
    /responses/input_tokens, a chat-only one gets the local estimate; no
    request fails, none is billed."""
    claude = binary("claude")
    gw, up, key = await setup(make_gateway, make_upstream, "Bash", {})
    env = claude_env(tmp_path, gw, key)
    for k in [k for k in env if k.startswith("ANTHROPIC_") and k.endswith("MODEL")]:
        env[k] = f"e2e-on-{wire}"
    work = tmp_path / "work"
    work.mkdir()
    r = await run([str(claude), "-p", "/context"], env, work)
    assert r.rc == 0, r.err + r.out
    assert "Context Usage" in r.out
    await asyncio.sleep(0.3)
    rows = gw.usage_rows()
    counted = [r for r in rows if r["endpoint"] == "/v1/messages/count_tokens"]
    assert counted and all(r["status"] == 200 and r["input_tokens"] == 0 and r["cost"] == 0 for r in counted)
    assert [r for r in rows if r["status"] >= 400 or r["endpoint"] == "/v1/messages"] == []
    paths = {q.path for q in up.state.requests}
    assert paths == ({"/v1/responses/input_tokens"} if wire == "responses" else set())
    print(f"\n/context on a {wire} upstream: {len(counted)} counts, upstream paths {sorted(paths)}")
