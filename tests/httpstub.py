"""A tiny HTTP/1.1 server on 127.0.0.1:0 for tests: JWKS hosts, fake session endpoints.

Routes map a path to a function ``(request) -> (status, headers, body)``; every request is logged.
One request per connection (``Connection: close``), which is all httpx needs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio


@dataclass
class StubRequest:
    method: str
    target: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


Reply = tuple[int, dict[str, str], bytes]
Route = Callable[[StubRequest], Reply]


def json_reply(doc: Any, status: int = 200) -> Reply:
    return status, {"Content-Type": "application/json"}, json.dumps(doc).encode()


@dataclass
class HttpStub:
    routes: dict[str, Route] = field(default_factory=dict)
    log: list[StubRequest] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hits(self, path: str) -> int:
        return sum(1 for r in self.log if r.path == path)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    req = StubRequest(
                        event.method.decode(),
                        event.target.decode(),
                        {k.decode().lower(): v.decode() for k, v in event.headers},
                    )
                    self.log.append(req)
                    route = self.routes.get(req.path)
                    status, headers, body = route(req) if route else (404, {}, b"not found")
                    hs = [(k, v) for k, v in headers.items()]
                    hs += [("Content-Length", str(len(body))), ("Connection", "close")]
                    await stream.send_all(conn.send(h11.Response(status_code=status, headers=hs)) or b"")
                    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return
        finally:
            await stream.aclose()


@asynccontextmanager
async def open_stub(routes: dict[str, Route] | None = None) -> AsyncIterator[HttpStub]:
    stub = HttpStub(dict(routes or {}))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, stub._handle, 0, host="127.0.0.1"))
        stub.port = listeners[0].socket.getsockname()[1]
        try:
            yield stub
        finally:
            nursery.cancel_scope.cancel()
