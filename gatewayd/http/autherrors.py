"""Auth failures -> HTTP status, code, safe message and headers (one table for both fronts).

=====================================  ======  ==============================================
error                                  status  headers
=====================================  ======  ==============================================
TokenInvalid (missing credentials)     401     ``WWW-Authenticate: Bearer``
TokenInvalid (anything else)           401     ``WWW-Authenticate: Bearer error="invalid_token"``
PermissionDenied                       403
RateLimited                            429     ``Retry-After: <s>``
KeysUnavailable / SessionsUnavailable  503     ``Retry-After: 5``
=====================================  ======  ==============================================

Messages are gatewayd's own; an upstream (app, JWKS host) body never reaches a client.
"""

from __future__ import annotations

from gatewayd.errors import AuthError
from gatewayd.proto.tokens import PermissionDenied, RateLimited, TokenInvalid
from gatewayd.services.jwks import KeysUnavailable
from gatewayd.services.sessions import SessionsUnavailable


def auth_error_parts(exc: AuthError) -> tuple[int, str, str, dict[str, str]]:
    """(status, code, message, headers) for an auth failure."""
    if isinstance(exc, TokenInvalid):
        challenge = "Bearer" if exc.code == "missing_credentials" else 'Bearer error="invalid_token"'
        return 401, exc.code, exc.message, {"WWW-Authenticate": challenge}
    if isinstance(exc, PermissionDenied):
        return 403, exc.code, exc.message, {}
    if isinstance(exc, RateLimited):
        return 429, exc.code, exc.message, {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, KeysUnavailable | SessionsUnavailable):
        return 503, "auth_unavailable", exc.message, {"Retry-After": "5"}
    return 401, "invalid_token", "the credential was not accepted", {"WWW-Authenticate": "Bearer"}
