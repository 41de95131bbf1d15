"""`gatewayd token decode|verify|keygen|mint` on good and bad tokens, including every row of
SECURITY.md's table of inputs to reject (tests/authcases.py)."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from gatewayd.cli import main
from gatewayd.proto.apikeys import make_key
from gatewayd.proto.identity import identity_hex
from gatewayd.tools.tokens import classify_opaque, production_issuer, verify_token
from tests.authcases import AUDIENCE, DROP, ISSUER, REJECT_CASES, Case, IssuerKit, b64


@pytest.fixture(scope="module")
def kit() -> IssuerKit:
    return IssuerKit()


@pytest.fixture
def jwks_file(kit: IssuerKit, tmp_path: Path) -> Path:
    p = tmp_path / "jwks.json"
    p.write_text(json.dumps(kit.jwks()))
    return p


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def verify(capsys: pytest.CaptureFixture[str], token: str, jwks: Path | str, *extra: str) -> tuple[int, str]:
    rc, out, _ = run(capsys, "token", "verify", token, "--jwks", str(jwks), "--issuer", ISSUER,
                     "--audience", AUDIENCE, *extra)  # fmt: skip
    return rc, out


# --- decode ------------------------------------------------------------------------------------


def test_decode_shows_header_claims_times_and_identity(
    kit: IssuerKit, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "token", "decode", kit.token())
    assert rc == 0, out
    assert '"alg": "ES256"' in out and '"kid": "k-es"' in out
    assert f'"iss": "{ISSUER}"' in out
    assert re.search(r"note: exp: \d+ = \d{4}-\d\d-\d\d .* UTC \(in (29\d|300) s\)", out), out
    assert identity_hex(ISSUER, "u-1") in out
    assert "signature was not checked" in out


def test_decode_flags_duplicate_members(kit: IssuerKit, capsys: pytest.CaptureFixture[str]) -> None:
    header = b64(b'{"alg":"ES256","kid":"k-es","alg":"none"}')
    payload = b64(b'{"sub":"alice","iss":"x","sub":"admin","exp":1}')
    rc, out, _ = run(capsys, "token", "decode", f"{header}.{payload}.c2ln")
    assert rc == 1
    assert "header: duplicate member 'alg'" in out
    assert "payload: duplicate member 'sub'" in out
    rc, out = verify(capsys, f"{header}.{payload}.c2ln", "/dev/null")
    assert rc == 2  # the JWKS file is not a JWKS
    rc, out, _ = run(capsys, "token", "verify", f"{header}.{payload}.c2ln")
    assert rc == 1 and "FAIL duplicates" in out


def test_decode_flags_dangerous_headers(kit: IssuerKit, capsys: pytest.CaptureFixture[str]) -> None:
    tok = kit.sign(kit.claims(), headers={"jku": "https://evil.example/jwks.json"})
    rc, out, _ = run(capsys, "token", "decode", tok)
    assert rc == 1 and "'jku'" in out and "never fetched" in out


def _mistyped(key: str) -> str:
    """Change the last character (always to a different one, or the checksum may still match)."""
    return key[:-1] + ("1" if key[-1] == "0" else "0")


@pytest.mark.parametrize(
    ("token", "kind"),
    [
        (make_key("live", "k1-abc"), "gatewayd API key (live, key id k1-abc, checksum ok)"),
        (_mistyped(make_key("test", "ci-key")), "gatewayd API key (test), malformed API key (checksum"),
        ("gw_live_short", "gatewayd API key (live), malformed"),
        ("A" * 32 + "." + "b" * 43 + "=", "Better Auth session token (signed cookie value"),
        ("Ab3" * 10 + "xy", "Better Auth session token (the raw session id"),
        ("2YotnFZFEjr1zCsicMWpAA" + "x" * 20, "OAuth opaque access token"),
    ],
)
def test_decode_names_opaque_credentials(token: str, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "token", "decode", token)
    assert rc == 1
    assert kind in out, out
    assert classify_opaque(token) is not None


def test_decode_json_output(kit: IssuerKit, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "token", "decode", "--json", kit.token())
    doc = json.loads(out)
    assert rc == 0 and doc["jws"] and doc["claims"]["sub"] == "u-1" and doc["problems"] == []


# --- verify --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kid", ["k-es", "k-ed", "k-rs"])
def test_verify_accepts_a_good_token(
    kit: IssuerKit, jwks_file: Path, kid: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = verify(capsys, kit.token(kid=kid), jwks_file)
    assert rc == 0, out
    assert out.strip().splitlines()[-1] == "verdict: VALID"
    assert "ok   signature: valid" in out
    assert f"identity: {identity_hex(ISSUER, 'u-1')}" in out


@pytest.mark.parametrize("case", REJECT_CASES, ids=lambda c: c.id)
def test_verify_rejects_every_row_of_the_security_table(
    case: Case, kit: IssuerKit, jwks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = verify(capsys, case.make(kit), jwks_file)
    assert rc == 1, out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: INVALID"), out
    assert case.says.lower() in out.lower(), (case.says, out)
    # Each failure is named on a FAIL line.
    assert "FAIL " in out


def test_verify_row13_random_kids_are_all_rejected_without_fetching(
    kit: IssuerKit, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    with serve_jwks(kit.jwks(), calls) as url:
        for i in range(20):
            tok = kit.sign(kit.claims(), headers={"kid": f"random-{i}"})
            rc, out = verify(capsys, tok, url)
            assert rc == 1 and "unknown signing key 'random-" in out
    assert len(calls) == 20  # one fetch per invocation: never a refetch per kid


def test_verify_names_every_failed_check(
    kit: IssuerKit, jwks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time())
    tok = kit.token(iss="https://other.example", aud="someone", iat=now - 900, exp=now - 600, sub="")
    rc, out = verify(capsys, tok, jwks_file)
    assert rc == 1
    verdict = out.strip().splitlines()[-1]
    for name in ("exp", "iss", "aud", "sub"):
        assert name in verdict, verdict
    assert "ok   signature" in out  # the signature itself is fine


def test_verify_lifetime_and_leeway(
    kit: IssuerKit, jwks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = int(time.time())
    tok = kit.token(iat=now, exp=now + 7200)
    rc, out = verify(capsys, tok, jwks_file, "--max-lifetime-s", "3600")
    assert rc == 1 and "FAIL lifetime" in out
    tok = kit.token(iat=now - 100, exp=now - 10)  # expired 10 s ago: within the 30 s leeway
    assert verify(capsys, tok, jwks_file)[0] == 0
    assert verify(capsys, tok, jwks_file, "--leeway-s", "0")[0] == 1


def test_verify_without_jwks_is_incomplete(kit: IssuerKit, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "token", "verify", kit.token(), "--issuer", ISSUER, "--audience", AUDIENCE)
    assert rc == 2
    assert "skip signature" in out and "INCOMPLETE" in out


def test_verify_jwks_from_url(kit: IssuerKit, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    with serve_jwks(kit.jwks(), calls) as url:
        rc, out = verify(capsys, kit.token(), url)
    assert rc == 0, out
    assert calls == ["/jwks.json"]


def test_verify_unreadable_jwks_is_an_input_error(
    kit: IssuerKit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run(capsys, "token", "verify", kit.token(), "--jwks", str(tmp_path / "absent.json"))
    assert rc == 2 and "cannot load the JWKS" in err


# --- SpacetimeDB's rules -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdb() -> IssuerKit:
    return IssuerKit(issuer="https://gateway.example.test", audience="spacetimedb")


def verify_stdb(
    capsys: pytest.CaptureFixture[str], kit: IssuerKit, token: str, jwks: dict[str, Any], tmp: Path
) -> tuple[int, str]:
    p = tmp / "stdb-jwks.json"
    p.write_text(json.dumps(jwks))
    rc, out, _ = run(capsys, "token", "verify", token, "--jwks", str(p), "--issuer", kit.issuer,
                     "--audience", "spacetimedb")  # fmt: skip
    return rc, out


def test_spacetimedb_audience_good_token(
    stdb: IssuerKit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = verify_stdb(capsys, stdb, stdb.token(sub="user:alice"), stdb.jwks(), tmp_path)
    assert rc == 0, out
    assert "ok   spacetimedb.alg: ES256" in out and "ok   spacetimedb.kid" in out


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda k: k.token(kid="k-ed"), "SpacetimeDB accepts only ES256 and RS256"),
        (lambda k: k.token(iat=DROP), "SpacetimeDB requires iat"),
        (lambda k: k.token(sub="user|admin"), "sub contains '|'"),
        (lambda k: k.token(sub="u" * 129), "sub is 129 bytes"),
    ],
)
def test_spacetimedb_limits(
    stdb: IssuerKit, tmp_path: Path, make: Any, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = verify_stdb(capsys, stdb, make(stdb), stdb.jwks(), tmp_path)
    assert rc == 1
    assert says in out, out
    assert "spacetimedb." in out.strip().splitlines()[-1]


def test_spacetimedb_kid_must_be_published(
    stdb: IssuerKit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks = {"keys": [stdb.jwk("k-rs")]}  # k-es is not published
    rc, out = verify_stdb(capsys, stdb, stdb.token(), jwks, tmp_path)
    assert rc == 1 and "FAIL spacetimedb.kid" in out


def test_spacetimedb_checks_are_off_for_other_audiences(kit: IssuerKit) -> None:
    report = verify_token(kit.token(kid="k-ed"), jwks=kit.jwks(), issuer=ISSUER, audience=AUDIENCE)
    assert not report.failed
    assert not any(c.name.startswith("spacetimedb") for c in report.checks)
    forced = verify_token(
        kit.token(kid="k-ed"), jwks=kit.jwks(), issuer=ISSUER, audience=AUDIENCE, spacetimedb=True
    )
    assert [c.name for c in forced.failed] == ["spacetimedb.alg"]


# --- keygen and mint ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_keygen_then_mint_then_verify(alg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "key.pem"
    jwks = tmp_path / "jwks.json"
    rc, out, err = run(capsys, "token", "keygen", "--key", str(key), "--alg", alg, "--jwks-out", str(jwks))
    assert rc == 0 and "mode 0600" in err
    assert key.stat().st_mode & 0o777 == 0o600
    assert json.loads(out)["keys"][0]["alg"] == alg
    rc, tok, err = run(capsys, "token", "mint", "--key", str(key), "--issuer", "http://localhost:8080",
                       "--subject", "user:alice", "--audience", "gatewayd", "--tenant", "acme",
                       "--scope", "document.read", "--claim", "membership_version=3", "--lifetime-s", "600")  # fmt: skip
    assert rc == 0, err
    rc, out, _ = run(capsys, "token", "verify", tok.strip(), "--jwks", str(jwks), "--issuer",
                     "http://localhost:8080", "--audience", "gatewayd", "--max-lifetime-s", "600")  # fmt: skip
    assert rc == 0, out
    rc, out, _ = run(capsys, "token", "decode", "--json", tok.strip())
    claims = json.loads(out)["claims"]
    assert claims["tenant_id"] == "acme" and claims["membership_version"] == 3 and claims["jti"]
    assert claims["exp"] - claims["iat"] == 600
    # keygen never overwrites a key
    rc, _, err = run(capsys, "token", "keygen", "--key", str(key))
    assert rc == 2 and "exists" in err


@pytest.mark.parametrize(
    "issuer",
    [
        "https://auth.example.com",
        "https://gateway.prod.internal/",
        "https://10.0.0.5",
        "https://[2001:db8::1]",
    ],
)
def test_mint_refuses_production_issuers(
    issuer: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key.pem"
    run(capsys, "token", "keygen", "--key", str(key))
    rc, out, err = run(capsys, "token", "mint", "--key", str(key), "--issuer", issuer, "--subject", "u")
    assert rc == 1 and out == ""
    assert "refusing to mint" in err and "production" in err


@pytest.mark.parametrize(
    "issuer",
    [
        "http://auth.example.com",
        "https://localhost:8443",
        "https://127.0.0.1",
        "https://[::1]:9",
        "gatewayd-dev",
    ],
)
def test_mint_allows_local_issuers(issuer: str) -> None:
    assert not production_issuer(issuer)


@pytest.mark.parametrize("subject", ["a|b", "", "s" * 129])
def test_mint_refuses_claims_spacetimedb_refuses(
    subject: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key.pem"
    run(capsys, "token", "keygen", "--key", str(key))
    rc, _, err = run(capsys, "token", "mint", "--key", str(key), "--issuer", "local", "--subject", subject)
    assert rc == 1 and "refusing to mint" in err


def test_mint_with_a_bad_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    rc, _, err = run(capsys, "token", "mint", "--key", str(bad), "--issuer", "local", "--subject", "u")
    assert rc == 2 and "cannot load the key" in err


# --- helpers -----------------------------------------------------------------------------------


class serve_jwks:
    """Serve a JWKS on 127.0.0.1:0 in a thread; records request paths."""

    def __init__(self, doc: dict[str, Any], calls: list[str]) -> None:
        body = json.dumps(doc).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                calls.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/jwks.json"

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


DECODE_FLAGS = {1, 6, 7, 8, 14}  # rows that decoding alone (no key, no policy) must flag


@pytest.mark.parametrize("case", REJECT_CASES, ids=lambda c: c.id)
def test_decode_on_every_row_of_the_security_table(
    case: Case, kit: IssuerKit, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "token", "decode", case.make(kit))
    assert rc in (0, 1)
    if case.row in DECODE_FLAGS:
        assert rc == 1, out
        assert case.says.lower() in out.lower() or "problem:" in out, out
