"""Hand-written factories for the engine's unit tests: a small desk around ``Exchange``.

``Desk`` speaks in decimal strings (``"100.00"``, ``"0.5"``) the way a user would, converts
them with the market's own exact conversions, hands the command to ``Exchange.handle`` with
an increasing timestamp, and calls ``check_invariants()`` after every single step. Tests
then look at the events and at the public queries; nothing here reaches past them except
``fingerprint``, which records the whole state so a test can prove a rejection changed
nothing.
"""

from __future__ import annotations

from typing import Any

from exchange.engine import Exchange
from exchange.markets import MarketConfig, build_config, DEFAULT_CONFIG
from exchange.types import (
    BookDelta,
    CancelOrder,
    Command,
    CommandRejected,
    Deposit,
    Event,
    ExecReport,
    ExecType,
    ModifyOrder,
    OrderType,
    PlaceOrder,
    Side,
    STPMode,
    TimeInForce,
    Trade,
    Withdraw,
)

BTC = "BTC-USD"
ACME = "ACME-USD"
BUY = Side.BUY
SELL = Side.SELL


def config_with(**market_overrides: dict[str, Any]) -> MarketConfig:
    """The default markets with some fields replaced, e.g. ``config_with(BTC_USD={...})``."""
    import copy

    data = copy.deepcopy(DEFAULT_CONFIG)
    for key, fields in market_overrides.items():
        symbol = key.replace("_", "-")
        for market in data["markets"]:
            if market["symbol"] == symbol:
                market.update(fields)
    return build_config(data)


class Desk:
    """An exchange plus a clock, driven with decimal strings; invariants checked every step."""

    def __init__(
        self, config: MarketConfig | None = None, default_stp: STPMode = STPMode.CANCEL_RESTING,
    ) -> None:
        self.ex = Exchange(config, default_stp=default_stp)
        self.ts = 0

    # ------------------------------------------------------------------ conversions

    def px(self, price: str, market: str = BTC) -> int:
        m = self.ex.market(market)
        assert m is not None
        return m.price_ticks(price)

    def lots(self, qty: str, market: str = BTC) -> int:
        m = self.ex.market(market)
        assert m is not None
        return m.qty_lots(qty)

    def units(self, asset: str, amount: str) -> int:
        return self.ex.config.assets[asset].to_units(amount)

    # ------------------------------------------------------------------ commands

    def do(self, command: Command) -> list[Event]:
        events = self.ex.handle(command)
        self.ex.check_invariants()
        return events

    def next_ts(self) -> int:
        self.ts += 1
        return self.ts

    def fund(self, account: str, asset: str, amount: str) -> list[Event]:
        return self.do(Deposit(self.next_ts(), account, asset, self.units(asset, amount)))

    def withdraw(self, account: str, asset: str, amount: str) -> list[Event]:
        return self.do(Withdraw(self.next_ts(), account, asset, self.units(asset, amount)))

    def limit(
        self, account: str, side: Side, qty: str, price: str, market: str = BTC, **kw: Any,
    ) -> list[Event]:
        return self.do(PlaceOrder(
            self.next_ts(), account, market, side, OrderType.LIMIT,
            self.lots(qty, market), self.px(price, market), **kw,
        ))

    def market(self, account: str, side: Side, qty: str, market: str = BTC, **kw: Any) -> list[Event]:
        return self.do(PlaceOrder(
            self.next_ts(), account, market, side, OrderType.MARKET, self.lots(qty, market), **kw,
        ))

    def market_for(self, account: str, side: Side, amount: str, market: str = BTC, **kw: Any) -> list[Event]:
        """A market order sized by the quote: spend (buy, fee included) or sell for ``amount``."""
        quote = self.ex.config.markets[market].quote.name
        return self.do(PlaceOrder(
            self.next_ts(), account, market, side, OrderType.MARKET, None,
            quote_qty=self.units(quote, amount), **kw,
        ))

    def rest(self, account: str, side: Side, qty: str, price: str, market: str = BTC, **kw: Any) -> int:
        """Place a GTC limit that must rest untouched; return its order id."""
        events = self.limit(account, side, qty, price, market, **kw)
        new = reports(events, ExecType.NEW)
        assert len(new) == 1 and not trades(events), events
        return new[0].order_id

    def cancel(self, account: str, order_id: int) -> list[Event]:
        return self.do(CancelOrder(self.next_ts(), account, order_id))

    def modify(
        self, account: str, order_id: int, price: str | None = None, qty: str | None = None,
        market: str = BTC,
    ) -> list[Event]:
        return self.do(ModifyOrder(
            self.next_ts(), account, order_id,
            None if price is None else self.px(price, market),
            None if qty is None else self.lots(qty, market),
        ))

    # ------------------------------------------------------------------ queries

    def available(self, account: str, asset: str) -> int:
        return self.ex.balances(account)[asset].available

    def locked(self, account: str, asset: str) -> int:
        return self.ex.balances(account)[asset].locked

    def asks(self, market: str = BTC) -> list[tuple[int, int, int]]:
        """Level-3 asks: (order id, price, remaining) in priority order."""
        return self.ex.book_l3(market)[2]

    def bids(self, market: str = BTC) -> list[tuple[int, int, int]]:
        return self.ex.book_l3(market)[1]

    def ask_ids(self, market: str = BTC) -> list[int]:
        return [oid for oid, _, _ in self.asks(market)]

    def bid_ids(self, market: str = BTC) -> list[int]:
        return [oid for oid, _, _ in self.bids(market)]


# ---------------------------------------------------------------------- event filters


def reports(events: list[Event], exec_type: ExecType | None = None) -> list[ExecReport]:
    return [
        e for e in events
        if isinstance(e, ExecReport) and (exec_type is None or e.exec_type is exec_type)
    ]


def trades(events: list[Event]) -> list[Trade]:
    return [e for e in events if isinstance(e, Trade)]


def deltas(events: list[Event]) -> list[BookDelta]:
    return [e for e in events if isinstance(e, BookDelta)]


def rejections(events: list[Event]) -> list[CommandRejected]:
    return [e for e in events if isinstance(e, CommandRejected)]


def only_reject_reason(events: list[Event]) -> str:
    """The reason of the single rejection a refused command must produce, and nothing else."""
    assert len(events) == 1, events
    event = events[0]
    if isinstance(event, ExecReport):
        assert event.exec_type is ExecType.REJECTED and event.order_id is None, event
        return event.reason
    assert isinstance(event, CommandRejected), event
    return event.reason


def fingerprint(ex: Exchange) -> dict[str, Any]:
    """Everything a command could change: balances, books, counters, live orders, references."""
    return {
        "accounts": ex.accounts.snapshot(),
        "books": {sym: ex.book_l3(sym) for sym in ex.markets},
        "l2": {sym: ex.book_l2(sym, 1000) for sym in ex.markets},
        "references": {sym: ms.reference for sym, ms in ex.markets.items()},
        "next_order_id": ex.next_order_id,
        "next_trade_id": ex.next_trade_id,
        "next_priority": ex.next_priority,
        "orders": {
            oid: (
                o.account, o.market, o.side, o.price, o.qty, o.filled, o.remaining, o.cost,
                o.locked, o.fee_basis, o.fee_paid, o.status, o.priority, o.ts,
            )
            for oid, o in ex.orders.items()
        },
        "open_by_account": {acct: [o.id for o in held.orders()] for acct, held in ex.open_by_account.items()},
    }


__all__ = [
    "ACME", "BTC", "BUY", "SELL", "Desk", "TimeInForce", "config_with", "deltas", "fingerprint",
    "only_reject_reason", "rejections", "reports", "trades",
]
