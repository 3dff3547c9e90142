"""Group-commit benchmark: what one journal fdatasync costs the event loop, and how long it takes.

Under ``--fsync batch`` the journal submits one fdatasync per group of commands through
Linux native AIO (``storage/aio.py``) and reaps it when its eventfd turns readable. The
fdatasync itself runs in the kernel; what the event loop pays is the submission and the
reaping, thousands of times a second when clients send one order at a time. This measures
both, on the caller's own thread (``time.thread_time``), over ``--cycles`` rounds of
"append 100 bytes, submit, wait for the eventfd, reap" on a file in ``--dir``, and, for
scale, a plain ``os.fdatasync`` of the same appends.

    python bench/bench_fsync.py                    # 3,000 cycles, 3 runs, a file in /tmp
    python bench/bench_fsync.py --dir data --runs 5
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from storage.aio import AsyncFsync  # noqa: E402


def aio_cycles(directory: str, cycles: int) -> tuple[float, float]:
    """CPU of the caller per submit + reap (µs), and wall time per cycle (ms)."""
    aio = AsyncFsync.create()
    if aio is None:
        raise SystemExit("native AIO fdatasync is not available here")
    fd, path = tempfile.mkstemp(dir=directory, prefix="bench-fsync-")
    try:
        cpu = 0.0
        wall = time.perf_counter()
        for _ in range(cycles):
            os.write(fd, b"x" * 100)
            t0 = time.thread_time()
            aio.submit(fd)
            cpu += time.thread_time() - t0
            select.select([aio.fileno()], [], [], 5.0)
            t0 = time.thread_time()
            aio.drain()
            result = aio.reap()
            cpu += time.thread_time() - t0
            if result != 0:
                raise SystemExit(f"fdatasync failed: {result}")
        return cpu / cycles * 1e6, (time.perf_counter() - wall) / cycles * 1e3
    finally:
        aio.close()
        os.close(fd)
        os.unlink(path)


def plain_cycles(directory: str, cycles: int) -> float:
    """Wall time per append + os.fdatasync (ms), for scale."""
    fd, path = tempfile.mkstemp(dir=directory, prefix="bench-fsync-")
    try:
        wall = time.perf_counter()
        for _ in range(cycles):
            os.write(fd, b"x" * 100)
            os.fdatasync(fd)
        return (time.perf_counter() - wall) / cycles * 1e3
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=3_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the test file goes (the disk measured)")
    args = ap.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    costs = []
    for run in range(args.runs):
        cpu, wall = aio_cycles(args.dir, args.cycles)
        plain = plain_cycles(args.dir, args.cycles)
        costs.append(cpu)
        print(f"run {run + 1}: AIO {cpu:.1f} us of the caller's CPU per submit + reap, {wall:.3f} ms "
              f"per cycle; plain os.fdatasync {plain:.3f} ms per cycle")
    print(f"event loop's cost of one group commit: median {statistics.median(costs):.1f} us")


if __name__ == "__main__":
    main()
