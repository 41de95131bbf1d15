"""``/metrics``: the gateway's counters and gauges in Prometheus text format.

Most numbers already exist as plain attributes and ``statistics()`` of the components (hub,
streams, supervisor, front, canary); a custom collector reads them at scrape time, so the hot
path never touches a Prometheus object. Only events that have no component of their own to count
them go through :class:`GatewayMetrics`' hook methods (:meth:`GatewayMetrics.token_minted`,
:meth:`GatewayMetrics.jwks_fetched`): the token broker and the JWKS cache call those.

Every metric is named ``gatewayd_*``; labels have bounded values (reasons, outcomes, configured
reducer and issuer names), never per-client ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from gatewayd.services.supervisor import UpstreamState

# The classic text format (what generate_latest writes, and what every Prometheus version
# scrapes); prometheus-client >= 0.22 labels its output 1.0.0, which Prometheus 2 does not know.
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4


class _GatewayCollector(Collector):
    """Reads the running gateway's components at scrape time (sync, no awaits)."""

    def __init__(self) -> None:
        self.source: Any = None  # gatewayd.main.Gateway, set by GatewayMetrics.render

    def collect(self) -> Iterator[Any]:
        g = self.source
        if g is None:
            return
        front = getattr(g, "front", None)
        if front is not None:
            yield GaugeMetricFamily(
                "gatewayd_connections_open", "Client connections open now", value=front.open_connections
            )
            c = CounterMetricFamily(
                "gatewayd_connections", "Client connections by first request", labels=["kind"]
            )
            c.add_metric(["stream"], front.native_streams)
            c.add_metric(["api"], front.handed_over)
            yield c
        streams = g.streams
        hub = streams.hub
        yield GaugeMetricFamily("gatewayd_streams_open", "SSE streams open now", value=hub.subscriber_count())
        yield GaugeMetricFamily(
            "gatewayd_stream_partitions_open",
            "(stream, tenant) partitions with clients",
            value=len(hub.partitions),
        )
        yield CounterMetricFamily(
            "gatewayd_events", "Stream events produced from upstream changes", value=streams.projector.events
        )
        yield CounterMetricFamily(
            "gatewayd_upstream_batches", "Change batches received from upstream", value=streams.batches
        )
        ev = CounterMetricFamily("gatewayd_stream_evictions", "Streams cut by the gateway", labels=["reason"])
        for reason, n in sorted(hub.evictions.items()):
            ev.add_metric([reason], n)
        yield ev
        yield CounterMetricFamily(
            "gatewayd_replay_hits",
            "Resumes answered from the replay ring",
            value=getattr(streams, "replays", 0),
        )
        miss = CounterMetricFamily(
            "gatewayd_replay_misses", "Resumes that got reset + snapshot", labels=["reason"]
        )
        for reason, n in sorted(streams.resets.items()):
            miss.add_metric([reason], n)
        yield miss

        sup = g.supervisor
        calls = CounterMetricFamily(
            "gatewayd_reducer_calls", "Reducer calls by outcome", labels=["reducer", "outcome"]
        )
        for (reducer, outcome), n in sorted(sup.call_outcomes.items()):
            calls.add_metric([reducer, outcome], n)
        yield calls
        yield CounterMetricFamily(
            "gatewayd_upstream_reconnects", "Upstream sessions lost and reopened", value=sup.reconnects
        )
        yield CounterMetricFamily(
            "gatewayd_upstream_token_refreshes", "Make-before-break token refreshes", value=sup.refreshes
        )
        yield CounterMetricFamily(
            "gatewayd_upstream_decode_errors",
            "Upstream messages that could not be decoded",
            value=sup.decode_errors,
        )
        state = GaugeMetricFamily(
            "gatewayd_upstream_state", "1 for the upstream's current state", labels=["state"]
        )
        for s in UpstreamState:
            state.add_metric([s.value], 1.0 if sup.state is s else 0.0)
        yield state
        sets = dict(sup.query_set_status)
        yield GaugeMetricFamily(
            "gatewayd_upstream_query_sets_applied",
            "Query sets applied upstream",
            value=sum(1 for v in sets.values() if v == "applied"),
        )
        canary = getattr(g, "canary", None)
        if canary is not None:
            st = canary.status()
            yield GaugeMetricFamily(
                "gatewayd_canary_advancing",
                "1 while canary writes come back in time",
                value=int(st.advancing),
            )
            if st.last_progress_age_s is not None:
                yield GaugeMetricFamily(
                    "gatewayd_canary_last_progress_age_seconds",
                    "Age of the last proof that updates flow",
                    value=st.last_progress_age_s,
                )
            yield CounterMetricFamily("gatewayd_canary_calls", "Canary writes attempted", value=st.calls)
            yield CounterMetricFamily(
                "gatewayd_canary_call_failures", "Canary writes that failed", value=st.call_failures
            )
            yield CounterMetricFamily(
                "gatewayd_canary_updates", "Canary changes seen through the subscription", value=st.updates
            )


class GatewayMetrics:
    """One registry per gateway (tests run several in one process), plus the hook counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _GatewayCollector()
        self.registry.register(self._collector)
        self._token_mints = Counter(
            "gatewayd_token_mints",
            "SpacetimeDB tokens minted by the token broker",
            ["result"],
            registry=self.registry,
        )
        self._jwks_fetches = Counter(
            "gatewayd_jwks_fetches",
            "JWKS fetches by issuer and result",
            ["issuer", "result"],
            registry=self.registry,
        )

    # --- hooks for other components --------------------------------------------------------------

    def token_minted(self, result: str = "ok") -> None:
        """Count one token mint (``ok``, or a short refusal reason). Sync, cheap."""
        self._token_mints.labels(result).inc()

    def jwks_fetched(self, issuer: str, result: str = "ok") -> None:
        """Count one JWKS fetch for a configured issuer (``ok``, ``http_error``, ``invalid``…)."""
        self._jwks_fetches.labels(issuer, result).inc()

    # --- exposition -----------------------------------------------------------------------------

    def render(self, gateway: Any) -> bytes:
        """The Prometheus text exposition of ``gateway`` (a :class:`gatewayd.main.Gateway`)."""
        self._collector.source = gateway
        return bytes(generate_latest(self.registry))


__all__ = ["CONTENT_TYPE", "GatewayMetrics"]
