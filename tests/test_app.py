"""What a newcomer meets at the edges of the app: JSON for unknown paths and
wrong methods (never aiohttp's plain text), the console's favicon, and log
lines that say why an upstream could not be reached."""

from __future__ import annotations

import logging
import socket
import ssl

import aiohttp
import pytest

from gateway.upstream import connect_failure

from .conftest import Gateway, GatewayFactory, Upstream, config_toml

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path", ["/", "/nowhere", "/v2/chat/completions", "/console/missing.js", "/chat/completions"])
async def test_a_path_outside_v1_answers_a_json_404(gateway: Gateway, http: aiohttp.ClientSession, path: str) -> None:
    async with http.get(gateway.url + path) as r:
        assert r.status == 404
        assert r.content_type == "application/json"
        err = (await r.json())["error"]
    assert err["code"] == "not_found" and path in err["message"] and "/v1" in err["message"]
    assert r.headers["x-request-id"]


async def test_a_wrong_method_answers_405_with_allow(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    async with http.get(gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"
        err = (await r.json())["error"]
    assert err["code"] == "method_not_allowed"
    assert err["message"] == "GET is not allowed on /v1/chat/completions; use POST."
    async with http.get(gateway.url + "/v1/messages") as r:  # Anthropic's path: Anthropic's error shape
        assert r.status == 405 and (await r.json())["error"]["type"] == "invalid_request_error"
    async with http.post(gateway.url + "/healthz") as r:
        assert r.status == 405 and set(r.headers["Allow"].split(",")) == {"GET", "HEAD"}
        assert (await r.json())["error"]["message"] == "POST is not allowed on /healthz; use GET or HEAD."
    rows = await gateway.wait_usage(2)
    assert [(row["status"], row["error_type"]) for row in rows] == [(405, "method_not_allowed")] * 2


async def test_the_console_has_a_favicon(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.url + "/favicon.ico") as r:
        assert r.status == 200 and r.content_type in ("image/x-icon", "image/vnd.microsoft.icon")
        body = await r.read()
    assert body[:4] == b"\x00\x00\x01\x00" and b"PNG" in body


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:{closed}/v1", "connection refused"),
        ("https://127.0.0.1:{plain}/v1", "TLS handshake failed"),  # TLS to a plain-HTTP port
    ],
)
async def test_the_unreachable_log_line_says_why(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture, url: str, reason: str,
) -> None:
    base = url.format(closed=closed_port(), plain=upstream.port)
    gw = await make_gateway(config_toml(base))
    key = await gw.key()
    with caplog.at_level(logging.WARNING, logger="gateway"):
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "upstream_unreachable"
    lines = [rec.getMessage() for rec in caplog.records if "unreachable" in rec.getMessage()]
    assert lines and lines[0].startswith("upstream mock unreachable: ") and reason in lines[0], lines
    assert key not in caplog.text and "sk-upstream" not in caplog.text


async def test_the_timeout_log_line_says_which(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway(config_toml(upstream.base_url).replace("first_byte_timeout_s = 10",
                                                                   "first_byte_timeout_s = 0.2"))
    key = await gw.key()
    with caplog.at_level(logging.WARNING, logger="gateway"):
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {key}", "x-mock-head-delay-ms": "1000"}) as r:
            assert r.status == 504
    assert "upstream mock timed out: no response head within 0.2 s" in caplog.text


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "DNS lookup failed"),
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "TLS certificate not trusted"),
        (OSError(101, "Network is unreachable"), "network is unreachable"),
    ],
)
def test_connect_failures_are_named(error: OSError, reason: str) -> None:
    assert connect_failure(error).startswith(reason)
