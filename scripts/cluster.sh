#!/usr/bin/env bash
# Pub/sub across two gateway nodes on Redis against one node with the in-process broker, interleaved
# round by round: deliveries/s, delivery latency p50/p99 (cross-node for the cluster: publisher and
# subscriber on different nodes, so every such delivery went through Redis), and server CPU per
# delivery (issue 16, "Figures").
#
# Per round, each variant freshly started:
#   cluster  redis-server (scripts/install-brokers.sh redis, a free loopback port, no persistence)
#            and two `ringgate --workers W --broker redis://...` nodes; loadtest `--mode pubsub` with
#            both URLs: the publisher on node 0, the subscribers split evenly, so half the
#            deliveries are cross-node.
#   single   one `ringgate --workers W` with the in-process broker, the same loadtest with one URL.
# Load: 1 publisher, --subs subscribers on one topic, --rate messages/s of --size bytes.
# Server CPU is utime+stime (/proc/PID/stat) and deliveries are ringgate_pubsub_delivered_total
# (each node's /metrics), both read at two points inside the measured window; per delivery = the
# CPU delta of every ringgate process of the variant (both nodes together for the cluster) over the
# deliveries delta. Redis's own CPU is a column of its own (not in the server figure), as are what
# loadtest counted lost.
#
# Cores (a 2-core machine where loadtest runs too): every server process (both nodes, and Redis)
# is pinned to SERVER_CPU (default 0) and loadtest to CLIENT_CPU (default 1, one thread). Each
# node runs `--workers 1` (WORKERS): more workers on one core only take turns, and the single
# node gets the same one worker, so the comparison is per delivery at equal parallelism, with the
# cluster paying for its second process and Redis on the same core. On a machine with more cores,
# give each process its own (SERVER_CPU=0 NODE1_CPU=1 REDIS_CPU=2 CLIENT_CPU=3).
#
# 10,000 subscribers need about 10,000 descriptors in loadtest and 5,000 (10,000 single) in a node:
# the soft `ulimit -n` is raised to the hard limit. Uses the release binaries in
# ${CARGO_TARGET_DIR:-target}/release (build them first: cargo build --release -p ringgate -p
# loadtest --bins), or BIN=DIR. Loopback only; everything it starts is stopped on exit.
# NODE_FLAGS: more ringgate flags for every node of both variants (word-split), e.g.
# NODE_FLAGS="--history-size 100" to measure with the history (in Redis for the cluster).
# Results: one table on stdout; every run's JSON and logs under target/cluster/ (OUT=DIR).
#
# usage: scripts/cluster.sh [--rounds N] [--subs N] [--rate R] [--size BYTES] [--duration SECS] [--warmup SECS]
#        (or ROUNDS, SUBS, RATE, SIZE, DURATION, WARMUP in the environment; small: SUBS=200 DURATION=3)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

rounds=${ROUNDS:-3}
subs=${SUBS:-10000}
rate=${RATE:-100}
size=${SIZE:-32}
duration=${DURATION:-10}
warmup=${WARMUP:-2}
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --subs | --subscribers) subs=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    *) sed -n '33,34p' "$0" >&2; exit 2 ;;
  esac
done
[ "$duration" -ge 2 ] || { echo "$(basename "$0"): --duration must be at least 2 (seconds)" >&2; exit 2; }
read -r -a node_flags <<<"${NODE_FLAGS:-}"
server_cpu=${SERVER_CPU:-0}
node1_cpu=${NODE1_CPU:-$server_cpu}
redis_cpu=${REDIS_CPU:-$server_cpu}
client_cpu=${CLIENT_CPU:-1}
workers=${WORKERS:-1}
bin=${BIN:-${CARGO_TARGET_DIR:-target}/release}
out=${OUT:-target/cluster}
for b in ringgate loadtest; do
  [ -x "$bin/$b" ] || { echo "$(basename "$0"): no $bin/$b: cargo build --release -p ringgate -p loadtest --bins (or BIN=DIR)" >&2; exit 1; }
done
redis_server=$(scripts/install-brokers.sh redis | sed -n 's/^REDIS=//p')
[ -x "$redis_server" ] || { echo "$(basename "$0"): scripts/install-brokers.sh found no redis-server" >&2; exit 1; }
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"
ticks=$(getconf CLK_TCK)

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap stop_all EXIT

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
metric() { curl -s "http://$1/metrics" | awk -v name="$2" '$1 == name || index($1, name "{") == 1 { sum += $2 } END { printf "%d\n", sum }'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# sum_over FUNCTION ARGS...: FUNCTION applied to each ARG, summed.
sum_over() { local f=$1 total=0 v; shift; for a in "$@"; do v=$("$f" "$a"); total=$((total + v)); done; echo "$total"; }
delivered() { metric "$1" ringgate_pubsub_delivered_total; }

# start_redis DIR: redis-server on a free loopback port pinned to redis_cpu; sets redis_pid, redis_port.
start_redis() {
  local dir=$1
  redis_port=$(free_port)
  (cd "$dir" && exec taskset -c "$redis_cpu" "$redis_server" --port "$redis_port" --bind 127.0.0.1 \
    --save '' --appendonly no --daemonize no --loglevel warning) >"$dir/redis.log" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  for _ in $(seq 200); do
    [ "$(printf 'PING\r\n' | timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$redis_port; cat >&3; head -c 5 <&3" 2>/dev/null)" = "+PONG" ] && return 0
    kill -0 "$redis_pid" 2>/dev/null || break
    sleep 0.05
  done
  cat "$dir/redis.log" >&2
  echo "$(basename "$0"): redis-server did not answer on port $redis_port" >&2
  exit 1
}

# run_one VARIANT ROUND: prints "variant round deliveries_per_s p50 p99 server_us_per_delivery
# redis_us_per_delivery lost expected schedule".
run_one() {
  # Runs in a command substitution (a subshell of its own): its own trap stops what it started.
  trap stop_all EXIT
  local variant=$1 round=$2 dir="$out/$1-$2"
  rm -rf "$dir"; mkdir -p "$dir/node0" "$dir/node1"
  local nodes=() node_pids=() urls=() broker=()
  redis_pid=""
  if [ "$variant" = cluster ]; then
    start_redis "$dir"
    broker=(--broker "redis://127.0.0.1:$redis_port")
    start_pinned "$server_cpu" "$dir/node0" "$bin/ringgate" --listen 127.0.0.1:0 --workers "$workers" "${broker[@]}" "${node_flags[@]}"
    pids+=("$server_pid"); node_pids+=("$server_pid"); nodes+=("$server_addr")
    start_pinned "$node1_cpu" "$dir/node1" "$bin/ringgate" --listen 127.0.0.1:0 --workers "$workers" "${broker[@]}" "${node_flags[@]}"
    pids+=("$server_pid"); node_pids+=("$server_pid"); nodes+=("$server_addr")
  else
    start_pinned "$server_cpu" "$dir/node0" "$bin/ringgate" --listen 127.0.0.1:0 --workers "$workers" "${node_flags[@]}"
    pids+=("$server_pid"); node_pids+=("$server_pid"); nodes+=("$server_addr")
  fi
  for addr in "${nodes[@]}"; do urls+=("ws://$addr/pubsub"); done
  taskset -c "$client_cpu" "$bin/loadtest" "${urls[@]}" --mode pubsub --publishers 1 --subscribers "$subs" \
    --rate "$rate" --size "$size" --warmup "${warmup}s" --duration "${duration}s" --threads 1 --quiet \
    --allow-errors --json "$dir/loadtest.json" >"$dir/loadtest.out" 2>&1 &
  local loadtest=$!
  # Ramp-up at 5,000 connections/s, the warmup, then half a second into the measured window.
  sleep "$(awk -v s="$subs" -v w="$warmup" 'BEGIN { print (s + 1) / 5000 + w + 0.5 }')"
  local c0 d0 r0 t0 c1 d1 r1 t1
  t0=$(date +%s%N); c0=$(sum_over cpu_ticks "${node_pids[@]}"); d0=$(sum_over delivered "${nodes[@]}")
  r0=$([ -n "$redis_pid" ] && cpu_ticks "$redis_pid" || echo 0)
  sleep "$((duration - 1))"
  t1=$(date +%s%N); c1=$(sum_over cpu_ticks "${node_pids[@]}"); d1=$(sum_over delivered "${nodes[@]}")
  r1=$([ -n "$redis_pid" ] && cpu_ticks "$redis_pid" || echo 0)
  wait "$loadtest" || { echo "$(basename "$0"): loadtest failed ($variant, round $round):" >&2; tail -n 20 "$dir/loadtest.out" >&2; exit 1; }
  stop_all
  python3 - "$dir/loadtest.json" "$variant" "$round" "$((c1 - c0))" "$((d1 - d0))" "$((r1 - r0))" "$ticks" "$((t1 - t0))" <<'PY'
import json, sys
path, variant, rnd, cpu, delivered, redis, ticks, span_ns = sys.argv[1:]
r = json.load(open(path))
cpu, delivered, redis, ticks, span = int(cpu), int(delivered), int(redis), int(ticks), int(span_ns) / 1e9
# The cluster's latency is the cross-node one (through Redis); the single node has only same-node.
lat = r["nodes"]["cross_node"]["latency_us"] if "nodes" in r else r["latency_us"]
per = lambda ticks_used: ticks_used / ticks * 1e6 / delivered if delivered > 0 else float("nan")
print(variant, rnd, round(delivered / span), lat["p50"], lat["p99"], "%.3f" % per(cpu),
      "%.3f" % per(redis) if variant == "cluster" else "-", r["deliveries_lost"], r["deliveries_expected"],
      {True: "kept", False: "BEHIND", None: "-"}[r["client_kept_schedule"]])
PY
}

printf '%-8s %5s %13s %9s %9s %18s %17s %16s %8s\n' variant round deliveries/s "p50 us" "p99 us" \
  "server us/delivery" "redis us/delivery" lost/expected client
echo "(p50/p99: cross-node delivery latency for the cluster, delivery latency for the single node;"
echo " client: whether loadtest kept its schedule: BEHIND means the latency includes its own lateness)"
declare -A cpu
for round in $(seq "$rounds"); do
  # Alternate which variant goes first, so neither always runs on a machine just warmed by the other.
  order=(cluster single)
  [ $((round % 2)) -eq 0 ] && order=(single cluster)
  for variant in "${order[@]}"; do
    line=$(run_one "$variant" "$round")
    read -r name rnd rate_out p50 p99 us redis_us lost expected schedule <<<"$line"
    printf '%-8s %5s %13s %9s %9s %18s %17s %16s %8s\n' "$name" "$rnd" "$rate_out" "$p50" "$p99" "$us" \
      "$redis_us" "$lost/$expected" "$schedule"
    cpu[$name.$round]=$us
  done
  awk -v a="${cpu[cluster.$round]}" -v b="${cpu[single.$round]}" -v r="$round" \
    'BEGIN { printf "round %s: cluster/single server CPU per delivery = %.2f\n", r, a / b }'
done
