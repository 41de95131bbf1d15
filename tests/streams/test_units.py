"""Sans-IO pieces of the streams path: SSE framing, the event log, the projector."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.proto import sse
from gatewayd.proto.cache import RowChange
from gatewayd.proto.eventlog import EventLog, Replay, Reset
from gatewayd.proto.projection import Projector, StreamDef


@given(st.text())
def test_sse_frame_round_trips_any_text(text: str) -> None:
    framed = sse.frame(text, event="x", id="1")
    (ev,) = sse.parse(framed)
    # The WHATWG parser normalises every line break to LF; nothing else changes.
    assert ev == {"event": "x", "data": text.replace("\r\n", "\n").replace("\r", "\n"), "id": "1"}


@given(st.dictionaries(st.text(max_size=5), st.text()))
def test_json_frames_are_one_data_line(payload: dict[str, str]) -> None:
    body = msgspec.json.encode(payload)
    framed = sse.json_frame(body, event="t.inserted", id="e.t.1")
    assert framed.count(b"\n") == 4
    (ev,) = sse.parse(framed)
    assert msgspec.json.decode(ev["data"]) == payload


def test_sse_rejects_line_breaks_in_ids_and_names() -> None:
    with pytest.raises(ValueError, match="id"):
        sse.frame("x", id="1\n2")
    with pytest.raises(ValueError, match="event"):
        sse.frame("x", event="a\rb")
    assert sse.parse(sse.comment("hb") + sse.retry(1500)) == []


def log(n: int = 5, max_bytes: int = 10_000, total: int = 100_000) -> EventLog:
    return EventLog(max_events_per_partition=n, max_bytes_per_partition=max_bytes, max_total_bytes=total)


def append(lg: EventLog, key: tuple[str, str], frame: bytes) -> str:
    seq, eid = lg.next_id(key)
    lg.append(key, seq, frame)
    return eid


def test_event_log_replays_exactly_and_resets_with_a_reason() -> None:
    lg = log()
    a, b = ("s", "t-a"), ("s", "t-b")
    ids = [append(lg, a, f"a{i}".encode()) for i in range(8)]
    other = append(lg, b, b"b0")
    got = lg.resume(a, ids[4])
    assert isinstance(got, Replay)
    assert got.frames == [b"a5", b"a6", b"a7"]
    assert lg.resume(a, ids[-1]) == Replay([], 8)
    assert lg.resume(a, ids[1]) == Reset("evicted")  # ring of 5 holds a3..a7
    assert lg.resume(a, other) == Reset("other_partition")
    assert lg.resume(a, "x.y.z") == Reset("malformed")
    assert lg.resume(a, "nonsense") == Reset("malformed")
    assert lg.resume(a, ids[0].split(".")[0] + "." + ids[0].split(".")[1] + ".99") == Reset("unknown")
    fresh = log()
    assert fresh.resume(a, ids[4]) == Reset("other_epoch")
    # A client may not be replayed anything at or below its floor (e.g. before its grant).
    assert lg.resume(a, ids[4], floor=6) == Reset("before_grant")


def test_event_log_ids_reveal_nothing_about_other_tenants() -> None:
    lg = log()
    for _ in range(4):
        append(lg, ("s", "big"), b"x")
    first_small = append(lg, ("s", "small"), b"x")
    assert first_small.endswith(".1")
    assert "small" not in first_small


def test_event_log_global_budget_trims_least_recently_active() -> None:
    lg = log(n=100, max_bytes=1000, total=300)
    for _ in range(3):
        append(lg, ("s", "old"), b"x" * 100)
    for _ in range(2):
        append(lg, ("s", "new"), b"y" * 100)
    assert lg.total_bytes <= 300
    assert len(lg.partition(("s", "old")).ring) == 1
    assert len(lg.partition(("s", "new")).ring) == 2


def test_projector_partitions_by_tenant_and_moves_rows_between_tenants() -> None:
    lg = log(n=100)
    p = Projector([StreamDef("docs", ("document",), "tenant_id", "document.read")], lg)
    r1 = {"id": 1, "tenant_id": "a", "title": "x"}
    r1b = {"id": 1, "tenant_id": "b", "title": "x"}
    evs = p.apply([RowChange("document", "inserted", r1, key=1)])
    assert [(e.partition, e.event) for e in evs] == [(("docs", "a"), "document.inserted")]
    evs = p.apply([RowChange("document", "updated", r1b, old=r1, key=1)])
    assert [(e.partition, e.event) for e in evs] == [
        (("docs", "a"), "document.deleted"),
        (("docs", "b"), "document.inserted"),
    ]
    rows_a, _c, _s = p.snapshot("docs", "a")
    rows_b, cursor_b, seq_b = p.snapshot("docs", "b")
    assert rows_a == []
    assert rows_b == [("document", r1b)]
    assert seq_b == 1
    assert cursor_b.endswith(".1")
    env = msgspec.json.decode(sse.parse(evs[1].frame)[0]["data"])
    assert env == {
        "event": "document.inserted",
        "id": evs[1].id,
        "tenant_id": "b",
        "schema_version": 1,
        "payload": r1b,
    }
    # Rows without a usable tenant are not streamed anywhere.
    assert p.apply([RowChange("document", "inserted", {"id": 2, "tenant_id": None}, key=2)]) == []
    assert p.skipped == 1
