"""One database served by the peer: a module instance, its rows, and its subscribers (no trio).

Theory of operation
-------------------
Everything here is synchronous. A reducer call, a subscription, an unsubscribe and a one-off query
each run start to finish without a checkpoint, so each sees one consistent state between two
transactions, and the messages they produce are handed to each connection's bounded outgoing
queue (:meth:`Subscriber.deliver`, never blocking) in commit order. This is how the peer gives
SpacetimeDB's guarantees (PROTOCOL.md §5.2-§5.5):

* ``SubscribeApplied`` is computed from the current state, so it includes every transaction the
  client was already told about and none that it will be told about later.
* A committed transaction yields at most one message per connection: the caller's
  ``ReducerResult`` (carrying the caller's own query-set changes) or, for every other connection
  with an affected query set, one ``TransactionUpdate``. Nothing is sent for a transaction that
  changed no rows or touched nobody's queries.
* A failed reducer rolls back and only the caller hears of it.

Connections (the WebSocket layer) implement :class:`Subscriber`; HTTP calls and in-process test
calls use no subscriber at all.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from gatewayd.errors import DecodeError, EncodeError
from gatewayd.peer.module import (
    Module,
    ReducerContext,
    ReducerError,
    ReducerSpec,
    TableSpec,
)
from gatewayd.peer.sql import Query, SqlError, parse_query, split_statements
from gatewayd.peer.store import DbView, Row, Store, TableDiff, TableState
from gatewayd.peer.values import from_sats_json, to_sql_json
from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import ValueCodec
from gatewayd.proto.identity import identity_hex
from gatewayd.proto.sats import AlgebraicType, special_kind, type_to_json
from gatewayd.proto.schema import ModuleSchema

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Issuer used to derive a database's identity from its name; any stable string would do.
DATABASE_ISSUER = "gatewayd-dev-peer"


class DuplicateQuerySet(Exception):
    """A Subscribe reused a live query_set_id; upstream closes the connection with 1011."""


class Subscriber(Protocol):
    """What a database needs from a connection."""

    identity: str
    connection_id: str
    query_sets: dict[int, list[Query]]

    def deliver(self, msg: m.ServerMessage, *, transaction_update: bool = False) -> None:
        """Queue a message for this connection without blocking (in call order)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who runs a reducer: identity, connection id and JWT payload (None when internal)."""

    identity: str
    connection_id: str | None = None
    claims: Mapping[str, Any] | None = None


Status = Literal["committed", "failed", "internal_error"]


@dataclass(frozen=True, slots=True)
class CallResult:
    """The outcome of one reducer call.

    ``status`` is ``committed``, ``failed`` (the reducer raised :class:`ReducerError`) or
    ``internal_error`` (unknown reducer, bad arguments, a lifecycle reducer, or any other
    exception). ``http_status`` is what ``POST /call`` answers with.
    """

    status: Status
    message: str = ""
    timestamp: int = 0
    http_status: int = 200
    diff: Mapping[str, TableDiff] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "committed"


def now_micros() -> int:
    return time.time_ns() // 1000


class PeerDatabase:
    """A module instance: schema, store, subscribers.

    Args:
        module: the module definition.
        name: the database name (defaults to the module's).
        owner_identity: who may read private tables (the database owner).
    """

    def __init__(self, module: Module, *, name: str | None = None, owner_identity: str | None = None) -> None:
        self.module = module
        self.name = name or module.name
        self.identity = identity_hex(DATABASE_ISSUER, self.name)
        self.owner_identity = owner_identity
        self.specs: dict[str, TableSpec] = dict(module.tables)
        self.schema: ModuleSchema = module.build_schema(self.specs)
        self.store = Store(self.schema)
        for name, spec in self.specs.items():
            self.store.tables[name].defaults = dict(spec.defaults)
        self._args_codec = ValueCodec(self.schema.typespace, safe=False)
        self.subscribers: dict[int, Subscriber] = {}
        self.transactions_committed = 0

    def __repr__(self) -> str:
        return f"<PeerDatabase {self.name!r} {self.identity[:12]}…>"

    # --- lifecycle -----------------------------------------------------------------------------

    def run_init(self) -> None:
        """Run the ``init`` reducer, if any; its failure is a module bug and raises."""
        spec = self.module.lifecycle("init")
        if spec is None:
            return
        res = self._run(spec, {}, Caller(self.identity), broadcast=False)
        if not res.ok:
            raise RuntimeError(f"database {self.name!r}: init failed: {res.message}")

    def connect(self, caller: Caller) -> str | None:
        """Run ``client_connected``; returns the rejection reason, or None when accepted."""
        spec = self.module.lifecycle("client_connected")
        if spec is None:
            return None
        res = self._run(spec, {}, caller)
        return None if res.ok else (res.message or "rejected by client_connected")

    def disconnect(self, caller: Caller) -> None:
        """Run ``client_disconnected`` (its failures are logged only, as upstream)."""
        spec = self.module.lifecycle("client_disconnected")
        if spec is None:
            return
        res = self._run(spec, {}, caller)
        if not res.ok:
            logger.warning("peer[%s]: client_disconnected failed: %s", self.name, res.message)

    def attach(self, sub: Subscriber) -> None:
        self.subscribers[id(sub)] = sub

    def detach(self, sub: Subscriber) -> None:
        self.subscribers.pop(id(sub), None)
        sub.query_sets.clear()

    # --- reducers ------------------------------------------------------------------------------

    def call_reducer(
        self,
        name: str,
        args: bytes | Mapping[str, Any] | list[Any],
        caller: Caller,
        *,
        subscriber: Subscriber | None = None,
        request_id: int | None = None,
    ) -> CallResult:
        """Call a reducer by wire name; BSATN args (WebSocket) or JSON args (HTTP, tests).

        When ``subscriber`` and ``request_id`` are given, the caller's ``ReducerResult`` is
        delivered to it in commit order; every other affected subscriber gets a
        ``TransactionUpdate``.
        """
        spec = self.module.reducers.get(name)
        if spec is None:
            res = CallResult("internal_error", f"No such reducer `{name}`", now_micros(), 404)
        elif spec.lifecycle is not None:
            res = CallResult(
                "internal_error",
                f"Reducer `{name}` is a lifecycle reducer ({spec.lifecycle}) and cannot be called",
                now_micros(),
                400,
            )
        else:
            try:
                kwargs = self._decode_args(spec, args)
            except (DecodeError, EncodeError) as exc:
                res = CallResult(
                    "internal_error", f"invalid arguments for reducer `{name}`: {exc}", now_micros(), 400
                )
            else:
                return self._run(spec, kwargs, caller, subscriber=subscriber, request_id=request_id)
        if subscriber is not None and request_id is not None:
            subscriber.deliver(
                m.ReducerResult(request_id, res.timestamp, m.ReducerInternalError(res.message))
            )
        return res

    def _decode_args(self, spec: ReducerSpec, args: bytes | Mapping[str, Any] | list[Any]) -> dict[str, Any]:
        ptype = spec.params_type
        if isinstance(args, bytes | bytearray | memoryview):
            raw = bytes(args)
        else:
            ready = from_sats_json(self.schema.typespace, ptype, args)
            raw = ValueCodec(self.schema.typespace).encode(ptype, ready, path="args")
        value = self._args_codec.decode(ptype, raw, path="args")
        if not ptype.elements:
            return {}
        assert isinstance(value, dict)
        return value

    def _run(
        self,
        spec: ReducerSpec,
        kwargs: Mapping[str, Any],
        caller: Caller,
        *,
        subscriber: Subscriber | None = None,
        request_id: int | None = None,
        broadcast: bool = True,
    ) -> CallResult:
        ts = now_micros()
        tx = self.store.begin()
        ctx = ReducerContext(
            sender=caller.identity,
            connection_id=caller.connection_id,
            timestamp=ts,
            claims=caller.claims,
            db=DbView(tx),
            database_identity=self.identity,
            reducer=spec.name,
        )
        try:
            spec.fn(ctx, **kwargs)
        except ReducerError as exc:
            tx.rollback()
            res = CallResult("failed", str(exc), ts, 530)
        except Exception as exc:  # a module bug: the equivalent of a panic
            tx.rollback()
            logger.warning("peer[%s]: reducer %s raised", self.name, spec.name, exc_info=True)
            res = CallResult("internal_error", f"{type(exc).__name__}: {exc}", ts, 530)
        except BaseException:
            tx.rollback()
            raise
        else:
            diff = tx.commit()
            if diff:
                self.transactions_committed += 1
            res = CallResult("committed", "", ts, 200, diff)
            if broadcast:
                self._broadcast(diff, caller_sub=subscriber, request_id=request_id, timestamp=ts)
            return res
        if subscriber is not None and request_id is not None:
            outcome: m.ReducerOutcome
            if res.status == "failed":
                outcome = m.ReducerErr(_bsatn_string(res.message))
            else:
                outcome = m.ReducerInternalError(res.message)
            subscriber.deliver(m.ReducerResult(request_id, ts, outcome))
        return res

    def transact(self, fn: Callable[[DbView], T], *, caller: Caller | None = None) -> T:
        """Run ``fn(db)`` as one transaction and broadcast its changes (test and demo helper).

        Raises whatever ``fn`` raises, after rolling back.
        """
        tx = self.store.begin()
        try:
            out = fn(DbView(tx))
        except BaseException:
            tx.rollback()
            raise
        diff = tx.commit()
        if diff:
            self.transactions_committed += 1
        self._broadcast(diff, caller_sub=None, request_id=None, timestamp=now_micros())
        return out

    # --- fan-out -------------------------------------------------------------------------------

    def _broadcast(
        self,
        diff: Mapping[str, TableDiff],
        *,
        caller_sub: Subscriber | None,
        request_id: int | None,
        timestamp: int,
    ) -> None:
        for sub in list(self.subscribers.values()):
            updates = _query_set_updates(sub, diff) if diff else ()
            if sub is caller_sub and request_id is not None:
                ok = m.ReducerOk(b"", m.TransactionUpdate(updates))
                sub.deliver(m.ReducerResult(request_id, timestamp, ok))
            elif updates:
                sub.deliver(m.TransactionUpdate(updates), transaction_update=True)
        if caller_sub is not None and request_id is not None and id(caller_sub) not in self.subscribers:
            ok = m.ReducerOk(b"", m.TransactionUpdate(()))
            caller_sub.deliver(m.ReducerResult(request_id, timestamp, ok))

    # --- subscriptions -------------------------------------------------------------------------

    def compile(self, text: str, identity: str, *, allow_projection: bool = False) -> Query:
        """Parse a query for a caller; private tables are invisible to everyone but the owner."""
        q = parse_query(text, self.schema, sender=identity, allow_projection=allow_projection)
        if not self.schema.tables[q.table].public and identity != self.owner_identity:
            raise SqlError(f"no such table: `{q.table}`. If the table exists, it may be marked private.")
        return q

    def subscribe(
        self, sub: Subscriber, request_id: int, query_set_id: int, query_strings: tuple[str, ...]
    ) -> None:
        """Register a query set and deliver SubscribeApplied, or a SubscriptionError.

        Raises:
            DuplicateQuerySet: the id is live on this connection (the caller closes with 1011).
        """
        if query_set_id in sub.query_sets:
            raise DuplicateQuerySet(
                f"Subscription with id QuerySetId {{ id: {query_set_id} }} already exists for client"
            )
        queries: list[Query] = []
        seen: set[str] = set()
        try:
            for text in query_strings:
                if text in seen:
                    continue  # identical strings within one set are deduplicated
                seen.add(text)
                queries.append(self.compile(text, sub.identity))
        except SqlError as exc:
            sub.deliver(m.SubscriptionError(request_id, query_set_id, str(exc)))
            return
        sub.query_sets[query_set_id] = queries
        sub.deliver(m.SubscribeApplied(request_id, query_set_id, self._query_rows(queries)))

    def unsubscribe(
        self, sub: Subscriber, request_id: int, query_set_id: int, send_dropped_rows: bool
    ) -> None:
        """Remove a query set: UnsubscribeApplied (with the dropped rows when asked)."""
        queries = sub.query_sets.pop(query_set_id, None)
        if queries is None:
            sub.deliver(
                m.SubscriptionError(
                    request_id, query_set_id, f"Subscription not found: QuerySetId {{ id: {query_set_id} }}"
                )
            )
            return
        rows = self._query_rows(queries) if send_dropped_rows else None
        sub.deliver(m.UnsubscribeApplied(request_id, query_set_id, rows))

    def one_off(self, sub: Subscriber, request_id: int, text: str) -> None:
        try:
            q = self.compile(text, sub.identity)
        except SqlError as exc:
            sub.deliver(m.OneOffQueryResult(request_id, error=str(exc)))
            return
        sub.deliver(m.OneOffQueryResult(request_id, rows=self._query_rows([q])))

    def _query_rows(self, queries: list[Query]) -> m.QueryRows:
        tables = []
        for q in queries:
            t = self.store.tables[q.table]
            keys = [k for k, row in t.rows.items() if q.matches(row)]
            tables.append(m.SingleTableRows(q.table, m.BsatnRowList.from_rows(keys)))
        return m.QueryRows(tuple(tables))

    # --- HTTP SQL ------------------------------------------------------------------------------

    def sql(self, text: str, identity: str) -> list[dict[str, Any]]:
        """``POST /sql``: run SELECT statements; returns upstream's JSON result list.

        Raises:
            SqlError: for anything but the supported SELECT subset.
        """
        results = []
        for stmt in split_statements(text):
            if stmt.split(None, 1)[0].upper() != "SELECT":
                raise SqlError("the dev peer's SQL endpoint supports SELECT statements only")
            start = time.perf_counter()
            q = self.compile(stmt, identity, allow_projection=True)
            t = self.store.tables[q.table]
            rtype = t.tdef.row_type
            cols = q.columns or t.col_names
            elems = [rtype.elements[t.col_names.index(c)] for c in cols]
            rows: list[list[Any]] = []
            for row in t.rows.values():
                if q.limit is not None and len(rows) >= q.limit:
                    break
                if q.matches(row):
                    rows.append(
                        [
                            to_sql_json(self.schema.typespace, e.ty, row[c])
                            for c, e in zip(cols, elems, strict=True)
                        ]
                    )
            schema = type_to_json(dataclasses.replace(rtype, elements=tuple(elems)))["Product"]
            results.append(
                {
                    "schema": schema,
                    "rows": rows,
                    "total_duration_micros": int((time.perf_counter() - start) * 1e6),
                    "stats": {"rows_inserted": 0, "rows_deleted": 0, "rows_updated": 0},
                }
            )
        return results

    # --- inspection and hotswap ----------------------------------------------------------------

    def rows(self, table: str) -> list[Row]:
        """A copy of a table's rows, in insertion order (test helper)."""
        t = self.store.table(table)
        return [t.copy_out(k, r) for k, r in t.rows.items()]

    def hotswap(
        self,
        table: str,
        columns: Mapping[str, AlgebraicType],
        *,
        defaults: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        """Change a table's columns as a module update would; rows are migrated in place.

        Columns kept by name (with the same type) keep their values; new columns take
        ``defaults[name]`` (``None`` for an Option), in existing rows and in later inserts that
        leave them out (so reducers written for the old layout keep working). No message
        announces the change (as upstream): later updates carry rows in the new layout, and the
        schema endpoint
        serves the new definition. Subscribed queries are re-checked against the new schema; a
        query set that no longer type-checks is dropped with ``SubscriptionError`` (request_id
        None). ``changes`` may replace other TableSpec fields (``primary_key``, ``indexes``…).
        """
        old_spec = self.specs[table]
        defaults = dict(defaults or {})
        new_cols = tuple(columns.items())
        names = {c for c, _ in new_cols}
        keep: dict[str, Any] = {
            k: v
            for k, v in {
                "primary_key": old_spec.primary_key if old_spec.primary_key in names else None,
                "unique": tuple(u for u in old_spec.unique if set(u) <= names),
                "indexes": tuple(i for i in old_spec.indexes if set(i) <= names),
                "auto_inc": tuple(a for a in old_spec.auto_inc if a in names),
                "defaults": tuple(
                    (c, v) for c, v in {**dict(old_spec.defaults), **defaults}.items() if c in names
                ),
            }.items()
            if k not in changes
        }
        new_spec = dataclasses.replace(old_spec, columns=new_cols, **keep, **changes)
        new_spec.validate()
        specs = dict(self.specs)
        specs[table] = new_spec
        schema = self.module.build_schema(specs)
        old_state = self.store.tables[table]
        new_state = TableState(schema.tables[table], schema.typespace)
        new_state.defaults = dict(new_spec.defaults)
        old_types = dict(old_spec.columns)
        for row in old_state.rows.values():
            new_row: dict[str, Any] = {}
            for c, ty in new_cols:
                if c in row and old_types.get(c) == ty:
                    new_row[c] = row[c]
                elif c in defaults:
                    new_row[c] = defaults[c]
                elif special_kind(schema.typespace.resolve(ty)) == "option":
                    new_row[c] = None
                else:
                    raise ValueError(f"hotswap {table!r}: column {c!r} needs a default for existing rows")
            key, norm = new_state.normalize(new_row)
            new_state.add(key, norm)
        for col, v in old_state.sequences.items():
            name = old_state.col_names[col]
            if name in new_state.col_names:
                new_state.sequences[new_state.col_names.index(name)] = v
        self.specs = specs
        self.schema = schema
        self.store.schema = schema
        self.store.tables[table] = new_state
        for name, tdef in schema.tables.items():
            self.store.tables[name].tdef = tdef
        self._args_codec = ValueCodec(schema.typespace, safe=False)
        logger.info("peer[%s]: hotswapped table %s", self.name, table)
        for sub in list(self.subscribers.values()):
            for qsid, queries in list(sub.query_sets.items()):
                try:
                    sub.query_sets[qsid] = [self.compile(q.text, sub.identity) for q in queries]
                except SqlError as exc:
                    del sub.query_sets[qsid]
                    sub.deliver(m.SubscriptionError(None, qsid, str(exc)))


def _query_set_updates(sub: Subscriber, diff: Mapping[str, TableDiff]) -> tuple[m.QuerySetUpdate, ...]:
    out = []
    for qsid, queries in sub.query_sets.items():
        by_table: dict[str, list[m.TableUpdateRows]] = {}
        for q in queries:
            d = diff.get(q.table)
            if not d:
                continue
            ins = [k for k, row in d.inserted.items() if q.matches(row)]
            dels = [k for k, row in d.deleted.items() if q.matches(row)]
            if ins or dels:
                by_table.setdefault(q.table, []).append(
                    m.PersistentTableRows(m.BsatnRowList.from_rows(ins), m.BsatnRowList.from_rows(dels))
                )
        if by_table:
            out.append(
                m.QuerySetUpdate(qsid, tuple(m.TableUpdate(t, tuple(rows)) for t, rows in by_table.items()))
            )
    return tuple(out)


def _bsatn_string(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(4, "little") + b
