"""Mock Volcengine Ark content generation tasks (``/api/v3/contents/generations/tasks``).

A task moves forward one step per GET: ``queued`` for ``queued_polls``
polls, then ``running`` for ``running_polls``, then its outcome. Steered by
an optional ``mock`` object in the create body (tests send it in
``provider_options``, from an upstream with ``extra_provider_options =
["mock"]``):

- ``queued_polls``, ``running_polls``: ints (default 1 each)
- ``outcome``: ``succeeded`` (default), ``failed``, ``cancelled``,
  ``expired``, or any other string, reported as the status as is
- ``tokens``: completion tokens reported on success (default 108900)
- ``create_status``: answer the create with this HTTP status
- ``create_delay_ms``: make the task at once, answer the create this much
  later (as a provider does whose answer is slow: the task exists even if
  the caller gives up waiting)
- ``get_status``: answer every GET of this task with this HTTP status
- ``get_fail``: ``garbage`` (a non-JSON body) or ``close`` (drop the connection)
- ``get_delay_ms``: pause before answering a GET
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .. import safejson
from .common import _check

BASE = "/api/v3/contents/generations/tasks"
CONTENT_TYPES = ("text", "image_url", "video_url", "audio_url")


@dataclass
class ArkTask:
    id: str
    body: dict[str, Any]
    steer: dict[str, Any]
    created_at: int
    polls: int = 0
    in_flight: int = 0  # GETs of this task being answered now
    max_in_flight: int = 0  # the most at once (pollers racing show here)


@dataclass
class ArkState:
    """Tasks the mock has created, and how often each was polled."""

    tasks: dict[str, ArkTask] = field(default_factory=dict)
    creates: int = 0
    gets: int = 0


ARK = web.AppKey("ark", ArkState)


def ark_error(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"code": code, "message": message, "param": "", "type": "BadRequest"}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _steer_int(steer: dict[str, Any], name: str, default: int) -> int:
    v = steer.get(name, default)
    return v if isinstance(v, int) else default


async def create_task(request: web.Request) -> web.Response:
    raw, early = await _check(request)
    if early is not None:
        return early
    try:
        obj = safejson.loads(raw)
    except orjson.JSONDecodeError:
        return ark_error(400, "InvalidParameter", "The request body is not valid JSON.")
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), str):
        return ark_error(400, "MissingParameter", "The parameter `model` is required.")
    content = obj.get("content")
    if not isinstance(content, list) or not content:
        return ark_error(400, "MissingParameter", "The parameter `content` is required.")
    for item in content:
        if not isinstance(item, dict) or item.get("type") not in CONTENT_TYPES:
            return ark_error(400, "InvalidParameter", "The parameter `content.type` is invalid.")
    raw_steer = obj.get("mock")
    steer: dict[str, Any] = raw_steer if isinstance(raw_steer, dict) else {}
    status = _steer_int(steer, "create_status", 0)
    if status:
        return ark_error(status, "MockFailure", f"Mock create failure {status}.")
    state = request.app[ARK]
    state.creates += 1
    task_id = f"cgt-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
    state.tasks[task_id] = ArkTask(task_id, obj, steer, int(time.time()))
    delay = _steer_int(steer, "create_delay_ms", 0)
    if delay:
        await asyncio.sleep(delay / 1000)
    return web.Response(body=orjson.dumps({"id": task_id}), content_type="application/json")


def task_body(t: ArkTask) -> dict[str, Any]:
    s = t.steer
    queued, running = _steer_int(s, "queued_polls", 1), _steer_int(s, "running_polls", 1)
    if t.polls <= queued:
        status = "queued"
    elif t.polls <= queued + running:
        status = "running"
    else:
        outcome = s.get("outcome", "succeeded")
        status = outcome if isinstance(outcome, str) else "succeeded"
    body: dict[str, Any] = {
        "id": t.id, "model": t.body["model"], "status": status, "error": None, "created_at": t.created_at,
        "updated_at": int(time.time()), "seed": t.body.get("seed", 42),
        "resolution": t.body.get("resolution", "720p"), "ratio": t.body.get("ratio", "16:9"),
        "duration": t.body.get("duration", 5), "framespersecond": 24,
    }
    if status == "succeeded":
        tokens = _steer_int(s, "tokens", 108900)
        body["content"] = {"video_url": f"https://mock.invalid/videos/{t.created_at}-{t.polls}.mp4"}
        body["usage"] = {"completion_tokens": tokens, "total_tokens": tokens}
    elif status == "failed":
        body["error"] = {"code": "OutputVideoSensitiveContentDetected", "message": "Mock generation failed."}
    return body


async def get_task(request: web.Request) -> web.StreamResponse:
    _, early = await _check(request)
    if early is not None:
        return early
    state = request.app[ARK]
    state.gets += 1
    t = state.tasks.get(request.match_info["id"])
    if t is None:
        return ark_error(404, "ResourceNotFound", "The specified task is not found.")
    t.polls += 1
    s = t.steer
    delay = _steer_int(s, "get_delay_ms", 0)
    if delay:
        t.in_flight += 1
        t.max_in_flight = max(t.max_in_flight, t.in_flight)
        try:
            await asyncio.sleep(delay / 1000)
        finally:
            t.in_flight -= 1
    status = _steer_int(s, "get_status", 0)
    if status:
        return ark_error(status, "MockFailure", f"Mock poll failure {status}.")
    if s.get("get_fail") == "garbage":
        return web.Response(body=b"<html>oops", content_type="text/html")
    if s.get("get_fail") == "close":
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    return web.Response(body=orjson.dumps(task_body(t)), content_type="application/json")


def setup(app: web.Application) -> None:
    app[ARK] = ArkState()
    app.router.add_post(BASE, create_task)
    app.router.add_get(BASE + "/{id}", get_task)
