"""One upstream SpacetimeDB WebSocket session: the thin trio adapter over ``ClientConnection``.

Task layout (all inside :func:`serve_db_session`'s nursery)::

    serve_db_session
    ├── trio-websocket's own reader (wsproto; answers the server's pings)
    ├── _reader_task   drains get_message() continuously into the sync protocol object, so a slow
    │                  consumer can never make us stop answering pings (trio-websocket stops
    │                  reading when its queue is full)
    └── _pinger_task   our own liveness check: a ping that must be answered within ping_timeout_s

Foreign exceptions (trio-websocket, wsproto, OSError) are translated exactly once, here:
HTTP 401/403 on the upgrade, or a close before ``InitialConnection`` (the module's
``client_connected`` refused us), become :class:`UpstreamAuthError`; everything network-shaped
becomes :class:`UpstreamConnectError`; bad bytes stay :class:`DecodeError` /
:class:`UpstreamProtocolError`.

Row changes are handed to a synchronous ``listener`` straight from the reader task, so no other task
can observe a half-applied message and there is no unbounded buffer in between.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Final, Protocol

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from gatewayd.errors import (
    DecodeError,
    OutcomeUnknownError,
    SubscriptionFailedError,
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
)
from gatewayd.proto import client as pc
from gatewayd.proto import messages as m
from gatewayd.proto.cache import ClientCache
from gatewayd.proto.schema import ModuleSchema

logger = logging.getLogger(__name__)

_session_ids = count(1)

# trio-websocket's internal message queue between its wsproto reader and our _reader_task. Our
# reader drains it continuously and never blocks on consumers, so a handful is plenty; a larger
# queue only adds latency and memory per connection.
DEFAULT_MESSAGE_QUEUE_SIZE: Final = 4
# SpacetimeDB accepts 32 MiB client messages; its own messages can be as large (a big initial
# subscription). Beyond this trio-websocket closes with 1009.
DEFAULT_MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """Per-connection limits and timers. Units are in the names."""

    message_queue_size: int = DEFAULT_MESSAGE_QUEUE_SIZE
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Decompressed payloads beyond this are refused (a gzip bomb is a few KiB on the wire).
    max_decompressed_bytes: int = 4 * DEFAULT_MAX_MESSAGE_BYTES
    # TCP connect + TLS + HTTP upgrade + InitialConnection must all fit in this.
    connect_timeout_s: float = 10.0
    # SpacetimeDB pings every 15 s and drops us after 30 s of silence; our own ping catches a
    # peer that died without closing (half-open TCP) on the same time scale.
    ping_interval_s: float = 15.0
    ping_timeout_s: float = 10.0
    # Bounded, shielded wait for the close handshake (STYLE.md rule 15).
    close_timeout_s: float = 3.0
    compression: m.Compression = m.Compression.GZIP
    # None: the server's default (true for v2/v3: updates only once durable).
    confirmed_reads: bool | None = None


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where the database lives: ``base_url`` is http(s)://host[:port][/prefix]."""

    base_url: str
    database: str

    def __post_init__(self) -> None:
        u = urllib.parse.urlsplit(self.base_url)
        if u.scheme not in ("http", "https", "ws", "wss") or not u.hostname:
            raise ValueError(f"upstream URL must be http(s):// or ws(s):// with a host: {self.base_url!r}")
        if not self.database or "/" in self.database:
            raise ValueError(f"invalid database name {self.database!r}")

    @property
    def tls(self) -> bool:
        return urllib.parse.urlsplit(self.base_url).scheme in ("https", "wss")

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        u = urllib.parse.urlsplit(self.base_url)
        return u.port or (443 if self.tls else 80)

    @property
    def http_base(self) -> str:
        u = urllib.parse.urlsplit(self.base_url)
        scheme = "https" if self.tls else "http"
        return urllib.parse.urlunsplit((scheme, u.netloc, u.path.rstrip("/"), "", ""))

    def database_path(self, suffix: str) -> str:
        prefix = urllib.parse.urlsplit(self.base_url).path.rstrip("/")
        return f"{prefix}/v1/database/{urllib.parse.quote(self.database, safe='')}/{suffix}"

    def subscribe_resource(self, config: SessionConfig) -> str:
        params = {"compression": config.compression.query_value}
        if config.confirmed_reads is not None:
            params["confirmed"] = "true" if config.confirmed_reads else "false"
        return f"{self.database_path('subscribe')}?{urllib.parse.urlencode(params)}"


class StreamOpener(Protocol):
    def __call__(self, target: UpstreamTarget) -> Awaitable[trio.abc.Stream]: ...


async def open_tcp_stream(target: UpstreamTarget) -> trio.abc.Stream:
    """The default opener: TCP, plus TLS with the system trust store for https/wss."""
    if target.tls:
        return await trio.open_ssl_over_tcp_stream(
            target.host,
            target.port,
            ssl_context=ssl.create_default_context(),
            https_compatible=True,
        )
    return await trio.open_tcp_stream(target.host, target.port)


Listener = Callable[["DbSession", pc.Event], None]


@dataclass(slots=True)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Any = None


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    session_id: int
    protocol: str
    identity: str | None
    connection_id: str | None
    messages_received: int
    pending_calls: int
    query_sets: int
    cached_rows: int
    last_message_at: float


class DbSession:
    """A connected session. Created by :func:`serve_db_session`; use it from any task."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        conn: pc.ClientConnection,
        listener: Listener,
        name: str,
        config: SessionConfig,
    ) -> None:
        self.id = next(_session_ids)
        self.name = f"{name}#{self.id}"
        self._ws = ws
        self.conn = conn
        self._listener = listener
        self._send_lock = trio.StrictFIFOLock()
        self._calls: dict[int, _Waiter] = {}
        self._subs: dict[int, _Waiter] = {}
        self.connected = trio.Event()
        self.closed = trio.Event()
        self.error: BaseException | None = None
        self.token: str | None = None
        self.last_message_at = trio.current_time()
        self._closing = False
        self._config = config
        # Set when Connected arrives or the session ends, whichever is first.
        self._wake = trio.Event()
        # Set when the session is over (reader ended, pinger gave up, or aclose()).
        self._finished = trio.Event()

    def __repr__(self) -> str:
        return f"<DbSession {self.name} {self.conn.state.value}>"

    @property
    def schema(self) -> ModuleSchema:
        return self.conn.schema

    @property
    def cache(self) -> ClientCache:
        return self.conn.cache

    @property
    def is_open(self) -> bool:
        return not self._finished.is_set()

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            session_id=self.id,
            protocol=self.conn.protocol.value,
            identity=self.conn.identity,
            connection_id=self.conn.connection_id,
            messages_received=self.conn.messages_received,
            pending_calls=len(self._calls),
            query_sets=len(self.conn.query_sets),
            cached_rows=len(self.conn.cache),
            last_message_at=self.last_message_at,
        )

    # --- requests ------------------------------------------------------------------------------

    async def _send(self, payload: bytes) -> None:
        try:
            async with self._send_lock:
                await self._ws.send_message(payload)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamConnectError(f"{self.name}: connection closed while sending") from exc

    async def subscribe(self, queries: list[str] | tuple[str, ...]) -> int:
        """Subscribe one query set and wait until the server applied it.

        Returns:
            The query set id.
        Raises:
            SubscriptionFailedError: the server refused the queries (bad SQL, permissions).
            UpstreamConnectError: the connection went away first.
        Cancellation:
            Safe; the query set stays registered and its rows arrive later.
        """
        qsid, payload = self.conn.subscribe(queries)
        waiter = self._subs[qsid] = _Waiter()
        await self._send(payload)
        await waiter.done.wait()
        out = waiter.outcome
        if isinstance(out, pc.SubscriptionFailed):
            raise SubscriptionFailedError(f"query set {qsid} refused: {out.error}")
        if out is None:
            raise UpstreamConnectError(f"{self.name}: connection lost before the subscription applied")
        return qsid

    async def unsubscribe(self, query_set_id: int) -> None:
        waiter = self._subs[query_set_id] = _Waiter()
        await self._send(self.conn.unsubscribe(query_set_id))
        await waiter.done.wait()
        if waiter.outcome is None:
            raise UpstreamConnectError(f"{self.name}: connection lost before the unsubscribe applied")

    async def _call(self, rid: int, payload: bytes) -> pc.CallOutcome:
        waiter = self._calls[rid] = _Waiter()
        try:
            await self._send(payload)
        except UpstreamConnectError as exc:
            self._calls.pop(rid, None)
            # It may have left our buffer before the socket broke: the outcome is unknown.
            raise OutcomeUnknownError(f"{self.name}: link dropped while sending request {rid}") from exc
        await waiter.done.wait()
        out: pc.CallOutcome = waiter.outcome
        if isinstance(out, pc.CallLost):
            raise OutcomeUnknownError(f"{self.name}: link dropped before the result of request {rid}")
        return out

    async def call_reducer(self, name: str, args: bytes) -> pc.CallOutcome:
        """Call a reducer and wait for its ReducerResult.

        Returns:
            ReducerCommitted, ReducerFailed (the module's own message) or ReducerInternalError.
        Raises:
            OutcomeUnknownError: the link dropped after the call may have been sent.
        Cancellation:
            The call may still run upstream; its result is discarded.
        """
        rid, payload = self.conn.call_reducer(name, args)
        return await self._call(rid, payload)

    async def call_procedure(self, name: str, args: bytes) -> pc.CallOutcome:
        rid, payload = self.conn.call_procedure(name, args)
        return await self._call(rid, payload)

    async def one_off_query(self, sql: str) -> pc.OneOffResult:
        rid, payload = self.conn.one_off_query(sql)
        out = await self._call(rid, payload)
        assert isinstance(out, pc.OneOffResult)
        return out

    # --- receive side ---------------------------------------------------------------------------

    def _dispatch(self, ev: pc.Event) -> None:
        if isinstance(ev, pc.Connected):
            self.token = ev.token
            self.connected.set()
            self._wake.set()
        elif isinstance(ev, pc.SubscriptionApplied | pc.Unsubscribed | pc.SubscriptionFailed):
            w = self._subs.pop(ev.query_set_id, None)
            if w is not None:
                w.outcome = ev
                w.done.set()
        elif not isinstance(ev, pc.TransactionApplied):
            w = self._calls.pop(ev.request_id, None)
            if w is not None:
                w.outcome = ev
                w.done.set()
        # The listener sees everything, after waiters are resolved (it must not block).
        self._listener(self, ev)

    async def _reader_task(self) -> None:
        ws = self._ws
        conn = self.conn
        try:
            while True:
                payload = await ws.get_message()
                self.last_message_at = trio.current_time()
                if isinstance(payload, str):
                    raise UpstreamProtocolError("text frame on a binary-only protocol")
                try:
                    events = conn.receive_payload(payload)
                except (DecodeError, UpstreamProtocolError) as exc:
                    for ev in getattr(exc, "partial_events", ()):
                        self._dispatch(ev)
                    raise
                for ev in events:
                    self._dispatch(ev)
        except ConnectionClosed as exc:
            if not self._closing:
                reason = exc.reason
                code = reason.code if reason is not None else 1006
                text = f"code {code}" + (f", {reason.reason}" if reason is not None and reason.reason else "")
                if not self.connected.is_set():
                    self.error = UpstreamAuthError(
                        f"{self.name}: closed before InitialConnection ({text}); the module's "
                        "client_connected hook probably refused this identity"
                    )
                else:
                    self.error = UpstreamConnectError(f"{self.name}: connection closed ({text})")
        except UpstreamError as exc:
            self.error = exc
        finally:
            self._lose_calls()
            if not self._closing:
                # During aclose() the close handshake is still running in trio-websocket's own
                # task: aclose() finishes the session once it completed (or timed out).
                self._finish()

    def _finish(self) -> None:
        self._wake.set()
        self._finished.set()

    def _lose_calls(self) -> None:
        for ev in self.conn.connection_lost():
            w = self._calls.pop(ev.request_id, None)
            if w is not None:
                w.outcome = ev
                w.done.set()
        for w in (*self._calls.values(), *self._subs.values()):
            w.done.set()  # outcome None: lost
        self._calls.clear()
        self._subs.clear()

    async def _pinger_task(self, config: SessionConfig) -> None:
        while True:
            await trio.sleep(config.ping_interval_s)
            with trio.move_on_after(config.ping_timeout_s) as cs:
                try:
                    await self._ws.ping()
                except ConnectionClosed:
                    return  # the reader reports why
            if cs.cancelled_caught:
                if self.error is None:
                    self.error = UpstreamConnectError(
                        f"{self.name}: no pong within {config.ping_timeout_s} s; the peer is dead"
                    )
                self._finish()
                return

    async def wait_calls_answered(self) -> None:
        """Wait until every call in flight right now has its answer (or was lost)."""
        for waiter in list(self._calls.values()):
            await waiter.done.wait()

    async def aclose(self) -> None:
        """Close with a close frame; bounded and shielded. Pending calls become outcome-unknown."""
        if self._finished.is_set():
            return
        self._closing = True
        with trio.move_on_after(self._config.close_timeout_s, shield=True):
            with contextlib.suppress(
                ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError
            ):
                await self._ws.aclose(1000, "gatewayd closing")
        self._finish()


def _rejected(exc: ConnectionRejected, name: str) -> UpstreamError:
    body = (exc.body or b"")[:200].decode("utf-8", "replace").strip()
    status = exc.status_code
    if status in (401, 403) or (status == 400 and "uthoriz" in body):
        return UpstreamAuthError(f"{name}: upgrade refused with HTTP {status}: {body}", status=status)
    if status == 404:
        return UpstreamConnectError(f"{name}: database not found (HTTP 404): {body}")
    return UpstreamConnectError(f"{name}: upgrade refused with HTTP {status}: {body}")


async def serve_db_session(
    *,
    target: UpstreamTarget,
    token: str | None,
    schema: ModuleSchema,
    listener: Listener,
    config: SessionConfig = SessionConfig(),
    open_stream: StreamOpener = open_tcp_stream,
    name: str = "db",
    task_status: trio.TaskStatus[DbSession] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open a session, report it with ``task_status.started`` once InitialConnection arrived, and
    run it until it closes.

    Returns normally after :meth:`DbSession.aclose`. Raises the one error that ended the session
    otherwise (never an exception group): :class:`UpstreamAuthError`,
    :class:`UpstreamConnectError`, :class:`DecodeError` or :class:`UpstreamProtocolError`.

    Cancellation:
        Closes the socket without waiting for the close handshake.
    """
    err: BaseException | None = None
    session: DbSession | None = None
    stream: trio.abc.Stream | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(config.connect_timeout_s):
                stream = await open_stream(target)
                host_header = target.host if target.port in (80, 443) else f"{target.host}:{target.port}"
                headers = [(b"Authorization", f"Bearer {token}".encode())] if token else []
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,  # type: ignore[arg-type]
                    host_header,
                    target.subscribe_resource(config),
                    subprotocols=list(m.OFFERED_PROTOCOLS),
                    extra_headers=headers,
                    message_queue_size=config.message_queue_size,
                    max_message_size=config.max_message_bytes,
                )
                sub = ws.subprotocol
                if sub not in m.OFFERED_PROTOCOLS:
                    # The TS SDK treats an empty or unknown answer as v2; so do we, loudly.
                    logger.warning("%s: server chose subprotocol %r; assuming v2", name, sub)
                protocol = m.Protocol.V3 if sub == m.Protocol.V3.value else m.Protocol.V2
                conn = pc.ClientConnection(
                    protocol, schema, max_decompressed_bytes=config.max_decompressed_bytes
                )
                session = DbSession(ws, conn, listener, name, config)
                nursery.start_soon(session._reader_task, name=f"{session.name}-reader")
                await session._wake.wait()
            if session.connected.is_set() and not session._finished.is_set():
                logger.info(
                    "%s: connected (protocol %s, identity %s)",
                    session.name,
                    protocol.value,
                    conn.identity,
                )
                nursery.start_soon(session._pinger_task, config, name=f"{session.name}-pinger")
                task_status.started(session)
                await session._finished.wait()
            nursery.cancel_scope.cancel()
    except* ConnectionRejected as eg:
        err = _rejected(eg.exceptions[0], name)  # type: ignore[arg-type]
    except* trio.TooSlowError:
        err = UpstreamConnectError(f"{name}: not connected within {config.connect_timeout_s} s")
    except* (HandshakeError, ConnectionClosed, OSError, trio.BrokenResourceError) as eg:
        err = UpstreamConnectError(f"{name}: {type(eg.exceptions[0]).__name__}: {eg.exceptions[0]}")
    finally:
        if session is not None:
            session._lose_calls()
            session._finish()
            session.closed.set()
        if stream is not None:
            # trio-websocket leaves the transport open when its tasks are cancelled mid-flight.
            with trio.CancelScope(shield=True):
                await stream.aclose()
    if err is None and session is not None:
        err = session.error
    if err is None and session is None:
        err = UpstreamConnectError(f"{name}: connection ended during the handshake")
    if err is not None:
        raise err


async def run_db_session(
    *,
    task_status: trio.TaskStatus[DbSession] = trio.TASK_STATUS_IGNORED,
    **kwargs: Any,
) -> None:
    """:func:`serve_db_session` for owners that watch the session object: errors before
    ``started`` propagate to ``nursery.start``; after it, they stay on ``session.error`` (and
    ``session.closed`` is set), so a dying session never crashes the owner's nursery."""
    started = False

    class _Status:
        def started(self, value: DbSession) -> None:
            nonlocal started
            started = True
            task_status.started(value)

    try:
        await serve_db_session(task_status=_Status(), **kwargs)  # type: ignore[arg-type]
    except UpstreamError as exc:
        if not started:
            raise
        logger.debug("%s ended: %s", kwargs.get("name", "db"), exc)
