"""Credential rechecks of open native streams (``gatewayd.http.front.Rechecks``) on virtual time:
the rules of ``recheck_delay``/``recheck_credential``, scheduled from one task for all streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from gatewayd.http.front import Rechecks
from gatewayd.proto.tokens import Principal, TokenInvalid
from gatewayd.services.auth import Presented
from gatewayd.services.jwks import KeysUnavailable

WALL0 = 1_000_000.0


@dataclass
class FakeSub:
    id: int
    frames: list[bytes] = field(default_factory=list)
    finished: str | None = None

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)

    def finish(self, reason: str) -> None:
        self.finished = reason


def finished(sub: FakeSub) -> str | None:
    return sub.finished  # (a call: the flag changes across awaits)


def principal(expires_at: float | None = None) -> Principal:
    return Principal("user:u-1", "human", "acme", frozenset({"r"}), "iss", expires_at=expires_at)


class Verifier:
    def __init__(self) -> None:
        self.calls: list[float] = []
        self.refuse: Exception | None = None

    async def __call__(self, presented: Presented) -> Principal:
        self.calls.append(trio.current_time())
        if self.refuse is not None:
            raise self.refuse
        return principal()


@asynccontextmanager
async def running(verifier: Verifier, recheck_s: float = 30.0) -> AsyncIterator[Rechecks]:
    start = trio.current_time()
    rechecks = Rechecks(verifier, recheck_s, wall_clock=lambda: WALL0 + trio.current_time() - start)
    async with trio.open_nursery() as nursery:
        await nursery.start(rechecks.serve)
        yield rechecks
        nursery.cancel_scope.cancel()


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_every_period_until_unwatched(clock: trio.testing.MockClock) -> None:
    v = Verifier()
    async with running(v) as rc:
        t0 = trio.current_time()
        sub = FakeSub(1)
        rc.watch(sub, Presented(bearer="t"), principal())  # type: ignore[arg-type]
        await trio.sleep(95)
        assert [round(t - t0) for t in v.calls] == [30, 60, 90]
        rc.unwatch(sub)  # type: ignore[arg-type]
        await trio.sleep(100)
        assert len(v.calls) == 3 and len(rc) == 0
        assert sub.finished is None


async def test_refusal_ends_the_stream_once(clock: trio.testing.MockClock) -> None:
    v = Verifier()
    async with running(v) as rc:
        kept, revoked = FakeSub(1), FakeSub(2)
        rc.watch(kept, Presented(bearer="a"), principal())  # type: ignore[arg-type]
        await trio.sleep(10)
        rc.watch(revoked, Presented(bearer="b"), principal())  # type: ignore[arg-type]
        await trio.sleep(25)  # kept rechecked at 30 (accepted)
        v.refuse = TokenInvalid("gone", code="invalid_session")
        await trio.sleep(10)  # revoked's recheck at 40 is refused
        assert finished(revoked) == "revoked" and b"event: revoked" in revoked.frames[0]
        assert finished(kept) is None
        await trio.sleep(30)  # kept's next recheck (60) is refused too; nothing more for revoked
        assert finished(kept) == "revoked" and len(revoked.frames) == 1
        assert len(rc) == 0


async def test_unavailable_keys_do_not_end_the_stream(clock: trio.testing.MockClock) -> None:
    v = Verifier()
    v.refuse = KeysUnavailable("jwks down")
    async with running(v) as rc:
        sub = FakeSub(1)
        rc.watch(sub, Presented(bearer="t"), principal())  # type: ignore[arg-type]
        await trio.sleep(61)
        assert len(v.calls) == 2 and sub.finished is None and len(rc) == 1


async def test_expiry_is_checked_when_it_comes(clock: trio.testing.MockClock) -> None:
    v = Verifier()
    async with running(v) as rc:
        t0 = trio.current_time()
        sub = FakeSub(1)
        rc.watch(sub, Presented(bearer="t"), principal(expires_at=WALL0 + 5))  # type: ignore[arg-type]
        v.refuse = TokenInvalid("expired", code="token_expired")
        await trio.sleep(10)
        assert [round(t - t0) for t in v.calls] == [6]  # expiry + 1 s, not the 30-s period
        assert sub.finished == "revoked"


async def test_a_stream_ended_during_its_recheck_is_left_alone(clock: trio.testing.MockClock) -> None:
    gate = trio.Event()

    class Slow(Verifier):
        async def __call__(self, presented: Presented) -> Principal:
            await gate.wait()
            raise TokenInvalid("gone")

    v = Slow()
    async with running(v) as rc:
        sub = FakeSub(1)
        rc.watch(sub, Presented(bearer="t"), principal())  # type: ignore[arg-type]
        await trio.sleep(31)  # the recheck is in flight
        rc.unwatch(sub)  # type: ignore[arg-type]
        gate.set()
        await trio.sleep(1)
        assert sub.finished is None and sub.frames == []


async def test_watch_needs_serve() -> None:
    rc = Rechecks(Verifier(), 30.0)
    with pytest.raises(RuntimeError):
        rc.watch(FakeSub(1), Presented(), principal())  # type: ignore[arg-type]
