"""OpenAI Audio: ``/v1/audio/transcriptions`` and ``/v1/audio/translations``
(multipart forms, forwarded byte for byte: gateway.protocols.forms) and
``/v1/audio/speech`` (JSON in, audio bytes out, relayed as they arrive).

Usage, where the upstream reports it: the ``usage`` of a transcription
(``input_tokens``, ``output_tokens``: the gpt-4o-transcribe models; whisper
reports seconds, which are not tokens and are not billed here), of its
stream's ``transcript.text.done`` event, or of a speech stream's
``speech.audio.done`` event (``stream_format: "sse"``). Audio bytes carry
none: the reader keeps only a bounded tail and finds nothing in it.
"""

from __future__ import annotations

from ..errors import Protocol as ErrorShape
from .base import JsonBody, Prepared, TailUsage, UsageReader
from .forms import FormBody
from .responses import responses_usage


class Transcriptions(FormBody):
    name = "audio_transcriptions"
    path = "/v1/audio/transcriptions"
    errors = ErrorShape.OPENAI
    json_ok = False

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return TailUsage(responses_usage)


class Translations(Transcriptions):
    name = "audio_translations"
    path = "/v1/audio/translations"


class Speech(JsonBody):
    name = "audio_speech"
    path = "/v1/audio/speech"
    errors = ErrorShape.OPENAI

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return TailUsage(responses_usage)


__all__ = ["Speech", "Transcriptions", "Translations"]
