"""The smallest end-to-end check of the engine: one deposit, one resting order, one trade."""

from exchange.engine import Exchange
from exchange.types import Deposit, OrderType, PlaceOrder, Side, Trade


def test_one_trade_settles_and_conserves() -> None:
    ex = Exchange()
    m = ex.market("BTC-USD")
    assert m is not None
    for user in ("alice", "bob"):
        ex.handle(Deposit(1, user, "USD", m.quote.to_units("1000")))
        ex.handle(Deposit(1, user, "BTC", m.base.to_units("1")))
    ex.handle(PlaceOrder(2, "alice", "BTC-USD", Side.SELL, OrderType.LIMIT, m.qty_lots("1"), m.price_ticks("100")))
    events = ex.handle(PlaceOrder(3, "bob", "BTC-USD", Side.BUY, OrderType.LIMIT, m.qty_lots("0.5"), m.price_ticks("101")))
    trades = [e for e in events if isinstance(e, Trade)]
    assert len(trades) == 1 and trades[0].price == m.price_ticks("100")
    ex.check_invariants()
