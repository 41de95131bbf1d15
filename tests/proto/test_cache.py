"""The client row cache: ref-counting across query sets, net changes, reconciliation."""

from __future__ import annotations

from typing import Any

from gatewayd.proto import messages as m
from gatewayd.proto.cache import ClientCache
from gatewayd.proto.sats import STRING, U64, Typespace, product
from gatewayd.proto.schema import ModuleSchema, TableDef

NOTE = product(id=U64, body=STRING)
LOG = product(line=STRING)  # no primary key: rows are keyed by their bytes


def schema() -> ModuleSchema:
    s = ModuleSchema(typespace=Typespace([NOTE, LOG]))
    s.tables["note"] = TableDef("note", 0, NOTE, primary_key=(0,))
    s.tables["log"] = TableDef("log", 1, LOG)
    return s


def rows(table: str, *values: dict[str, Any]) -> m.BsatnRowList:
    ty = NOTE if table == "note" else LOG
    codec = schema().codec
    return m.BsatnRowList.from_rows([codec.encode(ty, v) for v in values])


def tx(qsid: int, table: str, ins: list[dict[str, Any]], dels: list[dict[str, Any]]) -> m.QuerySetUpdate:
    return m.QuerySetUpdate(
        qsid, (m.TableUpdate(table, (m.PersistentTableRows(rows(table, *ins), rows(table, *dels)),)),)
    )


def kinds(changes: list[Any]) -> list[tuple[str, Any]]:
    return sorted((c.kind, c.row.get("id", c.row.get("line"))) for c in changes)


def test_overlapping_query_sets_are_reference_counted() -> None:
    c = ClientCache(schema())
    one = {"id": 1, "body": "a"}
    assert kinds(c.apply([(1, c.decode_update(tx(1, "note", [one], [])))])) == [("inserted", 1)]
    # The same row through a second query set: no new event.
    assert c.apply([(2, c.decode_update(tx(2, "note", [one], [])))]) == []
    # One set lets go: still held by the other.
    assert c.apply([(1, c.decode_update(tx(1, "note", [], [one])))]) == []
    assert c.rows("note") == [one]
    # The last holder lets go: deleted.
    assert kinds(c.apply([(2, c.decode_update(tx(2, "note", [], [one])))])) == [("deleted", 1)]


def test_delete_and_insert_of_a_key_is_one_update_across_sets() -> None:
    c = ClientCache(schema())
    old, new = {"id": 1, "body": "a"}, {"id": 1, "body": "b"}
    c.apply([(1, c.decode_update(tx(1, "note", [old], []))), (2, c.decode_update(tx(2, "note", [old], [])))])
    changes = c.apply(
        [(1, c.decode_update(tx(1, "note", [new], [old]))), (2, c.decode_update(tx(2, "note", [new], [old])))]
    )
    assert [(ch.kind, ch.row, ch.old) for ch in changes] == [("updated", new, old)]
    # Deleted and re-inserted unchanged: nothing at all.
    assert c.apply([(1, c.decode_update(tx(1, "note", [new], [new])))]) == []


def test_tables_without_primary_key_use_row_bytes() -> None:
    c = ClientCache(schema())
    c.apply([(1, c.decode_update(tx(1, "log", [{"line": "x"}, {"line": "x"}], [])))])
    assert c.rows("log") == [{"line": "x"}]  # one row, count 2
    assert c.apply([(1, c.decode_update(tx(1, "log", [], [{"line": "x"}])))]) == []
    assert kinds(c.apply([(1, c.decode_update(tx(1, "log", [], [{"line": "x"}])))])) == [("deleted", "x")]


def test_diff_reconciles_two_caches() -> None:
    a, b = ClientCache(schema()), ClientCache(schema())
    a.apply(
        [
            (
                1,
                a.decode_update(
                    tx(
                        1,
                        "note",
                        [{"id": 1, "body": "same"}, {"id": 2, "body": "old"}, {"id": 3, "body": "gone"}],
                        [],
                    )
                ),
            )
        ]
    )
    b.apply(
        [
            (
                7,
                b.decode_update(
                    tx(
                        7,
                        "note",
                        [{"id": 1, "body": "same"}, {"id": 2, "body": "new"}, {"id": 4, "body": "born"}],
                        [],
                    )
                ),
            )
        ]
    )
    changes = a.diff_to(b)
    assert kinds(changes) == [("deleted", 3), ("inserted", 4), ("updated", 2)]
    upd = next(ch for ch in changes if ch.kind == "updated")
    assert (upd.row["body"], upd.old["body"]) == ("new", "old")
    assert a.diff_to(a) == []


def test_dropping_a_query_set_removes_only_rows_no_one_else_holds() -> None:
    c = ClientCache(schema())
    c.apply([(1, c.decode_update(tx(1, "note", [{"id": 1, "body": "a"}, {"id": 2, "body": "b"}], [])))])
    c.apply([(2, c.decode_update(tx(2, "note", [{"id": 2, "body": "b"}], [])))])
    assert kinds(c.drop_query_set(1)) == [("deleted", 1)]
    assert c.rows("note") == [{"id": 2, "body": "b"}]
