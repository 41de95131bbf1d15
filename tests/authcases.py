"""SECURITY.md's table of inputs a verifier must reject, as reusable cases.

An :class:`IssuerKit` is a trusted issuer (ES256, EdDSA and RS256 keys, a JWKS) that can sign
anything, including hand-assembled tokens with broken headers or signatures. :data:`REJECT_CASES`
lists every row of the table (rows 13, the kid flood, is a cache property tested where the cache
is); each case builds its token from a kit. The same cases run against the sync verifier
(tests/proto), the JWKS-backed authenticator (tests/services) and ``POST /v1/token`` (tests/http).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://auth.example.test"
AUDIENCE = "gatewayd"
# The order of the P-256 group (for the "psychic signature" r = s = n).
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bjson(doc: Any) -> str:
    return b64(json.dumps(doc, separators=(",", ":")).encode())


class IssuerKit:
    """A trusted issuer with one key of each inbound algorithm."""

    def __init__(self, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self.es = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.rs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.keys: dict[str, tuple[str, Any]] = {"k-es": ("ES256", self.es), "k-ed": ("EdDSA", self.ed),
                                                  "k-rs": ("RS256", self.rs)}  # fmt: skip

    def jwk(self, kid: str) -> dict[str, Any]:
        alg, key = self.keys[kid]
        algo: Any = {"ES256": ECAlgorithm, "EdDSA": OKPAlgorithm, "RS256": RSAAlgorithm}[alg]
        doc: dict[str, Any] = json.loads(algo.to_jwk(key.public_key()))
        doc.update({"kid": kid, "use": "sig", "alg": alg})
        return doc

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk(k) for k in self.keys]}

    def claims(self, now: float | None = None, **over: Any) -> dict[str, Any]:
        t = int(time.time() if now is None else now)
        doc: dict[str, Any] = {"iss": self.issuer, "sub": "u-1", "aud": self.audience, "iat": t,
                               "exp": t + 300, "tenant_id": "acme", "scope": "document.read"}  # fmt: skip
        for k, v in over.items():
            if v is DROP:
                doc.pop(k, None)
            else:
                doc[k] = v
        return doc

    def sign(
        self, payload: dict[str, Any], *, kid: str = "k-es", headers: dict[str, Any] | None = None
    ) -> str:
        alg, key = self.keys[kid]
        if alg == "ES256":  # assembled by hand, so that odd headers and payloads go out as given
            si, sig = self.raw_es256({"alg": alg, "kid": kid, **(headers or {})}, payload)
            return f"{si}.{b64(sig)}"
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid, **(headers or {})})

    def token(self, kid: str = "k-es", **over: Any) -> str:
        return self.sign(self.claims(**over), kid=kid)

    def raw_es256(self, header: dict[str, Any], payload: dict[str, Any]) -> tuple[str, bytes]:
        """Signing input and a valid raw r||s ES256 signature over it."""
        signing_input = f"{bjson(header)}.{bjson(payload)}"
        der = self.es.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = _der_rs(der)
        return signing_input, r.to_bytes(32, "big") + s.to_bytes(32, "big")


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()


def _der_rs(der: bytes) -> tuple[int, int]:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    return decode_dss_signature(der)


def _hs256(key: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    signing_input = f"{bjson(header)}.{bjson(payload)}"
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


@dataclass(frozen=True)
class Case:
    row: int
    name: str
    make: Callable[[IssuerKit], str]
    # A word the rejection message must contain (diagnostics name the reason).
    says: str = ""

    @property
    def id(self) -> str:
        return f"row{self.row}-{self.name}"


def _alg_none(spelling: str) -> Callable[[IssuerKit], str]:
    return lambda k: f"{bjson({'alg': spelling, 'kid': 'k-es'})}.{bjson(k.claims())}."


def _relabel(alg: Any, kid: str = "k-es") -> Callable[[IssuerKit], str]:
    """A valid ES256 signature under a header claiming another (or no) algorithm."""

    def make(k: IssuerKit) -> str:
        header: dict[str, Any] = {"kid": kid}
        if alg is not DROP:
            header["alg"] = alg
        si, sig = k.raw_es256(header, k.claims())
        return f"{si}.{b64(sig)}"

    return make


def _hs_with_public(form: str) -> Callable[[IssuerKit], str]:
    def make(k: IssuerKit) -> str:
        pub = k.es.public_key()
        if form == "pem":
            key = pub.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        elif form == "point":
            key = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        else:
            key = k.jwk("k-es")["x"].encode()
        return _hs256(key, {"alg": "HS256", "kid": "k-es"}, k.claims())

    return make


def _es_sig(kind: str) -> Callable[[IssuerKit], str]:
    def make(k: IssuerKit) -> str:
        header = {"alg": "ES256", "kid": "k-es"}
        si, _ = k.raw_es256(header, k.claims())
        if kind == "zeros":
            sig = bytes(64)
        elif kind == "psychic":
            sig = P256_N.to_bytes(32, "big") * 2
        elif kind == "empty":
            sig = b""
        else:  # DER instead of raw r||s
            sig = k.es.sign(si.encode(), ec.ECDSA(hashes.SHA256()))
        return f"{si}.{b64(sig)}"

    return make


def _with_header(**extra: Any) -> Callable[[IssuerKit], str]:
    def make(k: IssuerKit) -> str:
        return k.sign(k.claims(), headers=extra)

    return make


def _embedded_jwk(k: IssuerKit) -> str:
    attacker = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(attacker.public_key()))
    return jwt.encode(k.claims(), attacker, algorithm="ES256", headers={"kid": "k-es", "jwk": jwk})


def _foreign_key(k: IssuerKit) -> str:
    attacker = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(k.claims(), attacker, algorithm="ES256", headers={"kid": "k-es"})


def _segments(n: int) -> Callable[[IssuerKit], str]:
    def make(k: IssuerKit) -> str:
        parts = k.token().split(".")
        return ".".join((parts * 2)[:n])

    return make


def _bad_b64(k: IssuerKit) -> str:
    h, p, s = k.token().split(".")
    return f"{h}.{p[:10]}*{p[11:]}.{s}"


def _array_payload(k: IssuerKit) -> str:
    header = {"alg": "ES256", "kid": "k-es"}
    si = f"{bjson(header)}.{bjson([k.claims()])}"
    der = k.es.sign(si.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = _der_rs(der)
    return f"{si}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _claims(**over: Any) -> Callable[[IssuerKit], str]:
    return lambda k: k.token(**over)


def _now() -> int:
    return int(time.time())


REJECT_CASES: list[Case] = [
    Case(1, "alg-none", _alg_none("none"), "algorithm"),
    Case(1, "alg-None", _alg_none("None"), "algorithm"),
    Case(1, "alg-NONE", _alg_none("NONE"), "algorithm"),
    Case(1, "empty-signature", _es_sig("empty"), "signature"),
    Case(2, "alg-missing", _relabel(DROP), "algorithm"),
    Case(2, "alg-empty", _relabel(""), "algorithm"),
    Case(2, "es384-on-es256-key", _relabel("ES384"), "algorithm"),
    Case(2, "rs256-on-es256-key", _relabel("RS256"), "algorithm"),
    Case(2, "eddsa-on-es256-key", _relabel("EdDSA"), "algorithm"),
    Case(3, "hs256-public-pem", _hs_with_public("pem"), "algorithm"),
    Case(3, "hs256-public-point", _hs_with_public("point"), "algorithm"),
    Case(3, "hs256-jwk-x", _hs_with_public("x"), "algorithm"),
    Case(4, "es256-zeros", _es_sig("zeros"), "signature"),
    Case(4, "es256-psychic", _es_sig("psychic"), "signature"),
    Case(5, "es256-der", _es_sig("der"), "signature"),
    Case(6, "jku", _with_header(jku="https://evil.example/jwks.json"), "jku"),
    Case(6, "x5u", _with_header(x5u="https://evil.example/cert.pem"), "x5u"),
    Case(6, "embedded-jwk", _embedded_jwk, "jwk"),
    Case(7, "crit", _with_header(crit=["exp"]), "crit"),
    Case(7, "b64-false", _with_header(b64=False), "b64"),
    Case(7, "nested-cty-jwt", _with_header(cty="JWT"), "cty"),
    Case(7, "zip", _with_header(zip="DEF"), "zip"),
    Case(8, "two-segments", _segments(2), "not a JWS"),
    Case(8, "four-segments", _segments(4), "not a JWS"),
    Case(8, "five-segments", _segments(5), "not a JWS"),
    Case(8, "bad-base64url", _bad_b64, "not a JWS"),
    Case(8, "payload-array", _array_payload, "not a JWS"),
    Case(9, "expired", _claims(iat=_now() - 900, exp=_now() - 600), "expired"),
    Case(9, "iat-future", _claims(iat=_now() + 600, exp=_now() + 900), "future"),
    Case(9, "nbf-future", _claims(nbf=_now() + 600), "nbf"),
    Case(9, "exp-float", _claims(exp=_now() + 300.5), "integer"),
    Case(9, "exp-missing", _claims(exp=DROP), "exp"),
    Case(10, "iss-lookalike", _claims(iss=ISSUER + ".evil.example"), "issuer"),
    Case(10, "iss-substring", _claims(iss=ISSUER[:-3]), "issuer"),
    Case(10, "iss-trailing-slash", _claims(iss=ISSUER + "/"), "issuer"),
    Case(10, "iss-list", _claims(iss=[ISSUER]), "issuer"),
    Case(10, "aud-wrong", _claims(aud="someone-else"), "audience"),
    Case(10, "aud-missing", _claims(aud=DROP), "aud"),
    Case(11, "sub-missing", _claims(sub=DROP), "sub"),
    Case(11, "sub-number", _claims(sub=123), "sub"),
    Case(11, "sub-empty", _claims(sub=""), "sub"),
    Case(12, "foreign-key-our-kid", _foreign_key, "signature"),
    Case(14, "better-auth-session-token", lambda k: "x" * 32 + "." + "y" * 43, "Better Auth session"),
    Case(14, "gatewayd-api-key-as-jwt", lambda k: "gw_live_" + "a" * 40, "API key"),
    Case(14, "oauth-opaque", lambda k: "ya29" + "q" * 60, "opaque"),
]
