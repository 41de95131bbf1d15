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

# --ignore-scripts: nothing here needs an install script (esbuild finds its binary in the
# @esbuild/<platform> optional dependency without running its postinstall check).
# shellcheck source=../npm-harness.sh
source "$here/../npm-harness.sh"
harness_prepare ts-sdk --ignore-scripts

node gen_client_api.mjs
