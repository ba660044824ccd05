#!/usr/bin/env bash
# conformance.sh BINARY [OUTDIR]: runs the full Autobahn TestSuite (517 cases) against BINARY's /echo
# and fails on any FAILED or NON-STRICT case, on a partial report, or on any drift from
# autobahn/expected.json. Installs the suite first (seconds when already installed).
# With RINGGATE_AUTOBAHN_VIA_PROXY=1, a second BINARY runs in front of the first with a proxy route
# (/ab -> ws://first/echo) and the suite runs through it: the results must be the same as direct.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

binary=${1:?usage: conformance.sh BINARY [OUTDIR]}
out=${2:-$here/../target/autobahn}
mkdir -p "$out.server"
"$here/install.sh" >/dev/null

# Autobahn's 9.* cases send messages of up to 16 MiB.
"$binary" --listen 127.0.0.1:0 --max-message-size 16MiB >"$out.server/stdout" 2>"$out.server/stderr" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

addr=""
for _ in $(seq 100); do
  addr=$(sed -n 's/^ringgate listening on //p' "$out.server/stdout" | head -n 1)
  [ -n "$addr" ] && break
  if ! kill -0 "$server" 2>/dev/null; then
    cat "$out.server/stderr" >&2
    echo "conformance.sh: ringgate exited at start" >&2
    exit 1
  fi
  sleep 0.1
done
[ -n "$addr" ] || { echo "conformance.sh: ringgate did not start listening" >&2; exit 1; }

url="ws://$addr/echo"
if [ "${RINGGATE_AUTOBAHN_VIA_PROXY:-0}" = 1 ]; then
  "$binary" --listen 127.0.0.1:0 --max-message-size 16MiB --route "/ab=ws://$addr/echo" \
    >"$out.server/proxy-stdout" 2>"$out.server/proxy-stderr" &
  proxy=$!
  trap 'kill "$server" "$proxy" 2>/dev/null || true; wait "$server" "$proxy" 2>/dev/null || true' EXIT
  proxy_addr=""
  for _ in $(seq 100); do
    proxy_addr=$(sed -n 's/^ringgate listening on //p' "$out.server/proxy-stdout" | head -n 1)
    [ -n "$proxy_addr" ] && break
    sleep 0.1
  done
  [ -n "$proxy_addr" ] || { cat "$out.server/proxy-stderr" >&2; echo "conformance.sh: the proxy did not start" >&2; exit 1; }
  url="ws://$proxy_addr/ab"
fi

"$here/run.sh" "$url" "$out"
if ! kill -0 "$server" 2>/dev/null; then
  cat "$out.server/stderr" >&2
  echo "conformance.sh: ringgate died during the run" >&2
  exit 1
fi
python3 "$here/check.py" "$out"
