"""Endpoints whose body may be a multipart/form-data form (image edits and
variations, audio transcriptions and translations).

A form body goes upstream as the exact bytes the client sent, with its own
Content-Type (and so its boundary). The form is only scanned for the
offsets of its parts; the small text fields (``model``, ``stream``, ``n``,
...) are decoded, file parts are never copied. When the route's upstream
model name differs from the public one, only the bytes of the ``model``
part's value are replaced; every other byte, boundary included, is kept.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import BadRequest
from .base import JsonBody, Prepared, check_model

# Text fields longer than this are not decoded (a prompt fits; a file does not).
FIELD_MAX = 64 * 1024

_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(rb';\s*filename\*?=', re.IGNORECASE)


class FormFields(dict[str, Any]):
    """The decoded text fields of a multipart form, and where in the body the
    ``model`` value lies (so a rename can replace just those bytes)."""

    model_span: tuple[int, int] = (0, 0)


def parse_multipart(content_type: str, raw: bytes) -> FormFields:
    """The text fields of a multipart/form-data body, without copying its
    file parts; BadRequest if the body is not a well-formed form."""
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise BadRequest("multipart/form-data without a boundary.", code="invalid_multipart")
    delim = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    fields = FormFields()
    pos = raw.find(delim)
    if pos != 0 and (pos < 2 or raw[pos - 2 : pos] != b"\r\n"):
        raise BadRequest("Malformed multipart body: no opening boundary.", code="invalid_multipart")
    pos += len(delim)
    sep = b"\r\n" + delim
    while True:
        if raw.startswith(b"--", pos):
            return fields  # the closing delimiter; what follows is epilogue
        if not raw.startswith(b"\r\n", pos):
            raise BadRequest("Malformed multipart body: bad boundary line.", code="invalid_multipart")
        head_end = raw.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            raise BadRequest("Malformed multipart body: part without headers.", code="invalid_multipart")
        start = head_end + 4
        end = raw.find(sep, start)
        if end < 0:
            raise BadRequest("Malformed multipart body: missing closing boundary.", code="invalid_multipart")
        disposition = b""
        for line in raw[pos + 2 : head_end].split(b"\r\n"):
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-disposition":
                disposition = v
        nm = _NAME.search(disposition)
        if nm is None:
            raise BadRequest("Malformed multipart body: part without a name.", code="invalid_multipart")
        if _FILENAME.search(disposition) is None and end - start <= FIELD_MAX:
            name = nm.group(1).decode("utf-8", "replace")
            try:
                fields.setdefault(name, raw[start:end].decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest(f"Form field '{name}' is not UTF-8.", code="invalid_multipart") from None
            if name == "model" and fields.model_span == (0, 0):
                fields.model_span = (start, end)
        pos = end + len(sep)


class FormBody(JsonBody):
    """``parse`` and ``prepare`` of an endpoint taking a multipart form (and,
    where ``json_ok``, a JSON object like any JSON endpoint). A form
    without ``model`` routes as ``default_model`` when the upstream API has
    a default, else it is a 400."""

    json_ok = True
    default_model: str | None = None

    def parse(self, content_type: str, raw: bytes) -> tuple[dict[str, Any], str]:
        mime = content_type.partition(";")[0].strip().lower()
        if mime == "multipart/form-data":
            fields = parse_multipart(content_type, raw)
            model = check_model(fields.get("model", self.default_model))
            # Form values are text: "stream" is on when it reads true.
            fields["stream"] = str(fields.get("stream", "")).strip().lower() == "true"
            return fields, model
        if self.json_ok and (mime in ("", "application/json") or mime.endswith("+json")):
            return super().parse(content_type, raw)
        raise BadRequest(
            "Content-Type must be multipart/form-data or application/json." if self.json_ok
            else "Content-Type must be multipart/form-data.", code="unsupported_content_type",
        )

    def prepare(self, raw: bytes, obj: dict[str, Any], upstream_model: str, public_model: str) -> Prepared:
        if not isinstance(obj, FormFields):
            return super().prepare(raw, obj, upstream_model, public_model)
        stream = obj.get("stream") is True
        if upstream_model == public_model:
            return Prepared(raw, stream)
        start, end = obj.model_span
        if start == end == 0:
            raise BadRequest(f"The form names no model; the route renames '{public_model}' and needs one.",
                             code="missing_model", param="model")
        return Prepared(raw[:start] + upstream_model.encode() + raw[end:], stream)


__all__ = ["FormBody", "FormFields", "parse_multipart"]
