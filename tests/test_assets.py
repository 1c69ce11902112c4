"""Asset groups and assets: the envelope API, the Volcengine provider and
its request signing (checked against Volcengine's own SDK signer), tenant
isolation, and video tasks routed to the account that owns an asset."""

from __future__ import annotations

import datetime
import hashlib
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson
import pytest
from volcengine.auth.SignerV4 import SignerV4
from volcengine.auth.SignParam import SignParam
from volcengine.Credentials import Credentials

from gateway.mock.volcengine import MOCK_ACCESS_KEY, MOCK_SECRET_KEY, VOLC, VolcState
from gateway.tasks.signing import sign

from .conftest import Gateway, GatewayFactory, Upstream, config_toml
from .test_tasks import ark, auth, create, keys, tasks_toml

GROUPS = "/v1/asset-groups"
ASSETS = "/v1/assets"


def volc(upstream: Upstream) -> VolcState:
    assert upstream.app is not None
    return upstream.app[VOLC]


async def post(http: aiohttp.ClientSession, gw: Gateway, key: str, path: str, body: Any) -> tuple[int, Any]:
    kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with http.post(gw.url + path, headers=auth(key), **kw) as r:
        return r.status, await r.json()


async def get(http: aiohttp.ClientSession, gw: Gateway, key: str, path: str) -> tuple[int, Any]:
    async with http.get(gw.url + path, headers=auth(key)) as r:
        return r.status, await r.json()


# --------------------------------------------------------------- signing


def sdk_authorization(*, method: str, host: str, path: str, query: dict[str, str], body: bytes, ak: str, sk: str,
                      region: str, when: datetime.datetime) -> tuple[str, str]:
    """Authorization and X-Date from Volcengine's SDK signer."""
    p = SignParam()
    p.set_method(method)
    p.set_host(host)
    p.set_path(path)
    p.set_query(OrderedDict(query))
    p.set_header_list(OrderedDict({"Content-Type": "application/json", "Host": host}))
    p.set_body(body)
    p.set_date(when)
    r = SignerV4.sign_only(p, Credentials(ak, sk, "ark", region))
    return r.authorization, r.xdate


SIGN_CASES = [
    ("open.volcengineapi.com", "/", {"Action": "CreateAssetGroup", "Version": "2024-01-01"},
     {"Name": "cast", "Description": "", "GroupType": "AIGC", "ProjectName": "default"}, "cn-beijing"),
    ("open.volcengineapi.com", "/", {"Action": "GetAsset", "Version": "2024-01-01"}, {"Id": "asset-1"}, "cn-beijing"),
    ("127.0.0.1:8123", "/", {"Action": "CreateAsset", "Version": "2024-01-01"},
     {"GroupId": "group-1", "URL": "https://x.invalid/a b.png?q=1&r=ü", "Name": "名字", "AssetType": "Image"},
     "cn-shanghai"),
    ("ark.cn-beijing.volcengineapi.com", "/api/v1", {"Version": "2024-01-01", "Action": "GetAssetGroup",
                                                     "Extra": "a b/c~d*e"}, {"Id": "g"}, "ap-southeast-1"),
]


@pytest.mark.parametrize(("host", "path", "query", "payload", "region"), SIGN_CASES)
def test_signature_equals_the_official_sdk(host: str, path: str, query: dict[str, str], payload: dict[str, Any],
                                           region: str) -> None:
    when = datetime.datetime(2026, 3, 28, 12, 34, 56, tzinfo=datetime.UTC)
    body = orjson.dumps(payload)
    ours = sign(method="POST", host=host, path=path, query=query, body=body, access_key="AKLTexample",
                secret_key="c2VjcmV0LWtleQ==", region=region, service="ark", now=when)
    theirs, xdate = sdk_authorization(method="POST", host=host, path=path, query=query, body=body, ak="AKLTexample",
                                      sk="c2VjcmV0LWtleQ==", region=region, when=when.replace(tzinfo=None))
    assert ours["Authorization"] == theirs
    assert ours["X-Date"] == xdate == "20260328T123456Z"
    assert ours["X-Content-Sha256"] == hashlib.sha256(body).hexdigest()


async def test_mock_verifies_signatures_and_rejects_tampering(upstream: Upstream,
                                                              http: aiohttp.ClientSession) -> None:
    host = f"127.0.0.1:{upstream.running.port}"
    query = {"Action": "CreateAssetGroup", "Version": "2024-01-01"}
    url = upstream.url + "/?Action=CreateAssetGroup&Version=2024-01-01"
    body = orjson.dumps({"Name": "g"})
    now = datetime.datetime.now(datetime.UTC)

    def ours(sk: str = MOCK_SECRET_KEY, signed_body: bytes = body) -> dict[str, str]:
        return sign(method="POST", host=host, path="/", query=query, body=signed_body, access_key=MOCK_ACCESS_KEY,
                    secret_key=sk, region="cn-beijing", service="ark", now=now)

    async def send(headers: dict[str, str], data: bytes = body) -> tuple[int, Any]:
        async with http.post(url, data=data, headers=headers) as r:
            return r.status, await r.json()

    status, data = await send(ours())
    assert status == 200 and data["Result"]["Id"].startswith("group-")
    # The SDK's own signature is accepted as well: the verifier is not just
    # agreeing with our signer.
    sdk_auth, xdate = sdk_authorization(method="POST", host=host, path="/", query=query, body=body,
                                        ak=MOCK_ACCESS_KEY, sk=MOCK_SECRET_KEY, region="cn-beijing",
                                        when=now.replace(tzinfo=None))
    sdk_headers = {"Content-Type": "application/json", "Host": host, "X-Date": xdate,
                   "X-Content-Sha256": hashlib.sha256(body).hexdigest(), "Authorization": sdk_auth}
    assert (await send(sdk_headers))[0] == 200

    tampered = ours()
    sig = tampered["Authorization"]
    tampered["Authorization"] = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    status, data = await send(tampered)
    assert status == 401 and data["ResponseMetadata"]["Error"]["Code"] == "SignatureDoesNotMatch"
    # Body changed after signing (hash header kept): rejected.
    assert (await send(ours(), orjson.dumps({"Name": "h"})))[0] == 401
    # Body and its hash header changed after signing: rejected.
    other = orjson.dumps({"Name": "h"})
    h = ours()
    h["X-Content-Sha256"] = hashlib.sha256(other).hexdigest()
    assert (await send(h, other))[0] == 401
    # Wrong secret key, and a signature for another query: rejected.
    assert (await send(ours(sk="wrong-secret")))[0] == 401
    async with http.post(upstream.url + "/?Action=CreateAssetGroup&Version=2024-01-02", data=body,
                         headers=ours()) as r:
        assert r.status == 401
    assert volc(upstream).rejected == ["SignatureDoesNotMatch"] * 5
    assert volc(upstream).accepted == 2


# ----------------------------------------------------------- the API


async def test_groups_and_assets_through_volcengine(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    key, other = await keys(gw, "acme", "globex")

    status, data = await post(http, gw, key, GROUPS, {"platform": "JIMENG", "name": "cast",
                                                      "description": "leads", "project_name": "film"})
    assert status == 200 and data["code"] == 200 and data["msg"] == "OK"
    group = data["data"]
    gid = group["group_id"]
    assert gid.startswith("group-") and group["name"] == "cast" and group["project_name"] == "film"
    assert volc(upstream).groups[gid]["GroupType"] == "AIGC"
    assert volc(upstream).groups[gid]["ProjectName"] == "film"

    status, data = await get(http, gw, key, f"{GROUPS}/{gid}?platform=JIMENG")
    assert status == 200 and data["data"]["group_id"] == gid and data["data"]["description"] == "leads"

    status, data = await post(http, gw, key, ASSETS, {"platform": "JIMENG", "group_id": gid, "name": "hero",
                                                      "url": "https://img.invalid/hero.png", "asset_type": "Image"})
    assert status == 200 and data["data"]["status"] == "Processing"
    aid = data["data"]["asset_id"]
    status, data = await get(http, gw, key, f"{ASSETS}/{aid}?platform=JIMENG")
    assert status == 200 and data["data"]["asset_id"] == aid and data["data"]["group_id"] == gid
    status, data = await get(http, gw, key, f"{ASSETS}/{aid}?platform=JIMENG")
    assert data["data"]["status"] == "Active" and data["data"]["url"] == "https://img.invalid/hero.png"
    assert volc(upstream).rejected == []

    # Another workspace: 404 for the group, the asset, and a new asset in the group.
    for path in (f"{GROUPS}/{gid}?platform=JIMENG", f"{ASSETS}/{aid}?platform=JIMENG"):
        status, data = await get(http, gw, other, path)
        assert status == 404 and data["code"] == 404 and data["data"] is None
    status, data = await post(http, gw, other, ASSETS, {"platform": "JIMENG", "group_id": gid, "name": "x",
                                                        "url": "https://img.invalid/x.png", "asset_type": "Image"})
    assert status == 404
    # ... and a video task naming the asset.
    async with http.post(gw.url + "/v1/video/tasks", headers=auth(other), json={
            "model": "seedance", "resources": [{"type": "image", "asset_id": aid}]}) as r:
        assert r.status == 404

    # The owner's task goes to the Ark account that owns the asset (acct1:
    # upstream "ark"), although "ark2" has the better priority.
    task = await create(http, gw, key, resources=[{"type": "image", "asset_id": aid, "role": "reference"}])
    row = gw.conn.execute("SELECT upstream FROM video_tasks WHERE id = ?", (task["id"],)).fetchone()
    assert row["upstream"] == "ark"
    sent = next(iter(ark(upstream).tasks.values())).body
    assert sent["content"][1] == {"type": "image_url", "image_url": {"url": f"asset://{aid}"},
                                  "role": "reference_image"}
    plain = await create(http, gw, key)
    assert gw.conn.execute("SELECT upstream FROM video_tasks WHERE id = ?", (plain["id"],)).fetchone()[0] == "ark2"


async def test_asset_bad_input(make_gateway: GatewayFactory, upstream: Upstream,
                               http: aiohttp.ClientSession) -> None:
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    key = await gw.key()
    cases: list[tuple[str, Any, int]] = [
        (GROUPS, b"{oops", 400),
        (GROUPS, [1, 2], 400),
        (GROUPS, {"name": "x"}, 400),
        (GROUPS, {"platform": "NOPE", "name": "x"}, 400),
        (GROUPS, {"platform": 7, "name": "x"}, 400),
        (GROUPS, {"platform": "JIMENG"}, 400),
        (GROUPS, {"platform": "JIMENG", "name": ["x"]}, 400),
        (ASSETS, {"platform": "JIMENG", "url": "u", "asset_type": "Image"}, 400),
        (ASSETS, {"platform": "JIMENG", "group_id": "g", "url": "u", "asset_type": "Gif"}, 400),
        (ASSETS, {"platform": "JIMENG", "group_id": "group-made-up", "url": "u", "asset_type": "Image"}, 404),
        # No database can hold a NUL: it names nothing (it was a 500 on PostgreSQL).
        (ASSETS, {"platform": "JIMENG", "group_id": "g\u0000", "url": "u", "asset_type": "Image"}, 404),
    ]
    for path, body, expected in cases:
        status, data = await post(http, gw, key, path, body)
        assert status == expected, (body, data)
        assert data["code"] == expected and data["data"] is None and data["msg"]
    gets = ((f"{GROUPS}/group-made-up?platform=JIMENG", 404), (f"{GROUPS}/g", 400), (f"{GROUPS}/g?platform=NOPE", 400),
            (f"{ASSETS}/asset-made-up?platform=JIMENG", 404), (f"{GROUPS}/g%00?platform=JIMENG", 404),
            (f"{ASSETS}/a%00?platform=JIMENG", 404))
    for path, expected in gets:
        status, data = await get(http, gw, key, path)
        assert status == expected and data["code"] == expected, (path, data)
    async with http.post(gw.url + GROUPS, json={"platform": "JIMENG", "name": "x"}) as r:
        assert r.status == 401 and (await r.json())["code"] == 401
    assert volc(upstream).accepted == 0  # nothing bad went upstream
    rows = await gw.wait_usage(len(cases) + len(gets) + 1)
    assert len(rows) == len(cases) + len(gets) + 1


async def test_wrong_secret_is_a_clear_502_without_the_secret(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCK_VOLC_SK", "not-the-right-secret-key")
    gw = await make_gateway(tasks_toml(upstream, poller=False))
    key = await gw.key()
    status, data = await post(http, gw, key, GROUPS, {"platform": "JIMENG", "name": "cast"})
    assert status == 502 and "volc" in data["msg"] and "not-the-right" not in str(data)
    assert volc(upstream).rejected == ["SignatureDoesNotMatch"]


async def test_assets_through_a_gateway_upstream(
    make_gateway: GatewayFactory, upstream: Upstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = await make_gateway(tasks_toml(upstream, poller=False, db="inner.db"), name="inner.toml")
    monkeypatch.setenv("INNER_KEY", await inner.key("front-door"))
    extra = f"""
[[upstreams]]
name = "inner"
kind = "gateway"
base_url = "{inner.url}/v1"
api_key_env = "INNER_KEY"

[platforms]
JIMENG = "inner"
"""
    outer = await make_gateway(config_toml(upstream.base_url, extra).replace('"gateway.db"', '"outer.db"'),
                               name="outer.toml")
    key, other = await keys(outer, "acme", "globex")
    status, data = await post(http, outer, key, GROUPS, {"platform": "JIMENG", "name": "cast"})
    assert status == 200
    gid = data["data"]["group_id"]
    status, data = await post(http, outer, key, ASSETS, {"platform": "JIMENG", "group_id": gid, "name": "a",
                                                         "url": "https://img.invalid/a.png", "asset_type": "Video"})
    assert status == 200 and data["data"]["asset_type"] == "Video"
    aid = data["data"]["asset_id"]
    assert (await get(http, outer, key, f"{ASSETS}/{aid}?platform=JIMENG"))[0] == 200
    assert (await get(http, outer, key, f"{GROUPS}/{gid}?platform=JIMENG"))[0] == 200
    assert (await get(http, outer, other, f"{ASSETS}/{aid}?platform=JIMENG"))[0] == 404
    assert (await get(http, outer, other, f"{GROUPS}/{gid}?platform=JIMENG"))[0] == 404
    assert volc(upstream).accepted == 4
