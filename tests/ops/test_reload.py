"""SIGHUP reload: a rotated issuer key applies without dropping streams; an invalid config is
refused with a log line and the old one kept; restart-only changes are named."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from gatewayd.demo import DEMO_AUDIENCE, DEMO_ISSUER, DevStack, demo_config, open_dev_stack
from gatewayd.reload import reload_gateway, serve_reload_on_sighup
from gatewayd.services.notify import NotifySettings, SystemdNotifier
from gatewayd.services.supervisor import UpstreamState
from tests.streams.sseclient import SseClient

pytestmark = pytest.mark.timeout(60)


def toml(doc: dict[str, Any]) -> str:
    """A small TOML writer for config dicts (tables, arrays of tables, scalars, string lists)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(v)

    out: list[str] = []

    def table(prefix: str, d: dict[str, Any], header: str | None) -> None:
        if header:
            out.append(header)
        subs: list[tuple[str, str, Any]] = []
        for k, v in d.items():
            if isinstance(v, dict):
                subs.append(("t", k, v))
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                subs.append(("a", k, v))
            else:
                out.append(f"{k} = {scalar(v)}")
        for kind, k, v in subs:
            name = f"{prefix}{k}"
            if kind == "t":
                table(f"{name}.", v, f"[{name}]")
            else:
                for item in v:
                    table(f"{name}.", item, f"[[{name}]]")

    table("", doc, None)
    return "\n".join(out) + "\n"


def new_key(folder: Path, kid: str) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
    path = folder / f"{kid}.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return key, path


def mint(key: ec.EllipticCurvePrivateKey, kid: str, sub: str = "user:alice", tenant: str = "acme") -> str:
    now = int(time.time())
    claims = {
        "iss": DEMO_ISSUER,
        "sub": sub,
        "aud": DEMO_AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "tenant_id": tenant,
        "scope": "document.read document.create",
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def write_config(st: DevStack, path: Path, jwks: Path, **over: Any) -> None:
    port = st.gateway.config.http.port
    doc = demo_config(st.peer.base_url, port, jwks)
    for section, values in over.items():
        if isinstance(values, dict):
            doc.setdefault(section, {}).update(values)
        else:
            doc[section] = values
    path.write_text(toml(doc))


async def live(st: DevStack) -> None:
    with trio.fail_after(10):
        while st.gateway.supervisor.state is not UpstreamState.LIVE:
            await st.gateway.supervisor.wait_state_change()


async def snapshot_status(http: httpx.AsyncClient, st: DevStack, token: str) -> int:
    r = await http.get(st.url + "v1/streams/documents/snapshot", headers={"Authorization": f"Bearer {token}"})
    return r.status_code


async def test_sighup_applies_a_rotated_key_without_dropping_streams(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify"
    rx = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await rx.bind(str(notify_path))
    notifier = SystemdNotifier(NotifySettings(socket_path=str(notify_path)))
    notifier.ready_sent = True  # as after start-up
    cfg = tmp_path / "gatewayd.toml"
    new, new_jwks = new_key(tmp_path, "demo-2")
    try:
        async with open_dev_stack() as st, httpx.AsyncClient() as http, trio.open_nursery() as nursery:
            await live(st)
            old_token = st.issuer.mint("alice")
            new_token = mint(new, "demo-2")
            assert await snapshot_status(http, st, old_token) == 200
            assert await snapshot_status(http, st, new_token) == 401  # unknown kid before the reload
            stream = await SseClient.open(st.url, old_token)
            await stream.events_until(lambda e: e.event == "snapshot" and e.json["last"])

            write_config(st, cfg, new_jwks, sse={"heartbeat_s": 7.0, "retry_ms": 1234, "retry_jitter_ms": 0})
            await nursery.start(partial(serve_reload_on_sighup, st.gateway, cfg, notifier=notifier))
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(5):
                first = (await rx.recv(4096)).decode().split("\n")
                second = (await rx.recv(4096)).decode().split("\n")
            assert first[0] == "RELOADING=1" and first[1].startswith("MONOTONIC_USEC=")
            assert second[0] == "READY=1" and second[1].startswith("STATUS=reload applied")

            # The rotated key is in force: new tokens pass, tokens of the retired key do not.
            assert await snapshot_status(http, st, new_token) == 200
            assert await snapshot_status(http, st, old_token) == 401
            assert st.gateway.streams.hub.config.heartbeat_s == 7.0
            assert st.gateway.streams.config.retry_ms == 1234
            # The stream opened before the reload is still open and still gets events.
            assert st.gateway.streams.hub.subscriber_count() == 1
            r = await http.post(
                st.url + "v1/reducers/create_document",
                json={"title": "after reload", "body": ""},
                headers={"Authorization": f"Bearer {new_token}"},
            )
            assert r.status_code == 200, r.text
            got = await stream.events_until(lambda e: e.event == "document.inserted")
            assert got[-1].json["payload"]["title"] == "after reload"
            await stream.aclose()
            nursery.cancel_scope.cancel()
    finally:
        notifier.close()
        rx.close()


async def test_invalid_config_is_refused_and_the_old_one_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "gatewayd.toml"
    async with open_dev_stack() as st, httpx.AsyncClient() as http:
        await live(st)
        token = st.issuer.mint("alice")
        before = st.gateway.config
        verifier = st.gateway.verifier
        stream = await SseClient.open(st.url, token)
        await stream.events_until(lambda e: e.event == "snapshot" and e.json["last"])
        bad_files = {
            "not toml": "this is [not toml",
            "unknown key": toml(
                {"upstream": {"url": st.peer.base_url, "database": "demo"}, "bogus": {"x": 1}}
            ),
            "invalid value": toml({"upstream": {"url": "ftp://x", "database": "demo"}}),
            "missing jwks": toml(
                {
                    "upstream": {"url": st.peer.base_url, "database": "demo"},
                    "auth": {"issuers": [{"issuer": "i", "jwks_file": "nope.json", "audience": "a"}]},
                }
            ),
        }
        broken_jwks = tmp_path / "broken.json"
        broken_jwks.write_text("{not json")
        bad_files["unreadable jwks"] = toml(demo_config(st.peer.base_url, 0, broken_jwks))
        for what, text in bad_files.items():
            cfg.write_text(text)
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="gatewayd.reload"):
                result = reload_gateway(st.gateway, cfg)
            assert not result.ok, what
            lines = [r.getMessage() for r in caplog.records if r.name == "gatewayd.reload"]
            assert len(lines) == 1 and lines[0].startswith("reload refused"), (what, lines)
            assert "\n" not in lines[0]
            assert st.gateway.config is before, what
            assert st.gateway.verifier is verifier, what
        # A missing file too.
        result = reload_gateway(st.gateway, tmp_path / "absent.toml")
        assert not result.ok and st.gateway.config is before
        # Still serving with the old configuration, stream included.
        assert await snapshot_status(http, st, token) == 200
        assert st.gateway.streams.hub.subscriber_count() == 1
        await stream.aclose()


async def test_restart_only_changes_are_named_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tmp_path / "gatewayd.toml"
    async with open_dev_stack() as st:
        await live(st)
        jwks_file = st.gateway.config.auth.issuers[0].jwks_file
        assert jwks_file is not None
        jwks = Path(jwks_file)
        write_config(
            st,
            cfg,
            jwks,
            upstream={"url": "http://127.0.0.1:1", "database": "other"},
            reducers=[
                {
                    "name": "create_document",
                    "upstream": "create_document_as",
                    "permission": "document.write",
                    "actor_argument": "actor_id",
                    "tenant_argument": "tenant_id",
                }
            ],
            streams=[
                {
                    "name": "documents",
                    "tables": ["document"],
                    "tenant_column": "tenant_id",
                    "permission": "document.list",
                }
            ],
        )
        with caplog.at_level(logging.WARNING, logger="gatewayd.reload"):
            result = reload_gateway(st.gateway, cfg)
        assert result.ok
        assert result.needs_restart == ["upstream"]
        assert any("need a restart" in r.getMessage() for r in caplog.records)
        assert st.gateway.config.upstream.database == "demo"  # the running value stays
        assert st.gateway.config.reducers[0].permission == "document.write"  # reducers applied
        # A stream's permission changes in place (same tables): the next open checks the new one.
        assert st.gateway.streams.streams["documents"].permission == "document.list"
        token = st.issuer.mint("alice")  # has document.read, not document.list
        async with httpx.AsyncClient() as http:
            assert await snapshot_status(http, st, token) == 403
