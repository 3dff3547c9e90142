"""Engine throughput: a seeded order flow through ``Exchange.handle`` with every risk check on.

The stream (default 1,000,000 operations on BTC-USD between 100 funded accounts):
about 60 % resting limits around a drifting mid, 10 % crossing limits, 25 % cancels of
live orders and 5 % market orders. The commands are built by a first, untimed run (which
learns the order ids the engine hands out, so cancels name live orders); a fresh engine
then replays the identical list under the clock. Figures are per operation, events and
balance settlement included.

    python bench/bench_engine.py                    # 10k, 100k, 1M ops, shallow and deep book
    python bench/bench_engine.py --ops 200000 --runs 5 --book shallow
    python bench/bench_engine.py --ops 100000 --compare-plain   # compiled vs plain Python, same run
    python bench/bench_engine.py --book shallow --reference      # and a bare matcher on the same streams

``--reference`` also times a bare price-time matcher (plain Python: no balances, no fees, no
events, no validation, lazy cancels) on each stream, to tell what part of the cost's rise
with the stream's length comes from the engine and what part from the growing book itself.

With ``--compare-plain`` each case is also run by a subprocess that imports a copy of the
sources with no compiled modules beside them, so the two builds are measured side by side.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import tempfile
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if os.environ.get("BENCH_ENGINE_ROOT"):  # a plain-Python copy, see --compare-plain
    ROOT = Path(os.environ["BENCH_ENGINE_ROOT"])
sys.path.insert(0, str(ROOT))

from exchange.engine import Exchange  # noqa: E402
from exchange.runtime import tune_gc  # noqa: E402
from exchange.types import (  # noqa: E402
    CancelOrder, Command, Deposit, ExecReport, ExecType, OrderType, PlaceOrder, Side,
)
from sortedcontainers import SortedDict  # noqa: E402
from collections import deque  # noqa: E402

MARKET = "BTC-USD"
ACCOUNTS = [f"acct{i:03d}" for i in range(100)]
MID_TICKS = 10_000_00  # 10,000.00 USD


def funded_exchange() -> Exchange:
    ex = Exchange()
    for name in ACCOUNTS:
        ex.handle(Deposit(0, name, "USD", 10**18))
        ex.handle(Deposit(0, name, "BTC", 10**16))
    return ex


def deep_book_commands(rng: random.Random, orders: int = 10_000, levels: int = 2_000) -> list[Command]:
    """Resting orders spread over ``levels`` price levels on each side, far from the mid."""
    cmds: list[Command] = []
    for i in range(orders):
        side = Side.BUY if i % 2 == 0 else Side.SELL
        offset = 200 + rng.randrange(levels // 2)
        price = MID_TICKS - offset if side is Side.BUY else MID_TICKS + offset
        cmds.append(PlaceOrder(i, rng.choice(ACCOUNTS), MARKET, side, OrderType.LIMIT,
                               rng.randint(1, 100), price))
    return cmds


def build_stream(n: int, seed: int, deep: bool) -> list[Command]:
    """Build the command list by running it once, untimed, to learn live order ids."""
    rng = random.Random(seed)
    ex = funded_exchange()
    prefix = deep_book_commands(rng) if deep else []
    for cmd in prefix:
        ex.handle(cmd)
    live: list[int] = []
    forget_at = 4096
    cmds: list[Command] = list(prefix)
    mid = MID_TICKS
    rand, choice, randint = rng.random, rng.choice, rng.randint
    for i in range(n):
        ts = i + 1
        account = choice(ACCOUNTS)
        r = rand()
        if r < 0.002:
            mid += choice((-1, 1))
        if r < 0.60:  # resting limit around the mid
            side = Side.BUY if rand() < 0.5 else Side.SELL
            off = randint(1, 50)
            price = mid - off if side is Side.BUY else mid + off
            cmd: Command = PlaceOrder(ts, account, MARKET, side, OrderType.LIMIT, randint(1, 100), price)
        elif r < 0.70:  # crossing limit
            side = Side.BUY if rand() < 0.5 else Side.SELL
            off = randint(0, 20)
            price = mid + off if side is Side.BUY else mid - off
            cmd = PlaceOrder(ts, account, MARKET, side, OrderType.LIMIT, randint(1, 100), price)
        elif r < 0.95 and live:  # cancel a live order (by its owner)
            idx = randint(0, len(live) - 1)
            live[idx], live[-1] = live[-1], live[idx]
            oid = live.pop()
            cmd = CancelOrder(ts, ex.orders[oid].account if oid in ex.orders else account, oid)
        else:  # market order
            side = Side.BUY if rand() < 0.5 else Side.SELL
            cmd = PlaceOrder(ts, account, MARKET, side, OrderType.MARKET, randint(1, 100))
        events = ex.handle(cmd)
        for ev in events:
            if ev.__class__ is ExecReport and ev.exec_type is ExecType.NEW and ev.remaining:
                if cmd.__class__ is PlaceOrder and cmd.order_type is OrderType.LIMIT:
                    live.append(ev.order_id)
        if len(live) > forget_at:  # forget ids that are long gone, keep the list small
            live = [o for o in live if o in ex.orders]
            forget_at = 2 * len(live) + 4096
        cmds.append(cmd)
    return cmds


def timed_run(cmds: list[Command], skip: int) -> tuple[float, int, int, Exchange]:
    ex = funded_exchange()
    handle = ex.handle
    for cmd in cmds[:skip]:
        handle(cmd)
    body = cmds[skip:]
    gc.collect()
    trades = events = 0
    t0 = time.perf_counter()
    for cmd in body:
        out = handle(cmd)
        events += len(out)
    elapsed = time.perf_counter() - t0
    trades = ex.next_trade_id - 1
    return elapsed, trades, events, ex


class BareOrder:
    __slots__ = ("id", "qty", "dead")

    def __init__(self, order_id: int, qty: int) -> None:
        self.id = order_id
        self.qty = qty
        self.dead = False


def bare_run(cmds: list[Command], skip: int) -> float:
    """Seconds a bare price-time matcher takes over ``cmds[skip:]`` (after an untimed prefix)."""
    bids: SortedDict = SortedDict()
    asks: SortedDict = SortedDict()
    index: dict[int, BareOrder] = {}
    next_id = 1
    buy_side, limit_type = Side.BUY, OrderType.LIMIT
    t0 = time.perf_counter()
    for i, cmd in enumerate(cmds):
        if i == skip:
            t0 = time.perf_counter()
        if cmd.__class__ is PlaceOrder:
            buy = cmd.side is buy_side
            qty = cmd.qty
            limit = cmd.price if cmd.order_type is limit_type else None
            opposite = asks if buy else bids
            while qty and opposite:
                price, queue = opposite.peekitem(0 if buy else -1)
                if limit is not None and (price > limit if buy else price < limit):
                    break
                while queue and qty:
                    maker = queue[0]
                    if maker.dead:
                        queue.popleft()
                        continue
                    fill = min(qty, maker.qty)
                    qty -= fill
                    maker.qty -= fill
                    if not maker.qty:
                        queue.popleft()
                        del index[maker.id]
                if not queue:
                    del opposite[price]
            if qty and limit is not None:
                own = bids if buy else asks
                queue = own.get(limit)
                if queue is None:
                    queue = own[limit] = deque()
                order = BareOrder(next_id, qty)
                queue.append(order)
                index[next_id] = order
            next_id += 1
        elif cmd.__class__ is CancelOrder:
            gone = index.pop(cmd.order_id, None)
            if gone is not None:
                gone.dead = True
    return time.perf_counter() - t0


def engine_kind() -> str:
    import exchange

    native = exchange.native_modules()
    return f"compiled with mypyc ({', '.join(native)})" if native else "plain Python"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per case; the median is reported")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--book", choices=["shallow", "deep", "both"], default="both")
    ap.add_argument("--check", action="store_true", help="check every invariant at the end")
    ap.add_argument("--compare-plain", action="store_true",
                    help="also run every case on a plain-Python copy of the engine")
    ap.add_argument("--reference", action="store_true",
                    help="also time a bare price-time matcher (no risk, no events) on each stream")
    ap.add_argument("--default-gc", action="store_true",
                    help="keep CPython's default collector thresholds (the server tunes them)")
    args = ap.parse_args()
    if not args.default_gc:
        tune_gc()
    if args.compare_plain:
        compare_plain(args)
        return
    books = ["shallow", "deep"] if args.book == "both" else [args.book]
    print(f"python {sys.version.split()[0]}, engine {engine_kind()}, "
          f"gc {'default' if args.default_gc else 'tuned as in the server'}, "
          f"{args.runs} runs per case, median reported")
    extra = f" {'bare ops/s':>11} {'bare us/op':>10}" if args.reference else ""
    print(f"{'book':8} {'ops':>9} {'ops/s':>10} {'us/op':>7} {'trades':>9} {'events/op':>9} {'resting':>8} "
          f"{'peak RSS MB':>11}{extra}")
    for book in books:
        for n in args.ops:
            cmds = build_stream(n, args.seed, book == "deep")
            skip = 10_000 if book == "deep" else 0
            rates = []
            for _ in range(args.runs):
                elapsed, trades, events, ex = timed_run(cmds, skip)
                rates.append(n / elapsed)
                if args.check:
                    ex.check_invariants()
                resting = len(ex.orders)
                del ex  # the next run must not share the heap (and the collector) with this engine
                gc.collect()
            rate = statistics.median(rates)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            extra = ""
            if args.reference:
                bare = []
                for _ in range(args.runs):
                    bare.append(n / bare_run(cmds, skip))
                    gc.collect()
                bare_rate = statistics.median(bare)
                extra = f" {bare_rate:>11,.0f} {1e6 / bare_rate:>10.2f}"
            print(f"{book:8} {n:>9,} {rate:>10,.0f} {1e6 / rate:>7.2f} {trades:>9,} {events / n:>9.2f} "
                  f"{resting:>8,} {peak:>11.0f}{extra}")
            del cmds
            gc.collect()


def compare_plain(args: argparse.Namespace) -> None:
    """Alternate compiled and plain runs of the same cases, each in a fresh process."""
    plain = Path(tempfile.mkdtemp(prefix="bench-plain-"))
    shutil.copytree(ROOT / "exchange", plain / "exchange", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    base = [sys.executable, str(Path(__file__).resolve()), "--runs", "1", "--book", args.book,
            "--ops", *map(str, args.ops), "--seed", str(args.seed)]
    if args.default_gc:
        base.append("--default-gc")
    try:
        for run in range(args.runs):
            for label, env in (("compiled", {}), ("plain", {"BENCH_ENGINE_ROOT": str(plain)})):
                out = subprocess.run(base, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
                for line in out.splitlines():
                    if line.startswith(("shallow", "deep")):
                        print(f"run {run + 1} {label:8} {line}", flush=True)
    finally:
        shutil.rmtree(plain, ignore_errors=True)


if __name__ == "__main__":
    main()
