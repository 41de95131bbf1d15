"""Event ids and per-partition replay rings (sans-IO).

Theory of operation
-------------------
SpacetimeDB puts no offset on the wire, so gatewayd numbers events itself, per *partition* (one
stream's events for one tenant). An event id (= a cursor) is the opaque string
``<epoch>.<tag>.<seq>``:

* ``epoch`` is random per process start: an id from before a restart is recognisably stale.
* ``tag`` is a keyed hash of (epoch, stream, tenant): an id from another partition is refused
  instead of being misread as a position in this one, and the tag tells nothing about the tenant.
* ``seq`` counts this partition's events only, so an id reveals nothing about other tenants'
  volume.

Each partition keeps its recent frames in a ring bounded by event count and bytes, and all rings
together stay under a global byte budget: when it is exceeded the least recently active
partitions give up their oldest events first. A resume either replays exactly the events after
the cursor, or, when the cursor is unknown, evicted, from another epoch or partition, or malformed,
answers *reset* with the reason: never a silent gap.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

# A cursor is short; anything longer is garbage and is not parsed further.
MAX_CURSOR_LEN: Final = 96

PartitionKey = tuple[str, str]  # (stream, tenant)

_SEQ: Final = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class Replay:
    """Resume is possible: ``frames`` are exactly the events after the cursor, in order."""

    frames: list[bytes]
    seq: int  # the cursor's seq


@dataclass(frozen=True, slots=True)
class Reset:
    """Resume is impossible; the client gets a ``reset`` event and a fresh snapshot."""

    # "malformed" | "other_epoch" | "other_partition" | "evicted" | "unknown" | "stale" | "before_grant"
    reason: str


@dataclass(slots=True)
class PartitionLog:
    key: PartitionKey
    tag: str
    seq: int = 0
    ring: deque[tuple[int, bytes]] = field(default_factory=deque)
    ring_bytes: int = 0
    # Lowest seq a client may still resume from (after eviction, anything below is unknown).
    floor: int = 0
    generation: int = 0
    retired_tags: set[str] = field(default_factory=set)

    @property
    def first_seq(self) -> int:
        return self.ring[0][0] if self.ring else self.seq + 1


class EventLog:
    """All partitions' sequences and rings. Sync, no I/O, no clock."""

    def __init__(
        self,
        *,
        max_events_per_partition: int,
        max_bytes_per_partition: int,
        max_total_bytes: int,
        epoch: str | None = None,
    ) -> None:
        if max_events_per_partition < 1 or max_bytes_per_partition < 1 or max_total_bytes < 1:
            raise ValueError("event log bounds must be positive")
        self.max_events = max_events_per_partition
        self.max_bytes = max_bytes_per_partition
        self.max_total_bytes = max_total_bytes
        self.epoch = epoch or secrets.token_hex(4)
        self._key = secrets.token_bytes(16)
        # Least recently appended first: the global budget trims from the front.
        self.partitions: OrderedDict[PartitionKey, PartitionLog] = OrderedDict()
        self.total_bytes = 0
        self.evicted_events = 0

    def _tag(self, key: PartitionKey, generation: int = 0) -> str:
        h = hashlib.blake2s(f"{key[0]}\x00{key[1]}\x00{generation}".encode(), key=self._key, digest_size=5)
        return h.hexdigest()

    def restart_partition(self, key: PartitionKey) -> None:
        """Start a new generation: earlier cursors of this partition reset with ``stale``."""
        p = self.partition(key)
        while p.ring:
            self._evict_one(p)
        p.retired_tags.add(p.tag)
        p.generation += 1
        p.tag = self._tag(key, p.generation)
        p.seq = p.floor = 0

    def partition(self, key: PartitionKey) -> PartitionLog:
        p = self.partitions.get(key)
        if p is None:
            p = self.partitions[key] = PartitionLog(key, self._tag(key))
        return p

    def cursor(self, key: PartitionKey, seq: int | None = None) -> str:
        p = self.partition(key)
        return f"{self.epoch}.{p.tag}.{p.seq if seq is None else seq}"

    def next_id(self, key: PartitionKey) -> tuple[int, str]:
        """The seq and id the next event of ``key`` will get (it is not appended yet)."""
        p = self.partition(key)
        return p.seq + 1, f"{self.epoch}.{p.tag}.{p.seq + 1}"

    def append(self, key: PartitionKey, seq: int, frame: bytes) -> None:
        """Record the frame for ``seq`` (from :meth:`next_id`), trimming rings to their bounds."""
        p = self.partition(key)
        if seq != p.seq + 1:
            raise ValueError(f"event {seq} appended out of order (partition at {p.seq})")
        p.seq = seq
        p.ring.append((seq, frame))
        p.ring_bytes += len(frame)
        self.total_bytes += len(frame)
        self.partitions.move_to_end(key)
        while p.ring and (len(p.ring) > self.max_events or p.ring_bytes > self.max_bytes):
            self._evict_one(p)
        if self.total_bytes > self.max_total_bytes:
            for other in list(self.partitions.values()):
                while other.ring and self.total_bytes > self.max_total_bytes:
                    self._evict_one(other)
                if self.total_bytes <= self.max_total_bytes:
                    break

    def _evict_one(self, p: PartitionLog) -> None:
        seq, frame = p.ring.popleft()
        p.ring_bytes -= len(frame)
        self.total_bytes -= len(frame)
        p.floor = seq
        self.evicted_events += 1

    def parse(self, cursor: str) -> tuple[str, str, int] | None:
        if not cursor or len(cursor) > MAX_CURSOR_LEN:
            return None
        parts = cursor.split(".")
        # ASCII digits only: str.isdigit() also accepts "²" and other characters int() refuses.
        if len(parts) != 3 or not _SEQ.fullmatch(parts[2]) or not parts[0] or not parts[1]:
            return None
        return parts[0], parts[1], int(parts[2])

    def resume(self, key: PartitionKey, cursor: str, *, floor: int = 0) -> Replay | Reset:
        """What a client of partition ``key`` resuming from ``cursor`` must get.

        ``floor``: events with seq <= floor must not be replayed to this client (for example
        from before its grant); a cursor below it resets.
        """
        parsed = self.parse(cursor)
        if parsed is None:
            return Reset("malformed")
        epoch, tag, seq = parsed
        if epoch != self.epoch:
            return Reset("other_epoch")
        p = self.partition(key)
        if tag in p.retired_tags:
            return Reset("stale")
        if tag != p.tag:
            return Reset("other_partition")
        if seq > p.seq:
            return Reset("unknown")
        if seq < p.floor:
            return Reset("evicted")
        if seq < floor:
            return Reset("before_grant")
        return Replay([f for s, f in p.ring if s > seq], seq)

    def statistics(self) -> dict[str, int]:
        return {
            "partitions": len(self.partitions),
            "ring_bytes": self.total_bytes,
            "ring_events": sum(len(p.ring) for p in self.partitions.values()),
            "evicted_events": self.evicted_events,
        }
