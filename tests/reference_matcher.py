"""A small, obviously-correct reference matcher for the differential test.

Theory of operation
-------------------
Written from the matching rules of issue 2, not from ``exchange/engine.py``, and kept slow
and plain on purpose: every resting order of the market sits in one Python list in arrival
order (an order that loses its priority is removed and appended again), and each step of a
sweep asks "which resting order comes first?" by sorting that list by price with a stable
sort. Nothing is cached, no level totals are kept, no dry run is computed by hand.

Rules modelled (one market, no price band, money never short, so balances are not modelled):

* price-time priority, every fill at the resting order's price;
* LIMIT with GTC (remainder rests), IOC (remainder expires) and FOK (the order is tried
  like an IOC on a copy of the book; unless it filled completely the copy is thrown away
  and the order expires having changed nothing, though it keeps its order id);
* MARKET (never rests; its remainder expires);
* post-only: rejected with ``would_take_liquidity`` if its price reaches the best opposite
  price (of anyone, the account's own orders included), only GTC allowed;
* self-trade prevention when the next resting order belongs to the incoming order's
  account: ``cancel_resting`` cancels the resting one and carries on, ``cancel_incoming``
  cancels the incoming one, ``cancel_both`` both (resting first), ``none`` trades;
* cancel by the owner only (anything else is ``unknown_order``);
* modify: ``qty`` is the new total quantity and must exceed what is filled; a reduction at
  the same price keeps the order's place, anything else takes it out and sends it in again
  as a fresh incoming order (it may trade at once, then rests at the back).

Each command returns an ``Outcome``: the rejection reason or the order id, the trades in
order, the orders self-trade prevention cancelled, and the final state of the order the
command was about.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

BUY, SELL = "buy", "sell"
LIMIT, MARKET = "limit", "market"
GTC, IOC, FOK = "gtc", "ioc", "fok"
CANCEL_RESTING, CANCEL_INCOMING, CANCEL_BOTH, STP_NONE = (
    "cancel_resting", "cancel_incoming", "cancel_both", "none",
)

# A trade as the differential test compares it.
# (trade id, price, qty, buy order id, sell order id, taker side)
TradeTuple = tuple[int, int, int, int, int, str]


@dataclass
class RefOrder:
    id: int
    account: str
    side: str
    price: int | None  # None only for a market order
    qty: int  # total quantity, as amended
    stp: str
    post_only: bool = False
    filled: int = 0

    @property
    def remaining(self) -> int:
        return self.qty - self.filled


@dataclass
class Outcome:
    rejected: str | None = None
    order_id: int | None = None
    trades: list[TradeTuple] = field(default_factory=list)
    stp_canceled: list[int] = field(default_factory=list)
    # The order the command was about, after the command: (status, filled, remaining).
    final: tuple[str, int, int] | None = None


class ReferenceMatcher:
    def __init__(self, min_qty: int = 1, default_stp: str = CANCEL_RESTING) -> None:
        self.min_qty = min_qty
        self.default_stp = default_stp
        self.resting: list[RefOrder] = []  # both sides, oldest arrival first
        self.next_order_id = 1
        self.next_trade_id = 1

    # ------------------------------------------------------------------ views

    def queue(self, side: str) -> list[RefOrder]:
        """Resting orders of one side, best first: better price first, then older first."""
        orders = [o for o in self.resting if o.side == side]
        # sorted() is stable, and self.resting is in arrival order, so equal prices keep time order.
        if side == BUY:
            return sorted(orders, key=lambda o: -o.price)  # type: ignore[operator]
        return sorted(orders, key=lambda o: o.price)  # type: ignore[arg-type,return-value]

    def level3(self) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(bids, asks): every resting order as (order id, price, remaining), priority order."""
        def view(side: str) -> list[tuple[int, int, int]]:
            return [(o.id, o.price, o.remaining) for o in self.queue(side)]  # type: ignore[misc]

        return view(BUY), view(SELL)

    def find(self, account: str, order_id: int) -> RefOrder | None:
        for o in self.resting:
            if o.id == order_id and o.account == account:
                return o
        return None

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _crosses(side: str, limit: int | None, resting_price: int) -> bool:
        if limit is None:  # market order: any price
            return True
        return resting_price <= limit if side == BUY else resting_price >= limit

    def _would_take(self, side: str, price: int) -> bool:
        opposite = self.queue(SELL if side == BUY else BUY)
        return bool(opposite) and self._crosses(side, price, opposite[0].price)  # type: ignore[arg-type]

    @staticmethod
    def _status(order: RefOrder) -> str:
        if order.remaining == 0:
            return "filled"
        return "partially_filled" if order.filled else "new"

    def _sweep(self, taker: RefOrder, out: Outcome) -> bool:
        """Trade ``taker`` against the book until filled or stopped; True if STP cancelled it."""
        opposite = SELL if taker.side == BUY else BUY
        while taker.remaining > 0:
            queue = self.queue(opposite)
            if not queue or not self._crosses(taker.side, taker.price, queue[0].price):  # type: ignore[arg-type]
                return False
            maker = queue[0]
            if maker.account == taker.account and taker.stp != STP_NONE:
                if taker.stp in (CANCEL_RESTING, CANCEL_BOTH):
                    self.resting.remove(maker)
                    out.stp_canceled.append(maker.id)
                if taker.stp in (CANCEL_INCOMING, CANCEL_BOTH):
                    out.stp_canceled.append(taker.id)
                    return True
                continue
            qty = min(taker.remaining, maker.remaining)
            buy_id, sell_id = (taker.id, maker.id) if taker.side == BUY else (maker.id, taker.id)
            out.trades.append((self.next_trade_id, maker.price, qty, buy_id, sell_id, taker.side))  # type: ignore[arg-type]
            self.next_trade_id += 1
            taker.filled += qty
            maker.filled += qty
            if maker.remaining == 0:
                self.resting.remove(maker)
        return False

    # ------------------------------------------------------------------ commands

    def place(
        self, account: str, side: str, order_type: str, qty: int, price: int | None = None,
        tif: str = GTC, post_only: bool = False, stp: str | None = None,
    ) -> Outcome:
        out = Outcome()
        stp = stp or self.default_stp
        if qty <= 0:
            out.rejected = "invalid_quantity"
            return out
        if qty < self.min_qty:
            out.rejected = "below_min_quantity"
            return out
        if order_type == LIMIT:
            if price is None or price <= 0:
                out.rejected = "invalid_price"
                return out
            if post_only and tif != GTC:
                out.rejected = "invalid_order"
                return out
            if post_only and self._would_take(side, price):
                out.rejected = "would_take_liquidity"
                return out
        elif price is not None or post_only:
            out.rejected = "invalid_order"
            return out

        order = RefOrder(self.next_order_id, account, side, price, qty, stp, post_only)
        self.next_order_id += 1
        out.order_id = order.id

        if tif == FOK:
            saved_book, saved_trade_id = copy.deepcopy(self.resting), self.next_trade_id
            stopped = self._sweep(order, out)
            if stopped or order.remaining:
                # All or nothing: forget the attempt entirely.
                self.resting, self.next_trade_id = saved_book, saved_trade_id
                out.trades, out.stp_canceled = [], []
                order.filled = 0
                out.final = ("expired", 0, qty)
                return out
            out.final = ("filled", order.filled, 0)
            return out

        if self._sweep(order, out):
            out.final = ("canceled", order.filled, order.remaining)
        elif order.remaining == 0:
            out.final = ("filled", order.filled, 0)
        elif order_type == LIMIT and tif == GTC:
            self.resting.append(order)
            out.final = (self._status(order), order.filled, order.remaining)
        else:
            out.final = ("expired", order.filled, order.remaining)
        return out

    def cancel(self, account: str, order_id: int) -> Outcome:
        out = Outcome()
        order = self.find(account, order_id)
        if order is None:
            out.rejected = "unknown_order"
            return out
        self.resting.remove(order)
        out.final = ("canceled", order.filled, order.remaining)
        return out

    def modify(
        self, account: str, order_id: int, price: int | None = None, qty: int | None = None,
    ) -> Outcome:
        out = Outcome()
        order = self.find(account, order_id)
        if order is None:
            out.rejected = "unknown_order"
            return out
        if price is None and qty is None:
            out.rejected = "invalid_order"
            return out
        new_price = order.price if price is None else price
        new_qty = order.qty if qty is None else qty
        if new_qty <= order.filled:
            out.rejected = "invalid_quantity"
            return out
        if new_qty < self.min_qty:
            out.rejected = "below_min_quantity"
            return out
        if new_price is None or new_price <= 0:
            out.rejected = "invalid_price"
            return out
        if new_price != order.price and order.post_only and self._would_take(order.side, new_price):
            out.rejected = "would_take_liquidity"
            return out

        if new_price == order.price and new_qty <= order.qty:
            order.qty = new_qty  # a reduction keeps its place in the queue
            out.final = (self._status(order), order.filled, order.remaining)
            return out
        # Cancel/replace: out of the book, in again as an incoming order.
        self.resting.remove(order)
        order.price, order.qty = new_price, new_qty
        if self._sweep(order, out):
            out.final = ("canceled", order.filled, order.remaining)
        elif order.remaining == 0:
            out.final = ("filled", order.filled, 0)
        else:
            self.resting.append(order)
            out.final = (self._status(order), order.filled, order.remaining)
        return out
