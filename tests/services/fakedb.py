"""A scripted SpacetimeDB stand-in over in-memory streams, for MockClock tests of the client.

It is deliberately small and separate from the dev peer (gatewayd.peer): these tests pin the
client's behaviour byte by byte, with faults the test controls exactly (freeze a socket so pongs
stop, refuse upgrades, close before InitialConnection, send garbage, hot-swap the schema).

Query strings understood: ``SELECT * FROM <table>`` optionally with ``WHERE <col> = '<text>'``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.lowlevel
import trio.testing
import trio_websocket

from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import ValueCodec
from gatewayd.proto.sats import STRING
from gatewayd.proto.schema import ModuleSchema
from gatewayd.services.db_ws import UpstreamTarget

_QUERY = re.compile(r"SELECT \* FROM (\w+)(?: WHERE (\w+) = '([^']*)')?")


class FreezableStream(trio.abc.Stream):
    """A stream whose reads can be frozen: the server stops hearing (and answering) anything."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.thawed = trio.Event()
        self.thawed.set()

    def freeze(self) -> None:
        self.thawed = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self.thawed.wait()
        data = await self.inner.receive_some(max_bytes)
        await self.thawed.wait()  # frozen while we were waiting: hold the bytes back
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class FakeConn:
    db: FakeDb
    ws: trio_websocket.WebSocketConnection
    stream: FreezableStream
    protocol: m.Protocol
    token: str | None
    sets: dict[int, list[tuple[str, str | None, str | None]]] = field(default_factory=dict)
    received: list[m.ClientMessage] = field(default_factory=list)
    muted: bool = False

    def matches(self, table: str, row: dict[str, Any]) -> list[int]:
        out = []
        for qsid, qs in self.sets.items():
            for t, col, val in qs:
                if t == table and (col is None or row.get(col) == val):
                    out.append(qsid)
                    break
        return out

    async def send(self, *msgs: m.ServerMessage) -> None:
        await self.ws.send_message(m.encode_server_payload(list(msgs), self.protocol))

    async def cut(self) -> None:
        """Drop the TCP connection without a close frame."""
        await self.stream.inner.aclose()


Reducer = Callable[["FakeDb", dict[str, Any], "FakeConn"], str | None]


class FakeDb:
    def __init__(self, schema: ModuleSchema, *, protocol: m.Protocol = m.Protocol.V2) -> None:
        self.schema = schema
        self.codec = ValueCodec(schema.typespace)
        self.protocol = protocol
        self.rows: dict[str, dict[Any, dict[str, Any]]] = {t: {} for t in schema.tables}
        self.conns: list[FakeConn] = []
        self.attempts = 0
        self.attempt_times: list[float] = []
        self.tokens_seen: list[str | None] = []
        self.reject_status: int | None = None
        self.refuse_next = 0
        self.close_before_initial = False
        self.reducers: dict[str, Reducer] = {}
        self.hold_results: trio.Event | None = None
        self.schema_fetches = 0
        self._nursery: trio.Nursery | None = None
        self.identity = "c2" + "00" * 31
        self.garbage: bytes | None = None
        self._pending_tx: tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, Any]]] = ([], [])

    # --- setup -----------------------------------------------------------------------------

    def target(self) -> UpstreamTarget:
        return UpstreamTarget("http://fake.invalid:3000", "testdb")

    async def schema_source(self, token: str | None) -> ModuleSchema:
        self.schema_fetches += 1
        await trio.lowlevel.checkpoint()
        return self.schema

    def opener(self, nursery: trio.Nursery) -> Callable[[UpstreamTarget], Any]:
        self._nursery = nursery

        async def open_stream(target: UpstreamTarget) -> trio.abc.Stream:
            client, server = trio.testing.memory_stream_pair()
            self.attempts += 1
            self.attempt_times.append(trio.current_time())
            nursery.start_soon(self._serve, FreezableStream(server))
            return client

        return open_stream

    # --- data ------------------------------------------------------------------------------

    def pk(self, table: str, row: dict[str, Any]) -> Any:
        t = self.schema.tables[table]
        col = t.pk_column
        return row[col] if col else tuple(sorted(row.items()))

    def encode(self, table: str, row: dict[str, Any]) -> bytes:
        return self.codec.encode(self.schema.tables[table].row_type, row)

    def put(self, table: str, row: dict[str, Any]) -> None:
        """Change data without telling anyone (as if it happened while we were disconnected)."""
        self.rows[table][self.pk(table, row)] = row

    def remove(self, table: str, pk: Any) -> None:
        self.rows[table].pop(pk, None)

    async def commit(
        self,
        inserts: list[tuple[str, dict[str, Any]]] = (),  # type: ignore[assignment]
        deletes: list[tuple[str, Any]] = (),  # type: ignore[assignment]
        caller: FakeConn | None = None,
        caller_rid: int | None = None,
    ) -> m.TransactionUpdate:
        """Apply a transaction; send TransactionUpdate to every affected non-caller."""
        deleted_rows = []
        for table, pk in deletes:
            old = self.rows[table].pop(pk, None)
            if old is not None:
                deleted_rows.append((table, old))
        for table, row in inserts:
            self.rows[table][self.pk(table, row)] = row
        caller_tx = m.TransactionUpdate(())
        for conn in list(self.conns):
            tx = self._tx_for(conn, [(t, r) for t, r in inserts], deleted_rows)
            if conn is caller:
                caller_tx = tx
                continue
            if tx.query_sets and not conn.muted:
                with contextlib.suppress(
                    trio_websocket.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    await conn.send(tx)
        return caller_tx

    def _tx_for(
        self,
        conn: FakeConn,
        inserts: list[tuple[str, dict[str, Any]]],
        deletes: list[tuple[str, dict[str, Any]]],
    ) -> m.TransactionUpdate:
        per: dict[int, dict[str, tuple[list[bytes], list[bytes]]]] = {}
        for table, row in inserts:
            for qsid in conn.matches(table, row):
                per.setdefault(qsid, {}).setdefault(table, ([], []))[0].append(self.encode(table, row))
        for table, row in deletes:
            for qsid in conn.matches(table, row):
                per.setdefault(qsid, {}).setdefault(table, ([], []))[1].append(self.encode(table, row))
        return m.TransactionUpdate(
            tuple(
                m.QuerySetUpdate(
                    qsid,
                    tuple(
                        m.TableUpdate(
                            t,
                            (
                                m.PersistentTableRows(
                                    m.BsatnRowList.from_rows(i), m.BsatnRowList.from_rows(d)
                                ),
                            ),
                        )
                        for t, (i, d) in tables.items()
                    ),
                )
                for qsid, tables in sorted(per.items())
            )
        )

    async def broadcast_raw(self, payload: bytes) -> None:
        for conn in list(self.conns):
            await conn.ws.send_message(payload)

    async def cut_all(self) -> None:
        for conn in list(self.conns):
            await conn.cut()

    # --- serving ---------------------------------------------------------------------------

    async def _serve(self, stream: FreezableStream) -> None:
        assert self._nursery is not None
        async with trio.open_nursery() as nursery:
            try:
                req = await trio_websocket.wrap_server_stream(nursery, stream)
            except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                return
            token = None
            for k, v in req.headers:
                if k.lower() == b"authorization" and v.startswith(b"Bearer "):
                    token = v[7:].decode()
            self.tokens_seen.append(token)
            if self.reject_status is not None or self.refuse_next > 0:
                self.refuse_next = max(0, self.refuse_next - 1)
                status = self.reject_status or 503
                await req.reject(status, body=b"refused by fake")
                return
            proto = self.protocol.value if self.protocol.value in req.proposed_subprotocols else None
            ws = await req.accept(subprotocol=proto)
            conn = FakeConn(self, ws, stream, self.protocol, token)
            if self.close_before_initial:
                await stream.inner.aclose()
                return
            self.conns.append(conn)
            try:
                await conn.send(
                    m.InitialConnection(self.identity, "00" * 15 + f"{len(self.conns):02x}", token or "anon")
                )
                if self.garbage is not None:
                    await ws.send_message(self.garbage)
                while True:
                    payload = await ws.get_message()
                    assert isinstance(payload, bytes)
                    for msg in m.decode_client_payload(payload, self.protocol):
                        conn.received.append(msg)
                        await self._handle(conn, msg)
            except (
                trio_websocket.ConnectionClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ):
                pass
            finally:
                if conn in self.conns:
                    self.conns.remove(conn)
                nursery.cancel_scope.cancel()

    def _query_rows(self, queries: list[tuple[str, str | None, str | None]]) -> m.QueryRows:
        tables = []
        for t, col, val in queries:
            rows = [self.encode(t, r) for r in self.rows[t].values() if col is None or r.get(col) == val]
            tables.append(m.SingleTableRows(t, m.BsatnRowList.from_rows(rows)))
        return m.QueryRows(tuple(tables))

    async def _handle(self, conn: FakeConn, msg: m.ClientMessage) -> None:
        if isinstance(msg, m.Subscribe):
            parsed = []
            for q in msg.query_strings:
                mt = _QUERY.fullmatch(q)
                if mt is None or mt.group(1) not in self.rows:
                    await conn.send(m.SubscriptionError(msg.request_id, msg.query_set_id, f"bad query {q!r}"))
                    return
                parsed.append((mt.group(1), mt.group(2), mt.group(3)))
            conn.sets[msg.query_set_id] = parsed
            await conn.send(m.SubscribeApplied(msg.request_id, msg.query_set_id, self._query_rows(parsed)))
        elif isinstance(msg, m.Unsubscribe):
            parsed = conn.sets.pop(msg.query_set_id)
            rows = self._query_rows(parsed) if msg.send_dropped_rows else None
            await conn.send(m.UnsubscribeApplied(msg.request_id, msg.query_set_id, rows))
        elif isinstance(msg, m.CallReducer):
            fn = self.reducers.get(msg.reducer)
            if fn is None:
                await conn.send(
                    m.ReducerResult(
                        msg.request_id, 0, m.ReducerInternalError(f"no such reducer {msg.reducer}")
                    )
                )
                return
            args = self.codec.decode(self.schema.reducers[msg.reducer].params, msg.args)
            if self.hold_results is not None:
                await self.hold_results.wait()
            error = fn(self, args, conn)
            if error is not None:
                err = m.ReducerErr(ValueCodec().encode(STRING, error))
                await conn.send(m.ReducerResult(msg.request_id, 1, err))
                return
            pending = self._pending_tx
            self._pending_tx = ([], [])
            tx = await self.commit(pending[0], pending[1], caller=conn)
            await conn.send(m.ReducerResult(msg.request_id, 1, m.ReducerOk(b"", tx)))
        elif isinstance(msg, m.OneOffQuery):
            mt = _QUERY.fullmatch(msg.query_string)
            if mt is None:
                await conn.send(m.OneOffQueryResult(msg.request_id, error="bad query"))
            else:
                await conn.send(
                    m.OneOffQueryResult(
                        msg.request_id,
                        rows=self._query_rows([(mt.group(1), mt.group(2), mt.group(3))]),
                    )
                )

    # helpers for reducers
    def tx_insert(self, table: str, row: dict[str, Any]) -> None:
        self._pending_tx[0].append((table, row))

    def tx_delete(self, table: str, pk: Any) -> None:
        self._pending_tx[1].append((table, pk))
