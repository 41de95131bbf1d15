"""The demo page in a real headless Chromium (Debian's), driven by Playwright (playwright-core).

The browser's own EventSource is the SSE client here: the page signs in through GET /demo/token,
puts the token in the ``gatewayd_token`` cookie, renders the snapshot and applies live events.
Changes come both from the test, through the API, and from the page's own controls.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.browser import Browser, BrowserHarnessError, ensure_harness
from tests.e2e.support import SEEDED_ACME_TITLES, SEEDED_GLOBEX_TITLES, DemoProcess, call_reducer

pytestmark = [pytest.mark.browser, pytest.mark.node]

# Titles in the rendered table (second column), or null while the given titles are not all there.
TITLES_SHOWN = """(want) => {
  const titles = [...document.querySelectorAll('#docs tr')].map((tr) => tr.children[1].textContent);
  return want.every((t) => titles.includes(t)) ? titles : null;
}"""
TITLE_GONE = """(title) => {
  const titles = [...document.querySelectorAll('#docs tr')].map((tr) => tr.children[1].textContent);
  return !titles.includes(title);
}"""
# The row the page holds for a title (its state, straight from the parsed SSE data).
DOC_WITH_TITLE = "(title) => [...docs.values()].find((d) => d.title === title) || null"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    try:
        node = ensure_harness()
    except BrowserHarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    with Browser(node, tmp_path / "browser.log") as b:
        info = b.call("launch")
        assert info["version"], info
        yield b
        assert b.problems() == [], b.log()[-4000:]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_demo_page_shows_snapshot_and_live_changes(
    demo: DemoProcess, browser: Browser, tmp_path: Path
) -> None:
    assert browser.call("goto", url=demo.url)["status"] == 200
    titles = browser.wait_for(TITLES_SHOWN, sorted(SEEDED_ACME_TITLES))
    assert not set(titles) & SEEDED_GLOBEX_TITLES, titles
    assert browser.wait_for("() => document.getElementById('status').textContent === 'live'")
    assert browser.evaluate("() => document.getElementById('tenant').textContent") == "tenant: acme"

    # A change made through the API, by the test.
    api_title = f"from the API {uuid.uuid4().hex[:8]}"
    call_reducer(demo, "create_document", {"title": api_title, "body": "made by the test"})
    browser.wait_for(TITLES_SHOWN, [api_title])
    row = browser.evaluate(DOC_WITH_TITLE, api_title)
    assert row["body"] == "made by the test"
    assert row["tenant_id"] == "acme"

    # Chromium's own WHATWG parser keeps line breaks, field look-alikes and emoji intact.
    tricky = f"crlf\r\nlf\ncr\r data: x\n\nid: 1 👩\u200d👩\u200d👧 {uuid.uuid4().hex[:8]}"
    tricky_body = "event: reset\r\n\r\n: not a comment\u2028🙂"
    call_reducer(demo, "create_document", {"title": tricky, "body": tricky_body})
    got = browser.wait_for(DOC_WITH_TITLE, tricky)
    assert got["title"] == tricky
    assert got["body"] == tricky_body

    # The page's own "Create document" form.
    page_title = f"from the page {uuid.uuid4().hex[:8]}"
    browser.call("fill", selector="#title", value=page_title)
    browser.call("fill", selector="#body", value="typed into the form")
    browser.call("click", selector="#create button[type=submit]")
    browser.wait_for(TITLES_SHOWN, [page_title])
    assert browser.evaluate(DOC_WITH_TITLE, page_title)["body"] == "typed into the form"
    assert browser.evaluate("() => document.getElementById('formerror').textContent") == ""

    # Edit (the page asks with prompt(): title, then body) and Delete on that row.
    row_sel = f'#docs tr:has(td:text-is("{page_title}"))'
    edited = f"{page_title} (edited)"
    browser.call("dialog_answers", answers=[edited, "edited in the page"])
    browser.call("click", selector=f'{row_sel} button:text-is("Edit")')
    browser.wait_for(TITLES_SHOWN, [edited])
    assert browser.evaluate(DOC_WITH_TITLE, edited)["body"] == "edited in the page"
    browser.call("click", selector=f'#docs tr:has(td:text-is("{edited}")) button:text-is("Delete")')
    assert browser.wait_for(TITLE_GONE, edited)
    assert browser.evaluate(DOC_WITH_TITLE, edited) is None

    # Signing in as carol (tenant globex) reconnects with her cookie: only globex's documents.
    browser.call("select", selector="#user", value="carol")
    titles = browser.wait_for(TITLES_SHOWN, sorted(SEEDED_GLOBEX_TITLES))
    assert not set(titles) & (SEEDED_ACME_TITLES | {api_title, tricky}), titles
    assert browser.wait_for("() => document.getElementById('tenant').textContent === 'tenant: globex'")

    shot = tmp_path / "demo.png"
    assert browser.call("screenshot", path=str(shot))["path"] == str(shot)
    assert shot.stat().st_size > 1000
    width, height = _png_size(shot)
    assert width >= 800
    assert height > 200


def test_page_keeps_its_rows_on_an_eviction_reset(demo: DemoProcess, browser: Browser) -> None:
    """A client cut for falling behind gets a last ``reset`` and the connection closes; its
    EventSource then resumes with Last-Event-ID, which may replay the missed events without a
    snapshot. So the page must keep its rows on ``reset`` and replace them only when a snapshot
    begins (chunk 0), or it would end up showing just the replayed rows."""
    assert browser.call("goto", url=demo.url)["status"] == 200
    browser.wait_for(TITLES_SHOWN, sorted(SEEDED_ACME_TITLES))
    before = browser.evaluate("() => docs.size")
    assert before >= len(SEEDED_ACME_TITLES)
    # What the gateway writes to an evicted client (hub.Subscriber.evict), delivered to the page's
    # own EventSource object.
    browser.evaluate(
        """() => source.dispatchEvent(new MessageEvent("reset",
             {data: JSON.stringify({event: "reset", reason: "buffer_overflow"})}))"""
    )
    assert browser.evaluate("() => docs.size") == before
    page_log = browser.evaluate("() => document.getElementById('log').textContent")
    assert "reset: buffer_overflow" in page_log
    # A new document still renders together with the old ones.
    title = f"after reset {uuid.uuid4().hex[:8]}"
    call_reducer(demo, "create_document", {"title": title, "body": ""})
    browser.wait_for(TITLES_SHOWN, [*sorted(SEEDED_ACME_TITLES), title])
