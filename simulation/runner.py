"""Running a simulation: build the agents, drive them (embedded or TCP), show progress, report.

``run/start_simulation.py`` parses the command line into a ``SimConfig`` and calls ``main``.
Agent runs (the default) and scheduled budget runs (``--schedule``, ``--resume``, ``--list``,
see ``simulation/scheduler.py``) share the options.

Embedded mode is synchronous under the hood: the kernel of ``simulation/embedded.py`` drives
the agents' coroutines in simulated time, and the progress line is refreshed every couple of
thousand kernel steps from the wall clock. TCP mode runs each agent as an asyncio task on
its own connection; a progress task refreshes the line twice a second. Either way the run
ends at ``--duration`` (simulated time in embedded mode) or after ``--orders`` orders, or on
Ctrl-C; the agents then cancel what they still have resting and the report is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any, Callable, Coroutine, TextIO

from client.client import port_number
from exchange.markets import ConfigError, MarketConfig, default_config, load_config
from exchange.protocol import DEFAULT_PORT
from exchange.runtime import CommandLine, install_event_loop_policy, tune_gc, tune_malloc
from simulation.agents import AGENT_KINDS, Agent, MarketProfile, RunControl
from simulation.embedded import EmbeddedExchange, parse_duration_ns, parse_latency
from simulation.ledger_writer import LedgerWriterError
from storage.lock import DataDirBusy
from simulation.gateway import Gateway, GatewayConnectionError, GatewayError
from simulation.report import build_report, failures_by_reason, format_report, last_prices, settle_outcomes
from simulation.tcp import BookMirror, Credentials, TcpGateway, fetch_config, market_differences, market_prices

DEFAULT_AGENTS = {"random": 20, "mm": 2, "twap": 1, "passive": 1}
DEFAULT_PROFILES: dict[str, dict[str, str]] = {
    "BTC-USD": {"mid": "30000.00", "qty_min": "0.001", "qty_max": "0.05"},
    "ACME-USD": {"mid": "100.00", "qty_min": "1", "qty_max": "20"},
}
DEFAULT_FUNDING: dict[str, dict[str, str]] = {
    "random": {"USD": "100000", "BTC": "2", "ACME": "500"},
    "mm": {"USD": "1000000", "BTC": "20", "ACME": "5000"},
    "twap": {"USD": "1000000", "BTC": "20", "ACME": "5000"},
    "passive": {"USD": "500000"},
}


class SimulationError(Exception):
    """A problem to tell the user in one line (bad option, exchange not running...)."""


@dataclass
class SimConfig:
    agents: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_AGENTS))
    duration_s: float | None = 30.0
    orders: int | None = None
    rate: float = 500.0  # orders per second over all agents (simulated time when embedded)
    seed: int = 1
    embedded: bool = False
    latency: str | None = None
    markets_file: Path | None = None
    trade_markets: list[str] | None = None  # which markets the agents trade (default all)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    funding: dict[str, dict[str, str]] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    prefix: str | None = None  # account name prefix (TCP default: unique per run; "" with credentials)
    credentials: Credentials | None = None  # tokens for an exchange in --auth keys mode (TCP)
    report_file: Path | None = None
    plot_file: Path | None = None
    progress: bool = True
    schedule: dict[str, Any] | None = None


# --------------------------------------------------------------------------- building


def market_config(cfg: SimConfig) -> MarketConfig:
    try:
        return load_config(cfg.markets_file) if cfg.markets_file else default_config()
    except ConfigError as exc:
        raise SimulationError(str(exc)) from None


def build_agents(
    cfg: SimConfig, config: MarketConfig, gateways: Callable[[str], Gateway], control: RunControl,
) -> list[Agent]:
    markets = cfg.trade_markets or list(config.markets)
    for m in markets:
        if m not in config.markets:
            raise SimulationError(f"unknown market {m!r} (have {', '.join(config.markets)})")
    total = sum(n for kind, n in cfg.agents.items() if kind in ("random", "mm", "passive")) or 1
    interval = total / cfg.rate if cfg.rate > 0 else 0.1
    # The random traders carry --rate: each sends rate / n of the orders (the market makers',
    # the TWAP's and the passive buyer's come on top: about a tenth with the default mix).
    n_random = cfg.agents.get("random", 0)
    pace = {"mm": max(interval, 0.05)}
    if cfg.rate > 0 and n_random > 0:
        pace["random"] = n_random / cfg.rate
    prefix = cfg.prefix if cfg.prefix is not None else ""
    agents: list[Agent] = []
    for kind, count in cfg.agents.items():
        cls = AGENT_KINDS.get(kind)
        if cls is None:
            raise SimulationError(f"unknown agent kind {kind!r} (have {', '.join(AGENT_KINDS)})")
        given = cfg.funding.get(kind)
        if given:
            unknown = [a for a in given if a not in config.assets]
            if unknown:
                raise SimulationError(f"funding for {kind}: the markets have no asset {unknown[0]!r} "
                                      f"(they have {', '.join(sorted(config.assets))})")
            funding = dict(given)
        else:
            funding = default_funding(kind, config, control.profiles)
        params = dict(cfg.params.get(kind, {}))
        if "market" in params and params["market"] not in config.markets:
            raise SimulationError(f"params for {kind}: unknown market {params['market']!r} "
                                  f"(have {', '.join(config.markets)})")
        check_params(kind, params, config, markets)
        for i in range(count):
            name = f"{prefix}{kind}{i + 1:02d}"
            agent_markets = markets
            if kind in ("twap", "passive") and "market" not in params:
                agent_markets = [markets[i % len(markets)]]
            agent = cls(name, gateways(name), control, agent_markets, seed=cfg.seed,
                        funding=funding, interval=pace.get(kind, interval), params=params)
            agents.append(agent)
    return agents


def _fraction(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _count(v: Any) -> bool:
    return _whole(v) and v >= 1


# Each agent kind's parameters: (what a valid value is, how to say it). A misspelt name or a
# value an agent would misread (a TWAP "sideways" bought) is refused before the run starts.
PARAMS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "random": {
        "limit_ratio": (_fraction, "a fraction from 0 to 1"),
        "cancel_ratio": (_fraction, "a fraction from 0 to 1"),
        "max_offset_bps": (_whole, "a whole number of basis points, 0 or more"),
        "max_open": (_count, "a whole number, at least 1"),
    },
    "mm": {
        "spread_bps": (_count, "a whole number of basis points, at least 1"),
        "size_lots": (_count, "a whole number of lots, at least 1"),
        "requote_ticks": (_count, "a whole number of ticks, at least 1"),
        "max_age": (lambda v: _number(v) and v > 0, "a number of seconds above 0"),
        "max_inventory_lots": (_count, "a whole number of lots, at least 1"),
    },
    "twap": {
        "market": (lambda v: isinstance(v, str), "a market symbol"),
        "side": (lambda v: v in ("buy", "sell"), '"buy" or "sell"'),
        "qty_lots": (_count, "a whole number of lots, at least 1"),
        "window": (lambda v: _number(v) and v > 0, "a number of seconds above 0"),
        "slices": (_count, "a whole number, at least 1"),
        "slice_type": (lambda v: v in ("market", "limit"), '"market" or "limit"'),
        "limit_ticks": (_whole, "a whole number of ticks, 0 or more"),
    },
    "passive": {
        "market": (lambda v: isinstance(v, str), "a market symbol"),
        "qty_lots": (_count, "a whole number of lots, at least 1"),
        "price_cap": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a price, e.g. \"101.50\""),
    },
}


def check_params(kind: str, params: dict[str, Any], config: MarketConfig, markets: list[str]) -> None:
    """Refuse parameters an agent of this kind does not take, or would misread (``markets``:
    those the run trades, where an agent without a ``market`` may be put)."""
    known = PARAMS.get(kind, {})
    for name, value in params.items():
        if name not in known:
            raise SimulationError(f"params for {kind}: unknown parameter {name!r} "
                                  f"(known: {', '.join(known) or 'none'})")
        valid, what = known[name]
        if not valid(value):
            raise SimulationError(f"params for {kind}: {name} must be {what}, not {value!r}")
    if "price_cap" in params:
        for symbol in [params["market"]] if params.get("market") else markets:
            spec = config.markets[symbol]
            try:
                if spec.price_ticks(str(params["price_cap"])) <= 0:
                    raise ValueError("not positive")
            except (ValueError, ArithmeticError) as exc:
                raise SimulationError(f"params for {kind}: price_cap {params['price_cap']!r} is not a price "
                                      f"on {symbol}'s grid ({getattr(exc, 'message', exc)})") from None


def default_funding(kind: str, config: MarketConfig, profiles: dict[str, MarketProfile]) -> dict[str, str]:
    """The built-in funding of the assets these markets have, and for an asset it does not
    know (a --markets file's): as a quote asset, the built-in USD amount's worth (where
    markets lead to USD at their starting mids; else as many units); as a base asset, half
    the worth of the agent's funding in that market's quote at the starting mid (at least
    the market's minimum order), as BTC and ACME have. Without this the agents of such a
    market could only ever buy, and it would never trade."""
    builtin = DEFAULT_FUNDING[kind]
    out = {a: v for a, v in builtin.items() if a in config.assets}
    budget = Decimal(builtin.get("USD", "0"))
    if not budget:
        return out
    worth = _usd_worth(config, profiles)
    for spec in config.markets.values():  # quotes first: a base is valued against its quote
        quote = spec.quote
        if quote.name not in out:
            unit = Decimal(1).scaleb(-quote.decimals)
            amount = (budget / worth.get(quote.name, Decimal(1))).quantize(unit, rounding=ROUND_DOWN)
            if amount > 0:
                out[quote.name] = format(amount, "f")
    if kind == "passive":  # it only buys
        return out
    for symbol, spec in config.markets.items():
        base = spec.base
        if base.name in out or spec.quote.name not in out or symbol not in profiles:
            continue
        mid = Decimal(spec.format_price(profiles[symbol].mid))
        unit = Decimal(1).scaleb(-base.decimals)
        amount = (Decimal(out[spec.quote.name]) / 2 / mid).quantize(unit, rounding=ROUND_DOWN)
        out[base.name] = format(max(amount, Decimal(spec.format_qty(spec.min_qty_lots))), "f")
    return out


def _usd_worth(config: MarketConfig, profiles: dict[str, MarketProfile]) -> dict[str, Decimal]:
    """Each asset's worth in USD at the markets' starting mids, where markets lead there."""
    worth = {"USD": Decimal(1)} if "USD" in config.assets else {}
    mids = {symbol: Decimal(spec.format_price(profiles[symbol].mid))
            for symbol, spec in config.markets.items() if symbol in profiles}
    changed = True
    while changed:
        changed = False
        for symbol, spec in config.markets.items():
            mid = mids.get(symbol)
            if not mid:
                continue
            base, quote = spec.base.name, spec.quote.name
            if quote in worth and base not in worth:
                worth[base] = mid * worth[quote]
                changed = True
            elif base in worth and quote not in worth:
                worth[quote] = worth[base] / mid
                changed = True
    return worth


def profiles_for(cfg: SimConfig, config: MarketConfig) -> dict[str, MarketProfile]:
    out = {}
    for symbol, spec in config.markets.items():
        overrides = dict(DEFAULT_PROFILES.get(symbol, {}))
        overrides.update(cfg.profiles.get(symbol, {}))
        try:
            out[symbol] = MarketProfile.build(spec, overrides)
        except Exception as exc:
            raise SimulationError(f"market profile for {symbol}: {exc}") from None
    return out


# --------------------------------------------------------------------------- progress


class Progress:
    """The live status line: elapsed, orders, fills, rate, rejects/errors, best bid/ask."""

    def __init__(self, stream: TextIO | None, config: MarketConfig) -> None:
        self.stream = stream
        self.config = config
        self.tty = bool(stream is not None and stream.isatty())
        self.started = time.monotonic()
        self.last_print = 0.0
        self.samples: list[dict[str, Any]] = []

    def update(
        self, agents: list[Agent], control: RunControl, tops: dict[str, tuple[int | None, int | None]],
        sim_s: float | None = None, force: bool = False,
    ) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        fills = sum(a.wallet.trades for a in agents)
        rejects = sum(a.stats.rejects for a in agents)
        errors = sum(sum(a.stats.errors.values()) for a in agents)
        marks = last_prices(agents)
        self.samples.append({
            "t": sim_s if sim_s is not None else elapsed,
            "tops": dict(tops), "marks": marks,
            "pnl": {a.name: a.pnl(marks) for a in agents} if len(self.samples) < 2000 else None,
        })
        if self.stream is None or (not force and now - self.last_print < 0.5):
            return
        self.last_print = now
        books = "  ".join(
            f"{m} {self._px(m, b)}/{self._px(m, a)}" for m, (b, a) in tops.items()
        )
        sim = f" sim {sim_s:.1f}s" if sim_s is not None else ""
        rate = control.orders / elapsed if elapsed > 0 else 0.0
        line = (f"{elapsed:6.1f}s{sim}  orders {control.orders}  fills {fills}  "
                f"{rate:,.0f}/s  rejects {rejects}  errors {errors}  {books}")
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _px(self, market: str, ticks: int | None) -> str:
        return "-" if ticks is None else self.config.markets[market].format_price(ticks)

    def done(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (an embedded query) and return its value."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("an embedded query suspended")


# --------------------------------------------------------------------------- embedded


def _on_sigint(handler: Any) -> Any:
    """Install ``handler`` for SIGINT; returns the one it replaces (None where this thread may
    not set handlers, and nothing changes)."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        return None


def close_embedded(exchange: EmbeddedExchange, failed: bool = False) -> None:
    """Close the in-process exchange; a ledger writer that failed is the run's error."""
    try:
        exchange.close()
    except LedgerWriterError as exc:
        if not failed:
            raise SimulationError(f"the trade ledger could not be written ({exc})") from None


def run_embedded(
    cfg: SimConfig, stream: TextIO | None = sys.stderr, out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the agents against an in-process exchange in simulated time; return the report.

    ``out``, if given, receives the ``agents`` and the ``exchange`` (for tests and tools).
    """
    config = market_config(cfg)
    try:
        latency = parse_latency(cfg.latency)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    try:
        exchange = EmbeddedExchange(config, seed=cfg.seed, latency=latency, data_dir=cfg.data_dir)
    except DataDirBusy as exc:
        raise SimulationError(str(exc)) from None
    except OSError as exc:  # a file where the directory should be, no permission, ...
        raise SimulationError(f"cannot use {cfg.data_dir} as the data directory: {_why(exc)}") from None
    try:
        control = RunControl(profiles_for(cfg, config), cfg.orders)
        agents = _agents_or_error(cfg, config, exchange.session, control)
    except BaseException:
        exchange.close()
        raise
    if out is not None:
        out.update(agents=agents, exchange=exchange, control=control)
    kernel = exchange.kernel
    progress = Progress(stream if cfg.progress else None, config)
    observer = agents[0].gw if agents else exchange.session("__observer")

    def tops() -> dict[str, tuple[int | None, int | None]]:
        return {m: _now(observer.top(m)) for m in config.markets}

    stall = StallWatch(agents) if cfg.duration_s is None else None
    ticks = [0]
    # The progress line needs a sample now and then; a plot needs enough of them to draw
    # lines even for a short run, so sample more often when one is asked for.
    every = 256 if cfg.plot_file else 4096

    def tick() -> None:
        elapsed = (kernel.now - kernel.start_ns) / 1e9
        progress.update(agents, control, tops(), elapsed)
        ticks[0] += 1
        # Every 4,096 kernel steps whatever the progress sampling (a --plot samples more
        # often): a seeded run stops at the same step with or without a plot.
        if stall is not None and ticks[0] % (4096 // every) == 0 and stall.stalled(agents, control, elapsed):
            control.stopping = True

    # Fund everyone first (at simulated time zero), then start trading.
    for agent in agents:
        _ = kernel.spawn(agent.fund(), agent.name)
    kernel.run()
    if kernel.failures:  # as over TCP: a run whose agents cannot be funded does not start
        why = kernel.failures[0][1]
        exchange.close()
        raise SimulationError(f"funding the agents failed: {why}")
    start_ns = kernel.now
    for agent in agents:
        _ = kernel.spawn(agent.run(), agent.name)
    until = None if cfg.duration_s is None else start_ns + int(cfg.duration_s * 1e9)
    wall = time.perf_counter()
    # Ctrl-C sets a flag the kernel looks at between steps, rather than raising
    # KeyboardInterrupt wherever the run happens to be: inside a compiled agent coroutine
    # that leaves the coroutine broken (closing it then failed, or aborted the process),
    # and inside a hand-over to the ledger's writer it would cut a batch in two.
    ctrl_c: list[bool] = []
    previous = _on_sigint(lambda *_: ctrl_c.append(True))
    try:
        # An agent that raised is a bug or a bad parameter, never the network: the run stops
        # there rather than go on without it (with --orders, the others might never reach
        # the count, and simulated time would run on for good).
        kernel.run(until, stop=lambda: control.stopping or bool(ctrl_c) or exchange.ledger_error is not None,
                   tick=tick, tick_every=every, stop_on_failure=True)
        if control.stopping and not ctrl_c:  # the order count is used up: let in-flight requests land
            kernel.run(kernel.now + 1, tick=None)
    except KeyboardInterrupt:
        ctrl_c.append(True)  # a second Ctrl-C while the first one's stop is on its way
    finally:
        if previous is not None:
            _on_sigint(previous)
    interrupted = bool(ctrl_c)
    try:
        exchange.flush_ledger(wait=True)  # the ledger is written in batches: its last one counts too
    except LedgerWriterError as exc:
        close_embedded(exchange, failed=True)
        raise SimulationError(f"the run stopped: the trade ledger could not be written ({exc})") from None
    elapsed = time.perf_counter() - wall
    sim_elapsed = (kernel.now - start_ns) / 1e9
    control.stopping = True
    failures = [f"{name}: {exc!r}" for name, exc in kernel.failures]
    kernel.close_all()
    left = [0]

    async def wind_down(agent: Agent) -> None:
        left[0] += await agent.shutdown()

    for agent in agents:
        _ = kernel.spawn(wind_down(agent), agent.name)
    kernel.run()  # to an empty heap: every report still on its way (a latency model) arrives
    stopped = bool(failures)
    failures = [f"{name}: {exc!r}" for name, exc in kernel.failures]  # the clean-up's too
    for agent in agents:
        agent.sync()  # and is counted
    progress.update(agents, control, tops(), sim_elapsed, force=True)
    progress.done()
    close_embedded(exchange)
    report = build_report(
        agents, config, mode="embedded", elapsed_s=elapsed, sim_elapsed_s=sim_elapsed,
        orders_sent=control.orders, interrupted=interrupted, seed=cfg.seed, failures=failures,
    )
    if stopped:
        report["stopped_early"] = "an agent failed"
    elif stall is not None and stall.fired:
        report["stopped_early"] = stall.reason
    elif not interrupted and (short := short_of_orders(control, agents)):
        report["stopped_early"] = short
    settle_outcomes(report, left[0])
    report["latency"] = cfg.latency or "none"
    report["ledger"] = str(Path(cfg.data_dir) / "trades.jsonl")
    _finish(cfg, report, progress, config)
    return report


# --------------------------------------------------------------------------- TCP


async def run_tcp(
    cfg: SimConfig, stream: TextIO | None = sys.stderr, stop_event: asyncio.Event | None = None,
    out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the agents against a running exchange, one connection each (plus the shared book
    mirror's); return the report.

    ``stop_event`` replaces the Ctrl-C handler (set it to stop early); ``out`` receives the
    ``agents``.
    """
    given = market_config(cfg) if cfg.markets_file is not None else None
    config = await exchange_markets(cfg, given, f"the markets file {cfg.markets_file}")
    if cfg.prefix is None:
        # With credentials the accounts are the exchange's listed ones: their names as given.
        cfg.prefix = "" if cfg.credentials is not None else fresh_prefix()
    profiles = profiles_for(cfg, config)
    try:
        prices = await market_prices(cfg.host, cfg.port, config)
    except GatewayConnectionError as exc:
        raise SimulationError(f"cannot reach the exchange at {cfg.host}:{cfg.port}: {exc.message}") from None
    except GatewayError as exc:  # the exchange refused the query
        raise SimulationError(f"cannot read the exchange's books: {exc.message}") from None
    for market, ticks in prices.items():
        profiles[market].mid = ticks  # where the market is, not where a fresh one would start
    control = RunControl(profiles, cfg.orders)
    names: list[str] = []
    agents = _agents_or_error(cfg, config, lambda name: names.append(name) or _Placeholder(name, config), control)  # type: ignore[func-returns-value]
    try:
        mirror = await BookMirror.start(cfg.host, cfg.port, config)
    except GatewayConnectionError as exc:
        raise SimulationError(
            _unreachable(cfg, exc.message)
        ) from None
    except GatewayError as exc:  # e.g. a --markets file naming a market it does not have
        raise SimulationError(f"cannot follow the exchange's books: {exc.message}") from None
    gateways = await _connect_all(cfg, config, names, mirror)
    if cfg.credentials is not None and cfg.credentials.admin is None:
        for agent in agents:  # no admin to deposit: the agents trade what their accounts hold
            agent.funding = {}
    halt = asyncio.Event()
    for agent, gw in zip(agents, gateways):
        agent.gw = gw
        gw.halt = halt
    if out is not None:
        out.update(agents=agents, control=control, config=config)
    progress = Progress(stream if cfg.progress else None, config)
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    hurry = asyncio.Event()  # Ctrl-C again, or once the run is ending: skip the final cancels
    ending: list[bool] = []

    def on_signal() -> None:
        if stop.is_set() or ending:
            hurry.set()
        stop.set()

    if stop_event is None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass
    interrupted = False
    stopped_early = ""
    left_resting, cut_short = 0, False
    failures: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    tops: dict[str, tuple[int | None, int | None]] = {m: (None, None) for m in config.markets}
    wall = time.perf_counter()
    try:
        funded = await asyncio.wait_for(
            asyncio.gather(*(a.fund() for a in agents), return_exceptions=True), 30,
        )
        refused = [r for r in funded if isinstance(r, BaseException)]
        if refused:
            raise SimulationError(f"funding the agents failed: {refused[0]}")
        wall = time.perf_counter()
        tasks = [loop.create_task(a.run(), name=a.name) for a in agents]
        deadline = None if cfg.duration_s is None else time.monotonic() + cfg.duration_s
        stall = StallWatch(agents) if deadline is None else None
        while True:
            if stop.is_set():
                interrupted = True
                break
            if control.stopping or all(t.done() for t in tasks):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if stall is not None and stall.stalled(agents, control, time.perf_counter() - wall):
                stopped_early = stall.reason
                break
            tops = await _tcp_tops_of_any(gateways, config, tops)
            progress.update(agents, control, tops)
            tick = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(stop.wait(), tick)
            except asyncio.TimeoutError:
                pass
        control.stopping = True
        ending.append(True)
        halt.set()
        done, pending = await asyncio.wait(tasks, timeout=5)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                failures.append(f"{task.get_name()}: {task.exception()!r}")
        elapsed = time.perf_counter() - wall
        failed = [t.done() and not t.cancelled() and t.exception() is not None for t in tasks]
        if all(failed):
            stopped_early = "every agent failed"
        elif any(failed) and all(f or a.done for f, a in zip(failed, agents)):  # the rest had finished
            stopped_early = "every agent still trading failed"
        elif not stopped_early and not interrupted:
            stopped_early = short_of_orders(control, agents)
        left_resting, cut_short = await _wind_down(agents, gateways, hurry)
        if hurry.is_set():
            interrupted = True  # Ctrl-C during the final cancels: not a finished run
        for agent in agents:
            agent.sync()
        if not cut_short:
            tops = await _tcp_tops_of_any(gateways, config, tops, exact=True)
        progress.update(agents, control, tops, force=True)
        progress.done()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        unfinished = [t for t in tasks if not t.done()]
        for task in unfinished:  # the run failed: its agents stop with it
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished, timeout=5)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # reported in failures, or superseded by the run's error
        await asyncio.gather(mirror.close(), close_gateways(gateways), return_exceptions=True)
    latencies = [ns for gw in gateways for ns in gw.ack_latencies_ns]
    report = build_report(
        agents, config, mode="tcp", elapsed_s=elapsed, sim_elapsed_s=None,
        orders_sent=control.orders, interrupted=interrupted, ack_latencies_ns=latencies,
        seed=cfg.seed, failures=failures,
    )
    report["exchange"] = f"{cfg.host}:{cfg.port}"
    if stopped_early:
        report["stopped_early"] = stopped_early
    settle_outcomes(report, left_resting)
    if cut_short:
        report["cancels_cut_short"] = True
    _finish(cfg, report, progress, config)
    return report


class StallWatch:
    """A run bounded by an order count whose agents send no more orders would go on for good
    (in simulated time, at full speed): their budgets cannot pay for any, or they have
    nothing left to do (a passive buyer alone on a book nobody else trades). It stops once
    no order has been sent for ``STALL_S`` seconds of the run's clock, or longer where an
    agent may rightly be quiet longer (twenty of its steps, a TWAP's time between slices)."""

    def __init__(self, agents: list[Agent]) -> None:
        self.orders = -1
        self.skips: list[int] = []
        self.since = 0.0
        self.fired = False
        self.patience = max([STALL_S] + [a.quiet_limit() for a in agents])
        self.reason = ""

    def stalled(self, agents: list[Agent], control: RunControl, now_s: float) -> bool:
        skips = [a.stats.skipped_for_budget for a in agents]
        if control.orders != self.orders:
            self.orders, self.skips, self.since = control.orders, skips, now_s
            return False
        if now_s - self.since < self.patience:
            return False
        self.fired = True
        if all(now > before for a, now, before in zip(agents, skips, self.skips)
               if not a.done):  # a TWAP or passive buyer that finished is quiet
            self.reason = f"no order for {self.patience:g} s: the agents' budgets cannot pay for any"
        else:
            self.reason = (f"no order for {self.patience:g} s after {control.orders} of "
                           f"{control.max_orders}: the agents have nothing more to do")
        return True


def short_of_orders(control: RunControl, agents: list[Agent]) -> str:
    """Why a run bounded by an order count ended without them, if every agent simply
    finished first (a TWAP's whole parent order sent, say); else ""."""
    if control.max_orders is None or control.orders >= control.max_orders:
        return ""
    if not all(a.done for a in agents):
        return ""
    return f"every agent finished after {control.orders} of {control.max_orders} orders"


STALL_S = 60.0
WIND_DOWN_S = 20.0  # at most this long for the cancels at the end (a request waits 10 s)


async def _wind_down(agents: list[Agent], gateways: list[Any], hurry: asyncio.Event) -> tuple[int, bool]:
    """Each agent cancels what it still has resting, then the last reports are taken in;
    returns (orders not cancelled, whether that was cut short: a second Ctrl-C, or no end
    within ``WIND_DOWN_S``). An exchange that stopped answering fails each agent's first
    request, not every cancel in turn."""
    async def both() -> int:
        lefts = await asyncio.gather(*(a.shutdown() for a in agents), return_exceptions=True)
        # Fills of the last moments may still be on their way: take them in before the report.
        await asyncio.gather(*(gw.settled() for gw in gateways), return_exceptions=True)
        return sum(n for n in lefts if isinstance(n, int))

    for gw in gateways:
        gw.halt = None  # the run's sleeps are over; a cancel's back-off must really wait
    loop = asyncio.get_running_loop()
    work = loop.create_task(both(), name="wind-down")
    waiter = loop.create_task(hurry.wait())
    try:
        await asyncio.wait({work, waiter}, timeout=WIND_DOWN_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if work.done() and not work.cancelled():
        return work.result(), False
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    for agent in agents:
        agent.sync()  # the cancels that did get through
    return sum(len(a.wallet.orders) for a in agents), True


def _unreachable(cfg: Any, why: str) -> str:
    """Why the exchange cannot be reached, and what to do about it."""
    if why.startswith("cannot find"):
        return why  # a host name that does not resolve: starting an exchange would not help
    if not why.startswith("cannot connect"):
        why = f"cannot reach the exchange at {cfg.host}:{cfg.port}: {why}"
    end = "" if why.endswith(("?", ".", "!")) else "."
    return f"{why}{end} Start it with: python run/start_engine.py (or use --embedded)"


async def exchange_markets(cfg: Any, given: MarketConfig | None, what: str) -> MarketConfig:
    """The exchange's markets; or ``given`` (``what``: a markets file, the built-in ones),
    refused if its markets are on another grid than the exchange's (their prices could be
    neither read nor sent)."""
    try:
        remote = await fetch_config(cfg.host, cfg.port)
    except GatewayConnectionError as exc:
        raise SimulationError(
            _unreachable(cfg, exc.message)
        ) from None
    if given is None:
        return remote
    differences = market_differences(given, remote)
    if differences:
        raise SimulationError(f"{what} does not match the exchange's markets: " + "; ".join(differences[:5])
                              + (f"; and {len(differences) - 5} more" if len(differences) > 5 else ""))
    return given


def _agents_or_error(
    cfg: SimConfig, config: MarketConfig, session: Callable[[str], Any], control: RunControl,
) -> list[Agent]:
    """The run's agents, or a clear error for a configuration they cannot be built from."""
    try:
        agents = build_agents(cfg, config, session, control)
    except SimulationError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError) as exc:
        raise SimulationError(f"the agents cannot be set up from this configuration: "
                              f"{type(exc).__name__}: {exc}") from None
    if not agents:
        raise SimulationError("no agents to run: give at least one, e.g. --agents random=20")
    return agents


async def _connect_all(
    cfg: SimConfig, config: MarketConfig, names: list[str], mirror: BookMirror | None,
) -> list[TcpGateway]:
    """One logged-in session per agent, or none at all: if any fails (or the run is
    interrupted), the sessions already open and the mirror are closed before the error.

    With ``--credentials`` each logs in with its account's token, and when the file names
    an admin, one more session logs in as the admin: the agents' deposits go through it
    (``TcpGateway.funder``; ``close_gateways`` closes it with them)."""
    creds = cfg.credentials

    async def connect(name: str, token: str | None, feed: BookMirror | None) -> TcpGateway:
        try:
            return await TcpGateway.connect(cfg.host, cfg.port, name, config, mirror=feed, token=token)
        except GatewayError as exc:
            if isinstance(exc, GatewayConnectionError):
                raise
            raise GatewayError(exc.code, f"{exc.message} (account {name!r})") from None

    connects = [
        asyncio.ensure_future(connect(name, creds.token_for(name) if creds is not None else None, mirror))
        for name in names
    ]
    if creds is not None and creds.admin is not None:
        connects.append(asyncio.ensure_future(connect(*creds.admin, None)))
    try:
        gateways = list(await asyncio.gather(*connects))
    except BaseException as exc:
        for pending in connects:
            pending.cancel()
        done = await asyncio.gather(*connects, return_exceptions=True)
        await asyncio.gather(
            *([mirror.close()] if mirror is not None else []),
            *(gw.close() for gw in done if isinstance(gw, TcpGateway)),
            return_exceptions=True,
        )
        if isinstance(exc, GatewayConnectionError):
            raise SimulationError(
                _unreachable(cfg, exc.message)
            ) from None
        if isinstance(exc, GatewayError):
            hint = ""
            if exc.code == "auth_failed" and creds is None:
                hint = ("; an exchange run with --auth keys admits only its listed users: give "
                        "their tokens with --credentials FILE (docs/simulation.md)")
            raise SimulationError(f"the exchange refused an agent's session: {exc.message}{hint}") from None
        raise
    if len(gateways) > len(names):
        funder = gateways.pop()
        if not funder.admin:
            await close_gateways([funder, *gateways])
            if mirror is not None:
                await mirror.close()
            raise SimulationError(f"the credentials' admin {funder.account!r} has no admin rights on "
                                  "this exchange, so it cannot fund the agents (an exchange in --auth "
                                  "open mode has no admins: leave 'admin' out there)")
        for gw in gateways:
            gw.funder = funder
    return gateways


async def close_gateways(gateways: list[TcpGateway]) -> None:
    """Close the sessions and the admin session their deposits went through, if any."""
    funders = {id(gw.funder): gw.funder for gw in gateways if gw.funder is not None}
    await asyncio.gather(*(gw.close() for gw in [*gateways, *funders.values()]), return_exceptions=True)


async def _tcp_tops_of_any(
    gateways: list[TcpGateway], config: MarketConfig,
    last: dict[str, tuple[int | None, int | None]], exact: bool = False,
) -> dict[str, tuple[int | None, int | None]]:
    """Best prices from the first session that answers (one agent's lost connection must
    not end the run or its report); the last known ones if none does within 10 s in all
    (an exchange that stopped answering must not cost 10 s per session)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    for gw in gateways:
        left = deadline - loop.time()
        if left <= 0:
            break
        if not gw.client.connected:
            continue
        try:
            return await asyncio.wait_for(_tcp_tops(gw, config, exact), left)
        except (GatewayError, asyncio.TimeoutError):
            continue
    return last


async def _tcp_tops(
    gw: Gateway, config: MarketConfig, exact: bool = False,
) -> dict[str, tuple[int | None, int | None]]:
    """Best prices per market: the book mirror's while running; ``exact`` asks the exchange."""
    if exact:
        views = [await gw.book(m, 1) for m in config.markets]
        return {v.market: (v.best_bid, v.best_ask) for v in views}
    return {m: await gw.top(m) for m in config.markets}


class _Placeholder:
    """Stands in for a TCP gateway while the agents are built, before connections open."""

    def __init__(self, account: str, config: MarketConfig) -> None:
        self.account = account
        self.config = config


# --------------------------------------------------------------------------- output


def _finish(cfg: SimConfig, report: dict[str, Any], progress: Progress, config: MarketConfig) -> None:
    """Write the report and the plot; a file that cannot be written costs that file only,
    never the run's results (the report is still printed)."""
    if cfg.report_file is not None:
        try:
            cfg.report_file.parent.mkdir(parents=True, exist_ok=True)
            cfg.report_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"warning: cannot write the report to {cfg.report_file}: {_why(exc)}", file=sys.stderr)
            cfg.report_file = None
    if cfg.plot_file is not None:
        try:
            report["plot"] = plot(progress.samples, config, cfg.plot_file)
        except (OSError, ValueError) as exc:
            report["plot"] = f"not drawn: {exc}"


def _why(exc: OSError) -> str:
    """An OSError in words; creating a directory where a file is says "File exists",
    which names the symptom rather than the problem."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return "a part of that path is a file, not a directory"
    return exc.strerror or str(exc)


def plot(samples: list[dict[str, Any]], config: MarketConfig, path: Path) -> str:
    """Price path, spread and each agent's P&L over time; needs matplotlib (optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("not drawn: matplotlib is not installed "
                "(pip install 'laptop-exchange[plot]' or pip install matplotlib)")
    from decimal import Decimal

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    xs = [s["t"] for s in samples]
    # Each market's price on its own axis (a 30,000 and a 100 price on one axis would leave
    # the second flat): the first market on the left, the others on twin axes at the right.
    price_axes = [axes[0]] + [axes[0].twinx() for _ in list(config.markets)[1:]]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (market, spec) in enumerate(config.markets.items()):
        def price(ticks: int | None) -> float | None:
            # Drawing only: a plot axis needs floats; no money is computed from these.
            return None if ticks is None else float(Decimal(spec.format_price(ticks)))
        colour = colours[n % len(colours)]
        ax = price_axes[n]
        ax.plot(xs, [price(s["marks"].get(market)) for s in samples], label=market, color=colour)
        ax.set_ylabel(f"{market} last price", color=colour)
        if n > 1:
            ax.spines["right"].set_position(("axes", 1 + 0.08 * (n - 1)))
        axes[1].plot(xs, [
            (price(s["tops"][market][1]) - price(s["tops"][market][0]))  # type: ignore[operator]
            if s["tops"].get(market) and None not in s["tops"][market] else None
            for s in samples
        ], label=market, color=colours[n % len(colours)])
    pnl_samples = [s for s in samples if s["pnl"]]
    if pnl_samples:
        for name in pnl_samples[-1]["pnl"]:
            quote = next(k for k in pnl_samples[-1]["pnl"][name] if k != "fees")
            axes[2].plot([s["t"] for s in pnl_samples],
                         [float(Decimal(s["pnl"][name][quote])) for s in pnl_samples], label=name)
    axes[1].set_ylabel("spread")
    axes[2].set_ylabel("P&L per agent (quote)")
    axes[2].set_xlabel("seconds")
    axes[1].legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"{path} ({len(samples)} samples)"


# --------------------------------------------------------------------------- command line


def parse_agents(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, count = part.partition("=")
        kind = kind.strip()
        if kind not in AGENT_KINDS:
            raise argparse.ArgumentTypeError(f"unknown agent kind {kind!r} (have {', '.join(AGENT_KINDS)})")
        try:
            out[kind] = int(count) if count else 1
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected KIND=COUNT, got {part!r}") from None
        if out[kind] < 0:
            raise argparse.ArgumentTypeError("agent counts cannot be negative")
    return out


def parse_seconds(text: str) -> float:
    try:
        seconds = parse_duration_ns(text) / 1e9
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:  # as --orders 0: a run of nothing is a mistake, not a result
        raise argparse.ArgumentTypeError("the duration must be more than zero")
    return seconds


def fresh_prefix() -> str:
    """A TCP run's own account name prefix, so that it inherits no earlier run's balances."""
    return f"sim{time.time_ns() % 10**8:08d}-"


def build_parser() -> argparse.ArgumentParser:
    ap = CommandLine(
        prog="start_simulation.py",
        description="Simulated traders against the exchange (TCP by default, or --embedded).",
    )
    ap.add_argument("--embedded", action="store_true", help="run the engine in this process, in simulated time")
    ap.add_argument("--agents", type=parse_agents, default=None,
                    help="agent counts, e.g. random=20,mm=2,twap=1,passive=1")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--duration", type=parse_seconds, default=None, help="how long, e.g. 30s, 5m or 1h (default 30s)")
    group.add_argument("--orders", type=int, default=None, help="stop after this many orders")
    ap.add_argument("--rate", type=float, default=None, help="the random traders' orders per second, together (default 500; the "
                         "market makers' quotes and the others' orders come on top)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default 1)")
    ap.add_argument("--latency", default=None, help="embedded only: fixed:500us or gamma:mean=5ms")
    ap.add_argument("--markets", type=Path, default=None, help="markets JSON file (as for start_engine.py)")
    ap.add_argument("--config", type=Path, default=None, help="simulation config JSON file")
    ap.add_argument("--report", type=Path, default=None, help="also write the report as JSON here")
    ap.add_argument("--plot", type=Path, default=None, help="draw price, spread and P&L to a PNG (matplotlib)")
    ap.add_argument("--data-dir", type=Path, default=None, help="where trades.jsonl and runs go (default ./data)")
    ap.add_argument("--host", default=None, help="exchange host (TCP mode, default 127.0.0.1)")
    ap.add_argument("--port", type=port_number, default=None, help=f"exchange port (TCP mode, default {DEFAULT_PORT})")
    ap.add_argument("--credentials", type=Path, default=None, metavar="FILE",
                    help="TCP mode against an exchange run with --auth keys: the agents' tokens and "
                         "an admin to fund them (docs/simulation.md)")
    ap.add_argument("--no-progress", action="store_true", help="no live progress line")
    ap.add_argument("--schedule", action="store_true", help="run the config's scheduled action slots")
    ap.add_argument("--resume", metavar="ID", default=None, help="continue a saved scheduled run")
    ap.add_argument("--list", action="store_true", help="list saved scheduled runs")
    ap.add_argument("--on-failure", choices=["skip", "quit"], default="skip",
                    help="scheduled runs without a terminal: what to do with a slot that keeps failing")
    return ap


def config_from_args(args: argparse.Namespace) -> SimConfig:
    cfg = SimConfig()
    file_data: dict[str, Any] = {}
    if args.config is not None:
        try:
            file_data = json.loads(args.config.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SimulationError(f"cannot read config file {args.config}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise SimulationError(f"config file {args.config} is not valid JSON: {exc}") from None
        if not isinstance(file_data, dict):
            raise SimulationError(f"config file {args.config} must hold a JSON object")
        apply_file_config(cfg, file_data)
    if args.agents is not None:
        cfg.agents = args.agents
    if args.duration is not None:
        cfg.duration_s, cfg.orders = args.duration, None
    if args.orders is not None:
        if args.orders <= 0:
            raise SimulationError("--orders must be a positive number of orders")
        cfg.orders, cfg.duration_s = args.orders, None
    for name, attr in (("rate", "rate"), ("seed", "seed"), ("latency", "latency"),
                       ("host", "host"), ("port", "port")):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, attr, value)
    if args.markets is not None:
        cfg.markets_file = args.markets
    if args.data_dir is not None:
        cfg.data_dir = args.data_dir
    cfg.embedded = cfg.embedded or args.embedded
    if args.credentials is not None:
        cfg.credentials = read_credentials(args.credentials)
    if cfg.credentials is not None and cfg.embedded:
        raise SimulationError("--credentials applies to TCP runs (the embedded exchange has no logins)")
    cfg.report_file = args.report
    cfg.plot_file = args.plot
    if cfg.plot_file is not None and not cfg.plot_file.suffix:
        cfg.plot_file = cfg.plot_file.with_name(cfg.plot_file.name + ".png")  # what matplotlib writes
    cfg.progress = not args.no_progress
    if cfg.latency and not cfg.embedded:
        raise SimulationError("--latency applies to --embedded runs only")
    if isinstance(cfg.rate, bool) or not isinstance(cfg.rate, (int, float)) \
            or not (math.isfinite(cfg.rate) and cfg.rate > 0):
        raise SimulationError("--rate (or the config's rate) must be a positive finite number")
    return cfg


KNOWN_KEYS = {
    "agents", "duration", "orders", "rate", "seed", "embedded", "latency", "markets_file",
    "markets", "profiles", "funding", "params", "data_dir", "host", "port", "prefix", "schedule",
    "credentials",
}


def read_credentials(path: Path) -> Credentials:
    """``--credentials FILE`` (see ``simulation.tcp.Credentials``), or a one-line error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SimulationError(f"cannot read the credentials file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SimulationError(f"the credentials file {path} is not valid JSON: {exc}") from None
    try:
        return Credentials.from_dict(data)
    except ValueError as exc:
        raise SimulationError(f"the credentials file {path}: {exc}") from None


def apply_file_config(cfg: SimConfig, data: dict[str, Any]) -> None:
    """The ``--config`` file: every key optional; command-line options override it."""
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise SimulationError(f"config file: unknown keys {sorted(unknown)} (known: {sorted(KNOWN_KEYS)})")
    if "agents" in data:
        agents = data["agents"]
        if not isinstance(agents, dict) or not all(
            k in AGENT_KINDS and type(v) is int and v >= 0 for k, v in agents.items()
        ):
            raise SimulationError(f"config file: 'agents' maps kinds ({', '.join(AGENT_KINDS)}) "
                                  "to counts, e.g. {\"random\": 20}")
        cfg.agents = dict(agents)
    if "duration" in data:
        try:
            cfg.duration_s = parse_duration_ns(str(data["duration"])) / 1e9 if data["duration"] is not None else None
        except ValueError as exc:
            raise SimulationError(f"config file: duration: {exc}") from None
        if cfg.duration_s is not None and cfg.duration_s <= 0:
            raise SimulationError("config file: duration: the duration must be more than zero")
    if "orders" in data:
        orders = data["orders"]
        if orders is not None and (type(orders) is not int or orders <= 0):
            raise SimulationError("config file: 'orders' must be a positive whole number of orders")
        cfg.orders = orders
        if cfg.orders is not None and "duration" not in data:
            cfg.duration_s = None
    for key, kinds in (("latency", (str,)), ("host", (str,)), ("prefix", (str,)), ("credentials", (str,)),
                       ("data_dir", (str,)), ("markets_file", (str,)), ("schedule", (dict,)),
                       ("funding", (dict,)), ("params", (dict,)), ("profiles", (dict,)),
                       ("port", (int,)), ("seed", (int,)), ("embedded", (bool,))):
        if data.get(key) is not None and not isinstance(data[key], kinds):
            raise SimulationError(f"config file: {key!r} must be a {' or '.join(k.__name__ for k in kinds)}")
    for key in ("rate", "seed", "embedded", "latency", "host", "port", "prefix", "schedule"):
        if key in data:
            setattr(cfg, key, data[key])
    if "markets_file" in data:
        cfg.markets_file = Path(data["markets_file"])
    if "markets" in data:
        chosen = data["markets"]
        if chosen is not None and (not isinstance(chosen, list) or not chosen
                                   or not all(isinstance(m, str) for m in chosen)):
            raise SimulationError('config file: \'markets\' is a list of the markets to trade, '
                                  'e.g. ["BTC-USD"] (leave it out for all of them)')
        cfg.trade_markets = None if chosen is None else list(chosen)
    if "data_dir" in data:
        cfg.data_dir = Path(data["data_dir"])
    if data.get("credentials") is not None:
        cfg.credentials = read_credentials(Path(data["credentials"]))
    for key in ("profiles", "funding", "params"):
        if key in data:
            setattr(cfg, key, dict(data[key]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.list or args.resume is not None or args.schedule:
            from simulation.scheduler import main_schedule

            return main_schedule(cfg, args)
        # A run allocates a few objects per order for as long as it lasts, as the server
        # does: the same collector and allocator settings (exchange/runtime.py).
        tune_gc()
        tune_malloc()
        if cfg.embedded:
            report = run_embedded(cfg)
        else:
            install_event_loop_policy()
            report = asyncio.run(run_tcp(cfg))
    except SimulationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - the runs handle Ctrl-C themselves
        return 130
    print(format_report(report))
    if cfg.report_file is not None:
        print(f"report written to {cfg.report_file}")
    if "plot" in report:
        print(f"plot: {report['plot']}")
    if report.get("interrupted"):
        return 130  # as a scheduled run: stopped by the user, not finished
    if report.get("agent_failures"):
        reason, _ = failures_by_reason(report["agent_failures"])[0]
        n, m = len(report["agent_failures"]), len(report["agents"])
        what = (f"the run stopped early: {n} of {m} agents failed" if report.get("stopped_early")
                else f"{n} of {m} agents stopped early")
        print(f"error: {what}, e.g. {reason} (see 'agent failures' above)", file=sys.stderr)
        return 1
    if report.get("stopped_early"):
        print(f"error: the run stopped early: {report['stopped_early']}", file=sys.stderr)
        return 1
    return 0
