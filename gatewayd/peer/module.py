"""The dev peer's Python module API: tables, reducers and lifecycle hooks.

A :class:`Module` is a *definition*, like a compiled SpacetimeDB module before it is published: it
holds table specs and reducer functions and can produce the module's ``RawModuleDefV9`` schema. The
peer instantiates it as a database (:class:`gatewayd.peer.database.PeerDatabase`), which owns the
rows, runs ``init`` once, and calls reducers in transactions.

Example::

    from gatewayd.peer import Module, ReducerContext, ReducerError
    from gatewayd.proto.sats import STRING, U64

    chat = Module("chat")
    chat.table("message", {"id": U64, "text": STRING}, primary_key="id", auto_inc=("id",))

    @chat.reducer(text=STRING)
    def send(ctx: ReducerContext, text: str) -> None:
        if not text:
            raise ReducerError("empty message")  # -> ReducerResult Err("empty message")
        ctx.db.message.insert({"id": 0, "text": text})  # id 0 -> next sequence value

Values are the codec's JSON-ready forms with exact Python ints (``ValueCodec(safe=False)``):
integers are ``int``, Identity/ConnectionId are 64/32 lowercase hex chars, Timestamp is integer
microseconds, bytes are hex strings, ``Option`` is ``None`` or the value, other sums are
``{"tag": name, "value": v}``. Rows are ``dict`` keyed by column name.

Reducers are plain synchronous functions: a reducer runs to completion without a checkpoint, which
is what makes its transaction atomic with respect to every other connection (SpacetimeDB runs
reducers serially too). Error mapping, as SpacetimeDB's (PROTOCOL.md §5.4):

* :class:`ReducerError` raised by the reducer -> rolled back; the caller gets ``Err(message)``
  (HTTP: 530 with the message).
* Any other exception (a bug: the equivalent of a panic), including :class:`ConstraintViolation`
  from an insert that breaks a unique index -> rolled back; ``InternalError(text)``.
* ``client_connected`` raising anything rejects the connection.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from gatewayd.proto.bsatn import ValueCodec
from gatewayd.proto.sats import AlgebraicType, Element, Prim, Product, Sum, Typespace, special_kind
from gatewayd.proto.schema import IndexDef, ModuleSchema, ReducerDef, TableDef

if TYPE_CHECKING:
    from gatewayd.peer.store import DbView

Lifecycle = Literal["init", "client_connected", "client_disconnected"]

_LIFECYCLE_SCHEMA: Final[dict[str, Literal["Init", "OnConnect", "OnDisconnect"]]] = {
    "init": "Init",
    "client_connected": "OnConnect",
    "client_disconnected": "OnDisconnect",
}
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ReducerError(Exception):
    """A reducer's user error: rolled back and returned to the caller as ``Err(str(self))``."""


class ConstraintViolation(Exception):
    """An insert or update broke a unique index or the primary key.

    Not a :class:`ReducerError`: like a panicking ``insert`` in a Rust module it fails the reducer
    with ``InternalError``, unless the reducer catches it and raises a ``ReducerError`` itself.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class TableSpec:
    """One table as the module author declared it."""

    name: str
    columns: tuple[tuple[str, AlgebraicType], ...]
    primary_key: str | None = None
    unique: tuple[tuple[str, ...], ...] = ()
    indexes: tuple[tuple[str, ...], ...] = ()
    auto_inc: tuple[str, ...] = ()
    public: bool = True
    # Values for columns an insert leaves out (set by hotswap for added columns, so reducers
    # written for the old layout keep working, as a migration's column defaults do upstream).
    defaults: tuple[tuple[str, Any], ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    @property
    def row_type(self) -> Product:
        return Product(tuple(Element(c, t) for c, t in self.columns))

    def validate(self) -> None:
        """Raise ``ValueError`` naming what is wrong; called when the table is declared."""
        names = self.column_names
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"table name {self.name!r} is not an identifier")
        if not names:
            raise ValueError(f"table {self.name!r} has no columns")
        if len(set(names)) != len(names):
            raise ValueError(f"table {self.name!r} has duplicate column names")
        for c in names:
            if not _NAME_RE.fullmatch(c):
                raise ValueError(f"table {self.name!r}: column name {c!r} is not an identifier")
        wanted = [(self.primary_key,)] if self.primary_key else []
        for cols in [
            *wanted,
            *self.unique,
            *self.indexes,
            *((c,) for c in self.auto_inc),
            *((c,) for c, _ in self.defaults),
        ]:
            if not cols:
                raise ValueError(f"table {self.name!r}: an index or constraint needs columns")
            for c in cols:
                if c not in names:
                    raise ValueError(f"table {self.name!r} has no column {c!r}")
        types = dict(self.columns)
        for c in self.auto_inc:
            t = types[c]
            if not (isinstance(t, Prim) and t.name in _INT_NAMES):
                raise ValueError(f"table {self.name!r}: auto_inc column {c!r} must be an integer")


_INT_NAMES: Final = frozenset(
    ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "I128", "U128", "I256", "U256")
)


@dataclass(frozen=True, slots=True)
class ReducerSpec:
    """A reducer: its wire name, typed parameters (in argument order) and function."""

    name: str
    params: tuple[tuple[str, AlgebraicType], ...]
    fn: Callable[..., object]
    lifecycle: Lifecycle | None = None

    @property
    def params_type(self) -> Product:
        return Product(tuple(Element(n, t) for n, t in self.params))


@dataclass(slots=True)
class ReducerContext:
    """What a reducer sees (SpacetimeDB's ``ReducerContext``).

    Attributes:
        sender: the caller's identity, 64 hex chars (the database's own identity for ``init``).
        connection_id: the caller's connection id (32 hex chars), None for ``init`` and for
            calls made in-process by tests without one.
        timestamp: when the reducer started, microseconds since the Unix epoch.
        claims: the JWT payload of the token the caller presented (a dict), None when there is
            no token (``init``, in-process calls).
        db: table access inside this reducer's transaction (``ctx.db.<table>`` or
            ``ctx.db["table"]``).
        database_identity: the database's identity (64 hex chars).
    """

    sender: str
    connection_id: str | None
    timestamp: int
    claims: Mapping[str, Any] | None
    db: DbView
    database_identity: str
    reducer: str = ""
    _extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_internal(self) -> bool:
        """True for calls not made by a client (``init``, test transactions)."""
        return self.claims is None and self.connection_id is None

    @property
    def issuer(self) -> str | None:
        return None if self.claims is None else _str_or_none(self.claims.get("iss"))

    @property
    def subject(self) -> str | None:
        return None if self.claims is None else _str_or_none(self.claims.get("sub"))

    @property
    def audience(self) -> list[str]:
        """The ``aud`` claim normalised to a list (SpacetimeDB's ``JwtClaims.audience()``)."""
        if self.claims is None:
            return []
        aud = self.claims.get("aud")
        if isinstance(aud, str):
            return [aud]
        if isinstance(aud, list):
            return [a for a in aud if isinstance(a, str)]
        return []


def _str_or_none(v: object) -> str | None:
    return v if isinstance(v, str) else None


class Module:
    """A module definition: tables and reducers, turned into a database by the peer.

    Args:
        name: the default database name the peer serves it under.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.tables: dict[str, TableSpec] = {}
        self.reducers: dict[str, ReducerSpec] = {}

    def __repr__(self) -> str:
        return f"<Module {self.name!r}: {len(self.tables)} tables, {len(self.reducers)} reducers>"

    # --- declaration ---------------------------------------------------------------------------

    def table(
        self,
        name: str,
        columns: Mapping[str, AlgebraicType],
        *,
        primary_key: str | None = None,
        unique: Iterable[str | Iterable[str]] = (),
        indexes: Iterable[str | Iterable[str]] = (),
        auto_inc: Iterable[str] = (),
        public: bool = True,
        defaults: Mapping[str, Any] | None = None,
    ) -> TableSpec:
        """Declare a table.

        Args:
            name: the table's wire name.
            columns: column name -> SATS type, in BSATN column order.
            primary_key: the primary-key column (implies a unique constraint and an index).
            unique: unique constraints; each a column name or a tuple of names.
            indexes: btree indexes; each a column name or a tuple of names.
            auto_inc: integer columns filled from a sequence when inserted as 0 (or missing).
            public: private tables are readable only by the database owner.
            defaults: values for columns an insert leaves out.
        """
        if name in self.tables:
            raise ValueError(f"table {name!r} is declared twice")
        cols = tuple(columns.items())
        spec = TableSpec(
            name=name,
            columns=cols,
            primary_key=primary_key,
            unique=tuple(_col_tuple(u) for u in unique),
            indexes=tuple(_col_tuple(i) for i in indexes),
            auto_inc=tuple(auto_inc),
            public=public,
            defaults=tuple((defaults or {}).items()),
        )
        spec.validate()
        self.tables[name] = spec
        return spec

    def reducer(
        self, reducer_name: str | None = None, /, **params: AlgebraicType
    ) -> Callable[[Callable[..., object]], Callable[..., object]]:
        """Decorator declaring a reducer with typed parameters (keyword order = argument order).

        ``@module.reducer(title=STRING)`` names the reducer after the function;
        ``@module.reducer("add", name=STRING)`` gives the wire name explicitly (positional, so a
        parameter may itself be called ``name``). The function is called as
        ``fn(ctx, **args)`` and must be synchronous.
        """

        def register(fn: Callable[..., object]) -> Callable[..., object]:
            self._register(ReducerSpec(reducer_name or fn.__name__, tuple(params.items()), fn))
            return fn

        return register

    def init(self, fn: Callable[[ReducerContext], object]) -> Callable[[ReducerContext], object]:
        """Decorator: the ``init`` lifecycle reducer, run once when the database is created."""
        self._register(ReducerSpec("init", (), fn, "init"))
        return fn

    def client_connected(self, fn: Callable[[ReducerContext], object]) -> Callable[[ReducerContext], object]:
        """Decorator: runs on each connection (WebSocket, or HTTP call/sql); raising rejects it."""
        self._register(ReducerSpec("client_connected", (), fn, "client_connected"))
        return fn

    def client_disconnected(
        self, fn: Callable[[ReducerContext], object]
    ) -> Callable[[ReducerContext], object]:
        """Decorator: runs when a connection ends (its errors are logged, never surfaced)."""
        self._register(ReducerSpec("client_disconnected", (), fn, "client_disconnected"))
        return fn

    def _register(self, spec: ReducerSpec) -> None:
        if inspect.iscoroutinefunction(spec.fn):
            raise TypeError(f"reducer {spec.name!r} must be a plain function, not async")
        if not _NAME_RE.fullmatch(spec.name):
            raise ValueError(f"reducer name {spec.name!r} is not an identifier")
        if spec.name in self.reducers:
            raise ValueError(f"reducer {spec.name!r} is declared twice")
        if spec.lifecycle is not None and any(r.lifecycle == spec.lifecycle for r in self.reducers.values()):
            raise ValueError(f"a {spec.lifecycle} reducer is already declared")
        self.reducers[spec.name] = spec

    def lifecycle(self, which: Lifecycle) -> ReducerSpec | None:
        for r in self.reducers.values():
            if r.lifecycle == which:
                return r
        return None

    # --- schema --------------------------------------------------------------------------------

    def build_schema(self, tables: Mapping[str, TableSpec] | None = None) -> ModuleSchema:
        """The module's schema (served as RawModuleDefV9 JSON by ``/schema?version=9``).

        Each table's row type is a named product in the typespace at the table's position;
        ``tables`` overrides the declared specs (used by hotswap).
        """
        specs = list((tables if tables is not None else self.tables).values())
        typespace = Typespace([s.row_type for s in specs])
        schema = ModuleSchema(typespace=typespace)
        for ref, spec in enumerate(specs):
            schema.tables[spec.name] = table_def(spec, ref)
            schema.type_names[ref] = _camel(spec.name)
        for r in self.reducers.values():
            schema.reducers[r.name] = ReducerDef(
                r.name,
                r.params_type,
                _LIFECYCLE_SCHEMA[r.lifecycle] if r.lifecycle else None,
            )
        schema._codec = ValueCodec(typespace)
        return schema


def table_def(spec: TableSpec, ref: int) -> TableDef:
    """The schema's view of a table spec (the primary key implies a unique index, as upstream)."""
    names = spec.column_names

    def idx(cols: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(names.index(c) for c in cols)

    unique: list[tuple[int, ...]] = []
    if spec.primary_key:
        unique.append(idx((spec.primary_key,)))
    for u in spec.unique:
        if idx(u) not in unique:
            unique.append(idx(u))
    index_cols: list[tuple[int, ...]] = list(unique)
    for i in spec.indexes:
        if idx(i) not in index_cols:
            index_cols.append(idx(i))
    indexes = tuple(
        IndexDef(
            name=f"{spec.name}_{'_'.join(names[c] for c in cols)}_idx_btree",
            accessor_name="_".join(names[c] for c in cols),
            algorithm="BTree",
            columns=cols,
        )
        for cols in index_cols
    )
    return TableDef(
        name=spec.name,
        product_type_ref=ref,
        row_type=spec.row_type,
        primary_key=idx((spec.primary_key,)) if spec.primary_key else (),
        public=spec.public,
        indexes=indexes,
        unique=tuple(unique),
        auto_inc=idx(spec.auto_inc),
    )


def _col_tuple(v: str | Iterable[str]) -> tuple[str, ...]:
    return (v,) if isinstance(v, str) else tuple(v)


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.split("_") if p)


def is_scalar_type(ty: AlgebraicType) -> bool:
    """True when values of ``ty`` are immutable Python objects (no list/dict inside)."""
    kind = special_kind(ty)
    if kind in ("identity", "connection_id", "timestamp", "time_duration", "uuid", "bytes"):
        return True
    if kind == "option" and isinstance(ty, Sum):
        return is_scalar_type(ty.variants[0].ty)
    return isinstance(ty, Prim)
