"""Fault injection: what a client observes in each mode."""

from __future__ import annotations

import httpx
import pytest
import trio

from gatewayd.errors import DecodeError
from gatewayd.peer import Peer, open_peer
from gatewayd.peer.demo_module import DemoConfig, make_demo_module
from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import ValueCodec
from gatewayd.proto.sats import STRING, U32, U64, option
from gatewayd.proto.schema import parse_module_def

from .conftest import WAIT_S, PeerClient, connect, refused_upgrade, rows_of, update_rows

ISS = "https://gw.example"


def alice(peer: Peer) -> str:
    return peer.auth.mint("user:alice", issuer=ISS)


async def bump(c: PeerClient, name: str = "x") -> m.ReducerResult:
    res = await c.call("bump_canary", {"name": name})
    assert isinstance(res.outcome, m.ReducerOk)
    return res


async def test_cut_one_connection_without_a_close_frame(peer: Peer) -> None:
    async with connect(peer) as a, connect(peer) as b:
        await a.subscribe(1, "SELECT * FROM tenant")
        assert a.initial is not None
        assert peer.cut(a.initial.identity) == 1
        code, _reason = await a.closed()
        assert code == 1006  # abnormal closure: no close frame
        applied = await b.subscribe(1, "SELECT * FROM tenant")
        assert isinstance(applied, m.SubscribeApplied)
        with trio.fail_after(WAIT_S):
            await peer.wait_connection_count(1)


@pytest.mark.parametrize("reset", [False, True])
async def test_cut_all(peer: Peer, reset: bool) -> None:
    async with connect(peer) as a, connect(peer) as b:
        assert peer.cut_all(reset=reset) == 2
        assert (await a.closed())[0] == 1006
        assert (await b.closed())[0] == 1006
    with trio.fail_after(WAIT_S):
        await peer.wait_connection_count(0)
    assert peer.db.subscribers == {}


async def test_stall_freezes_a_connection_until_unstalled(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as frozen:
        await frozen.subscribe(1, "SELECT * FROM canary")
        assert frozen.initial is not None
        assert peer.stall(frozen.initial.identity) == 1
        await bump(writer)
        await frozen.nothing_within(0.3)
        with trio.move_on_after(0.3) as no_pong:
            await frozen.ws.ping()  # a stalled peer does not answer pings
        assert no_pong.cancelled_caught
        peer.unstall()
        tx = await frozen.expect(m.TransactionUpdate)
        assert update_rows(frozen, tx, "canary")[0][0]["counter"] == 1
        with trio.fail_after(WAIT_S):
            await frozen.ws.ping()


async def test_stalled_handshakes_get_no_answer(peer: Peer) -> None:
    peer.stall_handshakes()
    stream = await trio.open_tcp_stream(peer.host, peer.port)
    async with stream:
        await stream.send_all(
            b"GET /v1/database/demo/subscribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v2.bsatn.spacetimedb\r\n\r\n"
        )
        with trio.move_on_after(0.3) as silent:
            await stream.receive_some(4096)
        assert silent.cancelled_caught  # not a byte of answer
    # plain HTTP is unaffected
    async with httpx.AsyncClient(base_url=peer.base_url) as http:
        assert (await http.get("/v1/ping")).status_code == 200
    done = trio.Event()

    async def late_client() -> None:
        async with connect(peer) as c:
            assert c.initial is not None
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_client)
        await trio.sleep(0.2)
        assert not done.is_set()  # still waiting for the 101
        peer.resume_handshakes()
        with trio.fail_after(WAIT_S):
            await done.wait()


async def test_refused_upgrades_for_a_while(peer: Peer) -> None:
    peer.refuse_upgrades(0.5, status=503)
    status, _text = await refused_upgrade(peer)
    assert status == 503
    assert peer.statistics().upgrades_refused == 1
    await trio.sleep(0.6)
    async with connect(peer) as c:
        assert c.initial is not None


async def test_refused_upgrades_until_accepted(peer: Peer) -> None:
    peer.refuse_upgrades(status=502, message="bad gateway")
    assert await refused_upgrade(peer) == (502, "bad gateway")
    peer.accept_upgrades()
    async with connect(peer) as c:
        assert c.initial is not None


async def test_refused_tokens(peer: Peer) -> None:
    peer.refuse_tokens()
    status, text = await refused_upgrade(peer, token=alice(peer))
    assert status == 401
    assert "refused" in text
    async with httpx.AsyncClient(base_url=peer.base_url) as http:
        r = await http.post(
            "/v1/identity/websocket-token", headers={"Authorization": f"Bearer {alice(peer)}"}
        )
        assert r.status_code == 401
    async with connect(peer) as anonymous:
        assert anonymous.initial is not None
    peer.refuse_tokens(False)
    async with connect(peer, token=alice(peer)) as c:
        assert c.initial is not None


async def test_mute_drop_answers_reducers_but_loses_updates(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as reader:
        await reader.subscribe(1, "SELECT * FROM canary")
        await writer.subscribe(1, "SELECT * FROM canary")
        peer.mute("drop")
        res = await bump(writer)
        # the caller still gets its own update inside the ReducerResult
        assert update_rows(writer, res.outcome.transaction_update, "canary")[0][0]["counter"] == 1  # type: ignore[union-attr]
        await reader.nothing_within(0.3)
        peer.unmute()
        await bump(writer)
        tx = await reader.expect(m.TransactionUpdate)
        assert update_rows(reader, tx, "canary")[0][0]["counter"] == 2  # counter 1 never arrives


async def test_mute_hold_releases_in_order_on_unmute(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as reader:
        await reader.subscribe(1, "SELECT * FROM canary")
        peer.mute("hold")
        for _ in range(3):
            await bump(writer)
        await reader.nothing_within(0.2)
        peer.unmute()
        counters = []
        for _ in range(3):
            tx = await reader.expect(m.TransactionUpdate)
            counters.append(update_rows(reader, tx, "canary")[0][0]["counter"])
        assert counters == [1, 2, 3]


async def test_mute_delay_delivers_late(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as reader:
        await reader.subscribe(1, "SELECT * FROM canary")
        peer.mute("delay", delay_s=0.4)
        start = trio.current_time()
        await bump(writer)
        tx = await reader.expect(m.TransactionUpdate)
        assert trio.current_time() - start >= 0.4
        assert update_rows(reader, tx, "canary")[0][0]["counter"] == 1


async def test_mute_one_connection_only(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as muted, connect(peer) as live:
        await muted.subscribe(1, "SELECT * FROM canary")
        await live.subscribe(1, "SELECT * FROM canary")
        assert muted.initial is not None
        peer.mute("hold", connection=muted.initial.identity)
        await bump(writer)
        await live.expect(m.TransactionUpdate)
        await muted.nothing_within(0.2)
        peer.unmute(muted.initial.identity)
        await muted.expect(m.TransactionUpdate)


async def test_hotswap_adds_a_column_and_later_rows_use_it(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as reader:
        await reader.subscribe(1, "SELECT * FROM document WHERE tenant_id = 'acme'")
        old_schema = reader.db.schema
        columns = dict(peer.db.specs["document"].columns)
        columns["priority"] = U32
        columns["label"] = option(STRING)
        peer.hotswap("document", columns, defaults={"priority": 0})
        async with httpx.AsyncClient(base_url=peer.base_url) as http:
            doc = (await http.get("/v1/database/demo/schema", params={"version": "9"})).json()
        new_schema = parse_module_def(doc)
        assert new_schema.tables["document"].columns[-2:] == ("priority", "label")
        assert new_schema.fingerprint != old_schema.fingerprint
        res = await writer.call("update_document", {"id": 1, "title": "after swap", "body": "b"})
        assert isinstance(res.outcome, m.ReducerOk)
        tx = await reader.expect(m.TransactionUpdate)
        (table,) = tx.query_sets[0].tables
        rows = table.rows[0]
        assert isinstance(rows, m.PersistentTableRows)
        # the rows are in the new layout: they decode with the new schema only
        codec = ValueCodec(new_schema.typespace, safe=False)
        (ins,), _ = codec.decode_rows(new_schema.tables["document"].row_type, rows.inserts.rows_data)
        assert ins["title"] == "after swap"
        assert ins["priority"] == 0
        assert ins["label"] is None
        with pytest.raises(DecodeError):  # the old layout no longer fits
            ValueCodec(old_schema.typespace).decode(
                old_schema.tables["document"].row_type, rows.inserts.split()[0]
            )
        # the connection stayed open through the swap
        assert len(peer.connections) == 2


async def test_hotswap_drops_query_sets_that_no_longer_type_check(peer: Peer) -> None:
    async with connect(peer) as c:
        await c.subscribe(1, "SELECT * FROM document WHERE body = 'x'")
        await c.subscribe(2, "SELECT * FROM document WHERE tenant_id = 'acme'")
        columns = {k: v for k, v in peer.db.specs["document"].columns if k != "body"}
        peer.hotswap("document", columns)
        err = await c.expect(m.SubscriptionError)
        assert err.request_id is None
        assert err.query_set_id == 1
        assert "body" in err.error
        assert sorted(peer.connections[0].query_set_ids) == [2]


async def test_restart_drops_connections_keeps_data_and_refuses_meanwhile(peer: Peer) -> None:
    port = peer.port
    async with connect(peer, token=alice(peer)) as c:
        await c.call("create_document", {"tenant_id": "acme", "title": "survives", "body": ""})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.restart, 0.5)
            code, _ = await c.closed()
            assert code == 1006
            await trio.sleep(0.1)
            with pytest.raises(OSError, match="connect"):
                await trio.open_tcp_stream(peer.host, port)  # down: connection refused
    assert peer.port == port
    async with connect(peer) as again:
        await again.send(m.OneOffQuery(1, "SELECT * FROM document WHERE title = 'survives'"))
        r = await again.expect(m.OneOffQueryResult)
        assert r.rows is not None
        assert len(rows_of(again, r.rows, "document")) == 1


async def test_client_connected_rejection_is_a_101_then_a_dropped_socket() -> None:
    mod = make_demo_module(DemoConfig(trusted_issuers=frozenset({"https://trusted"})))
    async with open_peer(mod) as peer:
        token = peer.auth.mint("user:alice", issuer="https://untrusted")
        async with connect(peer, token=token, expect_initial=False) as c:
            code, _ = await c.closed()
            assert code == 1006
            assert c.payloads == []  # no InitialConnection
        assert peer.statistics().connections_rejected == 1
        assert peer.connections == []


async def test_delay_before_a_reducer_then_cut_means_it_never_ran(peer: Peer) -> None:
    peer.delay_reducer("create_document", 0.5, when="before")
    async with connect(peer, token=alice(peer)) as c:
        spec = peer.db.module.reducers["create_document"]
        args = ValueCodec().encode(spec.params_type, {"tenant_id": "acme", "title": "slow", "body": ""})
        await c.send(m.CallReducer(1, "create_document", args))
        await trio.sleep(0.1)
        peer.cut()
        assert (await c.closed())[0] == 1006
    await trio.sleep(0.6)
    assert not any(d["title"] == "slow" for d in peer.db.rows("document"))


async def test_delay_after_a_reducer_commits_first_and_answers_late(peer: Peer) -> None:
    peer.delay_reducer("create_document", 0.4, when="after")
    async with connect(peer, token=alice(peer)) as c, connect(peer) as other:
        await other.subscribe(1, "SELECT * FROM document")
        start = trio.current_time()
        spec = peer.db.module.reducers["create_document"]
        args = ValueCodec().encode(spec.params_type, {"tenant_id": "acme", "title": "late", "body": ""})
        await c.send(m.CallReducer(1, "create_document", args))
        await other.expect(m.TransactionUpdate)  # committed and broadcast at once
        assert any(d["title"] == "late" for d in peer.db.rows("document"))
        res = await c.expect(m.ReducerResult)
        assert trio.current_time() - start >= 0.4
        assert isinstance(res.outcome, m.ReducerOk)
    peer.delay_reducer("create_document", None)
    assert peer.faults.reducer_delays == {}


async def test_disconnect_all_sends_1001(peer: Peer) -> None:
    async with connect(peer) as a, connect(peer) as b, trio.open_nursery() as nursery:
        nursery.start_soon(peer.disconnect_all)
        assert await a.closed() == (1001, "module exited")
        assert await b.closed() == (1001, "module exited")


async def test_a_client_that_cannot_keep_up_is_dropped() -> None:
    async with (
        open_peer("demo", outgoing_queue_count=4) as peer,
        connect(peer, token=alice(peer)) as writer,
        connect(peer) as slow,
    ):
        await slow.subscribe(1, "SELECT * FROM canary")
        peer.stall(slow.initial.identity)  # type: ignore[union-attr]
        for _ in range(6):
            await bump(writer)
        with trio.fail_after(WAIT_S):
            await peer.wait_connection_count(1)
        peer.unstall()
        assert (await slow.closed())[0] == 1006
        await bump(writer)  # the writer is unaffected


async def test_hotswap_with_changes_and_missing_default_is_refused(peer: Peer) -> None:
    columns = dict(peer.db.specs["document"].columns)
    columns["must_fill"] = U64
    with pytest.raises(ValueError, match="needs a default"):
        peer.hotswap("document", columns)
    assert "must_fill" not in peer.db.schema.tables["document"].columns


async def test_stop_and_start_with_writes_while_down(peer: Peer) -> None:
    async with connect(peer) as c:
        await c.subscribe(1, "SELECT * FROM canary")
        await peer.stop()
        assert (await c.closed())[0] == 1006
    assert peer.connections == []
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(peer.host, peer.port)
    # the database lives on while the listener is down
    peer.db.transact(
        lambda db: db.canary.insert(
            {"name": "while-down", "counter": 7, "updated_at": 0, "updated_by": "00" * 32}
        )
    )
    await peer.start()
    async with connect(peer) as again:
        applied = await again.subscribe(1, "SELECT * FROM canary WHERE name = 'while-down'")
        assert isinstance(applied, m.SubscribeApplied)
        assert [r["counter"] for r in rows_of(again, applied.rows, "canary")] == [7]
        assert peer.statistics().websocket_connections == 1
    with trio.fail_after(WAIT_S):
        await peer.wait_connection_count(0)
