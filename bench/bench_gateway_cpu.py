"""The gateway's CPU per order in one process: no sockets, no journal, no other process.

``bench_gateway.py`` measures the real thing over TCP, with the follower and the load
generator sharing the two cores, so its figures move by 10-20 % with the host. This one
feeds ``Session.data_received`` directly (eight logged-in sessions, chunks of 100 of
``bench_gateway.py``'s order lines, replies written to a transport that drops them) and
reads the process's CPU time: the decoding, checks, engine, routing and formatting of an
order, with far less noise, for comparing two builds.

    python bench/bench_gateway_cpu.py --runs 5
    python bench/bench_gateway_cpu.py --root /tmp/base --runs 5   # another checkout's code
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class NullTransport(asyncio.Transport):
    """Takes every write and drops it; never asks the gateway to slow down."""

    def write(self, data: Any) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def one_run(orders: int) -> float:
    """Microseconds of CPU per order for ``orders`` orders fed to a fresh gateway."""
    from bench_gateway import order_lines

    from exchange.engine import Exchange
    from exchange.gateway import Gateway, GatewayOptions, Session
    from exchange.markets import default_config

    gateway = Gateway(Exchange(default_config()),
                      GatewayOptions(demo_balances={"USD": "100000000000", "BTC": "100000000"}))
    sessions = []
    for user in range(8):
        session = Session(gateway)
        session.connection_made(NullTransport())
        session.data_received(b'{"op":"login","user":"u%d"}\n' % user)
        sessions.append(session)
    await asyncio.sleep(0)
    rounds = max(1, orders // 800)
    chunks = [[b"".join(order_lines(user, 100, 7, start_id=1 + 100 * k)) for k in range(rounds)]
              for user in range(8)]
    gc.collect()
    gc.freeze()
    start = time.process_time()
    for k in range(rounds):
        for user, session in enumerate(sessions):
            session.data_received(chunks[user][k])
        await asyncio.sleep(0)  # the replies' flush, as the loop would run it
    return (time.process_time() - start) * 1e6 / (rounds * 800)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3, help="each in a fresh process")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose code to measure")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.root.resolve()
    if args.child:
        sys.path[:0] = [str(root), str(root / "bench"), str(ROOT / "bench")]
        from exchange.runtime import install_event_loop_policy, tune_malloc

        tune_malloc()
        install_event_loop_policy()
        print(asyncio.run(one_run(args.orders)))
        return
    values = []
    for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--orders", str(args.orders), "--root", str(root)],
            cwd=root, check=True, capture_output=True, text=True,
        ).stdout
        values.append(float(out.split()[-1]))
    runs = " / ".join(f"{v:.2f}" for v in values)
    print(f"gateway CPU per order ({root}): median {statistics.median(values):.2f} us (runs: {runs})")


if __name__ == "__main__":
    main()
