"""Acceptance scenarios S1, S2 and S4 (SCENARIOS.md) against the dev peer over real HTTP."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from gatewayd.demo import DevStack, open_dev_stack
from gatewayd.peer import Caller, Module, ReducerContext
from gatewayd.proto.sats import STRING, U32, U64, option
from gatewayd.services.supervisor import UpstreamState
from tests.streams.sseclient import Event, SseClient

pytestmark = pytest.mark.timeout(120)


def notes_module() -> Module:
    mod = Module("notes")
    mod.table("note", {"id": U64, "tenant_id": STRING, "body": STRING}, primary_key="id")
    mod.table("counter", {"id": U32, "value": U64}, primary_key="id")

    @mod.init
    def init(ctx: ReducerContext) -> None:
        ctx.db.counter.insert({"id": 1, "value": 0})
        for i in range(1, 9):
            ctx.db.note.insert({"id": i, "tenant_id": "t-a" if i % 2 else "t-b", "body": f"note {i}"})

    @mod.reducer(id=U32)
    def bump(ctx: ReducerContext, id: int) -> None:
        row = ctx.db.counter.find(id)
        assert row is not None
        ctx.db.counter.update({"id": id, "value": row["value"] + 1})

    return mod


def config(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "upstream": {"database": "notes", "backoff_initial_s": 0.2, "backoff_max_s": 1.0},
        "streams": [
            {
                "name": "notes",
                "tables": ["note", "counter"],
                "tenant_column": "tenant_id",
                "permission": "notes.read",
            }
        ],
        "reducers": [],
    }
    for section, values in overrides.items():
        doc.setdefault(section, {}).update(values)
    return doc


@asynccontextmanager
async def stack(**overrides: Any) -> AsyncIterator[DevStack]:
    async with open_dev_stack(notes_module(), config=config(**overrides)) as st:
        with trio.fail_after(10):
            while st.gateway.supervisor.state is not UpstreamState.LIVE:
                await st.gateway.supervisor.wait_state_change()
        yield st


def token(st: DevStack, tenant: str, sub: str = "user:u-1") -> str:
    return st.issuer.mint_for(sub, tenant, "notes.read")


async def open_notes(st: DevStack, tenant: str, **kw: Any) -> SseClient:
    c = await SseClient.open(st.url, token(st, tenant), path="v1/streams/notes", **kw)
    assert c.status == 200
    return c


def insert_note(st: DevStack, nid: int, tenant: str, body: str = "") -> None:
    st.peer.db.transact(
        lambda db: db.note.insert({"id": nid, "tenant_id": tenant, "body": body or f"n{nid}"})
    )


def delete_note(st: DevStack, nid: int) -> None:
    st.peer.db.transact(lambda db: db.note.delete_by(id=nid))


async def barrier(st: DevStack) -> None:
    """Wait until gatewayd has applied every transaction committed so far: the answer to a one-off
    query travels behind all earlier updates on the same connection (commit order)."""
    await st.gateway.supervisor.one_off_query("SELECT * FROM counter")


async def snapshot_then(c: SseClient) -> list[Event]:
    return await c.events_until(lambda e: e.event == "snapshot" and e.json["last"])


def seq(event_id: str) -> int:
    return int(event_id.rsplit(".", 1)[1])


# --- S1 ---------------------------------------------------------------------------------------


async def test_s1_reconnect_under_write_load_converges() -> None:
    async with stack() as st:
        sup = st.gateway.supervisor
        ready: list[bool] = []
        sup.on_state.append(lambda state, _r: ready.append(state is UpstreamState.LIVE))
        a = await open_notes(st, "t-a")
        b = await open_notes(st, "t-b")
        await snapshot_then(a)
        await snapshot_then(b)
        a_last, b_last = a.last_id, b.last_id

        async with trio.open_nursery() as nursery:

            async def writer() -> None:  # ~200 counter bumps a second
                while True:
                    st.peer.db.call_reducer("bump", {"id": 1}, Caller("c2" + "00" * 31))
                    await trio.sleep(0.005)

            nursery.start_soon(writer)
            await trio.sleep(0.3)
            # Cut gatewayd's upstream socket and keep it out for 3 s; meanwhile change notes.
            st.peer.refuse_upgrades(3.0)
            assert st.peer.cut() >= 1
            await trio.sleep(0.2)
            delete_note(st, 7)  # t-a
            insert_note(st, 9, "t-b")
            async with httpx.AsyncClient() as http:
                r = await http.get(st.url + "readyz")
                assert r.status_code == 503
                with trio.fail_after(15):
                    while sup.state is not UpstreamState.LIVE:
                        await sup.wait_state_change()
                assert (await http.get(st.url + "readyz")).status_code == 200
            ev_a = await a.next_event()
            ev_b = await b.next_event()
            nursery.cancel_scope.cancel()

        assert ev_a is not None and ev_b is not None
        assert (ev_a.event, ev_a.json["payload"]["id"]) == ("note.deleted", 7)
        assert (ev_b.event, ev_b.json["payload"]["id"]) == ("note.inserted", 9)
        # Ids keep increasing within each partition, without gaps.
        assert seq(ev_a.id) == seq(a_last) + 1
        assert seq(ev_b.id) == seq(b_last) + 1
        # No event for unchanged rows: nothing else arrives for either client.
        with trio.move_on_after(0.5):
            extra = await a.next_event()
            pytest.fail(f"unexpected event {extra}")
        # The projection equals a fresh one-off query.
        fresh = await sup.one_off_query("SELECT * FROM note")
        assert fresh.rows is not None
        cache = sup.cache
        assert cache is not None
        assert sorted(cache.rows("note"), key=lambda r: r["id"]) == sorted(
            fresh.rows["note"], key=lambda r: r["id"]
        )
        # /readyz went not-ready and back.
        assert False in ready and ready[-1] is True
        # Reconnect delays: jittered (within [base/2, base]) and capped at backoff_max_s.
        delays = sup.last_delays
        assert delays
        assert all(0.1 - 1e-9 <= d <= 1.0 + 1e-9 for d in delays)
        await a.aclose()
        await b.aclose()


# --- S2 ---------------------------------------------------------------------------------------


async def test_s2_resume_rules() -> None:
    async with stack(event_log={"max_events_per_partition_count": 100}) as st:
        ids = itertools.count(100)
        c = await open_notes(st, "t-a")
        # (f) no id -> snapshot then live, never a history dump.
        first = await snapshot_then(c)
        assert [e.event for e in first] == ["snapshot"]
        for _ in range(5):
            insert_note(st, next(ids), "t-a")
        live = [await c.next_event() for _ in range(5)]
        k = live[-1]
        assert k is not None
        await c.aclose()

        # (a) drop, 10 events happen, resume with k -> exactly those 10, in order.
        for _ in range(10):
            insert_note(st, next(ids), "t-a")
        await barrier(st)
        c = await open_notes(st, "t-a", last_event_id=k.id)
        got = [await c.next_event() for _ in range(10)]
        assert [seq(e.id) for e in got if e] == list(range(seq(k.id) + 1, seq(k.id) + 11))
        assert all(e is not None and e.event == "note.inserted" for e in got)
        await c.aclose()

        # (g) resume with k, receive nothing new, drop, resume with k again -> the same result.
        again = await open_notes(st, "t-a", last_event_id=k.id)
        got2 = [await again.next_event() for _ in range(10)]
        assert [e.id for e in got2 if e] == [e.id for e in got if e]
        await again.aclose()

        # (b) resume while events keep arriving -> strictly increasing, no gap, no repeat.
        c = await open_notes(st, "t-a", last_event_id=k.id)
        async with trio.open_nursery() as nursery:

            async def keep_writing() -> None:
                for _ in range(30):
                    insert_note(st, next(ids), "t-a")
                    await trio.sleep(0.001)

            nursery.start_soon(keep_writing)
            seen = [await c.next_event() for _ in range(40)]
        seqs = [seq(e.id) for e in seen if e]
        assert seqs == list(range(seq(k.id) + 1, seq(k.id) + 41))
        await c.aclose()

        # (c) an id older than the ring (100 events) -> reset, fresh snapshot, then live.
        for _ in range(120):
            insert_note(st, next(ids), "t-a")
        await barrier(st)
        for cursor, reason in ((k.id, "evicted"), ("garbage", "malformed")):  # (e) garbage id
            c = await open_notes(st, "t-a", last_event_id=cursor)
            evs = await snapshot_then(c)
            assert [e.event for e in evs] == ["reset", "snapshot"]
            assert evs[0].json["reason"] == reason
            insert_note(st, next(ids), "t-a")
            live_ev = await c.next_event()
            assert live_ev is not None and live_ev.event == "note.inserted"
            await c.aclose()
        stale_cursor = k.id

    # (d) an id from before a gatewayd restart -> reset, snapshot, live.
    async with stack() as st2:
        c = await open_notes(st2, "t-a", last_event_id=stale_cursor)
        evs = await snapshot_then(c)
        assert [e.event for e in evs] == ["reset", "snapshot"]
        assert evs[0].json["reason"] == "other_epoch"
        await c.aclose()


# --- S4 ---------------------------------------------------------------------------------------


async def test_s4_slow_and_frozen_consumers_cannot_hurt_anyone_else() -> None:
    buffer_bytes = 32 * 1024
    overrides = {
        "sse": {"client_buffer_bytes": buffer_bytes, "send_timeout_s": 2.0},
        "event_log": {"max_events_per_partition_count": 50_000, "max_bytes_per_partition": 64 * 1024 * 1024},
    }
    async with stack(**overrides) as st:
        hub = st.gateway.streams.hub
        frozen = await open_notes(st, "t-a", rcvbuf=4096)  # A: never reads again
        slow = await open_notes(st, "t-a", rcvbuf=4096)  # B: reads slowly
        normal = await open_notes(st, "t-a")  # C: reads normally
        for c in (slow, normal):
            await snapshot_then(c)
        total = 20_000
        peak_backlog = 0
        received: list[int] = []
        b_received: list[str] = []
        evicted_at: dict[str, float] = {}

        def note_eviction(_sub: object, reason: str) -> None:
            evicted_at.setdefault(reason, trio.current_time())

        hub.on_evict.append(note_eviction)

        async def read_normal() -> None:
            while len(received) < total:
                ev = await normal.next_event()
                assert ev is not None, "C was cut"
                received.append(seq(ev.id))

        async def read_slow() -> None:
            while True:
                ev = await slow.next_event()
                if ev is None:
                    return
                if ev.id:
                    b_received.append(ev.id)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_normal)
            nursery.start_soon(read_slow)
            body = "x" * 150
            next_id = itertools.count(1000)
            published_done = 0.0
            for _ in range(total // 100):  # 100 rows per transaction: 20,000 events
                st.peer.db.transact(
                    lambda db: [
                        db.note.insert({"id": next(next_id), "tenant_id": "t-a", "body": body})
                        for _ in range(100)
                    ]
                )
                peak_backlog = max(
                    peak_backlog,
                    max((s.backlog_bytes for p in hub.partitions.values() for s in p), default=0),
                )
                # ~10,000 events/s: in this single process the publisher must leave C (a separate
                # program in real life) time to read.
                await trio.sleep(0.01)
            published_done = trio.current_time()
            with trio.fail_after(30):
                while len(received) < total:
                    await trio.sleep(0.05)
            with trio.fail_after(10):
                while hub.subscriber_count() > 1:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

        # C got every event, in order, no gaps, and was never cut.
        assert received == sorted(received)
        assert len(set(received)) == total
        assert received[-1] - received[0] == total - 1
        # A and B were cut, each with a reason, counted in the metrics.
        reasons = hub.evictions
        assert sum(reasons.values()) >= 2
        assert set(reasons) <= {"buffer_overflow", "send_timeout"}
        # A was dropped within the send timeout of publishing ending (or earlier, on overflow).
        assert min(evicted_at.values()) <= published_done + 2.0 + 1.0
        # Memory stayed bounded: no client held more than its buffer (plus one frame).
        assert peak_backlog <= buffer_bytes + 4096
        # B recovers by resuming from its last id: the ring still holds everything it missed, so
        # it gets an exact replay up to the present (no reset).
        assert b_received
        b_last = seq(b_received[-1])
        resumed = await open_notes(st, "t-a", last_event_id=b_received[-1])
        replayed = [await resumed.next_event() for _ in range(received[-1] - b_last)]
        assert all(e is not None and e.event == "note.inserted" for e in replayed)
        assert [seq(e.id) for e in replayed if e] == list(range(b_last + 1, received[-1] + 1))
        await resumed.aclose()
        for c in (frozen, slow, normal):
            await c.aclose()


async def test_long_run_connect_and_leave_keeps_memory_bounded() -> None:
    async with stack() as st:
        hub = st.gateway.streams.hub
        for round_ in range(30):
            clients = [await open_notes(st, "t-a" if i % 2 else "t-b", query="") for i in range(10)]
            for c in clients:
                await snapshot_then(c)
            insert_note(st, 10_000 + round_, "t-a")
            for c in clients:
                await c.aclose()
        with trio.fail_after(10):
            while hub.subscriber_count():
                await trio.sleep(0.02)
        assert hub.partitions == {}
        assert dict(hub.per_principal) == {}
        assert st.gateway.streams.log.total_bytes <= st.gateway.config.event_log.max_total_bytes


async def test_module_update_that_changes_a_row_type_resets_its_streams() -> None:
    async with stack() as st:
        sup = st.gateway.supervisor
        c = await open_notes(st, "t-a")
        await snapshot_then(c)
        old_cursor = c.last_id
        reconnects = sup.reconnects
        # A module update adds a column; later updates carry rows in the new layout.
        st.peer.hotswap("note", {"id": U64, "tenant_id": STRING, "body": STRING, "pinned": option(STRING)})
        insert_note(st, 50, "t-a")
        events = await c.events_until(lambda e: False)  # read until the gateway ends the stream
        assert [e.event for e in events] == ["reset"]
        assert events[0].json["reason"] == "schema_changed"
        await c.aclose()
        assert sup.reconnects == reconnects + 1
        assert sup.decode_errors == 1
        # Resuming with the old cursor: reset (stale), then a snapshot in the new layout.
        c2 = await open_notes(st, "t-a", last_event_id=old_cursor)
        evs = await snapshot_then(c2)
        assert [e.event for e in evs] == ["reset", "snapshot"]
        assert evs[0].json["reason"] == "stale"
        rows = {r["row"]["id"]: r["row"] for r in evs[1].json["rows"]}
        assert rows[50]["pinned"] is None
        assert set(rows[1]) == {"id", "tenant_id", "body", "pinned"}
        await c2.aclose()
