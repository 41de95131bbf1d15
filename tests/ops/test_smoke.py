"""`gatewayd smoke`: passes against the demo (in-process and `gatewayd demo` as a subprocess), and
fails with exit 1 and a clear one-line verdict when the upstream is mute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from gatewayd.demo import DEMO_CANARY, DevStack, open_dev_stack
from gatewayd.services.supervisor import UpstreamState
from gatewayd.tools.smoke import SmokeSettings, run_smoke
from tests.e2e.support import start_demo

pytestmark = pytest.mark.timeout(90)

GATEWAYD = Path(sys.executable).parent / "gatewayd"
ARGS = {"title": "smoke {nonce}", "body": "gatewayd smoke test"}


async def live(st: DevStack) -> None:
    with trio.fail_after(10):
        while st.gateway.supervisor.state is not UpstreamState.LIVE:
            await st.gateway.supervisor.wait_state_change()


def settings(st: DevStack, **over: object) -> SmokeSettings:
    base: dict[str, object] = {
        "gateway": st.url,
        "token": st.issuer.mint("alice"),
        "args": ARGS,
        "bound_s": 2.0,
    }
    base.update(over)
    return SmokeSettings(**base)  # type: ignore[arg-type]


async def test_smoke_passes_against_the_dev_stack() -> None:
    async with open_dev_stack() as st:
        await live(st)
        v = await run_smoke(settings(st))
    assert v.ok, v.line(0)
    line = v.line(1.5)
    assert line.startswith("smoke: PASS ") and line.endswith("(1.50 s)")
    assert (
        "create_document committed" in line and "document.inserted" in line and "resume replayed it" in line
    )
    assert [s.split(":")[0] for s in v.steps] == ["ok   readiness", "ok   stream", "ok   write", "ok   envelope",
                                                    "ok   resume"]  # fmt: skip
    assert "\n" not in line


async def test_smoke_fails_at_envelope_when_the_event_does_not_arrive() -> None:
    async with open_dev_stack() as st:
        await live(st)
        v = await run_smoke(settings(st, expect_event="document.deleted", bound_s=1.0))
    assert not v.ok
    line = v.line(0)
    assert line.startswith(
        "smoke: FAIL at envelope: no document.deleted event carrying the write within 1.0 s"
    )
    assert "not reaching" in line


async def test_smoke_fails_when_the_upstream_is_mute() -> None:
    # A mute upstream still answers the gateway's own reducer calls (their ReducerResult carries
    # the changes), so the write alone would pass: the readiness canary is what catches it.
    canary = {**DEMO_CANARY, "interval_s": 0.2, "bound_s": 1.0, "call_timeout_s": 0.5}
    async with open_dev_stack(config={"canary": canary}) as st:
        await live(st)
        assert (await run_smoke(settings(st))).ok
        st.peer.mute("drop")
        await trio.sleep(1.6)
        v = await run_smoke(settings(st))
        st.peer.unmute()
        await trio.sleep(0.6)
        again = await run_smoke(settings(st))
    assert not v.ok
    assert v.line(0).startswith(
        "smoke: FAIL at readiness: /readyz answered 503: not ready (upstream 'live', updates not flowing"
    )
    assert again.ok, again.line(0)


async def test_smoke_fails_at_stream_with_a_bad_token() -> None:
    async with open_dev_stack() as st:
        await live(st)
        v = await run_smoke(settings(st, token="not-a-token"))
    assert not v.ok
    assert v.line(0).startswith("smoke: FAIL at stream: GET ")
    assert "HTTP 401" in v.line(0) and "correlation_id" in v.line(0)


async def test_smoke_fails_at_write_for_an_unknown_reducer() -> None:
    async with open_dev_stack() as st:
        await live(st)
        v = await run_smoke(settings(st, reducer="no_such"))
    assert not v.ok and v.step == "write" and "unknown_reducer" in v.reason


async def test_smoke_unreachable_gateway() -> None:
    v = await run_smoke(SmokeSettings(gateway="http://127.0.0.1:9/", token="x", bound_s=1.0))
    assert not v.ok and v.step == "readiness" and "ConnectError" in v.reason


def test_smoke_cli_against_gatewayd_demo_subprocess(tmp_path: Path) -> None:
    demo = start_demo(tmp_path)
    try:
        r = subprocess.run(
            [str(GATEWAYD), "smoke", "--gateway", demo.url, "--token-url", demo.url + "demo/token", "--bound-s", "10"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert r.returncode == 0, (r.stdout, r.stderr)
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("smoke: PASS"), r.stdout
        assert "ok   resume" in r.stderr
        # The same with the printed token, and a failing run: exit 1 and one FAIL line.
        r = subprocess.run(
            [str(GATEWAYD), "smoke", "--gateway", demo.url, "--token", demo.token, "--reducer", "nope"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert r.returncode == 1
        assert r.stdout.strip().startswith("smoke: FAIL at write:"), r.stdout
        r = subprocess.run(
            [str(GATEWAYD), "smoke", "--gateway", demo.url], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2
    finally:
        assert demo.stop() == 0
