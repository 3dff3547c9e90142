"""Wall time of an embedded scheduled run (``--schedule``) by its number of slots.

A scheduled run saves its state after every slot (twice: in progress, then done). When each
save rewrote the whole file, a plan's time grew with its square (29 s for 4,000 slots);
``simulation.scheduler.RunStore`` now appends a line per save and rewrites the file only
every few hundred. This runs ``run/start_simulation.py --embedded --schedule`` on a plan of
two accounts and ``--slots`` slots, in a temporary data directory, and prints the wall time.

    python bench/bench_schedule.py --slots 4000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(slots: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="bench-sched-"))
    try:
        config = tmp / "sched.json"
        config.write_text(json.dumps({"embedded": True, "schedule": {
            "accounts": ["bench-a", "bench-b"], "trades_per_account": slots // 2,
            "funding": {"USD": "100000000", "BTC": "100000", "ACME": "1000000"}}}))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "run" / "start_simulation.py"), "--schedule", "--config", str(config),
             "--data-dir", str(tmp / "data")],
            cwd=ROOT, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"the run failed ({proc.returncode}): {proc.stderr[-500:]}")
        return elapsed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=4000, help="slots in the plan (two per trade)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    times = [one_run(args.slots) for _ in range(args.runs)]
    print(f"scheduled run of {args.slots} slots, embedded: median {statistics.median(times):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
