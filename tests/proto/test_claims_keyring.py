"""The claim contract (what gatewayd refuses to mint) and the key rotation schedule."""

from __future__ import annotations

import pytest

from gatewayd.proto.claims import ClaimError, access_claims, check_algorithm, check_issuer, check_subject
from gatewayd.proto.keyring import KeyState, KeyTimes, Schedule, next_event, published, rotation_due, states

ISS = "https://gw.example.com"


def claims(**over: object) -> dict[str, object]:
    args: dict[str, object] = {"issuer": ISS, "subject": "user:u-1", "audience": "spacetimedb", "now": 1000,
                               "lifetime_s": 300}  # fmt: skip
    args.update(over)
    return access_claims(**args)  # type: ignore[arg-type]


def test_contract_fields() -> None:
    c = claims(scopes=["b", "a", "a"], session_id="s-1", tenant_id="acme", membership_version=4,
               act="robot:int-1", extra={"api_key_id": "k1", "grant_version": 3})  # fmt: skip
    assert c["iss"] == ISS and c["sub"] == "user:u-1" and c["aud"] == "spacetimedb"
    assert (c["iat"], c["exp"]) == (1000, 1300)
    assert c["token_type"] == "spacetime-access" and c["actor_ref"] == "user:u-1"
    assert c["scope"] == "a b" and c["sid"] == "s-1" and c["tenant_id"] == "acme"
    assert c["membership_version"] == 4 and c["act"] == {"sub": "robot:int-1"}
    assert c["api_key_id"] == "k1" and c["grant_version"] == 3
    assert isinstance(c["jti"], str) and len(c["jti"]) >= 16
    assert claims()["jti"] != claims()["jti"]


@pytest.mark.parametrize(
    ("over", "says"),
    [
        ({"subject": ""}, "empty"),
        ({"subject": "user:a|b"}, "'|'"),
        ({"subject": "user:" + "x" * 124}, "128 bytes"),
        ({"subject": "u-1"}, "user:<id>"),
        ({"subject": "admin:u-1"}, "user:<id>"),
        ({"subject": "user:alice@example.com"}, "'@'"),
        ({"subject": "user:"}, "user:<id>"),
        ({"issuer": ""}, "empty"),
        ({"issuer": "https://a|b"}, "'|'"),
        ({"issuer": "https://" + "x" * 121}, "128 bytes"),
        ({"issuer": ISS + "/"}, "ends with '/'"),
        ({"audience": ""}, "one non-empty string"),
        ({"audience": ["spacetimedb"]}, "one non-empty string"),
        ({"act": "someone"}, "user:<id>"),
        ({"extra": {"sub": "user:evil"}}, "set by the broker"),
        ({"extra": {"hex_identity": "c200"}}, "set by the broker"),
        ({"lifetime_s": 0}, "lifetime"),
    ],
)
def test_refused_claims(over: dict[str, object], says: str) -> None:
    with pytest.raises(ClaimError, match=None) as info:
        claims(**over)
    assert says in str(info.value)


def test_subject_limit_is_bytes_not_characters() -> None:
    check_subject("user:" + "é" * 61)  # 5 + 122 bytes
    with pytest.raises(ClaimError, match="128 bytes"):
        check_subject("user:" + "é" * 62)
    check_issuer("x" * 128)


@pytest.mark.parametrize("alg", ["EdDSA", "ES384", "PS256", "HS256", "none", "RS512"])
def test_only_es256_and_rs256_for_spacetimedb(alg: str) -> None:
    with pytest.raises(ClaimError, match="refused for SpacetimeDB"):
        check_algorithm(alg)
    check_algorithm("ES256")
    check_algorithm("RS256")


SCHED = Schedule(publish_lead_s=360, max_token_lifetime_s=900, retire_margin_s=120, rotate_after_s=86400)


def test_rotation_schedule_publish_before_use_and_retire_after_last_token() -> None:
    k1 = KeyTimes("k1", 0, 0)
    k2 = KeyTimes("k2", 1000, 1360)  # created at 1000, signs from 1360
    keys = [k1, k2]
    assert states(keys, 1000, SCHED) == {"k1": KeyState.SIGNING, "k2": KeyState.PENDING}
    assert published(keys, 1000, SCHED) == ["k1", "k2"]
    assert states(keys, 1359, SCHED)["k1"] is KeyState.SIGNING
    assert states(keys, 1360, SCHED) == {"k1": KeyState.RETIRING, "k2": KeyState.SIGNING}
    # k1's last token was minted just before 1360 and lives 900 s; + 120 s margin.
    assert published(keys, 1360 + 900 + 119, SCHED) == ["k1", "k2"]
    assert published(keys, 1360 + 900 + 120, SCHED) == ["k2"]
    assert states(keys, 2380, SCHED)["k1"] is KeyState.RETIRED


def test_next_event_and_rotation_due() -> None:
    k1 = KeyTimes("k1", 0, 0)
    assert not rotation_due([k1], 86399, SCHED)
    assert rotation_due([k1], 86400, SCHED)
    assert rotation_due([], 0, SCHED)
    assert next_event([k1], 10, SCHED) == 86400
    k2 = KeyTimes("k2", 86400, 86760)
    assert not rotation_due([k1, k2], 86500, SCHED)  # one pending already
    assert next_event([k1, k2], 86500, SCHED) == 86760
    assert next_event([k1, k2], 86760, SCHED) == 86760 + 900 + 120
    never = Schedule(publish_lead_s=360, max_token_lifetime_s=900, retire_margin_s=120, rotate_after_s=0)
    assert not rotation_due([k1], 10**9, never)
    assert next_event([k1], 10, never) is None
