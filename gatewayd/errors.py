"""One error hierarchy for gatewayd, translated at the edges (STYLE.md §18).

Everything gatewayd raises on purpose derives from :class:`GatewayError`. Foreign exceptions
(trio-websocket, wsproto, httpx, struct) are translated exactly once, at the boundary where they
enter, with ``raise ... from exc``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class for every error gatewayd raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message says where and why."""


# --- upstream (SpacetimeDB) -------------------------------------------------------------------


class UpstreamError(GatewayError):
    """Something went wrong talking to SpacetimeDB."""


class UpstreamConnectError(UpstreamError):
    """The WebSocket (or HTTP) connection to SpacetimeDB could not be opened or was lost."""


class UpstreamAuthError(UpstreamConnectError):
    """SpacetimeDB refused our credentials (HTTP 401/403, or the module's connect hook).

    Told apart from network failures so the supervisor can surface it as state and back off
    harder instead of retrying in a tight loop.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamProtocolError(UpstreamError):
    """The peer sent something that does not follow the protocol (h11's RemoteProtocolError)."""


class DecodeError(UpstreamProtocolError):
    """Bytes could not be decoded; ``path`` names the field, ``offset`` the byte position."""

    def __init__(self, message: str, *, path: str = "", offset: int | None = None) -> None:
        where = []
        if path:
            where.append(f"at {path}")
        if offset is not None:
            where.append(f"byte {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.reason = message
        self.path = path
        self.offset = offset


class LocalProtocolError(GatewayError):
    """We tried to do something the protocol forbids (our bug, or a caller's misuse)."""


class EncodeError(GatewayError, ValueError):
    """A JSON value does not fit the type it must be encoded as; ``path`` names the field."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.reason = message
        self.path = path


class SchemaError(GatewayError):
    """The module schema is malformed or does not contain what we need."""


class CallError(UpstreamError):
    """A reducer or procedure call did not complete with a committed result."""


class OutcomeUnknownError(CallError):
    """The call was sent, then the link dropped before its result arrived.

    The reducer may or may not have committed; nothing is replayed by SpacetimeDB.
    """


class UpstreamUnavailableError(CallError):
    """No live session could take the call within the configured wait; it was never sent."""


class SubscriptionFailedError(UpstreamError):
    """SpacetimeDB refused or dropped a query set (SubscriptionError)."""


# --- auth --------------------------------------------------------------------------------------


class AuthError(GatewayError):
    """Authentication or token handling failed."""


class TokenRefreshError(AuthError):
    """The token source could not provide a fresh token."""
