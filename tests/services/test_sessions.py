"""Session introspection on virtual time: cache (positive and negative), revocation seen after the
cache, only session cookies forwarded, failures are 503 without the app's body."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from gatewayd.proto.tokens import TokenInvalid, Verifier
from gatewayd.services.auth import Authenticator, presented_from_headers
from gatewayd.services.sessions import SessionIntrospector, SessionSettings, SessionsUnavailable

URL = "https://app.example.com/api/auth"


class FakeApp:
    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.status = 200
        self.delay_s = 0.0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if self.status != 200:
            return httpx.Response(self.status, text="Traceback: internal details")
        token = request.headers.get("authorization", "").removeprefix("Bearer ") or None
        for part in request.headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "better-auth.session_token":
                token = v
        doc = self.sessions.get(token or "")
        return httpx.Response(200, json=doc)


def session(uid: str, sid: str, org: str | None = "acme") -> dict[str, Any]:
    return {"session": {"id": sid, "userId": uid, "expiresAt": "2030-01-01T00:00:00.000Z",
                        "activeOrganizationId": org}, "user": {"id": uid, "email": "x@example.com"}}  # fmt: skip


@asynccontextmanager
async def open_introspector(app: FakeApp, **over: Any) -> AsyncIterator[SessionIntrospector]:
    settings = SessionSettings(
        url=URL, cache_s=5.0, timeout_s=2.0, scopes=frozenset({"document.read"}), **over
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(app.handle)) as client:
        yield SessionIntrospector(settings, client)


async def test_principal_from_the_session(autojump_clock: trio.testing.MockClock) -> None:
    app = FakeApp()
    app.sessions["tok"] = session("u-1", "s-1")
    async with open_introspector(app) as si:
        p = await si.introspect(bearer="tok")
    assert (p.subject, p.kind, p.tenant, p.session_id, p.credential) == (
        "user:u-1",
        "human",
        "acme",
        "s-1",
        "session",
    )
    assert p.scopes == {"document.read"} and p.expires_at == 1893456000.0
    (req,) = app.requests
    assert req.url.path == "/api/auth/get-session" and req.url.params["disableCookieCache"] == "true"


async def test_cache_then_revocation_is_seen(autojump_clock: trio.testing.MockClock) -> None:
    app = FakeApp()
    app.sessions["tok"] = session("u-1", "s-1")
    async with open_introspector(app) as si:
        await si.introspect(bearer="tok")
        del app.sessions["tok"]
        await trio.sleep(4.9)
        assert (await si.introspect(bearer="tok")).subject == "user:u-1"  # cached
        assert len(app.requests) == 1
        await trio.sleep(0.1)
        with pytest.raises(TokenInvalid) as info:
            await si.introspect(bearer="tok")
        assert info.value.code == "invalid_session"
        # Negative answers are cached too.
        with pytest.raises(TokenInvalid):
            await si.introspect(bearer="tok")
        assert len(app.requests) == 2


async def test_only_session_cookies_are_forwarded(autojump_clock: trio.testing.MockClock) -> None:
    app = FakeApp()
    app.sessions["tok"] = session("u-2", "s-2", None)
    headers = [
        (b"cookie", b"theme=dark; better-auth.session_data=cached; better-auth.session_token=tok; x=y")
    ]
    presented = presented_from_headers(headers)
    async with open_introspector(app) as si:
        auth = Authenticator(Verifier([]), sessions=si)
        p = await auth.authenticate(presented)
    assert p.subject == "user:u-2" and p.tenant is None
    assert app.requests[0].headers["cookie"] == "better-auth.session_token=tok"


@pytest.mark.parametrize("status", [500, 502, 302])
async def test_app_failures_are_unavailable_without_its_body(
    autojump_clock: trio.testing.MockClock, status: int
) -> None:
    app = FakeApp()
    app.status = status
    async with open_introspector(app) as si:
        with pytest.raises(SessionsUnavailable) as info:
            await si.introspect(bearer="tok")
    assert "Traceback" not in info.value.message


async def test_slow_app_times_out(autojump_clock: trio.testing.MockClock) -> None:
    app = FakeApp()
    app.delay_s = 30
    async with open_introspector(app) as si:
        with pytest.raises(SessionsUnavailable, match="in time"):
            await si.introspect(bearer="tok")
    assert trio.current_time() == 2.0


async def test_401_from_the_app_is_a_refusal(autojump_clock: trio.testing.MockClock) -> None:
    app = FakeApp()
    app.status = 401
    async with open_introspector(app) as si:
        with pytest.raises(TokenInvalid):
            await si.introspect(cookie="better-auth.session_token=x")
