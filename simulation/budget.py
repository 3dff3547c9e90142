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

from typing import Any, Final

from exchange.markets import BPS, Market, MarketConfig
from exchange.types import Event, ExecReport, ExecType, Liquidity, OrderStatus, Side
from simulation.gateway import FINAL_STATUSES, Holding

_BUY: Final = Side.BUY
_TRADE: Final = ExecType.TRADE
_REPLACED: Final = ExecType.REPLACED
_NEW: Final = ExecType.NEW
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


class Pot:
    """One asset of the account, in minor units: native fields, so following a fill is
    integer arithmetic on attributes rather than a boxed read-modify-write of six dicts
    keyed by asset name (that was a tenth of an embedded run)."""

    __slots__ = ("name", "holdings", "committed", "spent", "fees", "bought", "sold")

    def __init__(self, name: str) -> None:
        self.name = name
        self.holdings = 0  # available + locked at the exchange
        self.committed = 0  # what our open and in-flight orders may still spend
        self.spent = 0  # delivered through trades, and fees
        self.fees = 0
        self.bought = 0  # received through trades
        self.sold = 0  # delivered through trades (fees apart)


class Leg:
    """One market as the account follows it: its two pots, its constants and its tallies."""

    __slots__ = (
        "base", "quote", "per_tick_lot", "per_lot", "bps", "notional", "taker_volume",
        "taker_cost", "taker_fills", "last_trade_id", "last_price",
    )

    def __init__(self, spec: Market, base: Pot, quote: Pot) -> None:
        self.base = base
        self.quote = quote
        self.per_tick_lot = spec.quote_per_tick_lot
        self.per_lot = spec.base_per_lot
        self.bps = max(spec.maker_fee_bps, spec.taker_fee_bps)  # what a buy limit commits for fees
        self.notional = 0  # quote units traded
        # Counted on the taker side only, so that a trade between two of our agents is
        # counted once: lots, price_ticks x lots (for the VWAP) and fills.
        self.taker_volume = 0
        self.taker_cost = 0
        self.taker_fills = 0
        self.last_trade_id = 0  # 0: no trade seen yet (trade ids start at 1)
        self.last_price = 0


class Tracked:
    """An order of ours that may still spend: what it commits and how to recompute it.

    A plain class, not a dataclass: in a mypyc build a dataclass's ``__init__`` is the one
    ``dataclasses`` generates at run time, interpreted, and one is built per order.
    """

    __slots__ = ("order_id", "market", "side", "price", "remaining", "pot", "commit", "leg", "placed_ns")

    def __init__(
        self, order_id: int, market: str, side: Side, price: int | None, remaining: int, pot: Pot,
        commit: int, leg: Leg, placed_ns: int = 0,
    ) -> None:
        self.order_id = order_id
        self.market = market
        self.side = side
        self.price = price  # None: a market order
        self.remaining = remaining
        self.pot = pot  # the asset it spends
        self.commit = commit
        self.leg = leg
        self.placed_ns = placed_ns

    @property
    def asset(self) -> str:
        return self.pot.name

    def __repr__(self) -> str:
        return (f"Tracked(order_id={self.order_id}, market={self.market!r}, side={self.side}, "
                f"price={self.price}, remaining={self.remaining}, asset={self.pot.name!r}, "
                f"commit={self.commit})")


class Wallet:
    """One account's holdings and commitments (see the module docstring)."""

    __slots__ = ("config", "pots", "legs", "initial", "orders", "trades", "maker_trades")

    def __init__(self, config: MarketConfig) -> None:
        self.config = config
        self.pots: dict[str, Pot] = {a: Pot(a) for a in config.assets}
        self.legs: dict[str, Leg] = {
            m: Leg(spec, self.pots[spec.base.name], self.pots[spec.quote.name])
            for m, spec in config.markets.items()
        }
        self.initial: dict[str, int] | None = None
        self.orders: dict[int, Tracked] = {}
        self.trades = 0
        self.maker_trades = 0

    # -- read-only views by name (reports and tests; the hot paths use the pots) -------

    @property
    def holdings(self) -> dict[str, int]:
        return {a: p.holdings for a, p in self.pots.items()}

    @property
    def committed(self) -> dict[str, int]:
        return {a: p.committed for a, p in self.pots.items()}

    @property
    def spent(self) -> dict[str, int]:
        return {a: p.spent for a, p in self.pots.items()}

    @property
    def fees(self) -> dict[str, int]:
        return {a: p.fees for a, p in self.pots.items()}

    @property
    def bought(self) -> dict[str, int]:
        return {a: p.bought for a, p in self.pots.items()}

    @property
    def sold(self) -> dict[str, int]:
        return {a: p.sold for a, p in self.pots.items()}

    @property
    def taker_volume(self) -> dict[str, int]:
        return {m: leg.taker_volume for m, leg in self.legs.items()}

    @property
    def taker_cost(self) -> dict[str, int]:
        return {m: leg.taker_cost for m, leg in self.legs.items()}

    @property
    def taker_fills(self) -> dict[str, int]:
        return {m: leg.taker_fills for m, leg in self.legs.items()}

    @property
    def last_trade(self) -> dict[str, tuple[int, int]]:
        """market -> (trade id, price ticks) of the last fill seen there."""
        return {m: (leg.last_trade_id, leg.last_price) for m, leg in self.legs.items() if leg.last_trade_id}

    # -- state from the exchange ------------------------------------------------------

    def load(self, balances: dict[str, Holding]) -> None:
        """Take the exchange's balances as the truth (after funding, or to resynchronise)."""
        pots = self.pots
        for asset, bal in balances.items():
            pot = pots.get(asset)
            if pot is not None:
                pot.holdings = bal.available + bal.locked
        if self.initial is None:
            self.initial = self.holdings

    # -- spending ---------------------------------------------------------------------

    def free(self, asset: str) -> int:
        pot = self.pots[asset]
        return pot.holdings - pot.committed

    def reserve(self, asset: str, amount: int) -> bool:
        """Commit ``amount`` if it is free; False (and nothing committed) otherwise."""
        pot = self.pots[asset]
        if amount > pot.holdings - pot.committed:
            return False
        pot.committed += amount
        return True

    def release(self, asset: str, amount: int) -> None:
        self.pots[asset].committed -= amount

    def track(self, report: ExecReport, asset: str, commit: int, placed_ns: int = 0) -> Tracked:
        """Remember an accepted order whose ``commit`` was reserved before it was sent."""
        market = report.market
        t = Tracked(report.order_id, market, report.side, report.price,  # type: ignore[arg-type]
                    report.remaining, self.pots[asset], commit, self.legs[market], placed_ns)
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
            leg = self.legs[rep.market]
            lots: int = rep.last_qty  # type: ignore[assignment]
            price: int = rep.last_price  # type: ignore[assignment]
            fee: int = rep.fee or 0
            notional = price * lots * leg.per_tick_lot
            units = lots * leg.per_lot
            base = leg.base
            quote = leg.quote
            if rep.side is _BUY:
                base.holdings += units
                base.bought += units
                quote.holdings -= notional + fee
                quote.spent += notional + fee
            else:
                base.holdings -= units
                base.sold += units
                base.spent += units
                quote.holdings += notional - fee
                quote.spent += fee
                quote.bought += notional
            quote.fees += fee
            self.trades += 1
            leg.notional += notional
            if rep.liquidity is _MAKER:
                self.maker_trades += 1
            else:
                leg.taker_fills += 1
                leg.taker_volume += lots
                leg.taker_cost += price * lots
            leg.last_trade_id = rep.trade_id  # type: ignore[assignment]
            leg.last_price = price
            if t is not None and t.price is None:  # market buy: commit shrinks by what it paid
                if t.side is _BUY:
                    new = max(0, t.commit - notional - fee)
                    t.pot.committed += new - t.commit
                    t.commit = new
        elif exec_type is _REPLACED and t is not None:
            t.price = rep.price
        elif exec_type is _NEW and t is not None and t.remaining == rep.remaining:
            return rep  # the acknowledgement of what ``track`` recorded: nothing to follow
        if t is None:
            return rep
        if rep.status in _FINAL:
            t.pot.committed -= t.commit
            del self.orders[t.order_id]
            return rep
        t.remaining = remaining = rep.remaining
        tprice = t.price
        if tprice is not None:
            leg = t.leg
            if t.side is _BUY:  # buy_commit, inline
                notional = tprice * remaining * leg.per_tick_lot
                new = notional - ((-notional * leg.bps) // BPS)
            else:
                new = remaining * leg.per_lot
            t.pot.committed += new - t.commit
            t.commit = new
        return rep

    # -- summaries --------------------------------------------------------------------

    def utilization(self) -> dict[str, dict[str, Any]]:
        """Per asset: initial, now, committed (locked by us), free, spent and spent/initial."""
        out: dict[str, dict[str, Any]] = {}
        initial = self.initial or {}
        for asset, spec in self.config.assets.items():
            pot = self.pots[asset]
            start = initial.get(asset, 0)
            if not start and not pot.holdings and not pot.spent:
                continue
            out[asset] = {
                "initial": spec.format(start),
                "available": spec.format(pot.holdings - pot.committed),
                "locked": spec.format(pot.committed),
                "spent": spec.format(pot.spent),
                "utilization": percent(pot.spent, start),
            }
        return out
