"""Wiring: build the services from config and run the task tree (DESIGN.md "Components").

Task tree::

    serve_gateway
    └── service nursery
        ├── upstream supervisor        (connect, subscribe, reconcile, refresh; sink = streams)
        ├── api lifespan               (Quart-Trio startup/shutdown)
        └── connection nursery         (every client connection: native streams and API)
            └── accept nursery         (trio.serve_listeners on the front)

Shutdown (the ``shutdown`` event): stop accepting; every stream gets its own randomized ``retry:``
(retry_ms + 0..retry_jitter_ms) and a ``shutdown`` event, and ends; API connections are told to
close; connections get ``shutdown_grace_s`` to finish; then the supervisor closes the upstream
session with a close frame, and everything returns.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig

from gatewayd.config import Config, read_secret
from gatewayd.http.front import ApiServer, Front, FrontConfig
from gatewayd.proto import messages as m
from gatewayd.proto import sse
from gatewayd.proto.access import AccessIndex
from gatewayd.proto.eventlog import EventLog
from gatewayd.proto.projection import StreamDef
from gatewayd.proto.tokens import Principal, Verifier
from gatewayd.services.auth import Authenticator, Presented
from gatewayd.services.broker import Broker
from gatewayd.services.canary import Canary, make_canary
from gatewayd.services.db_ws import SessionConfig, UpstreamTarget
from gatewayd.services.hub import HubConfig
from gatewayd.services.metrics import GatewayMetrics
from gatewayd.services.notify import SystemdNotifier, serve_gateway_notifications
from gatewayd.services.streams import StreamsConfig, StreamService
from gatewayd.services.supervisor import (
    SupervisorConfig,
    TokenSource,
    UpstreamSupervisor,
    static_token,
)
from gatewayd.services.userpool import UserConnectionPool, UserPoolConfig, UserTokenMinter
from gatewayd.services.writes import ReducerSpec, WritesConfig, WriteService

logger = logging.getLogger(__name__)

# After the shutdown event, connections get this long to flush and close.
DEFAULT_SHUTDOWN_GRACE_S = 5.0

# Cyclic GC while serving (DESIGN.md "Performance facts"; bench/README.md "fanout"): a collection
# stops the fan-out, and a full one walks every tracked object, i.e. every stream's tasks and
# scopes: ~0.3-1 s at 10,000 streams. So what start-up built is frozen out of the collector, and
# gen-0 collections wait for this many new container objects (not 700), which lets most
# short-lived objects die by refcount before any collection sees them, so far fewer reach the
# old generations and full collections become rare.
GC_GEN0_THRESHOLD = 10_000
_gc_saved: list[tuple[int, int, int]] = []


@contextmanager
def tuned_gc(gen0_threshold: int | None = GC_GEN0_THRESHOLD) -> Iterator[None]:
    """While the block runs: start-up objects frozen out of the cyclic GC (``gc.freeze``) and a
    higher gen-0 threshold; both undone on exit (tests run many gateways in one process).
    Nested uses share the outermost setting. ``None`` leaves the GC alone."""
    if gen0_threshold is None:
        yield
        return
    if not _gc_saved:
        gc.collect()  # do not freeze start-up garbage
        gc.freeze()
        threshold = gc.get_threshold()
        gc.set_threshold(max(gen0_threshold, threshold[0]), threshold[1], threshold[2])
    else:
        threshold = _gc_saved[-1]
    _gc_saved.append(threshold)
    try:
        yield
    finally:
        _gc_saved.pop()
        if not _gc_saved:
            gc.set_threshold(*threshold)
            gc.unfreeze()


async def hold_tuned_gc(
    gen0_threshold: int | None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """:func:`tuned_gc` for as long as this task runs (until its nursery is cancelled)."""
    with tuned_gc(gen0_threshold):
        task_status.started()
        await trio.sleep_forever()


@dataclass
class Gateway:
    """The running services, handed to the HTTP layer (``create_app(gateway)``)."""

    config: Config
    supervisor: UpstreamSupervisor
    streams: StreamService
    verifier: Verifier
    reducers: dict[str, Any]
    demo_page: bool = False
    demo_login: Callable[[], dict[str, Any]] = field(default=lambda: {})
    bound: list[tuple[str, int]] = field(default_factory=list)
    canary: Canary | None = None  # /readyz's proof that updates flow ([canary] in the config)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    front: Front | None = None  # set by serve_gateway (connection metrics)
    writes: WriteService | None = None
    users: UserConnectionPool | None = None  # per-user upstream connections (user attribution)

    authenticator: Authenticator | None = None  # every inbound verifier (docs/auth.md)
    broker: Broker | None = None  # gatewayd's own issuer for SpacetimeDB ([broker])

    def authenticate(self, token: str) -> Principal:
        """A bearer JWT against the static keys only (diagnostics); requests go through
        :meth:`authenticate_request`."""
        return self.verifier.verify(token, now=time.time())

    async def authenticate_request(self, presented: Presented) -> Principal:
        """A request's principal from its verified credentials (every configured verifier)."""
        if self.authenticator is None:
            self.authenticator = Authenticator(self.verifier)
        self.authenticator.verifier = self.verifier  # a reload (SIGHUP) may have swapped it
        return await self.authenticator.authenticate(presented)


def build_verifier(config: Config, base: Path) -> Verifier:
    from gatewayd.wiring import build_verifier as build

    return build(config, base)


def build_gateway(
    config: Config,
    *,
    base: Path = Path("."),
    token_source: TokenSource | None = None,
    broker_issuer: str | None = None,
    verifier: Verifier | None = None,
    user_minter: UserTokenMinter | None = None,
) -> Gateway:
    u = config.upstream
    from gatewayd.wiring import build_authenticator, build_broker

    verifier = verifier or build_verifier(config, base)
    authenticator = build_authenticator(config, base, verifier=verifier)
    broker = build_broker(config, base, issuer=broker_issuer)
    if token_source is None and broker is not None:
        token_source = broker.service_token  # the service connection's token comes from the broker
    if token_source is None:
        token_source = static_token(read_secret(file=u.token_file, env=u.token_env, base=base))
    streams = [
        StreamDef(s.name, tuple(s.tables), s.tenant_column, s.permission, tuple(config.stream_queries(s)))
        for s in config.streams
    ]
    log = EventLog(
        max_events_per_partition=config.event_log.max_events_per_partition_count,
        max_bytes_per_partition=config.event_log.max_bytes_per_partition,
        max_total_bytes=config.event_log.max_total_bytes,
    )
    access = None
    if config.access.mode == "tables":
        access = AccessIndex(config.access)
    service = StreamService(
        streams,
        log,
        HubConfig(
            client_buffer_bytes=config.sse.client_buffer_bytes,
            send_timeout_s=config.sse.send_timeout_s,
            heartbeat_s=config.sse.heartbeat_s,
            max_streams_per_principal=config.sse.max_streams_per_principal,
        ),
        StreamsConfig(
            retry_ms=config.sse.retry_ms,
            retry_jitter_ms=config.sse.retry_jitter_ms,
            snapshot_chunk_rows=config.sse.snapshot_chunk_rows,
            snapshot_page_ttl_s=config.event_log.snapshot_page_ttl_s,
            snapshot_pages_count=config.event_log.snapshot_pages_count,
        ),
        access=access,
    )
    sup_cfg = SupervisorConfig(
        backoff_initial_s=u.backoff_initial_s,
        backoff_max_s=u.backoff_max_s,
        auth_backoff_initial_s=u.auth_backoff_initial_s,
        auth_backoff_max_s=u.auth_backoff_max_s,
        call_wait_s=u.call_wait_s,
        session=SessionConfig(
            connect_timeout_s=u.connect_timeout_s,
            ping_interval_s=u.ping_interval_s,
            ping_timeout_s=u.ping_timeout_s,
            max_message_bytes=u.max_message_bytes,
            compression={
                "none": m.Compression.NONE,
                "gzip": m.Compression.GZIP,
                "brotli": m.Compression.BROTLI,
            }[u.compression],
        ),
    )
    query_sets = {f"stream:{s.name}": list(s.queries) for s in streams}
    if access is not None:
        # One query set per table: a refused table (e.g. private) must not hide the others.
        query_sets.update({f"access:{t}": [f"SELECT * FROM {t}"] for t in access.t.tables})
    target = UpstreamTarget(u.url, u.database)
    canary = make_canary(config.canary, target, token_source)
    if canary is not None:
        query_sets.update(canary.query_sets())
    supervisor = UpstreamSupervisor(
        target=target,
        query_sets=query_sets,
        sink=canary.wrap(service.apply) if canary is not None else service.apply,
        token_source=token_source,
        config=sup_cfg,
    )
    if user_minter is None and broker is not None:
        user_minter = broker.user_token  # per-user connections take their tokens from the broker
    users = None
    if user_minter is not None:
        users = UserConnectionPool(
            target=supervisor.target,
            schema=lambda: supervisor.schema,
            minter=user_minter,
            config=UserPoolConfig(
                max_sessions=config.writes.user_connections_count,
                idle_close_s=config.writes.user_connection_idle_s,
                session=sup_cfg.session,
            ),
        )
    w = config.writes
    writes = WriteService(
        {
            r.name: ReducerSpec(
                name=r.name,
                permission=r.permission,
                upstream=r.upstream or r.name,
                attribution=r.attribution,
                actor_argument=r.actor_argument,
                tenant_argument=r.tenant_argument,
            )
            for r in config.reducers
        },
        supervisor=supervisor,
        streams=service,
        users=users,
        config=WritesConfig(
            idempotency_window_s=w.idempotency_window_s,
            idempotency_max_count=w.idempotency_max_count,
            rate_per_principal_per_s=w.rate_per_principal_per_s,
            burst_per_principal=w.burst_per_principal_count,
            rate_per_tenant_per_s=w.rate_per_tenant_per_s,
            burst_per_tenant=w.burst_per_tenant_count,
        ),
    )
    gateway = Gateway(
        writes=writes,
        users=users,
        config=config,
        supervisor=supervisor,
        streams=service,
        verifier=verifier,
        authenticator=authenticator,
        broker=broker,
        reducers={r.name: r for r in config.reducers},
        canary=canary,
    )
    # Metrics hooks: token mints and JWKS fetches are counted where they happen.
    if broker is not None:
        broker.on_mint = gateway.metrics.token_minted
    if authenticator is not None:
        for cache in authenticator.caches.values():
            cache.on_fetch = gateway.metrics.jwks_fetched
    return gateway


async def serve_gateway(
    gateway: Gateway,
    *,
    shutdown: trio.Event,
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
    notifier: SystemdNotifier | None = None,
    listeners: list[trio.SocketListener] | None = None,
    gc_gen0_threshold: int | None = GC_GEN0_THRESHOLD,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole gateway until ``shutdown`` is set; ``task_status.started(bound addresses)``
    once HTTP is listening (the upstream may still be connecting: see /readyz). ``notifier``
    reports to systemd (READY=1 once the upstream is subscribed too, STATUS, WATCHDOG, STOPPING).
    ``gc_gen0_threshold``: see :func:`tuned_gc` (None leaves the GC alone)."""
    from gatewayd.http.app import create_app  # quart is heavy; only the daemon needs it

    cfg = gateway.config
    app = create_app(gateway)
    hcfg = HypercornConfig()
    hcfg.keep_alive_timeout = 30
    hcfg.graceful_timeout = shutdown_grace_s
    hcfg.accesslog = None
    hcfg.include_server_header = False  # no version banner
    hcfg.read_timeout = max(1, round(cfg.http.read_timeout_s))  # hypercorn takes whole seconds
    api = ApiServer(app, hcfg)
    front = Front(
        streams=gateway.streams,
        authenticate=gateway.authenticate_request,
        api=api,
        config=FrontConfig(
            max_head_bytes=cfg.http.max_head_bytes,
            head_timeout_s=cfg.http.head_timeout_s,
            recheck_s=cfg.auth.recheck_s,
            max_connections=cfg.http.max_connections_count,
        ),
    )
    if listeners is None:  # (the dev stack binds first: its broker issuer names the port)
        listeners = await trio.open_tcp_listeners(cfg.http.port, host=cfg.http.host)
    bound = [(str(lst.socket.getsockname()[0]), int(lst.socket.getsockname()[1])) for lst in listeners]
    gateway.bound = bound
    gateway.front = front
    if gateway.broker is not None:
        gateway.broker.bind_issuer(*bound[0])  # only when no issuer is configured (development)
    async with trio.open_nursery() as services:
        services.start_soon(gateway.supervisor.serve, name="upstream-supervisor")
        if gateway.users is not None:
            await services.start(gateway.users.serve)
        if gateway.broker is not None:
            await services.start(gateway.broker.serve)  # key rotation and retirement
        await services.start(api.serve)
        await services.start(front.rechecks.serve)  # open streams' credential rechecks
        # Start-up is over: freeze what it built out of the cyclic GC until the end (tuned_gc).
        await services.start(hold_tuned_gc, gc_gen0_threshold)
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accept:
                accept.start_soon(
                    partial(
                        trio.serve_listeners, front.handle_connection, listeners, handler_nursery=connections
                    )
                )
                logger.info("listening on %s", ", ".join(f"http://{h}:{p}" for h, p in bound))
                task_status.started(bound)
                if notifier is not None:
                    services.start_soon(
                        partial(serve_gateway_notifications, notifier, gateway.supervisor, shutdown=shutdown),
                        name="systemd-notify",
                    )
                if gateway.canary is not None:
                    services.start_soon(gateway.canary.serve, gateway.supervisor, name="canary")
                await shutdown.wait()
                logger.info(
                    "shutdown: stop accepting, ending %d streams", gateway.streams.hub.subscriber_count()
                )
                accept.cancel_scope.cancel()
            front.accepting = False
            bye = sse.json_frame(
                msgspec.json.encode({"event": "shutdown", "reason": "gateway shutting down"}),
                event="shutdown",
            )
            hub = gateway.streams.hub
            for subs in tuple(hub.partitions.values()):
                for sub in subs:
                    # Each client its own jittered retry: they must not all come back at once.
                    sub.push(gateway.streams.retry_frame() + bye)
            hub.finish_all(None, "shutdown")
            await api.context.terminated.set()
            grace_end = trio.current_time() + shutdown_grace_s
            connections.cancel_scope.deadline = grace_end
            # Upstream calls still waiting just before the grace ends are answered "outcome
            # unknown" (504) or "unavailable" (503), so no request is cut without a response.
            abandon_at = grace_end - min(1.0, shutdown_grace_s / 4)
            services.start_soon(gateway.supervisor.abandon_calls_at, abandon_at, name="abandon-calls")
        logger.info("shutdown: connections closed; closing the upstream session")
        # With a close frame (bounded by the session's close timeout), before the cancellation.
        await gateway.supervisor.close_sessions()
        services.cancel_scope.cancel()
    if gateway.authenticator is not None:
        await gateway.authenticator.aclose()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":

        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                doc = {"level": record.levelname, "logger": record.name, "message": record.getMessage()}
                if record.exc_info:
                    doc["exception"] = self.formatException(record.exc_info)
                return json.dumps(doc)

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("hypercorn").setLevel(logging.WARNING)


async def run_until_signal(body: Callable[[trio.Event], Any]) -> None:
    """Run ``body(shutdown_event)``; SIGINT/SIGTERM set the event, a second signal cancels all."""
    import signal

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    if shutdown.is_set():
                        logger.warning("second signal: exiting now")
                        nursery.cancel_scope.cancel()
                        return
                    logger.info("signal %s: shutting down", signal.Signals(signum).name)
                    shutdown.set()

        nursery.start_soon(watch)
        await body(shutdown)
        nursery.cancel_scope.cancel()


def run_command(body: Callable[[trio.Event], Any]) -> OSError | None:
    """``trio.run(run_until_signal, body)`` for a CLI command. Returns the OSError that stopped it
    (a port already in use, say), taken out of trio's exception groups so that the command can
    print it as one line, or None after a clean stop."""
    failed: list[OSError] = []
    try:
        trio.run(run_until_signal, body)
    except* OSError as group:
        failed.extend(_leaves(group))
    return failed[0] if failed else None


def _leaves(exc: BaseException) -> list[OSError]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc] if isinstance(exc, OSError) else []
