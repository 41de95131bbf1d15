"""SSE framing follows the WHATWG rules for any row content, checked with httpx-sse.

Rows whose titles and bodies hold line breaks of every kind, text that looks like SSE fields,
unicode, emoji and very long strings are created through the API of a running ``gatewayd demo``;
they must come out of the stream byte for byte as they went in, whatever the chunking.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Iterator

import httpx
from httpx_sse import EventSource, ServerSentEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.proto import sse
from tests.e2e.support import WAIT_S, DemoProcess, call_reducer, envelope, open_stream

# (title, body); titles: 1..200 characters and not blank (the demo module's rule), bodies <= 64 KiB.
TRICKY: dict[str, tuple[str, str]] = {
    "lf": ("line\nfeed", "a\nb\n"),
    "cr": ("carriage\rreturn", "\ra\rb\r"),
    "crlf": ("crlf\r\nend", "one\r\ntwo\r\n"),
    "blank-lines": ("blank\n\nline", "\n\n\r\n\r\n\r\r"),
    "field-lookalikes": (
        "data: injected",
        "data: x\n\nevent: reset\nid: 1.2.3\nretry: 1\n: comment\n\n" + "data:no space\r\nid\r\n",
    ),
    "colons-and-spaces": (":leading colon", "  two leading spaces\n trailing \t"),
    "unicode": ("Grüße — 東京 — עברית — مرحبا", "e\u0301 (combining), \u00e9 (precomposed), \u212b, ß"),
    "emoji": ("👩\u200d👩\u200d👧\u200d👦 🏳\ufe0f\u200d🌈 🎉", "🙂" * 100 + "\U0010fffd"),
    "other-line-separators": ("sep\u2028\u2029\x85end", "\x0b\x0c\x1c\x1d\x1e\u2028\u2029\x85"),
    "controls-and-nul": ("ctl\x01\x1f\x7f", "nul\x00inside\x00"),
    "bom": ("\ufeffbom first", "\ufeff"),
    "quotes-and-escapes": ('"quoted" \\n not a newline \\', '{"json": "inside", "n": [1, 2]}\\u0041'),
    "long-title": ("🎉" * 200, ""),
    "long-body": (
        "long body",
        "".join(f"line {i} ü 🙂 data: {i}\r\n" if i % 3 else f"{i}\n" for i in range(2000))[:30000],
    ),
    "max-body": ("max body", "x" * (64 * 1024)),
}


def _marked(case: str, title: str, marker: str) -> str:
    # A marker finds the row again; the tricky part stays first and within 200 characters.
    return title if case == "long-title" else f"{title} [{marker}:{case}]"


def test_rows_with_tricky_text_arrive_intact(demo: DemoProcess) -> None:
    marker = uuid.uuid4().hex[:8]
    expected = {_marked(c, t, marker): (c, b) for c, (t, b) in TRICKY.items()}
    long_title = TRICKY["long-title"][0]
    assert all(0 < len(t) <= 200 for t in expected)
    with open_stream(demo) as s:
        s.read_snapshot()
        for title, (_case, body) in expected.items():
            if title == long_title:
                body = marker  # the only way to tell this row from another run's
            call_reducer(demo, "create_document", {"title": title, "body": body})
        seen: dict[str, ServerSentEvent] = {}

        def done(e: ServerSentEvent) -> bool:
            p = envelope(e)["payload"]
            ours = p["title"] != long_title or p["body"] == marker
            if e.event == "document.inserted" and p["title"] in expected and ours:
                seen[p["title"]] = e
            return len(seen) == len(expected)

        s.until(done, what="every tricky row", timeout=2 * WAIT_S)
        s.cross_check()
        raw = s.raw
        events = s.data_events()

    for title, (case, body) in expected.items():
        p = envelope(seen[title])["payload"]
        assert p["title"].encode() == title.encode(), case
        if title != long_title:
            assert p["body"].encode() == body.encode(), case

    # Each frame is id/event/data lines with one-line JSON data: no raw CR, and LF only as framing.
    for block in raw.split(b"\n\n"):
        assert b"\r" not in block
        for line in block.split(b"\n"):
            assert line == b"" or re.match(rb"(id|event|data|retry): |: ", line), line[:80]

    # The same bytes, re-read by httpx-sse under hostile chunking (1..7-byte pieces split UTF-8
    # sequences and field names), give the same events.
    rng = random.Random(4)

    def pieces() -> Iterator[bytes]:
        i = 0
        while i < len(raw):
            n = rng.randint(1, 7)
            yield raw[i : i + n]
            i += n

    resp = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=pieces())
    rechunked = [e for e in EventSource(resp).iter_sse() if e.data]
    assert [(e.event, e.data, e.id) for e in rechunked[: len(events)]] == [
        (e.event, e.data, e.id) for e in events
    ]


def test_tricky_rows_survive_in_the_snapshot(demo: DemoProcess) -> None:
    marker = uuid.uuid4().hex[:8]
    cases = {c: tb for c, tb in TRICKY.items() if c != "long-title"}
    for case, (title, body) in cases.items():
        call_reducer(demo, "create_document", {"title": _marked(case, title, marker), "body": body})
    with open_stream(demo) as s:
        rows, _cursor, _chunks = s.read_snapshot()
        s.cross_check()
    by_title = {r["title"]: r for r in rows}
    api = httpx.get(
        f"{demo.url}v1/streams/documents/snapshot",
        headers={"Authorization": f"Bearer {demo.token}"},
        timeout=WAIT_S,
    ).json()
    api_titles = {r["row"]["title"] for r in api["rows"]}
    for case, (title, body) in cases.items():
        t = _marked(case, title, marker)
        assert t in by_title, case
        assert t in api_titles, case
        got = by_title[t]["body"]
        # The demo's background writer may have rewritten the body since.
        assert got.encode() == body.encode() or got.startswith("Edited by the demo writer"), case


# --- the framing function itself, sans-IO ----------------------------------------------------


def _httpx_sse(raw: bytes) -> list[ServerSentEvent]:
    resp = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    return [e for e in EventSource(resp).iter_sse() if e.data or e.event]


@settings(max_examples=300, deadline=None)
@given(
    data=st.text(st.characters(codec="utf-8"), min_size=1),
    event=st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"), min_size=1, max_size=20),
    id=st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=20),
)
def test_frame_is_read_back_by_httpx_sse(data: str, event: str, id: str) -> None:
    """Multi-line data: every line break (CR, LF, CRLF) becomes its own data line; a WHATWG client
    joins them with LF. Nothing else changes (a leading space survives: one is always written)."""
    raw = sse.frame(data, event=event, id=id)
    got = _httpx_sse(raw)
    want = re.sub(r"\r\n|\r", "\n", data)
    assert [(e.data, e.event, e.id) for e in got] == [(want, event, id)]
    assert sse.parse(raw) == [{"event": event, "data": want, "id": id}]


@settings(max_examples=200, deadline=None)
@given(payload=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(st.characters(codec="utf-8")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
))  # fmt: skip
def test_json_frame_round_trips_any_json(payload: object) -> None:
    import msgspec

    body = msgspec.json.encode({"payload": payload})
    raw = sse.json_frame(body, event="document.inserted", id="e.t.1")
    (got,) = _httpx_sse(raw)
    assert json.loads(got.data) == {"payload": payload}
    assert got.data.encode() == body
