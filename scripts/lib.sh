# shellcheck shell=bash
# Shared by the measurement scripts (source it): starting a server pinned to a core.

# start_pinned CPU DIR COMMAND...: runs COMMAND, a server that prints "... listening on ADDR" (ringgate
# and the peers in benches/peers do), pinned to CPU with its output in DIR/server.out and
# DIR/server.err; sets server_pid and server_addr once it listens. Exits 1, showing its stderr, if it
# dies or does not listen within 10 s.
start_pinned() {
  local cpu=$1 dir=$2
  shift 2
  taskset -c "$cpu" "$@" >"$dir/server.out" 2>"$dir/server.err" &
  server_pid=$!
  server_addr=""
  for _ in $(seq 200); do
    server_addr=$(sed -n 's/^.*listening on //p' "$dir/server.out" | head -n 1)
    [ -n "$server_addr" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.05
  done
  if [ -z "$server_addr" ]; then
    kill "$server_pid" 2>/dev/null || true
    cat "$dir/server.err" >&2
    echo "$(basename "$0"): '$*' did not start listening" >&2
    exit 1
  fi
}
