"""An evicted client's last ``reset`` hint has the same data as every other ``reset`` event."""

from __future__ import annotations

import json
import socket

from gatewayd.proto import sse
from gatewayd.services.hub import Hub, HubConfig
from gatewayd.services.streams import StreamService


async def test_eviction_hint_is_an_ordinary_reset_event() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        hub = Hub(HubConfig())
        sub = hub.subscribe(("documents", "acme"), "user:alice", a.fileno())
        sub.evict("buffer_overflow")
        raw = b.recv(65536)
    assert sub.closed
    assert raw == StreamService.reset_frame("buffer_overflow")
    (ev,) = sse.parse(raw)
    assert ev["event"] == "reset"
    assert json.loads(ev["data"]) == {"event": "reset", "reason": "buffer_overflow"}
