"""The API-key store (SQLite) and the trio service that checks presented keys.

:class:`ApiKeyStore` is synchronous (the CLI uses it directly). :class:`ApiKeyService` runs every
store call in a worker thread (``trio.to_thread.run_sync`` with a capacity limiter), so SQLite
never blocks the trio loop, and applies the rate limits:

* per key id: every attempt (good or bad) within ``window_s`` counts; over the limit -> 429;
* per source IP: every *failed* attempt counts; over the limit -> 429 for that IP, whatever key.

Unknown key ids cost the same work as known ones (one indexed lookup, one HMAC, one constant-time
compare against a dummy hash). Keys are never logged; only their public ids are.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from gatewayd.proto.apikeys import DUMMY_HASH, Env, ParsedKey, key_hash, make_key, new_key_id, parse_key
from gatewayd.proto.claims import ClaimError, check_subject
from gatewayd.proto.ratelimit import WindowCounter
from gatewayd.proto.tokens import Principal, RateLimited, TokenInvalid

logger = logging.getLogger(__name__)

API_KEY_ISSUER: Final = "gatewayd:api-key"
MIN_PEPPER_BYTES: Final = 32
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS api_key (
    key_id        TEXT PRIMARY KEY,
    env           TEXT NOT NULL,
    hash          BLOB NOT NULL,
    subject       TEXT NOT NULL,
    tenant_id     TEXT,
    scopes        TEXT NOT NULL,
    label         TEXT NOT NULL DEFAULT '',
    grant_version INTEGER NOT NULL DEFAULT 1,
    created_at    REAL NOT NULL,
    expires_at    REAL,
    enabled       INTEGER NOT NULL DEFAULT 1,
    revoked_at    REAL,
    last_used_at  REAL,
    replaced_by   TEXT
);
"""


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    env: str
    subject: str
    tenant_id: str | None
    scopes: tuple[str, ...]
    label: str
    grant_version: int
    created_at: float
    expires_at: float | None
    enabled: bool
    revoked_at: float | None
    last_used_at: float | None
    replaced_by: str | None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if not self.enabled:
            return "disabled"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "env": self.env,
            "subject": self.subject,
            "tenant_id": self.tenant_id,
            "scopes": list(self.scopes),
            "label": self.label,
            "grant_version": self.grant_version,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "last_used_at": self.last_used_at,
            "replaced_by": self.replaced_by,
            "status": self.status(now),
        }


_COLUMNS: Final = (
    "key_id, env, subject, tenant_id, scopes, label, grant_version, created_at, expires_at, "
    "enabled, revoked_at, last_used_at, replaced_by"
)


def _record(row: Sequence[Any]) -> ApiKeyRecord:
    (key_id, env, subject, tenant_id, scopes, label, gv, created, expires, enabled, revoked, used, repl) = row
    return ApiKeyRecord(key_id, env, subject, tenant_id, tuple(scopes.split()), label, gv, created, expires,
                        bool(enabled), revoked, used, repl)  # fmt: skip


class ApiKeyStore:
    """API keys in one SQLite file. Every method opens its own connection (thread-safe)."""

    def __init__(self, path: str | Path, pepper: bytes) -> None:
        if len(pepper) < MIN_PEPPER_BYTES:
            raise ValueError(f"the API-key pepper must be at least {MIN_PEPPER_BYTES} bytes")
        self.path = Path(path)
        self._pepper = pepper
        with self._db() as db:
            db.executescript(_SCHEMA)

    def __repr__(self) -> str:
        return f"ApiKeyStore({str(self.path)!r})"  # the pepper stays out

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
        finally:
            db.close()

    # --- management (CLI) ----------------------------------------------------------------------

    def create(
        self,
        *,
        subject: str,
        tenant_id: str | None,
        scopes: Sequence[str],
        expires_at: float | None,
        env: Env = "live",
        label: str = "",
        key_id: str | None = None,
        grant_version: int = 1,
        now: float | None = None,
    ) -> tuple[str, ApiKeyRecord]:
        """Create a key; returns the full key (show it once) and its record."""
        try:
            check_subject(subject, kind="robot")
        except ClaimError as exc:
            raise ValueError(f"subject: {exc}") from None
        if any(not s or any(c.isspace() for c in s) for s in scopes):
            raise ValueError("scopes: non-empty words without spaces")
        key_id = key_id or new_key_id()
        full = make_key(env, key_id)
        t = time.time() if now is None else now
        with self._db() as db:
            try:
                row = (key_id, env, key_hash(self._pepper, full), subject, tenant_id, " ".join(scopes))
                db.execute(
                    "INSERT INTO api_key (key_id, env, hash, subject, tenant_id, scopes, label,"
                    " grant_version, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*row, label, grant_version, t, expires_at),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"an API key with id {key_id!r} already exists") from None
        record = self.get(key_id)
        assert record is not None
        return full, record

    def get(self, key_id: str) -> ApiKeyRecord | None:
        with self._db() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_key WHERE key_id = ?", (key_id,)).fetchone()
        return _record(row) if row else None

    def list(self) -> list[ApiKeyRecord]:
        with self._db() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM api_key ORDER BY created_at, key_id").fetchall()
        return [_record(r) for r in rows]

    def _update(self, key_id: str, sql: str, args: tuple[Any, ...]) -> None:
        with self._db() as db:
            cur = db.execute(f"UPDATE api_key SET {sql} WHERE key_id = ?", (*args, key_id))
            if cur.rowcount != 1:
                raise KeyError(key_id)

    def revoke(self, key_id: str, *, now: float | None = None) -> None:
        """Permanently revoke (the row stays, for audit)."""
        self._update(
            key_id,
            "revoked_at = COALESCE(revoked_at, ?), enabled = 0",
            (time.time() if now is None else now,),
        )

    def set_enabled(self, key_id: str, enabled: bool) -> None:
        self._update(key_id, "enabled = ?", (int(enabled),))

    def set_grant_version(self, key_id: str, version: int) -> None:
        self._update(key_id, "grant_version = ?", (version,))

    def rotate(
        self, key_id: str, *, grace_s: float = 0.0, now: float | None = None
    ) -> tuple[str, ApiKeyRecord]:
        """Issue a replacement (same owner, tenant, scopes, expiry, label); the old key expires
        after ``grace_s`` (0: at once)."""
        old = self.get(key_id)
        if old is None:
            raise KeyError(key_id)
        if old.revoked_at is not None:
            raise ValueError(f"API key {key_id} is revoked")
        t = time.time() if now is None else now
        env: Env = "test" if old.env == "test" else "live"
        full, new = self.create(subject=old.subject, tenant_id=old.tenant_id, scopes=old.scopes,
                                expires_at=old.expires_at, env=env, label=old.label,
                                grant_version=old.grant_version, now=t)  # fmt: skip
        end = t + grace_s
        if old.expires_at is not None:
            end = min(end, old.expires_at)
        self._update(key_id, "expires_at = ?, replaced_by = ?", (end, new.key_id))
        return full, new

    # --- checking (service threads) -----------------------------------------------------------

    def check(self, key: ParsedKey, now: float) -> tuple[ApiKeyRecord | None, str]:
        """(record, "ok") for a good key, else (None or record, reason). Same work for unknown ids."""
        with self._db() as db:
            row = db.execute(
                f"SELECT hash, {_COLUMNS} FROM api_key WHERE key_id = ?", (key.key_id,)
            ).fetchone()
            stored = bytes(row[0]) if row else DUMMY_HASH
            match = hmac.compare_digest(key_hash(self._pepper, key.full), stored)
            if row is None or not match:
                return None, "invalid"
            record = _record(row[1:])
            status = record.status(now)
            if record.env != key.env:
                return None, "invalid"
            if status != "active":
                return record, status
            db.execute("UPDATE api_key SET last_used_at = ? WHERE key_id = ?", (now, key.key_id))
            return record, "ok"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyLimits:
    # Every attempt with one key id, per window (a robot making a token per minute uses ~1).
    key_attempts: int = 60
    # Failed attempts from one source IP, per window.
    ip_failures: int = 20
    window_s: float = 60.0
    max_tracked: int = 10_000
    threads: int = 4


class ApiKeyService:
    """Checks presented API keys off the trio loop, with rate limits."""

    def __init__(
        self,
        store: ApiKeyStore,
        limits: ApiKeyLimits = ApiKeyLimits(),
        *,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits
        self._clock = clock
        self._wall = wall_clock
        self._per_key = WindowCounter(limit=limits.key_attempts, window_s=limits.window_s,
                                      max_tracked=limits.max_tracked)  # fmt: skip
        self._per_ip = WindowCounter(limit=limits.ip_failures, window_s=limits.window_s,
                                     max_tracked=limits.max_tracked)  # fmt: skip
        self._limiter = trio.CapacityLimiter(limits.threads)
        self.failures = 0
        self.throttled = 0

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store call in a worker thread (bounded by the limiter)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def authenticate(self, raw: str, *, source_ip: str | None) -> Principal:
        """Check a presented key and return its robot principal.

        Raises:
            RateLimited: too many attempts for this key id or failures from this IP (429).
            TokenInvalid: malformed, unknown, wrong secret, expired, disabled or revoked (401).

        Cancellation: the store call runs to completion in its thread; cancelling abandons it.
        """
        now = self._clock()
        ip = source_ip or "-"
        wait = self._per_ip.retry_after(ip, now)
        if wait is not None:
            self.throttled += 1
            raise RateLimited(
                "too many failed API-key attempts from this address", retry_after_s=int(wait) + 1
            )
        try:
            parsed = parse_key(raw)
        except TokenInvalid:
            self._fail(ip, now)
            raise
        wait = self._per_key.retry_after(parsed.key_id, now)
        if wait is not None:
            self.throttled += 1
            raise RateLimited("too many attempts with this API key", retry_after_s=int(wait) + 1)
        self._per_key.hit(parsed.key_id, now)
        record, reason = await self.run_sync(self.store.check, parsed, self._wall())
        if reason != "ok" or record is None:
            self._fail(ip, self._clock())
            logger.info("api key %s refused: %s (from %s)", parsed.key_id, reason, ip)
            if reason == "invalid":
                raise TokenInvalid("invalid API key", code="invalid_api_key")
            raise TokenInvalid(f"API key {reason}", code=f"api_key_{reason}")
        return Principal(
            subject=record.subject,
            kind="robot",
            tenant=record.tenant_id,
            scopes=frozenset(record.scopes),
            issuer=API_KEY_ISSUER,
            claims={"api_key_id": record.key_id, "grant_version": record.grant_version},
            credential="api_key",
            expires_at=record.expires_at,
        )

    def _fail(self, ip: str, now: float) -> None:
        self.failures += 1
        self._per_ip.hit(ip, now)
