"""Asset groups and assets: the public bodies, and the providers behind them.

- ``volcengine``: Volcengine OpenAPI (service ``ark``, version 2024-01-01),
  actions CreateAssetGroup, GetAssetGroup, CreateAsset, GetAsset; each
  request is ``POST {base}/?Action=..&Version=..`` with a JSON body, signed
  with the account's access key and secret key; answers are
  ``{"ResponseMetadata": {...}, "Result": {...}}``.
- ``gateway``: an upstream speaking this same public API (envelope answers).

Ids are the upstream's own; the gateway records which workspace created
each one and answers 404 to any other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import aiohttp
import orjson
from yarl import URL

from ..config import UpstreamConfig
from ..errors import BadGateway, BadRequest, NotFound
from .signing import sign
from .upstream import Answer, bad_answer, bearer, call, upstream_error

SERVICE = "ark"
VERSION = "2024-01-01"
ASSET_TYPES = ("Image", "Video", "Audio")
# Volcengine error codes meaning the signature or the key was refused.
_AUTH_CODES = ("SignatureDoesNotMatch", "InvalidAccessKey", "InvalidCredential", "InvalidAuthorization",
               "MissingAuthenticationToken", "InvalidTimestamp")


def text_field(obj: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    v = obj.get(name)
    if v is None:
        if required:
            raise BadRequest(f"Missing required parameter: '{name}'.", code="missing_field", param=name)
        return None
    if not isinstance(v, str) or (required and not v):
        raise BadRequest(f"'{name}' must be a non-empty string.", code="invalid_type", param=name)
    return v


def parse_group_body(obj: dict[str, Any]) -> None:
    text_field(obj, "name", required=True)
    text_field(obj, "description")
    text_field(obj, "project_name")


def parse_asset_body(obj: dict[str, Any]) -> None:
    text_field(obj, "group_id", required=True)
    text_field(obj, "url", required=True)
    text_field(obj, "name")
    asset_type = text_field(obj, "asset_type", required=True)
    if asset_type not in ASSET_TYPES:
        raise BadRequest("'asset_type' must be one of Image, Video, Audio.", code="invalid_value", param="asset_type")


def _iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AssetProvider(Protocol):
    async def create_group(self, s: aiohttp.ClientSession, up: UpstreamConfig,
                           obj: dict[str, Any]) -> dict[str, Any]: ...

    async def get_group(self, s: aiohttp.ClientSession, up: UpstreamConfig, group_id: str,
                        platform: str) -> dict[str, Any]: ...

    async def create_asset(self, s: aiohttp.ClientSession, up: UpstreamConfig,
                           obj: dict[str, Any]) -> dict[str, Any]: ...

    async def get_asset(self, s: aiohttp.ClientSession, up: UpstreamConfig, asset_id: str,
                        platform: str) -> dict[str, Any]: ...


# ----------------------------------------------------------- volcengine


class VolcengineAssets:
    """Volcengine OpenAPI asset actions, signed per request."""

    async def action(
        self, session: aiohttp.ClientSession, up: UpstreamConfig, action: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        base = URL(up.base_url)
        path = base.path if base.path not in ("", "/") else "/"
        query = {"Action": action, "Version": VERSION}
        host = base.host or ""
        if base.port is not None and not base.is_default_port():
            host = f"{host}:{base.port}"
        body = orjson.dumps(payload)
        assert up.access_key is not None and up.secret_key is not None
        headers = sign(method="POST", host=host, path=path, query=query, body=body, access_key=up.access_key,
                       secret_key=up.secret_key, region=up.region, service=SERVICE)
        headers["Accept-Encoding"] = "identity"
        url = base.with_path(path).with_query(query)
        answer = await call(session, up, "POST", url, headers=headers, body=body)
        return self._result(up, answer)

    def _result(self, up: UpstreamConfig, answer: Answer) -> dict[str, Any]:
        obj = answer.obj
        meta = obj.get("ResponseMetadata") if isinstance(obj, dict) else None
        error = meta.get("Error") if isinstance(meta, dict) else None
        if isinstance(error, dict) and error.get("Code") in _AUTH_CODES:
            raise BadGateway(f"Upstream '{up.name}' rejected the gateway's credential ({error.get('Code')}).",
                             code="upstream_auth_failed")
        if answer.status == 404 or (isinstance(error, dict) and str(error.get("Code", "")).startswith("NotFound")):
            raise NotFound("Not found.", code="not_found")
        if answer.status >= 300 or error:
            if answer.status < 300:
                answer = Answer(502, obj)
            raise upstream_error(up, answer)
        result = obj.get("Result") if isinstance(obj, dict) else None
        if not isinstance(result, dict):
            raise bad_answer(up, "no Result")
        return result

    async def create_group(self, s: aiohttp.ClientSession, up: UpstreamConfig,
                           obj: dict[str, Any]) -> dict[str, Any]:
        project = obj.get("project_name") or "default"
        payload = {"Name": obj["name"], "Description": obj.get("description") or "", "GroupType": "AIGC",
                   "ProjectName": project}
        result = await self.action(s, up, "CreateAssetGroup", payload)
        group_id = result.get("Id")
        if not isinstance(group_id, str) or not group_id:
            raise bad_answer(up, "no group Id")
        return {"group_id": group_id, "name": obj["name"], "description": obj.get("description") or "",
                "project_name": project, "status": "Active", "created_at": _iso_now()}

    async def get_group(self, s: aiohttp.ClientSession, up: UpstreamConfig, group_id: str,
                        platform: str) -> dict[str, Any]:
        r = await self.action(s, up, "GetAssetGroup", {"Id": group_id})
        return {"group_id": r.get("Id", group_id), "name": r.get("Name"), "description": r.get("Description"),
                "project_name": r.get("ProjectName"), "status": r.get("Status") or "Active",
                "created_at": r.get("CreateTime")}

    async def create_asset(self, s: aiohttp.ClientSession, up: UpstreamConfig,
                           obj: dict[str, Any]) -> dict[str, Any]:
        payload = {"GroupId": obj["group_id"], "URL": obj["url"], "Name": obj.get("name") or "",
                   "AssetType": obj["asset_type"]}
        result = await self.action(s, up, "CreateAsset", payload)
        asset_id = result.get("Id")
        if not isinstance(asset_id, str) or not asset_id:
            raise bad_answer(up, "no asset Id")
        return {"asset_id": asset_id, "group_id": obj["group_id"], "name": obj.get("name") or "",
                "url": obj["url"], "asset_type": obj["asset_type"], "status": "Processing",
                "created_at": _iso_now()}

    async def get_asset(self, s: aiohttp.ClientSession, up: UpstreamConfig, asset_id: str,
                        platform: str) -> dict[str, Any]:
        r = await self.action(s, up, "GetAsset", {"Id": asset_id})
        return {"asset_id": r.get("Id", asset_id), "group_id": r.get("GroupId"), "name": r.get("Name"),
                "url": r.get("URL"), "asset_type": r.get("AssetType"), "status": r.get("Status"),
                "created_at": r.get("CreateTime")}


# -------------------------------------------------------------- gateway


def _platform(platform: str) -> str:
    return urlencode({"platform": platform})


class GatewayAssets:
    """An upstream speaking this gateway's public asset API. What it gets is
    what was checked here: the parsed body re-encoded (a duplicated key
    cannot mean one thing here and another there) and the one ``platform``
    query parameter, never the client's own query string."""

    async def _call(self, s: aiohttp.ClientSession, up: UpstreamConfig, method: str, url: str,
                    body: bytes | None = None) -> dict[str, Any]:
        answer = await call(s, up, method, URL(url, encoded=True), headers=bearer(up), body=body)
        obj = answer.obj
        if answer.status == 404:
            raise NotFound("Not found.", code="not_found")
        if answer.status >= 300:
            raise upstream_error(up, answer)
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, dict):
            raise bad_answer(up, "no data")
        return data

    async def create_group(self, s: aiohttp.ClientSession, up: UpstreamConfig,
                           obj: dict[str, Any]) -> dict[str, Any]:
        data = await self._call(s, up, "POST", up.base_url + "/asset-groups", orjson.dumps(obj))
        if not isinstance(data.get("group_id"), str):
            raise bad_answer(up, "no group_id")
        return data

    async def get_group(self, s: aiohttp.ClientSession, up: UpstreamConfig, group_id: str,
                        platform: str) -> dict[str, Any]:
        url = f"{up.base_url}/asset-groups/{quote(group_id, safe='')}?{_platform(platform)}"
        return await self._call(s, up, "GET", url)

    async def create_asset(self, s: aiohttp.ClientSession, up: UpstreamConfig,
                           obj: dict[str, Any]) -> dict[str, Any]:
        data = await self._call(s, up, "POST", up.base_url + "/assets", orjson.dumps(obj))
        if not isinstance(data.get("asset_id"), str):
            raise bad_answer(up, "no asset_id")
        return data

    async def get_asset(self, s: aiohttp.ClientSession, up: UpstreamConfig, asset_id: str,
                        platform: str) -> dict[str, Any]:
        return await self._call(s, up, "GET", f"{up.base_url}/assets/{quote(asset_id, safe='')}?{_platform(platform)}")


ASSET_PROVIDERS: dict[str, AssetProvider] = {"volcengine": VolcengineAssets(), "gateway": GatewayAssets()}
