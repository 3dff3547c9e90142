"""``place_units`` / ``reprice_units``: orders given on the market's grid, as agents hold them.

The embedded gateway hands the integers to its engine; the TCP gateway writes them as the
wire's decimal strings. Both must give the same reports as ``place`` / ``modify`` with text.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from exchange.server import ExchangeServer, ServerConfig
from exchange.types import ExecType, OrderType, Side, TimeInForce
from simulation.embedded import EmbeddedExchange
from simulation.gateway import Gateway, GatewayError, MarketTexts
from simulation.tcp import TcpGateway

import pytest

T = 10.0


def _view(rep: Any) -> tuple[Any, ...]:
    return (rep.exec_type, rep.side, rep.order_type, rep.tif, rep.price, rep.qty, rep.status,
            getattr(rep, "reason", None))


async def _flow(gw: Gateway, other: Gateway) -> list[tuple[Any, ...]]:
    """The same orders through the text path (``other``) and the grid path (``gw``)."""
    texts = MarketTexts(gw.config.markets["BTC-USD"])
    await gw.deposit("USD", "100000")
    await gw.deposit("BTC", "10")
    await other.deposit("USD", "100000")
    await other.deposit("BTC", "10")
    out = []
    a = await gw.place_units("BTC-USD", Side.BUY, 5_000, 9_950, texts)  # 0.5 @ 99.50
    b = await other.place("BTC-USD", "buy", "0.5", "99.50")
    assert _view(a) == _view(b) and a.order_type is OrderType.LIMIT and a.tif is TimeInForce.GTC
    out.append(_view(a))
    p = await gw.place_units("BTC-USD", Side.SELL, 1_000, 10_100, texts, post_only=True)
    q = await other.place("BTC-USD", "sell", "0.1", "101.00", post_only=True)
    assert _view(p) == _view(q)
    i = await gw.place_units("BTC-USD", Side.BUY, 1_000, 9_000, texts, tif="ioc")
    assert i.tif is TimeInForce.IOC and i.exec_type is ExecType.NEW
    r = await gw.reprice_units(a.order_id, 9_900, texts)
    assert r.exec_type is ExecType.REPLACED and r.price == 9_900 and r.order_id == a.order_id
    m = await gw.place_units("BTC-USD", Side.SELL, 2_000, None, texts)  # market: hits the bids
    n = await other.place("BTC-USD", "sell", "0.2", order_type="market")
    assert _view(m) == _view(n) and m.order_type is OrderType.MARKET and m.tif is TimeInForce.IOC
    with pytest.raises(GatewayError) as err:
        await gw.reprice_units(10**9, 9_900, texts)
    assert err.value.code == "unknown_order"
    tiny = await gw.place_units("BTC-USD", Side.BUY, 0, 9_900, texts)  # the engine's checks apply
    assert tiny.exec_type is ExecType.REJECTED and tiny.reason.value == "invalid_quantity"
    return out


def test_embedded_grid_orders_match_text_orders() -> None:
    ex = EmbeddedExchange()
    ex.kernel.run_until_complete(_flow(ex.session("alice"), ex.session("bob")))


async def test_tcp_grid_orders_match_text_orders(tmp_path: Path) -> None:
    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0))
    await asyncio.wait_for(srv.start(), T)
    gws: list[TcpGateway] = []
    try:
        assert srv.address is not None
        for user in ("alice", "bob"):
            gws.append(await asyncio.wait_for(
                TcpGateway.connect(*srv.address, user, srv.gateway.config), T))
        await asyncio.wait_for(_flow(gws[0], gws[1]), 30)
    finally:
        for gw in gws:
            await gw.close()
        await asyncio.wait_for(srv.stop(), T)


def test_durations_in_minutes_and_hours() -> None:
    from simulation.embedded import parse_duration_ns

    assert parse_duration_ns("5m") == 300 * 10**9
    assert parse_duration_ns("1.5min") == 90 * 10**9
    assert parse_duration_ns("1h") == 3600 * 10**9
    assert parse_duration_ns("5ms") == 5 * 10**6  # not five minutes
