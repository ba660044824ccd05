#!/usr/bin/env bash
# Run the Autobahn TestSuite fuzzing client (wstest -m fuzzingclient) against one WebSocket server
# and leave the report (index.json, HTML, per-case JSON) in OUTDIR.
#
# Usage: autobahn/run.sh URL OUTDIR [CASES_JSON_ARRAY] [EXCLUDE_JSON_ARRAY]
#   URL      ws://127.0.0.1:PORT/echo  (path included: wstest sends it in the handshake)
#   OUTDIR   created if missing; must be empty or a previous report of this script
#   CASES    default '["*"]' (all 517 cases); e.g. '["1.*","2.*"]'
#   EXCLUDE  default '[]'
#
# Environment:
#   RINGGATE_AUTOBAHN_TIMEOUT  seconds before wstest is killed (default 900; 1.*-11.* take ~16 s
#                              against a fast server and the compression cases 12.*-13.* ~10 min
#                              of wstest's own CPU, but a server that accepts TCP and never answers
#                              costs ~5 s per case, i.e. ~45 min for all of them)
#   RINGGATE_AUTOBAHN_AGENT    agent name, the top-level key of index.json (default "ringgate")
#   WSTEST                     a wstest executable to use instead of the one install.sh provides
#
# Exit status: 0 if wstest ran to the end and reported every case it planned; non-zero otherwise.
# Judging the results (FAILED, NON-STRICT, drift) is check.py's job, not this script's.
#
# Besides wstest's own files, OUTDIR gets: fuzzingclient.json (the spec), wstest.log (its output),
# planned-cases.json (the case ids wstest said it would run; check.py reads it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf 'autobahn/run.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage() { sed -n '5,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2; }

[[ $# -ge 2 && $# -le 4 ]] || usage
url=$1
outdir=$2
cases=${3:-'["*"]'}
exclude=${4:-'[]'}
timeout_s=${RINGGATE_AUTOBAHN_TIMEOUT:-900}
agent=${RINGGATE_AUTOBAHN_AGENT:-ringgate}
# Marks a directory as ours, so that re-running may wipe it without risking someone's files.
marker=.ringgate-autobahn-report

[[ "$url" == ws://* || "$url" == wss://* ]] || die "URL must start with ws:// or wss://, got '$url'"
[[ "$timeout_s" =~ ^[1-9][0-9]*$ ]] || die "RINGGATE_AUTOBAHN_TIMEOUT must be a positive integer, got '$timeout_s'"

# Absolute, because wstest resolves "outdir" from the spec; -m: OUTDIR need not exist yet.
outdir=$(realpath -m -- "$outdir")

# python3 builds the spec so that the JSON arguments are validated (before OUTDIR is touched)
# and nothing is mis-quoted.
spec=$(python3 - "$url" "$outdir" "$cases" "$exclude" "$agent" <<'EOF'
import json, sys
url, outdir, cases, exclude, agent = sys.argv[1:]
def str_list(name, text):
    try:
        value = json.loads(text)
    except ValueError as e:
        sys.exit("autobahn/run.sh: error: %s is not JSON: %s" % (name, e))
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        sys.exit("autobahn/run.sh: error: %s must be a JSON array of strings, got %s" % (name, text))
    return value
spec = {
    "outdir": outdir,
    "servers": [{"agent": agent, "url": url}],
    "cases": str_list("CASES", cases),
    "exclude-cases": str_list("EXCLUDE", exclude),
    "exclude-agent-cases": {},
}
json.dump(spec, sys.stdout, indent=2, sort_keys=True)
EOF
)

# A stale index.json from an earlier run would hide a wstest crash, so start from an empty dir.
if [[ -d "$outdir" ]] && [[ -n "$(ls -A "$outdir")" ]]; then
    [[ -f "$outdir/$marker" ]] \
        || die "$outdir is not empty and was not made by this script; refusing to clear it"
    find "$outdir" -mindepth 1 -delete
fi
mkdir -p "$outdir"
touch "$outdir/$marker"
printf '%s\n' "$spec" >"$outdir/fuzzingclient.json"

if [[ -n "${WSTEST:-}" ]]; then
    wstest=$WSTEST
else
    wstest=$("$here/install.sh")
fi

log "wstest -m fuzzingclient against $url, cases $cases, exclude $exclude, timeout ${timeout_s}s"
start=$SECONDS
rc=0
# PYTHONWARNINGS=ignore: Python 2.7's cryptography/Twisted deprecation warnings drown the output.
# --kill-after: Twisted sometimes ignores SIGTERM while a connection hangs.
PYTHONWARNINGS=ignore timeout --kill-after=10 "$timeout_s" \
    "$wstest" -m fuzzingclient -s "$outdir/fuzzingclient.json" 2>&1 \
    | tee "$outdir/wstest.log" || rc=$?
elapsed=$((SECONDS - start))

if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    die "wstest did not finish within ${timeout_s}s (exit $rc); partial output in $outdir/wstest.log"
elif [[ $rc -ne 0 ]]; then
    die "wstest exited with status $rc after ${elapsed}s; see $outdir/wstest.log"
fi

# wstest exits 0 even when the server died mid-run: it stops at the first refused connection and
# writes a partial report. Compare what it planned ("Cases = [...]") with what it reported.
python3 - "$outdir" "$agent" <<'EOF'
import ast, json, os, sys
outdir, agent = sys.argv[1:]
def fail(msg):
    sys.exit("autobahn/run.sh: error: " + msg)
planned = None
refused = []
with open(os.path.join(outdir, "wstest.log")) as f:
    for line in f:
        if line.startswith("Cases = "):
            planned = [str(c) for c in ast.literal_eval(line[len("Cases = "):].strip())]
        elif line.startswith("Connection to ") and " failed " in line:
            refused.append(line.strip())
if planned is None:
    fail("wstest.log has no 'Cases = [...]' line; did wstest start at all?")
with open(os.path.join(outdir, "planned-cases.json"), "w") as f:
    json.dump(planned, f, indent=1)
    f.write("\n")
index_path = os.path.join(outdir, "index.json")
if not os.path.exists(index_path):
    fail("wstest wrote no index.json")
with open(index_path) as f:
    index = json.load(f)
reported = index.get(agent, {})
missing = [c for c in planned if c not in reported]
if refused or missing:
    for line in refused:
        print("autobahn/run.sh: wstest: " + line, file=sys.stderr)
    fail("report has %d of %d planned cases (first missing: %s); the server probably died or "
         "refused connections" % (len(planned) - len(missing), len(planned),
                                  missing[0] if missing else "none"))
print("autobahn/run.sh: %d cases reported in %s/index.json" % (len(planned), outdir),
      file=sys.stderr)
EOF
log "wstest finished in ${elapsed}s"
