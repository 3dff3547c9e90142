"""Simulation throughput: agent orders per second of wall time, embedded and over TCP.

Embedded: the default agent mix (random=20, mm=2, twap=1, passive=1) against the in-process
engine in simulated time, no latency model, ledger written; the figure is orders the agents
sent (limit, market, post-only, IOC; cancels and modifies not counted) per second of wall
time, funding excluded. TCP: the same mix against ``run/start_engine.py`` started here as a
separate process on a free port, for a fixed wall time at the highest ``--rate``.

    python bench/bench_simulation.py                     # both
    python bench/bench_simulation.py --orders 200000 --runs 3 --skip-tcp
    python bench/bench_simulation.py --skip-embedded --tcp-runs 3 --tcp-agents random=60,mm=2,twap=1,passive=1
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exchange import native_modules  # noqa: E402
from exchange.runtime import install_event_loop_policy, tune_gc, tune_malloc  # noqa: E402
from simulation.runner import SimConfig, parse_agents, run_embedded, run_tcp  # noqa: E402


def embedded(orders: int, seed: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SimConfig(orders=orders, duration_s=None, seed=seed, embedded=True,
                        data_dir=Path(tmp), progress=False)
        report = run_embedded(cfg, stream=None)
    return report["orders_sent"] / report["elapsed_s"], report


async def tcp(seconds: float, rate: float, agents: dict[str, int] | None) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run" / "start_engine.py"), "--port", "0", "--data-dir", tmp,
             "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert proc.stdout is not None
            match = re.search(r"listening on (\S+):(\d+)", proc.stdout.readline())
            assert match, "the engine did not start"
            cfg = SimConfig(duration_s=seconds, orders=None, rate=rate, host=match.group(1),
                            port=int(match.group(2)), progress=False)
            if agents:
                cfg.agents = agents
            report = await asyncio.wait_for(run_tcp(cfg, stream=None), seconds + 120)
        finally:
            proc.terminate()
            proc.wait(30)
    return report["orders_sent"] / report["elapsed_s"], report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=100_000, help="embedded: agent orders per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tcp-seconds", type=float, default=10.0)
    ap.add_argument("--tcp-rate", type=float, default=100_000.0, help="TCP: target orders/s (as fast as it goes)")
    ap.add_argument("--tcp-runs", type=int, default=1)
    ap.add_argument("--tcp-agents", type=parse_agents, default=None,
                    help="TCP: agent counts, e.g. random=60,mm=2 (default: the simulation's mix)")
    ap.add_argument("--skip-tcp", action="store_true")
    ap.add_argument("--skip-embedded", action="store_true")
    args = ap.parse_args()
    tune_gc()
    tune_malloc()  # as run/start_simulation.py does
    print(f"python {sys.version.split()[0]}, compiled modules: {', '.join(native_modules()) or 'none'}")
    rates = []
    for i in range(0 if args.skip_embedded else args.runs):
        rate, report = embedded(args.orders, seed=i + 1)
        rates.append(rate)
        print(f"embedded run {i + 1}: {report['orders_sent']} orders in {report['elapsed_s']} s wall "
              f"= {rate:,.0f} orders/s ({report['trades']} trades, {report['cancels']} cancels, "
              f"{report['modifies']} modifies, {report['simulated_s']} s simulated)")
    if rates:
        print(f"embedded: median {statistics.median(rates):,.0f} agent orders/s of wall time")
    if not args.skip_tcp:
        install_event_loop_policy()
        rates = []
        for i in range(args.tcp_runs):
            rate, report = asyncio.run(tcp(args.tcp_seconds, args.tcp_rate, args.tcp_agents))
            rates.append(rate)
            lat = report.get("ack_latency_us", {})
            print(f"tcp run {i + 1}: {report['orders_sent']} orders in {report['elapsed_s']} s = "
                  f"{rate:,.0f} orders/s, {report['trades']} trades, ack p50 {lat.get('p50')} us "
                  f"p99 {lat.get('p99')} us")
        print(f"tcp: median {statistics.median(rates):,.0f} agent orders/s")


if __name__ == "__main__":
    main()
