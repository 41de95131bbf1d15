# Shared steps of the npm harnesses' setup.sh scripts (sourced, not run).
#
#   harness_prepare NAME [npm ci flags...]
#
# In the current folder: checks Node.js >= 20 and npm, takes a lock on build/.setup.lock (two
# setups at once are safe), and runs `npm ci FLAGS` only when node_modules/ is missing or was
# installed from a different package-lock.json. All output goes to stderr.

harness_prepare() {
    local name="$1"
    shift
    local tool
    for tool in node npm; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "$name harness: '$tool' is not on PATH; Node.js >= 20 with npm is required" >&2
            exit 1
        fi
    done
    if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
        echo "$name harness: Node.js >= 20 is required, found $(node --version)" >&2
        exit 1
    fi
    mkdir -p build
    exec 9>build/.setup.lock
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi
    local want stamp
    want="$(sha256sum package-lock.json | cut -d' ' -f1)"
    stamp="node_modules/.gatewayd-harness-lock.sha256"
    if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$want" ]]; then
        echo "$name harness: installing npm packages (npm ci)"
        npm ci "$@" --no-audit --no-fund --loglevel=error
        echo "$want" >"$stamp"
    fi
}
