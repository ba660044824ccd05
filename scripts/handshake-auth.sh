#!/usr/bin/env bash
# What JWT on connect costs in handshakes per second: 10,000 connections opened and held
# (`loadtest --mode connect`) against the gateway without tokens, with an HS256 token and with an
# ES256 token (in the `token` query parameter), interleaved round by round. ringgate `--workers 1`
# pinned to SERVER_CPU (default 0), loadtest one thread on CLIENT_CPU (default 1). Reports the
# connect rate loadtest achieved, handshake latency p50/p99, and the server's CPU per handshake
# (utime+stime over the whole run divided by the connections). Uses the release binaries and
# `cargo run --release --example mint_token`. Loopback only.
#
# usage: scripts/handshake-auth.sh [--rounds N] [--conns N]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

rounds=3
conns=10000
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    *) sed -n '10p' "$0" >&2; exit 2 ;;
  esac
done
server_cpu=${SERVER_CPU:-0}
client_cpu=${CLIENT_CPU:-1}
bin=target/release
out=target/handshake-auth
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"
ticks=$(getconf CLK_TCK)

secret="$out/secret"
printf '%s\n' "an HS256 secret for the handshake benchmark, longer than 32 bytes" >"$secret"
keys=tests/data/jwt
cargo build --release --example mint_token -q
hs256=$(target/release/examples/mint_token HS256 "$secret" 3600)
es256=$(target/release/examples/mint_token ES256 "$keys/es256-private.pem" 3600)

server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# run_one NAME TOKEN: prints "name connect_rate p50_us p99_us cpu_us_per_handshake".
run_one() {
  local name=$1 token=$2 query=""
  [ -n "$token" ] && query="?token=$token"
  start_pinned "$server_cpu" "$out" "$bin/ringgate" --listen 127.0.0.1:0 --workers 1 \
    --jwt-secret-file "$secret" --jwt-public-key "$keys/es256-public.pem" --echo-auth "$([ -n "$token" ] && echo required || echo off)"
  local c0 c1
  c0=$(awk '{ print $14 + $15 }' "/proc/$server_pid/stat")
  taskset -c "$client_cpu" "$bin/loadtest" "ws://$server_addr/echo$query" --mode connect --conns "$conns" \
    --connect-rate 100000 --duration 1s --threads 1 --json "$out/$name.json" >"$out/$name.out" 2>&1 \
    || { tail -n 20 "$out/$name.out" >&2; exit 1; }
  c1=$(awk '{ print $14 + $15 }' "/proc/$server_pid/stat")
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
  python3 - "$out/$name.json" "$name" "$((c1 - c0))" "$ticks" "$conns" <<'PY'
import json, sys
path, name, cpu, ticks, conns = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
d = json.load(open(path))
h = d["handshake_latency_us"]
print(name, round(d["connect_rate_per_sec"]), h["p50"], h["p99"], round(cpu / ticks * 1e6 / conns, 1))
PY
}

printf '%-8s %5s %14s %12s %12s %22s\n' token round "connects/s" "p50 us" "p99 us" "server CPU us/handshake"
for round in $(seq "$rounds"); do
  for row in "none -" "hs256 $hs256" "es256 $es256"; do
    read -r name token <<<"$row"
    [ "$token" = "-" ] && token=""
    read -r name rate p50 p99 cpu <<<"$(run_one "$name" "$token")"
    printf '%-8s %5s %14s %12s %12s %22s\n' "$name" "$round" "$rate" "$p50" "$p99" "$cpu"
  done
done
