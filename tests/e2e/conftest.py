"""Fixtures for the end-to-end tests: one ``gatewayd demo`` subprocess shared by the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.support import DemoProcess, start_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    """``gatewayd demo --port 0``, ready (``/readyz`` 200). Tests that stop it start their own."""
    proc = start_demo(tmp_path_factory.mktemp("demo"))
    yield proc
    proc.stop()
