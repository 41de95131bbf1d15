"""API keys: format and offline checks, keyed-hash store, status, rotation, rate limits, no
blocking on the trio loop."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from gatewayd.proto.apikeys import MAX_KEY_CHARS, checksum, key_hash, make_key, parse_key
from gatewayd.proto.ratelimit import WindowCounter
from gatewayd.proto.tokens import RateLimited, TokenInvalid
from gatewayd.services.apikeys import ApiKeyLimits, ApiKeyService, ApiKeyStore

PEPPER = b"p" * 32


@pytest.fixture
def store(tmp_path: Path) -> ApiKeyStore:
    return ApiKeyStore(tmp_path / "keys.sqlite3", PEPPER)


def test_key_format_and_entropy() -> None:
    key = make_key("live", "int-1")
    assert key.startswith("gw_live_int-1_")
    parsed = parse_key(key)
    assert (parsed.env, parsed.key_id) == ("live", "int-1")
    assert len(key) <= MAX_KEY_CHARS
    assert "gw_live" not in repr(parsed) and key[14:30] not in repr(parsed)
    keys = {make_key("test", "abc") for _ in range(200)}
    assert len(keys) == 200


@pytest.mark.parametrize(
    "mutate",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # checksum typo
        lambda k: k[:20] + ("x" if k[20] != "x" else "y") + k[21:],  # secret typo
        lambda k: k[:-3],  # truncated
        lambda k: k.replace("gw_live_", "gw_prod_"),
        lambda k: k + "0",
        lambda k: "gw_live_" + "a" * 40,
        lambda k: k.replace("_", "-"),
    ],
)
def test_malformed_keys_are_refused_offline(mutate: object) -> None:
    key = make_key("live", "int-1")
    bad = mutate(key)  # type: ignore[operator]
    with pytest.raises(TokenInvalid) as info:
        parse_key(bad)
    assert info.value.code == "malformed_api_key"


def test_store_keeps_only_a_keyed_hash(store: ApiKeyStore) -> None:
    key, rec = store.create(
        subject="robot:int-1", tenant_id="acme", scopes=["document.read"], expires_at=None
    )
    raw = sqlite3.connect(store.path).execute("SELECT * FROM api_key").fetchall()
    dump = repr(raw)
    assert key not in dump and key.split("_")[-1][:-6] not in dump
    assert bytes(raw[0][2]) == key_hash(PEPPER, key)
    assert "pepper" not in repr(store) and repr(PEPPER) not in repr(store)
    assert rec.status(0) == "active"


def test_create_refuses_non_robot_subjects(store: ApiKeyStore) -> None:
    for bad in ("user:u-1", "int-1", "robot:a|b", "robot:someone@example.com", "robot:" + "x" * 130):
        with pytest.raises(ValueError, match="subject"):
            store.create(subject=bad, tenant_id="acme", scopes=[], expires_at=None)


async def test_good_key_becomes_a_robot_principal(store: ApiKeyStore) -> None:
    key, _ = store.create(subject="robot:int-1", tenant_id="acme", scopes=["document.create"],
                          expires_at=None, grant_version=3)  # fmt: skip
    svc = ApiKeyService(store)
    p = await svc.authenticate(key, source_ip="127.0.0.1")
    assert (p.subject, p.kind, p.tenant, p.credential) == ("robot:int-1", "robot", "acme", "api_key")
    assert p.scopes == {"document.create"}
    assert p.claims["grant_version"] == 3 and p.claims["api_key_id"] == parse_key(key).key_id
    rec = store.get(parse_key(key).key_id)
    assert rec is not None and rec.last_used_at is not None


@pytest.mark.parametrize("change", ["disable", "revoke", "expire", "wrong_secret", "unknown_id", "wrong_env"])
async def test_refused_keys(store: ApiKeyStore, change: str) -> None:
    key, rec = store.create(subject="robot:int-1", tenant_id="acme", scopes=[], expires_at=None)
    if change == "disable":
        store.set_enabled(rec.key_id, False)
    elif change == "revoke":
        store.revoke(rec.key_id)
    elif change == "expire":
        store.rotate(rec.key_id, grace_s=0)
    elif change == "wrong_secret":
        other = make_key("live", rec.key_id)
        key = other
    elif change == "unknown_id":
        key = make_key("live", "nobody")
    else:
        body = key.replace("gw_live_", "gw_test_")[:-6]
        key = body + checksum(body)
    svc = ApiKeyService(store)
    with pytest.raises(TokenInvalid) as info:
        await svc.authenticate(key, source_ip="127.0.0.1")
    expected = {"disable": "api_key_disabled", "revoke": "api_key_revoked", "expire": "api_key_expired"}
    assert info.value.code == expected.get(change, "invalid_api_key")


def test_rotate_keeps_owner_and_scopes(store: ApiKeyStore) -> None:
    _, old = store.create(
        subject="robot:int-1", tenant_id="acme", scopes=["a", "b"], expires_at=None, now=100
    )
    new_key, new = store.rotate(old.key_id, grace_s=60, now=200)
    assert (new.subject, new.tenant_id, new.scopes) == (old.subject, old.tenant_id, old.scopes)
    after = store.get(old.key_id)
    assert after is not None and after.expires_at == 260 and after.replaced_by == new.key_id
    assert after.status(259) == "active" and after.status(260) == "expired"
    assert parse_key(new_key).key_id == new.key_id != old.key_id


async def test_per_key_attempts_are_limited(
    store: ApiKeyStore, autojump_clock: trio.testing.MockClock
) -> None:
    key, _ = store.create(subject="robot:int-1", tenant_id="acme", scopes=[], expires_at=None)
    svc = ApiKeyService(store, ApiKeyLimits(key_attempts=5, ip_failures=100, window_s=60))
    for _ in range(5):
        await svc.authenticate(key, source_ip="10.0.0.1")
    with pytest.raises(RateLimited) as info:
        await svc.authenticate(key, source_ip="10.0.0.2")
    assert 1 <= info.value.retry_after_s <= 61
    await trio.sleep(60)
    assert (await svc.authenticate(key, source_ip="10.0.0.2")).subject == "robot:int-1"


async def test_wrong_secrets_count_against_the_key_too(
    store: ApiKeyStore, autojump_clock: trio.testing.MockClock
) -> None:
    key, rec = store.create(subject="robot:int-1", tenant_id="acme", scopes=[], expires_at=None)
    svc = ApiKeyService(store, ApiKeyLimits(key_attempts=3, ip_failures=100, window_s=60))
    for i in range(3):
        with pytest.raises(TokenInvalid):
            await svc.authenticate(make_key("live", rec.key_id), source_ip=f"10.0.0.{i}")
    with pytest.raises(RateLimited):
        await svc.authenticate(key, source_ip="10.0.9.9")  # even the right key, for a while


async def test_failures_per_source_ip_are_limited(
    store: ApiKeyStore, autojump_clock: trio.testing.MockClock
) -> None:
    key, _ = store.create(subject="robot:int-1", tenant_id="acme", scopes=[], expires_at=None)
    svc = ApiKeyService(store, ApiKeyLimits(key_attempts=100, ip_failures=4, window_s=30))
    for i in range(2):
        with pytest.raises(TokenInvalid):
            await svc.authenticate(make_key("live", f"guess-{i}"), source_ip="10.0.0.1")
    for _ in range(2):
        with pytest.raises(TokenInvalid):
            await svc.authenticate("gw_live_garbage", source_ip="10.0.0.1")
    with pytest.raises(RateLimited):
        await svc.authenticate(key, source_ip="10.0.0.1")
    # Other addresses are not affected; successes do not count against an address.
    for _ in range(10):
        await svc.authenticate(key, source_ip="10.0.0.2")
    await trio.sleep(30)
    assert (await svc.authenticate(key, source_ip="10.0.0.1")).kind == "robot"
    assert svc.throttled == 1


async def test_store_work_runs_in_worker_threads(store: ApiKeyStore) -> None:
    key, _ = store.create(subject="robot:int-1", tenant_id="acme", scopes=[], expires_at=None)
    loop_thread = threading.get_ident()
    seen: list[int] = []
    check = store.check

    def spy(*args: object) -> object:
        seen.append(threading.get_ident())
        return check(*args)  # type: ignore[arg-type]

    store.check = spy  # type: ignore[method-assign,assignment]
    await ApiKeyService(store).authenticate(key, source_ip=None)
    assert seen and all(t != loop_thread for t in seen)


def test_window_counter_is_bounded() -> None:
    c = WindowCounter(limit=2, window_s=10, max_tracked=100)
    for i in range(1000):
        c.hit(i, now=0)
    assert len(c) == 100
    c.hit("a", 0)
    c.hit("a", 1)
    assert c.retry_after("a", 2) == 8
    assert c.retry_after("a", 10) is None
    assert c.retry_after("a", 11) is None
