"""The gateway under test for the fan-out benchmark, as its own process.

It runs, in one trio loop: the dev peer serving a one-table module (``doc``: id, tenant_id, body),
a local ES256 issuer, and a gateway built by ``gatewayd.main.build_gateway`` and served by
``serve_gateway`` (the production code path: native SSE front, hub, projector, event log), with
one stream ``docs`` partitioned by ``tenant_id``. The gateway's upstream session is live against
the peer.

Events are injected in one of two ways (``--inject``):

* ``apply`` (default): a :class:`ChangeBatch` with one ``updated`` row is handed to
  ``StreamService.apply``, exactly as the supervisor does when a TransactionUpdate arrives. Its
  timestamp is taken right before the call.
* ``peer``: the row is updated in the peer's database; the TransactionUpdate travels over the
  peer's WebSocket to the gateway's upstream session, is decoded, and reaches
  ``StreamService.apply``; the timestamp is taken when it arrives there (a wrapper around the
  supervisor's sink). This includes the upstream decode in the gateway's CPU budget.

Either way t0 is "the upstream TransactionUpdate arriving at gatewayd" = the moment the batch
reaches ``StreamService.apply``. Times are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by all
processes on the machine), so the load client's receive times can be subtracted directly.

Control: one JSON object per line on stdin, one JSON answer per line on stdout (the orchestrator,
``run.py``, drives it): ``publish`` (paced), ``flood``/``allow``/``flood_stop`` (windowed),
``stats`` (RSS, hub and event-log counters, GC pauses timed through ``gc.callbacks``), ``quit``;
for diagnosis, ``census`` (GC-tracked objects by type), ``trace`` (a tracemalloc diff; start the
runner with PYTHONTRACEMALLOC=1) and ``collect``. Logging goes to stderr at WARNING.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import trio

from gatewayd.config import parse_config
from gatewayd.demo import DEMO_AUDIENCE, DEMO_ISSUER, DEMO_KID, SERVICE_ISSUER, SERVICE_SUBJECT, DemoIssuer
from gatewayd.main import Gateway, build_gateway, serve_gateway
from gatewayd.proto.cache import RowChange
from gatewayd.proto.projection import encode_envelope
from gatewayd.proto.sats import STRING, U64
from gatewayd.proto.sse import json_frame
from gatewayd.services.supervisor import ChangeBatch, UpstreamState, static_token

TENANT = "acme"
STREAM = "docs"
DOC_ID = 1
MARK = "bench#"


def bench_module() -> Any:
    from gatewayd.peer import Module, ReducerContext

    mod = Module("bench")
    mod.table("doc", {"id": U64, "tenant_id": STRING, "body": STRING}, primary_key="id")

    @mod.init
    def init(ctx: ReducerContext) -> None:
        ctx.db.doc.insert({"id": DOC_ID, "tenant_id": TENANT, "body": "initial"})
        ctx.db.doc.insert({"id": 2, "tenant_id": "other", "body": "initial"})

    return mod


def gateway_config(peer_url: str, jwks: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "upstream": {"url": peer_url, "database": "bench", "backoff_initial_s": 0.2, "backoff_max_s": 2.0},
        "http": {"host": "127.0.0.1", "port": args.port},
        "sse": {"heartbeat_s": args.heartbeat_s, "retry_ms": 1000, "retry_jitter_ms": 2000},
        "auth": {
            "issuers": [
                {
                    "issuer": DEMO_ISSUER,
                    "jwks_file": str(jwks),
                    "audience": DEMO_AUDIENCE,
                    "algorithms": ["ES256"],
                    "max_lifetime_s": 8 * 3600,
                }
            ]
        },
        "streams": [
            {"name": STREAM, "tables": ["doc"], "tenant_column": "tenant_id", "permission": "docs.read"}
        ],
        "reducers": [],
    }


def mint_tokens(issuer: DemoIssuer, n: int) -> list[str]:
    """One distinct user per client (all of tenant ``acme``): no per-principal cap interferes."""
    now = int(time.time())
    out = []
    for i in range(n):
        claims = {
            "iss": DEMO_ISSUER,
            "sub": f"user:bench-{i}",
            "aud": DEMO_AUDIENCE,
            "iat": now,
            "exp": now + 8 * 3600,
            "jti": f"bench-{i}",
            "tenant_id": TENANT,
            "scope": "docs.read",
        }
        out.append(jwt.encode(claims, issuer.key, algorithm="ES256", headers={"kid": DEMO_KID}))
    return out


def body_for(seq: int, pad: int) -> str:
    return f"{MARK}{seq:07d} " + "x" * pad


def pad_for(event_bytes: int, gateway: Gateway) -> int:
    """Padding that makes one event's SSE frame about ``event_bytes`` long on the wire."""
    log = gateway.streams.log
    _seq, eid = log.next_id((STREAM, TENANT))
    eid = eid.rsplit(".", 1)[0] + ".1000"  # a typical 4-digit seq
    row = {"id": DOC_ID, "tenant_id": TENANT, "body": body_for(0, 0)}
    base = len(json_frame(encode_envelope("doc.updated", eid, TENANT, row), event="doc.updated", id=eid))
    return max(0, event_bytes - base)


class GcPauses:
    """Time every cyclic-GC collection (gc.callbacks), per generation."""

    def __init__(self) -> None:
        self.reset()
        self._t = 0
        gc.callbacks.append(self._cb)

    def reset(self) -> None:
        self.count = [0, 0, 0]
        self.total_ns = [0, 0, 0]
        self.max_ns = [0, 0, 0]

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t = time.perf_counter_ns()
            return
        g = info["generation"]
        d = time.perf_counter_ns() - self._t
        self.count[g] += 1
        self.total_ns[g] += d
        self.max_ns[g] = max(self.max_ns[g], d)

    def report(self) -> dict[str, Any]:
        return {
            "collections": self.count,
            "total_ms": [round(t / 1e6, 2) for t in self.total_ns],
            "max_ms": [round(t / 1e6, 2) for t in self.max_ns],
        }


GC_PAUSES = GcPauses()


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Injector:
    def __init__(self, gateway: Gateway, peer: Any, mode: str, pad: int) -> None:
        self.gateway = gateway
        self.peer = peer
        self.mode = mode
        self.pad = pad
        self.t0: dict[int, int] = {}
        self.arrived = trio.Event()
        self.expect: int | None = None
        self.allowed = 0
        self.allow_changed = trio.Event()
        self.flooding = False
        self.next_seq = 0
        self.trace_base: Any = None
        apply = gateway.streams.apply
        if mode == "peer":
            # Stamp each batch when it reaches StreamService.apply (the supervisor's sink).
            def sink(batch: ChangeBatch) -> None:
                t = time.monotonic_ns()
                for ch in batch.changes:
                    body = ch.row.get("body", "") if isinstance(ch.row, dict) else ""
                    if body.startswith(MARK):
                        seq = int(body[len(MARK) : len(MARK) + 7])
                        self.t0[seq] = t
                        if self.expect is not None and seq >= self.expect:
                            self.arrived.set()
                apply(batch)

            gateway.supervisor._sink = sink  # the supervisor calls this for every batch

    def inject(self, seq: int) -> None:
        row = {"id": DOC_ID, "tenant_id": TENANT, "body": body_for(seq, self.pad)}
        if self.mode == "apply":
            old = {"id": DOC_ID, "tenant_id": TENANT, "body": "old"}
            batch = ChangeBatch([RowChange("doc", "updated", row, old, DOC_ID)], "transaction")
            t = time.monotonic_ns()
            self.gateway.streams.apply(batch)
            self.t0[seq] = t
        else:
            self.peer.db.transact(lambda db: db.doc.update(row))

    async def paced(self, start: int, count: int, rate: float) -> dict[str, Any]:
        self.t0 = {}
        GC_PAUSES.reset()
        begin = trio.current_time()
        for i in range(count):
            if rate > 0:
                await trio.sleep_until(begin + i / rate)
            else:
                await trio.lowlevel.checkpoint()
            self.inject(start + i)
        await self._wait_arrivals(start + count - 1)
        return {"t0": {str(k): v for k, v in self.t0.items()}, "gc_pauses": GC_PAUSES.report()}

    async def _wait_arrivals(self, last: int) -> None:
        if self.mode == "peer":
            with trio.move_on_after(10):
                while last not in self.t0:
                    self.expect = last
                    self.arrived = trio.Event()
                    await self.arrived.wait()
            self.expect = None

    async def flood(self, start: int) -> None:
        """Publish as fast as allowed: up to ``self.allowed`` (moved by ``allow`` commands)."""
        self.t0 = {}
        GC_PAUSES.reset()
        self.next_seq = start
        self.flooding = True
        while self.flooding:
            if self.next_seq > self.allowed:
                self.allow_changed = trio.Event()
                await self.allow_changed.wait()
                continue
            self.inject(self.next_seq)
            self.next_seq += 1
            await trio.lowlevel.checkpoint()


async def control(gateway: Gateway, injector: Injector, nursery: trio.Nursery, shutdown: trio.Event) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buf = b""

    def reply(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        data = await stdin.receive_some(65536)
        if not data:
            shutdown.set()
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            cmd = msg["cmd"]
            if cmd == "publish":
                reply(await injector.paced(msg["start"], msg["count"], msg["rate"]))
            elif cmd == "flood":
                injector.allowed = msg["allow"]
                nursery.start_soon(injector.flood, msg["start"])
                reply({"ok": True})
            elif cmd == "allow":
                injector.allowed = msg["upto"]
                injector.allow_changed.set()  # no reply: sent often
            elif cmd == "flood_stop":
                injector.flooding = False
                injector.allow_changed.set()
                await trio.sleep(0.05)
                reply({"published": injector.next_seq - msg["start"], "gc_pauses": GC_PAUSES.report()})
            elif cmd == "stats":
                ring = gateway.streams.log.partition((STREAM, TENANT)).ring
                frame_bytes = [len(f) for _s, f in list(ring)[-50:]]
                reply(
                    {
                        "rss_kb": rss_kb(),
                        "streams": gateway.streams.statistics(),
                        "gc_counts": gc.get_count(),
                        "gc_stats": gc.get_stats(),
                        "gc_threshold": gc.get_threshold(),
                        "gc_frozen": gc.get_freeze_count(),
                        "gc_pauses": GC_PAUSES.report(),
                        "gc_tracked_objects": len(gc.get_objects()),
                        "frame_bytes": (sum(frame_bytes) / len(frame_bytes)) if frame_bytes else None,
                    }
                )
            elif cmd == "census":
                from collections import Counter

                census: Counter[str] = Counter()
                sizes: Counter[str] = Counter()
                for o in gc.get_objects():
                    name = type(o).__qualname__
                    census[name] += 1
                    sizes[name] += sys.getsizeof(o)
                top = census.most_common(msg.get("top", 40))
                reply({"total": sum(census.values()), "top": top, "sizes": {k: sizes[k] for k, _ in top}})
            elif cmd == "trace":  # diagnosis only: run with PYTHONTRACEMALLOC=1
                import tracemalloc

                snap = tracemalloc.take_snapshot()
                if msg.get("base"):
                    injector.trace_base = snap
                    reply({"ok": True})
                else:
                    stats = snap.compare_to(injector.trace_base, "lineno")
                    top = [
                        (str(st.traceback), st.size_diff, st.count_diff) for st in stats[: msg.get("top", 30)]
                    ]
                    reply({"total": sum(st.size_diff for st in stats), "top": top})
            elif cmd == "collect":
                reply({"collected": gc.collect(), "rss_kb": rss_kb()})
            elif cmd == "quit":
                reply({"ok": True})
                shutdown.set()
                return
            else:
                reply({"error": f"unknown command {cmd}"})


async def main(args: argparse.Namespace) -> None:
    from gatewayd.peer import PeerAuth, open_peer

    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        issuer = DemoIssuer(Path(tmp))
        tokens = mint_tokens(issuer, args.tokens)
        Path(args.tokens_file).write_text("\n".join(tokens) + "\n")  # noqa: ASYNC240 (start-up)
        peer_auth = PeerAuth()
        service_token = peer_auth.mint(SERVICE_SUBJECT, issuer=SERVICE_ISSUER)
        async with open_peer(bench_module(), port=0, auth=peer_auth) as peer:
            config = parse_config(gateway_config(peer.base_url, issuer.jwks_path, args))
            gateway = build_gateway(config, token_source=static_token(service_token))
            shutdown = trio.Event()
            # --gc-gen0: the production default unless told otherwise ("off" = leave the GC alone).
            gc_kw: dict[str, Any] = {}
            if args.gc_gen0 != "default":
                gc_kw["gc_gen0_threshold"] = None if args.gc_gen0 == "off" else int(args.gc_gen0)
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(
                    lambda task_status: serve_gateway(
                        gateway, shutdown=shutdown, shutdown_grace_s=1.0, task_status=task_status, **gc_kw
                    )
                )
                with trio.fail_after(15):
                    while gateway.supervisor.state is not UpstreamState.LIVE:
                        await gateway.supervisor.wait_state_change()
                injector = Injector(gateway, peer, args.inject, pad_for(args.event_bytes, gateway))
                host, port = bound[0]
                sys.stdout.write(
                    json.dumps({"ready": True, "host": host, "port": port, "pid": os.getpid()}) + "\n"
                )
                sys.stdout.flush()
                async with trio.open_nursery() as ctl:
                    ctl.start_soon(control, gateway, injector, ctl, shutdown)
                    await shutdown.wait()
                    ctl.cancel_scope.cancel()
        # leaving open_peer stops the peer


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tokens", type=int, default=10000)
    p.add_argument("--tokens-file", required=True)
    p.add_argument("--inject", choices=["apply", "peer"], default="apply")
    p.add_argument("--event-bytes", type=int, default=200)
    p.add_argument("--heartbeat-s", type=float, default=15.0)
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    p.add_argument(
        "--gc-gen0",
        default="default",
        help='serve_gateway\'s GC tuning: "default", "off" or a gen-0 threshold',
    )
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    trio.run(main, args)


if __name__ == "__main__":
    cli()
