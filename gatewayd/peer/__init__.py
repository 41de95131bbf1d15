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

Public API (details on each object)::

    async with open_peer("demo", port=0, ping_interval_s=15.0) as peer:   # or open_peer(my_module)
        peer.base_url, peer.port, peer.subscribe_url(), peer.statistics()
        peer.db / peer.database("demo")        # PeerDatabase: rows(), transact(), call_reducer(),
                                               #   schema, hotswap(), identity
        peer.auth                              # PeerAuth: issuer, public_key_pem, mint(), anonymous()
        peer.connections                       # [ConnectionInfo]; await peer.wait_connection_count(n)
        # faults (connection=None means all; else an id, an identity hex or a ConnectionInfo)
        peer.cut(connection, reset=False); peer.cut_all()
        peer.stall(connection); peer.unstall(connection)
        peer.stall_handshakes(); peer.resume_handshakes()
        peer.refuse_upgrades(duration_s, status=503); peer.accept_upgrades()
        peer.refuse_tokens(True)
        peer.mute("drop" | "hold" | "delay", delay_s=..., connection=None); peer.unmute()
        peer.delay_reducer(name, delay_s, when="before" | "after")
        peer.hotswap(table, columns, defaults=...)
        await peer.disconnect_all(1001, "module exited")
        await peer.stop(); await peer.start(); await peer.restart(downtime_s)

    serve_peer_forever(host=..., port=..., module_name="demo")   # startable, for daemons
    run_peer_cli(host, port, module_name) -> exit code          # ``gatewayd peer``

Deliberate differences from SpacetimeDB: v1 subprotocols are refused (400); ``confirmed`` and
``light`` are accepted and ignored (every commit is immediately durable, v2 has no light mode);
``/schema`` serves version 9 only; the module API has no procedures, scheduled reducers, views
or row-level security; joins are refused in subscriptions.
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
