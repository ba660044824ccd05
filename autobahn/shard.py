#!/usr/bin/env python3
"""Split an Autobahn case selection into shards, and merge the shards' reports.

Usage:
    autobahn/shard.py CASES_JSON SHARDS K     # print shard K's case patterns (a JSON array)
    autobahn/shard.py --merge OUTDIR SHARDS   # OUTDIR/shard-*/ -> OUTDIR (index.json, planned cases,
                                              # per-case reports)

A selection of "*" stands for every case group: 1.* ... 11.* and each 12.N.* / 13.N.* on its own
(the compression groups are what takes time: 18 cases of growing messages each, ~40 s per group).
Patterns are dealt round-robin, so each shard gets a similar mix. Python 3 standard library only.
"""

import json
import os
import shutil
import sys

ALL_GROUPS = (
    ["%d.*" % n for n in range(1, 12)]
    + ["12.%d.*" % n for n in range(1, 6)]
    + ["13.%d.*" % n for n in range(1, 8)]
)


def expand(patterns):
    out = []
    for pattern in patterns:
        if pattern == "*":
            out.extend(ALL_GROUPS)
        elif pattern in ("12.*", "13.*"):
            out.extend(g for g in ALL_GROUPS if g.startswith(pattern[:-1]))
        else:
            out.append(pattern)
    return out


def shard(cases, shards, k):
    patterns = expand(json.loads(cases))
    # Heaviest first (the compression groups), so round-robin balances them.
    patterns.sort(key=lambda p: not p.startswith(("12.", "13.")))
    return patterns[k::shards]


def merge(outdir, shards):
    index = {}
    planned = []
    for k in range(shards):
        shard_dir = os.path.join(outdir, "shard-%d" % k)
        with open(os.path.join(shard_dir, "index.json"), encoding="utf-8") as f:
            for agent, cases in json.load(f).items():
                index.setdefault(agent, {}).update(cases)
        path = os.path.join(shard_dir, "planned-cases.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                planned.extend(json.load(f))
        for name in os.listdir(shard_dir):
            if name.endswith(".json") and name not in ("index.json", "planned-cases.json", "fuzzingclient.json"):
                shutil.copy(os.path.join(shard_dir, name), os.path.join(outdir, name))
    with open(os.path.join(outdir, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)
    with open(os.path.join(outdir, "planned-cases.json"), "w", encoding="utf-8") as f:
        json.dump(planned, f)


def main(argv):
    if len(argv) == 4 and argv[1] == "--merge":
        merge(argv[2], int(argv[3]))
    elif len(argv) == 4:
        print(json.dumps(shard(argv[1], int(argv[2]), int(argv[3]))))
    else:
        sys.exit(__doc__)


main(sys.argv)
