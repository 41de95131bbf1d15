"""``gatewayd demo``: the dev peer, a local token issuer, the gateway and a demo page, on 127.0.0.1.

Everything runs in one process:

* the dev peer serving the demo module as database ``demo`` (gatewayd's service identity is
  registered in the module's ``service_account`` table, so delegated writes are accepted);
* a local issuer ("gatewayd-demo", ES256) for demo users' tokens; its JWKS is written to a
  temporary folder the gateway config points at;
* the gateway, streaming ``documents`` per tenant and exposing ``create_document``,
  ``update_document`` and ``delete_document`` (delegated: the acting user is taken from the token);
* a page at ``/`` that signs in as a demo user and shows the documents live;
* a background writer that edits a document every few seconds.

Ctrl-C stops everything (streams get a ``shutdown`` event first).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from gatewayd.config import parse_config
from gatewayd.errors import GatewayError
from gatewayd.main import Gateway, build_gateway, run_command, serve_gateway, setup_logging
from gatewayd.proto.identity import identity_hex
from gatewayd.proto.tokens import Principal
from gatewayd.services.notify import SystemdNotifier
from gatewayd.services.supervisor import Credential, UpstreamState, static_token

logger = logging.getLogger(__name__)

DEMO_ISSUER: Final = "gatewayd-demo"
DEMO_AUDIENCE: Final = "gatewayd"
DEMO_KID: Final = "demo-1"
SERVICE_ISSUER: Final = "gatewayd-demo-service"
SERVICE_SUBJECT: Final = "gatewayd"
# The service connection's subject when the broker mints its token (the one subject scheme).
BROKER_SERVICE_SUBJECT: Final = "robot:gatewayd"
TOKEN_LIFETIME_S: Final = 8 * 3600
ALL_DOC_SCOPES: Final = "document.read document.create document.update document.delete"
DEMO_USERS: Final = {
    "alice": ("user:alice", "acme", ALL_DOC_SCOPES),
    "bob": ("user:bob", "acme", ALL_DOC_SCOPES),
    "carol": ("user:carol", "globex", ALL_DOC_SCOPES),
}
WRITER_INTERVAL_S: Final = 3.0
DEMO_CANARY: Final = {"reducer": "bump_canary", "table": "canary", "name": "gateway", "interval_s": 2.0,
                      "bound_s": 8.0, "call_timeout_s": 2.0}  # fmt: skip


class DemoIssuer:
    """A local ES256 issuer for demo users (never for production: see the token broker)."""

    def __init__(self, folder: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": DEMO_KID, "use": "sig", "alg": "ES256"})
        self.jwks_path = folder / "demo-jwks.json"
        self.jwks_path.write_text(json.dumps({"keys": [jwk]}))

    def mint(self, user: str) -> str:
        sub, tenant, scope = DEMO_USERS[user]
        return self.mint_for(sub, tenant, scope)

    def mint_for(self, sub: str, tenant: str | None, scope: str, lifetime_s: int = TOKEN_LIFETIME_S) -> str:
        now = int(time.time())
        claims = {
            "iss": DEMO_ISSUER,
            "sub": sub,
            "aud": DEMO_AUDIENCE,
            "iat": now,
            "exp": now + lifetime_s,
            "jti": uuid.uuid4().hex,
            "tenant_id": tenant,
            "scope": scope,
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": DEMO_KID})


def demo_config(peer_url: str, port: int, jwks_path: Path) -> dict[str, Any]:
    return {
        "upstream": {"url": peer_url, "database": "demo", "backoff_initial_s": 0.2, "backoff_max_s": 5.0},
        "http": {"host": "127.0.0.1", "port": port},
        "sse": {"heartbeat_s": 15.0, "retry_ms": 1000, "retry_jitter_ms": 2000},
        "auth": {
            "issuers": [
                {
                    "issuer": DEMO_ISSUER,
                    "jwks_file": str(jwks_path),
                    "audience": DEMO_AUDIENCE,
                    "algorithms": ["ES256"],
                    "max_lifetime_s": TOKEN_LIFETIME_S,
                }
            ]
        },
        "streams": [
            {
                "name": "documents",
                "tables": ["document"],
                "tenant_column": "tenant_id",
                "permission": "document.read",
            }
        ],
        "reducers": [
            {
                "name": "create_document",
                "upstream": "create_document_as",
                "permission": "document.create",
                "actor_argument": "actor_id",
                "tenant_argument": "tenant_id",
            },
            {
                "name": "update_document",
                "upstream": "update_document_as",
                "permission": "document.update",
                "actor_argument": "actor_id",
            },
            {
                "name": "delete_document",
                "upstream": "delete_document_as",
                "permission": "document.delete",
                "actor_argument": "actor_id",
            },
        ],
    }


async def _writer(gateway: Gateway, rng: random.Random) -> None:
    """Keep changes flowing: every few seconds, a user edits one of their tenant's documents."""
    n = 0
    while True:
        await trio.sleep(WRITER_INTERVAL_S)
        sup = gateway.supervisor
        if sup.state is not UpstreamState.LIVE or sup.cache is None:
            continue
        docs = sup.cache.rows("document")
        if not docs:
            continue
        doc = rng.choice(docs)
        actor = {"acme": "user:alice", "globex": "user:carol"}.get(doc["tenant_id"])
        if actor is None:
            continue
        n += 1
        args = {"actor_id": actor, "on_behalf_of": None, "id": doc["id"], "title": doc["title"],
                "body": f"Edited by the demo writer (#{n}) at {time.strftime('%H:%M:%S')}."}  # fmt: skip
        try:
            await sup.call_reducer_json("update_document_as", args)
        except GatewayError as exc:
            logger.info("demo writer: %s", exc)


@dataclass
class DevStack:
    """A dev peer, a local issuer and a gateway, all in this process (demo and tests)."""

    gateway: Gateway
    peer: Any
    issuer: DemoIssuer
    url: str
    service_identity: str = ""  # the identity of the gateway's service connection


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@asynccontextmanager
async def open_dev_stack(
    module: Any = None,
    *,
    port: int = 0,
    config: dict[str, Any] | None = None,
    shutdown: trio.Event | None = None,
    shutdown_grace_s: float = 2.0,
    peer_settings: dict[str, Any] | None = None,
    notifier: SystemdNotifier | None = None,
    use_broker: bool = False,
    peer_auth: Any = None,
) -> AsyncIterator[DevStack]:
    """Start peer + gateway; ``module`` defaults to the demo module with gatewayd's service
    identity registered. ``config`` is merged over the demo config (lists replace).

    ``use_broker``: the gateway's token broker mints the service and per-user tokens (issuer
    ``http://127.0.0.1:<gateway port>``), and the peer discovers its JWKS over HTTP, as
    SpacetimeDB would; otherwise the peer's own key signs them (a stand-in). ``peer_auth``: the
    peer's token rules (e.g. a shortened JWKS refresh period)."""
    from gatewayd.peer import DemoConfig, PeerAuth, make_demo_module, open_peer

    if shutdown is None:
        shutdown = trio.Event()
    with tempfile.TemporaryDirectory(prefix="gatewayd-dev-") as tmp:
        issuer = DemoIssuer(Path(tmp))
        peer_auth = peer_auth or PeerAuth()
        service_token = peer_auth.mint(SERVICE_SUBJECT, issuer=SERVICE_ISSUER)
        service_ident = service_identity()
        listeners = broker_issuer = None
        if use_broker:
            # Bind first: the broker's issuer (hence the service identity) names the port.
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            broker_issuer = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            service_ident = identity_hex(broker_issuer, BROKER_SERVICE_SUBJECT)
        if module is None:
            module = make_demo_module(DemoConfig(service_identities=frozenset({service_ident})))
        async with open_peer(module, port=0, auth=peer_auth, **(peer_settings or {})) as peer:
            doc = _merge(demo_config(peer.base_url, port, issuer.jwks_path), config or {})
            if use_broker:
                keys_dir = str(Path(tmp) / "keys")
                broker = {"issuer": broker_issuer, "keys_dir": keys_dir, "profile": "development",
                          "service_subject": BROKER_SERVICE_SUBJECT}  # fmt: skip
                doc = _merge({"broker": broker}, doc)
            gateway = build_gateway(
                parse_config(doc),
                token_source=None if use_broker else static_token(service_token),
                user_minter=None if use_broker else peer_user_minter(peer_auth),
            )
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(
                    partial_serve(gateway, shutdown, shutdown_grace_s, notifier, listeners=listeners)
                )
                host, gport = bound[0]
                try:
                    yield DevStack(gateway, peer, issuer, f"http://{host}:{gport}/", service_ident)
                finally:
                    shutdown.set()


USER_ISSUER: Final = "gatewayd-demo-users"


def peer_user_minter(peer_auth: Any) -> Callable[[Principal], Awaitable[Credential]]:
    """Tokens for per-user connections, signed with the dev peer's own key (which it always
    accepts). A stand-in for the token broker, for the demo and tests only."""

    async def mint(principal: Principal) -> Credential:
        return Credential(peer_auth.mint(principal.subject, issuer=USER_ISSUER), None)

    return mint


def service_identity() -> str:
    """The identity the peer derives for the demo's service token."""
    return identity_hex(SERVICE_ISSUER, SERVICE_SUBJECT)


async def serve_demo(
    *,
    port: int,
    shutdown: trio.Event,
    out: Callable[[str], None],
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    # The demo runs the readiness canary (the demo module's bump_canary), as production should.
    demo_cfg = {"canary": DEMO_CANARY}
    async with open_dev_stack(port=port, shutdown=shutdown, config=demo_cfg, use_broker=True) as stack:
        gateway = stack.gateway
        gateway.demo_page = True
        gateway.demo_login = lambda: {u: stack.issuer.mint(u) for u in DEMO_USERS}
        out(f"url: {stack.url}")
        out(f"token: {stack.issuer.mint('alice')}")
        out(f"peer: {stack.peer.base_url}/")
        out(f'try: curl -N -H "Authorization: Bearer $TOKEN" {stack.url}v1/streams/documents')
        with trio.move_on_after(10):
            while gateway.supervisor.state is not UpstreamState.LIVE:
                await gateway.supervisor.wait_state_change()
        async with trio.open_nursery() as writers:
            writers.start_soon(_writer, gateway, random.Random(), name="demo-writer")
            task_status.started(gateway)
            await shutdown.wait()
            writers.cancel_scope.cancel()


def partial_serve(
    gateway: Gateway,
    shutdown: trio.Event,
    grace_s: float,
    notifier: SystemdNotifier | None = None,
    listeners: Any = None,
) -> Any:
    async def run(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
        await serve_gateway(gateway, shutdown=shutdown, shutdown_grace_s=grace_s, notifier=notifier,
                            listeners=listeners, task_status=task_status)  # fmt: skip

    return run


def run_demo_cli(port: int) -> int:
    setup_logging("INFO")

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def body(shutdown: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_demo(port=port, shutdown=shutdown, out=out,
                                                               task_status=task_status))  # fmt: skip

    failure = run_command(body)
    if failure is not None:
        sys.stderr.write(f"gatewayd demo: {failure}\n")
        return 1
    return 0
