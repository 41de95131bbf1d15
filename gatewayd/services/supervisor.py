"""The upstream supervisor: keeps one logical SpacetimeDB connection alive for a daemon's lifetime.

Theory of operation
-------------------
A logical connection is a sequence of physical sessions (:mod:`gatewayd.services.db_ws`). Exactly
one of them is *active*: its row changes flow to the sink. A session becomes active by a *swap*,
after it has connected and every query set has been applied (or refused):

* The swap compares the previous rows (the active session's, or the rows the last dead session
  left behind) with the new session's freshly subscribed rows and hands the difference to the sink
  as one ``reconcile`` batch: deletes for rows that vanished, updates for rows that changed, nothing
  for unchanged rows. The swap is synchronous, so no update can slip between the two views.
* Token refresh is make-before-break: ahead of the token's ``exp`` (tokens are only checked at
  connect, PROTOCOL.md §5.8), a new token is fetched from the token source, a second session is
  opened and subscribed while the old one keeps streaming, the two are swapped, and the old one is
  closed once its in-flight calls have answered (or after ``drain_s``). Every change reaches the sink
  exactly once: before the swap through the old session, across it through the reconcile diff, after
  it through the new session.
* When a session dies, the supervisor reconnects with capped, jittered exponential backoff. Auth
  failures (HTTP 401/403, or a close before ``InitialConnection``: the module's connect hook said
  no) are a state of their own with a much longer backoff, never a tight loop. A decode error
  triggers a schema refetch: if the schema changed (a hotswap) the reconnect is immediate,
  otherwise it is a protocol error and backs off.

Calls (reducers, procedures, one-off queries) go to the active session. While there is none they
wait up to ``call_wait_s`` for one and then fail with :class:`UpstreamUnavailableError` (never
sent). A call in flight when its session dies fails with :class:`OutcomeUnknownError`.

States (observable through :attr:`UpstreamSupervisor.state` and ``on_state`` callbacks)::

    CONNECTING -> LIVE <-> RECONNECTING
         \\          \\         |
          +-> AUTH_REJECTED <--+          any -> CLOSED when the supervisor stops
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import httpx
import jwt
import trio

from gatewayd.errors import (
    DecodeError,
    OutcomeUnknownError,
    SchemaError,
    SubscriptionFailedError,
    TokenRefreshError,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnavailableError,
)
from gatewayd.proto import client as pc
from gatewayd.proto.cache import ClientCache, RowChange
from gatewayd.proto.schema import ModuleSchema, parse_module_def
from gatewayd.services.db_ws import (
    DbSession,
    SessionConfig,
    StreamOpener,
    UpstreamTarget,
    open_tcp_stream,
    run_db_session,
)

logger = logging.getLogger(__name__)

# The schema document of a large module is a few hundred KiB; refuse anything absurd.
MAX_SCHEMA_BYTES: Final = 8 * 1024 * 1024


_OUTCOMES: Final[dict[type, str]] = {
    pc.ReducerCommitted: "committed",
    pc.ReducerFailed: "failed",
    pc.ReducerInternalError: "internal_error",
}


class UpstreamState(enum.Enum):
    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    AUTH_REJECTED = "auth_rejected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Credential:
    """A token and when it expires (Unix seconds), or ``None`` for anonymous / non-expiring."""

    token: str | None
    expires_at: float | None = None

    @classmethod
    def from_token(cls, token: str | None) -> Credential:
        """Read ``exp`` from a JWT without verifying it (we are the holder, not the verifier)."""
        if not token:
            return cls(None, None)
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return cls(token, None)
        exp = claims.get("exp")
        return cls(
            token,
            float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None,
        )


TokenSource = Callable[[], Awaitable[Credential]]
SchemaSource = Callable[[str | None], Awaitable[ModuleSchema]]


def static_token(token: str | None) -> TokenSource:
    """A token source that always returns the same token (no refresh unless it carries ``exp``)."""
    cred = Credential.from_token(token)

    async def source() -> Credential:
        return cred

    return source


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """Row changes that happened together (one transaction, one reconcile, one subscription).

    ``schema`` is set on ``initial`` and ``reconcile`` batches: the schema the rows are decoded
    with from now on (it may differ from before after a module update).
    """

    changes: list[RowChange]
    cause: str  # "initial" | "reconcile" | "transaction" | "reducer" | "subscribe" | "query_set_dropped"
    request_id: int | None = None
    schema: ModuleSchema | None = None


Sink = Callable[[ChangeBatch], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorConfig:
    # Reconnect backoff: min(max, initial * multiplier^attempt), then "equal jitter" (half fixed,
    # half random) so a fleet of gateways does not reconnect in lockstep after an upstream restart.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    backoff_multiplier: float = 2.0
    # Auth failures will not fix themselves quickly; retry slowly (token sources may recover).
    auth_backoff_initial_s: float = 10.0
    auth_backoff_max_s: float = 300.0
    # Refresh the token this long before it expires: max(min, fraction of its lifetime).
    refresh_lead_min_s: float = 10.0
    refresh_lead_fraction: float = 0.2
    # Never refresh more often than this, whatever the token says (protects against 5-s tokens).
    refresh_min_interval_s: float = 5.0
    # A replacement session must connect and subscribe within this, or the refresh is retried.
    swap_timeout_s: float = 30.0
    # After a swap the old session stays up this long for its in-flight calls.
    drain_s: float = 10.0
    # Calls made while no session is live wait this long for one, then fail (never sent).
    call_wait_s: float = 5.0
    schema_fetch_timeout_s: float = 10.0
    session: SessionConfig = field(default_factory=SessionConfig)


def backoff_delay(
    attempt: int, initial_s: float, max_s: float, multiplier: float, rng: random.Random
) -> float:
    """Capped exponential backoff with equal jitter: a value in [base/2, base], base <= max_s."""
    base = min(max_s, initial_s * multiplier ** min(attempt, 64))
    return base / 2 + rng.uniform(0, base / 2)


async def fetch_schema(target: UpstreamTarget, token: str | None, *, timeout_s: float = 10.0) -> ModuleSchema:
    """``GET /v1/database/{db}/schema?version=9`` -> :class:`ModuleSchema`.

    Raises:
        UpstreamAuthError: 401/403.
        UpstreamConnectError: network failure, timeout, or another non-200 status.
        SchemaError: the document is not a RawModuleDefV9 we understand.
    """
    url = target.http_base + target.database_path("schema").removeprefix(
        httpx.URL(target.http_base).path.rstrip("/")
    )
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client,
            client.stream("GET", url, params={"version": "9"}, headers=headers) as resp,
        ):
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_SCHEMA_BYTES:
                    raise SchemaError(f"schema document exceeds {MAX_SCHEMA_BYTES} bytes")
    except httpx.HTTPError as exc:
        raise UpstreamConnectError(f"schema fetch failed: {type(exc).__name__}: {exc}") from exc
    if resp.status_code in (401, 403):
        raise UpstreamAuthError(f"schema fetch refused with HTTP {resp.status_code}", status=resp.status_code)
    if resp.status_code != 200:
        raise UpstreamConnectError(f"schema fetch returned HTTP {resp.status_code}")
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise SchemaError(f"schema is not JSON: {exc}") from None
    return parse_module_def(doc)


@dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    state: str
    reconnects: int
    refreshes: int
    decode_errors: int
    last_error: str | None
    query_sets: dict[str, str]
    session: Any


class UpstreamSupervisor:
    """Owns the logical upstream connection. Run :meth:`serve` in the service nursery."""

    def __init__(
        self,
        *,
        target: UpstreamTarget,
        query_sets: Mapping[str, Sequence[str]],
        sink: Sink,
        token_source: TokenSource | None = None,
        schema_source: SchemaSource | None = None,
        config: SupervisorConfig = SupervisorConfig(),
        open_stream: StreamOpener = open_tcp_stream,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        name: str = "upstream",
    ) -> None:
        self.target = target
        self.query_sets = {k: tuple(v) for k, v in query_sets.items()}
        self._sink = sink
        self._token_source = token_source or static_token(None)
        self._schema_source = schema_source or partial(
            fetch_schema, target, timeout_s=config.schema_fetch_timeout_s
        )
        self.config = config
        self._open_stream = open_stream
        self._rng = rng or random.Random()
        self._wall = wall_clock
        self.name = name
        self.state = UpstreamState.CONNECTING
        self.active: DbSession | None = None
        self.schema: ModuleSchema | None = None
        self._baseline: ClientCache | None = None  # rows the last dead session left behind
        self._live = trio.Event()
        self._state_changed = trio.Event()
        self.on_state: list[Callable[[UpstreamState, str | None], None]] = []
        self.query_set_status: dict[str, str] = dict.fromkeys(self.query_sets, "pending")
        self._qsid_names: dict[tuple[int, int], str] = {}  # (session id, qsid) -> name
        self.reconnects = 0
        self.refreshes = 0
        self.decode_errors = 0
        # (reducer, outcome) -> count: committed, failed, internal_error, unavailable, outcome_unknown.
        self.call_outcomes: Counter[tuple[str, str]] = Counter()
        self._call_scopes: set[trio.CancelScope] = set()  # calls abandon_calls() may end
        self._abandon_reason: str | None = None
        self.last_error: str | None = None
        self.last_delays: list[float] = []  # recent backoff delays (observability and tests)
        self._closing = False  # close_sessions() was called: do not reconnect

    # --- observation ----------------------------------------------------------------------------

    def _set_state(self, state: UpstreamState, reason: str | None = None) -> None:
        if state is self.state:
            return
        logger.info(
            "%s: %s -> %s%s",
            self.name,
            self.state.value,
            state.value,
            f" ({reason})" if reason else "",
        )
        self.state = state
        if state is UpstreamState.LIVE:
            self.last_error = None  # /readyz shows the current problem, not a healed one
            self._live.set()
        elif self._live.is_set():
            self._live = trio.Event()
        ev, self._state_changed = self._state_changed, trio.Event()
        ev.set()
        for cb in self.on_state:
            cb(state, reason)

    async def wait_state_change(self) -> UpstreamState:
        await self._state_changed.wait()
        return self.state

    async def wait_live(self) -> DbSession:
        """Wait until a session is live. Cancellation: safe."""
        while True:
            s = self.active
            if s is not None and s.is_open and self.state is UpstreamState.LIVE:
                return s
            if s is not None and not s.is_open:
                await self._state_changed.wait()  # the loop is about to notice the loss
            else:
                await self._live.wait()

    @property
    def cache(self) -> ClientCache | None:
        """The rows the consumer has been told about (the active session's view)."""
        return self.active.cache if self.active is not None else self._baseline

    def statistics(self) -> SupervisorStatistics:
        return SupervisorStatistics(
            state=self.state.value,
            reconnects=self.reconnects,
            refreshes=self.refreshes,
            decode_errors=self.decode_errors,
            last_error=self.last_error,
            query_sets=dict(self.query_set_status),
            session=self.active.statistics() if self.active is not None else None,
        )

    # --- calls ----------------------------------------------------------------------------------

    async def _session_for_call(self) -> DbSession:
        with trio.move_on_after(self.config.call_wait_s):
            return await self.wait_live()
        raise UpstreamUnavailableError(
            f"{self.name}: no live upstream session within {self.config.call_wait_s} s "
            f"(state {self.state.value}); the call was not sent"
        )

    @contextlib.contextmanager
    def counting(self, name: str) -> Iterator[Callable[[pc.CallOutcome], None]]:
        """Count a reducer call's outcome in :attr:`call_outcomes` (metrics); also used for calls
        made over per-user connections, so /metrics sees every write."""

        def done(outcome: pc.CallOutcome) -> None:
            kind = _OUTCOMES.get(type(outcome), type(outcome).__name__)
            self.call_outcomes[(name, kind)] += 1

        try:
            yield done
        except UpstreamUnavailableError:
            self.call_outcomes[(name, "unavailable")] += 1
            raise
        except OutcomeUnknownError:
            self.call_outcomes[(name, "outcome_unknown")] += 1
            raise

    @contextlib.contextmanager
    def _abandonable(self, sent: bool) -> Iterator[None]:
        """A call that :meth:`abandon_calls` may end early: it then raises OutcomeUnknownError
        (``sent``) or UpstreamUnavailableError (still waiting for a session: never sent)."""
        scope = trio.CancelScope()
        self._call_scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._call_scopes.discard(scope)
        if scope.cancelled_caught:
            reason = self._abandon_reason or "abandoned"
            if sent:
                raise OutcomeUnknownError(
                    f"{self.name}: {reason} before the result arrived; it may have applied"
                )
            raise UpstreamUnavailableError(f"{self.name}: {reason}; the call was not sent")

    def abandon_calls(self, reason: str) -> int:
        """End every call still waiting (shutdown: answer them rather than cut them). Sync."""
        self._abandon_reason = reason
        scopes = tuple(self._call_scopes)
        for scope in scopes:
            scope.cancel()
        if scopes:
            logger.warning("%s: %d calls still in flight: %s", self.name, len(scopes), reason)
        return len(scopes)

    async def abandon_calls_at(self, deadline: float) -> None:
        """At trio time ``deadline``, :meth:`abandon_calls` (started when shutdown begins)."""
        await trio.sleep_until(deadline)
        self.abandon_calls("gateway shutting down")

    async def call_reducer(self, name: str, args: bytes) -> pc.CallOutcome:
        """Call a reducer with BSATN-encoded ``args`` on the active session.

        Raises:
            UpstreamUnavailableError: no live session within ``call_wait_s`` (not sent).
            OutcomeUnknownError: the session died after the call may have been sent.
        """
        with self.counting(name) as done:
            with self._abandonable(sent=False):
                session = await self._session_for_call()
            with self._abandonable(sent=True):
                outcome = await session.call_reducer(name, args)
            done(outcome)
            return outcome

    async def call_reducer_json(self, name: str, args: Any) -> pc.CallOutcome:
        """Encode JSON-ready ``args`` against the reducer's parameters, then call it."""
        with self.counting(name) as done:
            with self._abandonable(sent=False):
                session = await self._session_for_call()
            reducer = session.schema.reducer(name)
            encoded = session.schema.codec.encode(reducer.params, args, path="args")
            with self._abandonable(sent=True):
                outcome = await session.call_reducer(name, encoded)
            done(outcome)
            return outcome

    async def call_procedure(self, name: str, args: bytes) -> pc.CallOutcome:
        session = await self._session_for_call()
        return await session.call_procedure(name, args)

    async def one_off_query(self, sql: str) -> pc.OneOffResult:
        session = await self._session_for_call()
        return await session.one_off_query(sql)

    # --- events from sessions (sync) ------------------------------------------------------------

    def _emit(
        self,
        changes: list[RowChange],
        cause: str,
        request_id: int | None = None,
        schema: ModuleSchema | None = None,
    ) -> None:
        if changes or schema is not None:
            self._sink(ChangeBatch(changes, cause, request_id, schema))

    def _on_event(self, session: DbSession, ev: pc.Event) -> None:
        if session is not self.active:
            # A warming-up session's rows are reconciled at the swap; a retiring one's are
            # already covered by its successor.
            if isinstance(ev, pc.SubscriptionFailed):
                self._note_failed(session, ev)
            return
        if isinstance(ev, pc.TransactionApplied):
            self._emit(ev.changes, "transaction")
        elif isinstance(ev, pc.ReducerCommitted):
            self._emit(ev.changes, "reducer", ev.request_id)
        elif isinstance(ev, pc.SubscriptionApplied):
            self._emit(ev.changes, "subscribe")
        elif isinstance(ev, pc.Unsubscribed):
            self._emit(ev.changes, "unsubscribe")
        elif isinstance(ev, pc.SubscriptionFailed):
            self._note_failed(session, ev)
            self._emit(ev.changes, "query_set_dropped")

    def _note_failed(self, session: DbSession, ev: pc.SubscriptionFailed) -> None:
        name = self._qsid_names.get((session.id, ev.query_set_id))
        if name is not None:
            self.query_set_status[name] = f"failed: {ev.error}"
            logger.warning("%s: query set %r failed: %s", self.name, name, ev.error)

    # --- the loop -------------------------------------------------------------------------------

    async def _open_subscribed(self, nursery: trio.Nursery) -> tuple[DbSession, Credential]:
        """Fetch a token and the schema, open a session, subscribe every query set."""
        try:
            cred = await self._token_source()
        except TokenRefreshError:
            raise
        except Exception as exc:
            raise TokenRefreshError(f"token source failed: {type(exc).__name__}: {exc}") from exc
        schema = await self._schema_source(cred.token)
        session: DbSession = await nursery.start(
            partial(
                run_db_session,
                target=self.target,
                token=cred.token,
                schema=schema,
                listener=self._on_event,
                config=self.config.session,
                open_stream=self._open_stream,
                name=self.name,
            )
        )
        try:
            with trio.fail_after(self.config.swap_timeout_s):
                async with trio.open_nursery() as subs:
                    for name, queries in self.query_sets.items():
                        subs.start_soon(self._subscribe_one, session, name, queries)
        except BaseException:
            await session.aclose()
            raise
        if not session.is_open:
            raise session.error or UpstreamConnectError(f"{self.name}: session closed while subscribing")
        return session, cred

    async def _subscribe_one(self, session: DbSession, name: str, queries: tuple[str, ...]) -> None:
        # Register the name before the answer can arrive (a refusal must be attributed).
        qsid_guess = session.conn._next_query_set_id
        self._qsid_names[(session.id, qsid_guess)] = name
        try:
            qsid = await session.subscribe(queries)
        except SubscriptionFailedError as exc:
            self.query_set_status[name] = f"failed: {exc}"
            logger.warning("%s: query set %r refused: %s", self.name, name, exc)
            return
        except UpstreamConnectError:
            return  # the caller sees the session closed
        self._qsid_names[(session.id, qsid)] = name
        self.query_set_status[name] = "applied"

    def _swap(self, new: DbSession) -> None:
        """Make ``new`` the active session and hand the reconcile diff to the sink. Sync."""
        old = self.active
        base = old.cache if old is not None else self._baseline
        if base is None:
            changes = [RowChange(t, "inserted", v, key=k) for t, k, _r, v in new.cache.items()]
            cause = "initial"
        else:
            changes = base.diff_to(new.cache)
            cause = "reconcile"
        self.active = new
        self.schema = new.schema
        self._baseline = None
        logger.info(
            "%s: %s is active (%d rows, %d changes to reconcile)",
            self.name,
            new.name,
            len(new.cache),
            len(changes),
        )
        self._emit(changes, cause, schema=new.schema)

    async def _retire(self, old: DbSession) -> None:
        """Let the old session's in-flight calls answer (bounded), then close it."""
        with trio.move_on_after(self.config.drain_s):
            await old.wait_calls_answered()
        await old.aclose()

    def _refresh_at(self, cred: Credential, fetched_at_wall: float) -> float:
        """trio time at which to start a make-before-break refresh (inf if the token never expires)."""
        if cred.expires_at is None:
            return math.inf
        lifetime = max(0.0, cred.expires_at - fetched_at_wall)
        lead = max(self.config.refresh_lead_min_s, self.config.refresh_lead_fraction * lifetime)
        wait = max(self.config.refresh_min_interval_s, cred.expires_at - self._wall() - lead)
        return trio.current_time() + wait

    async def _on_decode_error(self, exc: DecodeError, token: str | None) -> bool:
        """Refetch the schema after a decode error. True if it changed (reconnect at once)."""
        self.decode_errors += 1
        old = self.schema.fingerprint if self.schema is not None else None
        try:
            fresh = await self._schema_source(token)
        except (UpstreamError, SchemaError) as err:
            logger.warning("%s: schema refetch after decode error failed: %s", self.name, err)
            return False
        changed = fresh.fingerprint != old
        logger.warning(
            "%s: decode error (%s); schema %s",
            self.name,
            exc,
            "changed: reconnecting now" if changed else "unchanged",
        )
        return changed

    async def close_sessions(self) -> None:
        """Close the active session with a close frame (bounded): the graceful end of shutdown.

        Call before cancelling :meth:`serve`; otherwise the cancellation tears the socket down
        without the WebSocket close handshake.
        """
        active = self.active
        if active is not None:
            self._closing = True
            await active.aclose()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run forever: connect, subscribe, reconcile, refresh, reconnect.

        ``task_status.started()`` fires once the first session is live and subscribed.

        Cancellation:
            Closes the active session with a close frame (bounded) and enters CLOSED.
        """
        attempt = 0
        auth_attempt = 0
        started = False
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        session, cred = await self._open_subscribed(nursery)
                        fetched_at = self._wall()
                    except UpstreamAuthError as exc:
                        self.last_error = str(exc)
                        self._set_state(UpstreamState.AUTH_REJECTED, str(exc))
                        delay = backoff_delay(
                            auth_attempt, self.config.auth_backoff_initial_s,
                            self.config.auth_backoff_max_s, self.config.backoff_multiplier, self._rng,
                        )  # fmt: skip
                        auth_attempt += 1
                    except (
                        UpstreamError,
                        SchemaError,
                        TokenRefreshError,
                        trio.TooSlowError,
                    ) as exc:
                        self.last_error = f"{type(exc).__name__}: {exc}"
                        if self.state is not UpstreamState.CONNECTING:
                            self._set_state(UpstreamState.RECONNECTING, self.last_error)
                        else:
                            logger.warning("%s: connect failed: %s", self.name, self.last_error)
                        delay = backoff_delay(
                            attempt, self.config.backoff_initial_s, self.config.backoff_max_s,
                            self.config.backoff_multiplier, self._rng,
                        )  # fmt: skip
                        attempt += 1
                    else:
                        attempt = auth_attempt = 0
                        self._swap(session)
                        self._set_state(UpstreamState.LIVE)
                        if not started:
                            started = True
                            task_status.started()
                        immediate = await self._run_active(nursery, session, cred, fetched_at)
                        if immediate:
                            continue
                        delay = backoff_delay(
                            attempt, self.config.backoff_initial_s, self.config.backoff_max_s,
                            self.config.backoff_multiplier, self._rng,
                        )  # fmt: skip
                        attempt += 1
                    self.last_delays = [*self.last_delays[-19:], delay]
                    logger.info("%s: retrying in %.2f s", self.name, delay)
                    await trio.sleep(delay)
        finally:
            active = self.active
            if active is not None:
                with trio.CancelScope(shield=True):
                    await active.aclose()
            self._set_state(UpstreamState.CLOSED)

    async def _run_active(
        self, nursery: trio.Nursery, session: DbSession, cred: Credential, fetched_at: float
    ) -> bool:
        """Serve the active session until it dies; refresh tokens on the way.

        Returns True when the reconnect should be immediate (schema changed under us).
        """
        refresh_at = self._refresh_at(cred, fetched_at)
        while True:
            with trio.move_on_at(refresh_at):
                await session.closed.wait()
            if session.closed.is_set():
                break
            # Make-before-break token refresh.
            try:
                new, new_cred = await self._open_subscribed(nursery)
            except (UpstreamError, SchemaError, TokenRefreshError, trio.TooSlowError) as exc:
                # The old connection stays valid (exp is checked only at connect); retry later.
                retry = backoff_delay(
                    0, self.config.backoff_initial_s * 4, self.config.backoff_max_s, 2.0, self._rng
                )
                logger.warning("%s: token refresh failed (%s); retrying in %.1f s", self.name, exc, retry)
                refresh_at = trio.current_time() + retry
                continue
            if not session.is_open:
                # The old one died while we warmed up: the new one takes over with a reconcile
                # against what the old one had delivered.
                self._baseline = session.cache
                self.active = None
            old = self.active
            self._swap(new)
            self.refreshes += 1
            if old is not None:
                nursery.start_soon(self._retire, old, name=f"{self.name}-retire")
            session, cred, fetched_at = new, new_cred, self._wall()
            refresh_at = self._refresh_at(cred, fetched_at)
        if self._closing:
            await trio.sleep_forever()  # shutting down: the caller cancels us next
        # The active session died.
        err = session.error
        self._baseline = session.cache
        self.active = None
        self.reconnects += 1
        self.last_error = f"{type(err).__name__}: {err}" if err else "closed"
        if isinstance(err, UpstreamAuthError):
            self._set_state(UpstreamState.AUTH_REJECTED, self.last_error)
            return False
        self._set_state(UpstreamState.RECONNECTING, self.last_error)
        if isinstance(err, DecodeError):
            return await self._on_decode_error(err, cred.token)
        if isinstance(err, UpstreamProtocolError):
            logger.warning("%s: protocol error from upstream: %s", self.name, err)
        return False
