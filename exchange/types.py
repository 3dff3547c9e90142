"""The engine's vocabulary: enums, commands (imperative) and events (past tense).

Everything here is plain data. Commands carry integers in market units (price in ticks,
quantity in lots, amounts in an asset's minor units) and the timestamp the caller gave
them; the engine never reads a clock. Enum values are the wire strings, so the protocol
layer can emit them as they are.

Commands and events are ``__slots__`` classes rather than frozen dataclasses: they are
built several times per order on the hot path, and a frozen dataclass costs about five
times as much to construct.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"


class OrderType(StrEnum):
    LIMIT = "limit"
    MARKET = "market"


class TimeInForce(StrEnum):
    GTC = "gtc"
    IOC = "ioc"
    FOK = "fok"


class OrderStatus(StrEnum):
    NEW = "new"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    EXPIRED = "expired"
    REJECTED = "rejected"


class ExecType(StrEnum):
    NEW = "new"
    TRADE = "trade"
    CANCELED = "canceled"
    EXPIRED = "expired"
    REJECTED = "rejected"
    REPLACED = "replaced"
    SELF_TRADE_PREVENTED = "self_trade_prevented"


class Liquidity(StrEnum):
    MAKER = "maker"
    TAKER = "taker"


class STPMode(StrEnum):
    """What happens when an order would trade with a resting order of the same account."""

    CANCEL_RESTING = "cancel_resting"
    CANCEL_INCOMING = "cancel_incoming"
    CANCEL_BOTH = "cancel_both"
    NONE = "none"


class RejectReason(StrEnum):
    """The closed set of reasons a command can be refused for. A rejection changes nothing."""

    UNKNOWN_MARKET = "unknown_market"
    UNKNOWN_ASSET = "unknown_asset"
    INVALID_PRICE = "invalid_price"
    INVALID_QUANTITY = "invalid_quantity"
    INVALID_AMOUNT = "invalid_amount"
    INVALID_ORDER = "invalid_order"
    BELOW_MIN_QUANTITY = "below_min_quantity"
    PRICE_OUT_OF_BAND = "price_out_of_band"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    WOULD_TAKE_LIQUIDITY = "would_take_liquidity"
    UNKNOWN_ORDER = "unknown_order"
    NO_LIQUIDITY = "no_liquidity"
    DUPLICATE_CLIENT_ORDER_ID = "duplicate_client_order_id"


REJECT_MESSAGES: dict[RejectReason, str] = {
    RejectReason.UNKNOWN_MARKET: "no such market",
    RejectReason.UNKNOWN_ASSET: "no such asset",
    RejectReason.INVALID_PRICE: "price must be a positive multiple of the market's tick size",
    RejectReason.INVALID_QUANTITY: "quantity must be a positive multiple of the market's lot size",
    RejectReason.INVALID_AMOUNT: "amount must be positive and on the asset's minor unit",
    RejectReason.INVALID_ORDER: "this combination of order fields is not allowed",
    RejectReason.BELOW_MIN_QUANTITY: "quantity is below the market's minimum",
    RejectReason.PRICE_OUT_OF_BAND: "price is outside the market's allowed band",
    RejectReason.INSUFFICIENT_FUNDS: "not enough available balance",
    RejectReason.WOULD_TAKE_LIQUIDITY: "post-only order would have traded immediately",
    RejectReason.UNKNOWN_ORDER: "no such open order for this account",
    RejectReason.NO_LIQUIDITY: "nothing on the other side of the book to size a market order against (the account's own orders do not count)",
    RejectReason.DUPLICATE_CLIENT_ORDER_ID: "an open order of this account already has this client_order_id",
}


# --------------------------------------------------------------------------- commands

# Fields the engine validates itself are typed loosely on purpose: a float quantity or an
# unknown side must reach the engine and be *rejected* (a typed reason, state unchanged),
# whether the engine runs as plain Python or compiled, where a declared ``int`` would make
# the constructor raise instead.
Unchecked = Any


class Command:
    """Base of every command. ``ts`` is integer nanoseconds given by the caller."""

    __slots__ = ("ts", "account")
    FIELDS: ClassVar[tuple[str, ...]] = ('ts', 'account')
    ts: int
    account: str

    def to_dict(self) -> dict[str, Any]:
        """Plain fields for journals and tests (enums stay as their string values)."""
        return {"cmd": type(self).__name__, **{k: getattr(self, k) for k in self.FIELDS}}


class PlaceOrder(Command):
    __slots__ = (
        "market", "side", "order_type", "tif", "price", "qty",
        "post_only", "stp", "client_order_id", "quote_qty",
    )
    FIELDS: ClassVar[tuple[str, ...]] = (
        'ts', 'account', 'market', 'side', 'order_type', 'tif', 'price', 'qty', 'post_only', 'stp',
        'client_order_id', 'quote_qty',
    )

    def __init__(
        self,
        ts: int,
        account: str,
        market: Unchecked,  # str
        side: Unchecked,  # Side
        order_type: Unchecked,  # OrderType
        qty: Unchecked,  # int, lots
        price: Unchecked = None,  # int ticks, None for a market order
        tif: Unchecked = TimeInForce.GTC,
        post_only: Unchecked = False,  # bool
        stp: Unchecked = None,  # STPMode, None for the exchange default
        client_order_id: Unchecked = None,  # str or None
        # int, minor units of the quote asset: a market order sized by what it may spend
        # (buy, fee included) or sell for; ``qty`` is then None and the engine sizes it.
        quote_qty: Unchecked = None,
    ) -> None:
        self.ts = ts
        self.account = account
        self.market = market
        self.side = side
        self.order_type = order_type
        self.qty = qty
        self.price = price
        self.tif = tif
        self.post_only = post_only
        self.stp = stp
        self.client_order_id = client_order_id
        self.quote_qty = quote_qty


class CancelOrder(Command):
    __slots__ = ("order_id",)
    FIELDS: ClassVar[tuple[str, ...]] = ('ts', 'account', 'order_id')

    def __init__(self, ts: int, account: str, order_id: Unchecked) -> None:
        self.ts = ts
        self.account = account
        self.order_id = order_id


class ModifyOrder(Command):
    """Amend: ``qty`` is the order's new *total* quantity (as FIX OrderQty), not the remainder."""

    __slots__ = ("order_id", "price", "qty")
    FIELDS: ClassVar[tuple[str, ...]] = ('ts', 'account', 'order_id', 'price', 'qty')

    def __init__(
        self, ts: int, account: str, order_id: Unchecked, price: Unchecked = None,
        qty: Unchecked = None,
    ) -> None:
        self.ts = ts
        self.account = account
        self.order_id = order_id
        self.price = price
        self.qty = qty


class _Funding(Command):
    """Money moving in or out of an account from outside the exchange."""

    __slots__ = ("asset", "amount")
    FIELDS: ClassVar[tuple[str, ...]] = ('ts', 'account', 'asset', 'amount')

    def __init__(self, ts: int, account: str, asset: Unchecked, amount: Unchecked) -> None:
        self.ts = ts
        self.account = account
        self.asset = asset  # str
        self.amount = amount  # int, minor units of the asset


class Deposit(_Funding):
    __slots__ = ()


class Withdraw(_Funding):
    __slots__ = ()


# --------------------------------------------------------------------------- events


class Event:
    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"event": type(self).__name__, **{k: getattr(self, k) for k in self.FIELDS}}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and type(self) is type(other) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


class ExecReport(Event):
    """A change to one order, sent privately to its owner.

    Carries the order's cumulative state *after* the change (status, filled and remaining
    quantity, cumulative traded value in price-ticks x lots for the average price), so a
    consumer never needs to keep its own arithmetic. ``order_id`` is ``None`` only for an
    order rejected before it was accepted.
    """

    __slots__ = (
        "exec_type", "order_id", "account", "market", "side", "order_type", "tif",
        "client_order_id", "price", "qty", "filled", "remaining", "cost", "status", "ts",
        "trade_id", "last_price", "last_qty", "liquidity", "fee", "reason",
    )
    FIELDS: ClassVar[tuple[str, ...]] = (
        'exec_type', 'order_id', 'account', 'market', 'side', 'order_type', 'tif',
        'client_order_id', 'price', 'qty', 'filled', 'remaining', 'cost', 'status', 'ts',
        'trade_id', 'last_price', 'last_qty', 'liquidity', 'fee', 'reason',
    )

    def __init__(
        self,
        exec_type: ExecType,
        order_id: int | None,
        account: str,
        market: Unchecked,  # str; the fields to ``qty`` echo the command as given when it
        side: Unchecked,  # is rejected before validation (an unknown side, a float price)
        order_type: Unchecked,
        tif: Unchecked,
        client_order_id: Unchecked,
        price: Unchecked,
        qty: Unchecked,
        filled: int,
        remaining: int,
        cost: int,
        status: OrderStatus,
        ts: int,
        trade_id: int | None = None,
        last_price: int | None = None,
        last_qty: int | None = None,
        liquidity: Liquidity | None = None,
        fee: int | None = None,
        reason: RejectReason | None = None,
    ) -> None:
        self.exec_type = exec_type
        self.order_id = order_id
        self.account = account
        self.market = market
        self.side = side
        self.order_type = order_type
        self.tif = tif
        self.client_order_id = client_order_id
        self.price = price
        self.qty = qty
        self.filled = filled
        self.remaining = remaining
        self.cost = cost
        self.status = status
        self.ts = ts
        self.trade_id = trade_id
        self.last_price = last_price
        self.last_qty = last_qty
        self.liquidity = liquidity
        self.fee = fee
        self.reason = reason


class Trade(Event):
    """A public trade. The buyer/seller fields are for the ledger, never for the public feed."""

    __slots__ = (
        "market", "trade_id", "price", "qty", "taker_side", "buy_order_id", "sell_order_id",
        "buyer", "seller", "maker_fee", "taker_fee", "ts",
    )
    FIELDS: ClassVar[tuple[str, ...]] = (
        'market', 'trade_id', 'price', 'qty', 'taker_side', 'buy_order_id', 'sell_order_id',
        'buyer', 'seller', 'maker_fee', 'taker_fee', 'ts',
    )

    def __init__(
        self, market: str, trade_id: int, price: int, qty: int, taker_side: Side,
        buy_order_id: int, sell_order_id: int, buyer: str, seller: str,
        maker_fee: int, taker_fee: int, ts: int,
    ) -> None:
        self.market = market
        self.trade_id = trade_id
        self.price = price
        self.qty = qty
        self.taker_side = taker_side
        self.buy_order_id = buy_order_id
        self.sell_order_id = sell_order_id
        self.buyer = buyer
        self.seller = seller
        self.maker_fee = maker_fee
        self.taker_fee = taker_fee
        self.ts = ts


class BookDelta(Event):
    """A price level's new total quantity (0: the level is gone); ``seq`` is per market, +1 each."""

    __slots__ = ("market", "seq", "side", "price", "qty", "ts")
    FIELDS: ClassVar[tuple[str, ...]] = ('market', 'seq', 'side', 'price', 'qty', 'ts')

    def __init__(self, market: str, seq: int, side: Side, price: int, qty: int, ts: int) -> None:
        self.market = market
        self.seq = seq
        self.side = side
        self.price = price
        self.qty = qty
        self.ts = ts


class BalanceChanged(Event):
    """Sent after a deposit or withdrawal; trades are reported through ``ExecReport``."""

    __slots__ = ("account", "asset", "available", "locked", "ts")
    FIELDS: ClassVar[tuple[str, ...]] = ('account', 'asset', 'available', 'locked', 'ts')

    def __init__(self, account: str, asset: str, available: int, locked: int, ts: int) -> None:
        self.account = account
        self.asset = asset
        self.available = available
        self.locked = locked
        self.ts = ts


class CommandRejected(Event):
    """A cancel, modify, deposit or withdraw that was refused; nothing changed."""

    __slots__ = ("account", "command", "order_id", "reason", "message", "ts")
    FIELDS: ClassVar[tuple[str, ...]] = (
        'account', 'command', 'order_id', 'reason', 'message', 'ts',
    )

    def __init__(
        self, account: str, command: str, order_id: Unchecked, reason: RejectReason,
        message: str, ts: int,
    ) -> None:
        self.account = account
        self.command = command
        self.order_id = order_id
        self.reason = reason
        self.message = message
        self.ts = ts
