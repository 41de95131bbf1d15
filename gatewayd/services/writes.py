"""Writes: ``POST /v1/reducers/{name}`` as a service, independent of HTTP.

Order of checks (each failure has its own status and code):

1. the reducer is exposed (404) and the caller has its permission in the tenant (403);
2. rate limits per principal and per tenant (429 with ``Retry-After``);
3. ``Idempotency-Key``: a retry within the window returns the stored outcome and never calls the
   reducer twice; the same key with different arguments is refused (422); a retry while the first
   call is still running waits for it;
4. arguments: a JSON object, validated against the reducer's parameters from the module schema;
   arguments gatewayd fills (actor, tenant) come from the verified principal, and a caller-supplied
   value for them is refused (400);
5. the call goes through the connection the reducer's attribution picks: ``delegated`` (the service
   connection; the actor travels in an argument) or ``user`` / ``hybrid`` (the caller's own
   connection from the pool, so the module sees the user as ``ctx.sender``).

Outcomes: committed (200, with the return value and, for service-connection writes, the cursor of
each affected stream partition: open the stream from there to see the write's effects exactly
once), failed (422, the module's own message), internal error (502), outcome unknown (504: the link
dropped after sending; stored under the idempotency key, so a retry cannot apply twice),
upstream unavailable (503: never sent, not stored, so a retry may go through).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import trio

from gatewayd.errors import (
    EncodeError,
    OutcomeUnknownError,
    SchemaError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamUnavailableError,
)
from gatewayd.proto import client as pc
from gatewayd.proto.tokens import Principal
from gatewayd.services.streams import StreamService
from gatewayd.services.supervisor import UpstreamSupervisor
from gatewayd.services.userpool import UserConnectionPool

logger = logging.getLogger(__name__)

_IDEMPOTENCY_KEY: Final = re.compile(r"[\x21-\x7e]{1,128}")


class WriteError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class WriteResult:
    status: int
    body: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ReducerSpec:
    name: str
    permission: str
    upstream: str
    attribution: str = "delegated"  # "delegated" | "user" | "hybrid"
    actor_argument: str | None = None
    tenant_argument: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WritesConfig:
    idempotency_window_s: float = 600.0
    # Bounded: the oldest keys are forgotten first when the store is full.
    idempotency_max_count: int = 10_000
    rate_per_principal_per_s: float = 20.0
    burst_per_principal: int = 40
    rate_per_tenant_per_s: float = 200.0
    burst_per_tenant: int = 400
    # Token buckets are kept for this many principals/tenants (least recently used dropped).
    rate_buckets_count: int = 10_000


class _Buckets:
    """Token buckets keyed by name; bounded LRU."""

    def __init__(self, rate: float, burst: int, max_count: int) -> None:
        self.rate, self.burst, self.max = rate, burst, max_count
        self._b: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """0.0 if allowed (a token was taken), else seconds until one is available."""
        tokens, last = self._b.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._b[key] = (tokens - 1.0, now)
            self._b.move_to_end(key)
            while len(self._b) > self.max:
                self._b.popitem(last=False)
            return 0.0
        self._b[key] = (tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else math.inf


@dataclass(slots=True)
class _Idem:
    fingerprint: str
    expires: float
    done: trio.Event = field(default_factory=trio.Event)
    result: WriteResult | WriteError | None = None


class WriteService:
    def __init__(
        self,
        reducers: dict[str, ReducerSpec],
        *,
        supervisor: UpstreamSupervisor,
        streams: StreamService,
        users: UserConnectionPool | None,
        config: WritesConfig = WritesConfig(),
    ) -> None:
        self.reducers = reducers
        self.supervisor = supervisor
        self.streams = streams
        self.users = users
        self.config = config
        self._principal_rate = _Buckets(
            config.rate_per_principal_per_s, config.burst_per_principal, config.rate_buckets_count
        )
        self._tenant_rate = _Buckets(
            config.rate_per_tenant_per_s, config.burst_per_tenant, config.rate_buckets_count
        )
        self._idem: OrderedDict[tuple[str, str, str], _Idem] = OrderedDict()
        self.outcomes: dict[str, int] = {}

    # --- the steps -------------------------------------------------------------------------------

    def _tenant(self, principal: Principal, requested: str | None) -> str | None:
        access = self.streams.access
        if access is None:
            if requested is not None and requested != principal.tenant:
                raise WriteError(403, "forbidden", "the credential does not cover that tenant")
            return principal.tenant
        if requested is not None:
            return requested
        if principal.tenant is not None:
            return principal.tenant
        tenants = access.tenants(principal.subject)
        return tenants[0] if len(tenants) == 1 else None

    def _authorize(self, principal: Principal, spec: ReducerSpec, tenant: str | None) -> None:
        access = self.streams.access
        if access is None:
            if not principal.can(spec.permission):
                raise WriteError(
                    403, "forbidden", f"calling {spec.name!r} needs the {spec.permission!r} permission"
                )
            return
        if tenant is None:
            raise WriteError(400, "tenant_required", "name the tenant with ?tenant_id=")
        if not access.can(principal.subject, tenant, spec.permission):
            raise WriteError(403, "forbidden", f"no {spec.permission!r} right in tenant {tenant!r}")

    def _rate_limit(self, principal: Principal, tenant: str | None) -> None:
        now = time.monotonic()
        wait = self._principal_rate.take(principal.subject, now)
        if not wait and tenant is not None:
            wait = self._tenant_rate.take(tenant, now)
        if wait:
            raise WriteError(
                429,
                "rate_limited",
                "too many writes; slow down",
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def _prepare(self, principal: Principal, spec: ReducerSpec, args: Any, tenant: str | None) -> bytes:
        if not isinstance(args, dict):
            raise WriteError(400, "invalid_arguments", "the body must be a JSON object of arguments")
        args = dict(args)
        for filled, value in ((spec.actor_argument, principal.subject), (spec.tenant_argument, tenant)):
            if filled is None:
                continue
            if filled in args:
                raise WriteError(
                    400, "gateway_filled_argument", f"args.{filled} is filled by the gateway; do not send it"
                )
            if value is None:
                raise WriteError(400, "tenant_required", "name the tenant with ?tenant_id=")
            args[filled] = value
        schema = self.supervisor.schema
        if schema is None:
            raise WriteError(
                503, "upstream_unavailable", "the upstream schema is not known yet", {"Retry-After": "2"}
            )
        try:
            reducer = schema.reducer(spec.upstream)
            return schema.codec.encode(reducer.params, args, path="args")
        except SchemaError:
            raise WriteError(
                502, "reducer_missing", f"the database has no reducer {spec.upstream!r}"
            ) from None
        except EncodeError as exc:
            raise WriteError(400, "invalid_arguments", str(exc)) from None

    async def _invoke(self, principal: Principal, spec: ReducerSpec, encoded: bytes) -> WriteResult:
        started = time.monotonic()
        via_user = spec.attribution in ("user", "hybrid")
        try:
            if via_user:
                if self.users is None:
                    raise WriteError(
                        503, "user_connections_unavailable", "per-user connections are not configured"
                    )
                with self.supervisor.counting(spec.upstream) as counted:
                    outcome = await self.users.call_reducer(principal, spec.upstream, encoded)
                    counted(outcome)
            else:
                outcome = await self.supervisor.call_reducer(spec.upstream, encoded)
        except UpstreamUnavailableError:
            raise WriteError(
                503,
                "upstream_unavailable",
                "the database is not reachable; the call was not sent",
                {"Retry-After": "2"},
            ) from None
        except OutcomeUnknownError:
            return WriteResult(
                504,
                _err(
                    "outcome_unknown",
                    "the link to the database dropped before the result; "
                    "the write may or may not have been applied",
                ),
            )
        except UpstreamAuthError as exc:
            # The database (or the module's client_connected hook) refused this caller's identity.
            logger.info("write %s: upstream refused %s: %s", spec.name, principal.subject, exc)
            raise WriteError(
                403, "upstream_refused_identity", "the database refused a connection for this caller"
            ) from None
        except UpstreamError as exc:
            logger.warning("write %s for %s could not connect: %s", spec.name, principal.subject, exc)
            raise WriteError(
                503,
                "upstream_unavailable",
                "the database refused or dropped the connection; the call was not sent",
                {"Retry-After": "5"},
            ) from None
        ms = round((time.monotonic() - started) * 1000, 1)
        if isinstance(outcome, pc.ReducerCommitted):
            body: dict[str, Any] = {
                "status": "committed",
                "reducer": spec.name,
                "attribution": "user" if via_user else "delegated",
                "duration_ms": ms,
                "return_value": outcome.ret_value.hex() or None,
            }
            if not via_user:
                body["cursors"] = self.streams.take_write_cursors(outcome.changes)
            return WriteResult(200, body)
        if isinstance(outcome, pc.ReducerFailed):
            return WriteResult(422, _err("reducer_failed", outcome.message))
        assert isinstance(outcome, pc.ReducerInternalError)
        logger.warning("reducer %s internal error: %s", spec.upstream, outcome.message)
        return WriteResult(502, _err("reducer_internal_error", "the database could not run the reducer"))

    # --- the entry point -------------------------------------------------------------------------

    async def call(
        self,
        principal: Principal,
        name: str,
        args: Any,
        *,
        idempotency_key: str | None = None,
        tenant: str | None = None,
    ) -> WriteResult:
        spec = self.reducers.get(name)
        if spec is None:
            raise WriteError(404, "unknown_reducer", f"no reducer named {name!r} is exposed")
        tenant = self._tenant(principal, tenant)
        self._authorize(principal, spec, tenant)
        self._rate_limit(principal, tenant)
        if idempotency_key is None:
            result = await self._invoke(principal, spec, self._prepare(principal, spec, args, tenant))
            self._count(result)
            return result
        if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise WriteError(
                400, "invalid_idempotency_key", "Idempotency-Key: 1 to 128 visible ASCII characters"
            )
        fingerprint = hashlib.sha256(msgspec.json.encode([name, tenant, args], order="sorted")).hexdigest()
        key = (principal.subject, name, idempotency_key)
        now = trio.current_time()
        self._expire(now)
        entry = self._idem.get(key)
        if entry is not None:
            if entry.fingerprint != fingerprint:
                raise WriteError(
                    422, "idempotency_key_reused", "this Idempotency-Key was used with other arguments"
                )
            await entry.done.wait()
            if isinstance(entry.result, WriteError):
                raise entry.result
            assert entry.result is not None
            return WriteResult(entry.result.status, entry.result.body, replayed=True)
        entry = self._idem[key] = _Idem(fingerprint, now + self.config.idempotency_window_s)
        while len(self._idem) > self.config.idempotency_max_count:
            self._idem.popitem(last=False)
        try:
            result = await self._invoke(principal, spec, self._prepare(principal, spec, args, tenant))
        except WriteError as exc:
            # Never sent (validation, unavailable): forget the key so a retry can go through.
            self._idem.pop(key, None)
            entry.result = exc
            entry.done.set()
            raise
        except BaseException:
            self._idem.pop(key, None)
            entry.done.set()
            raise
        entry.result = result
        entry.done.set()
        self._count(result)
        return result

    def _expire(self, now: float) -> None:
        while self._idem:
            k, e = next(iter(self._idem.items()))
            if e.expires > now or not e.done.is_set():
                break
            del self._idem[k]

    def _count(self, result: WriteResult) -> None:
        status = result.body.get("status") or result.body.get("error", {}).get("code", "unknown")
        self.outcomes[status] = self.outcomes.get(status, 0) + 1


def _err(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
