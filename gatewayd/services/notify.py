"""systemd's notification protocol (``sd_notify``) without libsystemd.

Theory of operation
-------------------
systemd passes a unix datagram socket path in ``NOTIFY_SOCKET`` (a leading ``@`` means the Linux
abstract namespace); a service reports its state by sending newline-separated ``KEY=VALUE``
assignments to it, one datagram per report. gatewayd sends:

* ``READY=1`` once, when HTTP is bound *and* the upstream subscription is applied (the supervisor
  is live with every query set applied), so ``systemctl start`` returns only when the gateway can
  actually serve streams;
* ``STATUS=…`` on every upstream state change (``systemctl status`` shows it);
* ``WATCHDOG=1`` every half ``WatchdogSec`` from a task on the event loop: when the loop stalls
  (a blocking call, a busy loop), the task cannot run, the pings stop, and systemd restarts the
  service. That is the point: a thread would keep pinging for a wedged loop;
* ``RELOADING=1`` + ``MONOTONIC_USEC=…`` when a reload starts and ``READY=1`` when it ends;
* ``STOPPING=1`` when shutdown starts.

Nothing here reads the environment: :func:`notify_settings_from_env` is called by ``main``/the CLI
with ``os.environ`` and the result is passed down (STYLE.md rule 19).

Sends never block: a datagram to a unix socket either fits the receiver's queue or fails with
``EAGAIN``; a report that cannot be delivered is logged once and dropped (systemd would rather
miss a STATUS line than have the daemon stall on it).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import trio

from gatewayd.services.supervisor import UpstreamState, UpstreamSupervisor

logger = logging.getLogger(__name__)

# systemd recommends pinging at half the watchdog interval: one late ping must not kill us.
WATCHDOG_FRACTION: Final = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifySettings:
    """Where and how to notify systemd. ``socket_path`` None disables everything."""

    socket_path: str | None = None
    # Ping interval for WATCHDOG=1, or None when systemd does not watch this process.
    watchdog_interval_s: float | None = None


def notify_settings_from_env(environ: Mapping[str, str], pid: int) -> NotifySettings:
    """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as sd_notify(3) says.

    ``WATCHDOG_PID``, when set, must be this process (a watchdog set up for a parent shell is not
    ours). Call this from ``main``/the CLI only.
    """
    path = environ.get("NOTIFY_SOCKET") or None
    interval: float | None = None
    usec = environ.get("WATCHDOG_USEC", "")
    wpid = environ.get("WATCHDOG_PID", "")
    if usec.isdigit() and int(usec) > 0 and (not wpid or (wpid.isdigit() and int(wpid) == pid)):
        interval = int(usec) / 1_000_000 * WATCHDOG_FRACTION
    return NotifySettings(socket_path=path, watchdog_interval_s=interval)


def _address(path: str) -> str | bytes:
    if path.startswith("@"):
        return b"\0" + path[1:].encode()  # abstract namespace
    return path


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd expects in ``MONOTONIC_USEC``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier:
    """Sends sd_notify reports. Every method is sync and non-blocking except :meth:`serve_watchdog`.

    A notifier built with no socket (not under systemd) accepts every call and sends nothing.
    """

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        self.sent: list[str] = []  # every report sent, in order (statistics and tests)
        self.ready_sent = False
        self._sock: socket.socket | None = None
        self._warned = False
        if settings.socket_path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines. Returns False if it could not be sent."""
        if self._sock is None or self.settings.socket_path is None:
            return False
        msg = "\n".join(assignments)
        try:
            self._sock.sendto(msg.encode(), _address(self.settings.socket_path))
        except OSError as exc:
            if not self._warned:
                logger.warning("systemd notify: cannot send to %s: %s", self.settings.socket_path, exc)
                self._warned = True
            return False
        self.sent.append(msg)
        return True

    def ready(self, status: str | None = None) -> None:
        extra = (f"STATUS={status}",) if status else ()
        if self.notify("READY=1", *extra):
            logger.info("systemd notify: READY=1%s", f" ({status})" if status else "")
        self.ready_sent = True

    def status(self, text: str) -> None:
        # STATUS is one line: a newline would start a new assignment.
        self.notify("STATUS=" + text.replace("\n", " "))

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading configuration")

    def stopping(self) -> None:
        if self.notify("STOPPING=1", "STATUS=shutting down"):
            logger.info("systemd notify: STOPPING=1")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    async def serve_watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` every interval, forever (returns at once when not watched).

        The pings come from this task on the event loop on purpose: if the loop stalls, they
        stop, and systemd's watchdog fires.

        Cancellation:
            Stops pinging; nothing to clean up.
        """
        interval = self.settings.watchdog_interval_s
        if self._sock is None or interval is None:
            return
        logger.info("systemd watchdog: pinging every %.3f s", interval)
        while True:
            self.watchdog()
            await trio.sleep(interval)


def describe_upstream(state: str, reason: str | None, query_sets: Mapping[str, str]) -> str:
    """One STATUS line for an upstream state."""
    applied = sum(1 for v in query_sets.values() if v == "applied")
    text = f"upstream {state}; {applied}/{len(query_sets)} query sets applied"
    return f"{text} ({reason})" if reason else text


async def serve_gateway_notifications(
    notifier: SystemdNotifier, supervisor: UpstreamSupervisor, *, shutdown: trio.Event
) -> None:
    """Report a running gateway to systemd: start it once HTTP is bound.

    Sends ``STATUS=`` on every upstream state change, ``READY=1`` the first time the upstream is
    live with every query set applied, ``STOPPING=1`` when ``shutdown`` is set, and pings the
    watchdog until cancelled (through the shutdown drain too: a wedged drain must still be
    noticed).

    Cancellation:
        Unregisters its state callback; sends nothing more.
    """

    def report(state: UpstreamState, reason: str | None) -> None:
        sets = supervisor.query_set_status
        text = describe_upstream(state.value, reason, sets)
        if (
            not notifier.ready_sent
            and not shutdown.is_set()
            and state is UpstreamState.LIVE
            and all(v == "applied" for v in sets.values())
        ):
            notifier.ready(text)
        else:
            notifier.status(text)

    report(supervisor.state, None)
    supervisor.on_state.append(report)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.serve_watchdog, name="systemd-watchdog")
            await shutdown.wait()
            notifier.stopping()
            await trio.sleep_forever()
    finally:
        supervisor.on_state.remove(report)


__all__ = [
    "NotifySettings",
    "SystemdNotifier",
    "describe_upstream",
    "monotonic_usec",
    "notify_settings_from_env",
    "serve_gateway_notifications",
]
