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

# --legacy-peer-deps: @better-auth/api-key's peer ranges; better-sqlite3 builds from source.
# shellcheck source=../npm-harness.sh
source "$here/../npm-harness.sh"
harness_prepare better-auth --legacy-peer-deps
node -e 'const D = require("better-sqlite3"); new D(":memory:").prepare("select 1").get();'
node --input-type=module -e 'await import("better-auth"); await import("@better-auth/api-key");'
