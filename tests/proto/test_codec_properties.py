"""Hypothesis round trips over generated types and values for the whole codec."""

from __future__ import annotations

import contextlib
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from gatewayd.errors import DecodeError, EncodeError
from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import MAX_SAFE_INT, Reader, ValueCodec
from gatewayd.proto.sats import (
    BYTES,
    CONNECTION_ID,
    F32,
    F64,
    IDENTITY,
    SCHEDULE_AT,
    STRING,
    TIME_DURATION,
    TIMESTAMP,
    UNIT,
    UUID,
    AlgebraicType,
    ArrayT,
    Element,
    Prim,
    Product,
    Ref,
    Sum,
    Typespace,
    option,
    result,
    type_from_json,
    type_to_json,
)

INT_NAMES = ["U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "U128", "I128", "U256", "I256"]
LEAVES: list[AlgebraicType] = [
    *(Prim(n) for n in INT_NAMES),  # type: ignore[arg-type]
    Prim("Bool"),
    F32,
    F64,
    STRING,
    BYTES,
    IDENTITY,
    CONNECTION_ID,
    TIMESTAMP,
    TIME_DURATION,
    UUID,
    SCHEDULE_AT,
]

names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)


def _product(children: st.SearchStrategy[AlgebraicType]) -> st.SearchStrategy[AlgebraicType]:
    named = st.lists(st.tuples(names, children), max_size=4, unique_by=lambda t: t[0]).map(
        lambda fs: Product(tuple(Element(n, t) for n, t in fs))
    )
    unnamed = st.lists(children, min_size=1, max_size=3).map(
        lambda ts: Product(tuple(Element(None, t) for t in ts))
    )
    return named | unnamed


def _sum(children: st.SearchStrategy[AlgebraicType]) -> st.SearchStrategy[AlgebraicType]:
    variant = st.tuples(names, children | st.just(UNIT))
    return st.lists(variant, min_size=1, max_size=4, unique_by=lambda t: t[0]).map(
        lambda vs: Sum(tuple(Element(n, t) for n, t in vs))
    )


types: st.SearchStrategy[AlgebraicType] = st.recursive(
    st.sampled_from(LEAVES),
    lambda children: (
        children.map(ArrayT)
        | children.map(option)
        | st.tuples(children, children).map(lambda ab: result(*ab))
        | _product(children)
        | _sum(children)
    ),
    max_leaves=12,
)

_RANGES = {
    n: ((0, 2 ** (8 * s) - 1) if n[0] == "U" else (-(2 ** (8 * s - 1)), 2 ** (8 * s - 1) - 1))
    for n, s in zip(INT_NAMES, [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32], strict=True)
}


def _safe(v: int) -> int | str:
    return v if -MAX_SAFE_INT <= v <= MAX_SAFE_INT else str(v)


def values(ts: Typespace, ty: AlgebraicType, depth: int = 0) -> st.SearchStrategy[Any]:
    """A strategy for JSON-ready values of ``ty`` (the shape decode produces)."""
    from gatewayd.proto.sats import special_kind

    ty = ts.resolve(ty)
    kind = special_kind(ty)
    if isinstance(ty, Prim):
        if ty.name in _RANGES:
            lo, hi = _RANGES[ty.name]
            return st.integers(lo, hi).map(_safe)
        if ty.name == "Bool":
            return st.booleans()
        if ty.name == "String":
            return st.text(max_size=20)
        floats = (
            st.floats(width=32, allow_nan=False, allow_infinity=False)
            if ty.name == "F32"
            else st.floats(allow_nan=False, allow_infinity=False)
        )
        return floats | st.sampled_from(["Infinity", "-Infinity"])
    if kind == "identity":
        return st.binary(min_size=32, max_size=32).map(bytes.hex)
    if kind == "connection_id":
        return st.binary(min_size=16, max_size=16).map(bytes.hex)
    if kind in ("timestamp", "time_duration"):
        return st.integers(-(2**63), 2**63 - 1).map(_safe)
    if kind == "uuid":
        return st.uuids().map(str)
    if kind == "bytes":
        return st.binary(max_size=16).map(bytes.hex)
    if isinstance(ty, ArrayT):
        if depth > 6:
            return st.just([])
        return st.lists(st.deferred(lambda: values(ts, ty.elem, depth + 1)), max_size=3)
    if isinstance(ty, Product):
        fields = [st.deferred(lambda e=e: values(ts, e.ty, depth + 1)) for e in ty.elements]  # type: ignore[misc]
        if ty.elements and all(e.name is None for e in ty.elements):
            return st.tuples(*fields).map(list)
        keys = [e.name if e.name is not None else str(i) for i, e in enumerate(ty.elements)]
        return st.tuples(*fields).map(lambda vs: dict(zip(keys, vs, strict=True)))
    assert isinstance(ty, Sum)
    if kind == "option":
        inner = values(ts, ty.variants[0].ty, depth + 1)
        if special_kind(ts.resolve(ty.variants[0].ty)) == "option":
            inner = inner.map(lambda v: {"some": v})
        return st.none() | inner if depth < 6 else st.none()
    if kind == "result":
        return values(ts, ty.variants[0].ty, depth + 1).map(lambda v: {"ok": v}) | values(
            ts, ty.variants[1].ty, depth + 1
        ).map(lambda v: {"err": v})

    def tagged(name: str | None) -> Any:
        return lambda v: {"tag": name, "value": v}

    options: list[st.SearchStrategy[Any]] = []
    for var in ty.variants:
        vt = ts.resolve(var.ty)
        name = var.name
        if isinstance(vt, Product) and not vt.elements:
            options.append(st.just({"tag": name}))
        elif depth < 6:
            options.append(values(ts, vt, depth + 1).map(tagged(name)))
    return st.one_of(options) if options else st.just({"tag": ty.variants[0].name})


@st.composite
def type_and_value(draw: st.DrawFn) -> tuple[AlgebraicType, Any]:
    ty = draw(types)
    return ty, draw(values(Typespace(), ty))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(type_and_value())
def test_value_round_trip(tv: tuple[AlgebraicType, Any]) -> None:
    ty, value = tv
    codec = ValueCodec()
    encoded = codec.encode(ty, value)
    decoded = codec.decode(ty, encoded)
    assert codec.encode(ty, decoded) == encoded  # bytes are the ground truth (floats, -0.0)
    assert decoded == value or _float_equivalent(decoded, value)
    assert codec.decode_slow(ty, encoded) == decoded or _float_equivalent(decoded, value)
    # The SATS-JSON type description round-trips too.
    assert type_from_json(type_to_json(ty)) == ty


def _float_equivalent(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, int | float):
        return a == float(b) or (a != a and b != b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_float_equivalent(a[k], b[k]) or a[k] == b[k] for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_float_equivalent(x, y) or x == y for x, y in zip(a, b, strict=True))
    return False


@settings(max_examples=200, deadline=None)
@given(types, st.binary(max_size=64))
def test_decoding_arbitrary_bytes_only_raises_decode_error(ty: AlgebraicType, data: bytes) -> None:
    codec = ValueCodec()
    with contextlib.suppress(DecodeError):
        codec.decode(ty, data)
    with contextlib.suppress(DecodeError):
        codec.decode_rows(ty, data)


# A recursive type through the typespace: a linked list of i32.
LINKED = Typespace([Product((Element("value", Prim("I32")), Element("next", option(Ref(0)))))])


@st.composite
def linked_values(draw: st.DrawFn) -> Any:
    items = draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=30))
    node: Any = None
    for v in reversed(items):
        node = {"value": v, "next": node}
    return node


@given(linked_values())
def test_recursive_refs_round_trip(value: Any) -> None:
    codec = ValueCodec(LINKED)
    encoded = codec.encode(Ref(0), value)
    assert codec.decode(Ref(0), encoded) == value
    assert codec.decode_slow(Ref(0), encoded) == value


def test_big_integers_travel_as_exact_decimal_strings() -> None:
    codec = ValueCodec()
    u64 = Prim("U64")
    assert codec.decode(u64, codec.encode(u64, 2**53 - 1)) == 2**53 - 1
    assert codec.decode(u64, codec.encode(u64, 2**53)) == "9007199254740992"
    assert codec.decode(u64, codec.encode(u64, "18446744073709551615")) == "18446744073709551615"
    i256 = Prim("I256")
    assert codec.decode(i256, codec.encode(i256, str(-(2**255)))) == str(-(2**255))
    # Native mode keeps ints (for code that compares values).
    assert ValueCodec(safe=False).decode(u64, codec.encode(u64, 2**60)) == 2**60


@pytest.mark.parametrize(
    ("ty", "value", "message"),
    [
        (Prim("U8"), 256, "value: 256 is out of range for U8"),
        (Prim("U64"), -1, "out of range for U64"),
        (Prim("I32"), True, "expected an integer (I32), got a boolean"),
        (Prim("U64"), "12x", "decimal string"),
        (Prim("Bool"), 1, "expected a boolean, got a number"),
        (STRING, None, "expected a string, got null"),
        (IDENTITY, "abc", "expected an Identity (64 hex chars) as a hex string"),
        (TIMESTAMP, "2026-01-01T00:00:00", "needs a timezone"),
        (
            Product((Element("title", STRING), Element("n", Prim("U32")))),
            {"title": "x", "n": 1, "tenant_id": "t"},
            "value: unknown field 'tenant_id' (expected title, n)",
        ),
        (
            Product((Element("items", ArrayT(Product((Element("title", STRING),)))),)),
            {"items": [{"title": "a"}, {"title": 5}]},
            "value.items[1].title: expected a string, got a number",
        ),
        (Product((Element("a", STRING),)), {}, "value.a: missing required field"),
        (SCHEDULE_AT, {"tag": "Later", "value": 1}, "unknown variant 'Later'"),
    ],
)
def test_encode_errors_name_the_field(ty: AlgebraicType, value: Any, message: str) -> None:
    with pytest.raises(EncodeError) as info:
        ValueCodec().encode(ty, value)
    assert message in str(info.value)


def test_encode_accepts_conveniences() -> None:
    codec = ValueCodec()
    assert codec.decode(TIMESTAMP, codec.encode(TIMESTAMP, "1970-01-01T00:00:01.5Z")) == 1_500_000
    opt = Product((Element("a", STRING), Element("b", option(STRING))))
    assert codec.decode(opt, codec.encode(opt, {"a": "x"})) == {"a": "x", "b": None}
    enum = Sum((Element("Red", UNIT), Element("Blue", UNIT)))
    assert codec.decode(enum, codec.encode(enum, "Blue")) == {"tag": "Blue"}


def test_decode_errors_name_the_field_and_offset() -> None:
    row = Product((Element("id", Prim("U64")), Element("title", STRING), Element("done", Prim("Bool"))))
    codec = ValueCodec()
    good = codec.encode(row, {"id": 1, "title": "hé", "done": True})
    with pytest.raises(DecodeError, match=r"invalid bool byte 0x02 .*at value\.done, byte 15"):
        codec.decode(row, good[:-1] + b"\x02")
    with pytest.raises(DecodeError, match=r"invalid UTF-8 .*at value\.title"):
        codec.decode(row, good[:12] + b"\xff" + good[13:])
    with pytest.raises(DecodeError, match=r"declared string length 4294967295 exceeds"):
        codec.decode(row, good[:8] + b"\xff\xff\xff\xff" + good[12:])
    with pytest.raises(DecodeError, match="trailing"):
        codec.decode(row, good + b"\x00")


# --- messages ----------------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
short_text = st.text(max_size=12)
row_lists = st.lists(st.binary(max_size=12), max_size=4).map(m.BsatnRowList.from_rows)
query_rows = st.lists(st.builds(m.SingleTableRows, short_text, row_lists), max_size=3).map(
    lambda ts: m.QueryRows(tuple(ts))
)
table_rows = st.builds(m.PersistentTableRows, row_lists, row_lists) | st.builds(m.EventTableRows, row_lists)
tx_updates = st.lists(
    st.builds(
        m.QuerySetUpdate,
        u32,
        st.lists(
            st.builds(m.TableUpdate, short_text, st.lists(table_rows, max_size=2).map(tuple)), max_size=2
        ).map(tuple),
    ),
    max_size=2,
).map(lambda qs: m.TransactionUpdate(tuple(qs)))
i64 = st.integers(-(2**63), 2**63 - 1)
hex32 = st.binary(min_size=32, max_size=32).map(bytes.hex)
hex16 = st.binary(min_size=16, max_size=16).map(bytes.hex)

server_messages = st.one_of(
    st.builds(m.InitialConnection, hex32, hex16, short_text),
    st.builds(m.SubscribeApplied, u32, u32, query_rows),
    st.builds(m.UnsubscribeApplied, u32, u32, st.none() | query_rows),
    st.builds(m.SubscriptionError, st.none() | u32, u32, short_text),
    tx_updates,
    st.builds(m.OneOffQueryResult, u32, query_rows),
    st.builds(lambda r, e: m.OneOffQueryResult(r, error=e), u32, short_text),
    st.builds(
        m.ReducerResult,
        u32,
        i64,
        st.one_of(
            st.builds(m.ReducerOk, st.binary(max_size=8), tx_updates),
            st.just(m.ReducerOkEmpty()),
            st.builds(m.ReducerErr, st.binary(max_size=8)),
            st.builds(m.ReducerInternalError, short_text),
        ),
    ),
    st.builds(
        m.ProcedureResult,
        st.builds(m.ProcedureReturned, st.binary(max_size=8))
        | st.builds(m.ProcedureInternalError, short_text),
        i64,
        i64,
        u32,
    ),
)
client_messages = st.one_of(
    st.builds(m.Subscribe, u32, u32, st.lists(short_text, max_size=3).map(tuple)),
    st.builds(m.Unsubscribe, u32, u32, st.booleans()),
    st.builds(m.OneOffQuery, u32, short_text),
    st.builds(m.CallReducer, u32, short_text, st.binary(max_size=16)),
    st.builds(m.CallProcedure, u32, short_text, st.binary(max_size=16)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(server_messages, min_size=1, max_size=4), st.sampled_from(list(m.Compression)))
def test_server_messages_round_trip_through_v3_payloads(
    msgs: list[m.ServerMessage], comp: m.Compression
) -> None:
    payload = m.encode_server_payload(msgs, m.Protocol.V3, comp)
    assert m.decode_server_payload(payload, m.Protocol.V3) == msgs
    for msg in msgs:
        assert m.decode_server_payload(m.encode_server_payload([msg], m.Protocol.V2), m.Protocol.V2) == [msg]


@settings(max_examples=300, deadline=None)
@given(st.lists(client_messages, min_size=1, max_size=4))
def test_client_messages_round_trip(msgs: list[m.ClientMessage]) -> None:
    (frame,) = m.ClientFramer(m.Protocol.V3).frames(msgs)
    assert m.decode_client_payload(frame, m.Protocol.V3) == msgs
    for msg in msgs:
        r = Reader(m.encode_client_message(msg))
        assert m.decode_client_message(r) == msg
        assert r.remaining() == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([m.Protocol.V2, m.Protocol.V3]))
def test_arbitrary_payloads_only_raise_decode_error(data: bytes, protocol: m.Protocol) -> None:
    with contextlib.suppress(DecodeError):
        m.decode_server_payload(data, protocol)
    with contextlib.suppress(DecodeError):
        m.decode_client_payload(data, protocol)


def test_compression_envelope() -> None:
    msg = m.SubscriptionError(None, 1, "x" * 5000)
    for comp, tag in ((m.Compression.GZIP, 2), (m.Compression.BROTLI, 1), (m.Compression.NONE, 0)):
        payload = m.encode_server_payload([msg], m.Protocol.V2, comp)
        assert payload[0] == tag
        assert m.decode_server_payload(payload, m.Protocol.V2) == [msg]
    small = m.encode_server_payload([m.SubscriptionError(None, 1, "x")], m.Protocol.V2, m.Compression.GZIP)
    assert small[0] == 0  # at or under 1,024 bytes the server never compresses
    # A decompression bomb is refused before it is fully expanded.
    bomb = m.wrap_server_body(b"\x03" + b"\x00" * (10 * 1024 * 1024), m.Compression.GZIP)
    assert len(bomb) < 64_000  # ~230x smaller than what it expands to
    with pytest.raises(DecodeError, match="expands past"):
        m.decode_server_payload(bomb, m.Protocol.V2, max_decompressed_bytes=1024 * 1024)
    with pytest.raises(DecodeError, match="empty v3 payload"):
        m.decode_server_payload(b"\x00", m.Protocol.V3)


def test_row_list_size_hints() -> None:
    assert m.BsatnRowList.from_rows([b"ab", b"cd"]).size_hint == m.FixedSize(2)
    varied = m.BsatnRowList.from_rows([b"a", b"bcd", b""])
    assert varied.size_hint == m.RowOffsets((0, 1, 4))
    assert varied.split() == [b"a", b"bcd", b""]
    assert m.BsatnRowList.from_rows([]).size_hint == m.RowOffsets(())
    with pytest.raises(DecodeError, match="not a multiple"):
        m.BsatnRowList(m.FixedSize(3), b"abcd").split()
    with pytest.raises(DecodeError, match="out of order"):
        m.BsatnRowList(m.RowOffsets((0, 5, 2)), b"abcdef").split()
