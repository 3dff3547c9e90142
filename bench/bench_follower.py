"""Follower benchmark: how fast the ledger and audit-log writer replays the journal.

The follower (``storage/follower.py``) runs beside the server and replays every durable
journal record through its own engine to write the trade ledger and the audit logs. It
shares the machine's two cores with the server and the clients, so every microsecond it
spends per record is taken from them under load (docs/performance.md).

This builds a data directory as ``bench/bench_restart.py`` does (a snapshot with
``--orders`` resting orders, then ``--records`` journal records: new orders, cancels and
crossing orders), with an empty ledger and no audit log, so the follower writes every
trade and every line. Then, in this process, it starts a ``Follower`` on a fresh copy and
times ``advance`` through the last record plus the final ``sync`` (ledger and audit files
written and fsynced): records per second of wall time and of this process's CPU.

    python bench/bench_follower.py                 # 20,000 orders, 300,000 records, 3 runs
    python bench/bench_follower.py --records 100000 --runs 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_restart import build  # noqa: E402

from exchange import native_modules  # noqa: E402
from exchange.markets import default_config  # noqa: E402
from exchange.runtime import tune_gc, tune_malloc  # noqa: E402
from storage.follower import Follower  # noqa: E402


def replay(data: Path, records: int) -> tuple[float, float]:
    """Wall and CPU seconds for a follower to write everything through ``records``."""
    follower = Follower(data, default_config())
    follower.start()
    wall, cpu = time.perf_counter(), time.process_time()
    done = follower.advance(records)
    follower.sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    follower.close()
    if done != records:
        raise SystemExit(f"the follower replayed {done} records, not {records}")
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", type=int, default=20_000)
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    print(f"engine modules compiled: {', '.join(native_modules()) or 'none (plain Python)'}")
    tune_malloc()
    tune_gc()  # the follower's own settings
    base = Path(tempfile.mkdtemp(prefix="bench-follower-"))
    try:
        pristine = base / "pristine"
        (pristine / "journal").mkdir(parents=True)
        info = build(pristine, args.orders, args.records, args.seed)
        # The snapshot's orders rest without trading, so an empty ledger is consistent with
        # it; with no audit log either, the follower writes every trade and every line.
        (pristine / "trades.jsonl").write_bytes(b"")
        print(f"journal {args.records:,} records ({info['journal_mb']:.1f} MB), "
              f"{info['trades']:,} trades, snapshot {args.orders:,} orders")
        rates = []
        for run in range(args.runs):
            data = base / f"run{run}"
            shutil.copytree(pristine, data)
            wall, cpu = replay(data, args.records)
            lines = sum(1 for p in (data / "logs").glob("*.log") for _ in p.open("rb"))
            rates.append(args.records / wall)
            print(f"run {run + 1}: {wall:.2f} s wall, {cpu:.2f} s CPU: {args.records / wall:,.0f} "
                  f"records/s, {cpu / args.records * 1e6:.1f} us CPU a record ({lines:,} audit lines)")
            shutil.rmtree(data)
        print(f"follower replay: median {statistics.median(rates):,.0f} records/s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
