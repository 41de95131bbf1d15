"""Reload on SIGHUP: re-read the config file and apply what can change without dropping streams.

Theory of operation
-------------------
:func:`reload_gateway` loads and validates the whole new file *before* touching anything, and
builds every new object (the verifier with freshly read issuer keys, the stream settings) off to
the side. Any failure (unreadable file, invalid TOML, a config error, an unreadable JWKS, a hook
that refuses) is logged as one line and the running configuration stays exactly as it was. Only
then are the new objects swapped in, synchronously, so no request sees half a reload:

* issuers and their keys (``auth``): the next token verified uses the new set; open streams keep
  running (tokens are checked when a stream opens);
* reducers (permissions, gateway-filled arguments), stream permissions;
* SSE settings (heartbeat, retry, buffers, send timeout, per-principal cap): apply to streams
  opened from now on (and the hub's limits at once);
* the log level.

Settings that cannot change in a running process (upstream, HTTP listener, event log sizes, the
set of streams and their tables/queries, the canary) keep their running values; the reload says
which ones would need a restart. Other components (the token broker's key ring, the API-key
store) join in through ``hooks``: each is called with the new config before the swap and may
raise to refuse the reload.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from gatewayd.config import Config, load_config
from gatewayd.errors import GatewayError
from gatewayd.proto.projection import StreamDef
from gatewayd.services.hub import HubConfig
from gatewayd.services.notify import SystemdNotifier
from gatewayd.services.streams import StreamsConfig

if TYPE_CHECKING:
    from gatewayd.main import Gateway

logger = logging.getLogger(__name__)

ReloadHook = Callable[[Config], None]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    message: str
    needs_restart: list[str] = field(default_factory=list)


def _stream_shape(cfg: Config) -> list[tuple[str, tuple[str, ...], str, tuple[str, ...]]]:
    return [(s.name, tuple(s.tables), s.tenant_column, tuple(cfg.stream_queries(s))) for s in cfg.streams]


def _restart_only(old: Config, new: Config) -> list[str]:
    out = [
        name
        for name in ("upstream", "http", "event_log", "canary")
        if getattr(old, name) != getattr(new, name)
    ]
    if _stream_shape(old) != _stream_shape(new):
        out.append("streams (names, tables, tenant columns or queries)")
    access = getattr(old, "access", None)
    if access is not None and access != getattr(new, "access", None):
        out.append("access")
    return out


def reload_gateway(gateway: Gateway, path: Path, *, hooks: Sequence[ReloadHook] = ()) -> ReloadResult:
    """Re-read ``path`` and apply it to the running ``gateway``; keep the old config on any error.

    Sync: nothing awaits between the checks and the swap.
    """
    from gatewayd.main import build_verifier  # main imports this module's users; avoid a cycle

    old = gateway.config
    try:
        new = load_config(path)
        verifier = build_verifier(new, path.parent)
        for hook in hooks:
            hook(new)
    except (GatewayError, OSError, ValueError) as exc:
        text = " / ".join(str(exc).splitlines())
        logger.error("reload refused: %s: %s; keeping the running configuration", path, text)
        return ReloadResult(False, f"refused: {text}")
    needs_restart = _restart_only(old, new)
    # The running values of restart-only sections stay; everything else is the new file's.
    keep = {name: getattr(old, name) for name in ("upstream", "http", "event_log", "canary")}
    if "streams (names, tables, tenant columns or queries)" in needs_restart:
        keep["streams"] = old.streams
    if "access" in needs_restart:
        keep["access"] = old.access
    applied = msgspec.structs.replace(new, **keep)

    # --- the swap (sync) ---
    gateway.verifier = verifier
    gateway.reducers = {r.name: r for r in applied.reducers}
    streams = gateway.streams
    if keep.get("streams") is None:
        for s in applied.streams:
            current = streams.projector.streams.get(s.name)
            if current is not None and current.permission != s.permission:
                streams.projector.replace_stream(
                    StreamDef(s.name, tuple(s.tables), s.tenant_column, s.permission, current.queries)
                )
    sse = applied.sse
    streams.hub.config = HubConfig(
        client_buffer_bytes=sse.client_buffer_bytes,
        send_timeout_s=sse.send_timeout_s,
        heartbeat_s=sse.heartbeat_s,
        max_streams_per_principal=sse.max_streams_per_principal,
    )
    streams.config = StreamsConfig(
        retry_ms=sse.retry_ms,
        retry_jitter_ms=sse.retry_jitter_ms,
        snapshot_chunk_rows=sse.snapshot_chunk_rows,
        snapshot_page_ttl_s=old.event_log.snapshot_page_ttl_s,
        snapshot_pages_count=old.event_log.snapshot_pages_count,
    )
    logging.getLogger().setLevel(applied.logging.level)
    gateway.config = applied
    keys = sum(len(i.keys) for i in verifier.issuers.values())
    message = (
        f"reloaded {path}: {len(verifier.issuers)} issuers ({keys} keys), {len(applied.reducers)} reducers, "
        f"{len(applied.streams)} streams"
    )
    if needs_restart:
        logger.warning(
            "reload: %s changed in %s but need a restart; the running values stay",
            ", ".join(needs_restart),
            path,
        )
    logger.info("%s", message)
    return ReloadResult(True, message, needs_restart)


async def serve_reload_on_sighup(
    gateway: Gateway,
    path: Path,
    *,
    notifier: SystemdNotifier | None = None,
    hooks: Sequence[ReloadHook] = (),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload ``gateway`` from ``path`` on every SIGHUP, forever. Startable: ``started()`` once
    the signal handler is installed. Must run in the main thread (signals).

    Tells systemd ``RELOADING=1`` + ``MONOTONIC_USEC`` before and ``READY=1`` after each reload
    (refused or not: the service keeps running either way).

    Cancellation:
        Restores the previous SIGHUP disposition.
    """
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            logger.info("SIGHUP: reloading %s", path)
            if notifier is not None:
                notifier.reloading()
            result = reload_gateway(gateway, path, hooks=hooks)
            if notifier is not None:
                status = f"reload {'applied' if result.ok else 'refused'}: {result.message}"
                if notifier.ready_sent:
                    notifier.ready(status)  # ends the RELOADING=1 state
                else:
                    notifier.status(status)  # still starting: READY=1 comes with the upstream
