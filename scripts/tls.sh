#!/usr/bin/env bash
# What TLS costs the gateway, plain against TLS, interleaved round by round (plain, tls, plain,
# tls, ...), each server freshly started with `--workers 1` pinned to SERVER_CPU (default 0) and
# loadtest pinned to CLIENT_CPU (default 1), one thread. The certificate is ECDSA P-256 (made here
# with openssl); loadtest connects with --insecure (it still verifies the handshake signatures).
#
#   echo:      closed loop, 1,000 connections x 20 B: server CPU per message (utime+stime over a
#              4 s window in the middle of the measured 6 s, divided by the messages echoed in it).
#   handshake: --mode connect, 10,000 connections as fast as loadtest opens them: server CPU per
#              handshake (over the whole run), and what that makes per second of one core.
#   memory:    the same 10,000 connections held idle: server RSS growth per connection.
#
# Uses the release binaries in target/release (build them first). Loopback only.
#
# usage: scripts/tls.sh [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

rounds=3
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    *) echo "usage: scripts/tls.sh [--rounds N]" >&2; exit 2 ;;
  esac
done
server_cpu=${SERVER_CPU:-0}
client_cpu=${CLIENT_CPU:-1}
bin=target/release
out=target/tls-bench
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"
ticks=$(getconf CLK_TCK)

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$out/key.pem" -out "$out/cert.pem" 2>/dev/null

server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# start KIND: ringgate plain or on TLS; sets url.
start() {
  local tls=()
  [ "$1" = tls ] && tls=(--tls-cert "$out/cert.pem" --tls-key "$out/key.pem")
  start_pinned "$server_cpu" "$out" "$bin/ringgate" --listen 127.0.0.1:0 --workers 1 "${tls[@]}"
  if [ "$1" = tls ]; then
    url="wss://localhost:${server_addr##*:}/echo"
    trust=(--insecure)
  else
    url="ws://$server_addr/echo"
    trust=()
  fi
}

stop() { kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""; }

# echo KIND: prints "msgs_per_sec cpu_ns_per_message".
echo_case() {
  start "$1"
  taskset -c "$client_cpu" "$bin/loadtest" "$url" "${trust[@]}" --conns 1000 --rate 0 --size 20 \
    --warmup 2s --duration 6s --threads 1 --json "$out/echo-$1.json" >"$out/echo-$1.out" 2>&1 &
  local loadtest=$!
  sleep 4
  local c0 c1
  c0=$(cpu_ticks "$server_pid")
  sleep 4
  c1=$(cpu_ticks "$server_pid")
  wait "$loadtest" || { tail -n 20 "$out/echo-$1.out" >&2; exit 1; }
  stop
  python3 - "$out/echo-$1.json" "$((c1 - c0))" "$ticks" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
cpu, ticks = int(sys.argv[2]), int(sys.argv[3])
rate = d["throughput_msgs_per_sec"]
print(round(rate), round(cpu / ticks * 1e9 / (rate * 4)))
PY
}

# connect KIND: prints "connects_per_sec cpu_us_per_handshake rss_bytes_per_connection".
connect_case() {
  start "$1"
  sleep 0.3
  local before held c0 c1
  before=$(rss_kib "$server_pid")
  c0=$(cpu_ticks "$server_pid")
  taskset -c "$client_cpu" "$bin/loadtest" "$url" "${trust[@]}" --mode connect --conns 10000 \
    --connect-rate 100000 --duration 3s --threads 1 --json "$out/connect-$1.json" >"$out/connect-$1.out" 2>&1 &
  local loadtest=$!
  # Wait for the ramp to end (every connection established), then sample the hold.
  for _ in $(seq 300); do
    [ "$(find "/proc/$server_pid/fd" -mindepth 1 | wc -l)" -ge 10000 ] && break
    sleep 0.1
  done
  sleep 1
  held=$(rss_kib "$server_pid")
  c1=$(cpu_ticks "$server_pid")
  wait "$loadtest" || { tail -n 20 "$out/connect-$1.out" >&2; exit 1; }
  stop
  python3 - "$out/connect-$1.json" "$((c1 - c0))" "$ticks" "$before" "$held" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
cpu, ticks, before, held = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
n = d["connections_established"]
print(round(d["connect_rate_per_sec"]), round(cpu / ticks * 1e6 / n, 1), round((held - before) * 1024 / n))
PY
}

printf '%-6s %5s %14s %16s %14s %18s %14s\n' kind round "echo msgs/s" "CPU ns/message" "connects/s" "CPU us/handshake" "B/connection"
for round in $(seq "$rounds"); do
  for kind in plain tls; do
    read -r rate per_msg <<<"$(echo_case "$kind")"
    read -r connects per_hs per_conn <<<"$(connect_case "$kind")"
    printf '%-6s %5s %14s %16s %14s %18s %14s\n' "$kind" "$round" "$rate" "$per_msg" "$connects" "$per_hs" "$per_conn"
  done
done
