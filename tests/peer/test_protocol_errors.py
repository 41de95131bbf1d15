"""Malformed input: PROTOCOL.md §5.7 behaviour (close 1011 with the reason), never a crash."""

from __future__ import annotations

import httpx
import pytest
import trio

from gatewayd.peer import Peer, open_peer
from gatewayd.proto import messages as m

from .conftest import connect


async def still_serving(peer: Peer) -> None:
    """A fresh client can still subscribe: the peer survived."""
    async with connect(peer) as c:
        applied = await c.subscribe(1, "SELECT * FROM tenant")
        assert isinstance(applied, m.SubscribeApplied)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"\x09", "unknown ClientMessage tag 9"),
        (b"\x00\x01\x00", "truncated"),
        (b"\x03\x01\x00\x00\x00\x07\x01\x00\x00\x00x\x00\x00\x00\x00", "call flags must be 0"),
        (b"\x01\x01\x00\x00\x00\x01\x00\x00\x00\x05", "UnsubscribeFlags"),
        (b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\xff", "count"),
        (b"\x02\x01\x00\x00\x00\x02\x00\x00\x00\xff\xfe", "UTF-8"),
        (b"", "empty payload"),
    ],
)
async def test_undecodable_payloads_close_with_1011(peer: Peer, payload: bytes, needle: str) -> None:
    async with connect(peer) as c:
        await c.ws.send_message(payload)
        code, reason = await c.closed()
        assert code == 1011
        assert reason is not None
        assert needle in reason
    await still_serving(peer)


async def test_text_frames_close_with_1011(peer: Peer) -> None:
    async with connect(peer) as c:
        await c.ws.send_message('{"Subscribe": {}}')
        code, reason = await c.closed()
        assert code == 1011
        assert reason is not None
        assert "text" in reason
    await still_serving(peer)


async def test_v3_valid_messages_before_a_bad_one_are_processed(peer: Peer) -> None:
    async with connect(peer) as c:
        good = m.encode_client_message(m.OneOffQuery(1, "SELECT * FROM tenant"))
        await c.ws.send_message(good + b"\x07")
        r = await c.expect(m.OneOffQueryResult)
        assert r.request_id == 1
        code, _reason = await c.closed()
        assert code == 1011


async def test_v2_ignores_trailing_bytes(peer: Peer) -> None:
    async with connect(peer, protocols=("v2.bsatn.spacetimedb",)) as c:
        await c.ws.send_message(
            m.encode_client_message(m.OneOffQuery(1, "SELECT * FROM tenant")) + b"\x07\x07"
        )
        r = await c.expect(m.OneOffQueryResult)
        assert r.request_id == 1
        assert r.rows is not None


async def test_reused_live_query_set_id_closes_with_1011(peer: Peer) -> None:
    async with connect(peer) as c:
        await c.subscribe(5, "SELECT * FROM tenant")
        await c.send(m.Subscribe(2, 5, ("SELECT * FROM actor",)))
        code, reason = await c.closed()
        assert code == 1011
        assert reason is not None
        assert "already exists" in reason
    await still_serving(peer)


async def test_oversized_messages_are_refused() -> None:
    async with open_peer("demo", max_message_bytes=10_000, close_timeout_s=0.5) as peer:
        async with connect(peer) as c:
            big = m.encode_client_message(
                m.OneOffQuery(1, "SELECT * FROM tenant WHERE id = '" + "x" * 20_000 + "'")
            )
            await c.ws.send_message(big)
            code, reason = await c.closed()
            assert code == 1009
            assert reason is not None
            assert "too long" in reason
        await still_serving(peer)


async def test_huge_sql_is_a_subscription_error_not_a_crash(peer: Peer) -> None:
    async with connect(peer) as c:
        deep = "SELECT * FROM tenant WHERE " + "(" * 500 + "id = 'a'" + ")" * 500
        err = await c.subscribe(1, deep)
        assert isinstance(err, m.SubscriptionError)
        assert "deep" in err.error
        long = "SELECT * FROM tenant WHERE " + " OR ".join(["id = 'a'"] * 10_000)
        err = await c.subscribe(2, long)
        assert isinstance(err, m.SubscriptionError)
        assert "longer than" in err.error


async def test_incoming_queue_overflow_closes_with_1013() -> None:
    async with open_peer("demo", incoming_queue_count=2, close_timeout_s=0.5) as peer:
        peer.delay_reducer("bump_canary", 1.0)  # the handler is busy: the queue fills up
        async with connect(peer) as c:
            await c.send(*(m.CallReducer(i, "bump_canary", b"\x01\x00\x00\x00x") for i in range(10)))
            code, reason = await c.closed()
            assert code == 1013
            assert reason == "too many requests"


async def test_protocol_violations_at_the_frame_level(peer: Peer) -> None:
    # an unmasked client frame is a WebSocket protocol error (wsproto closes with 1002)
    stream = await trio.open_tcp_stream(peer.host, peer.port)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    await stream.send_all(
        (
            "GET /v1/database/demo/subscribe?compression=None HTTP/1.1\r\n"
            f"Host: {peer.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: v2.bsatn.spacetimedb\r\n\r\n"
        ).encode()
    )
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101 ")
    await stream.send_all(b"\x82\x01\x00")  # FIN+binary, unmasked, 1 byte
    data = head.split(b"\r\n\r\n", 1)[1]
    with trio.fail_after(5):
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    # the peer sent InitialConnection, then a close frame with 1002, then closed the socket
    frames = _parse_frames(data)
    assert frames[0][0] == 0x2
    assert frames[0][1][:2] == b"\x00\x00"
    assert frames[-1][0] == 0x8
    assert int.from_bytes(frames[-1][1][:2], "big") == 1002
    await stream.aclose()
    await still_serving(peer)


async def test_garbage_http_gets_400_and_the_peer_survives(peer: Peer) -> None:
    stream = await trio.open_tcp_stream(peer.host, peer.port)
    await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    with trio.fail_after(5):
        resp = await stream.receive_some(4096)
    assert resp.startswith(b"HTTP/1.1 400")
    await stream.aclose()
    async with httpx.AsyncClient() as client:
        r = await client.get(peer.base_url + "/v1/ping")
        assert r.status_code == 200


def _parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        opcode = data[pos] & 0x0F
        n = data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif n == 127:
            n = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
        out.append((opcode, data[pos : pos + n]))
        pos += n
    return out
