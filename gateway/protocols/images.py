"""OpenAI Images: ``/v1/images/generations`` (JSON), ``/v1/images/edits``
(multipart/form-data or JSON) and ``/v1/images/variations`` (multipart);
forms are forwarded byte for byte (gateway.protocols.forms).

Usage is the body's ``usage`` (gpt-image models report tokens) plus the
number of images: the ``b64_json``/``url`` entries of ``data``, or in a
stream the ``image_generation.completed``/``image_edit.completed`` events,
whose last ``usage`` counts.
"""

from __future__ import annotations

from ..errors import Protocol as ErrorShape
from .base import Counter, JsonBody, Prepared, Tail, Usage, UsageReader, last_object
from .forms import FormBody
from .responses import responses_usage


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


class ImageEdits(FormBody, ImageGenerations):
    """JSON like generations, or a multipart form forwarded byte for byte."""

    name = "images_edits"
    path = "/v1/images/edits"


class ImageVariations(ImageEdits):
    """dall-e-2 variations: a multipart form; the form's ``model`` is
    optional upstream, and so defaults here to OpenAI's own default."""

    name = "images_variations"
    path = "/v1/images/variations"
    json_ok = False
    default_model = "dall-e-2"


__all__ = ["ImageEdits", "ImageGenerations", "ImageVariations"]
