"""Helpers every protocol mock shares: what the mock recorded (``MockState``),
the steering headers, the auth check and the small usage helpers.

See gateway.mock.app for the steering headers themselves."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .. import safejson


@dataclass
class Recorded:
    method: str
    path: str  # decoded
    query: str  # as on the wire (percent-encoding kept)
    headers: dict[str, str]
    body: bytes
    target: str = ""  # the request target as on the wire


@dataclass
class MockState:
    """What the mock saw; shared with tests through ``MOCK``."""

    api_key: str | None = None
    requests: list[Recorded] = field(default_factory=list)
    disconnects: int = 0
    completed_streams: int = 0
    record: bool = True
    steer: dict[str, str] = field(default_factory=dict)
    # The usage object of every answer, as sent (path, usage), so a test can
    # compare each usage row with what the upstream reported.
    reported: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # Responses kept for GET/DELETE /v1/responses/{id} and previous_response_id
    # (gateway.mock.responses), by id.
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Text frames received on Responses WebSockets, in order.
    ws_frames: list[dict[str, Any]] = field(default_factory=list)

    def report(self, path: str, usage: dict[str, Any]) -> None:
        if self.record:
            self.reported.append((path, usage))

    @contextmanager
    def stream(self) -> Iterator[None]:
        """Around a streamed answer: counts it completed, or the client gone."""
        try:
            yield
        except (asyncio.CancelledError, ConnectionError):
            self.disconnects += 1
            raise
        self.completed_streams += 1


MOCK = web.AppKey("mock", MockState)

WORDS = ("Hello", " from", " the", " mock", " upstream", ".", " It", " streams", " one", " word", " per", " chunk")


def count_words(items: Any) -> int:
    """Words in the ``content`` of chat messages or Responses input items
    (a string, or a list of parts with ``text``); at least 1."""
    n = 0
    for m in items if isinstance(items, list) else ():
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            n += len(c.split())
        elif isinstance(c, list):
            n += sum(len(str(p.get("text", "")).split()) for p in c if isinstance(p, dict))
    return max(n, 1)


def count_prompt_tokens(obj: dict[str, Any]) -> int:
    return count_words(obj.get("messages"))


def _steer(request: web.Request, name: str) -> str | None:
    return request.headers.get(name) or request.app[MOCK].steer.get(name)


def _int(request: web.Request, name: str, default: int = 0) -> int:
    try:
        return int(_steer(request, name) or default)
    except ValueError:
        return default


def openai_error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "mock_error", "param": None, "code": f"mock_{status}"}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _check(request: web.Request, *, anthropic: bool = False) -> tuple[bytes, web.Response | None]:
    """Record the request, then apply the auth check and the steering headers
    that act before the body (status, head delay)."""
    state = request.app[MOCK]
    body = await request.read()
    if state.record:
        state.requests.append(
            Recorded(request.method, request.path, request.raw_path.partition("?")[2], dict(request.headers), body,
                     request.raw_path)
        )
    if state.api_key is not None:
        got = request.headers.get("x-api-key") if anthropic else None
        if got is None:
            auth = request.headers.get("Authorization", "")
            got = auth[7:] if auth.startswith("Bearer ") else None
        if got != state.api_key:
            return body, openai_error(401, "Incorrect API key provided.")
    delay = _int(request, "x-mock-head-delay-ms")
    if delay:
        try:
            await asyncio.sleep(delay / 1000)
        except asyncio.CancelledError:
            state.disconnects += 1
            raise
    status = _int(request, "x-mock-status")
    if status:
        err = openai_error(status, f"Mock failure {status}.")
        retry_after = _steer(request, "x-mock-retry-after")
        if retry_after:
            err.headers["Retry-After"] = retry_after
        return body, err
    if _steer(request, "x-mock-fail") == "garbage":
        return body, web.Response(status=200, body=b"<html>not json", content_type="application/json")
    return body, None


def chat_usage(request: web.Request, prompt: int, completion: int) -> dict[str, Any]:
    cached = _int(request, "x-mock-cached")
    reasoning = _int(request, "x-mock-reasoning")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
    }


async def json_body(request: web.Request) -> tuple[dict[str, Any] | None, web.Response | None]:
    """The request's JSON object after ``_check``, or the answer to send instead."""
    raw, early = await _check(request)
    if early is not None:
        return None, early
    try:
        obj = safejson.loads(raw)
    except orjson.JSONDecodeError:
        return None, openai_error(400, "We could not parse the JSON body of your request.")
    if not isinstance(obj, dict):
        return None, openai_error(400, "Request body must be an object.")
    return obj, None
