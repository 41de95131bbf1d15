"""Cross-check gatewayd's v2 codec and row codec against the official TypeScript SDK's codec.

The SDK (npm ``spacetimedb@2.10.1``, pinned in tests/harness/ts-sdk/package-lock.json) is the
fidelity oracle. Every case below goes to Node in one batch (tests/harness/ts-sdk/codec_check.mjs,
JSON on stdin, JSON on stdout, about half a second) and each test then compares one result:

(a) Python encodes every ServerMessage and ClientMessage variant; the SDK's ``ServerMessage`` /
    ``ClientMessage`` deserializer decodes the bytes with zero bytes left, the decoded value equals
    the SDK-shaped description of what Python encoded, and the SDK re-encodes it byte-identically.
(b) The SDK encodes the same messages from that description; Python decodes them to the original
    dataclass, and the bytes equal Python's own encoding.
(c) Rows of every SATS type family: Python's ``ValueCodec`` encodes, the SDK decodes with
    ``t.row({...})`` built from the type (extreme values included); and the reverse.

Values cross the boundary as "xjson" (JSON plus ``{"$bigint": "..."}``, ``{"$bytes": hex}``,
``{"$identity": hex}``, ``{"$undefined": true}``, ...; see codec_check.mjs). The functions ``js_*``
below state, independently of both codecs, which JS value the SDK is expected to produce for a
message or a JSON-ready row value.

Known SDK problems (both also at upstream HEAD; see shared/spacetimedb/TS-SDK-NOTES.md):

* ``AlgebraicType.makeSerializer`` builds the ``err`` branch of a Result from the **ok** type, so
  the SDK cannot *encode* ``OneOffQueryResult{result: {err}}`` (it throws). Decoding is fine. That
  one message is decoded but not re-encoded, and ``test_sdk_result_err_encoder_bug_is_still_there``
  pins the failure so a version bump that fixes it tells us to re-enable the check. For the same
  reason a ``Result<u32, String>`` row's ``err`` value is only checked Python -> SDK; with equal ok
  and err types (``Result<String, String>``) the bug is invisible and both directions are checked.
* Representation limit, not a bug: the SDK maps ``Option`` to the bare value or ``undefined``, so
  ``Option<Option<T>>``'s ``Some(None)`` (bytes ``00 01``) decodes to ``undefined`` and re-encodes
  as ``01``. Only ``Some(Some(v))`` and ``None`` of a nested option are compared.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Final

import pytest

from gatewayd.errors import DecodeError
from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import Reader, ValueCodec, safe_int
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
    SCHEDULE_AT,
    STRING,
    TIME_DURATION,
    TIMESTAMP,
    U8,
    U16,
    U32,
    U64,
    U128,
    U256,
    UNIT,
    UUID,
    AlgebraicType,
    ArrayT,
    Prim,
    Product,
    Sum,
    option,
    product,
    result,
    special_kind,
    sum_of,
    type_to_json,
)
from tests.node.harness import TS_SDK_DIR, HarnessError, run_node_script

if TYPE_CHECKING:
    from collections.abc import Iterable

pytestmark = pytest.mark.node

Json = Any
CODEC: Final = ValueCodec()
IDENT: Final = "c200ef884364c1a99be0298dc68f2004e6b97c09d1b1658b7db22f51fb662059"
CONN: Final = "0102030405060708090a0b0c0d0e0f10"
TS: Final = 1_700_000_000_000_000
U32_MAX: Final = 2**32 - 1
I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1

# --- the SDK's JS shapes, stated independently of both codecs ------------------------------------

UNDEFINED: Final = {"$undefined": True}
WIDE_INTS: Final = frozenset({"U64", "I64", "U128", "I128", "U256", "I256"})  # bigint in JS


def js_bytes(b: bytes) -> Json:
    return {"$bytes": b.hex()}


def js_big(n: int) -> Json:
    return {"$bigint": str(n)}


def js_rowlist(rl: m.BsatnRowList) -> Json:
    hint = rl.size_hint
    if isinstance(hint, m.FixedSize):
        js_hint = {"tag": "FixedSize", "value": hint.size}
    else:
        js_hint = {"tag": "RowOffsets", "value": [js_big(o) for o in hint.offsets]}
    return {"sizeHint": js_hint, "rowsData": js_bytes(rl.rows_data)}


def js_query_rows(qr: m.QueryRows) -> Json:
    return {"tables": [{"table": t.table, "rows": js_rowlist(t.rows)} for t in qr.tables]}


def js_table_update_rows(r: m.TableUpdateRows) -> Json:
    if isinstance(r, m.PersistentTableRows):
        return {
            "tag": "PersistentTable",
            "value": {"inserts": js_rowlist(r.inserts), "deletes": js_rowlist(r.deletes)},
        }
    return {"tag": "EventTable", "value": {"events": js_rowlist(r.events)}}


def js_tx(tx: m.TransactionUpdate) -> Json:
    return {
        "querySets": [
            {
                "querySetId": {"id": qs.query_set_id},
                "tables": [
                    {"tableName": t.table_name, "rows": [js_table_update_rows(r) for r in t.rows]}
                    for t in qs.tables
                ],
            }
            for qs in tx.query_sets
        ]
    }


def js_reducer_outcome(o: m.ReducerOutcome) -> Json:
    if isinstance(o, m.ReducerOk):
        return {
            "tag": "Ok",
            "value": {
                "retValue": js_bytes(o.ret_value),
                "transactionUpdate": js_tx(o.transaction_update),
            },
        }
    if isinstance(o, m.ReducerOkEmpty):
        return {"tag": "OkEmpty", "value": {}}
    if isinstance(o, m.ReducerErr):
        return {"tag": "Err", "value": js_bytes(o.payload)}
    return {"tag": "InternalError", "value": o.message}


def js_server(msg: m.ServerMessage) -> Json:
    """The value ``ServerMessage.deserialize`` should return for ``msg``."""
    value: Json
    if isinstance(msg, m.InitialConnection):
        value = {
            "identity": {"$identity": msg.identity},
            "connectionId": {"$connectionId": msg.connection_id},
            "token": msg.token,
        }
    elif isinstance(msg, m.SubscribeApplied):
        value = {
            "requestId": msg.request_id,
            "querySetId": {"id": msg.query_set_id},
            "rows": js_query_rows(msg.rows),
        }
    elif isinstance(msg, m.UnsubscribeApplied):
        value = {
            "requestId": msg.request_id,
            "querySetId": {"id": msg.query_set_id},
            "rows": UNDEFINED if msg.rows is None else js_query_rows(msg.rows),
        }
    elif isinstance(msg, m.SubscriptionError):
        value = {
            "requestId": UNDEFINED if msg.request_id is None else msg.request_id,
            "querySetId": {"id": msg.query_set_id},
            "error": msg.error,
        }
    elif isinstance(msg, m.TransactionUpdate):
        value = js_tx(msg)
    elif isinstance(msg, m.OneOffQueryResult):
        res: Json
        if msg.error is not None:
            res = {"err": msg.error}
        else:
            assert msg.rows is not None, "catalog: give Ok results explicit rows"
            res = {"ok": js_query_rows(msg.rows)}
        value = {"requestId": msg.request_id, "result": res}
    elif isinstance(msg, m.ReducerResult):
        value = {
            "requestId": msg.request_id,
            "timestamp": {"$timestamp": str(msg.timestamp)},
            "result": js_reducer_outcome(msg.outcome),
        }
    else:
        status = (
            {"tag": "Returned", "value": js_bytes(msg.status.value)}
            if isinstance(msg.status, m.ProcedureReturned)
            else {"tag": "InternalError", "value": msg.status.message}
        )
        value = {
            "status": status,
            "timestamp": {"$timestamp": str(msg.timestamp)},
            "totalHostExecutionDuration": {"$timeDuration": str(msg.total_host_execution_duration)},
            "requestId": msg.request_id,
        }
    return {"tag": type(msg).__name__, "value": value}


def js_client(msg: m.ClientMessage) -> Json:
    """The value ``ClientMessage.deserialize`` should return for ``msg``."""
    value: Json
    if isinstance(msg, m.Subscribe):
        value = {
            "requestId": msg.request_id,
            "querySetId": {"id": msg.query_set_id},
            "queryStrings": list(msg.query_strings),
        }
    elif isinstance(msg, m.Unsubscribe):
        flag = "SendDroppedRows" if msg.send_dropped_rows else "Default"
        value = {
            "requestId": msg.request_id,
            "querySetId": {"id": msg.query_set_id},
            "flags": {"tag": flag, "value": {}},
        }
    elif isinstance(msg, m.OneOffQuery):
        value = {"requestId": msg.request_id, "queryString": msg.query_string}
    elif isinstance(msg, m.CallReducer):
        value = {
            "requestId": msg.request_id,
            "flags": msg.flags,
            "reducer": msg.reducer,
            "args": js_bytes(msg.args),
        }
    else:
        value = {
            "requestId": msg.request_id,
            "flags": msg.flags,
            "procedure": msg.procedure,
            "args": js_bytes(msg.args),
        }
    return {"tag": type(msg).__name__, "value": value}


def js_float(v: float | str) -> Json:
    if isinstance(v, str):  # "NaN", "Infinity", "-Infinity" in the JSON-ready form
        return {"$float": v}
    if v == 0 and math.copysign(1.0, v) < 0:
        return {"$float": "-0"}
    return v


def js_value(ty: AlgebraicType, v: Json) -> Json:
    """The JS value the SDK's type builders use for the JSON-ready value ``v`` of type ``ty``."""
    kind = special_kind(ty)
    if isinstance(ty, Prim):
        if ty.name in ("Bool", "String"):
            return v
        if ty.name in ("F32", "F64"):
            return js_float(v)
        n = int(v)
        return js_big(n) if ty.name in WIDE_INTS else n
    if kind == "identity":
        return {"$identity": v}
    if kind == "connection_id":
        return {"$connectionId": v}
    if kind == "timestamp":
        return {"$timestamp": str(int(v))}
    if kind == "time_duration":
        return {"$timeDuration": str(int(v))}
    if kind == "uuid":
        return {"$uuid": v}
    if kind == "bytes":
        return {"$bytes": v}
    if isinstance(ty, ArrayT):
        return [js_value(ty.elem, x) for x in v]
    if isinstance(ty, Product):
        return {e.name: js_value(e.ty, v[e.name]) for e in ty.elements if e.name is not None}
    assert isinstance(ty, Sum)
    if kind == "option":
        if v is None:
            return UNDEFINED
        inner = ty.variants[0].ty
        return js_value(inner, v["some"] if special_kind(inner) == "option" else v)
    if kind == "result":
        ((name, x),) = v.items()
        return {name: js_value(ty.variants[0 if name == "ok" else 1].ty, x)}
    (var,) = (var for var in ty.variants if var.name == v["tag"])
    if var.ty == UNIT:
        return {"tag": var.name, "value": {}}
    return {"tag": var.name, "value": js_value(var.ty, v["value"])}


# --- the message catalog -------------------------------------------------------------------------

PERSON: Final = product(id=U32, name=STRING)
SCORE: Final = product(id=U32, points=I64)  # fixed size: FixedSize(12) row lists


def row_list(ty: AlgebraicType, values: Iterable[Json]) -> m.BsatnRowList:
    """Rows encoded with our codec, hinted as the server would (FixedSize when lengths agree)."""
    return m.BsatnRowList.from_rows([CODEC.encode(ty, v) for v in values])


ALICE_BOB: Final = row_list(PERSON, [{"id": 1, "name": "Alice"}, {"id": 2, "name": "Bob"}])
CAROL: Final = row_list(PERSON, [{"id": 3, "name": "Carol"}])
SCORES: Final = row_list(SCORE, [{"id": 1, "points": -5}, {"id": 2, "points": I64_MAX}])
assert isinstance(ALICE_BOB.size_hint, m.RowOffsets)
assert isinstance(CAROL.size_hint, m.FixedSize)
assert isinstance(SCORES.size_hint, m.FixedSize)

QUERY_ROWS: Final = m.QueryRows(
    (
        m.SingleTableRows("person", ALICE_BOB),
        m.SingleTableRows("score", SCORES),
        m.SingleTableRows("person", CAROL),  # the same table may appear again (one per query)
        m.SingleTableRows("empty", m.EMPTY_ROWS),
    )
)
NO_ROWS: Final = m.QueryRows(())

TX: Final = m.TransactionUpdate(
    (
        m.QuerySetUpdate(
            1,
            (
                m.TableUpdate("person", (m.PersistentTableRows(ALICE_BOB, CAROL),)),
                m.TableUpdate("score", (m.PersistentTableRows(m.EMPTY_ROWS, SCORES),)),
                m.TableUpdate("chat_event", (m.EventTableRows(ALICE_BOB),)),
                m.TableUpdate(
                    "mixed",
                    (m.PersistentTableRows(SCORES, m.EMPTY_ROWS), m.EventTableRows(CAROL)),
                ),
                m.TableUpdate("nothing", ()),
            ),
        ),
        m.QuerySetUpdate(U32_MAX, ()),
    )
)
EMPTY_TX: Final = m.TransactionUpdate(())

SERVER_MESSAGES: Final[list[tuple[str, m.ServerMessage]]] = [
    ("InitialConnection", m.InitialConnection(IDENT, CONN, "tok")),
    (
        "InitialConnection-zero-long-token",
        m.InitialConnection("00" * 32, "ff" * 16, "eyJhbGciOiJFUzI1NiJ9." + "x" * 600 + ".sig"),
    ),
    ("SubscribeApplied", m.SubscribeApplied(1, 1, QUERY_ROWS)),
    ("SubscribeApplied-empty-max-ids", m.SubscribeApplied(U32_MAX, U32_MAX, NO_ROWS)),
    ("UnsubscribeApplied-Some", m.UnsubscribeApplied(3, 1, QUERY_ROWS)),
    ("UnsubscribeApplied-Some-empty", m.UnsubscribeApplied(4, 2, NO_ROWS)),
    ("UnsubscribeApplied-None", m.UnsubscribeApplied(5, 1, None)),
    ("SubscriptionError-None", m.SubscriptionError(None, 1, "bad")),
    ("SubscriptionError-Some", m.SubscriptionError(9, 1, "bad")),
    ("SubscriptionError-Some-0-unicode", m.SubscriptionError(0, 0, "no table «pérson» 🚫")),
    ("TransactionUpdate", TX),
    ("TransactionUpdate-empty", EMPTY_TX),
    ("OneOffQueryResult-Ok", m.OneOffQueryResult(4, rows=QUERY_ROWS)),
    ("OneOffQueryResult-Ok-empty", m.OneOffQueryResult(5, rows=NO_ROWS)),
    ("OneOffQueryResult-Err", m.OneOffQueryResult(6, error="no such table: `persons`")),
    ("ReducerResult-Ok", m.ReducerResult(2, TS, m.ReducerOk(b"", TX))),
    (
        "ReducerResult-Ok-ret-value",
        m.ReducerResult(3, -1, m.ReducerOk(CODEC.encode(I32, 42), EMPTY_TX)),
    ),
    ("ReducerResult-OkEmpty", m.ReducerResult(4, I64_MAX, m.ReducerOkEmpty())),
    ("ReducerResult-Err", m.ReducerResult(5, TS, m.ReducerErr(CODEC.encode(STRING, "boom")))),
    ("ReducerResult-Err-empty", m.ReducerResult(6, 0, m.ReducerErr(b""))),
    (
        "ReducerResult-InternalError",
        m.ReducerResult(7, I64_MIN, m.ReducerInternalError("reducer ran out of energy")),
    ),
    (
        "ProcedureResult-Returned",
        m.ProcedureResult(m.ProcedureReturned(CODEC.encode(I32, 42)), TS, 1500, 5),
    ),
    ("ProcedureResult-Returned-empty", m.ProcedureResult(m.ProcedureReturned(b""), 0, 0, 0)),
    (
        "ProcedureResult-InternalError",
        m.ProcedureResult(m.ProcedureInternalError("panic: ünïcode"), TS, I64_MAX, U32_MAX),
    ),
]

CLIENT_MESSAGES: Final[list[tuple[str, m.ClientMessage]]] = [
    ("Subscribe", m.Subscribe(1, 1, ("SELECT * FROM person",))),
    ("Subscribe-none", m.Subscribe(0, 0, ())),
    (
        "Subscribe-many-unicode-max-ids",
        m.Subscribe(U32_MAX, U32_MAX, ("SELECT * FROM person", "", "SELECT * FROM «t» WHERE name = 'ü🚀'")),
    ),
    ("Unsubscribe-SendDroppedRows", m.Unsubscribe(3, 1, send_dropped_rows=True)),
    ("Unsubscribe-Default", m.Unsubscribe(4, 2, send_dropped_rows=False)),
    ("OneOffQuery", m.OneOffQuery(4, "SELECT * FROM person")),
    ("OneOffQuery-empty", m.OneOffQuery(0, "")),
    ("CallReducer", m.CallReducer(2, "add", CODEC.encode(product(name=STRING), {"name": "Alice"}))),
    ("CallReducer-no-args", m.CallReducer(U32_MAX, "say_hello", b"")),
    ("CallProcedure", m.CallProcedure(5, "p", b"")),
    (
        "CallProcedure-args",
        m.CallProcedure(6, "get_thing", CODEC.encode(product(id=U64, q=STRING), {"id": 7, "q": "ü"})),
    ),
]


def sdk_can_encode(msg: m.ServerMessage) -> bool:
    """False only for Result errors, which the SDK's serializer cannot encode (module docstring)."""
    return not (isinstance(msg, m.OneOffQueryResult) and msg.error is not None)


# --- the row-type catalog ------------------------------------------------------------------------

INT_EXTREMES: Final[dict[str, list[int]]] = {
    "U8": [0, 1, 2**8 - 1],
    "I8": [-(2**7), -1, 0, 2**7 - 1],
    "U16": [0, 2**16 - 1],
    "I16": [-(2**15), -1, 2**15 - 1],
    "U32": [0, 2**32 - 1],
    "I32": [-(2**31), -1, 2**31 - 1],
    "U64": [0, 1, 2**53 - 1, 2**53, 2**53 + 1, 2**64 - 1],
    "I64": [-(2**63), -(2**53) - 1, -(2**53) + 1, -1, 0, 2**53, 2**63 - 1],
    "U128": [0, 2**64, 2**127, 2**128 - 1],
    "I128": [-(2**127), -(2**64), -1, 0, 2**127 - 1],
    "U256": [0, 2**128 + 12345, 2**255, 2**256 - 1],
    "I256": [-(2**255), -(2**128), -1, 0, 2**255 - 1],
}
INT_TYPES: Final = {"U8": U8, "I8": I8, "U16": U16, "I16": I16, "U32": U32, "I32": I32, "U64": U64,
                    "I64": I64, "U128": U128, "I128": I128, "U256": U256, "I256": I256}  # fmt: skip

F32_VALUES: Final[list[float | str]] = [
    0.0, -0.0, 1.5, -2.25, 0.10000000149011612,  # 0.1 rounded to f32, so it round-trips
    3.4028234663852886e38, -3.4028234663852886e38,  # f32 max
    1.1754943508222875e-38, 1.401298464324817e-45,  # smallest normal, smallest subnormal
    "NaN", "Infinity", "-Infinity",
]  # fmt: skip
F64_VALUES: Final[list[float | str]] = [
    0.0, -0.0, 0.1, math.pi, -1e300, 1.7976931348623157e308, 2.2250738585072014e-308, 5e-324,
    9007199254740993.0, "NaN", "Infinity", "-Infinity",
]  # fmt: skip

ALL_FIXED: Final = product(
    a=U8, b=I8, c=U16, d=I16, e=U32, f=I32, g=U64, h=I64, i=U128, j=I128, k=U256, l=I256,
    m=F32, n=F64, o=BOOL,
)  # fmt: skip
SHAPE: Final = sum_of(Circle=F64, Rect=product(w=U32, h=U32), Empty=UNIT, Label=STRING)
COLOR: Final = sum_of(Red=UNIT, Green=UNIT, Blue=UNIT)
NESTED: Final = product(
    a=U8,
    inner=product(b=STRING, c=product(d=BOOL, e=ArrayT(F64))),
    f=option(product(g=U64, h=IDENTITY)),
)
TASK: Final = product(id=U64, owner=IDENTITY, tenant_id=STRING, title=STRING, updated_at=TIMESTAMP, done=BOOL)


def col(ty: AlgebraicType, values: Iterable[Json]) -> tuple[Product, list[Json]]:
    """A one-column row type ``{v: ty}`` and one row per value."""
    return product(v=ty), [{"v": v} for v in values]


ROW_CASES: Final[dict[str, tuple[Product, list[Json]]]] = {
    **{name: col(INT_TYPES[name], [safe_int(x) for x in xs]) for name, xs in INT_EXTREMES.items()},
    "F32": col(F32, F32_VALUES),
    "F64": col(F64, F64_VALUES),
    "Bool": col(BOOL, [True, False]),
    "String": col(
        STRING,
        [
            "",
            "hello",
            "héllo wörld",
            "🚀 emoji",
            "日本語テキスト",
            "nul\x00inside",
            'quote" back\\slash\nnewline\ttab',
            "x" * 1000,
        ],
    ),
    "Bytes": col(BYTES, ["", "00", "00ff7f80", bytes(range(256)).hex()]),
    "Array<U32>": col(ArrayT(U32), [[], [1, 2, 3], [U32_MAX]]),
    "Array<U64>": col(ArrayT(U64), [[], [0, safe_int(2**64 - 1)]]),
    "Array<String>": col(ArrayT(STRING), [[], ["a", "", "ü"]]),
    "Array<Array<I16>>": col(ArrayT(ArrayT(I16)), [[], [[], [1, -1], [32767, -32768]]]),
    "Array<Product>": col(ArrayT(product(x=I32, y=STRING)), [[], [{"x": -1, "y": "a"}, {"x": 2, "y": ""}]]),
    "Array<Option<U8>>": col(ArrayT(option(U8)), [[1, None, 3], []]),
    "Array<Identity>": col(ArrayT(IDENTITY), [[IDENT, "00" * 32]]),
    "Array<Bytes>": col(ArrayT(BYTES), [["", "ff"]]),
    # A unit column next to a real one: a row of zero bytes cannot be split "until the data is
    # used up" (neither by the SDK nor by ValueCodec.decode_rows; the server hints RowOffsets).
    "Unit": (product(u=UNIT, x=U8), [{"u": {}, "x": 1}, {"u": {}, "x": 2}]),
    "NestedProduct": (
        NESTED,
        [
            {"a": 1, "inner": {"b": "x", "c": {"d": True, "e": [1.5, -0.0]}}, "f": None},
            {"a": 255, "inner": {"b": "", "c": {"d": False, "e": []}}, "f": {"g": 7, "h": IDENT}},
        ],
    ),
    "Sum": col(
        SHAPE,
        [
            {"tag": "Circle", "value": 1.5},
            {"tag": "Rect", "value": {"w": 1, "h": U32_MAX}},
            {"tag": "Empty"},
            {"tag": "Label", "value": "ü"},
        ],
    ),
    "SimpleEnum": col(COLOR, [{"tag": "Red"}, {"tag": "Green"}, {"tag": "Blue"}]),
    "Option<U32>": col(option(U32), [5, None, 0]),
    "Option<String>": col(option(STRING), ["x", None, ""]),
    "Option<Identity>": col(option(IDENTITY), [IDENT, None]),
    "Option<Product>": col(option(product(a=U8, b=STRING)), [{"a": 1, "b": "z"}, None]),
    "Option<Sum>": col(option(SHAPE), [{"tag": "Empty"}, None]),
    # Some(None) is not representable in the SDK (module docstring).
    "Option<Option<U8>>": col(option(option(U8)), [{"some": 3}, None]),
    "Identity": col(IDENTITY, ["00" * 32, "ff" * 32, IDENT, "00" * 31 + "01"]),
    "ConnectionId": col(CONNECTION_ID, ["00" * 16, CONN, "ff" * 16]),
    "Timestamp": col(TIMESTAMP, [0, TS, -1, safe_int(I64_MIN), safe_int(I64_MAX), 2**53 - 1]),
    "TimeDuration": col(TIME_DURATION, [0, 1500, -1500, safe_int(I64_MAX), safe_int(I64_MIN)]),
    "Uuid": col(
        UUID,
        [
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "6d4b5430-00cf-4a99-932c-ad2d07bab841",
            "0192d1a4-7b3c-7def-8000-0123456789ab",
        ],
    ),
    "ScheduleAt": col(
        SCHEDULE_AT,
        [
            {"tag": "Interval", "value": 1500},
            {"tag": "Time", "value": TS},
            {"tag": "Interval", "value": safe_int(I64_MAX)},
        ],
    ),
    "Result<U32,String>": col(result(U32, STRING), [{"ok": 7}, {"err": "bad"}]),
    "Result<String,String>": col(result(STRING, STRING), [{"ok": "fine"}, {"err": "bad"}]),
    "AllFixedWidth-min": (
        ALL_FIXED,
        [
            {
                "a": 0,
                "b": -128,
                "c": 0,
                "d": -32768,
                "e": 0,
                "f": -(2**31),
                "g": 0,
                "h": safe_int(I64_MIN),
                "i": 0,
                "j": safe_int(-(2**127)),
                "k": 0,
                "l": safe_int(-(2**255)),
                "m": -3.4028234663852886e38,
                "n": -1.7976931348623157e308,
                "o": False,
            }
        ],
    ),
    "AllFixedWidth-max": (
        ALL_FIXED,
        [
            {
                "a": 255,
                "b": 127,
                "c": 65535,
                "d": 32767,
                "e": U32_MAX,
                "f": 2**31 - 1,
                "g": safe_int(2**64 - 1),
                "h": safe_int(I64_MAX),
                "i": safe_int(2**128 - 1),
                "j": safe_int(2**127 - 1),
                "k": safe_int(2**256 - 1),
                "l": safe_int(2**255 - 1),
                "m": "Infinity",
                "n": "NaN",
                "o": True,
            }
        ],
    ),
    "RealisticTask": (
        TASK,
        [
            {
                "id": i,
                "owner": IDENT,
                "tenant_id": f"tenant-{i % 7}",
                "title": f"Task number {i} ü",
                "updated_at": TS + i,
                "done": i % 2 == 0,
            }
            for i in range(5)
        ],
    ),
}


def sdk_can_encode_row(ty: Product, row: Json) -> bool:
    """Rows with a Result ``err`` whose err type differs from the ok type hit the SDK bug."""
    for e in ty.elements:
        if (
            special_kind(e.ty) == "result"
            and isinstance(e.ty, Sum)
            and "err" in row[e.name]
            and e.ty.variants[0].ty != e.ty.variants[1].ty
        ):
            return False
    return True


# --- one Node run for everything -----------------------------------------------------------------


def build_cases() -> list[dict[str, Json]]:
    cases: list[dict[str, Json]] = []
    for name, smsg in SERVER_MESSAGES:
        cases.append(
            {
                "id": f"srv-decode/{name}",
                "op": "decode",
                "codec": "ServerMessage",
                "hex": m.encode_server_message(smsg).hex(),
                "reencode": sdk_can_encode(smsg),
            }
        )
        cases.append(
            {
                "id": f"srv-encode/{name}",
                "op": "encode",
                "codec": "ServerMessage",
                "value": js_server(smsg),
            }
        )
    # A v3 payload body: every message back to back; the SDK loops while bytes remain.
    cases.append(
        {
            "id": "srv-decode-many/v3-body",
            "op": "decode_many",
            "codec": "ServerMessage",
            "hex": b"".join(m.encode_server_message(s) for _, s in SERVER_MESSAGES).hex(),
        }
    )
    for name, cmsg in CLIENT_MESSAGES:
        cases.append(
            {
                "id": f"cli-decode/{name}",
                "op": "decode",
                "codec": "ClientMessage",
                "hex": m.encode_client_message(cmsg).hex(),
                "reencode": True,
            }
        )
        cases.append(
            {
                "id": f"cli-encode/{name}",
                "op": "encode",
                "codec": "ClientMessage",
                "value": js_client(cmsg),
            }
        )
    for name, (ty, rows) in ROW_CASES.items():
        sats = {"sats": type_to_json(ty)}
        cases.append(
            {
                "id": f"row-decode/{name}",
                "op": "decode_many",
                "codec": sats,
                "hex": b"".join(CODEC.encode(ty, r) for r in rows).hex(),
            }
        )
        cases.append(
            {
                "id": f"row-encode/{name}",
                "op": "encode_many",
                "codec": sats,
                "values": [js_value(ty, r) for r in rows if sdk_can_encode_row(ty, r)],
            }
        )
    return cases


@pytest.fixture(scope="module")
def sdk() -> dict[str, dict[str, Json]]:
    """Results of the SDK for every case, by id (one Node process for the whole module)."""
    cases = build_cases()
    try:
        out = run_node_script(TS_SDK_DIR / "codec_check.mjs", json.dumps({"cases": cases}))
    except HarnessError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:  # fail, never skip: a silently skipped fidelity check is worse than none
        pytest.fail(f"TypeScript SDK harness unavailable: {problem}", pytrace=False)
    results = {r["id"]: r for r in json.loads(out)["results"]}
    assert set(results) == {c["id"] for c in cases}
    return results


def ok(res: dict[str, Json], what: str) -> dict[str, Json]:
    assert res["error"] is None, f"the SDK failed on {what}: {res['error']}"
    return res


# --- (a) Python encodes, the SDK decodes ---------------------------------------------------------


@pytest.mark.parametrize(("name", "msg"), SERVER_MESSAGES, ids=[n for n, _ in SERVER_MESSAGES])
def test_server_message_python_to_sdk(
    sdk: dict[str, dict[str, Json]], name: str, msg: m.ServerMessage
) -> None:
    ours = m.encode_server_message(msg)
    res = ok(sdk[f"srv-decode/{name}"], f"decoding our {name} ({ours.hex()})")
    assert res["remaining"] == 0, f"the SDK left {res['remaining']} bytes of our {name}"
    assert res["value"] == js_server(msg)
    if sdk_can_encode(msg):
        assert res["reencoded"] == ours.hex(), "the SDK re-encoded our message differently"
    else:
        # SDK bug: its Result serializer encodes `err` with the ok type (module docstring).
        assert res["reencoded"] is None


def test_v3_body_of_all_server_messages(sdk: dict[str, dict[str, Json]]) -> None:
    res = ok(sdk["srv-decode-many/v3-body"], "a v3 body of every message")
    assert res["values"] == [js_server(s) for _, s in SERVER_MESSAGES]
    assert res["remaining"] == 0


@pytest.mark.parametrize(("name", "msg"), CLIENT_MESSAGES, ids=[n for n, _ in CLIENT_MESSAGES])
def test_client_message_python_to_sdk(
    sdk: dict[str, dict[str, Json]], name: str, msg: m.ClientMessage
) -> None:
    ours = m.encode_client_message(msg)
    res = ok(sdk[f"cli-decode/{name}"], f"decoding our {name} ({ours.hex()})")
    assert res["remaining"] == 0, f"the SDK left {res['remaining']} bytes of our {name}"
    assert res["value"] == js_client(msg)
    assert res["reencoded"] == ours.hex(), "the SDK re-encoded our message differently"


# --- (b) the SDK encodes, Python decodes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "msg"),
    [(n, s) for n, s in SERVER_MESSAGES if sdk_can_encode(s)],
    ids=[n for n, s in SERVER_MESSAGES if sdk_can_encode(s)],
)
def test_server_message_sdk_to_python(
    sdk: dict[str, dict[str, Json]], name: str, msg: m.ServerMessage
) -> None:
    res = ok(sdk[f"srv-encode/{name}"], f"encoding {name}")
    theirs = bytes.fromhex(res["hex"])
    r = Reader(theirs)
    assert m.decode_server_message(r) == msg
    assert r.remaining() == 0
    assert m.decode_server_payload(b"\x00" + theirs, m.Protocol.V2) == [msg]
    assert theirs == m.encode_server_message(msg)


def test_sdk_result_err_encoder_bug_is_still_there(sdk: dict[str, dict[str, Json]]) -> None:
    """spacetimedb@2.10.1 `SumType.makeSerializer` (src/lib/algebraic_type.ts): for `ok`/`err` sums
    `serializeErr` is built from `ty.variants[0]` (the ok type), so the err string is fed to the
    QueryRows serializer and it throws. If this test fails after an SDK bump, the bug is fixed:
    drop `sdk_can_encode`/`sdk_can_encode_row` and check these encodings too."""
    res = sdk["srv-encode/OneOffQueryResult-Err"]
    assert res["error"] is not None, "the SDK now encodes Result errors: remove the workaround"
    assert "length" in res["error"]


@pytest.mark.parametrize(("name", "msg"), CLIENT_MESSAGES, ids=[n for n, _ in CLIENT_MESSAGES])
def test_client_message_sdk_to_python(
    sdk: dict[str, dict[str, Json]], name: str, msg: m.ClientMessage
) -> None:
    res = ok(sdk[f"cli-encode/{name}"], f"encoding {name}")
    theirs = bytes.fromhex(res["hex"])
    r = Reader(theirs)
    assert m.decode_client_message(r) == msg
    assert r.remaining() == 0
    assert m.decode_client_payload(theirs, m.Protocol.V2) == [msg]
    assert theirs == m.encode_client_message(msg)


# --- (c) rows of every type family, both directions ----------------------------------------------


@pytest.mark.parametrize("name", list(ROW_CASES))
def test_rows_python_to_sdk(sdk: dict[str, dict[str, Json]], name: str) -> None:
    ty, rows = ROW_CASES[name]
    res = ok(sdk[f"row-decode/{name}"], f"decoding our {name} rows")
    assert res["remaining"] == 0
    assert res["values"] == [js_value(ty, r) for r in rows]


@pytest.mark.parametrize("name", list(ROW_CASES))
def test_rows_sdk_to_python(sdk: dict[str, dict[str, Json]], name: str) -> None:
    ty, rows = ROW_CASES[name]
    rows = [r for r in rows if sdk_can_encode_row(ty, r)]
    res = ok(sdk[f"row-encode/{name}"], f"encoding {name} rows")
    theirs = bytes.fromhex(res["hex"])
    values, raws = CODEC.decode_rows(ty, theirs)
    assert values == rows
    assert raws == [CODEC.encode(ty, r) for r in rows]
    assert theirs == b"".join(raws)
    # -0.0 == 0.0 in Python, so check the sign of zeros through the bytes as well as the values.
    assert json.dumps(values) == json.dumps(rows)


@pytest.mark.timeout(10)
def test_zero_byte_rows_are_an_error_not_a_hang() -> None:
    """Rows are split by decoding until the data is used up, as the SDK does (``#parseRowList``:
    ``while (reader.remaining > 0)``). A row type that encodes to zero bytes never advances: the
    SDK loops forever on non-empty data for it (seen with spacetimedb@2.10.1: 10^6 iterations of
    ``t.row({}).deserialize``, 1 byte still left), and ``ValueCodec.decode_rows`` did too, growing
    its lists without bound. It now raises."""
    with pytest.raises(DecodeError, match="zero bytes long"):
        CODEC.decode_rows(product(), b"\x00")
    with pytest.raises(DecodeError, match="zero bytes long"):
        CODEC.decode_rows(product(u=UNIT), b"\x00\x00")
    assert CODEC.decode_rows(product(), b"") == ([], [])
