"""Build the auth services from config: verifiers, JWKS caches, session checks, API keys, broker.

Daemon layer (like ``main``): it reads the files and secrets the config names.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import trio

from gatewayd.config import Config, read_secret
from gatewayd.errors import ConfigError
from gatewayd.proto.tokens import IssuerKeys, Verifier, load_jwks
from gatewayd.services.apikeys import ApiKeyLimits, ApiKeyService, ApiKeyStore
from gatewayd.services.auth import Authenticator
from gatewayd.services.broker import Broker, BrokerSettings, KeyRing
from gatewayd.services.jwks import JwksCache, JwksSettings, open_http_client
from gatewayd.services.sessions import SessionIntrospector, SessionSettings


def build_verifier(config: Config, base: Path) -> Verifier:
    """Issuers with their static keys (JWKS files); fetched issuers start with none."""
    issuers = []
    for iss in config.auth.issuers:
        keys = {}
        if iss.jwks_file:
            try:
                doc = json.loads((base / iss.jwks_file).read_text())
                keys = load_jwks(doc, iss.algorithms)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"auth.issuers: cannot load {iss.jwks_file}: {exc}") from None
        issuers.append(
            IssuerKeys(
                issuer=iss.issuer,
                keys=keys,
                audience=iss.audience,
                algorithms=frozenset(iss.algorithms),
                tenant_claim=iss.tenant_claim,
                scope_claim=iss.scope_claim,
                max_lifetime_s=iss.max_lifetime_s,
                leeway_s=iss.leeway_s,
                subject_prefix=iss.subject_prefix,
                default_scopes=frozenset(iss.default_scopes),
            )
        )
    return Verifier(issuers, max_token_bytes=config.auth.max_token_bytes)


def api_key_store(config: Config, base: Path) -> ApiKeyStore:
    k = config.auth.api_keys
    if k is None:
        raise ConfigError("auth.api_keys is not configured")
    pepper = read_secret(file=k.pepper_file, env=k.pepper_env, base=base)
    if pepper is None:
        raise ConfigError("auth.api_keys: no pepper (pepper_file or pepper_env)")
    try:
        return ApiKeyStore(base / k.database, pepper.encode())
    except ValueError as exc:
        raise ConfigError(f"auth.api_keys: {exc}") from None


def build_authenticator(
    config: Config,
    base: Path,
    *,
    verifier: Verifier | None = None,
    wall_clock: Callable[[], float] = time.time,
    clock: Callable[[], float] = trio.current_time,
) -> Authenticator:
    a = config.auth
    verifier = verifier or build_verifier(config, base)
    remote = [i for i in a.issuers if i.jwks_url or i.discovery_url]
    client = open_http_client(timeout_s=a.jwks.timeout_s) if remote or a.session else None
    caches = {}
    for iss in remote:
        assert client is not None
        caches[iss.issuer] = JwksCache(
            issuer=iss.issuer,
            algorithms=iss.algorithms,
            client=client,
            jwks_url=iss.jwks_url,
            discovery_url=iss.discovery_url,
            settings=JwksSettings(
                refresh_s=iss.jwks_refresh_s,
                unknown_kid_cooldown_s=iss.unknown_kid_cooldown_s,
                stale_max_s=iss.stale_max_s,
                timeout_s=a.jwks.timeout_s,
                failure_backoff_s=a.jwks.failure_backoff_s,
                max_bytes=a.jwks.max_bytes,
                max_keys=a.jwks.max_keys_count,
            ),
            clock=clock,
        )
    sessions = None
    if a.session is not None:
        assert client is not None
        s = a.session
        sessions = SessionIntrospector(
            SessionSettings(
                url=s.url,
                issuer=s.issuer,
                cookie_names=tuple(s.cookie_names),
                cache_s=s.cache_s,
                timeout_s=s.timeout_s,
                subject_prefix=s.subject_prefix,
                tenant_field=s.tenant_field,
                scopes=frozenset(s.scopes),
            ),
            client,
            clock=clock,
        )
    api_keys = None
    if a.api_keys is not None:
        k = a.api_keys
        api_keys = ApiKeyService(
            api_key_store(config, base),
            ApiKeyLimits(
                key_attempts=k.key_attempts_count,
                ip_failures=k.ip_failures_count,
                window_s=k.window_s,
                threads=k.threads_count,
            ),
            clock=clock,
            wall_clock=wall_clock,
        )
    return Authenticator(
        verifier, caches=caches, sessions=sessions, api_keys=api_keys, client=client, wall_clock=wall_clock
    )


def build_broker(
    config: Config, base: Path, *, wall_clock: Callable[[], float] = time.time, issuer: str | None = None
) -> Broker | None:
    """The broker of ``[broker]``, its ring loaded (None when not configured).

    ``issuer`` overrides the configured one (the dev stack, whose port is known only once bound).
    """
    b = config.broker
    if b is None:
        return None
    broker = Broker(
        BrokerSettings(
            issuer=issuer or b.issuer or None,
            audience=b.audience,
            algorithm=b.algorithm,
            token_lifetime_s=b.token_lifetime_s,
            service_token_lifetime_s=b.service_token_lifetime_s,
            service_subject=b.service_subject,
            publish_lead_s=b.publish_lead_s,
            retire_margin_s=b.retire_margin_s,
            rotate_after_s=b.rotate_after_s,
            rescan_s=b.rescan_s,
        ),
        KeyRing(base / b.keys_dir),
        wall_clock=wall_clock,
    )
    broker.load()
    return broker
