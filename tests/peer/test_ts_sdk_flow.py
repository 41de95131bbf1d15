"""Acceptance: the official TypeScript SDK (npm spacetimedb@2.10.1, pinned) against the peer.

tests/harness/ts-sdk/peer_flow.mjs runs the SDK's DbConnection with hand-written bindings
(demo_bindings.mjs, in the generated-bindings shape) and checks every step itself; this test starts
the peer, feeds the script its tokens, and checks the summary and the peer's state. Any mismatch
is a peer bug. Without Node or the harness the test fails (it never skips).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from gatewayd.peer import Peer, open_peer
from gatewayd.proto.identity import identity_hex
from tests.node.harness import TS_SDK_DIR, HarnessError, ensure_ts_sdk_harness

ISS = "https://gw.example"
SCRIPT = TS_SDK_DIR / "peer_flow.mjs"


async def run_flow(peer: Peer, compression: str) -> dict[str, Any]:
    try:
        node = await trio.to_thread.run_sync(ensure_ts_sdk_harness)
    except HarnessError as exc:
        pytest.fail(f"the TypeScript SDK harness is not usable: {exc}")
    if not SCRIPT.is_file():
        pytest.fail(f"{SCRIPT} is missing")
    cfg = {
        "uri": peer.base_url,
        "database": "demo",
        "aliceToken": peer.auth.mint("user:alice", issuer=ISS),
        "aliceIdentity": identity_hex(ISS, "user:alice"),
        "bobToken": peer.auth.mint("user:bob", issuer=ISS),
        "compression": compression,
    }
    with trio.fail_after(60):
        proc = await trio.run_process(
            [node, str(SCRIPT)],
            stdin=json.dumps(cfg).encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=TS_SDK_DIR,
        )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"peer_flow.mjs failed (exit {proc.returncode}):\n{stderr[-4000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


@pytest.mark.node
@pytest.mark.parametrize(
    ("protocols", "compression"),
    [
        (("v3.bsatn.spacetimedb", "v2.bsatn.spacetimedb"), "gzip"),
        (("v3.bsatn.spacetimedb", "v2.bsatn.spacetimedb"), "none"),
        (("v2.bsatn.spacetimedb",), "gzip"),
    ],
    ids=["v3-gzip", "v3-none", "v2-gzip"],
)
async def test_official_sdk_flow(protocols: tuple[str, ...], compression: str) -> None:
    async with open_peer("demo", protocols=protocols) as peer:
        out = await run_flow(peer, compression)
        assert out["steps"] == [
            "connected",
            "subscribed",
            "reducer-ok",
            "reducer-err",
            "foreign-insert",
            "foreign-update",
            "unsubscribed",
            "anonymous",
        ]
        assert out["anonymousTenants"] == ["acme", "globex"]
        assert out["initialTitles"] == ["Quarterly plan", "Welcome to Acme"]
        assert "may not document.create in tenant globex" in out["reducerError"]
        assert out["foreignInsertEvent"] == "Transaction"
        assert out["update"] == ["from node", "renamed by bob"]
        assert out["droppedTitles"] == ["Quarterly plan", "Welcome to Acme", "from bob", "renamed by bob"]
        # the peer agrees with what the SDK saw
        docs = {d["title"]: d for d in peer.db.rows("document")}
        assert docs["renamed by bob"]["id"] == int(out["myDocumentId"])
        assert docs["renamed by bob"]["updated_by"] == identity_hex(ISS, "user:bob")
        assert "from bob" in docs
        # both SDK connections went through the websocket-token exchange and are gone now
        with trio.fail_after(5):
            await peer.wait_connection_count(0)
