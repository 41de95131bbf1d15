"""Session introspection: ask the app whether a session is alive (Better Auth ``get-session``).

For a request carrying the app's session cookie (or its session token as a bearer, Better Auth's
bearer plugin), gatewayd calls ``GET <url>/get-session?disableCookieCache=true`` with only that
credential forwarded, and builds the principal from the answer:

* ``user.id`` -> subject ``user:<id>`` (the one subject scheme; ``subject_prefix`` configurable);
* ``session.id`` -> ``session_id``; ``session.expiresAt`` -> ``expires_at``;
* ``session.<tenant_field>`` (``activeOrganizationId``) -> tenant;
* scopes: the configured ``scopes`` (app sessions carry none; rights come from the tables).

Answers are cached for ``cache_s`` (positive and negative) under a SHA-256 of the credential, so a
revoked session is refused at most ``cache_s`` later. Only the session-token cookies are
forwarded, never the session-data cache cookie (which would let Better Auth answer from the
cookie without looking at its database, and so miss a revocation). Upstream bodies are never
shown to clients; failures to reach the app are :class:`SessionsUnavailable` (503).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

import httpx
import trio

from gatewayd.errors import AuthError
from gatewayd.proto.tokens import Principal, TokenInvalid

logger = logging.getLogger(__name__)

BETTER_AUTH_COOKIES: Final = ("better-auth.session_token", "__Secure-better-auth.session_token")
MAX_SESSION_BYTES: Final = 64 * 1024
MAX_CACHED: Final = 10_000


class SessionsUnavailable(AuthError):
    """The app could not be asked (network, timeout, 5xx): neither yes nor no (HTTP 503)."""

    code = "auth_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSettings:
    url: str  # the app's auth base, e.g. http://127.0.0.1:3000/api/auth
    issuer: str = ""  # Principal.issuer (default: url)
    cookie_names: tuple[str, ...] = BETTER_AUTH_COOKIES
    cache_s: float = 5.0
    timeout_s: float = 5.0
    subject_prefix: str = "user:"
    tenant_field: str = "activeOrganizationId"
    scopes: frozenset[str] = frozenset()


class SessionIntrospector:
    """Checks app sessions by asking the app, with a short cache."""

    def __init__(
        self,
        settings: SessionSettings,
        client: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.settings = settings
        self._client = client
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, Principal | TokenInvalid]] = OrderedDict()
        self.requests = 0

    def session_cookies(self, cookies: Sequence[tuple[str, str]]) -> str | None:
        """The ``Cookie`` header to forward: only the configured session cookies."""
        wanted = [f"{k}={v}" for k, v in cookies if k in self.settings.cookie_names and v]
        return "; ".join(wanted) or None

    async def introspect(self, *, bearer: str | None = None, cookie: str | None = None) -> Principal:
        """The principal of a live session.

        Raises:
            TokenInvalid: no such session, expired or revoked (401).
            SessionsUnavailable: the app could not answer (503).

        Cancellation: may wait for the app (bounded by ``timeout_s``); the cache is unchanged.
        """
        if (bearer is None) == (cookie is None):
            raise ValueError("give a bearer token or a cookie header")
        material = f"b:{bearer}" if bearer is not None else f"c:{cookie}"
        key = hashlib.sha256(material.encode()).digest()
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key)
            if isinstance(hit[1], TokenInvalid):
                raise TokenInvalid(hit[1].message, code=hit[1].code)
            return hit[1]
        headers = {"Accept": "application/json"}
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        else:
            assert cookie is not None
            headers["Cookie"] = cookie
        result = await self._ask(headers)
        self._cache[key] = (self._clock() + self.settings.cache_s, result)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        if isinstance(result, TokenInvalid):
            raise TokenInvalid(result.message, code=result.code)
        return result

    async def _ask(self, headers: dict[str, str]) -> Principal | TokenInvalid:
        url = self.settings.url.rstrip("/") + "/get-session"
        self.requests += 1
        body = bytearray()
        status = 0
        with trio.move_on_after(self.settings.timeout_s) as scope:
            try:
                async with self._client.stream(
                    "GET", url, params={"disableCookieCache": "true"}, headers=headers, follow_redirects=False
                ) as resp:
                    status = resp.status_code
                    chunks = cast("AsyncGenerator[bytes]", resp.aiter_bytes())
                    async with contextlib.aclosing(chunks) as it:
                        async for chunk in it:
                            body += chunk
                            if len(body) > MAX_SESSION_BYTES:
                                raise SessionsUnavailable("the session answer is too large")
            except httpx.HTTPError as exc:
                logger.warning("session check at %s failed: %s", url, type(exc).__name__)
                raise SessionsUnavailable("the app's session service is unreachable") from exc
        if scope.cancelled_caught:
            logger.warning("session check at %s: no answer within %s s", url, self.settings.timeout_s)
            raise SessionsUnavailable("the app's session service did not answer in time")
        if status in (401, 403):
            return TokenInvalid("the app session is not valid", code="invalid_session")
        if status != 200:
            logger.warning("session check at %s answered %s", url, status)
            raise SessionsUnavailable("the app's session service failed")
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            raise SessionsUnavailable("the app's session service answered garbage") from None
        return self._principal(doc)

    def _principal(self, doc: Any) -> Principal | TokenInvalid:
        if doc is None:
            return TokenInvalid("no such session (signed out, expired or revoked)", code="invalid_session")
        session = doc.get("session") if isinstance(doc, dict) else None
        user = doc.get("user") if isinstance(doc, dict) else None
        if not isinstance(session, dict) or not isinstance(user, dict):
            raise SessionsUnavailable("the app's session answer has no session and user")
        uid, sid = user.get("id"), session.get("id")
        if not isinstance(uid, str) or not uid or not isinstance(sid, str):
            raise SessionsUnavailable("the app's session answer has no user id")
        tenant = session.get(self.settings.tenant_field)
        return Principal(
            subject=self.settings.subject_prefix + uid,
            kind="human",
            tenant=tenant if isinstance(tenant, str) and tenant else None,
            scopes=self.settings.scopes,
            issuer=self.settings.issuer or self.settings.url,
            session_id=sid,
            credential="session",
            expires_at=_timestamp(session.get("expiresAt")),
        )


def _timestamp(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / (1000 if value > 1e11 else 1)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None
