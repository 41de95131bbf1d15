"""sd_notify over a real unix datagram socket: order and content, readiness, watchdog stalls."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio

from gatewayd.demo import open_dev_stack
from gatewayd.services.notify import (
    NotifySettings,
    SystemdNotifier,
    monotonic_usec,
    notify_settings_from_env,
)
from gatewayd.services.supervisor import UpstreamState

pytestmark = pytest.mark.timeout(60)


async def _receiver(path: Path) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(path))
    return sock


async def _recv(sock: trio.socket.SocketType) -> str:
    with trio.fail_after(10):
        return (await sock.recv(65536)).decode()


async def _until(sock: trio.socket.SocketType, prefix: str, seen: list[str]) -> str:
    with trio.fail_after(10):
        while True:
            msg = await _recv(sock)
            seen.append(msg)
            if msg.startswith(prefix):
                return msg


def test_settings_from_env() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "42"}
    assert notify_settings_from_env(env, 42) == NotifySettings(socket_path="/run/x", watchdog_interval_s=10.0)
    # A watchdog meant for another process (a parent shell) is not ours.
    assert notify_settings_from_env(env, 43).watchdog_interval_s is None
    assert (
        notify_settings_from_env(
            {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000"}, 1
        ).watchdog_interval_s
        == 2.0
    )
    assert notify_settings_from_env({}, 1) == NotifySettings()
    assert notify_settings_from_env({"WATCHDOG_USEC": "junk", "NOTIFY_SOCKET": ""}, 1) == NotifySettings()


def test_without_socket_nothing_is_sent() -> None:
    n = SystemdNotifier(NotifySettings())
    assert not n.enabled
    n.ready("x")
    n.stopping()
    assert n.sent == []


async def test_abstract_namespace_socket() -> None:
    name = f"gatewayd-test-{time.monotonic_ns()}"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind("\0" + name)
    n = SystemdNotifier(NotifySettings(socket_path="@" + name))
    n.status("hello\nworld")
    assert await _recv(sock) == "STATUS=hello world"  # one line: a newline would start a new key
    n.reloading()
    msg = await _recv(sock)
    lines = msg.split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert abs(int(lines[1].split("=")[1]) - monotonic_usec()) < 5_000_000
    n.close()
    sock.close()


async def test_ready_only_after_http_and_subscription_then_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sock = await _receiver(path)
    notifier = SystemdNotifier(NotifySettings(socket_path=str(path), watchdog_interval_s=0.05))
    seen: list[str] = []
    shutdown = trio.Event()
    try:
        async with open_dev_stack(notifier=notifier, shutdown=shutdown) as st:
            ready = await _until(sock, "READY=1", seen)
            # When READY=1 arrives, HTTP answers and the upstream is live and subscribed.
            assert st.gateway.supervisor.state is UpstreamState.LIVE
            assert all(v == "applied" for v in st.gateway.supervisor.query_set_status.values())
            async with httpx.AsyncClient() as http:
                assert (await http.get(st.url + "readyz")).status_code == 200
            assert "STATUS=upstream live; 1/1 query sets applied" in ready.split("\n")
            assert not any(m.startswith("READY=1") for m in seen[:-1])
            assert seen[0].startswith("STATUS=upstream connecting")
            # Watchdog pings follow, from the event loop.
            await _until(sock, "WATCHDOG=1", seen)
            # The upstream drops: a STATUS line says so (and READY=1 is never repeated).
            st.peer.cut_all()
            await _until(sock, "STATUS=upstream reconnecting", seen)
            await _until(sock, "STATUS=upstream live", seen)
            shutdown.set()
            await _until(sock, "STOPPING=1", seen)
        assert sum(1 for m in seen if m.startswith("READY=1")) == 1
        order = [m.split("\n")[0].split("=")[0] for m in seen if not m.startswith("WATCHDOG")]
        assert order.index("READY") < order.index("STOPPING")
    finally:
        notifier.close()
        sock.close()


async def test_no_ready_while_a_query_set_is_not_applied(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sock = await _receiver(path)
    notifier = SystemdNotifier(NotifySettings(socket_path=str(path)))
    seen: list[str] = []
    # A stream over a table the module does not have: the upstream connects, the query set is
    # refused, and the gateway must not tell systemd it is ready.
    bad = {"streams": [{"name": "ghosts", "tables": ["ghost"], "tenant_column": "tenant_id",
                        "permission": "x"}]}  # fmt: skip
    try:
        async with open_dev_stack(config=bad, notifier=notifier) as st:
            sup = st.gateway.supervisor
            with trio.fail_after(10):
                while sup.state is not UpstreamState.LIVE:
                    await sup.wait_state_change()
            with trio.move_on_after(1.0):
                await _until(sock, "READY=1", seen)
            assert not any(m.startswith("READY=1") for m in seen), seen
            assert any("0/1 query sets applied" in m for m in seen), seen
            assert st.gateway.bound  # HTTP is up all the same
    finally:
        notifier.close()
        sock.close()


async def test_watchdog_stops_while_the_loop_is_blocked(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    rx.settimeout(0.2)
    pings: list[float] = []
    stop = threading.Event()

    def receive() -> None:  # a thread: it must keep receiving while the loop is blocked
        while not stop.is_set():
            try:
                msg = rx.recv(4096)
            except TimeoutError:
                continue
            if msg == b"WATCHDOG=1":
                pings.append(time.monotonic())

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    notifier = SystemdNotifier(NotifySettings(socket_path=str(path), watchdog_interval_s=0.02))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.serve_watchdog)
            await trio.sleep(0.3)
            before = len(pings)
            assert before >= 5
            t0 = time.monotonic()
            time.sleep(0.6)  # noqa: ASYNC251 -- on purpose: the event loop stalls
            t1 = time.monotonic()
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    finally:
        stop.set()
        thread.join(2)
        rx.close()
        notifier.close()
    # Not one ping while the loop was blocked (allow the in-flight one at the edges), and they
    # resume once it runs again.
    during = [p for p in pings if t0 + 0.05 < p < t1 - 0.01]
    assert during == [], during
    assert any(p > t1 for p in pings)
