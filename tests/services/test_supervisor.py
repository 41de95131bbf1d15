"""Upstream session + supervisor behaviour on trio's MockClock over in-memory streams."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
import trio
import trio.testing

from gatewayd.errors import OutcomeUnknownError, UpstreamUnavailableError
from gatewayd.proto import client as pc
from gatewayd.proto import messages as m
from gatewayd.proto.sats import STRING, U32, U64, Typespace, option, product
from gatewayd.proto.schema import ModuleSchema, ReducerDef, TableDef, parse_module_def
from gatewayd.services.db_ws import SessionConfig
from gatewayd.services.supervisor import (
    ChangeBatch,
    Credential,
    SupervisorConfig,
    UpstreamState,
    UpstreamSupervisor,
    backoff_delay,
)
from tests.services.fakedb import FakeDb

NOTE = product(id=U64, tenant_id=STRING, body=STRING)
COUNTER = product(id=U32, value=U64)


def make_schema(note_type: Any = NOTE) -> ModuleSchema:
    ts = Typespace([note_type, COUNTER])
    schema = ModuleSchema(typespace=ts)
    schema.tables["note"] = TableDef("note", 0, note_type, primary_key=(0,))
    schema.tables["counter"] = TableDef("counter", 1, COUNTER, primary_key=(0,))
    schema.reducers["add_note"] = ReducerDef("add_note", NOTE)
    schema.reducers["bump"] = ReducerDef("bump", product(id=U32))
    schema.reducers["fail"] = ReducerDef("fail", product(reason=STRING))
    schema.reducers["noop"] = ReducerDef("noop", product())
    # Through JSON and back: the client must work from what the server publishes.
    return parse_module_def(schema.to_json())


def add_note(db: FakeDb, args: dict[str, Any], conn: Any) -> str | None:
    db.tx_insert("note", args)
    return None


def bump(db: FakeDb, args: dict[str, Any], conn: Any) -> str | None:
    cur = db.rows["counter"].get(args["id"])
    value = cur["value"] + 1 if cur else 1
    if cur:
        db.tx_delete("counter", args["id"])
    db.tx_insert("counter", {"id": args["id"], "value": value})
    return None


def fail(db: FakeDb, args: dict[str, Any], conn: Any) -> str | None:
    return str(args["reason"])


def noop(db: FakeDb, args: dict[str, Any], conn: Any) -> str | None:
    return None


@dataclass
class Consumer:
    """Applies change batches like a projection would, and checks they make sense."""

    rows: dict[tuple[str, Any], Any] = field(default_factory=dict)
    batches: list[ChangeBatch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __call__(self, batch: ChangeBatch) -> None:
        self.batches.append(batch)
        for ch in batch.changes:
            key = (ch.table, ch.row["id"])
            if ch.kind == "inserted":
                if key in self.rows:
                    self.problems.append(f"duplicate insert {key}")
                self.rows[key] = ch.row
            elif ch.kind == "updated":
                if key not in self.rows:
                    self.problems.append(f"update of missing {key}")
                self.rows[key] = ch.row
            elif ch.kind == "deleted":
                if key not in self.rows:
                    self.problems.append(f"delete of missing {key}")
                self.rows.pop(key, None)

    def table(self, name: str) -> dict[Any, Any]:
        return {k[1]: v for k, v in self.rows.items() if k[0] == name}


FAST = SupervisorConfig(
    backoff_initial_s=1.0,
    backoff_max_s=8.0,
    auth_backoff_initial_s=60.0,
    auth_backoff_max_s=600.0,
    call_wait_s=2.0,
    drain_s=1.0,
    session=SessionConfig(ping_interval_s=5.0, ping_timeout_s=3.0, connect_timeout_s=4.0),
)


@asynccontextmanager
async def running(
    db: FakeDb,
    *,
    config: SupervisorConfig = FAST,
    token_source: Callable[[], Any] | None = None,
    query_sets: dict[str, list[str]] | None = None,
    wait: bool = True,
) -> AsyncIterator[tuple[UpstreamSupervisor, Consumer]]:
    consumer = Consumer()
    async with trio.open_nursery() as nursery:
        sup = UpstreamSupervisor(
            target=db.target(),
            query_sets=query_sets or {"notes": ["SELECT * FROM note"], "counters": ["SELECT * FROM counter"]},
            sink=consumer,
            token_source=token_source,
            schema_source=db.schema_source,
            config=config,
            open_stream=db.opener(nursery),  # type: ignore[arg-type]
            rng=random.Random(7),
            wall_clock=wall,
        )
        if wait:
            await nursery.start(sup.serve)
        else:
            nursery.start_soon(sup.serve)
        yield sup, consumer
        nursery.cancel_scope.cancel()


def fake_db(protocol: m.Protocol = m.Protocol.V2) -> FakeDb:
    db = FakeDb(make_schema(), protocol=protocol)
    db.reducers.update(add_note=add_note, bump=bump, fail=fail, noop=noop)
    for i in range(1, 6):
        db.put("note", {"id": i, "tenant_id": "t-a" if i % 2 else "t-b", "body": f"note {i}"})
    db.put("counter", {"id": 1, "value": 0})
    return db


async def until_live(sup: UpstreamSupervisor) -> None:
    while sup.state is not UpstreamState.LIVE:
        await sup.wait_state_change()


def wall() -> float:
    return 1_800_000_000 + trio.current_time()


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize("protocol", [m.Protocol.V2, m.Protocol.V3])
async def test_initial_snapshot_live_updates_and_reducer_calls(
    autojump_clock: trio.testing.MockClock, protocol: m.Protocol
) -> None:
    db = fake_db(protocol)
    async with running(db) as (sup, consumer):
        assert sup.state is UpstreamState.LIVE
        assert consumer.batches[0].cause == "initial"
        assert len(consumer.table("note")) == 5
        assert sup.query_set_status == {"notes": "applied", "counters": "applied"}

        # Someone else writes: a TransactionUpdate.
        await db.commit(inserts=[("note", {"id": 6, "tenant_id": "t-b", "body": "six"})])
        await settle()
        assert consumer.batches[-1].cause == "transaction"
        assert consumer.table("note")[6]["body"] == "six"

        # We write: our own ReducerResult carries our transaction, applied like one.
        out = await sup.call_reducer_json("bump", {"id": 1})
        assert isinstance(out, pc.ReducerCommitted)
        assert consumer.batches[-1].cause == "reducer"
        (change,) = consumer.batches[-1].changes
        assert (change.kind, change.row, change.old) == (
            "updated",
            {"id": 1, "value": 1},
            {"id": 1, "value": 0},
        )

        # The module refuses: its own message comes back, nothing changes.
        n = len(consumer.batches)
        out = await sup.call_reducer_json("fail", {"reason": "not allowed"})
        assert isinstance(out, pc.ReducerFailed)
        assert out.message == "not allowed"
        # A reducer that changes nothing completes from its result alone, with no batch.
        out = await sup.call_reducer_json("noop", {})
        assert isinstance(out, pc.ReducerCommitted)
        assert out.changes == []
        out = await sup.call_reducer("missing", b"")
        assert isinstance(out, pc.ReducerInternalError)
        assert len(consumer.batches) == n
        assert consumer.problems == []


async def test_reconnect_reconciles_only_what_changed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = fake_db()
    async with running(db) as (sup, consumer):
        start = trio.current_time()
        # While we are cut off: delete n-3, insert n-9, change n-4; the rest stays the same.
        await db.cut_all()
        db.remove("note", 3)
        db.put("note", {"id": 9, "tenant_id": "t-b", "body": "nine"})
        db.put("note", {"id": 4, "tenant_id": "t-b", "body": "four, edited"})
        await sup.wait_state_change()
        assert sup.state is UpstreamState.RECONNECTING
        await until_live(sup)
        reconcile = consumer.batches[-1]
        assert reconcile.cause == "reconcile"
        got = sorted((c.kind, c.row["id"]) for c in reconcile.changes)
        assert got == [("deleted", 3), ("inserted", 9), ("updated", 4)]
        assert consumer.table("note") == dict(db.rows["note"])
        assert consumer.problems == []
        # The first retry waited a jittered delay within [initial/2, initial].
        assert FAST.backoff_initial_s / 2 <= trio.current_time() - start <= FAST.backoff_initial_s + 0.1
        assert sup.reconnects == 1


async def test_backoff_is_capped_and_jittered(autojump_clock: trio.testing.MockClock) -> None:
    db = fake_db()
    db.refuse_next = 10**6  # every upgrade refused with 503
    async with running(db, wait=False) as (sup, _consumer):
        await trio.sleep(200)
        times = db.attempt_times
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) >= 10
        # Exponential growth up to the cap, each gap within [base/2, base].
        for i, gap in enumerate(gaps):
            base = min(FAST.backoff_max_s, FAST.backoff_initial_s * 2**i)
            assert base / 2 - 1e-6 <= gap <= base + 1e-6, (i, gap)
        capped = gaps[5:]
        assert max(capped) <= FAST.backoff_max_s + 1e-6
        assert len({round(g, 6) for g in capped}) > 1, "no jitter"
        assert sup.state is UpstreamState.CONNECTING


def test_backoff_delay_bounds() -> None:
    rng = random.Random(1)
    for attempt in range(100):
        d = backoff_delay(attempt, 0.5, 30.0, 2.0, rng)
        base = min(30.0, 0.5 * 2**attempt)
        assert base / 2 <= d <= base


@pytest.mark.parametrize("mode", ["http401", "closed_before_initial"])
async def test_auth_rejection_is_a_state_with_slow_retries(
    autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    db = fake_db()
    if mode == "http401":
        db.reject_status = 401
    else:
        db.close_before_initial = True
    async with running(db, wait=False) as (sup, _consumer):
        await trio.sleep(1)
        assert sup.state is UpstreamState.AUTH_REJECTED
        assert (
            "401" in (sup.last_error or "")
            if mode == "http401"
            else "client_connected" in (sup.last_error or "")
        )
        await trio.sleep(600)
        # No tight loop: attempts are spaced by the auth backoff (>= 30 s, then growing).
        gaps = [b - a for a, b in itertools.pairwise(db.attempt_times)]
        assert gaps
        assert min(gaps) >= FAST.auth_backoff_initial_s / 2
        assert len(db.attempt_times) <= 6
        # Recovery: the peer accepts again.
        db.reject_status = None
        db.close_before_initial = False
        with trio.fail_after(FAST.auth_backoff_max_s + 1):
            await until_live(sup)


async def test_dead_peer_detected_by_ping(autojump_clock: trio.testing.MockClock) -> None:
    db = fake_db()
    async with running(db) as (sup, consumer):
        t0 = trio.current_time()
        db.conns[0].stream.freeze()  # the server stops reading: no pongs, no close
        await sup.wait_state_change()
        assert sup.state is UpstreamState.RECONNECTING
        elapsed = trio.current_time() - t0
        cfg = FAST.session
        assert elapsed <= cfg.ping_interval_s + cfg.ping_timeout_s + 0.01
        assert "pong" in (sup.last_error or "")
        await until_live(sup)
        assert consumer.problems == []


async def test_call_in_flight_when_link_drops_is_outcome_unknown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = fake_db()
    db.hold_results = trio.Event()  # the reducer runs "slowly": no result until released
    async with running(db) as (sup, _consumer):
        async with trio.open_nursery() as nursery:
            outcome: list[BaseException] = []

            async def call() -> None:
                try:
                    await sup.call_reducer_json("add_note", {"id": 50, "tenant_id": "t-a", "body": "x"})
                except OutcomeUnknownError as exc:
                    outcome.append(exc)

            nursery.start_soon(call)
            await settle()
            t0 = trio.current_time()
            await db.cut_all()
        assert len(outcome) == 1
        assert trio.current_time() - t0 < 0.01  # failed at once, never hangs


async def test_calls_while_disconnected_wait_then_fail_unsent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = fake_db()
    async with running(db) as (sup, _consumer):
        db.refuse_next = 10**6
        await db.cut_all()
        await sup.wait_state_change()
        t0 = trio.current_time()
        with pytest.raises(UpstreamUnavailableError, match="not sent"):
            await sup.call_reducer_json("bump", {"id": 1})
        assert trio.current_time() - t0 == pytest.approx(FAST.call_wait_s)
        sent = [msg for c in db.conns for msg in c.received if isinstance(msg, m.CallReducer)]
        assert sent == []


def jwt_with_exp(exp: float, n: int) -> str:
    return jwt.encode(
        {"sub": "svc", "iss": "test", "iat": int(exp) - 60, "exp": int(exp), "n": n},
        "k" * 32,
        algorithm="HS256",
    )


async def test_token_refresh_is_make_before_break(autojump_clock: trio.testing.MockClock) -> None:
    """S7: 60-s tokens, 5 minutes of writes every 2 s: no lost or duplicated update."""
    db = fake_db()
    minted: list[float] = []

    async def token_source() -> Credential:
        exp = wall() + 60
        minted.append(trio.current_time())
        return Credential(jwt_with_exp(exp, len(minted)), exp)

    async with running(db, token_source=token_source) as (sup, consumer):
        writes = 0
        deadline = trio.current_time() + 300
        while trio.current_time() < deadline:
            await trio.sleep(2)
            writes += 1
            await db.commit(
                inserts=[("note", {"id": 100 + writes, "tenant_id": "t-a", "body": f"w{writes}"})]
            )
            if writes % 3 == 0:
                await sup.call_reducer_json("bump", {"id": 1})
        await settle()
        assert consumer.problems == []
        assert consumer.table("note") == db.rows["note"]
        assert consumer.table("counter") == db.rows["counter"]
        # Each token was replaced before it expired: ~every 48 s (60 s minus a 20 % lead).
        assert sup.refreshes >= 5
        assert all(b - a < 60 for a, b in itertools.pairwise(minted))
        # Every connection presented a different, fresh token; old connections were closed.
        assert len(set(db.tokens_seen)) == len(db.tokens_seen)
        assert len(db.conns) == 1
        # No update was delivered twice: each insert of note 100+k arrived exactly once.
        inserted = [
            c.row["id"]
            for b in consumer.batches
            for c in b.changes
            if c.kind == "inserted" and c.table == "note"
        ]
        assert len(inserted) == len(set(inserted))


async def test_peer_down_longer_than_token_lifetime_recovers_with_new_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = fake_db()
    issued: list[str] = []

    async def token_source() -> Credential:
        exp = wall() + 60
        tok = jwt_with_exp(exp, len(issued))
        issued.append(tok)
        return Credential(tok, exp)

    async with running(db, token_source=token_source) as (sup, _consumer):
        db.refuse_next = 10**6
        await db.cut_all()
        await trio.sleep(180)  # three token lifetimes
        db.refuse_next = 0
        await until_live(sup)
        assert db.tokens_seen[-1] == issued[-1]
        assert jwt.decode(issued[-1], options={"verify_signature": False})["exp"] > wall()


async def test_decode_error_refetches_schema_and_reconnects_on_hotswap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = fake_db()
    async with running(db) as (sup, consumer):
        fetches = db.schema_fetches
        # Hotswap: note gains a column; the server now sends rows in the new shape.
        new_note = product(id=U64, tenant_id=STRING, body=STRING, pinned=option(STRING))
        db.schema = make_schema(new_note)
        db.codec = db.schema.codec
        for row in db.rows["note"].values():
            row["pinned"] = None
        await db.commit(inserts=[("note", {"id": 7, "tenant_id": "t-a", "body": "seven", "pinned": "yes"})])
        while (
            sup.state is not UpstreamState.LIVE
            or sup.schema is None
            or "pinned" not in sup.schema.tables["note"].columns
        ):
            await sup.wait_state_change()
        assert db.schema_fetches >= fetches + 2  # refetch after the error, then for the new session
        assert sup.decode_errors == 1
        assert consumer.table("note")[7]["pinned"] == "yes"
        assert consumer.table("note")[1]["pinned"] is None
        assert consumer.problems == []


@pytest.mark.parametrize(
    ("garbage", "needle"),
    [
        (b"\x00\x09", "unknown ServerMessage tag 9"),
        (b"\x07\x04", "unknown compression tag 7"),
        (
            b"\x00\x04\x01\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\x7f",
            "count 2147483647 cannot fit",
        ),
        (b"\x00\x03\x01\x01\x00\x00\x00\xff\xff\xff\x7f", "string length 2147483647 exceeds"),
        (
            b"\x00\x06\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x09",
            "unknown ReducerOutcome tag 9",
        ),
        (b"\x00\x03\x01\x01\x00\x00\x00\x02\x00\x00\x00\xff\xfe", "UTF-8"),
        (b"\x00\x06\x01\x00", "truncated"),
    ],
)
async def test_bad_upstream_bytes_close_and_rebuild_the_session(
    autojump_clock: trio.testing.MockClock, garbage: bytes, needle: str
) -> None:
    db = fake_db()
    async with running(db) as (sup, consumer):
        await db.broadcast_raw(garbage)
        await sup.wait_state_change()
        assert sup.state is UpstreamState.RECONNECTING
        assert needle in (sup.last_error or "")
        await until_live(sup)
        assert consumer.problems == []


async def test_refused_query_set_is_per_set(autojump_clock: trio.testing.MockClock) -> None:
    db = fake_db()
    sets = {"notes": ["SELECT * FROM note"], "broken": ["SELECT * FROM nowhere"]}
    async with running(db, query_sets=sets) as (sup, consumer):
        assert sup.state is UpstreamState.LIVE
        assert sup.query_set_status["notes"] == "applied"
        assert sup.query_set_status["broken"].startswith("failed")
        assert len(consumer.table("note")) == 5


async def test_server_dropped_query_set_removes_only_its_rows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    db = fake_db()
    sets = {
        "a": ["SELECT * FROM note WHERE tenant_id = 't-a'"],
        "all": ["SELECT * FROM note"],
        "c": ["SELECT * FROM counter"],
    }
    async with running(db, query_sets=sets) as (sup, consumer):
        conn = db.conns[0]
        qsid_c = next(q for q, parsed in conn.sets.items() if parsed[0][0] == "counter")
        await conn.send(m.SubscriptionError(None, qsid_c, "row limit exceeded"))
        await settle()
        batch = consumer.batches[-1]
        assert batch.cause == "query_set_dropped"
        assert [(c.kind, c.table) for c in batch.changes] == [("deleted", "counter")]
        assert sup.query_set_status["c"] == "failed: row limit exceeded"
        # Overlapping sets a and all both hold t-a notes: still all there.
        assert len(consumer.table("note")) == 5
