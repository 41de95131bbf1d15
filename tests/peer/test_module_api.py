"""The Python module API and the database's transaction semantics (synchronous, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gatewayd.peer import ConstraintViolation, Module, ReducerContext, ReducerError, RowTypeError
from gatewayd.peer.database import Caller, DuplicateQuerySet, PeerDatabase
from gatewayd.peer.sql import Query
from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import ValueCodec
from gatewayd.proto.sats import (
    BOOL,
    BYTES,
    CONNECTION_ID,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    I128,
    I256,
    IDENTITY,
    STRING,
    TIME_DURATION,
    TIMESTAMP,
    U8,
    U16,
    U32,
    U64,
    U128,
    U256,
    UUID,
    AlgebraicType,
    ArrayT,
    option,
    product,
    sum_of,
)  # fmt: skip

ALICE = "c200" + "11" * 30
BOB = "c200" + "22" * 30


@dataclass
class FakeSub:
    identity: str = ALICE
    connection_id: str = "01" * 16
    query_sets: dict[int, list[Query]] = field(default_factory=dict)
    got: list[tuple[m.ServerMessage, bool]] = field(default_factory=list)

    def deliver(self, msg: m.ServerMessage, *, transaction_update: bool = False) -> None:
        self.got.append((msg, transaction_update))

    def pop(self) -> list[m.ServerMessage]:
        out = [x for x, _ in self.got]
        self.got.clear()
        return out


def chat_module() -> Module:
    mod = Module("chat")
    mod.table("user", {"identity": IDENTITY, "name": STRING, "online": BOOL}, primary_key="identity")
    mod.table(
        "message",
        {"id": U64, "sender": IDENTITY, "text": STRING, "room": STRING},
        primary_key="id",
        auto_inc=("id",),
        indexes=("room",),
    )
    mod.table("tag", {"name": STRING, "n": U32}, unique=("name",))
    mod.table("pair", {"a": U8, "b": U8})  # no key: set semantics by value
    mod.table("secret", {"k": STRING}, public=False)
    events: list[str] = []
    mod.events = events  # type: ignore[attr-defined]

    @mod.init
    def init(ctx: ReducerContext) -> None:
        ctx.db.tag.insert({"name": "general", "n": 0})
        events.append(f"init:{ctx.is_internal}")

    @mod.client_connected
    def connected(ctx: ReducerContext) -> None:
        if ctx.claims and ctx.claims.get("banned"):
            raise ReducerError("banned")
        ctx.db.user.upsert({"identity": ctx.sender, "name": ctx.subject or "anon", "online": True})

    @mod.client_disconnected
    def disconnected(ctx: ReducerContext) -> None:
        u = ctx.db.user.find(ctx.sender)
        if u:
            ctx.db.user.update({**u, "online": False})

    @mod.reducer(text=STRING, room=STRING)
    def send(ctx: ReducerContext, text: str, room: str) -> None:
        if not text:
            raise ReducerError("empty")
        ctx.db.message.insert({"id": 0, "sender": ctx.sender, "text": text, "room": room})

    @mod.reducer()
    def two_then_fail(ctx: ReducerContext) -> None:
        ctx.db.message.insert({"sender": ctx.sender, "text": "a", "room": "r"})
        ctx.db.tag.insert({"name": "x", "n": 1})
        raise ReducerError("nope")

    @mod.reducer()
    def boom(ctx: ReducerContext) -> None:
        ctx.db.tag.insert({"name": "y", "n": 1})
        raise KeyError("panic")

    @mod.reducer()
    def dup(ctx: ReducerContext) -> None:
        ctx.db.tag.insert({"name": "general", "n": 5})

    @mod.reducer()
    def noop(ctx: ReducerContext) -> None:
        ctx.db.tag.insert({"name": "tmp", "n": 1})
        ctx.db.tag.delete_by(name="tmp")

    @mod.reducer("add", name=STRING)
    def add_tag(ctx: ReducerContext, name: str) -> None:
        ctx.db["tag"].insert({"name": name, "n": 0})

    return mod


@pytest.fixture
def db() -> PeerDatabase:
    d = PeerDatabase(chat_module())
    d.run_init()
    return d


def args(db: PeerDatabase, reducer: str, **values: Any) -> bytes:
    return ValueCodec(db.schema.typespace).encode(db.module.reducers[reducer].params_type, values)


def test_schema_round_trips_through_raw_module_def(db: PeerDatabase) -> None:
    from gatewayd.proto.schema import parse_module_def

    again = parse_module_def(db.schema.to_json())
    assert again.tables["message"].pk_column == "id"
    assert again.tables["message"].auto_inc == (0,)
    assert again.tables["tag"].unique == ((0,),)
    assert again.tables["secret"].public is False
    assert again.reducers["add"].param_names == ("name",)
    assert again.reducers["init"].lifecycle == "Init"
    assert db.module.events == ["init:True"]  # type: ignore[attr-defined]


def test_declaration_errors() -> None:
    mod = Module("m")
    with pytest.raises(ValueError, match="no column"):
        mod.table("t", {"a": U8}, primary_key="b")
    with pytest.raises(ValueError, match="integer"):
        mod.table("t", {"a": STRING}, auto_inc=("a",))
    mod.table("t", {"a": U8})
    with pytest.raises(ValueError, match="twice"):
        mod.table("t", {"a": U8})

    with pytest.raises(TypeError, match="async"):

        @mod.reducer()
        async def bad(ctx: ReducerContext) -> None: ...

    @mod.init
    def i1(ctx: ReducerContext) -> None: ...

    with pytest.raises(ValueError, match="declared twice"):

        @mod.init
        def i2(ctx: ReducerContext) -> None: ...


def test_committed_reducer_sends_result_to_caller_and_update_to_others(db: PeerDatabase) -> None:
    caller, other, idle = FakeSub(ALICE), FakeSub(BOB), FakeSub(BOB)
    for s in (caller, other, idle):
        db.attach(s)
    db.subscribe(caller, 1, 1, ("SELECT * FROM message",))
    db.subscribe(other, 1, 9, ("SELECT * FROM message WHERE room = 'a'",))
    db.subscribe(idle, 1, 1, ("SELECT * FROM message WHERE room = 'b'",))
    for s in (caller, other, idle):
        assert isinstance(s.pop()[0], m.SubscribeApplied)
    res = db.call_reducer(
        "send",
        args(db, "send", text="hi", room="a"),
        Caller(ALICE, "01" * 16),
        subscriber=caller,
        request_id=5,
    )
    assert res.ok
    assert set(res.diff) == {"message"}
    (result,) = caller.pop()
    assert isinstance(result, m.ReducerResult)
    assert result.request_id == 5
    assert isinstance(result.outcome, m.ReducerOk)
    assert [qs.query_set_id for qs in result.outcome.transaction_update.query_sets] == [1]
    (tx,) = other.got
    assert tx[1] is True
    assert isinstance(tx[0], m.TransactionUpdate)
    assert [qs.query_set_id for qs in tx[0].query_sets] == [9]
    assert idle.got == []  # not affected: nothing at all


def test_auto_inc_assigns_sequence_values(db: PeerDatabase) -> None:
    for text in ("a", "b", "c"):
        assert db.call_reducer("send", {"text": text, "room": "r"}, Caller(ALICE)).ok
    assert [r["id"] for r in db.rows("message")] == [1, 2, 3]
    # explicit non-zero values are kept
    db.transact(lambda v: v.message.insert({"id": 100, "sender": ALICE, "text": "x", "room": "r"}))
    assert db.rows("message")[-1]["id"] == 100


def test_reducer_error_rolls_back_everything_including_sequences(db: PeerDatabase) -> None:
    sub = FakeSub()
    before = {t: db.rows(t) for t in ("message", "tag")}
    res = db.call_reducer("two_then_fail", b"", Caller(ALICE), subscriber=sub, request_id=1)
    assert res.status == "failed"
    assert res.message == "nope"
    assert res.http_status == 530
    (msg,) = sub.pop()
    assert isinstance(msg, m.ReducerResult)
    assert isinstance(msg.outcome, m.ReducerErr)
    assert msg.outcome.message == "nope"
    assert {t: db.rows(t) for t in ("message", "tag")} == before
    db.call_reducer("send", {"text": "after", "room": "r"}, Caller(ALICE))
    assert db.rows("message")[0]["id"] == 1  # the failed insert's sequence value was given back


def test_other_exceptions_are_internal_errors(db: PeerDatabase) -> None:
    sub = FakeSub()
    res = db.call_reducer("boom", b"", Caller(ALICE), subscriber=sub, request_id=2)
    assert res.status == "internal_error"
    assert "KeyError" in res.message
    (msg,) = sub.pop()
    assert isinstance(msg.outcome, m.ReducerInternalError)  # type: ignore[union-attr]
    assert [t["name"] for t in db.rows("tag")] == ["general"]


def test_unique_violation_is_an_internal_error(db: PeerDatabase) -> None:
    res = db.call_reducer("dup", b"", Caller(ALICE))
    assert res.status == "internal_error"
    assert "ConstraintViolation" in res.message
    assert "general" in res.message


def test_a_transaction_that_nets_to_nothing_sends_no_update(db: PeerDatabase) -> None:
    caller, other = FakeSub(ALICE), FakeSub(BOB)
    db.attach(caller)
    db.attach(other)
    db.subscribe(other, 1, 1, ("SELECT * FROM tag",))
    other.pop()
    res = db.call_reducer("noop", b"", Caller(ALICE), subscriber=caller, request_id=1)
    assert res.ok
    assert res.diff == {}
    (msg,) = caller.pop()
    assert isinstance(msg, m.ReducerResult)
    assert isinstance(msg.outcome, m.ReducerOk)
    assert msg.outcome.transaction_update.query_sets == ()
    assert other.got == []
    assert db.transactions_committed == 1  # only init


def test_set_semantics_for_tables_without_keys(db: PeerDatabase) -> None:
    def work(v: Any) -> None:
        v.pair.insert({"a": 1, "b": 2})
        v.pair.insert({"a": 1, "b": 2})  # identical row: a no-op
        v.pair.insert({"a": 1, "b": 3})

    db.transact(work)
    assert db.rows("pair") == [{"a": 1, "b": 2}, {"a": 1, "b": 3}]
    assert db.transact(lambda v: v.pair.delete({"a": 1, "b": 2})) is True
    assert db.transact(lambda v: v.pair.delete({"a": 9, "b": 9})) is False
    assert db.rows("pair") == [{"a": 1, "b": 3}]


def test_table_handle_api(db: PeerDatabase) -> None:
    def work(v: Any) -> dict[str, Any]:
        for i in range(5):
            v.message.insert(
                {"sender": ALICE if i % 2 else BOB, "text": f"t{i}", "room": "even" if i % 2 == 0 else "odd"}
            )
        out: dict[str, Any] = {}
        out["find"] = v.message.find(3)
        out["missing"] = v.message.find(99)
        out["filter"] = [r["id"] for r in v.message.filter(room="even")]
        out["filter2"] = [r["id"] for r in v.message.filter(room="odd", sender=ALICE)]
        out["count"] = v.message.count()
        out["find_by"] = v.tag.find_by("name", "general")
        row = v.message.find(1)
        row["text"] = "edited"
        out["update"] = v.message.update(row)
        out["deleted"] = v.message.delete_by(room="odd")
        out["iter"] = [r["id"] for r in v.message]
        return out

    out = db.transact(work)
    assert out["find"]["text"] == "t2"
    assert out["missing"] is None
    assert out["filter"] == [1, 3, 5]
    assert out["filter2"] == [2, 4]
    assert out["count"] == 5
    assert out["find_by"] == {"name": "general", "n": 0}
    assert out["update"]["text"] == "edited"
    assert out["deleted"] == 2
    assert out["iter"] == [3, 5, 1]  # an update re-inserts the row


def test_rows_handed_out_are_copies(db: PeerDatabase) -> None:
    mod = Module("arr")
    mod.table("t", {"id": U32, "xs": ArrayT(U32)}, primary_key="id")
    d = PeerDatabase(mod)

    def work(v: Any) -> None:
        row = v.t.insert({"id": 1, "xs": [1, 2]})
        row["xs"].append(3)
        v.t.find(1)["xs"].append(4)

    d.transact(work)
    assert d.rows("t") == [{"id": 1, "xs": [1, 2]}]


def test_row_type_errors_are_module_bugs(db: PeerDatabase) -> None:
    with pytest.raises(RowTypeError):
        db.transact(lambda v: v.tag.insert({"name": "x"}))
    with pytest.raises(RowTypeError):
        db.transact(lambda v: v.tag.insert({"name": "x", "n": -1}))
    with pytest.raises(AttributeError):
        db.transact(lambda v: v.nope)
    with pytest.raises(ConstraintViolation):
        db.transact(
            lambda v: (
                v.user.insert({"identity": ALICE, "name": "a", "online": True})
                and v.user.insert({"identity": ALICE, "name": "b", "online": True})
            )
        )
    assert db.rows("user") == []


def test_lifecycle_connect_and_disconnect(db: PeerDatabase) -> None:
    assert db.connect(Caller(ALICE, "01" * 16, {"sub": "alice", "iss": "x"})) is None
    assert db.rows("user") == [{"identity": ALICE, "name": "alice", "online": True}]
    assert db.connect(Caller(BOB, "02" * 16, {"sub": "bob", "banned": True})) == "banned"
    db.disconnect(Caller(ALICE, "01" * 16))
    assert db.rows("user")[0]["online"] is False


def test_lifecycle_reducers_cannot_be_called(db: PeerDatabase) -> None:
    res = db.call_reducer("client_connected", b"", Caller(ALICE))
    assert res.status == "internal_error"
    assert res.http_status == 400


def test_args_from_json_and_bsatn(db: PeerDatabase) -> None:
    assert db.call_reducer("add", ["one"], Caller(ALICE)).ok
    assert db.call_reducer("add", {"name": "two"}, Caller(ALICE)).ok
    assert db.call_reducer("add", args(db, "add", name="three"), Caller(ALICE)).ok
    bad = db.call_reducer("add", args(db, "add", name="x") + b"\x00", Caller(ALICE))
    assert bad.status == "internal_error"
    assert "trailing" in bad.message
    assert [t["name"] for t in db.rows("tag")] == ["general", "one", "two", "three"]


def test_duplicate_live_query_set_raises(db: PeerDatabase) -> None:
    sub = FakeSub()
    db.subscribe(sub, 1, 1, ("SELECT * FROM tag",))
    with pytest.raises(DuplicateQuerySet):
        db.subscribe(sub, 2, 1, ("SELECT * FROM tag",))


def test_private_tables_are_visible_to_the_owner_only() -> None:
    d = PeerDatabase(chat_module(), owner_identity=ALICE)
    owner, other = FakeSub(ALICE), FakeSub(BOB)
    d.subscribe(owner, 1, 1, ("SELECT * FROM secret",))
    d.subscribe(other, 1, 1, ("SELECT * FROM secret",))
    assert isinstance(owner.pop()[0], m.SubscribeApplied)
    err = other.pop()[0]
    assert isinstance(err, m.SubscriptionError)
    assert "private" in err.error


ALL_TYPES: dict[str, AlgebraicType] = {
    "b": BOOL, "u8": U8, "i8": I8, "u16": U16, "i16": I16, "u32": U32, "i32": I32, "u64": U64, "i64": I64,
    "u128": U128, "i128": I128, "u256": U256, "i256": I256, "f32": F32, "f64": F64, "s": STRING,
    "bytes": BYTES, "ident": IDENTITY, "conn": CONNECTION_ID, "ts": TIMESTAMP, "dur": TIME_DURATION,
    "uuid": UUID, "opt": option(U32), "arr": ArrayT(STRING), "prod": product(x=U8, y=STRING),
    "color": sum_of(red=product(), rgb=product(r=U8, g=U8, b=U8)),
}  # fmt: skip

ROW = {
    "b": True, "u8": 255, "i8": -128, "u16": 65535, "i16": -1, "u32": 2**32 - 1, "i32": -(2**31),
    "u64": 2**64 - 1, "i64": -(2**63), "u128": 2**128 - 1, "i128": -(2**127), "u256": 2**256 - 1,
    "i256": -(2**255), "f32": 1.5, "f64": -2.25, "s": "héllo", "bytes": "00ff", "ident": ALICE,
    "conn": "0f" * 16, "ts": 1_700_000_000_000_000, "dur": -5, "uuid": "12345678-1234-5678-1234-567812345678",
    "opt": None, "arr": ["a", "b"], "prod": {"x": 1, "y": "z"},
    "color": {"tag": "rgb", "value": {"r": 1, "g": 2, "b": 3}},
}  # fmt: skip


def test_every_codec_type_is_a_valid_column_type() -> None:
    mod = Module("types")
    mod.table("everything", ALL_TYPES)
    d = PeerDatabase(mod)
    d.transact(lambda v: v.everything.insert(ROW))
    (stored,) = d.rows("everything")
    assert stored == ROW
    sub = FakeSub()
    d.subscribe(sub, 1, 1, ("SELECT * FROM everything",))
    (applied,) = sub.pop()
    assert isinstance(applied, m.SubscribeApplied)
    row_type = d.schema.tables["everything"].row_type
    (decoded,), _ = ValueCodec(d.schema.typespace, safe=False).decode_rows(
        row_type, applied.rows.tables[0].rows.rows_data
    )
    assert decoded == ROW


def test_hotswap_migrates_rows_and_keeps_sequences(db: PeerDatabase) -> None:
    db.call_reducer("send", {"text": "a", "room": "r"}, Caller(ALICE))
    cols = dict(db.specs["message"].columns)
    cols["edited"] = BOOL
    db.hotswap("message", cols, defaults={"edited": False})
    assert db.rows("message") == [{"id": 1, "sender": ALICE, "text": "a", "room": "r", "edited": False}]
    db.call_reducer("send", {"text": "b", "room": "r"}, Caller(ALICE))
    assert db.rows("message")[-1]["id"] == 2
    assert db.schema.tables["message"].columns[-1] == "edited"
