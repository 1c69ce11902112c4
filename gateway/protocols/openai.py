"""OpenAI Chat Completions: body preparation and usage reading."""

from __future__ import annotations

from typing import Any

import orjson

from .. import safejson
from ..errors import Protocol as ErrorShape
from .base import JsonBody, Prepared, SSEEvents, TailUsage, Usage, UsageReader, as_int, event_data, split_events


def chat_usage(u: dict[str, Any] | None) -> Usage:
    if not u:
        return Usage()
    pd = u.get("prompt_tokens_details") or {}
    cd = u.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=as_int(u.get("prompt_tokens")),
        output_tokens=as_int(u.get("completion_tokens")),
        cached_tokens=as_int(pd.get("cached_tokens")) if isinstance(pd, dict) else 0,
        reasoning_tokens=as_int(cd.get("reasoning_tokens")) if isinstance(cd, dict) else 0,
    )


class HiddenUsageChunk:
    """For a stream where the gateway switched ``include_usage`` on: passes
    complete events through as they arrive, drops the usage-only chunk (empty
    ``choices``) that the client did not ask for, and the ``"usage":null``
    that include_usage adds to every other chunk.

    An event longer than ``SSEEvents``' limit (1 MiB: far above any chat
    chunk) is relayed as it arrives, unparsed, and the row is flagged
    ``sse_event_too_large``: the usage may be incomplete."""

    __slots__ = ("_events", "_usage")

    def __init__(self) -> None:
        self._events = SSEEvents()
        self._usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        before, complete, after = self._events.cut(chunk)
        if b'"usage":null' in complete:
            complete = complete.replace(b',"usage":null', b"")
        if b'"usage"' in complete:  # only these chunks are split into events
            events = split_events(complete)
            kept = []
            dropped = False
            for ev in events:
                data = event_data(ev)
                if b'"usage"' in data and data.startswith(b"{"):
                    try:
                        obj = safejson.loads(data)
                    except orjson.JSONDecodeError:
                        obj = None
                    if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                        self._usage = obj["usage"]
                        if not obj.get("choices"):
                            dropped = True
                            continue
                kept.append(ev)
            if dropped:
                sep = b"\r\n\r\n" if complete.endswith(b"\r\n\r\n") else b"\n\n"
                complete = b"".join(e + sep for e in kept)
        # Bytes of an event too long to hold pass around the parsed part.
        return before + complete + after if before or after else complete

    def finish(self) -> Usage:
        usage = chat_usage(self._usage)
        if self._events.overflowed:
            usage.error = "sse_event_too_large"
        return usage

    def flush(self) -> bytes:
        return self._events.pending


class ChatCompletions(JsonBody):
    name = "chat"
    path = "/v1/chat/completions"
    errors = ErrorShape.OPENAI

    def prepare(self, raw: bytes, obj: dict[str, Any], upstream_model: str, public_model: str) -> Prepared:
        stream = obj.get("stream") is True
        change = upstream_model != public_model
        hide = False
        if stream:
            so = obj.get("stream_options")
            if not (isinstance(so, dict) and so.get("include_usage") is True):
                hide = True
                change = True
        if not change:
            return Prepared(raw, stream)
        obj = dict(obj)
        obj["model"] = upstream_model
        if hide:
            so = obj.get("stream_options")
            obj["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
        return Prepared(orjson.dumps(obj), stream, hide)

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        if sse and prepared.hide_usage_chunk:
            return HiddenUsageChunk()
        return TailUsage(chat_usage)


class Completions(ChatCompletions):
    """Legacy completions: chat's body rules and usage (a stream gets the
    usage-only chunk asked for and hidden the same way)."""

    name = "completions"
    path = "/v1/completions"


class Embeddings(JsonBody):
    """Usage is ``usage.prompt_tokens`` at the end of the body (the vectors
    before it are relayed, never kept)."""

    name = "embeddings"
    path = "/v1/embeddings"
    errors = ErrorShape.OPENAI

    def reader(self, prepared: Prepared, sse: bool) -> UsageReader:
        return TailUsage(chat_usage)


class Moderations(Embeddings):
    """Moderations report no usage today; one reported would be read."""

    name = "moderations"
    path = "/v1/moderations"
