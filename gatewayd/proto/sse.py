"""Server-Sent Events framing (WHATWG HTML §9.2), sans-IO: pure functions returning bytes.

Frames are built once per event and shared by every client that receives it, so everything here
returns immutable ``bytes``.

Correct for any content: the WHATWG parser splits lines on CRLF, CR *and* LF, so a data value is
split on all three and each piece gets its own ``data:`` line (the client joins them back with LF).
Event names and ids are single-line by construction; ids may not contain U+0000 (a client ignores
such ids), and both are checked. JSON encoded by msgspec never contains a raw line break, so a JSON
payload is always one ``data:`` line.
"""

from __future__ import annotations

import re
from typing import Final

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BAD_FIELD = re.compile(r"[\r\n\x00]")

HEARTBEAT: Final = b": hb\n\n"


def frame(data: str | bytes, *, event: str | None = None, id: str | None = None) -> bytes:
    """One SSE event. ``data`` may span lines; ``event`` and ``id`` must be single-line."""
    parts: list[bytes] = []
    if id is not None:
        if _BAD_FIELD.search(id):
            raise ValueError("an SSE id cannot contain CR, LF or NUL")
        parts.append(b"id: " + id.encode())
    if event is not None:
        if _BAD_FIELD.search(event):
            raise ValueError("an SSE event name cannot contain CR, LF or NUL")
        parts.append(b"event: " + event.encode())
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    if "\r" in text or "\n" in text:
        parts.extend(b"data: " + line.encode() for line in _LINE_BREAK.split(text))
    else:
        parts.append(b"data: " + text.encode())
    return b"\n".join(parts) + b"\n\n"


def json_frame(payload_json: bytes, *, event: str, id: str | None = None) -> bytes:
    """Fast path for one-line JSON (msgspec output): no scanning of the payload."""
    head = b"id: " + id.encode() + b"\nevent: " if id is not None else b"event: "
    return head + event.encode() + b"\ndata: " + payload_json + b"\n\n"


def retry(ms: int) -> bytes:
    """Tell the client how long to wait before reconnecting."""
    return b"retry: " + str(int(ms)).encode() + b"\n\n"


def comment(text: str = "") -> bytes:
    """A comment line: keeps proxies and the browser from timing out; never moves the cursor."""
    return b": " + _LINE_BREAK.sub(" ", text).encode() + b"\n\n"


def parse(stream: bytes) -> list[dict[str, str]]:
    """A reference WHATWG parser (used by tests): returns dispatched events as field dicts.

    Implements the spec's field handling: one optional space after the colon is removed, ``data``
    lines are joined with LF, comments are ignored, an id with NUL is ignored, and an event is
    dispatched at a blank line only if it has data.
    """
    events: list[dict[str, str]] = []
    data: list[str] = []
    event_type = ""
    last_id = ""
    text = stream.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()  # the split leaves an empty tail after the final line break
    for line in lines:
        if line == "":
            if data:
                events.append({"event": event_type or "message", "data": "\n".join(data), "id": last_id})
            data, event_type = [], ""
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\x00" not in value:
            last_id = value
    return events
