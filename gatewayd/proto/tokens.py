"""Inbound token verification and principals (sans-IO; keys are given, never fetched here).

The rules are SECURITY.md's: the token length is capped before parsing; dangerous or unsupported
header members (``jku``, ``x5u``, ``jwk``, ``x5c``, ``crit``, ``b64``, ``zip``, ``enc``, ``cty``)
are refused; the algorithm must be on the issuer's allow-list *and* match the key it selects
(PyJWT's ``PyJWK`` binds them); ``exp`` is required and every time claim must be a JSON integer;
``exp - iat`` may not exceed the issuer's maximum lifetime; ``iss`` is compared exactly; ``aud``
(a string, or an array of strings) must contain the configured audience; ``sub`` must be a
non-empty string.

A verified token becomes a :class:`Principal`. Request bodies and query strings never contribute
to a principal.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import jwt

from gatewayd.errors import AuthError

FORBIDDEN_HEADERS: Final = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "b64", "zip", "enc", "cty"})
ALLOWED_INBOUND_ALGS: Final = frozenset({"EdDSA", "ES256", "RS256"})
MAX_KID_CHARS: Final = 256  # real kids are short; bounds what a flood of random kids can make us store
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+")


class TokenInvalid(AuthError):
    """The credential is not acceptable (HTTP 401). ``code`` is stable; ``message`` is safe to show."""

    def __init__(self, message: str, *, code: str = "invalid_token") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PermissionDenied(AuthError):
    """The principal is known but may not do this (HTTP 403)."""

    def __init__(self, message: str, *, code: str = "forbidden") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RateLimited(AuthError):
    """Too many attempts (HTTP 429); ``retry_after_s`` goes into ``Retry-After``."""

    def __init__(self, message: str, *, retry_after_s: int, code: str = "rate_limited") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = max(1, int(retry_after_s))


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, built only from verified inputs (a verified JWT, an app session the app
    itself confirmed, or a stored API key), never from request bodies or query strings.

    ``subject`` follows the one scheme ``user:<id>`` / ``robot:<id>`` (docs/auth.md);
    ``credential`` says how it was established; ``expires_at`` (Unix seconds) bounds how long an
    open stream may run on it without a recheck.
    """

    subject: str
    kind: Literal["human", "robot"]
    tenant: str | None
    scopes: frozenset[str]
    issuer: str
    session_id: str | None = None
    delegated_by: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    credential: Literal["jwt", "session", "api_key"] = "jwt"
    expires_at: float | None = None

    def can(self, permission: str) -> bool:
        return permission in self.scopes


@dataclass(frozen=True, slots=True)
class IssuerKeys:
    """One trusted issuer: its exact ``iss``, keys by ``kid``, and the claim policy."""

    issuer: str
    keys: Mapping[str, jwt.PyJWK]
    audience: str
    algorithms: frozenset[str]
    tenant_claim: str = "tenant_id"
    scope_claim: str = "scope"
    max_lifetime_s: int = 3600
    leeway_s: int = 30
    # Prepended to ``sub`` when the issuer's subjects are bare ids (Better Auth: "user:").
    subject_prefix: str = ""
    # Scopes granted when the token carries none (app sessions usually carry no scope claim).
    default_scopes: frozenset[str] = frozenset()


def load_jwks(doc: Any, algorithms: Sequence[str]) -> dict[str, jwt.PyJWK]:
    """Keys from a JWKS document, filtered as SECURITY.md says: ``kid`` required, ``use`` absent or
    ``sig``, no private members, no symmetric keys, EC P-256 / RSA >= 2048 / OKP Ed25519 only."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise ValueError("a JWKS is an object with a 'keys' list")
    out: dict[str, jwt.PyJWK] = {}
    for raw in doc["keys"]:
        if not isinstance(raw, Mapping):
            continue
        kid, kty = raw.get("kid"), raw.get("kty")
        if not isinstance(kid, str) or not kid:
            continue
        if raw.get("use", "sig") != "sig" or kty == "oct":
            continue
        if any(k in raw for k in ("d", "p", "q", "dp", "dq", "qi", "k")):
            continue
        alg = raw.get("alg")
        if kty == "EC" and raw.get("crv") == "P-256":
            alg = alg or "ES256"
        elif kty == "OKP" and raw.get("crv") == "Ed25519":
            alg = alg or "EdDSA"
        elif kty == "RSA":
            alg = alg or "RS256"
            n = raw.get("n")
            if not isinstance(n, str) or len(_b64d(n)) * 8 < 2048:
                continue
        else:
            continue
        if alg not in algorithms:
            continue
        try:
            out[kid] = jwt.PyJWK(dict(raw), algorithm=alg)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
    return out


def _b64d(s: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except (binascii.Error, ValueError):
        return b""


def _segment_json(seg: str, what: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
        if seg.rstrip("=") != seg or not raw:
            raise ValueError
        return json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: "[[[[...]]]]" nested thousands deep fits in the length cap.
        raise TokenInvalid(f"not a JWS: the {what} is not base64url JSON", code="malformed_token") from None


def opaque_kind(token: str) -> str | None:
    """Name the kind of a non-JWT credential, for diagnostics (SECURITY.md row 14)."""
    if token.startswith(("gw_live_", "gw_test_")):
        return "a gatewayd API key"
    if token.count(".") == 1 and len(token) > 40:
        return "a Better Auth session token (signed cookie value)"
    if token.count(".") == 0 and len(token) >= 16:
        return "an opaque token (OAuth access token or session id)"
    return None


@dataclass(frozen=True, slots=True)
class Unverified:
    """A token that passed the structural checks (before any key lookup or network fetch).

    Only its issuer and ``kid`` may be used, to choose the key; nothing else is trusted yet.
    """

    token: str
    header: Mapping[str, Any]
    payload: Mapping[str, Any]
    issuer: IssuerKeys
    alg: str
    kid: str


class Verifier:
    """Verifies bearer JWTs against configured issuers. Sync and pure given its keys.

    :meth:`inspect` runs every check that needs no key (length, shape, header, algorithm,
    issuer); :meth:`check` verifies the signature and claims with the key the caller looked up
    (from static keys, or from a JWKS cache that may fetch). :meth:`verify` does both with the
    issuers' static keys. Time comes in as ``now`` (Unix seconds); nothing here reads a clock.
    """

    def __init__(self, issuers: Sequence[IssuerKeys], *, max_token_bytes: int = 8192) -> None:
        self.issuers = {i.issuer: i for i in issuers}
        self.max_token_bytes = max_token_bytes

    def verify(self, token: str, *, now: float) -> Principal:
        u = self.inspect(token)
        return self.check(u, u.issuer.keys.get(u.kid), now=now)

    def inspect(self, token: str) -> Unverified:
        """Structural checks; raises :class:`TokenInvalid` before any key is looked up."""
        if len(token) > self.max_token_bytes:
            raise TokenInvalid(f"token longer than {self.max_token_bytes} bytes", code="malformed_token")
        parts = token.split(".")
        if len(parts) != 3:
            kind = opaque_kind(token)
            hint = f" (this looks like {kind})" if kind else ""
            raise TokenInvalid(
                f"not a JWS: expected 3 segments, got {len(parts)}{hint}", code="malformed_token"
            )
        header = _segment_json(parts[0], "header")
        payload = _segment_json(parts[1], "payload")
        if not isinstance(header, dict):
            raise TokenInvalid("not a JWS: the header is not an object", code="malformed_token")
        if not isinstance(payload, dict):
            raise TokenInvalid("not a JWS: the payload is not an object", code="malformed_token")
        bad = sorted(FORBIDDEN_HEADERS & header.keys())
        if bad:
            raise TokenInvalid(f"token header members not accepted: {', '.join(bad)}")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_INBOUND_ALGS:
            raise TokenInvalid(f"algorithm {alg!r} is not accepted")
        if not parts[2] or not _B64URL.fullmatch(parts[2]):
            raise TokenInvalid("not a JWS: the signature is empty or not base64url", code="malformed_token")
        iss = payload.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise TokenInvalid("issuer is not trusted", code="untrusted_issuer")
        if alg not in issuer.algorithms:
            raise TokenInvalid(f"algorithm {alg} is not allowed for this issuer")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
            raise TokenInvalid("the token header has no usable kid", code="unknown_key")
        return Unverified(token, header, payload, issuer, alg, kid)

    def check(self, u: Unverified, key: jwt.PyJWK | None, *, now: float) -> Principal:
        """Verify signature and claims of an inspected token with the key its ``kid`` selected."""
        issuer, alg, payload = u.issuer, u.alg, u.payload
        if key is None:
            raise TokenInvalid("unknown signing key (kid)", code="unknown_key")
        if key.algorithm_name != alg:
            raise TokenInvalid(f"algorithm {alg} does not match the key's algorithm")
        for name in ("exp", "iat", "nbf"):
            v = payload.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise TokenInvalid(f"claim {name} must be an integer")
        if "exp" not in payload:
            raise TokenInvalid("claim exp is required")
        try:
            claims = jwt.decode(
                u.token,
                key,
                algorithms=[alg],
                audience=issuer.audience,
                issuer=issuer.issuer,
                # Time claims are checked below against ``now`` (PyJWT would read the clock).
                options={
                    "require": ["exp", "iss", "sub"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise TokenInvalid("token audience does not include this gateway") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenInvalid(f"claim {exc.claim} is required") from None
        except jwt.InvalidSignatureError:
            raise TokenInvalid("signature verification failed") from None
        except jwt.PyJWTError as exc:
            raise TokenInvalid(f"token rejected: {exc}") from None
        leeway = issuer.leeway_s
        exp: int = claims["exp"]
        if exp <= now - leeway:
            raise TokenInvalid("token expired", code="token_expired")
        nbf, iat = claims.get("nbf"), claims.get("iat")
        if isinstance(nbf, int) and nbf > now + leeway:
            raise TokenInvalid("token not valid yet (nbf in the future)")
        if isinstance(iat, int) and iat > now + leeway:
            raise TokenInvalid("token issued in the future (iat)")
        start = iat if isinstance(iat, int) else now
        if exp - start > issuer.max_lifetime_s:
            raise TokenInvalid(f"token lifetime exceeds {issuer.max_lifetime_s} s")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenInvalid("claim sub must be a non-empty string")
        return principal_from_claims(claims, issuer)


def scopes_of(raw: Any) -> frozenset[str]:
    """A ``scope`` claim as a set: a space-separated string or an array of strings."""
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list):
        return frozenset(s for s in raw if isinstance(s, str) and s)
    return frozenset()


def subject_kind(subject: str) -> Literal["human", "robot"]:
    return "robot" if subject.startswith("robot:") else "human"


def principal_from_claims(claims: Mapping[str, Any], issuer: IssuerKeys) -> Principal:
    sub = issuer.subject_prefix + str(claims["sub"])
    scopes = scopes_of(claims.get(issuer.scope_claim)) if issuer.scope_claim in claims else frozenset()
    if not scopes:
        scopes = issuer.default_scopes
    tenant = claims.get(issuer.tenant_claim)
    act = claims.get("act")
    delegated_by = act.get("sub") if isinstance(act, Mapping) and isinstance(act.get("sub"), str) else None
    sid = claims.get("sid")
    exp = claims.get("exp")
    return Principal(
        subject=sub,
        kind=subject_kind(sub),
        tenant=tenant if isinstance(tenant, str) and tenant else None,
        scopes=scopes,
        issuer=issuer.issuer,
        session_id=sid if isinstance(sid, str) else None,
        delegated_by=delegated_by,
        claims=dict(claims),
        credential="jwt",
        expires_at=float(exp) if isinstance(exp, int) else None,
    )
