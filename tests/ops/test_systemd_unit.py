"""systemd/gatewayd.service: `systemd-analyze verify` passes, and the settings the issue asks for
are there (and consistent with the drain budget)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.main import DEFAULT_SHUTDOWN_GRACE_S
from gatewayd.services.db_ws import SessionConfig

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "gatewayd.service"
ANALYZE = shutil.which("systemd-analyze")
GATEWAYD = Path(sys.executable).parent / "gatewayd"


def _service() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def _verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    # ExecStart must name an executable that exists: point it at this venv's gatewayd.
    unit = tmp_path / "gatewayd.service"
    unit.write_text(text.replace("/opt/gatewayd/.venv/bin/gatewayd", str(GATEWAYD)))
    return subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing: .ci/run installs Debian's systemd")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    assert GATEWAYD.is_file()
    r = _verify(UNIT.read_text(), tmp_path)
    assert r.returncode == 0, r.stderr
    assert "gatewayd.service" not in r.stderr, r.stderr  # no warnings about our unit either


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing: .ci/run installs Debian's systemd")
def test_systemd_analyze_catches_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: a wrong Type= is an error.
    r = _verify(UNIT.read_text().replace("Type=notify", "Type=bogus"), tmp_path)
    assert r.returncode != 0 or "bogus" in r.stderr, (r.returncode, r.stderr)


def test_unit_has_the_operational_settings() -> None:
    s = _service()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.WatchdogSec"].endswith("s")
    assert int(one["Service.LimitNOFILE"]) >= 65536  # tens of thousands of streams
    assert one["Service.DynamicUser"] == "yes"
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert one[f"Service.{key}"] in ("strict", "yes"), key
    assert one["Service.ProtectSystem"] == "strict"
    assert one["Service.CapabilityBoundingSet"] == ""  # an empty capability set
    assert one["Service.StateDirectory"] == "gatewayd"
    assert one["Service.ConfigurationDirectory"] == "gatewayd"
    assert "/etc/gatewayd/" in one["Service.ExecStart"]


def test_timeout_stop_covers_the_drain_budget() -> None:
    stop_s = float(_service()["Service.TimeoutStopSec"][-1].removesuffix("s"))
    # connections' grace + hypercorn's lifespan grace (same value) + the upstream close frame.
    budget = DEFAULT_SHUTDOWN_GRACE_S * 2 + SessionConfig().close_timeout_s
    assert stop_s > budget


def test_unit_parses_as_ini() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text().replace("%", "%%"))
    assert parser.has_section("Service") and parser.has_section("Install")
