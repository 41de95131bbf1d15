"""Stream projections: upstream row changes -> per-(stream, tenant) events and snapshots (sans-IO).

Theory of operation
-------------------
A *stream* is declared in config: a name, the tables it carries, the column that names a row's
tenant, and the permission a reader needs. For every stream and tenant (a *partition*) the
projector keeps the current rows, keyed by (table, row key), and assigns each change an event id
from the :class:`~gatewayd.proto.eventlog.EventLog`.

``apply`` takes one batch of row changes (one transaction, one reconcile) and is synchronous: no
other task can observe a half-applied batch, and a snapshot taken between two batches is exactly
the state at its cursor. For each change:

* ``inserted`` -> ``<table>.inserted`` in the row's partition;
* ``updated``  -> ``<table>.updated`` (or, when the tenant column itself changed, ``deleted`` in the
  old partition and ``inserted`` in the new one: a tenant never sees a row move away silently);
* ``deleted``  -> ``<table>.deleted`` with the last known row;
* ``event``    -> ``<table>.inserted`` (event-table rows are delivered, never stored).

Each event is encoded once, as the SSE frame every client of its partition receives. Rows whose
tenant column is missing or not a string or number are not streamed (counted in ``skipped``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from gatewayd.proto.cache import RowChange
from gatewayd.proto.eventlog import EventLog, PartitionKey
from gatewayd.proto.sse import json_frame

SCHEMA_VERSION: Final = 1

_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class StreamDef:
    name: str
    tables: tuple[str, ...]
    tenant_column: str
    permission: str
    queries: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Published:
    """One event, ready to fan out: the partition, its seq and id, and the encoded frame."""

    partition: PartitionKey
    seq: int
    id: str
    event: str
    frame: bytes


@dataclass(slots=True)
class _Partition:
    rows: dict[tuple[str, Hashable], Any] = field(default_factory=dict)


def _tenant_of(row: Any, column: str) -> str | None:
    if not isinstance(row, Mapping):
        return None
    v = row.get(column)
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return None


def encode_envelope(event: str, id: str, tenant: str, payload: Any) -> bytes:
    return _json.encode(
        {"event": event, "id": id, "tenant_id": tenant, "schema_version": SCHEMA_VERSION, "payload": payload}
    )


class Projector:
    """Per-partition rows and events for the configured streams."""

    def __init__(self, streams: Iterable[StreamDef], log: EventLog) -> None:
        self.streams = {s.name: s for s in streams}
        self.log = log
        self._by_table: dict[str, list[StreamDef]] = {}
        for s in self.streams.values():
            for t in s.tables:
                self._by_table.setdefault(t, []).append(s)
        self._partitions: dict[PartitionKey, _Partition] = {}
        self.skipped = 0
        self.events = 0

    def _publish(self, key: PartitionKey, event: str, payload: Any) -> Published:
        seq, eid = self.log.next_id(key)
        frame = json_frame(encode_envelope(event, eid, key[1], payload), event=event, id=eid)
        self.log.append(key, seq, frame)
        self.events += 1
        return Published(key, seq, eid, event, frame)

    def apply(self, changes: Iterable[RowChange], only: set[str] | None = None) -> list[Published]:
        """Apply one batch (to the streams in ``only``, default all); returns its events in order.
        Sync: never awaits."""
        out: list[Published] = []
        parts = self._partitions
        for ch in changes:
            streams = self._by_table.get(ch.table)
            if not streams:
                continue
            rk = (ch.table, ch.key)
            for s in streams:
                if only is not None and s.name not in only:
                    continue
                col = s.tenant_column
                if ch.kind == "event":
                    tenant = _tenant_of(ch.row, col)
                    if tenant is None:
                        self.skipped += 1
                        continue
                    out.append(self._publish((s.name, tenant), f"{ch.table}.inserted", ch.row))
                    continue
                new_t = _tenant_of(ch.row, col) if ch.kind != "deleted" else None
                old_t = _tenant_of(ch.old, col) if ch.kind == "updated" else None
                if ch.kind == "deleted":
                    old_t = _tenant_of(ch.row, col)
                if ch.kind == "updated" and old_t is not None and new_t is not None and old_t == new_t:
                    key = (s.name, new_t)
                    parts.setdefault(key, _Partition()).rows[rk] = ch.row
                    out.append(self._publish(key, f"{ch.table}.updated", ch.row))
                    continue
                if old_t is not None:
                    key = (s.name, old_t)
                    p = parts.get(key)
                    last = p.rows.pop(rk, None) if p is not None else None
                    out.append(
                        self._publish(
                            key, f"{ch.table}.deleted", ch.old if ch.kind == "updated" else last or ch.row
                        )
                    )
                if new_t is not None:
                    key = (s.name, new_t)
                    parts.setdefault(key, _Partition()).rows[rk] = ch.row
                    out.append(self._publish(key, f"{ch.table}.inserted", ch.row))
                if old_t is None and new_t is None:
                    self.skipped += 1
        return out

    def replace_stream(self, new: StreamDef) -> None:
        """Swap a stream's definition for one with the same tables and tenant column (a reload
        that changes its permission). Sync; partitions and their logs are untouched."""
        old = self.streams[new.name]
        if (old.tables, old.tenant_column) != (new.tables, new.tenant_column):
            raise ValueError(f"stream {new.name!r}: tables or tenant column changed (needs a restart)")
        self.streams[new.name] = new
        for t in new.tables:
            self._by_table[t] = [new if s.name == new.name else s for s in self._by_table[t]]

    def streams_of_tables(self, tables: Iterable[str]) -> set[str]:
        return {s.name for t in tables for s in self._by_table.get(t, ())}

    def restart_streams(self, names: set[str], changes: Iterable[RowChange]) -> list[PartitionKey]:
        """Reconciliation is impossible for these streams (their row types changed): apply the
        changes without events and start every partition of theirs over (old cursors go stale).
        Returns the partitions whose clients must be told to reset."""
        before = {k for k in self._partitions if k[0] in names}
        keep_events = self.events
        self.apply(changes, only=names)  # the events are dropped: clients start over anyway
        self.events = keep_events
        affected = sorted(before | {k for k in self._partitions if k[0] in names})
        for key in affected:
            self.log.restart_partition(key)
        return affected

    def snapshot(self, stream: str, tenant: str) -> tuple[list[tuple[str, Any]], str, int]:
        """(rows as (table, row), cursor, seq) of one partition, consistent with each other."""
        key = (stream, tenant)
        p = self._partitions.get(key)
        rows = [(t, row) for (t, _k), row in p.rows.items()] if p is not None else []
        seq = self.log.partition(key).seq
        return rows, self.log.cursor(key, seq), seq

    def partition_count(self) -> int:
        return len(self._partitions)
