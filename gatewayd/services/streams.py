"""The streams service: projector + event log + hub, and the rules for opening a stream.

It is the supervisor's sink: each :class:`~gatewayd.services.supervisor.ChangeBatch` is applied
to the projection and fanned out in one synchronous step, so a client either sees a batch's
events or it doesn't, never half.

Opening a stream is synchronous too (no await between taking the snapshot or replay and
registering the subscriber), so nothing can fall between the initial state and the live events.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from gatewayd.proto import sse
from gatewayd.proto.access import AccessIndex
from gatewayd.proto.cache import RowChange
from gatewayd.proto.eventlog import EventLog, Replay, Reset
from gatewayd.proto.projection import SCHEMA_VERSION, Projector, StreamDef
from gatewayd.proto.schema import ModuleSchema
from gatewayd.proto.tokens import PermissionDenied, Principal
from gatewayd.services.hub import Hub, HubConfig, Subscriber
from gatewayd.services.supervisor import ChangeBatch

logger = logging.getLogger(__name__)
_json = msgspec.json.Encoder()

# Snapshot page size limits for GET .../snapshot (the SSE snapshot uses snapshot_chunk_rows).
MAX_PAGE_ROWS: Final = 5000
# Paged snapshots kept per principal: one principal cannot push everyone else's pages out.
MAX_PAGES_PER_PRINCIPAL: Final = 8
_OFFSET: Final = re.compile(r"[0-9]{1,9}")


class StreamError(Exception):
    """A stream request that cannot be served: ``status`` and ``code`` for the HTTP answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamsConfig:
    retry_ms: int = 2000
    retry_jitter_ms: int = 3000
    snapshot_chunk_rows: int = 500
    snapshot_page_ttl_s: float = 60.0
    snapshot_pages_count: int = 256


@dataclass(slots=True)
class _Pages:
    rows: list[dict[str, Any]]
    cursor: str
    expires: float


class StreamService:
    def __init__(
        self,
        streams: list[StreamDef],
        log: EventLog,
        hub_config: HubConfig,
        config: StreamsConfig,
        *,
        access: AccessIndex | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.projector = Projector(streams, log)
        # None: rights come from token claims. Otherwise from the projected access tables.
        self.access = access
        self._access_tables = frozenset(access.t.tables) if access is not None else frozenset()
        # (subject, tenant, stream) -> partition seq when the right appeared (replay floor).
        self.grant_seq: dict[tuple[str, str, str], int] = {}
        self.revocations = 0
        self.log = log
        self.hub = Hub(hub_config)
        self.config = config
        self._rng = rng or random.Random()
        # Bounded: a client paging a big snapshot holds one entry; old entries expire or are evicted.
        self._pages: OrderedDict[str, _Pages] = OrderedDict()
        self.batches = 0
        self.resets: dict[str, int] = {}  # resumes that could not replay, by reason
        self.replays = 0  # resumes answered by replay from the ring
        self._row_types: dict[str, Any] = {}
        # Bounded: entries are taken by the writer right away; stragglers age out.
        self._write_cursors: OrderedDict[int, tuple[list[RowChange], dict[str, str]]] = OrderedDict()

    @property
    def streams(self) -> dict[str, StreamDef]:
        return self.projector.streams

    # --- the supervisor's sink (sync) --------------------------------------------------------

    def apply(self, batch: ChangeBatch) -> None:
        self.batches += 1
        hub = self.hub
        if self.access is not None:
            access_changes = [c for c in batch.changes if c.table in self._access_tables]
            if access_changes or batch.cause == "initial":
                self._apply_access(access_changes, initial=batch.cause == "initial")
        if batch.schema is not None:
            changed = self._row_types_changed(batch.schema)
            if changed:
                self._restart(changed, batch)
                return
        published = self.projector.apply(batch.changes)
        for ev in published:
            hub.publish(ev.partition, ev.frame)
        if batch.cause == "reducer" and published:
            # The write's caller asks for these right after its result (same sync step upstream).
            cursors: dict[str, str] = {}
            for ev in published:
                cursors[f"{ev.partition[0]}/{ev.partition[1]}"] = ev.id
            self._write_cursors[id(batch.changes)] = (batch.changes, cursors)
            while len(self._write_cursors) > 1024:
                self._write_cursors.popitem(last=False)

    def take_write_cursors(self, changes: list[RowChange]) -> dict[str, str]:
        """The last event id per ``stream/tenant`` partition produced by a committed write."""
        entry = self._write_cursors.pop(id(changes), None)
        if entry is None or entry[0] is not changes:
            return {}
        return entry[1]

    def _apply_access(self, changes: list[RowChange], *, initial: bool) -> None:
        """Update rights, record grant boundaries, and revoke streams that lost their right."""
        access = self.access
        assert access is not None
        touched = access.apply(changes)
        access.loaded = True
        if initial:
            return
        for subject, tenant in touched:
            perms = access.permissions(subject, tenant)
            for stream in self.streams.values():
                key = (subject, tenant, stream.name)
                if stream.permission in perms:
                    if key not in self.grant_seq:
                        # The right appears now: nothing from before this point may be replayed.
                        self.grant_seq[key] = self.log.partition((stream.name, tenant)).seq
                else:
                    self.grant_seq.pop(key, None)
                    for sub in tuple(self.hub.partitions.get((stream.name, tenant), ())):
                        if sub.principal == subject:
                            self.revocations += 1
                            sub.push(
                                self.revoked_frame(f"{subject} may no longer read {stream.name} in {tenant}")
                            )
                            sub.finish("revoked")

    @staticmethod
    def revoked_frame(reason: str) -> bytes:
        return sse.json_frame(_json.encode({"event": "revoked", "reason": reason}), event="revoked")

    def _row_types_changed(self, schema: ModuleSchema) -> set[str]:
        """Streamed tables whose row type differs from the one their rows were decoded with."""
        tables = {t for s in self.streams.values() for t in s.tables}
        now = {t: schema.tables[t].row_type for t in tables if t in schema.tables}
        before, self._row_types = self._row_types, now
        if not before:
            return set()
        return {t for t in tables if before.get(t) != now.get(t)}

    def _restart(self, tables: set[str], batch: ChangeBatch) -> None:
        """Reconciliation impossible (a module update changed row types): every client of the
        affected streams gets ``reset`` and its stream ends; resuming gives a fresh snapshot."""
        names = self.projector.streams_of_tables(tables)
        logger.warning("row types of %s changed: restarting streams %s", sorted(tables), sorted(names))
        for key in self.projector.restart_streams(names, batch.changes):
            for sub in tuple(self.hub.partitions.get(key, ())):
                sub.push(self.reset_frame("schema_changed"))
                sub.finish("schema_changed")
        # For every other stream the batch is an ordinary change.
        others = set(self.streams) - names
        for ev in self.projector.apply(batch.changes, only=others):
            self.hub.publish(ev.partition, ev.frame)

    # --- authorization -------------------------------------------------------------------------

    def authorize(self, principal: Principal, name: str, tenant: str | None) -> tuple[StreamDef, str]:
        """Which partition ``principal`` may read; raises StreamError (404/403) otherwise."""
        stream = self.streams.get(name)
        if stream is None:
            raise StreamError(404, "unknown_stream", f"no stream named {name!r}")
        if self.access is not None:
            return stream, self._authorize_from_tables(principal, stream, tenant)
        if not principal.can(stream.permission):
            raise StreamError(
                403, "forbidden", f"reading {name!r} needs the {stream.permission!r} permission"
            )
        tenant = tenant or principal.tenant
        if tenant is None:
            raise StreamError(403, "no_tenant", "the credential names no tenant")
        if tenant != principal.tenant:
            raise StreamError(403, "forbidden", "the credential does not cover that tenant")
        return stream, tenant

    def _authorize_from_tables(self, principal: Principal, stream: StreamDef, tenant: str | None) -> str:
        access = self.access
        assert access is not None
        if not access.loaded:
            raise StreamError(503, "not_ready", "access rules are not loaded yet; retry shortly")
        if tenant is None:
            tenant = principal.tenant
        if tenant is None:
            tenants = access.tenants(principal.subject)
            if not tenants:
                raise StreamError(403, "forbidden", f"{principal.subject} is not a member of any tenant")
            if len(tenants) > 1:
                raise StreamError(400, "tenant_required", "name the tenant with ?tenant_id=")
            tenant = tenants[0]
        if not access.can(principal.subject, tenant, stream.permission):
            raise StreamError(403, "forbidden", f"no {stream.permission!r} right in tenant {tenant!r}")
        return tenant

    def replay_floor(self, principal: Principal, stream: str, tenant: str) -> int:
        return self.grant_seq.get((principal.subject, tenant, stream), 0)

    def check_capacity(self, principal: Principal) -> None:
        if not self.hub.can_subscribe(principal.subject):
            raise StreamError(
                429,
                "too_many_streams",
                f"at most {self.hub.config.max_streams_per_principal} concurrent streams per principal",
            )

    # --- frames ------------------------------------------------------------------------------

    def retry_frame(self) -> bytes:
        jitter = self._rng.randint(0, self.config.retry_jitter_ms) if self.config.retry_jitter_ms else 0
        return sse.retry(self.config.retry_ms + jitter)

    def _snapshot_frames(self, stream: StreamDef, tenant: str) -> list[bytes]:
        rows, cursor, _seq = self.projector.snapshot(stream.name, tenant)
        n = self.config.snapshot_chunk_rows
        chunks = [rows[i : i + n] for i in range(0, len(rows), n)] or [[]]
        frames = []
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            body = _json.encode(
                {
                    "event": "snapshot",
                    "stream": stream.name,
                    "tenant_id": tenant,
                    "schema_version": SCHEMA_VERSION,
                    "chunk": i,
                    "last": last,
                    "cursor": cursor if last else None,
                    "rows": [{"table": t, "row": r} for t, r in chunk],
                }
            )
            # Only the last chunk carries the id: a client cut mid-snapshot starts over.
            frames.append(sse.json_frame(body, event="snapshot", id=cursor if last else None))
        return frames

    @staticmethod
    def reset_frame(reason: str) -> bytes:
        return sse.json_frame(_json.encode({"event": "reset", "reason": reason}), event="reset")

    # --- opening -------------------------------------------------------------------------------

    def open(
        self,
        principal: Principal,
        name: str,
        *,
        tenant: str | None,
        cursor: str | None,
        fd: int | None,
        head: bytes = b"",
    ) -> Subscriber:
        """Authorize, then atomically register a subscriber with its initial frames queued.

        Raises:
            StreamError: 404 unknown stream, 403 not allowed, 429 too many streams.
        """
        stream, tenant = self.authorize(principal, name, tenant)
        self.check_capacity(principal)
        key = (stream.name, tenant)
        # Everything that can fail on the client's input happens before the subscriber exists.
        res = (
            self.log.resume(key, cursor, floor=self.replay_floor(principal, stream.name, tenant))
            if cursor
            else None
        )
        sub = self.hub.subscribe(key, principal.subject, fd)
        if head:
            sub.push(head)
        sub.push(self.retry_frame())
        if isinstance(res, Replay):
            self.replays += 1
            for f in res.frames:
                sub.push(f)
            return sub
        if isinstance(res, Reset):
            self.resets[res.reason] = self.resets.get(res.reason, 0) + 1
            sub.push(self.reset_frame(res.reason))
        for f in self._snapshot_frames(stream, tenant):
            sub.push(f)
        return sub

    # --- paginated snapshots ---------------------------------------------------------------------

    def snapshot_page(
        self, principal: Principal, name: str, *, tenant: str | None, limit: int, page: str | None
    ) -> dict[str, Any]:
        stream, tenant = self.authorize(principal, name, tenant)
        limit = max(1, min(limit, MAX_PAGE_ROWS))
        now = time.monotonic()
        for k in [k for k, v in self._pages.items() if v.expires < now]:
            del self._pages[k]
        if page is None:
            rows, cursor, _seq = self.projector.snapshot(stream.name, tenant)
            entry = _Pages(
                [{"table": t, "row": r} for t, r in rows], cursor, now + self.config.snapshot_page_ttl_s
            )
            offset = 0
            token = f"{secrets.token_urlsafe(12)}"
        else:
            token, _, off = page.rpartition(":")
            got = self._pages.get(f"{principal.subject}|{stream.name}|{tenant}|{token}")
            if got is None or not _OFFSET.fullmatch(off):
                raise StreamError(
                    410, "page_expired", "that snapshot page expired; start again without 'page'"
                )
            entry, offset = got, int(off)
        rows_out = entry.rows[offset : offset + limit]
        next_offset = offset + len(rows_out)
        more = next_offset < len(entry.rows)
        key = f"{principal.subject}|{stream.name}|{tenant}|{token}"
        if more:
            self._pages[key] = entry
            self._pages.move_to_end(key)
            mine = [k for k in self._pages if k.startswith(f"{principal.subject}|")]
            for k in mine[: max(0, len(mine) - MAX_PAGES_PER_PRINCIPAL)]:
                del self._pages[k]  # this principal's oldest first
            while len(self._pages) > self.config.snapshot_pages_count:
                self._pages.popitem(last=False)
        else:
            self._pages.pop(key, None)
        return {
            "stream": stream.name,
            "tenant_id": tenant,
            "schema_version": SCHEMA_VERSION,
            "cursor": entry.cursor,
            "rows": rows_out,
            "next_page": f"{token}:{next_offset}" if more else None,
        }

    def statistics(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "events": self.projector.events,
            "skipped_rows": self.projector.skipped,
            "resets": dict(self.resets),
            **self.hub.statistics(),
            **{f"log_{k}": v for k, v in self.log.statistics().items()},
        }


__all__ = ["PermissionDenied", "StreamError", "StreamService", "StreamsConfig"]
