"""One small test per rule of issue 2 ("Order book", "Matching rules", "Accounts, budgets and
risk", "The engine's interface"), driven through ``Exchange.handle`` only.

Units used throughout (default markets):
* BTC-USD: price in ticks of 0.01 USD, quantity in lots of 0.0001 BTC; 1 tick x 1 lot is
  exactly 1 micro-dollar (USD has 6 decimals), one lot is 10,000 satoshi.
* ACME-USD: ticks of 0.01 USD, lots of 1 share; 1 tick x 1 lot is 10,000 micro-dollars.
* Fees: maker 1 bp, taker 2 bp; a buy limit reserves with the larger of the two.

Every ``Desk`` step calls ``Exchange.check_invariants()``.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from engine_helpers import (
    ACME,
    BTC,
    BUY,
    SELL,
    Desk,
    config_with,
    deltas,
    fingerprint,
    only_reject_reason,
    reports,
    trades,
)
from exchange.accounts import FEE_ACCOUNT
from exchange.markets import default_config
from exchange.types import (
    REJECT_MESSAGES,
    BalanceChanged,
    BookDelta,
    CancelOrder,
    Command,
    CommandRejected,
    Deposit,
    ExecReport,
    ExecType,
    Liquidity,
    ModifyOrder,
    OrderStatus,
    OrderType,
    PlaceOrder,
    RejectReason,
    STPMode,
    TimeInForce,
    Withdraw,
)

USD = 10**6  # micro-dollars per dollar
SAT = 10**8  # satoshi per bitcoin


def funded(*accounts: str, usd: str = "100000", btc: str = "100", acme: str = "1000", **kw: Any) -> Desk:
    desk = Desk(**kw)
    for account in accounts:
        desk.fund(account, "USD", usd)
        desk.fund(account, "BTC", btc)
        desk.fund(account, "ACME", acme)
    return desk


def fee_usd(desk: Desk) -> int:
    return desk.available(FEE_ACCOUNT, "USD")


# ====================================================================== deposits and withdrawals


def test_deposit_credits_available_and_reports_the_balance() -> None:
    desk = Desk()
    events = desk.fund("alice", "USD", "250.5")
    assert events == [BalanceChanged("alice", "USD", 250_500_000, 0, desk.ts)]
    assert desk.available("alice", "USD") == 250_500_000
    assert desk.locked("alice", "USD") == 0


def test_withdraw_up_to_available() -> None:
    desk = Desk()
    desk.fund("alice", "USD", "100")
    events = desk.withdraw("alice", "USD", "40")
    assert events == [BalanceChanged("alice", "USD", 60 * USD, 0, desk.ts)]
    desk.withdraw("alice", "USD", "60")  # everything that is available
    assert desk.available("alice", "USD") == 0


def test_withdraw_more_than_available_is_insufficient_funds() -> None:
    desk = Desk()
    desk.fund("alice", "USD", "100")
    before = fingerprint(desk.ex)
    events = desk.do(Withdraw(desk.next_ts(), "alice", "USD", 100 * USD + 1))
    assert only_reject_reason(events) is RejectReason.INSUFFICIENT_FUNDS
    assert events[0].command == "Withdraw"
    assert fingerprint(desk.ex) == before


def test_locked_funds_cannot_be_withdrawn() -> None:
    desk = Desk()
    desk.fund("alice", "USD", "100.02")
    desk.rest("alice", BUY, "0.5", "100.00")  # locks 50.01
    events = desk.do(Withdraw(desk.next_ts(), "alice", "USD", 50_010_001))
    assert only_reject_reason(events) is RejectReason.INSUFFICIENT_FUNDS
    desk.withdraw("alice", "USD", "50.01")  # exactly what is still available
    assert desk.available("alice", "USD") == 0
    assert desk.locked("alice", "USD") == 50_010_000


def test_withdraw_from_an_account_that_never_deposited() -> None:
    desk = Desk()
    before = fingerprint(desk.ex)
    events = desk.do(Withdraw(desk.next_ts(), "ghost", "USD", 1))
    assert only_reject_reason(events) is RejectReason.INSUFFICIENT_FUNDS
    assert fingerprint(desk.ex) == before  # no account was created by the attempt


@pytest.mark.parametrize("command", [Deposit, Withdraw])
def test_unknown_asset(command: type) -> None:
    desk = funded("alice")
    before = fingerprint(desk.ex)
    events = desk.do(command(desk.next_ts(), "alice", "DOGE", 1))
    assert only_reject_reason(events) is RejectReason.UNKNOWN_ASSET
    assert fingerprint(desk.ex) == before


@pytest.mark.parametrize("command", [Deposit, Withdraw])
@pytest.mark.parametrize("amount", [0, -1, 1.5, 1.0, True, None, "10"], ids=repr)
def test_invalid_amount(command: type, amount: object) -> None:
    desk = funded("alice")
    before = fingerprint(desk.ex)
    events = desk.do(command(desk.next_ts(), "alice", "USD", amount))
    assert only_reject_reason(events) is RejectReason.INVALID_AMOUNT
    assert fingerprint(desk.ex) == before


def test_balances_view_lists_every_asset_with_zeros() -> None:
    desk = Desk()
    desk.fund("alice", "BTC", "1")
    view = desk.ex.balances("alice")
    assert set(view) == {"USD", "BTC", "ACME"}
    assert view["USD"].available == 0 and view["BTC"].available == SAT
    assert all(b.available == 0 for b in desk.ex.balances("nobody").values())


# ====================================================================== reservations


def test_buy_limit_locks_notional_plus_maximum_fee() -> None:
    desk = Desk()
    desk.fund("alice", "USD", "1000")
    desk.rest("alice", BUY, "0.5", "100.00")
    # 0.5 x 100.00 = 50 USD; max(maker 1, taker 2) = 2 bp of it = 0.01 USD
    assert desk.locked("alice", "USD") == 50_010_000
    assert desk.available("alice", "USD") == 1000 * USD - 50_010_000


def test_buy_limit_exactly_funded_is_accepted_one_unit_short_is_rejected() -> None:
    desk = Desk()
    desk.fund("alice", "USD", "50.01")
    desk.fund("bob", "USD", "50.009999")
    before = fingerprint(desk.ex)
    short = desk.limit("bob", BUY, "0.5", "100.00")
    assert only_reject_reason(short) is RejectReason.INSUFFICIENT_FUNDS
    assert fingerprint(desk.ex) == before
    desk.rest("alice", BUY, "0.5", "100.00")
    assert desk.available("alice", "USD") == 0


def test_buy_limit_fee_reservation_is_rounded_up() -> None:
    desk = Desk()
    desk.fund("alice", "USD", "1")
    desk.rest("alice", BUY, "0.0001", "0.01")  # notional 1 micro-dollar; 2 bp of it rounds up to 1
    assert desk.locked("alice", "USD") == 2


def test_buy_limit_reserves_with_the_larger_fee_rate() -> None:
    desk = Desk(default_config(maker_fee_bps=7, taker_fee_bps=3))
    desk.fund("alice", "USD", "1000")
    desk.rest("alice", BUY, "1", "100.00")
    assert desk.locked("alice", "USD") == 100 * USD + 70_000


def test_sell_locks_quantity_in_base() -> None:
    desk = Desk()
    desk.fund("alice", "BTC", "2")
    desk.rest("alice", SELL, "0.75", "100.00")
    assert desk.locked("alice", "BTC") == 75_000_000
    assert desk.available("alice", "BTC") == 125_000_000
    assert desk.locked("alice", "USD") == 0


def test_sell_without_enough_base_is_insufficient_funds() -> None:
    desk = Desk()
    desk.fund("alice", "BTC", "0.5")
    before = fingerprint(desk.ex)
    events = desk.limit("alice", SELL, "0.5001", "100.00")
    assert only_reject_reason(events) is RejectReason.INSUFFICIENT_FUNDS
    assert fingerprint(desk.ex) == before


def test_market_buy_reserves_the_walk_cost_plus_taker_fee() -> None:
    # asks: 0.5 @ 100.00 and 0.5 @ 101.00; walking 1 BTC costs 100.50 USD, fee 2 bp = 0.0201.
    for deposit, accepted in (("100.5201", True), ("100.520099", False)):
        desk = funded("seller")
        desk.rest("seller", SELL, "0.5", "100.00")
        desk.rest("seller", SELL, "0.5", "101.00")
        desk.fund("buyer", "USD", deposit)
        before = fingerprint(desk.ex)
        events = desk.market("buyer", BUY, "1")
        if accepted:
            assert [r.exec_type for r in reports(events) if r.account == "buyer"] == [
                ExecType.NEW, ExecType.TRADE, ExecType.TRADE,
            ]
            assert desk.available("buyer", "USD") == 0 and desk.locked("buyer", "USD") == 0
            assert desk.available("buyer", "BTC") == SAT
        else:
            assert only_reject_reason(events) is RejectReason.INSUFFICIENT_FUNDS
            assert fingerprint(desk.ex) == before  # insufficient funds never touch the book


def test_cancel_releases_exactly_what_was_locked() -> None:
    desk = Desk()
    desk.fund("alice", "USD", "1000")
    desk.fund("alice", "BTC", "1")
    before = desk.ex.accounts.snapshot()
    buy = desk.rest("alice", BUY, "0.3", "99.99")
    sell = desk.rest("alice", SELL, "0.7", "150.00")
    desk.cancel("alice", buy)
    desk.cancel("alice", sell)
    assert desk.ex.accounts.snapshot() == before


def test_ioc_expiry_releases_exactly_what_was_locked() -> None:
    desk = funded("seller")
    desk.fund("buyer", "USD", "1000")
    desk.rest("seller", SELL, "0.2", "100.00")
    events = desk.limit("buyer", BUY, "1", "100.00", tif=TimeInForce.IOC)
    expired = reports(events, ExecType.EXPIRED)
    assert len(expired) == 1 and expired[0].filled == 2_000 and expired[0].remaining == 8_000
    # paid 0.2 x 100 = 20 USD plus 2 bp taker fee 0.004; nothing stays locked
    assert desk.locked("buyer", "USD") == 0
    assert desk.available("buyer", "USD") == 1000 * USD - 20 * USD - 4_000


def test_buy_filling_below_its_limit_gets_the_difference_released() -> None:
    desk = funded("seller")
    desk.fund("buyer", "USD", "1000")
    desk.rest("seller", SELL, "1", "100.00")
    desk.limit("buyer", BUY, "1", "110.00")
    assert desk.locked("buyer", "USD") == 0
    assert desk.available("buyer", "USD") == 1000 * USD - 100 * USD - 20_000


def test_partly_filled_buy_keeps_only_what_its_remainder_can_cost() -> None:
    desk = funded("seller")
    desk.fund("buyer", "USD", "1000")
    desk.rest("seller", SELL, "1", "100.00")
    buy = desk.limit("buyer", BUY, "2", "110.00")
    order_id = reports(buy, ExecType.NEW)[0].order_id
    # Remainder 1 BTC @ 110 = 110 USD; fee on the cumulative basis: ceil((200e6 + 220e6) / 1e4)
    # = 42,000 minus the 20,000 already paid.
    assert desk.locked("buyer", "USD") == 110 * USD + 22_000
    assert desk.available("buyer", "USD") == 1000 * USD - 100 * USD - 20_000 - (110 * USD + 22_000)
    desk.cancel("buyer", order_id)
    assert desk.locked("buyer", "USD") == 0
    assert desk.available("buyer", "USD") == 1000 * USD - 100 * USD - 20_000


def test_partly_filled_sell_cancel_releases_the_rest() -> None:
    desk = funded("buyer")
    desk.fund("seller", "BTC", "1")
    sell = desk.rest("seller", SELL, "1", "100.00")
    desk.limit("buyer", BUY, "0.25", "100.00")
    assert desk.locked("seller", "BTC") == 75_000_000
    desk.cancel("seller", sell)
    assert desk.locked("seller", "BTC") == 0
    assert desk.available("seller", "BTC") == 75_000_000


# ====================================================================== settlement and fees


def test_one_fill_settles_both_sides_and_pays_the_fee_account() -> None:
    desk = Desk()
    desk.fund("seller", "BTC", "1")
    desk.fund("buyer", "USD", "1000")
    desk.rest("seller", SELL, "1", "100.00")
    desk.limit("buyer", BUY, "1", "100.00")
    # taker (buyer) 2 bp of 100 USD = 0.02; maker (seller) 1 bp = 0.01
    assert desk.available("buyer", "USD") == 900 * USD - 20_000
    assert desk.available("buyer", "BTC") == SAT
    assert desk.available("seller", "BTC") == 0
    assert desk.available("seller", "USD") == 100 * USD - 10_000
    assert desk.ex.balances(FEE_ACCOUNT)["USD"].available == 30_000
    assert FEE_ACCOUNT == "__fees__"


def test_maker_and_taker_rates_follow_liquidity_not_side() -> None:
    desk = Desk(default_config(maker_fee_bps=3, taker_fee_bps=7))
    for account in ("maker", "taker"):
        desk.fund(account, "USD", "1000")
        desk.fund(account, "BTC", "10")
    desk.rest("maker", BUY, "1", "100.00")  # the resting buyer is the maker
    events = desk.limit("taker", SELL, "1", "100.00")
    fills = {r.account: r for r in reports(events, ExecType.TRADE)}
    assert (fills["maker"].liquidity, fills["maker"].fee) == (Liquidity.MAKER, 30_000)
    assert (fills["taker"].liquidity, fills["taker"].fee) == (Liquidity.TAKER, 70_000)
    [trade] = trades(events)
    assert (trade.maker_fee, trade.taker_fee) == (30_000, 70_000)
    assert desk.available("maker", "USD") == 1000 * USD - 100 * USD - 30_000
    assert desk.available("taker", "USD") == 1000 * USD + 100 * USD - 70_000
    assert fee_usd(desk) == 100_000


def test_fee_is_rounded_up_in_the_exchanges_favour() -> None:
    desk = Desk()
    desk.fund("seller", "BTC", "1")
    desk.fund("buyer", "USD", "1")
    desk.rest("seller", SELL, "0.0001", "0.01")
    events = desk.limit("buyer", BUY, "0.0001", "0.01")  # notional: 1 micro-dollar
    fees = {r.account: r.fee for r in reports(events, ExecType.TRADE)}
    assert fees == {"buyer": 1, "seller": 1}  # 0.0002 and 0.0001 of a unit, both rounded up
    assert desk.available("buyer", "USD") == USD - 2
    assert desk.available("seller", "USD") == 0
    assert fee_usd(desk) == 2


def test_zero_fees_are_allowed() -> None:
    desk = Desk(default_config(maker_fee_bps=0, taker_fee_bps=0))
    desk.fund("seller", "BTC", "1")
    desk.fund("buyer", "USD", "100")  # exactly the notional: no fee to reserve
    desk.rest("seller", SELL, "1", "100.00")
    events = desk.limit("buyer", BUY, "1", "100.00")
    assert [r.fee for r in reports(events, ExecType.TRADE)] == [0, 0]
    assert desk.available("buyer", "USD") == 0 and desk.available("seller", "USD") == 100 * USD
    assert fee_usd(desk) == 0


def _taker_fees(maker_orders: list[str], taker_qty: str) -> list[int]:
    """Rest one ask per size in ``maker_orders`` at 33.33, then one buy sweeps them."""
    desk = funded("maker")
    desk.fund("taker", "USD", "1000")
    for qty in maker_orders:
        desk.rest("maker", SELL, qty, "33.33")
    events = desk.limit("taker", BUY, taker_qty, "33.33")
    return [r.fee for r in reports(events, ExecType.TRADE) if r.account == "taker"]


def test_taker_fee_over_many_small_fills_equals_one_fill_of_the_same_size() -> None:
    # Each 0.0001 @ 33.33 fill has notional 3,333 micro-dollars and a fee basis of 0.6666
    # micro-dollars: rounding each fill up would cost 10; the cumulative fee is ceil(6.666) = 7.
    many = _taker_fees(["0.0001"] * 10, "0.001")
    one = _taker_fees(["0.001"], "0.001")
    assert one == [7]
    assert len(many) == 10 and sum(many) == 7
    assert all(f in (0, 1) for f in many)


def test_maker_fee_over_many_small_fills_equals_one_fill_of_the_same_size() -> None:
    desk = funded("taker")
    desk.fund("maker", "BTC", "1")
    desk.rest("maker", SELL, "0.001", "33.33")
    maker_fees = []
    for _ in range(10):
        events = desk.limit("taker", BUY, "0.0001", "33.33")
        maker_fees += [r.fee for r in reports(events, ExecType.TRADE) if r.account == "maker"]
    # one fill of 0.001 @ 33.33: ceil(33,330 x 1 / 10,000) = 4
    assert sum(maker_fees) == 4
    assert desk.available("maker", "USD") == 33_330 - 4


def test_fees_over_uneven_fills_never_exceed_the_single_fill_fee() -> None:
    sizes = ["0.0003", "0.0001", "0.0007", "0.0002", "0.0004", "0.0003"]
    many = _taker_fees(sizes, "0.002")
    one = _taker_fees(["0.002"], "0.002")
    assert sum(many) == sum(one) == 14  # ceil(66,660 x 2 / 10,000)


def test_running_totals_deposited_withdrawn_bought_sold_fees() -> None:
    desk = Desk()
    desk.fund("seller", "BTC", "2")
    desk.fund("buyer", "USD", "500")
    desk.withdraw("buyer", "USD", "100")
    desk.rest("seller", SELL, "1", "100.00")
    desk.limit("buyer", BUY, "1", "100.00")
    desk.withdraw("seller", "BTC", "0.5")
    b_usd, b_btc = desk.ex.balances("buyer")["USD"], desk.ex.balances("buyer")["BTC"]
    s_usd, s_btc = desk.ex.balances("seller")["USD"], desk.ex.balances("seller")["BTC"]
    assert (b_usd.deposited, b_usd.withdrawn, b_usd.sold, b_usd.fees) == (500 * USD, 100 * USD, 100 * USD, 20_000)
    assert b_btc.bought == SAT
    assert (s_btc.deposited, s_btc.withdrawn, s_btc.sold) == (2 * SAT, SAT // 2, SAT)
    assert (s_usd.bought, s_usd.fees) == (100 * USD, 10_000)
    assert b_usd.spent == 100 * USD + 20_000
    assert desk.ex.accounts.deposits == {"USD": 400 * USD, "BTC": int(1.5 * SAT), "ACME": 0}


# ====================================================================== book views


def _four_level_book() -> tuple[Desk, dict[str, int]]:
    desk = funded("alice", "bob", "carol", "dave")
    ids = {
        "a": desk.rest("alice", BUY, "1", "100.00"),
        "b": desk.rest("bob", BUY, "0.5", "100.00"),
        "c": desk.rest("carol", BUY, "0.2", "99.00"),
        "d": desk.rest("dave", BUY, "0.3", "98.00"),
        "e": desk.rest("alice", SELL, "1", "101.00"),
        "f": desk.rest("bob", SELL, "2", "102.00"),
        "g": desk.rest("carol", SELL, "0.1", "102.00"),
    }
    return desk, ids


def test_level2_view_best_first_with_totals_and_counts() -> None:
    desk, _ = _four_level_book()
    seq, bids, asks = desk.ex.book_l2(BTC)
    assert bids == [(10_000, 15_000, 2), (9_900, 2_000, 1), (9_800, 3_000, 1)]
    assert asks == [(10_100, 10_000, 1), (10_200, 21_000, 2)]
    assert seq == 7  # one delta per resting order
    _, bids2, asks2 = desk.ex.book_l2(BTC, depth=2)
    assert bids2 == bids[:2] and asks2 == asks
    assert desk.ex.book_l2(BTC, depth=0)[1:] == ([], [])
    assert desk.ex.book_l2(ACME) == (0, [], [])
    # what a buy of so many lots walks: up to the level that fills it, no further
    assert desk.ex.asks_for(BTC, 1) == asks[:1]
    assert desk.ex.asks_for(BTC, 10_000) == asks[:1]
    assert desk.ex.asks_for(BTC, 10_001) == asks
    assert desk.ex.asks_for(BTC, 10**9) == asks
    assert desk.ex.asks_for(BTC, 10**9, depth=1) == asks[:1]
    assert desk.ex.asks_for(ACME, 1) == []


def test_level3_view_in_priority_order_never_the_owner() -> None:
    desk, ids = _four_level_book()
    seq, bids, asks = desk.ex.book_l3(BTC)
    assert bids == [(ids["a"], 10_000, 10_000), (ids["b"], 10_000, 5_000),
                    (ids["c"], 9_900, 2_000), (ids["d"], 9_800, 3_000)]
    assert asks == [(ids["e"], 10_100, 10_000), (ids["f"], 10_200, 20_000), (ids["g"], 10_200, 1_000)]
    for row in bids + asks:
        assert len(row) == 3 and all(type(x) is int for x in row)
    assert not any(name in repr(desk.ex.book_l3(BTC)) for name in ("alice", "bob", "carol", "dave"))
    _, top_bids, _ = desk.ex.book_l3(BTC, depth=1)
    assert top_bids == bids[:2]


def test_best_bid_and_ask() -> None:
    desk, ids = _four_level_book()
    book = desk.ex.markets[BTC].book
    assert (book.best_bid(), book.best_ask()) == (10_000, 10_100)
    desk.cancel("alice", ids["a"])
    desk.cancel("bob", ids["b"])
    desk.cancel("alice", ids["e"])
    assert (book.best_bid(), book.best_ask()) == (9_900, 10_200)
    empty = desk.ex.markets[ACME].book
    assert (empty.best_bid(), empty.best_ask()) == (None, None)


def test_queue_position_is_quantity_ahead_and_owner_only() -> None:
    desk, ids = _four_level_book()
    assert desk.ex.queue_position("alice", ids["a"]) == 0
    assert desk.ex.queue_position("bob", ids["b"]) == 10_000
    assert desk.ex.queue_position("alice", ids["b"]) is None  # not alice's order
    assert desk.ex.queue_position("bob", 999) is None
    desk.limit("carol", SELL, "0.4", "100.00")  # takes 0.4 from alice's order
    assert desk.ex.queue_position("bob", ids["b"]) == 6_000
    desk.cancel("alice", ids["a"])
    assert desk.ex.queue_position("bob", ids["b"]) == 0


def test_open_orders_of_an_account() -> None:
    desk, ids = _four_level_book()
    assert [o.id for o in desk.ex.open_orders("alice")] == [ids["a"], ids["e"]]
    assert desk.ex.open_orders("alice", ACME) == []
    assert desk.ex.order("alice", ids["a"]) is not None
    assert desk.ex.order("bob", ids["a"]) is None


def test_book_deltas_carry_new_level_totals_and_a_gapless_sequence() -> None:
    desk = funded("alice", "bob")
    seen: list[BookDelta] = []
    seen += deltas(desk.limit("alice", SELL, "1", "100.00"))
    seen += deltas(desk.limit("alice", SELL, "0.5", "100.00"))
    seen += deltas(desk.limit("alice", SELL, "1", "101.00"))
    seen += deltas(desk.limit("bob", BUY, "2", "101.00"))  # empties 100.00, takes 0.5 at 101.00
    seen += deltas(desk.limit("bob", BUY, "1", "99.00"))
    assert [d.seq for d in seen] == list(range(1, len(seen) + 1))
    assert [(d.side, d.price, d.qty) for d in seen] == [
        (SELL, 10_000, 10_000), (SELL, 10_000, 15_000), (SELL, 10_100, 10_000),
        (SELL, 10_000, 0), (SELL, 10_100, 5_000), (BUY, 9_900, 10_000),
    ]
    # a cancel is a delta too; the other market's sequence is independent
    buy = desk.ex.open_orders("bob")[0].id
    [gone] = deltas(desk.cancel("bob", buy))
    assert (gone.seq, gone.side, gone.price, gone.qty) == (7, BUY, 9_900, 0)
    [acme] = deltas(desk.limit("alice", SELL, "1", "100.00", ACME))
    assert acme.seq == 1 and acme.market == ACME


# ====================================================================== matching


def test_price_time_priority_across_levels_and_orders() -> None:
    desk = funded("s1", "s2", "s3", "buyer")
    first = desk.rest("s1", SELL, "0.3", "100.00")
    better = desk.rest("s2", SELL, "0.2", "99.50")
    second = desk.rest("s3", SELL, "0.4", "100.00")
    third = desk.rest("s2", SELL, "0.5", "100.00")
    worse = desk.rest("s1", SELL, "1", "100.50")
    events = desk.limit("buyer", BUY, "1.5", "100.50")
    fills = [(t.sell_order_id, t.price, t.qty) for t in trades(events)]
    assert fills == [
        (better, 9_950, 2_000),  # best price first
        (first, 10_000, 3_000),  # then oldest first within 100.00
        (second, 10_000, 4_000),
        (third, 10_000, 5_000),
        (worse, 10_050, 1_000),  # and on to the next level for what is left
    ]
    assert desk.asks() == [(worse, 10_050, 9_000)]


def test_each_fill_trades_at_the_resting_price() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "1", "100.00")
    [t] = trades(desk.limit("bob", BUY, "1", "105.00"))
    assert t.price == 10_000  # buyer improved
    desk.rest("alice", BUY, "1", "100.00")
    [t] = trades(desk.limit("bob", SELL, "1", "95.00"))
    assert t.price == 10_000  # seller improved


def test_trade_reports_carry_cumulative_order_state() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.4", "100.00")
    maker = desk.rest("alice", SELL, "0.6", "101.00")
    events = desk.limit("bob", BUY, "2", "101.00", client_order_id="bob-1")
    new = reports(events, ExecType.NEW)[0]
    assert (new.status, new.filled, new.remaining, new.client_order_id) == (
        OrderStatus.NEW, 0, 20_000, "bob-1",
    )
    taker = [r for r in reports(events, ExecType.TRADE) if r.account == "bob"]
    assert [(r.filled, r.remaining, r.cost, r.status) for r in taker] == [
        (4_000, 16_000, 10_000 * 4_000, OrderStatus.PARTIALLY_FILLED),
        (10_000, 10_000, 10_000 * 4_000 + 10_100 * 6_000, OrderStatus.PARTIALLY_FILLED),
    ]
    assert [(r.last_price, r.last_qty, r.liquidity) for r in taker] == [
        (10_000, 4_000, Liquidity.TAKER), (10_100, 6_000, Liquidity.TAKER),
    ]
    [t1, t2] = trades(events)
    assert [r.trade_id for r in taker] == [t1.trade_id, t2.trade_id] and t2.trade_id == t1.trade_id + 1
    assert (t2.buyer, t2.seller, t2.sell_order_id, t2.taker_side) == ("bob", "alice", maker, BUY)
    m = desk.ex.market(BTC)
    last = taker[-1]
    assert m.format_avg_price(last.cost, last.filled) == "100.60"
    made = [r for r in reports(events, ExecType.TRADE) if r.account == "alice"]
    assert [r.status for r in made] == [OrderStatus.FILLED, OrderStatus.FILLED]
    assert all(r.liquidity is Liquidity.MAKER for r in made)


def test_ids_are_increasing_integers_owned_by_the_engine() -> None:
    desk = funded("alice", "bob")
    ids = [desk.rest("alice", SELL, "0.1", p) for p in ("100.00", "101.00", "102.00")]
    assert ids == [1, 2, 3]
    events = desk.market("bob", BUY, "0.3")
    assert reports(events, ExecType.NEW)[0].order_id == 4
    assert [t.trade_id for t in trades(events)] == [1, 2, 3]


def test_gtc_limit_rests_its_remainder() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.3", "100.00")
    events = desk.limit("bob", BUY, "1", "100.00")
    bob_order = reports(events, ExecType.NEW)[0].order_id
    assert not reports(events, ExecType.EXPIRED)
    assert desk.bids() == [(bob_order, 10_000, 7_000)]
    assert desk.asks() == []


def test_ioc_fills_what_it_can_and_expires_the_rest() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.3", "100.00")
    desk.rest("alice", SELL, "0.3", "102.00")
    events = desk.limit("bob", BUY, "1", "101.00", tif=TimeInForce.IOC)
    assert [t.qty for t in trades(events)] == [3_000]
    [expired] = reports(events, ExecType.EXPIRED)
    assert (expired.account, expired.status, expired.filled, expired.remaining) == (
        "bob", OrderStatus.EXPIRED, 3_000, 7_000,
    )
    assert desk.bids() == []
    assert desk.locked("bob", "USD") == 0


def test_ioc_with_nothing_to_match_expires_unfilled() -> None:
    desk = funded("bob")
    events = desk.limit("bob", BUY, "1", "100.00", tif=TimeInForce.IOC)
    assert [r.exec_type for r in reports(events)] == [ExecType.NEW, ExecType.EXPIRED]
    assert desk.bids() == [] and deltas(events) == []


def test_fok_that_can_fill_fills_completely() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.5", "100.00")
    desk.rest("alice", SELL, "0.5", "100.50")
    events = desk.limit("bob", BUY, "1", "100.50", tif=TimeInForce.FOK)
    assert sum(t.qty for t in trades(events)) == 10_000
    assert [r for r in reports(events) if r.account == "bob"][-1].status is OrderStatus.FILLED
    assert not reports(events, ExecType.EXPIRED)
    assert desk.asks() == []


def test_fok_that_cannot_fill_does_nothing_and_is_reported_new_then_expired() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.5", "100.00")
    desk.rest("alice", SELL, "0.4", "100.50")
    desk.rest("alice", SELL, "5", "101.00")  # beyond the FOK's limit
    book_before = desk.ex.book_l3(BTC)
    balances_before = desk.ex.accounts.snapshot()
    trade_id_before = desk.ex.next_trade_id
    events = desk.limit("bob", BUY, "1", "100.50", tif=TimeInForce.FOK)
    assert [(r.exec_type, r.status) for r in events] == [
        (ExecType.NEW, OrderStatus.NEW), (ExecType.EXPIRED, OrderStatus.EXPIRED),
    ]
    assert events[1].filled == 0 and events[1].remaining == 10_000
    assert desk.ex.book_l3(BTC) == book_before  # no change, not even the sequence number
    assert desk.ex.accounts.snapshot() == balances_before  # reservation released exactly
    assert desk.ex.next_trade_id == trade_id_before


def test_fok_sell() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", BUY, "0.5", "100.00")
    failed = desk.limit("bob", SELL, "0.6", "100.00", tif=TimeInForce.FOK)
    assert not trades(failed) and reports(failed)[-1].exec_type is ExecType.EXPIRED
    done = desk.limit("bob", SELL, "0.5", "99.00", tif=TimeInForce.FOK)
    assert [t.price for t in trades(done)] == [10_000]


def test_post_only_rests_when_it_does_not_cross() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "1", "100.00")
    order = desk.rest("bob", BUY, "1", "99.99", post_only=True)
    assert desk.bids() == [(order, 9_999, 10_000)]


@pytest.mark.parametrize(("side", "price"), [(BUY, "100.00"), (BUY, "100.50"), (SELL, "99.00"), (SELL, "98.00")])
def test_post_only_that_would_take_liquidity_is_rejected(side, price: str) -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "1", "100.00")
    desk.rest("alice", BUY, "1", "99.00")
    before = fingerprint(desk.ex)
    events = desk.limit("bob", side, "1", price, post_only=True)
    assert only_reject_reason(events) is RejectReason.WOULD_TAKE_LIQUIDITY
    assert fingerprint(desk.ex) == before


def test_market_order_never_rests_and_expires_its_remainder() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.3", "100.00")
    desk.rest("alice", SELL, "0.2", "250.00")  # a market order has no price limit on BTC-USD
    events = desk.market("bob", BUY, "1")
    assert [t.price for t in trades(events)] == [10_000, 25_000]
    [expired] = reports(events, ExecType.EXPIRED)
    assert (expired.filled, expired.remaining, expired.order_type) == (5_000, 5_000, OrderType.MARKET)
    assert desk.bids() == [] and desk.asks() == []
    assert desk.locked("bob", "USD") == 0


def test_market_sell_sweeps_the_bids() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", BUY, "0.3", "100.00")
    desk.rest("alice", BUY, "0.3", "1.00")
    events = desk.market("bob", SELL, "0.5")
    assert [(t.price, t.qty) for t in trades(events)] == [(10_000, 3_000), (100, 2_000)]
    assert not reports(events, ExecType.EXPIRED)
    assert [r for r in reports(events) if r.account == "bob"][-1].status is OrderStatus.FILLED
    assert desk.bids() == [(2, 100, 1_000)]


@pytest.mark.parametrize("side", [BUY, SELL])
def test_market_order_on_an_empty_side_expires_with_no_fill(side) -> None:
    desk = funded("bob")
    events = desk.market("bob", side, "1")
    assert [(r.exec_type, r.filled) for r in events] == [(ExecType.NEW, 0), (ExecType.EXPIRED, 0)]
    assert events[-1].status is OrderStatus.EXPIRED
    assert desk.bids() == [] and desk.asks() == []


def test_market_buy_from_an_unfunded_account_on_an_empty_book_expires() -> None:
    desk = Desk()
    events = desk.market("nobody", BUY, "1")
    assert [r.exec_type for r in events] == [ExecType.NEW, ExecType.EXPIRED]


def test_market_order_with_gtc_behaves_as_ioc() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.3", "100.00")
    events = desk.market("bob", BUY, "1", tif=TimeInForce.GTC)
    assert reports(events, ExecType.EXPIRED) and desk.bids() == []


def test_market_fok_is_all_or_nothing() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.3", "100.00")
    before = desk.ex.book_l3(BTC)
    events = desk.market("bob", BUY, "1", tif=TimeInForce.FOK)
    assert not trades(events) and desk.ex.book_l3(BTC) == before
    events = desk.market("bob", BUY, "0.3", tif=TimeInForce.FOK)
    assert sum(t.qty for t in trades(events)) == 3_000


def test_a_market_buy_for_an_amount_spends_at_most_it_fee_included() -> None:
    # asks: 0.5 @ 100.00 and 0.5 @ 101.00. 75 USD: 0.5 BTC (50.00) + fee leaves 24.99
    # for 0.2474 BTC at 101.00 (24.9874; the whole 74.9874 + 2 bp = 75.002... too much, so
    # the engine takes the most whose cost with the fee stays within 75).
    desk = funded("seller")
    desk.rest("seller", SELL, "0.5", "100.00")
    desk.rest("seller", SELL, "0.5", "101.00")
    desk.fund("buyer", "USD", "75")
    events = desk.market_for("buyer", BUY, "75")
    new = reports(events, ExecType.NEW)[0]
    bought = sum(t.qty for t in trades(events))
    assert new.qty == bought and new.order_type is OrderType.MARKET
    spent = 75 * USD - desk.available("buyer", "USD")
    assert spent <= 75 * USD and desk.locked("buyer", "USD") == 0
    # The most: one lot more would cost more than 75 with its fee.
    notional = 50 * USD + (bought - 5_000) * 10_100  # ticks x lots = micro-dollars here
    assert notional + -(-notional * 2 // 10_000) == spent
    more = notional + 10_100
    assert more + -(-more * 2 // 10_000) > 75 * USD
    assert [r.status for r in reports(events) if r.account == "buyer"][-1] is OrderStatus.FILLED


def test_a_market_sell_for_an_amount_sells_for_at_most_it() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", BUY, "0.3", "100.00")
    desk.rest("alice", BUY, "0.3", "90.00")
    events = desk.market_for("bob", SELL, "40")  # 30.00 at 100.00, then 0.1111 at 90.00 (9.999)
    assert [(t.price, t.qty) for t in trades(events)] == [(10_000, 3_000), (9_000, 1_111)]
    assert reports(events, ExecType.NEW)[0].qty == 4_111


def test_a_market_order_for_an_amount_stays_in_the_band_and_respects_stp() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.1", "100.00")
    desk.rest("bob", SELL, "0.1", "100.00")  # bob's own, behind alice's
    desk.rest("alice", SELL, "0.1", "101.00")
    # cancel_incoming: the sweep stops at bob's own order, and so does the sizing.
    events = desk.market_for("bob", BUY, "1000", stp=STPMode.CANCEL_INCOMING)
    assert reports(events, ExecType.NEW)[0].qty == 1_000 and sum(t.qty for t in trades(events)) == 1_000
    # cancel_resting: bob's order is skipped (and canceled by the sweep).
    events = desk.market_for("bob", BUY, "1000", stp=STPMode.CANCEL_RESTING)
    assert reports(events, ExecType.NEW)[0].qty == 1_000 and [t.price for t in trades(events)] == [10_100]


def test_a_market_order_for_an_amount_that_buys_nothing_is_rejected_and_changes_nothing() -> None:
    desk = funded("alice", "bob")
    desk.fund("carol", "USD", "5")
    assert only_reject_reason(desk.market_for("bob", BUY, "10")) is RejectReason.NO_LIQUIDITY
    desk.rest("alice", SELL, "0.1", "100.00")
    before = fingerprint(desk.ex)
    assert only_reject_reason(desk.market_for("bob", BUY, "0.01")) is RejectReason.BELOW_MIN_QUANTITY
    assert only_reject_reason(desk.market_for("bob", SELL, "10")) is RejectReason.NO_LIQUIDITY
    assert only_reject_reason(desk.market_for("carol", BUY, "6")) is RejectReason.INSUFFICIENT_FUNDS
    assert fingerprint(desk.ex) == before


@pytest.mark.parametrize(("fields", "reason"), [
    ({"qty": 5}, RejectReason.INVALID_ORDER),  # a size and an amount
    ({"order_type": OrderType.LIMIT, "price": 10_000}, RejectReason.INVALID_ORDER),
    ({"tif": TimeInForce.FOK}, RejectReason.INVALID_ORDER),  # sized to what fills: FOK is moot
    ({"quote_qty": 0}, RejectReason.INVALID_QUANTITY),
    ({"quote_qty": 1.5}, RejectReason.INVALID_QUANTITY),
    ({"quote_qty": "10"}, RejectReason.INVALID_QUANTITY),
])
def test_a_bad_order_for_an_amount_is_rejected(fields: dict[str, Any], reason: RejectReason) -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "0.1", "100.00")
    values: dict[str, Any] = {"order_type": OrderType.MARKET, "qty": None, "price": None, "quote_qty": 10 * USD,
                              "tif": TimeInForce.IOC}
    values.update(fields)
    cmd = PlaceOrder(desk.next_ts(), "bob", BTC, BUY, values["order_type"], values["qty"], values["price"],
                     values["tif"], quote_qty=values["quote_qty"])
    assert only_reject_reason(desk.do(cmd)) is reason


def test_book_is_never_crossed_after_a_sweep() -> None:
    desk = funded("alice", "bob")
    for price in ("100.00", "100.01", "100.02"):
        desk.rest("alice", SELL, "0.1", price)
    desk.limit("bob", BUY, "1", "100.05")
    book = desk.ex.markets[BTC].book
    assert book.best_ask() is None and book.best_bid() == 10_005


# ====================================================================== self-trade prevention


def test_stp_default_cancels_the_resting_order_and_matching_continues() -> None:
    desk = funded("alice", "bob")
    own = desk.rest("alice", SELL, "1", "100.00")
    other = desk.rest("bob", SELL, "1", "100.00")
    events = desk.limit("alice", BUY, "1", "100.00")
    [stp] = reports(events, ExecType.SELF_TRADE_PREVENTED)
    assert (stp.order_id, stp.account, stp.status, stp.remaining) == (own, "alice", OrderStatus.CANCELED, 10_000)
    [t] = trades(events)
    assert (t.sell_order_id, t.buyer, t.seller) == (other, "alice", "bob")
    assert desk.asks() == [] and desk.bids() == []
    assert desk.locked("alice", "BTC") == 0  # the canceled sell's reservation came back


def test_stp_cancel_resting_then_the_incoming_order_rests_at_that_price() -> None:
    desk = funded("alice")
    own = desk.rest("alice", SELL, "1", "100.00")
    events = desk.limit("alice", BUY, "1", "100.00")
    assert [r.order_id for r in reports(events, ExecType.SELF_TRADE_PREVENTED)] == [own]
    new = reports(events, ExecType.NEW)[0].order_id
    assert desk.asks() == [] and desk.bids() == [(new, 10_000, 10_000)]


def test_stp_cancel_incoming() -> None:
    desk = funded("alice", "bob")
    desk.rest("bob", SELL, "0.4", "100.00")
    own = desk.rest("alice", SELL, "1", "100.00")
    events = desk.limit("alice", BUY, "2", "100.00", stp=STPMode.CANCEL_INCOMING)
    assert [t.qty for t in trades(events)] == [4_000]  # the order ahead of alice's still trades
    [stp] = reports(events, ExecType.SELF_TRADE_PREVENTED)
    assert stp.account == "alice" and stp.order_id != own
    assert (stp.status, stp.filled, stp.remaining) == (OrderStatus.CANCELED, 4_000, 16_000)
    assert desk.asks() == [(own, 10_000, 10_000)] and desk.bids() == []
    assert desk.locked("alice", "USD") == 0


def test_stp_cancel_both() -> None:
    desk = funded("alice")
    own = desk.rest("alice", SELL, "1", "100.00")
    events = desk.limit("alice", BUY, "1", "100.00", stp=STPMode.CANCEL_BOTH)
    prevented = reports(events, ExecType.SELF_TRADE_PREVENTED)
    assert len(prevented) == 2 and prevented[0].order_id == own
    assert all(r.account == "alice" and r.status is OrderStatus.CANCELED for r in prevented)
    assert not trades(events)
    assert desk.asks() == [] and desk.bids() == []
    assert desk.locked("alice", "USD") == 0 and desk.locked("alice", "BTC") == 0


def test_stp_none_allows_a_self_trade() -> None:
    desk = funded("alice")
    desk.rest("alice", SELL, "1", "100.00")
    events = desk.limit("alice", BUY, "1", "100.00", stp=STPMode.NONE)
    [t] = trades(events)
    assert t.buyer == t.seller == "alice"
    assert not reports(events, ExecType.SELF_TRADE_PREVENTED)
    # alice only paid both fees: 0.02 taker + 0.01 maker
    assert desk.available("alice", "USD") == 100_000 * USD - 30_000
    assert desk.available("alice", "BTC") == 100 * SAT


def test_stp_mode_of_the_incoming_order_decides() -> None:
    desk = funded("alice")
    desk.rest("alice", SELL, "1", "100.00", stp=STPMode.NONE)
    events = desk.limit("alice", BUY, "1", "100.00")  # default: cancel_resting
    assert reports(events, ExecType.SELF_TRADE_PREVENTED) and not trades(events)


def test_exchange_default_stp_mode() -> None:
    desk = funded("alice", default_stp=STPMode.NONE)
    desk.rest("alice", SELL, "1", "100.00")
    assert trades(desk.limit("alice", BUY, "1", "100.00"))
    desk = funded("alice", default_stp=STPMode.CANCEL_INCOMING)
    own = desk.rest("alice", SELL, "1", "100.00")
    events = desk.limit("alice", BUY, "1", "100.00")
    assert reports(events, ExecType.SELF_TRADE_PREVENTED)[0].order_id != own
    assert desk.ask_ids() == [own]
    # a per-order mode overrides the exchange default
    events = desk.limit("alice", BUY, "1", "100.00", stp=STPMode.CANCEL_RESTING)
    assert reports(events, ExecType.SELF_TRADE_PREVENTED)[0].order_id == own


def test_stp_on_market_orders_and_the_market_buy_reservation() -> None:
    desk = funded("alice", "bob")
    own = desk.rest("alice", SELL, "1", "100.00")
    desk.rest("bob", SELL, "1", "200.00")
    events = desk.market("alice", BUY, "1")
    assert reports(events, ExecType.SELF_TRADE_PREVENTED)[0].order_id == own
    assert [t.price for t in trades(events)] == [20_000]


@pytest.mark.parametrize("mode", list(STPMode))
def test_stp_given_as_its_wire_string_acts_like_the_enum(mode: STPMode) -> None:
    # The engine's validation accepts a plain string equal to a mode ("cancel_resting" in
    # frozenset(STPMode) is True). Accepting it is fine, but it must then act as that mode,
    # not as something else; rejecting it with invalid_order would be fine too.
    def run(stp: object) -> list[tuple]:
        desk = funded("alice")
        desk.rest("alice", SELL, "1", "100.00")
        events = desk.limit("alice", BUY, "1", "100.00", stp=stp)
        return [(type(e).__name__, getattr(e, "exec_type", None), getattr(e, "order_id", None))
                for e in events]

    as_string = run(str(mode.value))
    if as_string[0][1] is ExecType.REJECTED:
        return
    assert as_string == run(mode)


# ====================================================================== cancel


def test_owner_cancels_and_sees_the_report_and_the_book_delta() -> None:
    desk = funded("alice")
    order = desk.rest("alice", BUY, "1", "100.00", client_order_id="c-1")
    events = desk.cancel("alice", order)
    [report] = reports(events)
    assert (report.exec_type, report.status, report.order_id, report.client_order_id) == (
        ExecType.CANCELED, OrderStatus.CANCELED, order, "c-1",
    )
    [delta] = deltas(events)
    assert (delta.side, delta.price, delta.qty) == (BUY, 10_000, 0)
    assert desk.bids() == []


def test_cancel_of_another_accounts_order_looks_exactly_like_an_unknown_id() -> None:
    desk = funded("alice", "bob")
    order = desk.rest("alice", BUY, "1", "100.00")
    before = fingerprint(desk.ex)
    theirs = desk.do(CancelOrder(50, "bob", order))
    assert fingerprint(desk.ex) == before
    desk.cancel("alice", order)
    unknown = desk.do(CancelOrder(50, "bob", order))  # now the id really is unknown
    assert theirs == unknown
    [rej] = theirs
    assert isinstance(rej, CommandRejected) and rej.reason is RejectReason.UNKNOWN_ORDER
    assert "alice" not in repr(rej)


@pytest.mark.parametrize("order_id", [999, 0, -1, "1", None, 1.0])
def test_cancel_unknown_order_ids(order_id: object) -> None:
    desk = funded("alice")
    desk.rest("alice", BUY, "1", "100.00")  # order 1
    before = fingerprint(desk.ex)
    events = desk.do(CancelOrder(desk.next_ts(), "alice", order_id))
    assert only_reject_reason(events) is RejectReason.UNKNOWN_ORDER
    assert fingerprint(desk.ex) == before


def test_cancel_twice_and_cancel_a_filled_order_are_unknown() -> None:
    desk = funded("alice", "bob")
    order = desk.rest("alice", BUY, "1", "100.00")
    desk.cancel("alice", order)
    assert only_reject_reason(desk.cancel("alice", order)) is RejectReason.UNKNOWN_ORDER
    filled = desk.rest("alice", BUY, "1", "100.00")
    desk.limit("bob", SELL, "1", "100.00")
    assert only_reject_reason(desk.cancel("alice", filled)) is RejectReason.UNKNOWN_ORDER


# ====================================================================== modify


def test_modify_keeps_the_order_id_and_reports_replaced() -> None:
    desk = funded("alice")
    order = desk.rest("alice", BUY, "1", "100.00", client_order_id="c-7")
    events = desk.modify("alice", order, price="99.00", qty="2")
    [replaced] = reports(events, ExecType.REPLACED)
    assert (replaced.order_id, replaced.price, replaced.qty, replaced.remaining) == (order, 9_900, 20_000, 20_000)
    assert replaced.client_order_id == "c-7"
    assert desk.bids() == [(order, 9_900, 20_000)]
    assert [(d.price, d.qty) for d in deltas(events)] == [(10_000, 0), (9_900, 20_000)]


def test_modify_quantity_is_the_new_total_and_must_exceed_filled() -> None:
    desk = funded("alice", "bob")
    order = desk.rest("alice", SELL, "1", "100.00")
    desk.limit("bob", BUY, "0.4", "100.00")  # 0.4 filled, 0.6 left
    for qty in ("0.4", "0.3"):
        before = fingerprint(desk.ex)
        events = desk.modify("alice", order, qty=qty)
        assert only_reject_reason(events) is RejectReason.INVALID_QUANTITY
        assert fingerprint(desk.ex) == before
    events = desk.modify("alice", order, qty="0.6")
    [replaced] = reports(events, ExecType.REPLACED)
    assert (replaced.qty, replaced.filled, replaced.remaining) == (6_000, 4_000, 2_000)
    assert replaced.status is OrderStatus.PARTIALLY_FILLED
    assert desk.asks() == [(order, 10_000, 2_000)]
    assert desk.locked("alice", "BTC") == 20_000_000


def test_reducing_quantity_at_the_same_price_keeps_time_priority() -> None:
    desk = funded("alice", "bob")
    a = desk.rest("alice", BUY, "1", "100.00")
    b = desk.rest("bob", BUY, "1", "100.00")
    events = desk.modify("alice", a, qty="0.5")
    assert desk.bid_ids() == [a, b]
    assert [(d.price, d.qty) for d in deltas(events)] == [(10_000, 15_000)]
    assert desk.locked("alice", "USD") == 50_010_000  # the surplus came back
    desk.fund("carol", "BTC", "1")
    [t] = trades(desk.limit("carol", SELL, "0.1", "100.00"))
    assert t.buy_order_id == a  # alice is still first


def test_increasing_quantity_loses_time_priority() -> None:
    desk = funded("alice", "bob")
    a = desk.rest("alice", BUY, "1", "100.00")
    b = desk.rest("bob", BUY, "1", "100.00")
    desk.modify("alice", a, qty="2")
    assert desk.bid_ids() == [b, a]
    assert desk.bids()[1] == (a, 10_000, 20_000)


def test_changing_price_loses_time_priority_even_when_changed_back() -> None:
    desk = funded("alice", "bob")
    a = desk.rest("alice", BUY, "1", "100.00")
    b = desk.rest("bob", BUY, "1", "100.00")
    desk.modify("alice", a, price="99.00")
    desk.modify("alice", a, price="100.00")
    assert desk.bid_ids() == [b, a]


def test_modify_to_a_crossing_price_matches_at_once() -> None:
    desk = funded("alice", "bob")
    ask = desk.rest("bob", SELL, "0.4", "101.00")
    bid = desk.rest("alice", BUY, "1", "100.00")
    events = desk.modify("alice", bid, price="101.00")
    assert [r.exec_type for r in reports(events) if r.account == "alice"] == [ExecType.REPLACED, ExecType.TRADE]
    [t] = trades(events)
    assert (t.buy_order_id, t.sell_order_id, t.price, t.qty) == (bid, ask, 10_100, 4_000)
    [taker] = [r for r in reports(events, ExecType.TRADE) if r.account == "alice"]
    assert taker.liquidity is Liquidity.TAKER
    assert desk.bids() == [(bid, 10_100, 6_000)] and desk.asks() == []


def test_modify_that_cannot_be_funded_is_rejected_and_the_order_stays_untouched() -> None:
    desk = Desk()
    desk.fund("alice", "USD", "100.02")
    desk.fund("bob", "USD", "1000")
    order = desk.rest("alice", BUY, "1", "100.00")  # locks all of it
    desk.rest("bob", BUY, "1", "100.00")
    for price, qty in (("100.01", None), (None, "1.0001"), ("200.00", "2")):
        before = fingerprint(desk.ex)
        events = desk.modify("alice", order, price=price, qty=qty)
        assert only_reject_reason(events) is RejectReason.INSUFFICIENT_FUNDS
        assert events[0].order_id == order and events[0].command == "ModifyOrder"
        assert fingerprint(desk.ex) == before
    assert desk.bid_ids()[0] == order  # still first in line


def test_modify_sell_rechecks_base_funds() -> None:
    desk = Desk()
    desk.fund("alice", "BTC", "1")
    order = desk.rest("alice", SELL, "0.6", "100.00")
    before = fingerprint(desk.ex)
    assert only_reject_reason(desk.modify("alice", order, qty="1.0001")) is RejectReason.INSUFFICIENT_FUNDS
    assert fingerprint(desk.ex) == before
    desk.modify("alice", order, qty="1")
    assert desk.locked("alice", "BTC") == SAT and desk.available("alice", "BTC") == 0


def test_modify_lower_buy_price_releases_funds() -> None:
    desk = Desk()
    desk.fund("alice", "USD", "1000")
    order = desk.rest("alice", BUY, "1", "100.00")
    desk.modify("alice", order, price="50.00")
    assert desk.locked("alice", "USD") == 50 * USD + 10_000


def test_post_only_modify_that_would_cross_is_rejected() -> None:
    desk = funded("alice", "bob")
    desk.rest("bob", SELL, "1", "101.00")
    order = desk.rest("alice", BUY, "1", "100.00", post_only=True)
    for price in ("101.00", "102.00"):
        before = fingerprint(desk.ex)
        events = desk.modify("alice", order, price=price)
        assert only_reject_reason(events) is RejectReason.WOULD_TAKE_LIQUIDITY
        assert fingerprint(desk.ex) == before
    desk.modify("alice", order, price="100.99")
    assert desk.bids() == [(order, 10_099, 10_000)]


def test_modify_of_another_accounts_order_is_unknown_order() -> None:
    desk = funded("alice", "bob")
    order = desk.rest("alice", BUY, "1", "100.00")
    before = fingerprint(desk.ex)
    theirs = desk.do(ModifyOrder(70, "bob", order, qty=5_000))
    assert fingerprint(desk.ex) == before
    desk.cancel("alice", order)
    assert theirs == desk.do(ModifyOrder(70, "bob", order, qty=5_000))
    assert only_reject_reason(theirs) is RejectReason.UNKNOWN_ORDER


def test_modify_price_outside_the_band_is_rejected() -> None:
    desk = funded("alice")
    order = desk.rest("alice", BUY, "1", "100.00", ACME)
    before = fingerprint(desk.ex)
    events = desk.modify("alice", order, price="110.01", market=ACME)
    assert only_reject_reason(events) is RejectReason.PRICE_OUT_OF_BAND
    assert fingerprint(desk.ex) == before
    desk.modify("alice", order, price="110.00", market=ACME)


def test_modify_with_nothing_to_change_is_invalid() -> None:
    desk = funded("alice")
    order = desk.rest("alice", BUY, "1", "100.00")
    before = fingerprint(desk.ex)
    events = desk.do(ModifyOrder(desk.next_ts(), "alice", order))
    assert only_reject_reason(events) is RejectReason.INVALID_ORDER
    assert fingerprint(desk.ex) == before


def test_modify_to_the_same_price_and_quantity_changes_nothing_in_the_book() -> None:
    desk = funded("alice", "bob")
    a = desk.rest("alice", BUY, "1", "100.00")
    desk.rest("bob", BUY, "1", "100.00")
    book = desk.ex.book_l3(BTC)
    events = desk.modify("alice", a, price="100.00", qty="1")
    assert [r.exec_type for r in reports(events)] == [ExecType.REPLACED]
    assert desk.ex.book_l3(BTC) == book


def test_stp_during_a_crossing_modify() -> None:
    desk = funded("alice")
    ask = desk.rest("alice", SELL, "1", "101.00")
    bid = desk.rest("alice", BUY, "1", "100.00")
    events = desk.modify("alice", bid, price="101.00")
    assert [r.order_id for r in reports(events, ExecType.SELF_TRADE_PREVENTED)] == [ask]
    assert desk.bids() == [(bid, 10_100, 10_000)] and desk.asks() == []


# ====================================================================== price bands (ACME-USD)


def test_band_starts_around_the_configured_reference() -> None:
    desk = Desk()
    assert desk.ex.band(ACME) == (9_000, 11_000)
    assert desk.ex.band(BTC) is None


@pytest.mark.parametrize(
    ("side", "price", "inside"),
    [(BUY, "110.00", True), (BUY, "110.01", False), (SELL, "90.00", True), (SELL, "89.99", False),
     (BUY, "89.99", False), (SELL, "110.01", False), (BUY, "90.00", True)],
)
def test_limit_outside_the_band_is_rejected(side, price: str, inside: bool) -> None:
    desk = funded("alice")
    before = fingerprint(desk.ex)
    events = desk.limit("alice", side, "1", price, ACME)
    if inside:
        assert reports(events, ExecType.NEW)
    else:
        assert only_reject_reason(events) is RejectReason.PRICE_OUT_OF_BAND
        assert fingerprint(desk.ex) == before


def test_btc_usd_has_no_band() -> None:
    desk = funded("alice")
    desk.rest("alice", SELL, "0.0001", "999999.99")
    desk.rest("alice", BUY, "0.0001", "0.01")


def test_the_reference_becomes_the_last_trade_price() -> None:
    desk = funded("alice", "bob")
    desk.rest("alice", SELL, "1", "104.00", ACME)
    desk.rest("alice", SELL, "1", "105.00", ACME)
    desk.limit("bob", BUY, "2", "105.00", ACME)  # last trade at 105.00
    assert desk.ex.band(ACME) == (9_450, 11_550)
    before = fingerprint(desk.ex)
    assert only_reject_reason(desk.limit("bob", BUY, "1", "115.51", ACME)) is RejectReason.PRICE_OUT_OF_BAND
    assert only_reject_reason(desk.limit("bob", SELL, "1", "94.49", ACME)) is RejectReason.PRICE_OUT_OF_BAND
    assert fingerprint(desk.ex) == before
    desk.rest("bob", BUY, "1", "94.50", ACME)
    desk.rest("alice", SELL, "1", "115.50", ACME)


def _trade_acme_at(desk: Desk, price: str) -> None:
    desk.rest("mover", SELL, "1", price, ACME)
    assert trades(desk.limit("mover2", BUY, "1", price, ACME))


def test_market_sell_never_trades_below_the_band() -> None:
    desk = funded("mover", "mover2", "bob", "alice")
    _trade_acme_at(desk, "94.00")  # band now [84.60, 103.40]
    stale = desk.rest("bob", BUY, "1", "85.00", ACME)
    _trade_acme_at(desk, "103.00")  # band now [92.70, 113.30]: 85.00 is outside
    desk.rest("bob", BUY, "1", "99.00", ACME)
    events = desk.market("alice", SELL, "2", ACME)
    assert [t.price for t in trades(events)] == [9_900]
    [expired] = reports(events, ExecType.EXPIRED)
    assert (expired.filled, expired.remaining) == (1, 1)
    assert desk.bid_ids(ACME) == [stale]


def test_market_buy_never_trades_above_the_band() -> None:
    desk = funded("mover", "mover2", "bob", "alice")
    stale = desk.rest("bob", SELL, "1", "109.00", ACME)
    _trade_acme_at(desk, "90.00")  # band now [81.00, 99.00]: 109.00 is outside
    desk.rest("bob", SELL, "1", "98.00", ACME)
    events = desk.market("alice", BUY, "2", ACME)
    assert [t.price for t in trades(events)] == [9_800]
    [expired] = reports(events, ExecType.EXPIRED)
    assert (expired.filled, expired.remaining) == (1, 1)
    assert desk.ask_ids(ACME) == [stale]
    assert desk.locked("alice", "USD") == 0


def test_market_order_with_only_out_of_band_liquidity_expires_unfilled() -> None:
    desk = funded("mover", "mover2", "bob", "alice")
    desk.rest("bob", SELL, "1", "109.00", ACME)
    _trade_acme_at(desk, "90.00")
    events = desk.market("alice", BUY, "1", ACME)
    assert [r.exec_type for r in events] == [ExecType.NEW, ExecType.EXPIRED]


# ====================================================================== every reject reason


def busy_desk() -> Desk:
    """Several accounts, resting orders on both markets, one partial fill, fees collected."""
    desk = funded("alice", "bob")
    desk.fund("poor", "USD", "1")
    desk.fund("poor", "BTC", "0.0001")
    desk.rest("alice", SELL, "1", "101.00")   # order 1
    desk.rest("alice", BUY, "1", "99.00")     # order 2
    desk.rest("bob", SELL, "0.5", "102.00")   # order 3
    desk.rest("bob", BUY, "2", "100.00", ACME)  # order 4
    desk.limit("bob", BUY, "0.25", "101.00")  # order 5: partial fill of order 1
    return desk


def place(account: str = "bob", market: str = BTC, side: Any = BUY, otype: Any = OrderType.LIMIT,
          qty: Any = 1_000, price: Any = 9_000, **kw: Any) -> Callable[[Desk], Command]:
    return lambda desk: PlaceOrder(desk.next_ts(), account, market, side, otype, qty, price, **kw)


REJECTED_COMMANDS: dict[str, tuple[Callable[[Desk], Command], RejectReason]] = {
    "unknown market": (place(market="ETH-USD"), RejectReason.UNKNOWN_MARKET),
    "lowercase market": (place(market="btc-usd"), RejectReason.UNKNOWN_MARKET),
    "price zero": (place(price=0), RejectReason.INVALID_PRICE),
    "price negative": (place(price=-100), RejectReason.INVALID_PRICE),
    "limit without price": (place(price=None), RejectReason.INVALID_PRICE),
    "price float": (place(price=9_000.0), RejectReason.INVALID_PRICE),
    "price bool": (place(price=True), RejectReason.INVALID_PRICE),
    "price string": (place(price="90.00"), RejectReason.INVALID_PRICE),
    "qty zero": (place(qty=0), RejectReason.INVALID_QUANTITY),
    "qty negative": (place(qty=-5), RejectReason.INVALID_QUANTITY),
    "qty float": (place(qty=1.0), RejectReason.INVALID_QUANTITY),
    "qty none": (place(qty=None), RejectReason.INVALID_QUANTITY),
    "qty bool": (place(qty=True), RejectReason.INVALID_QUANTITY),
    "market order with a price": (place(otype=OrderType.MARKET, price=9_000), RejectReason.INVALID_ORDER),
    "post-only IOC": (place(tif=TimeInForce.IOC, post_only=True), RejectReason.INVALID_ORDER),
    "post-only FOK": (place(tif=TimeInForce.FOK, post_only=True), RejectReason.INVALID_ORDER),
    "post-only market": (place(otype=OrderType.MARKET, price=None, post_only=True), RejectReason.INVALID_ORDER),
    "bad side": (place(side=None), RejectReason.INVALID_ORDER),
    "bad order type": (place(otype="stop"), RejectReason.INVALID_ORDER),
    "bad tif": (place(tif="gtd"), RejectReason.INVALID_ORDER),
    "bad stp": (place(stp="cancel_newest"), RejectReason.INVALID_ORDER),
    "above band": (place(market=ACME, qty=1, price=11_001), RejectReason.PRICE_OUT_OF_BAND),
    "below band": (place(market=ACME, side=SELL, qty=1, price=8_999), RejectReason.PRICE_OUT_OF_BAND),
    "buy too big": (place(account="poor", qty=10_000, price=10_000), RejectReason.INSUFFICIENT_FUNDS),
    "sell too big": (place(account="poor", side=SELL, qty=2, price=20_000), RejectReason.INSUFFICIENT_FUNDS),
    "unknown account buys": (place(account="ghost"), RejectReason.INSUFFICIENT_FUNDS),
    "market buy too big": (place(account="poor", otype=OrderType.MARKET, price=None, qty=5_000), RejectReason.INSUFFICIENT_FUNDS),
    "post-only buy crosses": (place(price=10_100, post_only=True), RejectReason.WOULD_TAKE_LIQUIDITY),
    "post-only sell crosses": (place(side=SELL, price=9_900, post_only=True), RejectReason.WOULD_TAKE_LIQUIDITY),
    "cancel unknown": (lambda d: CancelOrder(d.next_ts(), "bob", 999), RejectReason.UNKNOWN_ORDER),
    "cancel others": (lambda d: CancelOrder(d.next_ts(), "bob", 1), RejectReason.UNKNOWN_ORDER),
    "cancel filled": (lambda d: CancelOrder(d.next_ts(), "bob", 5), RejectReason.UNKNOWN_ORDER),
    "modify unknown": (lambda d: ModifyOrder(d.next_ts(), "bob", 999, qty=1_000), RejectReason.UNKNOWN_ORDER),
    "modify others": (lambda d: ModifyOrder(d.next_ts(), "bob", 1, qty=1_000), RejectReason.UNKNOWN_ORDER),
    "modify nothing": (lambda d: ModifyOrder(d.next_ts(), "alice", 1), RejectReason.INVALID_ORDER),
    "modify qty to filled": (lambda d: ModifyOrder(d.next_ts(), "alice", 1, qty=2_500), RejectReason.INVALID_QUANTITY),
    "modify qty zero": (lambda d: ModifyOrder(d.next_ts(), "alice", 2, qty=0), RejectReason.INVALID_QUANTITY),
    "modify qty float": (lambda d: ModifyOrder(d.next_ts(), "alice", 2, qty=1.5), RejectReason.INVALID_QUANTITY),
    "modify price zero": (lambda d: ModifyOrder(d.next_ts(), "alice", 2, price=0), RejectReason.INVALID_PRICE),
    "modify price float": (lambda d: ModifyOrder(d.next_ts(), "alice", 2, price=99.0), RejectReason.INVALID_PRICE),
    "modify out of band": (lambda d: ModifyOrder(d.next_ts(), "bob", 4, price=8_000), RejectReason.PRICE_OUT_OF_BAND),
    "modify unfundable": (lambda d: ModifyOrder(d.next_ts(), "alice", 2, qty=10**9), RejectReason.INSUFFICIENT_FUNDS),
    "deposit unknown asset": (lambda d: Deposit(d.next_ts(), "bob", "EUR", 1), RejectReason.UNKNOWN_ASSET),
    "deposit zero": (lambda d: Deposit(d.next_ts(), "bob", "USD", 0), RejectReason.INVALID_AMOUNT),
    "deposit negative": (lambda d: Deposit(d.next_ts(), "bob", "USD", -1), RejectReason.INVALID_AMOUNT),
    "withdraw unknown asset": (lambda d: Withdraw(d.next_ts(), "bob", "EUR", 1), RejectReason.UNKNOWN_ASSET),
    "withdraw float": (lambda d: Withdraw(d.next_ts(), "bob", "USD", 0.5), RejectReason.INVALID_AMOUNT),
    "withdraw too much": (lambda d: Withdraw(d.next_ts(), "poor", "USD", USD + 1), RejectReason.INSUFFICIENT_FUNDS),
    "withdraw locked": (lambda d: Withdraw(d.next_ts(), "alice", "BTC", 100 * SAT), RejectReason.INSUFFICIENT_FUNDS),
}


@pytest.mark.parametrize("name", list(REJECTED_COMMANDS))
def test_a_rejected_command_changes_nothing(name: str) -> None:
    make, reason = REJECTED_COMMANDS[name]
    desk = busy_desk()
    before = fingerprint(desk.ex)
    events = desk.do(make(desk))
    assert only_reject_reason(events) is reason
    assert fingerprint(desk.ex) == before
    [event] = events
    if name == "modify qty to filled":  # says why: the new total is not above what is filled
        assert event.message == "qty is the order's new total and must be more than the 0.2500 already filled"
    elif isinstance(event, CommandRejected):
        assert event.message == REJECT_MESSAGES[reason]


def test_a_rejected_order_reports_no_order_id_and_echoes_the_request() -> None:
    desk = busy_desk()
    events = desk.do(PlaceOrder(77, "bob", "ETH-USD", BUY, OrderType.LIMIT, 5, 10, client_order_id="x"))
    [r] = events
    assert isinstance(r, ExecReport)
    assert (r.exec_type, r.status, r.order_id, r.reason) == (
        ExecType.REJECTED, OrderStatus.REJECTED, None, RejectReason.UNKNOWN_MARKET,
    )
    assert (r.account, r.market, r.client_order_id, r.qty, r.price, r.ts) == ("bob", "ETH-USD", "x", 5, 10, 77)


def test_below_min_quantity() -> None:
    desk = Desk(config_with(BTC_USD={"min_qty": "0.001"}))
    for account in ("alice", "bob"):
        desk.fund(account, "USD", "1000")
        desk.fund(account, "BTC", "1")
    before = fingerprint(desk.ex)
    assert only_reject_reason(desk.limit("alice", BUY, "0.0009", "100.00")) is RejectReason.BELOW_MIN_QUANTITY
    assert only_reject_reason(desk.market("alice", SELL, "0.0001")) is RejectReason.BELOW_MIN_QUANTITY
    assert fingerprint(desk.ex) == before
    order = desk.rest("alice", BUY, "0.001", "100.00")
    # modify checks the new total against the minimum as well
    assert only_reject_reason(desk.modify("alice", order, qty="0.0005")) is RejectReason.BELOW_MIN_QUANTITY
    assert fingerprint(desk.ex)["orders"][order][4] == 10
    # the minimum applies to an order's quantity: a remainder below it after a fill may rest
    events = desk.limit("bob", SELL, "0.0015", "100.00")
    assert [t.qty for t in trades(events)] == [10]
    [rest] = desk.ex.open_orders("bob")
    assert (rest.qty, rest.remaining) == (15, 5)


def test_no_liquidity_is_not_used_for_a_market_order_on_an_empty_side() -> None:
    # The spec says such an order "expires with no fill", so it is accepted, not rejected.
    desk = funded("alice")
    events = desk.market("alice", SELL, "1")
    assert all(getattr(e, "reason", None) is not RejectReason.NO_LIQUIDITY for e in events)
    assert events[-1].exec_type is ExecType.EXPIRED


def test_unknown_command_type_is_a_bug_not_a_rejection() -> None:
    desk = Desk()
    with pytest.raises(TypeError):
        desk.ex.handle(object())  # type: ignore[arg-type]


# ====================================================================== determinism and conservation


def _session(desk: Desk) -> list[dict]:
    log = []
    log += desk.fund("a", "USD", "10000") + desk.fund("b", "BTC", "50") + desk.fund("b", "ACME", "100")
    log += desk.fund("a", "ACME", "100") + desk.fund("b", "USD", "10000")
    log += desk.limit("b", SELL, "1", "100.00") + desk.limit("b", SELL, "0.5", "100.10")
    log += desk.limit("a", BUY, "1.2", "100.10") + desk.market("a", BUY, "0.5")
    log += desk.limit("a", SELL, "3", "101.00", ACME) + desk.limit("b", BUY, "5", "101.00", ACME)
    log += desk.modify("b", 6, price="102.00", market=ACME) + desk.cancel("b", 6)
    return [e.to_dict() for e in log]


def test_same_commands_give_the_same_events_and_state() -> None:
    one, two = Desk(), Desk()
    assert _session(one) == _session(two)
    assert fingerprint(one.ex) == fingerprint(two.ex)


def test_assets_are_conserved_with_the_fee_account_included() -> None:
    desk = Desk()
    _session(desk)
    snap = desk.ex.accounts.snapshot()
    for asset, net in snap["deposits"].items():
        total = sum(b[asset]["available"] + b[asset]["locked"] for b in snap["balances"].values() if asset in b)
        assert total == net
    assert fee_usd(desk) > 0


# ====================================================================== the invariant checker itself


def _three_resting(desk: Desk) -> list:
    desk.fund("a", "USD", "10000")
    for price in ("99.00", "99.00", "98.00"):
        desk.limit("a", BUY, "1", price)
    return [desk.ex.orders[oid] for oid in sorted(desk.ex.orders)]


def test_check_invariants_catches_a_broken_account_back_link() -> None:
    desk = Desk()
    first, second, third = _three_resting(desk)
    third.acct_prev = first
    with pytest.raises(AssertionError, match="back links"):
        desk.ex.check_invariants()


def test_check_invariants_catches_a_broken_level_back_link() -> None:
    desk = Desk()
    first, second, _ = _three_resting(desk)
    second.prev = None
    with pytest.raises(AssertionError, match="back links"):
        desk.ex.check_invariants()


def test_a_cyclic_list_fails_the_check_instead_of_hanging() -> None:
    desk = Desk()
    first, second, third = _three_resting(desk)
    second.next = first  # the 99.00 level now loops
    with pytest.raises(AssertionError):
        desk.ex.check_invariants()
    second.next = None
    third.acct_next = first  # and now the account's list
    with pytest.raises(AssertionError):
        desk.ex.check_invariants()


@pytest.mark.parametrize("corrupt", [
    "level = desk.ex.markets['BTC-USD'].book.bids[first.price]; level.count = -2; second.next = first",
    "holder = first.acct_orders; holder.count = -2; third.acct_next = first",
])
def test_a_cyclic_list_with_a_negative_count_fails_the_check_instead_of_hanging(corrupt: str) -> None:
    """A count driven below zero (a double unlink) must still bound the walk. Run in a
    child process with a deadline and a memory cap, so a regression fails instead of hanging."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        sys.path[:0] = [{str(tests.parent)!r}, {str(tests)!r}]
        from test_engine_rules import Desk, _three_resting
        desk = Desk()
        first, second, third = _three_resting(desk)
        {corrupt}
        try:
            desk.ex.check_invariants()
        except AssertionError as exc:
            print("CAUGHT", exc)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the invariant check never ended on a cyclic list")
    assert "CAUGHT" in done.stdout, (done.returncode, done.stdout[-300:], done.stderr[-300:])
