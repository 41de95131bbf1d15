"""``gatewayd smoke``: an end-to-end check of a running gateway, for CI and deploys.

Steps, each bounded by ``bound_s``; the first that fails ends the run with its reason:

1. *readiness*: ``GET /readyz`` answers 200 with ``"ready": true``;
2. *stream*: ``GET /v1/streams/{stream}`` opens, and its snapshot ends with a cursor;
3. *write*: ``POST /v1/reducers/{reducer}`` with the arguments (``{nonce}`` replaced by a unique
   string) commits;
4. *envelope*: the expected event arrives on the stream, carrying the nonce, with the documented
   envelope: ``event``, ``id``, ``tenant_id``, ``schema_version``, ``payload`` (and ``data.event``
   / ``data.id`` equal to the SSE ``event:`` / ``id:`` lines);
5. *resume*: a second stream opened with ``Last-Event-ID`` = the id just before that event replays
   it (no ``reset``, no snapshot).

The verdict is one line: ``smoke: PASS …`` or ``smoke: FAIL at <step>: <reason>``.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import h11
import httpx
import trio

from gatewayd.proto import sse

ENVELOPE_KEYS: Final = ("event", "id", "tenant_id", "schema_version", "payload")


@dataclass(frozen=True, slots=True, kw_only=True)
class SmokeSettings:
    gateway: str
    token: str
    token_url: str | None = None
    stream: str = "documents"
    reducer: str = "create_document"
    args: Any = None
    expect_event: str = "document.inserted"
    tenant: str | None = None
    bound_s: float = 10.0


@dataclass(slots=True)
class Verdict:
    ok: bool = False
    step: str = ""
    reason: str = ""
    steps: list[str] = field(default_factory=list)  # one line per step passed (stderr)
    summary: str = ""

    def line(self, elapsed_s: float) -> str:
        if self.ok:
            return f"smoke: PASS {self.summary} ({elapsed_s:.2f} s)"
        return f"smoke: FAIL at {self.step}: {self.reason}"


class StepFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    id: str
    data: str


class _SseConnection:
    """A GET over its own connection with h11, read incrementally (no async generators: httpx's
    nested ones cannot be closed deterministically when a stream is abandoned mid-way)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.status = 0

    @classmethod
    async def open(cls, url: str, headers: dict[str, str]) -> _SseConnection:
        u = urllib.parse.urlsplit(url)
        host = u.hostname or "127.0.0.1"
        port = u.port or (443 if u.scheme == "https" else 80)
        if u.scheme == "https":
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(host, port, https_compatible=True)
        else:
            stream = await trio.open_tcp_stream(host, port)
        self = cls(stream)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        hdrs = [("Host", u.netloc), ("Connection", "close"), *headers.items()]
        try:
            await stream.send_all(
                self.conn.send(h11.Request(method="GET", target=target, headers=hdrs)) or b""
            )
            await stream.send_all(self.conn.send(h11.EndOfMessage()) or b"")
            while True:
                ev = await self._event()
                if isinstance(ev, h11.Response):
                    self.status = ev.status_code
                    return self
                if ev is None:
                    raise httpx.RemoteProtocolError("connection closed before a response")
        except BaseException:
            await self.aclose()
            raise

    async def _event(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.conn.receive_data(bytes(data))
                continue
            if isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                return None
            return ev

    async def chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end."""
        while True:
            ev = await self._event()
            if ev is None:
                return None
            if isinstance(ev, h11.Data):
                return bytes(ev.data)

    async def body(self) -> bytes:
        out = b""
        while (part := await self.chunk()) is not None:
            out += part
        return out

    async def aclose(self) -> None:
        with trio.move_on_after(1, shield=True):
            await self.stream.aclose()


class _EventReader:
    """Incremental SSE parsing of a response body (comments and retry lines skipped)."""

    def __init__(self, conn: _SseConnection) -> None:
        self._conn = conn
        self._buf = b""

    async def next(self) -> Event | None:
        while True:
            norm = self._buf.replace(b"\r\n", b"\n")
            idx = norm.find(b"\n\n")
            if idx >= 0:
                block, self._buf = norm[: idx + 2], norm[idx + 2 :]
                parsed = sse.parse(block)
                if parsed:
                    ev = parsed[0]
                    return Event(ev["event"], ev["id"], ev["data"])
                continue
            chunk = await self._conn.chunk()
            if chunk is None:
                return None
            self._buf += chunk


def _fill(value: Any, nonce: str) -> Any:
    if isinstance(value, str):
        return value.replace("{nonce}", nonce)
    if isinstance(value, list):
        return [_fill(v, nonce) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, nonce) for k, v in value.items()}
    return value


def _error_text(resp: httpx.Response) -> str:
    try:
        err = resp.json()["error"]
        cid = err["correlation_id"]
        return f"HTTP {resp.status_code} {err['code']}: {err['message']} (correlation_id {cid})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}: {resp.text[:200]}"


class _Smoke:
    def __init__(self, s: SmokeSettings, client: httpx.AsyncClient, verdict: Verdict) -> None:
        self.s = s
        self.client = client
        self.verdict = verdict
        self.base = s.gateway.rstrip("/") + "/"
        self.token = s.token

    def passed(self, text: str) -> None:
        self.verdict.steps.append(f"ok   {text}")

    async def get_token(self) -> None:
        if self.token or not self.s.token_url:
            return
        with trio.move_on_after(self.s.bound_s):
            r = await self.client.get(self.s.token_url)
            if r.status_code != 200:
                raise StepFailed("token", f"{self.s.token_url}: {_error_text(r)}")
            doc = r.json()
            tok = doc.get("token") if isinstance(doc, dict) else None
            if tok is None and isinstance(doc, dict):
                tok = next((v for v in doc.values() if isinstance(v, str)), None)
            if not isinstance(tok, str) or not tok:
                raise StepFailed("token", f"{self.s.token_url}: no token in the answer")
            self.token = tok
            self.passed(f"token from {self.s.token_url}")
            return
        raise StepFailed("token", f"no answer from {self.s.token_url} within {self.s.bound_s} s")

    async def readiness(self) -> None:
        with trio.move_on_after(self.s.bound_s):
            try:
                r = await self.client.get(self.base + "readyz")
            except httpx.HTTPError as exc:
                raise StepFailed("readiness", f"{self.base}readyz: {type(exc).__name__}: {exc}") from None
            try:
                doc = r.json()
            except ValueError:
                doc = {}
            if r.status_code != 200 or doc.get("ready") is not True:
                why = f"upstream {doc.get('upstream')!r}"
                canary = doc.get("canary")
                if isinstance(canary, dict) and not canary.get("advancing"):
                    age = canary.get("last_progress_age_s")
                    why += f", updates not flowing (canary last progress {age} s ago)"
                if doc.get("last_error"):
                    why += f", last error: {doc['last_error']}"
                raise StepFailed("readiness", f"/readyz answered {r.status_code}: not ready ({why})")
            self.passed("readiness: /readyz 200")
            return
        raise StepFailed("readiness", f"/readyz did not answer within {self.s.bound_s} s")

    @asynccontextmanager
    async def open_stream(self, last_event_id: str | None = None) -> AsyncIterator[_EventReader]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        query = f"?{urllib.parse.urlencode({'tenant_id': self.s.tenant})}" if self.s.tenant else ""
        url = f"{self.base}v1/streams/{self.s.stream}"
        try:
            conn = await _SseConnection.open(url + query, headers)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise StepFailed("stream", f"GET {url}: {type(exc).__name__}: {exc}") from None
        try:
            if conn.status != 200:
                body = await conn.body()
                resp = httpx.Response(conn.status, content=body)
                raise StepFailed("stream", f"GET {url}: {_error_text(resp)}")
            yield _EventReader(conn)
        finally:
            await conn.aclose()

    async def snapshot(self, reader: _EventReader) -> tuple[str, int]:
        rows = 0
        with trio.move_on_after(self.s.bound_s):
            while True:
                ev = await reader.next()
                if ev is None:
                    raise StepFailed("stream", "the stream ended before its snapshot completed")
                if ev.event != "snapshot":
                    continue
                doc = json.loads(ev.data)
                rows += len(doc.get("rows", []))
                if doc.get("last"):
                    if not ev.id or doc.get("cursor") != ev.id:
                        raise StepFailed("stream", "the last snapshot chunk carries no cursor id")
                    self.passed(f"stream: {self.s.stream} snapshot ({rows} rows) at {ev.id}")
                    return ev.id, rows
        raise StepFailed("stream", f"no complete snapshot within {self.s.bound_s} s")

    async def write(self, nonce: str) -> float:
        url = f"{self.base}v1/reducers/{self.s.reducer}"
        t0 = time.monotonic()
        with trio.move_on_after(self.s.bound_s):
            try:
                r = await self.client.post(
                    url, json=_fill(self.s.args, nonce), headers={"Authorization": f"Bearer {self.token}"}
                )
            except httpx.HTTPError as exc:
                raise StepFailed("write", f"POST {url}: {type(exc).__name__}: {exc}") from None
            if r.status_code != 200 or r.json().get("status") != "committed":
                raise StepFailed("write", f"POST {url}: {_error_text(r)}")
            self.passed(f"write: {self.s.reducer} committed")
            return t0
        raise StepFailed("write", f"POST {url}: no answer within {self.s.bound_s} s")

    async def envelope(self, reader: _EventReader, nonce: str, start_id: str) -> tuple[Event, str]:
        prev = start_id
        with trio.move_on_after(self.s.bound_s):
            while True:
                ev = await reader.next()
                if ev is None:
                    raise StepFailed("envelope", "the stream ended before the expected event")
                if ev.event in ("reset", "shutdown", "revoked"):
                    raise StepFailed("envelope", f"got a {ev.event} event instead: {ev.data[:200]}")
                if ev.event == self.s.expect_event and nonce in ev.data:
                    check_envelope(ev, self.s.tenant)
                    return ev, prev
                if ev.id:
                    prev = ev.id
        raise StepFailed(
            "envelope",
            f"no {self.s.expect_event} event carrying the write within {self.s.bound_s} s "
            "(the write committed, so upstream updates are not reaching the gateway's streams)",
        )

    async def resume(self, prev: str, want: Event) -> None:
        with trio.move_on_after(self.s.bound_s):
            async with self.open_stream(last_event_id=prev) as reader:
                while True:
                    ev = await reader.next()
                    if ev is None:
                        raise StepFailed("resume", "the resumed stream ended before replaying the event")
                    if ev.event in ("reset", "snapshot"):
                        raise StepFailed("resume", f"resuming from {prev} gave {ev.event}, not a replay")
                    if ev.id == want.id:
                        if ev.data != want.data:
                            raise StepFailed("resume", f"replayed event {ev.id} differs from the live one")
                        self.passed(f"resume: from {prev} replayed {want.id}")
                        return
        raise StepFailed("resume", f"resuming from {prev} did not replay {want.id} within {self.s.bound_s} s")


def check_envelope(ev: Event, tenant: str | None) -> None:
    try:
        doc = json.loads(ev.data)
    except ValueError:
        raise StepFailed("envelope", f"event {ev.id} data is not JSON") from None
    missing = [k for k in ENVELOPE_KEYS if k not in doc]
    if missing:
        raise StepFailed("envelope", f"event {ev.id} lacks {', '.join(missing)}")
    if doc["event"] != ev.event or doc["id"] != ev.id:
        raise StepFailed(
            "envelope", f"data.event/data.id ({doc['event']}, {doc['id']}) differ from the SSE lines"
        )
    if not isinstance(doc["schema_version"], int) or isinstance(doc["schema_version"], bool):
        raise StepFailed("envelope", f"schema_version {doc['schema_version']!r} is not an integer")
    if not isinstance(doc["tenant_id"], str) or (tenant is not None and doc["tenant_id"] != tenant):
        raise StepFailed("envelope", f"tenant_id {doc['tenant_id']!r} is not the stream's tenant")
    if not isinstance(doc["payload"], dict):
        raise StepFailed("envelope", "payload is not an object")


async def run_smoke(settings: SmokeSettings) -> Verdict:
    """Run the smoke test. Never raises for a gateway problem: the verdict says what failed."""
    verdict = Verdict()
    nonce = uuid.uuid4().hex[:12]
    async with httpx.AsyncClient(timeout=httpx.Timeout(settings.bound_s), follow_redirects=False) as client:
        s = _Smoke(settings, client, verdict)
        try:
            await s.get_token()
            await s.readiness()
            async with s.open_stream() as reader:
                cursor, _rows = await s.snapshot(reader)
                t0 = await s.write(nonce)
                ev, prev = await s.envelope(reader, nonce, cursor)
                ms = (time.monotonic() - t0) * 1000
                s.passed(f"envelope: {ev.event} id {ev.id} {ms:.0f} ms after the write")
            await s.resume(prev, ev)
        except StepFailed as exc:
            verdict.step, verdict.reason = exc.step, exc.reason
            return verdict
        except httpx.HTTPError as exc:
            verdict.step = "stream"
            verdict.reason = f"{type(exc).__name__}: {exc}"
            return verdict
    verdict.ok = True
    verdict.summary = (
        f"{settings.gateway}: ready; {settings.stream} stream; {settings.reducer} committed; "
        f"{ev.event} {ev.id} in {ms:.0f} ms; resume replayed it"
    )
    return verdict


def run_smoke_sync(settings: SmokeSettings) -> Verdict:
    return trio.run(run_smoke, settings)
