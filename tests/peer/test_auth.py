"""Token rules (PROTOCOL.md §6): the peer's own key, foreign issuers over OIDC discovery."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gatewayd.peer import Peer, open_peer
from gatewayd.proto import messages as m
from gatewayd.proto.identity import identity_hex

from .conftest import connect


class OidcIssuer:
    """A tiny OIDC issuer on 127.0.0.1: discovery document + JWKS, with a request log."""

    def __init__(self) -> None:
        self.port = 0
        self.private: dict[str, Any] = {}
        self.jwks: list[dict[str, Any]] = []
        self.discovery_hits: list[str] = []
        self.jwks_hits = 0
        self.down = False  # answer 503 to everything

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_key(self, kid: str | None, kind: str = "EC") -> None:
        key: Any
        if kind == "EC":
            key = ec.generate_private_key(ec.SECP256R1())
            jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        elif kind == "P-384":
            key = ec.generate_private_key(ec.SECP384R1())
            jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        elif kind == "RSA":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        else:
            key = ed25519.Ed25519PrivateKey.generate()
            jwk = json.loads(OKPAlgorithm.to_jwk(key.public_key()))
        if kid is not None:
            jwk["kid"] = kid
        self.private[kid or f"nokid-{len(self.private)}"] = key
        self.jwks.append(jwk)

    def token(
        self,
        sub: str,
        *,
        kid: str | None = "k1",
        key_id: str | None = None,
        alg: str = "ES256",
        iss: str | None = None,
        **claims: Any,
    ) -> str:
        payload: dict[str, Any] = {
            "iss": iss or self.url,
            "sub": sub,
            "iat": int(time.time()),
            "aud": "gatewayd",
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not _DROP}
        headers = {"kid": kid} if kid is not None else {}
        return jwt.encode(payload, self.private[key_id or kid or "k1"], algorithm=alg, headers=headers)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(4096))
                    continue
                if not isinstance(ev, h11.Request):
                    return
                path = ev.target.decode()
                if self.down:
                    body, status = b"down", 503
                elif path.endswith("/.well-known/openid-configuration"):
                    self.discovery_hits.append(path)
                    body = json.dumps({"issuer": self.url, "jwks_uri": f"{self.url}/jwks.json"}).encode()
                    status = 200
                elif path == "/jwks.json":
                    self.jwks_hits += 1
                    body = json.dumps({"keys": self.jwks}).encode()
                    status = 200
                else:
                    body, status = b"not found", 404
                data = conn.send(
                    h11.Response(
                        status_code=status,
                        headers=[("content-length", str(len(body))), ("connection", "close")],
                    )
                )
                data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
                await stream.send_all(data)
                return


_DROP = object()


@pytest.fixture
async def issuer(nursery: trio.Nursery) -> OidcIssuer:
    iss = OidcIssuer()
    iss.add_key("k1")
    await nursery.start(iss.serve)
    return iss


@pytest.fixture
async def fast_peer() -> AsyncIterator[Peer]:
    async with open_peer("demo", jwks_refresh_s=0.5, close_timeout_s=0.5) as p:
        yield p


async def upgrade_status(peer: Peer, token: str) -> tuple[int, str]:
    """What an upgrade with this token gets: 101, or the error status and text."""
    async with httpx.AsyncClient(base_url=peer.base_url, trust_env=False) as client:
        r = await client.post("/v1/identity/websocket-token", headers={"Authorization": f"Bearer {token}"})
    return r.status_code, r.text


async def test_foreign_es256_token_connects_with_the_derived_identity(
    fast_peer: Peer, issuer: OidcIssuer
) -> None:
    token = issuer.token("user:alice", tenant_id="acme")
    async with connect(fast_peer, token=token) as c:
        assert c.initial is not None
        assert c.initial.identity == identity_hex(issuer.url, "user:alice")
        (info,) = fast_peer.connections
        assert info.claims["tenant_id"] == "acme"
        assert info.claims["aud"] == "gatewayd"
        res = await c.call("create_document", {"tenant_id": "acme", "title": "oidc", "body": ""})
        assert isinstance(res.outcome, m.ReducerOk)
    assert issuer.discovery_hits == ["/.well-known/openid-configuration"]


async def test_rs256_and_kidless_tokens(fast_peer: Peer, issuer: OidcIssuer) -> None:
    issuer.add_key("r1", kind="RSA")
    assert (await upgrade_status(fast_peer, issuer.token("a", kid="r1", alg="RS256")))[0] == 200
    # without a kid every key is tried
    assert (await upgrade_status(fast_peer, issuer.token("a", kid=None, key_id="r1", alg="RS256")))[0] == 200
    # RS256 header on an EC key is refused
    status, _text = await upgrade_status(fast_peer, issuer.token("a", kid="k1", key_id="r1", alg="RS256"))
    assert status == 401


async def test_unknown_kid_is_refused_without_refetch_until_the_refresh(
    fast_peer: Peer, issuer: OidcIssuer
) -> None:
    assert (await upgrade_status(fast_peer, issuer.token("a")))[0] == 200
    issuer.add_key("k2")
    for _ in range(3):
        status, text = await upgrade_status(fast_peer, issuer.token("a", kid="k2"))
        assert (status, text) == (401, "Specified key ID not found in JWKs")
    assert len(issuer.discovery_hits) == 1
    assert issuer.jwks_hits == 1
    await trio.sleep(0.6)  # jwks_refresh_s=0.5
    assert (await upgrade_status(fast_peer, issuer.token("a", kid="k2")))[0] == 200
    assert len(issuer.discovery_hits) == 2


async def test_default_refresh_period_is_300_seconds() -> None:
    async with open_peer("demo") as p:
        assert p.auth.jwks_refresh_s == 300
        assert p.auth.jwks_expiry_s == 7200


async def test_jwks_key_without_kid_refuses_the_whole_set(fast_peer: Peer, issuer: OidcIssuer) -> None:
    issuer.add_key(None)
    status, text = await upgrade_status(fast_peer, issuer.token("a"))
    assert status == 401
    assert "no kid" in text


@pytest.mark.parametrize("kind", ["P-384", "Ed25519"])
async def test_only_p256_and_rsa_keys_are_usable(fast_peer: Peer, issuer: OidcIssuer, kind: str) -> None:
    issuer.add_key("odd", kind=kind)
    status, text = await upgrade_status(fast_peer, issuer.token("a"))
    assert status == 401
    assert "odd" in text


async def test_hs256_and_none_are_refused(fast_peer: Peer, issuer: OidcIssuer) -> None:
    hs = jwt.encode({"iss": issuer.url, "sub": "a", "iat": int(time.time())}, "secret" * 8, algorithm="HS256")
    assert (await upgrade_status(fast_peer, hs))[0] == 401
    none = jwt.encode({"iss": issuer.url, "sub": "a", "iat": int(time.time())}, "", algorithm="none")
    assert (await upgrade_status(fast_peer, none))[0] == 401


@pytest.mark.parametrize(
    ("claims", "needle"),
    [
        ({"iat": _DROP}, "iat"),
        ({"iat": 1.5}, "iat"),
        ({"sub": "x" * 129}, "Subject too long"),
        ({"sub": ""}, "Subject empty"),
        ({"hex_identity": "c200" + "0" * 60}, "Identity mismatch"),
        ({"exp": int(time.time()) - 120}, "ExpiredSignature"),
        ({"sub": 5}, "sub must be a string"),
    ],
)
async def test_claim_rules(fast_peer: Peer, issuer: OidcIssuer, claims: dict[str, Any], needle: str) -> None:
    sub = claims.pop("sub", "user:alice")
    status, text = await upgrade_status(fast_peer, issuer.token(sub, **claims))
    assert status == 401
    assert needle in text


async def test_claims_that_are_not_checked(fast_peer: Peer, issuer: OidcIssuer) -> None:
    now = int(time.time())
    for extra in (
        {"exp": now - 30},
        {"nbf": now + 3600},
        {"iat": now + 3600},
        {"aud": ["x", "y"]},
        {"exp": None},
        {"jti": 5},
    ):
        status, text = await upgrade_status(fast_peer, issuer.token("a", **extra))
        assert status == 200, (extra, text)
    ok = issuer.token("a", hex_identity=identity_hex(issuer.url, "a"))
    assert (await upgrade_status(fast_peer, ok))[0] == 200


async def test_issuer_of_129_bytes_is_refused(fast_peer: Peer, issuer: OidcIssuer) -> None:
    long_iss = issuer.url + "/" + "i" * (129 - len(issuer.url) - 1)
    assert len(long_iss) == 129
    status, text = await upgrade_status(fast_peer, issuer.token("a", iss=long_iss))
    assert status == 401
    assert "Issuer too long" in text


async def test_trailing_slash_changes_the_identity_but_not_the_discovery_url(
    fast_peer: Peer, issuer: OidcIssuer
) -> None:
    token = issuer.token("user:alice", iss=issuer.url + "/")
    async with connect(fast_peer, token=token) as c:
        assert c.initial is not None
        assert c.initial.identity == identity_hex(issuer.url + "/", "user:alice")
        assert c.initial.identity != identity_hex(issuer.url, "user:alice")
    assert issuer.discovery_hits == ["/.well-known/openid-configuration"]


async def test_local_issuer_tokens_need_the_peers_signature(fast_peer: Peer) -> None:
    forged = jwt.encode(
        {"iss": "localhost", "sub": "x", "iat": int(time.time())},
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
    )
    status, text = await upgrade_status(fast_peer, forged)
    assert status == 401
    assert "InvalidSignature" in text
    assert fast_peer.auth.stats.discovery_fetches == {}


async def test_peer_signed_tokens_validate_for_any_issuer_without_discovery(fast_peer: Peer) -> None:
    token = fast_peer.auth.mint("user:carol", issuer="https://unreachable.invalid")
    async with connect(fast_peer, token=token) as c:
        assert c.initial is not None
        assert c.initial.identity == identity_hex("https://unreachable.invalid", "user:carol")
    assert fast_peer.auth.stats.discovery_fetches == {}


async def test_unreachable_issuer_is_refused(fast_peer: Peer) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(
        {"iss": "http://127.0.0.1:9", "sub": "x", "iat": int(time.time())},
        key,
        algorithm="ES256",
        headers={"kid": "a"},
    )
    status, text = await upgrade_status(fast_peer, token)
    assert status == 401
    assert "Error fetching public key for issuer http://127.0.0.1:9" in text


async def test_https_only_when_http_issuers_are_not_allowed(issuer: OidcIssuer) -> None:
    async with open_peer("demo", allow_http_issuers=False) as p:
        status, text = await upgrade_status(p, issuer.token("a"))
        assert status == 401
        assert "https" in text
        assert issuer.discovery_hits == []


async def test_websocket_token_from_a_foreign_token_keeps_its_claims(
    fast_peer: Peer, issuer: OidcIssuer
) -> None:
    status, body = await upgrade_status(fast_peer, issuer.token("user:alice", tenant_id="acme"))
    assert status == 200
    short = json.loads(body)["token"]
    claims = jwt.decode(short, fast_peer.auth.public_key, algorithms=["ES256"], options={"verify_aud": False})
    assert claims["iss"] == issuer.url
    assert claims["aud"] == ["gatewayd"]
    assert claims["tenant_id"] == "acme"
    # it is the peer's signature now: it validates with no further discovery
    hits = len(issuer.discovery_hits)
    async with connect(fast_peer, token=short, token_in_query=True) as c:
        assert c.initial is not None
        assert c.initial.token == short
    assert len(issuer.discovery_hits) == hits


async def test_a_failed_refresh_keeps_the_old_keys_until_they_expire(issuer: OidcIssuer) -> None:
    async with open_peer("demo", jwks_refresh_s=0.2, jwks_expiry_s=0.8) as p:
        assert (await upgrade_status(p, issuer.token("a")))[0] == 200
        issuer.down = True
        await trio.sleep(0.3)  # past the refresh period: the refresh fails, the old keys serve
        assert (await upgrade_status(p, issuer.token("a")))[0] == 200
        assert len(issuer.discovery_hits) == 1
        await trio.sleep(0.6)  # past the expiry: no keys at all
        status, text = await upgrade_status(p, issuer.token("a"))
        assert status == 401
        assert "Error fetching public key" in text
        assert "503" in text
