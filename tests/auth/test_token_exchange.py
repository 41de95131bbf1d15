"""POST /v1/token and the broker's discovery documents, over real HTTP on 127.0.0.1.

Every row of SECURITY.md's table is sent to POST /v1/token: each is a 401 with a code, a message
and a correlation id, never a stack trace; nothing is fetched from a token's ``jku``/``x5u``.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import jwt
import pytest

from gatewayd.proto.apikeys import make_key
from gatewayd.proto.identity import identity_hex
from gatewayd.proto.tokens import IssuerKeys, Verifier, load_jwks

from ..authcases import REJECT_CASES, Case
from .conftest import AuthStack


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    doc = resp.json()
    err = doc["error"]
    assert set(err) == {"code", "message", "correlation_id"}
    assert resp.headers["X-Correlation-Id"] == err["correlation_id"]
    assert "Traceback" not in resp.text and "secret internals" not in resp.text
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


async def exchange(stack: AuthStack, token: str | None = None, **kw: Any) -> httpx.Response:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await stack.http.post("/v1/token", headers=headers, **kw)


def verify_minted(stack: AuthStack, jwks: dict[str, Any], token: str) -> dict[str, Any]:
    broker = stack.gateway.broker
    assert broker is not None
    v = Verifier([IssuerKeys(issuer=broker.issuer, keys=load_jwks(jwks, ["ES256"]), audience="spacetimedb",
                             algorithms=frozenset({"ES256"}), max_lifetime_s=900)])  # fmt: skip
    import time

    return dict(v.verify(token, now=time.time()).claims)


async def test_discovery_documents(stack: AuthStack) -> None:
    doc = (await stack.http.get("/.well-known/openid-configuration")).json()
    assert doc["issuer"] == stack.url  # development: the bound address, byte for byte
    assert doc["jwks_uri"] == stack.url + "/.well-known/jwks.json"
    jwks = (await stack.http.get("/.well-known/jwks.json")).json()
    assert [k["alg"] for k in jwks["keys"]] == ["ES256"] and all(k.get("kid") for k in jwks["keys"])
    assert not any("d" in k for k in jwks["keys"])


async def test_app_jwt_is_exchanged_for_a_spacetimedb_token(stack: AuthStack) -> None:
    resp = await exchange(stack, stack.jwt(kid="k-ed", sid="sess-1", membership_version=2))
    assert resp.status_code == 200, resp.text
    assert resp.headers["Cache-Control"] == "no-store"
    body = resp.json()
    jwks = (await stack.http.get("/.well-known/jwks.json")).json()
    claims = verify_minted(stack, jwks, body["access_token"])
    assert claims["sub"] == "user:u-1" and body["subject"] == "user:u-1"
    assert claims["iss"] == stack.url and claims["aud"] == "spacetimedb"
    assert claims["tenant_id"] == "acme" and claims["sid"] == "sess-1" and claims["membership_version"] == 2
    assert claims["exp"] - claims["iat"] == body["expires_in"] == 300
    assert body["identity"] == identity_hex(stack.url, "user:u-1")
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "ES256"


async def test_the_body_cannot_set_the_principal(stack: AuthStack) -> None:
    resp = await exchange(stack, stack.jwt(), json={"sub": "user:admin", "tenant_id": "globex",
                                                    "act": {"sub": "robot:x"}, "aud": "other"})  # fmt: skip
    claims = jwt.decode(resp.json()["access_token"], options={"verify_signature": False})
    assert (claims["sub"], claims["tenant_id"], claims["aud"]) == ("user:u-1", "acme", "spacetimedb")
    assert "act" not in claims


async def test_scope_can_only_be_narrowed(stack: AuthStack) -> None:
    token = stack.jwt(scope="document.read document.create")
    resp = await exchange(stack, token, json={"scope": "document.read"})
    assert (
        jwt.decode(resp.json()["access_token"], options={"verify_signature": False})["scope"]
        == "document.read"
    )
    assert_error(await exchange(stack, token, json={"scope": "document.delete"}), 403, "scope_not_granted")


@pytest.mark.parametrize("case", REJECT_CASES, ids=lambda c: c.id)
async def test_security_table_row_against_token_exchange(stack: AuthStack, case: Case) -> None:
    before = len(stack.stub.log)
    token = case.make(stack.kit)
    if case.row == 14 and token.startswith("gw_"):
        err = assert_error(await exchange(stack, token), 401)
        assert "API key" in err["message"]
        return
    if case.row == 14 and token.count(".") != 2:
        # An opaque bearer goes to the app's session check (which does not know it): refused.
        err = assert_error(await exchange(stack, token), 401, "invalid_session")
        return
    err = assert_error(await exchange(stack, token), 401)
    assert case.says.lower() in err["message"].lower(), err
    paths = {r.path for r in stack.stub.log[before:]}
    assert paths <= {"/api/auth/jwks"}, paths  # never a token's jku/x5u


async def test_row13_kid_flood_refetches_at_most_once_per_cooldown(stack: AuthStack) -> None:
    assert (await exchange(stack, stack.jwt())).status_code == 200
    start = stack.stub.hits("/api/auth/jwks")
    for _ in range(40):
        token = stack.kit.sign(stack.kit.claims(), headers={"kid": uuid.uuid4().hex})
        assert_error(await exchange(stack, token), 401, "unknown_key")
    assert stack.stub.hits("/api/auth/jwks") - start <= 1


async def test_api_key_exchange_and_errors(stack: AuthStack) -> None:
    svc = stack.gateway.authenticator.api_keys  # type: ignore[union-attr]
    assert svc is not None
    key, rec = svc.store.create(subject="robot:int-1", tenant_id="acme", scopes=["document.create"],
                                expires_at=None, grant_version=3)  # fmt: skip
    resp = await exchange(stack, headers={"X-API-Key": key})
    assert resp.status_code == 200, resp.text
    claims = jwt.decode(resp.json()["access_token"], options={"verify_signature": False})
    assert (
        claims["sub"] == "robot:int-1" and claims["api_key_id"] == rec.key_id and claims["grant_version"] == 3
    )
    # Bearer works too; the query string never carries credentials.
    assert (await exchange(stack, key)).status_code == 200
    assert_error(await stack.http.post("/v1/token", params={"api_key": key}), 401, "missing_credentials")
    svc.store.set_enabled(rec.key_id, False)
    assert_error(await exchange(stack, key), 401, "api_key_disabled")


async def test_api_key_failures_from_one_address_get_429(stack: AuthStack) -> None:
    for i in range(5):
        assert_error(await exchange(stack, headers={"X-API-Key": make_key("live", f"nope-{i}")}), 401)
    resp = await exchange(stack, headers={"X-API-Key": make_key("live", "nope-x")})
    assert_error(resp, 429, "rate_limited")
    assert 1 <= int(resp.headers["Retry-After"]) <= 61


async def test_session_token_exchange_and_revocation(stack: AuthStack) -> None:
    stack.app.sessions["tok-1"] = ("u-9", "s-9", "acme")
    resp = await exchange(stack, "tok-1")
    assert resp.status_code == 200, resp.text
    claims = jwt.decode(resp.json()["access_token"], options={"verify_signature": False})
    assert (claims["sub"], claims["sid"], claims["tenant_id"]) == ("user:u-9", "s-9", "acme")
    del stack.app.sessions["tok-1"]
    import trio

    await trio.sleep(0.3)  # the session cache (0.2 s)
    assert_error(await exchange(stack, "tok-1"), 401, "invalid_session")


async def test_cookies_are_not_accepted_on_the_exchange(stack: AuthStack) -> None:
    stack.app.sessions["tok-2"] = ("u-2", "s-2", None)
    resp = await stack.http.post("/v1/token", headers={"Cookie": "better-auth.session_token=tok-2"})
    assert_error(resp, 401, "missing_credentials")


async def test_app_failure_is_503_without_its_body(stack: AuthStack) -> None:
    err = assert_error(await exchange(stack, "explode"), 503, "auth_unavailable")
    assert "Traceback" not in err["message"]


async def test_unreachable_jwks_fails_closed_with_503(stack: AuthStack) -> None:
    stack.stub.routes.pop("/api/auth/jwks")
    resp = await exchange(stack, stack.jwt())
    assert_error(resp, 503, "auth_unavailable")
    assert resp.headers["Retry-After"] == "5"
