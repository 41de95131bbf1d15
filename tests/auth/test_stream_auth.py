"""Streams authenticated by each verifier; a revoked session ends its open stream within the
recheck interval (auth.recheck_s = 0.5 s, session cache 0.2 s, here)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from gatewayd.proto.tokens import TokenInvalid

from .conftest import SESSION_COOKIE, AuthStack


class RawStream:
    """A raw HTTP/1.1 stream request over a trio socket (no client library buffering)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.data = b""

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1])

    async def until(self, needle: bytes, limit_s: float) -> bytes:
        with trio.fail_after(limit_s):
            while needle not in self.data:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    break
                self.data += chunk
        return self.data

    async def to_end(self, limit_s: float) -> bytes:
        with trio.fail_after(limit_s):
            while chunk := await self.stream.receive_some(65536):
                self.data += chunk
        return self.data


@asynccontextmanager
async def open_raw(
    stack: AuthStack, headers: dict[str, str], path: str = "/v1/streams/documents"
) -> AsyncIterator[RawStream]:
    host, _, port = stack.url.removeprefix("http://").partition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    raw = RawStream(stream)
    try:
        await raw.until(b"\r\n\r\n", 5)
        yield raw
    finally:
        await stream.aclose()


@pytest.mark.parametrize("how", ["bearer-jwt", "token-cookie", "session-cookie", "session-bearer", "api-key"])
async def test_stream_opens_with_each_credential(stack: AuthStack, how: str) -> None:
    stack.app.sessions["tok-s"] = ("u-5", "s-5", "acme")
    headers: dict[str, str] = {}
    if how == "bearer-jwt":
        headers["Authorization"] = f"Bearer {stack.jwt()}"
    elif how == "token-cookie":
        headers["Cookie"] = f"gatewayd_token={stack.jwt()}"
    elif how == "session-cookie":
        headers["Cookie"] = f"theme=dark; {SESSION_COOKIE}=tok-s"
    elif how == "session-bearer":
        headers["Authorization"] = "Bearer tok-s"
    else:
        svc = stack.gateway.authenticator.api_keys  # type: ignore[union-attr]
        assert svc is not None
        key, _ = svc.store.create(subject="robot:int-1", tenant_id="acme", scopes=["document.read"],
                                  expires_at=None)  # fmt: skip
        headers["X-API-Key"] = key
    async with open_raw(stack, headers) as r:
        assert r.status == 200, r.data
        assert b"text/event-stream" in r.data
        await r.until(b"retry:", 5)
    if how == "session-cookie":
        (req,) = [r for r in stack.stub.log if r.path == "/api/auth/get-session"]
        assert req.headers["cookie"] == f"{SESSION_COOKIE}=tok-s"  # only the session cookie travels
        assert "disableCookieCache=true" in req.target


async def test_revoked_session_ends_the_open_stream(stack: AuthStack) -> None:
    stack.app.sessions["tok-r"] = ("u-7", "s-7", "acme")
    headers = {"Cookie": f"{SESSION_COOKIE}=tok-r"}
    async with open_raw(stack, headers) as r:
        assert r.status == 200
        await r.until(b"retry:", 5)
        revoked_at = trio.current_time()
        del stack.app.sessions["tok-r"]
        rest = await r.until(b"event: revoked", 3)
        assert b"event: revoked" in rest
        await r.to_end(3)  # the stream then ends
        # recheck every 0.5 s + a 0.2 s cache: the stream ends well within a second or two.
        assert trio.current_time() - revoked_at < 2.0
    # ...and the next request is refused.
    resp2 = await stack.http.get("/v1/streams/documents/snapshot", headers=headers)
    assert resp2.status_code == 401 and resp2.json()["error"]["code"] == "invalid_session"


async def test_stream_refusals_carry_codes(stack: AuthStack) -> None:
    async with open_raw(stack, {}) as r:
        body = await r.to_end(3)
    assert r.status == 401
    assert b"missing_credentials" in body and b"correlation_id" in body
    assert b"WWW-Authenticate: Bearer\r\n" in body
    async with open_raw(stack, {"Authorization": f"Bearer {stack.jwt(aud='other')}"}) as r:
        body = await r.to_end(3)
    assert r.status == 401
    assert b'WWW-Authenticate: Bearer error="invalid_token"' in body and b"audience" in body


async def test_recheck_survives_unavailability_and_rate_limits() -> None:
    from gatewayd.proto.tokens import Principal, RateLimited
    from gatewayd.services.auth import recheck_credential
    from gatewayd.services.sessions import SessionsUnavailable

    p = Principal(subject="user:u-1", kind="human", tenant="acme", scopes=frozenset(), issuer="x")
    answers: list[BaseException | None] = [
        SessionsUnavailable("down"),
        RateLimited("slow", retry_after_s=3),
        None,
    ]
    revoked: list[str] = []

    async def recheck() -> None:
        answer = answers.pop(0) if answers else TokenInvalid("gone", code="invalid_session")
        if answer is not None:
            raise answer

    # Unavailable, then rate limited, then fine: the stream stays; then a definite no ends it.
    while not revoked:
        code = await recheck_credential(recheck, p)
        if code is not None:
            revoked.append(code)
    assert revoked == ["invalid_session"] and answers == []
