"""One JSON call to a task or asset upstream, with lower-level failures
mapped into the gateway's error tree.

Unlike the pass-through path, task and asset answers are small JSON
documents the gateway must read and translate, so they are read whole
(bounded by MAX_ANSWER).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from .. import safejson
from ..config import UpstreamConfig
from ..errors import BadGateway, GatewayError, GatewayTimeout

log = logging.getLogger("gateway.tasks")

MAX_ANSWER = 4 * 1024 * 1024
UNREACHABLE = "upstream_unreachable"


class UpstreamRefused(GatewayError):
    """The upstream answered with an error status: it did not act on the request."""

    type = "upstream_error"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    obj: Any  # parsed JSON, or None when the body was not JSON


def timeout(up: UpstreamConfig) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=up.timeout_s, sock_connect=up.connect_timeout_s, sock_read=up.first_byte_timeout_s
    )


def bearer(up: UpstreamConfig) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if up.api_key:
        headers["Authorization"] = f"Bearer {up.api_key}"
    return headers


async def call(
    session: aiohttp.ClientSession,
    up: UpstreamConfig,
    method: str,
    url: URL | str,
    *,
    headers: dict[str, str],
    body: bytes | None = None,
) -> Answer:
    """Send one request; transport failures and a rejected credential raise."""
    try:
        async with session.request(method, url, data=body, headers=headers, timeout=timeout(up)) as resp:
            status = resp.status
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise bad_answer(up, f"more than {MAX_ANSWER} bytes")
                chunks.append(chunk)
            raw = b"".join(chunks)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
        # No connection was made: the upstream never saw the request.
        log.warning("upstream %s unreachable: %s", up.name, type(e).__name__)
        raise BadGateway(f"Upstream '{up.name}' is unreachable.", code=UNREACHABLE) from None
    except TimeoutError:
        raise GatewayTimeout(f"Upstream '{up.name}' timed out.") from None
    except aiohttp.ClientError as e:
        log.warning("upstream %s broke off: %s", up.name, type(e).__name__)
        raise BadGateway(f"Upstream '{up.name}' broke off the connection.", code="upstream_disconnected") from None
    if status in (401, 403):
        log.error("upstream %s rejected the gateway's credential (%d)", up.name, status)
        raise UpstreamRefused(
            f"Upstream '{up.name}' rejected the gateway's credential (HTTP {status}).", code="upstream_auth_failed",
            status=502,
        )
    try:
        obj = safejson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    return Answer(status, obj)


def _error_fields(obj: Any) -> tuple[str | None, str | None]:
    """(code, message) of an upstream error body in any shape we speak."""
    if not isinstance(obj, dict):
        return None, None
    err = obj.get("error")
    if isinstance(err, dict):
        return _str(err.get("code")), _str(err.get("message"))
    meta = obj.get("ResponseMetadata")
    if isinstance(meta, dict) and isinstance(meta.get("Error"), dict):
        return _str(meta["Error"].get("Code")), _str(meta["Error"].get("Message"))
    if "msg" in obj:
        return _str(obj.get("code")), _str(obj.get("msg"))
    return None, None


def _str(v: Any) -> str | None:
    if isinstance(v, str) and v:
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return None


def upstream_error(up: UpstreamConfig, answer: Answer) -> GatewayError:
    """The error to give a client for an upstream's non-2xx answer: its own
    status and message, in the endpoint's error shape."""
    code, message = _error_fields(answer.obj)
    status = answer.status if 400 <= answer.status <= 599 else 502
    return UpstreamRefused(
        f"Upstream '{up.name}' answered HTTP {answer.status}" + (f": {message}" if message else "."),
        code=f"upstream_{code}" if code else f"upstream_{answer.status}",
        status=status,
    )


def bad_answer(up: UpstreamConfig, what: str) -> BadGateway:
    return BadGateway(f"Upstream '{up.name}' sent an unexpected answer: {what}.", code="upstream_bad_answer")


def retryable(err: GatewayError) -> bool:
    """Worth trying the next route: the upstream did not take the request."""
    return err.status >= 500 or err.status == 429


def took_nothing(err: GatewayError) -> bool:
    """The upstream certainly did not act on the request: no connection
    was made, or it answered with an error status (a rejected credential
    included). False for a timeout or a dropped connection after the
    request went out, and for a success answer the gateway could not read:
    then the upstream may have acted (e.g. started a task)."""
    return err.code == UNREACHABLE or isinstance(err, UpstreamRefused)
