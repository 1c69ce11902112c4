"""Volcengine OpenAPI request signing (HMAC-SHA256, "V4" style).

    canonical request = METHOD \\n path \\n sorted query \\n
                        "name:value\\n" per signed header \\n
                        signed header names \\n hex sha256(body)
    string to sign    = "HMAC-SHA256" \\n X-Date \\n date/region/service/request \\n
                        hex sha256(canonical request)
    signing key       = HMAC chain over secret key: date, region, service, "request"

The signed headers are Content-Type, Host, X-Content-Sha256 and X-Date, as
Volcengine's own SDK signs a JSON request. Tests compare these signatures to
the SDK's for the same requests.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote

ALGORITHM = "HMAC-SHA256"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def canonical_query(query: Mapping[str, str]) -> str:
    return "&".join(f"{quote(k, safe='-_.~')}={quote(query[k], safe='-_.~')}" for k in sorted(query))


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    k = _hmac(secret_key.encode(), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "request")


def sign(
    *,
    method: str,
    host: str,
    path: str,
    query: Mapping[str, str],
    body: bytes,
    access_key: str,
    secret_key: str,
    region: str,
    service: str,
    content_type: str = "application/json",
    now: datetime | None = None,
) -> dict[str, str]:
    """The headers that sign this request (to send alongside the body)."""
    now = now or datetime.now(UTC)
    x_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = x_date[:8]
    body_hash = hashlib.sha256(body).hexdigest()
    headers = {"Content-Type": content_type, "Host": host, "X-Content-Sha256": body_hash, "X-Date": x_date}
    canon_headers = sorted((k.lower(), v.strip()) for k, v in headers.items())
    signed = ";".join(k for k, _ in canon_headers)
    canonical = "\n".join([
        method.upper(),
        quote(path or "/", safe="/~"),
        canonical_query(query),
        "".join(f"{k}:{v}\n" for k, v in canon_headers),
        signed,
        body_hash,
    ])
    scope = f"{date}/{region}/{service}/request"
    to_sign = "\n".join([ALGORITHM, x_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    signature = hmac.new(signing_key(secret_key, date, region, service), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return headers
