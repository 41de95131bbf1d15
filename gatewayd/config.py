"""gatewayd's configuration: one strict TOML file (example: conf/gatewayd.toml).

Strict means: unknown keys are errors, every value is type-checked, and every error names its
path (``$.streams[0].tenant_column``). Durations end in ``_s``, sizes in ``_bytes`` or ``_count``.
Secrets are never inline: they are read from a file path or an environment variable name, and are
left out of ``repr``.

Parsing and validation live here; nothing below ``main`` reads the environment or the file system
for configuration.
"""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import msgspec

from gatewayd.authconfig import (
    ApiKeysConfig,
    BrokerConfig,
    JwksClientConfig,
    SessionCheckConfig,
    auth_problems,
)
from gatewayd.errors import ConfigError
from gatewayd.proto.access import AccessTables

_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class UpstreamConfig(_Strict, frozen=True):
    # http(s)://host[:port] of the SpacetimeDB server (the WebSocket URL is derived).
    url: str
    database: str
    # The service connection's token: a file holding it, or an environment variable naming it.
    # Neither: anonymous (SpacetimeDB mints an identity; fine for the dev peer, not production).
    token_file: str | None = None
    token_env: str | None = None
    compression: Literal["none", "gzip", "brotli"] = "gzip"
    connect_timeout_s: float = 10.0
    ping_interval_s: float = 15.0
    ping_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    auth_backoff_initial_s: float = 10.0
    auth_backoff_max_s: float = 300.0
    call_wait_s: float = 5.0
    # SpacetimeDB's own limit for one message.
    max_message_bytes: int = 32 * 1024 * 1024


class HttpConfig(_Strict, frozen=True):
    host: str = "127.0.0.1"
    port: int = 8080
    # Request heads larger than this are refused (431); bodies larger (413).
    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = 1024 * 1024
    # A client must send its request head within this (slowloris guard).
    head_timeout_s: float = 10.0
    # Open client connections (streams included); beyond it new ones are closed at once, so
    # trickling clients cannot exhaust file descriptors. Keep it under LimitNOFILE.
    max_connections_count: int = 100_000
    # A kept-alive API connection must make progress: each read waits at most this long.
    read_timeout_s: float = 30.0


class SseConfig(_Strict, frozen=True):
    heartbeat_s: float = 15.0
    # Browsers wait retry_ms (+ a random 0..retry_jitter_ms per connection) before reconnecting,
    # so a restart does not bring every client back in the same second.
    retry_ms: int = 2000
    retry_jitter_ms: int = 3000
    # Per-client backlog when its socket is full; beyond it the client is cut and must resume.
    client_buffer_bytes: int = 256 * 1024
    send_timeout_s: float = 15.0
    max_streams_per_principal: int = 16
    snapshot_chunk_rows: int = 500


class EventLogConfig(_Strict, frozen=True):
    # Replay ring per (stream, tenant): a client that was away for fewer events than this resumes
    # exactly; beyond it, it gets reset + snapshot.
    max_events_per_partition_count: int = 1000
    max_bytes_per_partition: int = 1024 * 1024
    # All rings together (least recently active partitions trimmed first).
    max_total_bytes: int = 256 * 1024 * 1024
    # Snapshot pages handed out by GET .../snapshot are kept this long for their next pages.
    snapshot_page_ttl_s: float = 60.0
    snapshot_pages_count: int = 256


class IssuerConfig(_Strict, frozen=True):
    issuer: str
    audience: str
    # The issuer's public keys, exactly one of: a JWKS file (local issuers, tests, the demo), a
    # JWKS URL (Better Auth: <base>/api/auth/jwks), or an OIDC discovery document URL.
    jwks_file: str | None = None
    jwks_url: str | None = None
    discovery_url: str | None = None
    algorithms: list[Literal["ES256", "RS256", "EdDSA"]] = msgspec.field(default_factory=lambda: ["ES256"])
    tenant_claim: str = "tenant_id"
    scope_claim: str = "scope"
    max_lifetime_s: int = 3600
    leeway_s: int = 30
    # Prepended to sub (Better Auth's subjects are bare user ids: "user:").
    subject_prefix: str = ""
    # Scopes of a principal whose token carries none.
    default_scopes: list[str] = msgspec.field(default_factory=list)
    # JWKS cache (jwks_url / discovery_url): refresh age, unknown-kid refetch cooldown, and how
    # long the last good set is kept while refreshes fail (then: fail closed).
    jwks_refresh_s: float = 300.0
    unknown_kid_cooldown_s: float = 30.0
    stale_max_s: float = 3600.0


class AuthConfig(_Strict, frozen=True):
    issuers: list[IssuerConfig] = msgspec.field(default_factory=list)
    # Longest accepted bearer token (checked before any parsing).
    max_token_bytes: int = 8192
    jwks: JwksClientConfig = msgspec.field(default_factory=JwksClientConfig)
    session: SessionCheckConfig | None = None
    api_keys: ApiKeysConfig | None = None
    # Open streams recheck their credential this often (a revoked session ends its streams).
    recheck_s: float = 30.0


class StreamConfig(_Strict, frozen=True):
    name: str
    tables: list[str]
    tenant_column: str
    permission: str
    # Upstream subscription queries; default: SELECT * FROM <table> for each table.
    queries: list[str] = msgspec.field(default_factory=list)


class ReducerConfig(_Strict, frozen=True):
    # The name clients use in POST /v1/reducers/{name}.
    name: str
    permission: str
    # The module's reducer to call (default: the same name).
    upstream: str | None = None
    # Arguments gatewayd fills from the verified principal; a client sending them is refused.
    actor_argument: str | None = None
    tenant_argument: str | None = None
    # "delegated": the service connection calls, the actor travels in actor_argument.
    # "user" / "hybrid": the caller's own connection (the module sees the user as ctx.sender);
    # hybrid is the default deployment: the service connection holds the subscriptions.
    attribution: Literal["delegated", "user", "hybrid"] = "delegated"


class WritesConfig(_Strict, frozen=True):
    idempotency_window_s: float = 600.0
    idempotency_max_count: int = 10_000
    rate_per_principal_per_s: float = 20.0
    burst_per_principal_count: int = 40
    rate_per_tenant_per_s: float = 200.0
    burst_per_tenant_count: int = 400
    # Per-user upstream connections (user/hybrid attribution): LRU-bounded, closed when idle.
    user_connections_count: int = 256
    user_connection_idle_s: float = 300.0


class AccessConfig(AccessTables, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # "claims": rights come from the token's scope claim and tenant claim (simple deployments).
    # "tables": rights come from the module's membership / role_permission / api_key_grant tables
    # (names and columns: the fields of AccessTables), projected live; streams are re-checked
    # (and revoked) as those rows change.
    mode: Literal["claims", "tables"] = "claims"


class CanaryConfig(_Strict, frozen=True):
    # /readyz's proof that updates flow (gatewayd/services/canary.py): every interval_s gatewayd
    # calls `reducer(name)` over SpacetimeDB's HTTP API and waits for the change to row `name` of
    # `table` to come back through its subscription; older than bound_s -> not ready.
    reducer: str = "bump_canary"
    table: str = "canary"
    name: str = "gateway"
    key_column: str = "name"
    interval_s: float = 5.0
    bound_s: float = 15.0
    call_timeout_s: float = 5.0


class LoggingConfig(_Strict, frozen=True):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Config(_Strict, frozen=True):
    upstream: UpstreamConfig
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    sse: SseConfig = msgspec.field(default_factory=SseConfig)
    event_log: EventLogConfig = msgspec.field(default_factory=EventLogConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    streams: list[StreamConfig] = msgspec.field(default_factory=list)
    reducers: list[ReducerConfig] = msgspec.field(default_factory=list)
    access: AccessConfig = msgspec.field(default_factory=AccessConfig)
    writes: WritesConfig = msgspec.field(default_factory=WritesConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    canary: CanaryConfig | None = None
    broker: BrokerConfig | None = None

    def stream_queries(self, s: StreamConfig) -> list[str]:
        return list(s.queries) or [f"SELECT * FROM {t}" for t in s.tables]


def _problems(cfg: Config, base: Path) -> list[str]:
    """Checks beyond types: ranges, names, cross-references. Every problem, not just the first."""
    out: list[str] = []
    u = urllib.parse.urlsplit(cfg.upstream.url)
    if u.scheme not in ("http", "https") or not u.hostname:
        out.append(f"upstream.url: must be http(s)://host[:port], got {cfg.upstream.url!r}")
    if not cfg.upstream.database or "/" in cfg.upstream.database:
        out.append("upstream.database: must be a database name")
    if cfg.upstream.token_file and cfg.upstream.token_env:
        out.append("upstream: set token_file or token_env, not both")
    if cfg.upstream.token_file and not (base / cfg.upstream.token_file).is_file():
        out.append(f"upstream.token_file: {cfg.upstream.token_file} does not exist")
    positive = {
        "upstream.connect_timeout_s": cfg.upstream.connect_timeout_s,
        "upstream.ping_interval_s": cfg.upstream.ping_interval_s,
        "upstream.ping_timeout_s": cfg.upstream.ping_timeout_s,
        "upstream.backoff_initial_s": cfg.upstream.backoff_initial_s,
        "http.head_timeout_s": cfg.http.head_timeout_s,
        "sse.heartbeat_s": cfg.sse.heartbeat_s,
        "sse.send_timeout_s": cfg.sse.send_timeout_s,
        "sse.client_buffer_bytes": cfg.sse.client_buffer_bytes,
        "sse.max_streams_per_principal": cfg.sse.max_streams_per_principal,
        "sse.snapshot_chunk_rows": cfg.sse.snapshot_chunk_rows,
        "event_log.max_events_per_partition_count": cfg.event_log.max_events_per_partition_count,
        "event_log.max_bytes_per_partition": cfg.event_log.max_bytes_per_partition,
        "event_log.max_total_bytes": cfg.event_log.max_total_bytes,
        "http.max_body_bytes": cfg.http.max_body_bytes,
    }
    out += [f"{k}: must be > 0" for k, v in positive.items() if v <= 0]
    if cfg.upstream.backoff_max_s < cfg.upstream.backoff_initial_s:
        out.append("upstream.backoff_max_s: must be >= backoff_initial_s")
    if not 0 <= cfg.http.port <= 65535:
        out.append(f"http.port: {cfg.http.port} is not a port number")
    if cfg.sse.retry_ms < 0 or cfg.sse.retry_jitter_ms < 0:
        out.append("sse.retry_ms / retry_jitter_ms: must be >= 0")
    if cfg.event_log.max_total_bytes < cfg.event_log.max_bytes_per_partition:
        out.append("event_log.max_total_bytes: must be >= max_bytes_per_partition")
    seen: set[str] = set()
    for i, s in enumerate(cfg.streams):
        where = f"streams[{i}] ({s.name!r})"
        if not _NAME.fullmatch(s.name):
            out.append(f"{where}.name: lowercase letters, digits and _ only (max 63)")
        if s.name in seen:
            out.append(f"{where}.name: duplicate stream name")
        seen.add(s.name)
        if not s.tables:
            out.append(f"{where}.tables: at least one table")
        out += [f"{where}.tables: {t!r} is not a table name" for t in s.tables if not _IDENT.fullmatch(t)]
        if not _IDENT.fullmatch(s.tenant_column):
            out.append(f"{where}.tenant_column: {s.tenant_column!r} is not a column name")
        if not s.permission:
            out.append(f"{where}.permission: required")
    names: set[str] = set()
    for i, r in enumerate(cfg.reducers):
        where = f"reducers[{i}] ({r.name!r})"
        if not _IDENT.fullmatch(r.name):
            out.append(f"{where}.name: not a reducer name")
        if r.name in names:
            out.append(f"{where}.name: duplicate reducer name")
        names.add(r.name)
        if r.upstream is not None and not _IDENT.fullmatch(r.upstream):
            out.append(f"{where}.upstream: not a reducer name")
    for i, iss in enumerate(cfg.auth.issuers):
        where = f"auth.issuers[{i}]"
        if not iss.issuer:
            out.append(f"{where}.issuer: required")
        if not iss.algorithms:
            out.append(f"{where}.algorithms: at least one")
        if not 0 <= iss.leeway_s <= 30:
            out.append(f"{where}.leeway_s: must be between 0 and 30")
        if iss.max_lifetime_s <= 0:
            out.append(f"{where}.max_lifetime_s: must be > 0")
    out += auth_problems(cfg, base)
    if cfg.canary is not None:
        c = cfg.canary
        if not (_IDENT.fullmatch(c.reducer) and _IDENT.fullmatch(c.table) and _IDENT.fullmatch(c.key_column)):
            out.append("canary: reducer, table and key_column must be identifiers")
        if not c.name or len(c.name) > 64:
            out.append("canary.name: 1-64 characters")
        if c.interval_s <= 0 or c.call_timeout_s <= 0:
            out.append("canary.interval_s / call_timeout_s: must be > 0")
        if c.bound_s <= c.interval_s + c.call_timeout_s:
            out.append("canary.bound_s: must exceed interval_s + call_timeout_s (or a healthy gateway flaps)")
    return out


def parse_config(doc: dict[str, Any], *, base: Path = Path(".")) -> Config:
    """Validate a parsed TOML document. Raises ConfigError listing every problem found."""
    try:
        cfg = msgspec.convert(doc, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc).replace("Object contains unknown field", "unknown key")) from None
    problems = _problems(cfg, base)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; relative paths inside resolve against its folder."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(doc, base=p.parent)


def read_secret(*, file: str | None, env: str | None, base: Path = Path(".")) -> str | None:
    """A secret from a file (whitespace stripped) or an environment variable; None if neither."""
    if file:
        try:
            return (base / file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {file}: {exc.strerror}") from None
    if env:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"environment variable {env} is not set")
        return value.strip()
    return None
