"""Config reload: new routes, prices and groups take effect; a bad file is
refused and the old config stays; in-flight requests are not disturbed;
SIGHUP reloads a real `gateway serve` process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError

from .conftest import ADMIN_TOKEN, UPSTREAM_KEY, ConfigFiles, GatewayFactory, Upstream, UpstreamFactory, config_toml
from .test_production import make_key, prod_toml, serve  # noqa: F401 (serve: a fixture)

CHAT = "/v1/chat/completions"

NEW_MODEL = """
[[models]]
name = "new-model"
routes = [{ upstream = "mock", model = "gpt-test" }]
price = { input = 3.0, output = 3.0 }
"""


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def changed(toml: str) -> str:
    """The test config with a new model, a new price and a new group ratio."""
    return (toml.replace("price = { input = 1.0, output = 2.0, cached_input = 0.5 }",
                         "price = { input = 10.0, output = 20.0 }")
            .replace("ratio = 0.5", "ratio = 0.25") + NEW_MODEL)


async def test_reload_applies_routes_prices_groups_and_refuses_bad_config(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    toml = config_toml(upstream.base_url)
    gw = await make_gateway(toml)
    key = await gw.key()
    cheap = await gw.key(group="cheap")
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "a b c"}]}  # 3 in, 5 out
    async with http.post(gw.url + CHAT, json={"model": "new-model"}, headers=auth(key)) as r:
        assert r.status == 404

    await gw.reload(changed(toml))
    async with http.post(gw.url + CHAT, json={"model": "new-model"}, headers=auth(key)) as r:
        assert r.status == 200
    for k in (key, cheap):
        async with http.post(gw.url + CHAT, json=body, headers=auth(k)) as r:
            assert r.status == 200
    async with http.get(gw.url + "/v1/models", headers=auth(cheap)) as r:
        assert "new-model" not in {m["id"] for m in (await r.json())["data"]}  # cheap: gpt-* only
    rows = await gw.wait_usage(4)
    assert rows[2]["cost"] == pytest.approx((3 * 10 + 5 * 20) / 1e6)
    assert rows[3]["cost"] == pytest.approx((3 * 10 + 5 * 20) / 1e6 * 0.25)

    bad = changed(toml).replace('routes = [{ upstream = "mock", model = "gpt-test" }]',
                                'routes = [{ upstream = "nowhere", model = "gpt-test" }]')
    with pytest.raises(ConfigError, match=r"models\[\d\]\.routes\[0\]\.upstream: unknown upstream"):
        await gw.reload(bad)
    with pytest.raises(ConfigError, match="invalid TOML"):
        await gw.reload("[[models]\nname=")
    async with http.post(gw.url + CHAT, json={"model": "new-model"}, headers=auth(key)) as r:
        assert r.status == 200  # the last good config is still in use


async def test_reload_under_load_drops_nothing(
    make_gateway: GatewayFactory, upstream: Upstream, make_upstream: UpstreamFactory, http: aiohttp.ClientSession
) -> None:
    second = await make_upstream()
    base = config_toml(upstream.base_url)
    # B moves gpt-test to a second upstream and changes its price.
    b = base.replace('routes = [{ upstream = "mock", model = "gpt-test" }]',
                     'routes = [{ upstream = "mock2", model = "gpt-test" }]').replace(
        "price = { input = 1.0, output = 2.0, cached_input = 0.5 }", "price = { input = 5.0, output = 5.0 }")
    b += f"""
[[upstreams]]
name = "mock2"
kind = "openai"
base_url = "{second.base_url}"
api_key_env = "MOCK_UPSTREAM_KEY"
"""
    gw = await make_gateway(base)
    key = await gw.key()
    n = 300
    sem = asyncio.Semaphore(40)
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        stream = i % 2 == 0
        body = {"model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": "x"}]}
        headers = {**auth(key), "x-mock-delay-ms": "10", "x-mock-chunks": "4"}
        async with sem, http.post(gw.url + CHAT, json=body, headers=headers) as r:
            data = await r.read()
            complete = data.endswith(b"data: [DONE]\n\n") if stream else data.endswith(b"}")
            outcomes[f"{r.status} {'complete' if complete else 'cut'}"] += 1

    async def reloads() -> None:
        for i in range(10):
            await asyncio.sleep(0.05)
            await gw.reload(b if i % 2 == 0 else base)

    await asyncio.gather(reloads(), *(one(i) for i in range(n)))
    assert outcomes == {"200 complete": n}
    rows = await gw.wait_usage(n)
    assert len(rows) == n and all(r["status"] == 200 and r["error_type"] is None for r in rows)
    by_upstream = Counter(r["upstream"] for r in rows)
    assert by_upstream["mock"] > 0 and by_upstream["mock2"] > 0
    assert len(upstream.state.requests) + len(second.state.requests) == n
    # The last reload went back to the config without mock2: its breaker is gone.
    async with http.get(gw.url + "/metrics") as r:
        text = await r.text()
    assert 'gateway_circuit_state{upstream="mock"} 0.0' in text and 'upstream="mock2"' not in text.split(
        "gateway_circuit_state", 1)[1].split("# HELP", 1)[0]


async def test_sighup_reloads_a_running_server(
    tmp_path: Path, upstream: Upstream, http: aiohttp.ClientSession, config_files: ConfigFiles
) -> None:
    toml = config_toml(upstream.base_url)
    path = config_files.write(toml)
    env = {**os.environ, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )
    assert proc.stderr is not None
    log: list[str] = []

    async def wait_log(text: str) -> str:
        assert proc.stderr is not None
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
            assert line, "server exited:\n" + "".join(log)
            log.append(line)
            if text in line:
                return line

    try:
        line = await wait_log("gateway listening on")
        url = "http://" + line.split("listening on ")[1].split(";")[0]
        key = config_files.key(path, "w")

        async def models() -> set[str]:
            async with http.get(url + "/v1/models", headers=auth(key)) as r:
                return {m["id"] for m in (await r.json())["data"]} if r.status == 200 else set()

        for _ in range(100):
            if await models():
                break
            await asyncio.sleep(0.05)
        assert "new-model" not in await models()

        path.write_text(changed(toml))
        proc.send_signal(signal.SIGHUP)
        await wait_log("config reloaded")
        assert "new-model" in await models()

        path.write_text("not = [valid")
        proc.send_signal(signal.SIGHUP)
        assert "invalid TOML" in await wait_log("config reload refused")
        assert "new-model" in await models()
        async with http.post(url + CHAT, json={"model": "new-model"}, headers=auth(key)) as r:
            assert r.status == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
    assert proc.returncode == 0


def emptied(toml: str) -> tuple[str, str]:
    """The config without its models, and without its upstreams too."""
    no_models = toml.split("[[models]]")[0]
    return no_models, no_models.split("[[upstreams]]")[0]


async def test_reload_refuses_to_empty_the_gateway_unless_forced(
    admin_gateway: Any, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = admin_gateway
    key = await gw.key()
    toml = gw.config.source.read_text()
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    for bad, what in zip(emptied(toml), ("models", "upstreams"), strict=True):
        with pytest.raises(ConfigError, match=f"no {what}"):
            await gw.reload(bad)
        async with http.post(gw.url + CHAT, json=body, headers=auth(key)) as r:
            assert r.status == 200  # still the old config
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    gw.config.source.write_text(emptied(toml)[0])
    async with http.post(gw.url + "/admin/api/reload", headers=admin) as r:
        data = await r.json()
        assert r.status == 400 and data["error"]["code"] == "invalid_config" and "force" in data["error"]["message"]
    async with http.post(gw.url + CHAT, json=body, headers=auth(key)) as r:
        assert r.status == 200
    async with http.post(gw.url + "/admin/api/reload?force=true", headers=admin) as r:
        assert r.status == 200 and (await r.json())["models"] == 0
    async with http.post(gw.url + CHAT, json=body, headers=auth(key)) as r:
        assert r.status == 404  # forced: the operator asked for it


async def test_sighup_with_an_emptied_file_keeps_every_worker_serving(
    serve: Any, upstream: Upstream, tmp_path: Path, http: aiohttp.ClientSession  # noqa: F811
) -> None:
    s = serve(prod_toml(upstream, "workers = 2\n"))
    key = make_key(s.db)
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(100):  # until both workers know the key
        async with aiohttp.ClientSession() as fresh, fresh.post(s.url + CHAT, json=body, headers=auth(key)) as r:
            if r.status == 200:
                break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    path = tmp_path / "gateway.toml"
    path.write_text(emptied(path.read_text())[0])
    s.proc.send_signal(signal.SIGHUP)
    s.wait_line(lambda x: "config reload refused by the supervisor" in x.get("msg", ""))
    deadline = time.monotonic() + 15  # each worker's own line (wait_line finds the first one only)
    while sum(x.get("msg", "").startswith("config reload refused, keeping") for x in s.lines()) < 2:
        assert time.monotonic() < deadline, "a worker did not refuse the reload"
        await asyncio.sleep(0.05)
    for _ in range(8):  # fresh connections: both workers answer
        async with aiohttp.ClientSession() as fresh, fresh.post(s.url + CHAT, json=body, headers=auth(key)) as r:
            assert r.status == 200
    refused = [x for x in s.lines() if "no models" in x.get("msg", "")]
    assert len(refused) == 3  # the supervisor and each worker
    assert s.stop() == 0
