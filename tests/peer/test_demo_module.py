"""The demo module: every reducer checks rights from the tables."""

from __future__ import annotations

from typing import Any

import pytest

from gatewayd.peer.database import Caller, CallResult, PeerDatabase
from gatewayd.peer.demo_module import DemoConfig, make_demo_module
from gatewayd.proto.identity import identity_hex

ISS = "https://gw.example"
SERVICE = identity_hex(ISS, "service:gatewayd")


def who(sub: str, *, iss: str = ISS, **claims: Any) -> Caller:
    payload = {"iss": iss, "sub": sub, "aud": ["gatewayd"], "iat": 0, **claims}
    return Caller(identity_hex(iss, sub), "ab" * 16, payload)


@pytest.fixture
def db() -> PeerDatabase:
    d = PeerDatabase(make_demo_module(DemoConfig(service_identities=frozenset({SERVICE}))))
    d.run_init()
    return d


def call(db: PeerDatabase, caller: Caller, reducer: str, *args: Any) -> CallResult:
    return db.call_reducer(reducer, list(args), caller)


def failed(res: CallResult, needle: str) -> bool:
    return res.status == "failed" and needle in res.message


ROBOT: dict[str, Any] = {"api_key_id": "ak-1", "grant_version": 1}


def test_seed_data(db: PeerDatabase) -> None:
    assert {t["id"] for t in db.rows("tenant")} == {"acme", "globex"}
    assert {(m["tenant_id"], m["actor_id"], m["role"]) for m in db.rows("membership")} == {
        ("acme", "user:alice", "owner"),
        ("acme", "user:bob", "editor"),
        ("globex", "user:bob", "viewer"),
        ("globex", "user:carol", "owner"),
    }
    assert [d["title"] for d in db.rows("document")] == [
        "Welcome to Acme",
        "Quarterly plan",
        "Globex handbook",
    ]
    assert [s["identity"] for s in db.rows("service_account")] == [SERVICE]
    assert db.schema.tables["document"].columns == (
        "id",
        "tenant_id",
        "title",
        "body",
        "updated_at",
        "updated_by",
    )


def test_members_write_documents_by_role(db: PeerDatabase) -> None:
    alice, bob, carol = who("user:alice"), who("user:bob"), who("user:carol")
    assert call(db, alice, "create_document", "acme", "A", "").ok
    assert call(db, bob, "create_document", "acme", "B", "").ok
    assert failed(
        call(db, bob, "create_document", "globex", "C", ""), "may not document.create in tenant globex"
    )
    assert failed(call(db, carol, "update_document", 1, "x", ""), "may not document.update in tenant acme")
    assert call(db, bob, "delete_document", 1).ok
    assert failed(call(db, alice, "delete_document", 1), "no such document")
    assert failed(call(db, alice, "create_document", "nope", "t", ""), "no such tenant")
    assert failed(call(db, alice, "create_document", "acme", " ", ""), "title")
    audit = db.rows("audit_event")
    assert [(a["action"], a["actor_id"], a["caller"]) for a in audit] == [
        ("document.create", "user:alice", alice.identity),
        ("document.create", "user:bob", bob.identity),
        ("document.delete", "user:bob", bob.identity),
    ]
    new = next(d for d in db.rows("document") if d["title"] == "A")
    assert new["updated_by"] == alice.identity


def test_unknown_and_anonymous_callers_cannot_write(db: PeerDatabase) -> None:
    assert failed(call(db, who("user:mallory"), "create_document", "acme", "t", ""), "not linked")
    anon = who("6d4b5430-00cf-4a99-932c-ad2d07bab841", iss="localhost")
    assert failed(call(db, anon, "create_document", "acme", "t", ""), "not linked")


def test_unchanged_update_writes_nothing(db: PeerDatabase) -> None:
    res = call(db, who("user:alice"), "update_document", 1, "Welcome to Acme", "Start here.")
    assert res.ok
    assert res.diff == {}
    res = call(db, who("user:alice"), "assert_permission", "acme", "document.delete")
    assert res.ok
    assert res.diff == {}
    assert failed(call(db, who("user:bob"), "assert_permission", "acme", "membership.manage"), "may not")


def test_robot_rights_come_from_its_api_key_grant(db: PeerDatabase) -> None:
    robot = who("robot:importer", **ROBOT)
    assert call(db, robot, "create_document", "acme", "imported", "").ok
    assert call(db, robot, "update_document", 1, "re-imported", "").ok
    assert failed(call(db, robot, "delete_document", 1), "may not document.delete")
    assert failed(call(db, robot, "create_document", "globex", "t", ""), "may not")
    assert failed(
        call(db, who("robot:importer"), "create_document", "acme", "t", ""), "api_key_id and grant_version"
    )
    assert failed(
        call(
            db, who("robot:importer", api_key_id="ak-1", grant_version=0), "create_document", "acme", "t", ""
        ),
        "stale",
    )


def test_bumping_the_grant_version_invalidates_live_robot_tokens(db: PeerDatabase) -> None:
    robot = who("robot:importer", **ROBOT)
    alice = who("user:alice")
    assert call(
        db, alice, "set_api_key_grant", "ak-1", "acme", "robot:importer", ["document.create"], True
    ).ok
    assert db.rows("api_key_grant")[0]["version"] == 2
    assert failed(call(db, robot, "create_document", "acme", "t", ""), "version 1 is stale, now 2")
    fresh = who("robot:importer", api_key_id="ak-1", grant_version=2)
    assert call(db, fresh, "create_document", "acme", "t", "").ok
    assert call(db, alice, "revoke_api_key", "ak-1").ok
    revoked = who("robot:importer", api_key_id="ak-1", grant_version=3)
    assert failed(call(db, revoked, "create_document", "acme", "t", ""), "may not")


def test_management_is_human_only_and_needs_the_right(db: PeerDatabase) -> None:
    robot = who("robot:importer", **ROBOT)
    assert failed(call(db, robot, "add_member", "acme", "user:carol", "viewer"), "human-only")
    assert failed(
        call(db, who("user:bob"), "add_member", "acme", "user:carol", "viewer"), "may not membership.manage"
    )
    assert failed(
        call(db, robot, "set_api_key_grant", "ak-2", "acme", "robot:importer", [], True), "human-only"
    )
    alice = who("user:alice")
    assert call(db, alice, "add_member", "acme", "user:carol", "viewer").ok
    assert failed(call(db, alice, "add_member", "acme", "user:carol", "viewer"), "already a member")
    assert failed(call(db, alice, "set_member_role", "acme", "user:carol", "emperor"), "no such role")
    assert call(db, alice, "remove_member", "acme", "user:carol").ok
    assert failed(call(db, alice, "remove_member", "acme", "user:alice"), "last owner")


def test_membership_version_claims_go_stale(db: PeerDatabase) -> None:
    bob_token = who("user:bob", tenant_id="acme", membership_version=1)
    assert call(db, bob_token, "create_document", "acme", "t", "").ok
    assert call(db, who("user:alice"), "set_member_role", "acme", "user:bob", "admin").ok
    (bob,) = [m for m in db.rows("membership") if m["actor_id"] == "user:bob" and m["tenant_id"] == "acme"]
    assert bob["version"] == 2
    assert bob["role"] == "admin"
    assert failed(call(db, bob_token, "create_document", "acme", "t", ""), "token is stale")
    # a claim for another tenant is not checked against this one
    assert call(
        db, who("user:bob", tenant_id="globex", membership_version=9), "create_document", "acme", "t", ""
    ).ok


def test_delegated_calls_only_from_the_service_identity(db: PeerDatabase) -> None:
    service = Caller(SERVICE, "cd" * 16, {"iss": ISS, "sub": "service:gatewayd"})
    assert call(db, service, "create_document_as", "user:alice", None, "acme", "delegated", "").ok
    assert failed(
        call(db, who("user:alice"), "create_document_as", "user:alice", None, "acme", "x", ""),
        "service identity",
    )
    assert failed(call(db, service, "create_document_as", "user:carol", None, "acme", "x", ""), "may not")
    assert failed(
        call(db, service, "create_document_as", "user:ghost", None, "acme", "x", ""), "no such actor"
    )
    # the robot acting for bob, who delegated to it in acme
    assert call(db, service, "create_document_as", "robot:importer", "user:bob", "acme", "for bob", "").ok
    assert failed(
        call(db, service, "create_document_as", "robot:importer", "user:alice", "acme", "x", ""),
        "has not delegated",
    )
    doc = next(d for d in db.rows("document") if d["title"] == "for bob")
    assert call(db, service, "update_document_as", "robot:importer", "user:bob", doc["id"], "edited", "").ok
    assert call(db, service, "delete_document_as", "robot:importer", "user:bob", doc["id"]).ok
    audit = [(a["action"], a["actor_id"], a["on_behalf_of"], a["caller"]) for a in db.rows("audit_event")]
    assert audit == [
        ("document.create", "user:alice", None, SERVICE),
        ("document.create", "robot:importer", "user:bob", SERVICE),
        ("document.update", "robot:importer", "user:bob", SERVICE),
        ("document.delete", "robot:importer", "user:bob", SERVICE),
    ]
    (grant,) = db.rows("impersonation_grant")
    assert call(db, who("user:bob"), "revoke_impersonation", grant["id"]).ok
    assert failed(
        call(db, service, "create_document_as", "robot:importer", "user:bob", "acme", "x", ""),
        "has not delegated",
    )


def test_canary(db: PeerDatabase) -> None:
    service = Caller(SERVICE, "cd" * 16, None)
    assert call(db, service, "bump_canary", "gateway").ok
    assert call(db, who("user:alice"), "bump_canary", "gateway").ok
    assert failed(call(db, who("user:bob"), "bump_canary", "gateway"), "may not write canaries")
    (row,) = db.rows("canary")
    assert row["counter"] == 2
    assert row["updated_by"] == identity_hex(ISS, "user:alice")


def test_client_connected_links_trusted_subjects_and_checks_audience() -> None:
    d = PeerDatabase(make_demo_module(DemoConfig(audience="gatewayd", trusted_issuers=frozenset({ISS}))))
    d.run_init()
    assert d.connect(who("user:alice")) is None
    assert [(x["identity"], x["actor_id"]) for x in d.rows("actor_identity_link")] == [
        (identity_hex(ISS, "user:alice"), "user:alice")
    ]
    assert "audience" in (
        d.connect(Caller("c200" + "0" * 60, None, {"iss": ISS, "sub": "user:bob", "aud": "other"})) or ""
    )
    assert "not trusted" in (d.connect(who("user:bob", iss="https://evil")) or "")
    assert d.connect(who("x", iss="localhost")) is None  # anonymous may connect
    assert d.connect(who("user:nobody")) is None  # an unknown subject may connect but owns nothing

    def disable(v: Any) -> None:
        carol = v.actor.find("user:carol")
        v.actor.update({**carol, "disabled": True})

    d.transact(disable)
    assert "disabled" in (d.connect(who("user:carol")) or "")


def test_create_tenant_makes_the_creator_owner(db: PeerDatabase) -> None:
    carol = who("user:carol")
    assert call(db, carol, "create_tenant", "initech", "Initech").ok
    assert failed(call(db, carol, "create_tenant", "initech", "Initech"), "already exists")
    assert call(db, carol, "create_document", "initech", "TPS reports", "").ok
    assert failed(call(db, who("robot:importer", **ROBOT), "create_tenant", "x", "X"), "human-only")


def test_seedless_module_and_identity_links() -> None:
    ident = "c200" + "ab" * 30
    d = PeerDatabase(make_demo_module(DemoConfig(seed=False)))
    d.run_init()
    assert d.rows("document") == []
    assert len(d.rows("role")) == 4
    with pytest.raises(RuntimeError, match="unknown actor"):
        PeerDatabase(
            make_demo_module(DemoConfig(seed=False, identity_links={ident: "user:alice"}))
        ).run_init()
    d = PeerDatabase(make_demo_module(DemoConfig(identity_links={ident: "user:alice"})))
    d.run_init()
    assert call(d, Caller(ident, None, None), "create_document", "acme", "linked", "").ok
