"""An account's money as the account itself can know it: from its balances and its own reports.

Why a trader keeps its own books: an agent must never send an order its budget cannot pay
for, and asking the exchange for balances before every order would double the traffic
(and, over TCP, the latency). ``Wallet`` starts from the balances the exchange reports
after funding, then follows every execution report of the account:

* ``holdings`` is the account's total (available + locked) per asset, kept *exactly*: a
  fill moves the base quantity and the notional, and the fee is the report's own figure;
* ``committed`` is what the account's open and in-flight orders may still spend, kept
  *conservatively*: a buy limit commits ``notional + ceil(notional x max_bps / 10000)``
  of its remaining quantity (never less than the engine reserves, see
  ``exchange/accounts.py``), a sell its remaining base quantity, a market buy the cost of
  walking the book it saw plus the fee;
* ``free = holdings - committed`` is what a new order may use.

``BudgetTracker`` in ``simulation/scheduler.py`` and every agent use it; at the end its
``utilization()`` says how much of each asset was spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from exchange.markets import BPS, Market, MarketConfig
from exchange.types import Event, ExecReport, ExecType, Liquidity, OrderStatus, Side
from simulation.gateway import FINAL_STATUSES, Holding

_BUY: Final = Side.BUY
_TRADE: Final = ExecType.TRADE
_REPLACED: Final = ExecType.REPLACED
_FINAL: Final = FINAL_STATUSES
_REJECTED: Final = OrderStatus.REJECTED
_MAKER: Final = Liquidity.MAKER


def percent(part: int, whole: int) -> str:
    """``part / whole`` as a percentage with one decimal, in integer arithmetic ("n/a" for 0)."""
    if not whole:
        return "n/a"
    tenths = (part * 1000) // whole
    return f"{tenths // 10}.{tenths % 10}%"


def buy_commit(spec: Market, price_ticks: int, lots: int) -> int:
    """The most a buy limit of ``lots`` at ``price_ticks`` can cost, fee included."""
    notional = price_ticks * lots * spec.quote_per_tick_lot
    bps = max(spec.maker_fee_bps, spec.taker_fee_bps)
    return notional - ((-notional * bps) // BPS)


def walk_cost(spec: Market, asks: list[tuple[int, int, int]], lots: int) -> tuple[int, int]:
    """(lots fillable, cost with the taker fee) of a market buy of ``lots`` against ``asks``."""
    left = lots
    notional = 0
    for price, qty, _ in asks:
        take = qty if qty < left else left
        notional += price * take * spec.quote_per_tick_lot
        left -= take
        if not left:
            break
    bps = max(spec.maker_fee_bps, spec.taker_fee_bps)
    return lots - left, notional - ((-notional * bps) // BPS)


@dataclass(slots=True)
class Tracked:
    """An order of ours that may still spend: what it commits and how to recompute it."""

    order_id: int
    market: str
    side: Side
    price: int | None  # None: a market order
    remaining: int
    asset: str
    commit: int
    placed_ns: int = 0


class Wallet:
    """One account's holdings and commitments (see the module docstring)."""

    __slots__ = (
        "config", "holdings", "committed", "initial", "spent", "fees", "orders", "bought",
        "sold", "trades", "maker_trades", "notional", "taker_volume", "taker_cost", "taker_fills",
        "last_trade", "legs",
    )

    def __init__(self, config: MarketConfig) -> None:
        self.config = config
        assets = list(config.assets)
        self.holdings: dict[str, int] = {a: 0 for a in assets}
        self.committed: dict[str, int] = {a: 0 for a in assets}
        self.initial: dict[str, int] | None = None
        self.spent: dict[str, int] = {a: 0 for a in assets}  # delivered through trades + fees
        self.fees: dict[str, int] = {a: 0 for a in assets}
        self.bought: dict[str, int] = {a: 0 for a in assets}  # received through trades
        self.sold: dict[str, int] = {a: 0 for a in assets}
        self.orders: dict[int, Tracked] = {}
        self.trades = 0
        self.maker_trades = 0
        self.notional: dict[str, int] = {m: 0 for m in config.markets}  # quote units per market
        # Per market, counted on the taker side only so that a trade between two of our
        # agents is counted once: lots, and price_ticks x lots (for the VWAP).
        self.taker_volume: dict[str, int] = {m: 0 for m in config.markets}
        self.taker_cost: dict[str, int] = {m: 0 for m in config.markets}
        self.taker_fills: dict[str, int] = {m: 0 for m in config.markets}
        self.last_trade: dict[str, tuple[int, int]] = {}  # market -> (trade id, price ticks)
        # market -> (quote per tick-lot, base per lot, quote asset, base asset, commit fee bps):
        # what ``apply`` needs of a market, read once (it runs for every report)
        self.legs: dict[str, tuple[int, int, str, str, int]] = {
            m: (spec.quote_per_tick_lot, spec.base_per_lot, spec.quote.name, spec.base.name,
                max(spec.maker_fee_bps, spec.taker_fee_bps))
            for m, spec in config.markets.items()
        }

    # -- state from the exchange ------------------------------------------------------

    def load(self, balances: dict[str, Holding]) -> None:
        """Take the exchange's balances as the truth (after funding, or to resynchronise)."""
        for asset, bal in balances.items():
            if asset in self.holdings:
                self.holdings[asset] = bal.available + bal.locked
        if self.initial is None:
            self.initial = dict(self.holdings)

    # -- spending ---------------------------------------------------------------------

    def free(self, asset: str) -> int:
        return self.holdings[asset] - self.committed[asset]

    def reserve(self, asset: str, amount: int) -> bool:
        """Commit ``amount`` if it is free; False (and nothing committed) otherwise."""
        if amount > self.holdings[asset] - self.committed[asset]:
            return False
        self.committed[asset] += amount
        return True

    def release(self, asset: str, amount: int) -> None:
        self.committed[asset] -= amount

    def track(self, report: ExecReport, asset: str, commit: int, placed_ns: int = 0) -> Tracked:
        """Remember an accepted order whose ``commit`` was reserved before it was sent."""
        t = Tracked(report.order_id, report.market, report.side, report.price,  # type: ignore[arg-type]
                    report.remaining, asset, commit, placed_ns)
        self.orders[report.order_id] = t  # type: ignore[index]
        return t

    def order_commit(self, spec: Market, side: Side, price: int | None, lots: int) -> tuple[str, int]:
        """(asset, amount) a limit order of ours commits."""
        if side is _BUY:
            assert price is not None
            return spec.quote.name, buy_commit(spec, price, lots)
        return spec.base.name, lots * spec.base_per_lot

    # -- following the reports --------------------------------------------------------

    def apply(self, ev: Event) -> ExecReport | None:
        """Follow one event of the stream; returns it if it was one of our execution reports."""
        if ev.__class__ is not ExecReport:
            return None
        rep: ExecReport = ev  # type: ignore[assignment]
        t = self.orders.get(rep.order_id)  # type: ignore[arg-type]  # None: not ours, or no id
        exec_type = rep.exec_type
        if exec_type is _TRADE:
            market = rep.market
            per_tick_lot, per_lot, quote_name, base_name, _ = self.legs[market]
            lots = rep.last_qty
            price = rep.last_price
            notional = price * lots * per_tick_lot  # type: ignore[operator]
            fee = rep.fee or 0
            base = lots * per_lot  # type: ignore[operator]
            h = self.holdings
            spent = self.spent
            if rep.side is _BUY:
                h[base_name] += base
                h[quote_name] -= notional + fee
                self.bought[base_name] += base
                spent[quote_name] += notional + fee
            else:
                h[base_name] -= base
                h[quote_name] += notional - fee
                self.sold[base_name] += base
                spent[base_name] += base
                spent[quote_name] += fee
                self.bought[quote_name] += notional
            self.fees[quote_name] += fee
            self.trades += 1
            self.notional[market] += notional
            if rep.liquidity is _MAKER:
                self.maker_trades += 1
            else:
                self.taker_fills[market] += 1
                self.taker_volume[market] += lots  # type: ignore[operator]
                self.taker_cost[market] += price * lots  # type: ignore[operator]
            self.last_trade[market] = (rep.trade_id, price)  # type: ignore[assignment]
            if t is not None and t.price is None:  # market buy: commit shrinks by what it paid
                if t.side is _BUY:
                    new = max(0, t.commit - notional - fee)
                    self.committed[t.asset] += new - t.commit
                    t.commit = new
        elif exec_type is _REPLACED and t is not None:
            t.price = rep.price
        if t is None:
            return rep
        if rep.status in _FINAL:
            self.committed[t.asset] -= t.commit
            del self.orders[t.order_id]
            return rep
        t.remaining = remaining = rep.remaining
        if t.price is not None:
            per_tick_lot, per_lot, _, _, bps = self.legs[t.market]
            if t.side is _BUY:  # buy_commit, inline
                notional = t.price * remaining * per_tick_lot
                new = notional - ((-notional * bps) // BPS)
            else:
                new = remaining * per_lot
            self.committed[t.asset] += new - t.commit
            t.commit = new
        return rep

    # -- summaries --------------------------------------------------------------------

    def utilization(self) -> dict[str, dict[str, Any]]:
        """Per asset: initial, now, committed (locked by us), free, spent and spent/initial."""
        out: dict[str, dict[str, Any]] = {}
        initial = self.initial or {}
        for asset, spec in self.config.assets.items():
            start = initial.get(asset, 0)
            if not start and not self.holdings[asset] and not self.spent[asset]:
                continue
            out[asset] = {
                "initial": spec.format(start),
                "available": spec.format(self.free(asset)),
                "locked": spec.format(self.committed[asset]),
                "spent": spec.format(self.spent[asset]),
                "utilization": percent(self.spent[asset], start),
            }
        return out
