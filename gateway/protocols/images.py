"""OpenAI Images: ``/v1/images/generations`` (JSON) and ``/v1/images/edits``
(multipart/form-data or JSON).

A form body goes upstream as the exact bytes the client sent, with its own
Content-Type (and so its boundary). The form is only scanned for the
offsets of its parts; the small text fields (``model``, ``stream``, ``n``,
...) are decoded, file parts are never copied. When the route's upstream
model name differs from the public one, only the bytes of the ``model``
part's value are replaced; every other byte, boundary included, is kept.

Usage is the body's ``usage`` (gpt-image models report tokens) plus the
number of images: the ``b64_json``/``url`` entries of ``data``, or in a
stream the ``image_generation.completed``/``image_edit.completed`` events,
whose last ``usage`` counts.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import BadRequest
from ..errors import Protocol as ErrorShape
from .base import Counter, JsonBody, Prepared, Tail, Usage, UsageReader, check_model, last_object
from .responses import responses_usage

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


class ImageUsage:
    """Relays every chunk untouched; keeps the final 64 KiB for ``usage`` and
    counts images as the bytes pass (a 20 MB answer is never kept)."""

    __slots__ = ("_count", "_sse", "_tail")

    def __init__(self, sse: bool) -> None:
        self._tail = Tail()
        self._sse = sse
        # JSON keys / string values; inside a base64 or escaped string they cannot match.
        self._count = (
            Counter(b'"image_generation.completed"', b'"image_edit.completed"')
            if sse
            else Counter(b'"b64_json":', b'"url":', b'"b64_json" :', b'"url" :')
        )

    def feed(self, chunk: bytes) -> bytes:
        self._tail.add(chunk)
        self._count.feed(chunk)
        return chunk

    def flush(self) -> bytes:
        return b""

    def finish(self) -> Usage:
        # Image usage has the Responses shape (input/output tokens, details).
        usage = responses_usage(last_object(self._tail.bytes(), b"usage"))
        usage.images = self._count.count
        if self._sse and not self._count.count:
            usage.error = "upstream_incomplete_stream"
        return usage


class ImageGenerations(JsonBody):
    name = "images_generations"
    path = "/v1/images/generations"
    errors = ErrorShape.OPENAI

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return ImageUsage(sse)


class ImageEdits(ImageGenerations):
    """JSON like generations, or a multipart form forwarded byte for byte."""

    name = "images_edits"
    path = "/v1/images/edits"

    def parse(self, content_type: str, raw: bytes) -> tuple[dict[str, Any], str]:
        mime = content_type.partition(";")[0].strip().lower()
        if mime == "multipart/form-data":
            fields = parse_multipart(content_type, raw)
            model = check_model(fields.get("model"))
            # Form values are text: "stream" is on when it reads true.
            fields["stream"] = str(fields.get("stream", "")).strip().lower() == "true"
            return fields, model
        if mime in ("", "application/json") or mime.endswith("+json"):
            return super().parse(content_type, raw)
        raise BadRequest(
            "Content-Type must be multipart/form-data or application/json.", code="unsupported_content_type"
        )

    def prepare(self, raw: bytes, obj: dict[str, Any], upstream_model: str, public_model: str) -> Prepared:
        if not isinstance(obj, FormFields):
            return super().prepare(raw, obj, upstream_model, public_model)
        stream = obj.get("stream") is True
        if upstream_model == public_model:
            return Prepared(raw, stream)
        start, end = obj.model_span
        return Prepared(raw[:start] + upstream_model.encode() + raw[end:], stream)


__all__ = ["ImageEdits", "ImageGenerations", "parse_multipart"]
