"""Sliding-window attempt counters (sans-IO: ``now`` comes in as an argument).

Used for API keys: every attempt with a key id counts against that id, and every failed attempt
counts against the source IP (SECURITY.md: "rate limits that count failures too"). Memory is
bounded: at most ``max_tracked`` keys are remembered, least recently used dropped first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable


class WindowCounter:
    """At most ``limit`` events per ``window_s`` per key."""

    def __init__(self, *, limit: int, window_s: float, max_tracked: int = 10_000) -> None:
        if limit <= 0 or window_s <= 0 or max_tracked <= 0:
            raise ValueError("limit, window_s and max_tracked must be > 0")
        self.limit = limit
        self.window_s = window_s
        self.max_tracked = max_tracked
        self._events: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def _trim(self, key: Hashable, now: float) -> deque[float] | None:
        q = self._events.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._events[key]
            return None
        return q

    def retry_after(self, key: Hashable, now: float) -> float | None:
        """Seconds until ``key`` may try again, or None when it may now."""
        q = self._trim(key, now)
        if q is None or len(q) < self.limit:
            return None
        return q[0] + self.window_s - now

    def hit(self, key: Hashable, now: float) -> None:
        q = self._trim(key, now)
        if q is None:
            q = self._events[key] = deque(maxlen=self.limit)
            while len(self._events) > self.max_tracked:
                self._events.popitem(last=False)
        else:
            self._events.move_to_end(key)
        q.append(now)

    def __len__(self) -> int:
        return len(self._events)
