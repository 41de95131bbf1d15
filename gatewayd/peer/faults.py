"""Peer-wide fault-injection state (per-connection faults live on the connection itself).

The :class:`gatewayd.peer.peer.Peer` methods (``refuse_upgrades``, ``stall_handshakes``,
``refuse_tokens``, ``mute``, ``delay_reducer``…) are the API; this module only holds the state the
HTTP and WebSocket layers consult.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import trio

from gatewayd.peer.connection import Mute


@dataclass(frozen=True, slots=True)
class ReducerDelay:
    """``before``: the call waits before running (a cut then means it never ran).
    ``after``: it commits at once, and its result reaches the caller only after the delay."""

    delay_s: float
    when: Literal["before", "after"] = "before"


@dataclass(frozen=True, slots=True)
class UpgradeRefusal:
    status: int
    message: str
    until: float | None  # trio time; None = until accept_upgrades()


@dataclass(slots=True)
class Faults:
    refusal: UpgradeRefusal | None = None
    handshakes_released: trio.Event | None = None  # set -> stalled handshakes proceed
    refuse_tokens: bool = False
    mute: Mute | None = None
    reducer_delays: dict[str, ReducerDelay] = field(default_factory=dict)

    def upgrade_refusal(self) -> UpgradeRefusal | None:
        r = self.refusal
        if r is None:
            return None
        if r.until is not None and trio.current_time() >= r.until:
            self.refusal = None
            return None
        return r
