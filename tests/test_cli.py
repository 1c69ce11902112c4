"""The command line, as real subprocesses: workspaces, keys, usage,
check-config, serve (revocation while it runs, SIGTERM under load), demo."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from .conftest import UPSTREAM_KEY, ConfigFiles, Upstream, config_toml

ENV = {**os.environ, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}


def gw(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, check=check, timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, upstream: Upstream, port: int = 0, files: ConfigFiles | None = None) -> Path:
    """gateway.toml in ``tmp_path``; with ``files``, on the test's PostgreSQL
    database under --db=postgres."""
    toml = config_toml(upstream.base_url).replace("port = 0", f"port = {port}")
    if files is not None:
        return files.write(toml)
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    return path


def test_workspaces_keys_usage_commands(tmp_path: Path, upstream: Upstream, config_files: ConfigFiles) -> None:
    cfg = str(write_config(tmp_path, upstream, files=config_files))
    out = gw("workspaces", "create", "acme", "--config", cfg, cwd=tmp_path).stdout
    assert "acme" in out
    dup = gw("workspaces", "create", "acme", "--config", cfg, cwd=tmp_path, check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    bad_group = gw("workspaces", "create", "x", "--group", "nope", "--config", cfg, cwd=tmp_path, check=False)
    assert bad_group.returncode != 0 and "unknown group" in bad_group.stderr

    created = gw("keys", "create", "--workspace", "acme", "--name", "ci", "--models", "gpt-*,renamed",
                 "--rpm", "60", "--config", cfg, cwd=tmp_path).stdout
    key = created.strip().splitlines()[-1]
    assert key.startswith("gw-") and len(key) >= 40 and " " not in key
    # Only the hash is stored.
    conn = config_files.conn(Path(cfg))
    stored = conn.execute("SELECT key_hash, prefix, rpm, allowed_models FROM api_keys").fetchone()
    assert key not in stored[0] and stored[1] == key[:10] and stored[2] == 60
    assert stored[3] == '["gpt-*","renamed"]'

    listed = gw("keys", "list", "--config", cfg, cwd=tmp_path).stdout
    assert key[:10] in listed and key not in listed and "active" in listed
    gw("keys", "revoke", "1", "--config", cfg, cwd=tmp_path)
    assert "revoked" in gw("keys", "list", "--config", cfg, cwd=tmp_path).stdout
    missing = gw("keys", "revoke", "99", "--config", cfg, cwd=tmp_path, check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr

    assert "(none)" in gw("usage", "--config", cfg, cwd=tmp_path).stdout
    conn.execute("INSERT INTO usage_events (ts, request_id, workspace_id, key_id, endpoint, model, status, "
                 "input_tokens, output_tokens, cost, latency_ms) VALUES (?, 'r1', 1, 1, "
                 "'/v1/chat/completions', 'gpt-test', 200, 11, 22, 0.5, 3.0)", (time.time(),))
    conn.commit()
    conn.close()
    lines = gw("usage", "--by", "model", "--since", "24h", "--config", cfg, cwd=tmp_path).stdout.splitlines()
    assert lines[0].split()[:5] == ["model", "requests", "errors", "input_tokens", "output_tokens"]
    assert lines[1].split()[:5] == ["gpt-test", "1", "0", "11", "22"]
    old = gw("usage", "--since", "2000-01-01T00:00:00", "--config", cfg, cwd=tmp_path).stdout
    assert "gpt-test" in old


def test_check_config(tmp_path: Path, upstream: Upstream) -> None:
    cfg = write_config(tmp_path, upstream)
    ok = gw("check-config", "--config", str(cfg), cwd=tmp_path)
    assert ok.stdout.startswith("ok:")
    cfg.write_text(cfg.read_text().replace('kind = "openai"', 'kind = "openia"'))
    bad = gw("check-config", "--config", str(cfg), cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "upstreams[0].kind" in bad.stderr


@pytest.mark.parametrize("command", ["serve", "serve --workers 2", "demo"])
def test_a_taken_port_exits_with_a_clear_error(tmp_path: Path, upstream: Upstream, command: str) -> None:
    """It says why and exits 1, promptly: a process that cannot listen must
    not hang on the database threads it had already started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path, upstream, port)
        where = ["--port", str(port)] if command == "demo" else ["--config", str(cfg)]
        r = subprocess.run([sys.executable, "-m", "gateway", *command.split(), *where],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


async def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never came up")


def serve_with_key(tmp_path: Path, upstream: Upstream,
                   files: ConfigFiles) -> tuple[int, str, str, subprocess.Popen[bytes]]:
    """A `gateway serve` subprocess on a free port and a key made by the CLI."""
    port = free_port()
    cfg = str(write_config(tmp_path, upstream, port, files))
    gw("workspaces", "create", "acme", "--config", cfg, cwd=tmp_path)
    key = gw("keys", "create", "--workspace", "acme", "--config", cfg, cwd=tmp_path).stdout.strip().splitlines()[-1]
    server = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", cfg], cwd=tmp_path, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return port, cfg, key, server


async def test_revocation_from_cli_takes_effect_within_2s(
    tmp_path: Path, upstream: Upstream, config_files: ConfigFiles
) -> None:
    port, cfg, key, server = serve_with_key(tmp_path, upstream, config_files)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + "/readyz")
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/v1/models", headers=headers) as r:
                assert r.status == 200
            await asyncio.to_thread(gw, "keys", "revoke", "1", "--config", cfg, cwd=tmp_path)
            t0 = time.monotonic()
            while True:
                async with s.get(base + "/v1/models", headers=headers) as r:
                    if r.status == 401:
                        break
                assert time.monotonic() - t0 < 2.0, "revocation took longer than 2 s"
                await asyncio.sleep(0.02)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


async def test_sigterm_under_load_loses_no_usage_row(
    tmp_path: Path, upstream: Upstream, config_files: ConfigFiles
) -> None:
    port, cfg, key, server = serve_with_key(tmp_path, upstream, config_files)
    base = f"http://127.0.0.1:{port}"
    await wait_http(base + "/readyz")
    headers = {"Authorization": f"Bearer {key}"}
    done: list[int] = []
    upstream.state.record = False

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        stream = i % 2 == 0
        body = {"model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        h = {**headers, "x-mock-delay-ms": "40", "x-mock-chunks": "10"} if stream else headers
        async with s.post(base + "/v1/chat/completions", json=body, headers=h) as r:
            await r.read()
            done.append(r.status)

    async with aiohttp.ClientSession() as s:
        first = [asyncio.create_task(one(s, i)) for i in range(200)]
        await asyncio.sleep(0.3)  # streams are open (each takes ~0.4 s) and requests are in flight
        server.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*first, return_exceptions=True)
    assert server.wait(30) == 0
    errors = [r for r in results if isinstance(r, BaseException)]
    # Requests the server had accepted finish; any refused after SIGTERM never
    # reached the gateway (connection refused) and so have no row.
    assert all(isinstance(e, aiohttp.ClientConnectionError) for e in errors), errors
    assert all(code == 200 for code in done)
    conn = config_files.conn(Path(cfg))
    rows = conn.execute("SELECT status, stream, output_tokens FROM usage_events").fetchall()
    conn.close()
    assert len(rows) == len(done), "every answered request has exactly one row, written before exit"
    streamed = [r for r in rows if r[1] == 1]
    assert streamed and all(r[2] == 10 for r in streamed), "open streams finished and were recorded in full"


def test_demo_prints_a_working_curl_line(tmp_path: Path) -> None:
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port)], cwd=tmp_path, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            assert proc.stdout is not None
            lines = []
            while not any("curl" in x for x in lines):
                line = proc.stdout.readline()
                assert line, "demo exited early"
                lines.append(line)
            curl = next(x for x in lines if "curl" in x).strip()
            out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30)
            assert '"object":"chat.completion"' in out.stdout
            # What Codex sends in every request (a web search tool) works on
            # the embedded default as installed.
            key = re.search(r"Bearer (\S+?)['\"]", curl)
            assert key is not None
            codex = {"model": "mock-gpt", "input": "hi", "tools": [{"type": "web_search"}]}
            r = subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/v1/responses", "-H",
                                f"Authorization: Bearer {key.group(1)}", "-H", "Content-Type: application/json",
                                "-d", json.dumps(codex)], capture_output=True, text=True, timeout=30)
            assert '"object":"response"' in r.stdout, r.stdout
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0


@pytest.mark.parametrize("args", [["--help"], ["keys", "--help"]])
def test_help(tmp_path: Path, args: list[str]) -> None:
    assert "usage" in gw(*args, cwd=tmp_path).stdout


# The server's libraries: the HTTP stack alone took 0.2 s of every command's
# start (0.34 s for --help), which scripts and this suite pay per call.
SERVER_LIBRARIES = ("aiohttp", "yarl", "multidict", "asyncpg", "redis", "prometheus_client")


def test_commands_on_sqlite_do_not_import_the_server(tmp_path: Path) -> None:
    """The commands scripts run against an SQLite database start without the
    server's libraries (``serve`` needs them all; PostgreSQL needs asyncpg)."""
    commands = [["--help"], ["check-config"], ["workspaces", "create", "acme"], ["workspaces", "list"],
                ["keys", "create", "--workspace", "acme"], ["keys", "list"], ["keys", "revoke", "1"], ["usage"],
                ["users", "create", "ann@example.com", "--admin", "--password-stdin"], ["users", "list"]]
    for args in commands:
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "gateway", *args], cwd=tmp_path, env=ENV,
                             input="a long enough password\n", capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (args, run.stderr[-2000:])
        modules = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
                   if line.startswith("import time:")}
        assert "gateway.cli" in modules
        assert sorted(m for m in modules if m.split(".")[0] in SERVER_LIBRARIES) == [], args


def test_usage_shows_names_dollars_and_video_tokens(
    tmp_path: Path, upstream: Upstream, config_files: ConfigFiles
) -> None:
    """Before the fix: ids instead of names, 5.1e-05 for a cost, a blank
    label for rows without a model, and no video tokens."""
    cfg = str(write_config(tmp_path, upstream, files=config_files))
    gw("workspaces", "create", "acme", "--config", cfg, cwd=tmp_path)
    key = gw("keys", "create", "--workspace", "acme", "--name", "ci", "--config", cfg,
             cwd=tmp_path).stdout.strip().splitlines()[-1]
    conn = config_files.conn(Path(cfg))
    insert = ("INSERT INTO usage_events (ts, request_id, workspace_id, key_id, endpoint, model, status, input_tokens, "
              "output_tokens, video_tokens, cost, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1.0)")
    now = time.time()
    conn.execute(insert, (now, "r1", 1, 1, "/v1/chat/completions", "gpt-test", 200, 17, 17, 0, 0.000051))
    conn.execute(insert, (now, "r2", 1, 1, "/v1/video/tasks", "seedance", 200, 0, 0, 108900, 0.7623))
    conn.execute(insert, (now, "r3", None, None, "/v1/chat/completions", None, 401, 0, 0, 0, 0.0))
    conn.commit()
    conn.close()

    def table(by: str) -> dict[str, list[str]]:
        lines = gw("usage", "--by", by, "--config", cfg, cwd=tmp_path).stdout.splitlines()
        header = lines[0].split()
        assert header[-2:] == ["video_tokens", "cost"]
        return {line.rsplit(None, len(header) - 1)[0]: line.split()[-(len(header) - 1):] for line in lines[1:]}

    by_model = table("model")
    assert by_model["gpt-test"][-1] == "$0.000051"
    assert by_model["seedance"][-2:] == ["108900", "$0.7623"]
    assert by_model["(no model)"][:2] == ["1", "1"], "the 401 is a request and an error"
    by_key = table("key")
    assert f"ci ({key[:10]}...)" in by_key and by_key[f"ci ({key[:10]}...)"][-1] == "$0.762351"
    assert "(no key)" in by_key
    by_workspace = table("workspace")
    assert by_workspace["acme"][0] == "2" and "(no workspace)" in by_workspace
