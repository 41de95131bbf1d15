"""Subscriptions, reducer results and transaction updates over the WebSocket (PROTOCOL.md §5)."""

from __future__ import annotations

import gzip

import brotli
import pytest
import trio

from gatewayd.peer import Peer
from gatewayd.proto import messages as m

from .conftest import connect, handshake_header, rows_of, update_rows

ISS = "https://gw.example"


def alice(peer: Peer) -> str:
    return peer.auth.mint("user:alice", issuer=ISS)


async def test_initial_connection_is_first_and_matches_the_101(peer: Peer) -> None:
    token = alice(peer)
    async with connect(peer, token=token) as c:
        init = c.initial
        assert init is not None
        assert init.token == token
        assert init.identity == handshake_header(c, "spacetime-identity")
        assert handshake_header(c, "spacetime-identity-token") == token
        assert len(init.connection_id) == 32
        assert int(init.connection_id, 16) != 0
        assert [ci.identity for ci in peer.connections] == [init.identity]


async def test_v3_is_preferred_and_v2_is_accepted(peer: Peer) -> None:
    async with connect(peer, protocols=("v2.bsatn.spacetimedb", "v3.bsatn.spacetimedb")) as c:
        assert c.ws.subprotocol == "v3.bsatn.spacetimedb"  # the server's order wins
    async with connect(peer, protocols=("v2.bsatn.spacetimedb",)) as c:
        assert c.ws.subprotocol == "v2.bsatn.spacetimedb"
        applied = await c.subscribe(1, "SELECT * FROM tenant")
        assert isinstance(applied, m.SubscribeApplied)


async def test_subscribe_applied_then_updates_to_others_and_result_to_caller(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as reader:
        applied = await reader.subscribe(7, "SELECT * FROM document WHERE tenant_id = 'acme'")
        assert isinstance(applied, m.SubscribeApplied)
        assert applied.query_set_id == 7
        titles = sorted(r["title"] for r in rows_of(reader, applied.rows, "document"))
        assert titles == ["Quarterly plan", "Welcome to Acme"]

        own = await writer.subscribe(1, "SELECT * FROM document")
        assert isinstance(own, m.SubscribeApplied)
        assert len(rows_of(writer, own.rows, "document")) == 3

        res = await writer.call("create_document", {"tenant_id": "acme", "title": "New", "body": "x"})
        assert isinstance(res.outcome, m.ReducerOk)
        ins, dels = update_rows(writer, res.outcome.transaction_update, "document")
        assert [r["title"] for r in ins] == ["New"]
        assert dels == []
        assert res.outcome.transaction_update.query_sets[0].query_set_id == 1

        tx = await reader.expect(m.TransactionUpdate)
        assert [qs.query_set_id for qs in tx.query_sets] == [7]
        ins, dels = update_rows(reader, tx, "document")
        assert [r["title"] for r in ins] == ["New"]
        assert dels == []
        # the caller gets no separate TransactionUpdate for its own transaction
        await writer.nothing_within(0.2)


async def test_update_is_a_delete_and_insert_of_the_same_key(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as reader:
        await reader.subscribe(1, "SELECT * FROM document")
        res = await writer.call("update_document", {"id": 1, "title": "Renamed", "body": "b"})
        assert isinstance(res.outcome, m.ReducerOk)
        tx = await reader.expect(m.TransactionUpdate)
        ins, dels = update_rows(reader, tx, "document")
        assert [(r["id"], r["title"]) for r in ins] == [(1, "Renamed")]
        assert [(r["id"], r["title"]) for r in dels] == [(1, "Welcome to Acme")]


async def test_unaffected_subscribers_and_no_op_reducers_get_nothing(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as globex, connect(peer) as acme:
        await globex.subscribe(1, "SELECT * FROM document WHERE tenant_id = 'globex'")
        await acme.subscribe(1, "SELECT * FROM document WHERE tenant_id = 'acme'")
        # assert_permission commits without writing: the caller's result only
        res = await writer.call("assert_permission", {"tenant_id": "acme", "permission": "document.read"})
        assert isinstance(res.outcome, m.ReducerOk)
        assert res.outcome.transaction_update.query_sets == ()
        res = await writer.call("create_document", {"tenant_id": "acme", "title": "A", "body": ""})
        assert isinstance(res.outcome, m.ReducerOk)
        await acme.expect(m.TransactionUpdate)
        await globex.nothing_within(0.2)
        await acme.nothing_within(0.1)


async def test_failed_reducers_roll_back_and_only_the_caller_hears(peer: Peer) -> None:
    bob = peer.auth.mint("user:bob", issuer=ISS)
    async with connect(peer, token=bob) as writer, connect(peer) as reader:
        await reader.subscribe(2, "SELECT * FROM document")
        res = await writer.call("create_document", {"tenant_id": "globex", "title": "no", "body": ""})
        assert isinstance(res.outcome, m.ReducerErr)
        assert res.outcome.message == "user:bob may not document.create in tenant globex"
        assert res.outcome.payload[:4] == len(res.outcome.message).to_bytes(4, "little")
        await reader.nothing_within(0.2)
        assert len(peer.db.rows("document")) == 3


async def test_unknown_reducer_bad_args_and_lifecycle_calls_are_internal_errors(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as c:
        await c.send(m.CallReducer(1, "no_such_reducer", b""))
        r = await c.expect(m.ReducerResult)
        assert isinstance(r.outcome, m.ReducerInternalError)
        assert "no_such_reducer" in r.outcome.message
        await c.send(m.CallReducer(2, "create_document", b"\x01\x02"))
        r = await c.expect(m.ReducerResult)
        assert isinstance(r.outcome, m.ReducerInternalError)
        assert "invalid arguments" in r.outcome.message
        await c.send(m.CallReducer(3, "client_connected", b""))
        r = await c.expect(m.ReducerResult)
        assert isinstance(r.outcome, m.ReducerInternalError)
        assert "lifecycle" in r.outcome.message
        await c.send(m.CallProcedure(4, "proc", b""))
        p = await c.expect(m.ProcedureResult)
        assert p.request_id == 4
        assert isinstance(p.status, m.ProcedureInternalError)


async def test_responses_follow_request_order_and_commit_order(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as reader:
        await reader.subscribe(1, "SELECT * FROM canary")
        await writer.subscribe(1, "SELECT * FROM canary")
        spec = peer.db.module.reducers["bump_canary"]
        from gatewayd.proto.bsatn import ValueCodec

        raw = ValueCodec().encode(spec.params_type, {"name": "c"})
        # one v3 frame carrying five calls and a one-off query
        await writer.send(
            *(m.CallReducer(i, "bump_canary", raw) for i in range(1, 6)),
            m.OneOffQuery(6, "SELECT * FROM canary WHERE name = 'c'"),
        )
        counters = []
        for i in range(1, 6):
            r = await writer.expect(m.ReducerResult)
            assert r.request_id == i
            assert isinstance(r.outcome, m.ReducerOk)
            ins, _ = update_rows(writer, r.outcome.transaction_update, "canary")
            counters.append(ins[0]["counter"])
        assert counters == [1, 2, 3, 4, 5]
        q = await writer.expect(m.OneOffQueryResult)
        assert q.request_id == 6
        assert q.rows is not None
        assert rows_of(writer, q.rows, "canary")[0]["counter"] == 5
        seen = []
        for _ in range(5):
            tx = await reader.expect(m.TransactionUpdate)
            ins, _ = update_rows(reader, tx, "canary")
            seen.append(ins[0]["counter"])
        assert seen == [1, 2, 3, 4, 5]


async def test_unsubscribe_returns_dropped_rows_and_frees_the_id(peer: Peer) -> None:
    async with connect(peer) as c:
        await c.subscribe(3, "SELECT * FROM tenant")
        await c.send(m.Unsubscribe(50, 3, send_dropped_rows=True))
        u = await c.expect(m.UnsubscribeApplied)
        assert u.request_id == 50
        assert u.query_set_id == 3
        assert u.rows is not None
        assert sorted(r["id"] for r in rows_of(c, u.rows, "tenant")) == ["acme", "globex"]
        again = await c.subscribe(3, "SELECT * FROM tenant WHERE id = 'acme'")
        assert isinstance(again, m.SubscribeApplied)
        await c.send(m.Unsubscribe(51, 3, send_dropped_rows=False))
        u = await c.expect(m.UnsubscribeApplied)
        assert u.rows is None
        await c.send(m.Unsubscribe(52, 99, send_dropped_rows=True))
        err = await c.expect(m.SubscriptionError)
        assert err.request_id == 52
        assert err.query_set_id == 99


async def test_after_unsubscribe_no_more_updates(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as reader:
        await reader.subscribe(1, "SELECT * FROM document")
        await reader.send(m.Unsubscribe(9, 1))
        await reader.expect(m.UnsubscribeApplied)
        await writer.call("create_document", {"tenant_id": "acme", "title": "x", "body": ""})
        await reader.nothing_within(0.2)


@pytest.mark.parametrize(
    ("sql", "needle"),
    [
        ("SELECT * FROM nope", "no such table: `nope`"),
        ("SELECT * FROM document WHERE nope = 1", "does not have a field `nope`"),
        ("SELECT * FROM document WHERE id = 'x'", "cannot be parsed as type `U64`"),
        ("SELECT title FROM document", "Column projections are not supported"),
        ("DELETE FROM document", "expected SELECT"),
        ("SELECT * FROM document JOIN tenant ON document.tenant_id = tenant.id", "joins"),
        ("SELECT * FROM audit_event", "no such table: `audit_event`"),  # private
    ],
)
async def test_bad_sql_gives_a_subscription_error_and_the_id_stays_free(
    peer: Peer, sql: str, needle: str
) -> None:
    async with connect(peer) as c:
        err = await c.subscribe(4, "SELECT * FROM tenant", sql)
        assert isinstance(err, m.SubscriptionError)
        assert err.query_set_id == 4
        assert needle in err.error
        ok = await c.subscribe(4, "SELECT * FROM tenant")  # the id was never registered
        assert isinstance(ok, m.SubscribeApplied)


async def test_one_off_queries(peer: Peer) -> None:
    async with connect(peer) as c:
        await c.send(m.OneOffQuery(1, "SELECT * FROM tenant WHERE id != 'acme'"))
        r = await c.expect(m.OneOffQueryResult)
        assert r.rows is not None
        assert [t["id"] for t in rows_of(c, r.rows, "tenant")] == ["globex"]
        await c.send(m.OneOffQuery(2, "SELECT * FROM missing"))
        r = await c.expect(m.OneOffQueryResult)
        assert r.rows is None
        assert r.error is not None
        assert "missing" in r.error


async def test_sender_parameter_binds_the_subscribers_identity(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as c:
        applied = await c.subscribe(1, "SELECT * FROM actor_identity_link WHERE identity = :sender")
        assert isinstance(applied, m.SubscribeApplied)
        rows = rows_of(c, applied.rows, "actor_identity_link")
        assert [r["actor_id"] for r in rows] == ["user:alice"]
        assert rows[0]["identity"] == c.initial.identity  # type: ignore[union-attr]


async def test_owner_reads_private_tables() -> None:
    from gatewayd.peer import open_peer
    from gatewayd.peer.auth import PeerAuth

    auth = PeerAuth()
    owner_token = auth.mint("owner", issuer=ISS)
    from gatewayd.proto.identity import identity_hex

    async with (
        open_peer("demo", auth=auth, owner_identity=identity_hex(ISS, "owner")) as p,
        connect(p, token=owner_token) as c,
    ):
        applied = await c.subscribe(1, "SELECT * FROM api_key_grant")
        assert isinstance(applied, m.SubscribeApplied)
        assert [r["key_id"] for r in rows_of(c, applied.rows, "api_key_grant")] == ["ak-1"]


async def test_same_table_in_two_query_sets_is_not_deduplicated(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer, connect(peer) as reader:
        await reader.subscribe(1, "SELECT * FROM document WHERE tenant_id = 'acme'")
        applied = await reader.subscribe(2, "SELECT * FROM document", "SELECT * FROM document")
        assert isinstance(applied, m.SubscribeApplied)
        assert len(applied.rows.tables) == 1  # identical strings deduplicated within a set
        await writer.call("create_document", {"tenant_id": "acme", "title": "t", "body": ""})
        tx = await reader.expect(m.TransactionUpdate)
        assert sorted(qs.query_set_id for qs in tx.query_sets) == [1, 2]


@pytest.mark.parametrize("compression", ["Gzip", "Brotli", "None"])
async def test_compression_only_above_1024_bytes(peer: Peer, compression: str) -> None:
    async with connect(peer, token=alice(peer), compression=compression) as c:
        assert c.payloads[0]
        assert c.ws
        small = await c.subscribe(1, "SELECT * FROM tenant WHERE id = 'acme'")
        assert isinstance(small, m.SubscribeApplied)
        await c.call("create_document", {"tenant_id": "acme", "title": "big", "body": "z" * 5000})
        raw_tags = []
        await c.send(m.OneOffQuery(5, "SELECT * FROM document"))
        raw = await c.ws.get_message()
        assert isinstance(raw, bytes)
        raw_tags.append(raw[0])
        expected = {"Gzip": 2, "Brotli": 1, "None": 0}[compression]
        assert raw[0] == expected
        body = raw[1:]
        if expected == 2:
            body = gzip.decompress(body)
        elif expected == 1:
            body = brotli.decompress(body)
        assert len(body) > 1024
        (msg,) = m.decode_server_payload(raw, c.protocol)
        assert isinstance(msg, m.OneOffQueryResult)


async def test_default_compression_is_brotli(peer: Peer) -> None:
    async with connect(peer, compression=None) as c:
        tables = ("role_permission", "role", "membership", "document", "actor", "tenant", "canary")
        await c.send(m.Subscribe(1, 1, tuple(f"SELECT * FROM {t}" for t in tables)))
        raw = await c.ws.get_message()
        assert isinstance(raw, bytes)
        assert raw[0] == 1
        (applied,) = m.decode_server_payload(raw, c.protocol)
        assert isinstance(applied, m.SubscribeApplied)
        assert [t.table for t in applied.rows.tables] == list(tables)


async def test_v3_coalesces_queued_messages_into_one_payload(peer: Peer) -> None:
    async with connect(peer) as c:
        await c.send(*(m.OneOffQuery(i, "SELECT * FROM tenant") for i in range(1, 21)))
        got: list[int] = []
        while len(got) < 20:
            msgs = await c.recv_payload()
            got += [x.request_id for x in msgs if isinstance(x, m.OneOffQueryResult)]
        assert got == list(range(1, 21))
        assert any(len(p) > 1 for p in c.payloads), "expected at least one coalesced payload"


async def test_large_messages_are_fragmented_and_reassembled(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as c:
        await c.call("create_document", {"tenant_id": "acme", "title": "big", "body": "q" * 60000})
        await c.send(m.OneOffQuery(1, "SELECT * FROM document"))
        r = await c.expect(m.OneOffQueryResult)
        assert r.rows is not None
        assert max(len(d["body"]) for d in rows_of(c, r.rows, "document")) == 60000


async def test_many_clients_see_commit_order(peer: Peer) -> None:
    async with connect(peer, token=alice(peer)) as writer:
        readers = []
        async with connect(peer) as r1, connect(peer) as r2, connect(peer) as r3:
            readers = [r1, r2, r3]
            for r in readers:
                await r.subscribe(1, "SELECT * FROM canary WHERE name = 'x'")
            for _ in range(10):
                await writer.call("bump_canary", {"name": "x"})
            for r in readers:
                counts = []
                for _ in range(10):
                    tx = await r.expect(m.TransactionUpdate)
                    counts.append(update_rows(r, tx, "canary")[0][0]["counter"])
                assert counts == list(range(1, 11))


async def test_token_in_query_string(peer: Peer) -> None:
    token = alice(peer)
    async with connect(peer, token=token, token_in_query=True) as c:
        assert c.initial is not None
        assert c.initial.token == token


async def test_disconnect_runs_client_disconnected_and_drops_subscriptions(peer: Peer) -> None:
    async with connect(peer) as c:
        await c.subscribe(1, "SELECT * FROM tenant")
        with trio.fail_after(5):
            await peer.wait_connection_count(1)
    with trio.fail_after(5):
        await peer.wait_connection_count(0)
    assert peer.db.subscribers == {}
