"""Token mints and JWKS fetches show up in /metrics."""

from __future__ import annotations

from tests.auth.conftest import AuthStack


async def test_jwks_fetches_and_token_mints_are_counted(stack: AuthStack) -> None:
    r = await stack.http.post(stack.url + "/v1/token", headers={"Authorization": f"Bearer {stack.jwt()}"})
    assert r.status_code == 200, r.text
    text = (await stack.http.get(stack.url + "/metrics")).text
    fetched = [line for line in text.splitlines() if line.startswith("gatewayd_jwks_fetches_total{")]
    assert any(f'issuer="{stack.kit.issuer}"' in line and 'result="ok"' in line for line in fetched), fetched
    minted = [
        line for line in text.splitlines() if line.startswith('gatewayd_token_mints_total{result="ok"}')
    ]
    assert minted
    assert float(minted[0].split()[-1]) >= 1
