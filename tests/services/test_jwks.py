"""The trio-native JWKS cache: single flight, unknown-kid cooldown, caps, redirects, fail closed.

Everything runs over ``httpx.MockTransport`` (no real I/O), so MockClock's autojump is safe and
every timing assertion is exact.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from gatewayd.services.jwks import JwksCache, JwksSettings, KeysUnavailable, url_problem

from ..authcases import ISSUER, IssuerKit

JWKS_URL = "https://auth.example.test/api/auth/jwks"
DISCOVERY_URL = "https://auth.example.test/.well-known/openid-configuration"
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class FakeIssuer:
    """Serves a JWKS (and a discovery document) and logs every request."""

    def __init__(self, kit: IssuerKit) -> None:
        self.kit = kit
        self.jwks: Any = kit.jwks()
        self.requests: list[str] = []
        self.delay_s = 0.0
        self.fail = False
        self.discovery: dict[str, Any] = {"issuer": ISSUER, "jwks_uri": JWKS_URL}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if self.fail:
            return httpx.Response(500, text="upstream stack trace here")
        if str(request.url) == DISCOVERY_URL:
            return httpx.Response(200, json=self.discovery)
        if str(request.url) == JWKS_URL:
            return httpx.Response(200, content=json.dumps(self.jwks).encode())
        return httpx.Response(404)


@asynccontextmanager
async def open_cache(issuer: FakeIssuer, **settings: Any) -> AsyncIterator[JwksCache]:
    use_discovery = settings.pop("discovery", False)
    async with httpx.AsyncClient(transport=httpx.MockTransport(issuer.handle)) as client:
        yield JwksCache(
            issuer=ISSUER,
            algorithms=["ES256", "EdDSA", "RS256"],
            client=client,
            jwks_url=None if use_discovery else JWKS_URL,
            discovery_url=DISCOVERY_URL if use_discovery else None,
            settings=JwksSettings(**settings),
        )


@pytest.fixture(scope="module")
def kit() -> IssuerKit:
    return IssuerKit()


async def test_known_kid_is_served_from_cache_until_refresh(
    kit: IssuerKit, autojump_clock: trio.testing.MockClock
) -> None:
    iss = FakeIssuer(kit)
    async with open_cache(iss, refresh_s=300) as cache:
        assert await cache.key("k-es") is not None
        assert await cache.key("k-ed") is not None
        await trio.sleep(299)
        assert await cache.key("k-rs") is not None
        assert len(iss.requests) == 1
        await trio.sleep(1)
        assert await cache.key("k-es") is not None
        assert len(iss.requests) == 2


async def test_refresh_is_single_flight(kit: IssuerKit, autojump_clock: trio.testing.MockClock) -> None:
    iss = FakeIssuer(kit)
    iss.delay_s = 1.0
    found: list[bool] = []
    async with open_cache(iss) as cache:

        async def ask() -> None:
            found.append(await cache.key("k-es") is not None)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(ask)
    assert found == [True] * 50
    assert len(iss.requests) == 1
    assert trio.current_time() == 1.0


async def test_flood_of_unknown_kids_refetches_once_per_cooldown(
    kit: IssuerKit, autojump_clock: trio.testing.MockClock
) -> None:
    iss = FakeIssuer(kit)
    async with open_cache(iss, unknown_kid_cooldown_s=30, refresh_s=300) as cache:
        assert await cache.key("k-es") is not None
        for _ in range(1000):
            assert await cache.key(uuid.uuid4().hex) is None
        assert len(iss.requests) == 2  # the first load + one refetch
        await trio.sleep(29)
        for _ in range(100):
            assert await cache.key(uuid.uuid4().hex) is None
        assert len(iss.requests) == 2
        await trio.sleep(1)
        for _ in range(100):
            assert await cache.key(uuid.uuid4().hex) is None
        assert len(iss.requests) == 3
        assert cache.statistics().unknown_kid_refetches == 2


async def test_a_new_kid_is_picked_up_by_the_unknown_kid_refetch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    old, new = IssuerKit(), IssuerKit()
    iss = FakeIssuer(old)
    iss.jwks = {"keys": [old.jwk("k-es")]}
    async with open_cache(iss) as cache:
        assert await cache.key("k-es") is not None
        rotated = new.jwk("k-es")
        rotated["kid"] = "k-2"
        iss.jwks = {"keys": [old.jwk("k-es"), rotated]}
        assert await cache.key("k-2") is not None
        assert len(iss.requests) == 2


async def test_failed_refresh_keeps_the_last_good_set_then_fails_closed(
    kit: IssuerKit, autojump_clock: trio.testing.MockClock
) -> None:
    iss = FakeIssuer(kit)
    async with open_cache(iss, refresh_s=300, stale_max_s=3600, failure_backoff_s=5) as cache:
        assert await cache.key("k-es") is not None
        iss.fail = True
        await trio.sleep(300)
        assert await cache.key("k-es") is not None  # refresh failed, last good set kept
        before = len(iss.requests)
        for _ in range(100):
            assert await cache.key("k-es") is not None
        assert len(iss.requests) == before  # failure backoff: no hammering
        await trio.sleep(3300)
        with pytest.raises(KeysUnavailable):
            await cache.key("k-es")
        assert "stack trace" not in (cache.statistics().last_error or "")
        iss.fail = False
        await trio.sleep(5)
        assert await cache.key("k-es") is not None


async def test_never_fetched_fails_closed(kit: IssuerKit, autojump_clock: trio.testing.MockClock) -> None:
    iss = FakeIssuer(kit)
    iss.fail = True
    async with open_cache(iss) as cache:
        with pytest.raises(KeysUnavailable):
            await cache.key("k-es")


async def test_timeout_bounds_a_slow_issuer(kit: IssuerKit, autojump_clock: trio.testing.MockClock) -> None:
    iss = FakeIssuer(kit)
    iss.delay_s = 60
    async with open_cache(iss, timeout_s=2) as cache:
        with pytest.raises(KeysUnavailable):
            await cache.key("k-es")
        assert trio.current_time() == 2.0
        assert "within 2" in (cache.statistics().last_error or "")


@pytest.mark.parametrize(
    ("jwks", "error"),
    [
        ({"keys": []} | {"pad": "x" * 70_000}, "more than"),
        ({"keys": [{"kty": "EC"}] * 33}, "33 keys"),
        ([1, 2], "no 'keys' list"),
    ],
)
async def test_size_and_count_caps(
    kit: IssuerKit, autojump_clock: trio.testing.MockClock, jwks: Any, error: str
) -> None:
    iss = FakeIssuer(kit)
    iss.jwks = jwks
    async with open_cache(iss) as cache:
        with pytest.raises(KeysUnavailable):
            await cache.key("k-es")
        assert error in (cache.statistics().last_error or "")


async def test_redirects_are_not_followed(kit: IssuerKit, autojump_clock: trio.testing.MockClock) -> None:
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "https://evil.example/jwks.json"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=True) as client:
        cache = JwksCache(issuer=ISSUER, algorithms=["ES256"], client=client, jwks_url=JWKS_URL)
        with pytest.raises(KeysUnavailable):
            await cache.key("k-es")
    assert seen == [JWKS_URL]


async def test_keys_are_filtered_before_caching(
    kit: IssuerKit, autojump_clock: trio.testing.MockClock
) -> None:
    iss = FakeIssuer(kit)
    iss.jwks = {
        "keys": [
            {**kit.jwk("k-es"), "d": "AAAA"},
            {"kty": "oct", "kid": "k-hs", "k": "c2VjcmV0"},
            {**kit.jwk("k-ed"), "use": "enc"},
            kit.jwk("k-rs"),
        ]
    }
    async with open_cache(iss) as cache:
        assert await cache.key("k-rs") is not None
        assert sorted(cache.keys_nowait()) == ["k-rs"]


async def test_discovery(kit: IssuerKit, autojump_clock: trio.testing.MockClock) -> None:
    iss = FakeIssuer(kit)
    async with open_cache(iss, discovery=True) as cache:
        assert await cache.key("k-ed") is not None
        assert iss.requests == [DISCOVERY_URL, JWKS_URL]


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"issuer": ISSUER + "/", "jwks_uri": JWKS_URL}, "names issuer"),
        ({"issuer": ISSUER, "jwks_uri": "http://evil.example/jwks"}, "jwks_uri"),
        ({"issuer": ISSUER}, "jwks_uri"),
    ],
)
async def test_discovery_document_is_checked(
    kit: IssuerKit, autojump_clock: trio.testing.MockClock, doc: dict[str, Any], error: str
) -> None:
    iss = FakeIssuer(kit)
    iss.discovery = doc
    async with open_cache(iss, discovery=True) as cache:
        with pytest.raises(KeysUnavailable):
            await cache.key("k-es")
        assert error in (cache.statistics().last_error or "")
    assert "evil" not in " ".join(iss.requests)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://auth.example.com/jwks", True),
        ("http://127.0.0.1:3000/api/auth/jwks", True),
        ("http://[::1]:3000/jwks", True),
        ("http://localhost:3000/jwks", True),
        ("http://auth.example.com/jwks", False),
        ("http://10.0.0.1/jwks", False),
        ("file:///etc/passwd", False),
        ("ftp://auth.example.com/jwks", False),
    ],
)
def test_https_outside_loopback(url: str, ok: bool) -> None:
    assert (url_problem(url) is None) is ok
