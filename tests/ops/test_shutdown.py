"""Shutdown: in-process on virtual time (MockClock), and a real subprocess under load (SSE clients
and reducer calls in flight): every client gets `shutdown`, calls answer, exit 0 within budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from gatewayd.demo import DevStack, open_dev_stack
from gatewayd.services.db_ws import SessionConfig
from gatewayd.services.supervisor import UpstreamState
from tests.ops import shutdown_target
from tests.streams.sseclient import SseClient

pytestmark = pytest.mark.timeout(90)

GRACE_S = 2.0
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def slow_autojump_clock() -> trio.testing.MockClock:
    # Autojump only after 50 ms of real quiet: loopback I/O completes long before that, so virtual
    # time moves only when every task waits on a timer (the shutdown deadlines).
    return trio.testing.MockClock(autojump_threshold=0.05)


async def live(st: DevStack) -> None:
    with trio.fail_after(10):
        while st.gateway.supervisor.state is not UpstreamState.LIVE:
            await st.gateway.supervisor.wait_state_change()


async def test_shutdown_in_process_on_virtual_time(slow_autojump_clock: trio.testing.MockClock) -> None:
    shutdown = trio.Event()
    clients: list[SseClient] = []
    async with open_dev_stack(shutdown=shutdown, shutdown_grace_s=GRACE_S) as st:
        await live(st)
        token = st.issuer.mint("alice")
        for _ in range(5):
            c = await SseClient.open(st.url, token)
            await c.events_until(lambda e: e.event == "snapshot" and e.json["last"])
            clients.append(c)
        # One client that never reads, behind a tiny receive buffer: its socket fills up.
        frozen = await SseClient.open(st.url, token, rcvbuf=4096)
        hub = st.gateway.streams.hub
        with trio.fail_after(5):
            while hub.subscriber_count() < 6:
                await trio.sleep(0.01)
        stuck = max((sub for subs in hub.partitions.values() for sub in subs), key=lambda sub: sub.id)
        for _ in range(200):  # ~400 KB queued for a client that reads nothing: its writer blocks
            stuck.push(b": filler " + b"x" * 2000 + b"\n\n")
        await trio.sleep(0.2)
        assert hub.subscriber_count() == 6
        t0 = trio.current_time()
        shutdown.set()
        got = []
        for c in clients:
            events = await c.events_until(lambda e: e.event == "shutdown")
            got.append(events[-1].event)
            assert await c.next_event() is None  # and the stream ends
    elapsed = trio.current_time() - t0
    assert got == ["shutdown"] * 5
    # Everything returned within the budget: connections' grace, then the upstream close frame.
    assert elapsed <= GRACE_S + SessionConfig().close_timeout_s + 0.5, elapsed
    assert hub.subscriber_count() == 0
    assert st.gateway.supervisor.state is UpstreamState.CLOSED
    for c in (*clients, frozen):
        await c.aclose()


async def test_in_flight_reducer_call_finishes_during_shutdown() -> None:
    shutdown = trio.Event()
    async with open_dev_stack(shutdown=shutdown, shutdown_grace_s=GRACE_S) as st, httpx.AsyncClient() as http:
        await live(st)
        st.peer.delay_reducer("create_document_as", 0.5)
        token = st.issuer.mint("alice")
        results: list[Any] = []

        async def call() -> None:
            r = await http.post(st.url + "v1/reducers/create_document", json={"title": "late", "body": ""},
                                headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            results.append((r.status_code, r.json()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.sleep(0.2)  # the call now waits in the peer (0.5 s delay)
            shutdown.set()
    assert results and results[0][0] == 200, results
    assert results[0][1]["status"] == "committed"


async def test_call_outliving_the_grace_is_reported_not_cut() -> None:
    shutdown = trio.Event()
    async with open_dev_stack(shutdown=shutdown, shutdown_grace_s=GRACE_S) as st, httpx.AsyncClient() as http:
        await live(st)
        st.peer.delay_reducer("create_document_as", 30.0)
        token = st.issuer.mint("alice")
        results: list[Any] = []

        async def call() -> None:
            r = await http.post(st.url + "v1/reducers/create_document", json={"title": "stuck", "body": ""},
                                headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            results.append((r.status_code, r.json(), trio.current_time()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.sleep(0.3)
            t0 = trio.current_time()
            shutdown.set()
    assert len(results) == 1
    status, body, at = results[0]
    assert status == 504 and body["error"]["code"] == "outcome_unknown", body
    assert at - t0 < GRACE_S  # answered before the grace ran out
    assert st.gateway.supervisor.call_outcomes[("create_document_as", "outcome_unknown")] == 1


async def test_shutdown_under_load_in_a_subprocess(tmp_path: Path) -> None:
    stderr = (tmp_path / "target.stderr").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.ops.shutdown_target"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        cwd=str(ROOT),
    )
    try:
        assert proc.stdout is not None
        banner: dict[str, str] = {}
        buf = b""
        with trio.fail_after(30):
            while "token" not in banner:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, "the target exited before printing its banner"
                buf += chunk
                *lines, rest = buf.split(b"\n")
                buf = rest
                for line in lines:
                    k, _, v = line.decode().partition(": ")
                    banner[k] = v
        url, token = banner["url"], banner["token"]
        clients = []
        for _ in range(8):
            c = await SseClient.open(url, token)
            await c.events_until(lambda e: e.event == "snapshot" and e.json["last"])
            clients.append(c)
        answers: list[tuple[int, Any]] = []
        failures: list[str] = []

        async with httpx.AsyncClient(timeout=20) as http, trio.open_nursery() as nursery:

            async def call(i: int) -> None:
                try:
                    r = await http.post(url + "v1/reducers/create_document", json={"title": f"load {i}", "body": ""},
                                        headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return
                answers.append((r.status_code, r.json()))

            for i in range(6):
                nursery.start_soon(call, i)
            await trio.sleep(0.3)  # the calls are in flight (each is delayed 0.8 s in the peer)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            shutdown_events = []
            with trio.fail_after(shutdown_target.GRACE_S + 5):
                for c in clients:
                    events = await c.events_until(lambda e: e.event == "shutdown")
                    shutdown_events.append(events[-1] if events else None)
        with trio.fail_after(shutdown_target.GRACE_S + SessionConfig().close_timeout_s + 5):
            rc = await proc.wait()
        elapsed = time.monotonic() - t0
        for c in clients:
            await c.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stderr.close()
    log = (tmp_path / "target.stderr").read_text()
    assert rc == 0, log
    assert all(
        e is not None and e.event == "shutdown" and e.json["event"] == "shutdown" for e in shutdown_events
    )
    # Every in-flight reducer call finished and answered (none was cut without a response).
    assert failures == [], failures
    assert len(answers) == 6, answers
    for status, body in answers:
        # Committed in time, or reported: the outcome is unknown (it was sent, the gateway stopped
        # waiting just before its grace ran out). Never a cut connection.
        assert (status, body.get("status")) == (200, "committed") or (
            status == 504 and body["error"]["code"] == "outcome_unknown" and body["error"]["correlation_id"]
        ), (status, body)
    assert any(status == 200 for status, _ in answers)
    assert elapsed < shutdown_target.GRACE_S + SessionConfig().close_timeout_s + 2, elapsed
    assert "shutdown: stop accepting" in log
