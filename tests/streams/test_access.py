"""S3: tenant and grant boundaries, with rights projected from the demo module's tables."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from gatewayd.demo import DevStack, open_dev_stack
from gatewayd.services.supervisor import UpstreamState
from tests.streams.sseclient import Event, SseClient

pytestmark = pytest.mark.timeout(60)

HEARTBEAT_S = 1.0


@asynccontextmanager
async def stack() -> AsyncIterator[DevStack]:
    # The demo module keeps api_key_grant private (it names key ids): robots are out of scope here.
    cfg = {"access": {"mode": "tables", "api_key_grant_table": None}, "sse": {"heartbeat_s": HEARTBEAT_S}}
    async with open_dev_stack(config=cfg) as st:
        with trio.fail_after(10):
            while st.gateway.supervisor.state is not UpstreamState.LIVE:
                await st.gateway.supervisor.wait_state_change()
        yield st


def token(st: DevStack, sub: str) -> str:
    # No tenant or scope claims: in "tables" mode the tables decide.
    return st.issuer.mint_for(sub, None, "")


async def open_docs(st: DevStack, sub: str, **kw: Any) -> SseClient:
    return await SseClient.open(st.url, token(st, sub), **kw)


async def until_snapshot(c: SseClient) -> list[Event]:
    return await c.events_until(lambda e: e.event == "snapshot" and e.json["last"])


def write_doc(st: DevStack, tenant: str, title: str) -> None:
    st.peer.db.transact(
        lambda db: db.document.insert(
            {
                "id": 0,
                "tenant_id": tenant,
                "title": title,
                "body": "",
                "updated_at": 0,
                "updated_by": "00" * 32,
            }
        )
    )


async def barrier(st: DevStack) -> None:
    await st.gateway.supervisor.one_off_query("SELECT * FROM canary")


def add_member(st: DevStack, actor: str, tenant: str, role: str) -> None:
    def tx(db: Any) -> None:
        if db.actor.find(actor) is None:
            db.actor.insert({"id": actor, "kind": "user", "display_name": actor, "disabled": False})
        db.membership.insert(
            {"id": 0, "tenant_id": tenant, "actor_id": actor, "role": role, "version": 1, "updated_at": 0}
        )

    st.peer.db.transact(tx)


async def test_s3_tenant_and_grant_boundaries() -> None:
    async with stack() as st:
        # u-1 (alice) reads acme; u-2 (carol) reads globex.
        alice = await open_docs(st, "user:alice")
        assert alice.status == 200
        snap = await until_snapshot(alice)
        assert {r["row"]["tenant_id"] for r in snap[-1].json["rows"]} == {"acme"}
        write_doc(st, "acme", "before the grant")
        ev = await alice.next_event()
        assert ev is not None
        pre_grant_cursor = ev.id

        # u-2 sends a cursor from acme's stream: only globex events, ever.
        carol = await open_docs(st, "user:carol", last_event_id=pre_grant_cursor)
        assert carol.status == 200
        evs = await until_snapshot(carol)
        assert [e.event for e in evs] == ["reset", "snapshot"]
        assert evs[0].json["reason"] == "other_partition"
        assert {r["row"]["tenant_id"] for r in evs[1].json["rows"]} == {"globex"}
        write_doc(st, "acme", "acme only")
        write_doc(st, "globex", "globex only")
        ev = await carol.next_event()
        assert ev is not None
        assert (ev.json["tenant_id"], ev.json["payload"]["title"]) == ("globex", "globex only")

        # u-3 (dave) has no right yet: refused.
        dave = await open_docs(st, "user:dave", query="tenant_id=acme")
        assert dave.status == 403
        await dave.aclose()
        # Granted at T; more acme events happen after T.
        add_member(st, "user:dave", "acme", "viewer")
        await barrier(st)
        write_doc(st, "acme", "after the grant")
        await barrier(st)
        # Resuming with a cursor from before T replays nothing from before T: reset + snapshot.
        dave = await open_docs(st, "user:dave", last_event_id=pre_grant_cursor, query="tenant_id=acme")
        assert dave.status == 200
        evs = await until_snapshot(dave)
        assert [e.event for e in evs] == ["reset", "snapshot"]
        assert evs[0].json["reason"] == "before_grant"
        await dave.aclose()

        # u-1 is removed from acme while connected; then someone else writes an acme row.
        for _ in range(2):  # drain alice's view of the two acme writes above
            await alice.next_event()
        t0 = trio.current_time()
        st.peer.db.transact(lambda db: db.membership.delete_by(tenant_id="acme", actor_id="user:alice"))
        write_doc(st, "acme", "after the removal")
        rest = await alice.events_until(lambda e: False)  # until the gateway ends the stream
        assert [e.event for e in rest] == ["revoked"]
        assert trio.current_time() - t0 <= HEARTBEAT_S
        await alice.aclose()
        # Reconnecting with the old session is refused and replays nothing.
        again = await open_docs(st, "user:alice", last_event_id=pre_grant_cursor)
        assert again.status == 403
        body = await again.body()
        assert b'"code":"forbidden"' in body
        assert b"after the removal" not in body
        await again.aclose()
        await carol.aclose()
        assert st.gateway.streams.revocations == 1
