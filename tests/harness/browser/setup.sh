#!/usr/bin/env bash
# Prepare the browser harness (idempotent, cheap when nothing changed, safe to run twice at once):
#   1. check Node.js >= 20, npm and Debian's Chromium (/usr/bin/chromium, or $CHROMIUM);
#   2. `npm ci` when node_modules/ is missing or was installed from a different package-lock.json
#      (playwright-core only; it never downloads a browser of its own).
# node_modules/ and build/ are git-ignored. All output goes to stderr.
set -euo pipefail
exec 1>&2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "browser harness: '$tool' is not on PATH; Node.js >= 20 with npm is required" >&2
        exit 1
    fi
done
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    echo "browser harness: Node.js >= 20 is required, found $(node --version)" >&2
    exit 1
fi
chromium="${CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$chromium" ]]; then
    echo "browser harness: $chromium is missing; install Debian's Chromium: apt-get install -y chromium" >&2
    exit 1
fi

mkdir -p build
exec 9>build/.setup.lock
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

want="$(sha256sum package-lock.json | cut -d' ' -f1)"
stamp="node_modules/.gatewayd-harness-lock.sha256"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$want" ]]; then
    echo "browser harness: installing npm packages (npm ci)"
    # --ignore-scripts: playwright-core has no install script that we need (and must not fetch browsers).
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    echo "$want" >"$stamp"
fi
node -e 'import("playwright-core").then(() => process.exit(0), (e) => { console.error(e); process.exit(1); })'
