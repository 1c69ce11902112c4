"""The unified video task body, and the providers that speak it upstream.

- ``ark``: Volcengine Ark content generation tasks
  (``POST {base}/contents/generations/tasks``, ``GET .../tasks/{id}``).
  The prompt and resources become Ark's ``content`` list; the options go to
  the top-level fields where Ark reads them; ``provider_options``, checked
  against Ark's allow-list (gateway.tasks.options), is added to the body.
- ``gateway``: an upstream speaking this same public API; the body is the
  unified one as validated (the fields below, resources with assets named
  by ``asset_id``), the poll is forwarded as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson

from ..config import UpstreamConfig
from ..errors import BadGateway, BadRequest, NotFound
from ..protocols.base import as_int, parse_json_body
from .options import resource_url
from .upstream import Answer, bad_answer, bearer, call, upstream_error

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
RESOURCE_TYPES = ("image", "video", "audio")
ROLES = ("first_frame", "last_frame", "reference")
ASSET_SCHEME = "asset://"
# Ids a client names (an asset, an upstream task) are never longer than this.
ID_MAX = 256

# Field -> accepted Python types, for the optional scalar fields.
_OPTIONS: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "ratio": (str,),
    "duration": (int, float),
    "resolution": (str,),
    "audio": (bool,),
    "watermark": (bool,),
    "seed": (int,),
}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


@dataclass(slots=True)
class VideoRequest:
    """A validated create body."""

    raw: bytes
    obj: dict[str, Any]
    model: str
    resources: list[dict[str, Any]]

    @property
    def asset_ids(self) -> list[str]:
        return [r["asset_id"] for r in self.resources if "asset_id" in r]

    @property
    def provider_options(self) -> dict[str, Any]:
        return self.obj.get("provider_options") or {}

    def unified(self, upstream_model: str) -> dict[str, Any]:
        """The body as validated, for an upstream speaking this same API:
        only the unified fields, each resource in its one spelling."""
        body = {k: self.obj[k] for k in (*_OPTIONS, "provider_options") if self.obj.get(k) is not None}
        return {"model": upstream_model, **body, "resources": self.resources}


def parse_video_request(raw: bytes) -> VideoRequest:
    """Validate a create body; 400 naming the field on any mistake."""
    obj, model = parse_json_body(raw)
    for name, types in _OPTIONS.items():
        v = obj.get(name)
        if v is None:
            continue
        if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
            kind = _TYPE_NAMES[types[0]]
            raise BadRequest(f"'{name}' must be {kind}.", code="invalid_type", param=name)
    if "provider_options" in obj and not isinstance(obj["provider_options"], dict | None):
        raise BadRequest("'provider_options' must be an object.", code="invalid_type", param="provider_options")
    resources = obj.get("resources")
    if resources is None:
        resources = []
    if not isinstance(resources, list):
        raise BadRequest("'resources' must be an array.", code="invalid_type", param="resources")
    resources = [_check_resource(r, f"resources[{i}]") for i, r in enumerate(resources)]
    if not obj.get("prompt") and not resources:
        raise BadRequest("A video task needs a 'prompt' or 'resources'.", code="missing_prompt", param="prompt")
    return VideoRequest(raw, obj, model, resources)


def _check_resource(r: Any, where: str) -> dict[str, Any]:
    """The resource, checked, with an asset named by URL turned into
    ``asset_id`` (so it resolves through the caller's workspace)."""
    if not isinstance(r, dict):
        raise BadRequest(f"'{where}' must be an object.", code="invalid_type", param=where)
    if r.get("type") not in RESOURCE_TYPES:
        raise BadRequest(f"'{where}.type' must be one of image, video, audio.", code="invalid_value",
                         param=f"{where}.type")
    has_url, has_asset = "url" in r, "asset_id" in r
    if has_url == has_asset:
        raise BadRequest(f"'{where}' needs exactly one of 'url' or 'asset_id'.", code="invalid_value", param=where)
    field = "url" if has_url else "asset_id"
    if not isinstance(r[field], str) or not r[field]:
        raise BadRequest(f"'{where}.{field}' must be a non-empty string.", code="invalid_type",
                         param=f"{where}.{field}")
    role = r.get("role")
    if role is not None and role not in ROLES:
        raise BadRequest(f"'{where}.role' must be one of first_frame, last_frame, reference.", code="invalid_value",
                         param=f"{where}.role")
    out = {"type": r["type"], field: r[field]}
    if has_url:
        asset_id, _ = resource_url(r["url"], f"{where}.url")
        if asset_id is not None:
            out = {"type": r["type"], "asset_id": asset_id}
    if len(out.get("asset_id", "")) > ID_MAX:
        raise BadRequest(f"'{where}' names an asset id longer than {ID_MAX} characters.", code="invalid_value",
                         param=where)
    if role is not None:
        out["role"] = role
    return out


@dataclass(slots=True)
class Snapshot:
    """An upstream's view of a task, in the unified vocabulary."""

    status: str
    video: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class VideoProvider(Protocol):
    async def create(
        self, session: aiohttp.ClientSession, up: UpstreamConfig, upstream_model: str, req: VideoRequest
    ) -> str:
        """Start the task upstream; returns the upstream's task id."""
        ...

    async def get(self, session: aiohttp.ClientSession, up: UpstreamConfig, task_id: str) -> Snapshot:
        """The task's state upstream; NotFound when the upstream does not know it."""
        ...


def _ok(up: UpstreamConfig, answer: Answer) -> dict[str, Any]:
    if answer.status == 404:
        raise NotFound("Video task not found.", code="task_not_found")
    if answer.status >= 300:
        raise upstream_error(up, answer)
    if not isinstance(answer.obj, dict):
        raise bad_answer(up, "not a JSON object")
    return answer.obj


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _error(v: Any) -> dict[str, Any] | None:
    if not isinstance(v, dict):
        return None
    return {"code": v.get("code"), "message": v.get("message")}


def unknown_status(up: UpstreamConfig, status: Any) -> BadGateway:
    shown = status if isinstance(status, str) and len(status) <= 40 else type(status).__name__
    return BadGateway(f"Upstream '{up.name}' reported an unknown task status {shown!r}.",
                      code="upstream_unknown_status")


# ---------------------------------------------------------------- Ark

_ARK_ROLES = {
    ("image", "first_frame"): "first_frame",
    ("image", "last_frame"): "last_frame",
    ("image", "reference"): "reference_image",
    ("video", "reference"): "reference_video",
    ("audio", "reference"): "reference_audio",
}
# Unified option -> Ark's top-level field.
_ARK_FIELDS = {
    "ratio": "ratio", "duration": "duration", "resolution": "resolution", "audio": "generate_audio",
    "watermark": "watermark", "seed": "seed",
}


def ark_body(req: VideoRequest, upstream_model: str) -> dict[str, Any]:
    """Ark's create body for a unified request."""
    obj = req.obj
    content: list[dict[str, Any]] = []
    if obj.get("prompt"):
        content.append({"type": "text", "text": obj["prompt"]})
    for r in req.resources:
        url = r["url"] if "url" in r else ASSET_SCHEME + r["asset_id"]
        kind = r["type"]
        item: dict[str, Any] = {"type": f"{kind}_url", f"{kind}_url": {"url": url}}
        role = r.get("role") or ("first_frame" if kind == "image" and len(req.resources) == 1 else "reference")
        item["role"] = _ARK_ROLES.get((kind, role), f"reference_{kind}")
        content.append(item)
    body: dict[str, Any] = {"model": upstream_model, "content": content}
    for ours, theirs in _ARK_FIELDS.items():
        if obj.get(ours) is not None:
            body[theirs] = obj[ours]
    # Checked by the handler against Ark's allow-list: no key here can be
    # one set above.
    body.update(req.provider_options)
    return body


class ArkVideo:
    """Volcengine Ark Seedance content generation tasks."""

    async def create(
        self, session: aiohttp.ClientSession, up: UpstreamConfig, upstream_model: str, req: VideoRequest
    ) -> str:
        body = orjson.dumps(ark_body(req, upstream_model))
        return await _create(session, up, up.base_url + "/contents/generations/tasks", body)

    async def get(self, session: aiohttp.ClientSession, up: UpstreamConfig, task_id: str) -> Snapshot:
        url = f"{up.base_url}/contents/generations/tasks/{quote(task_id, safe='')}"
        obj = _ok(up, await call(session, up, "GET", url, headers=bearer(up)))
        status = obj.get("status")
        if status == "expired":
            return Snapshot("failed", error=_error(obj.get("error")) or
                            {"code": "expired", "message": "The task expired upstream."})
        if status not in STATUSES:
            raise unknown_status(up, status)
        snap = Snapshot(status, error=_error(obj.get("error")) if status == "failed" else None)
        if status == "succeeded":
            content = _dict(obj.get("content"))
            snap.video = {
                "url": content.get("video_url"), "duration": obj.get("duration"),
                "resolution": obj.get("resolution"), "ratio": obj.get("ratio"),
            }
            u = _dict(obj.get("usage"))
            tokens = as_int(u.get("completion_tokens"))
            snap.usage = {"video_tokens": tokens, "completion_tokens": tokens,
                          "total_tokens": as_int(u.get("total_tokens")) or tokens}
        return snap


# ------------------------------------------------------------ gateway


async def _create(session: aiohttp.ClientSession, up: UpstreamConfig, url: str, body: bytes) -> str:
    """POST a task; the upstream's task id from its ``{"id": ...}`` answer."""
    answer = await call(session, up, "POST", url, headers=bearer(up), body=body)
    if answer.status >= 300:
        raise upstream_error(up, answer)
    task_id = answer.obj.get("id") if isinstance(answer.obj, dict) else None
    if not isinstance(task_id, str) or not task_id or len(task_id) > ID_MAX:
        raise bad_answer(up, "no task id")
    return task_id


class GatewayVideo:
    """An upstream speaking this gateway's own public video task API."""

    async def create(
        self, session: aiohttp.ClientSession, up: UpstreamConfig, upstream_model: str, req: VideoRequest
    ) -> str:
        body = orjson.dumps(req.unified(upstream_model))
        return await _create(session, up, up.base_url + "/video/tasks", body)

    async def get(self, session: aiohttp.ClientSession, up: UpstreamConfig, task_id: str) -> Snapshot:
        url = f"{up.base_url}/video/tasks/{quote(task_id, safe='')}"
        obj = _ok(up, await call(session, up, "GET", url, headers=bearer(up)))
        status = obj.get("status")
        if status not in STATUSES:
            raise unknown_status(up, status)
        snap = Snapshot(status, error=_error(obj.get("error")) if status in ("failed", "cancelled") else None)
        if status == "succeeded":
            snap.video = obj.get("video") if isinstance(obj.get("video"), dict) else None
            u = _dict(obj.get("usage"))
            tokens = as_int(u.get("video_tokens")) or as_int(u.get("completion_tokens"))
            snap.usage = {"video_tokens": tokens, "completion_tokens": as_int(u.get("completion_tokens")) or tokens,
                          "total_tokens": as_int(u.get("total_tokens")) or tokens}
        return snap


PROVIDERS: dict[str, VideoProvider] = {"ark": ArkVideo(), "gateway": GatewayVideo()}
