"""The peer's HTTP surface (PROTOCOL.md §2)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
from trio_websocket import open_websocket_url

from gatewayd.peer import Peer
from gatewayd.proto import messages as m
from gatewayd.proto.identity import identity_hex

ISS = "https://gw.example"


@pytest.fixture
async def http(peer: Peer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=peer.base_url, trust_env=False) as client:
        yield client


async def test_ping(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/ping")
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["access-control-allow-origin"] == "*"


async def test_post_identity_mints_an_anonymous_identity(peer: Peer, http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/identity")
    assert r.status_code == 200
    body = r.json()
    header = jwt.get_unverified_header(body["token"])
    assert header == {"alg": "ES256", "typ": "JWT"}  # no kid
    claims = jwt.decode(
        body["token"],
        peer.auth.public_key,
        algorithms=["ES256"],
        options={"verify_aud": False, "verify_exp": False},
    )
    assert list(claims) == ["hex_identity", "sub", "iss", "aud", "iat", "exp"]
    assert claims["iss"] == "localhost"
    assert claims["aud"] == ["spacetimedb"]
    assert claims["exp"] is None
    assert body["identity"] == claims["hex_identity"] == identity_hex("localhost", claims["sub"])
    assert body["identity"].startswith("c200")


async def test_public_key_is_pem(peer: Peer, http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/identity/public-key")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/pem-certificate-chain"
    assert r.content == peer.auth.public_key_pem
    assert r.content.startswith(b"-----BEGIN PUBLIC KEY-----")


async def test_websocket_token_is_re_signed_for_60_seconds(peer: Peer, http: httpx.AsyncClient) -> None:
    token = peer.auth.mint("user:alice", issuer=ISS, tenant_id="acme")
    r = await http.post("/v1/identity/websocket-token", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    short = r.json()["token"]
    claims = jwt.decode(short, peer.auth.public_key, algorithms=["ES256"], options={"verify_aud": False})
    assert claims["iss"] == ISS
    assert claims["sub"] == "user:alice"
    assert claims["tenant_id"] == "acme"
    assert claims["exp"] == claims["iat"] + 60
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["hex_identity"] == identity_hex(ISS, "user:alice")
    # also accepted as ?token=, and it is itself valid on the peer
    r = await http.post("/v1/identity/websocket-token", params={"token": short})
    assert r.status_code == 200
    r = await http.post("/v1/identity/websocket-token")
    assert r.status_code == 401
    assert r.text == "Authorization required"


async def test_verify_identity(peer: Peer, http: httpx.AsyncClient) -> None:
    token = peer.auth.mint("u", issuer=ISS)
    auth = {"Authorization": f"Bearer {token}"}
    assert (await http.get(f"/v1/identity/{identity_hex(ISS, 'u')}/verify", headers=auth)).status_code == 204
    assert (await http.get(f"/v1/identity/{identity_hex(ISS, 'v')}/verify", headers=auth)).status_code == 400


async def test_database_routes_carry_identity_headers(peer: Peer, http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/database/demo/schema", params={"version": "9"})
    assert r.status_code == 200
    ident = r.headers["spacetime-identity"]
    tok = r.headers["spacetime-identity-token"]
    assert jwt.decode(tok, options={"verify_signature": False})["hex_identity"] == ident
    token = peer.auth.mint("user:bob", issuer=ISS)
    r = await http.get("/v1/database/demo/identity", headers={"Authorization": f"Bearer {token}"})
    assert r.text == peer.db.identity
    assert r.headers["spacetime-identity"] == identity_hex(ISS, "user:bob")
    assert r.headers["spacetime-identity-token"] == token
    # the database can be named by its identity too
    r = await http.get(f"/v1/database/{peer.db.identity}/identity")
    assert r.status_code == 200
    assert r.text == peer.db.identity


async def test_schema_requires_version_9(peer: Peer, http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/database/demo/schema")
    assert r.status_code == 400
    assert "version" in r.text
    r = await http.get("/v1/database/demo/schema", params={"version": "9"})
    doc = r.json()
    from gatewayd.proto.schema import parse_module_def

    schema = parse_module_def(doc)
    doc_table = schema.tables["document"]
    assert doc_table.columns == ("id", "tenant_id", "title", "body", "updated_at", "updated_by")
    assert doc_table.pk_column == "id"
    assert doc_table.auto_inc == (0,)
    assert schema.tables["audit_event"].public is False
    assert schema.reducers["create_document"].param_names == ("tenant_id", "title", "body")
    assert schema.reducers["client_connected"].lifecycle == "OnConnect"
    assert schema.fingerprint == peer.db.schema.fingerprint


async def test_unknown_database_is_404_after_auth(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/database/nope/schema", params={"version": "9"})
    assert r.status_code == 404
    assert r.text == "No such database."
    assert "spacetime-identity" in r.headers
    r = await http.get("/v1/database/nope/schema", headers={"Authorization": "Bearer x.y.z"})
    assert r.status_code == 401


async def test_sql_select_subset_as_json(peer: Peer, http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/database/demo/sql",
        content=(
            "SELECT * FROM document WHERE tenant_id = 'acme' AND id >= 2; SELECT id, name FROM tenant LIMIT 1"
        ),
    )
    assert r.status_code == 200
    first, second = r.json()
    names = [e["name"]["some"] for e in first["schema"]["elements"]]
    assert names == ["id", "tenant_id", "title", "body", "updated_at", "updated_by"]
    (row,) = first["rows"]
    assert row[0] == 2
    assert row[2] == "Quarterly plan"
    assert isinstance(row[4], list)
    assert isinstance(row[4][0], int)
    assert row[5] == ["0x" + peer.db.identity]  # Identity as ["0x…"]
    assert set(first["stats"]) == {"rows_inserted", "rows_deleted", "rows_updated"}
    assert [e["name"]["some"] for e in second["schema"]["elements"]] == ["id", "name"]
    assert second["rows"] == [["acme", "Acme Corp"]]
    assert "spacetime-execution-duration-micros" in r.headers


async def test_sql_options_and_arrays_render_typeless(peer: Peer, http: httpx.AsyncClient) -> None:
    from gatewayd.proto.identity import identity_hex as ih

    owner = peer.auth.mint("own", issuer=ISS)
    peer.db.owner_identity = ih(ISS, "own")
    r = await http.post(
        "/v1/database/demo/sql",
        content="SELECT scopes, enabled FROM api_key_grant",
        headers={"Authorization": f"Bearer {owner}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()[0]["rows"] == [[["document.create", "document.update"], True]]


@pytest.mark.parametrize(
    ("sql", "status"),
    [("DELETE FROM document", 400), ("SELECT * FROM nope", 400), ("SELECT * FROM audit_event", 400)],
)
async def test_sql_errors(http: httpx.AsyncClient, sql: str, status: int) -> None:
    r = await http.post("/v1/database/demo/sql", content=sql)
    assert r.status_code == status


async def test_call_statuses(peer: Peer, http: httpx.AsyncClient) -> None:
    alice = {"Authorization": f"Bearer {peer.auth.mint('user:alice', issuer=ISS)}"}
    ok = await http.post(
        "/v1/database/demo/call/create_document",
        json={"tenant_id": "acme", "title": "via http", "body": ""},
        headers=alice,
    )
    assert ok.status_code == 200
    assert ok.content == b""
    assert ok.headers["spacetime-energy-used"] == "0"
    assert any(d["title"] == "via http" for d in peer.db.rows("document"))
    positional = await http.post(
        "/v1/database/demo/call/create_document", json=["acme", "positional", ""], headers=alice
    )
    assert positional.status_code == 200
    failed = await http.post("/v1/database/demo/call/create_document", json=["nope", "t", ""], headers=alice)
    assert failed.status_code == 530
    assert failed.text == "no such tenant: nope"
    assert (await http.post("/v1/database/demo/call/nope", json=[], headers=alice)).status_code == 404
    assert (
        await http.post("/v1/database/demo/call/create_document", json=[1, 2], headers=alice)
    ).status_code == 400
    assert (await http.post("/v1/database/demo/call/init", json=[], headers=alice)).status_code == 400
    wrong_type = await http.post(
        "/v1/database/demo/call/create_document",
        content=b"[]",
        headers={**alice, "content-type": "text/plain"},
    )
    assert wrong_type.status_code == 415


async def test_call_accepts_sats_json_forms(peer: Peer, http: httpx.AsyncClient) -> None:
    service = peer.auth.mint("svc", issuer=ISS)
    # service identities are configured in the module; give this one a row directly
    peer.db.transact(
        lambda db: db.service_account.insert(
            {"identity": identity_hex(ISS, "svc"), "label": "t", "created_at": 0}
        )
    )
    r = await http.post(
        "/v1/database/demo/call/create_document_as",
        json={
            "actor_id": "user:alice",
            "on_behalf_of": {"none": []},
            "tenant_id": "acme",
            "title": "sats",
            "body": "",
        },
        headers={"Authorization": f"Bearer {service}"},
    )
    assert r.status_code == 200, r.text
    r = await http.post(
        "/v1/database/demo/call/create_document_as",
        json=["robot:importer", {"some": "user:bob"}, "acme", "sats2", ""],
        headers={"Authorization": f"Bearer {service}"},
    )
    assert r.status_code == 200, r.text


async def test_call_runs_the_connect_lifecycle(http: httpx.AsyncClient) -> None:
    from gatewayd.peer import open_peer
    from gatewayd.peer.demo_module import DemoConfig, make_demo_module

    mod = make_demo_module(DemoConfig(audience="gatewayd"))
    async with open_peer(mod) as p, httpx.AsyncClient(base_url=p.base_url) as client:
        bad = p.auth.mint("user:alice", issuer=ISS)  # aud is ["spacetimedb"], the module wants "gatewayd"
        r = await client.post(
            "/v1/database/demo/call/create_document",
            json=["acme", "t", ""],
            headers={"Authorization": f"Bearer {bad}"},
        )
        assert r.status_code == 403
        assert "audience" in r.text
        good = p.auth.mint("user:alice", issuer=ISS, aud="gatewayd")
        r = await client.post(
            "/v1/database/demo/call/create_document",
            json=["acme", "t", ""],
            headers={"Authorization": f"Bearer {good}"},
        )
        assert r.status_code == 200, r.text


async def test_cors_preflight(http: httpx.AsyncClient) -> None:
    r = await http.options(
        "/v1/database/demo/call/x", headers={"Origin": "https://app", "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "authorization" in r.headers["access-control-allow-headers"]


async def test_keep_alive_serves_several_requests_on_one_connection(peer: Peer) -> None:
    async with httpx.AsyncClient(base_url=peer.base_url, limits=httpx.Limits(max_connections=1)) as client:
        for _ in range(5):
            assert (await client.get("/v1/ping")).status_code == 200
    assert peer.stats_tcp_connections == 1


async def test_upgrade_errors_before_the_101(peer: Peer, http: httpx.AsyncClient) -> None:
    ws_headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "v3.bsatn.spacetimedb",
    }
    r = await http.get("/v1/database/nope/subscribe", headers=ws_headers)
    assert r.status_code == 404
    r = await http.get(
        "/v1/database/demo/subscribe",
        headers={**ws_headers, "Sec-WebSocket-Protocol": "v1.bsatn.spacetimedb"},
    )
    assert r.status_code == 400
    assert r.text == "no valid protocol selected"
    r = await http.get("/v1/database/demo/subscribe", params={"connection_id": "0" * 32}, headers=ws_headers)
    assert r.status_code == 400
    assert "all-zeros" in r.text
    r = await http.get("/v1/database/demo/subscribe", params={"compression": "gzip"}, headers=ws_headers)
    assert r.status_code == 400  # the enum names are case-sensitive
    r = await http.get("/v1/database/demo/subscribe")  # no upgrade headers at all
    assert r.status_code == 400
    r = await http.get("/v1/database/demo/subscribe", headers={**ws_headers, "Authorization": "Basic abc"})
    assert r.status_code == 400
    assert r.text == "Authorization is invalid: malformed token"
    r = await http.get(
        "/v1/database/demo/subscribe", headers={**ws_headers, "Authorization": "Bearer not.a.jwt"}
    )
    assert r.status_code == 401


async def test_explicit_connection_id_is_used(peer: Peer) -> None:
    cid = "0123456789abcdef0123456789abcdef"
    async with open_websocket_url(
        peer.subscribe_url("demo", connection_id=cid, compression="None"),
        subprotocols=["v2.bsatn.spacetimedb"],
    ) as ws:
        raw = await ws.get_message()
        assert isinstance(raw, bytes)
        (init,) = m.decode_server_payload(raw, m.Protocol.V2)
        assert isinstance(init, m.InitialConnection)
        assert init.connection_id == cid


async def test_body_is_json_for_identity(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/identity")
    assert r.headers["content-type"] == "application/json"
    json.loads(r.content)
