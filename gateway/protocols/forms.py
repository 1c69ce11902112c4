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

# One parameter of a header value: name=token or name="quoted string".
_PARAM = re.compile(r';\s*([^\s;=]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
# Form fields the gateway reads (to route and to read usage): each may occur once.
DECIDING_FIELDS = ("model", "stream")


def header_params(value: str, where: str) -> dict[str, str]:
    """The parameters of a header value (``type; a=1; b="x;y"``), names
    lowered; 400 if one is given twice: parsers differ on which one wins."""
    params: dict[str, str] = {}
    for m in _PARAM.finditer(value):
        name, v = m.group(1).lower(), m.group(2).strip()
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        if name in params:
            raise BadRequest(f"{where} has the parameter '{name[:40]}' twice.", code="invalid_multipart")
        params[name] = v
    return params


class FormFields(dict[str, Any]):
    """The decoded text fields of a multipart form, and where in the body the
    ``model`` value lies (so a rename can replace just those bytes)."""

    model_span: tuple[int, int] = (0, 0)


def parse_multipart(content_type: str, raw: bytes) -> FormFields:
    """The text fields of a multipart/form-data body, without copying its
    file parts; BadRequest if the body is not a well-formed form, or is one
    two parsers could read differently (two boundaries, a part with two
    names or two Content-Dispositions, ``model`` or ``stream`` twice or as
    a file)."""
    boundary = header_params(content_type, "Content-Type").get("boundary")
    if not boundary or len(boundary) > 70:
        raise BadRequest("multipart/form-data without a valid boundary.", code="invalid_multipart")
    delim = b"--" + boundary.encode("utf-8", "surrogateescape")
    fields = FormFields()
    pos = raw.find(delim)
    if pos != 0 and (pos < 2 or raw[pos - 2 : pos] != b"\r\n"):
        raise BadRequest("Malformed multipart body: no opening boundary.", code="invalid_multipart")
    pos += len(delim)
    sep = b"\r\n" + delim
    seen: set[str] = set()
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
        dispositions = []
        for line in raw[pos + 2 : head_end].split(b"\r\n"):
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-disposition":
                dispositions.append(v.decode("utf-8", "surrogateescape"))
        if len(dispositions) != 1:
            raise BadRequest("Malformed multipart body: a part needs one Content-Disposition.",
                             code="invalid_multipart")
        params = header_params(dispositions[0], "A part's Content-Disposition")
        name = params.get("name")
        if name is None or "name*" in params:
            raise BadRequest("Malformed multipart body: a part needs one plain name.", code="invalid_multipart")
        is_file = "filename" in params or "filename*" in params
        if name in DECIDING_FIELDS:
            if name in seen:
                raise BadRequest(f"Form field '{name}' is given twice; send it once.", code="duplicate_key",
                                 param=name)
            if is_file or end - start > FIELD_MAX:
                raise BadRequest(f"Form field '{name}' must be a short text field.", code="invalid_multipart",
                                 param=name)
            seen.add(name)
        if not is_file and end - start <= FIELD_MAX:
            try:
                fields.setdefault(name, raw[start:end].decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest(f"Form field '{name[:40]}' is not UTF-8.", code="invalid_multipart") from None
            if name == "model":
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
