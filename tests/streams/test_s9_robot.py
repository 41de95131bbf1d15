"""S9: API key -> robot -> attributed write, against the dev peer with the token broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gatewayd.demo import open_dev_stack
from gatewayd.services.supervisor import UpstreamState

pytestmark = pytest.mark.timeout(90)

REDUCERS: list[dict[str, Any]] = [
    # The robot's own connection: the module sees the robot (and checks its grant claims).
    {"name": "import_document", "upstream": "create_document", "permission": "document.create",
     "tenant_argument": "tenant_id", "attribution": "user"},
    # A delegated call on behalf of a user who granted the robot impersonation.
    {"name": "import_document_for", "upstream": "create_document_as", "permission": "document.create",
     "actor_argument": "actor_id", "tenant_argument": "tenant_id", "attribution": "delegated"},
    # Membership management is human-only in the module.
    {"name": "add_member", "upstream": "add_member", "permission": "document.create",
     "tenant_argument": "tenant_id", "attribution": "user"},
]  # fmt: skip


async def test_s9_api_key_robot_attributed_writes(tmp_path: Path) -> None:
    (tmp_path / "pepper").write_text("p" * 48)
    config = {
        "reducers": REDUCERS,
        "auth": {
            "api_keys": {"database": str(tmp_path / "keys.sqlite3"), "pepper_file": str(tmp_path / "pepper")}
        },
        "broker": {"issuer": "", "keys_dir": str(tmp_path / "keys"), "profile": "development"},
    }
    async with open_dev_stack(config=config, use_broker=True) as st:
        with trio.fail_after(15):
            while st.gateway.supervisor.state is not UpstreamState.LIVE:
                await st.gateway.supervisor.wait_state_change()
        auth = st.gateway.authenticator
        assert auth is not None
        assert auth.api_keys is not None
        # ak-1 belongs to tenant acme and robot:importer (the module's grant ak-1, version 1).
        key, _rec = auth.api_keys.store.create(
            subject="robot:importer",
            tenant_id="acme",
            scopes=["document.create"],
            expires_at=None,
            key_id="ak-1",
        )

        async def post(reducer: str, args: dict[str, Any]) -> httpx.Response:
            async with httpx.AsyncClient(timeout=20) as http:
                return await http.post(
                    f"{st.url}v1/reducers/{reducer}", json=args, headers={"X-API-Key": key}
                )

        def audit_for(title: str) -> dict[str, Any]:
            (doc,) = [d for d in st.peer.db.rows("document") if d["title"] == title]
            (row,) = [a for a in st.peer.db.rows("audit_event") if a["target"] == f"document:{doc['id']}"]
            return dict(row)

        # Importing a document stores the robot as actor, with an audit row.
        r = await post("import_document", {"title": "imported", "body": ""})
        assert r.status_code == 200, r.text
        a = audit_for("imported")
        assert (a["actor_id"], a["on_behalf_of"]) == ("robot:importer", None)
        # A delegated call on behalf of bob (who delegated to the robot) audits both.
        r = await post("import_document_for", {"title": "for bob", "body": "", "on_behalf_of": "user:bob"})
        assert r.status_code == 200, r.text
        a = audit_for("for bob")
        assert (a["actor_id"], a["on_behalf_of"]) == ("robot:importer", "user:bob")
        # A human-only reducer refuses the robot (the module's own rule).
        r = await post("add_member", {"actor_id": "user:dave", "role": "viewer"})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "reducer_failed")
        assert "human-only" in r.json()["error"]["message"]
        # tenant_id / actor fields in the body are not taken from the caller.
        r = await post("import_document", {"title": "x", "body": "", "tenant_id": "globex"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "gateway_filled_argument")
        # The grant version moves to 2: the robot's still-valid token is refused by the module.
        st.peer.db.transact(
            lambda db: db.api_key_grant.update({**db.api_key_grant.find("ak-1"), "version": 2})
        )
        r = await post("import_document", {"title": "stale", "body": ""})
        assert (r.status_code, r.json()["error"]["code"]) == (422, "reducer_failed")
        assert "stale" in r.json()["error"]["message"]
        # A disabled key fails at gatewayd, before any upstream contact.
        users = st.gateway.users
        assert users is not None
        opened = users.statistics()["opened"]
        auth.api_keys.store.set_enabled("ak-1", False)
        r = await post("import_document", {"title": "never", "body": ""})
        assert r.status_code in (401, 403)
        assert users.statistics()["opened"] == opened
        assert [d for d in st.peer.db.rows("document") if d["title"] in ("never", "stale")] == []
