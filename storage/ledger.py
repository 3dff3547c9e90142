"""The trade ledger's record format: one JSON object per trade, one line each.

Shared by every writer of ``trades.jsonl`` (the server's background ledger task and the
embedded simulation), so that two runs can be compared file to file. Amounts are decimal
strings exactly as on the wire; ids and timestamps are integers.
"""

from __future__ import annotations

from typing import Any

import orjson

from exchange.markets import MarketConfig
from exchange.types import Trade


def trade_record(trade: Trade, config: MarketConfig) -> dict[str, Any]:
    """The ledger's view of one trade: both sides, both fees, in decimal strings."""
    market = config.markets[trade.market]
    return {
        "trade_id": trade.trade_id,
        "market": trade.market,
        "price": market.format_price(trade.price),
        "qty": market.format_qty(trade.qty),
        "buy_order_id": trade.buy_order_id,
        "sell_order_id": trade.sell_order_id,
        "buyer": trade.buyer,
        "seller": trade.seller,
        "taker_side": trade.taker_side.value,
        "maker_fee": market.quote.format(trade.maker_fee),
        "taker_fee": market.quote.format(trade.taker_fee),
        "fee_asset": market.quote.name,
        "ts": trade.ts,
    }


def trade_line(trade: Trade, config: MarketConfig) -> bytes:
    """One ledger line, newline included."""
    return orjson.dumps(trade_record(trade, config)) + b"\n"
