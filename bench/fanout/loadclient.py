"""The load client: worker processes, each holding many SSE connections on raw non-blocking sockets.

One worker is one process with one ``epoll`` loop (no framework: the client must cost less per
event than the servers it measures). It is driven by the orchestrator over a
``multiprocessing`` pipe whose fd sits in the same epoll set.

Per connection it sends one ``GET`` (with ``Authorization: Bearer`` when a token is given), checks
for ``200``, then splits the body into SSE frames (a frame ends at a blank line; a partial frame
waits for the rest). Each frame that carries the benchmark marker ``bench#NNNNNNN`` is an event;
its receive time is taken twice: the kernel's receive timestamp of the read that completed it
(``SO_TIMESTAMPNS``: when the bytes reached this client's socket, converted to CLOCK_MONOTONIC),
and ``time.monotonic_ns()`` right after that read returned (which adds the load client's own
queueing: many connections share one core).

Modes (set by ``reset``):

* ``latency``: every (seq, kernel receive time, read time) is kept, per seq.
* ``count``: only per-connection event counts, bytes and the highest seq seen (cheap enough for
  the throughput phase); ``progress`` messages report the lowest "highest seq" over all
  connections, which the orchestrator uses as the flood window.

Commands (tuples over the pipe): ``("connect", [request bytes...])``, ``("close", n)``,
``("reset", mode)``, ``("collect",)``, ``("progress", interval_s or None)``, ``("stop",)``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import select
import socket
import struct
import time
from array import array
from typing import Any

MARK = re.compile(rb"bench#(\d{7})")
# Kernel receive timestamps (CLOCK_REALTIME, ns) on every read: when the bytes reached this
# client's socket, whatever the load client was busy with then (Linux: SO_TIMESTAMPNS_OLD).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TS = struct.Struct("qq")
MAX_CONNECTING = 64

HEAD, BODY, DEAD = 0, 1, 2


def request_bytes(host: str, port: int, path: str, token: str | None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Conn:
    __slots__ = ("buf", "bytes", "count", "last_seq", "req", "sock", "state", "status")

    def __init__(self, sock: socket.socket, req: bytes) -> None:
        self.sock = sock
        self.req = req
        self.state = HEAD
        self.buf = b""
        self.status = 0
        self.count = 0
        self.bytes = 0
        self.last_seq = -1


class Worker:
    def __init__(self, pipe: Any, host: str, port: int) -> None:
        self.pipe = pipe
        self.addr = (host, port)
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.pending: list[bytes] = []  # requests waiting for a connect slot
        self.connecting = 0
        self.open = 0
        self.failed: dict[str, int] = {}
        self.dropped = 0
        self.resets = 0
        self.mode = "count"
        self.lat: dict[int, array] = {}  # seq -> read times (monotonic ns)
        self.latk: dict[int, array] = {}  # seq -> kernel receive times (monotonic ns)
        self.realtime_offset = time.time_ns() - time.monotonic_ns()
        self.reads = 0
        self.progress_every: float | None = None
        self.next_progress = 0.0
        self.connect_reply_due = False
        self.running = True

    # --- connections ------------------------------------------------------------------------------

    def _start_connects(self) -> None:
        while self.pending and self.connecting < MAX_CONNECTING:
            req = self.pending.pop()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            err = s.connect_ex(self.addr)
            if err not in (0, errno.EINPROGRESS):
                self.failed[errno.errorcode.get(err, str(err))] = (
                    self.failed.get(errno.errorcode.get(err, str(err)), 0) + 1
                )
                s.close()
                continue
            c = Conn(s, req)
            self.conns[s.fileno()] = c
            self.connecting += 1
            self.ep.register(s.fileno(), select.EPOLLOUT)

    def _fail(self, c: Conn, why: str) -> None:
        if c.state == HEAD:
            self.connecting -= 1
            self.failed[why] = self.failed.get(why, 0) + 1
        elif c.state == BODY:
            self.open -= 1
            self.dropped += 1
        c.state = DEAD
        fd = c.sock.fileno()
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)
        self.conns.pop(fd, None)
        c.sock.close()

    def _writable(self, c: Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(c, errno.errorcode.get(err, str(err)))
            return
        try:
            c.sock.send(c.req)  # < 2 KB: one send on a fresh socket
        except OSError as exc:
            self._fail(c, type(exc).__name__)
            return
        c.req = b""
        self.ep.modify(c.sock.fileno(), select.EPOLLIN)

    def _readable(self, c: Conn) -> None:
        try:
            data, anc, _flags, _addr = c.sock.recvmsg(262144, 64)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(c, type(exc).__name__)
            return
        now = time.monotonic_ns()
        self.reads += 1
        kernel = now
        for _level, kind, raw in anc:
            if kind == SO_TIMESTAMPNS:
                sec, nsec = TS.unpack_from(raw)
                kernel = sec * 1_000_000_000 + nsec - self.realtime_offset
        if not data:
            self._fail(c, "eof_before_head" if c.state == HEAD else "eof")
            return
        if c.state == HEAD:
            data = c.buf + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                c.buf = data
                return
            status_line = data[: data.find(b"\r\n")]
            parts = status_line.split(b" ")
            c.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            if c.status != 200:
                self._fail(c, f"http_{c.status}")
                return
            c.state = BODY
            c.buf = b""
            self.connecting -= 1
            self.open += 1
            data = data[end + 4 :]
            if not data:
                return
        if c.buf:
            data = c.buf + data
            c.buf = b""
        if not data.endswith(b"\n\n"):
            cut = data.rfind(b"\n\n")
            if cut < 0:
                c.buf = data
                return
            c.buf = data[cut + 2 :]
            data = data[: cut + 2]
        c.bytes += len(data)
        if self.mode == "latency":
            lat, latk = self.lat, self.latk
            for m in MARK.finditer(data):
                seq = int(m.group(1))
                a = lat.get(seq)
                if a is None:
                    a = lat[seq] = array("q")
                    latk[seq] = array("q")
                a.append(now)
                latk[seq].append(kernel)
                c.count += 1
                if seq > c.last_seq:
                    c.last_seq = seq
        else:
            n = data.count(b"bench#")
            if n:
                c.count += n
                i = data.rfind(b"bench#")
                seq = int(data[i + 6 : i + 13])
                if seq > c.last_seq:
                    c.last_seq = seq
        if b"event: reset" in data:
            self.resets += 1

    # --- control ----------------------------------------------------------------------------------

    def _command(self) -> None:
        msg = self.pipe.recv()
        cmd = msg[0]
        if cmd == "connect":
            self.pending.extend(msg[1])
            self.connect_reply_due = True
        elif cmd == "close":
            n = msg[1]
            victims = [c for c in self.conns.values() if c.state == BODY][:n]
            for c in victims:
                fd = c.sock.fileno()
                self.ep.unregister(fd)
                del self.conns[fd]
                c.sock.close()
                self.open -= 1
            self.pipe.send(("closed", len(victims), self.open))
        elif cmd == "reset":
            self.mode = msg[1]
            self.lat = {}
            self.latk = {}
            self.realtime_offset = time.time_ns() - time.monotonic_ns()
            self.resets = 0
            self.dropped = 0
            self.reads = 0
            for c in self.conns.values():
                c.count = 0
                c.bytes = 0
            self.pipe.send(("reset", self.open))
        elif cmd == "collect":
            counts = [c.count for c in self.conns.values() if c.state == BODY]
            self.pipe.send(
                (
                    "collect",
                    {
                        "open": self.open,
                        "failed": dict(self.failed),
                        "dropped": self.dropped,
                        "resets": self.resets,
                        "reads": self.reads,
                        "events": sum(counts),
                        "bytes": sum(c.bytes for c in self.conns.values()),
                        "min_count": min(counts) if counts else 0,
                        "max_count": max(counts) if counts else 0,
                        "lat": {k: v.tobytes() for k, v in self.lat.items()},
                        "latk": {k: v.tobytes() for k, v in self.latk.items()},
                    },
                )
            )
            self.lat = {}
            self.latk = {}
        elif cmd == "progress":
            self.progress_every = msg[1]
            self.next_progress = time.monotonic()
        elif cmd == "stop":
            self.running = False

    def _progress(self) -> None:
        seqs = [c.last_seq for c in self.conns.values() if c.state == BODY]
        total = sum(c.count for c in self.conns.values())
        self.pipe.send(("progress", min(seqs) if seqs else -1, total, time.monotonic_ns()))

    def run(self) -> None:
        pipe_fd = self.pipe.fileno()
        self.ep.register(pipe_fd, select.EPOLLIN)
        conns = self.conns
        while self.running:
            self._start_connects()
            timeout = 0.01 if (self.progress_every or self.pending or self.connect_reply_due) else 0.5
            for fd, ev in self.ep.poll(timeout, 4096):
                if fd == pipe_fd:
                    self._command()
                    continue
                c = conns.get(fd)
                if c is None:
                    continue
                if ev & select.EPOLLOUT and c.req:
                    self._writable(c)
                elif ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._readable(c)
            if self.connect_reply_due and not self.pending and self.connecting == 0:
                self.connect_reply_due = False
                self.pipe.send(("connected", self.open, dict(self.failed)))
            if self.progress_every is not None:
                t = time.monotonic()
                if t >= self.next_progress:
                    self.next_progress = t + self.progress_every
                    self._progress()
        for c in list(conns.values()):
            c.sock.close()


def worker_main(pipe: Any, host: str, port: int, cpus: set[int] | None) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cpus:
        os.sched_setaffinity(0, cpus)
    Worker(pipe, host, port).run()
