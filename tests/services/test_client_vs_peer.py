"""Our upstream client against the dev peer: the same flows the official SDK is checked with."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from gatewayd.demo import SERVICE_ISSUER, SERVICE_SUBJECT, service_identity
from gatewayd.peer import DemoConfig, PeerAuth, make_demo_module, open_peer
from gatewayd.proto import client as pc
from gatewayd.proto import messages as m
from gatewayd.services.db_ws import DbSession, SessionConfig, UpstreamTarget, serve_db_session
from gatewayd.services.supervisor import fetch_schema

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("compression", [m.Compression.GZIP, m.Compression.BROTLI, m.Compression.NONE])
async def test_session_flows_against_the_peer(compression: m.Compression) -> None:
    auth = PeerAuth()
    token = auth.mint(SERVICE_SUBJECT, issuer=SERVICE_ISSUER)
    module = make_demo_module(DemoConfig(service_identities=frozenset({service_identity()})))
    events: list[pc.Event] = []
    async with open_peer(module, auth=auth) as peer:
        target = UpstreamTarget(peer.base_url, "demo")
        schema = await fetch_schema(target, token)
        assert "document" in schema.tables

        def listen(_s: DbSession, ev: pc.Event) -> None:
            events.append(ev)

        async with trio.open_nursery() as nursery:
            session: DbSession = await nursery.start(
                lambda task_status: serve_db_session(
                    target=target, token=token, schema=schema, listener=listen,
                    config=SessionConfig(compression=compression), task_status=task_status,
                )
            )  # fmt: skip
            assert session.conn.identity == service_identity()
            assert session.conn.protocol is m.Protocol.V3  # the server's preference wins
            # Subscribe: the initial rows arrive.
            qsid = await session.subscribe(["SELECT * FROM document WHERE tenant_id = 'acme'"])
            titles = sorted(r["title"] for r in session.cache.rows("document"))
            assert titles == ["Quarterly plan", "Welcome to Acme"]
            # Call a reducer: its result carries our own transaction's rows.
            args: dict[str, Any] = {"actor_id": "user:alice", "on_behalf_of": None, "tenant_id": "acme",
                                    "title": "From our client", "body": "hi"}  # fmt: skip
            reducer = schema.reducer("create_document_as")
            out = await session.call_reducer("create_document_as", schema.codec.encode(reducer.params, args))
            assert isinstance(out, pc.ReducerCommitted)
            assert [c.row["title"] for c in out.changes] == ["From our client"]
            # A refusal comes back as the module's own message.
            bad = dict(args, actor_id="user:carol")  # carol is not a member of acme
            out = await session.call_reducer("create_document_as", schema.codec.encode(reducer.params, bad))
            assert isinstance(out, pc.ReducerFailed)
            assert "user:carol may not document.create in tenant acme" in out.message
            # A row written by another client arrives as a transaction.
            n = len(events)
            peer.db.transact(lambda db: db.document.insert(
                {"id": 0, "tenant_id": "acme", "title": "Elsewhere", "body": "", "updated_at": 0,
                 "updated_by": "00" * 32}
            ))  # fmt: skip
            with trio.fail_after(5):
                while not any(isinstance(e, pc.TransactionApplied) for e in events[n:]):
                    await trio.sleep(0.01)
            assert "Elsewhere" in [r["title"] for r in session.cache.rows("document")]
            # A one-off query sees the same rows.
            one = await session.one_off_query("SELECT * FROM document")
            assert one.rows is not None
            assert {r["title"] for r in one.rows["document"]} >= {"Elsewhere", "From our client"}
            # Unsubscribe: the dropped rows go away.
            await session.unsubscribe(qsid)
            assert session.cache.rows("document") == []
            dropped = [e for e in events if isinstance(e, pc.Unsubscribed)]
            assert len(dropped) == 1
            assert len(dropped[0].changes) == 4
            await session.aclose()
