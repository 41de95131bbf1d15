"""The client side of one SpacetimeDB WebSocket connection, as an h11-style protocol object.

Theory of operation
-------------------
Bytes in, typed events out; outgoing messages are returned as bytes, never sent. No clock is read
and no I/O is done here: the trio adapter (``gatewayd.services.db_ws``) owns the socket and time.

States::

    AWAITING_INITIAL --InitialConnection--> CONNECTED --connection_lost()/close()--> CLOSED
           |                                                     ^
           +-----------------connection_lost()-------------------+

Requests may be sent before ``InitialConnection`` arrives (PROTOCOL.md §5.1). Every request gets a
``request_id`` from one u32 counter; query sets get ids from their own counter. A query set moves
``PENDING -> APPLIED`` on SubscribeApplied, ``-> ENDING -> (gone)`` on Unsubscribe /
UnsubscribeApplied, and is dropped, with its rows, on a SubscriptionError.

Each server message is applied to this connection's :class:`~gatewayd.proto.cache.ClientCache`
atomically, and the resulting row changes travel inside the events. A ReducerResult for one of our
calls carries our own transaction's update (the server sends us no separate TransactionUpdate for
it), and is applied exactly like one.

When the connection is lost, every call still waiting for its result is reported as
:class:`CallLost` ("outcome unknown": it may have committed).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gatewayd.errors import DecodeError, LocalProtocolError, UpstreamProtocolError
from gatewayd.proto import messages as m
from gatewayd.proto.cache import ClientCache, RowChange
from gatewayd.proto.schema import ModuleSchema

U32_MAX: Final = 2**32 - 1


class ConnState(enum.Enum):
    AWAITING_INITIAL = "awaiting_initial"
    CONNECTED = "connected"
    CLOSED = "closed"


class QuerySetState(enum.Enum):
    PENDING = "pending"
    APPLIED = "applied"
    ENDING = "ending"


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    identity: str
    connection_id: str
    token: str


@dataclass(frozen=True, slots=True)
class SubscriptionApplied:
    query_set_id: int
    changes: list[RowChange]


@dataclass(frozen=True, slots=True)
class SubscriptionFailed:
    """The server refused (``request_id`` set) or later dropped (``None``) a query set."""

    query_set_id: int
    request_id: int | None
    error: str
    changes: list[RowChange]  # rows that went away with the set


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    query_set_id: int
    changes: list[RowChange]


@dataclass(frozen=True, slots=True)
class TransactionApplied:
    changes: list[RowChange]


@dataclass(frozen=True, slots=True)
class ReducerCommitted:
    request_id: int
    timestamp: int
    ret_value: bytes
    changes: list[RowChange]


@dataclass(frozen=True, slots=True)
class ReducerFailed:
    """The reducer ran and refused (``Err``): ``message`` is the module's own text, safe to show."""

    request_id: int
    timestamp: int
    message: str


@dataclass(frozen=True, slots=True)
class ReducerInternalError:
    """Panic, trap, out of energy, unknown reducer or bad arguments (``InternalError``)."""

    request_id: int
    timestamp: int
    message: str


@dataclass(frozen=True, slots=True)
class ProcedureReturned:
    request_id: int
    value: bytes


@dataclass(frozen=True, slots=True)
class ProcedureFailed:
    request_id: int
    message: str


@dataclass(frozen=True, slots=True)
class OneOffResult:
    request_id: int
    rows: dict[str, list[Any]] | None
    error: str | None


@dataclass(frozen=True, slots=True)
class CallLost:
    """The connection went away before this request's answer: the outcome is unknown."""

    request_id: int


CallOutcome = (
    ReducerCommitted
    | ReducerFailed
    | ReducerInternalError
    | ProcedureReturned
    | ProcedureFailed
    | OneOffResult
    | CallLost
)
Event = Connected | SubscriptionApplied | SubscriptionFailed | Unsubscribed | TransactionApplied | CallOutcome


@dataclass(slots=True)
class _QuerySet:
    query_set_id: int
    queries: tuple[str, ...]
    request_id: int
    state: QuerySetState = QuerySetState.PENDING


@dataclass(slots=True)
class _Pending:
    kind: str  # "reducer" | "procedure" | "one_off"
    name: str


@dataclass(slots=True)
class ClientConnection:
    """Protocol state for one connection. Sync methods only; safe to call from any task."""

    protocol: m.Protocol
    schema: ModuleSchema
    max_decompressed_bytes: int = 64 * 1024 * 1024
    state: ConnState = ConnState.AWAITING_INITIAL
    identity: str | None = None
    connection_id: str | None = None
    cache: ClientCache = field(init=False)
    query_sets: dict[int, _QuerySet] = field(default_factory=dict)
    pending: dict[int, _Pending] = field(default_factory=dict)
    messages_received: int = 0
    _next_request_id: int = 0
    _next_query_set_id: int = 0
    _framer: m.ClientFramer = field(init=False)

    def __post_init__(self) -> None:
        self.cache = ClientCache(self.schema)
        self._framer = m.ClientFramer(self.protocol)

    # --- outgoing ----------------------------------------------------------------------------

    def _request_id(self) -> int:
        rid = self._next_request_id
        self._next_request_id = (rid + 1) & U32_MAX
        return rid

    def _check_open(self) -> None:
        if self.state is ConnState.CLOSED:
            raise LocalProtocolError("the connection is closed")

    def _frame(self, msg: m.ClientMessage) -> bytes:
        (frame,) = self._framer.frames([msg])
        return frame

    def subscribe(self, queries: Sequence[str]) -> tuple[int, bytes]:
        """Register a query set; returns (query_set_id, payload to send)."""
        self._check_open()
        if not queries:
            raise LocalProtocolError("a query set needs at least one query")
        qsid = self._next_query_set_id
        while qsid in self.query_sets:  # never reuse a live id: the server closes with 1011
            qsid = (qsid + 1) & U32_MAX
        self._next_query_set_id = (qsid + 1) & U32_MAX
        rid = self._request_id()
        self.query_sets[qsid] = _QuerySet(qsid, tuple(queries), rid)
        return qsid, self._frame(m.Subscribe(rid, qsid, tuple(queries)))

    def unsubscribe(self, query_set_id: int) -> bytes:
        self._check_open()
        qs = self.query_sets.get(query_set_id)
        if qs is None or qs.state is not QuerySetState.APPLIED:
            raise LocalProtocolError(f"query set {query_set_id} is not applied")
        qs.state = QuerySetState.ENDING
        return self._frame(m.Unsubscribe(self._request_id(), query_set_id, send_dropped_rows=True))

    def call_reducer(self, name: str, args: bytes) -> tuple[int, bytes]:
        self._check_open()
        rid = self._request_id()
        self.pending[rid] = _Pending("reducer", name)
        return rid, self._frame(m.CallReducer(rid, name, args))

    def call_procedure(self, name: str, args: bytes) -> tuple[int, bytes]:
        self._check_open()
        rid = self._request_id()
        self.pending[rid] = _Pending("procedure", name)
        return rid, self._frame(m.CallProcedure(rid, name, args))

    def one_off_query(self, sql: str) -> tuple[int, bytes]:
        self._check_open()
        rid = self._request_id()
        self.pending[rid] = _Pending("one_off", sql)
        return rid, self._frame(m.OneOffQuery(rid, sql))

    # --- incoming ----------------------------------------------------------------------------

    def receive_payload(self, payload: bytes) -> list[Event]:
        """One binary WebSocket payload from the server -> events, in order.

        Raises:
            DecodeError: the payload (or a row in it) could not be decoded. Nothing from the
                failing message was applied; earlier messages of a v3 payload were.
            UpstreamProtocolError: the server broke a protocol rule (unknown request id, ...).
            Either carries ``partial_events``: the events of the messages before the bad one.
        """
        if self.state is ConnState.CLOSED:
            return []
        msgs = m.decode_server_payload(
            payload, self.protocol, max_decompressed_bytes=self.max_decompressed_bytes
        )
        events: list[Event] = []
        for msg in msgs:
            self.messages_received += 1
            try:
                events.extend(self._handle(msg))
            except (DecodeError, UpstreamProtocolError) as exc:
                # Earlier messages of this payload were applied; their events must not be lost.
                exc.partial_events = events  # type: ignore[attr-defined]
                raise
        return events

    def _handle(self, msg: m.ServerMessage) -> list[Event]:
        cache = self.cache
        if isinstance(msg, m.TransactionUpdate):
            return [TransactionApplied(self._apply_tx(msg))]
        if isinstance(msg, m.ReducerResult):
            return [self._reducer_result(msg)]
        if isinstance(msg, m.InitialConnection):
            if self.state is not ConnState.AWAITING_INITIAL:
                raise UpstreamProtocolError("InitialConnection received twice")
            self.state = ConnState.CONNECTED
            self.identity, self.connection_id = msg.identity, msg.connection_id
            return [Connected(msg.identity, msg.connection_id, msg.token)]
        if isinstance(msg, m.SubscribeApplied):
            qs = self.query_sets.get(msg.query_set_id)
            if qs is None or qs.state is not QuerySetState.PENDING:
                raise UpstreamProtocolError(f"SubscribeApplied for unknown query set {msg.query_set_id}")
            decoded = cache.decode_query_rows(msg.rows)
            qs.state = QuerySetState.APPLIED
            return [SubscriptionApplied(msg.query_set_id, cache.apply([(msg.query_set_id, decoded)]))]
        if isinstance(msg, m.UnsubscribeApplied):
            qs = self.query_sets.pop(msg.query_set_id, None)
            if qs is None:
                raise UpstreamProtocolError(f"UnsubscribeApplied for unknown query set {msg.query_set_id}")
            # The rows we hold for the set are authoritative; SendDroppedRows only confirms them.
            return [Unsubscribed(msg.query_set_id, cache.drop_query_set(msg.query_set_id))]
        if isinstance(msg, m.SubscriptionError):
            qs = self.query_sets.pop(msg.query_set_id, None)
            if qs is None and msg.request_id is not None:
                # An Unsubscribe for an id the server no longer knows: nothing to drop.
                return [SubscriptionFailed(msg.query_set_id, msg.request_id, msg.error, [])]
            if qs is None:
                raise UpstreamProtocolError(f"SubscriptionError for unknown query set {msg.query_set_id}")
            changes = cache.drop_query_set(msg.query_set_id)
            return [SubscriptionFailed(msg.query_set_id, msg.request_id, msg.error, changes)]
        if isinstance(msg, m.OneOffQueryResult):
            self._take(msg.request_id, "one_off")
            if msg.error is not None:
                return [OneOffResult(msg.request_id, None, msg.error)]
            rows: dict[str, list[Any]] = {}
            assert msg.rows is not None
            for table, inserted, _deleted, _events in cache.decode_query_rows(msg.rows):
                rows.setdefault(table, []).extend(item[2] for item in inserted)
            return [OneOffResult(msg.request_id, rows, None)]
        assert isinstance(msg, m.ProcedureResult)
        self._take(msg.request_id, "procedure")
        if isinstance(msg.status, m.ProcedureReturned):
            return [ProcedureReturned(msg.request_id, msg.status.value)]
        return [ProcedureFailed(msg.request_id, msg.status.message)]

    def _take(self, rid: int, kind: str) -> _Pending:
        p = self.pending.pop(rid, None)
        if p is None or p.kind != kind:
            raise UpstreamProtocolError(f"answer to a {kind} request {rid} we did not make")
        return p

    def _apply_tx(self, tx: m.TransactionUpdate) -> list[RowChange]:
        cache = self.cache
        per_set = []
        for qs in tx.query_sets:
            if qs.query_set_id not in self.query_sets:
                # Updates may race an UnsubscribeApplied; a set we never had is a protocol error.
                raise UpstreamProtocolError(f"TransactionUpdate for unknown query set {qs.query_set_id}")
            per_set.append((qs.query_set_id, cache.decode_update(qs)))
        return cache.apply(per_set)

    def _reducer_result(self, msg: m.ReducerResult) -> CallOutcome:
        self._take(msg.request_id, "reducer")
        out = msg.outcome
        if isinstance(out, m.ReducerOk):
            return ReducerCommitted(
                msg.request_id, msg.timestamp, out.ret_value, self._apply_tx(out.transaction_update)
            )
        if isinstance(out, m.ReducerOkEmpty):
            return ReducerCommitted(msg.request_id, msg.timestamp, b"", [])
        if isinstance(out, m.ReducerErr):
            return ReducerFailed(msg.request_id, msg.timestamp, out.message)
        return ReducerInternalError(msg.request_id, msg.timestamp, out.message)

    # --- teardown ----------------------------------------------------------------------------

    def connection_lost(self) -> list[CallLost]:
        """The socket is gone: every unanswered call's outcome is unknown."""
        self.state = ConnState.CLOSED
        lost = [CallLost(rid) for rid in self.pending]
        self.pending.clear()
        return lost

    @property
    def all_applied(self) -> bool:
        return all(q.state is QuerySetState.APPLIED for q in self.query_sets.values())


__all__ = [
    "CallLost",
    "CallOutcome",
    "ClientConnection",
    "ConnState",
    "Connected",
    "DecodeError",
    "Event",
    "OneOffResult",
    "ProcedureFailed",
    "ProcedureReturned",
    "QuerySetState",
    "ReducerCommitted",
    "ReducerFailed",
    "ReducerInternalError",
    "SubscriptionApplied",
    "SubscriptionFailed",
    "TransactionApplied",
    "Unsubscribed",
]
