"""The Quart-Trio application: the HTTP API (everything but the native stream path).

``create_app(gateway)`` takes the running services; it starts none of its own (STYLE.md rule 6).
Every error leaves as ``{"error": {"code", "message", "correlation_id"}}`` with the matching status;
details and stack traces go to the log under the same correlation id, never to the client.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from gatewayd.errors import AuthError
from gatewayd.http.autherrors import auth_error_parts
from gatewayd.http.front import SSE_HEAD
from gatewayd.http.tokenroutes import register_token_routes
from gatewayd.proto.tokens import Principal
from gatewayd.services.auth import Presented, presented_from_headers
from gatewayd.services.hub import iter_subscriber
from gatewayd.services.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gatewayd.services.streams import StreamError
from gatewayd.services.supervisor import UpstreamState
from gatewayd.services.writes import WriteError

if TYPE_CHECKING:
    from gatewayd.main import Gateway

logger = logging.getLogger(__name__)
_json = msgspec.json.Encoder()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    cid = uuid.uuid4().hex
    body = _json.encode({"error": {"code": code, "message": message, "correlation_id": cid}})
    resp = Response(body, status=status, content_type="application/json")
    resp.headers["X-Correlation-Id"] = cid
    resp.headers["Cache-Control"] = "no-store"
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    logger.info(
        "%s %s -> %s %s: %s (correlation_id=%s)", request.method, request.path, status, code, message, cid
    )
    return resp


def _json_response(doc: Any, status: int = 200) -> Response:
    resp = Response(_json.encode(doc), status=status, content_type="application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def create_app(gateway: Gateway) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = gateway.config.http.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None

    async def authenticated(*, allow_cookie: bool) -> tuple[Presented, Principal]:
        # Credentials come from headers only (never the query string or the body).
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        presented = presented_from_headers(headers, source_ip=request.remote_addr, allow_cookie=allow_cookie)
        try:
            return presented, await gateway.authenticate_request(presented)
        except AuthError as exc:
            status, code, message, hdrs = auth_error_parts(exc)
            raise ApiError(status, code, message, hdrs) from None

    async def principal(*, allow_cookie: bool) -> Principal:
        return (await authenticated(allow_cookie=allow_cookie))[1]

    register_token_routes(app, gateway, principal)

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return _error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(StreamError)
    async def _stream_error(exc: StreamError) -> Response:
        return _error_response(
            exc.status, exc.code, exc.message, {"Retry-After": "5"} if exc.status == 429 else None
        )

    @app.errorhandler(404)
    async def _not_found(_exc: Exception) -> Response:
        return _error_response(404, "not_found", "no such endpoint")

    @app.errorhandler(405)
    async def _not_allowed(_exc: Exception) -> Response:
        return _error_response(405, "method_not_allowed", "method not allowed on this endpoint")

    @app.errorhandler(413)
    async def _too_large(_exc: Exception) -> Response:
        return _error_response(
            413, "body_too_large", f"request body exceeds {gateway.config.http.max_body_bytes} bytes"
        )

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        cid = uuid.uuid4().hex
        try:
            where = f"{request.method} {request.path}"
        except RuntimeError:  # not an HTTP request (e.g. a WebSocket scope): no request context
            where = "a non-HTTP request"
        logger.error("unexpected error on %s (correlation_id=%s): %r", where, cid, exc, exc_info=exc)
        body = _json.encode(
            {"error": {"code": "internal_error", "message": "internal error", "correlation_id": cid}}
        )
        resp = Response(body, status=500, content_type="application/json")
        resp.headers["X-Correlation-Id"] = cid
        return resp

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        sup = gateway.supervisor
        sets = dict(sup.query_set_status)
        ready = sup.state is UpstreamState.LIVE and all(v == "applied" for v in sets.values())
        doc: dict[str, Any] = {
            "ready": ready, "upstream": sup.state.value, "query_sets": sets, "last_error": sup.last_error
        }  # fmt: skip
        if gateway.canary is not None:  # connected and subscribed is not enough: updates must flow
            status = gateway.canary.status()
            doc["canary"] = dataclasses.asdict(status)
            doc["ready"] = ready = ready and status.advancing
        return _json_response(doc, 200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        resp = Response(gateway.metrics.render(gateway), content_type=METRICS_CONTENT_TYPE)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/v1/streams/<name>/snapshot")
    async def snapshot(name: str) -> Response:
        p = await principal(allow_cookie=True)
        try:
            limit = int(request.args.get("limit", "1000"))
        except ValueError:
            raise ApiError(400, "invalid_limit", "limit must be an integer") from None
        page = gateway.streams.snapshot_page(
            p, name, tenant=request.args.get("tenant_id"), limit=limit, page=request.args.get("page")
        )
        return _json_response(page)

    @app.get("/v1/streams/<name>")
    async def stream_fallback(name: str) -> Response:
        # Reached only on a kept-alive connection already owned by hypercorn (see http/front.py).
        presented, p = await authenticated(allow_cookie=True)
        cursor = (
            request.headers.get("Last-Event-ID")
            or request.args.get("last_event_id")
            or request.args.get("cursor")
        )
        sub = gateway.streams.open(p, name, tenant=request.args.get("tenant_id"), cursor=cursor, fd=None)
        # The same credential rechecks as native streams: a revoked or expired credential ends it.
        rechecks = gateway.front.rechecks if gateway.front is not None else None
        if rechecks is not None:
            rechecks.watch(sub, presented, p)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in iter_subscriber(sub):
                    yield chunk
            finally:
                if rechecks is not None:
                    rechecks.unwatch(sub)

        head_lines = SSE_HEAD.split(b"\r\n")[1:-2]
        resp = Response(body(), status=200)
        for line in head_lines:
            k, _, v = line.decode().partition(": ")
            if k.lower() != "connection":
                resp.headers[k] = v
        resp.timeout = None  # Quart would cut a streamed response after 60 s otherwise
        return resp

    @app.post("/v1/reducers/<name>")
    async def call_reducer(name: str) -> Response:
        p = await principal(allow_cookie=False)  # no cookies on writes: no CSRF surface
        writes = gateway.writes
        assert writes is not None
        raw = await request.get_data(cache=False)
        try:
            args = msgspec.json.decode(raw) if raw else {}
        except RecursionError:
            raise ApiError(400, "invalid_json", "body nests too deeply") from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, "invalid_json", f"body is not JSON: {exc}") from None
        try:
            result = await writes.call(
                p,
                name,
                args,
                idempotency_key=request.headers.get("Idempotency-Key"),
                tenant=request.args.get("tenant_id"),
            )
        except WriteError as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.headers) from None
        if "error" in result.body:
            err = result.body["error"]
            resp = _error_response(result.status, err["code"], err["message"])
        else:
            resp = _json_response(result.body, result.status)
        if result.replayed:
            resp.headers["Idempotent-Replayed"] = "true"
        return resp

    # The demo routes exist only while gateway.demo_page is set; it is read per request, since
    # `gatewayd demo` may set it after this app was built.
    @app.get("/")
    async def demo_page() -> Response:
        if not gateway.demo_page:
            raise ApiError(404, "not_found", "no such endpoint")
        html = resources.files("gatewayd.http").joinpath("demo.html").read_bytes()
        resp = Response(html, content_type="text/html; charset=utf-8")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/demo/token")
    async def demo_token() -> Response:
        if not gateway.demo_page:
            raise ApiError(404, "not_found", "no such endpoint")
        return _json_response(gateway.demo_login())

    return app
