#!/usr/bin/env bash
# What loadtest itself costs: two loadtest binaries (say, before and after an engine change) against
# the same release ringgate, interleaved round by round (A B A B ...), each run on a freshly started
# server pinned to one core (`--workers 1`), loadtest pinned to the other with one thread. Per run it
# records loadtest's own CPU per message (`client_cpu.us_per_message` from its JSON: user+sys over
# its whole run divided by echoes), its late sends, msgs/s, p50/p99, and the connect rate; the table
# gives the median of the rounds and the ratio of the second binary to the first.
#
# Cases (issue 12's figures): open10k3 (10,000 connections x 3 msg/s, 32 B: the sparse open loop),
# closed1000x20 (1,000 connections x 20 B, closed loop), connect10k (10,000 connections opened at
# up to 50,000/s and held 2 s: connections established per second).
#
# Loopback only; every server it starts is stopped on exit. Results: target/loadtest-cost/results.md
# (and every run's JSON under target/loadtest-cost/runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

usage() {
  cat <<'EOF'
usage: scripts/loadtest-cost.sh [--rounds N] [--duration SECS] [--cases LIST] [--server BIN]
                                 BASELINE_LOADTEST NEW_LOADTEST

  --rounds N        rounds (default 3); the two binaries alternate within each
  --duration SECS   measured window of the echo cases (default 8)
  --cases LIST      comma-separated subset of: open10k3,closed1000x20,connect10k (default: all)
  --server BIN      the ringgate binary (default target/release/ringgate)

environment: SERVER_CPU (default 0), CLIENT_CPU (default 1)
EOF
}

rounds=3
duration=8
cases_arg="open10k3,closed1000x20,connect10k"
server=target/release/ringgate
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --cases) cases_arg=$2; shift 2 ;;
    --server) server=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -eq 2 ] || { usage >&2; exit 2; }
clients=("$1" "$2")
for bin in "$server" "${clients[@]}"; do
  [ -x "$bin" ] || { echo "loadtest-cost.sh: $bin is not an executable" >&2; exit 2; }
done
server_cpu=${SERVER_CPU:-0}
client_cpu=${CLIENT_CPU:-1}
out=target/loadtest-cost
rm -rf "$out/runs"
mkdir -p "$out/runs"
IFS=, read -r -a cases <<<"$cases_arg"

case_flags() {
  case "$1" in
    open10k3) echo "--conns 10000 --rate 3 --size 32 --duration ${duration}s --threads 1" ;;
    closed1000x20) echo "--conns 1000 --rate 0 --size 20 --duration ${duration}s --threads 1" ;;
    connect10k) echo "--mode connect --conns 10000 --connect-rate 50000 --duration 2s --threads 1" ;;
    *) echo "loadtest-cost.sh: unknown case $1" >&2; exit 2 ;;
  esac
}

case_ramp() {  # seconds of ramp-up at the default 5,000 connections/s
  case "$1" in
    open10k3) echo 2 ;;
    closed1000x20) echo 0.2 ;;
    *) echo 0 ;;
  esac
}

# utime + stime (clock ticks) of loadtest, the child of the `timeout` whose pid is $1.
client_ticks() {
  local child=""
  { read -r child _ <"/proc/$1/task/$1/children"; } 2>/dev/null || true
  [ -n "$child" ] || { echo 0; return; }
  awk '{ print $14 + $15 }' "/proc/$child/stat" 2>/dev/null || echo 0
}

server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

tsv="$out/runs.tsv"
printf 'case\tclient\tround\tjson\twindow_ticks\twindow_secs\n' >"$tsv"
for round in $(seq "$rounds"); do
  for case in "${cases[@]}"; do
    for which in 0 1; do
      dir="$out/runs/$case-c$which-r$round"
      mkdir -p "$dir"
      start_pinned "$server_cpu" "$dir" "$server" --listen 127.0.0.1:0 --workers 1
      addr=$server_addr
      # shellcheck disable=SC2046
      timeout $((duration + 60)) taskset -c "$client_cpu" "${clients[$which]}" "ws://$addr/echo" \
        $(case_flags "$case") --json "$dir/loadtest.json" >"$dir/loadtest.out" 2>"$dir/loadtest.err" &
      runner=$!
      # loadtest's CPU over the measured window (minus its first 0.5 s and last 0.3 s), like the
      # server's in compare.sh: ramp-up, handshakes and closing left out.
      window_ticks=0 window_secs=0
      if [ "$case" != connect10k ]; then
        sleep "$(awk -v r="$(case_ramp "$case")" 'BEGIN { print r + 0.5 }')"
        t0=$EPOCHREALTIME c0=$(client_ticks "$runner")
        sleep "$(awk -v d="$duration" 'BEGIN { print d - 0.8 }')"
        t1=$EPOCHREALTIME c1=$(client_ticks "$runner")
        window_ticks=$((c1 - c0))
        window_secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
      fi
      wait "$runner" || true
      stop_server
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$case" "$which" "$round" "$dir/loadtest.json" "$window_ticks" "$window_secs" >>"$tsv"
      printf '  %-14s %-40s round %s: ' "$case" "${clients[$which]}" "$round"
      python3 - "$dir/loadtest.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"no report ({e})"); sys.exit(0)
print(f"{r['throughput_msgs_per_sec']:.0f} msg/s, client {r['client_cpu']['us_per_message']:.2f} us/msg, "
      f"late {r['late_sends']}/{r['messages_sent']}, p99 {r['latency_us']['p99']} us, "
      f"{r['connections_established']} conns at {r['connect_rate_per_sec']:.0f}/s, errors {r['errors']}")
PY
    done
  done
done

python3 - "$tsv" "${clients[0]}" "${clients[1]}" >"$out/results.md" <<'PY'
import csv, json, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
names = sys.argv[2:4]
def load(path):
    try:
        return json.load(open(path))
    except Exception:
        return None
def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
import os
clk = os.sysconf("SC_CLK_TCK")
out = ["| case | loadtest | client CPU per msg, whole run | client CPU per msg, measured window | late sends | msgs/s | p50 / p99 | connects/s | runs |",
       "|---|---|---|---|---|---|---|---|---|"]
ratios = []
for case in dict.fromkeys(r["case"] for r in rows):
    per = {}
    for which in ("0", "1"):
        mine = [r for r in rows if r["case"] == case and r["client"] == which]
        pairs = [(load(r["json"]), r) for r in mine]
        pairs = [(rep, r) for rep, r in pairs if rep]
        reps = [rep for rep, _ in pairs]
        window = med([int(r["window_ticks"]) / clk / (rep["throughput_msgs_per_sec"] * float(r["window_secs"])) * 1e6
                      if float(r["window_secs"]) > 0 and rep["throughput_msgs_per_sec"] > 0 else None
                      for rep, r in pairs])
        cpu = med([r["client_cpu"]["us_per_message"] or None for r in reps])
        late = med([r["late_sends"] / r["messages_sent"] * 100 if r["messages_sent"] else None for r in reps])
        rate = med([r["throughput_msgs_per_sec"] for r in reps])
        p50 = med([r["latency_us"]["p50"] for r in reps])
        p99 = med([r["latency_us"]["p99"] for r in reps])
        conn = med([r["connect_rate_per_sec"] for r in reps])
        per[which] = (cpu, conn, window)
        fmt = lambda v, f: "-" if v is None else f.format(v)
        out.append(f"| {case} | {names[int(which)]} | {fmt(cpu, '{:.2f} µs')} | {fmt(window, '{:.2f} µs')} | {fmt(late, '{:.3f}%')} | "
                   f"{fmt(rate, '{:.0f}')} | {fmt(p50, '{:.0f}')} / {fmt(p99, '{:.0f}')} µs | {fmt(conn, '{:.0f}')} | {len(reps)} |")
    (a, ca, wa), (b, cb, wb) = per["0"], per["1"]
    if a and b:
        ratios.append(f"- {case}: client CPU per message over the whole run, second / first = {b / a:.2f}x")
    if wa and wb:
        ratios.append(f"- {case}: client CPU per message over the measured window, second / first = {wb / wa:.2f}x")
    if ca and cb and case.startswith("connect"):
        ratios.append(f"- {case}: connections per second, second / first = {cb / ca:.2f}x")
print("\n".join(out + [""] + ratios))
PY
cat "$out/results.md"
