"""How the command line finds and reads its config, as real subprocesses:
``--config`` before or after the command, a missing file is an error, flags
beat the file and the embedded default, and only the commands that talk to
upstreams need the upstream secrets."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import Upstream
from .test_cli import ENV, free_port, gw, wait_http, write_config

# Where --config goes: before the command, after it, or (for commands in a
# group: keys, workspaces) between the group and its action.
POSITIONS = ("before", "after", "middle")


def placed(position: str, cfg: str, *command: str) -> list[str]:
    if position == "before":
        return ["--config", cfg, *command]
    if position == "middle" and len(command) > 1:
        return [command[0], "--config", cfg, *command[1:]]
    return [*command, "--config", cfg]


@pytest.mark.sqlite_only("the SQLite file is found next to the config, never in the working directory")
@pytest.mark.parametrize("position", POSITIONS)
def test_config_is_read_wherever_it_is_placed(tmp_path: Path, upstream: Upstream, position: str) -> None:
    """Before the fix, ``gateway --config F keys list`` ignored F and used
    ./gateway.db; ``check-config`` said no config was found."""
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = str(write_config(etc, upstream))
    work = tmp_path / "work"
    work.mkdir()

    def run(*command: str) -> str:
        return gw(*placed(position, cfg, *command), cwd=work).stdout

    assert run("check-config").startswith("ok: ")
    assert "acme" in run("workspaces", "create", "acme")
    key = run("keys", "create", "--workspace", "acme").strip().splitlines()[-1]
    assert key[:10] in run("keys", "list")
    assert "acme" in run("workspaces", "list")
    assert "(none)" in run("usage")
    assert not (work / "gateway.db").exists(), "nothing falls back to ./gateway.db"
    rows = sqlite3.connect(etc / "gateway.db").execute("SELECT prefix FROM api_keys").fetchall()
    assert rows == [(key[:10],)]


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "missing.toml", "keys", "list"],
        ["keys", "list", "--config", "missing.toml"],
        ["keys", "--config", "missing.toml", "list"],
        ["--config", "missing.toml", "check-config"],
        ["--config", "missing.toml", "serve"],
        ["serve", "--config", "missing.toml"],
    ],
)
def test_a_config_file_that_does_not_exist_is_an_error(tmp_path: Path, args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 2
    assert r.stderr.strip() == "config error: missing.toml: file not found"
    assert not (tmp_path / "gateway.db").exists()


def test_gateway_config_naming_a_missing_file_is_an_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "gateway", "usage"], cwd=tmp_path, capture_output=True, text=True,
                       env={**ENV, "GATEWAY_CONFIG": "elsewhere.toml"}, timeout=20)
    assert r.returncode == 2 and "elsewhere.toml: file not found" in r.stderr
    assert not (tmp_path / "gateway.db").exists()


def test_two_different_config_paths_are_refused(tmp_path: Path, upstream: Upstream) -> None:
    cfg = str(write_config(tmp_path, upstream))
    r = gw("--config", cfg, "keys", "list", "--config", "other.toml", cwd=tmp_path, check=False)
    assert r.returncode == 2 and "--config" in r.stderr and "other.toml" in r.stderr
    same = gw("--config", cfg, "keys", "list", "--config", cfg, cwd=tmp_path)
    assert "(none)" in same.stdout


def test_version(tmp_path: Path) -> None:
    from gateway import __version__

    assert gw("--version", cwd=tmp_path).stdout.strip() == f"gateway {__version__}"


def serve(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway", "serve", *args], cwd=cwd, env=ENV,
                                stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def wait_log(log: Path, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} never logged: {log.read_text()}"
        time.sleep(0.05)
    return log.read_text()


async def test_serve_flags_win_over_the_embedded_default(tmp_path: Path) -> None:
    """Before the fix --port and --workers were ignored without a config
    file: the default served on 8080 with one process."""
    port = free_port()
    log = tmp_path / "serve.log"
    proc = serve(["--port", str(port), "--workers", "2"], tmp_path, log)
    try:
        await wait_http(f"http://127.0.0.1:{port}/readyz")
        started = wait_log(log, "gateway listening on")
        assert f"gateway listening on 127.0.0.1:{port};" in started and "workers: 2" in started
    finally:
        stop(proc)


async def test_serve_flags_win_over_the_file(tmp_path: Path, upstream: Upstream) -> None:
    cfg = write_config(tmp_path, upstream, port=free_port())
    port = free_port()
    log = tmp_path / "serve.log"
    proc = serve(["--config", str(cfg), "--port", str(port), "--workers", "2"], tmp_path, log)
    try:
        await wait_http(f"http://127.0.0.1:{port}/readyz")
        assert "workers: 2" in wait_log(log, "gateway listening on")
    finally:
        stop(proc)


SECRETS_CONFIG = """
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "FIRST_HOUR_UNSET_OPENAI"

[[upstreams]]
name = "assets"
kind = "volcengine"
base_url = "http://127.0.0.1:9"
access_key_env = "FIRST_HOUR_UNSET_AK"
secret_key_env = "FIRST_HOUR_UNSET_SK"

[[models]]
name = "m"
routes = [{ upstream = "openai" }]
"""


def test_only_serve_and_check_config_need_the_upstream_secrets(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(SECRETS_CONFIG)
    gw("workspaces", "create", "acme", cwd=tmp_path)
    assert "acme" in gw("workspaces", "list", cwd=tmp_path).stdout
    key = gw("keys", "create", "--workspace", "acme", cwd=tmp_path).stdout.strip().splitlines()[-1]
    assert key[:10] in gw("keys", "list", cwd=tmp_path).stdout
    gw("keys", "revoke", "1", cwd=tmp_path)
    assert "(none)" in gw("usage", cwd=tmp_path).stdout
    # Every missing variable at once, not one per run.
    for command in (["check-config"], ["serve"]):
        r = gw(*command, cwd=tmp_path, check=False)
        assert r.returncode == 2, r.stderr
        for name in ("FIRST_HOUR_UNSET_OPENAI", "FIRST_HOUR_UNSET_AK", "FIRST_HOUR_UNSET_SK"):
            assert f"environment variable {name} is not set" in r.stderr


def test_check_config_without_a_file_describes_the_embedded_default(tmp_path: Path) -> None:
    out = gw("check-config", cwd=tmp_path).stdout
    assert "embedded default" in out and "mock-gpt" in out


def test_keys_expire_in_the_future_and_show_as_expired(tmp_path: Path, upstream: Upstream) -> None:
    """Before the fix --expires 7d meant seven days ago, and keys list called
    an expired key active."""
    cfg = str(write_config(tmp_path, upstream))
    gw("workspaces", "create", "acme", "--config", cfg, cwd=tmp_path)
    before = time.time()
    gw("keys", "create", "--workspace", "acme", "--expires", "7d", "--config", cfg, cwd=tmp_path)
    conn = sqlite3.connect(tmp_path / "gateway.db")
    (expires,) = conn.execute("SELECT expires_at FROM api_keys WHERE id = 1").fetchone()
    assert before + 7 * 86400 - 5 < expires < time.time() + 7 * 86400 + 5
    assert "active" in gw("keys", "list", "--config", cfg, cwd=tmp_path).stdout

    for past in ("2000-01-01T00:00:00", "2000-01-01"):
        r = gw("keys", "create", "--workspace", "acme", "--expires", past, "--config", cfg, cwd=tmp_path,
               check=False)
        assert r.returncode == 1 and "in the past" in r.stderr
    assert conn.execute("SELECT COUNT(*) FROM api_keys").fetchone() == (1,)

    conn.execute("UPDATE api_keys SET expires_at = ? WHERE id = 1", (time.time() - 1,))
    conn.commit()
    listed = gw("keys", "list", "--config", cfg, cwd=tmp_path).stdout.splitlines()
    assert listed[1].split()[-1] == "expired"


def test_mock_serves_every_protocol_on_its_own(tmp_path: Path) -> None:
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "gateway", "mock", "--port", str(port)], cwd=tmp_path, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        check_mock(proc, port)


def check_mock(proc: subprocess.Popen[str], port: int) -> None:
    import json
    import urllib.request

    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first
        base = f"http://127.0.0.1:{port}"

        def post(path: str, body: dict[str, object]) -> dict[str, object]:
            req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": "Bearer anything", "x-api-key": "anything",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return dict(json.loads(r.read()))

        msgs = [{"role": "user", "content": "hi"}]
        assert post("/v1/chat/completions", {"model": "m", "messages": msgs})["object"] == "chat.completion"
        assert post("/v1/messages", {"model": "m", "max_tokens": 5, "messages": msgs})["type"] == "message"
        assert post("/v1/responses", {"model": "m", "input": "hi"})["object"] == "response"
        assert "data" in post("/v1/images/generations", {"model": "m", "prompt": "a cat"})
        task = post("/api/v3/contents/generations/tasks", {"model": "m", "content": [{"type": "text", "text": "x"}]})
        assert task["id"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


def demo(tmp_path: Path, port: int, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """A `gateway demo` and its output up to "press Ctrl-C"."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or "Ctrl-C" not in lines[-1]:
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            proc.stdout.close()
            raise AssertionError(f"demo exited early: {lines}")
        lines.append(line)
    return proc, lines


def admin_get(base: str, token: str, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def test_demo_prints_the_console_and_an_admin_token(tmp_path: Path) -> None:
    """Before the fix the demo's console could not be opened: no admin token.
    The folder also holds a gateway.toml whose secrets are not set: the demo
    does not read it."""
    (tmp_path / "gateway.toml").write_text(SECRETS_CONFIG)
    port = free_port()
    env = {k: v for k, v in ENV.items() if k not in ("GATEWAY_ADMIN_TOKEN", "GATEWAY_CONFIG")}
    proc, lines = demo(tmp_path, port, env)
    with proc:
        check_demo(proc, lines, port)


def check_demo(proc: subprocess.Popen[str], lines: list[str], port: int) -> None:
    try:
        console = next(x for x in lines if "/console/" in x)
        assert f"http://127.0.0.1:{port}/console/" in console
        token = next(x for x in lines if "admin token" in x).split()[-1]
        assert len(token) >= 32
        status, body = admin_get(f"http://127.0.0.1:{port}", token, "/admin/api/workspaces")
        assert status == 200 and b'"demo"' in body
        assert admin_get(f"http://127.0.0.1:{port}", "wrong", "/admin/api/workspaces")[0] == 401
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_demo_uses_the_admin_token_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    secret = "first-hour-admin-token-0123456789"
    proc, lines = demo(tmp_path, port, {**ENV, "GATEWAY_ADMIN_TOKEN": secret})
    with proc:
        try:
            assert not any(secret in x for x in lines), "a token the user set is not echoed"
            assert any("GATEWAY_ADMIN_TOKEN" in x for x in lines)
            assert admin_get(f"http://127.0.0.1:{port}", secret, "/admin/api/workspaces")[0] == 200
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0


@pytest.mark.parametrize("command", ["demo", "mock"])
def test_demo_and_mock_refuse_a_config_they_would_not_read(tmp_path: Path, command: str) -> None:
    r = gw(command, "--config", "gateway.toml", cwd=tmp_path, check=False)
    assert r.returncode == 2 and "--config" in r.stderr


def test_serve_reads_the_admin_token_without_a_config_file(tmp_path: Path) -> None:
    """The embedded default enables the console when GATEWAY_ADMIN_TOKEN is set."""
    port = free_port()
    secret = "first-hour-admin-token-9876543210"
    env = {**ENV, "GATEWAY_ADMIN_TOKEN": secret}
    with (tmp_path / "serve.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)], cwd=tmp_path,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                status, _ = admin_get(f"http://127.0.0.1:{port}", secret, "/admin/api/workspaces")
                break
            except OSError:
                assert time.monotonic() < deadline, "serve never came up"
                time.sleep(0.05)
        assert status == 200
    finally:
        stop(proc)


def test_no_command_prints_help(tmp_path: Path) -> None:
    r = gw(cwd=tmp_path, check=False)
    assert r.returncode == 2 and "usage: gateway" in r.stderr
    assert os.listdir(tmp_path) == []
