"""`gatewayd run` as systemd runs it: NOTIFY_SOCKET and WATCHDOG_USEC from the environment,
READY=1 once subscribed, SIGHUP -> RELOADING=1 + MONOTONIC_USEC then READY=1, SIGTERM ->
STOPPING=1 and exit 0. The upstream is the dev peer, in this process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from gatewayd.demo import DemoIssuer
from gatewayd.peer import open_peer

pytestmark = pytest.mark.timeout(60)

GATEWAYD = Path(sys.executable).parent / "gatewayd"


def config(peer_url: str, jwks: Path) -> str:
    return f"""
[upstream]
url = "{peer_url}"
database = "demo"
backoff_initial_s = 0.2

[http]
host = "127.0.0.1"
port = 0

[[auth.issuers]]
issuer = "gatewayd-demo"
jwks_file = {json.dumps(str(jwks))}
audience = "gatewayd"

[[streams]]
name = "documents"
tables = ["document"]
tenant_column = "tenant_id"
permission = "document.read"
"""


async def test_gatewayd_run_talks_to_systemd(tmp_path: Path) -> None:
    issuer = DemoIssuer(tmp_path)
    notify = tmp_path / "notify"
    rx = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await rx.bind(str(notify))
    seen: list[str] = []

    async def until(prefix: str) -> str:
        with trio.fail_after(15):
            while True:
                msg = (await rx.recv(65536)).decode()
                seen.append(msg)
                if msg.startswith(prefix):
                    return msg

    async with open_peer("demo") as peer:
        cfg = tmp_path / "gatewayd.toml"
        cfg.write_text(config(peer.base_url, issuer.jwks_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "200000", "PYTHONUNBUFFERED": "1"}
        env.pop("WATCHDOG_PID", None)
        stderr = (tmp_path / "stderr").open("w")
        proc = await trio.lowlevel.open_process(
            [str(GATEWAYD), "run", "--config", str(cfg)], stderr=stderr, stdout=subprocess.DEVNULL, env=env
        )
        try:
            ready = await until("READY=1")
            assert "STATUS=upstream live; 1/1 query sets applied" in ready
            await until("WATCHDOG=1")  # WATCHDOG_USEC 200000 -> a ping every 0.1 s
            # A reload with a rotated key file: RELOADING=1 + MONOTONIC_USEC, then READY=1.
            DemoIssuer(tmp_path)  # rewrites demo-jwks.json with a new key
            proc.send_signal(signal.SIGHUP)
            reloading = await until("RELOADING=1")
            assert reloading.split("\n")[1].startswith("MONOTONIC_USEC=")
            again = await until("READY=1")
            assert "STATUS=reload applied" in again
            # A broken file is refused; the process keeps running and says so.
            cfg.write_text("[upstream\n")
            proc.send_signal(signal.SIGHUP)
            await until("RELOADING=1")
            refused = await until("READY=1")
            assert "STATUS=reload refused" in refused
            proc.send_signal(signal.SIGTERM)
            await until("STOPPING=1")
            with trio.fail_after(15):
                rc = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stderr.close()
            rx.close()
    log = (tmp_path / "stderr").read_text()
    assert rc == 0, log
    assert "reload refused" in log
    assert sum(1 for m in seen if m.startswith("STOPPING=1")) == 1
