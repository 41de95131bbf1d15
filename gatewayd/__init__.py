"""gatewayd: a server-side realtime gateway for SpacetimeDB."""

__version__ = "0.1.0"
