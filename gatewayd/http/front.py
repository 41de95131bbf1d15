"""The HTTP front: one listener, streams served natively, everything else handed to hypercorn.

Why (DESIGN.md "Performance facts"): an SSE event pushed through a per-client ASGI ``send`` costs
~10x more CPU and latency than writing the pre-encoded frame straight into a non-blocking socket.
Browsers must reach the API and the streams at one origin, so both share this listener:

1. The front reads the first request head of each new connection with h11 (bounded size and
   time).
2. ``GET /v1/streams/{name}`` is served here: the socket's file descriptor goes to the hub, which
   writes frames to it directly (``gatewayd.services.hub``). The response is close-delimited
   (``Connection: close``), never compressed.
3. Anything else (including ``/v1/streams/{name}/snapshot``, malformed requests and oversized
   heads) is handed, with the bytes already read, to hypercorn's own per-connection server running
   the Quart-Trio app, which keeps the connection for its whole life (keep-alive included).

A stream request that arrives later on a kept-alive API connection is served by the Quart route
of the same path through the same hub, on its slower ASGI writer; correctness is identical.

Hypercorn is driven through its per-connection ``TCPServer`` and ``Lifespan`` classes (the same
ones ``hypercorn.trio.serve`` uses), since its public entry point owns the listening socket.
Pinned to the hypercorn versions tested.
"""

from __future__ import annotations

import heapq
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import h11
import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from gatewayd.errors import AuthError
from gatewayd.http.autherrors import auth_error_parts
from gatewayd.proto.tokens import Principal
from gatewayd.services.auth import Presented, presented_from_headers, recheck_credential, recheck_delay
from gatewayd.services.hub import Subscriber, run_socket_writer
from gatewayd.services.streams import StreamError, StreamService

logger = logging.getLogger(__name__)

STREAM_PATH: Final = re.compile(r"/v1/streams/([a-z][a-z0-9_]{0,62})")
TOKEN_COOKIE: Final = "gatewayd_token"

SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache, no-transform\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"Connection: close\r\n"
    b"\r\n"
)

_json = msgspec.json.Encoder()

Authenticate = Callable[[Presented], Awaitable[Principal]]
# An opened native stream: what its writer and credential rechecks need, nothing more.
_Opened = tuple[Subscriber, Presented, Principal]


def bearer_or_cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The credential of a stream request: ``Authorization: Bearer``, else the token cookie
    (EventSource cannot set headers)."""
    cookie_token = None
    for k, v in headers:
        name = k.lower()
        if name == b"authorization":
            scheme, _, value = v.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        elif name == b"cookie":
            for part in v.decode("latin-1").split(";"):
                ck, _, cv = part.strip().partition("=")
                if ck == TOKEN_COOKIE and cv:
                    cookie_token = cv
    return cookie_token


def error_body(status: int, code: str, message: str, correlation_id: str) -> bytes:
    return _json.encode({"error": {"code": code, "message": message, "correlation_id": correlation_id}})


def _reason(status: int) -> str:
    return {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            429: "Too Many Requests", 503: "Service Unavailable"}.get(status, "Error")  # fmt: skip


class ReplayStream(trio.abc.HalfCloseableStream):
    """A socket stream that first yields bytes already read from it (the peeked request head)."""

    def __init__(self, inner: trio.SocketStream, prefix: bytes) -> None:
        self.inner = inner
        self.socket = inner.socket
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class ApiServer:
    """Hypercorn's connection server for handed-over connections, with the app's lifespan."""

    def __init__(self, app: Any, config: HypercornConfig) -> None:
        self.app = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.config = config
        self.state: dict[str, Any] = {}
        self.context = WorkerContext(None)
        self._lifespan = Lifespan(self.app, config, self.state)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the app's lifespan (startup, then shutdown when cancelled). Startable."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._lifespan.handle_lifespan)
            await self._lifespan.wait_for_startup()
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.move_on_after(self.config.graceful_timeout, shield=True):
                    await self.context.terminated.set()
                    await self._lifespan.wait_for_shutdown()
                nursery.cancel_scope.cancel()

    async def handle(self, stream: trio.SocketStream, prefix: bytes) -> None:
        server = TCPServer(
            self.app,
            self.config,
            self.context,
            ConnectionState(self.state.copy()),
            ReplayStream(stream, prefix),  # type: ignore[arg-type]
        )
        await server.run()


@dataclass(frozen=True, slots=True, kw_only=True)
class FrontConfig:
    max_head_bytes: int = 16 * 1024
    head_timeout_s: float = 10.0
    max_connections: int = 100_000
    # An open stream rechecks its credential this often (a revoked session ends it).
    recheck_s: float = 30.0


class Rechecks:
    """Credential rechecks of every open native stream, scheduled from one task.

    The rules are ``gatewayd.services.auth``'s (``recheck_delay``, ``recheck_credential``): every
    ``recheck_s``, and once
    when the credential expires (+1 s); a definite refusal ends the stream (``revoked`` event);
    unavailability of the app or its keys does not. But an idle stream costs an entry here instead
    of a task, a nursery and their scopes (~30 GC-tracked objects, ~5 KB; bench/README.md "fanout").
    Each due recheck runs in a short-lived task of its own, so a slow verifier delays no other.
    Run :meth:`serve` (serve_gateway does) before streams are opened.
    """

    def __init__(
        self, authenticate: Authenticate, recheck_s: float, *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.authenticate = authenticate
        self.recheck_s = recheck_s
        self._wall = wall_clock
        self._watched: dict[int, _Opened] = {}  # subscriber id -> what its recheck needs
        self._due: list[tuple[float, int]] = []  # (trio time, subscriber id); ended ones skipped
        self._changed = trio.Event()
        self._running = False

    def watch(self, sub: Subscriber, presented: Presented, principal: Principal) -> None:
        if not self._running:
            raise RuntimeError("credential rechecks are not running (Rechecks.serve)")
        self._watched[sub.id] = (sub, presented, principal)
        self._schedule(sub.id, principal)

    def unwatch(self, sub: Subscriber) -> None:
        self._watched.pop(sub.id, None)

    def __len__(self) -> int:
        return len(self._watched)

    def _schedule(self, sid: int, principal: Principal) -> None:
        due = trio.current_time() + recheck_delay(principal, self.recheck_s, self._wall())
        if not self._due or due < self._due[0][0]:
            self._changed.set()
        heapq.heappush(self._due, (due, sid))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._running = True
            task_status.started()
            try:
                while True:
                    now = trio.current_time()
                    while self._due and self._due[0][0] <= now:
                        sid = heapq.heappop(self._due)[1]
                        if sid in self._watched:
                            nursery.start_soon(self._recheck, sid, name=f"recheck[{sid}]")
                    self._changed = trio.Event()
                    if self._due:
                        with trio.move_on_at(self._due[0][0]):
                            await self._changed.wait()
                    else:
                        await self._changed.wait()
            finally:
                self._running = False

    async def _recheck(self, sid: int) -> None:
        sub, presented, principal = self._watched[sid]
        refused = await recheck_credential(lambda: self.authenticate(presented), principal)
        if refused is not None:
            if self._watched.pop(sid, None) is not None:  # not if the stream ended meanwhile
                _credential_revoked(sub, refused)
            return
        if sid in self._watched:
            self._schedule(sid, principal)


class Front:
    def __init__(
        self,
        *,
        streams: StreamService,
        authenticate: Authenticate,
        api: ApiServer,
        config: FrontConfig,
    ) -> None:
        self.streams = streams
        self.authenticate = authenticate
        self.api = api
        self.config = config
        self.accepting = True
        self.native_streams = 0
        self.handed_over = 0
        self.open_connections = 0  # client connections currently open (metrics)
        self.rechecks = Rechecks(authenticate, config.recheck_s)
        self.refused_connections = 0

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """Per-connection entry point for ``trio.serve_listeners``. Never raises."""
        if self.open_connections >= self.config.max_connections:
            self.refused_connections += 1
            with trio.move_on_after(1, shield=True):
                await stream.aclose()
            return
        self.open_connections += 1
        try:
            opened = await self._handle(stream)
            if opened is not None:
                # A native stream. Its writer lives as long as the client, so it runs here, after
                # the request's parser, head bytes and headers are gone (memory per idle client).
                await self._run_stream(stream, *opened)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            # The per-connection boundary: a bug triggered by one client's input ends that
            # connection, is logged once, and never reaches the nursery that serves everyone.
            logger.exception("unexpected error on a client connection; closing it")
        finally:
            self.open_connections -= 1
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _handle(self, stream: trio.SocketStream) -> _Opened | None:
        """Read the request head; answer or hand over everything but an opened native stream."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_head_bytes)
        buffered = bytearray()
        event: Any = None
        with trio.move_on_after(self.config.head_timeout_s):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    event = None
                    break
                if event is not h11.NEED_DATA:
                    break
                data = await stream.receive_some(65536)
                if not data:
                    return None
                buffered += data
                conn.receive_data(bytes(data))
        if event is None and not buffered:
            return None  # idle connection that never spoke
        if isinstance(event, h11.Request) and event.method == b"GET":
            target = event.target.decode("latin-1")
            path, _, query = target.partition("?")
            m = STREAM_PATH.fullmatch(path)
            if m is not None:
                self.native_streams += 1
                return await self._open_stream(stream, m.group(1), query, event.headers.raw_items())
        if event is h11.NEED_DATA or (event is None and len(buffered) < 4):
            return None  # timed out before a full head: nothing worth answering
        self.handed_over += 1
        await self.api.handle(stream, bytes(buffered))
        return None

    async def _respond_error(
        self, stream: trio.SocketStream, status: int, code: str, message: str, extra: list[str] | None = None
    ) -> None:
        cid = uuid.uuid4().hex
        body = error_body(status, code, message, cid)
        lines = [
            f"HTTP/1.1 {status} {_reason(status)}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            f"X-Correlation-Id: {cid}",
            "Connection: close",
            *(extra or []),
        ]
        logger.info("stream request refused: %s %s (%s) correlation_id=%s", status, code, message, cid)
        with trio.move_on_after(5):
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    async def _open_stream(
        self, stream: trio.SocketStream, name: str, query: str, headers: list[tuple[bytes, bytes]]
    ) -> _Opened | None:
        """Authenticate and open the stream (its head and first frames queued), or answer why not."""
        if not self.accepting:
            await self._respond_error(
                stream, 503, "shutting_down", "the gateway is shutting down", ["Retry-After: 5"]
            )
            return None
        params = urllib.parse.parse_qs(query, keep_blank_values=False)
        presented = presented_from_headers(headers, source_ip=_peer_ip(stream))
        try:
            principal = await self.authenticate(presented)
        except AuthError as exc:
            status, code, message, hdrs = auth_error_parts(exc)
            await self._respond_error(stream, status, code, message, [f"{k}: {v}" for k, v in hdrs.items()])
            return None
        cursor = None
        for k, v in headers:
            if k.lower() == b"last-event-id" and v:
                cursor = v.decode("latin-1")
        cursor = cursor or _one(params, "last_event_id") or _one(params, "cursor")
        try:
            sub = self.streams.open(
                principal,
                name,
                tenant=_one(params, "tenant_id"),
                cursor=cursor,
                fd=stream.socket.fileno(),
                head=SSE_HEAD,
            )
        except StreamError as exc:
            extra = ["Retry-After: 5"] if exc.status == 429 else []
            await self._respond_error(stream, exc.status, exc.code, exc.message, extra)
            return None
        logger.debug("stream %s opened for %s", sub, principal.subject)
        return sub, presented, principal

    async def _run_stream(
        self, stream: trio.SocketStream, sub: Subscriber, presented: Presented, principal: Principal
    ) -> None:
        # The credential is rechecked while the stream runs: revoked -> "revoked" event, end.
        self.rechecks.watch(sub, presented, principal)
        try:
            await run_socket_writer(sub, stream)
        finally:
            self.rechecks.unwatch(sub)


def _peer_ip(stream: trio.SocketStream) -> str | None:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return None


def _credential_revoked(sub: Any, reason: str) -> None:
    sub.push(StreamService.revoked_frame(f"credential no longer valid ({reason})"))
    sub.finish("revoked")


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[0] if values else None
