"""Differential test: the engine against the plain reference matcher in ``reference_matcher.py``.

Random command streams on BTC-USD (no price band) go through ``exchange.engine.Exchange``
and through ``ReferenceMatcher``. Every account is funded far beyond anything the stream
can spend, so ``insufficient_funds`` never happens and the reference need not model money.
After every command the two must agree on: rejection and its reason, the order id given,
the trades (id, price, quantity, buy id, sell id, taker side) in order, the orders that
self-trade prevention cancelled, and the final state of the order the command was about;
and the level-3 book (every order, priority order) must be the same.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_matcher import BUY, FOK, GTC, IOC, LIMIT, MARKET, SELL, Outcome, ReferenceMatcher

from exchange.engine import Exchange
from exchange.types import (
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
)

MARKET_SYMBOL = "BTC-USD"
ACCOUNTS = ("alice", "bob", "carol")
PLENTY = 10**15  # minor units: no stream here can spend a noticeable part of it
STP_MODES = [m.value for m in STPMode]

# An op is a plain tuple, readable in a failure report:
#   ("place", account, side, order_type, tif, price, qty, post_only, stp)
#   ("cancel", account, order_id)
#   ("modify", account, order_id, price, qty)
Op = tuple[Any, ...]


# --------------------------------------------------------------------------- driving both sides


def fresh_pair(default_stp: str) -> tuple[Exchange, ReferenceMatcher]:
    ex = Exchange(default_stp=STPMode(default_stp))
    for account in ACCOUNTS:
        for asset in ("USD", "BTC"):
            events = ex.handle(Deposit(0, account, asset, PLENTY))
            assert not isinstance(events[0], CommandRejected)
    min_qty = ex.market(MARKET_SYMBOL).min_qty_lots  # type: ignore[union-attr]
    return ex, ReferenceMatcher(min_qty=min_qty, default_stp=default_stp)


def engine_command(op: Op, ts: int) -> Command:
    kind, account = op[0], op[1]
    if kind == "place":
        _, _, side, order_type, tif, price, qty, post_only, stp = op
        return PlaceOrder(
            ts, account, MARKET_SYMBOL, Side(side), OrderType(order_type), qty, price,
            TimeInForce(tif), post_only, None if stp is None else STPMode(stp),
        )
    if kind == "cancel":
        return CancelOrder(ts, account, op[2])
    _, _, order_id, price, qty = op
    return ModifyOrder(ts, account, order_id, price, qty)


def reference_apply(ref: ReferenceMatcher, op: Op) -> Outcome:
    kind, account = op[0], op[1]
    if kind == "place":
        _, _, side, order_type, tif, price, qty, post_only, stp = op
        return ref.place(account, side, order_type, qty, price, tif, post_only, stp)
    if kind == "cancel":
        return ref.cancel(account, op[2])
    _, _, order_id, price, qty = op
    return ref.modify(account, order_id, price, qty)


def engine_outcome(op: Op, events: list[Event]) -> Outcome:
    """Read the same facts the reference reports out of the engine's events."""
    out = Outcome()
    last: dict[int, tuple[str, int, int]] = {}
    for e in events:
        if isinstance(e, ExecReport):
            if e.exec_type is ExecType.REJECTED:
                out.rejected = str(e.reason)
            elif e.exec_type is ExecType.NEW and out.order_id is None:
                out.order_id = e.order_id
            elif e.exec_type is ExecType.SELF_TRADE_PREVENTED:
                out.stp_canceled.append(e.order_id)  # type: ignore[arg-type]
            if e.order_id is not None:
                last[e.order_id] = (str(e.status), e.filled, e.remaining)
        elif isinstance(e, CommandRejected):
            out.rejected = str(e.reason)
        elif isinstance(e, Trade):
            out.trades.append(
                (e.trade_id, e.price, e.qty, e.buy_order_id, e.sell_order_id, str(e.taker_side))
            )
    target = out.order_id if op[0] == "place" else op[2]
    if out.rejected is None and target is not None:
        out.final = last.get(target)
    return out


def run_differential(ops_source: Any, default_stp: str) -> int:
    """Feed ops to both; ``ops_source(ref)`` yields ops (it may look at the reference's book).

    Returns the number of trades seen, so callers can check the stream was not idle.
    """
    ex, ref = fresh_pair(default_stp)
    all_trades = 0
    for ts, op in enumerate(ops_source(ref), start=1):
        events = ex.handle(engine_command(op, ts))
        got = engine_outcome(op, events)
        want = reference_apply(ref, op)
        where = f"command #{ts} {op!r} (default stp {default_stp})"
        assert got.rejected != "insufficient_funds", f"{where}: accounts were meant to be rich"
        assert got == want, f"{where}:\n engine    {got}\n reference {want}"
        _, bids, asks = ex.book_l3(MARKET_SYMBOL)
        assert (bids, asks) == ref.level3(), f"{where}: books differ"
        all_trades += len(got.trades)
    ex.check_invariants()
    assert ref.next_trade_id == ex.next_trade_id
    return all_trades


# --------------------------------------------------------------------------- hypothesis streams

accounts = st.sampled_from(ACCOUNTS)
sides = st.sampled_from([BUY, SELL])
prices = st.integers(96, 104)
order_ids = st.one_of(st.integers(1, 40), st.just(10**6))


@st.composite
def place_ops(draw: st.DrawFn) -> Op:
    order_type = draw(st.sampled_from([LIMIT, LIMIT, LIMIT, MARKET]))
    tif = draw(st.sampled_from([GTC, GTC, IOC, FOK]))
    post_only = order_type == LIMIT and draw(st.sampled_from([False, False, False, True]))
    price = draw(prices) if order_type == LIMIT else None
    qty = draw(st.integers(1, 8))
    stp = draw(st.sampled_from([None, None, None, *STP_MODES]))
    # Now and then one deliberate fault, to compare the rejections too.
    fault = draw(st.sampled_from([None] * 12 + ["qty0", "price0", "no_price", "priced_market"]))
    if fault == "qty0":
        qty = 0
    elif fault == "price0" and order_type == LIMIT:
        price = 0
    elif fault == "no_price":
        price = None
    elif fault == "priced_market":
        price = draw(prices)
    return ("place", draw(accounts), draw(sides), order_type, tif, price, qty, post_only, stp)


cancel_ops = st.tuples(st.just("cancel"), accounts, order_ids)
modify_ops = st.tuples(
    st.just("modify"), accounts, order_ids,
    st.one_of(st.none(), prices), st.one_of(st.none(), st.integers(0, 10)),
)
op_lists = st.lists(st.one_of(place_ops(), place_ops(), place_ops(), cancel_ops, modify_ops),
                    max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=op_lists, default_stp=st.sampled_from(STP_MODES))
def test_engine_agrees_with_reference_on_random_streams(ops: list[Op], default_stp: str) -> None:
    run_differential(lambda ref: iter(ops), default_stp)


# --------------------------------------------------------------------------- a long seeded stream


def seeded_ops(seed: int, count: int) -> Any:
    """``count`` ops from ``random.Random(seed)``; cancels and modifies mostly hit live orders."""

    def source(ref: ReferenceMatcher) -> Any:
        rng = random.Random(seed)
        mid = 10_000
        for _ in range(count):
            if rng.random() < 0.02:
                mid += rng.choice((-3, 3))  # a slow drift, so levels come and go
            live = [(o.account, o.id) for o in ref.resting]
            r = rng.random()
            if r < 0.72 or not live:
                side = rng.choice((BUY, SELL))
                order_type = MARKET if rng.random() < 0.06 else LIMIT
                tif = rng.choice((GTC, GTC, GTC, GTC, IOC, FOK))
                post_only = order_type == LIMIT and tif == GTC and rng.random() < 0.1
                # Mostly on its own side of the mid (the book grows deep), sometimes across it.
                away = rng.randint(-3, 10)
                price = (mid - away if side == BUY else mid + away) if order_type == LIMIT else None
                qty = rng.choice((1, 1, 2, 3, 5, 8, 13, 40, 120))
                stp = rng.choice((None,) * 6 + tuple(STP_MODES))
                if rng.random() < 0.01:
                    qty = 0
                yield ("place", rng.choice(ACCOUNTS), side, order_type, tif, price, qty, post_only,
                       stp)
            elif r < 0.87:
                account, oid = rng.choice(live)
                if rng.random() < 0.1:  # somebody else's order, or one that does not exist
                    account = rng.choice(ACCOUNTS)
                    oid = oid if rng.random() < 0.5 else ref.next_order_id + 5
                yield ("cancel", account, oid)
            else:
                account, oid = rng.choice(live)
                price = None if rng.random() < 0.4 else mid + rng.randint(-10, 10)
                qty = None if price is not None and rng.random() < 0.5 else rng.randint(1, 12)
                yield ("modify", account, oid, price, qty)

    return source


@pytest.mark.parametrize(
    "seed, default_stp",
    [(1, "cancel_resting"), (2, "cancel_resting"), (3, "cancel_incoming"), (4, "cancel_both"),
     (5, "none")],
)
def test_engine_agrees_with_reference_on_long_seeded_stream(seed: int, default_stp: str) -> None:
    trades = run_differential(seeded_ops(seed, 3000), default_stp)
    assert trades > 300, "the stream should trade a lot, or it proves little"


# --------------------------------------------------------------------------- the oracle itself
# A few hand-checked scenarios, so a wrong reference cannot silently agree with a wrong engine.


def test_reference_price_then_time_priority_and_maker_price() -> None:
    ref = ReferenceMatcher()
    ref.place("a", SELL, LIMIT, 2, 101)  # id 1
    ref.place("b", SELL, LIMIT, 2, 100)  # id 2
    ref.place("c", SELL, LIMIT, 2, 100)  # id 3
    out = ref.place("d", BUY, LIMIT, 5, 102)  # id 4
    assert out.trades == [(1, 100, 2, 4, 2, BUY), (2, 100, 2, 4, 3, BUY), (3, 101, 1, 4, 1, BUY)]
    assert out.final == ("filled", 5, 0)
    assert ref.level3() == ([], [(1, 101, 1)])


def test_reference_fok_is_all_or_nothing() -> None:
    ref = ReferenceMatcher()
    ref.place("a", SELL, LIMIT, 2, 100)
    out = ref.place("b", BUY, LIMIT, 3, 100, FOK)
    assert out.trades == [] and out.final == ("expired", 0, 3) and out.order_id == 2
    assert ref.level3() == ([], [(1, 100, 2)]) and ref.next_trade_id == 1


def test_reference_modify_priority() -> None:
    ref = ReferenceMatcher()
    ref.place("a", BUY, LIMIT, 5, 100)  # 1
    ref.place("b", BUY, LIMIT, 5, 100)  # 2
    ref.modify("a", 1, qty=4)  # reduction keeps the front
    assert ref.level3()[0] == [(1, 100, 4), (2, 100, 5)]
    ref.modify("a", 1, qty=6)  # increase goes to the back
    assert ref.level3()[0] == [(2, 100, 5), (1, 100, 6)]
    ref.place("c", SELL, LIMIT, 3, 103)  # 3
    out = ref.modify("b", 2, price=103)  # reprice through the ask: trades at once
    assert out.trades == [(1, 103, 3, 2, 3, BUY)] and out.final == ("partially_filled", 3, 2)


@pytest.mark.parametrize(
    "stp, canceled, book",
    [
        ("cancel_resting", [1], ([], [(2, 100, 1)])),
        ("cancel_incoming", [3], ([], [(1, 100, 2), (2, 100, 3)])),
        ("cancel_both", [1, 3], ([], [(2, 100, 3)])),
        ("none", [], ([], [(2, 100, 3)])),
    ],
)
def test_reference_self_trade_prevention(stp: str, canceled: list[int], book: Any) -> None:
    ref = ReferenceMatcher()
    ref.place("a", SELL, LIMIT, 2, 100)  # 1
    ref.place("b", SELL, LIMIT, 3, 100)  # 2
    out = ref.place("a", BUY, MARKET if stp == "cancel_resting" else LIMIT, 2,
                    None if stp == "cancel_resting" else 100, stp=stp)
    assert out.stp_canceled == canceled
    assert ref.level3() == book


# --------------------------------------------------------------------------- input forms


@pytest.mark.parametrize("mode", STP_MODES)
def test_stp_mode_given_as_its_wire_string_is_the_mode_or_rejected(mode: str) -> None:
    """``stp="none"`` (a plain string, as a decoder might pass it) must act as ``STPMode.NONE``.

    Acting as a different mode silently is the one wrong answer; refusing the order as
    ``invalid_order`` (as the engine does for a plain-string side or time in force) is fine.
    """
    scenario: list[Op] = [
        ("place", "alice", SELL, LIMIT, GTC, 100, 2, False, None),
        ("place", "bob", SELL, LIMIT, GTC, 100, 3, False, None),
        ("place", "alice", BUY, LIMIT, GTC, 100, 2, False, mode),
    ]
    ex, ref = fresh_pair("cancel_resting")
    for ts, op in enumerate(scenario, start=1):
        cmd = engine_command(op, ts)
        if op[-1] is not None:
            cmd.stp = mode  # type: ignore[attr-defined]  # the str, not STPMode(mode)
        got = engine_outcome(op, ex.handle(cmd))
        want = reference_apply(ref, op)
        if got.rejected == "invalid_order" and op[-1] is not None:
            return
        assert got == want, f"stp={mode!r} as a str:\n engine    {got}\n reference {want}"
    assert ex.book_l3(MARKET_SYMBOL)[1:] == ref.level3()
