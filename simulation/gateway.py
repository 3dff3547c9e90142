"""The one interface every simulated trader talks to: ``Gateway``.

Theory of operation
-------------------
An agent never knows whether it trades over TCP with a running exchange
(``simulation/tcp.py``, ``TcpGateway`` over ``client.ExchangeClient``) or with an engine in
the same process driven by a simulated clock (``simulation/embedded.py``,
``EmbeddedGateway``). Both implement the methods below, with the same meaning:

* requests take prices and quantities as decimal strings (or ``Decimal``), exactly what the
  exchange's wire protocol takes, so nothing is converted twice and floats never appear;
* answers and the event stream come back in the engine's own vocabulary
  (``exchange.types``: ``ExecReport``, ``Trade``, ``BookDelta``) with integer ticks, lots and
  minor units. Integers are what an agent computes budgets with; the TCP gateway converts
  the wire's decimal strings once, and the embedded one hands over the engine's events
  as they are (that is most of why embedded mode is fast). ``wire(event)`` renders any of
  them with the exchange's own ``Formatter``, giving the exact message TCP would carry;
* every execution report of the account arrives on the event stream exactly once,
  including those that also answered a request (as ``ExchangeClient`` does), so an agent
  can keep its books from the stream alone;
* time is the gateway's: ``now_ns()`` and ``sleep()`` are wall-clock over TCP and the
  simulated clock in embedded mode. An agent that only waits through ``sleep`` and the
  gateway's own requests runs unchanged on both.

Errors: a refused cancel, modify or funding request raises ``GatewayError`` (``.code`` is
the exchange's error code or reject reason); a rejected *order* is not an error but a
report with ``exec_type`` ``rejected`` and a ``reason``, as on the wire. A lost connection
raises ``GatewayConnectionError``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from exchange.markets import Asset, Market, MarketConfig, format_scaled, split_decimal
from exchange.protocol import Formatter
from exchange.types import BookDelta, Event, ExecReport, OrderStatus, Side, Trade

PriceLike = str | Decimal
FINAL_STATUSES = frozenset({
    OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.EXPIRED, OrderStatus.REJECTED,
})


class GatewayError(Exception):
    """A request the exchange refused (nothing changed): ``code`` and a human ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class GatewayConnectionError(GatewayError):
    """The exchange cannot be reached, or stopped answering."""

    def __init__(self, message: str) -> None:
        super().__init__("connection", message)


@dataclass(slots=True)
class Holding:
    """One asset of one account, in the asset's minor units."""

    available: int
    locked: int
    deposited: int = 0
    fees: int = 0

    @property
    def total(self) -> int:
        return self.available + self.locked


@dataclass(slots=True)
class BookView:
    """A level-2 book: levels best first as ``(price_ticks, qty_lots, order_count)``.

    ``reference``: the last trade price in ticks (the configured reference before the first
    trade, None without either), where the price band is centred.
    """

    market: str
    seq: int
    bids: list[tuple[int, int, int]]
    asks: list[tuple[int, int, int]]
    reference: int | None = None

    @property
    def best_bid(self) -> int | None:
        return self.bids[0][0] if self.bids else None

    @property
    def best_ask(self) -> int | None:
        return self.asks[0][0] if self.asks else None


@dataclass(slots=True)
class OpenOrderView:
    """One resting order as ``orders`` lists it, in integers."""

    order_id: int
    market: str
    side: str
    price: int | None
    qty: int
    filled: int
    remaining: int
    client_order_id: str | None = None


class Gateway(ABC):
    """Order entry, queries and the event stream of one account (see the module docstring)."""

    account: str
    config: MarketConfig

    # -- time -------------------------------------------------------------------------

    @abstractmethod
    def now_ns(self) -> int:
        """The current time in nanoseconds: simulated in embedded mode, wall-clock over TCP."""

    @abstractmethod
    async def sleep(self, seconds: float) -> None:
        """Wait on the gateway's clock (never ``asyncio.sleep`` directly: see the docstring)."""

    # -- order entry ------------------------------------------------------------------

    @abstractmethod
    async def place(
        self, market: str, side: str, qty: PriceLike, price: PriceLike | None = None, *,
        order_type: str | None = None, tif: str | None = None, post_only: bool = False,
        client_order_id: str | None = None,
    ) -> ExecReport:
        """Place an order; returns its first report (``new`` or ``rejected``), never raises on a reject."""

    async def place_units(
        self, market: str, side: Side, lots: int, ticks: int | None, texts: MarketTexts, *,
        tif: str | None = None, post_only: bool = False,
    ) -> ExecReport:
        """``place`` with the size and the limit price on the market's grid (lots and ticks;
        no ticks: a market order), the way agents hold them. Here they are written as the
        wire's decimal strings (``texts``: the market's); the embedded gateway hands them to
        its engine as they are, which saves formatting and parsing them on every order."""
        if ticks is None:
            return await self.place(market, _SIDE_TEXT[side], texts.qty(lots), order_type="market",
                                    tif=tif, post_only=post_only)
        return await self.place(market, _SIDE_TEXT[side], texts.qty(lots), texts.price(ticks),
                                tif=tif, post_only=post_only)

    async def reprice_units(self, order_id: int, ticks: int, texts: MarketTexts) -> ExecReport:
        """``modify`` of the price only, given in ticks (see ``place_units``)."""
        return await self.modify(order_id, price=texts.price(ticks))

    @abstractmethod
    async def cancel(self, order_id: int) -> ExecReport:
        """Cancel a resting order; ``GatewayError('unknown_order')`` if it is no longer open."""

    async def final_cancel(self, order_id: int) -> ExecReport:
        """``cancel`` of a run's clean-up: one that waits out the exchange's rate limit
        (over TCP; in process there is none). Queries already do."""
        return await self.cancel(order_id)

    async def final_cancel_all(self, known: Iterable[int]) -> int:
        """A run's clean-up: cancel every open order of the account, those the agent knows
        (``known``) and any the exchange lists (one whose acknowledgement never came);
        returns how many may be left open (the exchange stopped answering, or kept
        refusing for its rate limit). Their reports come as events."""
        ids = set(known)
        try:
            ids.update(o.order_id for o in await self.open_orders())
        except GatewayConnectionError:
            return len(ids)
        except GatewayError:
            pass
        todo = sorted(ids)
        left = 0
        for i, oid in enumerate(todo):
            try:
                await self.final_cancel(oid)
            except GatewayConnectionError:
                return left + len(todo) - i
            except GatewayError as exc:
                if exc.code == "rate_limited":
                    left += 1
                # else: filled or canceled meanwhile
        return left

    @abstractmethod
    async def modify(
        self, order_id: int, price: PriceLike | None = None, qty: PriceLike | None = None,
    ) -> ExecReport:
        """Amend price and/or total quantity; returns the ``replaced`` report."""

    @abstractmethod
    async def deposit(self, asset: str, amount: PriceLike) -> dict[str, Holding]:
        """Credit the account (the way every agent is funded); returns the new balances."""

    # -- queries ----------------------------------------------------------------------

    @abstractmethod
    async def balances(self) -> dict[str, Holding]: ...

    async def settled(self) -> None:
        """Until every report already sent to this session has arrived (then
        ``poll_events`` has them all). Over TCP, one round trip: the exchange answers a
        session in order."""
        await self.balances()

    @abstractmethod
    async def open_orders(self, market: str | None = None) -> list[OpenOrderView]: ...

    @abstractmethod
    async def book(self, market: str, depth: int = 20) -> BookView: ...

    async def asks_for(self, market: str, lots: int, depth: int = 50) -> list[tuple[int, int, int]]:
        """The ask levels, best first, a buy of ``lots`` would walk (at most ``depth``): what
        sizing a market buy needs. Over TCP that is the book's ask side; in process the
        engine stops at the level that fills it."""
        return (await self.book(market, depth)).asks

    def top_now(self, market: str) -> tuple[int | None, int | None] | None:
        """``top`` when this gateway knows it without a round trip (the in-process engine, a
        book mirror), else None: ask ``top``. Saves a suspension per order for traders that
        look at the best prices before each one."""
        return None

    async def top(self, market: str) -> tuple[int | None, int | None]:
        """Best bid and best ask in ticks (None for an empty side)."""
        view = await self.book(market, 1)
        return view.best_bid, view.best_ask

    @abstractmethod
    async def queue_position(self, order_id: int) -> int | None:
        """Lots resting ahead of the order at its price (None if it is not open): the engine's figure."""

    # -- events -----------------------------------------------------------------------

    @abstractmethod
    async def subscribe(self, channel: str, market: str) -> None:
        """Also receive public ``Trade``s (channel ``trades``) or ``BookDelta``s (``book``)."""

    @abstractmethod
    def poll_events(self) -> list[Event]:
        """Every event received and not yet taken, without waiting."""

    @abstractmethod
    async def next_event(self, timeout: float) -> Event | None:
        """The next event, waiting at most ``timeout`` seconds on the gateway's clock."""

    async def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release the connection, if there is one."""

    # -- rendering --------------------------------------------------------------------

    def wire(self, event: Event) -> dict[str, Any]:
        """The wire message of an event, exactly as the exchange's ``Formatter`` writes it."""
        return wire_message(self._formatter(), event)

    def _formatter(self) -> Formatter:
        fmt = getattr(self, "_fmt", None)
        if fmt is None:
            fmt = Formatter(self.config)
            self._fmt = fmt
        return fmt


def wire_message(fmt: Formatter, event: Event) -> dict[str, Any]:
    cls = event.__class__
    if cls is ExecReport:
        return fmt.exec_report(event)  # type: ignore[arg-type]
    if cls is Trade:
        return fmt.trade(event)  # type: ignore[arg-type]
    if cls is BookDelta:
        return fmt.book_update(event)  # type: ignore[arg-type]
    raise TypeError(f"no wire form for {event!r}")


# ------------------------------------------------------------------ decimal <-> integers


# ``exchange.markets.format_scaled`` now cuts the digits itself, as this module once did to
# be fast; the name stays for the callers and tests that use it.
scaled_text = format_scaled


_SIDE_TEXT = {Side.BUY: "buy", Side.SELL: "sell"}  # an enum's ``.value`` is a Python property

TEXT_CACHE_MAX = 1 << 16  # entries per cache of ``MarketTexts``, then it starts afresh


class MarketTexts:
    """One market's prices, sizes and quote amounts as decimal strings.

    The strings ``Market.format_price``, ``format_qty`` and ``quote.format`` give. Agents send
    the same prices and sizes again and again, and the embedded ledger writes every trade's,
    so those are cached (each cache is cleared when it reaches ``TEXT_CACHE_MAX`` entries,
    so memory stays bounded); amounts (fees) rarely repeat and are not.
    """

    __slots__ = ("spec", "prices", "sizes", "quote_decimals")

    def __init__(self, spec: Market) -> None:
        self.spec = spec
        self.prices: dict[int, str] = {}
        self.sizes: dict[int, str] = {}
        self.quote_decimals = spec.quote.decimals

    def price(self, ticks: int) -> str:
        text = self.prices.get(ticks)
        if text is None:
            spec = self.spec
            text = scaled_text(ticks * spec.tick_mantissa, spec.tick_decimals)
            _remember(self.prices, ticks, text)
        return text

    def qty(self, lots: int) -> str:
        text = self.sizes.get(lots)
        if text is None:
            spec = self.spec
            text = scaled_text(lots * spec.lot_mantissa, spec.lot_decimals)
            _remember(self.sizes, lots, text)
        return text

    def amount(self, units: int) -> str:
        """Quote-asset minor units (fees, notionals)."""
        return scaled_text(units, self.quote_decimals)


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= TEXT_CACHE_MAX:
        cache.clear()
    cache[key] = value


class WireNumbers:
    """One market's decimal strings from the wire as integers: prices in ticks, sizes in
    lots, quote amounts in minor units. ``MarketTexts`` the other way round, cached for the
    same reason: over TCP every report carries four to seven of them, the same prices and
    sizes again and again, and parsing one exactly costs a microsecond or two. Bounded as
    ``MarketTexts`` is; amounts (fees) are parsed each time, as they rarely repeat.
    """

    __slots__ = ("spec", "prices", "sizes")

    def __init__(self, spec: Market) -> None:
        self.spec = spec
        self.prices: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def price(self, text: str) -> int:
        """Ticks; ``InvalidValue`` for a price off the grid (nothing is cached then)."""
        ticks = self.prices.get(text)
        if ticks is None:
            ticks = self.spec.price_ticks(text)
            _remember(self.prices, text, ticks)
        return ticks

    def lots(self, text: str) -> int:
        lots = self.sizes.get(text)
        if lots is None:
            lots = lots_of(self.spec, text)
            _remember(self.sizes, text, lots)
        return lots

    def amount(self, text: str) -> int:
        """Quote-asset minor units. Not cached: fees rarely repeat (a cache missed nearly always)."""
        return units_of(self.spec.quote, text)


def units_of(asset: Asset, text: str) -> int:
    """An amount the exchange wrote (zero allowed) as minor units; exact, as it is on the grid."""
    digits, scale = split_decimal(text)
    value, rest = divmod(digits * 10**asset.decimals, 10**scale)
    if rest:
        raise ValueError(f"{text!r} is finer than {asset.name}'s unit")
    return value


def lots_of(market: Market, text: str) -> int:
    """A quantity the exchange wrote (zero allowed) as lots."""
    if text == "0" or not text.strip("0."):
        return 0
    return market.qty_lots(text)


def holdings_from_wire(config: MarketConfig, balances: dict[str, dict[str, str]]) -> dict[str, Holding]:
    out = {}
    for name, bal in balances.items():
        asset = config.assets.get(name)
        if asset is None:
            continue
        out[name] = Holding(
            units_of(asset, bal["available"]), units_of(asset, bal["locked"]),
            units_of(asset, bal.get("deposited", "0")), units_of(asset, bal.get("fees", "0")),
        )
    return out
