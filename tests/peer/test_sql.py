"""The subscription SQL subset: every operator, literals of every column type, errors."""

from __future__ import annotations

from typing import Any

import pytest

from gatewayd.peer import Module
from gatewayd.peer.database import PeerDatabase
from gatewayd.peer.sql import SqlError, parse_query, split_statements

from .test_module_api import ALICE, ALL_TYPES, BOB, ROW

ROW2 = dict(ROW, b=False, u8=0, i8=5, u16=7, i16=3, u32=1, i32=2, u64=10, i64=0, u128=5, i128=5,
            u256=5, i256=5, f32=0.5, f64=3.0, s="abc", bytes="0100", ident=BOB, conn="00" * 15 + "01",
            ts=1_600_000_000_000_000, dur=10, uuid="00000000-0000-0000-0000-000000000001",
            opt=7)  # fmt: skip


@pytest.fixture(scope="module")
def db() -> PeerDatabase:
    mod = Module("types")
    mod.table("t", ALL_TYPES)
    mod.table("k", {"id": ALL_TYPES["u32"], "owner": ALL_TYPES["ident"]}, primary_key="id")
    d = PeerDatabase(mod)
    d.transact(lambda v: (v.t.insert(ROW), v.t.insert(ROW2)))
    return d


def matches(db: PeerDatabase, where: str, *, sender: str | None = ALICE) -> list[str]:
    q = parse_query(f"SELECT * FROM t WHERE {where}", db.schema, sender=sender)
    return sorted(
        "ROW" if r["u8"] == 255 else "ROW2" for r in db.store.tables["t"].rows.values() if q.matches(r)
    )


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("u8 = 255", ["ROW"]),
        ("u8 != 255", ["ROW2"]),
        ("u8 <> 255", ["ROW2"]),
        ("u8 < 255", ["ROW2"]),
        ("u8 <= 255", ["ROW", "ROW2"]),
        ("u8 > 0", ["ROW"]),
        ("u8 >= 0", ["ROW", "ROW2"]),
        ("255 = u8", ["ROW"]),
        ("0 < u8", ["ROW"]),
        ("b = true", ["ROW"]),
        ("b", ["ROW"]),
        ("b = false", ["ROW2"]),
        ("i8 = -128", ["ROW"]),
        ("i16 < 0", ["ROW"]),
        ("i32 = -2147483648", ["ROW"]),
        ("u64 = 18446744073709551615", ["ROW"]),
        ("i64 < -9000000000000000000", ["ROW"]),
        ("u128 > 1e3", ["ROW"]),
        ("i128 < 0", ["ROW"]),
        ("u256 = 115792089237316195423570985008687907853269984665640564039457584007913129639935", ["ROW"]),
        ("i256 < 0", ["ROW"]),
        ("f32 = 1.5", ["ROW"]),
        ("f64 < 0", ["ROW"]),
        ("f64 >= 30e-1", ["ROW2"]),
        ("s = 'héllo'", ["ROW"]),
        ("s > 'b'", ["ROW"]),
        ("bytes = 0x00ff", ["ROW"]),
        ("bytes = X'0100'", ["ROW2"]),
        ("ident = :sender", ["ROW"]),
        (f"ident = 0x{BOB}", ["ROW2"]),
        (f"ident = '{ALICE}'", ["ROW"]),
        ("conn = 0x01", ["ROW2"]),
        ("ts = 1700000000000000", ["ROW"]),
        ("ts < '2021-01-01T00:00:00Z'", ["ROW2"]),
        ("ts > '2023-11-14T22:13:19.999999+00:00'", ["ROW"]),
        ("dur = -5", ["ROW"]),
        ("uuid = '12345678-1234-5678-1234-567812345678'", ["ROW"]),
        ("opt = 7", ["ROW2"]),
        ("opt != 7", []),  # None matches no comparison
        ("u8 = 255 AND b", ["ROW"]),
        ("u8 = 0 OR s = 'héllo'", ["ROW", "ROW2"]),
        ("(u8 = 0 OR u8 = 255) AND (s = 'abc')", ["ROW2"]),
        ("u8 = 255 OR u8 = 0 AND s = 'nope'", ["ROW"]),  # AND binds tighter
        ("true", ["ROW", "ROW2"]),
        ("1 = 2", []),
        ("i16 < i16", []),
        ("u8 = u8", ["ROW", "ROW2"]),
    ],
)
def test_predicates(db: PeerDatabase, where: str, expected: list[str]) -> None:
    assert matches(db, where) == expected


def test_sender_binding(db: PeerDatabase) -> None:
    assert matches(db, "ident = :sender", sender=BOB) == ["ROW2"]


@pytest.mark.parametrize(
    ("sql", "needle"),
    [
        ("SELECT * FROM nope", "no such table: `nope`"),
        ("SELECT * FROM t WHERE zz = 1", "`t` does not have a field `zz`"),
        ("SELECT * FROM t WHERE u8 = 256", "cannot be parsed as type `U8`"),
        ("SELECT * FROM t WHERE u8 = -1", "cannot be parsed as type `U8`"),
        ("SELECT * FROM t WHERE u8 = 1.5", "cannot be parsed as type `U8`"),
        ("SELECT * FROM t WHERE u8 = 'x'", "cannot be parsed"),
        ("SELECT * FROM t WHERE s = 1", "cannot be parsed as type `String`"),
        ("SELECT * FROM t WHERE b < true", "Invalid binary operator `<` for type `Bool`"),
        ("SELECT * FROM t WHERE arr = 'x'", "Invalid binary operator"),
        ("SELECT * FROM t WHERE prod = 1", "Invalid binary operator"),
        ("SELECT * FROM t WHERE color = 1", "Invalid binary operator"),
        ("SELECT * FROM t WHERE u8 = s", "Unexpected type"),
        ("SELECT * FROM t WHERE s = :other", "parameter"),
        ("SELECT * FROM t WHERE s = :sender", "cannot be parsed"),
        ("SELECT * FROM t WHERE ident = 0x" + "f" * 66, "cannot be parsed"),
        ("SELECT * FROM t WHERE ts = 'yesterday'", "cannot be parsed as type `Timestamp`"),
        ("SELECT * FROM t WHERE uuid = 'nope'", "cannot be parsed as type `Uuid`"),
        ("SELECT * FROM t WHERE s", "expected) Bool"),
        ("SELECT * FROM t WHERE NOT b", "NOT"),
        ("SELECT * FROM t WHERE", "expected a column"),
        ("SELECT * FROM t WHERE (b", "expected )"),
        ("SELECT * FROM t extra junk", "unexpected"),
        ("SELECT * t", "expected FROM"),
        ("SELECT * FROM t, k", "several tables"),
        ("SELECT * FROM t JOIN k ON t.u32 = k.id", "joins"),
        ("SELECT u8 FROM t", "Column projections are not supported"),
        ("SELECT * FROM t LIMIT 1", "LIMIT"),
        ("SELECT x.* FROM t", "not in scope"),
        ("SELECT * FROM t WHERE x.u8 = 1", "not in scope"),
        ("SELECT * FROM t WHERE s = 'unterminated", "unexpected character"),
        ("UPDATE t SET u8 = 1", "expected SELECT"),
    ],
)
def test_errors(db: PeerDatabase, sql: str, needle: str) -> None:
    with pytest.raises(SqlError) as info:
        parse_query(sql, db.schema, sender=ALICE)
    assert needle in str(info.value)


def test_aliases_quoting_and_case(db: PeerDatabase) -> None:
    for sql in (
        "select * from t where u8 = 255",
        "SELECT t.* FROM t WHERE t.u8 = 255",
        "SELECT x.* FROM t AS x WHERE x.u8 = 255",
        'SELECT * FROM "t" x WHERE "u8" = 255;',
        "SELECT * FROM t WHERE s = 'h''x' OR u8 = 255",
    ):
        q = parse_query(sql, db.schema)
        assert sum(q.matches(r) for r in db.store.tables["t"].rows.values()) == 1, sql


def test_projection_and_limit_for_http_sql(db: PeerDatabase) -> None:
    q = parse_query("SELECT u8, s FROM t WHERE u8 >= 0 LIMIT 1", db.schema, allow_projection=True)
    assert q.columns == ("u8", "s")
    assert q.limit == 1
    with pytest.raises(SqlError, match="does not have a field"):
        parse_query("SELECT nope FROM t", db.schema, allow_projection=True)


def test_split_statements_respects_quotes() -> None:
    assert split_statements("SELECT * FROM t WHERE s = 'a;b'; SELECT * FROM k;") == [
        "SELECT * FROM t WHERE s = 'a;b'",
        "SELECT * FROM k",
    ]


def test_sql_json_rendering(db: PeerDatabase) -> None:
    (res,) = db.sql("SELECT * FROM t WHERE u8 = 255", ALICE)
    (row,) = res["rows"]
    by_name: dict[str, Any] = {
        e["name"]["some"]: v for e, v in zip(res["schema"]["elements"], row, strict=True)
    }
    assert by_name["ident"] == ["0x" + ALICE]
    assert by_name["conn"] == [int("0f" * 16, 16)]
    assert by_name["ts"] == [1_700_000_000_000_000]
    assert by_name["u256"] == "0x" + "f" * 64
    assert by_name["u64"] == 2**64 - 1
    assert by_name["bytes"] == "00ff"
    assert by_name["opt"] == [1, []]
    assert by_name["prod"] == [1, "z"]
    assert by_name["color"] == [1, [1, 2, 3]]
    assert by_name["arr"] == ["a", "b"]
