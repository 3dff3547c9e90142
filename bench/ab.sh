#!/bin/sh
# Same-run A/B of one benchmark between two checkouts, for a noisy machine: alternate N
# single runs (A, B, A, B, ...) and print each side's median and every value.
#
#   bench/ab.sh A_DIR B_DIR N SCRIPT [ARGS...]
#   bench/ab.sh /tmp/base . 10 bench/bench_simulation.py --runs 1 --skip-tcp
#
# Each checkout runs its own SCRIPT with its own .venv. A compiled worktree of an older commit:
#   git worktree add /tmp/base <commit> && ln -s "$PWD/.venv" /tmp/base/.venv
#   touch -d 2000-01-01 /tmp/base/pyproject.toml && (cd /tmp/base && make setup)
# (without the touch, its make re-installs the shared .venv from /tmp/base; then run
# `.venv/bin/pip install -q -e .` here to point it back) and `git worktree remove --force
# /tmp/base` afterwards.
# The figure taken from a run is the last "median <number>" it prints.
set -eu
[ $# -ge 4 ] || { sed -n '2,13p' "$0"; exit 2; }
a=$1; b=$2; n=$3; shift 3
out=$(mktemp)
i=0
while [ "$i" -lt "$n" ]; do
    for d in "$a" "$b"; do
        v=$(cd "$d" && .venv/bin/python "$@" | grep -o 'median [0-9,.]*' | tail -n 1 | tr -d , | cut -d' ' -f2)
        echo "$d $v" >> "$out"
    done
    i=$((i + 1))
done
python3 - "$out" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    side, value = line.split()
    runs[side].append(float(value))
for side, values in runs.items():
    print(f"{side}: median {statistics.median(values):,.0f} of {len(values)}: "
          + " ".join(f"{v:,.0f}" for v in values))
PY
rm -f "$out"
