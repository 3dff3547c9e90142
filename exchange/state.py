"""The engine's whole state as plain data, and back: ``export_state`` / ``import_state``.

Theory of operation
-------------------
A snapshot must let the exchange resume *as if no stop happened*: the same order ids, the
same time priority inside every level, the same reservations and fee progress of every
partly filled order, the same counters (so no id is ever handed out twice) and the same
per-market sequence numbers and band references (so market-data consumers and the price
band continue seamlessly). The engine keeps all of this in ordinary objects; this module
reads them into a dict of ints, strings and lists (JSON-ready) and builds a new
``Exchange`` from such a dict.

Sans-I/O like the engine: no files, no clock. ``storage/snapshot.py`` decides where the
bytes go. It may reach into the engine's internals (the book's levels,
``open_by_account``): restoring state is the one job that has to set what ``handle``
otherwise owns.

Order of things, and why it is exact:

* ``Exchange.orders`` and each account's list in ``open_by_account`` get an order every
  time it joins the back of a level, which is also when its ``priority`` is drawn, so their
  insertion order *is* ascending priority. Orders are exported per market in priority
  order; import inserts them (all markets merged) in that order again, which rebuilds the
  levels' FIFO queues and both indexes exactly.
* ``open_by_account`` keeps an (empty) entry for an account whose orders are all gone;
  the list of its keys is exported so a round trip is byte-identical.
* Balances are restored into the ``Balance`` objects the new engine already holds for the
  fee account (each market keeps a direct reference to its fee balance), and every order's
  ``lock`` / ``base_bal`` / ``quote_bal`` are pointed at the restored balances.

``import_state`` validates shape and types, then calls ``check_invariants()``; anything
wrong raises ``StateError`` with a message saying what, never a half-built engine.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from exchange.accounts import FEE_ACCOUNT, Balance
from exchange.book import AccountOrders, Level, Order
from exchange.engine import Exchange
from exchange.markets import MarketConfig
from exchange.types import Event, ExecReport, ExecType, OrderStatus, OrderType, Side, STPMode, TimeInForce

STATE_VERSION: Final = 1

ORDER_FIELDS: tuple[str, ...] = (
    "id", "account", "side", "order_type", "tif", "price", "qty", "filled", "remaining",
    "cost", "locked", "fee_basis", "fee_paid", "stp", "post_only", "client_order_id",
    "status", "ts", "priority",
)
BALANCE_FIELDS: tuple[str, ...] = (
    "available", "locked", "deposited", "withdrawn", "bought", "sold", "fees",
)
# What must match between the snapshot's markets and the running config for the stored
# integers (ticks, lots, minor units) to mean the same thing.
_UNIT_FIELDS: Final = ("base", "quote", "tick_size", "lot_size")



def _order_row(o: Order) -> tuple[Any, ...]:
    """An order as a row of ``ORDER_FIELDS``, in that order (spelled out rather than an
    ``attrgetter``: compiled, this reads the fields directly, several times faster)."""
    return (o.id, o.account, o.side, o.order_type, o.tif, o.price, o.qty, o.filled, o.remaining,
            o.cost, o.locked, o.fee_basis, o.fee_paid, o.stp, o.post_only, o.client_order_id,
            o.status, o.ts, o.priority)


def _balance_row(b: Balance) -> list[int]:
    """A balance as a row of ``BALANCE_FIELDS``, in that order."""
    return [b.available, b.locked, b.deposited, b.withdrawn, b.bought, b.sold, b.fees]


def _priority(o: Order) -> int:
    return o.priority

_INT_ORDER_FIELDS: Final = ("id", "price", "qty", "filled", "remaining", "cost", "locked", "fee_basis",
                     "fee_paid", "ts", "priority")


class StateError(ValueError):
    """Exported state that cannot be restored (wrong version, wrong shape, inconsistent)."""


def export_state(ex: Exchange) -> dict[str, Any]:
    """Everything needed to rebuild ``ex`` exactly, as JSON-ready plain data.

    It runs on the event loop (replies wait meanwhile), so it stays lean: one tuple per
    order, no per-order dicts; compiled with the core, about 0.1 s for 90,000 orders.
    """
    markets: dict[str, Any] = {}
    for symbol, ms in ex.markets.items():
        book = ms.book
        live: list[Order] = []
        for levels in (book.bids, book.asks):
            for level in levels.values():
                live.extend(level.orders())
        live.sort(key=_priority)
        rows = [_order_row(o) for o in live]
        markets[symbol] = {
            "spec": ms.spec.describe(),
            "seq": book.seq,
            "reference": ms.reference,
            "orders": rows,  # tuples: JSON arrays once encoded, and no copy of 100k rows
        }
    return {
        "version": STATE_VERSION,
        "default_stp": ex.default_stp.value,
        "assets": {name: asset.decimals for name, asset in ex.config.assets.items()},
        "counters": {
            "next_order_id": ex.next_order_id,
            "next_trade_id": ex.next_trade_id,
            "next_priority": ex.next_priority,
        },
        "deposits": dict(ex.accounts.deposits),
        "balance_fields": list(BALANCE_FIELDS),
        "balances": {
            account: {asset: _balance_row(bal) for asset, bal in per_asset.items()}
            for account, per_asset in ex.accounts.balances.items()
        },
        "order_fields": list(ORDER_FIELDS),
        "markets": markets,
        "open_accounts": list(ex.open_by_account),
    }


# Finished orders ``order_status`` still answers for, the most recent first to stay: the
# last FINISHED_PER_USER of each user (so one busy account cannot push out everyone else's),
# FINISHED_KEPT in all (35-50 MB in memory, about 13 MB in a snapshot).
FINISHED_KEPT: Final = 100_000
FINISHED_PER_USER: Final = 1_000
FINISHED_FIELDS: Final = (
    "order_id", "account", "market", "side", "order_type", "tif", "client_order_id", "price",
    "qty", "filled", "remaining", "cost", "status", "ts", "exec_type",
)
_FILLED: Final = OrderStatus.FILLED
_CANCELED: Final = OrderStatus.CANCELED
_EXPIRED: Final = OrderStatus.EXPIRED
_FINAL_STATUS: Final = {m.value: m for m in (OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.EXPIRED)}
_EXEC_OF: Final = {m.value: m for m in ExecType}
# Wire text to enum member, for the rows of the snapshot (resting orders and finished ones).
_SIDES: Final = {m.value: m for m in Side}
_TYPES: Final = {m.value: m for m in OrderType}
_TIFS: Final = {m.value: m for m in TimeInForce}


def is_finished(status: OrderStatus) -> bool:
    """Whether a report with this status is an order's last (what ``FinishedOrders`` keeps;
    a rejected order never got an order id)."""
    return status is _FILLED or status is _CANCELED or status is _EXPIRED


class FinishedOrders:
    """The last report of each recently finished order: what ``order_status`` answers once
    the order has left the book.

    The engine keeps no finished orders (it would grow without bound), so the gateway keeps
    this bounded table beside it. It is part of the snapshot and rebuilt by replaying the
    journal, like the engine, so an exchange restarted, even after ``kill -9``, still
    answers for orders that ended before: the server, recovery and the follower (which
    writes the snapshots) all feed it the same events in the same order, so they hold the
    same table.
    """

    def __init__(self, kept: int = FINISHED_KEPT, per_user: int = FINISHED_PER_USER) -> None:
        self.kept = kept
        self.per_user = per_user
        self.by_id: dict[int, ExecReport] = {}
        self._ids: deque[int] = deque()  # all users, oldest first (may hold forgotten ids)
        self._per_user: dict[str, deque[int]] = {}
        self._by_client_id: dict[tuple[str, str], ExecReport] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, order_id: int) -> ExecReport | None:
        return self.by_id.get(order_id)

    def by_client_id(self, account: str, client_order_id: str) -> ExecReport | None:
        """The latest finished order of ``account`` with this client order id."""
        return self._by_client_id.get((account, client_order_id))

    def observe(self, events: list[Event]) -> None:
        """Keep the final reports among one command's events."""
        for ev in events:
            if ev.__class__ is ExecReport and is_finished(ev.status):  # type: ignore[attr-defined]
                self.add(ev)  # type: ignore[arg-type]

    def add(self, ev: ExecReport) -> None:
        """Keep ``ev``, an order's final report, within the bounds."""
        oid = ev.order_id
        if oid is None:
            return
        self.by_id[oid] = ev
        self._ids.append(oid)
        mine = self._per_user.get(ev.account)
        if mine is None:
            mine = self._per_user[ev.account] = deque()
        mine.append(oid)
        coid = ev.client_order_id
        if coid is not None:
            self._by_client_id[(ev.account, coid)] = ev
        if len(mine) > self.per_user:
            self._forget(mine.popleft())
            if not mine:  # ``per_user`` 0: nothing kept
                del self._per_user[ev.account]
        everyone = self._ids
        while len(self.by_id) > self.kept and everyone:
            gone = everyone.popleft()
            old = self._forget(gone)
            if old is not None:
                # The oldest kept order of all is its user's oldest kept too: each user's
                # deque holds exactly its kept orders, and goes with the last of them (an
                # account that finished one order once must not hold memory for ever).
                theirs = self._per_user.get(old.account)
                if theirs:
                    if theirs[0] == gone:
                        theirs.popleft()
                    elif gone in theirs:  # never, short of an id finishing twice
                        theirs.remove(gone)
                    if not theirs:
                        del self._per_user[old.account]
        if len(everyone) > 2 * len(self.by_id) + 1024:  # ids a user's own limit forgot
            self._ids = deque(i for i in everyone if i in self.by_id)

    def _forget(self, oid: int) -> ExecReport | None:
        old = self.by_id.pop(oid, None)
        if old is not None and old.client_order_id is not None:
            key = (old.account, old.client_order_id)
            if self._by_client_id.get(key) is old:
                del self._by_client_id[key]
        return old

    def export(self) -> dict[str, Any]:
        """The table as JSON-ready rows of ``FINISHED_FIELDS``, oldest first (the enums are
        strings to every JSON encoder; tuples, as in ``export_state``, to copy nothing)."""
        return {
            "fields": list(FINISHED_FIELDS),
            "rows": [
                (ev.order_id, ev.account, ev.market, ev.side, ev.order_type, ev.tif,
                 ev.client_order_id, ev.price, ev.qty, ev.filled, ev.remaining, ev.cost,
                 ev.status, ev.ts, ev.exec_type)
                for ev in self.by_id.values()
            ],
        }

    def load(self, data: Any, markets: set[str] | None = None, engine: Exchange | None = None) -> int:
        """Add the rows of an ``export`` (after what it holds), all or none; raises
        ``StateError``. Only rows of ``markets`` (default: all) are added: a market removed
        or given other units since would misread their integers. With ``engine`` (the state
        they were saved with), an order still open there or with an id it has not handed
        out yet is refused. Returns how many rows were left out for the markets."""
        reports: list[ExecReport] = []
        seen: set[int] = set(self.by_id)
        dropped = 0
        try:
            if data["fields"] != list(FINISHED_FIELDS):
                raise StateError(f"finished orders: unknown fields {data['fields']!r}")
            rows = data["rows"]
            if type(rows) is not list:
                raise StateError("finished orders: 'rows' must be a list")
            for row in rows:
                (oid, account, market, side, otype, tif, coid, price, qty, filled, remaining,
                 cost, status, ts, exec_type) = row
                # One test per row (a restart loads up to 100,000 of them); details on failure.
                if not (type(oid) is int and type(qty) is int and type(filled) is int
                        and type(remaining) is int and type(cost) is int and type(ts) is int
                        and (price is None or type(price) is int)
                        and min(oid, qty, filled, remaining, cost, ts, price or 0) >= 0):
                    raise StateError(f"finished order {oid!r}: its order id, price, quantities, "
                                     "cost and ts must be integers >= 0")
                if type(account) is not str or type(market) is not str or (
                        coid is not None and type(coid) is not str):
                    raise StateError(f"finished order {oid}: account, market and client "
                                     "order id must be strings")
                if oid in seen:
                    raise StateError(f"finished order {oid} appears twice")
                if engine is not None and (oid >= engine.next_order_id or oid in engine.orders):
                    raise StateError(f"finished order {oid} is open, or not handed out yet, in "
                                     "the saved state")
                seen.add(oid)
                report = ExecReport(
                    _EXEC_OF[exec_type], oid, account, market, _SIDES[side], _TYPES[otype],
                    _TIFS[tif], coid, price, qty, filled, remaining, cost, _FINAL_STATUS[status], ts,
                )
                if markets is not None and market not in markets:
                    dropped += 1
                else:
                    reports.append(report)
        except StateError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"malformed finished orders ({type(exc).__name__}: {exc})") from None
        for report in reports:
            self.add(report)
        return dropped


def same_unit_markets(saved: Any, config: MarketConfig) -> set[str]:
    """The markets of ``config`` whose stored integers (ticks, lots, minor units) mean what
    they meant under ``saved``, a snapshot's market configuration (``config_fingerprint``)."""
    try:
        assets = saved["assets"]
        before = {m["symbol"]: m for m in saved["markets"]}
    except (KeyError, TypeError):
        return set()
    if not isinstance(assets, dict):
        return set()
    out: set[str] = set()
    for symbol, spec in config.markets.items():
        old = before.get(symbol)
        if not isinstance(old, dict):
            continue
        now = spec.describe()
        if all(old.get(key) == now[key] for key in _UNIT_FIELDS) and all(
                assets.get(name) == config.assets[name].decimals for name in (now["base"], now["quote"])):
            out.add(symbol)
    return out


def state_summary(data: dict[str, Any]) -> dict[str, int]:
    """Counts for log lines: orders, accounts, next ids."""
    markets = data.get("markets") or {}
    counters = data.get("counters") or {}
    return {
        "orders": sum(len(m.get("orders") or ()) for m in markets.values()),
        "accounts": len(data.get("balances") or {}),
        "next_order_id": counters.get("next_order_id", 0),
        "next_trade_id": counters.get("next_trade_id", 0),
    }


def import_state(config: MarketConfig, data: Any) -> Exchange:
    """Build an ``Exchange`` equal to the one ``data`` was exported from.

    ``config`` is the running market configuration; the state's assets and markets must
    mean the same units in it (same decimals, ticks and lots), or the stored integers would
    silently change value. Raises ``StateError`` on anything inconsistent.
    """
    try:
        return _import(config, data)
    except StateError:
        raise
    except AssertionError as exc:  # check_invariants
        raise StateError(f"the restored state breaks an invariant: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise StateError(f"malformed state ({type(exc).__name__}: {exc})") from None


def _check_int(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise StateError(f"{what} must be an integer >= {minimum}, not {value!r}")
    return value


def _import(config: MarketConfig, data: Any) -> Exchange:
    if not isinstance(data, dict):
        raise StateError("state must be a JSON object")
    version = data.get("version")
    if version != STATE_VERSION:
        raise StateError(f"unknown state format version {version!r} (this build reads {STATE_VERSION})")
    if list(data["order_fields"]) != list(ORDER_FIELDS) or list(data["balance_fields"]) != list(BALANCE_FIELDS):
        raise StateError("state field lists differ from this build's")

    # The units must mean the same thing in the running configuration.
    for name, decimals in data["assets"].items():
        asset_spec = config.assets.get(name)
        if asset_spec is None:
            raise StateError(f"asset {name} of the saved state is not in the market configuration")
        if asset_spec.decimals != decimals:
            raise StateError(
                f"asset {name} has {decimals} decimals in the saved state but {asset_spec.decimals} "
                "in the market configuration"
            )
    for symbol, saved in data["markets"].items():
        market = config.markets.get(symbol)
        if market is None:
            if saved["orders"]:
                raise StateError(f"market {symbol} has resting orders but is not configured")
            continue
        spec = market.describe()
        for key in _UNIT_FIELDS:
            if spec[key] != saved["spec"][key]:
                raise StateError(
                    f"market {symbol}: {key} is {saved['spec'][key]!r} in the saved state but "
                    f"{spec[key]!r} in the market configuration"
                )

    ex = Exchange(config, default_stp=STPMode(data["default_stp"]))
    accounts = ex.accounts

    # Balances, in the saved order, reusing the engine's own fee balances.
    old = accounts.balances
    restored: dict[str, dict[str, Balance]] = {}
    for account, per_asset in data["balances"].items():
        if type(account) is not str or not account:
            raise StateError(f"bad account name {account!r}")
        mine: dict[str, Balance] = {}
        for asset, row in per_asset.items():
            if asset not in config.assets:
                raise StateError(f"balance of {account} in unknown asset {asset}")
            if len(row) != len(BALANCE_FIELDS):
                raise StateError(f"balance of {account} {asset} has {len(row)} fields")
            bal = old.get(account, {}).get(asset) or Balance()
            for name, value in zip(BALANCE_FIELDS, row):
                setattr(bal, name, _check_int(value, f"{account} {asset} {name}"))
            mine[asset] = bal
        restored[account] = mine
    accounts.balances = restored
    for ms in ex.markets.values():
        ms.fee_bal = accounts.balance(FEE_ACCOUNT, ms.quote)
    for asset in accounts.deposits:
        accounts.deposits[asset] = int(data["deposits"].get(asset, 0))
    for asset, amount in data["deposits"].items():
        if asset not in accounts.deposits:
            raise StateError(f"deposits in unknown asset {asset}")
        _check_int(amount, f"net deposits of {asset}", minimum=-(1 << 200))

    counters = data["counters"]
    ex.next_order_id = _check_int(counters["next_order_id"], "next_order_id", 1)
    ex.next_trade_id = _check_int(counters["next_trade_id"], "next_trade_id", 1)
    ex.next_priority = _check_int(counters["next_priority"], "next_priority", 1)

    # Orders: build them all, then insert in global priority order.
    built: list[Order] = []
    for symbol, saved in data["markets"].items():
        state = ex.markets.get(symbol)
        if state is None:
            continue
        state.book.seq = _check_int(saved["seq"], f"{symbol} seq")
        reference = saved["reference"]
        state.reference = None if reference is None else _check_int(reference, f"{symbol} reference", 1)
        last_priority = 0
        for row in saved["orders"]:
            order = _order_from_row(ex, symbol, row)
            if order.priority <= last_priority:
                raise StateError(f"{symbol}: orders are not in priority order at order {order.id}")
            last_priority = order.priority
            built.append(order)
    built.sort(key=_priority)

    by_account = ex.open_by_account
    for account in data["open_accounts"]:
        by_account[account] = AccountOrders()
    seen_ids: set[int] = set()
    for order in built:
        if order.id in seen_ids:
            raise StateError(f"order id {order.id} appears twice")
        seen_ids.add(order.id)
        if order.id >= ex.next_order_id:
            raise StateError(f"order id {order.id} is not below next_order_id {ex.next_order_id}")
        if order.priority >= ex.next_priority:
            raise StateError(f"order {order.id} priority is not below next_priority")
        book = ex.markets[order.market].book
        buy = order.side is Side.BUY
        levels = book.bids if buy else book.asks
        level = levels.get(order.price)
        if level is None:
            level = levels[order.price] = Level()
            book.level_added(buy, order.price)
        level.append(order)
        level.total += order.remaining
        ex.orders[order.id] = order
        per = by_account.get(order.account)
        if per is None:
            per = by_account[order.account] = AccountOrders()
        per.append(order)

    _reserve_for_new_fees(config, data, ex)
    ex.check_invariants()
    return ex


_FEE_FIELDS: Final = ("maker_fee_bps", "taker_fee_bps")


def _reserve_for_new_fees(config: MarketConfig, data: dict[str, Any], ex: Exchange) -> None:
    """Fit resting buys' reservations to fees changed since the state was saved.

    A buy reserves the most fee it can still be charged, at its market's fees; an operator
    who changes them in the markets file changes what every resting buy must hold. Lower
    fees release the difference; higher ones lock it from the account's available balance
    (after every release, so that one market's lower fees pay for another's higher ones),
    and an account that cannot pay stops the start with a message saying what to do (the
    exchange must not let a fill charge more than was reserved).
    """
    changed: dict[str, str] = {}
    for symbol, saved in data["markets"].items():
        market = config.markets.get(symbol)
        if market is None or not saved["orders"]:
            continue
        spec = market.describe()
        before = [saved["spec"].get(key) for key in _FEE_FIELDS]
        if before != [spec[key] for key in _FEE_FIELDS]:
            changed[symbol] = (f"market {symbol}: the fees are maker {spec['maker_fee_bps']} / taker "
                               f"{spec['taker_fee_bps']} bps in the market configuration but "
                               f"{before[0]} / {before[1]} in the saved state")
    if not changed:
        return
    refits = [(order, ex.reservation_needed(order)) for order in ex.orders.values()
              if order.market in changed and order.side is Side.BUY]
    for releases in (True, False):
        for order, need in refits:
            more = need - order.locked
            if (more < 0) != releases:
                continue
            bal = order.lock
            if more > bal.available:
                quote = config.markets[order.market].quote
                raise StateError(
                    f"{changed[order.market]}, and {order.account}'s buy order {order.id} would need "
                    f"{quote.format(more)} {quote.name} more reserved than the account has available "
                    f"({quote.format(bal.available)}); start with the previous markets file and cancel "
                    "the order (or deposit), then change the fees"
                )
            bal.available -= more
            bal.locked += more
            order.locked = need


_I: Final = {name: i for i, name in enumerate(ORDER_FIELDS)}
_STPS: Final = {m.value: m for m in STPMode}
_STATUSES: Final = {m.value: m for m in (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED)}
_INT_POSITIONS: Final = tuple(_I[name] for name in _INT_ORDER_FIELDS)


def _order_from_row(ex: Exchange, symbol: str, row: list[Any]) -> Order:
    # Dict lookups rather than ``Side(value)``: a 100,000-order book restores in well under
    # a second instead of several (an Enum call costs ~0.8 us).
    if len(row) != len(ORDER_FIELDS):
        raise StateError(f"{symbol}: an order row has {len(row)} fields, expected {len(ORDER_FIELDS)}")
    (oid, account, side, otype, tif, price, qty, filled, remaining, cost, locked, fee_basis,
     fee_paid, stp, post_only, coid, status, ts, priority) = row
    for i in _INT_POSITIONS:
        value = row[i]
        if type(value) is not int or value < 0:
            raise StateError(f"{symbol} order {oid}: {ORDER_FIELDS[i]} must be an integer >= 0, "
                             f"not {value!r}")
    if type(account) is not str or account not in ex.accounts.balances:
        raise StateError(f"{symbol} order {oid}: account {account!r} has no balances")
    if coid is not None and type(coid) is not str:
        raise StateError(f"{symbol} order {oid}: bad client_order_id")
    if type(post_only) is not bool:
        raise StateError(f"{symbol} order {oid}: post_only must be a boolean")
    try:
        enums = _SIDES[side], _TYPES[otype], _TIFS[tif], _STPS[stp], _STATUSES[status]
    except (KeyError, TypeError):
        raise StateError(
            f"malformed state: {symbol} order {oid} has an unknown side, type, tif, stp or status"
        ) from None
    ms = ex.markets[symbol]
    per_asset = ex.accounts.balances[account]
    order = Order(
        oid, account, symbol, enums[0], enums[1], enums[2], price, qty, enums[3], post_only, coid,
        ts, per_asset.get(ms.base) or ex.accounts.balance(account, ms.base),
        per_asset.get(ms.quote) or ex.accounts.balance(account, ms.quote),
    )
    order.filled = filled
    order.remaining = remaining
    order.cost = cost
    order.locked = locked
    order.fee_basis = fee_basis
    order.fee_paid = fee_paid
    order.status = enums[4]
    order.priority = priority
    if remaining <= 0:
        raise StateError(f"{symbol} order {oid} has nothing remaining")
    return order
