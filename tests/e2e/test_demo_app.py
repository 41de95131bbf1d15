"""The demo routes of the HTTP app (``/`` and ``/demo/token``) follow ``Gateway.demo_page``.

``create_app`` runs inside ``serve_gateway``; whoever sets ``demo_page`` (``gatewayd demo``) may do
so before or after that, so the flag must be read per request, not once when the app is built.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from gatewayd.http.app import create_app
from gatewayd.main import Gateway


def _stub_gateway() -> Any:
    return SimpleNamespace(
        config=SimpleNamespace(http=SimpleNamespace(max_body_bytes=1024)),
        demo_page=False,
        demo_login=lambda: {"alice": "token-a"},
    )


async def test_demo_routes_follow_the_flag_at_request_time() -> None:
    gw = _stub_gateway()
    app = create_app(cast("Gateway", gw))
    client = app.test_client()
    r = await client.get("/")
    assert r.status_code == 404
    assert (await r.get_json())["error"]["code"] == "not_found"
    assert (await client.get("/demo/token")).status_code == 404

    gw.demo_page = True  # set after the app was built, as gatewayd demo may do
    r = await client.get("/")
    assert r.status_code == 200
    assert "EventSource" in (await r.get_data(as_text=True))
    r = await client.get("/demo/token")
    assert r.status_code == 200
    assert await r.get_json() == {"alice": "token-a"}

    gw.demo_page = False
    assert (await client.get("/demo/token")).status_code == 404
