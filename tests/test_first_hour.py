"""A newcomer's first hour, from the README as written.

The README's code blocks are parsed and their commands run in order, as
subprocesses in a temp dir (installing aside: this test runs in the venv
the suite was installed into): the demo with its curl line and a console
sign-in in headless Chromium; then the offline block (the bundled mock, the
example config pointed at it, check-config, serve, a workspace, a key and
its first request, usage, revocation and a refused request), once with
``--config`` where the README puts it and once with it before the command.

So a documented command that stops working, or a step that disappears from
the README, fails the suite. What the test changes is only what the
machine needs: free ports in place of 8080 / 8081 (other tests run beside
it), and the secrets the README leaves to the reader.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from .browser import require_browser, start_chrome

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the venv's bin: `gateway` as installed
CLI_TIMEOUT_S = 30


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)


def commands(block: str) -> list[str]:
    """One entry per shell command line, continuation lines joined."""
    lines = (line.strip() for line in block.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def bare(command: str) -> str:
    """The command without its trailing comment (the test's own reading;
    bash gets the line as written)."""
    return re.sub(r"\s+#\s.*$", "", command).strip()


def config_first(command: str) -> str:
    """``gateway CMD ... --config F`` as ``gateway --config F CMD ...``."""
    return re.sub(r"\bgateway((?:\s+[^\s|&;)]+)*?)\s+--config\s+([^\s|&;)]+)", r"gateway --config \2\1", command)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, f"exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


def base_env() -> dict[str, str]:
    """The environment of a fresh shell: none of the gateway's variables."""
    drop = {"GATEWAY_CONFIG", "GATEWAY_ADMIN_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ARK_API_KEY",
            "VOLC_ACCESS_KEY", "VOLC_SECRET_KEY", "PROMETHEUS_MULTIPROC_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_readme_setup_commands_share_one_venv() -> None:
    """The two set-up commands: one installs and runs the demo, one the
    suite; each creates the same venv (so either works first), and the
    suite's install is editable (the subprocess tests run the source)."""
    first = commands(sh_blocks(README.read_text())[0])
    assert len(first) == 2, first
    run, suite = first
    for line in first:
        assert line.startswith("python3 -m venv .venv && .venv/bin/pip install -e "), line
    assert run.endswith("&& .venv/bin/gateway demo")
    assert suite.endswith("&& .venv/bin/python -m pytest") and "'.[test]'" in suite


# ------------------------------------------------------------------ the demo


def readme_demo() -> str:
    """The README's demo command, as the shell would run it after the install."""
    run = commands(sh_blocks(README.read_text())[0])[0]
    demo = run.split("&&")[-1].strip()
    assert demo == ".venv/bin/gateway demo"
    return demo.removeprefix(".venv/bin/")


def sign_in_and_see_the_request(console: str, token: str, profile: Path) -> None:
    from selenium.webdriver.common.by import By

    from .test_console_browser import wait_for

    driver = start_chrome(profile)
    try:
        find = driver.find_element
        driver.get(console)
        wait_for(lambda: find(By.ID, "signin-form").is_displayed(), what="sign-in form")
        find(By.ID, "token").send_keys(token)
        find(By.ID, "signin-button").click()
        wait_for(lambda: find(By.ID, "app").is_displayed(), what="the console after sign-in")

        # The first screen is the dashboard, with the request the curl line made.
        def counted() -> bool:
            text: str = find(By.ID, "total-requests").text
            if text.split()[-1:] == ["1"]:
                return True
            find(By.ID, "dash-refresh").click()
            time.sleep(0.2)
            return False

        wait_for(lambda: find(By.ID, "view-dashboard").is_displayed(), what="the dashboard")
        wait_for(counted, what="the demo's request on the dashboard")
    finally:
        driver.quit()


def test_demo_curl_and_console(tmp_path: Path) -> None:
    require_browser()
    port = free_port()
    command = f"{readme_demo()} --port {port}"  # the README's runs on 8080, which may be taken here
    with subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tmp_path, env=base_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as demo:
        try:
            assert demo.stdout is not None
            lines: list[str] = []
            while not lines or "Ctrl-C" not in lines[-1]:
                line = demo.stdout.readline()
                assert line, f"demo exited early: {lines}"
                lines.append(line.strip())
            curl = next(x for x in lines if x.startswith("curl "))
            out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
            assert '"object":"chat.completion"' in out.stdout, out
            console = next(x for x in lines if x.startswith("console: ")).split()[-1]
            assert console == f"http://127.0.0.1:{port}/console/"
            token = next(x for x in lines if x.startswith("admin token: ")).split()[-1]
            sign_in_and_see_the_request(console, token, tmp_path / "chrome-profile")
        finally:
            demo.send_signal(signal.SIGINT)
            assert demo.wait(30) == 0


# ------------------------------------------------------------------ the offline block


@dataclass
class Shell:
    """Runs README lines as bash would, one at a time, keeping the
    variables they export or assign, and the jobs they start with ``&``."""

    cwd: Path
    env: dict[str, str] = field(default_factory=base_env)
    jobs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["bash", "-c", command], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                           timeout=CLI_TIMEOUT_S)
        assert r.returncode == 0, f"{command}\nexit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def assign(self, command: str) -> str:
        m = re.fullmatch(r"(\w+)=(\$\(.*\))", bare(command))
        assert m, command
        name = m[1]
        value = self.run(f'{m[1]}={m[2]}\nprintf %s "${name}"').stdout
        self.env[name] = value
        return value

    def export(self, command: str) -> None:
        for word in shlex.split(bare(command))[1:]:
            name, _, value = word.partition("=")
            self.env[name] = value

    def background(self, command: str, log: str) -> subprocess.Popen[bytes]:
        with (self.cwd / log).open("wb") as out:
            job = subprocess.Popen(["bash", "-c", "exec " + bare(command).removesuffix("&").strip()], cwd=self.cwd,
                                   env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.jobs.append(job)
        return job

    def stop(self) -> None:
        for job in reversed(self.jobs):
            if job.poll() is None:
                job.send_signal(signal.SIGTERM)
        for job in self.jobs:
            assert job.wait(30) == 0, f"a background job exited with {job.returncode}"


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    # "From the checkout": the one file the block reads.
    shutil.copy(ROOT / "config.example.toml", tmp_path)
    sh = Shell(tmp_path)
    try:
        yield sh
    finally:
        for job in sh.jobs:
            if job.poll() is None:
                job.kill()
                job.wait()


def offline_block() -> list[str]:
    blocks = [b for b in sh_blocks(README.read_text()) if "gateway mock" in b]
    assert len(blocks) == 1, "the README's offline block (the one that runs `gateway mock`)"
    return commands(blocks[0])


# What the offline block must show a newcomer, in this order.
STEPS = ("activate", "mock", "config", "export", "check-config", "serve", "workspaces create", "keys create",
         "request", "usage", "keys revoke")


def step(command: str) -> str:
    c = bare(command)
    kinds = [("activate", r"^\. \.venv/bin/activate$"), ("mock", r"^gateway mock\b.*&$"),
             ("config", r"config\.example\.toml > gateway\.toml$"), ("export", r"^export "),
             ("serve", r"\bgateway\b.*\bserve\b.*&$"), ("check-config", r"\bcheck-config\b"),
             ("workspaces create", r"\bworkspaces create\b"), ("keys create", r"\bkeys create\b"),
             ("request", r"^curl .*/v1/"), ("usage", r"\bgateway\b.*\busage\b"), ("keys revoke", r"\bkeys revoke\b")]
    for kind, pattern in kinds:
        if re.search(pattern, c):
            return kind
    return "other"


def wait_until(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def shows_one_request(shell: Shell, usage: str) -> bool:
    """``gateway usage --by key`` lists the key by name with its request."""
    rows = shell.run(usage).stdout.splitlines()
    return any(r.startswith("ci (gw-") and r.split()[2] == "1" for r in rows[1:])


def refused(shell: Shell, request: str) -> bool:
    return "invalid_api_key" in shell.run(request).stdout


@pytest.mark.parametrize("position", ["as written", "--config first"])
def test_the_offline_block_runs_as_written(shell: Shell, position: str) -> None:
    block = offline_block()
    assert [s for s in map(step, block) if s != "other"] == list(STEPS)
    gateway_port, mock_port = free_port(), free_port()

    def adapt(command: str) -> str:
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{gateway_port}")
        command = command.replace("127.0.0.1:8081", f"127.0.0.1:{mock_port}")
        return config_first(command) if position == "--config first" else command

    request = ""
    for line in block:
        command, kind = adapt(line), step(line)
        if position == "--config first" and "--config" in command:
            assert re.search(r"\bgateway --config gateway\.toml \w", command), command
        if kind == "activate":
            continue  # this test already runs in the venv: `gateway` is on PATH
        if kind == "mock":
            wait_port(mock_port, shell.background(f"{bare(command).removesuffix('&')} --port {mock_port}",
                                                  "mock.log"))
        elif kind == "export":
            shell.export(command)
        elif kind == "serve":
            wait_port(gateway_port, shell.background(command, "serve.log"))
        elif command.startswith("KEY="):
            key = shell.assign(command)
            assert re.fullmatch(r"gw-[A-Za-z0-9_-]{43}", key), key
        else:
            out = shell.run(command).stdout
            if kind == "config":
                # The example listens on 8080; here a free port.
                cfg = shell.cwd / "gateway.toml"
                cfg.write_text(re.sub(r"(?m)^port = 8080\b", f"port = {gateway_port}", cfg.read_text()))
                assert f'"http://127.0.0.1:{mock_port}/v1"' in cfg.read_text()
            elif kind == "check-config":
                assert out.startswith("ok: "), out
            elif kind == "workspaces create":
                assert "created workspace acme" in out
            elif kind == "request":
                # The key made a moment ago works on its first request.
                assert '"object":"chat.completion"' in out, out
                request = command
            elif kind == "usage":
                wait_until(partial(shows_one_request, shell, command), "the request's usage row", 5.0)
            elif kind == "keys revoke":
                assert out.startswith("revoked key 1 ")
                wait_until(partial(refused, shell, request), "refusal of the revoked key", 2.0)
    shell.stop()


def test_config_first_rewrites_only_the_config_option() -> None:
    assert config_first("gateway keys create --workspace acme --config g.toml | tail -n 1") == \
        "gateway --config g.toml keys create --workspace acme | tail -n 1"
    assert config_first("K=$(gateway usage --by key --config g.toml)") == "K=$(gateway --config g.toml usage --by key)"
    assert config_first("gateway serve --config g.toml &") == "gateway --config g.toml serve &"
