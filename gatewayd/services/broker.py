"""The token broker: gatewayd's key ring on disk, its JWKS, and short-lived SpacetimeDB tokens.

* :class:`KeyRing`: one JSON file per key in ``keys_dir`` (``<kid>.json``: algorithm, times,
  PKCS#8 private key), files 0600 in a 0700 folder, written atomically. ``gatewayd keys`` uses it
  directly.
* :class:`Broker`: loads the ring, follows the rotation schedule of
  :mod:`gatewayd.proto.keyring` (publish before use, retire after the last token expired),
  serves ``/.well-known/openid-configuration`` and ``/.well-known/jwks.json`` documents, and
  mints tokens under the claim contract of :mod:`gatewayd.proto.claims`. It is the
  :data:`TokenSource` of the service connection and the minter of per-user connections.
  :meth:`Broker.serve` is the maintenance task (rescan, rotate, retire), startable.

Keys found on disk that this process has not yet served are activated no earlier than
``publish_lead_s`` after it first served them, so a key added by ``gatewayd keys rotate`` while the
daemon runs is never used before SpacetimeDB can have fetched it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gatewayd.errors import ConfigError
from gatewayd.proto.claims import ClaimError, access_claims, check_algorithm, check_issuer, check_subject
from gatewayd.proto.keyring import KeyState, KeyTimes, Schedule, next_event, published, rotation_due, states
from gatewayd.proto.tokens import Principal
from gatewayd.services.supervisor import Credential

logger = logging.getLogger(__name__)

_KID_CHARS: Final = 16
RSA_BITS: Final = 3072


@dataclass(frozen=True, slots=True)
class StoredKey:
    kid: str
    alg: str
    created_at: float
    activate_at: float
    private_key: Any = field(repr=False)

    def times(self) -> KeyTimes:
        return KeyTimes(self.kid, self.created_at, self.activate_at)

    def public_jwk(self) -> dict[str, Any]:
        algo: Any = ECAlgorithm if self.alg == "ES256" else RSAAlgorithm
        doc: dict[str, Any] = json.loads(algo.to_jwk(self.private_key.public_key()))
        doc.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return doc


def _new_private_key(alg: str) -> Any:
    check_algorithm(alg)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


class KeyRing:
    """The key folder. Synchronous (small files); the daemon calls it from its maintenance task."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def ensure_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)

    def load(self) -> list[StoredKey]:
        if not self.folder.is_dir():
            return []
        keys = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                doc = json.loads(path.read_text())
                pem = doc["private_key_pem"].encode()
                key = serialization.load_pem_private_key(pem, password=None)
                alg = doc["alg"]
                check_algorithm(alg)
                if alg == "ES256" and not (isinstance(key, ec.EllipticCurvePrivateKey)
                                           and isinstance(key.curve, ec.SECP256R1)):  # fmt: skip
                    raise ValueError("ES256 needs an EC P-256 key")
                if alg == "RS256" and not (isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048):
                    raise ValueError("RS256 needs an RSA key of at least 2048 bits")
                keys.append(
                    StoredKey(doc["kid"], alg, float(doc["created_at"]), float(doc["activate_at"]), key)
                )
            except (OSError, ValueError, KeyError, TypeError, ClaimError) as exc:
                raise ConfigError(f"key ring {self.folder}: {path.name} is unusable: {exc}") from None
        return keys

    def generate(self, alg: str, *, now: float, activate_at: float) -> StoredKey:
        self.ensure_folder()
        key = StoredKey(secrets.token_hex(_KID_CHARS // 2), alg, now, activate_at, _new_private_key(alg))
        pem = key.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        doc = {
            "kid": key.kid,
            "alg": alg,
            "created_at": now,
            "activate_at": activate_at,
            "private_key_pem": pem,
        }
        tmp = self.folder / f".{key.kid}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / f"{key.kid}.json")
        return key

    def remove(self, kid: str) -> None:
        (self.folder / f"{kid}.json").unlink(missing_ok=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerSettings:
    issuer: str | None  # None: http://<first bound address> (development only)
    audience: str = "spacetimedb"
    algorithm: str = "ES256"
    token_lifetime_s: int = 300
    service_token_lifetime_s: int = 900
    service_subject: str = "robot:gatewayd"
    publish_lead_s: float = 360.0
    retire_margin_s: float = 120.0
    rotate_after_s: float = 30 * 24 * 3600.0
    rescan_s: float = 30.0

    def schedule(self) -> Schedule:
        return Schedule(
            publish_lead_s=self.publish_lead_s,
            max_token_lifetime_s=max(self.token_lifetime_s, self.service_token_lifetime_s),
            retire_margin_s=self.retire_margin_s,
            rotate_after_s=self.rotate_after_s,
        )


class BrokerUnavailable(Exception):
    """No key may sign right now (an empty ring cannot happen after load; kept for safety)."""


class Broker:
    # Metrics hook: called with "ok" after each mint (sync, cheap).
    on_mint: Callable[[str], None] | None = None

    """Key ring + schedule + minting. See the module docstring."""

    def __init__(
        self,
        settings: BrokerSettings,
        ring: KeyRing,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        check_algorithm(settings.algorithm)
        check_subject(settings.service_subject, kind="robot")
        if settings.issuer is not None:
            check_issuer(settings.issuer)
        self.settings = settings
        self.ring = ring
        self.wall_clock = wall_clock
        self._issuer = settings.issuer
        self._keys: dict[str, StoredKey] = {}
        self._first_seen: dict[str, float] = {}
        self._loaded = False
        self.minted = 0

    # --- issuer --------------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        if self._issuer is None:
            raise BrokerUnavailable("the broker's issuer is not known yet (the gateway is not bound)")
        return self._issuer

    def bind_issuer(self, host: str, port: int) -> None:
        """Development: take the issuer from the bound address when none was configured."""
        if self._issuer is None:
            self._issuer = f"http://{host}:{port}"
            logger.info("broker issuer: %s (from the bound address; development only)", self._issuer)

    # --- keys ----------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the ring; an empty ring gets its first key, active at once."""
        now = self.wall_clock()
        keys = self.ring.load()
        if not keys:
            keys = [self.ring.generate(self.settings.algorithm, now=now, activate_at=now)]
            logger.info(
                "key ring %s was empty: generated %s (%s)", self.ring.folder, keys[0].kid, keys[0].alg
            )
        self._adopt(keys, now, initial=True)
        self._loaded = True

    def _adopt(self, keys: list[StoredKey], now: float, *, initial: bool) -> None:
        fresh: dict[str, StoredKey] = {}
        for k in keys:
            if k.kid not in self._first_seen:
                self._first_seen[k.kid] = now
                if not initial or k.activate_at > now:
                    # Not served by us yet: never sign with it before SpacetimeDB can know it.
                    earliest = now + self.settings.publish_lead_s
                    if k.activate_at < earliest and not (initial and k.activate_at <= now):
                        k = StoredKey(k.kid, k.alg, k.created_at, earliest, k.private_key)
            else:
                old = self._keys.get(k.kid)
                if old is not None:
                    k = old
            fresh[k.kid] = k
        self._keys = fresh

    def rescan(self) -> None:
        self._adopt(self.ring.load(), self.wall_clock(), initial=False)

    def _times(self) -> list[KeyTimes]:
        return [k.times() for k in self._keys.values()]

    def rotate(self) -> StoredKey:
        """Create the next key now; it signs after ``publish_lead_s``."""
        now = self.wall_clock()
        key = self.ring.generate(
            self.settings.algorithm, now=now, activate_at=now + self.settings.publish_lead_s
        )
        self._first_seen[key.kid] = now
        self._keys[key.kid] = key
        logger.info(
            "key %s published; signs from %s",
            key.kid,
            time.strftime("%H:%M:%S", time.gmtime(key.activate_at)),
        )
        return key

    def maintain(self) -> None:
        """One maintenance step: rotate when due, drop retired keys (from the JWKS and disk)."""
        now = self.wall_clock()
        sched = self.settings.schedule()
        if rotation_due(self._times(), now, sched):
            self.rotate()
        for kid, state in states(self._times(), now, sched).items():
            if state is KeyState.RETIRED:
                logger.info("key %s retired: its last token has expired; removing it", kid)
                self._keys.pop(kid, None)
                self.ring.remove(kid)

    def key_states(self) -> dict[str, KeyState]:
        return states(self._times(), self.wall_clock(), self.settings.schedule())

    def keys(self) -> list[StoredKey]:
        return sorted(self._keys.values(), key=lambda k: (k.activate_at, k.created_at))

    def signing_key(self) -> StoredKey:
        now = self.wall_clock()
        active = [k for k in self.keys() if k.activate_at <= now]
        if not active:
            raise BrokerUnavailable("no key is active yet")
        return active[-1]

    # --- documents -----------------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        kids = published(self._times(), self.wall_clock(), self.settings.schedule())
        return {"keys": [self._keys[kid].public_jwk() for kid in kids]}

    def openid_configuration(self) -> dict[str, Any]:
        iss = self.issuer
        return {
            "issuer": iss,
            "jwks_uri": f"{iss}/.well-known/jwks.json",
            "id_token_signing_alg_values_supported": [self.settings.algorithm],
            "subject_types_supported": ["public"],
            "response_types_supported": ["id_token"],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "iat",
                "exp",
                "jti",
                "token_type",
                "sid",
                "tenant_id",
                "actor_ref",
                "scope",
                "membership_version",
                "act",
            ],
        }

    # --- minting -------------------------------------------------------------------------------

    def mint(self, claims: dict[str, Any]) -> str:
        key = self.signing_key()
        self.minted += 1
        if self.on_mint is not None:
            self.on_mint("ok")
        return jwt.encode(claims, key.private_key, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"})

    def claims_for(self, principal: Principal, *, lifetime_s: int | None = None) -> dict[str, Any]:
        """The claim contract for a verified principal (raises ClaimError when it cannot be met)."""
        c = principal.claims
        extra: dict[str, Any] = {}
        if principal.credential == "api_key":
            extra = {"api_key_id": c.get("api_key_id"), "grant_version": c.get("grant_version")}
        mv = c.get("membership_version")
        return access_claims(
            issuer=self.issuer,
            subject=principal.subject,
            audience=self.settings.audience,
            now=int(self.wall_clock()),
            lifetime_s=lifetime_s or self.settings.token_lifetime_s,
            scopes=principal.scopes,
            session_id=principal.session_id,
            tenant_id=principal.tenant,
            membership_version=mv if isinstance(mv, int) and not isinstance(mv, bool) else None,
            act=principal.delegated_by,
            extra=extra,
        )

    def mint_for(self, principal: Principal) -> tuple[str, dict[str, Any]]:
        claims = self.claims_for(principal)
        return self.mint(claims), claims

    async def service_token(self) -> Credential:
        """:data:`TokenSource` of the service connection."""
        claims = access_claims(
            issuer=self.issuer,
            subject=self.settings.service_subject,
            audience=self.settings.audience,
            now=int(self.wall_clock()),
            lifetime_s=self.settings.service_token_lifetime_s,
            scopes=(),
        )
        await trio.lowlevel.checkpoint()
        return Credential(self.mint(claims), float(claims["exp"]))

    async def user_token(self, principal: Principal) -> Credential:
        """Minter of per-user connections (``UserTokenMinter``)."""
        token, claims = self.mint_for(principal)
        await trio.lowlevel.checkpoint()
        return Credential(token, float(claims["exp"]))

    # --- maintenance task ----------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Rescan the folder, rotate and retire on schedule, until cancelled. Startable.

        Cancellation: between steps; a step itself (small file writes) is synchronous.
        """
        if not self._loaded:
            self.load()
        self.maintain()
        task_status.started()
        while True:
            now = self.wall_clock()
            nxt = next_event(self._times(), now, self.settings.schedule())
            wait = self.settings.rescan_s if nxt is None else min(self.settings.rescan_s, max(0.0, nxt - now))
            await trio.sleep(wait + 0.001)
            try:
                self.rescan()
            except ConfigError as exc:
                logger.error("%s (keeping the keys loaded before)", exc)
            self.maintain()
