"""Per-user upstream connections, for writes attributed to the user (``ctx.sender`` is the user).

A bounded LRU of sessions, one per principal, opened on first use with a token minted for that
principal (the token broker in production), never subscribed to anything. Sessions idle for
``idle_close_s`` are closed; the least recently used is closed when the pool is full. A session
whose token is within ``refresh_lead_s`` of expiring is not used for new calls: a fresh one is
opened and the old one retires once its calls have answered (tokens are only checked at connect).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import trio

from gatewayd.errors import UpstreamUnavailableError
from gatewayd.proto import client as pc
from gatewayd.proto.schema import ModuleSchema
from gatewayd.proto.tokens import Principal
from gatewayd.services.db_ws import (
    DbSession,
    SessionConfig,
    StreamOpener,
    UpstreamTarget,
    open_tcp_stream,
    run_db_session,
)
from gatewayd.services.supervisor import Credential

logger = logging.getLogger(__name__)

UserTokenMinter = Callable[[Principal], Awaitable[Credential]]

# Sessions per pool: each costs one upstream WebSocket (a few tens of KiB on both sides).
DEFAULT_MAX_SESSIONS: Final = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class UserPoolConfig:
    max_sessions: int = DEFAULT_MAX_SESSIONS
    idle_close_s: float = 300.0
    refresh_lead_s: float = 30.0
    session: SessionConfig = field(default_factory=SessionConfig)


@dataclass(slots=True)
class _Entry:
    session: DbSession
    expires_at: float | None
    last_used: float


class UserConnectionPool:
    def __init__(
        self,
        *,
        target: UpstreamTarget,
        schema: Callable[[], ModuleSchema | None],
        minter: UserTokenMinter,
        config: UserPoolConfig = UserPoolConfig(),
        open_stream: StreamOpener = open_tcp_stream,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self._schema = schema
        self._minter = minter
        self.config = config
        self._open_stream = open_stream
        self._wall = wall_clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.opened = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the sessions' tasks and close idle ones. Startable; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(max(1.0, self.config.idle_close_s / 4))
                    now = trio.current_time()
                    for key, e in list(self._entries.items()):
                        if now - e.last_used > self.config.idle_close_s:
                            del self._entries[key]
                            nursery.start_soon(e.session.aclose)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(3):
                    for e in self._entries.values():
                        await e.session.aclose()
                self._entries.clear()

    def _usable(self, e: _Entry) -> bool:
        if not e.session.is_open:
            return False
        return e.expires_at is None or e.expires_at - self._wall() > self.config.refresh_lead_s

    async def _session_for(self, principal: Principal) -> DbSession:
        key = principal.subject
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            e = self._entries.get(key)
            if e is not None and self._usable(e):
                self._entries.move_to_end(key)
                e.last_used = trio.current_time()
                return e.session
            if e is not None:
                del self._entries[key]
                if self._nursery is not None:
                    self._nursery.start_soon(self._retire, e.session)
            session = await self._open(principal)
            self._entries[key] = _Entry(session, self._last_exp, trio.current_time())
            while len(self._entries) > self.config.max_sessions:
                _k, old = self._entries.popitem(last=False)
                if self._nursery is not None:
                    self._nursery.start_soon(self._retire, old.session)
            return session

    async def _retire(self, session: DbSession) -> None:
        with trio.move_on_after(10):
            await session.wait_calls_answered()
        await session.aclose()

    async def _open(self, principal: Principal) -> DbSession:
        if self._nursery is None:
            raise UpstreamUnavailableError("the user connection pool is not running")
        schema = self._schema()
        if schema is None:
            raise UpstreamUnavailableError("the upstream schema is not known yet; the call was not sent")
        cred = await self._minter(principal)
        self._last_exp = cred.expires_at

        def ignore(_s: DbSession, _ev: pc.Event) -> None:
            return None  # no subscriptions: only call results, which the waiters take

        session: DbSession = await self._nursery.start(
            partial(
                run_db_session,
                target=self.target,
                token=cred.token,
                schema=schema,
                listener=ignore,
                config=self.config.session,
                open_stream=self._open_stream,
                name=f"user[{principal.subject}]",
            )
        )
        self.opened += 1
        return session

    async def call_reducer(self, principal: Principal, name: str, args: bytes) -> pc.CallOutcome:
        """Call ``name`` on ``principal``'s own connection (opened on demand).

        Raises:
            UpstreamUnavailableError / UpstreamConnectError / UpstreamAuthError: could not connect
                (never sent).
            OutcomeUnknownError: the link dropped after sending.
        """
        session = await self._session_for(principal)
        return await session.call_reducer(name, args)

    def statistics(self) -> dict[str, int]:
        return {"sessions": len(self._entries), "opened": self.opened}

    _last_exp: float | None = None
