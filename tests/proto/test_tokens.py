"""The sync inbound verifier against every row of SECURITY.md's table, plus what it accepts."""

from __future__ import annotations

import time

import pytest

from gatewayd.proto.tokens import IssuerKeys, TokenInvalid, Verifier, load_jwks

from ..authcases import AUDIENCE, REJECT_CASES, Case, IssuerKit


@pytest.fixture(scope="module")
def kit() -> IssuerKit:
    return IssuerKit()


def verifier_for(kit: IssuerKit, **over: object) -> Verifier:
    algs = ["ES256", "EdDSA", "RS256"]
    params: dict[str, object] = {
        "issuer": kit.issuer,
        "keys": load_jwks(kit.jwks(), algs),
        "audience": AUDIENCE,
        "algorithms": frozenset(algs),
        "subject_prefix": "user:",
    }
    params.update(over)
    return Verifier([IssuerKeys(**params)])  # type: ignore[arg-type]


@pytest.mark.parametrize("kid", ["k-es", "k-ed", "k-rs"])
def test_accepts_each_inbound_algorithm(kit: IssuerKit, kid: str) -> None:
    p = verifier_for(kit).verify(kit.token(kid=kid), now=time.time())
    assert p.subject == "user:u-1"
    assert p.kind == "human"
    assert p.tenant == "acme"
    assert p.scopes == frozenset({"document.read"})
    assert p.credential == "jwt"


def test_audience_array_must_contain_ours(kit: IssuerKit) -> None:
    v = verifier_for(kit)
    assert v.verify(kit.token(aud=["other", AUDIENCE]), now=time.time()).subject == "user:u-1"
    with pytest.raises(TokenInvalid, match="audience"):
        v.verify(kit.token(aud=["other"]), now=time.time())


@pytest.mark.parametrize("case", REJECT_CASES, ids=lambda c: c.id)
def test_security_table_row_is_rejected(kit: IssuerKit, case: Case) -> None:
    token = case.make(kit)
    with pytest.raises(TokenInvalid) as info:
        verifier_for(kit).verify(token, now=time.time())
    assert case.says.lower() in info.value.message.lower(), info.value.message


def test_algorithm_allow_list_is_per_issuer(kit: IssuerKit) -> None:
    v = verifier_for(kit, algorithms=frozenset({"EdDSA"}), keys=load_jwks(kit.jwks(), ["EdDSA"]))
    assert v.verify(kit.token(kid="k-ed"), now=time.time()).subject == "user:u-1"
    with pytest.raises(TokenInvalid, match="not allowed for this issuer"):
        v.verify(kit.token(kid="k-es"), now=time.time())


def test_lifetime_cap_and_leeway(kit: IssuerKit) -> None:
    now = int(time.time())
    v = verifier_for(kit, max_lifetime_s=600, leeway_s=30)
    with pytest.raises(TokenInvalid, match="lifetime"):
        v.verify(kit.token(iat=now, exp=now + 601), now=now)
    # Within leeway: just expired 20 s ago, issued 20 s in the future: accepted.
    assert v.verify(kit.token(iat=now - 300, exp=now - 20), now=now)
    assert v.verify(kit.token(iat=now + 20, exp=now + 300), now=now)
    with pytest.raises(TokenInvalid, match="expired"):
        v.verify(kit.token(iat=now - 300, exp=now - 31), now=now)


def test_jwks_filter_drops_unsafe_keys(kit: IssuerKit) -> None:
    good = kit.jwk("k-es")
    doc = {
        "keys": [
            good,
            {**kit.jwk("k-rs"), "kid": "no-use", "use": "enc"},
            {k: v for k, v in kit.jwk("k-ed").items() if k != "kid"},
            {**kit.jwk("k-es"), "kid": "private", "d": "AAAA"},
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": good["x"], "y": good["y"]},
            {**kit.jwk("k-rs"), "kid": "small-rsa", "n": "AQAB" * 20},
            "not an object",
        ]
    }
    assert sorted(load_jwks(doc, ["ES256", "EdDSA", "RS256"])) == ["k-es"]


def test_robot_subjects_and_delegation(kit: IssuerKit) -> None:
    v = verifier_for(kit, subject_prefix="")
    p = v.verify(kit.token(sub="robot:int-1", act={"sub": "user:u-1"}, sid="s-9"), now=time.time())
    assert (p.kind, p.delegated_by, p.session_id) == ("robot", "user:u-1", "s-9")


def test_default_scopes_when_the_token_has_none(kit: IssuerKit) -> None:
    from ..authcases import DROP

    v = verifier_for(kit, default_scopes=frozenset({"document.read", "document.create"}))
    p = v.verify(kit.token(scope=DROP), now=time.time())
    assert p.scopes == {"document.read", "document.create"}
