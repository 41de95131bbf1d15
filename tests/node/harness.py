"""Locate, prepare and run the TypeScript-SDK npm harness (tests/harness/ts-sdk/) from Python.

Node-marked tests must *fail*, not skip, when Node or the harness is unusable: a silently skipped
fidelity check is worse than none. :func:`ensure_ts_sdk_harness` raises :class:`HarnessError`
with a message that says what to install or run; tests turn it into ``pytest.fail``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
TS_SDK_DIR: Final = REPO_ROOT / "tests" / "harness" / "ts-sdk"
SETUP_SCRIPT: Final = TS_SDK_DIR / "setup.sh"
GENERATED_CODEC: Final = TS_SDK_DIR / "build" / "client_api_types.mjs"


class HarnessError(RuntimeError):
    """Node or the npm harness is missing or broken; the message says how to fix it."""


def node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        raise HarnessError(
            "`node` is not on PATH: the node-marked tests need Node.js >= 20 and npm "
            "(see tests/harness/ts-sdk/setup.sh)"
        )
    return node


def ensure_ts_sdk_harness(timeout: float = 300.0) -> str:
    """Run the (idempotent, ~0.2 s when up to date) setup script; return the node executable."""
    node = node_executable()
    bash = shutil.which("bash")
    if bash is None:
        raise HarnessError("`bash` is not on PATH; it runs tests/harness/ts-sdk/setup.sh")
    try:
        proc = subprocess.run(
            [bash, str(SETUP_SCRIPT)],
            cwd=TS_SDK_DIR,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{SETUP_SCRIPT} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0 or not GENERATED_CODEC.is_file():
        raise HarnessError(
            f"{SETUP_SCRIPT} failed (exit {proc.returncode}); it needs the npm registry the first "
            f"time (npm ci).\n--- stderr ---\n{proc.stderr.strip()[-4000:]}"
        )
    return node


def run_node_script(script: Path, stdin: str, *, args: tuple[str, ...] = (), timeout: float = 120.0) -> str:
    """Run a Node script of the harness with ``stdin``; return its stdout or raise HarnessError."""
    node = ensure_ts_sdk_harness()
    try:
        proc = subprocess.run(
            [node, str(script), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(f"node {script.name} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise HarnessError(
            f"node {script.name} exited with {proc.returncode}\n--- stderr ---\n{proc.stderr.strip()[-4000:]}"
        )
    return proc.stdout
