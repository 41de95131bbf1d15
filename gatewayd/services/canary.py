"""The readiness canary: proof that upstream updates still flow, not just that a socket is open.

Theory of operation
-------------------
A connected, subscribed upstream can still be useless: SpacetimeDB (or a proxy in between) may
keep the WebSocket alive and answer pings while no ``TransactionUpdate`` reaches us any more.
``/readyz`` must notice, so the gateway writes to a canary row and waits to see the write come
back through its subscription:

* Every ``interval_s`` the canary calls the configured reducer (``bump_canary(name)`` in the demo
  module) over SpacetimeDB's HTTP API (``POST /v1/database/{db}/call/{reducer}``), with the
  service token. HTTP, not the service WebSocket, on purpose: a caller's own ``ReducerResult``
  carries its changes even when broadcasts are stuck, so a call on the subscribed connection
  would prove nothing. An HTTP call is another client; its change reaches us only as a broadcast.
* The supervisor's sink is wrapped (:meth:`Canary.wrap`): any change to the canary row that
  arrives as a transaction counts as *progress*. A subscription being (re)applied counts too (the
  rows are fresh at that instant).
* The upstream is *advancing* while the last progress is at most ``bound_s`` old. ``bound_s`` must
  exceed ``interval_s`` plus the call's round trip, so a healthy gateway never flaps.

Calls that fail (HTTP errors, a reducer refusing) are logged on change and make no progress, so a
misconfigured canary fails closed: ``/readyz`` goes false and says why.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from gatewayd.services.db_ws import UpstreamTarget
from gatewayd.services.supervisor import (
    ChangeBatch,
    Sink,
    TokenSource,
    UpstreamState,
    UpstreamSupervisor,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class CanarySettings:
    reducer: str
    table: str
    # The canary row's key (the reducer's only argument) and the value of ``key_column``.
    name: str
    key_column: str = "name"
    interval_s: float = 5.0
    bound_s: float = 15.0
    call_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class CanaryStatus:
    advancing: bool
    last_progress_age_s: float | None
    calls: int
    call_failures: int
    updates: int
    last_error: str | None


class Canary:
    """Writes the canary row and watches for it. Run :meth:`serve` in the service nursery."""

    def __init__(
        self,
        settings: CanarySettings,
        *,
        target: UpstreamTarget,
        token_source: TokenSource,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.target = target
        self._token_source = token_source
        self._transport = transport
        self.last_progress = -math.inf  # trio time of the last proof that updates flow
        self.calls = 0
        self.call_failures = 0
        self.updates = 0
        self.last_error: str | None = None

    # --- observation (sync) ----------------------------------------------------------------------

    def query_sets(self) -> dict[str, list[str]]:
        s = self.settings
        quoted = s.name.replace("'", "''")
        return {"canary": [f"SELECT * FROM {s.table} WHERE {s.key_column} = '{quoted}'"]}

    def observe(self, batch: ChangeBatch) -> None:
        s = self.settings
        if batch.cause in ("initial", "reconcile", "subscribe"):
            self.last_progress = trio.current_time()  # freshly subscribed rows: current now
            return
        for ch in batch.changes:
            if ch.table == s.table and isinstance(ch.row, dict) and ch.row.get(s.key_column) == s.name:
                self.updates += 1
                self.last_progress = trio.current_time()
                return

    def wrap(self, sink: Sink) -> Sink:
        """The supervisor's sink, observed by the canary first."""

        def observed(batch: ChangeBatch) -> None:
            self.observe(batch)
            sink(batch)

        return observed

    def advancing(self) -> bool:
        return trio.current_time() - self.last_progress <= self.settings.bound_s

    def status(self) -> CanaryStatus:
        age = trio.current_time() - self.last_progress
        return CanaryStatus(
            advancing=self.advancing(),
            last_progress_age_s=round(age, 3) if math.isfinite(age) else None,
            calls=self.calls,
            call_failures=self.call_failures,
            updates=self.updates,
            last_error=self.last_error,
        )

    # --- the writer ----------------------------------------------------------------------------

    def _failed(self, error: str) -> None:
        self.call_failures += 1
        if error != self.last_error:
            logger.warning("canary: %s call failed: %s", self.settings.reducer, error)
        self.last_error = error

    async def _call(self, client: httpx.AsyncClient) -> None:
        s = self.settings
        try:
            cred = await self._token_source()
        except Exception as exc:
            self._failed(f"token source: {type(exc).__name__}: {exc}")
            return
        headers = {"Content-Type": "application/json"}
        if cred.token:
            headers["Authorization"] = f"Bearer {cred.token}"
        url = self.target.http_base + self.target.database_path(f"call/{s.reducer}").removeprefix(
            httpx.URL(self.target.http_base).path.rstrip("/")
        )
        self.calls += 1
        try:
            resp = await client.post(url, json=[s.name], headers=headers)
        except httpx.HTTPError as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        if resp.status_code != 200:
            self._failed(f"HTTP {resp.status_code}: {resp.text[:200]}")
            return
        if self.last_error is not None:
            logger.info("canary: %s calls succeed again", s.reducer)
        self.last_error = None

    async def serve(self, supervisor: UpstreamSupervisor) -> None:
        """Call the canary reducer every ``interval_s`` while the upstream is live. Never returns.

        Cancellation:
            Abandons an in-flight call (it is idempotent in effect: one more bump).
        """
        s = self.settings
        was_live = False

        def on_state(state: UpstreamState, _reason: str | None) -> None:
            nonlocal was_live
            if state is not UpstreamState.LIVE:
                was_live = False

        supervisor.on_state.append(on_state)
        kwargs: dict[str, Any] = {"timeout": s.call_timeout_s, "follow_redirects": False}
        if self._transport is not None:
            kwargs["transport"] = self._transport
        try:
            async with httpx.AsyncClient(**kwargs) as client:
                while True:
                    if supervisor.state is not UpstreamState.LIVE:
                        await supervisor.wait_state_change()
                        continue
                    if not was_live:
                        was_live = True
                        # Going live applied the subscription: that is progress.
                        self.last_progress = max(self.last_progress, trio.current_time())
                    await self._call(client)
                    await trio.sleep(s.interval_s)
        finally:
            supervisor.on_state.remove(on_state)


def make_canary(
    config: Any, target: UpstreamTarget, token_source: TokenSource
) -> Canary | None:  # config: gatewayd.config.CanaryConfig | None
    """A :class:`Canary` from the ``[canary]`` config section, or None when it is absent."""
    if config is None:
        return None
    fields = CanarySettings.__dataclass_fields__
    return Canary(
        CanarySettings(**{f: getattr(config, f) for f in fields}),
        target=target,
        token_source=token_source,
    )


__all__ = ["Canary", "CanarySettings", "CanaryStatus", "make_canary"]
