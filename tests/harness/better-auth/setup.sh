#!/usr/bin/env bash
# Prepare the Better Auth harness (idempotent, cheap when nothing changed, safe to run twice at once):
#   1. check Node.js >= 20 and npm;
#   2. `npm ci --legacy-peer-deps` when node_modules/ is missing or was installed from another
#      package-lock.json (@better-auth/api-key's peer ranges need --legacy-peer-deps; better-sqlite3
#      builds its native module from source with the local Node headers);
#   3. check that better-sqlite3 loads and Better Auth imports.
# node_modules/ and build/ are git-ignored. All output goes to stderr.
set -euo pipefail
exec 1>&2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "better-auth harness: '$tool' is not on PATH; Node.js >= 20 with npm is required" >&2
        exit 1
    fi
done
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    echo "better-auth harness: Node.js >= 20 is required, found $(node --version)" >&2
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
    echo "better-auth harness: installing npm packages (npm ci)"
    npm ci --legacy-peer-deps --no-audit --no-fund --loglevel=error
    echo "$want" >"$stamp"
fi
node -e 'const D = require("better-sqlite3"); new D(":memory:").prepare("select 1").get();'
node --input-type=module -e 'await import("better-auth"); await import("@better-auth/api-key");'
