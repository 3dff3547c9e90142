"""Embedded mode: the engine in this process, no sockets, a simulated clock, optional latency.

Theory of operation
-------------------
``EmbeddedExchange`` owns one ``exchange.engine.Exchange`` and a discrete-event kernel: a
heap of ``(time_ns, seq, callback, a, b)`` entries popped in time order (``seq`` breaks
ties in insertion order, so the run is reproducible). Agents are ordinary ``async``
coroutines; the kernel drives them itself with ``coro.send`` rather than through asyncio,
because an asyncio task switch costs about ten times a bare ``send`` and the embedded
simulation's whole point is speed. When an agent awaits something that takes simulated
time the coroutine yields to the kernel: ``sleep``, the commonest suspension, yields the
bare wake-up time (an int, so no ``_Wait`` is built for it); anything resolved later (an
acknowledgement delayed by the latency model, ``next_event``) yields a ``_Wait``, and the
kernel resumes the coroutine when it is resolved. A request that takes no time (any request with no latency model)
never suspends at all.

Latency (``--latency``): ``none``, ``fixed:500us`` or ``gamma:mean=5ms[,shape=2]``. It is
one-way: a command reaches the engine one draw after it was sent, and the reports it causes
reach each account one (independent) draw after the engine produced them. Queries
(balances, book, orders, queue position) are answered at once. Draws come from a
``random.Random`` seeded from the run's seed, so a run is deterministic: same seed, same
commands at the same simulated times, same trades, same ledger bytes.

The engine's timestamps are the simulated clock (nanoseconds from a fixed epoch, made
strictly increasing like the gateway's), and its trades are written to
``<data_dir>/trades.jsonl`` in the bytes of ``storage.ledger.trade_line``, the format the
server's ledger uses (``LedgerLines`` formats them, in batches), so two runs can be compared
file to file. Each embedded run is a fresh exchange, so its ledger is written afresh.
"""

from __future__ import annotations

import heapq
import math
import random
import re
import types
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Coroutine, Final, Generator

import orjson

from exchange.engine import Exchange
from exchange.markets import InvalidValue, MarketConfig, default_config
from exchange.protocol import Formatter, ProtocolError, client_order_id_of
from exchange.types import (
    BalanceChanged,
    BookDelta,
    CancelOrder,
    CommandRejected,
    Deposit,
    Event,
    ExecReport,
    ExecType,
    ModifyOrder,
    OrderStatus,
    OrderType,
    PlaceOrder,
    RejectReason,
    Side,
    TimeInForce,
    Trade,
)
from storage.lock import DataDirBusy, DataDirLock
from simulation import ledger_writer
from simulation.ledger_writer import LedgerWriter, LedgerWriterError
from simulation.gateway import (
    BookView,
    Gateway,
    GatewayError,
    Holding,
    MarketTexts,
    OpenOrderView,
    PriceLike,
)

# Simulated time starts here (2024-01-01T00:00:00Z): fixed, so ledgers compare byte for byte.
SIM_EPOCH_NS: Final = 1_704_067_200 * 10**9
LEDGER_BATCH: Final = 4096

_SIDES: Final = {"buy": Side.BUY, "sell": Side.SELL}
_SIDE_TEXT: Final = {Side.BUY: Side.BUY.value, Side.SELL: Side.SELL.value}
_TYPES: Final = {"limit": OrderType.LIMIT, "market": OrderType.MARKET}
_TIFS: Final = {t.value: t for t in TimeInForce}
_GTC: Final = TimeInForce.GTC
_MARKET: Final = OrderType.MARKET
_IOC: Final = TimeInForce.IOC
_LIMIT: Final = OrderType.LIMIT


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """One-way delay in nanoseconds: ``fixed`` (always ``mean_ns``) or ``gamma``."""

    kind: str
    mean_ns: int
    shape: float = 2.0

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.mean_ns
        # gamma with the given mean: scale = mean / shape
        return max(1, int(rng.gammavariate(self.shape, self.mean_ns / self.shape)))


_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|min|m|h)?\s*$")
_UNIT_NS: Final = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000, None: 1_000_000_000,
                   "min": 60_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}


def parse_duration_ns(text: str, minutes: bool = True) -> int:
    """``500us``, ``5ms``, ``2s``, ``1.5s``, ``5m``, ``1h`` (plain number: seconds) as integer
    nanoseconds. ``minutes=False`` (a latency) refuses ``m``, ``min`` and ``h``: there "5m" is
    far likelier a mistyped 5ms than five minutes."""
    match = _DURATION.match(text)
    if not match or not minutes and match.group(2) in ("m", "min", "h"):
        raise ValueError(f"not a duration: {text!r} (try " + ("500us, 5ms, 2s, 5m or 1h)" if minutes else
                                                               "500us, 5ms or 2s)"))
    value = Decimal(match.group(1)) * _UNIT_NS[match.group(2)]
    return int(value)


def parse_latency(text: str | None) -> LatencyModel | None:
    """``none`` | ``fixed:500us`` | ``gamma:mean=5ms[,shape=2]`` (None and ``none``: no delay)."""
    if text is None or text.strip().lower() in ("", "none", "0"):
        return None
    kind, _, rest = text.strip().partition(":")
    kind = kind.lower()
    if kind == "fixed":
        ns = parse_duration_ns(rest, minutes=False)
        return LatencyModel("fixed", ns) if ns > 0 else None
    if kind == "gamma":
        params = {}
        for part in filter(None, rest.split(",")):
            key, _, value = part.partition("=")
            params[key.strip()] = value.strip()
        if "mean" not in params:
            raise ValueError("gamma latency needs mean=..., e.g. gamma:mean=5ms")
        try:
            shape = float(params.get("shape", "2"))
        except ValueError:
            raise ValueError(f"gamma shape {params.get('shape')!r} is not a number, e.g. shape=2") from None
        if not (math.isfinite(shape) and shape > 0):
            raise ValueError("gamma shape must be a positive finite number, e.g. shape=2")
        mean_ns = parse_duration_ns(params["mean"], minutes=False)
        if mean_ns <= 0:
            raise ValueError("gamma mean must be positive (use fixed:0 for no latency)")
        return LatencyModel("gamma", mean_ns, shape)
    raise ValueError(f"unknown latency model {text!r}: use fixed:500us or gamma:mean=5ms")


# --------------------------------------------------------------------------- kernel


class _Wait:
    """What a suspended coroutine yields to be resumed when something resolves it."""

    __slots__ = ("waiter", "done")

    def __init__(self) -> None:
        self.waiter: Coroutine[Any, Any, Any] | None = None
        self.done = False

    def __await__(self) -> Generator[_Wait, Any, Any]:
        return (yield self)


@types.coroutine
def _until(when: int) -> Generator[int, Any, None]:
    """Suspend the awaiting coroutine until the simulated clock reaches ``when``."""
    yield when


class AgentFailure(Exception):
    """An agent coroutine raised: the kernel keeps running the others and records this."""


class SimKernel:
    """The discrete-event loop: simulated time advances from one heap entry to the next."""

    def __init__(self, start_ns: int = SIM_EPOCH_NS) -> None:
        self.now = start_ns
        self.start_ns = start_ns
        self.heap: list[tuple[int, int, Callable[[Any, Any], None], Any, Any]] = []
        self.seq = 0
        # The coroutines still running, in the order they started (a dict keyed by the object
        # itself: hashing it is its address, with no int built as ``id()`` would).
        # The value: a name for the failures list (the agent's), or None.
        self.live: dict[Coroutine[Any, Any, Any], str | None] = {}
        self.failures: list[tuple[str, BaseException]] = []
        self.steps = 0
        self._resume: Callable[[Any, Any], None] = self._step  # one bound method, not one per wake-up

    def at(self, when: int, fn: Callable[[Any, Any], None], a: Any = None, b: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, fn, a, b))

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> Coroutine[Any, Any, Any]:
        self.live[coro] = name
        self.at(self.now, self._resume, coro, None)
        return coro

    def resolve(self, wait: _Wait, value: Any, when: int) -> None:
        """Resume whoever waits on ``wait`` at ``when`` with ``value`` (once)."""
        if wait.done:
            return
        wait.done = True
        if wait.waiter is not None:
            self.at(when, self._resume, wait.waiter, value)

    def _step(self, coro: Coroutine[Any, Any, Any], value: Any) -> None:
        if coro not in self.live:  # closed by close_all (a stopped run): drop its wake-ups
            return
        try:
            wait = coro.send(value)
        except StopIteration:
            self.live.pop(coro, None)
            return
        except Exception as exc:  # one broken agent must not stop the others
            name = self.live.pop(coro, None)
            self.failures.append((name or str(getattr(coro, "__qualname__", coro)), exc))
            return
        if wait.__class__ is int:  # sleep: wake up then
            self.seq += 1
            heapq.heappush(self.heap, (wait, self.seq, self._resume, coro, None))  # type: ignore[arg-type]
        else:
            wait.waiter = coro

    def run(
        self, until_ns: int | None = None, stop: Callable[[], bool] | None = None,
        tick: Callable[[], None] | None = None, tick_every: int = 2048,
        stop_on_failure: bool = False,
    ) -> None:
        """Pop entries until the heap is empty, ``until_ns`` is reached or ``stop()`` is true.

        ``tick`` is called every ``tick_every`` steps (the runner's wall-clock progress line);
        ``stop`` is checked at the same points and after the last step. ``stop_on_failure``:
        stop right after the step in which a coroutine raised (at the same point whatever
        ``tick_every`` is, so a seeded run stops at the same place with or without a plot).
        """
        heap = self.heap
        pop = heapq.heappop
        resume = self._resume
        limit = until_ns if until_ns is not None else 1 << 126
        failures = self.failures
        n = 0
        while heap:
            entry = heap[0]
            if entry[0] > limit:
                self.now = limit
                break
            pop(heap)
            self.now = entry[0]
            fn = entry[2]
            if fn is resume:  # most entries: a direct call, not one through the bound method
                self._step(entry[3], entry[4])
            else:
                fn(entry[3], entry[4])
            n += 1
            if stop_on_failure and failures:
                break
            if n % tick_every == 0:
                if tick is not None:
                    tick()
                if stop is not None and stop():
                    break
        self.steps += n

    def run_until_complete(self, coro: Coroutine[Any, Any, Any], timeout_ns: int | None = None) -> Any:
        """Drive ``coro`` (and whatever else is scheduled) until it returns; return its value."""
        box: dict[str, Any] = {}

        async def wrapper() -> None:
            try:
                box["value"] = await coro
            except Exception as exc:
                box["error"] = exc

        _ = self.spawn(wrapper())
        until = None if timeout_ns is None else self.now + timeout_ns
        self.run(until, stop=lambda: bool(box), tick_every=1)
        if "error" in box:
            raise box["error"]
        if "value" not in box:
            raise TimeoutError("the coroutine did not finish in simulated time")
        return box["value"]

    def close_all(self) -> None:
        """Close every coroutine still suspended (a stopped run's agents).

        The heap keeps what is in flight (commands on their way, reports on their way back),
        so a following ``run()`` still delivers them and the accounts' reports stay complete.
        """
        live, self.live = self.live, {}
        for coro in live:
            coro.close()


# --------------------------------------------------------------------------- the ledger


class LedgerLines:
    """``storage.ledger.trade_line``, byte for byte, with the decimal strings cached.

    Formatting each trade's price, size and fees was a tenth of an embedded run's time (the
    compiled formatter costs about a microsecond a number), and prices and sizes repeat.
    The record is built here with the same keys in the same order as ``trade_record`` and
    dumped by the same ``orjson``; ``tests/test_sim_embedded.py`` checks the bytes against
    ``trade_line``.
    """

    def __init__(self, config: MarketConfig) -> None:
        self.texts = {symbol: MarketTexts(spec) for symbol, spec in config.markets.items()}

    def __call__(self, trade: Trade) -> bytes:
        return self.line(*ledger_row(trade))

    def line(
        self, trade_id: int, market: str, price: int, qty: int, buy_order_id: int,
        sell_order_id: int, buyer: str, seller: str, taker_side: str, maker_fee: int,
        taker_fee: int, ts: int,
    ) -> bytes:
        """The line of one trade given as a ``ledger_row`` (what the ledger's writer receives)."""
        texts = self.texts[market]
        return orjson.dumps({
            "trade_id": trade_id,
            "market": market,
            "price": texts.price(price),
            "qty": texts.qty(qty),
            "buy_order_id": buy_order_id,
            "sell_order_id": sell_order_id,
            "buyer": buyer,
            "seller": seller,
            "taker_side": taker_side,
            "maker_fee": texts.amount(maker_fee),
            "taker_fee": texts.amount(taker_fee),
            "fee_asset": texts.spec.quote.name,
            "ts": ts,
        }, option=orjson.OPT_APPEND_NEWLINE)


def ledger_row(t: Trade) -> tuple[int, str, int, int, int, int, str, str, str, int, int, int]:
    """A trade as plain values (``marshal`` carries them to the ledger's writer process)."""
    return (t.trade_id, t.market, t.price, t.qty, t.buy_order_id, t.sell_order_id, t.buyer,
            t.seller, _SIDE_TEXT[t.taker_side], t.maker_fee, t.taker_fee, t.ts)


# --------------------------------------------------------------------------- the exchange


class EmbeddedExchange:
    """An in-process exchange: engine, simulated clock, latency, sessions and the ledger."""

    def __init__(
        self, config: MarketConfig | None = None, seed: int = 0,
        latency: LatencyModel | str | None = None, data_dir: Path | str | None = None,
        ledger_process: bool = True,
    ) -> None:
        """``ledger_process``: write the ledger from a forked child (``simulation/ledger_writer.py``),
        or, False, in this process."""
        self.config = config or default_config()
        self.engine = Exchange(self.config)
        self.kernel = SimKernel()
        self.latency = parse_latency(latency) if isinstance(latency, str) or latency is None else latency
        self.rng = random.Random(f"latency:{seed}")
        self.fmt = Formatter(self.config)
        self.sessions: dict[str, EmbeddedGateway] = {}
        self.subscribers: dict[tuple[str, str], list[EmbeddedGateway]] = {}
        self.last_ts = 0
        self._arrivals: dict[str, int] = {}  # account -> when the last command's reports arrive
        self.in_flight_until: dict[str, int] = {}  # account -> when its last command or report in flight lands
        self.stats = {"orders": 0, "trades": 0, "commands": 0}
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._ledger: Any = None
        self._ledger_trades: list[Trade] = []  # formatted a batch at a time by ``flush_ledger``
        self._line = LedgerLines(self.config)
        self._writer: LedgerWriter | None = None
        self.ledger_error: LedgerWriterError | None = None  # the writer process failed: trades are no longer written
        self._dir_lock: DataDirLock | None = None
        if self.data_dir is not None:
            self._open_ledger(self.data_dir, ledger_process)

    def _open_ledger(self, directory: Path, in_child: bool) -> None:
        """Start ``trades.jsonl`` afresh, but never in a directory an exchange uses.

        An exchange's ledger is append-only and goes with its snapshot and journal; this
        file is rewritten by every run, so a directory holding those (an exchange's
        ``--data-dir``, running or not) is refused, as is one another process has locked.
        """
        lock = DataDirLock(directory, "an embedded simulation")
        lock.acquire()  # DataDirBusy if an exchange (or another run) is using it
        if (directory / "snapshot.json").exists() or (directory / "journal").is_dir():
            lock.release()
            raise DataDirBusy(
                f"{directory} holds an exchange's data (snapshot.json, journal/); an embedded "
                "simulation writes its own trades.jsonl there and would overwrite the "
                "exchange's ledger: pass another --data-dir"
            )
        self._dir_lock = lock
        self._ledger = (directory / "trades.jsonl").open("wb")
        if in_child:
            self._writer = ledger_writer.start(self._ledger, self._line.line)

    # -- sessions ---------------------------------------------------------------------

    def session(self, account: str) -> EmbeddedGateway:
        """The gateway of ``account`` (one per account; asking again returns the same one)."""
        gw = self.sessions.get(account)
        if gw is None:
            gw = self.sessions[account] = EmbeddedGateway(self, account)
        return gw

    # -- time -------------------------------------------------------------------------

    def stamp(self) -> int:
        ts = self.kernel.now
        if ts <= self.last_ts:
            ts = self.last_ts + 1
        self.last_ts = ts
        return ts

    # -- the door to the engine -------------------------------------------------------

    @staticmethod
    def _duplicate(cmd: PlaceOrder) -> ExecReport:
        """An order whose client order id an open order of the account already has."""
        return ExecReport(
            ExecType.REJECTED, None, cmd.account, cmd.market, cmd.side, cmd.order_type, cmd.tif,
            cmd.client_order_id, cmd.price, cmd.qty, 0, 0, 0, OrderStatus.REJECTED, cmd.ts,
            reason=RejectReason.DUPLICATE_CLIENT_ORDER_ID,
        )

    def execute(self, command: Any) -> list[Event]:
        """Run one command now (stamped with the simulated time) and route its events."""
        command.ts = self.stamp()
        stats = self.stats
        stats["commands"] += 1
        events: list[Event]
        if command.__class__ is PlaceOrder and command.client_order_id is not None and \
                self.engine.order_by_client_id(command.account, command.client_order_id) is not None:
            events = [self._duplicate(command)]  # as the TCP gateway refuses it, at arrival
        else:
            events = self.engine.handle(command)
        sessions = self.sessions
        latency = self.latency
        delayed: dict[str, list[Event]] | None = None if latency is None else {}
        subscribers = self.subscribers
        ledger = self._ledger_trades if self._ledger is not None and self.ledger_error is None else None
        for ev in events:
            cls = ev.__class__
            if cls is ExecReport:
                gw = sessions.get(ev.account)  # type: ignore[attr-defined]
                if gw is not None:
                    if delayed is None:
                        gw.queue.append(ev)
                        if gw.waiter is not None:
                            gw.wake()
                    else:
                        delayed.setdefault(gw.account, []).append(ev)
            elif cls is Trade:
                stats["trades"] += 1
                if ledger is not None:
                    ledger.append(ev)  # type: ignore[arg-type]
                if subscribers:
                    self._publish(("trades", ev.market), ev)  # type: ignore[attr-defined]
            elif cls is BookDelta:
                if subscribers:
                    self._publish(("book", ev.market), ev)  # type: ignore[attr-defined]
        if ledger is not None and len(ledger) >= LEDGER_BATCH:
            try:
                self.flush_ledger()
            except LedgerWriterError:
                pass  # kept in ``ledger_error``: not the sending agent's fault; the run stops on it
        if delayed:
            assert latency is not None
            kernel, rng = self.kernel, self.rng
            arrivals = self._arrivals
            until = self.in_flight_until
            for account, evs in delayed.items():
                when = kernel.now + latency.sample(rng)
                arrivals[account] = when
                if when > until.get(account, 0):
                    until[account] = when
                kernel.at(when, _deliver, sessions[account], evs)
        return events

    def _publish(self, key: tuple[str, str], ev: Event) -> None:
        for gw in self.subscribers.get(key, ()):
            if self.latency is None:
                gw.queue.append(ev)
                if gw.waiter is not None:
                    gw.wake()
            else:
                self.kernel.at(self.kernel.now + self.latency.sample(self.rng), _deliver, gw, [ev])

    async def submit(self, command: Any) -> list[Event]:
        """Execute now (no latency) or after one latency draw, waiting for the sender's reports."""
        if self.latency is None:
            return self.execute(command)
        wait = _Wait()
        kernel = self.kernel
        when = kernel.now + self.latency.sample(self.rng)
        until = self.in_flight_until
        if when > until.get(command.account, 0):
            until[command.account] = when  # on its way there counts as in flight too
        kernel.at(when, self._execute_later, command, wait)
        return await wait  # type: ignore[no-any-return]

    def _execute_later(self, command: Any, wait: _Wait) -> None:
        self._arrivals.clear()
        events = self.execute(command)
        # The answer reaches the sender together with its reports (scheduled by ``execute``,
        # so the reports are queued first), or after one draw when it had none (a refusal).
        kernel = self.kernel
        when = self._arrivals.get(command.account)
        if when is None:
            assert self.latency is not None
            when = kernel.now + self.latency.sample(self.rng)
        kernel.resolve(wait, events, when)

    # -- files ------------------------------------------------------------------------

    def flush_ledger(self, wait: bool = False) -> None:
        """Format the trades held back and write them. A batch at a time in one tight loop,
        not a line per trade in the middle of matching: that made whole runs about 7 % faster.
        With a writer process the batch goes to it; ``wait`` returns once it is in the file."""
        if self.ledger_error is not None:
            raise self.ledger_error
        trades = self._ledger_trades
        writer = self._writer
        if writer is not None:
            try:
                if trades:
                    rows = list(map(ledger_row, trades))
                    trades.clear()  # before sending: a batch is handed over once, never twice
                    writer.send(rows)
                if wait:
                    writer.sync()
            except LedgerWriterError as exc:
                self.ledger_error = exc
                trades.clear()
                raise
        elif self._ledger is not None and trades:
            self._ledger.write(b"".join(map(self._line, trades)))
            trades.clear()

    def close(self) -> None:
        try:
            self.flush_ledger()
        finally:
            writer, self._writer = self._writer, None
            ledger, self._ledger = self._ledger, None
            try:
                if writer is not None:
                    writer.close()  # the child holds the file: it writes the rest and closes it
                elif ledger is not None:
                    ledger.close()
            finally:
                if self._dir_lock is not None:
                    self._dir_lock.release()
                    self._dir_lock = None

    def __enter__(self) -> EmbeddedExchange:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _deliver(gw: EmbeddedGateway, events: list[Event]) -> None:
    gw.queue.extend(events)
    if gw.waiter is not None:
        gw.wake()


# --------------------------------------------------------------------------- the gateway


def _text(value: Any) -> Any:
    """Decimal values as plain strings (never exponent form); strings as they are."""
    if value.__class__ is Decimal:
        return format(value, "f")
    return value


class EmbeddedGateway(Gateway):
    """One account's door to an ``EmbeddedExchange`` (see the module docstring)."""

    def __init__(self, exchange: EmbeddedExchange, account: str) -> None:
        self.exchange = exchange
        self.kernel = exchange.kernel
        self.engine = exchange.engine
        self.config = exchange.config
        self.account = account
        # Events not yet taken. A list, swapped out whole by ``poll_events`` (the way agents
        # read it, before every step) rather than copied; ``next_event`` takes from the front.
        self.queue: list[Event] = []
        self.waiter: _Wait | None = None
        self._fmt = exchange.fmt

    # -- time -------------------------------------------------------------------------

    def now_ns(self) -> int:
        return self.kernel.now

    async def sleep(self, seconds: float) -> None:
        await _until(self.kernel.now + max(1, int(seconds * 1e9)))

    # -- order entry ------------------------------------------------------------------

    async def place(
        self, market: str, side: str, qty: PriceLike, price: PriceLike | None = None, *,
        order_type: str | None = None, tif: str | None = None, post_only: bool = False,
        client_order_id: str | None = None,
    ) -> ExecReport:
        # The same checks, in the same order, as exchange.protocol.order_command.
        side_enum = _SIDES.get(side)
        if side_enum is None:
            raise GatewayError("bad_request", "'side' must be buy|sell")
        if order_type is None:
            otype = _LIMIT if price is not None else OrderType.MARKET
        else:
            otype = _TYPES.get(order_type)  # type: ignore[assignment]
            if otype is None:
                raise GatewayError("bad_request", "'type' must be limit|market")
        tif_enum = _tif_of(tif, otype)
        if otype is _LIMIT and price is None:
            raise GatewayError("bad_request", "'price' is required for a limit order")
        if otype is not _LIMIT and price is not None:
            raise GatewayError("bad_request", "a market order takes no 'price'")
        if client_order_id is not None:
            try:
                client_order_id_of(client_order_id)
            except ProtocolError as refused:  # (not ``exc``: compiled, a name keeps one type)
                raise GatewayError(refused.code, refused.message) from None
        spec = self.config.markets.get(market)
        if spec is None:
            return self._rejected(market, side_enum, otype, tif_enum, client_order_id, RejectReason.UNKNOWN_MARKET)
        try:
            lots = spec.qty_lots(qty if qty.__class__ is str else _text(qty))
            ticks = None if price is None else spec.price_ticks(
                price if price.__class__ is str else _text(price))
        except InvalidValue as exc:
            return self._rejected(market, side_enum, otype, tif_enum, client_order_id, exc.reason)
        cmd = self._order(market, side_enum, otype, lots, ticks, tif_enum, post_only, client_order_id)
        if self.exchange.latency is None:
            return self.exchange.execute(cmd)[0]  # type: ignore[return-value]
        return (await self.exchange.submit(cmd))[0]  # type: ignore[return-value]

    async def place_units(
        self, market: str, side: Side, lots: int, ticks: int | None, texts: MarketTexts, *,
        tif: str | None = None, post_only: bool = False,
    ) -> ExecReport:
        """The grid values go to the engine as they are; it checks them as it checks every
        command (positive, within its limits, the market's minimum size)."""
        otype = _LIMIT if ticks is not None else _MARKET
        tif_enum = _tif_of(tif, otype)
        if market not in self.config.markets:
            return self._rejected(market, side, otype, tif_enum, None, RejectReason.UNKNOWN_MARKET)
        cmd = self._order(market, side, otype, lots, ticks, tif_enum, post_only, None)
        if self.exchange.latency is None:
            return self.exchange.execute(cmd)[0]  # type: ignore[return-value]
        return (await self.exchange.submit(cmd))[0]  # type: ignore[return-value]

    def _order(
        self, market: str, side: Side, otype: OrderType, lots: int, ticks: int | None,
        tif: TimeInForce, post_only: bool, client_order_id: str | None,
    ) -> PlaceOrder:
        """The command both ways of placing send (counted as an order sent)."""
        self.exchange.stats["orders"] += 1
        return PlaceOrder(0, self.account, market, side, otype, lots, ticks, tif, post_only,
                          None, client_order_id)

    async def reprice_units(self, order_id: int, ticks: int, texts: MarketTexts) -> ExecReport:
        if self.engine.order(self.account, order_id) is None:
            raise GatewayError("unknown_order", "no such open order for this account")
        cmd = ModifyOrder(0, self.account, order_id, ticks, None)
        ex = self.exchange  # no latency: done now, without a coroutine for ``submit``
        events = ex.execute(cmd) if ex.latency is None else await ex.submit(cmd)
        return self._first_report(events)

    def _rejected(
        self, market: str, side: Side, otype: OrderType, tif: TimeInForce,
        client_order_id: str | None, reason: RejectReason,
    ) -> ExecReport:
        """An order refused at the edge (as the TCP gateway refuses an off-grid price)."""
        report = ExecReport(
            ExecType.REJECTED, None, self.account, market, side, otype, tif, client_order_id,
            None, 0, 0, 0, 0, OrderStatus.REJECTED, self.exchange.stamp(), reason=reason,
        )
        self.queue.append(report)
        return report

    async def cancel(self, order_id: int) -> ExecReport:
        cmd = CancelOrder(0, self.account, order_id)
        ex = self.exchange
        events = ex.execute(cmd) if ex.latency is None else await ex.submit(cmd)
        return self._first_report(events)

    async def modify(
        self, order_id: int, price: PriceLike | None = None, qty: PriceLike | None = None,
    ) -> ExecReport:
        if price is None and qty is None:
            raise GatewayError("bad_request", "give 'price', 'qty' or both")
        order = self.engine.order(self.account, order_id)
        if order is None:
            raise GatewayError("unknown_order", "no such open order for this account")
        spec = self.config.markets[order.market]
        try:
            ticks = spec.price_ticks(_text(price)) if price is not None else None
            lots = spec.qty_lots(_text(qty)) if qty is not None else None
        except InvalidValue as exc:
            raise GatewayError(exc.reason.value, exc.message) from None
        cmd = ModifyOrder(0, self.account, order_id, ticks, lots)
        ex = self.exchange
        events = ex.execute(cmd) if ex.latency is None else await ex.submit(cmd)
        return self._first_report(events)

    @staticmethod
    def _first_report(events: list[Event]) -> ExecReport:
        first = events[0]
        if first.__class__ is CommandRejected:
            raise GatewayError(first.reason.value, first.message)  # type: ignore[attr-defined]
        return first  # type: ignore[return-value]

    async def deposit(self, asset: str, amount: PriceLike) -> dict[str, Holding]:
        spec = self.config.assets.get(asset)
        if spec is None:
            raise GatewayError("unknown_asset", f"no asset {asset!r}")
        try:
            units = spec.to_units(_text(amount))
        except InvalidValue as exc:
            raise GatewayError(exc.reason.value, exc.message) from None
        events = await self.exchange.submit(Deposit(0, self.account, asset, units))
        if events[0].__class__ is not BalanceChanged:
            raise GatewayError(events[0].reason.value, events[0].message)  # type: ignore[attr-defined]
        return await self.balances()

    # -- queries ----------------------------------------------------------------------

    async def settled(self) -> None:
        # With a latency model a command or a report can be on its way: wait for the last
        # one scheduled, and again for what its arrival scheduled in turn (a command's reports).
        until = self.exchange.in_flight_until
        when = until.get(self.account, 0)
        while when >= self.kernel.now:
            await _until(when + 1)  # just after it: a delivery due at ``when`` has run
            when = until.get(self.account, 0)

    async def balances(self) -> dict[str, Holding]:
        return {
            asset: Holding(bal.available, bal.locked, bal.deposited, bal.fees)
            for asset, bal in self.engine.balances(self.account).items()
        }

    async def open_orders(self, market: str | None = None) -> list[OpenOrderView]:
        return [
            OpenOrderView(o.id, o.market, o.side.value, o.price or None, o.qty, o.filled,
                          o.remaining, o.client_order_id)
            for o in self.engine.open_orders(self.account, market)
        ]

    async def book(self, market: str, depth: int = 20) -> BookView:
        if market not in self.config.markets:
            raise GatewayError("unknown_market", f"no market {market!r}")
        seq, bids, asks = self.engine.book_l2(market, depth)
        return BookView(market, seq, bids, asks, self.engine.reference_price(market))

    async def asks_for(self, market: str, lots: int, depth: int = 50) -> list[tuple[int, int, int]]:
        if market not in self.config.markets:
            raise GatewayError("unknown_market", f"no market {market!r}")
        return self.engine.asks_for(market, lots, depth)

    def top_now(self, market: str) -> tuple[int | None, int | None] | None:
        state = self.engine.markets.get(market)
        if state is None:
            return None  # ``top`` says why
        book = state.book
        return book.best_bid(), book.best_ask()

    async def top(self, market: str) -> tuple[int | None, int | None]:
        best = self.top_now(market)
        if best is None:
            raise GatewayError("unknown_market", f"no market {market!r}")
        return best

    async def queue_position(self, order_id: int) -> int | None:
        return self.engine.queue_position(self.account, order_id)

    # -- events -----------------------------------------------------------------------

    async def subscribe(self, channel: str, market: str) -> None:
        if channel not in ("trades", "book"):
            raise GatewayError("bad_request", "'channel' must be trades|book")
        if market not in self.config.markets:
            raise GatewayError("unknown_market", f"no market {market!r}")
        subs = self.exchange.subscribers.setdefault((channel, market), [])
        if self not in subs:
            subs.append(self)

    def poll_events(self) -> list[Event]:
        queue = self.queue
        if not queue:
            return []
        self.queue = []
        return queue

    async def next_event(self, timeout: float) -> Event | None:
        if not self.queue:
            kernel = self.exchange.kernel
            wait = self.waiter = _Wait()
            kernel.at(kernel.now + max(1, int(timeout * 1e9)), _timeout, self, wait)
            await wait
        return self.queue.pop(0) if self.queue else None

    def wake(self) -> None:
        wait, self.waiter = self.waiter, None
        if wait is not None:
            self.exchange.kernel.resolve(wait, None, self.exchange.kernel.now)


def _tif_of(tif: str | None, otype: OrderType) -> TimeInForce:
    """A request's time in force, or the order type's default (as the exchange decides it)."""
    if tif is None:
        return _GTC if otype is _LIMIT else _IOC
    tif_enum = _TIFS.get(tif)
    if tif_enum is None:
        raise GatewayError("bad_request", "'tif' must be gtc|ioc|fok")
    return tif_enum


def _timeout(gw: EmbeddedGateway, wait: _Wait) -> None:
    if gw.waiter is wait:
        gw.waiter = None
    gw.exchange.kernel.resolve(wait, None, gw.exchange.kernel.now)


__all__ = [
    "EmbeddedExchange", "EmbeddedGateway", "LatencyModel", "SimKernel", "parse_latency",
    "parse_duration_ns", "SIM_EPOCH_NS",
]
