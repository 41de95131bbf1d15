"""`gatewayd keys` and `gatewayd apikey`, and the production profile refusing local issuers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from gatewayd.cli import main
from gatewayd.proto.apikeys import parse_key

CONFIG = """
[upstream]
url = "http://127.0.0.1:3000"
database = "demo"

[auth.api_keys]
database = "keys.sqlite3"
pepper_file = "pepper"

[broker]
issuer = "{issuer}"
keys_dir = "ring"
profile = "{profile}"
algorithm = "{alg}"
"""


def write_config(tmp: Path, issuer: str = "https://gw.example.com", profile: str = "production",
                 alg: str = "ES256") -> str:  # fmt: skip
    (tmp / "pepper").write_text("p" * 40)
    path = tmp / "gatewayd.toml"
    path.write_text(CONFIG.format(issuer=issuer, profile=profile, alg=alg))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_keys_generate_rotate_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    rc, out, _ = run(capsys, "keys", "--config", cfg, "--json", "generate")
    assert rc == 0
    first = json.loads(out)["kid"]
    rc, _, err = run(capsys, "keys", "--config", cfg, "generate")
    assert rc == 1 and "already holds" in err
    rc, out, _ = run(capsys, "keys", "--config", cfg, "--json", "rotate")
    assert rc == 0
    second = json.loads(out)["kid"]
    rc, out, _ = run(capsys, "keys", "--config", cfg, "--json", "list")
    states = {r["kid"]: r["state"] for r in json.loads(out)}
    assert states == {first: "signing", second: "pending"}
    for f in (tmp_path / "ring").iterdir():
        assert "PRIVATE KEY" not in out and (f.stat().st_mode & 0o077) == 0


def test_apikey_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    rc, out, _ = run(capsys, "apikey", "--config", cfg, "--json", "create", "--robot", "int-1", "--tenant",
                     "acme", "--scope", "document.read", "--expires", "30d")  # fmt: skip
    assert rc == 0
    doc = json.loads(out)
    key = doc["key"]
    assert parse_key(key).key_id == doc["key_id"] and doc["subject"] == "robot:int-1"
    rc, out, _ = run(capsys, "apikey", "--config", cfg, "list")
    assert doc["key_id"] in out and "active" in out and key not in out
    rc, out, _ = run(capsys, "apikey", "--config", cfg, "--json", "rotate", doc["key_id"], "--grace-s", "60")
    rotated = json.loads(out)
    assert rc == 0 and rotated["replaces"] == doc["key_id"] and rotated["key"] != key
    rc, _, _ = run(capsys, "apikey", "--config", cfg, "revoke", rotated["key_id"])
    assert rc == 0
    rc, out, _ = run(capsys, "apikey", "--config", cfg, "--json", "list")
    assert {r["key_id"]: r["status"] for r in json.loads(out)}[rotated["key_id"]] == "revoked"
    dump = repr(sqlite3.connect(tmp_path / "keys.sqlite3").execute("SELECT * FROM api_key").fetchall())
    assert key not in dump and rotated["key"] not in dump
    rc, _, err = run(capsys, "apikey", "--config", cfg, "revoke", "no-such-key")
    assert rc == 1 and "no API key" in err


@pytest.mark.parametrize(
    "issuer", ["http://localhost:8080", "https://127.0.0.1", "http://gw.example.com", "https://[::1]:8443"]
)
def test_production_profile_refuses_local_issuers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], issuer: str
) -> None:
    cfg = write_config(tmp_path, issuer=issuer)
    rc, _, err = run(capsys, "check-config", cfg)
    assert rc != 0 and "production profile refuses" in err
    rc, _, err = run(capsys, "keys", "--config", cfg, "list")
    assert rc != 0 and "production profile refuses" in err
    cfg = write_config(tmp_path, issuer=issuer, profile="development")
    assert run(capsys, "check-config", cfg)[0] == 0


@pytest.mark.parametrize(
    ("issuer", "alg", "says"),
    [
        ("https://gw.example.com/", "ES256", "ends with '/'"),
        ("https://gw.example.com|x", "ES256", "'|'"),
        ("https://gw.example.com", "EdDSA", "refused for SpacetimeDB"),
        ("https://gw.example.com", "HS256", "refused for SpacetimeDB"),
    ],
)
def test_broker_config_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], issuer: str, alg: str, says: str
) -> None:
    rc, _, err = run(capsys, "check-config", write_config(tmp_path, issuer=issuer, alg=alg))
    assert rc != 0 and says in err
