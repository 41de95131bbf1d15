"""Fan-out benchmark: gatewayd vs nchan under the same multi-process SSE load client, same run.

    . .venv/bin/activate && python bench/fanout/run.py      # or: just bench-fanout
    python bench/fanout/run.py --servers gatewayd --quick   # a short smoke run

For each server (gatewayd started as its own process by ``gateway_runner.py``; nginx + nchan with
one worker process), on 127.0.0.1, the same load client (``loadclient.py``: worker processes
with raw non-blocking sockets and epoll) runs these phases:

1. warm-up: a few clients, a few events (calibrates nchan's message size to gatewayd's frame).
2. (b) memory: RSS of the server's processes with no client (baseline), then with ``--idle``
   (10,000) connected idle clients; per idle client = (RSS_N - RSS_0) / N.
3. fan-out at 10,000 clients (bonus): ``--events-10k`` events at ``--rate-10k``/s.
4. (a) fan-out latency at ``--clients`` (1,000): the other clients leave; ``--events`` (250)
   events at ``--rate`` events/s. Per event: t0 = the moment the batch reaches
   StreamService.apply (gatewayd) / the publish POST is sent (nchan); latency = the last
   client's receive time - t0 (also: every delivery's latency).
5. (c) throughput at the same clients: the publisher goes as fast as a window allows (at most
   ``--window`` events ahead of the slowest client), for ``--flood-s`` seconds; delivered
   events/s = events received by all clients / time.

All clients of one tenant partition (gatewayd) / one channel (nchan). By default the server is
pinned to CPU 0 and the load client (and this script) to CPU 1, so each side owns a core.
Writes bench/results/fanout.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from loadclient import request_bytes, worker_main  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fanout.json"
TICK = os.sysconf("SC_CLK_TCK")
TARGETS = {"clients": 10_000, "p99_ms_1000": 50.0, "rss_kb_per_idle_client": 20.0}


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except FileNotFoundError:
        return 0.0


def machine_busy_s() -> float:
    """CPU seconds spent busy by the whole machine (all CPUs, softirq and steal included)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def _latencies(t0: dict[int, int], recv_by_seq: dict[int, array[int]]) -> dict[str, Any]:
    """Per event: t0 -> first and last client; and every delivery (ms)."""
    last, first, every = [], [], []
    for seq, ts in t0.items():
        recv = recv_by_seq.get(seq)
        if not recv:
            continue
        last.append((max(recv) - ts) / 1e6)
        first.append((min(recv) - ts) / 1e6)
        every.extend((r - ts) / 1e6 for r in recv)
    return {
        "last": {
            "p50": pct(last, 50),
            "p90": pct(last, 90),
            "p99": pct(last, 99),
            "max": max(last, default=None),
        },
        "first": {"p50": pct(first, 50), "p99": pct(first, 99)},
        "every": {"p50": pct(every, 50), "p99": pct(every, 99)},
        "series": [round(x, 2) for x in last],
        "deliveries": len(every),
    }


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


# --- servers ---------------------------------------------------------------------------------------


class GatewayServer:
    name = "gatewayd"
    path = "/v1/streams/docs"

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.tokens_file = workdir / "tokens.txt"
        cmd = [
            sys.executable,
            str(HERE / "gateway_runner.py"),
            "--tokens",
            str(args.idle + 16),
            "--tokens-file",
            str(self.tokens_file),
            "--inject",
            args.inject,
            "--event-bytes",
            str(args.event_bytes),
            "--gc-gen0",
            args.gc_gen0,
        ]
        if args.pin:
            cmd += ["--cpu", "0"]
        env = dict(os.environ, PYTHONPATH=str(Path(args.gatewayd_src).resolve()))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        ready = self._read()
        self.host, self.port = ready["host"], ready["port"]
        self.tokens = self.tokens_file.read_text().split()
        self.pad = 0
        self.last_gc: dict[str, Any] | None = None

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("gateway runner exited")
        return json.loads(line)

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def cmd(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._send(obj)
        return self._read()

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def requests(self, n: int, offset: int = 0) -> list[bytes]:
        return [request_bytes(self.host, self.port, self.path, t) for t in self.tokens[offset : offset + n]]

    def publish(self, start: int, count: int, rate: float) -> dict[int, int]:
        r = self.cmd({"cmd": "publish", "start": start, "count": count, "rate": rate})
        self.last_gc = r.get("gc_pauses")
        return {int(k): v for k, v in r["t0"].items()}

    def flood_start(self, start: int, allow: int) -> None:
        self.cmd({"cmd": "flood", "start": start, "allow": allow})

    def flood_allow(self, upto: int) -> None:
        self._send({"cmd": "allow", "upto": upto})

    def flood_pump(self) -> None:
        pass  # the runner publishes by itself

    def flood_stop(self, start: int) -> tuple[int, dict[int, int]]:
        r = self.cmd({"cmd": "flood_stop", "start": start})
        self.last_gc = r.get("gc_pauses")
        return r["published"], {}

    def subscribers(self) -> int | None:
        return int(self.cmd({"cmd": "stats"})["streams"]["subscribers"])

    def stats(self) -> dict[str, Any]:
        return self.cmd({"cmd": "stats"})

    def calibrate(self, bytes_per_event: float, target: int) -> None:
        pass

    def stop(self) -> None:
        try:
            self.cmd({"cmd": "quit"})
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


NGINX_CONF = """
load_module {module};
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
master_process on;
events {{ worker_connections {conns}; use epoll; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /pub {{
            nchan_publisher http;
            nchan_channel_id bench;
            nchan_message_buffer_length 1000;
            nchan_message_timeout 60s;
        }}
        location = /sub {{
            nchan_subscriber eventsource;
            nchan_channel_id bench;
            nchan_subscriber_first_message newest;
            nchan_eventsource_ping_interval {heartbeat};
        }}
    }}
}}
"""


class NchanServer:
    name = "nchan"
    path = "/sub"

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        module = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
        if not module.exists():
            raise RuntimeError("nchan is not installed: apt-get install -y nginx libnginx-mod-nchan")
        self.prefix = workdir / "nginx"
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.host, self.port = "127.0.0.1", free_port()
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                module=module,
                prefix=self.prefix,
                port=self.port,
                nofile=hard,
                conns=min(hard - 100, args.idle + 1000),
                heartbeat=int(args.heartbeat_s),
            )
        )
        pin = (lambda: os.sched_setaffinity(0, {0})) if args.pin else None
        self.proc = subprocess.Popen(
            [nginx, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "error.log")],
            preexec_fn=pin,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"nginx did not start: {(self.prefix / 'error.log').read_text()}"
                    ) from None
                time.sleep(0.05)
        # The publisher runs in its own process on the server's CPU, as gatewayd's injector runs
        # inside gatewayd: a publisher sharing the load client's core waits for the scheduler.
        ctx = mp.get_context("fork")
        self.pub, child = ctx.Pipe()
        self.pub_proc = ctx.Process(
            target=nchan_publisher, args=(child, self.host, self.port, {0} if args.pin else None), daemon=True
        )
        self.pub_proc.start()
        child.close()
        self.pad = 100
        self.last_gc = None

    def pids(self) -> list[int]:
        out = [self.proc.pid]
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{tid}/children") as f:
                    out += [int(p) for p in f.read().split()]
        except FileNotFoundError:
            pass
        return out

    def requests(self, n: int, offset: int = 0) -> list[bytes]:
        return [request_bytes(self.host, self.port, self.path, None)] * n

    def publish(self, start: int, count: int, rate: float) -> dict[int, int]:
        self.pub.send(("publish", start, count, rate, self.pad))
        kind, t0 = self.pub.recv()
        assert kind == "published", kind
        return dict(t0)

    def flood_start(self, start: int, allow: int) -> None:
        self.pub.send(("flood", start, allow, self.pad))

    def flood_allow(self, upto: int) -> None:
        self.pub.send(("allow", upto))

    def flood_pump(self) -> None:
        pass  # the publisher process publishes by itself

    def flood_stop(self, start: int) -> tuple[int, dict[int, int]]:
        self.pub.send(("stop",))
        kind, published = self.pub.recv()
        assert kind == "stopped", kind
        return published, {}

    def subscribers(self) -> int | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {}

    def calibrate(self, bytes_per_event: float, target: int) -> None:
        self.pad = max(0, self.pad + round(target - bytes_per_event))

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.pub.send(("quit",))
        self.pub_proc.join(5)
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def nchan_publisher(pipe: Any, host: str, port: int, cpus: set[int] | None) -> None:
    """nchan's publisher process: HTTP POSTs to /pub on one kept-alive connection, paced or
    flooding up to the window the orchestrator allows. t0 is taken right before each POST."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    conn = http.client.HTTPConnection(host, port)

    def post(seq: int, pad: int) -> int:
        # The same envelope shape as gatewayd's data line, padded to the same frame size.
        body = (
            f'{{"event":"doc.updated","id":"{seq}","tenant_id":"acme","schema_version":1,'
            f'"payload":{{"id":1,"tenant_id":"acme","body":"bench#{seq:07d} {"x" * pad}"}}}}'
        ).encode()
        t = time.monotonic_ns()
        conn.request("POST", "/pub", body=body, headers={"Content-Type": "text/plain"})
        r = conn.getresponse()
        r.read()
        if r.status >= 300:
            raise RuntimeError(f"nchan publish answered {r.status}")
        return t

    while True:
        msg = pipe.recv()
        if msg[0] == "publish":
            _, start, count, rate, pad = msg
            t0 = []
            begin = time.monotonic()
            for i in range(count):
                if rate > 0:
                    delay = begin + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                t0.append((start + i, post(start + i, pad)))
            pipe.send(("published", t0))
        elif msg[0] == "flood":
            _, seq, allowed, pad = msg
            start = seq
            while True:
                while pipe.poll(0 if seq <= allowed else 0.05):
                    m = pipe.recv()
                    if m[0] == "allow":
                        allowed = max(allowed, m[1])
                    elif m[0] == "stop":
                        pipe.send(("stopped", seq - start))
                        break
                else:
                    if seq <= allowed:
                        post(seq, pad)
                        seq += 1
                    continue
                break
        elif msg[0] == "quit":
            conn.close()
            return


# --- load client -------------------------------------------------------------------------------------


class Clients:
    def __init__(self, n_workers: int, host: str, port: int, cpus: set[int] | None) -> None:
        ctx = mp.get_context("fork")
        self.pipes = []
        self.procs = []
        for _ in range(n_workers):
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(b, host, port, cpus), daemon=True)
            p.start()
            b.close()
            self.pipes.append(a)
            self.procs.append(p)
        self.open = 0

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def _expect(self, pipe: Any, kind: str, timeout: float = 120) -> Any:
        if not pipe.poll(timeout):
            raise TimeoutError(f"worker did not answer {kind}")
        msg = pipe.recv()
        while msg[0] == "progress":  # stale progress reports
            if not pipe.poll(timeout):
                raise TimeoutError(f"worker did not answer {kind}")
            msg = pipe.recv()
        assert msg[0] == kind, msg
        return msg

    def connect(self, reqs: list[bytes]) -> dict[str, Any]:
        t = time.monotonic()
        k = len(self.pipes)
        for i, p in enumerate(self.pipes):
            p.send(("connect", reqs[i::k]))
        failed: dict[str, int] = {}
        total = 0
        for p in self.pipes:
            _, n_open, f = self._expect(p, "connected", 300)
            total += n_open
            for kk, v in f.items():
                failed[kk] = failed.get(kk, 0) + v
        self.open = total
        return {"open": total, "failed": failed, "seconds": time.monotonic() - t}

    def close(self, n: int) -> int:
        k = len(self.pipes)
        per = [n // k + (1 if i < n % k else 0) for i in range(k)]
        for p, m in zip(self.pipes, per, strict=True):
            p.send(("close", m))
        closed = 0
        total = 0
        for p in self.pipes:
            _, c, o = self._expect(p, "closed")
            closed += c
            total += o
        self.open = total
        return closed

    def reset(self, mode: str) -> int:
        for p in self.pipes:
            p.send(("reset", mode))
        return sum(self._expect(p, "reset")[1] for p in self.pipes)

    def collect(self) -> dict[str, Any]:
        for p in self.pipes:
            p.send(("collect",))
        out: dict[str, Any] = {
            "open": 0,
            "dropped": 0,
            "resets": 0,
            "reads": 0,
            "events": 0,
            "bytes": 0,
            "failed": {},
            "min_count": None,
            "max_count": 0,
            "lat": {},
            "latk": {},
        }
        for p in self.pipes:
            _, r = self._expect(p, "collect")
            for k in ("open", "dropped", "resets", "events", "bytes", "reads"):
                out[k] += r[k]
            out["min_count"] = (
                r["min_count"] if out["min_count"] is None else min(out["min_count"], r["min_count"])
            )
            out["max_count"] = max(out["max_count"], r["max_count"])
            for k, v in r["failed"].items():
                out["failed"][k] = out["failed"].get(k, 0) + v
            for key in ("lat", "latk"):
                for seq, raw in r[key].items():
                    a = array("q")
                    a.frombytes(raw)
                    out[key].setdefault(seq, array("q")).extend(a)
        return out

    def progress(self, interval: float | None) -> None:
        for p in self.pipes:
            p.send(("progress", interval))

    def stop(self) -> None:
        for p in self.pipes:
            with contextlib.suppress(OSError):
                p.send(("stop",))
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()


# --- phases -----------------------------------------------------------------------------------------


class Run:
    def __init__(self, server: Any, clients: Clients, args: argparse.Namespace) -> None:
        self.s = server
        self.c = clients
        self.args = args
        self.seq = 1

    def rss_kb(self) -> int:
        return sum(proc_rss_kb(p) for p in self.s.pids())

    def cpu_s(self) -> float:
        return sum(proc_cpu_s(p) for p in self.s.pids())

    def client_cpu_s(self) -> float:
        return sum(proc_cpu_s(p) for p in self.c.pids()) + proc_cpu_s(os.getpid())

    def others_start(self) -> tuple[float, float, float]:
        return (time.monotonic(), machine_busy_s(), self.cpu_s() + self.client_cpu_s())

    def others_share(self, start: tuple[float, float, float]) -> float:
        """Share of a CPU used by everything else on the machine during a phase (noise)."""
        t, busy, ours = start
        dt = time.monotonic() - t
        return max(0.0, (machine_busy_s() - busy) - (self.cpu_s() + self.client_cpu_s() - ours)) / dt

    def wait_subscribers(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.s.subscribers()
            if got is None:
                time.sleep(2)  # nchan: no counter to ask; give it a moment
                return
            if got == n:
                return
            time.sleep(0.1)
        log(f"  server still reports {self.s.subscribers()} subscribers, expected {n}")

    def latency(self, n_clients: int, count: int, rate: float) -> dict[str, Any]:
        self.c.reset("latency")
        noise = self.others_start()
        cpu0, ccpu0 = self.cpu_s(), self.client_cpu_s()
        start = self.seq
        t0 = self.s.publish(start, count, rate)
        self.seq += count
        # wait for stragglers (at most 5 s)
        time.sleep(min(5.0, max(1.0, 2.0 / max(rate, 0.1))))
        cpu1, ccpu1 = self.cpu_s(), self.client_cpu_s()
        other = self.others_share(noise)
        got = self.c.collect()
        missing = 0
        for seq in t0:
            n = len(got["latk"].get(seq, ()))
            missing += max(0, n_clients - n)
        kernel = _latencies(t0, got["latk"])
        read = _latencies(t0, got["lat"])
        deliveries = read["deliveries"]
        return {
            "clients": n_clients,
            "events": count,
            "rate_per_s": rate,
            # t0 -> the kernel receive timestamp of the last client's socket (the primary figure)
            "last_client_ms": kernel["last"],
            "first_client_ms": kernel["first"],
            "every_delivery_ms": kernel["every"],
            "last_client_series_ms": kernel["series"],
            # t0 -> the load client's read returning (adds the load client's own queueing)
            "last_client_read_ms": read["last"],
            "every_delivery_read_ms": read["every"],
            "deliveries": deliveries,
            "missing_deliveries": missing,
            "dropped_clients": got["dropped"],
            "resets": got["resets"],
            "server_cpu_us_per_delivery": (cpu1 - cpu0) * 1e6 / deliveries if deliveries else None,
            "client_cpu_us_per_delivery": (ccpu1 - ccpu0) * 1e6 / deliveries if deliveries else None,
            "bytes_per_event": got["bytes"] / got["events"] if got["events"] else None,
            "server_gc": self.s.last_gc,
            "other_processes_cpu_share": other,
        }

    def flood(self, n_clients: int, seconds: float, window: int) -> dict[str, Any]:
        self.c.reset("count")
        start = self.seq
        k = len(self.c.pipes)
        mins: list[int] = [start - 1] * k
        totals: list[int] = [0] * k
        self.c.progress(0.002)
        self.s.flood_start(start, start + window - 1)
        t_begin = time.monotonic()
        warm_at, end_at = t_begin + min(1.0, seconds / 4), t_begin + seconds
        warm: tuple[float, int, float, float] | None = None
        allowed = start + window - 1
        while True:
            now = time.monotonic()
            if warm is None and now >= warm_at:
                warm = (now, sum(totals), self.cpu_s(), self.client_cpu_s())
                noise = self.others_start()
            if now >= end_at:
                break
            self.s.flood_pump()
            for p in mp_wait(self.c.pipes, timeout=0.002):
                while p.poll():
                    msg = p.recv()
                    if msg[0] == "progress":
                        i = self.c.pipes.index(p)
                        mins[i], totals[i] = msg[1], msg[2]
            new_allowed = min(mins) + window
            if new_allowed > allowed:
                allowed = new_allowed
                self.s.flood_allow(allowed)
        t_end, total_end, cpu_end, ccpu_end = time.monotonic(), sum(totals), self.cpu_s(), self.client_cpu_s()
        other = self.others_share(noise)
        published, _t0 = self.s.flood_stop(start)
        self.seq = start + published
        # let everything drain, then count
        deadline = time.monotonic() + 10
        while min(mins) < self.seq - 1 and time.monotonic() < deadline:
            for p in mp_wait(self.c.pipes, timeout=0.05):
                while p.poll():
                    msg = p.recv()
                    if msg[0] == "progress":
                        i = self.c.pipes.index(p)
                        mins[i], totals[i] = msg[1], msg[2]
        self.c.progress(None)
        time.sleep(0.1)
        got = self.c.collect()
        assert warm is not None
        dt = t_end - warm[0]
        delivered = total_end - warm[1]
        return {
            "clients": n_clients,
            "window_events": window,
            "seconds": dt,
            "published": published,
            "events_per_s_published": published / (t_end - t_begin),
            "delivered_events_per_s": delivered / dt,
            "all_delivered": got["min_count"] == published and got["max_count"] == published,
            "min_events_per_client": got["min_count"],
            "events_per_client_read": got["events"] / got["reads"] if got["reads"] else None,
            "dropped_clients": got["dropped"],
            "resets": got["resets"],
            "server_cpu_share": (cpu_end - warm[2]) / dt,
            "client_cpu_share": (ccpu_end - warm[3]) / dt,
            "server_cpu_us_per_delivery": (cpu_end - warm[2]) * 1e6 / delivered if delivered else None,
            "server_gc": self.s.last_gc,
            "other_processes_cpu_share": other,
        }

    def all(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"server": self.s.name}
        log(f"{self.s.name}: warm-up")
        self.c.connect(self.s.requests(10, offset=a.idle))
        self.c.reset("count")
        self.s.publish(self.seq, 20, 50)
        self.seq += 20
        time.sleep(0.5)
        w = self.c.collect()
        bpe = w["bytes"] / w["events"] if w["events"] else a.event_bytes
        if self.s.name == "gatewayd":
            a.event_bytes_measured = bpe
        self.s.calibrate(bpe, a.event_bytes_measured)
        self.c.close(10)
        self.wait_subscribers(0)
        time.sleep(1)
        rss0 = self.rss_kb()
        log(f"  baseline RSS {rss0} kB; connecting {a.idle} clients")
        conn = self.c.connect(self.s.requests(a.idle))
        log(f"  {conn['open']} open in {conn['seconds']:.1f} s, failed {conn['failed']}")
        self.wait_subscribers(conn["open"])
        time.sleep(a.settle_s)
        rss1 = self.rss_kb()
        out["idle"] = {
            "clients": conn["open"],
            "connect_seconds": conn["seconds"],
            "connect_failed": conn["failed"],
            "rss_baseline_kb": rss0,
            "rss_kb": rss1,
            "rss_kb_per_client": (rss1 - rss0) / max(1, conn["open"]),
            "server_stats": _slim(self.s.stats()),
        }
        log(f"  (b) RSS {rss1} kB -> {out['idle']['rss_kb_per_client']:.2f} kB per idle client")
        if a.events_10k:
            log(f"  fan-out at {conn['open']} clients: {a.events_10k} events at {a.rate_10k}/s")
            out["latency_10k"] = self.latency(conn["open"], a.events_10k, a.rate_10k)
            log(
                f"    last-client p50 {out['latency_10k']['last_client_ms']['p50']:.1f} ms, "
                f"p99 {out['latency_10k']['last_client_ms']['p99']:.1f} ms"
            )
        self.c.close(conn["open"] - a.clients)
        self.wait_subscribers(a.clients)
        log(f"  (a) fan-out at {a.clients} clients: {a.events} events at {a.rate}/s")
        self.latency(a.clients, 10, a.rate)  # settle after the big close
        out["latency"] = self.latency(a.clients, a.events, a.rate)
        lat = out["latency"]
        log(
            f"    last-client p50 {lat['last_client_ms']['p50']:.1f} ms, "
            f"p99 {lat['last_client_ms']['p99']:.1f} ms, "
            f"missing {lat['missing_deliveries']}, {lat['server_cpu_us_per_delivery']:.1f} us CPU/delivery, "
            f"other processes {lat['other_processes_cpu_share']:.2f} CPU"
        )
        log(f"  (c) flood at {a.clients} clients for {a.flood_s} s")
        out["throughput"] = self.flood(a.clients, a.flood_s, a.window)
        thr = out["throughput"]
        log(
            f"    {thr['delivered_events_per_s']:.0f} delivered events/s, "
            f"server CPU {thr['server_cpu_share']:.2f}, client CPU {thr['client_cpu_share']:.2f}, "
            f"other processes {thr['other_processes_cpu_share']:.2f}, "
            f"all delivered: {thr['all_delivered']}"
        )
        out["server_stats_end"] = _slim(self.s.stats())
        return out


def _slim(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k != "gc_stats"}


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nchan = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan"], capture_output=True, text=True
    )
    ngx = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "nginx": ngx.stderr.strip(),
        "nchan": nchan.stdout.strip(),
    }


def source_info(src: str) -> dict[str, Any]:
    def git(*argv: str) -> str:
        r = subprocess.run(["git", "-C", src, *argv], capture_output=True, text=True)
        return r.stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "gatewayd")
    return {
        "path": str(Path(src).resolve()),
        "commit": git("rev-parse", "HEAD"),
        "gatewayd_dirty": bool(dirty),
    }


def main() -> int:
    p = argparse.ArgumentParser(description="gatewayd vs nchan SSE fan-out benchmark")
    p.add_argument("--servers", default="gatewayd,nchan")
    p.add_argument("--clients", type=int, default=1000, help="clients for (a) latency and (c) throughput")
    p.add_argument("--idle", type=int, default=10000, help="idle clients for (b) memory")
    p.add_argument("--events", type=int, default=250)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--events-10k", type=int, default=40)
    p.add_argument("--rate-10k", type=float, default=4.0)
    p.add_argument("--flood-s", type=float, default=6.0)
    p.add_argument("--window", type=int, default=500)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--event-bytes", type=int, default=200)
    p.add_argument("--heartbeat-s", type=float, default=15.0)
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--inject", choices=["apply", "peer"], default="apply")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument(
        "--gc-gen0", default="default", help='gatewayd\'s GC tuning: "default", "off" or a gen-0 threshold'
    )
    p.add_argument(
        "--gatewayd-src", default=str(ROOT), help="the source tree gatewayd is imported from (A/B runs)"
    )
    p.add_argument("--quick", action="store_true", help="200 idle clients, 50 events: a smoke run")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.idle, a.clients, a.events, a.events_10k, a.flood_s = 400, 200, 50, 10, 3.0
    a.event_bytes_measured = a.event_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpus = {1} if a.pin and (os.cpu_count() or 1) >= 2 else None
    if cpus:
        os.sched_setaffinity(0, cpus)
    t_start = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "SSE fan-out: gatewayd vs nchan, same load client, same run",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("out", "no_write")},
        "gatewayd_source": source_info(a.gatewayd_src),
        "targets": TARGETS,
        "servers": {},
    }
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        for name in a.servers.split(","):
            server: Any = GatewayServer(a, Path(tmp)) if name == "gatewayd" else NchanServer(a, Path(tmp))
            clients = Clients(a.workers, server.host, server.port, cpus)
            try:
                results["servers"][name] = Run(server, clients, a).all()
            finally:
                clients.stop()
                server.stop()
    results["settings"]["event_bytes_measured"] = a.event_bytes_measured
    g, n = results["servers"].get("gatewayd"), results["servers"].get("nchan")
    if g and n:
        results["ratios_gatewayd_over_nchan"] = {
            "p50_last_client_ms": g["latency"]["last_client_ms"]["p50"]
            / n["latency"]["last_client_ms"]["p50"],
            "p99_last_client_ms": g["latency"]["last_client_ms"]["p99"]
            / n["latency"]["last_client_ms"]["p99"],
            "rss_kb_per_idle_client": g["idle"]["rss_kb_per_client"] / n["idle"]["rss_kb_per_client"],
            "delivered_events_per_s": g["throughput"]["delivered_events_per_s"]
            / n["throughput"]["delivered_events_per_s"],
            "server_cpu_us_per_delivery_latency_phase": g["latency"]["server_cpu_us_per_delivery"]
            / n["latency"]["server_cpu_us_per_delivery"],
        }
    if g:
        results["targets_met"] = {
            "clients": g["idle"]["clients"] >= TARGETS["clients"],
            "p99_ms_1000": g["latency"]["last_client_ms"]["p99"] <= TARGETS["p99_ms_1000"],
            "rss_kb_per_idle_client": g["idle"]["rss_kb_per_client"] <= TARGETS["rss_kb_per_idle_client"],
        }
    results["wall_seconds"] = time.monotonic() - t_start
    text = json.dumps(results, indent=2, default=str)
    if not a.no_write:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(summary(results))
    return 0


def summary(r: dict[str, Any]) -> str:
    rows = [
        "| | "
        + " | ".join(r["servers"])
        + (" | gatewayd/nchan |" if "ratios_gatewayd_over_nchan" in r else " |"),
        "|---|" + "---:|" * (len(r["servers"]) + (1 if "ratios_gatewayd_over_nchan" in r else 0)),
    ]
    ratios = r.get("ratios_gatewayd_over_nchan", {})

    def row(label: str, get: Any, ratio_key: str | None, fmt: str = "{:.1f}") -> None:
        vals = []
        for s in r["servers"].values():
            try:
                v = get(s)
                vals.append(fmt.format(v) if v is not None else "-")
            except (KeyError, TypeError):
                vals.append("-")
        line = f"| {label} | " + " | ".join(vals) + " |"
        if ratios:
            line += f" {ratios[ratio_key]:.2f} |" if ratio_key else " |"
        rows.append(line)

    row("(a) last client p50 ms", lambda s: s["latency"]["last_client_ms"]["p50"], "p50_last_client_ms")
    row("(a) last client p99 ms", lambda s: s["latency"]["last_client_ms"]["p99"], "p99_last_client_ms")
    row("(a) every delivery p99 ms", lambda s: s["latency"]["every_delivery_ms"]["p99"], None)
    row("(a) last client p99 ms, at read()", lambda s: s["latency"]["last_client_read_ms"]["p99"], None)
    row(
        "(a) server CPU us/delivery",
        lambda s: s["latency"]["server_cpu_us_per_delivery"],
        "server_cpu_us_per_delivery_latency_phase",
    )
    row("(a) missing deliveries", lambda s: s["latency"]["missing_deliveries"], None, "{}")
    row("(b) idle clients held", lambda s: s["idle"]["clients"], None, "{}")
    row(
        "(b) RSS kB per idle client",
        lambda s: s["idle"]["rss_kb_per_client"],
        "rss_kb_per_idle_client",
        "{:.2f}",
    )
    row("10k: last client p99 ms", lambda s: s["latency_10k"]["last_client_ms"]["p99"], None)
    row(
        "(c) delivered events/s",
        lambda s: s["throughput"]["delivered_events_per_s"],
        "delivered_events_per_s",
        "{:,.0f}",
    )
    row("(c) server CPU share", lambda s: s["throughput"]["server_cpu_share"], None, "{:.2f}")
    row("(c) client CPU share", lambda s: s["throughput"]["client_cpu_share"], None, "{:.2f}")
    row("other processes' CPU share (a)", lambda s: s["latency"]["other_processes_cpu_share"], None, "{:.2f}")
    row(
        "other processes' CPU share (c)",
        lambda s: s["throughput"]["other_processes_cpu_share"],
        None,
        "{:.2f}",
    )
    return "\n".join(rows) + f"\n\nwall time {r['wall_seconds']:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
