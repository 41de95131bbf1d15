#!/usr/bin/env bash
# Prepare the TypeScript-SDK harness (idempotent, cheap when nothing changed, safe to run twice at once):
#   1. `npm ci` when node_modules/ is missing or was installed from a different package-lock.json;
#   2. generate build/client_api_types.mjs (the SDK's v2 ClientMessage/ServerMessage codec) from the
#      *installed* node_modules/spacetimedb/src/sdk/client_api/types.ts ("Way A" in
#      shared/spacetimedb/TS-SDK-NOTES.md) and smoke-test it.
# node_modules/ and build/ are git-ignored: never commit SDK code or generated files.
# All output goes to stderr, so callers may capture stdout for their own use.
set -euo pipefail
exec 1>&2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "ts-sdk harness: '$tool' is not on PATH; Node.js >= 20 with npm is required" >&2
        exit 1
    fi
done
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    echo "ts-sdk harness: Node.js >= 20 is required, found $(node --version)" >&2
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
    echo "ts-sdk harness: installing npm packages (npm ci)"
    # --ignore-scripts: nothing here needs an install script (esbuild finds its binary in the
    # @esbuild/<platform> optional dependency without running its postinstall check).
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    echo "$want" >"$stamp"
fi

node gen_client_api.mjs
