"""Translation between the three chat wire protocols: Chat Completions
(``chat``), Anthropic Messages (``messages``) and Responses (``responses``).

One module per client protocol and wire protocol, ``<client>_to_<wire>.py``
(``anthropic`` names Messages in module names), each with

- ``request(obj, upstream_model, max_tokens) -> obj``: the client's request
  as the wire protocol's (BadRequest naming a field that has no counterpart);
- ``response(obj, client_request) -> (obj, Usage)``: the upstream's answer
  as the client's, and its usage in the gateway's one meaning;
- ``Stream(client_request, public_model)``: a Transducer, upstream events in,
  the client's SSE bytes out.

Pure: no I/O, nothing shared between requests. gateway.proxy decides per
attempt whether a route needs a pair (``pair(client, wire)``) and does the
I/O; docs/translation.md has the field-by-field table.
"""

from __future__ import annotations

from types import ModuleType

from . import (
    anthropic_to_chat,
    anthropic_to_responses,
    chat_to_anthropic,
    chat_to_responses,
    responses_to_anthropic,
    responses_to_chat,
)
from .common import CHAT, MESSAGES, RESPONSES, TranslatedStream, client_error

PAIRS: dict[tuple[str, str], ModuleType] = {
    (CHAT, MESSAGES): chat_to_anthropic,
    (CHAT, RESPONSES): chat_to_responses,
    (MESSAGES, CHAT): anthropic_to_chat,
    (MESSAGES, RESPONSES): anthropic_to_responses,
    (RESPONSES, CHAT): responses_to_chat,
    (RESPONSES, MESSAGES): responses_to_anthropic,
}

# The upstream path (after the base URL) of each wire protocol.
PATHS = {CHAT: "/chat/completions", MESSAGES: "/messages", RESPONSES: "/responses"}


def pair(client: str, wire: str) -> ModuleType:
    return PAIRS[(client, wire)]


__all__ = ["CHAT", "MESSAGES", "PATHS", "RESPONSES", "TranslatedStream", "client_error", "pair"]
