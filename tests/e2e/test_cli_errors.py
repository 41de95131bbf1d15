"""Start-up failures of ``gatewayd demo`` and ``gatewayd run`` are one line on stderr, not a traceback."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from tests.e2e.support import GATEWAYD

REPO_ROOT = Path(__file__).resolve().parents[2]


def _busy_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, int(s.getsockname()[1])


def test_demo_on_a_busy_port_says_so_in_one_line() -> None:
    sock, port = _busy_port()
    with sock:
        r = subprocess.run(
            [str(GATEWAYD), "demo", "--port", str(port)], capture_output=True, text=True, timeout=30
        )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "gatewayd demo: [Errno 98] Address already in use" in r.stderr, r.stderr[-2000:]
    assert "url:" not in r.stdout


def test_run_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    sock, port = _busy_port()
    conf = (REPO_ROOT / "conf" / "gatewayd.toml").read_text()
    assert "\nport = 8080" in conf
    shutil.copy(REPO_ROOT / "conf" / "example-jwks.json", tmp_path)
    config = tmp_path / "gatewayd.toml"
    config.write_text(conf.replace("\nport = 8080", f"\nport = {port}", 1))
    with sock:
        r = subprocess.run(
            [str(GATEWAYD), "run", "--config", str(config)], capture_output=True, text=True, timeout=30
        )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "gatewayd: [Errno 98] Address already in use" in r.stderr, r.stderr[-2000:]
