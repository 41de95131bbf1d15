"""/readyz with the canary (a mute upstream turns it false within the bound, and back) and
/metrics in Prometheus text."""

from __future__ import annotations

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gatewayd.demo import DevStack, open_dev_stack
from gatewayd.services.supervisor import UpstreamState
from tests.streams.sseclient import SseClient

pytestmark = pytest.mark.timeout(90)

CANARY = {"interval_s": 0.2, "bound_s": 1.0, "call_timeout_s": 0.5}


async def _live(st: DevStack) -> None:
    sup = st.gateway.supervisor
    with trio.fail_after(10):
        while sup.state is not UpstreamState.LIVE:
            await sup.wait_state_change()


async def _wait_ready(http: httpx.AsyncClient, st: DevStack, want: bool, within_s: float) -> float:
    """Poll /readyz until it says ``want``; returns how long it took."""
    t0 = trio.current_time()
    with trio.fail_after(within_s):
        while True:
            r = await http.get(st.url + "readyz")
            if (r.status_code == 200) == want:
                assert r.json()["ready"] is want
                return trio.current_time() - t0
            await trio.sleep(0.05)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def test_readyz_goes_false_with_a_mute_upstream_and_back() -> None:
    async with open_dev_stack(config={"canary": CANARY}) as st, httpx.AsyncClient() as http:
        await _live(st)
        await _wait_ready(http, st, True, 5)
        doc = (await http.get(st.url + "readyz")).json()
        assert doc["canary"]["advancing"] is True
        assert doc["upstream"] == "live"
        # Updates stop reaching us, while the socket, pings and reducer results all still work.
        st.peer.mute("drop")
        took = await _wait_ready(http, st, False, 5)
        assert took <= CANARY["bound_s"] + CANARY["interval_s"] + 0.5, took
        doc = (await http.get(st.url + "readyz")).json()
        assert doc["upstream"] == "live"  # connected and subscribed, but not advancing
        assert doc["canary"]["advancing"] is False
        assert doc["canary"]["calls"] > 0
        st.peer.unmute()
        back = await _wait_ready(http, st, True, 5)
        assert back <= CANARY["interval_s"] + CANARY["call_timeout_s"] + 0.5, back


async def test_readyz_held_updates_released_make_it_ready_again() -> None:
    async with open_dev_stack(config={"canary": CANARY}) as st, httpx.AsyncClient() as http:
        await _live(st)
        await _wait_ready(http, st, True, 5)
        st.peer.mute("hold")
        await _wait_ready(http, st, False, 5)
        st.peer.unmute()  # the held updates arrive, in order
        await _wait_ready(http, st, True, 5)


async def test_canary_that_cannot_write_fails_closed() -> None:
    bad = {**CANARY, "reducer": "no_such_reducer"}
    async with open_dev_stack(config={"canary": bad}) as st, httpx.AsyncClient() as http:
        await _live(st)
        await _wait_ready(http, st, False, 5)
        doc = (await http.get(st.url + "readyz")).json()
        assert "404" in (doc["canary"]["last_error"] or "")


async def test_metrics_in_prometheus_text() -> None:
    async with open_dev_stack(config={"canary": CANARY}) as st, httpx.AsyncClient() as http:
        await _live(st)
        alice = st.issuer.mint("alice")
        c = await SseClient.open(st.url, alice)
        await c.events_until(lambda e: e.event == "snapshot" and e.json["last"])
        cursor = c.last_id
        h = {"Authorization": f"Bearer {alice}"}
        r = await http.post(
            st.url + "v1/reducers/create_document", json={"title": "m1", "body": ""}, headers=h
        )
        assert r.status_code == 200, r.text
        r = await http.post(
            st.url + "v1/reducers/create_document", json={"title": " ", "body": ""}, headers=h
        )
        assert r.status_code == 422, r.text
        await c.events_until(lambda e: e.event == "document.inserted")
        resumed = await SseClient.open(st.url, alice, last_event_id=cursor)  # a replay hit
        await resumed.events_until(lambda e: e.event == "document.inserted")
        bogus = await SseClient.open(st.url, alice, last_event_id="garbage")  # a miss: malformed
        await bogus.events_until(lambda e: e.event == "reset")
        st.gateway.metrics.token_minted()
        st.gateway.metrics.jwks_fetched("https://auth.example", "http_error")

        r = await http.get(st.url + "metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.text
        assert value(text, "gatewayd_streams_open") == 3
        assert value(text, "gatewayd_connections_open") >= 3
        assert value(text, "gatewayd_connections_total", kind="stream") >= 3
        assert value(text, "gatewayd_connections_total", kind="api") >= 1
        assert value(text, "gatewayd_events_total") >= 1
        assert value(text, "gatewayd_replay_hits_total") == 1
        assert value(text, "gatewayd_replay_misses_total", reason="malformed") == 1
        assert (
            value(text, "gatewayd_reducer_calls_total", reducer="create_document_as", outcome="committed")
            == 1
        )
        assert (
            value(text, "gatewayd_reducer_calls_total", reducer="create_document_as", outcome="failed") == 1
        )
        assert value(text, "gatewayd_upstream_state", state="live") == 1
        assert value(text, "gatewayd_upstream_state", state="reconnecting") == 0
        assert value(text, "gatewayd_upstream_reconnects_total") == 0
        assert value(text, "gatewayd_upstream_decode_errors_total") == 0
        assert value(text, "gatewayd_canary_advancing") == 1
        assert value(text, "gatewayd_token_mints_total", result="ok") == 1
        assert (
            value(text, "gatewayd_jwks_fetches_total", issuer="https://auth.example", result="http_error")
            == 1
        )

        # A reconnect and an eviction show up on the next scrape.
        st.peer.cut_all()
        await st.gateway.supervisor.wait_state_change()
        await _live(st)
        slow = st.gateway.streams.hub
        for subs in tuple(slow.partitions.values()):
            for sub in tuple(subs):
                sub.evict("buffer_overflow")
                break
            break
        text = (await http.get(st.url + "metrics")).text
        assert value(text, "gatewayd_upstream_reconnects_total") == 1
        assert value(text, "gatewayd_stream_evictions_total", reason="buffer_overflow") == 1
        for client in (c, resumed, bogus):
            await client.aclose()


async def test_metrics_registries_are_per_gateway() -> None:
    # Two gateways in one process must not share (or collide on) metric registries.
    async with open_dev_stack() as a, open_dev_stack() as b, httpx.AsyncClient() as http:
        a.gateway.metrics.token_minted()
        ta = (await http.get(a.url + "metrics")).text
        tb = (await http.get(b.url + "metrics")).text
        assert value(ta, "gatewayd_token_mints_total", result="ok") == 1
        assert value(tb, "gatewayd_token_mints_total", result="ok") == 0
        assert "gatewayd_canary_advancing" not in tb  # no [canary] section, no canary metrics
