"""An in-process gateway with every inbound verifier and the broker, on 127.0.0.1:0.

* a JWT issuer (:class:`IssuerKit`) whose JWKS is served over HTTP by a stub (the JWKS cache path);
* a fake app session endpoint (Better Auth's ``/api/auth/get-session`` shape) on the same stub;
* API keys in SQLite with a pepper file;
* the broker (development profile, issuer from the bound address);
* the upstream points at a closed port: nothing here needs SpacetimeDB.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gatewayd.config import parse_config
from gatewayd.main import Gateway, build_gateway, serve_gateway

from ..authcases import AUDIENCE, IssuerKit
from ..httpstub import HttpStub, StubRequest, json_reply, open_stub

SESSION_COOKIE = "better-auth.session_token"


@dataclass
class FakeApp:
    """Sessions the fake app knows: token -> (user id, session id, org)."""

    sessions: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)

    def get_session(self, req: StubRequest) -> tuple[int, dict[str, str], bytes]:
        token = None
        auth = req.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            token = auth[7:]
        for part in req.headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == SESSION_COOKIE:
                token = v
        if token == "explode":
            return 500, {}, b"Traceback (most recent call last): secret internals"
        found = self.sessions.get(token or "")
        if found is None:
            return json_reply(None)
        uid, sid, org = found
        return json_reply({
            "session": {"id": sid, "userId": uid, "token": token, "expiresAt": "2099-01-01T00:00:00.000Z",
                        "activeOrganizationId": org},
            "user": {"id": uid, "email": f"{uid}@example.com", "name": uid},
        })  # fmt: skip


@dataclass
class AuthStack:
    gateway: Gateway
    url: str
    kit: IssuerKit
    stub: HttpStub
    app: FakeApp
    http: httpx.AsyncClient
    tmp: Path

    def jwt(self, **over: Any) -> str:
        return self.kit.token(**over)


def auth_config(stub: HttpStub, kit: IssuerKit, tmp: Path, **over: Any) -> dict[str, Any]:
    (tmp / "pepper").write_text("x" * 48)
    doc: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9", "database": "demo", "backoff_initial_s": 5.0},
        "http": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "issuers": [
                {
                    "issuer": kit.issuer,
                    "jwks_url": stub.url + "/api/auth/jwks",
                    "audience": AUDIENCE,
                    "algorithms": ["EdDSA", "ES256", "RS256"],
                    "subject_prefix": "user:",
                    "unknown_kid_cooldown_s": 30.0,
                    "max_lifetime_s": 900,
                }
            ],
            "session": {"url": stub.url + "/api/auth", "cache_s": 0.2, "scopes": ["document.read"]},
            "api_keys": {
                "database": "keys.sqlite3",
                "pepper_file": "pepper",
                "key_attempts_count": 50,
                "ip_failures_count": 5,
                "window_s": 60.0,
            },
            "recheck_s": 0.5,
        },
        "broker": {"issuer": "", "keys_dir": "keys", "profile": "development"},
        "streams": [
            {
                "name": "documents",
                "tables": ["document"],
                "tenant_column": "tenant_id",
                "permission": "document.read",
            }
        ],
    }
    doc.update(over)
    return doc


@asynccontextmanager
async def open_auth_stack(tmp: Path, **over: Any) -> AsyncIterator[AuthStack]:
    app = FakeApp()
    async with open_stub() as stub:
        kit = IssuerKit(issuer=stub.url)
        stub.routes["/api/auth/jwks"] = lambda _req: json_reply(kit.jwks())
        stub.routes["/api/auth/get-session"] = app.get_session
        gateway = build_gateway(parse_config(auth_config(stub, kit, tmp, **over), base=tmp), base=tmp)
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                await serve_gateway(gateway, shutdown=shutdown, shutdown_grace_s=1.0, task_status=task_status)

            bound = await nursery.start(run)
            host, port = bound[0]
            url = f"http://{host}:{port}"
            async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
                try:
                    yield AuthStack(gateway, url, kit, stub, app, http, tmp)
                finally:
                    shutdown.set()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[AuthStack]:
    async with open_auth_stack(tmp_path) as s:
        yield s
