"""The gateway's own errors: one small tree, each carrying its HTTP status, and
one renderer per wire protocol. Messages never contain keys, secrets or
request bodies."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from aiohttp import web


class Protocol(Enum):
    """Which error shape a client of an endpoint expects."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    ENVELOPE = "envelope"


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class Unprocessable(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "unprocessable"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BadGateway(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "no_healthy_upstream"


class GatewayTimeout(GatewayError):
    status = 504
    type = "upstream_timeout"
    code = "upstream_timeout"


# Anthropic's error type names for the statuses the gateway produces.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    500: "api_error",
}


def error_body(err: GatewayError, protocol: Protocol) -> bytes:
    if protocol is Protocol.ANTHROPIC:
        return orjson.dumps(
            {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(err.status, "api_error"), "message": err.message}}
        )
    if protocol is Protocol.ENVELOPE:
        return orjson.dumps({"code": err.status, "msg": err.message, "data": None})
    return orjson.dumps({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})


def render(err: GatewayError, protocol: Protocol) -> web.Response:
    # Imported here so that the config (which validates with these errors)
    # loads without aiohttp: the CLI's database commands start in half the time.
    from aiohttp import web

    return web.Response(
        status=err.status,
        body=error_body(err, protocol),
        content_type="application/json",
        headers=err.headers,
    )
