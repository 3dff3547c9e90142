"""The wire format, in one place: JSON lines in, commands out; engine events in, JSON lines out.

Theory of operation
-------------------
Every message is one JSON object on one line (UTF-8, ``\\n``-terminated). A request has
``op`` and may carry ``id`` (a string or an integer the client chose), which the direct
answer echoes. Every server message has ``type``. Prices, quantities and amounts travel as
plain decimal strings; requests may also give JSON numbers. Timestamps are integer
nanoseconds since the epoch (``ts``).

The gateway and the client library both import this module, so they cannot drift apart.
Decoding raises ``ProtocolError`` (shape problems: the ``error`` message) or
``OrderRejected`` (an order the exchange refuses before the engine sees it, such as a price
off the tick grid: the ``exec`` rejected report). Conversion to engine integers goes
through ``exchange/markets.py``, never through floats.

docs/protocol.md documents every op, message and error code; keep the two together.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Final

import orjson

from exchange.book import Order
from exchange.markets import MAX_TEXT_LENGTH, InvalidValue, Market, MarketConfig
from exchange.types import (
    REJECT_MESSAGES,
    BookDelta,
    CancelOrder,
    CommandRejected,
    Deposit,
    ExecReport,
    ModifyOrder,
    OrderType,
    PlaceOrder,
    RejectReason,
    Side,
    STPMode,
    TimeInForce,
    Trade,
    Withdraw,
)

MAX_LINE: Final = 64 * 1024
DEFAULT_PORT: Final = 7001
DEFAULT_DEPTH: Final = 20
MAX_DEPTH: Final = 10_000
RECENT_TRADES: Final = 100  # the last trades of each market that ``trades`` answers with
DEFAULT_RECENT: Final = 50
FILLS_PER_USER: Final = 1_000  # each user's last fills that ``fills`` answers with
FILLS_KEPT: Final = 100_000  # and of all users together, so that memory stays bounded
DEFAULT_FILLS: Final = 100
MAX_USER_LENGTH: Final = 64
MAX_CLIENT_ORDER_ID: Final = 64

PUBLIC_OPS: Final = frozenset({"login", "ping", "markets", "book", "trades", "subscribe", "unsubscribe", "stats"})
CHANNELS: Final = ("trades", "book")


class ErrorCode:
    """Codes of the ``error`` message (besides the engine's reject reasons)."""

    BAD_JSON: Final = "bad_json"
    BAD_REQUEST: Final = "bad_request"
    UNKNOWN_OP: Final = "unknown_op"
    LINE_TOO_LONG: Final = "line_too_long"
    NOT_LOGGED_IN: Final = "not_logged_in"
    AUTH_FAILED: Final = "auth_failed"
    FORBIDDEN: Final = "forbidden"
    UNKNOWN_MARKET: Final = "unknown_market"
    UNKNOWN_ORDER: Final = "unknown_order"
    SLOW_CONSUMER: Final = "slow_consumer"
    SHUTTING_DOWN: Final = "shutting_down"
    RATE_LIMITED: Final = "rate_limited"


class ProtocolError(Exception):
    """A request the server answers with ``error``; nothing changed."""

    def __init__(
        self, code: str, message: str, field: str | None = None, rid: Any = None,
        order_id: int | None = None, client_order_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.rid = rid  # the request's id, when the error is raised before the caller has it
        self.order_id = order_id  # the order a refused cancel, modify or query named
        self.client_order_id = client_order_id  # ... or the client's id it named it by


class OrderRejected(Exception):
    """An order refused before it reached the engine; answered with an ``exec`` rejected."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------- framing


# Bound once: compiled, ``orjson.dumps`` would be an attribute lookup on the module per call.
_dumps: Final = orjson.dumps
_loads: Final = orjson.loads
_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line (orjson appends the newline: no second copy)."""
    return _dumps(message, None, _NEWLINE)  # type: ignore[no-any-return]


def decode_request(line: bytes) -> dict[str, Any]:
    """Parse one request line; raises ``ProtocolError`` for bad JSON, shape, op or id."""
    try:
        msg = _loads(line)
    except orjson.JSONDecodeError as exc:
        # Valid JSON with a number beyond a double (1e400): read it exactly instead.
        msg = _loads_exact(line) if str(exc).startswith("number is infinity") else None
        if msg is None or not _encodable(msg):
            raise ProtocolError(ErrorCode.BAD_JSON, "the line is not valid JSON") from None
        _settle_numbers(msg)
    if type(msg) is not dict:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a request must be a JSON object", "op")
    rid = msg.get("id")
    if rid is not None and (type(rid) is not int and type(rid) is not str or _too_wide(rid)):
        msg.pop("id")
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "'id' must be a string or an integer of at most 64 bits", "id",
        )
    op = msg.get("op")
    if type(op) is not str:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'op' is missing or not a string", "op", rid)
    if op not in OPS:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:40]!r}", "op", rid)
    if (msg.get("qty").__class__ is float or msg.get("price").__class__ is float
            or msg.get("amount").__class__ is float or msg.get("quote_qty").__class__ is float):
        _exact_numbers(line, msg, rid)
    return msg


_VALUE_FIELDS: Final = ("price", "qty", "quote_qty", "amount")


class _Number:
    """A JSON number as the client wrote it, from the standard parser."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _exact_numbers(line: bytes, msg: dict[str, Any], rid: Any) -> None:
    """Replace the value fields a double holds with the digits the client wrote.

    orjson reads a JSON number as a binary double, so ``1.00000000000000001`` would arrive
    as ``1.0``: on the grid, and silently rounded. Requests with JSON numbers are rare,
    so only they pay for a second, exact parse, whose numbers become plain decimal strings
    that are then checked against the grid like any other. A line the second parser
    cannot read (nesting deeper than it goes) is refused: never the double's reading.
    """
    exact = _loads_exact(line)
    for name in _VALUE_FIELDS:
        if msg.get(name).__class__ is float:
            value = exact.get(name) if exact is not None else None
            if value.__class__ is _Number:
                msg[name] = _plain_number(value.text)  # type: ignore[union-attr]
            elif type(value) is int:
                msg[name] = str(value)
            else:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"'{name}' could not be read exactly: send it as a decimal string", name, rid,
                )


def _loads_exact(line: bytes) -> dict[str, Any] | None:
    """The request with its numbers as written (``_Number``; integers of up to 40 digits as
    ``int``), or None if the standard parser refuses it too."""
    if _nesting(line) > MAX_NESTING:
        return None
    try:
        msg = json.loads(line, parse_float=_Number, parse_int=_integer, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    return msg if type(msg) is dict else None


MAX_NESTING: Final = 64  # a request is a flat object; the standard parser recurses per level
_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"?')
_BRACKETS: Final = re.compile(rb"[\[\]{}]")


def _nesting(line: bytes) -> int:
    """How deeply the line's arrays and objects nest (brackets inside strings not counted).

    Checked before the standard parser runs, so that a deep line is refused without a
    RecursionError: on CPython 3.11 one leaves the interpreter's AST recursion counter
    off, and a later ``ast.parse`` in the same thread fails."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub(b"", line)):
        if bracket in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def _integer(text: str) -> Any:
    return int(text) if len(text) <= 40 else _Number(text)


def _settle_numbers(msg: dict[str, Any]) -> None:
    """After the exact parse of a whole line: the value fields as plain decimal strings, any
    other number as the double orjson would have made of it (so a fractional or infinite
    ``id`` or ``order_id`` is refused exactly as it is on the usual path)."""
    for key, value in list(msg.items()):
        if value.__class__ is _Number:
            text = value.text
            msg[key] = _plain_number(text) if key in _VALUE_FIELDS else float(text)


def _encodable(msg: dict[str, Any]) -> bool:
    """No lone surrogate (which the standard parser lets through, and orjson refuses) in a
    field the gateway might store or write back."""
    try:
        for key, value in msg.items():
            key.encode()
            if type(value) is str:
                value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _too_wide(value: Any) -> bool:
    """An integer no 64-bit field holds (orjson, and most clients, cannot write it back)."""
    return type(value) is int and not -(1 << 63) <= value < (1 << 64)


def _plain_number(text: str) -> str:
    """A JSON number's digits as a plain decimal string (exponent written out)."""
    try:
        value = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the JSON grammar allows only numbers here
        return text
    if -MAX_TEXT_LENGTH <= value.adjusted() <= MAX_TEXT_LENGTH:
        return format(value, "f")
    return text  # far out of range: refused as it stands, without writing out its digits


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def error_message(code: str, message: str, rid: Any = None, **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if rid is not None:
        msg["id"] = rid
    msg.update(extra)
    return msg


# ---------------------------------------------------------------------------- fields


def _field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    value = msg.get(name)
    if value is None:
        if required:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' is required", name)
        return None
    if type(value) is bool and kind is not bool:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' has the wrong type", name)
    if not isinstance(value, kind):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' has the wrong type", name)
    return value


_NUMBER: Final = (str, int, float)


def _number(msg: dict[str, Any], name: str, required: bool = True) -> Any:
    return _field(msg, name, _NUMBER, required)


def user_name(msg: dict[str, Any], name: str = "user") -> str:
    user = _field(msg, name, str)
    # Bytes, not characters: the name becomes a file name (audit log, order history).
    if not 0 < len(user.encode()) <= MAX_USER_LENGTH or user.startswith("__") or not user.isprintable():
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"'{name}' must be 1-{MAX_USER_LENGTH} bytes of printable "
            "characters and may not start with '__'", name,
        )
    if any(c in user for c in "/\\"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' may not contain '/' or '\\'", name)
    if user in (".", ".."):  # the name becomes a file name
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' may not be '.' or '..'", name)
    return user


def market_of(config: MarketConfig, msg: dict[str, Any]) -> Market:
    symbol = _field(msg, "market", str)
    market = config.markets.get(symbol)
    if market is None:
        raise ProtocolError(ErrorCode.UNKNOWN_MARKET, f"no market {symbol[:40]!r}", "market")
    return market


_BUY: Final = Side.BUY
_SELL: Final = Side.SELL
_LIMIT: Final = OrderType.LIMIT
_MARKET: Final = OrderType.MARKET
_FOK: Final = TimeInForce.FOK
_GTC: Final = TimeInForce.GTC
_IOC: Final = TimeInForce.IOC
_SIDES: Final = {"buy": _BUY, "sell": _SELL}
_TYPES: Final = {"limit": _LIMIT, "market": _MARKET}
_TIFS: Final = {t.value: t for t in TimeInForce}
_STPS: Final = {s.value: s for s in STPMode}


def only_fields(msg: dict[str, Any], allowed: frozenset[str], what: str, listed: tuple[str, ...]) -> None:
    """Refuse a request with a field not in ``allowed``, naming the first: a misspelt field
    must not be read as a missing one, and a field another op takes must not seem to do
    something."""
    if allowed.issuperset(msg):
        return
    key = next(k for k in msg if k not in allowed)
    takes = f"it takes {', '.join(listed)}" if listed else "it takes no fields besides 'op' and 'id'"
    raise ProtocolError(
        ErrorCode.BAD_REQUEST, f"unknown field {str(key)[:40]!r} in {what} ({takes})", str(key)[:40],
    )


# The fields each op takes besides "op" and "id"; any other is refused before the op's reader
# sees the request: a misspelt "time_in_force" must not rest as GTC, nor an admin's deposit
# with a misspelt "usr" credit the admin.
OP_FIELD_LISTS: Final[dict[str, tuple[str, ...]]] = {
    "order": ("market", "side", "type", "price", "qty", "quote_qty", "tif", "post_only", "stp", "client_order_id"),
    "cancel": ("order_id", "client_order_id"), "order_status": ("order_id", "client_order_id"),
    "modify": ("order_id", "price", "qty"), "queue_position": ("order_id",),
    "ping": (), "markets": (), "balances": (), "stats": (),
    "login": ("user", "token", "cancel_on_disconnect"),
    "deposit": ("asset", "amount", "user"), "withdraw": ("asset", "amount", "user"),
    "orders": ("market",), "cancel_all": ("market",),
    "book": ("market", "depth", "level"),
    "trades": ("market", "limit"),
    "fills": ("market", "limit", "after"),
    "subscribe": ("channel", "market"), "unsubscribe": ("channel", "market"),
}
OPS: Final = frozenset(OP_FIELD_LISTS)
OP_FIELDS: Final[dict[str, frozenset[str]]] = {
    op: frozenset(("op", "id") + fields) for op, fields in OP_FIELD_LISTS.items()
}


def check_op_fields(msg: dict[str, Any], op: str) -> None:
    """Refuse a field the op does not take (``OP_FIELD_LISTS``)."""
    allowed = OP_FIELDS.get(op)
    if allowed is not None and not allowed.issuperset(msg):
        only_fields(msg, allowed, f"'{op}'", OP_FIELD_LISTS[op])


def client_order_id_of(value: Any) -> str:
    """A client order id as a request gives it: 1 to 64 printable characters."""
    if type(value) is not str or not 0 < len(value) <= MAX_CLIENT_ORDER_ID or not value.isprintable():
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"'client_order_id' must be a string of 1 to {MAX_CLIENT_ORDER_ID} "
            "printable characters", "client_order_id",
        )
    return value


def order_command(config: MarketConfig, msg: dict[str, Any], account: str, ts: int) -> PlaceOrder:
    """An ``order`` request as a ``PlaceOrder``.

    Shape errors raise ``ProtocolError``; a market the exchange does not list or a price or
    quantity it cannot take exactly raises ``OrderRejected`` with the engine's reason. Fields
    the op does not take were refused before (``check_op_fields``).
    """
    symbol = msg.get("market")
    if type(symbol) is not str:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'market' is required", "market")
    raw_side = msg.get("side")
    side = _SIDES.get(raw_side) if type(raw_side) is str else None
    if side is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'side' must be buy|sell", "side")
    raw_type = msg.get("type")
    if raw_type is None:  # null is the default, as for every optional field
        raw_type = "limit"
    otype = _TYPES.get(raw_type) if type(raw_type) is str else None
    if otype is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'type' must be limit|market", "type")
    raw_tif = msg.get("tif")
    tif: TimeInForce | None
    if raw_tif is None:
        tif = _GTC if otype is _LIMIT else _IOC
    else:
        tif = _TIFS.get(raw_tif) if type(raw_tif) is str else None
        if tif is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'tif' must be gtc|ioc|fok", "tif")
    post_only = msg.get("post_only")
    if post_only is None:
        post_only = False
    if type(post_only) is not bool:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'post_only' must be true or false", "post_only")
    raw_stp = msg.get("stp")
    stp = None
    if raw_stp is not None:
        stp = _STPS.get(raw_stp) if type(raw_stp) is str else None
        if stp is None:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "'stp' must be cancel_resting|cancel_incoming|cancel_both|none", "stp",
            )
    coid = msg.get("client_order_id")
    if coid is not None:
        client_order_id_of(coid)
    raw_qty = msg.get("qty")
    raw_quote = msg.get("quote_qty")
    if raw_quote is not None:
        if otype is not _MARKET:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'quote_qty' sizes market orders only", "quote_qty")
        if raw_qty is not None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "give 'qty' or 'quote_qty', not both", "quote_qty")
        if type(raw_quote) not in _NUMBER_TYPES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'quote_qty' must be a decimal string", "quote_qty")
        if tif is _FOK:  # sized to what the book fills, it always would: say so, not ignore it
            raise ProtocolError(ErrorCode.BAD_REQUEST, "an order sized by 'quote_qty' is sized to what "
                                "the book fills now, so 'fok' would change nothing: use ioc", "tif")
    elif raw_qty is None or type(raw_qty) not in _NUMBER_TYPES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'qty' is required (a decimal string)", "qty")
    raw_price = msg.get("price")
    if raw_price is not None and type(raw_price) not in _NUMBER_TYPES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'price' must be a decimal string", "price")
    if otype is _LIMIT and raw_price is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'price' is required for a limit order", "price")
    if otype is _MARKET and raw_price is not None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a market order takes no 'price'", "price")
    market = config.markets.get(symbol)
    if market is None:
        raise OrderRejected(RejectReason.UNKNOWN_MARKET, f"no market {symbol[:40]!r}")
    if raw_quote is not None:
        try:
            quote_qty = market.quote.to_units(raw_quote)
        except InvalidValue as exc:
            raise OrderRejected(RejectReason.INVALID_QUANTITY, f"quote_qty: {exc.message}") from None
        return PlaceOrder(ts, account, symbol, side, otype, None, None, tif, post_only, stp, coid, quote_qty)
    try:
        qty = market.qty_lots(raw_qty)
        price = market.price_ticks(raw_price) if raw_price is not None else None
    except InvalidValue as exc:
        raise OrderRejected(exc.reason, exc.message) from None
    return PlaceOrder(ts, account, symbol, side, otype, qty, price, tif, post_only, stp, coid)


_NUMBER_TYPES: Final = frozenset({str, int, float})


def order_id_of(msg: dict[str, Any]) -> int:
    oid = msg.get("order_id")
    if type(oid) is str and oid.isascii() and oid.isdigit() and len(oid) <= 20:
        oid = int(oid)  # then held to 64 bits, as a JSON integer is
    if type(oid) is not int or _too_wide(oid):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'order_id' must be an integer of at most 64 bits "
                            "(a JSON integer or a string of digits)", "order_id")
    return oid


def order_ref(msg: dict[str, Any]) -> tuple[int | None, str | None]:
    """The order a ``cancel`` or ``order_status`` names: ``(order_id, None)`` or
    ``(None, client_order_id)``."""
    coid = msg.get("client_order_id")
    if coid is None:
        if msg.get("order_id") is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "give 'order_id' or 'client_order_id'", "order_id")
        return order_id_of(msg), None
    if msg.get("order_id") is not None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "give 'order_id' or 'client_order_id', not both",
                            "client_order_id")
    return None, client_order_id_of(coid)


def no_such_client_order(coid: str) -> ProtocolError:
    return ProtocolError(RejectReason.UNKNOWN_ORDER.value,
                         "no open order of this account has this client_order_id", client_order_id=coid)


def cancel_command(
    msg: dict[str, Any], account: str, ts: int, by_client_id: Callable[[str, str], Order | None],
) -> CancelOrder:
    """A ``cancel`` naming the order by ``order_id`` or by the ``client_order_id`` it was
    placed with (looked up among the account's open orders)."""
    oid, coid = order_ref(msg)
    if coid is not None:
        order = by_client_id(account, coid)
        if order is None:
            raise no_such_client_order(coid)
        oid = order.id
    assert oid is not None
    return CancelOrder(ts, account, oid)


def modify_command(
    msg: dict[str, Any], account: str, ts: int, lookup: Callable[[str, int], Order | None],
    config: MarketConfig,
) -> ModifyOrder:
    """A ``modify`` request; its price and qty are read with the order's own market."""
    oid = order_id_of(msg)
    raw_price, raw_qty = msg.get("price"), msg.get("qty")
    for name, value in (("price", raw_price), ("qty", raw_qty)):
        if value is not None and type(value) not in _NUMBER_TYPES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' must be a decimal string", name)
    if raw_price is None and raw_qty is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "give 'price', 'qty' or both", "qty")
    order = lookup(account, oid)
    if order is None:
        raise ProtocolError(RejectReason.UNKNOWN_ORDER.value, REJECT_MESSAGES[RejectReason.UNKNOWN_ORDER],
                            order_id=oid)
    market = config.markets[order.market]
    try:
        price = market.price_ticks(raw_price) if raw_price is not None else None
        qty = market.qty_lots(raw_qty) if raw_qty is not None else None
    except InvalidValue as exc:
        raise ProtocolError(exc.reason.value, exc.message, order_id=oid) from None
    return ModifyOrder(ts, account, oid, price, qty)


def funding_command(
    config: MarketConfig, msg: dict[str, Any], account: str, ts: int, withdraw: bool,
) -> Deposit | Withdraw:
    asset_name = _field(msg, "asset", str)
    asset = config.assets.get(asset_name)
    if asset is None:
        raise ProtocolError(RejectReason.UNKNOWN_ASSET.value, f"no asset {asset_name[:40]!r}", "asset")
    raw = _number(msg, "amount")
    try:
        amount = asset.to_units(raw)
    except InvalidValue as exc:
        raise ProtocolError(exc.reason.value, exc.message, "amount") from None
    return (Withdraw if withdraw else Deposit)(ts, account, asset_name, amount)


def book_request(config: MarketConfig, msg: dict[str, Any]) -> tuple[Market, int, int]:
    market = market_of(config, msg)
    depth = msg.get("depth")
    if depth is None:  # null is the same as leaving it out, as everywhere
        depth = DEFAULT_DEPTH
    if type(depth) is not int or not 1 <= depth <= MAX_DEPTH:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'depth' must be an integer from 1 to {MAX_DEPTH}", "depth")
    level = msg.get("level")
    if level is None:
        level = 2
    if level not in (2, 3) or type(level) is not int:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'level' must be 2 or 3", "level")
    return market, depth, level


def optional_market(config: MarketConfig, msg: dict[str, Any]) -> str | None:
    """``market`` where it narrows a request to one market (``orders``, ``cancel_all``)."""
    market = msg.get("market")
    if market is None:
        return None
    if type(market) is not str:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'market' must be a string", "market")
    if market not in config.markets:
        raise ProtocolError(ErrorCode.UNKNOWN_MARKET, f"no market {market[:40]!r}", "market")
    return market


def _limit(msg: dict[str, Any], default: int, most: int) -> int:
    """A request's ``limit``: rows wanted, from 1 to ``most`` (null: ``default``)."""
    limit = msg.get("limit")
    if limit is None:
        return default
    if type(limit) is not int or not 1 <= limit <= most:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'limit' must be an integer from 1 to {most:,}", "limit")
    return limit


def trades_request(config: MarketConfig, msg: dict[str, Any]) -> tuple[Market, int]:
    return market_of(config, msg), _limit(msg, DEFAULT_RECENT, RECENT_TRADES)


def fills_request(config: MarketConfig, msg: dict[str, Any]) -> tuple[str | None, int, int | None]:
    """(market or None for all, limit, after: a trade id or None) of a ``fills`` request."""
    market = optional_market(config, msg)
    limit = _limit(msg, DEFAULT_FILLS, FILLS_PER_USER)
    after = msg.get("after")
    if type(after) is str and after.isascii() and after.isdigit() and len(after) <= 20:
        after = int(after)  # as ``order_id`` may be: a client whose numbers are doubles
    if after is not None and (type(after) is not int or after < 0 or _too_wide(after)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'after' must be a trade id (an integer of at most "
                            "64 bits, or a string of its digits)", "after")
    return market, limit, after


def subscription(config: MarketConfig, msg: dict[str, Any]) -> tuple[str, Market]:
    channel = msg.get("channel")
    if channel not in CHANNELS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'channel' must be trades|book", "channel")
    return channel, market_of(config, msg)


# ---------------------------------------------------------------------------- outgoing


_REPORT_ONLY: Final = ("type", "exec_type", "trade_id", "last_price", "last_qty", "liquidity", "fee",
                       "fee_asset", "reason", "message")


class Formatter:
    """Turns engine integers back into decimal strings, per market, with small caches.

    Prices and quantities repeat constantly (a few hundred levels, a few sizes), so a
    bounded dict per market saves the integer-to-string work on the hot path.
    """

    CACHE_LIMIT = 100_000

    def __init__(self, config: MarketConfig) -> None:
        self.config = config
        self.markets = config.markets
        self._price: dict[str, dict[int, str]] = {m: {} for m in config.markets}
        self._qty: dict[str, dict[int, str]] = {m: {} for m in config.markets}

    def price(self, market: str, ticks: int) -> str:
        cache = self._price[market]
        text = cache.get(ticks)
        if text is None:
            if len(cache) > self.CACHE_LIMIT:
                cache.clear()
            text = cache[ticks] = self.markets[market].format_price(ticks)
        return text

    def qty(self, market: str, lots: int) -> str:
        cache = self._qty[market]
        text = cache.get(lots)
        if text is None:
            if len(cache) > self.CACHE_LIMIT:
                cache.clear()
            text = cache[lots] = self.markets[market].format_qty(lots)
        return text

    def amount(self, asset: str, units: int) -> str:
        return self.config.assets[asset].format(units)

    # -- messages --------------------------------------------------------------------

    def exec_report(self, ev: ExecReport) -> dict[str, Any]:
        market = ev.market
        spec = self.markets.get(market)
        if spec is None:  # rejected for an unknown market: echo what we can
            msg: dict[str, Any] = {
                "type": "exec", "exec_type": ev.exec_type, "order_id": None, "market": market,
                "side": ev.side, "order_type": ev.order_type, "tif": ev.tif, "price": None,
                "qty": None, "filled_qty": "0", "remaining_qty": "0", "avg_price": None,
                "status": ev.status, "ts": ev.ts,
            }
        else:
            price = ev.price
            msg = {
                "type": "exec", "exec_type": ev.exec_type, "order_id": ev.order_id,
                "market": market, "side": ev.side, "order_type": ev.order_type, "tif": ev.tif,
                "price": None if price is None else self.price(market, price),
                "qty": self.qty(market, ev.qty), "filled_qty": self.qty(market, ev.filled),
                "remaining_qty": self.qty(market, ev.remaining),
                "avg_price": spec.format_avg_price(ev.cost, ev.filled) if ev.filled else None,
                "status": ev.status, "ts": ev.ts,
            }
        if ev.client_order_id is not None:
            msg["client_order_id"] = ev.client_order_id
        if ev.trade_id is not None:
            msg["trade_id"] = ev.trade_id
            msg["last_price"] = self.price(market, ev.last_price)  # type: ignore[arg-type]
            msg["last_qty"] = self.qty(market, ev.last_qty)  # type: ignore[arg-type]
            msg["liquidity"] = ev.liquidity
            msg["fee"] = spec.quote.format(ev.fee)  # type: ignore[union-attr,arg-type]
            msg["fee_asset"] = spec.quote.name  # type: ignore[union-attr]
        if ev.reason is not None:
            msg["reason"] = ev.reason
            msg["message"] = REJECT_MESSAGES[ev.reason]
        return msg

    def rejected(self, msg: dict[str, Any], account: str, reason: RejectReason, text: str, ts: int) -> dict[str, Any]:
        """An ``exec`` rejected for an order refused before the engine (off-grid price...)."""
        order_type = msg.get("type") or "limit"  # null is the default, as everywhere
        # The request's tif, or the default it would have had, as the engine reports it: a
        # market order never rests, so ioc unless fok.
        tif = msg.get("tif")
        if order_type == "market":
            if tif is None or tif == "gtc":
                tif = "ioc"
        elif not tif:
            tif = "gtc"
        out: dict[str, Any] = {
            "type": "exec", "exec_type": "rejected", "order_id": None,
            "market": msg.get("market"), "side": msg.get("side"), "order_type": order_type,
            "tif": tif,
            "price": None, "qty": None, "filled_qty": "0", "remaining_qty": "0",
            "avg_price": None, "status": "rejected", "ts": ts, "reason": reason.value,
            "message": text,
        }
        for name in ("price", "qty", "quote_qty", "client_order_id"):
            value = msg.get(name)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                out[name] = str(value)[:64]
        return out

    def trade(self, ev: Trade) -> dict[str, Any]:
        market = ev.market
        return {
            "type": "trade", "market": market, "trade_id": ev.trade_id,
            "price": self.price(market, ev.price), "qty": self.qty(market, ev.qty),
            "taker_side": ev.taker_side, "ts": ev.ts,
        }

    def recent_trade(self, ev: Trade) -> dict[str, Any]:
        """A row of a ``trades`` reply: the pushed ``trade`` without its type and market."""
        market = ev.market
        return {
            "trade_id": ev.trade_id, "price": self.price(market, ev.price),
            "qty": self.qty(market, ev.qty), "taker_side": ev.taker_side, "ts": ev.ts,
        }

    def fill(self, row: tuple[Any, ...]) -> dict[str, Any]:
        """A row of a ``fills`` reply from a kept fill (``gateway.RecentFills``): price,
        quantity and fee as integers (a fill of this start) or decimal strings (one read
        back from the ledger)."""
        trade_id, order_id, market, side, price, qty, liquidity, fee, ts, coid = row
        quote = self.markets[market].quote
        out: dict[str, Any] = {
            "trade_id": trade_id, "order_id": order_id, "market": market, "side": side,
            "price": self.price(market, price) if type(price) is int else price,
            "qty": self.qty(market, qty) if type(qty) is int else qty,
            "liquidity": liquidity, "fee": quote.format(fee) if type(fee) is int else fee,
            "fee_asset": quote.name, "ts": ts,
        }
        if coid is not None:
            out["client_order_id"] = coid
        return out

    def book_update(self, ev: BookDelta) -> dict[str, Any]:
        market = ev.market
        return {
            "type": "book_update", "market": market, "seq": ev.seq, "side": ev.side,
            "price": self.price(market, ev.price),
            "qty": self.qty(market, ev.qty) if ev.qty else "0",  # "0": the level is gone
            "ts": ev.ts,
        }

    def command_rejected(self, ev: CommandRejected, rid: Any) -> dict[str, Any]:
        msg = error_message(ev.reason.value, ev.message, rid)
        if ev.order_id is not None:
            msg["order_id"] = ev.order_id
        return msg

    def order(self, order: Order) -> dict[str, Any]:
        market = order.market
        spec = self.markets[market]
        msg: dict[str, Any] = {
            "order_id": order.id, "market": market, "side": order.side,
            "order_type": order.order_type, "tif": order.tif,
            "price": None if order.price is None else self.price(market, order.price),
            "qty": self.qty(market, order.qty), "filled_qty": self.qty(market, order.filled),
            "remaining_qty": self.qty(market, order.remaining),
            "avg_price": spec.format_avg_price(order.cost, order.filled) if order.filled else None,
            "status": order.status, "post_only": order.post_only, "ts": order.ts,
        }
        if order.client_order_id is not None:
            msg["client_order_id"] = order.client_order_id
        return msg

    def finished_order(self, ev: ExecReport) -> dict[str, Any]:
        """An order's last report as an ``order_status`` entry (as ``order`` gives for an
        open one; ``ts`` is when it finished, and ``post_only`` is not known any more)."""
        msg = self.exec_report(ev)
        for key in _REPORT_ONLY:
            msg.pop(key, None)
        return msg

    def book(self, market: str, seq: int, bids: list[tuple[int, int, int]],
             asks: list[tuple[int, int, int]], level: int, reference: int | None = None) -> dict[str, Any]:
        if level == 2:
            def rows(levels: list[tuple[int, int, int]]) -> list[list[Any]]:
                return [[self.price(market, p), self.qty(market, q), n] for p, q, n in levels]
        else:
            def rows(levels: list[tuple[int, int, int]]) -> list[list[Any]]:
                return [[oid, self.price(market, p), self.qty(market, q)] for oid, p, q in levels]
        return {"type": "book", "market": market, "seq": seq, "level": level,
                "bids": rows(bids), "asks": rows(asks),
                "reference_price": None if reference is None else self.price(market, reference)}

    def balances(self, balances: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for asset, bal in balances.items():
            fmt = self.config.assets[asset].format
            out[asset] = {
                "available": fmt(bal.available), "locked": fmt(bal.locked),
                "deposited": fmt(bal.deposited), "withdrawn": fmt(bal.withdrawn),
                "bought": fmt(bal.bought), "sold": fmt(bal.sold), "fees": fmt(bal.fees),
                "spent": fmt(bal.spent),
            }
        return out
