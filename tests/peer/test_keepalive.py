"""Server pings and the idle timeout, on virtual time over in-memory streams (no sockets)."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Request

from gatewayd.peer import Peer, open_peer
from gatewayd.proto import messages as m


@dataclass
class RawClient:
    """A wsproto client on one end of a memory stream; records what it sees and when."""

    stream: trio.abc.Stream
    ws: WSConnection = field(default_factory=lambda: WSConnection(ConnectionType.CLIENT))
    answer_pings: bool = True
    pings: list[float] = field(default_factory=list)
    messages: list[tuple[float, list[m.ServerMessage]]] = field(default_factory=list)
    eof_at: float | None = None
    close_code: int | None = None

    async def handshake(self) -> None:
        await self.stream.send_all(
            self.ws.send(
                Request(
                    host="peer",
                    target="/v1/database/demo/subscribe?compression=None",
                    subprotocols=["v2.bsatn.spacetimedb"],
                )
            )
        )

    async def send(self, msg: m.ClientMessage) -> None:
        await self.stream.send_all(self.ws.send(Message(data=m.encode_client_message(msg))))

    async def run(self) -> None:
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof_at = trio.current_time()
                return
            self.ws.receive_data(bytes(data))
            for ev in self.ws.events():
                if isinstance(ev, AcceptConnection):
                    assert ev.subprotocol == "v2.bsatn.spacetimedb"
                elif isinstance(ev, Ping):
                    self.pings.append(trio.current_time())
                    if self.answer_pings:
                        await self.stream.send_all(self.ws.send(ev.response()))
                elif isinstance(ev, BytesMessage):
                    self.messages.append(
                        (trio.current_time(), m.decode_server_payload(bytes(ev.data), m.Protocol.V2))
                    )
                elif isinstance(ev, CloseConnection):
                    self.close_code = ev.code


async def start(peer: Peer, nursery: trio.Nursery, *, answer_pings: bool) -> RawClient:
    client_end, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(peer.serve_stream, server_end)
    client = RawClient(client_end, answer_pings=answer_pings)
    await client.handshake()
    nursery.start_soon(client.run)
    await trio.testing.wait_all_tasks_blocked()
    assert isinstance(client.messages[0][1][0], m.InitialConnection)
    return client


async def test_idle_client_is_pinged_at_15s_and_dropped_at_30s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_peer("demo", listen=False) as peer, trio.open_nursery() as nursery:
        t0 = trio.current_time()
        client = await start(peer, nursery, answer_pings=False)
        with trio.fail_after(100):
            await peer.wait_connection_count(0)
        await trio.testing.wait_all_tasks_blocked()
        assert [t - t0 for t in client.pings] == [15.0]  # no second ping: the first is unanswered
        assert client.eof_at is not None
        assert client.eof_at - t0 == 30.0
        assert client.close_code is None  # dropped without a close frame, as upstream
        nursery.cancel_scope.cancel()


async def test_answering_pings_keeps_the_connection(autojump_clock: trio.testing.MockClock) -> None:
    async with open_peer("demo", listen=False) as peer, trio.open_nursery() as nursery:
        t0 = trio.current_time()
        client = await start(peer, nursery, answer_pings=True)
        await trio.sleep(200)
        assert [round(t - t0) for t in client.pings] == list(range(15, 200, 15))
        assert client.eof_at is None
        assert len(peer.connections) == 1
        nursery.cancel_scope.cancel()


async def test_any_received_frame_resets_the_idle_timer(autojump_clock: trio.testing.MockClock) -> None:
    async with open_peer("demo", listen=False) as peer, trio.open_nursery() as nursery:
        t0 = trio.current_time()
        client = await start(peer, nursery, answer_pings=False)
        for i in range(4):
            await trio.sleep_until(t0 + 20 * (i + 1))
            await client.send(m.OneOffQuery(i, "SELECT * FROM tenant"))
        with trio.fail_after(100):
            await peer.wait_connection_count(0)
        assert client.eof_at is not None
        assert client.eof_at - t0 == 80 + 30
        nursery.cancel_scope.cancel()


async def test_intervals_are_settable(autojump_clock: trio.testing.MockClock) -> None:
    async with (
        open_peer("demo", listen=False, ping_interval_s=2.0, idle_timeout_s=5.0) as peer,
        trio.open_nursery() as nursery,
    ):
        t0 = trio.current_time()
        client = await start(peer, nursery, answer_pings=False)
        with trio.fail_after(100):
            await peer.wait_connection_count(0)
        assert [t - t0 for t in client.pings] == [2.0]
        assert client.eof_at is not None
        assert client.eof_at - t0 == 5.0
        nursery.cancel_scope.cancel()


async def test_stalled_connections_neither_ping_nor_time_out(autojump_clock: trio.testing.MockClock) -> None:
    async with open_peer("demo", listen=False) as peer, trio.open_nursery() as nursery:
        t0 = trio.current_time()
        client = await start(peer, nursery, answer_pings=False)
        peer.stall()
        await trio.sleep(300)
        assert client.pings == []
        assert client.eof_at is None
        peer.unstall()
        await trio.sleep(16)
        assert [round(t - t0) for t in client.pings] == [315]
        nursery.cancel_scope.cancel()


async def test_refused_upgrades_expire_on_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    async with open_peer("demo", listen=False) as peer:
        peer.refuse_upgrades(10.0)
        assert peer.faults.upgrade_refusal() is not None
        await trio.sleep(10)
        assert peer.faults.upgrade_refusal() is None
