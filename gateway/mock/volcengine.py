"""Mock Volcengine OpenAPI asset actions (``POST /?Action=..&Version=2024-01-01``).

Every request's signature is verified the way the real service does, from
what arrived on the wire: the Authorization header is parsed, the canonical
request is rebuilt from the received method, path, query and the headers
it names, and the HMAC chain is recomputed from the secret key. This
verifier is written independently of the gateway's signer
(gateway/tasks/signing.py), and the tests check that signer against
Volcengine's own SDK, so a signing mistake cannot agree with itself.

A wrong signature, key, scope, body hash or a stale X-Date gets HTTP 401
with ``ResponseMetadata.Error.Code = SignatureDoesNotMatch`` (or the
matching code). Assets are ``Processing`` until first read, then ``Active``.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web

from .. import safejson

MOCK_ACCESS_KEY = "AKLTmock0123456789abcdef"
MOCK_SECRET_KEY = "mock-secret-key-0123456789abcdef"
REGION = "cn-beijing"
SERVICE = "ark"
VERSION = "2024-01-01"
MAX_SKEW_S = 900


@dataclass
class VolcState:
    access_key: str = MOCK_ACCESS_KEY
    secret_key: str = MOCK_SECRET_KEY
    region: str = REGION
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    assets: dict[str, dict[str, Any]] = field(default_factory=dict)
    accepted: int = 0
    rejected: list[str] = field(default_factory=list)  # error codes, in order


VOLC = web.AppKey("volcengine", VolcState)


def _answer(action: str, region: str, result: Any = None, error: tuple[str, str] | None = None,
            status: int = 200) -> web.Response:
    meta: dict[str, Any] = {"RequestId": secrets.token_hex(16), "Action": action, "Version": VERSION,
                            "Service": SERVICE, "Region": region}
    body: dict[str, Any] = {"ResponseMetadata": meta}
    if error is not None:
        meta["Error"] = {"Code": error[0], "Message": error[1]}
    else:
        body["Result"] = result
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _uri_encode(s: str) -> str:
    return quote(s, safe="-_.~")


def verify(request: web.Request, body: bytes, state: VolcState) -> tuple[str, str] | None:
    """None if the request is correctly signed, else (error code, message)."""
    auth = request.headers.get("Authorization", "")
    algorithm, _, rest = auth.partition(" ")
    if algorithm != "HMAC-SHA256":
        return "MissingAuthenticationToken", "Missing or unsupported Authorization."
    parts: dict[str, str] = {}
    for piece in rest.split(","):
        k, _, v = piece.strip().partition("=")
        parts[k] = v
    credential = parts.get("Credential", "").split("/")
    if len(credential) != 5 or credential[4] != "request":
        return "InvalidCredential", "Malformed credential."
    ak, date, region, service, _ = credential
    if ak != state.access_key:
        return "InvalidAccessKey", "Unknown access key."
    if region != state.region or service != SERVICE:
        return "SignatureDoesNotMatch", "Wrong credential scope."
    x_date = request.headers.get("X-Date", "")
    try:
        t = calendar.timegm(time.strptime(x_date, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return "InvalidTimestamp", "Missing or malformed X-Date."
    if abs(time.time() - t) > MAX_SKEW_S or not x_date.startswith(date):
        return "InvalidTimestamp", "X-Date is out of range."
    payload_hash = hashlib.sha256(body).hexdigest()
    if request.headers.get("X-Content-Sha256", payload_hash) != payload_hash:
        return "SignatureDoesNotMatch", "Body hash mismatch."
    names = parts.get("SignedHeaders", "").split(";")
    if "host" not in names or "x-date" not in names:
        return "SignatureDoesNotMatch", "Host and X-Date must be signed."
    header_block = ""
    for name in names:
        if name not in request.headers:
            return "SignatureDoesNotMatch", f"Signed header {name} is missing."
        header_block += f"{name}:{request.headers[name].strip()}\n"
    pairs = sorted((_uri_encode(k), _uri_encode(v)) for k, v in request.query.items())
    canonical = "\n".join((
        request.method,
        request.raw_path.split("?", 1)[0] or "/",
        "&".join(f"{k}={v}" for k, v in pairs),
        header_block,
        ";".join(names),
        payload_hash,
    ))
    scope = "/".join(credential[1:])
    string_to_sign = f"HMAC-SHA256\n{x_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = state.secret_key.encode()
    for step in (date, region, service, "request"):
        key = hmac.new(key, step.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, parts.get("Signature", "")):
        return "SignatureDoesNotMatch", "The request signature we calculated does not match."
    return None


def _new_id(prefix: str) -> str:
    return f"{prefix}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def openapi(request: web.Request) -> web.Response:
    state = request.app[VOLC]
    action = request.query.get("Action", "")
    body = await request.read()
    failure = verify(request, body, state)
    if failure is not None:
        state.rejected.append(failure[0])
        return _answer(action, state.region, error=failure, status=401)
    state.accepted += 1
    if request.query.get("Version") != VERSION:
        return _answer(action, state.region, error=("InvalidActionOrVersion", "Unknown version."), status=400)
    try:
        p = safejson.loads(body)
    except orjson.JSONDecodeError:
        p = None
    if not isinstance(p, dict):
        return _answer(action, state.region, error=("InvalidParameter", "Body must be a JSON object."), status=400)
    region = state.region
    if action == "CreateAssetGroup":
        if not p.get("Name"):
            return _answer(action, region, error=("MissingParameter", "Name is required."), status=400)
        gid = _new_id("group")
        now = _now_iso()
        state.groups[gid] = {"Id": gid, "Name": p["Name"], "Description": p.get("Description", ""),
                             "GroupType": p.get("GroupType", "AIGC"), "ProjectName": p.get("ProjectName", "default"),
                             "CreateTime": now, "UpdateTime": now}
        return _answer(action, region, {"Id": gid})
    if action == "GetAssetGroup":
        g = state.groups.get(str(p.get("Id")))
        if g is None:
            return _answer(action, region, error=("NotFound.AssetGroup", "Asset group not found."), status=404)
        return _answer(action, region, g)
    if action == "CreateAsset":
        if str(p.get("GroupId")) not in state.groups:
            return _answer(action, region, error=("NotFound.AssetGroup", "Asset group not found."), status=404)
        if not p.get("URL") or p.get("AssetType") not in ("Image", "Video", "Audio"):
            return _answer(action, region, error=("InvalidParameter", "URL and AssetType are required."), status=400)
        aid = _new_id("asset")
        now = _now_iso()
        state.assets[aid] = {"Id": aid, "Name": p.get("Name", ""), "URL": p["URL"], "AssetType": p["AssetType"],
                             "GroupId": p["GroupId"], "Status": "Processing", "ProjectName": "default",
                             "CreateTime": now, "UpdateTime": now}
        return _answer(action, region, {"Id": aid})
    if action == "GetAsset":
        a = state.assets.get(str(p.get("Id")))
        if a is None:
            return _answer(action, region, error=("NotFound.Asset", "Asset not found."), status=404)
        shown = dict(a)
        a["Status"] = "Active"
        return _answer(action, region, shown)
    return _answer(action, region, error=("InvalidActionOrVersion", f"Unknown action {action[:40]!r}."), status=400)


def setup(app: web.Application) -> None:
    app[VOLC] = VolcState()
    app.router.add_post("/", openapi)
