"""Configuration sections for app auth, API keys and the token broker (docs/auth.md).

Kept beside :mod:`gatewayd.config` (which embeds them) so that auth settings and their checks live
in one place. Same rules: strict, units in names, secrets by file path or environment variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import msgspec

from gatewayd.proto.claims import SPACETIME_ALGORITHMS, ClaimError, check_issuer, check_subject

if TYPE_CHECKING:
    from gatewayd.config import Config

# SpacetimeDB refreshes a foreign issuer's JWKS every 300 s and never refetches on an unknown kid
# (PROTOCOL.md §6.3): a new key must be published this long before anything is signed with it.
SPACETIME_JWKS_REFRESH_S = 300
# Margin on top of the refresh period: clock skew, a slow fetch, a rescan of the key folder.
PUBLISH_MARGIN_S = 60


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class JwksClientConfig(_Strict, frozen=True):
    """Limits of every JWKS / discovery / session fetch."""

    timeout_s: float = 5.0
    max_bytes: int = 64 * 1024
    max_keys_count: int = 32
    failure_backoff_s: float = 5.0


class SessionCheckConfig(_Strict, frozen=True):
    """Session introspection: ask the app (Better Auth ``GET <url>/get-session``)."""

    # The app's auth base URL, e.g. https://app.example.com/api/auth (http only on loopback).
    url: str
    # Principal.issuer for these sessions (default: url).
    issuer: str = ""
    cookie_names: list[str] = msgspec.field(
        default_factory=lambda: ["better-auth.session_token", "__Secure-better-auth.session_token"]
    )
    # How long an answer (yes or no) is reused: a revocation is seen at most this late.
    cache_s: float = 5.0
    timeout_s: float = 5.0
    subject_prefix: str = "user:"
    tenant_field: str = "activeOrganizationId"
    # Scopes of a session principal (sessions carry none; rights come from the tables).
    scopes: list[str] = msgspec.field(default_factory=list)


class ApiKeysConfig(_Strict, frozen=True):
    # The SQLite file (created if missing).
    database: str
    # The HMAC pepper (>= 32 bytes): a file, or an environment variable.
    pepper_file: str | None = None
    pepper_env: str | None = None
    key_attempts_count: int = 60
    ip_failures_count: int = 20
    window_s: float = 60.0
    threads_count: int = 4


class BrokerConfig(_Strict, frozen=True):
    """The token broker: gatewayd's own issuer for SpacetimeDB."""

    # Canonical issuer URL, byte for byte (no trailing '/'); SpacetimeDB fetches
    # <issuer>/.well-known/openid-configuration from it. Development only: "" takes
    # http://<bound address> (the port may be 0 in config).
    issuer: str
    # The folder of the key ring (private keys, mode 0600).
    keys_dir: str
    audience: str = "spacetimedb"
    algorithm: str = "ES256"
    # Lifetime of tokens from POST /v1/token and per-user connections (short: minutes).
    token_lifetime_s: int = 300
    # Lifetime of the service connection's token (refreshed before exp, make-before-break).
    service_token_lifetime_s: int = 900
    service_subject: str = "robot:gatewayd"
    # SpacetimeDB's JWKS refresh period; a new key is published this + margin before use.
    spacetime_jwks_refresh_s: int = SPACETIME_JWKS_REFRESH_S
    publish_lead_s: int = SPACETIME_JWKS_REFRESH_S + PUBLISH_MARGIN_S
    # Retired keys stay published until their last token expired, plus this margin.
    retire_margin_s: int = 120
    # Rotate automatically when the signing key is this old (0: only `gatewayd keys rotate`).
    rotate_after_s: int = 30 * 24 * 3600
    # Re-read keys_dir this often (keys added by `gatewayd keys rotate` while running).
    rescan_s: float = 30.0
    # "production" refuses local issuers (localhost, loopback, plain http).
    profile: Literal["production", "development"] = "production"


def _url_ok(url: str) -> bool:
    from gatewayd.services.jwks import url_problem

    return url_problem(url) is None


def issuer_is_local(issuer: str) -> bool:
    from gatewayd.services.jwks import is_loopback_host

    parts = urlsplit(issuer)
    return parts.scheme != "https" or is_loopback_host(parts.hostname) or not parts.hostname


def auth_problems(cfg: Config, base: Path) -> list[str]:
    """Checks of the auth and broker sections (called by ``config._problems``)."""
    out: list[str] = []
    a = cfg.auth
    for i, iss in enumerate(a.issuers):
        where = f"auth.issuers[{i}]"
        sources = [s for s in (iss.jwks_file, iss.jwks_url, iss.discovery_url) if s]
        if len(sources) != 1:
            out.append(f"{where}: set exactly one of jwks_file, jwks_url, discovery_url")
        if iss.jwks_file and not (base / iss.jwks_file).is_file():
            out.append(f"{where}.jwks_file: {iss.jwks_file} does not exist")
        for name, url in (("jwks_url", iss.jwks_url), ("discovery_url", iss.discovery_url)):
            if url and not _url_ok(url):
                out.append(f"{where}.{name}: must be https (plain http only on loopback), got {url!r}")
        if iss.jwks_refresh_s <= 0 or iss.unknown_kid_cooldown_s <= 0:
            out.append(f"{where}: jwks_refresh_s and unknown_kid_cooldown_s must be > 0")
        if iss.stale_max_s < iss.jwks_refresh_s:
            out.append(f"{where}.stale_max_s: must be >= jwks_refresh_s")
    j = a.jwks
    if j.timeout_s <= 0 or j.max_bytes <= 0 or j.max_keys_count <= 0:
        out.append("auth.jwks: timeout_s, max_bytes and max_keys_count must be > 0")
    if a.recheck_s <= 0:
        out.append("auth.recheck_s: must be > 0")
    if a.session is not None:
        if not _url_ok(a.session.url):
            out.append(f"auth.session.url: must be https (plain http only on loopback): {a.session.url!r}")
        if a.session.cache_s < 0 or a.session.timeout_s <= 0:
            out.append("auth.session: cache_s must be >= 0 and timeout_s > 0")
        if not a.session.cookie_names:
            out.append("auth.session.cookie_names: at least one")
    k = a.api_keys
    if k is not None:
        if bool(k.pepper_file) == bool(k.pepper_env):
            out.append("auth.api_keys: set pepper_file or pepper_env (exactly one)")
        if k.pepper_file and not (base / k.pepper_file).is_file():
            out.append(f"auth.api_keys.pepper_file: {k.pepper_file} does not exist")
        if min(k.key_attempts_count, k.ip_failures_count, k.threads_count) <= 0 or k.window_s <= 0:
            out.append("auth.api_keys: limits, window_s and threads_count must be > 0")
    b = cfg.broker
    if b is not None:
        if b.issuer or b.profile == "production":
            try:
                check_issuer(b.issuer)
            except ClaimError as exc:
                out.append(f"broker.issuer: {exc}")
        if b.profile == "production" and issuer_is_local(b.issuer):
            out.append(
                f"broker.issuer: {b.issuer!r} is a local or development issuer (localhost, loopback or "
                'plain http); the production profile refuses it (profile = "development" for tests)'
            )
        if b.algorithm not in SPACETIME_ALGORITHMS:
            out.append(f"broker.algorithm: {b.algorithm} is refused for SpacetimeDB (ES256 or RS256)")
        if not b.audience:
            out.append("broker.audience: required (one string)")
        try:
            check_subject(b.service_subject, kind="robot")
        except ClaimError as exc:
            out.append(f"broker.service_subject: {exc}")
        if b.token_lifetime_s <= 0 or b.service_token_lifetime_s <= 0:
            out.append("broker: token lifetimes must be > 0")
        if b.token_lifetime_s > 3600:
            out.append("broker.token_lifetime_s: at most 3600 (tokens are short-lived)")
        margin = min(PUBLISH_MARGIN_S, b.spacetime_jwks_refresh_s // 5)
        if b.publish_lead_s < b.spacetime_jwks_refresh_s + margin:
            out.append(
                f"broker.publish_lead_s: must be at least spacetime_jwks_refresh_s "
                f"({b.spacetime_jwks_refresh_s}) plus a margin"
            )
        if b.rotate_after_s and b.rotate_after_s <= b.publish_lead_s:
            out.append("broker.rotate_after_s: must be 0 or longer than publish_lead_s")
    return out
