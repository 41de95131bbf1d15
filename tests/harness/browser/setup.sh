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

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$chromium" ]]; then
    echo "browser harness: $chromium is missing; install Debian's Chromium: apt-get install -y chromium" >&2
    exit 1
fi

# --ignore-scripts: playwright-core needs no install script (and must never fetch a browser).
# shellcheck source=../npm-harness.sh
source "$here/../npm-harness.sh"
harness_prepare browser --ignore-scripts
node -e 'import("playwright-core").then(() => process.exit(0), (e) => { console.error(e); process.exit(1); })'
