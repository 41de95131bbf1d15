"""The front's stream rechecks treat a rate-limited recheck (an API key's own limit) like an
unavailable app: the stream goes on, the recheck is rescheduled, nothing crashes."""

from __future__ import annotations

import trio
import trio.testing

from gatewayd.http.front import Rechecks
from gatewayd.proto.tokens import Principal, RateLimited
from gatewayd.services.auth import Presented


class Sub:
    id = 7
    finished: str | None = None

    def push(self, frame: bytes) -> None:
        pass

    def finish(self, reason: str) -> None:
        self.finished = reason


async def test_rate_limited_recheck_keeps_the_stream(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[float] = []
    p = Principal("robot:int-1", "robot", "acme", frozenset(), "gatewayd:api-key", credential="api_key")

    async def authenticate(presented: Presented) -> Principal:
        calls.append(trio.current_time())
        raise RateLimited("too many attempts with this API key", retry_after_s=30)

    rechecks = Rechecks(authenticate, 30.0, wall_clock=lambda: 1_800_000_000.0 + trio.current_time())
    sub = Sub()
    async with trio.open_nursery() as nursery:
        await nursery.start(rechecks.serve)
        rechecks.watch(sub, Presented(api_key="k"), p)  # type: ignore[arg-type]
        await trio.sleep(91)
        nursery.cancel_scope.cancel()
    assert len(calls) == 3 and sub.finished is None
