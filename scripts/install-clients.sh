#!/usr/bin/env bash
# Install the independent WebSocket clients the tests talk to: Python websockets (in a private
# virtualenv) and Node's ws (in a private node_modules), both outside the repository.
#
# Usage: scripts/install-clients.sh      # prints PYTHON=<interpreter> and NODE_PATH=<node_modules>
#
# Environment:
#   RINGGATE_CLIENTS_HOME  where they live (default: ${XDG_CACHE_HOME:-$HOME/.cache}/ringgate/clients)
#
# Idempotent: a stamp records the pins; when it matches and both import, this takes ~0.2 s. The
# pins are what browsers' peers look like today (both offer permessage-deflate by default).
set -euo pipefail

readonly WEBSOCKETS_PIN=websockets==17.4
readonly WS_PIN=ws@8.23.0

home=${RINGGATE_CLIENTS_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/ringgate/clients}
venv="$home/venv"
node_dir="$home/node"
stamp="$home/.stamp"
want="$WEBSOCKETS_PIN $WS_PIN $(python3 --version 2>&1) $(node --version 2>&1)"

log() { printf 'scripts/install-clients.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v python3 >/dev/null || die "python3 is needed (CPython 3.8+)"
command -v node >/dev/null && command -v npm >/dev/null || die "node and npm are needed"

installed() {
    [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
        && "$venv/bin/python" -c 'import websockets' 2>/dev/null \
        && NODE_PATH="$node_dir/node_modules" node -e 'require("ws")' 2>/dev/null
}

if ! installed; then
    log "installing $WEBSOCKETS_PIN and $WS_PIN under $home"
    rm -rf "$venv" "$node_dir" "$stamp"
    mkdir -p "$home" "$node_dir"
    python3 -m venv "$venv"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install --quiet "$WEBSOCKETS_PIN"
    (cd "$node_dir" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund "$WS_PIN" >/dev/null)
    installed_now=$(NODE_PATH="$node_dir/node_modules" node -e 'console.log(require("ws/package.json").version)')
    log "installed websockets $("$venv/bin/python" -c 'import websockets; print(websockets.__version__)'), ws $installed_now"
    printf '%s' "$want" >"$stamp"
fi
printf 'PYTHON=%s\nNODE_PATH=%s\n' "$venv/bin/python" "$node_dir/node_modules"
