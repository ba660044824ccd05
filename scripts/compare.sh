#!/usr/bin/env bash
# ringgate beside peer Rust WebSocket echo servers, on this machine, in this session, under the same
# `loadtest` commands.
#
# Builds ringgate, loadtest and the peers (benches/peers: fastwebsockets, tokio-tungstenite) in
# release, then for each case runs the servers interleaved round by round (A B C A B C ...), each
# server freshly started and pinned to one core (`taskset -c $SERVER_CPU`), loadtest pinned to
# another (`taskset -c $CLIENT_CPU`, one thread). Per run it records msgs/s and latency p50/p99 (from
# loadtest's JSON), server CPU time per message (utime+stime from /proc/PID/stat over the middle of
# the measured window), and server RSS (VmRSS from /proc/PID/status) before load and mid-run, plus how
# busy each core was with anything else (/proc/stat), so a run on a shared machine shows it. The
# table reports the median of the rounds. Loopback only; every server it starts is stopped on exit.
#
# Fairness: ringgate runs `--workers 1` (one worker per core it is given; its default is one per CPU
# it may run on, which under taskset is also 1). The peers run their default tokio multi-thread
# runtime, which sizes itself from the CPUs the process may run on: one worker thread under taskset.
#
# --io-rows runs ringgate twice per round instead of once, as "ringgate-uring" (`--io uring`) and
# "ringgate-epoll" (`--io epoll`), interleaved with the others like any server: the I/O backends
# compared in the same rounds.
#
# Cases: closed loop 100 and 1,000 connections x 20 B and 1 KiB; pipelined closed loop 100
# connections x 20 B with 16 messages in flight each (loadtest --pipeline 16: frames arrive back to
# back rather than one per round trip); open loop 10,000 connections x 10 msg/s (the issue's case,
# beyond what one loadtest core keeps on schedule) and x 3 msg/s (within it, so latency is the
# servers'); 10,000 idle connections (memory, handshake CPU).
#
# Time: a full run (3 rounds, 10 s windows) took about 13 minutes after the build before the
# pipelined case was added (about 15 with it, estimated); --quick (1 round, 3 s windows) about 2
# minutes; --io-rows makes ringgate two servers, so with the three default servers a third longer.
# Results: target/compare/results.md (and runs.tsv plus every run's JSON and logs under
# target/compare/runs/); --write-benchmarks also replaces the section between
# `<!-- compare:begin -->` and `<!-- compare:end -->` in BENCHMARKS.md (appending it if absent).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

usage() {
  cat <<'EOF'
usage: scripts/compare.sh [--quick] [--rounds N] [--duration SECS] [--cases LIST] [--servers LIST]
                          [--baseline BIN] [--io-rows] [--out DIR] [--no-build] [--write-benchmarks]

  --quick             1 round, 3 s measured windows (default: 3 rounds, 10 s)
  --rounds N          rounds per case (servers interleaved within each round)
  --duration SECS     measured window of every echo run, and how long idle connections are held
  --cases LIST        comma-separated subset of: closed100x20,closed100x1k,closed1000x20,
                      closed1000x1k,pipe100x20,open10k,open10k3,idle10k (default: all)
  --servers LIST      comma-separated subset of: ringgate,fastwebsockets,tokio-tungstenite
                      (plus ringgate-baseline with --baseline; ringgate-uring,ringgate-epoll)
  --baseline BIN      another ringgate binary (say, built before a change; a path relative to the
                      repository root, or absolute), run as server
                      "ringgate-baseline" with ringgate's flags and interleaved with the others, so a
                      change's effect is a ratio from the same rounds; adds it to the servers if
                      --servers is not given
  --io-rows           run ringgate as two servers, "ringgate-uring" (ringgate --io uring) and
                      "ringgate-epoll" (ringgate --io epoll), in place of "ringgate" in the list
  --out DIR           where results go (default target/compare)
  --no-build          use the release binaries already in target/release
  --write-benchmarks  also write the results section into BENCHMARKS.md between the markers

environment: SERVER_CPU (default 0), CLIENT_CPU (default 1): the cores for server and loadtest
EOF
}

rounds=3
duration=10
quick=0
cases_arg="closed100x20,closed100x1k,closed1000x20,closed1000x1k,pipe100x20,open10k,open10k3,idle10k"
servers_arg="ringgate,fastwebsockets,tokio-tungstenite"
out=target/compare
build=1
write_benchmarks=0
server_cpu=${SERVER_CPU:-0}
client_cpu=${CLIENT_CPU:-1}
baseline=""
io_rows=0
servers_given=0
invocation="scripts/compare.sh${*:+ $*}"

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; rounds=1; duration=3 ;;
    --rounds) rounds=${2:?--rounds needs N}; shift ;;
    --duration) duration=${2:?--duration needs SECS}; shift ;;
    --cases) cases_arg=${2:?--cases needs a list}; shift ;;
    --servers) servers_arg=${2:?--servers needs a list}; servers_given=1; shift ;;
    --baseline) baseline=${2:?--baseline needs a binary}; shift ;;
    --io-rows) io_rows=1 ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    --no-build) build=0 ;;
    --write-benchmarks) write_benchmarks=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "compare.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --rounds must be a positive integer" >&2; exit 2; }
[[ "$duration" =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --duration must be whole seconds >= 1" >&2; exit 2; }
if [ -n "$baseline" ]; then
  [ -x "$baseline" ] || { echo "compare.sh: --baseline $baseline is not an executable" >&2; exit 2; }
  [ "$servers_given" = 1 ] || servers_arg="ringgate,ringgate-baseline,fastwebsockets,tokio-tungstenite"
fi
IFS=, read -r -a cases <<<"$cases_arg"
IFS=, read -r -a servers <<<"$servers_arg"
if [ "$io_rows" = 1 ]; then
  # "ringgate" becomes its two backends, in its place in the order.
  expanded=()
  for s in "${servers[@]}"; do
    if [ "$s" = ringgate ]; then expanded+=(ringgate-uring ringgate-epoll); else expanded+=("$s"); fi
  done
  servers=("${expanded[@]}")
fi
for c in "${cases[@]}"; do
  case "$c" in closed100x20|closed100x1k|closed1000x20|closed1000x1k|pipe100x20|open10k|open10k3|idle10k) ;;
    *) echo "compare.sh: unknown case '$c'" >&2; exit 2 ;; esac
done
for s in "${servers[@]}"; do
  case "$s" in ringgate|ringgate-uring|ringgate-epoll|fastwebsockets|tokio-tungstenite) ;;
    ringgate-baseline) [ -n "$baseline" ] || { echo "compare.sh: ringgate-baseline needs --baseline BIN" >&2; exit 2; } ;;
    *) echo "compare.sh: unknown server '$s'" >&2; exit 2 ;; esac
done
for tool in taskset python3 getconf; do
  command -v "$tool" >/dev/null || { echo "compare.sh: needs $tool" >&2; exit 1; }
done
if [ "$(nproc --all)" -lt 2 ] || [ "$server_cpu" = "$client_cpu" ]; then
  echo "compare.sh: needs two distinct cores for server and loadtest (SERVER_CPU, CLIENT_CPU)" >&2
  exit 1
fi

# The revision the binaries are built from (taken before the build: others may commit meanwhile).
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src loadtest benches/peers Cargo.toml Cargo.lock 2>/dev/null || rev="$rev (with local changes)"

if [ "$build" = 1 ]; then
  # Two builds, not one: built together, Cargo would unify tokio's features for ringgate with the
  # peers' (rt-multi-thread, ...), and ringgate would not be the binary users build.
  cargo build --release -p ringgate -p loadtest --bins
  cargo build --release -p ringgate-peers --bins
fi
bin=target/release
for b in ringgate loadtest peer-fastwebsockets peer-tokio-tungstenite; do
  [ -x "$bin/$b" ] || { echo "compare.sh: $bin/$b missing (run without --no-build)" >&2; exit 1; }
done
for s in "${servers[@]}"; do
  case "$s" in
    ringgate-uring|ringgate-epoll)
      # The help is read whole first: with pipefail, `ringgate --help | grep -q` could fail on SIGPIPE.
      ringgate_help=$("$bin/ringgate" --help 2>/dev/null || true)
      grep -qE -- '(^|[[:space:],])--io([[:space:]=<]|$)' <<<"$ringgate_help" ||
        { echo "compare.sh: $s needs a ringgate with --io (this $bin/ringgate has none)" >&2; exit 1; }
      break ;;
  esac
done

# From here on this shell (and the sampling, python, sleeps it runs) stays off the server's core.
taskset -cp "$client_cpu" $$ >/dev/null
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
clk_tck=$(getconf CLK_TCK)

rm -rf "$out/runs"
mkdir -p "$out/runs"
runs_tsv="$out/runs.tsv"
printf 'case\tserver\tround\tjson\trss_before_kib\trss_load_kib\tcpu_ticks\tcpu_window_secs\tthreads\talive\tothers_server_core_ticks\tothers_client_core_ticks\tloadtest_ticks\n' >"$runs_tsv"

# --- process handling ------------------------------------------------------------------------

started=()  # every server pid this script started and has not reaped yet
loadtest_pid=""

stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  [ -n "$loadtest_pid" ] && stop_pid "$loadtest_pid"
  for pid in "${started[@]}"; do stop_pid "$pid"; done
  started=()
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

server_command() {
  case "$1" in
    ringgate) echo "$bin/ringgate --listen 127.0.0.1:0 --workers 1" ;;
    ringgate-uring) echo "$bin/ringgate --listen 127.0.0.1:0 --workers 1 --io uring" ;;
    ringgate-epoll) echo "$bin/ringgate --listen 127.0.0.1:0 --workers 1 --io epoll" ;;
    ringgate-baseline) echo "$baseline --listen 127.0.0.1:0 --workers 1" ;;
    fastwebsockets) echo "$bin/peer-fastwebsockets --listen 127.0.0.1:0" ;;
    tokio-tungstenite) echo "$bin/peer-tokio-tungstenite --listen 127.0.0.1:0" ;;
  esac
}

# start_server NAME DIR: starts it pinned, sets server_pid and server_addr.
start_server() {
  local name=$1 dir=$2
  # shellcheck disable=SC2046  # the command is words on purpose
  start_pinned "$server_cpu" "$dir" $(server_command "$name")
  started+=("$server_pid")
}

stop_server() {
  stop_pid "$server_pid"
  local kept=()
  for pid in "${started[@]}"; do [ "$pid" = "$server_pid" ] || kept+=("$pid"); done
  started=("${kept[@]+"${kept[@]}"}")
}

cpu_ticks() {  # utime + stime of a process, in clock ticks
  local stat rest
  read -r stat <"/proc/$1/stat" || return 1
  rest=${stat##*) }  # fields after the command name; utime and stime are its 12th and 13th
  # shellcheck disable=SC2086
  set -- $rest
  echo $((${12} + ${13}))
}
core_busy() {  # ticks CPU $1 spent not idle (user nice system irq softirq steal), from /proc/stat
  awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}
# snapshot: "server_ticks loadtest_ticks server_core_busy client_core_busy" at this instant.
snapshot() {
  local client="" st lt=0
  # loadtest runs under `timeout`: its pid is timeout's child.
  { read -r client _ <"/proc/${loadtest_pid:-0}/task/${loadtest_pid:-0}/children"; } 2>/dev/null || true
  st=$(cpu_ticks "$server_pid" 2>/dev/null) || st=0
  [ -n "$client" ] && { lt=$(cpu_ticks "$client" 2>/dev/null) || lt=0; }
  echo "$st $lt $(core_busy "$server_cpu") $(core_busy "$client_cpu")"
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
threads() { awk '/^Threads:/ { print $2 }' "/proc/$1/status"; }
now() { echo "$EPOCHREALTIME"; }
sleep_until() { # sleep_until EPOCH_SECONDS (fractional)
  local secs
  secs=$(awk -v t="$1" -v n="$EPOCHREALTIME" 'BEGIN { d = t - n; printf "%.3f", d < 0 ? 0 : d }')
  # In the background and waited for, so that a signal runs the cleanup trap at once.
  sleep "$secs" &
  wait $!
}
add() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", a + b }'; }

# --- cases -----------------------------------------------------------------------------------

# loadtest flags per case; {DURATION} is replaced. Ramp-up is --conns / 5000 s (the default rate).
case_flags() {
  case "$1" in
    closed100x20) echo "--conns 100 --rate 0 --size 20 --duration {DURATION}s --threads 1" ;;
    closed100x1k) echo "--conns 100 --rate 0 --size 1024 --duration {DURATION}s --threads 1" ;;
    closed1000x20) echo "--conns 1000 --rate 0 --size 20 --duration {DURATION}s --threads 1" ;;
    closed1000x1k) echo "--conns 1000 --rate 0 --size 1024 --duration {DURATION}s --threads 1" ;;
    pipe100x20) echo "--conns 100 --rate 0 --pipeline 16 --size 20 --duration {DURATION}s --threads 1" ;;
    open10k) echo "--conns 10000 --rate 10 --size 32 --duration {DURATION}s --threads 1" ;;
    open10k3) echo "--conns 10000 --rate 3 --size 32 --duration {DURATION}s --threads 1" ;;
    idle10k) echo "--mode connect --conns 10000 --duration {DURATION}s --threads 1" ;;
  esac
}
case_ramp() {
  case "$1" in
    closed100x*|pipe100x*) echo 0.02 ;;
    closed1000x*) echo 0.2 ;;
    open10k|open10k3|idle10k) echo 2 ;;
  esac
}

# run_one CASE SERVER ROUND
run_one() {
  local case=$1 name=$2 round=$3
  local dir="$out/runs/$case-$name-r$round"
  mkdir -p "$dir"
  start_server "$name" "$dir"
  sleep 0.3  # let it settle before the "before" sample
  local rss_before flags ramp t0 from to snap0 snap1 rss_load thr
  rss_before=$(rss_kib "$server_pid")
  flags=$(case_flags "$case")
  flags=${flags//\{DURATION\}/$duration}
  ramp=$(case_ramp "$case")
  printf '  %-14s %-18s round %s: ' "$case" "$name" "$round"

  if [ "$case" = idle10k ]; then
    # Handshake CPU: from before the first connection to halfway through the hold (all are up by then).
    from=$(now)
    snap0=$(snapshot)
  fi
  t0=$(now)
  # shellcheck disable=SC2086
  # --allow-errors: a peer's errors or failed connections are results (the errors column counts them),
  # not a failed run; loadtest still exits non-zero when no connection was established at all.
  timeout $((duration + 40)) taskset -c "$client_cpu" "$bin/loadtest" "ws://$server_addr/echo" $flags \
    --allow-errors --json "$dir/loadtest.json" >"$dir/loadtest.out" 2>"$dir/loadtest.err" &
  loadtest_pid=$!

  if [ "$case" = idle10k ]; then
    sleep_until "$(add "$t0" "$(add "$ramp" "$(awk -v d="$duration" 'BEGIN { print d / 2 }')")")"
    snap1=$(snapshot)
    rss_load=$(rss_kib "$server_pid") || rss_load=0
    to=$(now)
  else
    # CPU over the measured window minus its first 0.5 s and last 0.3 s; RSS at its middle.
    sleep_until "$(add "$t0" "$(add "$ramp" 0.5)")"
    from=$(now)
    snap0=$(snapshot)
    sleep_until "$(add "$t0" "$(add "$ramp" "$(awk -v d="$duration" 'BEGIN { print d / 2 }')")")"
    rss_load=$(rss_kib "$server_pid") || rss_load=0
    sleep_until "$(add "$t0" "$(add "$ramp" "$(awk -v d="$duration" 'BEGIN { print d - 0.3 }')")")"
    snap1=$(snapshot)
    to=$(now)
  fi
  thr=$(threads "$server_pid" 2>/dev/null || echo 0)
  local status=0
  wait "$loadtest_pid" || status=$?
  loadtest_pid=""
  local alive=1
  kill -0 "$server_pid" 2>/dev/null || alive=0
  stop_server
  # Server ticks, and what else ran on each core meanwhile (other processes, and the hypervisor's steal).
  local server_ticks others_server others_client loadtest_ticks window json="$dir/loadtest.json"
  read -r server_ticks others_server others_client loadtest_ticks <<<"$(awk -v a="$snap0" -v b="$snap1" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    s = y[1] - x[1]; l = y[2] - x[2]; cs = y[3] - x[3]; cc = y[4] - x[4]
    os = cs - s; oc = cc - l
    print s, (os < 0 ? 0 : os), (oc < 0 ? 0 : oc), l }')"
  window=$(awk -v a="$to" -v b="$from" 'BEGIN { print a - b }')
  if [ "$status" != 0 ] || [ ! -s "$json" ]; then
    echo "loadtest failed (exit $status); see $dir/loadtest.err"
    tail -n 3 "$dir/loadtest.err" | sed 's/^/    /'
    json=""
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$case" "$name" "$round" "$json" \
    "$rss_before" "$rss_load" "$server_ticks" "$window" "$thr" "$alive" "$others_server" "$others_client" \
    "$loadtest_ticks" >>"$runs_tsv"
  [ -n "$json" ] || return 0
  python3 - "$dir/loadtest.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
lat = r["latency_us"]
if r["config"].get("mode", "echo") == "connect" or r["messages_received"] == 0:
    print(f"{r['connections_established']} connections, handshake p99 {r['handshake_latency_us']['p99']} us, errors {r['errors']}")
else:
    print(f"{r['throughput_msgs_per_sec']:.0f} msg/s, p50 {lat['p50']} us, p99 {lat['p99']} us, "
          f"errors {r['errors']}, late sends {r['late_sends']}")
PY
}

started_at=$(date -u '+%Y-%m-%d %H:%M UTC')
echo "compare.sh: ${#cases[@]} cases x ${#servers[@]} servers x $rounds rounds, ${duration} s windows;" \
  "server on CPU $server_cpu, loadtest on CPU $client_cpu"
for case in "${cases[@]}"; do
  echo "case $case: loadtest $(case_flags "$case" | sed "s/{DURATION}/$duration/")"
  for round in $(seq "$rounds"); do
    for name in "${servers[@]}"; do
      run_one "$case" "$name" "$round"
    done
  done
done

# --- the report ------------------------------------------------------------------------------

lock_version() {  # version of a crate in Cargo.lock (first match)
  awk -v n="$1" '$0 == "name = \"" n "\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock
}
model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
mem_gib=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)
export CMP_TSV="$runs_tsv" CMP_CLK_TCK="$clk_tck" CMP_ROUNDS="$rounds" CMP_DURATION="$duration" \
  CMP_SERVER_CPU="$server_cpu" CMP_CLIENT_CPU="$client_cpu" CMP_INVOCATION="$invocation" \
  CMP_STARTED="$started_at" CMP_NPROC="$(nproc --all)" CMP_MODEL="$model" CMP_MEM_GIB="$mem_gib" \
  CMP_KERNEL="$(uname -sr) ($(uname -m))" CMP_RUSTC="$(rustc --version)" CMP_REV="$rev" \
  CMP_FWS="$(lock_version fastwebsockets)" CMP_TT="$(lock_version tokio-tungstenite)" \
  CMP_TOKIO="$(lock_version tokio)" CMP_HYPER="$(lock_version hyper)" CMP_LOAD="$(cut -d' ' -f1-3 /proc/loadavg)" \
  CMP_BASELINE="$baseline"
cmds_file="$out/commands.txt"
{
  for name in "${servers[@]}"; do echo "taskset -c $server_cpu $(server_command "$name")"; done
  for case in "${cases[@]}"; do
    echo "taskset -c $client_cpu $bin/loadtest ws://127.0.0.1:PORT/echo $(case_flags "$case" | sed "s/{DURATION}/$duration/") --allow-errors --json FILE"
  done
} >"$cmds_file"
export CMP_COMMANDS="$cmds_file"

python3 - "$out/results.md" <<'PY'
import csv, json, os, statistics, sys

env = os.environ
clk = int(env["CMP_CLK_TCK"])
rows = list(csv.DictReader(open(env["CMP_TSV"]), delimiter="\t"))
order_cases = []
order_servers = []
for r in rows:
    if r["case"] not in order_cases:
        order_cases.append(r["case"])
    if r["server"] not in order_servers:
        order_servers.append(r["server"])

def runs(case, server):
    out = []
    for r in rows:
        if r["case"] != case or r["server"] != server:
            continue
        rec = dict(r)
        rec["report"] = json.load(open(r["json"])) if r["json"] else None
        out.append(rec)
    return out

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

def rng(values, fmt, unit=""):
    """The median, with the range after it when there is more than one round: "4.5 (4.4-4.8) µs"."""
    values = [v for v in values if v is not None]
    if not values:
        return "failed"
    m, lo, hi = fmt(statistics.median(values)), fmt(min(values)), fmt(max(values))
    if lo != hi:
        return f"{m} ({lo}-{hi}){unit}"
    return f"{m}{unit}"

def us(v):
    if v is None:
        return "-"
    return f"{v / 1000:.1f} ms" if v >= 1000 else f"{v:.0f} µs"

def kib(v):
    return "-" if v is None else f"{v / 1024:.1f} MiB"

def cpu_per_msg(rec):
    rep = rec["report"]
    window = float(rec["cpu_window_secs"])
    if not rep or window <= 0 or rep["throughput_msgs_per_sec"] <= 0:
        return None
    return int(rec["cpu_ticks"]) / clk / (rep["throughput_msgs_per_sec"] * window) * 1e6

def client_cpu_per_msg(rec):
    """loadtest's CPU per message over the same window as the server's."""
    rep = rec["report"]
    window = float(rec["cpu_window_secs"])
    if not rep or window <= 0 or rep["throughput_msgs_per_sec"] <= 0:
        return None
    return int(rec.get("loadtest_ticks") or 0) / clk / (rep["throughput_msgs_per_sec"] * window) * 1e6

def core_share(rec):
    window = float(rec["cpu_window_secs"])
    return int(rec["cpu_ticks"]) / clk / window * 100 if window > 0 else None

def others(rs):
    values = [(int(r["others_server_core_ticks"]) / clk / float(r["cpu_window_secs"]) * 100,
               int(r["others_client_core_ticks"]) / clk / float(r["cpu_window_secs"]) * 100)
              for r in rs if float(r["cpu_window_secs"]) > 0]
    if not values:
        return "-"
    return f"{med([v[0] for v in values]):.0f}% / {med([v[1] for v in values]):.0f}%"

def errors(rs):
    total = sum((r["report"] or {}).get("errors", 0) + (r["report"] or {}).get("connections_failed", 0) for r in rs)
    failed = sum(1 for r in rs if not r["report"])
    died = sum(1 for r in rs if r["alive"] != "1")
    text = str(total)
    if failed:
        text += f", {failed} run(s) failed"
    if died:
        text += f", server died in {died}"
    return text

titles = {
    "closed100x20": "100 conns x 20 B",
    "closed100x1k": "100 conns x 1 KiB",
    "closed1000x20": "1,000 conns x 20 B",
    "closed1000x1k": "1,000 conns x 1 KiB",
    "pipe100x20": "100 conns x 20 B, 16 in flight each (`--pipeline 16`)",
    "open10k": "10,000 conns x 10 msg/s (open loop, 32 B)",
    "open10k3": "10,000 conns x 3 msg/s (open loop, 32 B)",
}

lines = []
lines.append("<!-- compare:begin -->")
lines.append("## ringgate beside peers (`scripts/compare.sh`)")
lines.append("")
lines.append(f"Generated by `{env['CMP_INVOCATION']}` on {env['CMP_STARTED']}, ringgate at `{env['CMP_REV']}`.")
lines.append(f"Machine: {env['CMP_NPROC']} CPUs, \"{env['CMP_MODEL']}\", {env['CMP_MEM_GIB']} GiB, "
             f"{env['CMP_KERNEL']}, {env['CMP_RUSTC']}; load average at the end {env['CMP_LOAD']}.")
lines.append(f"Peers: fastwebsockets {env['CMP_FWS']} (hyper {env['CMP_HYPER']}), tokio-tungstenite "
             f"{env['CMP_TT']}, tokio {env['CMP_TOKIO']} (`benches/peers/`, written as each crate's echo example).")
if any(s in ("ringgate-uring", "ringgate-epoll") for s in order_servers):
    lines.append("ringgate-uring and ringgate-epoll: the same ringgate binary and flags with `--io uring` and "
                 "`--io epoll` added (its two I/O backends), interleaved like the other servers.")
if env.get('CMP_BASELINE'):
    lines.append(f"ringgate-baseline: `{env['CMP_BASELINE']}`, another ringgate binary run with the same flags "
                 "(before/after ratios of a change come from the same rounds).")
lines.append("")
lines.append(f"Each server is started fresh per run and pinned to CPU {env['CMP_SERVER_CPU']}; loadtest (1 thread) "
             f"to CPU {env['CMP_CLIENT_CPU']}. ringgate runs `--workers 1` (one worker per core it is given); "
             "the peers run tokio's default multi-thread runtime, which under `taskset` starts one worker. "
             f"Servers are interleaved round by round; figures are the median of {env['CMP_ROUNDS']} round(s)"
             + (" (range in parentheses)" if int(env["CMP_ROUNDS"]) > 1 else "") + ". "
             f"Measured window {env['CMP_DURATION']} s. Server CPU is utime+stime from `/proc/PID/stat` over the "
             "measured window minus its first 0.5 s and last 0.3 s, divided by loadtest's msgs/s times that time; "
             "\"core\" is the same CPU time as a share of one core. RSS is `VmRSS` before the first connection and "
             "mid-window. Latency is loadtest's (closed loop: from the actual send; open loop: from the intended "
             "send time). loadtest CPU per msg is measured like the server's, over the same window; in "
             "parentheses, loadtest's own figure (user+sys over its whole run, ramp-up and closing included, / "
             "echoes). When "
             "the server's core share is well under 100%, loadtest's core was the limit, and msgs/s says more "
             "about the client than the server; server CPU per msg is then the figure to compare. "
             "\"Others\" is what else kept each core busy in the same window (/proc/stat busy time, steal "
             "included, minus the server's or loadtest's own): other processes on a shared machine, but also "
             "kernel threads working for these two (ksoftirqd's loopback traffic, page reclaim). "
             "Errors = loadtest errors + failed connections.")
lines.append("")

def echo_cells(rs):
    """The cells every echo table shares, from msgs/s to RSS: medians (and ranges) of the runs."""
    ok = [r for r in rs if r["report"]]
    return (
        f"{rng([r['report']['throughput_msgs_per_sec'] for r in ok], lambda v: f'{v:,.0f}')} "
        f"| {us(med([r['report']['latency_us']['p50'] for r in ok]))} "
        f"| {us(med([r['report']['latency_us']['p99'] for r in ok]))} "
        f"| {rng([cpu_per_msg(r) for r in ok], lambda v: f'{v:.2f}', ' µs')} "
        f"| {rng([core_share(r) for r in ok], lambda v: f'{v:.0f}', '%')} "
        f"| {rng([client_cpu_per_msg(r) for r in ok], lambda v: f'{v:.2f}', ' µs')} "
        f"({rng([r['report']['client_cpu']['us_per_message'] for r in ok], lambda v: f'{v:.2f}', ' µs')}) "
        f"| {others(rs)} "
        f"| {kib(med([int(r['rss_before_kib']) for r in rs]))}; {kib(med([int(r['rss_load_kib']) for r in rs]))}")


closed = [c for c in order_cases if c.startswith(("closed", "pipe"))]
if closed:
    lines.append("### Closed loop (`--rate 0`)")
    lines.append("")
    lines.append("| case | server | msgs/s | p50 | p99 | server CPU per msg | server core | loadtest CPU per msg | others on server / loadtest core | RSS before; under load | errors |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in closed:
        for server in order_servers:
            rs = runs(case, server)
            if not rs:
                continue
            lines.append(f"| {titles[case]} | {server} | {echo_cells(rs)} | {errors(rs)} |")
    lines.append("")

open_cases = [
    ("open10k", "### Open loop: 10,000 connections x 10 msg/s (100,000 msgs/s asked)"),
    ("open10k3", "### Open loop: 10,000 connections x 3 msg/s (30,000 msgs/s asked, within what one loadtest core keeps on schedule)"),
]
for open_case, heading in open_cases:
    if open_case not in order_cases:
        continue
    lines.append(heading)
    lines.append("")
    lines.append("| server | msgs/s | p50 | p99 | server CPU per msg | server core | loadtest CPU per msg | others on server / loadtest core | RSS before; under load | loadtest late sends; send lag p50 | errors |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for server in order_servers:
        rs = runs(open_case, server)
        if not rs:
            continue
        ok = [r for r in rs if r["report"]]
        late = med([100 * r["report"]["late_sends"] / max(1, r["report"]["messages_sent"]) for r in ok])
        lag = med([r["report"]["send_lag_us"]["p50"] for r in ok])
        lines.append(
            f"| {server} | {echo_cells(rs)} "
            f"| {'-' if late is None else f'{late:.0f}%'}; {us(lag)} "
            f"| {errors(rs)} |")
    lines.append("")

if "idle10k" in order_cases:
    lines.append("### 10,000 idle connections (`--mode connect`)")
    lines.append("")
    lines.append("| server | established | RSS before | RSS with the connections | per connection | server CPU per connection (accept + handshake) | handshake p99 | others on server / loadtest core | errors |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for server in order_servers:
        rs = runs("idle10k", server)
        if not rs:
            continue
        ok = [r for r in rs if r["report"]]
        per_conn = [(int(r["rss_load_kib"]) - int(r["rss_before_kib"])) * 1024 / max(1, r["report"]["connections_established"]) for r in ok]
        cpu_conn = [int(r["cpu_ticks"]) / clk / max(1, r["report"]["connections_established"]) * 1e6 for r in ok]
        lines.append(
            f"| {server} "
            f"| {rng([r['report']['connections_established'] for r in ok], lambda v: f'{v:,.0f}')} "
            f"| {kib(med([int(r['rss_before_kib']) for r in ok]))} "
            f"| {kib(med([int(r['rss_load_kib']) for r in ok]))} "
            f"| {rng(per_conn, lambda v: f'{v:,.0f}', ' B')} "
            f"| {rng(cpu_conn, lambda v: f'{v:.0f}', ' µs')} "
            f"| {us(med([r['report']['handshake_latency_us']['p99'] for r in ok]))} "
            f"| {others(rs)} "
            f"| {errors(rs)} |")
    lines.append("")

lines.append("Commands (PORT: the server's, from its `listening on` line; each server started with `--listen 127.0.0.1:0`):")
lines.append("")
for cmd in open(env["CMP_COMMANDS"]).read().splitlines():
    lines.append("    " + cmd)
lines.append("<!-- compare:end -->")
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY

echo
cat "$out/results.md"
echo "compare.sh: results in $out/results.md, per-run data in $runs_tsv and $out/runs/"

if [ "$write_benchmarks" = 1 ]; then
  python3 - BENCHMARKS.md "$out/results.md" <<'PY'
import sys
path, section = sys.argv[1], open(sys.argv[2]).read().rstrip("\n")
text = open(path).read()
begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
if begin in text and end in text and text.index(begin) < text.index(end):
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    text = head + section + tail
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
  echo "compare.sh: wrote the section into BENCHMARKS.md"
fi
