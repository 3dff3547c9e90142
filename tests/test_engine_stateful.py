"""Stateful property test: random traffic on both default markets, every invariant after every step.

A hypothesis ``RuleBasedStateMachine`` drives one ``Exchange`` with deposits, withdrawals,
limit (GTC, IOC, FOK, post-only) and market orders on BTC-USD (no band) and ACME-USD (a
+-10 % band), cancels (own, other accounts', unknown ids) and modifies, from four accounts
that are sometimes short of money. Prices cluster around 100.00 so orders cross often.

After every command the test calls ``ex.check_invariants()`` and also checks, from the
outside and without trusting the engine's own bookkeeping:

* no balance is negative, and per asset the sum of available + locked over every account
  (the fee account included) equals the deposits minus withdrawals the test made;
* each account's available + locked per asset equals what its deposits, withdrawals and
  trades (as the ``Trade`` events report them, fees included) leave it; each account's
  locked amount equals what its open orders must reserve, computed here from the order's
  fills: a sell its remaining base, a buy ``notional(limit, remaining)`` plus
  ``ceil((fee basis + that notional x max bps) / 10000) - fees paid``;
* an order's fees are always ``ceil(sum of notional x bps / 10000)`` over its fills so far
  (rounded up once on the cumulative basis), and execution reports agree with trades;
* no book is crossed; every ``BookDelta`` carries its market's previous ``seq`` + 1, and an
  L2 book rebuilt only from the deltas equals ``ex.book_l2``;
* a rejected command (``ExecReport`` rejected or ``CommandRejected``) is the only event of
  its command and left the whole state exactly as it was;
* trade ids strictly increase; each fill is at the resting order's price, within the
  incoming limit; post-only orders never take; FOK fills completely or changes nothing;
  on ACME-USD an accepted limit price and every market-order fill lie in the band that
  held when the command arrived; an order is open exactly when its last report says so.

Hypothesis spends part of its budget on short or repetitive runs, so a seeded walk of a
few thousand steps drives the same rules with the same checks as well. A last test checks
the engine's promise of one book delta per level a command touched.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from engine_helpers import fingerprint
from hypothesis import HealthCheck, currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from exchange.accounts import FEE_ACCOUNT
from exchange.engine import Exchange
from exchange.markets import BPS
from exchange.types import (
    BalanceChanged,
    BookDelta,
    CancelOrder,
    Command,
    CommandRejected,
    Deposit,
    Event,
    ExecReport,
    ExecType,
    Liquidity,
    ModifyOrder,
    OrderType,
    PlaceOrder,
    Side,
    STPMode,
    TimeInForce,
    Trade,
    Withdraw,
)

ACCOUNTS = ("alice", "bob", "carol", "dave")
MARKETS = ("BTC-USD", "ACME-USD")
CENTER = 10_000  # 100.00 in ticks of 0.01, on both markets (ACME-USD's reference price)
# Quantity unit per market, in lots: 0.5 BTC, or 1 ACME share.
QTY_UNIT = {"BTC-USD": 5000, "ACME-USD": 1}
# Deposit unit per asset, in minor units: $50, 0.1 BTC, 1 ACME share.
DEPOSIT_UNIT = {"USD": 50 * 10**6, "BTC": 10**7, "ACME": 1}
ASSETS = ("USD", "BTC", "ACME")
WEALTH = (0, 8, 40, 160)  # opening deposits, in DEPOSIT_UNITs
STP_CHOICES = (None, None, None, *STPMode)  # mostly the exchange default

# The value each rule argument is drawn from: by hypothesis in the state machine, and by
# random.Random in the seeded long walk at the end of this file.
DOMAINS: dict[str, dict[str, tuple[Any, ...]]] = {
    "deposit": {"account": ACCOUNTS, "asset": ASSETS, "units": tuple(range(1, 31))},
    "withdraw": {"account": ACCOUNTS, "asset": ASSETS, "share": (10, 50, 100, 101)},
    "bad_funding": {
        "account": (*ACCOUNTS, FEE_ACCOUNT),
        "kind": ("unknown_asset", "zero", "negative", "not_int"),
        "withdraw": (False, True),
    },
    "place": {
        "account": ACCOUNTS, "market": MARKETS, "side": (Side.BUY, Side.SELL),
        "kind": ("limit", "limit", "limit", "limit", "ioc", "fok", "post_only", "market",
                 "market_fok"),
        "offset": (*range(-8, 9), -1500, 1500),  # +-1500: outside ACME-USD's band
        "units": tuple(range(9)),  # 0: an invalid quantity
        "stp": STP_CHOICES,
    },
    "take": {
        "account": ACCOUNTS, "market": MARKETS, "side": (Side.BUY, Side.SELL),
        "kind": ("limit", "limit", "ioc", "fok", "market", "market_fok"),
        "slack": (-1, 0, 1, 2, 3), "units": tuple(range(1, 7)), "stp": STP_CHOICES,
    },
    "rest": {
        "account": ACCOUNTS, "market": MARKETS, "side": (Side.BUY, Side.SELL),
        "away": tuple(range(7)), "units": (1, 2, 3, 4), "post_only": (False, True),
        # The engine takes a client order id already in use (the gateway refuses it), so
        # the index of open orders by client order id is exercised with shared ids too.
        "client_order_id": (None, None, "a", "b"),
    },
    "spend": {  # a market order sized by the quote: amounts in cents, 0.01 to 10,000 USD
        "account": ACCOUNTS, "market": MARKETS, "side": (Side.BUY, Side.SELL),
        "cents": (1, 37, 500, 5_000, 12_345, 49_999, 250_000, 1_000_000),
        "fok": (False, False, False, True), "stp": STP_CHOICES,  # FOK: refused, sized to what fills
    },
    "cancel": {
        "account": ACCOUNTS, "whose": ("own", "own", "own", "any", "gone"),
        "pick": tuple(range(64)),
    },
    "modify": {
        "account": ACCOUNTS, "whose": ("own", "own", "own", "own", "any", "gone"),
        "pick": tuple(range(64)),
        "offset": (None, None, None, *range(-8, 9), 1500),
        "qty_change": (None, -3, -2, -1, 0, 1, 2, 3),
    },
}


def strategies(rule_name: str) -> dict[str, st.SearchStrategy[Any]]:
    return {arg: st.sampled_from(values) for arg, values in DOMAINS[rule_name].items()}


def is_rejection(e: Event) -> bool:
    return isinstance(e, CommandRejected) or (
        isinstance(e, ExecReport) and e.exec_type is ExecType.REJECTED
    )


class ExchangeMachine(RuleBasedStateMachine):
    """One exchange, a model of the money and the book built from events, checks per command."""

    def __init__(self) -> None:
        super().__init__()
        self.ex = Exchange()
        self.ts = 0
        self.net_deposits = {asset: 0 for asset in self.ex.config.assets}
        self.seq = {m: 0 for m in MARKETS}
        # L2 rebuilt from deltas only: market -> side -> price -> total quantity.
        self.l2: dict[str, dict[Side, dict[int, int]]] = {
            m: {Side.BUY: {}, Side.SELL: {}} for m in MARKETS
        }
        self.last_trade_id = 0
        self.max_order_id = 0
        self.seen: Counter[str] = Counter()  # what the run exercised
        # The money model, kept from commands and events only:
        # (account, asset) -> available + locked it must hold.
        self.holdings: Counter[tuple[str, str]] = Counter()
        # order id -> [fee basis (sum of notional x bps), fees charged], over its fills.
        self.fills: dict[int, list[int]] = {}
        self.specs = {m: self.ex.market(m) for m in MARKETS}
        # Commands that published two deltas for one level (see the test at the end).
        self.repeated_levels: list[tuple[dict[str, Any], tuple[str, Side, int]]] = []

    def _note(self, what: str) -> None:
        self.seen[what] += 1
        if currently_in_test_context():
            event(what)

    # ------------------------------------------------------------------ helpers

    def _pick_order(self, account: str, whose: str, pick: int) -> int:
        """An order id: the account's own open order, anyone's, or one that is not open."""
        if whose == "own":
            own = self.ex.open_orders(account)
            if own:
                return own[pick % len(own)].id
        elif whose == "any" and self.ex.orders:
            ids = list(self.ex.orders)
            return ids[pick % len(ids)]
        # Mostly not open: long gone (filled, cancelled, expired) or never issued.
        return pick % (self.max_order_id + 3) + 1 if pick % 2 else self.max_order_id + 1 + pick

    def _run(self, cmd: Command) -> list[Event]:
        self.ts += 1
        cmd.ts = self.ts
        ex = self.ex
        before = fingerprint(ex)
        band_before = {m: ex.band(m) for m in MARKETS}
        books_before = {m: ex.book_l3(m) for m in MARKETS}
        target = ex.orders.get(getattr(cmd, "order_id", None))  # type: ignore[arg-type]
        target_before = (target.market, target.price, target.qty) if target else None
        events = ex.handle(cmd)
        assert events, f"{cmd.to_dict()} produced no event"

        rejections = [e for e in events if is_rejection(e)]
        if rejections:
            reason = rejections[0].reason
            self._note(f"{type(cmd).__name__} rejected: {reason}")
            assert len(events) == 1, f"a rejection must be the only event: {events}"
            assert fingerprint(ex) == before, f"rejected {cmd.to_dict()} ({reason}) changed state"
        else:
            self._note(f"{type(cmd).__name__} accepted")

        self._follow_events(cmd, events, rejected=bool(rejections))
        if not rejections:
            self._check_order_rules(cmd, events, band_before, books_before, target_before)
        self._check_state()
        return events

    def _follow_events(self, cmd: Command, events: list[Event], rejected: bool) -> None:
        touched: Counter[tuple[str, Side, int]] = Counter()
        for e in events:
            if isinstance(e, BookDelta):
                touched[e.market, e.side, e.price] += 1
                if touched[e.market, e.side, e.price] == 2:
                    self.repeated_levels.append((cmd.to_dict(), (e.market, e.side, e.price)))
                assert e.seq == self.seq[e.market] + 1, (
                    f"{e.market}: delta seq {e.seq} after {self.seq[e.market]}"
                )
                self.seq[e.market] = e.seq
                assert e.qty >= 0
                levels = self.l2[e.market][e.side]
                if e.qty:
                    levels[e.price] = e.qty
                else:
                    assert e.price in levels, f"delta removes level {e.side} {e.price} never seen"
                    del levels[e.price]
            elif isinstance(e, Trade):
                assert e.trade_id > self.last_trade_id, "trade ids must strictly increase"
                self.last_trade_id = e.trade_id
                assert e.qty > 0 and e.price > 0 and e.maker_fee >= 0 and e.taker_fee >= 0
                self._settle(e)
                self._note("trade")
            elif isinstance(e, ExecReport) and e.order_id is not None:
                self.max_order_id = max(self.max_order_id, e.order_id)
                assert e.filled >= 0 and e.remaining >= 0 and e.filled + e.remaining == e.qty, e
                if e.exec_type is ExecType.TRADE:
                    self._charge(e)
            elif isinstance(e, BalanceChanged):
                assert not rejected
                bal = self.ex.balances(e.account)[e.asset]
                assert (e.available, e.locked) == (bal.available, bal.locked)
        if not rejected and isinstance(cmd, Deposit):
            self.net_deposits[cmd.asset] += cmd.amount
            self.holdings[cmd.account, cmd.asset] += cmd.amount
        elif not rejected and isinstance(cmd, Withdraw):
            self.net_deposits[cmd.asset] -= cmd.amount
            self.holdings[cmd.account, cmd.asset] -= cmd.amount

    def _settle(self, t: Trade) -> None:
        """Move the money a trade moves: buyer pays notional + fee, seller gets notional - fee."""
        spec = self.specs[t.market]
        base, quote = spec.base.name, spec.quote.name
        notional = t.price * t.qty * spec.quote_per_tick_lot
        buyer_fee, seller_fee = (
            (t.taker_fee, t.maker_fee) if t.taker_side is Side.BUY else (t.maker_fee, t.taker_fee)
        )
        self.holdings[t.buyer, base] += t.qty * spec.base_per_lot
        self.holdings[t.buyer, quote] -= notional + buyer_fee
        self.holdings[t.seller, base] -= t.qty * spec.base_per_lot
        self.holdings[t.seller, quote] += notional - seller_fee
        self.holdings[FEE_ACCOUNT, quote] += t.maker_fee + t.taker_fee

    def _charge(self, r: ExecReport) -> None:
        """Fees: rounded up once on the order's cumulative basis, never per fill."""
        spec = self.specs[r.market]
        bps = spec.maker_fee_bps if r.liquidity is Liquidity.MAKER else spec.taker_fee_bps
        fill = self.fills.setdefault(r.order_id, [0, 0])  # type: ignore[arg-type]
        fill[0] += r.last_price * r.last_qty * spec.quote_per_tick_lot * bps  # type: ignore[operator]
        fill[1] += r.fee  # type: ignore[operator]
        assert r.fee is not None and r.fee >= 0
        assert fill[1] == -(-fill[0] // BPS), (
            f"order {r.order_id}: fees {fill[1]}, cumulative rule says {-(-fill[0] // BPS)}"
        )

    def _check_order_rules(
        self, cmd: Command, events: list[Event], band_before: dict[str, Any],
        books_before: dict[str, Any], target_before: tuple[str, int, int] | None,
    ) -> None:
        trades = [e for e in events if isinstance(e, Trade)]
        reports = [e for e in events if isinstance(e, ExecReport)]
        by_id = {t.trade_id: t for t in trades}
        for r in reports:
            if r.exec_type is not ExecType.TRADE:
                continue
            t = by_id[r.trade_id]  # type: ignore[index]
            assert (r.last_price, r.last_qty) == (t.price, t.qty)
            if r.liquidity is Liquidity.MAKER:
                # Each fill is at the maker's resting price.
                assert r.last_price == r.price, f"fill at {r.last_price}, maker rests at {r.price}"
                assert r.fee == t.maker_fee and r.side is not t.taker_side
            else:
                assert r.fee == t.taker_fee and r.side is t.taker_side
            assert r.order_id == (t.buy_order_id if r.side is Side.BUY else t.sell_order_id)
        # An order is open exactly when its last report of the command says it is live, and
        # self-trade prevention only ever cancels the acting account's own orders.
        last: dict[int, ExecReport] = {}
        for r in reports:
            last[r.order_id] = r  # type: ignore[index]
            if r.exec_type is ExecType.SELF_TRADE_PREVENTED:
                assert r.account == cmd.account and r.status == "canceled"
        for oid, r in last.items():
            live = r.status in ("new", "partially_filled")
            assert (oid in self.ex.orders) == live, f"order {oid} is {r.status}"
        if isinstance(cmd, PlaceOrder):
            new = [r for r in reports if r.exec_type is ExecType.NEW]
            assert len(new) == 1
            oid = new[0].order_id
            mine = [t for t in trades if oid in (t.buy_order_id, t.sell_order_id)]
            assert all(t.taker_side == cmd.side for t in mine)
            size = cmd.qty if cmd.quote_qty is None else new[0].qty
            assert sum(t.qty for t in mine) <= size
            if cmd.quote_qty is not None:
                # Sized by the quote: a buy spends at most it, fee included; a sell sells for
                # at most it; and it takes no less than what the book then offered for it.
                spec = self.specs[cmd.market]
                notional = sum(t.price * t.qty for t in mine) * spec.quote_per_tick_lot
                fee = sum(t.taker_fee for t in mine)
                assert (notional + fee if cmd.side is Side.BUY else notional) <= cmd.quote_qty
                self._note("sized by the quote, " + ("filled" if sum(t.qty for t in mine) == size else "short"))
            if cmd.order_type is OrderType.LIMIT:
                buy = cmd.side is Side.BUY
                for t in mine:
                    assert t.price <= cmd.price if buy else t.price >= cmd.price  # type: ignore[operator]
            if cmd.post_only:
                assert not trades, "a post-only order took liquidity"
            band = band_before[cmd.market]
            if band is not None:
                if cmd.order_type is OrderType.LIMIT:
                    assert band[0] <= cmd.price <= band[1]
                else:
                    assert all(band[0] <= t.price <= band[1] for t in mine), "fill out of band"
            if cmd.tif is TimeInForce.FOK:
                final = [r for r in reports if r.order_id == oid][-1]
                if final.status == "expired":
                    assert not trades and final.filled == 0
                    assert not any(isinstance(e, BookDelta) for e in events)
                    assert self.ex.book_l3(cmd.market) == books_before[cmd.market]
                    self._note("FOK expired")
                else:
                    assert final.status == "filled" and final.filled == size
                    self._note("FOK filled")
            if cmd.order_type is OrderType.MARKET:
                assert oid not in self.ex.orders, "a market order rested"
        if isinstance(cmd, ModifyOrder) and target_before is not None:
            market, old_price, old_qty = target_before
            band = band_before[market]
            new_price = old_price if cmd.price is None else cmd.price
            new_qty = old_qty if cmd.qty is None else cmd.qty
            if band is not None and (new_price != old_price or new_qty > old_qty):
                # A cancel/replace arrives again: the band applies as to a new order.
                assert band[0] <= new_price <= band[1], f"amended to {new_price} outside {band}"

    def _check_state(self) -> None:
        ex = self.ex
        ex.check_invariants()
        totals = {asset: 0 for asset in self.net_deposits}
        for account, per_asset in ex.accounts.balances.items():
            for asset, bal in per_asset.items():
                assert bal.available >= 0, f"{account} {asset} available {bal.available}"
                assert bal.locked >= 0, f"{account} {asset} locked {bal.locked}"
                totals[asset] += bal.available + bal.locked
        assert totals == self.net_deposits, f"not conserved: {totals} != {self.net_deposits}"
        # Per account: holdings as the events say, locks as the open orders need.
        must_lock: Counter[tuple[str, str]] = Counter()
        for order in ex.orders.values():
            spec = self.specs[order.market]
            if order.side is Side.SELL:
                must_lock[order.account, spec.base.name] += order.remaining * spec.base_per_lot
            else:
                basis, paid = self.fills.get(order.id, (0, 0))
                rest = order.price * order.remaining * spec.quote_per_tick_lot
                max_bps = max(spec.maker_fee_bps, spec.taker_fee_bps)
                must_lock[order.account, spec.quote.name] += (
                    rest - (-(basis + rest * max_bps) // BPS) - paid
                )
        seen_keys = set()
        for account, per_asset in ex.accounts.balances.items():
            for asset, bal in per_asset.items():
                seen_keys.add((account, asset))
                assert bal.available + bal.locked == self.holdings[account, asset], (
                    f"{account} {asset}: holds {bal.available + bal.locked}, "
                    f"deposits and trades say {self.holdings[account, asset]}"
                )
                assert bal.locked == must_lock[account, asset], (
                    f"{account} {asset}: locked {bal.locked}, open orders need "
                    f"{must_lock[account, asset]}"
                )
        assert all(not v for k, v in self.holdings.items() if k not in seen_keys)
        assert all(not v for k, v in must_lock.items() if k not in seen_keys)
        fees = ex.balances(FEE_ACCOUNT)
        assert all(b.locked == 0 for b in fees.values())
        for m in MARKETS:
            seq, bids, asks = ex.book_l2(m, 10**6)
            assert not bids or not asks or bids[0][0] < asks[0][0], f"{m} crossed: {bids} {asks}"
            assert seq == self.seq[m], f"{m}: book seq {seq}, deltas say {self.seq[m]}"
            rebuilt_bids = sorted(self.l2[m][Side.BUY].items(), reverse=True)
            rebuilt_asks = sorted(self.l2[m][Side.SELL].items())
            assert rebuilt_bids == [(p, q) for p, q, _ in bids], f"{m}: bids differ from deltas"
            assert rebuilt_asks == [(p, q) for p, q, _ in asks], f"{m}: asks differ from deltas"
            walked = 0
            for n, level in enumerate(asks[:50]):
                walked += level[1]
                assert ex.asks_for(m, walked) == asks[:n + 1], f"{m}: a buy of {walked} walks {n + 1} levels"

    # ------------------------------------------------------------------ rules: money

    @initialize(wealth=st.lists(st.sampled_from(WEALTH), min_size=len(ACCOUNTS) * len(ASSETS),
                                max_size=len(ACCOUNTS) * len(ASSETS)))
    def fund(self, wealth: list[int]) -> None:
        """Opening balances: some accounts rich, some poor, some with nothing of an asset."""
        for n, units in enumerate(wealth):
            account, asset = ACCOUNTS[n // len(ASSETS)], ASSETS[n % len(ASSETS)]
            if units:
                self._run(Deposit(0, account, asset, units * DEPOSIT_UNIT[asset]))

    @rule(**strategies("deposit"))
    def deposit(self, account: str, asset: str, units: int) -> None:
        self._run(Deposit(0, account, asset, units * DEPOSIT_UNIT[asset]))

    @rule(**strategies("withdraw"))
    def withdraw(self, account: str, asset: str, share: int) -> None:
        """A share (in %) of what is available; more than 100 % must be refused."""
        available = self.ex.balances(account)[asset].available
        amount = available + 1 if share > 100 else max(available * share // 100, 1)
        self._run(Withdraw(0, account, asset, amount))

    @rule(**strategies("bad_funding"))
    def bad_funding(self, account: str, kind: str, withdraw: bool) -> None:
        asset, amount = {
            "unknown_asset": ("DOGE", 5), "zero": ("USD", 0), "negative": ("USD", -5),
            "not_int": ("USD", 1.5),
        }[kind]
        command = Withdraw if withdraw else Deposit
        cmd = command(0, account, asset, amount)  # type: ignore[arg-type]
        events = self._run(cmd)
        assert isinstance(events[0], CommandRejected)

    # ------------------------------------------------------------------ rules: orders

    @rule(**strategies("place"))
    def place(
        self, account: str, market: str, side: Side, kind: str, offset: int, units: int,
        stp: STPMode | None, client_order_id: str | None = None,
    ) -> None:
        otype = OrderType.MARKET if kind.startswith("market") else OrderType.LIMIT
        tif = {"ioc": TimeInForce.IOC, "fok": TimeInForce.FOK, "market_fok": TimeInForce.FOK}.get(
            kind, TimeInForce.GTC
        )
        price = None if otype is OrderType.MARKET else CENTER + offset
        qty = units * QTY_UNIT[market]
        if units == 1 and market == "BTC-USD":
            qty = 1370  # an odd size, so partial fills do not always line up
        self._run(PlaceOrder(
            0, account, market, side, otype, qty, price, tif, post_only=kind == "post_only",
            stp=stp, client_order_id=client_order_id,
        ))

    @rule(**strategies("take"))
    def take(
        self, account: str, market: str, side: Side, kind: str, slack: int, units: int,
        stp: STPMode | None,
    ) -> None:
        """An order aimed at the best opposite price (a little through it): trades often."""
        _, bids, asks = self.ex.book_l2(market, 1)
        opposite = asks if side is Side.BUY else bids
        best = opposite[0][0] if opposite else CENTER
        offset = best - CENTER + (slack if side is Side.BUY else -slack)
        self.place(account, market, side, kind, offset, units, stp)

    @rule(**strategies("spend"))
    def spend(self, account: str, market: str, side: Side, cents: int, fok: bool, stp: STPMode | None) -> None:
        self._run(PlaceOrder(
            0, account, market, side, OrderType.MARKET, None, None,
            TimeInForce.FOK if fok else TimeInForce.IOC, stp=stp, quote_qty=cents * 10_000,
        ))

    @rule(**strategies("rest"))
    def rest(
        self, account: str, market: str, side: Side, away: int, units: int, post_only: bool,
        client_order_id: str | None,
    ) -> None:
        """A GTC limit on its own side of 100.00, to give the book depth and queues."""
        offset = -away if side is Side.BUY else away
        kind = "post_only" if post_only else "limit"
        self.place(account, market, side, kind, offset, units, None, client_order_id)
        if client_order_id is not None:
            found = self.ex.order_by_client_id(account, client_order_id)
            assert found is None or (found.account == account and found.client_order_id == client_order_id)

    @rule(**strategies("cancel"))
    def cancel(self, account: str, whose: str, pick: int) -> None:
        oid = self._pick_order(account, whose, pick)
        order = self.ex.orders.get(oid)
        events = self._run(CancelOrder(0, account, oid))
        if order is None or order.account != account:
            # Unknown and somebody else's look the same.
            assert isinstance(events[0], CommandRejected) and events[0].reason == "unknown_order"
        else:
            assert oid not in self.ex.orders

    @rule(**strategies("modify"))
    def modify(
        self, account: str, whose: str, pick: int, offset: int | None, qty_change: int | None,
    ) -> None:
        oid = self._pick_order(account, whose, pick)
        order = self.ex.orders.get(oid)
        price = None if offset is None else CENTER + offset
        qty = None
        if qty_change is not None:  # new total quantity, around the current one
            qty = order.qty + qty_change * QTY_UNIT[order.market] if order else qty_change
        events = self._run(ModifyOrder(0, account, oid, price, qty))
        if order is None or order.account != account:
            assert isinstance(events[0], CommandRejected) and events[0].reason == "unknown_order"


ExchangeMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestExchangeStateful = ExchangeMachine.TestCase


# --------------------------------------------------------------------------- a long seeded walk
# Hypothesis spends part of its budget on short or repetitive runs; this walk drives the same
# rules, with the same checks, through a few thousand steps of a steady random mix.

WALK_WEIGHTS = {
    "deposit": 8, "withdraw": 5, "bad_funding": 2, "place": 20, "take": 20, "rest": 20,
    "cancel": 13, "modify": 12, "spend": 6,
}


def seeded_walk(seed: int, steps: int) -> ExchangeMachine:
    rng = random.Random(seed)
    machine = ExchangeMachine()
    machine.fund([rng.choice(WEALTH) for _ in range(len(ACCOUNTS) * len(ASSETS))])
    names, weights = list(WALK_WEIGHTS), list(WALK_WEIGHTS.values())
    for _ in range(steps):
        name = rng.choices(names, weights)[0]
        getattr(machine, name)(**{arg: rng.choice(v) for arg, v in DOMAINS[name].items()})
    machine.teardown()
    return machine


@pytest.mark.parametrize("seed", [1, 2])
def test_long_seeded_walk(seed: int) -> None:
    seen = seeded_walk(seed, 2500).seen
    # The walk must have exercised what it exists to check.
    assert seen["trade"] > 300, seen
    assert seen["PlaceOrder rejected: insufficient_funds"] > 20, seen
    assert seen["ModifyOrder accepted"] > 20 and seen["CancelOrder accepted"] > 20, seen
    assert seen["FOK filled"] and seen["FOK expired"], seen
    assert seen["PlaceOrder rejected: price_out_of_band"], seen
    assert seen["PlaceOrder rejected: would_take_liquidity"], seen


def test_a_command_publishes_one_delta_per_level_it_touches() -> None:
    """The engine promises "one [delta] per level a command touched" (engine.py docstring).

    A feed that says "level gone" and then "level back" within one command makes every
    consumer show a level vanishing that never did.
    """
    machine = seeded_walk(3, 1500)
    assert not machine.repeated_levels, (
        f"{len(machine.repeated_levels)} commands published two deltas for one level; "
        f"first: {machine.repeated_levels[0]}"
    )
