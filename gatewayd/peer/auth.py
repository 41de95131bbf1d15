"""The dev peer's token rules (PROTOCOL.md §6), as SpacetimeDB standalone applies them.

* The peer owns one ES256 key (no ``kid``). It signs anonymous identities (issuer ``localhost``,
  ``sub`` a random UUID, ``aud ["spacetimedb"]``, ``exp: null``) and the 60-second tokens of
  ``POST /v1/identity/websocket-token``, which keep the presented token's issuer, subject,
  audience and extra claims.
* Validation order (upstream ``FullTokenValidator``): first the peer's own key, whatever the
  issuer; if that fails and ``iss`` is the local issuer, reject; otherwise OIDC discovery:
  ``GET <iss without trailing '/'>/.well-known/openid-configuration`` -> ``jwks_uri`` -> JWKS.
  A ``kid`` in the token header selects the key (an unknown ``kid`` is rejected with *no*
  refetch); without one every key is tried. Only ES256 (P-256) and RS256 (RSA) are accepted.
* Claims: ``iss`` and ``sub`` non-empty strings of at most 128 bytes; ``iat`` a required integer;
  ``exp`` optional (null allowed) and checked with 60 s leeway; ``nbf`` and ``aud`` not checked;
  ``hex_identity``, when present, must equal the identity derived from ``iss``/``sub``.
* Discovered keys are cached per issuer: refreshed after ``jwks_refresh_s`` (300 s), dropped
  after ``jwks_expiry_s`` (7200 s); a failed refresh keeps serving the old keys until then.
  Every JWKS key needs a ``kid`` and must be EC P-256 or RSA, or the whole set is refused (as the
  ``jwks`` crate upstream does).

Every refusal is a :class:`TokenRejected` carrying the HTTP status and text the peer answers with.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gatewayd.proto.identity import MAX_CLAIM_BYTES, identity_hex

logger = logging.getLogger(__name__)

LOCAL_ISSUER: Final = "localhost"
ANONYMOUS_AUDIENCE: Final = "spacetimedb"
WEBSOCKET_TOKEN_LIFETIME_S: Final = 60  # upstream re-signs websocket tokens for 60 s
EXP_LEEWAY_S: Final = 60  # jsonwebtoken's default leeway, which upstream keeps
JWKS_REFRESH_S: Final = 300.0  # upstream CachingOidcTokenValidator::get_default
JWKS_EXPIRY_S: Final = 7200.0
MAX_TOKEN_BYTES: Final = 16 * 1024  # far above any real JWT; bounds the parsing work
MAX_DISCOVERY_BYTES: Final = 1024 * 1024  # discovery documents and JWKS are a few KiB
MAX_CACHED_ISSUERS: Final = 256  # a bound on memory if clients present many issuers
_KNOWN_CLAIMS: Final = frozenset(("hex_identity", "sub", "iss", "aud", "iat", "exp"))


class TokenRejected(Exception):
    """A token (or Authorization header) the peer refuses; ``status`` is the HTTP answer."""

    def __init__(self, message: str, *, status: int = 401) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Claims:
    """A validated token: the derived identity and the payload reducers see."""

    identity: str
    issuer: str
    subject: str
    audience: tuple[str, ...]
    payload: Mapping[str, Any]
    token: str


@dataclass(slots=True)
class _IssuerKeys:
    fetched_at: float
    keys: dict[str, tuple[str, Any]]  # kid -> (algorithm, public key)


@dataclass(slots=True)
class AuthStatistics:
    """Counters for tests: how often each issuer's discovery document was fetched."""

    discovery_fetches: dict[str, int] = field(default_factory=dict)


class PeerAuth:
    """Key, minting and validation for one peer.

    Args:
        issuer: the local issuer of anonymous tokens.
        private_key: an EC P-256 key to sign with; generated when None.
        jwks_refresh_s: refresh period of discovered issuer keys.
        jwks_expiry_s: after this long without a successful refresh, keys are dropped.
        http_timeout_s: timeout of each discovery request.
        allow_http_issuers: accept ``http://`` issuers (tests run them on 127.0.0.1).
    """

    def __init__(
        self,
        *,
        issuer: str = LOCAL_ISSUER,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        jwks_refresh_s: float = JWKS_REFRESH_S,
        jwks_expiry_s: float = JWKS_EXPIRY_S,
        http_timeout_s: float = 5.0,
        allow_http_issuers: bool = True,
    ) -> None:
        self.issuer = issuer
        self.private_key = private_key or ec.generate_private_key(ec.SECP256R1())
        if not isinstance(self.private_key.curve, ec.SECP256R1):
            raise ValueError("the peer's key must be an EC P-256 key (ES256)")
        self.public_key = self.private_key.public_key()
        self.public_key_pem: bytes = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.jwks_refresh_s = jwks_refresh_s
        self.jwks_expiry_s = jwks_expiry_s
        self.http_timeout_s = http_timeout_s
        self.allow_http_issuers = allow_http_issuers
        self.stats = AuthStatistics()
        self._cache: dict[str, _IssuerKeys] = {}
        self._locks: dict[str, trio.Lock] = {}

    # --- minting -------------------------------------------------------------------------------

    def sign(self, payload: Mapping[str, Any]) -> str:
        """Sign a payload with the peer's key: ES256, header ``{"typ":"JWT","alg":"ES256"}``."""
        return jwt.encode(dict(payload), self.private_key, algorithm="ES256", headers={"typ": "JWT"})

    def anonymous(self) -> Claims:
        """A fresh anonymous identity with its never-expiring token, as validated claims."""
        sub = str(uuid.uuid4())
        payload = {
            "hex_identity": identity_hex(self.issuer, sub),
            "sub": sub,
            "iss": self.issuer,
            "aud": [ANONYMOUS_AUDIENCE],
            "iat": int(time.time()),
            "exp": None,
        }
        return check_claims(payload, self.sign(payload))

    def mint_anonymous(self) -> tuple[str, str]:
        """A fresh anonymous identity and its token (``POST /v1/identity``)."""
        claims = self.anonymous()
        return claims.identity, claims.token

    def mint(self, subject: str, *, issuer: str | None = None, **extra: Any) -> str:
        """A token signed by the peer for any issuer/subject (test helper; never expires)."""
        iss = issuer or self.issuer
        payload: dict[str, Any] = {
            "hex_identity": identity_hex(iss, subject),
            "sub": subject,
            "iss": iss,
            "aud": [ANONYMOUS_AUDIENCE],
            "iat": int(time.time()),
            "exp": None,
        }
        payload.update(extra)
        return self.sign(payload)

    def re_sign(self, claims: Claims, lifetime_s: int = WEBSOCKET_TOKEN_LIFETIME_S) -> str:
        """The websocket-token: same iss/sub/aud/extra claims, new ``iat``, ``exp = iat + 60``."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "hex_identity": claims.identity,
            "sub": claims.subject,
            "iss": claims.issuer,
            "aud": list(claims.audience),
            "iat": now,
            "exp": now + lifetime_s,
        }
        payload.update({k: v for k, v in claims.payload.items() if k not in _KNOWN_CLAIMS})
        return self.sign(payload)

    # --- validation ----------------------------------------------------------------------------

    async def validate(self, token: str) -> Claims:
        """Validate a presented token as SpacetimeDB would.

        Cancellation: may wait on OIDC discovery (bounded by ``http_timeout_s`` per request);
        cancelling leaves the cache unchanged.

        Raises:
            TokenRejected: with the status (401) and the reason.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRejected("Invalid token: the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"Invalid token: malformed token ({exc})") from None
        try:
            return self._verify(token, self.public_key, "ES256", issuer=None)
        except TokenRejected as exc:
            local_error = exc
        issuer = _raw_issuer(token)
        if issuer == self.issuer:
            raise local_error
        keys = await self._issuer_keys(issuer)
        kid = header.get("kid")
        if kid is not None:
            found = keys.keys.get(kid) if isinstance(kid, str) else None
            if found is None:
                raise TokenRejected("Specified key ID not found in JWKs")
            return self._verify(token, found[1], found[0], issuer=issuer)
        last: TokenRejected = TokenRejected("Invalid token: no key in the issuer's JWKS")
        for alg, key in keys.keys.values():
            try:
                return self._verify(token, key, alg, issuer=issuer)
            except TokenRejected as exc:
                last = exc
        raise last

    def _verify(self, token: str, key: Any, alg: str, *, issuer: str | None) -> Claims:
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={
                    "verify_signature": True,
                    "verify_exp": False,  # checked below: upstream accepts "exp": null
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,  # checked below, with upstream's rules
                    "verify_jti": False,  # upstream ignores jti
                    "require": [],
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenRejected("Invalid token: InvalidSignature") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejected("Invalid token: InvalidAlgorithm") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"Invalid token: {exc}") from None
        claims = check_claims(payload, token)
        if issuer is not None and claims.issuer != issuer:
            raise TokenRejected(f"Issuer mismatch: got {claims.issuer!r}, expected {issuer!r}")
        return claims

    async def _issuer_keys(self, issuer: str) -> _IssuerKeys:
        entry = self._cache.get(issuer)
        if entry is not None and trio.current_time() - entry.fetched_at < self.jwks_refresh_s:
            return entry
        lock = self._locks.setdefault(issuer, trio.Lock())
        async with lock:  # single flight per issuer
            entry = self._cache.get(issuer)
            now = trio.current_time()
            if entry is not None and now - entry.fetched_at < self.jwks_refresh_s:
                return entry
            try:
                keys = await self._fetch_keys(issuer)
            except TokenRejected as exc:
                if entry is not None and now - entry.fetched_at < self.jwks_expiry_s:
                    logger.warning(
                        "peer: refreshing keys of %s failed (%s); keeping the old set", issuer, exc
                    )
                    return entry
                self._cache.pop(issuer, None)
                raise
            entry = _IssuerKeys(trio.current_time(), keys)
            if len(self._cache) >= MAX_CACHED_ISSUERS and issuer not in self._cache:
                oldest = min(self._cache, key=lambda k: self._cache[k].fetched_at)
                del self._cache[oldest]
                self._locks.pop(oldest, None)
            self._cache[issuer] = entry
            return entry

    async def _fetch_keys(self, issuer: str) -> dict[str, tuple[str, Any]]:
        self.stats.discovery_fetches[issuer] = self.stats.discovery_fetches.get(issuer, 0) + 1
        fail = f"Error fetching public key for issuer {issuer}"
        base = issuer.rstrip("/")
        if not self._fetchable(base):
            raise TokenRejected(f"{fail}: the issuer is not an {self._schemes()} URL")
        logger.info("peer: fetching keys for issuer %s", issuer)
        async with httpx.AsyncClient(
            timeout=self.http_timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            config = await _get_json(client, f"{base}/.well-known/openid-configuration", fail)
            jwks_uri = config.get("jwks_uri") if isinstance(config, dict) else None
            if not isinstance(jwks_uri, str) or not self._fetchable(jwks_uri):
                raise TokenRejected(f"{fail}: the discovery document has no usable jwks_uri")
            jwks = await _get_json(client, jwks_uri, fail)
        raw_keys = jwks.get("keys") if isinstance(jwks, dict) else None
        if not isinstance(raw_keys, list):
            raise TokenRejected(f"{fail}: the JWKS has no 'keys' list")
        keys: dict[str, tuple[str, Any]] = {}
        for raw in raw_keys:
            if not isinstance(raw, dict):
                raise TokenRejected(f"{fail}: a JWKS key is not an object")
            kid = raw.get("kid")
            if not isinstance(kid, str):
                raise TokenRejected(f"{fail}: a JWKS key has no kid")
            keys[kid] = _jwk_to_key(raw, fail)
        return keys

    def _schemes(self) -> str:
        return "http(s)" if self.allow_http_issuers else "https"

    def _fetchable(self, url: str) -> bool:
        parts = urlsplit(url)
        schemes = ("http", "https") if self.allow_http_issuers else ("https",)
        return parts.scheme in schemes and bool(parts.netloc)


async def _get_json(client: httpx.AsyncClient, url: str, fail: str) -> Any:
    try:
        async with client.stream("GET", url, headers={"Accept": "application/json"}) as resp:
            if resp.status_code != 200:
                raise TokenRejected(f"{fail}: GET {url} answered {resp.status_code}")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_DISCOVERY_BYTES:
                    raise TokenRejected(f"{fail}: GET {url} returned more than {MAX_DISCOVERY_BYTES} bytes")
    except httpx.HTTPError as exc:
        raise TokenRejected(f"{fail}: GET {url} failed: {exc!r}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise TokenRejected(f"{fail}: GET {url} did not return JSON") from None


def _jwk_to_key(raw: dict[str, Any], fail: str) -> tuple[str, Any]:
    kty = raw.get("kty")
    try:
        if kty == "EC":
            if raw.get("crv") != "P-256":
                raise TokenRejected(f"{fail}: JWKS key {raw.get('kid')!r} uses curve {raw.get('crv')!r}")
            key = ECAlgorithm.from_jwk(json.dumps(raw))
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise TokenRejected(f"{fail}: JWKS key {raw.get('kid')!r} is a private key")
            return "ES256", key
        if kty == "RSA":
            if "d" in raw:
                raise TokenRejected(f"{fail}: JWKS key {raw.get('kid')!r} is a private key")
            rkey = RSAAlgorithm.from_jwk(json.dumps(raw))
            if not isinstance(rkey, rsa.RSAPublicKey):
                raise TokenRejected(f"{fail}: JWKS key {raw.get('kid')!r} is a private key")
            return "RS256", rkey
    except jwt.PyJWTError as exc:
        raise TokenRejected(f"{fail}: JWKS key {raw.get('kid')!r} is invalid: {exc}") from None
    raise TokenRejected(f"{fail}: JWKS key {raw.get('kid')!r} has unsupported type {kty!r}")


def _raw_issuer(token: str) -> str:
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenRejected(f"Invalid token: {exc}") from None
    iss = payload.get("iss")
    if not isinstance(iss, str):
        raise TokenRejected("Invalid token: Missing required claim: iss")
    return iss


def _int_claim(payload: Mapping[str, Any], name: str) -> int | None:
    v = payload.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TokenRejected(f"Invalid token: claim {name} must be an integer number of seconds")
    return v


def check_claims(payload: Mapping[str, Any], token: str, *, now: float | None = None) -> Claims:
    """Apply SpacetimeDB's claim rules to a signature-checked payload (PROTOCOL.md §6.2)."""
    for name in ("sub", "iss"):
        if name not in payload:
            raise TokenRejected(f"Invalid token: Missing required claim: {name}")
        if not isinstance(payload[name], str):
            raise TokenRejected(f"Invalid token: claim {name} must be a string")
    iss: str = payload["iss"]
    sub: str = payload["sub"]
    if "iat" not in payload:
        raise TokenRejected("Invalid token: missing field `iat`")
    if _int_claim(payload, "iat") is None:
        raise TokenRejected("Invalid token: claim iat must be an integer number of seconds")
    exp = _int_claim(payload, "exp")
    if exp is not None and exp < (time.time() if now is None else now) - EXP_LEEWAY_S:
        raise TokenRejected("Invalid token: ExpiredSignature")
    aud_raw = payload.get("aud")
    if aud_raw is None:
        audience: tuple[str, ...] = ()
    elif isinstance(aud_raw, str):
        audience = (aud_raw,)
    elif isinstance(aud_raw, list) and all(isinstance(a, str) for a in aud_raw):
        audience = tuple(aud_raw)
    else:
        raise TokenRejected("Invalid token: aud must be a string or an array of strings")
    if len(iss.encode()) > MAX_CLAIM_BYTES:
        raise TokenRejected(f"Issuer too long: {iss!r}")
    if len(sub.encode()) > MAX_CLAIM_BYTES:
        raise TokenRejected(f"Subject too long: {sub!r}")
    if not iss:
        raise TokenRejected("Issuer empty")
    if not sub:
        raise TokenRejected("Subject empty")
    ident = identity_hex(iss, sub)
    claimed = payload.get("hex_identity")
    if claimed is not None and (not isinstance(claimed, str) or claimed.lower().removeprefix("0x") != ident):
        raise TokenRejected(
            f"Identity mismatch: token identity {claimed!r} does not match computed identity {ident}"
        )
    return Claims(ident, iss, sub, audience, dict(payload), token)
