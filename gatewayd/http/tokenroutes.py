"""The broker's HTTP endpoints (docs/auth.md):

* ``GET /.well-known/openid-configuration``: ``issuer`` byte for byte as configured, ``jwks_uri``;
* ``GET /.well-known/jwks.json``: pending, signing and retiring public keys (``kid`` on each);
* ``POST /v1/token``: a verified app session (bearer JWT or session token) or API key
  (``X-API-Key`` or bearer) in exchange for a short-lived SpacetimeDB token. Cookies are not
  accepted here (no ambient credentials on a POST). The body may narrow the scopes
  (``{"scope": "a b"}``, a subset of the principal's); anything else in it is ignored: the
  subject, tenant and every other claim come from the verified credential only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from gatewayd.proto.claims import ClaimError
from gatewayd.proto.identity import identity_hex
from gatewayd.proto.tokens import Principal, scopes_of

if TYPE_CHECKING:
    from gatewayd.main import Gateway

JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


def register_token_routes(
    app: QuartTrio, gateway: Gateway, principal: Callable[..., Awaitable[Principal]]
) -> None:
    from gatewayd.http.app import ApiError, _json_response

    def broker() -> Any:
        if gateway.broker is None:
            raise ApiError(404, "broker_disabled", "this gateway mints no tokens (no [broker] section)")
        return gateway.broker

    @app.get("/.well-known/openid-configuration")
    async def openid_configuration() -> Response:
        resp = _json_response(broker().openid_configuration())
        resp.headers["Cache-Control"] = "public, max-age=60"
        return resp

    @app.get("/.well-known/jwks.json")
    async def jwks() -> Response:
        resp = _json_response(broker().jwks())
        # SpacetimeDB caches for 300 s itself; a short HTTP cache keeps proxies from adding to it.
        resp.headers["Cache-Control"] = "public, max-age=60"
        return resp

    @app.post("/v1/token")
    async def exchange() -> Response:
        b = broker()
        p = await principal(allow_cookie=False)
        raw = await request.get_data(cache=False)
        try:
            body = msgspec.json.decode(raw) if raw.strip() else {}
        except msgspec.DecodeError:
            raise ApiError(400, "invalid_json", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request", "the body must be a JSON object")
        if "scope" in body:
            wanted = scopes_of(body["scope"])
            if not wanted <= p.scopes:
                extra = " ".join(sorted(wanted - p.scopes))
                raise ApiError(403, "scope_not_granted", f"the credential does not grant: {extra}")
            from dataclasses import replace

            p = replace(p, scopes=wanted)
        try:
            token, claims = b.mint_for(p)
        except ClaimError as exc:
            raise ApiError(403, "cannot_mint", f"no SpacetimeDB token for this principal: {exc}") from None
        return _json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "issued_token_type": JWT_TOKEN_TYPE,
                "expires_in": claims["exp"] - claims["iat"],
                "expires_at": claims["exp"],
                "subject": claims["sub"],
                "identity": identity_hex(claims["iss"], claims["sub"]),
            }
        )
