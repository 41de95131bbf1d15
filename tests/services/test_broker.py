"""The broker: key ring on disk, rotation on (virtual) time, JWKS, minting under the contract."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import jwt
import pytest
import trio
import trio.testing

from gatewayd.errors import ConfigError
from gatewayd.proto.claims import ClaimError
from gatewayd.proto.keyring import KeyState
from gatewayd.proto.tokens import IssuerKeys, Principal, Verifier, load_jwks
from gatewayd.services.broker import Broker, BrokerSettings, KeyRing

ISS = "https://gw.example.com"
BASE = 1_800_000_000.0


def make_broker(folder: Path, clock: list[float], **over: object) -> Broker:
    params: dict[str, object] = {"issuer": ISS, "publish_lead_s": 360.0, "token_lifetime_s": 300,
                                 "service_token_lifetime_s": 900, "retire_margin_s": 120.0,
                                 "rotate_after_s": 0.0}  # fmt: skip
    params.update(over)
    b = Broker(BrokerSettings(**params), KeyRing(folder), wall_clock=lambda: clock[0])  # type: ignore[arg-type]
    b.load()
    return b


def verify(b: Broker, token: str, now: float) -> dict[str, object]:
    keys = load_jwks(b.jwks(), ["ES256", "RS256"])
    v = Verifier([IssuerKeys(issuer=ISS, keys=keys, audience="spacetimedb", algorithms=frozenset({"ES256", "RS256"}),
                             max_lifetime_s=900)])  # fmt: skip
    return dict(v.verify(token, now=now).claims)


def user(**over: object) -> Principal:
    params: dict[str, object] = {"subject": "user:u-1", "kind": "human", "tenant": "acme",
                                 "scopes": frozenset({"document.read"}), "issuer": "https://app.example.com",
                                 "session_id": "s-1", "claims": {"membership_version": 7}}  # fmt: skip
    params.update(over)
    return Principal(**params)  # type: ignore[arg-type]


def test_empty_ring_gets_one_key_active_at_once(tmp_path: Path) -> None:
    clock = [BASE]
    b = make_broker(tmp_path / "keys", clock)
    (key,) = b.keys()
    assert b.key_states() == {key.kid: KeyState.SIGNING}
    folder = tmp_path / "keys"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (f,) = list(folder.iterdir())
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    doc = json.loads(f.read_text())
    assert doc["kid"] == key.kid and doc["alg"] == "ES256" and "PRIVATE KEY" in doc["private_key_pem"]
    jwk = b.jwks()["keys"][0]
    assert jwk["kid"] == key.kid and jwk["alg"] == "ES256" and jwk["use"] == "sig" and "d" not in jwk


def test_mint_follows_the_claim_contract(tmp_path: Path) -> None:
    clock = [BASE]
    b = make_broker(tmp_path, clock)
    token, claims = b.mint_for(user(delegated_by="robot:int-1"))
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256" and header["kid"] == b.keys()[0].kid
    got = verify(b, token, BASE)
    assert got == claims
    assert got["sub"] == "user:u-1" and got["aud"] == "spacetimedb" and got["exp"] == int(BASE) + 300
    assert got["sid"] == "s-1" and got["tenant_id"] == "acme" and got["membership_version"] == 7
    assert got["act"] == {"sub": "robot:int-1"} and got["token_type"] == "spacetime-access"


def test_api_key_principals_carry_key_id_and_grant_version(tmp_path: Path) -> None:
    b = make_broker(tmp_path, [BASE])
    robot = Principal(subject="robot:int-1", kind="robot", tenant="acme", scopes=frozenset(), issuer="x",
                      claims={"api_key_id": "k-1", "grant_version": 3}, credential="api_key")  # fmt: skip
    _, claims = b.mint_for(robot)
    assert (claims["api_key_id"], claims["grant_version"], claims["sub"]) == ("k-1", 3, "robot:int-1")


@pytest.mark.parametrize("subject", ["u-1", "user:a|b", "user:" + "x" * 200, "alice@example.com"])
def test_refuses_to_mint_outside_the_subject_scheme(tmp_path: Path, subject: str) -> None:
    b = make_broker(tmp_path, [BASE])
    with pytest.raises(ClaimError):
        b.mint_for(user(subject=subject))


@pytest.mark.parametrize("alg", ["EdDSA", "ES384", "HS256", "PS256"])
def test_other_algorithms_are_refused(tmp_path: Path, alg: str) -> None:
    with pytest.raises(ClaimError, match="refused for SpacetimeDB"):
        make_broker(tmp_path, [BASE], algorithm=alg)


def test_rs256_ring(tmp_path: Path) -> None:
    b = make_broker(tmp_path, [BASE], algorithm="RS256")
    token, _ = b.mint_for(user())
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert verify(b, token, BASE)["sub"] == "user:u-1"


def test_rotation_publishes_first_then_signs_then_retires(tmp_path: Path) -> None:
    clock = [BASE]
    b = make_broker(tmp_path, clock)
    k1 = b.keys()[0].kid
    k2 = b.rotate().kid
    assert [k["kid"] for k in b.jwks()["keys"]] == [k1, k2]
    clock[0] = BASE + 359
    assert jwt.get_unverified_header(b.mint_for(user())[0])["kid"] == k1
    clock[0] = BASE + 360
    assert jwt.get_unverified_header(b.mint_for(user())[0])["kid"] == k2
    # k1 signed a 900 s service token at BASE+359 at the latest: published until +900 +120 margin.
    clock[0] = BASE + 360 + 900 + 119
    b.maintain()
    assert [k["kid"] for k in b.jwks()["keys"]] == [k1, k2]
    clock[0] = BASE + 360 + 900 + 120
    b.maintain()
    assert [k["kid"] for k in b.jwks()["keys"]] == [k2]
    assert not (tmp_path / f"{k1}.json").exists()


def test_a_key_added_while_running_is_not_used_before_the_lead(tmp_path: Path) -> None:
    clock = [BASE]
    running = make_broker(tmp_path, clock)
    k1 = running.keys()[0].kid
    # `gatewayd keys rotate` from another process, whose schedule says "sign from BASE + 10":
    other = KeyRing(tmp_path).generate("ES256", now=BASE - 1000, activate_at=BASE + 10)
    clock[0] = BASE + 20
    running.rescan()
    assert other.kid in [k["kid"] for k in running.jwks()["keys"]]
    assert jwt.get_unverified_header(running.mint_for(user())[0])["kid"] == k1
    clock[0] = BASE + 20 + 360
    assert jwt.get_unverified_header(running.mint_for(user())[0])["kid"] == other.kid


def test_restart_keeps_the_schedule_on_disk(tmp_path: Path) -> None:
    clock = [BASE]
    b = make_broker(tmp_path, clock)
    k2 = b.rotate()
    clock[0] = BASE + 400
    again = make_broker(tmp_path, clock)  # a restart after k2 became active
    assert again.signing_key().kid == k2.kid


async def test_serve_rotates_and_retires_on_virtual_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    def wall() -> float:
        return BASE + trio.current_time()

    b = Broker(
        BrokerSettings(
            issuer=ISS,
            publish_lead_s=360,
            token_lifetime_s=300,
            service_token_lifetime_s=900,
            retire_margin_s=120,
            rotate_after_s=3600,
            rescan_s=30,
        ),
        KeyRing(tmp_path),
        wall_clock=wall,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(b.serve)
        k1 = b.signing_key().kid
        await trio.sleep(3600 + 1)
        assert len(b.keys()) == 2 and b.signing_key().kid == k1
        await trio.sleep(360)
        k2 = b.signing_key().kid
        assert k2 != k1
        await trio.sleep(900 + 120)
        assert [k["kid"] for k in b.jwks()["keys"]] == [k2]
        assert sorted(os.listdir(tmp_path)) == [f"{k2}.json"]
        nursery.cancel_scope.cancel()


async def test_service_token_is_a_token_source(tmp_path: Path) -> None:
    b = make_broker(tmp_path, [BASE], service_subject="robot:gatewayd")
    cred = await b.service_token()
    assert cred.token is not None and cred.expires_at == BASE + 900
    claims = verify(b, cred.token, BASE)
    assert claims["sub"] == "robot:gatewayd" and claims["iss"] == ISS


def test_openid_configuration(tmp_path: Path) -> None:
    doc = make_broker(tmp_path, [BASE]).openid_configuration()
    assert doc["issuer"] == ISS
    assert doc["jwks_uri"] == ISS + "/.well-known/jwks.json"


def test_unusable_key_files_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"kid": "x"}')
    with pytest.raises(ConfigError, match=r"bad\.json"):
        make_broker(tmp_path, [BASE])
