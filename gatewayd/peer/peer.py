"""The peer handle, :func:`open_peer`, and the CLI entry points."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn, TypeAlias
from urllib.parse import urlencode

import trio

from gatewayd.peer.auth import JWKS_EXPIRY_S, JWKS_REFRESH_S, LOCAL_ISSUER, PeerAuth
from gatewayd.peer.connection import ConnectionInfo, Mute, MuteMode, WsConnection, pick_connections
from gatewayd.peer.database import PeerDatabase
from gatewayd.peer.faults import Faults, ReducerDelay, UpgradeRefusal
from gatewayd.peer.module import Module
from gatewayd.peer.server import HttpFront
from gatewayd.proto.sats import AlgebraicType

logger = logging.getLogger(__name__)

# Upstream WebSocketOptions and limits (PROTOCOL.md §2.2, §3.2).
PING_INTERVAL_S: Final = 15.0
IDLE_TIMEOUT_S: Final = 30.0
MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
INCOMING_QUEUE_COUNT: Final = 16 * 1024
# Upstream drops a client whose outgoing channel (16 Ki messages) is full rather than block.
OUTGOING_QUEUE_COUNT: Final = 16 * 1024
V3_MAX_PAYLOAD_BYTES: Final = 512 * 1024
FRAGMENT_BYTES: Final = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSettings:
    """Everything settable on a peer; defaults are upstream's values."""

    ping_interval_s: float = PING_INTERVAL_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    close_timeout_s: float = 1.0  # how long to wait for the client's close frame after ours
    max_message_bytes: int = MAX_MESSAGE_BYTES
    incoming_queue_count: int = INCOMING_QUEUE_COUNT
    outgoing_queue_count: int = OUTGOING_QUEUE_COUNT
    v3_max_payload_bytes: int = V3_MAX_PAYLOAD_BYTES
    fragment_bytes: int = FRAGMENT_BYTES
    local_issuer: str = LOCAL_ISSUER
    jwks_refresh_s: float = JWKS_REFRESH_S
    jwks_expiry_s: float = JWKS_EXPIRY_S
    http_timeout_s: float = 5.0
    allow_http_issuers: bool = True
    owner_identity: str | None = None  # may read private tables
    max_http_body_bytes: int = 16 * 1024 * 1024
    http_keepalive_s: float = 60.0
    # Subprotocols the peer accepts, in its order of preference (upstream: v3, then v2; v1 is
    # refused by the peer). ("v2.bsatn.spacetimedb",) imitates a server without v3.
    protocols: tuple[str, ...] = ("v3.bsatn.spacetimedb", "v2.bsatn.spacetimedb")


# Which connections a fault applies to: a connection id, an identity (or connection id) hex
# string, a ConnectionInfo, or None for all of them.
ConnectionSelector: TypeAlias = int | str | ConnectionInfo | None


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    tcp_connections: int
    websocket_connections: int
    upgrades_refused: int
    connections_rejected: int
    transactions_committed: int
    outgoing_queued: int


class Peer:
    """A running peer: its address, databases, auth, live connections, and fault injection.

    Obtained from :func:`open_peer`. Every method is safe to call from any task of the same
    trio run; the synchronous ones take effect immediately.
    """

    def __init__(
        self,
        *,
        settings: PeerSettings,
        databases: Mapping[str, PeerDatabase],
        auth: PeerAuth,
        host: str,
        port: int,
    ) -> None:
        self.settings = settings
        self.databases: dict[str, PeerDatabase] = dict(databases)
        self.auth = auth
        self.host = host
        self.port = port
        self.faults = Faults()
        self._front = HttpFront(self)
        self._conns: list[WsConnection] = []
        self._tcp_scopes: dict[int, trio.CancelScope] = {}
        self._numbers = itertools.count(1)
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._listen_scope: trio.CancelScope | None = None
        self._listener_done = trio.Event()
        self._listener_done.set()
        self.stats_tcp_connections = 0
        self.stats_upgrades_refused = 0
        self.stats_connections_rejected = 0

    def __repr__(self) -> str:
        return f"<Peer {self.base_url} databases={list(self.databases)}>"

    # --- addresses -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://host:port`` (no trailing slash); the SDK's ``withUri`` takes this."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def ws_base_url(self) -> str:
        return "ws" + self.base_url[4:]

    def subscribe_url(self, database: str | None = None, **query: str) -> str:
        """``ws://…/v1/database/{db}/subscribe`` with optional query parameters."""
        url = f"{self.ws_base_url}/v1/database/{self.database(database).name}/subscribe"
        return f"{url}?{urlencode(query)}" if query else url

    # --- databases -----------------------------------------------------------------------------

    def database(self, name: str | None = None) -> PeerDatabase:
        """A database by name, or the only/first one."""
        if name is None:
            return next(iter(self.databases.values()))
        db = self.find_database(name)
        if db is None:
            raise KeyError(f"the peer serves no database {name!r}")
        return db

    @property
    def db(self) -> PeerDatabase:
        return self.database()

    def find_database(self, name_or_identity: str) -> PeerDatabase | None:
        db = self.databases.get(name_or_identity)
        if db is not None:
            return db
        ident = name_or_identity.lower()
        return next((d for d in self.databases.values() if d.identity == ident), None)

    # --- connections ---------------------------------------------------------------------------

    @property
    def connections(self) -> list[ConnectionInfo]:
        """Live WebSocket connections (a snapshot)."""
        return [c.info() for c in self._conns]

    def register(self, conn: WsConnection) -> None:
        self._conns.append(conn)
        self._notify()

    def unregister(self, conn: WsConnection) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[Peer], bool]) -> None:
        """Wait until ``predicate(peer)`` holds; re-checked whenever connections change."""
        while not predicate(self):
            await self._changed.wait()

    async def wait_connection_count(self, n: int, *, database: str | None = None) -> None:
        """Wait until exactly ``n`` WebSocket connections are live (to one database if named)."""
        await self.wait_until(
            lambda p: sum(1 for c in p._conns if database is None or c.db.name == database) == n
        )

    def statistics(self) -> PeerStatistics:
        return PeerStatistics(
            tcp_connections=len(self._tcp_scopes),
            websocket_connections=len(self._conns),
            upgrades_refused=self.stats_upgrades_refused,
            connections_rejected=self.stats_connections_rejected,
            transactions_committed=sum(d.transactions_committed for d in self.databases.values()),
            outgoing_queued=sum(c._out_send.statistics().current_buffer_used for c in self._conns),
        )

    # --- fault injection -----------------------------------------------------------------------

    def cut(self, connection: ConnectionSelector = None, *, reset: bool = False) -> int:
        """Cut WebSocket connections abruptly: no close frame, the socket is just closed.

        Args:
            connection: a connection id, an identity (or connection id) hex string, a
                :class:`ConnectionInfo`; None cuts all of them.
            reset: close with an RST instead of a FIN.

        Returns: how many connections were cut. The client observes an abnormal closure (1006).
        """
        conns = pick_connections(self._conns, connection)
        for c in conns:
            c.abort("cut by fault injection", reset=reset)
        return len(conns)

    def cut_all(self, *, reset: bool = False) -> int:
        """Cut every WebSocket connection and every pending handshake or HTTP connection."""
        n = self.cut(None, reset=reset)
        for scope in list(self._tcp_scopes.values()):
            scope.cancel()
        return n

    async def disconnect_all(self, code: int = 1001, reason: str = "module exited") -> None:
        """Close every connection cleanly with a close frame (default: upstream's 1001)."""
        async with trio.open_nursery() as nursery:
            for c in list(self._conns):
                nursery.start_soon(c.close, code, reason)

    def stall(self, connection: ConnectionSelector = None) -> int:
        """Freeze connections: no reads, writes, pings or idle timeout; the socket stays open."""
        conns = pick_connections(self._conns, connection)
        for c in conns:
            c.stall()
        return len(conns)

    def unstall(self, connection: ConnectionSelector = None) -> int:
        conns = pick_connections(self._conns, connection)
        for c in conns:
            c.unstall()
        return len(conns)

    def stall_handshakes(self) -> None:
        """New upgrade requests get no answer at all until :meth:`resume_handshakes`."""
        if self.faults.handshakes_released is None:
            self.faults.handshakes_released = trio.Event()

    def resume_handshakes(self) -> None:
        released = self.faults.handshakes_released
        self.faults.handshakes_released = None
        if released is not None:
            released.set()

    def refuse_upgrades(
        self,
        duration_s: float | None = None,
        *,
        status: int = 503,
        message: str = "Service Unavailable (dev peer fault injection)",
    ) -> None:
        """Answer upgrade requests with ``status`` for ``duration_s`` (None: until accepted)."""
        until = None if duration_s is None else trio.current_time() + duration_s
        self.faults.refusal = UpgradeRefusal(status, message, until)

    def accept_upgrades(self) -> None:
        self.faults.refusal = None

    def refuse_tokens(self, enabled: bool = True) -> None:
        """Refuse every presented token with 401 (anonymous requests still get identities)."""
        self.faults.refuse_tokens = enabled

    def mute(
        self, mode: MuteMode = "drop", *, delay_s: float = 0.0, connection: ConnectionSelector = None
    ) -> None:
        """Withhold TransactionUpdates while reducers keep getting their ReducerResults.

        Args:
            mode: ``drop`` (lost for good), ``hold`` (kept until :meth:`unmute`) or ``delay``
                (each released ``delay_s`` after it was produced).
            connection: one connection (see :meth:`cut`), or None for the whole peer.
        """
        mute = Mute(mode, delay_s)
        if connection is None:
            self.faults.mute = mute
        else:
            for c in pick_connections(self._conns, connection):
                c.mute = mute

    def unmute(self, connection: ConnectionSelector = None) -> None:
        """Stop muting; updates held by a ``hold`` mute are delivered in order."""
        if connection is None:
            self.faults.mute = None  # per-connection mutes stay as they are
            conns = list(self._conns)
        else:
            conns = pick_connections(self._conns, connection)
            for c in conns:
                c.mute = None
        for c in conns:
            if c.mute is None and self.faults.mute is None:
                c.release_held()

    def delay_reducer(
        self, name: str, delay_s: float | None, *, when: Literal["before", "after"] = "before"
    ) -> None:
        """Make WebSocket calls of a reducer slow (``None`` removes the delay).

        ``before``: the call waits, then runs (cut the socket meanwhile and it never runs).
        ``after``: it commits at once and its result reaches the caller after the delay.
        """
        if delay_s is None:
            self.faults.reducer_delays.pop(name, None)
        else:
            self.faults.reducer_delays[name] = ReducerDelay(delay_s, when)

    def hotswap(
        self,
        table: str,
        columns: Mapping[str, AlgebraicType],
        *,
        database: str | None = None,
        defaults: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        """Change a table's schema while connections stay open (see ``PeerDatabase.hotswap``)."""
        self.database(database).hotswap(table, columns, defaults=defaults, **changes)

    async def stop(self) -> None:
        """Go down: close the listener (new connections are refused) and drop every connection
        without a close frame. Data is kept; :meth:`start` brings the peer back on the same port.
        """
        if self._listen_scope is not None:
            self._listen_scope.cancel()
        await self._listener_done.wait()
        for scope in list(self._tcp_scopes.values()):
            scope.cancel()
        await self.wait_until(lambda p: not p._conns)

    async def start(self) -> None:
        """Listen again (on the same port) after :meth:`stop`."""
        if not self._listener_done.is_set():
            return
        assert self._nursery is not None
        await self._nursery.start(self._listen_task)

    async def restart(self, downtime_s: float = 0.0) -> None:
        """Drop every connection, stay down for ``downtime_s``, and listen again; data is kept."""
        logger.info("peer: restarting (down for %.1f s)", downtime_s)
        await self.stop()
        await trio.sleep(downtime_s)
        await self.start()

    # --- serving -------------------------------------------------------------------------------

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one already-connected stream as if accepted by the listener.

        Tests use it with one end of ``trio.testing.memory_stream_pair()`` to drive the peer on
        virtual time (MockClock) without sockets.
        """
        conn_no = next(self._numbers)
        self.stats_tcp_connections += 1
        with trio.CancelScope() as scope:
            self._tcp_scopes[conn_no] = scope
            try:
                await self._front.serve_stream(stream, conn_no)
            except Exception:
                # The per-connection boundary: one connection's failure never stops the peer.
                logger.exception("peer: connection %d failed", conn_no)
            finally:
                del self._tcp_scopes[conn_no]
        if scope.cancelled_caught:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _handle_tcp(self, stream: trio.SocketStream) -> None:
        with suppress(OSError):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self.serve_stream(stream)

    async def _listen_task(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        self._listener_done = trio.Event()
        try:
            with trio.CancelScope() as self._listen_scope:
                async with trio.open_nursery() as handlers:
                    handlers.start_soon(
                        trio.serve_listeners, self._handle_tcp, listeners, name="peer-listener"
                    )
                    logger.info("peer: listening on %s", self.base_url)
                    task_status.started(self.port)
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
            self._listen_scope = None
            self._listener_done.set()


def _resolve_module(module: Module | str) -> Module:
    if isinstance(module, Module):
        return module
    if module == "demo":
        from gatewayd.peer.demo_module import make_demo_module

        return make_demo_module()
    raise ValueError(f"unknown module {module!r} (built in: demo)")


@asynccontextmanager
async def open_peer(
    module: Module | str | None = "demo",
    *,
    modules: Mapping[str, Module | str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    listen: bool = True,
    auth: PeerAuth | None = None,
    settings: PeerSettings | None = None,
    **overrides: Any,
) -> AsyncIterator[Peer]:
    """Run a SpacetimeDB-protocol peer for the duration of the block.

    Args:
        module: the module to serve, as a :class:`Module` or a built-in name (``"demo"``); it is
            served under the module's name. Ignored when ``modules`` is given.
        modules: database name -> module, to serve several databases.
        host, port: where to listen; port 0 picks a free port (read ``peer.port``).
        listen: False serves nothing on TCP (use :meth:`Peer.serve_stream`).
        auth: the key and token rules (a fresh key by default).
        settings: a :class:`PeerSettings`; keyword ``overrides`` replace single fields
            (``open_peer(ping_interval_s=0.2, idle_timeout_s=0.5)``).

    Yields:
        The :class:`Peer`, already listening; ``init`` reducers have run.

    Cancellation: leaving the block cancels every connection (no close frames) and closes the
    listener. Resource handling: the peer's tasks live in a nursery owned by this context.
    """
    cfg = dataclasses.replace(settings or PeerSettings(), **overrides)
    if modules is None:
        if module is None:
            raise ValueError("open_peer needs a module or modules")
        only = _resolve_module(module)
        modules = {only.name: only}
    dbs: dict[str, PeerDatabase] = {}
    for name, mod in modules.items():
        db = PeerDatabase(_resolve_module(mod), name=name, owner_identity=cfg.owner_identity)
        db.run_init()
        dbs[name] = db
    peer_auth = auth or PeerAuth(
        issuer=cfg.local_issuer,
        jwks_refresh_s=cfg.jwks_refresh_s,
        jwks_expiry_s=cfg.jwks_expiry_s,
        http_timeout_s=cfg.http_timeout_s,
        allow_http_issuers=cfg.allow_http_issuers,
    )
    peer = Peer(settings=cfg, databases=dbs, auth=peer_auth, host=host, port=port)
    async with trio.open_nursery() as nursery:
        peer._nursery = nursery
        if listen:
            await nursery.start(peer._listen_task)
        try:
            yield peer
        finally:
            nursery.cancel_scope.cancel()


async def serve_peer_forever(
    *,
    host: str,
    port: int,
    module_name: str,
    task_status: trio.TaskStatus[Peer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve a peer until cancelled; ``task_status.started(peer)`` once it listens."""
    async with open_peer(module_name, host=host, port=port) as peer:
        task_status.started(peer)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


def run_peer_cli(host: str, port: int, module_name: str) -> int:
    """``gatewayd peer``: print ``peer: http://HOST:PORT/`` and serve until Ctrl-C; exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _resolve_module(module_name)
    except ValueError as exc:
        sys.stderr.write(f"gatewayd peer: {exc}\n")
        return 2

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            peer: Peer = await nursery.start(
                lambda task_status: serve_peer_forever(
                    host=host, port=port, module_name=module_name, task_status=task_status
                )
            )
            sys.stdout.write(f"peer: {peer.base_url}/\n")
            sys.stdout.flush()

    interrupted = False
    bind_error: OSError | None = None
    try:
        trio.run(main)
    except* KeyboardInterrupt:
        interrupted = True
    except* OSError as group:
        bind_error = next(e for e in _leaves(group) if isinstance(e, OSError))
    if bind_error is not None and not interrupted:
        sys.stderr.write(f"gatewayd peer: cannot listen on {host}:{port}: {bind_error}\n")
        return 1
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
