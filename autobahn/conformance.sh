#!/usr/bin/env bash
# conformance.sh BINARY [OUTDIR]: runs the full Autobahn TestSuite (517 cases) against BINARY's /echo
# and fails on any FAILED or NON-STRICT case, on a partial report, or on any drift from
# autobahn/expected.json. Installs the suite first (seconds when already installed).
# With RINGGATE_AUTOBAHN_VIA_PROXY=1, a second BINARY runs in front of the first with a proxy route
# (/ab -> ws://first/echo) and the suite runs through it: the results must be the same as direct.
# RINGGATE_AUTOBAHN_CASES / RINGGATE_AUTOBAHN_EXCLUDE (JSON arrays, as run.sh takes them) run a
# selection, judged against the matching part of expected.json. RINGGATE_AUTOBAHN_SHARDS=N runs N
# wstest processes side by side on case groups dealt round-robin, and merges their reports.
# With RINGGATE_AUTOBAHN_TLS=1 the server listens on TLS (a self-signed ECDSA P-256 certificate for
# 127.0.0.1, made here with openssl) and wstest connects to wss://: the results must be the same.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

binary=${1:?usage: conformance.sh BINARY [OUTDIR]}
out=${2:-$here/../target/autobahn}
mkdir -p "$out.server"
"$here/install.sh" >/dev/null

scheme=ws
tls_flags=()
if [ "${RINGGATE_AUTOBAHN_TLS:-0}" = 1 ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$out.server/key.pem" -out "$out.server/cert.pem" 2>/dev/null
  tls_flags=(--tls-cert "$out.server/cert.pem" --tls-key "$out.server/key.pem")
  scheme=wss
fi

# Autobahn's 9.* cases send messages of up to 16 MiB.
"$binary" --listen 127.0.0.1:0 --max-message-size 16MiB "${tls_flags[@]}" >"$out.server/stdout" 2>"$out.server/stderr" &
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

url="$scheme://$addr/echo"
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

cases=${RINGGATE_AUTOBAHN_CASES:-'["*"]'}
exclude=${RINGGATE_AUTOBAHN_EXCLUDE:-'[]'}
shards=${RINGGATE_AUTOBAHN_SHARDS:-1}
if [ "$shards" -le 1 ]; then
  "$here/run.sh" "$url" "$out" "$cases" "$exclude"
else
  # wstest runs one case at a time and is the bottleneck (one core at 100%, the server near idle):
  # the compression cases (12.*, 13.*) take ~10 minutes in one process. Deal the case groups out
  # to SHARDS processes, run them side by side, and merge their reports into OUTDIR.
  mkdir -p "$out"
  find "$out" -mindepth 1 -maxdepth 1 ! -name 'shard-*' -exec rm -rf {} +
  pids=()
  for k in $(seq 0 $((shards - 1))); do
    shard_cases=$(python3 "$here/shard.py" "$cases" "$shards" "$k")
    "$here/run.sh" "$url" "$out/shard-$k" "$shard_cases" "$exclude" >"$out.shard-$k.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}" || { failed=1; tail -n 20 "$out.shard-$k.log" >&2; }
  done
  [ "$failed" = 0 ] || { echo "conformance.sh: a wstest shard failed" >&2; exit 1; }
  python3 "$here/shard.py" --merge "$out" "$shards"
fi
if ! kill -0 "$server" 2>/dev/null; then
  cat "$out.server/stderr" >&2
  echo "conformance.sh: ringgate died during the run" >&2
  exit 1
fi
selection=()
if [ "$cases" != '["*"]' ] || [ "$exclude" != '[]' ]; then
  selection=(--planned-only)
fi
python3 "$here/check.py" "$out" "${selection[@]}"
