"""A trio-native JWKS cache for one trusted issuer (SECURITY.md "Inbound tokens").

Theory of operation
-------------------
The cache holds the issuer's last good key set (already filtered by
:func:`gatewayd.proto.tokens.load_jwks`) and the time it was fetched. :meth:`JwksCache.key`
answers a ``kid``:

* no set yet, or the set is older than ``refresh_s``: refresh first;
* the ``kid`` is in the set: answer it;
* the ``kid`` is unknown: refetch, but at most once per ``unknown_kid_cooldown_s`` (a flood of
  random ``kid``\\ s costs the issuer one request per cooldown, not one per token);
* a refresh that fails keeps the last good set until it is ``stale_max_s`` old; after that the
  cache fails closed (:class:`KeysUnavailable`), and further fetch attempts wait
  ``failure_backoff_s`` after each failure.

Refreshes are single-flight: one task fetches while the others wait on the same lock and then
reuse the result (a generation counter tells them a fetch completed while they waited). Unlike
PyJWKClient, waiting is asynchronous and nothing blocks the trio loop.

Fetches go through httpx on trio with: a total deadline (``timeout_s``), no redirects, no proxy
from the environment, a response-size cap (``max_bytes``), a key-count cap (``max_keys``), and
``https`` only, except for loopback hosts (tests, local issuers). The JWKS URL comes from config
or from the configured discovery document, never from a token.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import urlsplit

import httpx
import jwt
import trio

from gatewayd.errors import AuthError
from gatewayd.proto.tokens import load_jwks

logger = logging.getLogger(__name__)

# SpacetimeDB refreshes every 300 s; issuers publish new keys ahead of use on that assumption.
DEFAULT_REFRESH_S: Final = 300.0
# One refetch per 30 s for unknown kids: a real rotation is picked up within half a minute, a
# flood of random kids costs the issuer two requests a minute.
DEFAULT_UNKNOWN_KID_COOLDOWN_S: Final = 30.0
# Keep serving the last good set for an hour of failed refreshes, then fail closed.
DEFAULT_STALE_MAX_S: Final = 3600.0
DEFAULT_TIMEOUT_S: Final = 5.0
DEFAULT_FAILURE_BACKOFF_S: Final = 5.0
# A JWKS with a handful of keys is ~2 KiB; 64 KiB leaves room for RSA-4096 sets.
DEFAULT_MAX_BYTES: Final = 64 * 1024
DEFAULT_MAX_KEYS: Final = 32


class KeysUnavailable(AuthError):
    """The issuer's keys cannot be had (never fetched, or stale past the bound): fail closed."""

    code = "auth_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JwksFetchError(AuthError):
    """One fetch failed (network, status, size, shape); the cache decides what that means."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JwksSettings:
    refresh_s: float = DEFAULT_REFRESH_S
    unknown_kid_cooldown_s: float = DEFAULT_UNKNOWN_KID_COOLDOWN_S
    stale_max_s: float = DEFAULT_STALE_MAX_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    failure_backoff_s: float = DEFAULT_FAILURE_BACKOFF_S
    max_bytes: int = DEFAULT_MAX_BYTES
    max_keys: int = DEFAULT_MAX_KEYS


@dataclass(frozen=True, slots=True)
class JwksStatistics:
    fetches: int
    failures: int
    unknown_kid_refetches: int
    keys: int
    age_s: float | None
    last_error: str | None


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_problem(url: str) -> str | None:
    """Why ``url`` may not be fetched for keys (None when it may): https, or http on loopback."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return None
    if parts.scheme == "http":
        return f"{url}: plain http is allowed only on loopback addresses"
    return f"{url}: not an https URL"


class JwksCache:
    # Metrics hook: called with (issuer, "ok" | "failed") after each fetch (sync, cheap).
    on_fetch: Callable[[str, str], None] | None = None

    """Keys of one issuer, fetched from ``jwks_url`` or found through ``discovery_url``.

    Args:
        issuer: the exact ``iss`` (a discovery document must name the same issuer).
        algorithms: the issuer's allowed algorithms; keys for others are dropped.
        jwks_url / discovery_url: exactly one.
        client: a shared ``httpx.AsyncClient`` (built by :func:`open_http_client`, or a test's
            client over ``httpx.MockTransport``).
        clock: monotonic seconds (``trio.current_time``; MockClock in tests).
    """

    def __init__(
        self,
        *,
        issuer: str,
        algorithms: Sequence[str],
        client: httpx.AsyncClient,
        jwks_url: str | None = None,
        discovery_url: str | None = None,
        settings: JwksSettings = JwksSettings(),
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if (jwks_url is None) == (discovery_url is None):
            raise ValueError("give exactly one of jwks_url and discovery_url")
        for url in (jwks_url, discovery_url):
            if url is not None and (problem := url_problem(url)):
                raise ValueError(problem)
        self.issuer = issuer
        self.algorithms = tuple(algorithms)
        self.jwks_url = jwks_url
        self.discovery_url = discovery_url
        self.settings = settings
        self._client = client
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._generation = 0
        self._lock = trio.Lock()
        self._last_unknown_refetch: float | None = None
        self._last_failure_at: float | None = None
        self._fetches = 0
        self._failures = 0
        self._unknown_refetches = 0
        self._last_error: str | None = None

    # --- queries -------------------------------------------------------------------------------

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key for ``kid``, refreshing as the theory of operation says.

        Returns None when the issuer has no such key (even after an allowed refetch).

        Raises:
            KeysUnavailable: no usable key set (never fetched, or stale beyond ``stale_max_s``).

        Cancellation: may wait for a fetch (bounded by ``timeout_s``); cancelling leaves the
        cache as it was.
        """
        now = self._clock()
        generation = self._generation
        if self._fetched_at is None or now - self._fetched_at >= self.settings.refresh_s:
            await self._refresh(reason="age")
        else:
            found = self._keys.get(kid)
            if found is not None:
                return found
        self._check_fresh_enough()
        found = self._keys.get(kid)
        if found is not None:
            return found
        now = self._clock()
        last = self._last_unknown_refetch
        if self._generation != generation:
            return None  # the set was just fetched for this very call: refetching adds nothing
        if last is None or now - last >= self.settings.unknown_kid_cooldown_s:
            self._last_unknown_refetch = now
            self._unknown_refetches += 1
            logger.info("jwks %s: unknown kid, refetching", self.issuer)
            await self._refresh(reason="unknown kid", force=True)
            self._check_fresh_enough()
        return self._keys.get(kid)

    def keys_nowait(self) -> dict[str, jwt.PyJWK]:
        """The current key set, whatever its age (diagnostics)."""
        return dict(self._keys)

    def statistics(self) -> JwksStatistics:
        age = None if self._fetched_at is None else self._clock() - self._fetched_at
        return JwksStatistics(
            self._fetches, self._failures, self._unknown_refetches, len(self._keys), age, self._last_error
        )

    def _check_fresh_enough(self) -> None:
        if self._fetched_at is None:
            raise KeysUnavailable(f"the keys of issuer {self.issuer} could not be fetched")
        if self._clock() - self._fetched_at >= self.settings.stale_max_s:
            self._keys = {}
            raise KeysUnavailable(f"the keys of issuer {self.issuer} are stale and could not be refreshed")

    # --- fetching ------------------------------------------------------------------------------

    async def _refresh(self, *, reason: str, force: bool = False) -> None:
        seen = self._generation
        async with self._lock:
            if self._generation != seen:
                return  # someone else fetched while we waited: single flight
            now = self._clock()
            if (
                not force
                and self._fetched_at is not None
                and now - self._fetched_at < self.settings.refresh_s
            ):
                return
            if (
                self._last_failure_at is not None
                and now - self._last_failure_at < self.settings.failure_backoff_s
            ):
                return  # a fetch just failed: do not hammer a failing issuer
            self._fetches += 1
            try:
                keys = await self.fetch()
            except JwksFetchError as exc:
                self._failures += 1
                if self.on_fetch is not None:
                    self.on_fetch(self.issuer, "failed")
                self._last_failure_at = self._clock()
                self._last_error = str(exc)
                logger.warning(
                    "jwks %s: refresh (%s) failed: %s; %s",
                    self.issuer,
                    reason,
                    exc,
                    "keeping the last good set" if self._keys else "no keys",
                )
                return
            self._keys = keys
            self._fetched_at = self._clock()
            self._last_failure_at = None
            self._last_error = None
            self._generation += 1
            if self.on_fetch is not None:
                self.on_fetch(self.issuer, "ok")
            logger.info("jwks %s: %d keys (%s)", self.issuer, len(keys), reason)

    async def fetch(self) -> dict[str, jwt.PyJWK]:
        """Fetch and filter the key set once (no caching).

        Raises:
            JwksFetchError: any failure, with a reason safe to log.
        """
        with trio.move_on_after(self.settings.timeout_s) as scope:
            jwks_url = self.jwks_url
            if jwks_url is None:
                assert self.discovery_url is not None
                doc = await self._get_json(self.discovery_url)
                if not isinstance(doc, dict):
                    raise JwksFetchError("the discovery document is not an object")
                if doc.get("issuer") != self.issuer:
                    raise JwksFetchError(
                        f"the discovery document names issuer {doc.get('issuer')!r}, not {self.issuer!r}"
                    )
                uri = doc.get("jwks_uri")
                if not isinstance(uri, str) or url_problem(uri) is not None:
                    raise JwksFetchError(f"the discovery document has no usable jwks_uri ({uri!r})")
                jwks_url = uri
            doc = await self._get_json(jwks_url)
        if scope.cancelled_caught:
            raise JwksFetchError(f"no answer within {self.settings.timeout_s} s")
        raw_keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(raw_keys, list):
            raise JwksFetchError("the JWKS has no 'keys' list")
        if len(raw_keys) > self.settings.max_keys:
            raise JwksFetchError(f"the JWKS has {len(raw_keys)} keys (limit {self.settings.max_keys})")
        keys = load_jwks(doc, self.algorithms)
        if raw_keys and not keys:
            logger.warning("jwks %s: none of the %d published keys is acceptable", self.issuer, len(raw_keys))
        return keys

    async def _get_json(self, url: str) -> Any:
        try:
            async with self._client.stream(
                "GET", url, headers={"Accept": "application/json"}, follow_redirects=False
            ) as resp:
                if resp.status_code != 200:
                    raise JwksFetchError(f"GET {url} answered {resp.status_code}")
                body = bytearray()
                async with contextlib.aclosing(cast("AsyncGenerator[bytes]", resp.aiter_bytes())) as chunks:
                    async for chunk in chunks:
                        body += chunk
                        if len(body) > self.settings.max_bytes:
                            raise JwksFetchError(
                                f"GET {url} returned more than {self.settings.max_bytes} bytes"
                            )
        except httpx.HTTPError as exc:
            raise JwksFetchError(f"GET {url} failed: {type(exc).__name__}") from exc
        try:
            return json.loads(body)
        except ValueError:
            raise JwksFetchError(f"GET {url} did not return JSON") from None


def open_http_client(*, timeout_s: float = DEFAULT_TIMEOUT_S) -> httpx.AsyncClient:
    """The shared outbound client for key and session checks: no redirects, no proxies or
    certificates from the environment, explicit timeouts. Close it with ``aclose``."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
    )
