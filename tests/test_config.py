"""Config: the shipped example is valid; every kind of mistake is explained precisely."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gatewayd.config import load_config, parse_config
from gatewayd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_passes_check_config() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gatewayd", "check-config", str(ROOT / "conf" / "gatewayd.toml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "ok (1 streams, 3 reducers, 1 issuers" in out.stdout
    cfg = load_config(ROOT / "conf" / "gatewayd.toml")
    assert cfg.streams[0].name == "documents"
    assert cfg.stream_queries(cfg.streams[0]) == ["SELECT * FROM document"]


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({}, "Object missing required field `upstream`"),
        (
            {"upstream": {"url": "http://x", "database": "d", "bogus": 1}},
            "unknown key `bogus` - at `$.upstream`",
        ),
        (
            {"upstream": {"url": "http://x", "database": "d"}, "sse": {"heartbeat_s": "15"}},
            "Expected `float`, got `str` - at `$.sse.heartbeat_s`",
        ),
        ({"upstream": {"url": "ws://x", "database": "d"}}, "upstream.url: must be http(s)://host[:port]"),
        (
            {"upstream": {"url": "http://x", "database": "d", "backoff_max_s": 0.1}},
            "backoff_max_s: must be >= backoff_initial_s",
        ),
        (
            {"upstream": {"url": "http://x", "database": "d", "token_file": "nope.token"}},
            "token_file: nope.token does not exist",
        ),
        (
            {
                "upstream": {"url": "http://x", "database": "d"},
                "streams": [{"name": "a", "tables": ["t"], "tenant_column": "c", "permission": "p"}] * 2,
            },
            "streams[1] ('a').name: duplicate stream name",
        ),
        (
            {"upstream": {"url": "http://x", "database": "d"}, "logging": {"level": "LOUD"}},
            "Invalid enum value 'LOUD' - at `$.logging.level`",
        ),
    ],
)
def test_config_errors_are_precise(doc: dict[str, object], needle: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base=tmp_path)
    assert needle in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    doc = {"upstream": {"url": "ftp://x", "database": ""}, "http": {"port": 70000}, "sse": {"retry_ms": -1}}
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base=tmp_path)
    lines = str(info.value).splitlines()
    assert len(lines) == 4
