#!/usr/bin/env bash
# Pub/sub fan-out with and without permessage-deflate, interleaved round by round: what compressing
# costs the server per delivery when every subscriber agreed it (shared mode: a message is
# compressed once per worker, and the same frame goes to every subscriber), and what it saves on
# the wire.
#
# Per run: ringgate `--workers 1` pinned to SERVER_CPU (default 0); loadtest `--mode pubsub` with
# one publisher and --subscribers subscribers on one topic, --rate messages/s of --size bytes (its
# filler repeats every 256 bytes: 1 KiB compresses to 0.29), pinned to CLIENT_CPU (default 1), with
# `--deflate` in the "deflate" rows. Server CPU (utime+stime, /proc/PID/stat), deliveries
# (ringgate_pubsub_delivered_total) and bytes written (ringgate_socket_sent_bytes_total) are read
# at two points inside the measured window; per delivery = their deltas divided by the deliveries.
# Uses the release binaries in target/release (build them first). Loopback only. The default 10
# msg/s to 10,000 subscribers (100,000 deliveries/s) is what one loadtest core can inflate and
# verify while keeping up; asking more makes the client the bottleneck, and the server then closes
# its subscribers as slow consumers.
#
# usage: scripts/fanout.sh [--rounds N] [--subscribers N] [--rate R] [--size BYTES] [--duration SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

rounds=3
subscribers=10000
rate=10
size=1024
duration=10
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --subscribers) subscribers=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    *) sed -n '14p' "$0" >&2; exit 2 ;;
  esac
done
server_cpu=${SERVER_CPU:-0}
client_cpu=${CLIENT_CPU:-1}
bin=target/release
out=target/fanout
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"
ticks=$(getconf CLK_TCK)

server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
metric() { curl -s "http://$1/metrics" | awk -v name="$2" '$1 == name || index($1, name "{") == 1 { sum += $2 } END { printf "%d\n", sum }'; }

# run_one NAME LOADTEST_FLAG: prints "name cpu_us_per_delivery bytes_per_delivery deliveries_per_s runs_per_message".
run_one() {
  local name=$1 flag=$2
  start_pinned "$server_cpu" "$out" "$bin/ringgate" --listen 127.0.0.1:0 --workers 1
  local addr=$server_addr
  # shellcheck disable=SC2086
  taskset -c "$client_cpu" "$bin/loadtest" "ws://$addr/pubsub" --mode pubsub --publishers 1 \
    --subscribers "$subscribers" --rate "$rate" --size "$size" --warmup 2s --duration "${duration}s" \
    --threads 1 --json "$out/$name.json" $flag >"$out/$name.out" 2>&1 &
  local loadtest=$!
  # Ramp-up at 5,000 connections/s, the 2 s warmup, then half a second into the window.
  sleep "$(awk -v s="$subscribers" 'BEGIN { print s / 5000 + 2.5 }')"
  local c0 d0 b0 r0 c1 d1 b1 r1 p0 p1
  c0=$(cpu_ticks "$server_pid"); d0=$(metric "$addr" ringgate_pubsub_delivered_total)
  b0=$(metric "$addr" ringgate_socket_sent_bytes_total); r0=$(metric "$addr" ringgate_compression_runs_total)
  p0=$(metric "$addr" ringgate_pubsub_published_total)
  sleep $((duration - 2))
  c1=$(cpu_ticks "$server_pid"); d1=$(metric "$addr" ringgate_pubsub_delivered_total)
  b1=$(metric "$addr" ringgate_socket_sent_bytes_total); r1=$(metric "$addr" ringgate_compression_runs_total)
  p1=$(metric "$addr" ringgate_pubsub_published_total)
  wait "$loadtest" || { tail -n 20 "$out/$name.out" >&2; exit 1; }
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
  awk -v c="$((c1 - c0))" -v d="$((d1 - d0))" -v b="$((b1 - b0))" -v r="$((r1 - r0))" -v p="$((p1 - p0))" \
    -v t="$ticks" -v n="$name" -v s="$((duration - 2))" \
    'BEGIN { printf "%s %.3f %.1f %.0f %.2f\n", n, c / t * 1e6 / d, b / d, d / s, (p > 0 ? r / p : 0) }'
}

printf '%-8s %5s %16s %16s %14s %16s\n' variant round "cpu us/delivery" "bytes/delivery" "deliveries/s" "compressions/msg"
declare -A cpu
for round in $(seq "$rounds"); do
  for row in "plain -" "deflate --deflate"; do
    read -r name flag <<<"$row"
    [ "$flag" = "-" ] && flag=""
    read -r name us bytes rate_out runs <<<"$(run_one "$name" "$flag")"
    printf '%-8s %5s %16s %16s %14s %16s\n' "$name" "$round" "$us" "$bytes" "$rate_out" "$runs"
    cpu[$name.$round]=$us
  done
  awk -v a="${cpu[deflate.$round]}" -v b="${cpu[plain.$round]}" \
    'BEGIN { printf "round %s: deflate/plain server CPU per delivery = %.2f\n", "'"$round"'", a / b }'
done
