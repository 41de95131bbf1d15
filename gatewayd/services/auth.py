"""The inbound authenticator: every verifier, several at once, behind one async call.

A request's credentials are collected once (:func:`presented_from_headers`) from its headers
only: ``Authorization: Bearer``, ``X-API-Key``, the ``gatewayd_token`` cookie and the app's
session cookies. Query strings and bodies never carry credentials. Then
:meth:`Authenticator.authenticate` picks the verifier by what was presented:

1. an API key (``X-API-Key``, or a bearer starting ``gw_live_``/``gw_test_``) -> the API-key
   store (rate limited);
2. a bearer that is a JWS (three segments) -> the JWT verifier with the issuer's keys (static
   JWKS file, or the JWKS cache: :mod:`gatewayd.services.jwks`);
3. any other bearer (not starting ``eyJ``) -> session introspection when configured (Better
   Auth's bearer plugin takes the session token as a bearer), else refused with its kind named;
4. the ``gatewayd_token`` cookie -> the JWT verifier;
5. the app's session cookie -> session introspection.

Errors: :class:`TokenInvalid` (401), :class:`PermissionDenied` (403), :class:`RateLimited`
(429), :class:`KeysUnavailable` / :class:`SessionsUnavailable` (503).

:func:`recheck_credential` rechecks the credential of a long-lived stream every ``recheck_s`` (and
when it expires), so a revoked session or key ends the stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import httpx
import trio

from gatewayd.proto.apikeys import looks_like_api_key
from gatewayd.proto.tokens import Principal, RateLimited, TokenInvalid, Verifier
from gatewayd.services.apikeys import ApiKeyService
from gatewayd.services.jwks import JwksCache
from gatewayd.services.sessions import SessionIntrospector

logger = logging.getLogger(__name__)

TOKEN_COOKIE: Final = "gatewayd_token"
API_KEY_HEADER: Final = b"x-api-key"


@dataclass(frozen=True, slots=True)
class Presented:
    """What a request presented, from its headers only. ``repr`` never shows secrets."""

    bearer: str | None = None
    api_key: str | None = None
    token_cookie: str | None = None
    cookies: tuple[tuple[str, str], ...] = ()
    source_ip: str | None = None

    def __repr__(self) -> str:
        kinds = [n for n in ("bearer", "api_key", "token_cookie") if getattr(self, n)]
        return f"Presented({', '.join(kinds) or 'nothing'}, cookies={len(self.cookies)}, ip={self.source_ip})"

    @property
    def empty(self) -> bool:
        return not (self.bearer or self.api_key or self.token_cookie or self.cookies)


def parse_cookies(header: str) -> list[tuple[str, str]]:
    out = []
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k:
            out.append((k, v.strip()))
    return out


def presented_from_headers(
    headers: Sequence[tuple[bytes, bytes]], *, source_ip: str | None = None, allow_cookie: bool = True
) -> Presented:
    """Collect credentials from raw (lowercase or not) header pairs. Cookies are ignored when
    ``allow_cookie`` is false (writes: no ambient credentials, no CSRF surface)."""
    bearer = api_key = token_cookie = None
    cookies: list[tuple[str, str]] = []
    for k, v in headers:
        name = k.lower()
        if name == b"authorization":
            scheme, _, value = v.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                bearer = value.strip()
        elif name == API_KEY_HEADER:
            api_key = v.decode("latin-1").strip() or None
        elif name == b"cookie" and allow_cookie:
            for ck, cv in parse_cookies(v.decode("latin-1")):
                if ck == TOKEN_COOKIE and cv:
                    token_cookie = cv
                else:
                    cookies.append((ck, cv))
    return Presented(bearer, api_key, token_cookie, tuple(cookies), source_ip)


class Authenticator:
    """All configured verifiers. Build one per gateway; close it with :meth:`aclose`.

    Args:
        verifier: the JWT issuers (static keys inside; issuers in ``caches`` use the cache).
        caches: issuer -> JWKS cache, for issuers whose keys are fetched.
        sessions: session introspection, if configured.
        api_keys: the API-key service, if configured.
        client: the shared outbound HTTP client (closed by :meth:`aclose`).
        wall_clock: Unix seconds for token times (tests shift it).
    """

    def __init__(
        self,
        verifier: Verifier,
        *,
        caches: Mapping[str, JwksCache] | None = None,
        sessions: SessionIntrospector | None = None,
        api_keys: ApiKeyService | None = None,
        client: httpx.AsyncClient | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = verifier
        self.caches = dict(caches or {})
        self.sessions = sessions
        self.api_keys = api_keys
        self.client = client
        self.wall_clock = wall_clock

    async def aclose(self) -> None:
        if self.client is not None:
            with trio.move_on_after(2, shield=True):
                await self.client.aclose()

    async def verify_jwt(self, token: str) -> Principal:
        """A bearer JWT against the configured issuers (keys from file or JWKS cache)."""
        u = self.verifier.inspect(token)
        cache = self.caches.get(u.issuer.issuer)
        key = await cache.key(u.kid) if cache is not None else u.issuer.keys.get(u.kid)
        return self.verifier.check(u, key, now=self.wall_clock())

    async def authenticate(self, presented: Presented) -> Principal:
        """The principal of a request, from its verified credentials only.

        Raises:
            TokenInvalid: missing or refused credentials (401; ``code`` says which).
            RateLimited: 429. KeysUnavailable / SessionsUnavailable: 503.

        Cancellation: may wait on a JWKS fetch, the app, or the key store (each bounded).
        """
        p = presented
        api_key = p.api_key or (p.bearer if p.bearer and looks_like_api_key(p.bearer) else None)
        if api_key is not None:
            if self.api_keys is None:
                raise TokenInvalid("API keys are not enabled on this gateway", code="invalid_token")
            return await self.api_keys.authenticate(api_key, source_ip=p.source_ip)
        if p.bearer is not None:
            # A JWS (or a broken one: base64url of '{"' starts "eyJ") goes to the JWT verifier,
            # whose diagnostics name what is wrong; anything else may be an app session token.
            if p.bearer.count(".") != 2 and not p.bearer.startswith("eyJ") and self.sessions is not None:
                return await self.sessions.introspect(bearer=p.bearer)
            return await self.verify_jwt(p.bearer)
        if p.token_cookie is not None:
            return await self.verify_jwt(p.token_cookie)
        if self.sessions is not None:
            cookie = self.sessions.session_cookies(p.cookies)
            if cookie is not None:
                return await self.sessions.introspect(cookie=cookie)
        raise TokenInvalid(
            "send Authorization: Bearer <token>, an X-API-Key header or a session cookie",
            code="missing_credentials",
        )


def recheck_delay(principal: Principal, recheck_s: float, now_wall: float) -> float:
    """Seconds until a stream's credential is checked again: every ``recheck_s``, and once just
    after the credential expires."""
    if principal.expires_at is None:
        return recheck_s
    return min(recheck_s, max(0.0, principal.expires_at - now_wall) + 1.0)


async def recheck_credential(
    authenticate: Callable[[], Awaitable[object]], principal: Principal
) -> str | None:
    """Re-run a stream's authentication. Returns the refusal code when the answer is a definite no
    (the stream must end), None otherwise. Unavailability of the app or its keys, or a rate limit on
    rechecks, is not a no: the stream stays and is checked again later."""
    from gatewayd.services.jwks import KeysUnavailable
    from gatewayd.services.sessions import SessionsUnavailable

    try:
        await authenticate()
    except TokenInvalid as exc:
        logger.info("stream credential of %s refused on recheck: %s", principal.subject, exc.code)
        return exc.code
    except (KeysUnavailable, SessionsUnavailable, RateLimited) as exc:
        logger.warning("stream credential of %s could not be rechecked: %s", principal.subject, exc)
    return None
