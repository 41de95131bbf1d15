"""``gatewayd peer``'s entry point: prints the URL, serves, exits 0 on Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
import trio

PROGRAM = (
    "import sys; from gatewayd.peer import run_peer_cli; sys.exit(run_peer_cli({host!r}, {port}, {module!r}))"
)


async def test_run_peer_cli_prints_the_url_and_stops_on_sigint() -> None:
    code = PROGRAM.format(host="127.0.0.1", port=0, module="demo")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "the peer exited before printing its URL"
                line += chunk
        match = re.fullmatch(r"peer: (http://127\.0\.0\.1:(\d+)/)\n", line.decode())
        assert match is not None, line
        async with httpx.AsyncClient(trust_env=False) as client:
            r = await client.get(match.group(1) + "v1/ping")
            assert r.status_code == 200
            r = await client.get(match.group(1) + "v1/database/demo/schema", params={"version": "9"})
            assert "document" in {t["name"] for t in r.json()["tables"]}
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.stdout.aclose()
        if proc.stderr is not None:
            await proc.stderr.aclose()


async def test_unknown_module_exits_2() -> None:
    code = PROGRAM.format(host="127.0.0.1", port=0, module="nope")
    with trio.fail_after(20):
        res = await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
        )
    assert res.returncode == 2
    assert b"unknown module 'nope'" in res.stderr
    assert res.stdout == b""


async def test_port_in_use_exits_1() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        code = PROGRAM.format(host="127.0.0.1", port=port, module="demo")
        with trio.fail_after(20):
            res = await trio.run_process(
                [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
            )
        assert res.returncode == 1
        assert b"cannot listen" in res.stderr
    finally:
        listener.close()
