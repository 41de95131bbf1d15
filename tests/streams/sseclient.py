"""A raw SSE test client over trio TCP: full control over when (and whether) it reads."""

from __future__ import annotations

import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from gatewayd.proto import sse


@dataclass
class Event:
    event: str
    data: str
    id: str

    @property
    def json(self) -> Any:
        return msgspec.json.decode(self.data)


@dataclass
class SseClient:
    stream: trio.SocketStream
    status: int
    headers: dict[str, str]
    buffer: bytearray = field(default_factory=bytearray)
    last_id: str = ""
    raw: bytearray = field(default_factory=bytearray)

    @classmethod
    async def open(
        cls,
        url: str,
        token: str | None,
        *,
        last_event_id: str | None = None,
        query: str = "",
        rcvbuf: int | None = None,
        path: str = "v1/streams/documents",
    ) -> SseClient:
        u = urllib.parse.urlsplit(url)
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((u.hostname, u.port))
        stream = trio.SocketStream(sock)
        target = "/" + path + (f"?{query}" if query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {u.netloc}", "Accept: text/event-stream"]
        if token:
            lines.append(f"Authorization: Bearer {token}")
        if last_event_id is not None:
            lines.append(f"Last-Event-ID: {last_event_id}")
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                break
            buf += data
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        status_line, *hlines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in hlines)}
        return cls(stream, status, headers, bytearray(rest), raw=bytearray(rest))

    async def body(self) -> bytes:
        """For error responses: read the rest."""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return bytes(self.buffer)
            self.buffer += data

    async def next_event(self) -> Event | None:
        """The next dispatched event (comments skipped), or None at EOF."""
        while True:
            idx = self.buffer.find(b"\n\n")
            if idx >= 0:
                block = bytes(self.buffer[: idx + 2])
                del self.buffer[: idx + 2]
                parsed = sse.parse(block)
                if not parsed:
                    continue  # comment or retry line
                ev = parsed[0]
                if ev["id"]:
                    self.last_id = ev["id"]
                return Event(ev["event"], ev["data"], ev["id"])
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
            self.raw += data

    async def events_until(self, pred: Any, *, limit: int = 100_000) -> list[Event]:
        out: list[Event] = []
        for _ in range(limit):
            ev = await self.next_event()
            if ev is None:
                break
            out.append(ev)
            if pred(ev):
                break
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()
