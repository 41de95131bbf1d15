"""The client-side row cache: what one connection's query sets currently hold (sans-IO).

Theory of operation
-------------------
Rows are keyed per table by their primary-key value, or by their raw BSATN bytes when the table has
no primary key (the TS SDK's rule, PROTOCOL.md §4.1). Each row carries a reference count: the same
row may be delivered by several query sets (overlaps are not deduplicated by the server), and it
stays in the cache until the last query set that holds it lets go. Each query set's own multiset of
keys is tracked too, so a query set that fails later (``SubscriptionError`` without a request id)
can be dropped on its own without disturbing the others.

One server message is applied atomically: every row in it is decoded first (a decode error changes
nothing), then all deletes across all query sets, then all inserts. Changes are reported per key
after the whole message: a key deleted and inserted again with different bytes is one ``updated``,
with the same bytes nothing at all; a key only inserted is ``inserted``; only deleted is ``deleted``.
Event-table rows are reported as ``event`` and never stored.

:meth:`ClientCache.diff_to` compares two caches (the one a dying or expiring connection built, and
the one its replacement built from fresh snapshots) and yields exactly the changes that turn one into
the other: deletes for rows that vanished, updates for rows that changed, nothing for unchanged rows.
That is how reconnects and make-before-break token refreshes stay invisible to consumers.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from gatewayd.errors import DecodeError, SchemaError
from gatewayd.proto import messages as m
from gatewayd.proto.schema import ModuleSchema, TableDef

ChangeKind = Literal["inserted", "updated", "deleted", "event"]


@dataclass(frozen=True, slots=True)
class RowChange:
    """One row-level change. ``old`` is set for ``updated`` (the previous row).

    ``key`` identifies the row within its table: the primary-key value (a tuple for composite
    keys), or the row's BSATN bytes for tables without one; ``None`` for event-table rows.
    """

    table: str
    kind: ChangeKind
    row: Any
    old: Any = None
    key: Hashable = None


class _Entry:
    __slots__ = ("count", "raw", "value")

    def __init__(self, count: int, raw: bytes, value: Any) -> None:
        self.count = count
        self.raw = raw
        self.value = value


def _freeze(v: Any) -> Hashable:
    """A hashable stand-in for a JSON-ready primary-key value (ints and strings pass through)."""
    if isinstance(v, dict):
        return tuple((k, _freeze(x)) for k, x in v.items())
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v  # type: ignore[no-any-return]


class _TableKeys:
    """How to key a table's rows."""

    __slots__ = ("name", "pk_names", "row_type")

    def __init__(self, table: TableDef) -> None:
        self.name = table.name
        self.row_type = table.row_type
        cols = table.columns
        self.pk_names = tuple(cols[i] for i in table.primary_key)

    def key(self, value: Any, raw: bytes) -> Hashable:
        pk = self.pk_names
        if not pk:
            return raw
        if len(pk) == 1:
            return _freeze(value[pk[0]])
        return tuple(_freeze(value[c]) for c in pk)


# A decoded table update: (table, [(key, raw, value)] inserts, [...] deletes, [...] events)
_Decoded = tuple[str, list[tuple[Hashable, bytes, Any]], list[tuple[Hashable, bytes, Any]], list[Any]]


class ClientCache:
    """Rows held by one connection's query sets. Not thread-safe; sync calls only (no awaits)."""

    def __init__(self, schema: ModuleSchema) -> None:
        self.schema = schema
        self._keys: dict[str, _TableKeys] = {}
        self.tables: dict[str, dict[Hashable, _Entry]] = {}
        # query set id -> table -> key -> count
        self._sets: dict[int, dict[str, dict[Hashable, int]]] = {}

    # --- decoding --------------------------------------------------------------------------

    def _table_keys(self, name: str) -> _TableKeys:
        tk = self._keys.get(name)
        if tk is None:
            try:
                tk = _TableKeys(self.schema.table(name))
            except SchemaError as exc:
                raise DecodeError(str(exc), path=f"table {name!r}") from None
            self._keys[name] = tk
        return tk

    def _decode(self, table: str, rl: m.BsatnRowList) -> list[tuple[Hashable, bytes, Any]]:
        if not rl.rows_data:
            return []
        tk = self._table_keys(table)
        values, raws = self.schema.codec.decode_rows(tk.row_type, rl.rows_data, path=f"{table}.row")
        key = tk.key
        return [(key(v, r), r, v) for v, r in zip(values, raws, strict=True)]

    def decode_query_rows(self, rows: m.QueryRows) -> list[_Decoded]:
        return [(t.table, self._decode(t.table, t.rows), [], []) for t in rows.tables]

    def decode_update(self, qs: m.QuerySetUpdate) -> list[_Decoded]:
        out: list[_Decoded] = []
        for t in qs.tables:
            for part in t.rows:
                if isinstance(part, m.PersistentTableRows):
                    out.append(
                        (t.table_name, self._decode(t.table_name, part.inserts),
                         self._decode(t.table_name, part.deletes), [])
                    )  # fmt: skip
                else:
                    tk = self._table_keys(t.table_name)
                    values, _raws = self.schema.codec.decode_rows(
                        tk.row_type, part.events.rows_data, path=f"{t.table_name}.event"
                    )
                    out.append((t.table_name, [], [], values))
        return out

    # --- applying --------------------------------------------------------------------------

    def apply(self, per_set: Iterable[tuple[int, list[_Decoded]]]) -> list[RowChange]:
        """Apply one message's decoded rows, grouped by query set; return the net changes."""
        per_set = list(per_set)
        deleted: dict[tuple[str, Hashable], _Entry] = {}
        inserted: dict[tuple[str, Hashable], _Entry] = {}
        events: list[RowChange] = []
        tables = self.tables
        # All deletes first (across every query set), then all inserts: a row that moves
        # between overlapping sets, or is updated in both, nets out correctly.
        for qsid, decoded in per_set:
            qs = self._sets.setdefault(qsid, {})
            for table, _ins, dels, _ev in decoded:
                if not dels:
                    continue
                rows = tables.setdefault(table, {})
                qrows = qs.setdefault(table, {})
                for key, _raw, _value in dels:
                    n = qrows.get(key, 0)
                    if n <= 1:
                        qrows.pop(key, None)
                    else:
                        qrows[key] = n - 1
                    e = rows.get(key)
                    if e is None:
                        continue  # a delete for a row we never had: nothing to undo
                    e.count -= 1
                    if e.count <= 0:
                        del rows[key]
                        deleted.setdefault((table, key), e)
        for qsid, decoded in per_set:
            qs = self._sets.setdefault(qsid, {})
            for table, ins, _dels, evs in decoded:
                if evs:
                    events.extend(RowChange(table, "event", v) for v in evs)
                if not ins:
                    continue
                rows = tables.setdefault(table, {})
                qrows = qs.setdefault(table, {})
                for key, raw, value in ins:
                    qrows[key] = qrows.get(key, 0) + 1
                    e = rows.get(key)
                    if e is None:
                        e = rows[key] = _Entry(1, raw, value)
                        inserted[(table, key)] = e
                    else:
                        e.count += 1
                        if e.raw != raw:
                            # Same key, new bytes while still held: the row changed in place.
                            prev = deleted.get((table, key)) or _Entry(0, e.raw, e.value)
                            deleted.setdefault((table, key), prev)
                            e.raw, e.value = raw, value
                            inserted[(table, key)] = e
        return self._net(deleted, inserted) + events

    @staticmethod
    def _net(
        deleted: dict[tuple[str, Hashable], _Entry], inserted: dict[tuple[str, Hashable], _Entry]
    ) -> list[RowChange]:
        changes: list[RowChange] = []
        for (table, key), old in deleted.items():
            new = inserted.get((table, key))
            if new is None:
                changes.append(RowChange(table, "deleted", old.value, key=key))
            elif new.raw != old.raw:
                changes.append(RowChange(table, "updated", new.value, old.value, key))
        for (table, key), new in inserted.items():
            if (table, key) not in deleted:
                changes.append(RowChange(table, "inserted", new.value, key=key))
        return changes

    def drop_query_set(self, qsid: int) -> list[RowChange]:
        """Forget one query set's rows (unsubscribed or failed); return the rows that vanished."""
        qs = self._sets.pop(qsid, None)
        if not qs:
            return []
        changes = []
        for table, keys in qs.items():
            rows = self.tables.get(table, {})
            for key, n in keys.items():
                e = rows.get(key)
                if e is None:
                    continue
                e.count -= n
                if e.count <= 0:
                    del rows[key]
                    changes.append(RowChange(table, "deleted", e.value, key=key))
        return changes

    # --- inspection and reconciliation -----------------------------------------------------

    def rows(self, table: str) -> list[Any]:
        return [e.value for e in self.tables.get(table, {}).values()]

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def items(self) -> Iterator[tuple[str, Hashable, bytes, Any]]:
        for table, rows in self.tables.items():
            for key, e in rows.items():
                yield table, key, e.raw, e.value

    def diff_to(self, other: ClientCache) -> list[RowChange]:
        """The changes that turn this cache's contents into ``other``'s.

        Rows are compared by bytes when both caches decode with the same schema, and by decoded
        value otherwise (after a hotswap the same bytes can mean something else).
        """
        same_schema = self.schema.fingerprint == other.schema.fingerprint
        changes: list[RowChange] = []
        for table in self.tables.keys() | other.tables.keys():
            mine = self.tables.get(table, {})
            theirs = other.tables.get(table, {})
            for key, e in mine.items():
                o = theirs.get(key)
                if o is None:
                    changes.append(RowChange(table, "deleted", e.value, key=key))
                elif (o.raw != e.raw) if same_schema else (o.value != e.value):
                    changes.append(RowChange(table, "updated", o.value, e.value, key))
            for key, o in theirs.items():
                if key not in mine:
                    changes.append(RowChange(table, "inserted", o.value, key=key))
        return changes
