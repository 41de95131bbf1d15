"""`gatewayd identity plan-migration`: dry run (identities, collisions, links needed) and --apply
through the demo module's service-only migrate_identity_link reducer on the dev peer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from gatewayd.cli import main
from gatewayd.demo import SERVICE_ISSUER, SERVICE_SUBJECT, service_identity
from gatewayd.peer import DemoConfig, PeerAuth, make_demo_module, open_peer
from gatewayd.proto.identity import identity_hex
from gatewayd.tools.migration import plan_migration, read_subjects

OLD = "https://auth.old.example"
NEW = "https://auth.new.example"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def subjects(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "subjects.txt"
    p.write_text(text)
    return p


def test_read_subjects() -> None:
    assert read_subjects("# c\nuser:a\n\n  user:b   user:b2 \n") == [
        ("user:a", "user:a"),
        ("user:b", "user:b2"),
    ]
    with pytest.raises(ValueError, match="expected"):
        read_subjects("a b c")


def test_dry_run_lists_old_and_new_identities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = subjects(tmp_path, "user:alice\nuser:bob\n")
    rc, out, err = run(
        capsys, "identity", "plan-migration", "--from-issuer", OLD, "--to-issuer", NEW, "--subjects", str(f)
    )
    assert rc == 0
    for sub in ("user:alice", "user:bob"):
        assert f"old {identity_hex(OLD, sub)}" in out
        assert f"new {identity_hex(NEW, sub)}" in out
        assert f"link      {sub}" in out
    assert "summary: 2 to link, 0 blocked, 0 unchanged" in out
    assert "dry run: nothing written" in err


def test_collisions_and_bad_claims_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = subjects(tmp_path, "u1 shared\nu2 shared\nu3 user|x\nu4\nu4\n")
    rc, out, _ = run(capsys, "identity", "plan-migration", "--from-issuer", OLD, "--to-issuer", NEW,
                     "--subjects", str(f), "--json")  # fmt: skip
    assert rc == 1
    doc = json.loads(out)
    by: dict[str, list[dict[str, Any]]] = {}
    for row in doc["subjects"]:
        by.setdefault(row["subject"], []).append(row)
    assert by["u1"][0]["action"] == "blocked" and "collision: u1, u2" in by["u1"][0]["problems"][0]
    assert by["u2"][0]["action"] == "blocked"
    assert any("'|'" in p for p in by["u3"][0]["problems"])
    assert by["u4"][0]["action"] == "link"
    assert by["u4"][1]["problems"] == ["duplicate subject in the input"]


def test_new_identity_that_is_another_subjects_old_one(tmp_path: Path) -> None:
    # Same issuer, subjects renamed: u1 -> u2 would take over u2's current identity.
    plan = plan_migration(OLD, OLD, [("u1", "u2"), ("u2", "u3"), ("u9", "u9")])
    rows = {r.subject: r for r in plan.rows}
    assert rows["u1"].action == "blocked"
    assert "u2's current identity" in rows["u1"].problems[0]
    assert rows["u2"].action == "link"
    assert rows["u9"].action == "unchanged"


def test_trailing_slash_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = subjects(tmp_path, "u1\n")
    rc, out, _ = run(capsys, "identity", "plan-migration", "--from-issuer", OLD, "--to-issuer", OLD + "/",
                     "--subjects", str(f))  # fmt: skip
    assert rc == 0 and "differ only by a trailing slash" in out


def test_missing_subjects_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "identity", "plan-migration", "--from-issuer", OLD, "--to-issuer", NEW,
                     "--subjects", str(tmp_path / "none"))  # fmt: skip
    assert rc == 2 and "plan-migration" in err


async def test_apply_writes_links_through_the_demo_module(tmp_path: Path) -> None:
    auth = PeerAuth()
    service_token = auth.mint(SERVICE_SUBJECT, issuer=SERVICE_ISSUER)
    alice_old = identity_hex(OLD, "user:alice")
    module = make_demo_module(
        DemoConfig(
            service_identities=frozenset({service_identity()}), identity_links={alice_old: "user:alice"}
        )
    )
    token_file = tmp_path / "service.token"
    token_file.write_text(service_token)
    f = subjects(tmp_path, "user:alice\nuser:nobody\n")
    async with open_peer(module, auth=auth) as peer:
        argv = ["identity", "plan-migration", "--from-issuer", OLD, "--to-issuer", NEW, "--subjects", str(f),
                "--apply", "--database-url", peer.base_url, "--database", "demo", "--token-file", str(token_file)]  # fmt: skip
        rc = await trio.to_thread.run_sync(main, argv)
        assert rc == 1  # user:nobody has no link to migrate
        new = identity_hex(NEW, "user:alice")
        link = peer.db.transact(lambda db: db.actor_identity_link.find(new))
        assert link is not None and link["actor_id"] == "user:alice" and link["issuer"] == NEW
        assert (
            peer.db.transact(lambda db: db.actor_identity_link.find(identity_hex(NEW, "user:nobody"))) is None
        )
        # Idempotent: applying again links nothing new and reports success for alice.
        f.write_text("user:alice\n")
        rc = await trio.to_thread.run_sync(main, argv)
        assert rc == 0
        # Only the service may write links.
        other = tmp_path / "user.token"
        other.write_text(auth.mint("user:bob", issuer=OLD))
        rc = await trio.to_thread.run_sync(main, [*argv[:-1], str(other)])
        assert rc == 1


async def test_apply_reports_each_outcome(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    auth = PeerAuth()
    module = make_demo_module(DemoConfig(service_identities=frozenset({service_identity()})))
    token_file = tmp_path / "service.token"
    token_file.write_text(auth.mint(SERVICE_SUBJECT, issuer=SERVICE_ISSUER))
    f = subjects(tmp_path, "user:carol\n")
    async with open_peer(module, auth=auth) as peer:
        argv = ["identity", "plan-migration", "--from-issuer", OLD, "--to-issuer", NEW, "--subjects", str(f),
                "--apply", "--database-url", peer.base_url, "--database", "demo", "--token-file", str(token_file)]  # fmt: skip
        rc = await trio.to_thread.run_sync(main, argv)
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED user:carol: HTTP 530" in out and "not linked to any actor" in out
    assert "applied: 0 linked, 1 failed" in out
