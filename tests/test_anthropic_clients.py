"""What Anthropic clients (Claude Code, the anthropic SDK, LiteLLM) need:
count_tokens, a base URL ending in /v1, Anthropic-shaped model lists,
the unknown model in the row, and anthropic-beta flags an upstream takes."""

from __future__ import annotations

import asyncio

import aiohttp
import anthropic
import httpx2
import pytest

from .conftest import PROTOCOL_MODELS, UPSTREAM_KEY, Gateway, GatewayFactory, Upstream, config_toml


def headers(key: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01", **extra}


BODY = {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "one two three"}]}


async def test_count_tokens_relayed_and_recorded_unbilled(claude: anthropic.AsyncAnthropic, pgateway: Gateway,
                                                          upstream: Upstream) -> None:
    counted = await claude.messages.count_tokens(model="claude-test",
                                                 messages=[{"role": "user", "content": "one two three four"}])
    assert counted.input_tokens == 4
    beta = await claude.beta.messages.count_tokens(model="claude-test", messages=[{"role": "user", "content": "x"}],
                                                   betas=["token-counting-2024-11-01"],
                                                   extra_query={"beta": "true"})  # as Claude Code sends it
    assert beta.input_tokens == 1
    sent = upstream.state.requests[-1]
    assert (sent.path, sent.query) == ("/v1/messages/count_tokens", "beta=true")
    assert sent.headers["x-api-key"] == UPSTREAM_KEY and "token-counting-2024-11-01" in sent.headers["anthropic-beta"]
    rows = await pgateway.wait_usage(2)
    assert [(r["endpoint"], r["status"], r["upstream"], r["input_tokens"], r["cost"]) for r in rows] == [
        ("/v1/messages/count_tokens", 200, "mock-anthropic", 0, 0.0)] * 2


async def test_count_tokens_exempt_from_the_key_rpm(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    """A client may count dozens of times at start-up: counts do not take
    from the RPM meant for generations (and are not refused by it)."""
    key = await pgateway.key(rpm=2)
    url = pgateway.url + "/v1/messages"
    for _ in range(2):
        async with http.post(url, json=BODY, headers=headers(key)) as r:
            assert r.status == 200
    for _ in range(12):
        async with http.post(url + "/count_tokens", json=BODY, headers=headers(key)) as r:
            assert r.status == 200 and "x-ratelimit-limit-requests" not in r.headers
    async with http.post(url, json=BODY, headers=headers(key)) as r:
        assert r.status == 429 and (await r.json())["error"]["type"] == "rate_limit_error"


async def test_count_tokens_upstream_429_does_not_hold_back_generations(
    pgateway: Gateway, http: aiohttp.ClientSession
) -> None:
    key = await pgateway.key()
    url = pgateway.url + "/v1/messages"
    async with http.post(url + "/count_tokens", json=BODY,
                         headers=headers(key, **{"x-mock-status": "429", "x-mock-retry-after": "30"})) as r:
        assert r.status == 429 and r.headers["Retry-After"] == "30"  # the upstream's own answer
    async with http.post(url, json=BODY, headers=headers(key)) as r:
        assert r.status == 200  # the route was not cooled for generations


async def test_count_tokens_on_a_model_without_an_anthropic_upstream(pgateway: Gateway, upstream: Upstream,
                                                                     http: aiohttp.ClientSession) -> None:
    """No Messages upstream for the model: its OpenAI upstream counts
    (/responses/input_tokens, the body translated; docs/translation.md)."""
    key = await pgateway.key()
    async with http.post(pgateway.url + "/v1/messages/count_tokens", json={**BODY, "model": "gpt-test"},
                         headers=headers(key)) as r:
        body = await r.json()
    assert r.status == 200 and isinstance(body["input_tokens"], int) and body["input_tokens"] > 0
    assert [q.path for q in upstream.state.requests] == ["/v1/responses/input_tokens"]


async def test_base_url_ending_in_v1(pgateway: Gateway, upstream: Upstream, httpx_client: httpx2.AsyncClient,
                                     http: aiohttp.ClientSession) -> None:
    """Claude Code, LiteLLM and the SDK add /v1/messages themselves: a base
    URL given as .../v1 sends /v1/v1/messages, which is served the same."""
    key = await pgateway.key()
    client = anthropic.AsyncAnthropic(base_url=pgateway.url + "/v1", api_key=key, http_client=httpx_client,
                                      max_retries=0)
    msg = await client.messages.create(**BODY)  # type: ignore[arg-type]
    assert msg.content[0].text == "Hello from the mock upstream"  # type: ignore[union-attr]
    counted = await client.messages.count_tokens(model="claude-test", messages=[{"role": "user", "content": "a b"}])
    assert counted.input_tokens == 2
    assert [m.id for m in (await client.models.list()).data][:1] == ["claude-renamed"]
    assert [r.path for r in upstream.state.requests] == ["/v1/messages", "/v1/messages/count_tokens"]
    async with http.post(pgateway.url + "/v1/v1/messages", json={**BODY, "model": "nope"},
                         headers=headers(key)) as r:
        assert r.status == 404 and (await r.json())["type"] == "error"  # Anthropic's shape, not OpenAI's
    async with http.post(pgateway.url + "/v1/v1/chat/completions", json={"model": "gpt-test"},
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 404  # only Anthropic paths have the alias
    rows = await pgateway.wait_usage(5)
    assert [r["endpoint"] for r in rows[:3]] == ["/v1/messages", "/v1/messages/count_tokens", "/v1/models"]


async def test_models_in_anthropic_shape(pgateway: Gateway, claude: anthropic.AsyncAnthropic,
                                         http: aiohttp.ClientSession) -> None:
    names = sorted(["claude-renamed", "claude-test", "gpt-image-test", "gpt-test", "image-renamed",
                    "org/model-with-slash", "renamed"])
    assert [m.id async for m in claude.models.list(limit=3)] == names  # paged, 3 at a time
    page = await claude.models.list(limit=2)
    assert (page.has_more, page.first_id, page.last_id) == (True, names[0], names[1])
    assert all(m.type == "model" and m.display_name == m.id for m in page.data)
    one = await claude.models.retrieve("claude-test")
    assert one.type == "model" and one.created_at.year >= 2024
    with pytest.raises(anthropic.NotFoundError) as e:
        await claude.models.retrieve("nope")
    assert e.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    key = await pgateway.key()
    async with http.get(pgateway.url + "/v1/models", params={"before_id": names[3], "limit": "2"},
                        headers={"x-api-key": key}) as r:  # x-api-key alone also means an Anthropic client
        assert [m["id"] for m in (await r.json())["data"]] == names[1:3]
    async with http.get(pgateway.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
        assert (await r.json())["object"] == "list"  # OpenAI clients keep OpenAI's shape
    async with http.get(pgateway.url + "/v1/models", headers=headers("bad-key")) as r:
        assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"


async def test_unknown_model_recorded_bounded(pgateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await pgateway.key()
    for model in ("claude-opus-4-8", "x" * 5000 + "\n", "bad\nname"):
        async with http.post(pgateway.url + "/v1/messages", json={**BODY, "model": model},
                             headers=headers(key)) as r:
            body = await r.json()
        assert r.status == 404 and len(body["error"]["message"]) < 300
    rows = await pgateway.wait_usage(3)
    assert [r["model"] for r in rows] == ["claude-opus-4-8", "x" * 197 + "...", "bad\ufffdname"]
    assert all(r["error_type"] == "model_not_found" for r in rows)


async def test_anthropic_beta_allow_list(make_gateway: GatewayFactory, upstream: Upstream,
                                         http: aiohttp.ClientSession) -> None:
    extra = PROTOCOL_MODELS.format(url=upstream.base_url).replace(
        'name = "mock-anthropic"\nkind = "anthropic"',
        'name = "mock-anthropic"\nkind = "anthropic"\nanthropic_betas = ["prompt-caching-2024-07-31", "b-2"]',
    )
    gw = await make_gateway(config_toml(upstream.base_url, extra))
    key = await gw.key()
    for sent_flags in ("prompt-caching-2024-07-31, claude-code-20250219,b-2", "claude-code-20250219"):
        async with http.post(gw.url + "/v1/messages", json=BODY,
                             headers=headers(key, **{"anthropic-beta": sent_flags})) as r:
            assert r.status == 200
    first, second = upstream.state.requests
    assert first.headers["anthropic-beta"] == "prompt-caching-2024-07-31,b-2"
    assert "anthropic-beta" not in second.headers  # nothing this upstream takes: no header at all


async def test_counts_are_bounded_apart_from_the_key_limits(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession,
) -> None:
    """Counts (count_tokens, responses/input_tokens, WebSocket warm-ups) are
    exempt from the key's own limits but not unbounded: a key (with limits
    of its own or none, which any member can make) gets server.free_rpm of
    them a minute and server.free_concurrency at once; past that a 429,
    and nothing goes upstream."""
    toml = config_toml(upstream.base_url, PROTOCOL_MODELS.format(url=upstream.base_url))
    gw = await make_gateway(toml.replace("[server]\n", "[server]\nfree_rpm = 6\nfree_concurrency = 2\n", 1))
    slow, unlimited = await gw.key(rpm=1000), await gw.key()
    url = gw.url + "/v1/messages/count_tokens"

    async def count(key: str, **extra: str) -> int:
        async with http.post(url, json=BODY, headers=headers(key, **extra)) as r:
            await r.read()
            return r.status

    got = await asyncio.gather(*(count(slow, **{"x-mock-head-delay-ms": "300"}) for _ in range(4)))
    assert sorted(got) == [200, 200, 429, 429]  # two at once
    async with http.post(gw.url + "/v1/responses/input_tokens", json={"model": "gpt-test", "input": "a b"},
                         headers=headers(slow)) as r:
        assert r.status == 200
    assert [await count(slow) for _ in range(4)] == [200, 200, 200, 429]  # six a minute, all kinds
    async with http.ws_connect(gw.url + "/v1/responses", headers={"Authorization": f"Bearer {slow}"}) as ws:
        await ws.send_json({"type": "response.create", "model": "gpt-test", "generate": False})
        err = await ws.receive_json()
        assert err["type"] == "error" and err["status"] == 429
    async with http.post(gw.url + "/v1/messages", json=BODY, headers=headers(slow)) as r:
        assert r.status == 200  # generations are not held back by counts
    assert [await count(unlimited) for _ in range(7)] == [200] * 6 + [429]
    assert len(upstream.state.requests) == 2 + 1 + 3 + 1 + 6


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/completions", "/v1/moderations", "/v1/images/generations",
                                  "/v1/audio/speech", "/v1/responses/compact", "/v1/responses/input_tokens"])
async def test_openai_only_endpoint_on_an_anthropic_model_is_refused(pgateway: Gateway, http: aiohttp.ClientSession,
                                                                      upstream: Upstream, path: str) -> None:
    """Anthropic's API has no embeddings, images, audio...: such a request for
    a model routed to an Anthropic account is a 404 naming the endpoint, not
    a request sent there (it answered 401 to the credential, a 502 here)."""
    key = await pgateway.key()
    body = {"model": "claude-test", "input": "x", "prompt": "p"}
    async with http.post(pgateway.url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 404, await r.text()
        err = (await r.json())["error"]
    assert err["code"] == "unsupported_endpoint" and path in err["message"]
    assert upstream.state.requests == []
    rows = await pgateway.wait_usage(1)
    assert [(r["endpoint"], r["status"], r["error_type"]) for r in rows] == [(path, 404, "unsupported_endpoint")]
