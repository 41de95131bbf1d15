"""A dev stack as its own process, for the shutdown test under load (tests/ops/test_shutdown.py).

Prints ``url: …`` and ``token: …``, delays every delegated document write by ``DELAY_S`` (so
calls are in flight when the signal arrives), and exits 0 after a clean shutdown.
"""

from __future__ import annotations

import sys

import trio

from gatewayd.demo import open_dev_stack
from gatewayd.main import run_command, setup_logging
from gatewayd.services.supervisor import UpstreamState

GRACE_S = 3.0
DELAY_S = 0.8


def main() -> int:
    setup_logging("INFO")

    async def body(shutdown: trio.Event) -> None:
        async with open_dev_stack(shutdown=shutdown, shutdown_grace_s=GRACE_S) as st:
            with trio.fail_after(10):
                while st.gateway.supervisor.state is not UpstreamState.LIVE:
                    await st.gateway.supervisor.wait_state_change()
            st.peer.delay_reducer("create_document_as", DELAY_S)
            print(f"url: {st.url}", flush=True)
            print(f"token: {st.issuer.mint('alice')}", flush=True)
            await shutdown.wait()

    failure = run_command(body)
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
