"""The real coding-agent CLIs against the gateway and the bundled mock,
offline (``pytest -m e2e``; ``.ci/run`` installs them with ``npm ci
--prefix tests/e2e``): Claude Code runs a Bash tool call and ``/context``;
Codex runs a shell tool call through its built-in provider (the Responses
WebSocket, and the fast fallback when it is off) and through a custom
provider. Each run asserts the paths hit, that no request failed, and that
every usage row equals what the mock reported.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from ..conftest import UPSTREAM_KEY, Gateway, GatewayFactory, Upstream, UpstreamFactory, config_toml

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BIN = Path(__file__).parent / "node_modules" / ".bin"
MARKER = "gateway-e2e-ok"
ECHO = f"The tool said: {MARKER}"

MODELS = """
[[upstreams]]
name = "mock-anthropic"
kind = "anthropic"
base_url = "{url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[[models]]
name = "claude-e2e"
routes = [{{ upstream = "mock-anthropic" }}]

[[models]]
name = "gpt-e2e"
routes = [{{ upstream = "mock" }}]
# Codex declares OpenAI's hosted web search in every request (docs/clients.md).
allow_tools = ["web_search"]
"""


def binary(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed: npm ci --prefix tests/e2e")
        pytest.skip(f"{name} is not installed: npm ci --prefix tests/e2e")
    return path


@dataclass
class Run:
    rc: int
    out: str
    err: str
    seconds: float


async def run(cmd: list[str], env: dict[str, str], cwd: Path, stdin: bytes | None = None) -> Run:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, cwd=cwd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin or b""), 180)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - t0)


def base_env(home: Path) -> dict[str, str]:
    """A clean environment: no proxies, nothing of the developer's own."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb"}


async def e2e_setup(make_gateway: GatewayFactory, make_upstream: UpstreamFactory, tool: str, args: dict[str, Any],
                    extra: str = "") -> tuple[Gateway, Upstream, str]:
    up = await make_upstream(steer={"x-mock-tool": tool, "x-mock-tool-args": orjson.dumps(args).decode()})
    gw = await make_gateway(config_toml(up.base_url, MODELS.format(url=up.base_url)).replace(
        "key_refresh_ms = 100", "key_refresh_ms = 100\n" + extra))
    return gw, up, await gw.key("e2e")


def tool_results(up: Upstream) -> list[str]:
    """The tool outputs that went back to the model carrying the marker: an
    Anthropic ``tool_result`` block or a Responses ``function_call_output``."""
    found = []
    for q in up.state.requests:
        body = orjson.loads(q.body)
        for m in body.get("messages") or ():
            for block in m.get("content") if isinstance(m.get("content"), list) else ():
                if block.get("type") == "tool_result" and MARKER in orjson.dumps(block.get("content")).decode():
                    found.append(block)
        for item in body.get("input") if isinstance(body.get("input"), list) else ():
            if item.get("type") == "function_call_output" and MARKER in str(item.get("output")):
                found.append(item)
    return found


def assert_rows_match_mock(rows: list[dict[str, Any]], up: Upstream, path: str, fields: dict[str, str]) -> None:
    """Every row of ``path`` that went upstream equals, as a multiset, what
    the mock reported (rows and reports are matched by their numbers, since
    a client may send requests side by side)."""
    got = Counter(tuple(r[c] for c in fields) for r in rows if r["endpoint"] == path and r["upstream"])
    want = Counter(tuple(int(u.get(k, 0)) for k in fields.values()) for p, u in up.state.reported if p == path)
    assert got == want and sum(got.values()) > 0


# -------------------------------------------------------------- Claude Code


def claude_env(tmp_path: Path, gw: Gateway, key: str) -> dict[str, str]:
    return {
        **base_env(tmp_path / "claude-home"),
        "ANTHROPIC_BASE_URL": gw.url, "ANTHROPIC_API_KEY": key,
        "ANTHROPIC_MODEL": "claude-e2e", "ANTHROPIC_DEFAULT_HAIKU_MODEL": "claude-e2e",
        "ANTHROPIC_DEFAULT_SONNET_MODEL": "claude-e2e", "ANTHROPIC_DEFAULT_OPUS_MODEL": "claude-e2e",
        # Documented switches: no telemetry, error reports, update checks or other non-model traffic.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1", "DISABLE_BUG_COMMAND": "1",
    }


CLAUDE_ROWS = {"input_tokens": "input_tokens", "output_tokens": "output_tokens",
               "cache_write_tokens": "cache_creation_input_tokens", "cached_tokens": "cache_read_input_tokens"}


async def test_claude_code_bash_tool_loop(make_gateway: GatewayFactory, make_upstream: UpstreamFactory,
                                          tmp_path: Path) -> None:
    claude = binary("claude")
    gw, up, key = await e2e_setup(make_gateway, make_upstream, "Bash",
                                  {"command": f"echo {MARKER}", "description": "Print a marker"})
    work = tmp_path / "work"
    work.mkdir()
    r = await run([str(claude), "-p", "Print the marker with the Bash tool.", "--allowedTools", "Bash"],
                  claude_env(tmp_path, gw, key), work)
    assert r.rc == 0, r.err + r.out
    assert ECHO in r.out
    assert tool_results(up), "the Bash tool's output never came back to the model"
    assert {q.path for q in up.state.requests} <= {"/v1/messages", "/v1/messages/count_tokens"}
    rows = await gw.wait_usage(3)
    await asyncio.sleep(0.2)
    rows = gw.usage_rows()
    assert {r["endpoint"] for r in rows} <= {"/v1/messages", "/v1/messages/count_tokens", "/v1/models"}
    assert [r for r in rows if r["status"] >= 400] == []
    assert sum(r["endpoint"] == "/v1/messages" for r in rows) >= 2  # the call, then the answer
    assert_rows_match_mock(rows, up, "/v1/messages", CLAUDE_ROWS)
    print(f"\nclaude -p with a Bash call: {r.seconds:.2f} s, rows: {Counter(r['endpoint'] for r in rows)}")


async def test_claude_code_context_counts_tokens_unbilled(make_gateway: GatewayFactory,
                                                          make_upstream: UpstreamFactory, tmp_path: Path) -> None:
    """``/context`` asks count_tokens for each part of the context: answered
    by the upstream, recorded with no tokens, no billed /v1/messages call."""
    claude = binary("claude")
    gw, up, key = await e2e_setup(make_gateway, make_upstream, "Bash", {})
    work = tmp_path / "work"
    work.mkdir()
    r = await run([str(claude), "-p", "/context"], claude_env(tmp_path, gw, key), work)
    assert r.rc == 0, r.err + r.out
    assert "Context Usage" in r.out
    await asyncio.sleep(0.3)
    rows = gw.usage_rows()
    counted = [r for r in rows if r["endpoint"] == "/v1/messages/count_tokens"]
    assert counted and all(r["status"] == 200 and r["input_tokens"] == 0 and r["cost"] == 0 for r in counted)
    assert [r for r in rows if r["status"] >= 400] == []
    billed = [r for r in rows if r["endpoint"] == "/v1/messages"]
    assert billed == []
    assert {q.path for q in up.state.requests} == {"/v1/messages/count_tokens"}
    assert all(q.query == "beta=true" for q in up.state.requests)
    print(f"\n/context: {len(counted)} count_tokens requests, {len(billed)} billed calls, {r.seconds:.2f} s")


# -------------------------------------------------------------------- Codex


CODEX_CONFIG = """check_for_update_on_startup = false

[analytics]
enabled = false
"""
CODEX_ROWS = {"input_tokens": "input_tokens", "output_tokens": "output_tokens"}


async def codex_env(tmp_path: Path, key: str, *, login: bool) -> dict[str, str]:
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(CODEX_CONFIG)
    env = {**base_env(tmp_path / "home"), "CODEX_HOME": str(home)}
    if login:
        # The built-in provider takes its key from `codex login`, not the environment.
        r = await run([str(binary("codex")), "login", "--with-api-key"], env, tmp_path, stdin=key.encode())
        assert r.rc == 0, r.err
    return env


async def codex_exec(tmp_path: Path, env: dict[str, str], *config: str) -> Run:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    cmd = [str(binary("codex")), "exec", "--skip-git-repo-check", "-m", "gpt-e2e"]
    for c in config:
        cmd += ["-c", c]
    return await run([*cmd, "Print the marker with a shell command."], env, work)


def assert_codex_session(r: Run, up: Upstream, rows: list[dict[str, Any]]) -> None:
    assert r.rc == 0, r.err + r.out
    assert ECHO in r.out
    assert "Reconnecting" not in r.err + r.out
    assert tool_results(up), "the shell tool's output never came back to the model"
    assert {(q.method, q.path) for q in up.state.requests} == {("POST", "/v1/responses")}
    assert_rows_match_mock(rows, up, "/v1/responses", CODEX_ROWS)


async def test_codex_builtin_provider_over_the_websocket(make_gateway: GatewayFactory,
                                                         make_upstream: UpstreamFactory, tmp_path: Path) -> None:
    gw, up, key = await e2e_setup(make_gateway, make_upstream, "exec_command", {"cmd": f"echo {MARKER}"})
    env = await codex_env(tmp_path, key, login=True)
    r = await codex_exec(tmp_path, env, f'openai_base_url="{gw.url}/v1"')
    await asyncio.sleep(0.3)
    rows = gw.usage_rows()
    assert_codex_session(r, up, rows)
    assert [r for r in rows if r["status"] >= 400] == []
    assert {r["endpoint"] for r in rows} == {"/v1/responses"} and all(r["stream"] == 1 for r in rows)
    warm = [r for r in rows if r["upstream"] is None]
    assert len(warm) >= 1 and all(r["input_tokens"] == 0 for r in warm)  # warm-ups answered here
    assert len({r["request_id"].rpartition(".")[0] for r in rows}) == 1  # one connection for the session
    assert r.seconds < 5, f"session took {r.seconds:.2f} s"
    print(f"\ncodex exec, built-in provider over the WebSocket: {r.seconds:.2f} s, {len(rows)} rows")


async def test_codex_builtin_provider_falls_back_at_once(make_gateway: GatewayFactory,
                                                         make_upstream: UpstreamFactory, tmp_path: Path) -> None:
    """With the WebSocket off, the upgrade gets 426 and Codex switches to
    HTTP at once (a 405 cost it 7 retries, about 7 s)."""
    gw, up, key = await e2e_setup(make_gateway, make_upstream, "exec_command", {"cmd": f"echo {MARKER}"},
                                  extra="responses_websocket = false")
    env = await codex_env(tmp_path, key, login=True)
    r = await codex_exec(tmp_path, env, f'openai_base_url="{gw.url}/v1"')
    await asyncio.sleep(0.3)
    rows = gw.usage_rows()
    assert_codex_session(r, up, rows)
    assert [(r["status"], r["error_type"]) for r in rows if r["status"] >= 400] == [(426, "upgrade_required")]
    assert r.seconds < 5, f"session took {r.seconds:.2f} s"
    print(f"\ncodex exec, built-in provider, WebSocket off (426): {r.seconds:.2f} s")


async def test_codex_custom_provider(make_gateway: GatewayFactory, make_upstream: UpstreamFactory,
                                     tmp_path: Path) -> None:
    gw, up, key = await e2e_setup(make_gateway, make_upstream, "exec_command", {"cmd": f"echo {MARKER}"})
    env = {**await codex_env(tmp_path, key, login=False), "GATEWAY_API_KEY": key}
    r = await codex_exec(tmp_path, env, 'model_provider="gateway"', 'model_providers.gateway.name="gateway"',
                         f'model_providers.gateway.base_url="{gw.url}/v1"',
                         'model_providers.gateway.env_key="GATEWAY_API_KEY"',
                         'model_providers.gateway.wire_api="responses"')
    await asyncio.sleep(0.3)
    rows = gw.usage_rows()
    assert_codex_session(r, up, rows)
    assert [r for r in rows if r["status"] >= 400] == []
    assert {r["endpoint"] for r in rows} == {"/v1/responses"} and all(r["upstream"] == "mock" for r in rows)
    assert UPSTREAM_KEY not in r.out + r.err
    print(f"\ncodex exec, custom provider: {r.seconds:.2f} s, {len(rows)} rows")
