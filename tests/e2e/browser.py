"""Drive Debian's headless Chromium from Python through tests/harness/browser/driver.mjs.

The driver is a JSON-lines remote control around playwright-core (see its header). Browser tests
must *fail*, not skip, when Node, the npm harness or Chromium is missing: :func:`ensure_harness`
raises :class:`BrowserHarnessError` with what to install, and the tests turn it into a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
HARNESS_DIR: Final = REPO_ROOT / "tests" / "harness" / "browser"
SETUP_SCRIPT: Final = HARNESS_DIR / "setup.sh"
DRIVER: Final = HARNESS_DIR / "driver.mjs"
CHROMIUM: Final = os.environ.get("CHROMIUM", "/usr/bin/chromium")


class BrowserHarnessError(RuntimeError):
    """Node, the npm harness or Chromium is unusable; the message says how to fix it."""


def ensure_harness(timeout: float = 300.0) -> str:
    """Run the idempotent setup script (npm ci on first use); return the node executable."""
    node = shutil.which("node")
    if node is None:
        raise BrowserHarnessError("`node` is not on PATH: browser tests need Node.js >= 20 and npm")
    if not Path(CHROMIUM).is_file():
        raise BrowserHarnessError(
            f"{CHROMIUM} is missing: browser tests need Debian's Chromium (apt-get install -y chromium; "
            ".ci/run installs it)"
        )
    bash = shutil.which("bash")
    if bash is None:
        raise BrowserHarnessError("`bash` is not on PATH; it runs tests/harness/browser/setup.sh")
    try:
        proc = subprocess.run(
            [bash, str(SETUP_SCRIPT)], cwd=HARNESS_DIR, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise BrowserHarnessError(f"{SETUP_SCRIPT} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise BrowserHarnessError(
            f"{SETUP_SCRIPT} failed (exit {proc.returncode}); it needs the npm registry the first "
            f"time (npm ci).\n--- stderr ---\n{proc.stderr.strip()[-4000:]}"
        )
    return node


class Browser:
    """One headless Chromium page behind the driver process; use as a context manager."""

    def __init__(self, node: str, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [node, str(DRIVER)],
            cwd=HARNESS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "CHROMIUM": CHROMIUM},
        )
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._next_id = 0
        threading.Thread(target=self._pump, name="browser-driver", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._replies.put(line)
        except ValueError:
            pass
        self._replies.put(None)

    def log(self) -> str:
        """What the driver reported on stderr: browser console, page errors, failed requests."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def problems(self) -> list[str]:
        """Page errors, console errors and HTTP error responses the page has seen so far."""
        out = []
        for line in self.log().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            kind = doc.get("kind")
            if kind in ("pageerror", "http_error") or (kind == "console" and doc.get("type") == "error"):
                out.append(line)
        return out

    def call(self, op: str, timeout: float = 30.0, **args: Any) -> Any:
        self._next_id += 1
        rid = self._next_id
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"id": rid, "op": op, **args}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise AssertionError(f"the browser driver has exited\n{self.log()[-4000:]}") from None
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"browser op {op} took longer than {timeout} s\n{self.log()[-4000:]}"
            ) from None
        if line is None:
            raise AssertionError(f"the browser driver exited during {op}\n{self.log()[-4000:]}")
        reply = json.loads(line)
        assert reply["id"] == rid, reply
        if not reply["ok"]:
            raise AssertionError(
                f"browser op {op} failed: {reply['error']}\n--- log ---\n{self.log()[-4000:]}"
            )
        return reply["value"]

    def wait_for(self, expression: str, arg: Any = None, *, timeout_ms: int = 10000) -> Any:
        """Poll a JavaScript function of one argument in the page until it returns a truthy value."""
        return self.call(
            "wait_for_function",
            timeout=timeout_ms / 1000 + 10,
            expression=expression,
            arg=arg,
            timeout_ms=timeout_ms,
        )

    def evaluate(self, expression: str, arg: Any = None) -> Any:
        return self.call("evaluate", expression=expression, arg=arg)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError):
                self.call("close", timeout=15)
            with contextlib.suppress(OSError):
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
