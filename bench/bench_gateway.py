"""Gateway load generator: throughput with pipelining, and open-loop latency.

Starts the exchange as a subprocess (``run/start_engine.py`` on a free port, temporary data
dir) unless ``--port`` names a running one, then drives it from this process over real
TCP. The generator stays light so that it measures the server, not itself: requests are
pre-encoded, and replies are never JSON-decoded; acknowledgements are found by the ``"id":``
that only the direct answer to a request carries.

    python bench/bench_gateway.py                         # all three cases, 3 runs each
    python bench/bench_gateway.py --case pipelined --connections 8 --window 100
    python bench/bench_gateway.py --case latency --rate 10000 --duration 5
    python bench/bench_gateway.py --fsync batch,off             # journal policies side by side
    python bench/bench_gateway.py --case pipelined --cpu        # and the CPU per order of each process

Cases:
  pipelined  C connections each keeping W orders in flight; acknowledged orders per second.
  lockstep   C connections each sending one order at a time (W = 1).
  latency    open loop at a fixed rate: round trip from the scheduled send to the first
             report, p50 / p99 / p99.9 / max (sends are scheduled, so a stall counts).

``--fsync P[,P...]`` starts one engine per journal policy (``--fsync`` of start_engine.py)
and runs every case against each, then prints how each policy's throughput compares with
the last one listed (e.g. ``batch,off``: batch as a percentage of off).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exchange.runtime import install_event_loop_policy  # noqa: E402

ID_RE = re.compile(rb'"id":(\d+)')
REJECTED = b'"exec_type":"rejected"'
ERROR = b'"type":"error"'  # rate_limited, bad_request...: refused before the engine

MARKET = "BTC-USD"
MID = 10_000_00  # ticks of 0.01
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def order_lines(user_index: int, count: int, seed: int, start_id: int = 1) -> list[bytes]:
    """Limit orders around a mid, both sides, about a fifth of them crossing."""
    rng = random.Random(seed * 1000 + user_index)
    lines = []
    for i in range(count):
        side = "buy" if rng.random() < 0.5 else "sell"
        off = rng.randint(-10, 50)
        ticks = MID - off if side == "buy" else MID + off
        price = f"{ticks // 100}.{ticks % 100:02d}"
        qty = f"0.{rng.randint(1, 100):04d}"
        lines.append(
            b'{"op":"order","id":%d,"market":"%s","side":"%s","type":"limit","price":"%s","qty":"%s"}\n'
            % (start_id + i, MARKET.encode(), side.encode(), price.encode(), qty.encode())
        )
    return lines


class LoadConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.acked = 0
        self.rejected = 0
        self.on_data = None
        self.buf = b""
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # Count complete lines' ids only; keep a partial last line for the next chunk.
        buf = self.buf + data if self.buf else data
        cut = buf.rfind(b"\n") + 1
        self.buf = buf[cut:]
        whole = buf[:cut]
        if self.on_data is not None:
            self.on_data(whole)
        else:
            self.acked += whole.count(b',"id":')

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def open_connections(host: str, port: int, n: int, tag: str) -> list[LoadConnection]:
    loop = asyncio.get_running_loop()
    conns = []
    for i in range(n):
        _, proto = await loop.create_connection(LoadConnection, host, port)
        proto.transport.write(b'{"op":"login","user":"%s%d"}\n' % (tag.encode(), i))
        conns.append(proto)
    await asyncio.sleep(0.2)
    for c in conns:
        c.acked = 0
        c.rejected = 0
    return conns


async def close_connections(conns: list[LoadConnection]) -> None:
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    await asyncio.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class CpuProbe:
    """CPU of the server, its follower and this load generator over a measured window, per
    order: what each process costs, and so what two shared cores can carry at most."""

    def __init__(self, server_pid: int | None) -> None:
        self.pids = {"server": server_pid} if server_pid else {}
        if server_pid:
            for child in children(server_pid):
                self.pids["follower"] = child
        self.pids["load generator"] = os.getpid()
        self.start: dict[str, float] = {}
        self.result: dict[str, float] = {}

    def begin(self) -> None:
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def end(self, orders: int) -> None:
        """``result``: microseconds of CPU per order, per process, since ``begin``."""
        self.result = {name: (cpu_seconds(pid) - self.start[name]) / max(orders, 1) * 1e6
                       for name, pid in self.pids.items()}


def cpu_line(per_order: list[dict[str, float]]) -> str:
    names = per_order[0].keys()
    med = {n: statistics.median(d[n] for d in per_order) for n in names}
    parts = ", ".join(f"{n} {v:.1f}" for n, v in med.items())
    total = sum(med.values())
    line = f"          CPU per order (median of runs), µs: {parts}; in all {total:.1f}"
    if "server" in med and med["server"] > 0:
        line += (f" -> at most {1e6 / med['server']:,.0f}/s on the server's one core, "
                 f"{2e6 / total:,.0f}/s on two cores")
    return line


async def run_window(host: str, port: int, conns_n: int, window: int, duration: float, seed: int, tag: str,
                     probe: CpuProbe | None = None) -> tuple[float, int]:
    """Each connection keeps ``window`` orders in flight for ``duration`` seconds.

    Returns acknowledgements per second and how many of them were rejections: an engine
    whose accounts cannot pay for the load answers with cheap rejections, which must not
    pass for throughput (``--port`` names an engine this script did not fund).
    """
    conns = await open_connections(host, port, conns_n, tag)
    per_conn = max(int(200_000 * duration / conns_n) + window, 2000)
    lines = [order_lines(i, per_conn, seed) for i in range(conns_n)]
    sent = [0] * conns_n
    done = asyncio.Event()

    def refill(i: int) -> None:
        c = conns[i]
        want = c.acked + window - sent[i]
        if want > 0 and sent[i] < per_conn:
            chunk = lines[i][sent[i]:sent[i] + want]
            sent[i] += len(chunk)
            c.transport.write(b"".join(chunk))

    for i, c in enumerate(conns):
        def on_data(data: bytes, i: int = i, c: LoadConnection = c) -> None:
            c.acked += data.count(b',"id":')
            c.rejected += data.count(REJECTED) + data.count(ERROR)
            if not done.is_set():
                refill(i)
        c.on_data = on_data
    if probe is not None:
        probe.begin()
    t0 = time.perf_counter()
    for i in range(conns_n):
        refill(i)
    await asyncio.sleep(duration)
    done.set()
    elapsed = time.perf_counter() - t0
    acked = sum(c.acked for c in conns)
    if probe is not None:
        probe.end(acked)
    rejected = sum(c.rejected for c in conns)
    await close_connections(conns)
    return acked / elapsed, rejected


def run_latency(host: str, port: int, rate: int, duration: float, seed: int, tag: str, conns_n: int = 8,
                probe: CpuProbe | None = None) -> tuple[list[float], int]:
    """Open loop: sends on a schedule; latency = first report time - scheduled time.

    Returns the latencies and how many orders were rejected.

    Plain blocking sockets and two threads, not asyncio: the event loop's timers have a
    resolution of one millisecond, so pacing sub-millisecond sends from it means spinning,
    and a spinning generator takes a whole core away from the server it measures (it did:
    on 2 cores that doubled the server's tail). The sender sleeps until each send is due;
    the reader waits in ``select``.
    """
    socks = []
    for i in range(conns_n):
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b'{"op":"login","user":"%s%d"}\n' % (tag.encode(), i))
        socks.append(s)
    time.sleep(0.2)
    total = int(rate * duration)
    lines = order_lines(0, total, seed)
    scheduled = [0.0] * (total + 1)
    latencies: list[float] = []
    refused = [0]
    now = time.perf_counter
    stop = threading.Event()

    def reader() -> None:
        sel = selectors.DefaultSelector()
        bufs = {}
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
            bufs[s] = b""
        while not stop.is_set():
            for key, _ in sel.select(0.05):
                t = now()
                s = key.fileobj
                try:
                    data = s.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                buf = bufs[s] + data
                cut = buf.rfind(b"\n") + 1
                bufs[s] = buf[cut:]
                refused[0] += buf.count(REJECTED, 0, cut) + buf.count(ERROR, 0, cut)
                for m in ID_RE.finditer(buf, 0, cut):
                    rid = int(m.group(1))
                    if rid <= total and scheduled[rid]:
                        latencies.append(t - scheduled[rid])
        sel.close()

    # Log-in replies (no numeric order id of ours) are drained by the reader and ignored.
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if probe is not None:
        probe.begin()
    t0 = now()
    for i in range(total):
        target = t0 + i / rate
        delay = target - now()
        if delay > 0:
            time.sleep(delay)
        scheduled[i + 1] = target
        socks[i % conns_n].sendall(lines[i])
    deadline = now() + 5
    while len(latencies) < total and now() < deadline:
        time.sleep(0.01)
    if probe is not None:
        probe.end(len(latencies))
    stop.set()
    thread.join()
    for s in socks:
        s.close()
    return latencies, refused[0]


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def start_engine(extra: list[str]) -> tuple[subprocess.Popen[str], int, str]:
    data = tempfile.mkdtemp(prefix="bench-gw-")
    cmd = [sys.executable, str(ROOT / "run" / "start_engine.py"), "--port", "0", "--data-dir", data,
           "--log-level", "WARNING", "--demo-balances", "USD=100000000000,BTC=100000000,ACME=1000000", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"listening on [^:]+:(\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"engine did not start: {line!r}")
    return proc, int(m.group(1)), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["pipelined", "lockstep", "latency", "all"], default="all")
    ap.add_argument("--connections", type=int, default=None)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--rate", type=int, default=10_000)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=None, help="use a running exchange instead of starting one")
    ap.add_argument("--engine-arg", action="append", default=[], help="extra argument for start_engine.py")
    ap.add_argument("--fsync", default=None,
                    help="journal policy of the engine started, or several to compare: batch,off")
    ap.add_argument("--cpu", action="store_true",
                    help="also report the CPU each process spends per order (server, follower, this generator)")
    args = ap.parse_args()
    install_event_loop_policy()
    if args.fsync is None:
        run_cases(args, args.engine_arg)
        return
    if args.port is not None:
        raise SystemExit("--fsync needs an engine started here (no --port)")
    policies = [p.strip() for p in args.fsync.split(",") if p.strip()]
    results = {}
    for policy in policies:
        print(f"--- engine with --fsync {policy}")
        results[policy] = run_cases(args, [*args.engine_arg, "--fsync", policy])
    if len(policies) > 1:
        base = policies[-1]
        for policy in policies[:-1]:
            for case, value in results[policy].items():
                ref = results[base].get(case)
                if ref and case != "latency":
                    print(f"{case:9} {policy} / {base}: {value / ref:.0%} of the throughput")
                elif ref:
                    print(f"latency   {policy} p99 {value[1] * 1e3:.3f} ms vs {base} p99 {ref[1] * 1e3:.3f} ms")


def run_cases(args: argparse.Namespace, engine_args: list[str]) -> dict[str, Any]:
    """Run the chosen cases against one engine; returns median throughput / latency per case."""
    proc = None
    port = args.port
    summary: dict[str, Any] = {}
    data = None
    if port is None:
        proc, port, data = start_engine(engine_args)
    cases = ["pipelined", "lockstep", "latency"] if args.case == "all" else [args.case]
    try:
        for case in cases:
            results: list[Any] = []
            rejected: list[int] = []
            cpu: list[dict[str, float]] = []
            for run in range(args.runs):
                tag = f"{case[:3]}{run}u"
                probe = CpuProbe(proc.pid if proc is not None else None) if args.cpu else None
                if case == "pipelined":
                    c = args.connections or 8
                    rate, refused = asyncio.run(run_window(args.host, port, c, args.window, args.duration,
                                                           args.seed + run, tag, probe))
                    results.append(rate)
                elif case == "lockstep":
                    c = args.connections or 64
                    rate, refused = asyncio.run(run_window(args.host, port, c, 1, args.duration, args.seed + run,
                                                           tag, probe))
                    results.append(rate)
                else:
                    lat, refused = run_latency(args.host, port, args.rate, args.duration, args.seed + run, tag,
                                               probe=probe)
                    results.append(lat)
                rejected.append(refused)
                if probe is not None:
                    cpu.append(probe.result)
            if case == "latency":
                stats = [(percentile(r, 50), percentile(r, 99), percentile(r, 99.9), max(r), len(r)) for r in results]
                med = [statistics.median(s[k] for s in stats) for k in range(4)]
                summary[case] = med
                print(f"latency   rate {args.rate}/s x {args.duration}s, {args.runs} runs (median of runs): "
                      f"p50 {med[0]*1e3:.3f} ms  p99 {med[1]*1e3:.3f} ms  p99.9 {med[2]*1e3:.3f} ms  "
                      f"max {med[3]*1e3:.3f} ms  (acks per run: {[s[4] for s in stats]})")
            else:
                c = args.connections or (8 if case == "pipelined" else 64)
                w = args.window if case == "pipelined" else 1
                summary[case] = statistics.median(results)
                print(f"{case:9} {c} connections x window {w}: median {statistics.median(results):,.0f} "
                      f"orders/s acknowledged (runs: {', '.join(f'{r:,.0f}' for r in results)})")
            if any(rejected):
                print(f"warning: the exchange rejected or refused {sum(rejected):,} of these orders (runs: {rejected}); "
                      "rejections are cheap, so the figures above overstate it: does the engine's "
                      "--demo-balances fund the load? (see start_engine() here)")
            if cpu:
                print(cpu_line(cpu))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if data is not None:
            shutil.rmtree(data, ignore_errors=True)  # journal and ledger of the load
    return summary


if __name__ == "__main__":
    main()
