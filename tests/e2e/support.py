"""Helpers for the end-to-end tests: ``gatewayd demo`` as a subprocess, and an SSE client.

The demo runs exactly as a user starts it (the venv's ``gatewayd`` script, ``--port 0``); the tests
read its ``url:`` and ``token:`` lines and talk to it over loopback only.

SSE is parsed by ``httpx-sse`` (an independent WHATWG implementation), while a tee in the HTTP
transport keeps every byte received, so each test can cross-check the very same bytes with
gatewayd's reference parser (:func:`gatewayd.proto.sse.parse`).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
from httpx_sse import EventSource, ServerSentEvent, connect_sse

from gatewayd.proto import sse

# The venv's console script, next to the interpreter running the tests.
GATEWAYD: Final = Path(sys.executable).with_name("gatewayd")
START_TIMEOUT_S: Final = 20.0
WAIT_S: Final = 10.0  # real-time guard for anything a test waits on
SEEDED_ACME_TITLES: Final = frozenset({"Welcome to Acme", "Quarterly plan"})
SEEDED_GLOBEX_TITLES: Final = frozenset({"Globex handbook"})


@dataclass
class DemoProcess:
    """A running ``gatewayd demo --port 0``; stopped by pid (SIGINT, then SIGKILL)."""

    proc: subprocess.Popen[str]
    stderr_path: Path
    lines: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.lines["url"]

    @property
    def token(self) -> str:
        return self.lines["token"]

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT, wait; SIGKILL if it does not exit. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def tokens(self) -> dict[str, str]:
        """The demo page's sign-in tokens (alice and bob: acme; carol: globex)."""
        r = httpx.get(self.url + "demo/token", timeout=WAIT_S)
        r.raise_for_status()
        doc = r.json()
        assert isinstance(doc, dict)
        return {str(k): str(v) for k, v in doc.items()}


def start_demo(tmp: Path) -> DemoProcess:
    """Start the demo, parse its stdout, and wait until /readyz answers 200."""
    if not GATEWAYD.is_file():
        pytest.fail(f"{GATEWAYD} is missing: install gatewayd into the venv (pip install -e '.[test]')")
    stderr_path = tmp / "gatewayd-demo.stderr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            [str(GATEWAYD), "demo", "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        )
    demo = DemoProcess(proc, stderr_path)
    try:
        _read_banner(demo)
        _wait_ready(demo)
    except BaseException:
        demo.stop()
        raise
    return demo


def _read_banner(demo: DemoProcess) -> None:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert demo.proc.stdout is not None
        try:
            for line in demo.proc.stdout:
                lines.put(line)
        except ValueError:  # closed by stop()
            pass
        lines.put(None)

    threading.Thread(target=pump, name="demo-stdout", daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    wanted = ("url", "token", "peer", "try")
    while not all(k in demo.lines for k in wanted):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(
                f"gatewayd demo printed {sorted(demo.lines)} within {START_TIMEOUT_S:.0f} s, "
                f"expected {list(wanted)}\n--- stderr ---\n{demo.stderr()[-3000:]}"
            )
        if line is None:
            pytest.fail(
                f"gatewayd demo exited ({demo.proc.wait(5)}) before printing {list(wanted)}\n"
                f"--- stderr ---\n{demo.stderr()[-3000:]}"
            )
        key, sep, value = line.rstrip("\n").partition(": ")
        if sep and key in wanted:
            demo.lines[key] = value


def _wait_ready(demo: DemoProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(demo.url + "readyz", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.05)
    pytest.fail(f"gatewayd demo not ready within {START_TIMEOUT_S:.0f} s: {last}\n{demo.stderr()[-3000:]}")


# --- the API ---------------------------------------------------------------------------------------


def call_reducer(demo: DemoProcess, name: str, args: Mapping[str, Any], token: str | None = None) -> Any:
    r = httpx.post(
        f"{demo.url}v1/reducers/{name}",
        json=dict(args),
        headers={"Authorization": f"Bearer {token or demo.token}"},
        timeout=WAIT_S,
    )
    assert r.status_code == 200, f"{name}: {r.status_code} {r.text}"
    doc = r.json()
    assert doc["status"] == "committed", doc
    return doc


# --- SSE -------------------------------------------------------------------------------------------


class _TeeStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, sink: bytearray) -> None:
        self._inner = inner
        self._sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._sink += chunk
            yield chunk

    def close(self) -> None:
        self._inner.close()


class TeeTransport(httpx.BaseTransport):
    """An HTTP transport that records the raw bytes of each response body."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.raw = bytearray()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self._inner.handle_request(request)
        assert isinstance(resp.stream, httpx.SyncByteStream)
        self.raw = bytearray()
        return httpx.Response(
            status_code=resp.status_code,
            headers=resp.headers,
            stream=_TeeStream(resp.stream, self.raw),
            extensions=resp.extensions,
        )

    def close(self) -> None:
        self._inner.close()


class StreamEnded(AssertionError):
    pass


class SSEStream:
    """One open SSE response, read event by event with httpx-sse."""

    def __init__(self, source: EventSource, transport: TeeTransport) -> None:
        self.source = source
        self.response = source.response
        self._transport = transport
        self._events = source.iter_sse()
        self.received: list[ServerSentEvent] = []  # everything httpx-sse yielded, retry-only included
        self.ended = False

    @property
    def raw(self) -> bytes:
        return bytes(self._transport.raw)

    def next(self) -> ServerSentEvent:
        try:
            ev = next(self._events)
        except StopIteration:
            self.ended = True
            raise StreamEnded(f"the stream ended; received so far: {self.summary()}") from None
        self.received.append(ev)
        return ev

    def next_data(self) -> ServerSentEvent:
        """The next event a WHATWG client dispatches (httpx-sse also yields data-less blocks)."""
        while True:
            ev = self.next()
            if ev.data:
                return ev

    def until(
        self, pred: Callable[[ServerSentEvent], bool], *, what: str, timeout: float = WAIT_S
    ) -> list[ServerSentEvent]:
        """Read data events until ``pred`` holds for one; returns those read, the match last."""
        deadline = time.monotonic() + timeout
        got: list[ServerSentEvent] = []
        while True:
            ev = self.next_data()
            got.append(ev)
            if pred(ev):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; received: {self.summary()}")

    def read_snapshot(self) -> tuple[list[dict[str, Any]], str, list[ServerSentEvent]]:
        """Read the snapshot chunks: (rows, cursor, the chunk events)."""
        chunks = self.until(lambda e: e.event == "snapshot" and json.loads(e.data)["last"], what="snapshot")
        assert all(e.event == "snapshot" for e in chunks), [e.event for e in chunks]
        rows: list[dict[str, Any]] = []
        for i, e in enumerate(chunks):
            doc = json.loads(e.data)
            assert doc["chunk"] == i
            rows += [r["row"] for r in doc["rows"]]
        cursor = json.loads(chunks[-1].data)["cursor"]
        assert isinstance(cursor, str)
        return rows, cursor, chunks

    def data_events(self) -> list[ServerSentEvent]:
        return [e for e in self.received if e.data]

    def summary(self) -> str:
        return ", ".join(f"{e.event or 'message'}#{e.id}" for e in self.received[-30:]) or "nothing"

    def drain_to_end(self, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.next()
            except StreamEnded:
                return
        raise AssertionError(f"the stream did not end within {timeout} s")

    def cross_check(self) -> None:
        """httpx-sse and gatewayd.proto.sse.parse must read the same bytes identically."""
        ours = sse.parse(self.raw)
        theirs = [{"event": e.event or "message", "data": e.data, "id": e.id} for e in self.data_events()]
        # The tee may hold events httpx-sse has not been asked for yet: compare the common prefix.
        assert len(ours) >= len(theirs), (len(ours), len(theirs))
        assert ours[: len(theirs)] == theirs
        if self.ended:
            assert ours == theirs


def tee_client() -> tuple[httpx.Client, TeeTransport]:
    transport = TeeTransport()
    return httpx.Client(transport=transport), transport


@contextmanager
def open_stream(
    demo: DemoProcess,
    name: str = "documents",
    *,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    read_timeout: float = WAIT_S,
    client: tuple[httpx.Client, TeeTransport] | None = None,
) -> Iterator[SSEStream]:
    """Open ``GET /v1/streams/{name}`` on a fresh connection (the gateway's native stream path),
    or through ``client`` (from :func:`tee_client`), whose kept-alive connection may already be
    owned by the HTTP API (the ASGI fallback path)."""
    own = client is None
    c, transport = client or tee_client()
    h = {"Authorization": f"Bearer {token or demo.token}", **(headers or {})}
    try:
        with connect_sse(
            c,
            "GET",
            f"{demo.url}v1/streams/{name}",
            headers=h,
            params=dict(params or {}),
            timeout=httpx.Timeout(WAIT_S, read=read_timeout),
        ) as source:
            assert source.response.status_code == 200, (
                source.response.status_code,
                source.response.read()[:500],
            )
            yield SSEStream(source, transport)
    finally:
        if own:
            c.close()


def envelope(ev: ServerSentEvent) -> dict[str, Any]:
    doc = json.loads(ev.data)
    assert isinstance(doc, dict)
    return doc
