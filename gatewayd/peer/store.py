"""The dev peer's in-memory tables and transactions (synchronous, no trio).

Theory of operation
-------------------
A table is a *set* of rows, as in SpacetimeDB: each row is stored under its own BSATN encoding
(``rows: dict[bytes, Row]``, insertion-ordered), so inserting a row that is already there is a
no-op, and deleting is by value. The BSATN key is also exactly what goes on the wire, so a
committed transaction's diff is ready to send without re-encoding.

Unique constraints (the primary key included) and btree indexes map the BSATN of the indexed
columns to row keys; they are hash maps, which is all equality lookups need (ordered scans are
never required by the module API or the SQL subset: range predicates scan the table).

A :class:`Transaction` applies each change immediately and logs it; rollback replays the log
backwards, commit folds it into a net per-table diff (an insert and a delete of the same row in
one transaction cancel out, so a reducer that changes nothing produces an empty diff). Only one
transaction is open at a time: reducers are synchronous and the peer runs on one trio thread, so
no other task can observe a half-applied transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from gatewayd.errors import EncodeError
from gatewayd.peer.module import ConstraintViolation, is_scalar_type
from gatewayd.proto.bsatn import ValueCodec
from gatewayd.proto.sats import AlgebraicType, Typespace
from gatewayd.proto.schema import ModuleSchema, TableDef

Row: TypeAlias = dict[str, Any]


class RowTypeError(ValueError):
    """A row or lookup value does not fit the table's column types (a module bug)."""


class TableState:
    """One table's rows, indexes and sequences."""

    __slots__ = (
        "btree",
        "col_names",
        "col_types",
        "dec",
        "defaults",
        "enc",
        "name",
        "rows",
        "scalar",
        "sequences",
        "tdef",
        "unique",
    )

    def __init__(self, tdef: TableDef, typespace: Typespace) -> None:
        self.tdef = tdef
        self.name = tdef.name
        self.enc = ValueCodec(typespace)
        self.dec = ValueCodec(typespace, safe=False)
        self.col_names: tuple[str, ...] = tdef.columns
        self.col_types: tuple[AlgebraicType, ...] = tuple(e.ty for e in tdef.row_type.elements)
        self.rows: dict[bytes, Row] = {}
        self.unique: dict[tuple[int, ...], dict[bytes, bytes]] = {c: {} for c in tdef.unique}
        self.btree: dict[tuple[int, ...], dict[bytes, dict[bytes, None]]] = {
            ix.columns: {} for ix in tdef.indexes if ix.columns not in self.unique
        }
        self.sequences: dict[int, int] = dict.fromkeys(tdef.auto_inc, 1)
        self.defaults: dict[str, Any] = {}  # column -> value for inserts that leave it out
        self.scalar = all(is_scalar_type(typespace.resolve(t)) for t in self.col_types)

    def __len__(self) -> int:
        return len(self.rows)

    # --- encoding helpers ---------------------------------------------------------------------

    def normalize(self, row: Mapping[str, Any]) -> tuple[bytes, Row]:
        """Encode a row (any accepted JSON-ready form) and decode it back to canonical values."""
        try:
            key = self.enc.encode(self.tdef.row_type, dict(row), path=self.name)
        except EncodeError as exc:
            raise RowTypeError(f"row does not fit table {self.name!r}: {exc}") from None
        return key, self.dec.decode(self.tdef.row_type, key)

    def col_index(self, column: str) -> int:
        try:
            return self.col_names.index(column)
        except ValueError:
            raise RowTypeError(f"table {self.name!r} has no column {column!r}") from None

    def value_key(self, col: int, value: Any) -> bytes:
        try:
            return self.enc.encode(self.col_types[col], value, path=f"{self.name}.{self.col_names[col]}")
        except EncodeError as exc:
            raise RowTypeError(str(exc)) from None

    def cols_key(self, cols: tuple[int, ...], row: Mapping[str, Any]) -> bytes:
        return b"".join(self.value_key(c, row[self.col_names[c]]) for c in cols)

    def normalize_value(self, col: int, value: Any) -> Any:
        return self.dec.decode(self.col_types[col], self.value_key(col, value))

    def copy_out(self, key: bytes, row: Row) -> Row:
        """A row the caller may mutate freely (nested values are decoded afresh)."""
        return dict(row) if self.scalar else self.dec.decode(self.tdef.row_type, key)

    # --- raw mutation (no checks; the transaction calls these) ---------------------------------

    def add(self, key: bytes, row: Row) -> None:
        self.rows[key] = row
        for cols, idx in self.unique.items():
            idx[self.cols_key(cols, row)] = key
        for cols, bt in self.btree.items():
            bt.setdefault(self.cols_key(cols, row), {})[key] = None

    def remove(self, key: bytes) -> Row:
        row = self.rows.pop(key)
        for cols, idx in self.unique.items():
            idx.pop(self.cols_key(cols, row), None)
        for cols, bt in self.btree.items():
            k = self.cols_key(cols, row)
            bucket = bt.get(k)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del bt[k]
        return row

    def check_unique(self, row: Row) -> None:
        for cols, idx in self.unique.items():
            if self.cols_key(cols, row) in idx:
                names = ", ".join(self.col_names[c] for c in cols)
                shown = ", ".join(repr(row[self.col_names[c]]) for c in cols)
                kind = "primary key" if cols == self.tdef.primary_key else "unique constraint"
                raise ConstraintViolation(f"duplicate {kind} ({names}) = ({shown}) in table {self.name!r}")

    # --- lookups -------------------------------------------------------------------------------

    def find_key(self, cols: tuple[int, ...], values: tuple[Any, ...]) -> bytes | None:
        """The row key with these values in a unique column set, if any."""
        idx = self.unique.get(cols)
        if idx is None:
            raise RowTypeError(
                f"table {self.name!r} has no unique index on ({', '.join(self.col_names[c] for c in cols)})"
            )
        return idx.get(b"".join(self.value_key(c, v) for c, v in zip(cols, values, strict=True)))

    def filter_keys(self, equals: Mapping[str, Any]) -> list[bytes]:
        """Keys of rows whose columns equal the given values (uses an index when one fits)."""
        if not equals:
            return list(self.rows)
        cols = {self.col_index(c): v for c, v in equals.items()}
        wanted = {c: self.value_key(c, v) for c, v in cols.items()}
        candidates: list[bytes] | None = None
        for ix_cols, idx in self.unique.items():
            if set(ix_cols) <= wanted.keys():
                k = idx.get(b"".join(wanted[c] for c in ix_cols))
                candidates = [k] if k is not None else []
                break
        if candidates is None:
            for ix_cols, bt in self.btree.items():
                if set(ix_cols) <= wanted.keys():
                    candidates = list(bt.get(b"".join(wanted[c] for c in ix_cols), {}))
                    break
        if candidates is None:
            candidates = list(self.rows)
        norm = {self.col_names[c]: self.dec.decode(self.col_types[c], b) for c, b in wanted.items()}
        return [k for k in candidates if all(self.rows[k][n] == v for n, v in norm.items())]


@dataclass(slots=True)
class TableDiff:
    """A committed transaction's net change to one table, in the order the changes were made."""

    inserted: dict[bytes, Row] = field(default_factory=dict)
    deleted: dict[bytes, Row] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inserted or self.deleted)


class Store:
    """All tables of one database."""

    def __init__(self, schema: ModuleSchema) -> None:
        self.schema = schema
        self.tables: dict[str, TableState] = {
            name: TableState(tdef, schema.typespace) for name, tdef in schema.tables.items()
        }
        self.active: Transaction | None = None

    def table(self, name: str) -> TableState:
        try:
            return self.tables[name]
        except KeyError:
            raise RowTypeError(f"no such table {name!r}") from None

    def begin(self) -> Transaction:
        if self.active is not None:
            raise RuntimeError("a transaction is already open (reducers cannot nest)")
        self.active = Transaction(self)
        return self.active


class Transaction:
    """Changes applied in place, with an undo log. Finish with :meth:`commit` or :meth:`rollback`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.log: list[tuple[bool, TableState, bytes, Row]] = []
        self.saved_sequences: dict[tuple[str, int], int] = {}
        self.open = True

    def _check_open(self) -> None:
        if not self.open:
            raise RuntimeError("the transaction has ended; tables are no longer accessible")

    def insert(self, t: TableState, row: Mapping[str, Any]) -> Row:
        self._check_open()
        row = dict(row)
        for name, value in t.defaults.items():
            row.setdefault(name, value)
        for c in t.tdef.auto_inc:
            name = t.col_names[c]
            v = row.get(name, 0)
            if v == 0 and not isinstance(v, bool):
                self.saved_sequences.setdefault((t.name, c), t.sequences[c])
                row[name] = t.sequences[c]
                t.sequences[c] += 1
        key, norm = t.normalize(row)
        if key in t.rows:
            return t.copy_out(key, norm)  # set semantics: the identical row is already there
        t.check_unique(norm)
        t.add(key, norm)
        self.log.append((True, t, key, norm))
        return t.copy_out(key, norm)

    def delete(self, t: TableState, key: bytes) -> Row:
        self._check_open()
        row = t.remove(key)
        self.log.append((False, t, key, row))
        return row

    def rollback(self) -> None:
        for is_insert, t, key, row in reversed(self.log):
            if is_insert:
                t.remove(key)
            else:
                t.add(key, row)
        for (name, col), value in self.saved_sequences.items():
            self.store.tables[name].sequences[col] = value
        self._end()

    def commit(self) -> dict[str, TableDiff]:
        diffs: dict[str, TableDiff] = {}
        for is_insert, t, key, row in self.log:
            d = diffs.setdefault(t.name, TableDiff())
            if is_insert:
                if d.deleted.pop(key, None) is None:
                    d.inserted[key] = row
            elif d.inserted.pop(key, None) is None:
                d.deleted[key] = row
        self._end()
        return {name: d for name, d in diffs.items() if d}

    def _end(self) -> None:
        self.open = False
        self.log = []
        if self.store.active is self:
            self.store.active = None


class TableHandle:
    """A table inside a reducer's transaction (``ctx.db.<table>``). Rows are dicts."""

    __slots__ = ("_t", "_tx")

    def __init__(self, tx: Transaction, table: TableState) -> None:
        self._tx = tx
        self._t = table

    def __repr__(self) -> str:
        return f"<table {self._t.name!r}: {len(self._t)} rows>"

    @property
    def name(self) -> str:
        return self._t.name

    def insert(self, row: Mapping[str, Any]) -> Row:
        """Insert a row and return it as stored (auto-inc columns filled).

        Raises:
            ConstraintViolation: a unique column (or the primary key) already has this value.
            RowTypeError: the row does not fit the column types.
        """
        return self._tx.insert(self._t, row)

    def _pk(self) -> int:
        pk = self._t.tdef.primary_key
        if len(pk) != 1:
            raise RowTypeError(f"table {self._t.name!r} has no primary key")
        return pk[0]

    def find(self, pk_value: Any) -> Row | None:
        """The row with this primary-key value, or None."""
        pk = self._pk()
        key = self._t.find_key((pk,), (pk_value,))
        return None if key is None else self._t.copy_out(key, self._t.rows[key])

    def find_by(self, column: str, value: Any) -> Row | None:
        """The row with this value in a unique column, or None."""
        c = self._t.col_index(column)
        key = self._t.find_key((c,), (value,))
        return None if key is None else self._t.copy_out(key, self._t.rows[key])

    def filter(self, **equals: Any) -> list[Row]:
        """Rows whose columns equal the given values (all rows when none are given)."""
        t = self._t
        return [t.copy_out(k, t.rows[k]) for k in t.filter_keys(equals)]

    def update(self, row: Mapping[str, Any]) -> Row:
        """Replace the row with the same primary key; the old row must exist.

        Raises:
            ReducerError-free: ``LookupError`` when no row has that key (a module bug), or
            ConstraintViolation when another unique column clashes.
        """
        pk = self._pk()
        name = self._t.col_names[pk]
        key = self._t.find_key((pk,), (row[name],))
        if key is None:
            raise LookupError(f"update: no row in {self._t.name!r} with {name} = {row[name]!r}")
        new_key, _ = self._t.normalize(row)
        if new_key == key:
            return self._t.copy_out(key, self._t.rows[key])
        self._tx.delete(self._t, key)
        return self._tx.insert(self._t, row)

    def upsert(self, row: Mapping[str, Any]) -> Row:
        """Insert, or replace the row with the same primary key."""
        pk = self._pk()
        name = self._t.col_names[pk]
        if name in row and self._t.find_key((pk,), (row[name],)) is not None:
            return self.update(row)
        return self.insert(row)

    def delete(self, row: Mapping[str, Any]) -> bool:
        """Delete a row: by primary key when the table has one, else by its exact value."""
        t = self._t
        if len(t.tdef.primary_key) == 1:
            pk = t.tdef.primary_key[0]
            key = t.find_key((pk,), (row[t.col_names[pk]],))
        else:
            k, _ = t.normalize(row)
            key = k if k in t.rows else None
        if key is None:
            return False
        self._tx.delete(t, key)
        return True

    def delete_by(self, **equals: Any) -> int:
        """Delete every row whose columns equal the given values; returns how many."""
        keys = self._t.filter_keys(equals)
        for k in keys:
            self._tx.delete(self._t, k)
        return len(keys)

    def iter(self) -> Iterator[Row]:
        """All rows (a snapshot: the table may be changed while iterating)."""
        t = self._t
        return iter([t.copy_out(k, r) for k, r in t.rows.items()])

    def __iter__(self) -> Iterator[Row]:
        return self.iter()

    def count(self) -> int:
        return len(self._t)

    def __len__(self) -> int:
        return len(self._t)


class DbView:
    """``ctx.db``: every table of the database, inside one transaction."""

    __slots__ = ("_tx",)

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def __getitem__(self, name: str) -> TableHandle:
        return TableHandle(self._tx, self._tx.store.table(name))

    def __getattr__(self, name: str) -> TableHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except RowTypeError:
            raise AttributeError(f"the module has no table {name!r}") from None

    def __dir__(self) -> list[str]:
        return list(self._tx.store.tables)
