"""``gatewayd demo`` as a user runs it (a subprocess), exercised end to end over loopback.

Snapshot, a live event made through the API, exact resume (header, query parameter, snapshot
cursor), reset on a bad id, tenant isolation, errors, the snapshot endpoint's pages, and a clean
Ctrl-C. Every stream is read with httpx-sse and the same bytes re-parsed with
gatewayd.proto.sse.parse. The demo's background writer keeps editing documents throughout, so
the tests never assume a quiet stream: they compare ids and bytes, not counts.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent

from tests.e2e.support import (
    SEEDED_ACME_TITLES,
    SEEDED_GLOBEX_TITLES,
    WAIT_S,
    DemoProcess,
    SSEStream,
    call_reducer,
    envelope,
    open_stream,
    start_demo,
    tee_client,
)

DOC_EVENTS = ("document.inserted", "document.updated", "document.deleted")


def _unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:10]}"


def _inserted_with_title(title: str) -> Any:
    def pred(e: ServerSentEvent) -> bool:
        return e.event == "document.inserted" and envelope(e)["payload"]["title"] == title

    return pred


def _check_sse_headers(s: SSEStream) -> None:
    h = s.response.headers
    assert h["content-type"].split(";")[0] == "text/event-stream"
    assert h["cache-control"] == "no-cache, no-transform"
    assert h["x-accel-buffering"] == "no"
    assert "content-encoding" not in h, "streams are never compressed"


def _triples(events: list[ServerSentEvent]) -> list[tuple[str, str, str]]:
    return [(e.id, e.event, e.data) for e in events]


def test_snapshot_carries_seeded_acme_documents_and_ends_with_the_cursor(demo: DemoProcess) -> None:
    with open_stream(demo) as s:
        _check_sse_headers(s)
        first = s.next()
        # The first block is the reconnection delay: demo config retry_ms 1000 + jitter 0..2000.
        assert first.retry is not None, first
        assert 1000 <= first.retry <= 3000, first
        assert first.data == ""
        rows, cursor, chunks = s.read_snapshot()
        assert [e.event for e in s.data_events()] == ["snapshot"] * len(chunks)
        titles = {r["title"] for r in rows}
        assert titles >= SEEDED_ACME_TITLES
        assert not titles & SEEDED_GLOBEX_TITLES
        assert {r["tenant_id"] for r in rows} == {"acme"}
        for i, e in enumerate(chunks):
            doc = envelope(e)
            assert doc["event"] == "snapshot"
            assert doc["stream"] == "documents"
            assert doc["tenant_id"] == "acme"
            assert doc["schema_version"] == 1
            assert doc["last"] is (i == len(chunks) - 1)
        # Only the last chunk moves the cursor: its SSE id is the snapshot's cursor.
        assert chunks[-1].id == cursor
        raw = s.raw
        last_chunk_at = raw.rindex(b"event: snapshot")
        assert f"id: {cursor}\n".encode() in raw[raw.rindex(b"\n\n", 0, last_chunk_at) :]
        s.cross_check()


def test_retry_is_jittered_per_connection(demo: DemoProcess) -> None:
    retries = []
    for _ in range(5):
        with open_stream(demo) as s:
            first = s.next()
            assert first.retry is not None
            retries.append(first.retry)
    assert all(1000 <= r <= 3000 for r in retries), retries
    assert len(set(retries)) > 1, retries


def test_change_made_through_the_api_arrives_live_with_the_envelope(demo: DemoProcess) -> None:
    title = _unique("live")
    with open_stream(demo) as s:
        _rows, cursor, _ = s.read_snapshot()
        assert title not in {r["title"] for r in _rows}
        call_reducer(demo, "create_document", {"title": title, "body": "made through the API"})
        got = s.until(_inserted_with_title(title), what=f"document.inserted for {title!r}")
        ev = got[-1]
        assert ev.event == "document.inserted"
        assert ev.id
        assert ev.id != cursor
        doc = envelope(ev)
        assert set(doc) == {"event", "id", "tenant_id", "schema_version", "payload"}
        assert doc["event"] == "document.inserted"
        assert doc["id"] == ev.id
        assert doc["tenant_id"] == "acme"
        assert doc["schema_version"] == 1
        payload = doc["payload"]
        assert payload["title"] == title
        assert payload["body"] == "made through the API"
        assert payload["tenant_id"] == "acme"
        assert isinstance(payload["id"], int)
        assert isinstance(payload["updated_at"], int)
        # Everything between the snapshot and our insert is an ordinary document event.
        assert all(e.event in DOC_EVENTS and envelope(e)["id"] == e.id for e in got)
        s.cross_check()


def test_resume_gives_exactly_the_events_after_the_id(demo: DemoProcess) -> None:
    titles = [_unique(f"resume {i}") for i in range(3)]
    with open_stream(demo) as a:
        _rows, snap_cursor, _ = a.read_snapshot()
        for t in titles:
            call_reducer(demo, "create_document", {"title": t, "body": ""})
        a.until(_inserted_with_title(titles[-1]), what="the last insert")
        live = [e for e in a.data_events() if e.event != "snapshot"]
        a.cross_check()
    ours = [e for e in live if e.event == "document.inserted" and envelope(e)["payload"]["title"] in titles]
    assert [envelope(e)["payload"]["title"] for e in ours] == titles, "inserts arrive in commit order"
    earlier = ours[0].id
    after = live[[e.id for e in live].index(earlier) + 1 :]
    assert len(after) >= 2
    assert len({e.id for e in live}) == len(live), "ids never repeat"

    def replay(**kw: Any) -> list[ServerSentEvent]:
        with open_stream(demo, **kw) as b:
            got = b.until(lambda e: e.id == live[-1].id, what=f"replay up to {live[-1].id}")
            b.cross_check()
        assert not [e for e in got if e.event in ("snapshot", "reset")], b.summary()
        return got

    # Header, as browsers send it; the query parameter, for clients that cannot set headers.
    assert _triples(replay(headers={"Last-Event-ID": earlier})) == _triples(after)
    assert _triples(replay(params={"last_event_id": earlier})) == _triples(after)
    # The snapshot's cursor: live from exactly there (no gap, no double apply).
    assert _triples(replay(params={"cursor": snap_cursor})) == _triples(live)


def test_snapshot_endpoint_cursor_opens_the_stream_exactly_there(demo: DemoProcess) -> None:
    headers = {"Authorization": f"Bearer {demo.token}"}
    snap = httpx.get(f"{demo.url}v1/streams/documents/snapshot", headers=headers, timeout=WAIT_S).json()
    assert snap["stream"] == "documents"
    assert snap["tenant_id"] == "acme"
    assert snap["schema_version"] == 1
    title = _unique("after snapshot")
    call_reducer(demo, "create_document", {"title": title, "body": ""})
    with open_stream(demo, params={"cursor": snap["cursor"]}) as s:
        got = s.until(_inserted_with_title(title), what="the insert made after the snapshot")
    assert not [e for e in got if e.event in ("snapshot", "reset")]
    # The rows of the snapshot plus the events after its cursor are the current state.
    state = {r["row"]["id"]: r["row"] for r in snap["rows"]}
    for e in got:
        p = envelope(e)["payload"]
        if e.event == "document.deleted":
            state.pop(p["id"], None)
        else:
            state[p["id"]] = p
    with open_stream(demo) as fresh:
        rows, _cursor, _ = fresh.read_snapshot()
    now = {r["id"]: r for r in rows}
    assert now.keys() == state.keys()
    assert {k: r["title"] for k, r in now.items()} == {k: r["title"] for k, r in state.items()}


def test_snapshot_endpoint_pages(demo: DemoProcess) -> None:
    headers = {"Authorization": f"Bearer {demo.token}"}
    url = f"{demo.url}v1/streams/documents/snapshot"
    full = httpx.get(url, headers=headers, timeout=WAIT_S).json()
    assert full["next_page"] is None
    assert len(full["rows"]) >= 2
    pages = [httpx.get(url, headers=headers, params={"limit": "1"}, timeout=WAIT_S).json()]
    while pages[-1]["next_page"] is not None:
        assert len(pages) <= len(full["rows"]) + 1, "pagination does not terminate"
        params = {"limit": "1", "page": pages[-1]["next_page"]}
        pages.append(httpx.get(url, headers=headers, params=params, timeout=WAIT_S).json())
    assert all(len(p["rows"]) == 1 for p in pages)
    assert len({p["cursor"] for p in pages}) == 1, "every page is valid at the same cursor"
    ids = [p["rows"][0]["row"]["id"] for p in pages]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(r["row"]["id"] for r in full["rows"])
    # An unknown page token is refused, not silently restarted.
    r = httpx.get(url, headers=headers, params={"page": "nope:1"}, timeout=WAIT_S)
    assert r.status_code == 410
    assert r.json()["error"]["code"] == "page_expired"
    r = httpx.get(url, headers=headers, params={"limit": "many"}, timeout=WAIT_S)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_limit"


@pytest.mark.parametrize(
    ("last_event_id", "reason"),
    [
        ("garbage", "malformed"),
        ("x" * 500, "malformed"),
        ("1.2.three", "malformed"),
        ("00000000.0000000000.1", "other_epoch"),
    ],
    ids=["garbage", "too-long", "non-numeric", "other-epoch"],
)
def test_bad_last_event_id_gives_one_reset_then_a_fresh_snapshot(
    demo: DemoProcess, last_event_id: str, reason: str
) -> None:
    with open_stream(demo, headers={"Last-Event-ID": last_event_id}) as s:
        first = s.next_data()
        assert first.event == "reset", s.summary()
        assert envelope(first) == {"event": "reset", "reason": reason}
        rows, cursor, chunks = s.read_snapshot()
        assert {r["title"] for r in rows} >= SEEDED_ACME_TITLES
        assert chunks[-1].id == cursor
        assert [e.event for e in s.data_events()].count("reset") == 1
        s.cross_check()


def test_id_of_another_tenant_resets_and_tenants_are_isolated(demo: DemoProcess) -> None:
    carol = demo.tokens()["carol"]  # globex
    with open_stream(demo, token=carol) as g:
        rows, globex_cursor, _ = g.read_snapshot()
        assert {r["tenant_id"] for r in rows} == {"globex"}
        assert {r["title"] for r in rows} >= SEEDED_GLOBEX_TITLES
        assert not {r["title"] for r in rows} & SEEDED_ACME_TITLES
        acme_title, globex_title = _unique("acme only"), _unique("globex only")
        call_reducer(demo, "create_document", {"title": acme_title, "body": ""})
        call_reducer(demo, "create_document", {"title": globex_title, "body": ""}, token=carol)
        # Had acme's insert leaked into globex's stream, it would arrive before globex's.
        got = g.until(_inserted_with_title(globex_title), what="carol's own insert")
        assert all(envelope(e)["tenant_id"] == "globex" for e in got)
        assert acme_title not in {envelope(e)["payload"].get("title") for e in got}
    with open_stream(demo, headers={"Last-Event-ID": globex_cursor}) as s:
        first = s.next_data()
        assert (first.event, envelope(first)) == ("reset", {"event": "reset", "reason": "other_partition"})
        rows, _, _ = s.read_snapshot()
        assert {r["tenant_id"] for r in rows} == {"acme"}


def test_stream_on_a_kept_alive_api_connection_behaves_the_same(demo: DemoProcess) -> None:
    """A stream requested on a connection the HTTP API already serves takes the ASGI fallback."""
    client, transport = tee_client()
    with client:
        assert client.get(demo.url + "healthz", timeout=WAIT_S).status_code == 200
        title = _unique("fallback")
        with open_stream(demo, client=(client, transport)) as s:
            _check_sse_headers(s)
            rows, cursor, chunks = s.read_snapshot()
            assert {r["title"] for r in rows} >= SEEDED_ACME_TITLES
            assert chunks[-1].id == cursor
            call_reducer(demo, "create_document", {"title": title, "body": ""})
            ev = s.until(_inserted_with_title(title), what="the live insert")[-1]
            assert envelope(ev)["id"] == ev.id
            s.cross_check()


def test_errors_have_status_and_code(demo: DemoProcess) -> None:
    url = f"{demo.url}v1/streams/"

    def get(path: str, headers: dict[str, str] | None = None, **params: str) -> httpx.Response:
        return httpx.get(url + path, headers=headers or {}, params=params, timeout=WAIT_S)

    bearer = {"Authorization": f"Bearer {demo.token}"}
    cases: list[tuple[httpx.Response, int, str]] = [
        (get("documents"), 401, "missing_credentials"),
        (get("documents", {"Authorization": "Bearer not-a-jwt"}), 401, "malformed_token"),
        (get("documents", {"Cookie": "gatewayd_token=not.a.jwt"}), 401, "malformed_token"),
        (get("nope", bearer), 404, "unknown_stream"),
        (get("documents", bearer, tenant_id="globex"), 403, "forbidden"),
        (get("documents/snapshot"), 401, "missing_credentials"),
        (get("nope/snapshot", bearer), 404, "unknown_stream"),
        (get("documents/snapshot", bearer, tenant_id="globex"), 403, "forbidden"),
    ]
    for resp, status, code in cases:
        assert resp.status_code == status, (resp.request.url, resp.status_code, resp.text)
        err = resp.json()["error"]
        assert err["code"] == code, (resp.request.url, err)
        assert err["correlation_id"]
        assert err["message"]
        assert resp.headers["x-correlation-id"] == err["correlation_id"]
    assert cases[0][0].headers["www-authenticate"] == "Bearer"


def test_cookie_authenticates_a_stream(demo: DemoProcess) -> None:
    """EventSource cannot set headers: the demo page's token travels in the gatewayd_token cookie."""
    with httpx.stream(
        "GET",
        f"{demo.url}v1/streams/documents",
        headers={"Cookie": f"other=1; gatewayd_token={demo.token}"},
        timeout=WAIT_S,
    ) as r:
        assert r.status_code == 200, r.read()
        body = b""
        for chunk in r.iter_raw():
            body += chunk
            if b'"last":true' in body:
                break
    assert b"event: snapshot" in body
    assert b'"tenant_id":"acme"' in body


def test_too_many_streams_per_principal_answers_429(demo: DemoProcess) -> None:
    url = f"{demo.url}v1/streams/documents"
    bob = {"Authorization": f"Bearer {demo.tokens()['bob']}"}
    clients: list[httpx.Client] = []
    opened: list[httpx.Response] = []
    try:
        for _ in range(16):  # sse.max_streams_per_principal (default)
            c = httpx.Client(timeout=WAIT_S)
            clients.append(c)
            resp = c.send(c.build_request("GET", url, headers=bob), stream=True)
            opened.append(resp)
            assert resp.status_code == 200
        r = httpx.get(url, headers=bob, timeout=WAIT_S)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "too_many_streams"
        assert r.headers["retry-after"] == "5"
    finally:
        for resp in opened:
            resp.close()
        for c in clients:
            c.close()
    # The slots come back once those clients have left.
    deadline = time.monotonic() + WAIT_S
    while True:
        with httpx.stream("GET", url, headers=bob, timeout=WAIT_S) as again:
            if again.status_code == 200:
                break
        assert time.monotonic() < deadline, "closed streams never gave their slots back"
        time.sleep(0.1)


def test_sigint_sends_shutdown_to_open_streams_and_exits_zero(tmp_path: Any) -> None:
    demo = start_demo(tmp_path)
    client, transport = tee_client()
    try:
        assert client.get(demo.url + "healthz", timeout=WAIT_S).status_code == 200
        # Streams on their own connections (native path), one on a kept-alive API connection.
        with contextlib.ExitStack() as stack:
            k = stack.enter_context(open_stream(demo, client=(client, transport)))
            natives = [stack.enter_context(open_stream(demo)) for _ in range(5)]
            for stream in (k, *natives):
                stream.read_snapshot()
            t0 = time.monotonic()
            demo.interrupt()
            retries = []
            for stream in (k, *natives):
                got = stream.until(lambda e: e.event == "shutdown", what="event: shutdown", timeout=5)
                doc = json.loads(got[-1].data)
                assert doc["event"] == "shutdown"
                assert doc["reason"]
                # The shutdown event comes right after a reconnection delay for the browser.
                retry = stream.received[-2].retry
                assert retry is not None
                assert 1000 <= retry <= 3000
                assert stream.received[-2].data == ""
                retries.append(retry)
                stream.drain_to_end(timeout=5)
                stream.cross_check()
        rc = demo.proc.wait(timeout=5)
        elapsed = time.monotonic() - t0
        # Jittered per connection, so that the clients do not all come back in the same instant.
        assert len(set(retries)) > 1, retries
    finally:
        client.close()
        demo.stop()
    assert rc == 0, demo.stderr()[-3000:]
    assert elapsed < 5, f"exit took {elapsed:.1f} s"
    assert "Traceback" not in demo.stderr(), demo.stderr()[-3000:]
