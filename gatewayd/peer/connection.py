"""One client WebSocket connection to the peer, after the 101 (trio + wsproto).

Theory of operation
-------------------
The upgrade has been answered; the connection owns the byte stream and a ``wsproto`` frame
machine, and runs four tasks in its own nursery:

``reader``
    Receives bytes, feeds wsproto, answers Pings, records Pongs, reassembles binary messages
    (refusing text frames and messages over ``max_message_bytes``), decodes each payload into
    client messages (v3: several per payload) and queues them for the handler. Any frame
    resets the idle timer. Upstream's incoming queue (16384 messages, overflow -> close 1013) is
    reproduced with a bounded channel and ``send_nowait``.
``handler``
    Processes client messages strictly in order against the database. Everything it calls is
    synchronous (one consistent state per message), except the optional injected reducer delay.
``writer``
    Takes server messages from the bounded outgoing queue in order; for v3 it coalesces what is
    queued (up to ``v3_max_payload_bytes`` uncompressed per payload, a bigger message alone),
    applies the compression envelope, fragments into ``fragment_bytes`` frames and sends.
``keepalive``
    Pings every ``ping_interval_s`` unless the previous Ping is unanswered, and drops the
    connection (no close frame, as upstream) after ``idle_timeout_s`` with nothing received.

Ways to end (each ends the nursery; cleanup detaches from the database and runs
``client_disconnected``):

* error close (``close(1011, reason)``): a close frame, then wait up to ``close_timeout_s`` for the
  client's close frame, then close the socket;
* abrupt (``abort()``): no close frame, just close the socket (optionally with an RST);
* the client closes: its close frame is answered and the socket closed.

All writes to the socket go through one ``StrictFIFOLock``; each WebSocket message is encoded whole
(all its fragments) before it takes the lock, so control frames can only fall between messages.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import trio
from wsproto.connection import Connection as WsProto
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WsLocalError

from gatewayd.errors import DecodeError
from gatewayd.peer.auth import Claims
from gatewayd.peer.database import Caller, DuplicateQuerySet, PeerDatabase, now_micros
from gatewayd.peer.sql import Query
from gatewayd.proto import messages as m
from gatewayd.proto.bsatn import Reader

if TYPE_CHECKING:
    from gatewayd.peer.peer import Peer, PeerSettings

logger = logging.getLogger(__name__)

RECV_BYTES: Final = 64 * 1024
MuteMode = Literal["drop", "hold", "delay"]


@dataclass(frozen=True, slots=True)
class _CloseRequest:
    """Queued after the valid messages of a payload whose tail failed to decode."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class _Flush:
    """Put in the outgoing queue; the writer sets ``done`` once everything before it is sent."""

    done: trio.Event


@dataclass(frozen=True, slots=True)
class Mute:
    """How TransactionUpdates are withheld: dropped, held until unmuted, or delayed."""

    mode: MuteMode
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A read-only view of a live connection (``Peer.connections``)."""

    id: int
    database: str
    identity: str
    connection_id: str
    protocol: str
    compression: str
    query_set_ids: tuple[int, ...]
    claims: dict[str, object]


class WsConnection:
    """A live client connection (implements :class:`gatewayd.peer.database.Subscriber`)."""

    def __init__(
        self,
        *,
        peer: Peer,
        conn_id: int,
        stream: trio.abc.Stream,
        ws: WsProto,
        db: PeerDatabase,
        protocol: m.Protocol,
        compression: m.Compression,
        claims: Claims,
        connection_id: str,
    ) -> None:
        self.peer = peer
        self.settings: PeerSettings = peer.settings
        self.id = conn_id
        self.stream = stream
        self.ws = ws
        self.db = db
        self.protocol = protocol
        self.compression = compression
        self.claims = claims
        self.identity = claims.identity
        self.connection_id = connection_id
        self.query_sets: dict[int, list[Query]] = {}
        # Outgoing messages in commit order. Bounded like upstream's client channel: a client
        # that cannot keep up is dropped (deliver() never blocks the committing task).
        self._out_send, self._out_recv = trio.open_memory_channel[m.ServerMessage | _Flush](
            self.settings.outgoing_queue_count
        )
        # Upstream queues at most 16384 incoming messages and closes with 1013 beyond that.
        self._in_send, self._in_recv = trio.open_memory_channel[m.ClientMessage | _CloseRequest](
            self.settings.incoming_queue_count
        )
        # Delayed TransactionUpdates (mute mode "delay"): as many as the outgoing queue holds.
        self._delay_send, self._delay_recv = trio.open_memory_channel[tuple[float, m.ServerMessage]](
            self.settings.outgoing_queue_count
        )
        self._send_lock = trio.StrictFIFOLock()
        self._scope = trio.CancelScope()
        self._recv_scope: trio.CancelScope | None = None
        self._stalled = False
        self._resume = trio.Event()
        self._resume.set()
        self._ponged = True
        self._last_received = trio.current_time()
        self._closing = False
        self._peer_closed = trio.Event()  # the client's close frame (or EOF) after ours
        self._reset_on_close = False
        self._message_buf = bytearray()
        self.mute: Mute | None = None
        self._held: list[m.ServerMessage] = []
        self._paused: list[tuple[m.ServerMessage, bool]] | None = None
        self.close_reason = ""
        self.messages_sent = 0
        self.updates_dropped = 0

    def __repr__(self) -> str:
        return f"<WsConnection #{self.id} {self.identity[:12]}… {self.protocol.value}>"

    def info(self) -> ConnectionInfo:
        return ConnectionInfo(
            id=self.id,
            database=self.db.name,
            identity=self.identity,
            connection_id=self.connection_id,
            protocol=self.protocol.value,
            compression=self.compression.query_value,
            query_set_ids=tuple(self.query_sets),
            claims=dict(self.claims.payload),
        )

    @property
    def caller(self) -> Caller:
        return Caller(self.identity, self.connection_id, self.claims.payload)

    # --- the Subscriber side (called synchronously by the database) ----------------------------

    def deliver(self, msg: m.ServerMessage, *, transaction_update: bool = False) -> None:
        """Queue a server message without blocking; a full queue drops the connection."""
        if self._paused is not None:
            self._paused.append((msg, transaction_update))
            return
        if transaction_update:
            mute = self.mute or self.peer.faults.mute
            if mute is not None:
                if mute.mode == "drop":
                    self.updates_dropped += 1
                    return
                if mute.mode == "hold":
                    if len(self._held) >= self.settings.outgoing_queue_count:
                        self.abort("too many held TransactionUpdates")
                        return
                    self._held.append(msg)
                    return
                try:
                    self._delay_send.send_nowait((trio.current_time() + mute.delay_s, msg))
                except trio.WouldBlock:
                    self.abort("too many delayed TransactionUpdates")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                return
        self._enqueue(msg)

    def _enqueue(self, msg: m.ServerMessage | _Flush) -> None:
        try:
            self._out_send.send_nowait(msg)
        except trio.WouldBlock:
            logger.warning("peer: connection #%d cannot keep up (outgoing queue full); dropping it", self.id)
            self.abort("outgoing queue full")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection is ending

    def release_held(self) -> None:
        """Deliver TransactionUpdates withheld by a ``hold`` mute, in order."""
        held, self._held = self._held, []
        for msg in held:
            self._enqueue(msg)

    # --- faults --------------------------------------------------------------------------------

    def abort(self, reason: str = "cut", *, reset: bool = False) -> None:
        """End the connection abruptly: no close frame (``reset`` sends a TCP RST)."""
        if not self.close_reason:
            self.close_reason = reason
        self._reset_on_close = self._reset_on_close or reset
        self._scope.cancel()

    def stall(self) -> None:
        """Stop reading, writing and pinging; the socket stays open and silent."""
        if not self._stalled:
            self._stalled = True
            self._resume = trio.Event()
            if self._recv_scope is not None:
                self._recv_scope.cancel()

    def unstall(self) -> None:
        if self._stalled:
            self._stalled = False
            self._last_received = trio.current_time()
            self._resume.set()

    async def _wait_unstalled(self) -> None:
        while self._stalled:
            await self._resume.wait()

    # --- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends.

        Cancellation: cancelling the caller ends the connection abruptly (no close frame).
        Resource handling: closes the stream; detaching from the database is the caller's job.
        """
        try:
            with self._scope:
                # Sent before any task starts, so it is always the first message (§5.1).
                first = m.InitialConnection(self.identity, self.connection_id, self.claims.token)
                await self._send_payload(m.encode_server_message(first), 1)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        self._reader_task, nursery.cancel_scope, name=f"peer-ws#{self.id}-reader"
                    )
                    nursery.start_soon(self._handler_task, name=f"peer-ws#{self.id}-handler")
                    nursery.start_soon(self._writer_task, name=f"peer-ws#{self.id}-writer")
                    nursery.start_soon(self._keepalive_task, name=f"peer-ws#{self.id}-keepalive")
                    nursery.start_soon(self._delay_task, name=f"peer-ws#{self.id}-delay")
        finally:
            for ch in (self._out_send, self._in_send, self._delay_send):
                ch.close()
            await self._close_stream()

    async def _close_stream(self) -> None:
        if self._reset_on_close:
            sock = getattr(self.stream, "socket", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with (
            trio.CancelScope(shield=True),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await trio.aclose_forcefully(self.stream)

    # --- sending -------------------------------------------------------------------------------

    async def _send_raw(self, data: bytes) -> None:
        """Write bytes; a dead socket ends the connection (the caller is then cancelled)."""
        if not data:
            return
        try:
            async with self._send_lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.close_reason = self.close_reason or f"socket error: {exc!r}"
            self._peer_closed.set()
            self._scope.cancel()
            await trio.lowlevel.checkpoint()

    def _frames(self, payload: bytes) -> bytes:
        """One binary message, fragmented like upstream (``fragment_bytes`` per frame)."""
        size = self.settings.fragment_bytes
        if len(payload) <= size:
            return self.ws.send(Message(data=payload))
        out = bytearray()
        for start in range(0, len(payload), size):
            chunk = payload[start : start + size]
            out += self.ws.send(Message(data=chunk, message_finished=start + size >= len(payload)))
        return bytes(out)

    async def close(self, code: int, reason: str, *, from_reader: bool = False) -> None:
        """Send a close frame, wait up to ``close_timeout_s`` for the client's, then end.

        Only the reader task receives from the stream: called from it (``from_reader``), the
        wait reads inline; from any other task, it waits for the reader to see the reply.
        """
        if self._closing:
            return
        self._closing = True
        self.close_reason = f"{code} {reason}"
        logger.info("peer: closing connection #%d with %d: %s", self.id, code, reason)
        if not from_reader:
            # Messages already produced (results of earlier requests) go out first.
            flushed = trio.Event()
            self._enqueue(_Flush(flushed))
            with trio.move_on_after(self.settings.close_timeout_s):
                await flushed.wait()
        try:
            frame = self.ws.send(CloseConnection(code=code, reason=_truncate_reason(reason)))
        except WsLocalError:
            frame = b""
        try:
            with trio.move_on_after(self.settings.close_timeout_s):
                await self._send_raw(frame)
                if from_reader:
                    while self.ws.state is not ConnectionState.CLOSED:
                        chunk = await self.stream.receive_some(RECV_BYTES)
                        if not chunk:
                            break
                        self.ws.receive_data(bytes(chunk))
                        for _ in self.ws.events():
                            pass
                else:
                    await self._peer_closed.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        self._scope.cancel()

    # --- tasks ---------------------------------------------------------------------------------

    async def _reader_task(self, nursery_scope: trio.CancelScope) -> None:
        try:
            while True:
                await self._wait_unstalled()
                data: bytes | bytearray | None = None
                with trio.CancelScope() as self._recv_scope:
                    data = await self.stream.receive_some(RECV_BYTES)
                self._recv_scope = None
                if data is None:
                    continue  # the receive was cancelled by stall()
                self.ws.receive_data(bytes(data) if data else None)
                for event in self.ws.events():
                    self._last_received = trio.current_time()
                    if not await self._on_event(event):
                        return
                if not data:
                    self._peer_closed.set()
                    self.close_reason = self.close_reason or "client closed the TCP connection"
                    nursery_scope.cancel()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.close_reason = self.close_reason or f"socket error: {exc!r}"
            nursery_scope.cancel()

    async def _on_event(self, event: object) -> bool:
        """Handle one wsproto event; False when the connection is ending."""
        if isinstance(event, Ping):
            await self._send_raw(self.ws.send(event.response()))
        elif isinstance(event, Pong):
            self._ponged = True
        elif isinstance(event, CloseConnection):
            if self._closing:
                self._peer_closed.set()  # the reply to our close frame
                return False
            self.close_reason = self.close_reason or f"client closed with {event.code} {event.reason}"
            with contextlib.suppress(WsLocalError):
                await self._send_raw(self.ws.send(event.response()))
            self._scope.cancel()
            return False
        elif isinstance(event, TextMessage):
            # An error in its turn: earlier binary messages are handled first (as upstream).
            try:
                self._in_send.send_nowait(_CloseRequest(1011, "v2 websocket does not support text messages"))
            except trio.WouldBlock:
                await self.close(1013, "too many requests", from_reader=True)
                return False
        elif isinstance(event, BytesMessage):
            self._message_buf += event.data
            if len(self._message_buf) > self.settings.max_message_bytes:
                await self.close(
                    1009,
                    f"Space limit exceeded: Message too long: > {self.settings.max_message_bytes}",
                    from_reader=True,
                )
                return False
            if event.message_finished:
                payload = bytes(self._message_buf)
                self._message_buf.clear()
                return await self._on_payload(payload)
        return True

    async def _on_payload(self, payload: bytes) -> bool:
        msgs: list[m.ClientMessage | _CloseRequest] = []
        if not payload:
            msgs.append(_CloseRequest(1011, "empty payload: expected at least one client message"))
        else:
            r = Reader(payload)
            try:
                msgs.append(m.decode_client_message(r))
                while self.protocol is m.Protocol.V3 and r.remaining():
                    msgs.append(m.decode_client_message(r))
            except DecodeError as exc:
                msgs.append(_CloseRequest(1011, f"failed to decode client message: {exc}"))
        for msg in msgs:
            try:
                self._in_send.send_nowait(msg)
            except trio.WouldBlock:
                await self.close(1013, "too many requests", from_reader=True)
                return False
        return True  # keep reading even after a bad payload: the close reply must be seen

    async def _handler_task(self) -> None:
        async for msg in self._in_recv:
            if isinstance(msg, _CloseRequest):
                await self.close(msg.code, msg.reason)
                return
            try:
                await self._handle(msg)
            except DuplicateQuerySet as exc:
                await self.close(1011, str(exc))
                return

    async def _handle(self, msg: m.ClientMessage) -> None:
        db = self.db
        if isinstance(msg, m.Subscribe):
            db.subscribe(self, msg.request_id, msg.query_set_id, msg.query_strings)
        elif isinstance(msg, m.Unsubscribe):
            db.unsubscribe(self, msg.request_id, msg.query_set_id, msg.send_dropped_rows)
        elif isinstance(msg, m.OneOffQuery):
            db.one_off(self, msg.request_id, msg.query_string)
        elif isinstance(msg, m.CallReducer):
            delay = self.peer.faults.reducer_delays.get(msg.reducer)
            if delay is not None and delay.when == "before":
                await trio.sleep(delay.delay_s)
            if delay is not None and delay.when == "after":
                # Commit now, deliver the result (and everything after it, to keep commit
                # order on this connection) once the delay has passed.
                self._paused = []
                try:
                    db.call_reducer(
                        msg.reducer, msg.args, self.caller, subscriber=self, request_id=msg.request_id
                    )
                    await trio.sleep(delay.delay_s)
                finally:
                    paused, self._paused = self._paused, None
                for held_msg, is_tx in paused or ():
                    self.deliver(held_msg, transaction_update=is_tx)
            else:
                db.call_reducer(
                    msg.reducer, msg.args, self.caller, subscriber=self, request_id=msg.request_id
                )
        else:
            self.deliver(
                m.ProcedureResult(
                    m.ProcedureInternalError(f"No such procedure `{msg.procedure}`"),
                    now_micros(),
                    0,
                    msg.request_id,
                )
            )

    async def _writer_task(self) -> None:
        limit = self.settings.v3_max_payload_bytes
        async for first in self._out_recv:
            await self._wait_unstalled()
            if isinstance(first, _Flush):
                first.done.set()
                continue
            bodies = [m.encode_server_message(first)]
            size = len(bodies[0])
            flush: _Flush | None = None
            if self.protocol is m.Protocol.V3:
                while size < limit:
                    try:
                        nxt = self._out_recv.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if isinstance(nxt, _Flush):
                        flush = nxt
                        break
                    body = m.encode_server_message(nxt)
                    if size + len(body) > limit:
                        await self._send_payload(b"".join(bodies), len(bodies))
                        bodies, size = [], 0
                    bodies.append(body)
                    size += len(body)
            if bodies:
                await self._send_payload(b"".join(bodies), len(bodies))
            if flush is not None:
                flush.done.set()

    async def _send_payload(self, body: bytes, count: int) -> None:
        payload = m.wrap_server_body(body, self.compression)
        try:
            data = self._frames(payload)
        except WsLocalError:
            return  # a close frame went out already
        await self._send_raw(data)
        self.messages_sent += count

    async def _keepalive_task(self) -> None:
        interval = self.settings.ping_interval_s
        idle = self.settings.idle_timeout_s
        next_ping = trio.current_time() + interval
        while True:
            deadline = min(next_ping, self._last_received + idle)
            await trio.sleep_until(deadline)
            if self._stalled:
                await self._wait_unstalled()
                next_ping = trio.current_time() + interval
                continue
            now = trio.current_time()
            if now >= self._last_received + idle:
                logger.info("peer: connection #%d idle for %.1f s; dropping it", self.id, idle)
                self.abort("idle timeout")
                return
            if now >= next_ping:
                next_ping = now + interval
                if self._ponged and not self._closing:
                    self._ponged = False
                    try:
                        await self._send_raw(self.ws.send(Ping(payload=secrets.token_bytes(4))))
                    except WsLocalError:
                        return

    async def _delay_task(self) -> None:
        async for release_at, msg in self._delay_recv:
            await trio.sleep_until(release_at)
            self._enqueue(msg)


def _truncate_reason(reason: str) -> str:
    """Close reasons are at most 123 bytes of UTF-8 (RFC 6455 §5.5)."""
    b = reason.encode()
    if len(b) <= 123:
        return reason
    return b[:120].decode("utf-8", "ignore") + "..."


def pick_connections(
    conns: list[WsConnection], which: int | str | ConnectionInfo | WsConnection | None
) -> list[WsConnection]:
    """Select connections by id, identity hex, ConnectionInfo, or all (None)."""
    if which is None:
        return list(conns)
    match: Callable[[WsConnection], bool]
    if isinstance(which, WsConnection):
        return [which] if which in conns else []
    if isinstance(which, ConnectionInfo):
        target = which.id
        match = lambda c: c.id == target  # noqa: E731
    elif isinstance(which, int):
        match = lambda c: c.id == which  # noqa: E731
    else:
        ident = which.lower()
        match = lambda c: c.identity == ident or c.connection_id == ident  # noqa: E731
    return [c for c in conns if match(c)]
