"""Token diagnostics for ``gatewayd token decode|verify|mint|keygen`` (sans-IO except key files).

Everything here returns values; the CLI prints them. ``verify`` runs *every* check and names each
one that fails, rather than stopping at the first, because at 3 a.m. the second problem matters
too. The checks are SECURITY.md's (its table of inputs to reject) plus, for a SpacetimeDB
audience, SpacetimeDB's own limits (PROTOCOL.md §5-6): ES256/RS256 only, ``iat`` present,
``iss``/``sub`` at most 128 bytes and without ``|``, and a ``kid`` its JWKS publishes.

Nothing here fetches anything named by a token (no ``jku``/``x5u``): the JWKS comes from the
command line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gatewayd.proto.apikeys import parse_key
from gatewayd.proto.identity import claim_problems, identity_hex
from gatewayd.proto.tokens import FORBIDDEN_HEADERS, TokenInvalid, load_jwks

INBOUND_ALGS: Final = ("EdDSA", "ES256", "RS256")
SPACETIMEDB_ALGS: Final = ("ES256", "RS256")
DEFAULT_MAX_TOKEN_BYTES: Final = 8192
DEFAULT_LEEWAY_S: Final = 30
HEADER_REASONS: Final = {
    "jku": "a key URL from the token itself: never fetched",
    "x5u": "a certificate URL from the token itself: never fetched",
    "jwk": "a key embedded in the token (anyone can sign with their own key)",
    "x5c": "a certificate chain embedded in the token",
    "crit": "critical extensions: none are understood",
    "b64": "unencoded payloads (RFC 7797) are not accepted",
    "zip": "compressed payloads are not accepted",
    "enc": "an encrypted token (JWE), not a signed one",
    "cty": "a nested token (cty) is not accepted",
}


class NotAJws(ValueError):
    """The input is not a three-part JWS; ``kind`` names an opaque credential when recognised."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


# --- opaque credentials (SECURITY.md row 14) -----------------------------------------------------


def _alnum(s: str) -> bool:
    return s.isascii() and s.isalnum()


def classify_opaque(token: str) -> str | None:
    """Name a non-JWT credential: a gatewayd API key, a Better Auth session token, or an OAuth
    opaque access token. None when it looks like none of them."""
    if token.startswith(("gw_live_", "gw_test_")):
        env = "live" if token.startswith("gw_live_") else "test"
        try:
            parsed = parse_key(token)
        except TokenInvalid as exc:
            return f"a gatewayd API key ({env}), {exc.message}"
        return f"a gatewayd API key ({env}, key id {parsed.key_id}, checksum ok)"
    head, dot, tail = token.partition(".")
    if dot and "." not in tail and len(head) == 32 and _alnum(head) and len(tail.rstrip("=%3D")) >= 40:
        return "a Better Auth session token (signed cookie value: <token>.<HMAC signature>)"
    if not dot and len(token) == 32 and _alnum(token):
        return "a Better Auth session token (the raw session id; an OAuth opaque token has no fixed length)"
    if not dot and len(token) >= 16 and all(c.isalnum() or c in "-_~+/=" for c in token):
        return "an OAuth opaque access token (or another opaque session id): not a JWT"
    return None


# --- strict decoding -------------------------------------------------------------------------------


def _b64url(seg: str, what: str) -> bytes:
    if not seg or "=" in seg or any(c in seg for c in "+/ \n"):
        raise NotAJws(f"not a JWS: the {what} is not base64url (no padding, - and _ only)")
    try:
        return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))
    except (binascii.Error, ValueError):
        raise NotAJws(f"not a JWS: the {what} is not base64url") from None


def _json_object(raw: bytes, what: str, duplicates: list[str]) -> dict[str, Any]:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in items:
            if k in seen:
                duplicates.append(f"{what}: duplicate member {k!r} (parsers disagree on which wins)")
            seen[k] = v
        return seen

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotAJws(f"not a JWS: the {what} is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise NotAJws(f"not a JWS: the {what} is a JSON {type(doc).__name__}, not an object")
    return doc


@dataclass(frozen=True, slots=True)
class Decoded:
    header: dict[str, Any]
    claims: dict[str, Any]
    signature: bytes
    signing_input: bytes
    duplicates: list[str]


def decode_jws(token: str) -> Decoded:
    """Split and decode a compact JWS without verifying anything. Raises :class:`NotAJws`."""
    token = token.strip()
    parts = token.split(".")
    if len(parts) != 3:
        kind = classify_opaque(token)
        hint = f": this is {kind}" if kind else ""
        extra = " (5 segments: an encrypted JWE?)" if len(parts) == 5 else ""
        raise NotAJws(f"not a JWS: expected 3 dot-separated segments, got {len(parts)}{extra}{hint}", kind)
    duplicates: list[str] = []
    header = _json_object(_b64url(parts[0], "header"), "header", duplicates)
    claims = _json_object(_b64url(parts[1], "payload"), "payload", duplicates)
    sig = _b64url(parts[2], "signature") if parts[2] else b""
    return Decoded(header, claims, sig, f"{parts[0]}.{parts[1]}".encode(), duplicates)


def _when(ts: Any, now: float) -> str:
    if not isinstance(ts, int) or isinstance(ts, bool):
        return f"{ts!r} (not an integer)"
    at = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = int(ts - now)
    rel = f"in {delta} s" if delta >= 0 else f"{-delta} s ago"
    return f"{ts} = {at} ({rel})"


def describe(token: str, *, now: float | None = None) -> dict[str, Any]:
    """``token decode``: header, claims, notes and problems (never verifies a signature)."""
    now = time.time() if now is None else now
    try:
        d = decode_jws(token)
    except NotAJws as exc:
        return {"jws": False, "kind": exc.kind, "problems": [str(exc)]}
    notes: list[str] = []
    problems = list(d.duplicates)
    notes += [f"{n}: {_when(d.claims[n], now)}" for n in ("exp", "iat", "nbf") if n in d.claims]
    iss, sub = d.claims.get("iss"), d.claims.get("sub")
    if isinstance(iss, str) and isinstance(sub, str):
        notes.append(f"SpacetimeDB identity for (iss, sub): {identity_hex(iss, sub)}")
        problems += [f"SpacetimeDB: {p}" for p in claim_problems(iss, sub)]
    for member in sorted(FORBIDDEN_HEADERS & d.header.keys()):
        problems.append(f"header member {member!r}: {HEADER_REASONS[member]}")
    alg = d.header.get("alg")
    if not isinstance(alg, str) or not alg or alg.lower() == "none":
        problems.append(f"header alg {alg!r}: unsigned or missing algorithm")
    if not d.signature:
        problems.append("the signature segment is empty")
    return {"jws": True, "header": d.header, "claims": d.claims, "notes": notes, "problems": problems}


# --- verify ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Literal["ok", "fail", "skip"]
    detail: str


@dataclass(slots=True)
class VerifyReport:
    checks: list[Check] = field(default_factory=list)
    identity: str | None = None
    kind: str | None = None  # an opaque credential's kind, when the input is not a JWS

    def ok(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "ok", detail))

    def fail(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "fail", detail))

    def skip(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "skip", detail))

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def signature_checked(self) -> bool:
        return any(c.name == "signature" and c.status == "ok" for c in self.checks)


def is_spacetimedb_audience(audience: str | None, claims: Mapping[str, Any]) -> bool:
    """Heuristic for ``--spacetimedb auto``: the expected or presented audience names SpacetimeDB."""
    aud = claims.get("aud")
    values = [audience or ""] + ([aud] if isinstance(aud, str) else [a for a in aud if isinstance(a, str)]
                                 if isinstance(aud, list) else [])  # fmt: skip
    return any("spacetime" in v.lower() for v in values)


def verify_token(
    token: str,
    *,
    jwks: Mapping[str, Any] | None,
    issuer: str | None,
    audience: str | None,
    spacetimedb: bool | None = None,
    now: float | None = None,
    leeway_s: int = DEFAULT_LEEWAY_S,
    max_lifetime_s: int | None = None,
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
) -> VerifyReport:
    """Run every check on ``token``; ``spacetimedb`` None means "decide from the audience"."""
    now = time.time() if now is None else now
    r = VerifyReport()
    token = token.strip()
    if len(token.encode()) > max_token_bytes:
        r.fail("length", f"{len(token.encode())} bytes, more than the {max_token_bytes}-byte cap")
    else:
        r.ok("length", f"{len(token.encode())} bytes")
    try:
        d = decode_jws(token)
    except NotAJws as exc:
        r.fail("structure", str(exc))
        r.kind = exc.kind
        return r
    r.ok("structure", "three base64url segments; header and payload are JSON objects")
    if d.duplicates:
        r.fail("duplicates", "; ".join(d.duplicates))
    bad = sorted(FORBIDDEN_HEADERS & d.header.keys())
    for member in bad:
        r.fail(f"header.{member}", f"header member {member!r} not accepted: {HEADER_REASONS[member]}")
    if not bad:
        r.ok("header", "no jku/x5u/jwk/x5c/crit/b64/zip/enc/cty members")

    # Algorithm and key.
    alg = d.header.get("alg")
    alg_ok = False
    if not isinstance(alg, str) or not alg:
        r.fail("alg", f"algorithm missing or empty ({alg!r})")
    elif alg.lower() == "none":
        r.fail("alg", f"algorithm {alg!r}: unsigned tokens are never accepted")
    elif alg not in INBOUND_ALGS:
        why = " (HMAC: never with public keys)" if alg.startswith("HS") else ""
        r.fail("alg", f"algorithm {alg!r} is not accepted{why}; allowed: {', '.join(INBOUND_ALGS)}")
    else:
        alg_ok = True
        r.ok("alg", alg)
    kid = d.header.get("kid")
    key: jwt.PyJWK | None = None
    if not isinstance(kid, str) or not kid:
        r.fail("kid", "no kid in the header: the key cannot be chosen")
    elif jwks is None:
        r.skip("kid", f"{kid!r} (not looked up: no --jwks)")
    else:
        keys = load_jwks(jwks, INBOUND_ALGS)
        raw_kids = {k.get("kid") for k in jwks.get("keys", []) if isinstance(k, Mapping)}
        if kid in keys:
            key = keys[kid]
            r.ok("kid", f"{kid!r} is in the JWKS ({key.algorithm_name})")
        elif kid in raw_kids:
            r.fail(
                "kid", f"{kid!r} is in the JWKS but that key is refused (weak, private, symmetric or not sig)"
            )
        else:
            r.fail("kid", f"unknown signing key {kid!r}: the JWKS has {sorted(str(k) for k in raw_kids)}")
    if key is not None and alg_ok and key.algorithm_name != alg:
        r.fail("alg", f"algorithm {alg} does not match the key's algorithm {key.algorithm_name}")
        alg_ok = False

    # Signature.
    if not d.signature:
        r.fail("signature", "empty signature")
    elif jwks is None:
        r.skip("signature", "not checked (give --jwks URL|FILE)")
    elif key is None or not alg_ok:
        r.fail("signature", "not verifiable: no acceptable key for this algorithm and kid")
    elif key.Algorithm.verify(d.signing_input, key.key, d.signature):
        r.ok("signature", f"valid {alg} signature by {kid!r}")
    else:
        r.fail(
            "signature", f"signature verification failed ({alg}, key {kid!r}; DER or forged signatures fail)"
        )

    # Time claims.
    c = d.claims
    times: dict[str, int] = {}
    for name in ("exp", "iat", "nbf"):
        v = c.get(name)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            r.fail(name, f"claim {name} must be an integer (got {v!r})")
        else:
            times[name] = v
    if "exp" not in c:
        r.fail("exp", "claim exp is required")
    elif "exp" in times:
        if times["exp"] + leeway_s < now:
            r.fail("exp", f"token expired: {_when(times['exp'], now)}")
        else:
            r.ok("exp", _when(times["exp"], now))
    if "iat" in times:
        if times["iat"] > now + leeway_s:
            r.fail("iat", f"issued in the future: {_when(times['iat'], now)}")
        else:
            r.ok("iat", _when(times["iat"], now))
    if "nbf" in times:
        if times["nbf"] > now + leeway_s:
            r.fail("nbf", f"nbf is in the future (not valid yet): {_when(times['nbf'], now)}")
        else:
            r.ok("nbf", _when(times["nbf"], now))
    if max_lifetime_s is not None and "exp" in times and "iat" in times:
        life = times["exp"] - times["iat"]
        if life > max_lifetime_s:
            r.fail("lifetime", f"exp - iat = {life} s, more than the {max_lifetime_s} s allowed")

    # Issuer, audience, subject.
    iss = c.get("iss")
    if issuer is None:
        r.skip("iss", f"{iss!r} (not compared: no --issuer)")
    elif not isinstance(iss, str):
        r.fail("iss", f"issuer claim must be a string, got {iss!r}")
    elif iss != issuer:
        r.fail("iss", f"issuer mismatch: {iss!r} is not {issuer!r} (compared byte for byte)")
    else:
        r.ok("iss", repr(iss))
    aud = c.get("aud")
    if audience is None:
        r.skip("aud", f"{aud!r} (not compared: no --audience)")
    elif aud is None:
        r.fail("aud", f"aud is missing; expected {audience!r}")
    elif isinstance(aud, str) and aud == audience:
        r.ok("aud", repr(aud))
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud) and audience in aud:
        r.ok("aud", f"{aud!r} contains {audience!r}")
    else:
        r.fail("aud", f"audience {aud!r} does not include {audience!r}")
    sub = c.get("sub")
    if not isinstance(sub, str) or not sub:
        r.fail("sub", f"claim sub must be a non-empty string (got {sub!r})")
    else:
        r.ok("sub", repr(sub))
    if isinstance(iss, str) and isinstance(sub, str):
        r.identity = identity_hex(iss, sub)

    # SpacetimeDB's own rules.
    if spacetimedb is None:
        spacetimedb = is_spacetimedb_audience(audience, c)
    if spacetimedb:
        if alg not in SPACETIMEDB_ALGS:
            r.fail("spacetimedb.alg", f"SpacetimeDB accepts only ES256 and RS256, not {alg!r}")
        else:
            r.ok("spacetimedb.alg", str(alg))
        if "iat" not in c:
            r.fail("spacetimedb.iat", "SpacetimeDB requires iat")
        for p in claim_problems(iss if isinstance(iss, str) else "", sub if isinstance(sub, str) else ""):
            r.fail("spacetimedb.claims", p)
        if jwks is not None:
            if key is None:
                r.fail("spacetimedb.kid", f"kid {kid!r} is not published in the JWKS SpacetimeDB fetches")
            else:
                r.ok("spacetimedb.kid", f"{kid!r} published")
    return r


# --- mint and keygen ----------------------------------------------------------------------------

LOCAL_HOSTS: Final = ("localhost",)


def production_issuer(issuer: str) -> bool:
    """True for an issuer that looks like production: https on a non-loopback host."""
    u = urllib.parse.urlsplit(issuer)
    if u.scheme != "https":
        return False
    host = (u.hostname or "").lower()
    if host in LOCAL_HOSTS or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def generate_key(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported algorithm {alg!r} (ES256, RS256 or EdDSA)")


def load_private_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ValueError(f"{path}: not an EC P-256, RSA >= 2048 or Ed25519 private key")


def key_alg(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    return "EdDSA"


def public_jwk(key: PrivateKey, kid: str | None = None) -> dict[str, Any]:
    """The public JWK with ``kid`` (default: its RFC 7638 thumbprint), ``use`` and ``alg``."""
    alg = key_alg(key)
    algo: Any = {"ES256": jwt.algorithms.ECAlgorithm, "RS256": jwt.algorithms.RSAAlgorithm,
                 "EdDSA": jwt.algorithms.OKPAlgorithm}[alg]  # fmt: skip
    doc: dict[str, Any] = json.loads(algo.to_jwk(key.public_key()))
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}[
        doc["kty"]
    ]
    canonical = json.dumps({k: doc[k] for k in required}, separators=(",", ":"), sort_keys=True)

    thumb = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    doc.update({"kid": kid or thumb, "use": "sig", "alg": alg})
    return doc


def write_private_key(key: PrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.touch(mode=0o600, exist_ok=False)
    path.write_bytes(pem)


class MintRefused(ValueError):
    pass


def mint_token(
    key: PrivateKey,
    *,
    issuer: str,
    subject: str,
    audience: str | None,
    lifetime_s: int,
    extra: Mapping[str, Any],
    kid: str | None = None,
    now: float | None = None,
) -> str:
    """A local test token. Refuses production-looking issuers and claims SpacetimeDB would refuse."""
    if production_issuer(issuer):
        raise MintRefused(
            f"refusing to mint for {issuer!r}: an https issuer on a public host looks like production; "
            "use a local issuer (plain http, localhost, 127.0.0.1 or a bare name)"
        )
    problems = claim_problems(issuer, subject)
    if problems:
        raise MintRefused("refusing to mint: " + "; ".join(problems))
    if lifetime_s <= 0 or lifetime_s > 86400:
        raise MintRefused("lifetime must be between 1 s and 1 day")
    t = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iss": issuer, "sub": subject, "iat": t, "exp": t + lifetime_s,
                              "jti": uuid.uuid4().hex}  # fmt: skip
    if audience:
        claims["aud"] = audience
    for k, v in extra.items():
        if k in ("iss", "sub", "iat", "exp"):
            raise MintRefused(f"--claim {k}: set it with its own option")
        claims[k] = v
    jwk = public_jwk(key, kid)
    return jwt.encode(claims, key, algorithm=jwk["alg"], headers={"kid": jwk["kid"], "typ": "JWT"})


def parse_claim(text: str) -> tuple[str, Any]:
    """``key=value``; the value is JSON when it parses as JSON, else a string."""
    k, eq, v = text.partition("=")
    if not eq or not k:
        raise ValueError(f"--claim {text!r}: expected key=value")
    try:
        return k, json.loads(v)
    except ValueError:
        return k, v
