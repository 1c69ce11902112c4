"""A local mock upstream that speaks the real provider wire formats.

Used by ``gateway demo``, the tests and the bench. It records every request it
receives (method, path, query, headers, body) so tests can assert what went
upstream, and it is steered per request by headers the gateway forwards:

- ``x-mock-chunks: N``      content chunks in a stream (default 5)
- ``x-mock-delay-ms: N``    pause between stream chunks
- ``x-mock-head-delay-ms``  pause before the response head
- ``x-mock-status: N``      answer with this status and an error body
- ``x-mock-fail: midstream|garbage|stall|gzip``  misbehave on purpose
- ``x-mock-cached: N``, ``x-mock-reasoning: N``   usage details to report
- ``x-mock-retry-after: S`` Retry-After on an ``x-mock-status`` answer
- ``x-mock-line-ending: crlf``  Chat Completions stream lines end with CRLF

``MockState.steer`` holds defaults for these headers, so one of several mock
upstreams behind a gateway can be made to fail while the others answer.

- ``x-mock-script: JSON``  answer exactly this (text, thinking, tool calls,
  stop reason, usage) in the protocol asked: gateway.mock.script

Anthropic Messages, Responses and Images live in gateway.mock.anthropic,
.responses and .images (each documents its own extra headers). Tool calls
and reasoning, in all three text protocols, are steered as described in
gateway.mock.tools (``x-mock-tool``, ``x-mock-tool-args``), so a real agent
can run its tool loop against the mock. ``MockState.reported`` keeps the
usage object of every answer, as sent.
"""

from __future__ import annotations

from aiohttp import web

from . import anthropic, ark, chat, images, more, responses, volcengine
from .common import MOCK, MockState
from .script import scripted


def create_mock_app(api_key: str | None = None, *, record: bool = True) -> web.Application:
    """The mock upstream; ``api_key`` set means requests must carry it."""
    app = web.Application(client_max_size=1024**3, middlewares=[scripted])
    app[MOCK] = MockState(api_key=api_key, record=record)
    chat.register(app)
    anthropic.register(app)
    responses.register(app)
    images.register(app)
    more.register(app)
    ark.setup(app)
    volcengine.setup(app)
    return app
