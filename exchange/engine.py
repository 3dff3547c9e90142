"""The matching engine: ``Exchange.handle(command) -> list[Event]``, sans-I/O and deterministic.

Theory of operation
-------------------
One ``Exchange`` owns every market's book, every balance and the id counters. A command
carries its own timestamp and account; ``handle`` validates it completely before it
changes anything, so a rejected command leaves the state exactly as it was and produces a
single rejection event. An accepted order then goes through, in this order:

1. reservation: the funds it can spend are moved from available to locked
   (``exchange/accounts.py`` explains the amounts);
2. matching: price-time priority against the opposite side, best price first, oldest
   order first within a price, each fill at the resting (maker) order's price; every fill
   settles both sides at once and emits a report to each owner and a public trade;
3. the remainder rests at the back of its level (GTC limit) or expires (IOC, FOK, market),
   releasing exactly what is still locked for it.

Book changes are published as level deltas (new total quantity, 0 when the level is gone),
one per level a command touched, numbered per market by ``seq`` (+1 each).

No clock, no randomness, no files, no asyncio: the gateway, the embedded simulation,
journal replay, the tests and the benchmarks all drive this same code, and the same
commands always produce the same events and the same state.
"""

from __future__ import annotations

from typing import Any, Callable, Final

from exchange.accounts import FEE_ACCOUNT, Accounts, Balance
from exchange.book import AccountOrders, Level, Order, OrderBook, leave_account
from exchange.markets import BPS, Market, MarketConfig, default_config
from exchange.types import (
    REJECT_MESSAGES,
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
    OrderStatus,
    OrderType,
    PlaceOrder,
    RejectReason,
    Side,
    STPMode,
    TimeInForce,
    Trade,
    Withdraw,
)

NO_LIMIT: Final = 1 << 62  # an upper price bound no real price reaches
# Integer inputs beyond this many ticks, lots or minor units are refused (the decimal edge
# already refuses values over 10**12 whole units; this guards direct callers).
MAX_UNITS: Final = 10**24

# Enum members bound to module names: on CPython 3.11 ``Side.BUY`` is a class attribute
# lookup through the enum metaclass and costs about 100 ns, a module global about 7 ns.
# ``Final`` (here and in the other compiled modules): mypyc then reads the name from a C
# static instead of looking it up in the module's dictionary on every use (~10 ns each).
_BUY: Final = Side.BUY
_SELL: Final = Side.SELL
_LIMIT: Final = OrderType.LIMIT
_MARKET: Final = OrderType.MARKET
_GTC: Final = TimeInForce.GTC
_IOC: Final = TimeInForce.IOC
_FOK: Final = TimeInForce.FOK
_NEW: Final = OrderStatus.NEW
_PARTIAL: Final = OrderStatus.PARTIALLY_FILLED
_FILLED: Final = OrderStatus.FILLED
_CANCELED: Final = OrderStatus.CANCELED
_EXPIRED: Final = OrderStatus.EXPIRED
_X_NEW: Final = ExecType.NEW
_X_TRADE: Final = ExecType.TRADE
_X_CANCELED: Final = ExecType.CANCELED
_X_EXPIRED: Final = ExecType.EXPIRED
_X_REPLACED: Final = ExecType.REPLACED
_X_STP: Final = ExecType.SELF_TRADE_PREVENTED
_MAKER: Final = Liquidity.MAKER
_TAKER: Final = Liquidity.TAKER
_STP_NONE: Final = STPMode.NONE
_STP_RESTING: Final = STPMode.CANCEL_RESTING
_STP_INCOMING: Final = STPMode.CANCEL_INCOMING
_STP_MODES: Final = frozenset(STPMode)


class MarketState:
    """A market's definition plus its live state (book, band reference) and cached factors."""

    __slots__ = (
        "spec", "symbol", "book", "base", "quote", "qptl", "bpl", "maker_bps", "taker_bps",
        "max_bps", "band", "reference", "fee_bal", "min_qty",
    )

    def __init__(self, spec: Market, fee_bal: Balance) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.book = OrderBook(spec.symbol)
        self.base = spec.base.name
        self.quote = spec.quote.name
        self.qptl = spec.quote_per_tick_lot
        self.bpl = spec.base_per_lot
        # Declared int: the spec types these loosely (validated there), and an untyped value
        # would make every fee computation generic, ~12 % of the engine's time when compiled.
        self.maker_bps: int = spec.maker_fee_bps
        self.taker_bps: int = spec.taker_fee_bps
        self.max_bps: int = max(self.maker_bps, self.taker_bps)
        self.band = bool(spec.band_num)
        # Band reference: the last trade price, or the configured reference before any trade.
        self.reference: int | None = spec.reference_ticks
        self.fee_bal = fee_bal
        self.min_qty = spec.min_qty_lots

    def band_limits(self) -> tuple[int, int] | None:
        return self.spec.band_limits(self.reference) if self.band else None


def buy_reservation(notional: int, bps: int, fee_basis: int, fee_paid: int) -> int:
    """What a buy must hold for ``notional`` more at its limit: the notional plus the most fee
    it can still be charged at ``bps``. The fee is rounded up once on the order's whole
    notional (``fee_basis``: its fills' notional times their rates so far; ``fee_paid``: what
    they were charged), never per fill, so many small fills cost no more than one large one
    and the reservation always covers the fee."""
    return notional - (-(fee_basis + notional * bps) // BPS) - fee_paid


class Exchange:
    """The whole exchange state and its rules. ``handle`` is the only way to change it."""

    def __init__(
        self,
        config: MarketConfig | None = None,
        default_stp: STPMode = _STP_RESTING,
    ) -> None:
        self.config = config or default_config()
        self.default_stp = default_stp
        self.accounts = Accounts(list(self.config.assets))
        self.markets: dict[str, MarketState] = {
            symbol: MarketState(spec, self.accounts.balance(FEE_ACCOUNT, spec.quote.name))
            for symbol, spec in self.config.markets.items()
        }
        # Resting orders only: by id, and by account for "my open orders" queries.
        self.orders: dict[int, Order] = {}
        self.open_by_account: dict[str, AccountOrders] = {}
        self.next_order_id = 1
        self.next_trade_id = 1
        self.next_priority = 1
        self._handlers: dict[type, Callable[[Any], list[Event]]] = {
            PlaceOrder: self._place,
            CancelOrder: self._cancel,
            ModifyOrder: self._modify,
            Deposit: self._deposit,
            Withdraw: self._withdraw,
        }

    # ------------------------------------------------------------------ entry point

    def handle(self, command: Command) -> list[Event]:
        """Apply one command; return every event it caused, in order."""
        try:
            handler = self._handlers[command.__class__]
        except KeyError:
            raise TypeError(f"not an engine command: {command!r}") from None
        return handler(command)

    # ------------------------------------------------------------------ rejections

    @staticmethod
    def _reject_order(cmd: PlaceOrder, reason: RejectReason, message: str | None = None) -> list[Event]:
        tif = cmd.tif
        if tif is _GTC and cmd.order_type is _MARKET:
            tif = _IOC  # as an accepted market order reports it: it never rests
        report = ExecReport(
            ExecType.REJECTED, None, cmd.account, cmd.market, cmd.side, cmd.order_type, tif,
            cmd.client_order_id, cmd.price, cmd.qty if isinstance(cmd.qty, int) else 0, 0, 0, 0,
            OrderStatus.REJECTED, cmd.ts, reason=reason,
        )
        return [report]

    @staticmethod
    def _reject_command(cmd: Command, order_id: Any, reason: RejectReason, message: str | None = None) -> list[Event]:
        name = type(cmd).__name__
        return [CommandRejected(cmd.account, name, order_id, reason, message or REJECT_MESSAGES[reason], cmd.ts)]

    # ------------------------------------------------------------------ place

    def _place(self, cmd: PlaceOrder) -> list[Event]:
        ms = self.markets.get(cmd.market)
        if ms is None:
            return self._reject_order(cmd, RejectReason.UNKNOWN_MARKET)
        side, otype, tif, qty, price = cmd.side, cmd.order_type, cmd.tif, cmd.qty, cmd.price
        if side is not _BUY and side is not _SELL:
            return self._reject_order(cmd, RejectReason.INVALID_ORDER)
        quote_qty = cmd.quote_qty
        if quote_qty is None:
            if type(qty) is not int or qty <= 0 or qty > MAX_UNITS:
                return self._reject_order(cmd, RejectReason.INVALID_QUANTITY)
            if qty < ms.min_qty:
                return self._reject_order(cmd, RejectReason.BELOW_MIN_QUANTITY)
        elif otype is not _MARKET or qty is not None or tif is _FOK:
            # Sized by the quote: market orders only, and sized to what the book fills now,
            # so that FOK would change nothing.
            return self._reject_order(cmd, RejectReason.INVALID_ORDER)
        elif type(quote_qty) is not int or quote_qty <= 0 or quote_qty > MAX_UNITS:
            return self._reject_order(cmd, RejectReason.INVALID_QUANTITY)
        if tif is not _GTC and tif is not _IOC and tif is not _FOK:
            return self._reject_order(cmd, RejectReason.INVALID_ORDER)
        stp = cmd.stp or self.default_stp
        if stp.__class__ is not STPMode:  # a plain string would compare but not match by `is`
            if type(stp) is not str or stp not in _STP_MODES:
                return self._reject_order(cmd, RejectReason.INVALID_ORDER)
            stp = STPMode(stp)
        coid = cmd.client_order_id
        if type(cmd.post_only) is not bool or (coid is not None and type(coid) is not str):
            return self._reject_order(cmd, RejectReason.INVALID_ORDER)
        band = ms.band_limits() if ms.band else None
        if otype is _LIMIT:
            if type(price) is not int or price <= 0 or price > MAX_UNITS:
                return self._reject_order(cmd, RejectReason.INVALID_PRICE)
            if band is not None and not band[0] <= price <= band[1]:
                return self._reject_order(cmd, RejectReason.PRICE_OUT_OF_BAND)
            if cmd.post_only:
                if tif is not _GTC:
                    return self._reject_order(cmd, RejectReason.INVALID_ORDER)
                # Post-only: reject rather than take liquidity.
                if side is _BUY:
                    if ms.book.top_ask and ms.book.top_ask <= price:
                        return self._reject_order(cmd, RejectReason.WOULD_TAKE_LIQUIDITY)
                elif ms.book.top_bid and ms.book.top_bid >= price:
                    return self._reject_order(cmd, RejectReason.WOULD_TAKE_LIQUIDITY)
            lo, hi = (0, price) if side is _BUY else (price, NO_LIMIT)
        elif otype is _MARKET:
            if price is not None or cmd.post_only:
                return self._reject_order(cmd, RejectReason.INVALID_ORDER)
            if tif is _GTC:
                tif = _IOC  # a market order never rests
            # A market order never trades outside the band set at its arrival.
            lo, hi = band if band is not None else (0, NO_LIMIT)
            if quote_qty is not None:
                qty = self._quote_sized(ms, side, cmd.account, stp, lo, hi, quote_qty)
                if not qty:
                    reachable, _ = self._walk(ms, side, cmd.account, stp, lo, hi, 1)
                    return self._reject_order(cmd, RejectReason.BELOW_MIN_QUANTITY if reachable
                                              else RejectReason.NO_LIQUIDITY)
                if qty < ms.min_qty:
                    return self._reject_order(cmd, RejectReason.BELOW_MIN_QUANTITY)
        else:
            return self._reject_order(cmd, RejectReason.INVALID_ORDER)

        # Reservation: check without creating anything, so a reject changes nothing.
        account = cmd.account
        per_asset = self.accounts.balances.get(account)
        if side is _BUY:
            bal = per_asset.get(ms.quote) if per_asset else None
            if otype is _LIMIT:
                assert price is not None
                notional = price * qty * ms.qptl
                reserve = buy_reservation(notional, ms.max_bps, 0, 0)
            else:
                _, notional = self._walk(ms, side, account, stp, lo, hi, qty)
                reserve = notional - ((-notional * ms.taker_bps) // BPS)
        else:
            bal = per_asset.get(ms.base) if per_asset else None
            reserve = qty * ms.bpl
        if reserve and (bal is None or bal.available < reserve):
            return self._reject_order(cmd, RejectReason.INSUFFICIENT_FUNDS)

        # Accepted: from here on the command changes state.
        accounts = self.accounts
        if per_asset is None:
            per_asset = accounts.balances[account] = {}
        order = Order(
            self.next_order_id, account, ms.symbol, side, otype, tif, price or 0, qty, stp,
            cmd.post_only, cmd.client_order_id, cmd.ts,
            per_asset.get(ms.base) or accounts.balance(account, ms.base),
            per_asset.get(ms.quote) or accounts.balance(account, ms.quote),
        )
        self.next_order_id += 1
        lock = order.lock
        lock.available -= reserve
        lock.locked += reserve
        order.locked = reserve
        ts = cmd.ts
        events: list[Event] = [
            ExecReport(
                _X_NEW, order.id, account, ms.symbol, side, otype, tif,
                order.client_order_id, price, qty, 0, qty, 0, _NEW, ts,
            )
        ]
        if tif is _FOK:
            # FOK: all or nothing, dry-run first; on failure no trade and no book change.
            fillable, _ = self._walk(ms, side, account, stp, lo, hi, qty)
            if fillable < qty:
                self._finish(order, _X_EXPIRED, _EXPIRED, events, ts)
                return events
        # Sweep only if the best opposite price is acceptable (most resting limits are not).
        best = ms.book.top_ask if side is _BUY else ms.book.top_bid
        if best and lo <= best <= hi:
            self._match(order, ms, lo, hi, events, ts)
        if order.remaining:
            if order.status is _CANCELED:  # STP cancelled the incoming order
                return events
            if tif is _GTC:
                self._rest(order, ms, events, ts)
            else:
                self._finish(order, _X_EXPIRED, _EXPIRED, events, ts)
        elif order.locked:  # filled: a market buy may have reserved more than it spent
            self._release(order)
        return events

    def _walk(
        self, ms: MarketState, side: Side, account: str, stp: STPMode, lo: int, hi: int, qty: int,
        budget: int = -1,
    ) -> tuple[int, int]:
        """Dry-run a sweep: (quantity that would fill, its notional), touching nothing.

        Follows exactly the path ``_match`` will take: own orders are skipped where STP
        would cancel them (cancel_resting) and end the sweep where it would stop the
        incoming order (cancel_incoming, cancel_both). With a ``budget`` (price ticks x
        lots) the sweep also ends where its notional would pass it.
        """
        levels = ms.book.asks if side is _BUY else ms.book.bids
        if not levels:
            return 0, 0
        # The sorted dict's key iterators are C-level chains; its items view yields each pair
        # from a Python generator.
        prices = iter(levels) if side is _BUY else reversed(levels)
        need = qty
        notional_ticks = 0
        for price in prices:
            if price > hi or price < lo:
                break
            level: Level = levels[price]
            maker = level.head
            while maker is not None:
                if maker.account == account and stp is not _STP_NONE:
                    if stp is _STP_RESTING:
                        maker = maker.next
                        continue
                    return qty - need, notional_ticks * ms.qptl
                take = maker.remaining if maker.remaining < need else need
                if budget >= 0:
                    can = (budget - notional_ticks) // price
                    if can < take:
                        return qty - need + can, (notional_ticks + can * price) * ms.qptl
                need -= take
                notional_ticks += take * price
                if not need:
                    return qty, notional_ticks * ms.qptl
                maker = maker.next
        return qty - need, notional_ticks * ms.qptl

    def _quote_sized(
        self, ms: MarketState, side: Side, account: str, stp: STPMode, lo: int, hi: int, quote_qty: int,
    ) -> int:
        """The quantity a market order sized by ``quote_qty`` takes: the most that the book
        within [lo, hi] fills for at most that much quote, on a buy its taker fee included
        (the fee is rounded up once on the whole notional, so the bound is exact)."""
        if side is _BUY:
            # notional + ceil(notional * bps / BPS) <= quote_qty  <=>  notional * (BPS + bps) <= quote_qty * BPS
            most = quote_qty * BPS // (BPS + ms.taker_bps)
        else:
            most = quote_qty
        filled, _ = self._walk(ms, side, account, stp, lo, hi, MAX_UNITS, most // ms.qptl)
        return filled

    # ------------------------------------------------------------------ matching

    def _match(
        self, taker: Order, ms: MarketState, lo: int, hi: int, events: list[Event], ts: int,
    ) -> None:
        """Sweep the opposite side within [lo, hi] until ``taker`` is filled or stopped."""
        book = ms.book
        buy = taker.side is _BUY
        levels = book.asks if buy else book.bids
        if not levels:
            return
        stp = taker.stp
        account = taker.account
        market_buy = buy and taker.order_type is _MARKET
        qptl, bpl = ms.qptl, ms.bpl
        maker_bps, taker_bps = ms.maker_bps, ms.taker_bps
        fee_bal = ms.fee_bal
        symbol = ms.symbol
        orders = self.orders
        max_bps = ms.max_bps
        maker_side = _SELL if buy else _BUY
        stopped = False
        while taker.remaining:
            price = book.top_ask if buy else book.top_bid
            if not price or price > hi or price < lo:
                break
            level: Level = levels[price]
            start_total = level.total
            while True:
                maker = level.head
                if maker is None:
                    break
                if maker.account == account and stp is not _STP_NONE:
                    # Self-trade prevention.
                    if stp is not _STP_INCOMING:  # cancel_resting, cancel_both
                        level.unlink(maker)
                        level.total -= maker.remaining
                        self._unindex(maker)
                        self._finish(maker, _X_STP, _CANCELED, events, ts)
                    if stp is not _STP_RESTING:  # cancel_incoming, cancel_both
                        self._finish(taker, _X_STP, _CANCELED, events, ts)
                        stopped = True
                        break
                    continue
                qty = taker.remaining if taker.remaining < maker.remaining else maker.remaining
                if market_buy:
                    qty = self._affordable(taker, price, qty, qptl, taker_bps)
                    if not qty:
                        stopped = True
                        break
                notional = price * qty * qptl
                # Fees: cumulative basis per order, rounded up once on the cumulative figure.
                basis = taker.fee_basis + notional * taker_bps
                t_fee = -(-basis // BPS) - taker.fee_paid
                taker.fee_basis = basis
                taker.fee_paid += t_fee
                basis = maker.fee_basis + notional * maker_bps
                m_fee = -(-basis // BPS) - maker.fee_paid
                maker.fee_basis = basis
                maker.fee_paid += m_fee
                taker.filled += qty
                taker.remaining -= qty
                taker.cost += price * qty
                maker.filled += qty
                maker.remaining -= qty
                maker.cost += price * qty
                level.total -= qty
                base_units = qty * bpl
                if buy:
                    buyer, seller, b_fee, s_fee = taker, maker, t_fee, m_fee
                else:
                    buyer, seller, b_fee, s_fee = maker, taker, m_fee, t_fee
                # Settlement (written out: it runs for every fill). The buyer pays notional
                # and fee from its reservation and keeps exactly what its remainder can still
                # cost at its limit; the surplus (better price, smaller fee) is released.
                bal = buyer.quote_bal
                paid = notional + b_fee
                bal.sold += notional
                bal.fees += b_fee
                locked = buyer.locked - paid
                if buyer.order_type is _LIMIT:
                    rest = buyer.price * buyer.remaining * qptl
                    need = buy_reservation(rest, max_bps, buyer.fee_basis, buyer.fee_paid)
                    bal.available += locked - need
                    bal.locked -= paid + locked - need
                    locked = need
                else:
                    bal.locked -= paid
                buyer.locked = locked
                bal = buyer.base_bal
                bal.available += base_units
                bal.bought += base_units
                # The seller delivers its reserved base and receives the notional less its fee.
                bal = seller.base_bal
                bal.locked -= base_units
                bal.sold += base_units
                seller.locked -= base_units
                bal = seller.quote_bal
                bal.available += notional - s_fee
                bal.bought += notional
                bal.fees += s_fee
                fee_bal.available += t_fee + m_fee
                trade_id = self.next_trade_id
                self.next_trade_id = trade_id + 1
                taker.status = _FILLED if not taker.remaining else _PARTIAL
                if maker.remaining:
                    maker.status = _PARTIAL
                else:
                    maker.status = _FILLED
                    level.unlink(maker)
                    del orders[maker.id]
                    leave_account(maker)
                events.append(ExecReport(
                    _X_TRADE, taker.id, account, symbol, taker.side, taker.order_type, taker.tif,
                    taker.client_order_id, taker.price or None, taker.qty, taker.filled, taker.remaining,
                    taker.cost, taker.status, ts, trade_id, price, qty, _TAKER, t_fee,
                ))
                events.append(ExecReport(
                    _X_TRADE, maker.id, maker.account, symbol, maker.side, maker.order_type,
                    maker.tif, maker.client_order_id, maker.price, maker.qty, maker.filled,
                    maker.remaining, maker.cost, maker.status, ts, trade_id, price, qty, _MAKER,
                    m_fee,
                ))
                events.append(Trade(
                    symbol, trade_id, price, qty, taker.side, buyer.id, seller.id,
                    buyer.account, seller.account, m_fee, t_fee, ts,
                ))
                ms.reference = price
                if not taker.remaining:
                    break
            # One delta per level this sweep changed.
            if level.head is None:
                del levels[price]
                book.level_removed(not buy, price)
                book.seq += 1
                events.append(BookDelta(symbol, book.seq, maker_side, price, 0, ts))
            elif level.total != start_total:
                book.seq += 1
                events.append(BookDelta(symbol, book.seq, maker_side, price, level.total, ts))
            if stopped:
                break

    @staticmethod
    def _affordable(taker: Order, price: int, qty: int, qptl: int, bps: int) -> int:
        """Largest quantity up to ``qty`` a market buy can still pay for from its reservation."""
        def cost(q: int) -> int:
            return buy_reservation(price * q * qptl, bps, taker.fee_basis, taker.fee_paid)

        if cost(qty) <= taker.locked:
            return qty
        lo, hi = 0, qty  # cost(lo) affordable, cost(hi) not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if cost(mid) <= taker.locked:
                lo = mid
            else:
                hi = mid
        return lo

    # ------------------------------------------------------------------ order exits

    def _rest(self, order: Order, ms: MarketState, events: list[Event], ts: int) -> None:
        order.priority = self.next_priority
        self.next_priority += 1
        book = ms.book
        price = order.price
        levels = book.bids if order.side is _BUY else book.asks
        level = levels.get(price)
        if level is None:
            level = levels[price] = Level()
            book.level_added(order.side is _BUY, price)
        oid = order.id
        level.append(order)
        level.total += order.remaining
        self.orders[oid] = order
        by_account = self.open_by_account.get(order.account)
        if by_account is None:
            by_account = self.open_by_account[order.account] = AccountOrders()
        by_account.append(order)
        book.seq += 1
        events.append(BookDelta(ms.symbol, book.seq, order.side, price, level.total, ts))

    def _unindex(self, order: Order) -> None:
        del self.orders[order.id]
        leave_account(order)

    @staticmethod
    def _release(order: Order) -> None:
        lock = order.lock
        lock.locked -= order.locked
        lock.available += order.locked
        order.locked = 0

    def _finish(
        self, order: Order, exec_type: ExecType, status: OrderStatus, events: list[Event], ts: int,
    ) -> None:
        """End an order that is out of the book: release its reservation and report it."""
        self._release(order)
        order.status = status
        events.append(self._report(exec_type, order, ts))

    @staticmethod
    def _report(exec_type: ExecType, order: Order, ts: int) -> ExecReport:
        return ExecReport(
            exec_type, order.id, order.account, order.market, order.side, order.order_type,
            order.tif, order.client_order_id, order.price or None, order.qty, order.filled,
            order.remaining, order.cost, order.status, ts,
        )

    # ------------------------------------------------------------------ cancel

    def _own_open_order(self, account: str, order_id: Any) -> Order | None:
        """The account's open order, or None; another account's order looks exactly unknown."""
        order = self.orders.get(order_id) if type(order_id) is int else None
        if order is None or order.account != account:
            return None
        return order

    def _cancel(self, cmd: CancelOrder) -> list[Event]:
        # Written out inline: cancels are a quarter of a typical order flow.
        order = self.orders.get(cmd.order_id) if type(cmd.order_id) is int else None
        if order is None or order.account != cmd.account:
            return self._reject_command(cmd, cmd.order_id, RejectReason.UNKNOWN_ORDER)
        ms = self.markets[order.market]
        book = ms.book
        price = order.price
        levels = book.bids if order.side is _BUY else book.asks
        level = levels[price]
        oid = order.id
        level.unlink(order)
        if level.head is not None:
            level.total -= order.remaining
            total = level.total
        else:
            del levels[price]
            book.level_removed(order.side is _BUY, price)
            total = 0
        del self.orders[oid]
        leave_account(order)
        lock = order.lock
        lock.locked -= order.locked
        lock.available += order.locked
        order.locked = 0
        order.status = _CANCELED
        ts = cmd.ts
        book.seq += 1
        return [
            ExecReport(
                _X_CANCELED, oid, order.account, order.market, order.side, order.order_type,
                order.tif, order.client_order_id, price, order.qty, order.filled,
                order.remaining, order.cost, _CANCELED, ts,
            ),
            BookDelta(ms.symbol, book.seq, order.side, price, total, ts),
        ]

    # ------------------------------------------------------------------ modify

    def _modify(self, cmd: ModifyOrder) -> list[Event]:
        order = self._own_open_order(cmd.account, cmd.order_id)
        if order is None:
            return self._reject_command(cmd, cmd.order_id, RejectReason.UNKNOWN_ORDER)
        ms = self.markets[order.market]
        if cmd.price is None and cmd.qty is None:
            return self._reject_command(cmd, order.id, RejectReason.INVALID_ORDER)
        price = order.price if cmd.price is None else cmd.price
        qty = order.qty if cmd.qty is None else cmd.qty
        if type(qty) is not int or qty <= 0 or qty > MAX_UNITS:
            return self._reject_command(cmd, order.id, RejectReason.INVALID_QUANTITY)
        if qty <= order.filled:
            return self._reject_command(
                cmd, order.id, RejectReason.INVALID_QUANTITY,
                f"qty is the order's new total and must be more than the {ms.spec.format_qty(order.filled)} "
                "already filled",
            )
        if qty < ms.min_qty:
            return self._reject_command(cmd, order.id, RejectReason.BELOW_MIN_QUANTITY)
        if type(price) is not int or price <= 0 or price > MAX_UNITS:
            return self._reject_command(cmd, order.id, RejectReason.INVALID_PRICE)
        buy = order.side is _BUY
        if price != order.price or qty > order.qty:
            # The order arrives again (cancel/replace): the band applies as to a new order.
            band = ms.band_limits()
            if band is not None and not band[0] <= price <= band[1]:
                return self._reject_command(cmd, order.id, RejectReason.PRICE_OUT_OF_BAND)
            if order.post_only and price != order.price:
                best = ms.book.top_ask if buy else ms.book.top_bid
                if best and ((buy and best <= price) or (not buy and best >= price)):
                    return self._reject_command(cmd, order.id, RejectReason.WOULD_TAKE_LIQUIDITY)
        remaining = qty - order.filled
        if buy:
            need = buy_reservation(price * remaining * ms.qptl, ms.max_bps, order.fee_basis, order.fee_paid)
        else:
            need = remaining * ms.bpl
        extra = need - order.locked
        if extra > 0 and order.lock.available < extra:
            return self._reject_command(cmd, order.id, RejectReason.INSUFFICIENT_FUNDS)

        # Accepted. Reducing quantity at the same price keeps time priority; anything else
        # is a cancel/replace: the order leaves its level and arrives again.
        ts = cmd.ts
        keeps_priority = price == order.price and qty <= order.qty
        events: list[Event] = []
        book = ms.book
        if keeps_priority:
            level = book.side(order.side)[price]
            level.total += remaining - order.remaining
            total = level.total
        else:
            total = book.remove(order)
            self._unindex(order)
        old_price, old_remaining = order.price, order.remaining
        order.price, order.qty, order.remaining = price, qty, remaining
        lock = order.lock
        lock.available -= extra
        lock.locked += extra
        order.locked = need
        events.append(self._report(_X_REPLACED, order, ts))
        # A larger quantity at the same price goes to the back of the same level: the
        # resting delta below reports that level once, with its final total.
        if (not keeps_priority and price != old_price) or (keeps_priority and remaining != old_remaining):
            book.seq += 1
            events.append(BookDelta(ms.symbol, book.seq, order.side, old_price, total, ts))
        if keeps_priority:
            return events
        lo, hi = (0, price) if buy else (price, NO_LIMIT)
        self._match(order, ms, lo, hi, events, ts)
        if order.remaining and order.status is not _CANCELED:
            self._rest(order, ms, events, ts)
        return events

    # ------------------------------------------------------------------ funding

    def _deposit(self, cmd: Deposit) -> list[Event]:
        if cmd.asset not in self.accounts.deposits:
            return self._reject_command(cmd, None, RejectReason.UNKNOWN_ASSET)
        if type(cmd.amount) is not int or cmd.amount <= 0 or cmd.amount > MAX_UNITS:
            return self._reject_command(cmd, None, RejectReason.INVALID_AMOUNT)
        bal = self.accounts.deposit(cmd.account, cmd.asset, cmd.amount)
        return [BalanceChanged(cmd.account, cmd.asset, bal.available, bal.locked, cmd.ts)]

    def _withdraw(self, cmd: Withdraw) -> list[Event]:
        if cmd.asset not in self.accounts.deposits:
            return self._reject_command(cmd, None, RejectReason.UNKNOWN_ASSET)
        if type(cmd.amount) is not int or cmd.amount <= 0 or cmd.amount > MAX_UNITS:
            return self._reject_command(cmd, None, RejectReason.INVALID_AMOUNT)
        if not self.accounts.can_withdraw(cmd.account, cmd.asset, cmd.amount):
            return self._reject_command(cmd, None, RejectReason.INSUFFICIENT_FUNDS)
        bal = self.accounts.withdraw(cmd.account, cmd.asset, cmd.amount)
        return [BalanceChanged(cmd.account, cmd.asset, bal.available, bal.locked, cmd.ts)]

    # ------------------------------------------------------------------ queries

    def market(self, symbol: str) -> Market | None:
        ms = self.markets.get(symbol)
        return ms.spec if ms else None

    def balances(self, account: str) -> dict[str, Balance]:
        """Every asset's balance for ``account`` (zeros for assets it never held)."""
        return self.accounts.view(account)

    def open_orders(self, account: str, market: str | None = None) -> list[Order]:
        """The account's resting orders, oldest id first. Read-only views: do not mutate."""
        holder = self.open_by_account.get(account)
        orders = holder.orders() if holder is not None else []
        return sorted(
            (o for o in orders if market is None or o.market == market), key=lambda o: o.id
        )

    def order(self, account: str, order_id: int) -> Order | None:
        """One of the account's resting orders, or None (also for another account's order)."""
        return self._own_open_order(account, order_id)

    def order_by_client_id(self, account: str, client_order_id: str) -> Order | None:
        """The account's resting order with this client order id, or None."""
        holder = self.open_by_account.get(account)
        index = holder.by_client_id if holder is not None else None
        return index.get(client_order_id) if index is not None else None

    def queue_position(self, account: str, order_id: int) -> int | None:
        """Quantity (lots) resting ahead of the order at its price level, or None if not open."""
        order = self._own_open_order(account, order_id)
        if order is None:
            return None
        return self.markets[order.market].book.queue_ahead(order)

    def book_l2(self, market: str, depth: int = 20) -> tuple[int, list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(seq, bids, asks): levels best first as (price, total quantity, order count)."""
        book = self.markets[market].book
        bids, asks = book.level2(depth)
        return book.seq, bids, asks

    def asks_for(self, market: str, lots: int, depth: int = 50) -> list[tuple[int, int, int]]:
        """The ask levels a buy of ``lots`` would walk, best first (see ``OrderBook.asks_for``)."""
        return self.markets[market].book.asks_for(lots, depth)

    def book_l3(self, market: str, depth: int | None = None) -> tuple[int, list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """(seq, bids, asks): every order in priority order as (order id, price, remaining)."""
        book = self.markets[market].book
        bids, asks = book.level3(depth)
        return book.seq, bids, asks

    def band(self, market: str) -> tuple[int, int] | None:
        return self.markets[market].band_limits()

    def reference_price(self, market: str) -> int | None:
        """The last trade price, or the configured reference before the first trade: where a
        client that finds the book empty should start quoting (the band is around it)."""
        return self.markets[market].reference

    # ------------------------------------------------------------------ invariants

    def reservation_needed(self, order: Order) -> int:
        """What an open order must hold locked: a buy its remaining notional plus the most
        fee it can still be charged at its market's fees, a sell its remaining base."""
        ms = self.markets[order.market]
        if order.side is _BUY:
            return buy_reservation(order.price * order.remaining * ms.qptl, ms.max_bps, order.fee_basis,
                                   order.fee_paid)
        return order.remaining * ms.bpl

    def check_invariants(self) -> None:
        """Assert every invariant the engine promises; tests call it after every command."""
        locked: dict[tuple[str, str], int] = {}
        for ms in self.markets.values():
            ms.book.check_invariants(self.orders)
        count = sum(lvl.count for ms in self.markets.values()
                    for side in (ms.book.bids, ms.book.asks) for lvl in side.values())
        assert count == len(self.orders), "order index and books disagree"
        listed: set[int] = set()
        for account, holder in self.open_by_account.items():
            mine = holder.orders()
            assert holder.count == len(mine), f"{account}: open order count drifted"
            assert holder.tail is (mine[-1] if mine else None), f"{account}: broken order list"
            assert not mine or mine[0].acct_prev is None, f"{account}: broken order list head"
            assert all(b.acct_prev is a for a, b in zip(mine, mine[1:])), f"{account}: broken back links"
            for order in mine:
                assert order.account == account and order.acct_orders is holder
                assert self.orders.get(order.id) is order, f"order {order.id} listed but not resting"
                listed.add(order.id)
            index = holder.by_client_id or {}
            assert all(o.acct_orders is holder and o.client_order_id == c for c, o in index.items()), \
                f"{account}: the client order id index holds an order that left the book"
            with_ids = [o.client_order_id for o in mine if o.client_order_id is not None]
            assert set(with_ids) == set(index), f"{account}: the client order id index misses a resting order"
            shared = holder.shared or {}
            for coid, entry in shared.items():
                live = [o for o in entry.orders if o.acct_orders is holder]
                assert entry.live == len({o.id for o in live}) > 1, f"{account}: shared id {coid!r} miscounted"
                assert all(o.client_order_id == coid for o in live), f"{account}: shared id {coid!r}"
                assert index[coid] is live[-1], f"{account}: {coid!r} is not its latest holder's"
            assert sum(entry.live - 1 for entry in shared.values()) == len(with_ids) - len(index), \
                f"{account}: shared client order ids miscounted"
        assert len(listed) == len(self.orders), "an account's order list misses a resting order"
        for order in self.orders.values():
            ms = self.markets[order.market]
            asset = ms.quote if order.side is _BUY else ms.base
            need = self.reservation_needed(order)
            assert order.locked == need, f"order {order.id} reserves {order.locked}, needs {need}"
            assert order.filled + order.remaining == order.qty
            key = (order.account, asset)
            locked[key] = locked.get(key, 0) + order.locked
        self.accounts.check_invariants(locked)

