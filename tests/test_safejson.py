"""orjson's key cache cannot be used against the gateway (gateway.safejson).

orjson finds a decoded key in its process-wide cache by a 64-bit xxh3
hash alone. The keys below were computed to collide with "model" (a few
seconds of CPU by a generalized birthday search, as an attacker would);
EVICT lands in the cache slot of "model" with another hash, so that a
colliding key sent after it takes the slot. Every attack runs in a process
of its own: it would poison this one's cache (and this one reads what they
print with json, not orjson)."""

from __future__ import annotations

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

from .conftest import Gateway, Upstream

ROOT = Path(__file__).resolve().parent.parent
COLLIDES_WITH_MODEL = "oD1hk84Qc0ioXhsnyhlb1Tgv61dbGc40H1R1iGv7Qxm9IrmEMtph8QFZIJeyUVKJ"
EVICT = "evict1304"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, COLLIDES_WITH_MODEL, EVICT], capture_output=True,
                         text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_a_key_that_collides_with_model_is_read_as_itself() -> None:
    """Once "model" is cached, orjson reads the colliding key as "model":
    the last one wins, and the gateway would route and bill a model the
    upstream never reads. safejson reads the text."""
    lines = run("""
import sys, orjson
from gateway import safejson
k = sys.argv[1]
orjson.loads(b'{"model": 1}')
raw = ('{"model":"cheap","%s":"dear"}' % k).encode()
print(orjson.dumps(orjson.loads(raw)).decode())
print(orjson.dumps(safejson.loads(raw)).decode())
print(orjson.dumps(safejson.loads(raw.decode())).decode())
""")
    # (json here: orjson would read the colliding key in this process's cache)
    attack = {"model": "cheap", COLLIDES_WITH_MODEL: "dear"}
    assert json.loads(lines[0]) in ({"model": "dear"}, attack)  # the first: orjson as of 3.13
    assert json.loads(lines[1]) == json.loads(lines[2]) == attack


def test_a_poisoned_cache_does_not_change_what_is_read() -> None:
    """EVICT, then the colliding key alone: orjson then reads every "model"
    of the process as the colliding key (each tenant's request would be a
    400, an upstream's usage read as nothing). safejson still reads
    "model", in a body written as orjson writes it and in one that is not."""
    lines = run("""
import sys, orjson
from gateway import safejson
from gateway.protocols.base import parse_json_body
k, evict = sys.argv[1], sys.argv[2]
orjson.loads(b'{"model": 1}')
orjson.loads(('{"%s": 1}' % evict).encode())
orjson.loads(('{"%s": 1}' % k).encode())
print(list(orjson.loads(b'{"model":"a"}')))
print(list(safejson.loads(b'{"model":"a"}')), list(safejson.loads(b'{"model": "a"}')))
print(parse_json_body(b'{"model":"gpt","messages":[]}')[1])
""")
    assert lines[0] in (f"['{COLLIDES_WITH_MODEL}']", "['model']")  # the first: orjson as of 3.13
    assert lines[1:] == ["['model'] ['model']", "gpt"]


def test_bodies_sent_without_a_key_do_not_reach_the_cache() -> None:
    """The console's sign-in, sign-up and invitation bodies (no key needed)
    are parsed without orjson: sent EVICT and the colliding key that way,
    the process's "model" is still "model" (through safejson.loads, the
    same bodies poison it). Their parse is as strict as orjson's."""
    lines = run("""
import sys, orjson
from gateway import safejson
k, evict = sys.argv[1], sys.argv[2]
orjson.loads(b'{"model": 1}')
for f in (safejson.loads_uncached, safejson.loads):
    f(('{"%s": 1}' % evict).encode())
    f(('{"%s": 1}' % k).encode())
    print(list(orjson.loads(b'{"model":"a"}')) == ["model"])
for bad in (b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": "\\ud800"}', b'{"a": 18446744073709551616}',
            b'[' * 300 + b']' * 300, b'{"a": 1,}'):
    try:
        safejson.loads_uncached(bad)
        print("taken", bad[:20])
    except orjson.JSONDecodeError:
        pass
print(safejson.loads_uncached('{"email": "a@b.c", "name": "Zo\u00eb", "n": [1, 2.5, null, true]}'.encode()))
""")
    assert lines[0] == "True"
    assert lines[1] in ("False", "True")  # the first: orjson as of 3.13
    assert lines[2:] == ["{'email': 'a@b.c', 'name': 'Zoë', 'n': [1, 2.5, None, True]}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_demo_serves_honest_requests_after_a_poisoning(tmp_path: Path) -> None:
    """The attack against a running gateway (the demo: its mock upstream in
    the same process, so every JSON parse there shares the cache): a
    client sends a body holding EVICT, then one holding the colliding key;
    the next honest requests are served as sent (every one was a 400,
    "Missing required parameter: 'model'")."""
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port), "--db",
                           str(tmp_path / "demo.db")], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as demo:
        try:
            assert demo.stdout is not None
            key = ""
            deadline = time.monotonic() + 30
            while not key:
                assert time.monotonic() < deadline, "the demo did not start"
                line = demo.stdout.readline()
                assert line, "the demo exited"
                if m := re.search(r"Bearer (\S+)'", line):
                    key = m.group(1)
            while "press Ctrl-C" not in demo.stdout.readline():
                pass

            def chat(body: str) -> tuple[int, str]:
                out = subprocess.run(
                    ["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}"
                     "/v1/chat/completions", "-H", f"Authorization: Bearer {key}", "-H",
                     "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=30)
                text, _, code = out.stdout.rpartition("\n")
                return int(code), text

            messages = '"messages":[{"role":"user","content":"hi"}]'
            assert chat(f'{{"model":"mock-gpt",{messages}}}')[0] == 200
            # Bodies without "model", so that nothing (a request forwarded, an
            # answer read) puts "model" back in its slot between the two.
            assert chat(f'{{"{EVICT}":1}}')[0] == 400
            assert chat(f'{{"{COLLIDES_WITH_MODEL}":1}}')[0] == 400
            for body in (f'{{"model":"mock-gpt",{messages}}}', f'{{"model": "mock-gpt", {messages}}}'):
                status, text = chat(body)
                assert status == 200, text
                assert json.loads(text)["model"] == "mock-gpt"
            # The colliding key beside "model" (now cached again) is a key of its own.
            status, text = chat(f'{{"model":"mock-gpt","{COLLIDES_WITH_MODEL}":"mock-gpt-mini",{messages}}}')
            assert status == 200 and json.loads(text)["model"] == "mock-gpt", text
        finally:
            demo.send_signal(signal.SIGINT)
            assert demo.wait(30) == 0


def test_nothing_else_calls_orjson_loads() -> None:
    """Every JSON parse of the gateway goes through safejson (the test
    above could not cover a new call site)."""
    found = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "gateway").rglob("*.py"))
             if p.name != "safejson.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if "orjson.loads" in line]
    assert found == []


async def test_bodies_the_gateway_cannot_write_again_are_not_a_500(
    gateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """An integer beyond 64 bits is read as a float, as orjson reads it
    (json's exact int, which orjson cannot write, made a 500 of every body
    the gateway writes again: a stream it asks usage for, a renamed
    model); a body nested deeper than orjson writes (255) is a 400."""
    key = await gateway.key()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    messages = '"messages":[{"role":"user","content":"hi"}]'
    for model, stream in (("gpt-test", "true"), ("renamed", "false")):
        body = f'{{"model": "{model}", "stream": {stream}, {messages}, "seed": 18446744073709551616}}'
        async with http.post(gateway.url + "/v1/chat/completions", data=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()
    assert json.loads(upstream.state.requests[-1].body)["seed"] == 18446744073709551616.0
    deep = "[" * 300 + "]" * 300
    async with http.post(gateway.url + "/v1/chat/completions", data=f'{{"model":"gpt-test",{messages},"x":{deep}}}',
                         headers=headers) as r:
        assert r.status == 400 and (await r.json())["error"]["message"] == "The request is nested too deeply."
    rows = await gateway.wait_usage(3)
    assert [r["status"] for r in rows] == [200, 200, 400]


async def test_the_sign_in_body_is_parsed_without_orjson(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """The console's sign-in needs no key, so its body never reaches orjson
    (whose cache it would fill): parsed by json, as strictly as orjson. An
    integer orjson would read (as a float) is no JSON there: it shows
    which parser ran."""
    url = gateway.url + "/admin/api/session"
    for extra, status in ((', "n": 1', 401), (', "n": 18446744073709551616', 400), (', "n": NaN', 400)):
        body = f'{{"email": "nobody@example.com", "password": "x"{extra}}}'
        async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == status, (extra, await r.text())
