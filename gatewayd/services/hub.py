"""The fan-out hub: every SSE client of a partition gets each event's frame, and none can block it.

Theory of operation (DESIGN.md, "Performance facts")
----------------------------------------------------
``publish`` is synchronous and is called straight from the projector. For each subscriber of the
partition it *offers* the pre-encoded frame:

* **Fast path** (raw-socket clients): when the client has no backlog and its writer is idle, the
  frame is written to the non-blocking socket with one ``os.write``. Almost every event to almost
  every client ends here: no task switch, no copy, no per-client allocation.
* **Backlog** (socket full, partial write, or a client served through the ASGI fallback): the
  frame is appended to the client's bounded backlog and its writer task is woken. The backlog is
  bounded by bytes (``client_buffer_bytes``); a client that overflows it is evicted with reason
  ``buffer_overflow`` (and gets a last ``reset`` hint if its socket can still take it). A writer
  that makes no progress for ``send_timeout_s`` evicts its client with reason ``send_timeout``.

The writer task of an idle client waits for one of: its socket becoming readable (EOF means the
client left), a wake-up from ``offer``, or the heartbeat deadline (a comment line that never moves
the cursor). So one sleeping task per client is all an idle client costs.

Eviction reasons are counted in :attr:`Hub.evictions`; per-principal stream counts enforce the
concurrent-stream cap.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from itertools import count
from typing import Any, Final

import msgspec
import trio

from gatewayd.proto import sse
from gatewayd.proto.eventlog import PartitionKey

logger = logging.getLogger(__name__)

_sub_ids = count(1)

# Coalesce backlog writes up to this size: fewer syscalls for a client catching up, while one
# write never holds a huge joined buffer.
MAX_WRITE_CHUNK: Final = 256 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class HubConfig:
    # Per-client backlog: a browser on a bad link may lag a few hundred events; beyond that it is
    # cheaper for it to resume (replay ring) than for us to hold its queue.
    client_buffer_bytes: int = 256 * 1024
    # A client that accepts nothing for this long is gone (or hostile).
    send_timeout_s: float = 15.0
    # Comment lines keep proxies (nginx default 60 s) and load balancers from closing idle streams.
    heartbeat_s: float = 15.0
    max_streams_per_principal: int = 16


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # outside a trio run (sans-IO tests drive the hub synchronously)
        return 0.0


class Subscriber:
    """One SSE client. Created by :meth:`Hub.subscribe`; the caller runs its writer."""

    __slots__ = (
        "_wait_scope",
        "backlog",
        "backlog_bytes",
        "close_reason",
        "closed",
        "fd",
        "hub",
        "id",
        "last_write",
        "partition",
        "principal",
        "sending",
        "task_scope",
        "wake",
    )

    def __init__(self, hub: Hub, partition: PartitionKey, principal: str, fd: int | None) -> None:
        self.hub = hub
        self.id = next(_sub_ids)
        self.partition = partition
        self.principal = principal
        self.fd = fd  # raw socket fd for the fast path, or None (ASGI fallback)
        # A list, not a deque: an idle client's empty deque costs ~700 B more (take_backlog).
        self.backlog: list[bytes] = []
        self.backlog_bytes = 0
        self.sending = False
        self.closed = False
        self.close_reason: str | None = None
        # Set by the writer; None until it runs (the hub itself never needs a clock).
        self.last_write = _now()
        self.wake = trio.Event()
        self._wait_scope: trio.CancelScope | None = None
        self.task_scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<Subscriber {self.id} {self.partition[0]}/{self.partition[1]} {self.principal}>"

    def _kick(self) -> None:
        self.wake.set()
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    def offer(self, frame: bytes, now: float | None = None) -> bool:
        """Hand one frame to this client without ever blocking (called by the hub, sync).

        Returns True when the frame went straight into the socket. ``now`` (the hub's clock
        reading for this publish) saves a clock call per client.
        """
        if self.closed:
            return False
        if self.fd is not None and not self.backlog and not self.sending:
            try:
                n = os.write(self.fd, frame)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.close("write_error" if exc.errno != errno.EPIPE else "client_closed")
                return False
            if n == len(frame):
                self.last_write = trio.current_time() if now is None else now
                return True
            frame = frame[n:]
        self.backlog.append(frame)
        self.backlog_bytes += len(frame)
        if self.backlog_bytes > self.hub.config.client_buffer_bytes:
            self.evict("buffer_overflow")
            return False
        self._kick()
        return False

    def push(self, frame: bytes) -> None:
        """Queue a frame that must go out even past the buffer bound (snapshot chunks, replay)."""
        self.backlog.append(frame)
        self.backlog_bytes += len(frame)
        self._kick()

    def evict(self, reason: str) -> None:
        """Cut this client, telling it to resume if its socket can still take one more frame."""
        if self.closed:
            return
        if self.fd is not None and not self.sending:
            # The same data as every other reset event: {"event": "reset", "reason": ...}.
            hint = sse.json_frame(msgspec.json.encode({"event": "reset", "reason": reason}), event="reset")
            with contextlib.suppress(OSError):  # best effort: a full socket simply loses the hint
                os.write(self.fd, hint)
        self.close(reason)

    def finish(self, reason: str) -> None:
        """End the stream after what is queued has been written (bounded by the send timeout)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.hub._closed(self)
        self._kick()

    def close(self, reason: str) -> None:
        """End the stream now, dropping anything queued."""
        if self.closed:
            if self.task_scope is not None and reason in ("send_timeout", "buffer_overflow"):
                self.task_scope.cancel()
            return
        self.closed = True
        self.close_reason = reason
        self.hub._closed(self)
        self._kick()
        if self.task_scope is not None:
            self.task_scope.cancel()

    def take_backlog(self) -> bytes:
        backlog = self.backlog
        if len(backlog) == 1 and self.backlog_bytes <= MAX_WRITE_CHUNK:
            data = backlog.pop()
        else:
            # The oldest frames, at least one, up to MAX_WRITE_CHUNK bytes in all.
            size = 0
            k = 0
            for part in backlog:
                if k and size + len(part) > MAX_WRITE_CHUNK:
                    break
                size += len(part)
                k += 1
            data = b"".join(backlog[:k])
            del backlog[:k]
        self.backlog_bytes -= len(data)
        return data


class Hub:
    """Partition -> subscribers. Sync publish; one writer task per subscriber, run by its caller."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.partitions: dict[PartitionKey, set[Subscriber]] = {}
        self.per_principal: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        self.published = 0
        self.direct_writes = 0
        self.closing = False
        self.on_evict: list[Callable[[Subscriber, str], None]] = []

    # --- membership -------------------------------------------------------------------------

    def can_subscribe(self, principal: str) -> bool:
        return self.per_principal[principal] < self.config.max_streams_per_principal

    def subscribe(self, partition: PartitionKey, principal: str, fd: int | None) -> Subscriber:
        sub = Subscriber(self, partition, principal, fd)
        self.partitions.setdefault(partition, set()).add(sub)
        self.per_principal[principal] += 1
        return sub

    def _closed(self, sub: Subscriber) -> None:
        subs = self.partitions.get(sub.partition)
        if subs is not None and sub in subs:
            subs.discard(sub)
            if not subs:
                del self.partitions[sub.partition]
            self.per_principal[sub.principal] -= 1
            if self.per_principal[sub.principal] <= 0:
                del self.per_principal[sub.principal]
            reason = sub.close_reason or "closed"
            if reason not in ("client_closed", "shutdown", "server_closed"):
                self.evictions[reason] += 1
                logger.info("stream %s evicted: %s", sub, reason)
            for cb in self.on_evict:
                cb(sub, reason)

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self.partitions.values())

    # --- fan-out ----------------------------------------------------------------------------

    def publish(self, partition: PartitionKey, frame: bytes) -> None:
        """Offer one frame to every client of ``partition``. Sync, never blocks."""
        subs = self.partitions.get(partition)
        self.published += 1
        if not subs:
            return
        # The hot path (DESIGN.md "Performance facts"): one clock reading and one counter update
        # per publish, not per client: a client costs its os.write and little else.
        now = _now()
        direct = 0
        for sub in tuple(subs):
            if sub.offer(frame, now):
                direct += 1
        self.direct_writes += direct

    def broadcast(self, frame: bytes) -> None:
        now = _now()
        for subs in tuple(self.partitions.values()):
            for sub in tuple(subs):
                if sub.offer(frame, now):
                    self.direct_writes += 1

    def finish_all(self, frame: bytes | None, reason: str) -> None:
        """Send ``frame`` (if any) to every client, then end their streams once flushed."""
        for subs in tuple(self.partitions.values()):
            for sub in tuple(subs):
                if frame is not None:
                    sub.push(frame)
                sub.finish(reason)

    def statistics(self) -> dict[str, Any]:
        return {
            "subscribers": self.subscriber_count(),
            "partitions": len(self.partitions),
            "published": self.published,
            "direct_writes": self.direct_writes,
            "evictions": dict(self.evictions),
        }


# --- writers ---------------------------------------------------------------------------------


def _is_closed(sub: Subscriber) -> bool:
    # A function call, so type checkers do not assume the flag cannot change across awaits.
    return sub.closed


async def run_socket_writer(sub: Subscriber, stream: trio.SocketStream) -> None:
    """Drain ``sub``'s backlog into its socket, send heartbeats, and notice when the client leaves.

    Returns when the subscriber is closed (evicted, client gone, or shutdown).

    Cancellation:
        Closes the subscriber with reason ``server_closed``.
    """
    hub = sub.hub
    cfg = hub.config
    sock = stream.socket
    try:
        with trio.CancelScope() as scope:
            sub.task_scope = scope
            while True:
                if sub.backlog:
                    data = sub.take_backlog()
                    sub.sending = True
                    with trio.move_on_after(cfg.send_timeout_s) as cs:
                        await stream.send_all(data)
                    sub.sending = False
                    if cs.cancelled_caught:
                        sub.close("send_timeout")
                        return
                    sub.last_write = trio.current_time()
                    continue
                if _is_closed(sub):
                    break
                deadline = sub.last_write + cfg.heartbeat_s
                if trio.current_time() >= deadline:
                    sub.push(sse.HEARTBEAT)
                    continue
                sub.wake = trio.Event()
                with trio.move_on_at(deadline) as ws:
                    sub._wait_scope = ws
                    if sub.backlog or _is_closed(sub):
                        continue
                    await trio.lowlevel.wait_readable(sock)
                sub._wait_scope = None
                if ws.cancelled_caught:
                    continue
                # Readable: EOF (the client left) or stray bytes (ignored, bounded).
                try:
                    data = await sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    sub.close("client_closed")
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        sub.close("client_closed")
    finally:
        sub.sending = False
        sub.close(sub.close_reason or "server_closed")


async def iter_subscriber(sub: Subscriber) -> AsyncIterator[bytes]:
    """The ASGI-fallback writer: yields backlog chunks and heartbeats until the client is closed."""
    cfg = sub.hub.config
    try:
        while True:
            if sub.backlog:
                yield sub.take_backlog()
                sub.last_write = trio.current_time()
                continue
            if sub.closed:
                return
            sub.wake = trio.Event()
            with trio.move_on_at(sub.last_write + cfg.heartbeat_s) as cs:
                await sub.wake.wait()
            if cs.cancelled_caught and not sub.backlog:
                sub.push(sse.HEARTBEAT)
    finally:
        sub.close(sub.close_reason or "client_closed")
