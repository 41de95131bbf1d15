"""Regressions from the attack review: hostile input ends one request, never the daemon."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from gatewayd.demo import DevStack, open_dev_stack
from gatewayd.services.supervisor import UpstreamState
from tests.streams.sseclient import SseClient

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def stack(**config: Any) -> AsyncIterator[DevStack]:
    async with open_dev_stack(config=config) as st:
        with trio.fail_after(10):
            while st.gateway.supervisor.state is not UpstreamState.LIVE:
                await st.gateway.supervisor.wait_state_change()
        yield st


async def still_serving(st: DevStack) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.get(st.url + "healthz")).status_code == 200
    c = await SseClient.open(st.url, st.issuer.mint("alice"))
    evs = await c.events_until(lambda e: e.event == "snapshot" and e.json["last"])
    assert evs[-1].event == "snapshot"
    await c.aclose()


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_deeply_nested_token_is_refused_not_fatal() -> None:
    token = b64(b"[" * 1000 + b"]" * 1000) + ".e30.AAAA"
    async with stack() as st:
        c = await SseClient.open(st.url, token)
        assert c.status == 401
        assert b'"code":"malformed_token"' in await c.body()
        await c.aclose()
        async with httpx.AsyncClient() as http:
            r = await http.get(
                st.url + "v1/streams/documents/snapshot", headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 401
        await still_serving(st)


@pytest.mark.parametrize("cursor", ["a.b.\u00b2", "a.b." + "9" * 40, "x.y.-1", "a.b.\u0661"])
async def test_cursors_with_non_ascii_digits_reset(cursor: str) -> None:
    async with stack() as st:
        query = urllib.parse.urlencode({"cursor": cursor})
        c = await SseClient.open(st.url, st.issuer.mint("alice"), query=query)
        assert c.status == 200
        evs = await c.events_until(lambda e: e.event == "snapshot" and e.json["last"])
        assert [e.event for e in evs] == ["reset", "snapshot"]
        assert evs[0].json["reason"] == "malformed"
        await c.aclose()
        await still_serving(st)


async def test_bad_snapshot_page_offsets_are_410_not_500() -> None:
    async with stack() as st:
        auth = {"Authorization": f"Bearer {st.issuer.mint('alice')}"}
        async with httpx.AsyncClient() as http:
            first = await http.get(
                st.url + "v1/streams/documents/snapshot", params={"limit": 1}, headers=auth
            )
            token = first.json()["next_page"].rpartition(":")[0]
            for off in ("\u00b2", "1" * 5000):
                r = await http.get(
                    st.url + "v1/streams/documents/snapshot", params={"page": f"{token}:{off}"}, headers=auth
                )
                assert (r.status_code, r.json()["error"]["code"]) == (410, "page_expired")


async def test_deeply_nested_reducer_body_is_400() -> None:
    async with stack() as st:
        async with httpx.AsyncClient() as http:
            r = await http.post(
                st.url + "v1/reducers/create_document",
                content=b"[" * 50_000 + b"]" * 50_000,
                headers={"Authorization": f"Bearer {st.issuer.mint('alice')}"},
            )
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")


async def test_fallback_streams_are_rechecked_like_native_ones() -> None:
    async with stack() as st:
        front = st.gateway.front
        assert front is not None
        # Percent-encoded: the front hands it to the API server, which serves the same stream.
        c = await SseClient.open(st.url, st.issuer.mint("alice"), path="v1/streams/%64ocuments")
        assert c.status == 200
        await c.events_until(lambda e: e.event == "snapshot" and e.json["last"])
        assert front.native_streams == 0
        assert len(front.rechecks) == 1
        await c.aclose()


async def test_connection_cap_closes_extra_connections() -> None:
    async with stack(http={"max_connections_count": 3}) as st:
        front = st.gateway.front
        assert front is not None
        socks = []
        for _ in range(3):
            s = await trio.open_tcp_stream("127.0.0.1", st.gateway.bound[0][1])
            socks.append(s)
        with trio.fail_after(5):
            while front.open_connections < 3:
                await trio.sleep(0.01)
        extra = await trio.open_tcp_stream("127.0.0.1", st.gateway.bound[0][1])
        with trio.fail_after(5):
            assert await extra.receive_some(10) == b""  # closed at once
        assert front.refused_connections == 1
        for s in (*socks, extra):
            await s.aclose()
