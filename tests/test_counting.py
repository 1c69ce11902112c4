"""``/v1/messages/count_tokens`` on a model that no Messages upstream
serves (gateway.counting): a Responses upstream counts with its own
``/responses/input_tokens`` (the body translated), a chat-only one gets the
documented local estimate; the row bills nothing either way."""

from __future__ import annotations

import anthropic
import httpx2
import orjson

from gateway.translate.common import estimate_tokens

from .conftest import GatewayFactory, Upstream, config_toml

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

[[models]]
name = "on-chat"
routes = [{{ upstream = "chat-only", model = "up-chat" }}]

[[models]]
name = "on-responses"
routes = [{{ upstream = "responses-only", model = "up-responses" }}]
"""

BODY = {"system": "Be brief and kind to everyone.",
        "messages": [{"role": "user", "content": "count these five words"}],
        "tools": [{"name": "get_weather", "description": "Weather for a city",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]}


async def test_count_tokens_without_a_messages_upstream(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(config_toml(upstream.base_url, WIRES.format(url=upstream.base_url)))
    key = await gw.key()
    async with httpx2.AsyncClient(trust_env=False) as http:
        claude = anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, http_client=http, max_retries=0)
        # Through the Responses upstream's own counter, the body translated.
        counted = await claude.messages.count_tokens(model="on-responses", **BODY)  # type: ignore[arg-type]
        sent = upstream.state.requests[-1]
        assert (sent.path, orjson.loads(sent.body)["model"]) == ("/v1/responses/input_tokens", "up-responses")
        assert orjson.loads(sent.body)["instructions"] == BODY["system"]
        assert counted.input_tokens == 4  # the mock counts the words of the input messages
        # A chat-only upstream has no counter: the local estimate, said so.
        raw = await claude.messages.with_raw_response.count_tokens(model="on-chat", **BODY)  # type: ignore[arg-type]
        assert raw.headers["x-gateway-token-count"] == "estimate"
        assert (await raw.parse()).input_tokens == estimate_tokens([BODY["system"], BODY["messages"], BODY["tools"]])
        assert [r.path for r in upstream.state.requests] == ["/v1/responses/input_tokens"]
        # An upstream without the endpoint gives way to the estimate too.
        steer = {"x-mock-status": "404"}
        n = await claude.messages.count_tokens(model="on-responses", extra_headers=steer, **BODY)  # type: ignore[arg-type]
        assert n.input_tokens == estimate_tokens([BODY["system"], BODY["messages"], BODY["tools"]])
    rows = await gw.wait_usage(3)
    assert [(r["endpoint"], r["status"], r["input_tokens"], r["cost"]) for r in rows] == [
        ("/v1/messages/count_tokens", 200, 0, 0.0)] * 3
