"""Writes: attribution modes, S8 (the link drops mid-call), idempotency, rate limits, cursors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from gatewayd.demo import USER_ISSUER, DevStack, open_dev_stack, service_identity
from gatewayd.proto.identity import identity_hex
from gatewayd.services.supervisor import UpstreamState
from tests.streams.sseclient import SseClient

pytestmark = pytest.mark.timeout(60)

REDUCERS: list[dict[str, Any]] = [
    {"name": "create_document", "upstream": "create_document_as", "permission": "document.create",
     "actor_argument": "actor_id", "tenant_argument": "tenant_id", "attribution": "delegated"},
    {"name": "create_document_native", "upstream": "create_document", "permission": "document.create",
     "tenant_argument": "tenant_id", "attribution": "user"},
    {"name": "create_document_hybrid", "upstream": "create_document", "permission": "document.create",
     "tenant_argument": "tenant_id", "attribution": "hybrid"},
    {"name": "check_permission", "upstream": "assert_permission", "permission": "document.read",
     "tenant_argument": "tenant_id", "attribution": "user"},
]  # fmt: skip


@asynccontextmanager
async def stack(**writes: Any) -> AsyncIterator[DevStack]:
    cfg: dict[str, Any] = {"reducers": REDUCERS, "writes": writes, "upstream": {"call_wait_s": 1.0}}
    async with open_dev_stack(config=cfg) as st:
        with trio.fail_after(10):
            while st.gateway.supervisor.state is not UpstreamState.LIVE:
                await st.gateway.supervisor.wait_state_change()
        yield st


async def post(
    st: DevStack, reducer: str, args: dict[str, Any], user: str = "alice", **headers: str
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=20) as http:
        return await http.post(
            f"{st.url}v1/reducers/{reducer}",
            json=args,
            headers={"Authorization": f"Bearer {st.issuer.mint(user)}", **headers},
        )


def docs_titled(st: DevStack, title: str) -> list[dict[str, Any]]:
    return [r for r in st.peer.db.rows("document") if r["title"] == title]


def audits_for(st: DevStack, title_doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in st.peer.db.rows("audit_event") if a["target"] == f"document:{title_doc['id']}"]


async def test_three_attribution_modes_as_the_module_sees_them() -> None:
    async with stack() as st:
        alice_identity = identity_hex(USER_ISSUER, "user:alice")
        seen: dict[str, tuple[str, str]] = {}
        for reducer, title in (("create_document", "delegated"), ("create_document_native", "user"),
                               ("create_document_hybrid", "hybrid")):  # fmt: skip
            r = await post(st, reducer, {"title": title, "body": ""})
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "committed"
            (doc,) = docs_titled(st, title)
            (audit,) = [a for a in st.peer.db.rows("audit_event") if str(doc["id"]) in a["target"]]
            seen[title] = (doc["updated_by"], audit["caller"])
            assert audit["actor_id"] == "user:alice"
        # delegated: the module sees gatewayd's service identity as sender; the actor is an argument.
        assert seen["delegated"] == (service_identity(), service_identity())
        # user / hybrid: the module sees the user's own identity as ctx.sender.
        assert seen["user"] == (alice_identity, alice_identity)
        assert seen["hybrid"] == (alice_identity, alice_identity)
        assert st.gateway.users is not None
        assert st.gateway.users.statistics()["sessions"] == 1  # one pooled connection for alice
        # Writes over per-user connections are counted in the reducer metrics too.
        assert st.gateway.supervisor.call_outcomes[("create_document", "committed")] == 2


async def test_s8_link_drops_mid_call_and_idempotent_retry() -> None:
    async with stack() as st:
        st.peer.delay_reducer("create_document_as", 5.0, when="before")
        async with trio.open_nursery() as nursery:
            result: dict[str, httpx.Response] = {}

            async def first() -> None:
                result["r"] = await post(
                    st, "create_document", {"title": "ik", "body": ""}, **{"Idempotency-Key": "ik-1"}
                )

            nursery.start_soon(first)
            await trio.sleep(0.5)
            t0 = trio.current_time()
            st.peer.cut()  # the upstream socket is cut before the result
        r = result["r"]
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "outcome_unknown"
        assert "correlation_id" in r.json()["error"]
        assert trio.current_time() - t0 < 2.0  # answered promptly, never hangs
        st.peer.delay_reducer("create_document_as", None)
        with trio.fail_after(10):
            while st.gateway.supervisor.state is not UpstreamState.LIVE:
                await st.gateway.supervisor.wait_state_change()
        # The retry with ik-1 returns the stored outcome and does not call the reducer again.
        calls_before = st.peer.db.transactions_committed
        again = await post(st, "create_document", {"title": "ik", "body": ""}, **{"Idempotency-Key": "ik-1"})
        assert again.status_code == 504
        assert again.headers["Idempotent-Replayed"] == "true"
        assert st.peer.db.transactions_committed == calls_before
        assert len(docs_titled(st, "ik")) <= 1


async def test_s8_writes_nothing_and_module_rejections_are_distinct() -> None:
    async with stack() as st:
        c = await SseClient.open(st.url, st.issuer.mint("alice"))
        await c.events_until(lambda e: e.event == "snapshot" and e.json["last"])
        # Validates and writes nothing: committed from its result alone, no SSE event.
        r = await post(st, "check_permission", {"permission": "document.read"})
        assert r.status_code == 200
        assert r.json()["status"] == "committed"
        with trio.move_on_after(0.5):
            ev = await c.next_event()
            pytest.fail(f"unexpected event {ev}")
        await c.aclose()
        # A module rejection: 422 with the module's own message.
        r = await post(st, "check_permission", {"permission": "grant.manage"}, user="bob")
        assert (r.status_code, r.json()["error"]["code"]) == (422, "reducer_failed")
        assert "user:bob may not grant.manage in tenant acme" in r.json()["error"]["message"]
        # client_connected refusing the user's connection: 403, not a network error.
        st.peer.db.transact(lambda db: db.actor.update({**db.actor.find("user:carol"), "disabled": True}))
        r = await post(st, "create_document_native", {"title": "x", "body": ""}, user="carol")
        assert (r.status_code, r.json()["error"]["code"]) == (403, "upstream_refused_identity")
        # A network error (upstream down): 503, never sent.
        st.peer.refuse_upgrades()
        st.peer.cut()
        r = await post(st, "create_document", {"title": "y", "body": ""})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "upstream_unavailable")
        assert r.headers["Retry-After"]
        assert docs_titled(st, "y") == []


async def test_idempotency_rate_limits_and_cursors() -> None:
    async with stack(burst_per_principal_count=5, rate_per_principal_per_s=0.01) as st:
        r1 = await post(st, "create_document", {"title": "once", "body": ""}, **{"Idempotency-Key": "k-1"})
        r2 = await post(st, "create_document", {"title": "once", "body": ""}, **{"Idempotency-Key": "k-1"})
        assert r1.status_code == r2.status_code == 200
        assert r2.headers["Idempotent-Replayed"] == "true"
        assert r1.json() == r2.json()
        assert len(docs_titled(st, "once")) == 1
        r3 = await post(st, "create_document", {"title": "other", "body": ""}, **{"Idempotency-Key": "k-1"})
        assert (r3.status_code, r3.json()["error"]["code"]) == (422, "idempotency_key_reused")
        # The cursor of a service-connection write: the stream opened there sees only later events.
        cursor = r1.json()["cursors"]["documents/acme"]
        c = await SseClient.open(st.url, st.issuer.mint("alice"), last_event_id=cursor)
        r4 = await post(st, "create_document", {"title": "after", "body": ""})
        assert r4.status_code == 200
        ev = await c.next_event()
        assert ev is not None
        assert (ev.event, ev.json["payload"]["title"]) == ("document.inserted", "after")
        await c.aclose()
        # Rate limit: the 5-request burst is used up (k-1 twice, the refused reuse, 'after').
        r5 = await post(st, "create_document", {"title": "z", "body": ""})
        r6 = await post(st, "create_document", {"title": "z2", "body": ""})
        assert 429 in (r5.status_code, r6.status_code)
        limited = r5 if r5.status_code == 429 else r6
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["Retry-After"]) >= 1
        # Caller-supplied values for gateway-filled fields are refused.
        r7 = await post(
            st, "create_document_native", {"title": "t", "body": "", "tenant_id": "globex"}, user="bob"
        )
        assert (r7.status_code, r7.json()["error"]["code"]) == (400, "gateway_filled_argument")
