#!/usr/bin/env python3
"""Judge an Autobahn TestSuite report against the checked-in expectation.

Usage:
    autobahn/check.py OUTDIR                    # compare OUTDIR/index.json with autobahn/expected.json
    autobahn/check.py OUTDIR --write-expected   # regenerate autobahn/expected.json from the report
    autobahn/check.py OUTDIR --planned-only     # a run of some cases: judge just those
    options: --expected PATH  --agent NAME

OUTDIR is what autobahn/run.sh (wstest -m fuzzingclient) left behind: index.json is
{agent: {case_id: {"behavior": ..., "behaviorClose": ..., ...}}}. expected.json is a flat mapping
case_id -> {"behavior": ..., "behaviorClose": ...}, case ids in numeric order (1.1.2 < 1.1.10).

Exit 1, listing every case concerned, when:
  * a case's behavior or behaviorClose is anything but OK, INFORMATIONAL or UNIMPLEMENTED
    (FAILED, NON-STRICT, and also wstest's WRONG CODE, UNCLEAN, FAILED BY CLIENT, NO_CLOSE);
  * a case of the plan is missing from the report. The plan is expected.json plus, when run.sh
    wrote it, OUTDIR/planned-cases.json: wstest exits 0 with a partial report if the server dies;
  * the report differs from expected.json in any way (changed result, case not expected).
Exit 2 on unusable input (no report, malformed JSON).

--write-expected refuses to write from a partial report, writes the file otherwise, then applies the
same checks, so it still exits 1 if the new expectation contains FAILED or NON-STRICT cases.

Python 3 standard library only: CI runs this without installing anything.
"""

import argparse
import collections
import json
import os
import sys

# Results we accept. wstest also emits WRONG CODE / UNCLEAN / FAILED BY CLIENT / NO_CLOSE; its HTML
# report colours them as failures or near-failures, and our design (echo the close, then the server
# closes TCP, with the right code) should never produce them, so they fail too.
ACCEPTED = ("OK", "INFORMATIONAL", "UNIMPLEMENTED")
# Order of the summary lines; other values wstest may produce are appended after these.
SUMMARY_ORDER = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
FIELDS = ("behavior", "behaviorClose")

DEFAULT_EXPECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expected.json")


class InputError(Exception):
    """The report or the expected file cannot be used at all (exit 2)."""


def case_key(case_id):
    """Sort key: numeric per component, so 1.1.2 < 1.1.10 < 2.1 < 10.1.1."""
    try:
        return tuple(int(part) for part in case_id.split("."))
    except ValueError:
        # Not an Autobahn id; sort such ids after all numeric ones, stably.
        return (sys.maxsize, case_id)


def load_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        hint = " (create it with --write-expected)" if what == "expected file" else ""
        raise InputError("%s not found: %s%s" % (what, path, hint))
    except ValueError as e:
        raise InputError("%s is not valid JSON: %s: %s" % (what, path, e))


def load_report(outdir, agent):
    """Returns (agent, {case_id: full per-case entry from index.json})."""
    index = load_json(os.path.join(outdir, "index.json"), "report")
    if not isinstance(index, dict):
        raise InputError("index.json: top level is not an object")
    if agent is None:
        if not index:
            # What wstest writes when it never reached the server: a report with no cases, which
            # compare() then lists as missing (exit 1), like any other partial report.
            return "(none)", {}
        if len(index) != 1:
            raise InputError(
                "index.json has %d agents (%s); pick one with --agent"
                % (len(index), ", ".join(sorted(index)))
            )
        agent = next(iter(index))
    if agent not in index:
        raise InputError("index.json has no agent %r (has: %s)" % (agent, ", ".join(sorted(index))))
    cases = index[agent]
    for case_id, entry in cases.items():
        if not isinstance(entry, dict) or any(not isinstance(entry.get(f), str) for f in FIELDS):
            raise InputError("index.json: case %s lacks behavior/behaviorClose" % case_id)
    return agent, cases


def load_expected(path):
    expected = load_json(path, "expected file")
    if not isinstance(expected, dict):
        raise InputError("%s: top level is not an object" % path)
    for case_id, entry in expected.items():
        if not isinstance(entry, dict) or any(not isinstance(entry.get(f), str) for f in FIELDS):
            raise InputError("%s: case %s lacks behavior/behaviorClose" % (path, case_id))
    return expected


def load_planned(outdir):
    """Case ids wstest announced it would run (written by run.sh); None if absent."""
    path = os.path.join(outdir, "planned-cases.json")
    if not os.path.exists(path):
        return None
    planned = load_json(path, "planned cases")
    if not isinstance(planned, list) or not all(isinstance(c, str) for c in planned):
        raise InputError("%s: not a JSON array of case ids" % path)
    return planned


def result_of(entry):
    return {f: entry[f] for f in FIELDS}


def show(result):
    return "%s/%s" % (result["behavior"], result["behaviorClose"])


def case_detail(outdir, entry):
    """wstest's own explanation for one case, from its per-case JSON file, if readable."""
    name = entry.get("reportfile")
    if not name:
        return ""
    try:
        with open(os.path.join(outdir, name), encoding="utf-8") as f:
            full = json.load(f)
    except (OSError, ValueError):
        return ""
    bits = []
    for key in ("result", "resultClose"):
        text = full.get(key)
        # Skip wstest's stock "all is well" sentences; keep the ones that explain a failure.
        if text and text not in bits and not text.startswith(("Actual events match", "Connection was properly")):
            bits.append(text)
    if entry.get("remoteCloseCode") is not None:
        bits.append("server close code %s" % entry["remoteCloseCode"])
    bits.append("details: %s" % os.path.join(outdir, name))
    return "; ".join(bits)


def print_summary(cases):
    for field in FIELDS:
        counts = collections.Counter(entry[field] for entry in cases.values())
        order = list(SUMMARY_ORDER) + sorted(set(counts) - set(SUMMARY_ORDER))
        per_value = "  ".join("%s %d" % (name, counts.get(name, 0)) for name in order)
        print("%-15s %s  (total %d)" % (field + ":", per_value, len(cases)))


def write_expected(path, cases):
    ordered = collections.OrderedDict(
        (case_id, result_of(cases[case_id])) for case_id in sorted(cases, key=case_key)
    )
    # One case per line: a review diff then shows exactly the cases whose result changed.
    lines = [
        "  %s: %s" % (json.dumps(case_id), json.dumps(result, sort_keys=True))
        for case_id, result in ordered.items()
    ]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    os.replace(tmp, path)


def compare(cases, expected, planned, outdir, planned_only=False):
    """Returns a list of (case_id, message) problems, in case order. With `planned_only`, the
    expectation is cut down to the cases wstest planned (a run of a selection of cases)."""
    if planned_only:
        expected = {case_id: want for case_id, want in expected.items() if case_id in set(planned)}
    plan = set(expected)
    if planned is not None:
        plan |= set(planned)
    problems = []
    for case_id in sorted(plan | set(cases), key=case_key):
        entry = cases.get(case_id)
        want = expected.get(case_id)
        if entry is None:
            where = "expected %s" % show(want) if want else "wstest planned it"
            problems.append((case_id, "MISSING from report (%s)" % where))
            continue
        got = result_of(entry)
        reasons = []
        bad = [f for f in FIELDS if got[f] not in ACCEPTED]
        if bad:
            reasons.append("not allowed: " + ", ".join("%s %s" % (f, got[f]) for f in bad))
        if want is None:
            reasons.append("NEW: not in expected file, got %s" % show(got))
        elif want != got:
            changes = ["%s %s -> %s" % (f, want[f], got[f]) for f in FIELDS if want[f] != got[f]]
            reasons.append("changed: " + ", ".join(changes))
        if reasons:
            detail = case_detail(outdir, entry) if (bad or (want and want != got)) else ""
            problems.append((case_id, "; ".join(reasons) + ("\n%12s%s" % ("", detail) if detail else "")))
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Compare an Autobahn fuzzingclient report with autobahn/expected.json.",
    )
    parser.add_argument("outdir", help="report directory written by autobahn/run.sh (holds index.json)")
    parser.add_argument("--expected", default=DEFAULT_EXPECTED, help="expected file (default: %(default)s)")
    parser.add_argument(
        "--write-expected", action="store_true", help="regenerate the expected file from the report"
    )
    parser.add_argument("--agent", help="agent in index.json (default: the only one)")
    parser.add_argument(
        "--planned-only",
        action="store_true",
        help="judge only the cases wstest planned (run.sh was given a selection); needs planned-cases.json",
    )
    args = parser.parse_args(argv)

    try:
        agent, cases = load_report(args.outdir, args.agent)
        planned = load_planned(args.outdir)
        if args.write_expected:
            missing = [c for c in (planned or []) if c not in cases]
            if not cases or missing:
                first = " (first: %s)" % missing[0] if missing else ""
                print(
                    "autobahn/check.py: refusing to write %s: report has %d cases, %d planned cases missing%s"
                    % (args.expected, len(cases), len(missing), first),
                    file=sys.stderr,
                )
                return 1
            write_expected(args.expected, cases)
            print("autobahn/check.py: wrote %d cases to %s" % (len(cases), args.expected))
        expected = load_expected(args.expected)
    except InputError as e:
        print("autobahn/check.py: error: %s" % e, file=sys.stderr)
        return 2

    report_path = os.path.join(args.outdir, "index.json")
    print("Autobahn report %s (agent %s) vs %s" % (report_path, agent, args.expected))
    print_summary(cases)

    if args.planned_only and not planned:
        print("autobahn/check.py: error: --planned-only needs OUTDIR/planned-cases.json", file=sys.stderr)
        return 2
    problems = compare(cases, expected, planned, args.outdir, args.planned_only)
    if not expected:
        problems.insert(0, ("-", "expected file is empty: nothing was planned"))
    if problems:
        missing = sum(1 for _, message in problems if message.startswith("MISSING"))
        if missing:
            print(
                "\nFAIL: the report lacks %d planned case(s): did the server die or refuse connections? "
                "(wstest exits 0 anyway; see wstest.log)" % missing
            )
        print("\nFAIL: %d case(s) differ from the expectation or are not allowed:" % len(problems))
        for case_id, message in problems:
            print("  %-9s %s" % (case_id, message))
        expected_opt = "" if args.expected == DEFAULT_EXPECTED else " --expected " + args.expected
        print(
            "\nIf a change is intended and every case is OK/INFORMATIONAL/UNIMPLEMENTED, regenerate with:\n"
            "  autobahn/check.py %s --write-expected%s" % (args.outdir, expected_opt)
        )
        return 1
    print("PASS: %d cases match %s" % (len(cases), args.expected))
    return 0


if __name__ == "__main__":
    sys.exit(main())
