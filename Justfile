# gatewayd task runner. `just` itself comes from the `test` extra (PyPI rust-just), so
# `.venv/bin/just <recipe>` works right after `pip install -e '.[test]'`.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv + "/bin/python"
bin := venv + "/bin"

default: test

# Create .venv (if missing) and install gatewayd with its test tools.
install:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q --upgrade pip
    {{py}} -m pip install -q -e '.[test]'

# Prepare the npm harnesses: the official SpacetimeDB TypeScript SDK (node-marked tests) and
# playwright-core for Debian's headless Chromium (browser-marked tests, tests/e2e/test_browser.py).
harness:
    bash tests/harness/ts-sdk/setup.sh
    bash tests/harness/browser/setup.sh
    bash tests/harness/better-auth/setup.sh

# Run the whole test suite.
test *ARGS: harness
    {{py}} -m pytest {{ARGS}}

# Lint, format check, strict typing, and the house rules (bounded channels, no print).
check:
    {{bin}}/ruff check gatewayd tests bench
    {{bin}}/ruff format --check gatewayd tests bench
    {{bin}}/mypy
    ! grep -rnE 'open_memory_channel\(\s*(math\.)?inf|max_buffer_size\s*=\s*(math\.)?inf' gatewayd
    ! grep -rnE '^\s*print\(' gatewayd --include=*.py | grep -v 'gatewayd/cli.py'

# Benchmarks (results in bench/README.md).
bench:
    {{py}} bench/decode_rows.py

# SSE fan-out benchmark, gatewayd vs nchan (~2 min; needs nginx + libnginx-mod-nchan; bench/README.md).
bench-fanout *ARGS:
    {{py}} bench/fanout/run.py {{ARGS}}

# Everything embedded on 127.0.0.1: dev peer, gateway, demo page, a writer (Ctrl-C stops it).
demo port="8080":
    {{bin}}/gatewayd demo --port {{port}}

# What CI runs (.ci/run calls this after installing from scratch).
ci: check test
