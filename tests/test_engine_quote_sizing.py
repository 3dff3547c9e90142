"""Market orders sized by the quote (``quote_qty``) against an independent oracle: random
markets (quote decimals, tick x lot other than one minor unit, minimum quantities, taker
fees 0-1000 bp, bands), books with the account's own orders under every STP mode, amounts
up to and past MAX_UNITS, accounts short of funds. The engine must take exactly the most
the amount pays for along the path the sweep takes, spend (buy, fee included) or sell for
no more, leave nothing locked, reject only as documented and change nothing then, and
replay the same through the journal's encoding. Written by a reviewer (binary search over
the fill path as the oracle), adopted."""
from __future__ import annotations
import copy
from typing import Any
from hypothesis import given, settings, strategies as st, HealthCheck, note
from exchange.engine import Exchange
from exchange.markets import build_config
from exchange.types import (PlaceOrder, Deposit, OrderType, Side, STPMode, TimeInForce, ExecType,
                            ExecReport, Trade, RejectReason)
from engine_helpers import fingerprint

BPS = 10_000

@st.composite
def setups(draw):
    qdec = draw(st.sampled_from([0, 1, 2, 6, 8, 18]))
    bdec = draw(st.sampled_from([0, 3, 8]))
    # tick and lot chosen so tick*lot is a whole number of quote minor units
    tick = draw(st.sampled_from(["0.01", "0.05", "1", "5", "0.25", "0.001"]))
    lot = draw(st.sampled_from(["1", "0.1", "0.001", "10", "3"]))
    min_mult = draw(st.sampled_from([1, 1, 2, 7]))
    taker = draw(st.sampled_from([0, 1, 2, 7, 30, 999, 1000]))
    maker = draw(st.sampled_from([0, 1, 5, 1000]))
    band = draw(st.sampled_from([None, "0.10", "0.5", "0.5"]))
    from fractions import Fraction
    from decimal import Decimal
    t, l = Fraction(Decimal(tick)), Fraction(Decimal(lot))
    if (t * l * 10**qdec).denominator != 1 or (l * 10**bdec).denominator != 1:
        from hypothesis import assume
        assume(False)
    minq = str(Decimal(lot) * min_mult)
    m = {"symbol": "X-Q", "base": "X", "quote": "Q", "tick_size": tick, "lot_size": lot,
         "min_qty": minq, "price_band": band, "maker_fee_bps": maker, "taker_fee_bps": taker}
    if band:
        m["reference_price"] = str(Decimal(tick) * 100)
    cfg = build_config({"assets": {"Q": qdec, "X": bdec}, "fees": {}, "markets": [m]})
    side = draw(st.sampled_from([Side.BUY, Side.SELL]))
    makers = draw(st.lists(st.tuples(st.sampled_from(["mk1", "mk2", "me"]),
                                     st.integers(80, 130), st.integers(1, 40)), max_size=8))
    stp = draw(st.sampled_from(list(STPMode)))
    tif = draw(st.sampled_from([TimeInForce.IOC, TimeInForce.GTC]))  # FOK: refused, see below
    qptl = cfg.markets["X-Q"].quote_per_tick_lot
    amount = draw(st.one_of(st.integers(1, 10**24),
                            st.builds(lambda m, n: max(1, m * qptl + n), st.integers(0, 40_000), st.integers(-qptl, qptl))))
    short_funds = draw(st.booleans())
    mover = draw(st.one_of(st.none(), st.tuples(st.integers(60, 140), st.integers(1, 5))))
    return cfg, side, makers, stp, tif, amount, short_funds, mover

BIG = 10**30
def _iter(level):
    o = level.head
    while o is not None:
        yield o; o = o.next

@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(setups())
def test_quote_sized(s):
    cfg, side, makers, stp, tif, amount, short_funds, mover = s
    log = []
    ex = Exchange(cfg)
    ms = ex.markets["X-Q"]
    ts = 0
    for acct in ("mk1", "mk2", "me"):
        for a in ("Q", "X"):
            ts += 1
            log.append(Deposit(ts, acct, a, 10**24)); ex.handle(log[-1])
    maker_side = Side.SELL if side is Side.BUY else Side.BUY
    # rest the makers (skip those that would not rest: band)
    for acct, px, q in makers:
        ts += 1
        log.append(PlaceOrder(ts, acct, "X-Q", maker_side, OrderType.LIMIT, q, px, TimeInForce.GTC, True)); ex.handle(log[-1])
    if mover:
        ts += 1
        log.append(PlaceOrder(ts, "mk3", "X-Q", side, OrderType.LIMIT, mover[1], mover[0], TimeInForce.IOC, False))
        log.insert(0, Deposit(0, "mk3", "Q", 10**24)); log.insert(0, Deposit(0, "mk3", "X", 10**24))
        ex.handle(log[1]); ex.handle(log[0]); ex.handle(log[-1])
    ex.check_invariants()
    taker = "me"
    if short_funds:
        taker = "poor"
        ts += 1
        log.append(Deposit(ts, "poor", "Q" if side is Side.BUY else "X", max(1, amount // 3))); ex.handle(log[-1])
    # oracle: the fill path
    band = ms.band_limits() if ms.band else None
    lo, hi = band if band else (0, 10**40)
    levels = ms.book.asks if side is Side.BUY else ms.book.bids
    path = []
    prices = list(levels) if side is Side.BUY else list(reversed(list(levels)))
    stop = False
    for p in prices:
        if p > hi or p < lo:
            break
        o = levels[p].head
        while o is not None:
            if o.account == taker and stp is not STPMode.NONE:
                if stp is STPMode.CANCEL_RESTING:
                    o = o.next; continue
                stop = True; break
            path.append((p, o.remaining))
            o = o.next
        if stop:
            break
    total = sum(q for _, q in path)
    from hypothesis import event
    if any(p > hi or p < lo for p in prices): event("band cuts")
    if any(levels[p].head and any(True for _ in [0]) for p in prices) and any(o.account == taker for p in prices for o in _iter(levels[p])): event(f"own {stp.value}")
    def cost(q):
        n = 0
        for p, r in path:
            t = min(q, r); n += t * p; q -= t
            if not q: break
        n *= ms.qptl
        return n + (-(-n * ms.taker_bps // BPS)) if side is Side.BUY else n
    lo_q, hi_q = 0, total
    while lo_q < hi_q:
        mid = (lo_q + hi_q + 1) // 2
        if cost(mid) <= amount: lo_q = mid
        else: hi_q = mid - 1
    expect = lo_q
    before = fingerprint(ex)
    bal_before = {a: (b.available, b.locked) for a, b in ex.balances(taker).items()} if ex.accounts.balances.get(taker) else {}
    ts += 1
    cmd = PlaceOrder(ts, taker, "X-Q", side, OrderType.MARKET, None, None, tif, False, stp, None, amount)
    evs = ex.handle(cmd)
    ex.check_invariants()
    log.append(cmd)
    from storage.journal import encode, decode
    ex2 = Exchange(cfg)
    for c in log:
        last = ex2.handle(decode(encode(c)))
    assert fingerprint(ex2) == fingerprint(ex)
    assert [e.__dict__ if hasattr(e, '__dict__') else repr(e) for e in last] == [e.__dict__ if hasattr(e, '__dict__') else repr(e) for e in evs] or repr(last) == repr(evs)
    note(f"expect={expect} total={total} path={path} amount={amount} qptl={ms.qptl} bps={ms.taker_bps} evs={evs}")
    first = evs[0]
    event("rej " + first.reason.value if first.exec_type is ExecType.REJECTED else ("full" if expect == total else "partial-book"))
    if amount > 10**24:
        assert first.exec_type is ExecType.REJECTED
        return
    if first.exec_type is ExecType.REJECTED:
        assert fingerprint(ex) == before
        r = first.reason
        if expect == 0:
            assert r in (RejectReason.NO_LIQUIDITY, RejectReason.BELOW_MIN_QUANTITY), r
            assert (r is RejectReason.NO_LIQUIDITY) == (total == 0), (r, total)
        elif expect < ms.min_qty:
            assert r is RejectReason.BELOW_MIN_QUANTITY
        else:
            assert r is RejectReason.INSUFFICIENT_FUNDS, r
            assert short_funds
        return
    assert first.exec_type is ExecType.NEW
    assert first.qty == expect, (first.qty, expect)
    mine = [e for e in evs if isinstance(e, Trade)]
    filled = sum(t.qty for t in mine)
    assert filled == expect, (filled, expect)
    notional = sum(t.price * t.qty for t in mine) * ms.qptl
    fee = sum(t.taker_fee for t in mine)
    if side is Side.BUY:
        assert notional + fee <= amount
    else:
        assert notional <= amount
    # market order: nothing left locked by it
    assert not any(o.account == taker and o.side is side for o in ex.orders.values())
    final = [e for e in evs if isinstance(e, ExecReport) and e.order_id == first.order_id][-1]
    assert final.status.value == "filled", final


def test_fok_is_refused_for_an_order_sized_by_the_quote() -> None:
    """Sized to what the book fills now, it would always fill: FOK would change nothing."""
    cfg = build_config({"assets": {"Q": 2, "X": 0}, "fees": {}, "markets": [
        {"symbol": "X-Q", "base": "X", "quote": "Q", "tick_size": "1", "lot_size": "1", "min_qty": "1",
         "price_band": None, "maker_fee_bps": 0, "taker_fee_bps": 0}]})
    ex = Exchange(cfg)
    ex.handle(Deposit(1, "me", "Q", 10**6))
    ex.handle(Deposit(1, "mk", "X", 10))
    ex.handle(PlaceOrder(2, "mk", "X-Q", Side.SELL, OrderType.LIMIT, 5, 100, TimeInForce.GTC))
    before = fingerprint(ex)
    [report] = ex.handle(PlaceOrder(3, "me", "X-Q", Side.BUY, OrderType.MARKET, None, None, TimeInForce.FOK,
                                    quote_qty=10**5))
    assert report.exec_type is ExecType.REJECTED and report.reason is RejectReason.INVALID_ORDER
    assert fingerprint(ex) == before
