"""The sans-IO core must not import trio (STYLE.md rule 1)."""

from __future__ import annotations

import subprocess
import sys


def test_proto_does_not_import_trio() -> None:
    code = (
        "import sys, pkgutil, importlib, gatewayd.proto as p\n"
        "for m in pkgutil.iter_modules(p.__path__): importlib.import_module('gatewayd.proto.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('trio', 'trio_websocket', 'httpx'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
