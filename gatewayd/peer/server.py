"""The peer's HTTP/1.1 front (h11 over a raw trio stream) and the WebSocket upgrade.

Why not an ASGI server: the peer must control everything a real SpacetimeDB does on the wire,
including what our client has to survive: the exact status before an upgrade, the ``101`` headers
(``spacetime-identity``, ``spacetime-identity-token``, the chosen ``Sec-WebSocket-Protocol``), a
``101`` followed by a dropped socket (``client_connected`` refusal), handshakes that never get an
answer, TCP connections cut without a close frame. h11 parses requests, the 101 is written by hand,
and the socket is then handed to wsproto (:mod:`gatewayd.peer.connection`).

Routes (PROTOCOL.md §2): ``GET /v1/ping``; ``POST /v1/identity``;
``POST /v1/identity/websocket-token``; ``GET /v1/identity/public-key``;
``GET /v1/identity/{identity}/verify``; and, behind the anonymous-auth middleware (a token is
validated, or an identity minted, and the ``spacetime-identity*`` headers are added),
``GET /v1/database/{db}`` (info), ``GET …/identity``, ``GET …/subscribe`` (upgrade),
``GET …/schema?version=9``, ``POST …/sql``, ``POST …/call/{reducer}``. CORS as upstream.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http
import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio
from wsproto.connection import Connection as WsProto
from wsproto.connection import ConnectionType

from gatewayd.peer.auth import Claims, TokenRejected
from gatewayd.peer.connection import WsConnection
from gatewayd.peer.database import Caller, PeerDatabase
from gatewayd.peer.sql import SqlError
from gatewayd.proto import messages as m

if TYPE_CHECKING:
    from gatewayd.peer.peer import Peer

logger = logging.getLogger(__name__)

RECV_BYTES: Final = 64 * 1024
MAX_HEADER_BYTES: Final = 64 * 1024  # h11's limit on an incomplete request head
WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_COMPRESSIONS: Final = {
    "None": m.Compression.NONE,
    "Brotli": m.Compression.BROTLI,
    "Gzip": m.Compression.GZIP,
}
_HEX_RE: Final = re.compile(r"[0-9a-fA-F]+")
_REASONS: Final = {530: b"Reducer Failed"}
_CORS: Final = [(b"access-control-allow-origin", b"*"), (b"vary", b"origin")]


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = "text/plain; charset=utf-8"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())

    @classmethod
    def json(cls, status: int, value: Any) -> Response:
        return cls(status, json.dumps(value).encode(), "application/json")


class _Closed(Exception):
    """The client went away mid-request."""


class HttpFront:
    """Serves one TCP (or in-memory) stream: HTTP/1.1 requests, possibly a WebSocket upgrade."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.settings = peer.settings

    # --- plumbing ------------------------------------------------------------------------------

    async def serve_stream(self, stream: trio.abc.Stream, conn_no: int) -> None:
        """Serve requests on ``stream`` until it closes, then close it.

        Cancellation: cancelling ends the connection abruptly (no response, no close frame).
        """
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while True:
                with trio.move_on_after(self.settings.http_keepalive_s) as idle:
                    req_ev = await self._next(h, stream)
                if idle.cancelled_caught or not isinstance(req_ev, h11.Request):
                    return
                try:
                    req = await self._read_request(h, stream, req_ev)
                except _TooLarge:
                    await self._send(h, stream, Response.text(413, "request body too large"), close=True)
                    return
                if req.method == "GET" and _is_upgrade(req):
                    await self._upgrade(h, stream, req, conn_no)
                    return
                resp = await self._route(req)
                await self._send(h, stream, resp)
                if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                    return
                try:
                    h.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except h11.RemoteProtocolError as exc:
            if h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                with contextlib.suppress(_Closed, h11.LocalProtocolError):
                    await self._send(h, stream, Response.text(exc.error_status_hint, str(exc)), close=True)
        except _Closed:
            pass
        finally:
            with (
                trio.CancelScope(shield=True),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await trio.aclose_forcefully(stream)

    async def _next(self, h: h11.Connection, stream: trio.abc.Stream) -> Any:
        while True:
            ev = h.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            try:
                data = await stream.receive_some(RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise _Closed from None
            h.receive_data(bytes(data))

    async def _read_request(self, h: h11.Connection, stream: trio.abc.Stream, ev: h11.Request) -> Request:
        target = ev.target.decode("latin-1")
        parts = urlsplit(target)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        headers: dict[str, str] = {}
        for k, v in ev.headers:
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        body = bytearray()
        while True:
            nxt = await self._next(h, stream)
            if isinstance(nxt, h11.Data):
                body += nxt.data
                if len(body) > self.settings.max_http_body_bytes:
                    raise _TooLarge
            elif isinstance(nxt, h11.EndOfMessage) or nxt is h11.PAUSED:
                break
            elif isinstance(nxt, h11.ConnectionClosed):
                raise _Closed
        return Request(ev.method.decode("ascii").upper(), unquote(parts.path), query, headers, bytes(body))

    async def _send(
        self, h: h11.Connection, stream: trio.abc.Stream, resp: Response, *, close: bool = False
    ) -> None:
        headers = list(_CORS)
        if resp.content_type is not None:
            headers.append((b"content-type", resp.content_type.encode()))
        headers += resp.headers
        headers.append((b"content-length", str(len(resp.body)).encode()))
        if close:
            headers.append((b"connection", b"close"))
        reason = _REASONS.get(resp.status) or _phrase(resp.status)
        data = h.send(h11.Response(status_code=resp.status, headers=headers, reason=reason))
        data += h.send(h11.Data(data=resp.body)) if resp.body else b""
        data += h.send(h11.EndOfMessage())
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise _Closed from None

    # --- auth middleware -----------------------------------------------------------------------

    async def _presented(self, req: Request) -> Claims | None:
        """Validate a presented token (Bearer header wins over ``?token=``); None when absent."""
        token: str | None = None
        authz = req.header("authorization")
        if authz is not None:
            scheme, _, cred = authz.strip().partition(" ")
            if scheme.lower() != "bearer" or not cred.strip():
                raise TokenRejected("Authorization is invalid: malformed token", status=400)
            token = cred.strip()
        elif "token" in req.query:
            token = req.query["token"]
        if token is None:
            return None
        if self.peer.faults.refuse_tokens:
            raise TokenRejected("Authorization failed: token refused (dev peer fault injection)")
        return await self.peer.auth.validate(token)

    async def _auth_or_mint(self, req: Request) -> Claims:
        claims = await self._presented(req)
        return claims if claims is not None else self.peer.auth.anonymous()

    @staticmethod
    def _identity_headers(claims: Claims) -> list[tuple[bytes, bytes]]:
        return [
            (b"spacetime-identity", claims.identity.encode()),
            (b"spacetime-identity-token", claims.token.encode()),
        ]

    # --- routing -------------------------------------------------------------------------------

    async def _route(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        segs = [s for s in path.split("/") if s]
        if req.method == "OPTIONS":
            return Response(
                200,
                b"",
                None,
                [
                    (b"access-control-allow-methods", b"*"),
                    (b"access-control-allow-headers", b"authorization,accept,content-type"),
                ],
            )
        try:
            if segs[:1] != ["v1"]:
                return Response.text(404, "Not Found")
            rest = segs[1:]
            if rest == ["ping"] and req.method in ("GET", "HEAD"):
                return Response(200, b"", None)
            if rest[:1] == ["identity"]:
                return await self._identity_routes(req, rest[1:])
            if rest[:1] == ["database"] and len(rest) >= 2:
                return await self._database_routes(req, rest[1], rest[2:])
            return Response.text(404, "Not Found")
        except TokenRejected as exc:
            return Response.text(exc.status, exc.message)
        except Exception:
            # The per-request boundary: a bug answers 500 and is logged once; the peer goes on.
            logger.exception("peer: %s %s failed", req.method, req.path)
            return Response.text(500, "internal error in the dev peer (see its log)")

    async def _identity_routes(self, req: Request, rest: list[str]) -> Response:
        auth = self.peer.auth
        if rest == [] and req.method == "POST":
            ident, token = auth.mint_anonymous()
            return Response.json(200, {"identity": ident, "token": token})
        if rest == ["websocket-token"] and req.method == "POST":
            claims = await self._presented(req)
            if claims is None:
                return Response.text(401, "Authorization required")
            return Response.json(200, {"token": auth.re_sign(claims)})
        if rest == ["public-key"] and req.method == "GET":
            return Response(200, auth.public_key_pem, "application/pem-certificate-chain")
        if len(rest) == 2 and rest[1] == "verify" and req.method == "GET":
            claims = await self._presented(req)
            if claims is None:
                return Response.text(401, "Authorization required")
            return Response(204 if claims.identity == rest[0].lower().removeprefix("0x") else 400, b"", None)
        return Response.text(404, "Not Found")

    def _database(self, name_or_identity: str) -> PeerDatabase | None:
        return self.peer.find_database(name_or_identity)

    async def _database_routes(self, req: Request, name: str, rest: list[str]) -> Response:
        claims = await self._auth_or_mint(req)
        resp = await self._database_route(req, claims, name, rest)
        resp.headers += self._identity_headers(claims)
        return resp

    async def _database_route(self, req: Request, claims: Claims, name: str, rest: list[str]) -> Response:
        db = self._database(name)
        if db is None:
            return Response.text(404, "No such database.")
        if rest == [] and req.method == "GET":
            return Response.json(
                200,
                {
                    "database_identity": db.identity,
                    "owner_identity": db.owner_identity,
                    "host_type": "dev-peer",
                    "names": [db.name],
                },
            )
        if rest == ["identity"] and req.method == "GET":
            return Response.text(200, db.identity)
        if rest == ["names"] and req.method == "GET":
            return Response.json(200, {"names": [db.name]})
        if rest == ["schema"] and req.method == "GET":
            version = req.query.get("version")
            if version is None:
                return Response.text(400, "Failed to deserialize query string: missing field `version`")
            if version != "9":
                return Response.text(
                    400, f"the dev peer serves schema version 9 only (asked for {version!r})"
                )
            return Response.json(200, db.schema.to_json())
        if rest == ["sql"] and req.method == "POST":
            return self._sql(req, claims, db)
        if len(rest) == 2 and rest[0] == "call" and req.method == "POST":
            return self._call(req, claims, db, rest[1])
        if rest == ["subscribe"]:
            return Response.text(400, "Connection header did not include 'upgrade'")
        return Response.text(404, "Not Found")

    def _with_connection(self, db: PeerDatabase, claims: Claims) -> tuple[Caller, Response | None]:
        caller = Caller(claims.identity, _random_connection_id(), claims.payload)
        rejected = db.connect(caller)
        if rejected is not None:
            return caller, Response.text(403, rejected)
        return caller, None

    def _sql(self, req: Request, claims: Claims, db: PeerDatabase) -> Response:
        try:
            text = req.body.decode("utf-8")
        except UnicodeDecodeError:
            return Response.text(400, "the SQL text is not UTF-8")
        caller, refused = self._with_connection(db, claims)
        if refused is not None:
            return refused
        try:
            result = db.sql(text, claims.identity)
        except SqlError as exc:
            return Response.text(400, str(exc))
        finally:
            db.disconnect(caller)
        resp = Response.json(200, result)
        total = sum(r["total_duration_micros"] for r in result)
        resp.headers.append((b"spacetime-execution-duration-micros", str(total).encode()))
        return resp

    def _call(self, req: Request, claims: Claims, db: PeerDatabase, reducer: str) -> Response:
        ctype = (req.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return Response.text(415, "Expected request with `Content-Type: application/json`")
        try:
            args = json.loads(req.body or b"[]")
        except ValueError as exc:
            return Response.text(400, f"invalid JSON body: {exc}")
        caller, refused = self._with_connection(db, claims)
        if refused is not None:
            return refused
        try:
            res = db.call_reducer(reducer, args, caller)
        finally:
            db.disconnect(caller)
        resp = Response.text(res.http_status, res.message)
        resp.headers += [(b"spacetime-energy-used", b"0"), (b"spacetime-execution-duration-micros", b"0")]
        return resp

    # --- the WebSocket upgrade -----------------------------------------------------------------

    async def _upgrade(self, h: h11.Connection, stream: trio.abc.Stream, req: Request, conn_no: int) -> None:
        peer = self.peer
        segs = [s for s in req.path.split("/") if s]
        if len(segs) != 4 or segs[:2] != ["v1", "database"] or segs[3] != "subscribe":
            await self._send(h, stream, await self._route(req), close=True)
            return
        released = peer.faults.handshakes_released
        if released is not None:
            logger.info("peer: stalling the handshake of connection %d", conn_no)
            await released.wait()
        refusal = peer.faults.upgrade_refusal()
        if refusal is not None:
            peer.stats_upgrades_refused += 1
            await self._send(h, stream, Response.text(refusal.status, refusal.message), close=True)
            return
        try:
            claims = await self._auth_or_mint(req)
        except TokenRejected as exc:
            await self._send(h, stream, Response.text(exc.status, exc.message), close=True)
            return
        resp, accepted = self._check_upgrade(req, segs[2])
        if resp is not None:
            resp.headers += self._identity_headers(claims)
            await self._send(h, stream, resp, close=True)
            return
        assert accepted is not None
        db, protocol, compression, connection_id = accepted
        key = req.header("sec-websocket-key") or ""
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest())
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", accept),
            (b"sec-websocket-protocol", protocol.value.encode()),
            *self._identity_headers(claims),
        ]
        try:
            await stream.send_all(h.send(h11.InformationalResponse(status_code=101, headers=headers)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        trailing, _closed = h.trailing_data
        caller = Caller(claims.identity, connection_id, claims.payload)
        rejected = db.connect(caller)
        if rejected is not None:
            # As upstream: the 101 went out, then the socket is dropped without InitialConnection.
            logger.info("peer: client_connected rejected %s: %s", claims.identity[:12], rejected)
            peer.stats_connections_rejected += 1
            return
        ws = WsProto(ConnectionType.SERVER, extensions=[], trailing_data=trailing)
        conn = WsConnection(
            peer=peer,
            conn_id=conn_no,
            stream=stream,
            ws=ws,
            db=db,
            protocol=protocol,
            compression=compression,
            claims=claims,
            connection_id=connection_id,
        )
        logger.info(
            "peer: connection #%d opened: db=%s identity=%s %s compression=%s",
            conn_no, db.name, claims.identity[:12], protocol.value, compression.query_value,
        )  # fmt: skip
        peer.register(conn)
        db.attach(conn)
        try:
            await conn.run()
        finally:
            db.detach(conn)
            peer.unregister(conn)
            db.disconnect(caller)
            logger.info("peer: connection #%d closed: %s", conn_no, conn.close_reason or "ended")

    def _check_upgrade(
        self, req: Request, name: str
    ) -> tuple[Response | None, tuple[PeerDatabase, m.Protocol, m.Compression, str] | None]:
        """Upstream's checks, in its order: connection_id, database, protocol."""
        raw_cid = req.query.get("connection_id")
        if raw_cid is not None:
            if len(raw_cid) != 32 or not _HEX_RE.fullmatch(raw_cid):
                return Response.text(400, "Failed to deserialize query string: invalid connection_id"), None
            if int(raw_cid, 16) == 0:
                return Response.text(
                    400, "Invalid connection ID: the all-zeros ConnectionId is reserved."
                ), None
        compression = _COMPRESSIONS.get(req.query.get("compression", "Brotli"))
        if compression is None:
            return Response.text(
                400, "Failed to deserialize query string: unknown variant for `compression`"
            ), None
        for flag in ("light", "confirmed"):
            if flag in req.query and req.query[flag] not in ("true", "false"):
                return Response.text(400, f"Failed to deserialize query string: invalid `{flag}`"), None
        if (req.header("sec-websocket-version") or "").strip() != "13" or not req.header("sec-websocket-key"):
            return Response.text(400, "not a valid WebSocket upgrade request"), None
        db = self._database(name)
        if db is None:
            return Response.text(404, "No such database."), None
        offered = {p.strip() for p in (req.header("sec-websocket-protocol") or "").split(",")}
        protocol = next((m.Protocol(p) for p in self.settings.protocols if p in offered), None)
        if protocol is None:
            return Response.text(400, "no valid protocol selected"), None
        return None, (db, protocol, compression, raw_cid.lower() if raw_cid else _random_connection_id())


class _TooLarge(Exception):
    pass


def _is_upgrade(req: Request) -> bool:
    upgrade = (req.header("upgrade") or "").lower()
    connection = (req.header("connection") or "").lower()
    return "websocket" in upgrade and "upgrade" in connection


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _random_connection_id() -> str:
    while True:
        cid = secrets.token_hex(16)
        if int(cid, 16):
            return cid
