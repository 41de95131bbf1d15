"""Helpers for the dev peer tests: a WebSocket client made of trio-websocket + our messages module.

The client is deliberately *not* gatewayd's real client (gatewayd/services): these tests check the
peer, and must not depend on the code the peer is meant to test.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from gatewayd.peer import Peer, open_peer
from gatewayd.peer.database import PeerDatabase
from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import ValueCodec

T = TypeVar("T")
WAIT_S = 5.0  # real-time guard for anything a test waits on


class PeerClient:
    """A thin protocol client: send client messages, receive decoded server messages."""

    def __init__(self, ws: WebSocketConnection, db: PeerDatabase) -> None:
        self.ws = ws
        self.db = db
        self.protocol = m.Protocol(ws.subprotocol)
        self.payloads: list[list[m.ServerMessage]] = []
        self._pending: deque[m.ServerMessage] = deque()
        self._rid = 100
        self.initial: m.InitialConnection | None = None

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def recv_payload(self, limit_s: float = WAIT_S) -> list[m.ServerMessage]:
        with trio.fail_after(limit_s):
            raw = await self.ws.get_message()
        assert isinstance(raw, bytes), "the peer must only send binary frames"
        msgs = m.decode_server_payload(raw, self.protocol)
        self.payloads.append(msgs)
        return msgs

    async def recv(self, limit_s: float = WAIT_S) -> m.ServerMessage:
        while not self._pending:
            self._pending.extend(await self.recv_payload(limit_s))
        return self._pending.popleft()

    async def expect(self, kind: type[T], limit_s: float = WAIT_S) -> T:
        msg = await self.recv(limit_s)
        assert isinstance(msg, kind), f"expected {kind.__name__}, got {msg!r:.300}"
        return msg

    async def nothing_within(self, seconds: float) -> None:
        """Assert no message arrives within ``seconds``."""
        assert not self._pending, f"unexpected message {self._pending[0]!r:.200}"
        with trio.move_on_after(seconds):
            msg = await self.recv(limit_s=seconds + 1)
            pytest.fail(f"unexpected message {msg!r:.300}")

    async def send(self, *msgs: m.ClientMessage) -> None:
        frames = [m.encode_client_message(x) for x in msgs]
        if self.protocol is m.Protocol.V3:
            await self.ws.send_message(b"".join(frames))
        else:
            for f in frames:
                await self.ws.send_message(f)

    async def subscribe(self, qsid: int, *queries: str) -> m.SubscribeApplied | m.SubscriptionError:
        rid = self.next_rid()
        await self.send(m.Subscribe(rid, qsid, queries))
        msg = await self.recv()
        assert isinstance(msg, m.SubscribeApplied | m.SubscriptionError), msg
        assert msg.request_id == rid
        return msg

    async def call(self, reducer: str, args: Mapping[str, Any] | None = None) -> m.ReducerResult:
        rid = self.next_rid()
        spec = self.db.module.reducers[reducer]
        raw = ValueCodec(self.db.schema.typespace).encode(spec.params_type, dict(args or {}))
        await self.send(m.CallReducer(rid, reducer, raw))
        res = await self.expect(m.ReducerResult)
        assert res.request_id == rid
        return res

    async def closed(self, limit_s: float = WAIT_S) -> tuple[int, str | None]:
        """Wait for the connection to end; returns (close code, reason). 1006 = no close frame."""
        with trio.fail_after(limit_s):
            while True:
                try:
                    await self.ws.get_message()
                except ConnectionClosed as exc:
                    if exc.reason is None:
                        return 1006, None
                    return exc.reason.code, exc.reason.reason

    def rows(self, table: str, rows: m.BsatnRowList) -> list[dict[str, Any]]:
        t = self.db.schema.tables[table]
        values, _raw = ValueCodec(self.db.schema.typespace, safe=False).decode_rows(
            t.row_type, rows.rows_data
        )
        return values


def rows_of(client: PeerClient, qr: m.QueryRows, table: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for t in qr.tables:
        if t.table == table:
            out += client.rows(table, t.rows)
    return out


def update_rows(
    client: PeerClient, tx: m.TransactionUpdate, table: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inserts, deletes) of ``table`` across all query sets of an update."""
    ins: list[dict[str, Any]] = []
    dels: list[dict[str, Any]] = []
    for qs in tx.query_sets:
        for tu in qs.tables:
            if tu.table_name != table:
                continue
            for r in tu.rows:
                assert isinstance(r, m.PersistentTableRows)
                ins += client.rows(table, r.inserts)
                dels += client.rows(table, r.deletes)
    return ins, dels


@asynccontextmanager
async def connect(
    peer: Peer,
    *,
    token: str | None = None,
    token_in_query: bool = False,
    protocols: tuple[str, ...] = m.OFFERED_PROTOCOLS,
    compression: str | None = "None",
    database: str | None = None,
    expect_initial: bool = True,
) -> AsyncIterator[PeerClient]:
    """Open a WebSocket to the peer; by default reads and checks InitialConnection first."""
    db = peer.database(database)
    query: dict[str, str] = {}
    if compression is not None:
        query["compression"] = compression
    headers: list[tuple[bytes, bytes]] = []
    if token is not None:
        if token_in_query:
            query["token"] = token
        else:
            headers.append((b"Authorization", f"Bearer {token}".encode()))
    url = peer.subscribe_url(db.name, **query)
    async with open_websocket_url(
        url,
        subprotocols=list(protocols),
        extra_headers=headers,
        connect_timeout=WAIT_S,
        disconnect_timeout=2,
    ) as ws:
        try:
            client = PeerClient(ws, db)
            if expect_initial:
                client.initial = await client.expect(m.InitialConnection)
            yield client
        finally:
            # trio-websocket's client leaves its socket open when the *server* ends the
            # connection (it waits for a TCP close it then never performs); close it here so
            # the ResourceWarning (an error under our filterwarnings) does not fire.
            await trio.aclose_forcefully(ws._stream)


def handshake_header(client: PeerClient, name: str) -> str:
    for k, v in client.ws.handshake_headers:
        if k.decode().lower() == name:
            return v.decode()
    raise KeyError(name)


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    async with open_peer("demo", close_timeout_s=0.5) as p:
        yield p


WS_UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Protocol": "v3.bsatn.spacetimedb, v2.bsatn.spacetimedb",
}


async def refused_upgrade(peer: Peer, *, token: str | None = None, database: str = "demo") -> tuple[int, str]:
    """Attempt an upgrade that is expected to be refused; returns (status, body).

    (trio-websocket leaks its socket when a handshake is rejected, so refusals are checked over
    plain HTTP.)
    """
    import httpx

    headers = dict(WS_UPGRADE_HEADERS)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(base_url=peer.base_url, trust_env=False) as client:
        r = await client.get(f"/v1/database/{database}/subscribe", headers=headers)
    assert r.status_code != 101
    return r.status_code, r.text
