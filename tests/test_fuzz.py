"""Generated hostile input against a running gateway (marker ``fuzz``; run by
.ci/run, bounded well under a minute): headers, JSON bodies, multipart
forms, query strings and paths from hypothesis, and SSE streams from a
hostile upstream whose every byte the generator chose.

The gateway runs as a real `gateway serve` subprocess with JSON logs, in
front of the bundled mock upstream and a hostile one (both in a thread of
this process). After every generated request the test checks:

- no 500 (a 502/503/504 is the upstream's doing and allowed);
- no secret (the caller's key, the upstream's key, the admin token) in the
  answer's head or body;
- exactly one new usage row for a request the app saw (one that answered
  with ``x-request-id``); none for one the HTTP parser refused;

and at the end of each test: no traceback, no error line and no secret in
the gateway's log.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mock.app import create_mock_app
from gateway.server import start_app
from gateway.store import queries
from gateway.store.schema import connect

from .conftest import ADMIN_TOKEN, UPSTREAM_KEY

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------ the hostile upstream


SCRIPTS: dict[str, dict[str, Any]] = {}


async def hostile_answer(request: web.Request) -> web.StreamResponse:
    """Answers what the script named by the request's ``x-hostile`` header
    (forwarded by the gateway as an end-to-end header) says: a status, a
    content type, raw chunks; then ends, or drops the connection."""
    await request.read()
    script = SCRIPTS.get(request.headers.get("x-hostile", ""), {})
    resp = web.StreamResponse(status=int(script.get("status", 200)),
                              headers={"Content-Type": script.get("ctype", "text/event-stream")})
    await resp.prepare(request)
    for chunk in script.get("chunks", []):
        await resp.write(chunk)
        await asyncio.sleep(0)
    if script.get("drop") and request.transport is not None:
        request.transport.close()
        return resp
    await resp.write_eof()
    return resp


class Upstreams:
    """The mock and the hostile upstream, served from a thread's own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ports: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        ready = threading.Event()
        self._ready = ready

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        mock = await start_app(create_mock_app(UPSTREAM_KEY, record=False), "127.0.0.1", 0, shutdown_timeout=0.5)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/images/generations",
                     "/v1/images/edits"):
            app.router.add_post(path, hostile_answer)
        hostile = await start_app(app, "127.0.0.1", 0, shutdown_timeout=0.5)
        self.ports = {"mock": mock.port, "hostile": hostile.port}
        self._ready.set()
        await self._stop.wait()
        await hostile.runner.cleanup()
        await mock.runner.cleanup()

    def __enter__(self) -> Upstreams:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.loop.close()


# ------------------------------------------------------------ the gateway


def fuzz_toml(mock: int, hostile: int) -> str:
    up = 'api_key_env = "MOCK_UPSTREAM_KEY"\nconnect_timeout_s = 2\nfirst_byte_timeout_s = 5\nidle_timeout_s = 2\n'
    # The hostile upstream fails on purpose: no breaker or cool-down may stop
    # the next example from reaching it.
    calm = "breaker_failures = 1000000\nrate_limit_cooldown_s = 0\nrate_limit_cooldown_max_s = 0\n"
    return f"""
[server]
host = "127.0.0.1"
port = 0
max_body_mb = 1
log_format = "json"
log_requests = true
header_timeout_s = 2
key_refresh_ms = 100

[usage]
flush_interval_ms = 10

[[upstreams]]
name = "mock"
kind = "openai"
base_url = "http://127.0.0.1:{mock}/v1"
{up}
[[upstreams]]
name = "mock-anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:{mock}/v1"
{up}
[[upstreams]]
name = "hostile"
kind = "openai"
base_url = "http://127.0.0.1:{hostile}/v1"
{up}{calm}
[[upstreams]]
name = "hostile-anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:{hostile}/v1"
{up}{calm}
[[upstreams]]
name = "ark"
kind = "ark"
base_url = "http://127.0.0.1:{mock}/api/v3"
{up}
[[models]]
name = "gpt-test"
routes = [{{ upstream = "mock", model = "gpt-test" }}]
price = {{ input = 1.0, output = 2.0 }}

[[models]]
name = "renamed"
routes = [{{ upstream = "mock", model = "upstream-name" }}]

[[models]]
name = "claude-test"
routes = [{{ upstream = "mock-anthropic" }}]

[[models]]
name = "gpt-image-test"
routes = [{{ upstream = "mock" }}]

[[models]]
name = "evil"
routes = [{{ upstream = "hostile", model = "evil-upstream" }}]

[[models]]
name = "evil-claude"
routes = [{{ upstream = "hostile-anthropic" }}]

[[models]]
name = "seedance"
routes = [{{ upstream = "ark" }}]
price = {{ video = 10.0 }}
"""


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    db: Path
    log: Path
    key: str
    other_key: str

    def rows(self) -> int:
        conn = sqlite3.connect(self.db)
        try:
            # Requests' rows: a video task's billing row comes when the
            # poller sees it done, whenever that is.
            sql = "SELECT COUNT(*) FROM usage_events WHERE endpoint != 'video.task.billing'"
            return int(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()

    def last(self, n: int) -> list[tuple[Any, ...]]:
        """The last ``n`` rows, briefly (for a failure's message)."""
        conn = sqlite3.connect(self.db)
        try:
            sql = "SELECT id, ts, request_id, endpoint, status, error_type FROM usage_events ORDER BY id DESC LIMIT ?"
            return conn.execute(sql, (n,)).fetchall()
        finally:
            conn.close()


SECRETS: list[str] = []


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with Upstreams() as ups:
        cfg = tmp / "gateway.toml"
        cfg.write_text(fuzz_toml(ups.ports["mock"], ups.ports["hostile"]))
        db = tmp / "gateway.db"
        conn = connect(db)
        made = []
        for name in ("acme", "globex"):
            ws = queries.create_workspace(conn, name)
            made.append(queries.create_key(conn, ws["id"], name=name)[1])
        conn.close()
        log = tmp / "gateway.log"
        env = {**os.environ, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        with log.open("wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
                                    stdout=f, stderr=f, env=env, cwd=tmp)
        port = 0
        deadline = time.monotonic() + 20
        while not port and time.monotonic() < deadline:
            for line in log.read_bytes().splitlines():
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if obj.get("event") == "start":
                    port = obj["port"]
            time.sleep(0.05)
        assert port, log.read_text()
        SECRETS[:] = [made[0], made[1], UPSTREAM_KEY, ADMIN_TOKEN]
        s = Served(proc, port, db, log, made[0], made[1])
        yield s
        proc.terminate()
        assert proc.wait(20) == 0
        check_log(s)


def check_log(s: Served, since: int = 0) -> None:
    text = s.log.read_bytes()[since:]
    assert b"Traceback" not in text, text.decode(errors="replace")[-4000:]
    for line in text.splitlines():
        obj = orjson.loads(line)
        assert obj.get("level") not in ("error", "critical"), obj
        assert "exc" not in obj, obj
    for secret in SECRETS:
        assert secret.encode() not in text, "a secret reached the log"
        assert secret[8:24].encode() not in text, "part of a secret reached the log"


# ------------------------------------------------------------ one request


def exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def wait_rows(s: Served, n: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = s.rows()
        if got >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def attack(s: Served, head: list[bytes], body: bytes) -> bytes:
    """Send one request (``head``: the request line and header lines,
    without Content-Length or Connection) and check what the module
    docstring promises about its answer and its usage row."""
    before = s.rows()
    data = b"\r\n".join([*head, b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]) + b"\r\n\r\n"
    answer = exchange(s.port, data + body)
    assert answer, "no answer at all"
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split(b" ")[1])
    assert status != 500, answer[:2000]
    for secret in SECRETS:
        assert secret.encode() not in answer, "a secret in the answer"
    head_part = rest.partition(b"\r\n\r\n")[0].lower()
    seen_by_app = b"x-request-id:" in head_part
    target = head[0].split(b" ")[1] if b" " in head[0] else b""
    path = unquote(target.decode("latin-1").partition("?")[0])
    expected = before + (1 if seen_by_app and path.startswith("/v1/") else 0)
    got = wait_rows(s, expected)
    if not seen_by_app:
        assert b'"bad_http_request"' in answer or status in (400, 404, 405, 408, 413, 431), answer[:500]
    assert got == expected, (head, body[:200], answer[:500], got, expected, s.last(max(got - before, 1) + 1))
    return answer


# ------------------------------------------------------------ strategies

PATHS = ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/images/generations", "/v1/images/edits",
         "/v1/video/tasks", "/v1/models", "/v1/assets", "/v1/asset-groups"]
MODELS = ["gpt-test", "renamed", "claude-test", "gpt-image-test", "evil", "evil-claude", "seedance", "nope", ""]

header_name = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1,
                      max_size=30)
header_value = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").decode("latin-1")),
    st.sampled_from(["gzip", "chunked", "identity", "multipart/form-data; boundary=x", "application/json",
                     "text/event-stream", "close", "100-continue", "x" * 9000]),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                        st.text(max_size=40))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=12), inner,
                                                                               max_size=4)), max_leaves=12)


def encode(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits: write it by hand
        import json

        return json.dumps(obj).encode()


FITTING = {"/v1/chat/completions": ["gpt-test", "renamed", "evil"], "/v1/messages": ["claude-test", "evil-claude"],
           "/v1/responses": ["gpt-test", "evil"], "/v1/images/generations": ["gpt-image-test", "evil"],
           "/v1/images/edits": ["gpt-image-test"], "/v1/video/tasks": ["seedance"]}


@st.composite
def json_bodies(draw: st.DrawFn, path: str = "") -> bytes:
    obj: dict[str, Any] = draw(st.dictionaries(
        st.sampled_from(["model", "messages", "input", "prompt", "stream", "stream_options", "max_tokens", "n",
                         "resources", "provider_options", "platform", "name", "group_id", "url", "asset_type",
                         "tools", "duration"]), json_value, max_size=6))
    if draw(st.booleans()):
        obj["model"] = draw(st.sampled_from(MODELS))
    elif path in FITTING:  # a request the gateway takes, so the rest of it gets tried upstream
        obj["model"] = draw(st.sampled_from(FITTING[path]))
        obj.update(prompt="p", input="hi", max_tokens=5)
    if draw(st.booleans()):
        obj["messages"] = [{"role": "user", "content": draw(st.text(max_size=30))}]
    raw = encode(obj)
    tweak = draw(st.sampled_from(["none", "dup-model", "escaped-key", "truncate", "garbage", "bom"]))
    if tweak == "dup-model" and raw != b"{}":
        raw = raw[:-1] + b',"model":' + encode(draw(st.sampled_from(MODELS))) + b"}"
    elif tweak == "escaped-key":
        raw = raw.replace(b'"model"', b'"mod\\u0065l"', 1)
    elif tweak == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif tweak == "garbage":
        raw = draw(st.binary(max_size=200))
    elif tweak == "bom":
        raw = b"\xef\xbb\xbf" + raw
    return raw


def auth_header(draw: st.DrawFn, s: Served) -> list[bytes]:
    choice = draw(st.sampled_from(["key", "key", "other", "x-api-key", "none", "garbage", "long"]))
    if choice == "key":
        return [b"Authorization: Bearer " + s.key.encode()]
    if choice == "other":
        return [b"Authorization: Bearer " + s.other_key.encode()]
    if choice == "x-api-key":
        return [b"x-api-key: " + s.key.encode()]
    if choice == "garbage":
        return [b"Authorization: " + draw(header_value).encode("latin-1", "replace")]
    if choice == "long":
        return [b"Authorization: Bearer " + s.key.encode() + b"A" * 9000]
    return []


# ------------------------------------------------------------ the tests


@FUZZ
@given(data=st.data())
def test_fuzz_headers_and_json(served: Served, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(PATHS))
    extra = data.draw(st.lists(st.tuples(header_name, header_value), max_size=5))
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: gw", *auth_header(data.draw, served)]
    head += [k.encode() + b": " + v.encode("latin-1", "replace") for k, v in extra
             if k.lower() not in ("content-length", "connection", "transfer-encoding", "host")]
    if data.draw(st.booleans()):
        head.append(b"x-request-id: " + data.draw(header_value).encode("latin-1", "replace"))
    attack(served, head, data.draw(json_bodies(path)))


@FUZZ
@given(data=st.data())
def test_fuzz_paths_and_queries(served: Served, data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([*PATHS, "/v1/video/tasks/", "/v1/assets/", "/v1/asset-groups/", "/v1/models/",
                                      "/admin/api/keys/", "/console/", "/v1/", "/"]))
    tail = data.draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40))
    encoded = "".join(c if c.isalnum() or c in "-._~/%" else f"%{ord(c):02X}" for c in tail)
    query = data.draw(st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#"),
                              max_size=60))
    method = data.draw(st.sampled_from(["GET", "POST", "DELETE", "PATCH", "PUT", "OPTIONS", "HEAD"]))
    target = (base + encoded + ("?" + query if query else "")).encode()
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: gw", *auth_header(data.draw, served)]
    if base.startswith("/admin") and data.draw(st.booleans()):
        head.append(b"Authorization: Bearer " + ADMIN_TOKEN.encode())
    body = data.draw(json_bodies()) if method in ("POST", "PATCH", "PUT") else b""
    answer = attack(served, head, body)
    if method == "HEAD":
        return
    assert answer


@FUZZ
@given(data=st.data())
def test_fuzz_multipart(served: Served, data: st.DataObject) -> None:
    boundary = data.draw(st.text(st.characters(min_codepoint=39, max_codepoint=122), min_size=1, max_size=20))
    parts = []
    for _ in range(data.draw(st.integers(0, 4))):
        name = data.draw(st.sampled_from(["model", "stream", "prompt", "image", "image[]", "n"]))
        extra = data.draw(st.sampled_from(["", '; filename="a.png"', "; name*=utf-8''model", '; name="x"']))
        value = data.draw(st.one_of(st.sampled_from([b"gpt-image-test", b"renamed", b"true", b"nope"]),
                                    st.binary(max_size=40)))
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode()
                     + value + b"\r\n")
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if data.draw(st.booleans()) else b"")
    ctype = data.draw(st.sampled_from([f"multipart/form-data; boundary={boundary}",
                                       f'multipart/form-data; boundary="{boundary}"',
                                       f"multipart/form-data; boundary={boundary}; boundary=other",
                                       "multipart/form-data", "application/json", "text/plain"]))
    head = [b"POST /v1/images/edits HTTP/1.1", b"Host: gw", *auth_header(data.draw, served),
            b"Content-Type: " + ctype.encode("utf-8", "replace")]
    attack(served, head, body)


sse_line = st.one_of(
    st.sampled_from([b"data: [DONE]", b"data: {}", b'data: {"usage":{"prompt_tokens":-1}}', b"event: error",
                     b'data: {"choices":[],"usage":{"prompt_tokens":1e308,"completion_tokens":"x"}}',
                     b'data: {"type":"message_delta","usage":{"output_tokens":99999999999999999999}}',
                     b'data: {"type":"response.completed","response":{"usage":null}}', b": comment", b"retry: x",
                     b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}']),
    st.binary(max_size=80),
)


@st.composite
def sse_streams(draw: st.DrawFn) -> list[bytes]:
    text = b""
    for _ in range(draw(st.integers(0, 12))):
        text += draw(sse_line) + draw(st.sampled_from([b"\n", b"\n\n", b"\r\n\r\n", b"\r", b""]))
    if draw(st.booleans()):
        text += b"x" * draw(st.integers(0, 300_000))  # an event that does not end
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=6)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@FUZZ
@given(data=st.data())
def test_fuzz_hostile_upstream_sse(served: Served, data: st.DataObject) -> None:
    path, model = data.draw(st.sampled_from([("/v1/chat/completions", "evil"), ("/v1/messages", "evil-claude"),
                                             ("/v1/responses", "evil"), ("/v1/images/generations", "evil")]))
    script_id = f"s{len(SCRIPTS)}"
    SCRIPTS[script_id] = {
        "status": data.draw(st.sampled_from([200, 200, 200, 400, 429, 503])),
        "ctype": data.draw(st.sampled_from(["text/event-stream", "application/json", "text/html", ""])),
        "chunks": data.draw(sse_streams()),
        "drop": data.draw(st.booleans()),
    }
    body = {"model": model, "stream": data.draw(st.booleans()), "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}], "input": "hi", "prompt": "p"}
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: gw", b"Authorization: Bearer " + served.key.encode(),
            b"Content-Type: application/json", b"x-hostile: " + script_id.encode()]
    answer = attack(served, head, orjson.dumps(body))
    assert int(answer.split(b" ")[1]) in (200, 400, 429, 502, 503, 504), answer[:300]


def test_fuzz_log_is_clean(served: Served) -> None:
    """Run last in the module: the whole log so far, checked."""
    check_log(served)
