"""Hypothesis stateful test of the streams service with table-driven access.

Random interleavings of document writes across tenants, grants and revocations, upstream
disconnects (changes pile up unseen) and reconnects (the reconcile diff), and clients that open,
read, drop and resume with random cursors. Invariants:

* no client ever receives an event for a partition its user was not granted at that event's time;
* every client that is still granted and still open converges to the true rows of its tenant.

It drives :class:`StreamService` directly (sans network): subscribers without a socket collect
their frames in their backlog, which the model reads.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gatewayd.proto import sse
from gatewayd.proto.access import AccessIndex, AccessTables
from gatewayd.proto.cache import RowChange
from gatewayd.proto.eventlog import EventLog
from gatewayd.proto.projection import StreamDef
from gatewayd.proto.tokens import Principal
from gatewayd.services.hub import HubConfig
from gatewayd.services.streams import StreamError, StreamsConfig, StreamService
from gatewayd.services.supervisor import ChangeBatch

TENANTS = ("t1", "t2")
USERS = ("user:u1", "user:u2")


def principal(user: str) -> Principal:
    return Principal(subject=user, kind="human", tenant=None, scopes=frozenset(), issuer="test")


class Client:
    def __init__(self, user: str, tenant: str, sub: Any) -> None:
        self.user, self.tenant, self.sub = user, tenant, sub
        self.rows: dict[Any, Any] = {}
        self.last_id: str | None = None
        self.closed = False
        self.events: list[str] = []


def _closed(c: Client) -> bool:
    return c.closed


class StreamsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.svc = StreamService(
            [StreamDef("docs", ("document",), "tenant_id", "document.read")],
            EventLog(max_events_per_partition=8, max_bytes_per_partition=1 << 20, max_total_bytes=1 << 22),
            HubConfig(client_buffer_bytes=1 << 30),
            StreamsConfig(retry_jitter_ms=0, snapshot_chunk_rows=3),
            access=AccessIndex(AccessTables(api_key_grant_table=None)),
        )
        # Ground truth upstream, and what gatewayd has been told (they differ while disconnected).
        self.truth_docs: dict[int, dict[str, Any]] = {}
        self.truth_members: dict[int, dict[str, Any]] = {}
        self.seen_docs: dict[int, dict[str, Any]] = {}
        self.seen_members: dict[int, dict[str, Any]] = {}
        self.connected = True
        self.next_id = 1
        self.clients: list[Client] = []
        self.cursors: list[str] = []
        self.cursor_state: dict[tuple[str, str], dict[Any, Any]] = {}
        # event id -> users granted on that event's tenant when it was published
        self.granted_at: dict[str, frozenset[str]] = {}
        original = self.svc.hub.publish

        def publish(partition: tuple[str, str], frame: bytes) -> None:
            (ev,) = sse.parse(frame)
            self.granted_at[ev["id"]] = frozenset(u for u in USERS if self._granted(u, partition[1]))
            original(partition, frame)

        self.svc.hub.publish = publish  # type: ignore[method-assign]
        perms = [
            RowChange(
                "role_permission",
                "inserted",
                {"id": 1, "role": "viewer", "permission": "document.read"},
                key=1,
            )
        ]
        self.svc.apply(ChangeBatch(perms, "initial"))

    def _granted(self, user: str, tenant: str) -> bool:
        return any(m["actor_id"] == user and m["tenant_id"] == tenant for m in self.seen_members.values())

    # --- upstream ------------------------------------------------------------------------------

    def _deliver(self, table: str, seen: dict[int, Any], truth: dict[int, Any], cause: str) -> None:
        changes = []
        for k in sorted(seen.keys() | truth.keys()):
            old, new = seen.get(k), truth.get(k)
            if old == new:
                continue
            if new is None:
                changes.append(RowChange(table, "deleted", old, key=k))
            elif old is None:
                changes.append(RowChange(table, "inserted", new, key=k))
            else:
                changes.append(RowChange(table, "updated", new, old=old, key=k))
        seen.clear()
        seen.update({k: dict(v) for k, v in truth.items()})
        if changes:
            self.svc.apply(ChangeBatch(changes, cause))

    def _sync(self) -> None:
        if self.connected:
            self._deliver("document", self.seen_docs, self.truth_docs, "transaction")
            self._deliver("membership", self.seen_members, self.truth_members, "transaction")

    @rule(tenant=st.sampled_from(TENANTS), title=st.text(max_size=4))
    def insert_doc(self, tenant: str, title: str) -> None:
        self.truth_docs[self.next_id] = {"id": self.next_id, "tenant_id": tenant, "title": title}
        self.next_id += 1
        self._sync()

    @rule(data=st.data())
    def update_or_delete_doc(self, data: st.DataObject) -> None:
        if not self.truth_docs:
            return
        k = data.draw(st.sampled_from(sorted(self.truth_docs)))
        if data.draw(st.booleans()):
            del self.truth_docs[k]
        else:
            self.truth_docs[k] = {**self.truth_docs[k], "title": data.draw(st.text(max_size=4)),
                                  "tenant_id": data.draw(st.sampled_from(TENANTS))}  # fmt: skip
        self._sync()

    @rule(user=st.sampled_from(USERS), tenant=st.sampled_from(TENANTS))
    def grant(self, user: str, tenant: str) -> None:
        if any(m["actor_id"] == user and m["tenant_id"] == tenant for m in self.truth_members.values()):
            return
        self.truth_members[self.next_id] = {"id": self.next_id, "actor_id": user, "tenant_id": tenant,
                                            "role": "viewer", "version": 1}  # fmt: skip
        self.next_id += 1
        self._sync()

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        if self.truth_members:
            del self.truth_members[data.draw(st.sampled_from(sorted(self.truth_members)))]
            self._sync()

    @precondition(lambda self: self.connected)
    @rule()
    def disconnect(self) -> None:
        self.connected = False

    @precondition(lambda self: not self.connected)
    @rule()
    def reconnect(self) -> None:
        self.connected = True
        # The reconcile diff flows as ordinary changes (one batch per table here).
        self._deliver("membership", self.seen_members, self.truth_members, "reconcile")
        self._deliver("document", self.seen_docs, self.truth_docs, "reconcile")

    # --- clients ---------------------------------------------------------------------------------

    @rule(user=st.sampled_from(USERS), tenant=st.sampled_from(TENANTS), data=st.data())
    def open_client(self, user: str, tenant: str, data: st.DataObject) -> None:
        cursor = data.draw(st.none() | (st.sampled_from(self.cursors) if self.cursors else st.none()))
        try:
            sub = self.svc.open(principal(user), "docs", tenant=tenant, cursor=cursor, fd=None)
        except StreamError as exc:
            refused = exc.status
        else:
            refused = 0
        if refused:
            assert refused == 403
            assert not self._granted(user, tenant)
            return
        assert self._granted(user, tenant)
        c = Client(user, tenant, sub)
        if cursor is not None:
            # A resume: the client holds the rows that cursor stands for (whoever read up to it);
            # a cursor it cannot use must get it a reset and a fresh snapshot to converge.
            c.rows = dict(self.cursor_state.get((cursor, tenant), {"?": None}))
        self.clients.append(c)

    def _read(self, c: Client) -> None:
        data = b"".join(c.sub.backlog)
        c.sub.backlog.clear()
        c.sub.backlog_bytes = 0
        for ev in sse.parse(data):
            kind = ev["event"]
            c.events.append(kind)
            doc = msgspec.json.decode(ev["data"])
            if kind == "reset":
                continue
            if kind == "revoked":
                c.closed = True
                continue
            if kind == "snapshot":
                if doc["chunk"] == 0:
                    c.rows = {}
                for r in doc["rows"]:
                    c.rows[r["row"]["id"]] = r["row"]
            else:
                assert c.user in self.granted_at[ev["id"]], f"{c.user} got {ev['id']} without a grant"
                assert doc["tenant_id"] == c.tenant
                if kind.endswith(".deleted"):
                    c.rows.pop(doc["payload"]["id"], None)
                else:
                    c.rows[doc["payload"]["id"]] = doc["payload"]
            if ev["id"]:
                c.last_id = ev["id"]
                self.cursors.append(ev["id"])
                self.cursor_state[(ev["id"], c.tenant)] = dict(c.rows)

    @rule(data=st.data())
    def read_and_maybe_drop(self, data: st.DataObject) -> None:
        open_clients = [c for c in self.clients if not c.closed]
        if not open_clients:
            return
        c = data.draw(st.sampled_from(open_clients))
        self._read(c)
        if data.draw(st.booleans()):
            c.sub.close("client_closed")
            c.closed = True

    @invariant()
    def granted_clients_converge(self) -> None:
        for c in self.clients:
            if c.closed:
                continue
            self._read(c)
            if _closed(c):  # _read may have closed it
                continue
            assert self._granted(c.user, c.tenant), "an open stream outlived its grant"
            if self.connected:
                want = {k: v for k, v in self.truth_docs.items() if v["tenant_id"] == c.tenant}
                assert c.rows == want


TestStreams = StreamsMachine.TestCase
TestStreams.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
