"""The claim contract of the tokens gatewayd mints for SpacetimeDB (SECURITY.md "Outbound").

One subject scheme: ``user:<id>`` for people, ``robot:<id>`` for robots and integrations
(gatewayd's own service connection included). Never an email. The issuer is the configured,
canonical URL, used byte for byte (SpacetimeDB derives identities from ``iss|sub`` exactly, so a
trailing slash or a ``|`` would change or collide identities).

Claims of an access token::

    iss                 the broker's issuer (<= 128 bytes, no '|', no trailing '/')
    sub                 user:<id> | robot:<id> (<= 128 bytes, no '|')
    aud                 one string (the SpacetimeDB audience, e.g. "spacetimedb")
    iat, exp            integers; exp - iat = the configured lifetime (minutes)
    jti                 random, unique per token (the replay id; never the signature)
    token_type          "spacetime-access"
    sid                 the app session id the token was exchanged for (if any)
    tenant_id           the tenant the principal acts in (if any)
    actor_ref           the actor the module attributes writes to (= sub)
    scope               space-separated scopes
    membership_version  the caller's membership version, when known (users)
    api_key_id, grant_version   for robots authenticated by an API key
    act                 {"sub": ...} on delegated calls (RFC 8693 actor claim)

Sans-IO: time comes in as ``now``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Final

from gatewayd.proto.identity import MAX_CLAIM_BYTES

TOKEN_TYPE: Final = "spacetime-access"
SUBJECT_KINDS: Final = ("user", "robot")
# Algorithms SpacetimeDB accepts for foreign issuers (PROTOCOL.md §6.3); HS256 needs a shared
# secret and is never used.
SPACETIME_ALGORITHMS: Final = ("ES256", "RS256")
_ID_FORBIDDEN: Final = re.compile(r"[|@\s\x00-\x1f\x7f]")


class ClaimError(ValueError):
    """A claim gatewayd refuses to mint (the message names the rule)."""


def check_issuer(iss: str) -> None:
    if not isinstance(iss, str) or not iss:
        raise ClaimError("iss is empty")
    if len(iss.encode()) > MAX_CLAIM_BYTES:
        raise ClaimError(f"iss is longer than {MAX_CLAIM_BYTES} bytes")
    if "|" in iss:
        raise ClaimError("iss contains '|' (two (iss, sub) pairs could collide on one identity)")
    if iss.endswith("/"):
        raise ClaimError("iss ends with '/' (OIDC discovery trims it, SpacetimeDB identities do not)")


def check_subject(sub: str, *, kind: str | None = None) -> None:
    """``sub`` follows the scheme ``user:<id>`` / ``robot:<id>`` and SpacetimeDB's limits."""
    if not isinstance(sub, str) or not sub:
        raise ClaimError("sub is empty")
    if len(sub.encode()) > MAX_CLAIM_BYTES:
        raise ClaimError(f"sub is longer than {MAX_CLAIM_BYTES} bytes")
    if "|" in sub:
        raise ClaimError("sub contains '|' (two (iss, sub) pairs could collide on one identity)")
    prefix, sep, ident = sub.partition(":")
    if not sep or prefix not in SUBJECT_KINDS or not ident:
        raise ClaimError(f"sub {sub!r} is not user:<id> or robot:<id>")
    if kind is not None and prefix != kind:
        raise ClaimError(f"sub {sub!r} is not a {kind}:<id> subject")
    if _ID_FORBIDDEN.search(ident):
        raise ClaimError(f"sub {sub!r}: ids contain no '@', '|', spaces or control characters")


def check_audience(aud: Any) -> None:
    if not isinstance(aud, str) or not aud:
        raise ClaimError("aud must be one non-empty string")


def check_algorithm(alg: str) -> None:
    if alg not in SPACETIME_ALGORITHMS:
        raise ClaimError(f"algorithm {alg} is refused for SpacetimeDB (use ES256 or RS256)")


def access_claims(
    *,
    issuer: str,
    subject: str,
    audience: str,
    now: int,
    lifetime_s: int,
    scopes: Iterable[str] = (),
    session_id: str | None = None,
    tenant_id: str | None = None,
    membership_version: int | None = None,
    act: str | None = None,
    extra: Mapping[str, Any] | None = None,
    jti: str | None = None,
) -> dict[str, Any]:
    """The payload of one access token; raises :class:`ClaimError` on any rule it breaks."""
    check_issuer(issuer)
    check_subject(subject)
    check_audience(audience)
    if lifetime_s <= 0:
        raise ClaimError("lifetime must be > 0")
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": int(now),
        "exp": int(now) + int(lifetime_s),
        "jti": jti or secrets.token_urlsafe(16),
        "token_type": TOKEN_TYPE,
        "actor_ref": subject,
        "scope": " ".join(sorted(set(scopes))),
    }
    if session_id:
        claims["sid"] = session_id
    if tenant_id:
        claims["tenant_id"] = tenant_id
    if membership_version is not None:
        claims["membership_version"] = membership_version
    if act:
        check_subject(act)
        claims["act"] = {"sub": act}
    for k, v in (extra or {}).items():
        if k in claims or k in ("nbf", "hex_identity"):
            raise ClaimError(f"claim {k} is set by the broker")
        claims[k] = v
    return claims
