#!/usr/bin/env bash
# Idle memory per connection and what a burst leaves behind, for each io backend (and optionally an
# older ringgate), interleaved round by round:
#
#   RSS before -> RSS while 10,000 handshaken WebSocket connections sit idle -> RSS 1 s after they
#   all closed.
#
# Per connection = (held - before) / connections; "left behind" = after - before. ringgate runs
# `--workers 1` pinned to SERVER_CPU (default 0), loadtest `--mode connect` pinned to CLIENT_CPU
# (default 1). Uses the release binaries in target/release (build them first). Loopback only.
#
# --deflate adds a row where every connection agrees permessage-deflate (loadtest --deflate; the
# gateway's default shared mode): it must cost next to nothing per idle connection.
#
# usage: scripts/memory.sh [--rounds N] [--conns N] [--baseline BIN] [--deflate]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

rounds=3
conns=10000
baseline=""
deflate=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --baseline) baseline=$2; shift 2 ;;
    --deflate) deflate=1; shift ;;
    *) echo "usage: scripts/memory.sh [--rounds N] [--conns N] [--baseline BIN] [--deflate]" >&2; exit 2 ;;
  esac
done
server_cpu=${SERVER_CPU:-0}
client_cpu=${CLIENT_CPU:-1}
bin=target/release
out=target/memory
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# run_one NAME LOADTEST_FLAGS COMMAND...: prints "name before held after" in KiB. LOADTEST_FLAGS is
# one word ("-" for none).
run_one() {
  local name=$1 flags=$2; shift 2
  [ "$flags" = "-" ] && flags=
  start_pinned "$server_cpu" "$out" "$@" --listen 127.0.0.1:0 --workers 1
  local addr=$server_addr
  sleep 0.5
  local before held after
  before=$(rss_kib "$server_pid")
  taskset -c "$client_cpu" "$bin/loadtest" "ws://$addr/echo" --mode connect --conns "$conns" \
    --duration 4s --threads 1 --json "$out/$name.json" ${flags:+"$flags"} >"$out/loadtest.out" 2>&1 &
  local loadtest=$!
  # Ramp-up at 5,000 connections/s, then the hold: sample in its middle.
  sleep "$(awk -v c="$conns" 'BEGIN { print c / 5000 + 2 }')"
  held=$(rss_kib "$server_pid")
  wait "$loadtest" || { cat "$out/loadtest.out" >&2; exit 1; }
  sleep 1
  after=$(rss_kib "$server_pid")
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
  echo "$name $before $held $after"
}

printf '%-18s %10s %10s %10s %14s %16s\n' server "before KiB" "held KiB" "after KiB" "B/connection" "left behind KiB"
for round in $(seq "$rounds"); do
  rows=("ringgate-uring - $bin/ringgate --io uring" "ringgate-epoll - $bin/ringgate --io epoll")
  [ "$deflate" = 1 ] && rows+=("uring-deflate --deflate $bin/ringgate --io uring")
  [ -n "$baseline" ] && rows+=("ringgate-baseline - $baseline")
  for row in "${rows[@]}"; do
    # shellcheck disable=SC2086
    read -r name before held after <<<"$(run_one $row)"
    printf '%-18s %10s %10s %10s %14s %16s\n' "$name" "$before" "$held" "$after" \
      "$(( (held - before) * 1024 / conns ))" "$(( after - before ))"
  done
  echo "(round $round)"
done
