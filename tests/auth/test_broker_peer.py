"""The broker against the dev peer, whose JWKS handling mirrors SpacetimeDB's (refresh period,
no refetch on an unknown kid): SCENARIOS.md S5 and S6.

The peer discovers gatewayd's issuer over HTTP (``<iss>/.well-known/openid-configuration`` ->
``jwks_uri``), exactly as SpacetimeDB does, with the issuer on 127.0.0.1.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
import trio.lowlevel
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from gatewayd.config import parse_config
from gatewayd.main import Gateway, build_gateway, serve_gateway
from gatewayd.peer import Peer, PeerAuth, open_peer
from gatewayd.peer.module import Module, ReducerContext, ReducerError
from gatewayd.proto import messages as m
from gatewayd.proto.claims import ClaimError, access_claims, check_algorithm
from gatewayd.proto.identity import identity_hex
from gatewayd.proto.sats import STRING
from gatewayd.proto.tokens import Principal
from gatewayd.services.broker import Broker
from gatewayd.tools.tokens import verify_token

from ..peer.conftest import connect

AUD = "spacetimedb"


def claims_module(seen: list[dict[str, Any]]) -> Module:
    """Records the claims of every connection; refuses foreign tokens without our audience (the
    check SpacetimeDB leaves to modules)."""
    mod = Module("claims")
    mod.table("visit", {"sub": STRING}, primary_key="sub")

    @mod.client_connected
    def connected(ctx: ReducerContext) -> None:
        seen.append(dict(ctx.claims or {}))
        if ctx.issuer not in (None, "localhost") and AUD not in ctx.audience:
            reason = f"module refused: token audience {list(ctx.audience)} does not include {AUD}"
            seen.append({"refused": reason})
            raise ReducerError(reason)

    return mod


@dataclass
class BrokerStack:
    gateway: Gateway
    broker: Broker
    peer: Peer
    url: str
    seen: list[dict[str, Any]]


@asynccontextmanager
async def open_broker_stack(
    tmp: Path, *, refresh_s: float = 300.0, upstream: bool = True, **broker: Any
) -> AsyncIterator[BrokerStack]:
    seen: list[dict[str, Any]] = []
    auth = PeerAuth(jwks_refresh_s=refresh_s)
    async with open_peer(claims_module(seen), auth=auth) as peer:
        doc = {
            "upstream": {"url": peer.base_url if upstream else "http://127.0.0.1:9", "database": "claims",
                         "backoff_initial_s": 1.0},
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"issuer": "", "keys_dir": "keys", "profile": "development", "audience": AUD, **broker},
        }  # fmt: skip
        gateway = build_gateway(parse_config(doc, base=tmp), base=tmp)
        assert gateway.broker is not None
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                await serve_gateway(gateway, shutdown=shutdown, shutdown_grace_s=1.0, task_status=task_status)

            host, port = (await nursery.start(run))[0]
            try:
                yield BrokerStack(gateway, gateway.broker, peer, f"http://{host}:{port}", seen)
            finally:
                shutdown.set()


def user(subject: str = "user:u-1") -> Principal:
    return Principal(subject=subject, kind="human", tenant="acme", scopes=frozenset({"document.read"}),
                     issuer="https://app.example.com", session_id="s-1",
                     claims={"membership_version": 4})  # fmt: skip


async def connect_status(peer: Peer, token: str) -> tuple[bool, str]:
    """A real WebSocket connect: (True, identity) on InitialConnection, else (False, reason)."""
    url = peer.subscribe_url("claims", compression="None")
    try:
        async with open_websocket_url(
            url, subprotocols=list(m.OFFERED_PROTOCOLS),
            extra_headers=[(b"Authorization", f"Bearer {token}".encode())], connect_timeout=10,
            disconnect_timeout=1,
        ) as ws:  # fmt: skip
            try:
                raw = await ws.get_message()
            except ConnectionClosed:
                # As SpacetimeDB: a client_connected refusal is a 101, then a dropped socket.
                return False, "dropped after the upgrade (client_connected refused)"
            assert isinstance(raw, bytes)
            (msg, *_) = m.decode_server_payload(raw, m.Protocol(ws.subprotocol))
            assert isinstance(msg, m.InitialConnection), msg
            return True, msg.identity
    except ConnectionRejected as exc:
        return False, (exc.body or b"").decode(errors="replace")


async def upgrade_status(peer: Peer, token: str) -> tuple[bool, str]:
    """The peer's token validation without a WebSocket (its websocket-token endpoint runs the same
    validator as the upgrade; trio-websocket leaks the socket of a refused handshake)."""
    async with httpx.AsyncClient(base_url=peer.base_url, trust_env=False) as client:
        r = await client.post("/v1/identity/websocket-token", headers={"Authorization": f"Bearer {token}"})
    return r.status_code == 200, r.text


def failed_checks(token: str, broker: Broker) -> list[str]:
    """What `gatewayd token verify` (its engine) says is wrong, as 'name: detail' lines."""
    report = verify_token(token, jwks=broker.jwks(), issuer=broker.issuer, audience=AUD, spacetimedb=True)
    return [f"{c.name}: {c.detail}" for c in report.failed]


# --- S5 ------------------------------------------------------------------------------------------


async def test_s5_minted_token_connects_and_the_module_sees_the_claims(tmp_path: Path) -> None:
    async with open_broker_stack(tmp_path) as s:
        token, claims = s.broker.mint_for(user())
        assert jwt.get_unverified_header(token)["alg"] == "ES256"
        ok, ident = await connect_status(s.peer, token)
        assert ok, ident
        assert ident == identity_hex(s.url, "user:u-1")
        (got,) = [c for c in s.seen if c.get("jti") == claims["jti"]]
        assert got == claims
        assert (got["iss"], got["sub"], got["aud"], got["token_type"]) == (
            s.url,
            "user:u-1",
            AUD,
            "spacetime-access",
        )
        assert got["tenant_id"] == "acme" and got["sid"] == "s-1" and got["membership_version"] == 4
        assert got["exp"] - got["iat"] == 300 and got["jti"]
        assert failed_checks(token, s.broker) == []
        # The service connection took its token from the broker too (the supervisor connected).
        with trio.fail_after(10):
            while not any(c.get("sub") == "robot:gatewayd" for c in s.seen):
                await trio.sleep(0.05)
        service = next(c for c in s.seen if c.get("sub") == "robot:gatewayd")
        assert service["iss"] == s.url and service["exp"] - service["iat"] == 900


def _sign(broker: Broker, claims: dict[str, Any], alg: str = "ES256", key: Any = None) -> str:
    k = broker.signing_key()
    return jwt.encode(claims, key or k.private_key, algorithm=alg, headers={"kid": k.kid})


async def test_s5_bad_variants_are_refused_and_explained(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    async with open_broker_stack(tmp_path, upstream=False) as s:
        now = int(time.time())
        base = access_claims(issuer=s.url, subject="user:u-1", audience=AUD, now=now, lifetime_s=300)

        # EdDSA: gatewayd refuses to run its broker with it; a hand-made EdDSA token is refused
        # by the peer (SpacetimeDB accepts ES256/RS256 only) and by `token verify`.
        with pytest.raises(ClaimError, match="refused for SpacetimeDB"):
            check_algorithm("EdDSA")
        eddsa = _sign(s.broker, base, "EdDSA", ed25519.Ed25519PrivateKey.generate())
        ok, why = await upgrade_status(s.peer, eddsa)
        assert not ok and "InvalidAlgorithm" in why
        assert any("EdDSA" in line for line in failed_checks(eddsa, s.broker)), failed_checks(eddsa, s.broker)

        # Missing iat: gatewayd always sets it; without it the peer refuses.
        no_iat = _sign(s.broker, {k: v for k, v in base.items() if k != "iat"})
        ok, why = await upgrade_status(s.peer, no_iat)
        assert not ok and "iat" in why
        assert any("iat" in line for line in failed_checks(no_iat, s.broker))

        # Wrong aud: SpacetimeDB does not check it; the module does (and refuses).
        wrong_aud = _sign(s.broker, {**base, "aud": "someone-else"})
        async with connect(s.peer, token=wrong_aud, expect_initial=False) as c:
            code, _ = await c.closed()  # a 101, then a dropped socket: no InitialConnection
            assert code == 1006 and c.payloads == []
        assert s.seen[-1] == {
            "refused": f"module refused: token audience ['someone-else'] does not include {AUD}"
        }
        assert any("aud" in line for line in failed_checks(wrong_aud, s.broker))

        # A foreign issuer: the peer finds no keys there.
        foreign = _sign(s.broker, {**base, "iss": "http://127.0.0.1:9"})
        ok, why = await upgrade_status(s.peer, foreign)
        assert not ok and "Error fetching public key" in why
        assert any("iss" in line for line in failed_checks(foreign, s.broker))

        # sub over 128 bytes: gatewayd refuses to mint; the peer refuses a hand-made one.
        with pytest.raises(ClaimError, match="128 bytes"):
            s.broker.mint_for(user("user:" + "x" * 124))
        long_sub = _sign(s.broker, {**base, "sub": "user:" + "x" * 124})
        ok, why = await upgrade_status(s.peer, long_sub)
        assert not ok and "Subject too long" in why
        assert any("sub" in line and "128" in line for line in failed_checks(long_sub, s.broker))


# --- S6 ------------------------------------------------------------------------------------------


async def test_s6_rotation_with_no_rejection_window(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Refresh period shortened to 60 s by config; time is MockClock's (jumped by hand; the
    sockets are real, so no autojump)."""
    refresh, lead, lifetime, margin = 60.0, 75, 300, 30
    async with open_broker_stack(tmp_path, refresh_s=refresh, upstream=False, spacetime_jwks_refresh_s=60,
                                 publish_lead_s=lead, token_lifetime_s=lifetime,
                                 service_token_lifetime_s=lifetime, retire_margin_s=margin,
                                 rotate_after_s=0) as s:  # fmt: skip
        real_base = time.time() - trio.current_time()
        s.broker.wall_clock = lambda: real_base + trio.current_time()
        k1 = s.broker.signing_key().kid
        ok, why = await connect_status(s.peer, s.broker.mint_for(user())[0])
        assert ok, why
        assert s.peer.auth.stats.discovery_fetches[s.url] == 1

        http = httpx.AsyncClient(base_url=s.url, trust_env=False)
        k2 = s.broker.rotate().kid  # published now, signs after `lead`
        start = trio.current_time()
        failures: list[str] = []
        used: list[str] = []
        published_k1: list[float] = []
        while trio.current_time() - start < lead + lifetime + margin + 10:
            s.broker.maintain()
            token = s.broker.mint_for(user())[0]
            used.append(jwt.get_unverified_header(token)["kid"])
            ok, why = await upgrade_status(s.peer, token)
            if not ok:
                failures.append(f"t+{trio.current_time() - start:.0f}: {why}")
            jwks = (await http.get("/.well-known/jwks.json")).json()
            if k1 in [k["kid"] for k in jwks["keys"]]:
                published_k1.append(trio.current_time() - start)
            mock_clock.jump(5)
            await trio.lowlevel.checkpoint()
        assert failures == []
        assert used[0] == k1 and used[-1] == k2
        switch = used.index(k2) * 5
        assert lead <= switch < lead + 5  # signs with k2 only after publish lead >= refresh + margin
        assert s.peer.auth.stats.discovery_fetches[s.url] >= 2  # the peer refreshed on its own period
        # k1 stayed published until its last token (minted just before the switch) had expired.
        assert max(published_k1) >= lead + lifetime
        assert max(published_k1) < lead + lifetime + margin + 5

        # Negative control: sign with a brand-new key at once. The peer refuses (it does not
        # refetch on an unknown kid), while the broker's own schedule keeps signing with k2.
        k3 = s.broker.ring.generate("ES256", now=s.broker.wall_clock(), activate_at=s.broker.wall_clock())
        s.broker.rescan()
        assert s.broker.signing_key().kid == k2
        rushed = jwt.encode(access_claims(issuer=s.url, subject="user:u-1", audience=AUD,
                                          now=int(s.broker.wall_clock()), lifetime_s=300),
                            k3.private_key, algorithm="ES256", headers={"kid": k3.kid})  # fmt: skip
        ok, why = await upgrade_status(s.peer, rushed)
        assert (ok, why) == (False, "Specified key ID not found in JWKs")
        ok, why = await connect_status(s.peer, s.broker.mint_for(user())[0])
        assert ok, why
        await http.aclose()
        mock_clock.autojump_threshold = 0.05  # let the shutdown's grace timers run
