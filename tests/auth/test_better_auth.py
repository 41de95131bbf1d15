"""gatewayd against a real Better Auth server (npm harness tests/harness/better-auth/, Node 20).

Better Auth runs on 127.0.0.1 with email + password, the jwt plugin (EdDSA, and ES256), bearer
and API-key plugins, on SQLite (better-sqlite3). A user signs up; gatewayd verifies the user's JWT
through Better Auth's JWKS and opens an SSE stream as ``user:<id>``; the same through session
introspection with the cookie; signing out revokes the session, and gatewayd refuses the next
request and ends the open stream within its recheck interval.

Node-marked tests fail (not skip) when Node or the harness is unusable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from gatewayd.config import parse_config
from gatewayd.main import Gateway, build_gateway, serve_gateway

from .test_stream_auth import open_raw

pytestmark = pytest.mark.node

HARNESS: Final = Path(__file__).resolve().parents[1] / "harness" / "better-auth"
RECHECK_S: Final = 0.5
SESSION_CACHE_S: Final = 0.2


def ensure_harness() -> str:
    node, bash = shutil.which("node"), shutil.which("bash")
    if node is None or bash is None:
        pytest.fail("the Better Auth tests need Node.js >= 20 and bash (tests/harness/better-auth/setup.sh)")
    proc = subprocess.run([bash, str(HARNESS / "setup.sh")], capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"tests/harness/better-auth/setup.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return node


@pytest.fixture(scope="module")
def node() -> str:
    return ensure_harness()


@dataclass
class BetterAuth:
    url: str
    alg: str
    http: httpx.AsyncClient

    async def sign_up(self, email: str) -> tuple[str, str, str]:
        """(user id, session cookie header value, session token) of a new user."""
        r = await self.http.post(
            "/api/auth/sign-up/email",
            json={"email": email, "password": "correct-horse-battery-staple", "name": email.split("@")[0]},
            headers={"Origin": self.url},
        )
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"].split(";", 1)[0]
        assert cookie.startswith("better-auth.session_token=")
        return r.json()["user"]["id"], cookie, r.headers["set-auth-token"]

    async def jwt(self, cookie: str) -> str:
        r = await self.http.get("/api/auth/token", headers={"Cookie": cookie})
        assert r.status_code == 200, r.text
        token: str = r.json()["token"]
        return token

    async def sign_out(self, cookie: str) -> None:
        r = await self.http.post(
            "/api/auth/sign-out", headers={"Cookie": cookie, "Origin": self.url}, json={}
        )
        assert r.status_code == 200, r.text


@asynccontextmanager
async def open_better_auth(node: str, tmp: Path, alg: str) -> AsyncIterator[BetterAuth]:
    env = {"PATH": "/usr/bin:/bin", "DB_PATH": str(tmp / f"better-auth-{alg}.sqlite3"), "JWT_ALG": alg}
    proc = await trio.lowlevel.open_process(
        [node, str(HARNESS / "server.mjs")], cwd=HARNESS, env=env, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    pytest.fail("the Better Auth server exited before it served")
                line += chunk
        info = json.loads(line)
        async with httpx.AsyncClient(base_url=info["url"], timeout=15, trust_env=False) as http:
            yield BetterAuth(info["url"], info["alg"], http)
    finally:
        proc.terminate()  # this process only, by its pid
        with trio.move_on_after(5, shield=True):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()


@asynccontextmanager
async def open_gateway(ba: BetterAuth, tmp: Path) -> AsyncIterator[tuple[Gateway, str]]:
    doc: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9", "database": "demo", "backoff_initial_s": 5.0},
        "http": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "issuers": [{"issuer": ba.url, "audience": ba.url, "jwks_url": f"{ba.url}/api/auth/jwks",
                         "algorithms": [ba.alg], "subject_prefix": "user:",
                         "default_scopes": ["document.read"], "max_lifetime_s": 3600}],
            "session": {"url": f"{ba.url}/api/auth", "cache_s": SESSION_CACHE_S, "scopes": ["document.read"]},
            "recheck_s": RECHECK_S,
        },
        "streams": [{"name": "documents", "tables": ["document"], "tenant_column": "tenant_id",
                     "permission": "document.read"}],
    }  # fmt: skip
    gateway = build_gateway(parse_config(doc, base=tmp), base=tmp)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
            await serve_gateway(gateway, shutdown=shutdown, shutdown_grace_s=1.0, task_status=task_status)

        host, port = (await nursery.start(run))[0]
        try:
            yield gateway, f"http://{host}:{port}"
        finally:
            shutdown.set()


def stream_subjects(gateway: Gateway) -> list[str]:
    return [sub.principal for subs in gateway.streams.hub.partitions.values() for sub in subs]


@dataclass
class Stack:
    url: str
    gateway: Gateway


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
async def test_better_auth_jwt_opens_a_stream_as_the_user(node: str, tmp_path: Path, alg: str) -> None:
    async with open_better_auth(node, tmp_path, alg) as ba, open_gateway(ba, tmp_path) as (gateway, url):
        uid, cookie, _ = await ba.sign_up(f"alice-{alg.lower()}@example.com")
        token = await ba.jwt(cookie)
        stack: Any = Stack(url, gateway)
        async with open_raw(stack, {"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, r.data
            await r.until(b"retry:", 5)
            assert stream_subjects(gateway) == [f"user:{uid}"]
        # The JWKS came from Better Auth, over HTTP, through the cache.
        cache = gateway.authenticator.caches[ba.url]  # type: ignore[union-attr]
        assert cache.statistics().fetches == 1 and cache.statistics().keys == 1
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            # A Better Auth JWT for another audience or a tampered one is refused.
            bad = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
            r2 = await http.get("/v1/streams/documents/snapshot", headers={"Authorization": f"Bearer {bad}"})
            assert r2.status_code == 401 and "signature" in r2.json()["error"]["message"]


async def test_better_auth_session_cookie_and_revocation(node: str, tmp_path: Path) -> None:
    async with open_better_auth(node, tmp_path, "EdDSA") as ba, open_gateway(ba, tmp_path) as (gateway, url):
        uid, cookie, session_token = await ba.sign_up("bob@example.com")
        stack: Any = Stack(url, gateway)
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            snap = await http.get("/v1/streams/documents/snapshot", headers={"Cookie": cookie})
            assert snap.status_code != 401, snap.text
            # Better Auth's bearer plugin: the session token itself as a bearer works too.
            r = await http.get("/v1/streams/documents/snapshot",
                               headers={"Authorization": f"Bearer {session_token}"})  # fmt: skip
            assert r.status_code != 401, r.text
        async with open_raw(stack, {"Cookie": f"theme=dark; {cookie}"}) as stream:
            assert stream.status == 200, stream.data
            await stream.until(b"retry:", 5)
            assert stream_subjects(gateway) == [f"user:{uid}"]
            await ba.sign_out(cookie)  # Better Auth deletes the session
            signed_out_at = trio.current_time()
            data = await stream.until(b"event: revoked", RECHECK_S + SESSION_CACHE_S + 3)
            assert b"event: revoked" in data
            await stream.to_end(3)
            assert trio.current_time() - signed_out_at <= RECHECK_S + SESSION_CACHE_S + 1.0
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            r = await http.get("/v1/streams/documents/snapshot", headers={"Cookie": cookie})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_session"
            # A Better Auth API key is not a gatewayd credential: refused, nothing leaks.
            ba_key = {"Authorization": "Bearer ba_xyz123456789abcdef"}
            r = await http.get("/v1/streams/documents/snapshot", headers=ba_key)
            assert r.status_code == 401
