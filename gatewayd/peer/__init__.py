"""The dev peer: a server that speaks SpacetimeDB's client protocol, for tests and the demo.

SpacetimeDB cannot be installed where gatewayd is developed and tested, so the project ships this
stand-in. It serves the HTTP API and the v2/v3 WebSocket protocol exactly as PROTOCOL.md describes
(and where PROTOCOL.md is unsure, as the upstream source does), runs modules written in Python,
and can misbehave on purpose. Its fidelity is checked by the official TypeScript SDK
(``tests/peer/test_ts_sdk_flow.py``), never by our own client.

Layout (lower layers never import upper ones):

=====================  ==================================================================
``module``             the module API: :class:`Module`, tables, reducers, ``ReducerContext``
``store``              in-memory tables (rows keyed by their BSATN), indexes, transactions
``sql``                the SQL subset: parse, type-check, compile predicates
``database``           one module instance: reducers in transactions, subscriptions, fan-out
``auth``               the peer's ES256 key, anonymous identities, token validation, OIDC
``connection``         one WebSocket connection: reader, handler, writer, keepalive tasks
``server``             the HTTP/1.1 front (h11) and the upgrade
``peer``               :func:`open_peer`, the :class:`Peer` handle and fault injection
``demo_module``        the multi-tenant document module served as ``demo``
=====================  ==================================================================

Why a raw trio server with h11 and wsproto rather than hypercorn or trio-websocket: the peer must
decide every byte a real SpacetimeDB might send, including the rough edges our client has to
survive: statuses before the upgrade, the ``101`` headers, a ``101`` followed by a dropped socket,
handshakes that never get an answer, sockets cut without a close frame or with an RST, stalled
connections, fragmented frames. Frameworks hide exactly those.

Task tree (one nursery per level; leaving :func:`open_peer` cancels everything)::

    open_peer
    └── listener (serve_listeners; restartable on the same port)
        └── per TCP connection: HTTP requests, or after a 101:
            └── WsConnection: reader, handler, writer, keepalive, delay line

Queues are bounded and never block the committing task: outgoing messages per connection
(16 Ki, overflow drops the connection as upstream does), incoming messages per connection (16 Ki,
overflow closes with 1013 as upstream does).

Public API::

    async with open_peer("demo", port=0, ping_interval_s=15.0) as peer:
        peer.base_url, peer.port, peer.db, peer.auth, peer.connections
        peer.cut(), peer.cut_all(), peer.stall(), peer.stall_handshakes(),
        peer.refuse_upgrades(5.0), peer.refuse_tokens(), peer.mute("hold"), peer.unmute(),
        peer.delay_reducer("name", 1.0), peer.hotswap(...), await peer.restart(downtime_s=1.0)
"""

from gatewayd.peer.auth import Claims, PeerAuth, TokenRejected
from gatewayd.peer.connection import ConnectionInfo
from gatewayd.peer.database import Caller, CallResult, PeerDatabase
from gatewayd.peer.demo_module import DemoConfig, make_demo_module
from gatewayd.peer.module import (
    ConstraintViolation,
    Module,
    ReducerContext,
    ReducerError,
    TableSpec,
)
from gatewayd.peer.peer import (
    Peer,
    PeerSettings,
    PeerStatistics,
    open_peer,
    run_peer_cli,
    serve_peer_forever,
)
from gatewayd.peer.store import DbView, RowTypeError, TableHandle

__all__ = [
    "open_peer",
    "serve_peer_forever",
    "run_peer_cli",
    "Peer",
    "PeerSettings",
    "PeerStatistics",
    "PeerDatabase",
    "PeerAuth",
    "Claims",
    "TokenRejected",
    "Caller",
    "CallResult",
    "ConnectionInfo",
    "Module",
    "TableSpec",
    "ReducerContext",
    "ReducerError",
    "ConstraintViolation",
    "DbView",
    "TableHandle",
    "RowTypeError",
    "DemoConfig",
    "make_demo_module",
]
