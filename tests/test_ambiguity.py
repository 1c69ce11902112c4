"""Ambiguous bodies (issue 11, item 9): anything the gateway checks and bills
as one value while the upstream may act on another is refused with a 400,
before it goes upstream; the ordinary bodies that look alike still pass."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import safejson
from gateway.errors import BadRequest
from gateway.protocols.base import DECIDING_KEYS, _maybe_ambiguous, refuse_duplicates

from .conftest import Gateway, Upstream

CHAT = "/v1/chat/completions"
MSG = "/v1/messages"
EDITS = "/v1/images/edits"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def send(http: aiohttp.ClientSession, gw: Gateway, key: str, path: str, raw: bytes,
               content_type: str = "application/json", **headers: str) -> tuple[int, Any]:
    async with http.post(gw.url + path, data=raw, headers={**auth(key), "Content-Type": content_type,
                                                           **headers}) as r:
        text = await r.text()
        return r.status, orjson.loads(text) if text.startswith("{") else text


MESSAGES = '"messages":[{"role":"user","content":"hi"}]'


async def test_json_with_a_deciding_key_twice_is_refused(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = pgateway
    key = await gw.key()
    ambiguous: list[tuple[str, str, str]] = [
        # The cheap model checked and billed, the other one run (or the reverse).
        (CHAT, f'{{"model":"gpt-test",{MESSAGES},"model":"renamed"}}', "model"),
        (CHAT, f'{{"mod\\u0065l":"renamed",{MESSAGES},"model":"gpt-test"}}', "model"),
        (CHAT, f'{{"\\u006dodel":"renamed", "model" :"gpt-test",{MESSAGES}}}', "model"),
        # Streamed or not decides how usage is read (and hidden).
        (CHAT, f'{{"model":"gpt-test","stream":false,{MESSAGES},"stream":true}}', "stream"),
        (CHAT, f'{{"model":"gpt-test","stream":true,"stream_options":{{}},{MESSAGES},"stream_options":{{}}}}',
         "stream_options"),
        (CHAT, f'{{"model":"gpt-test","stream":true,"stream_options":{{"include_usage":false,'
               f'"include_usage":true}},{MESSAGES}}}', "stream_options.include_usage"),
        (MSG, f'{{"model":"claude-test","max_tokens":5,{MESSAGES},"model":"claude-renamed"}}', "model"),
        # A server tool declared, then hidden by an empty list the gateway would check.
        (CHAT, f'{{"model":"gpt-test",{MESSAGES},"tools":[{{"type":"web_search"}}],"tools":[]}}', "tools"),
        (MSG, f'{{"model":"claude-test","max_tokens":5,{MESSAGES},"tools":[{{"type":"web_search_20250305",'
              '"name":"web_search"}], "tools" : []}', "tools"),
        # The second "model" hidden from a count of the name: a quote spelt \u0022 before "model".
        (CHAT, f'{{"model":"renamed","x":"\\u0022model",{MESSAGES},"model":"gpt-test"}}', "model"),
        ("/v1/responses", '{"model":"gpt-test","input":"hi","model":"renamed"}', "model"),
    ]
    for path, raw, param in ambiguous:
        status, data = await send(http, gw, key, path, raw.encode())
        assert status == 400, (raw, data)
        err = data["error"]
        assert (err.get("param"), err.get("code")) in ((param, "duplicate_key"), (None, None)), data
        assert param.split(".")[-1] in err["message"], data
    # A non-boolean stream: an upstream that reads "true" or 1 as true would
    # stream while the gateway reads the answer as a plain body.
    for value in ('"true"', "1", '"yes"', "{}"):
        status, data = await send(http, gw, key, CHAT, f'{{"model":"gpt-test","stream":{value},{MESSAGES}}}'.encode())
        assert status == 400 and data["error"]["param"] == "stream", (value, data)
    assert upstream.state.requests == []

    # What looks alike but is not ambiguous still goes through.
    fine = [
        # "model" as a nested property name (a tool's schema), and in content.
        f'{{"model":"gpt-test",{MESSAGES},"tools":[{{"type":"function","function":{{"name":"pick",'
        '"parameters":{"type":"object","properties":{"model":{"type":"string"},"stream":{}}}}}]}',
        # Escaped text (non-ASCII, a control character) in the content.
        '{"model":"gpt-test","messages":[{"role":"user","content":"\\u4f60\\u597d \\u001b[1m \\"model\\""}]}',
        f'{{"model":"gpt-test","stream":null,{MESSAGES}}}',
    ]
    for raw in fine:
        status, data = await send(http, gw, key, CHAT, raw.encode())
        assert status == 200, (raw, data)
    assert len(upstream.state.requests) == len(fine)
    assert await gw.wait_usage(len(ambiguous) + 4 + len(fine)) and len(gw.usage_rows()) == len(ambiguous) + 4 + len(
        fine)


def form(*parts: tuple[str, bytes], boundary: str = "b0und") -> bytes:
    """A multipart body from (part headers, value) pairs."""
    out = b""
    for head, value in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


async def test_deep_json_checked_for_duplicates_is_a_400_not_a_500(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """orjson takes 1,024 levels; the duplicate-key check's second parse
    (json's decoder) recursed out at fewer: a 500 with a traceback."""
    gw = pgateway
    key = await gw.key()
    deep = "[" * 1000 + "]" * 1000
    for raw in (f'{{"model":"gpt-test",{MESSAGES},"x":{deep},"model":"renamed"}}',
                f'{{"model":"gpt-test",{MESSAGES},"x":{deep},"y":"\\u006d"}}'):
        status, data = await send(http, gw, key, CHAT, raw.encode())
        assert status == 400, data
    assert upstream.state.requests == []
    rows = await gw.wait_usage(2)
    assert [r["status"] for r in rows] == [400, 400]


async def test_escaped_text_takes_no_second_parse_escaped_keys_still_refused(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """A body with escapes in its text (non-ASCII as json.dumps writes it,
    an HTML-safe encoder's \\u003c, a capital letter no deciding key has)
    is not parsed a second time by the careful check: any escape used to
    send it there, a whole body's parse again (3.8 ms instead of 0.9 ms for
    0.57 MB). Every character of every deciding key, escaped in either hex
    case, still takes the careful parse."""
    gw = pgateway
    key = await gw.key()
    text = '"content":"caf\\u00e9 \\u4f60\\u597d \\u003cb\\u003e \\u0041 \\u001b[1m"'
    raw = f'{{"model":"gpt-test","messages":[{{"role":"user",{text}}}],"x":[[1]]}}'
    assert not maybe_ambiguous(raw.encode())
    status, data = await send(http, gw, key, CHAT, raw.encode())
    assert status == 200 and len(upstream.state.requests) == 1, data
    refused = 0
    for name in (*DECIDING_KEYS, "include_usage"):
        for i, c in enumerate(name):
            escaped = f"{name[:i]}\\u{ord(c):04{'x' if i % 2 else 'X'}}{name[i + 1:]}"
            pair = f'"{escaped}":null,"{name}":null'
            body = (f'{{"model":"gpt-test",{MESSAGES},"stream_options":{{{pair}}}}}' if name == "include_usage"
                    else f'{{"model":"gpt-test",{MESSAGES},{pair}}}')
            status, data = await send(http, gw, key, CHAT, body.encode())
            assert (status, data["error"]["code"]) == (400, "duplicate_key"), (body, data)
            refused += 1
    assert len(upstream.state.requests) == 1
    assert await gw.wait_usage(1 + refused)


def field(name: str, value: bytes, extra: str = "") -> tuple[str, bytes]:
    return f'Content-Disposition: form-data; name="{name}"{extra}', value


async def test_multipart_read_two_ways_is_refused(
    pgateway: Gateway, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    gw = pgateway
    key = await gw.key()
    image = field("image", b"\x89PNG fake", '; filename="a.png"')
    ct = "multipart/form-data; boundary=b0und"
    ambiguous: list[tuple[bytes, str]] = [
        (form(field("model", b"gpt-image-test"), image, field("model", b"image-renamed")), ct),
        (form(field("model", b"gpt-image-test"), field("stream", b"false"), field("stream", b"true"), image), ct),
        # Two boundaries: which one splits the body depends on the parser.
        (form(field("model", b"gpt-image-test"), image), "multipart/form-data; boundary=b0und; boundary=other"),
        (form(field("model", b"gpt-image-test"), image), 'multipart/form-data; boundary="b0und"; BOUNDARY=b0und'),
        # A part with two names, an encoded name, two dispositions, model as a file.
        (form(('Content-Disposition: form-data; name="model"; name="prompt"', b"gpt-image-test"), image), ct),
        (form(("Content-Disposition: form-data; name*=utf-8''model", b"image-renamed"),
              field("model", b"gpt-image-test"), image), ct),
        (form(('Content-Disposition: form-data; name="prompt"\r\nContent-Disposition: form-data; name="model"',
               b"image-renamed"), field("model", b"gpt-image-test"), image), ct),
        (form(field("model", b"gpt-image-test", '; filename="m.txt"'), field("model", b"x"), image), ct),
    ]
    for raw, content_type in ambiguous:
        status, data = await send(http, gw, key, EDITS, raw, content_type)
        assert status == 400, (raw[:200], data)
    # Two Content-Type headers: the gateway would read one, the upstream maybe
    # the other. aiohttp's parser refuses a repeated singleton header before
    # the request reaches the gateway (so it has no usage row).
    async with http.post(gw.url + EDITS, data=form(field("model", b"gpt-image-test"), image),
                         headers=[("Authorization", f"Bearer {key}"), ("Content-Type", ct),
                                  ("Content-Type", "application/json")]) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_http_request"
    assert upstream.state.requests == []

    # A quoted boundary holding a ';', several image[] parts: fine.
    quoted = 'multipart/form-data; boundary="b;0und"'
    ok = form(field("model", b"gpt-image-test"), field("prompt", b"a cat"), image,
              field("image[]", b"\x89PNG other", '; filename="b.png"'), boundary="b;0und")
    status, data = await send(http, gw, key, EDITS, ok, quoted)
    assert status == 200, data
    assert upstream.state.requests[-1].body == ok  # still byte for byte
    rows = await gw.wait_usage(len(ambiguous) + 1)
    assert len(rows) == len(ambiguous) + 1
    assert [r["status"] for r in rows].count(400) == len(ambiguous)


def maybe_ambiguous(raw: bytes) -> bool:
    """What the cheap checks say, on the body as parse_json_body parses it."""
    obj, canon = safejson.parse(raw)
    return _maybe_ambiguous(raw, obj, canon)


def ambiguous(raw: bytes) -> bool:
    """What the careful parse says: a deciding key given twice."""
    try:
        refuse_duplicates(raw)
    except BadRequest:
        return True
    return False


AGENT_TOOLS = [{"name": "Task", "input_schema": {"type": "object", "properties": {
    "prompt": {"type": "string"}, "model": {"type": "string", "enum": ["sonnet", "opus"]}}}},
    {"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}]


@pytest.mark.parametrize("dumps", [
    orjson.dumps,  # what Claude Code and Codex send
    lambda o: json.dumps(o).encode(),  # json's defaults: spaces, non-ASCII escaped
    lambda o: json.dumps(o, indent=2).encode(),
], ids=["compact", "spaced", "indented"])
def test_names_repeated_below_the_top_level_take_no_second_parse(dumps: Any) -> None:
    """An agent's tools name "model" and "prompt" as properties: the body
    holds those names twice, but no key twice, and the careful parse
    (104 us on a 49 KB Claude Code body) is not run for it, however the
    body is spelt. The same body with a key given twice is still caught."""
    body = {"model": "claude-test", "max_tokens": 5, "stream": True, "tools": AGENT_TOOLS,
            "messages": [{"role": "user", "content": 'caf\u00e9 "model" \u4f60 <b>'}]}
    raw = dumps(body)
    assert not maybe_ambiguous(raw)
    assert not ambiguous(raw)
    twice = raw[:-1] + b',"model":"renamed"}'
    assert maybe_ambiguous(twice) and ambiguous(twice)


# Keys and strings that make the byte checks' life hard: deciding names
# (few, so that they repeat), the same with a quote before them (a string
# ending in quote + name), and names near them.
NAMES = ["model", "stream_options", "include_usage", "x"]
STRINGS = st.sampled_from([*NAMES, *(f'"{n}' for n in NAMES), *(f'say "{n}' for n in NAMES), "caf\u00e9"])


def spell(s: str, how: int) -> str:
    """A JSON string for ``s``: plain, with the quote or every character
    escaped as \\uXXXX, or with one letter escaped."""
    if how == 0:
        return json.dumps(s, ensure_ascii=False)
    if how == 1:
        return '"' + json.dumps(s)[1:-1].replace('\\"', "\\u0022") + '"'
    if how == 2 and s:
        return '"' + "".join(f"\\u{ord(c):04x}" for c in s) + '"'
    return json.dumps(s)


@st.composite
def json_texts(draw: st.DrawFn, depth: int = 2) -> str:
    """A JSON object as a careless or hostile client may write it: keys
    repeated at any level, strings spelt in several ways, spaces or none."""
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " : ")]))
    items = []
    for key in draw(st.lists(st.sampled_from(NAMES), max_size=5)):
        kind = draw(st.integers(0, 3 if depth else 1))
        if kind == 0:
            # Often the key's own name, or a string ending in a quote and it.
            text = draw(st.sampled_from([key, f'"{key}', f'say "{key}']) | STRINGS)
            value = spell(text, draw(st.sampled_from([0, 0, 0, 1, 1, 1, 1, 3, 3, 2])))
        elif kind == 1:
            value = draw(st.sampled_from(["true", "null", "1", "[]"]))
        elif kind == 2:
            value = draw(json_texts(depth - 1))
        else:
            value = "[" + sep[0].join(draw(st.lists(json_texts(depth - 1), max_size=2))) + "]"
        items.append(spell(key, draw(st.sampled_from([0] * 9 + [2]))) + sep[1] + value)
    return "{" + sep[0].join(items) + "}"


@settings(max_examples=400, deadline=None)
@given(text=json_texts())
def test_the_byte_checks_miss_no_key_given_twice(text: str) -> None:
    """Whatever the spelling, a body the careful parse refuses is one the
    cheap checks send to it."""
    raw = text.encode()
    if ambiguous(raw):
        assert maybe_ambiguous(raw)
