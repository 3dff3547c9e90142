"""TCP mode (the default): each agent is one ``client.ExchangeClient`` session to a running exchange.

``TcpGateway`` speaks the wire protocol through the client library and converts what comes
back into the engine's vocabulary (``exchange.types`` events with integer units) once, at
this edge, so agents compute with the same integers as in embedded mode. Time is the wall
clock and ``sleep`` is ``asyncio.sleep``. The latency of every order's acknowledgement
(request written to first report read) is recorded for the report's p50/p99. ``top()``
reads a ``BookMirror`` shared by the run's gateways when there is one (see its docstring).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from sortedcontainers import SortedDict

from client.client import ExchangeClient, ExchangeConnectionError, ExchangeError, patiently
from exchange.markets import Market, MarketConfig, build_config
from exchange.types import (
    BookDelta,
    Event,
    ExecReport,
    ExecType,
    Liquidity,
    OrderStatus,
    OrderType,
    RejectReason,
    Side,
    TimeInForce,
    Trade,
)
from simulation.gateway import (
    FINAL_STATUSES,
    BookView,
    Gateway,
    GatewayConnectionError,
    GatewayError,
    Holding,
    OpenOrderView,
    PriceLike,
    holdings_from_wire,
    WireNumbers,
    lots_of,
)

DEFAULT_TIMEOUT = 10.0
RECONNECT_FIRST = 0.1  # seconds before the book mirror's first try to connect again
RECONNECT_MAX = 2.0  # and the longest pause between tries
RESYNC_PAUSE = 0.2  # seconds before asking again for a snapshot the exchange refused
_REASONS = {r.value: r for r in RejectReason}
# Wire text to enum member by dictionary: calling an Enum class costs about 1 us each, five
# or six per report.
_STATUSES = {m.value: m for m in OrderStatus}
_EXEC_TYPES = {m.value: m for m in ExecType}
_ORDER_TYPES = {m.value: m for m in OrderType}
_TIFS = {m.value: m for m in TimeInForce}
_SIDES = {m.value: m for m in Side}
_LIQUIDITY = {m.value: m for m in Liquidity}


def _member(table: dict[str, Any], value: Any) -> Any:
    return table.get(value, value) if value.__class__ is str else value


def _text(value: Any) -> Any:
    if value.__class__ is Decimal:
        return format(value, "f")
    return value


async def fetch_config(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> MarketConfig:
    """The exchange's markets, as a ``MarketConfig`` built from its ``markets`` reply.

    Raises ``GatewayConnectionError`` with a friendly message when nothing listens there.
    """
    client = ExchangeClient(host, port, timeout=timeout)
    try:
        await client.connect()
    except ExchangeConnectionError as exc:
        raise GatewayConnectionError(exc.message) from None
    try:
        markets = (await _patiently(client, "markets"))["markets"]
    except ExchangeError as exc:
        raise GatewayConnectionError(f"the exchange at {host}:{port} did not answer: {exc}") from None
    finally:
        await client.close()
    # The ``markets`` reply does not carry asset decimals. The built-in assets' are known;
    # another asset gets the finest unit its markets' grids need, which parses every amount
    # the exchange writes exactly (pass the same --markets file to be exact everywhere).
    defaults = {"USD": 6, "BTC": 8, "ACME": 0}
    assets: dict[str, int] = {}
    for m in markets:
        lot_dec = _decimals(m["lot_size"])
        need = {m["base"]: lot_dec, m["quote"]: _decimals(m["tick_size"]) + lot_dec}
        for name, dec in need.items():
            assets[name] = max(assets.get(name, 0), defaults.get(name, dec), dec)
    return build_config({"assets": assets, "markets": markets})


async def market_prices(
    host: str, port: int, config: MarketConfig, timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, int]:
    """Where each market trades now, in ticks: the middle of a two-sided book, else the last
    trade price (the band's reference), else its one best price. Markets with none of these
    are left out. A run against an exchange that has traded before starts from here, not
    from a configured mid the market may have left (outside the band, every order is refused).
    """
    client = ExchangeClient(host, port, timeout=timeout)
    try:
        await client.connect()
        out = {}
        for market, spec in config.markets.items():
            view = book_view(spec, await _patiently(client, "book", market=market, depth=1))
            bid, ask = view.best_bid, view.best_ask
            if bid is not None and ask is not None:
                out[market] = (bid + ask) // 2
            elif view.reference is not None:
                out[market] = view.reference
            elif bid is not None or ask is not None:
                out[market] = bid if bid is not None else ask  # type: ignore[assignment]
        return out
    except ExchangeConnectionError as exc:
        raise GatewayConnectionError(exc.message) from None
    except ExchangeError as exc:
        raise GatewayError(exc.code, exc.message) from None
    finally:
        await client.close()


def book_view(spec: Market, reply: dict[str, Any]) -> BookView:
    """A level-2 ``book`` reply in ticks and lots."""
    ref = reply.get("reference_price")
    return BookView(
        spec.symbol, reply["seq"],
        [(spec.price_ticks(p), lots_of(spec, q), n) for p, q, n in reply["bids"]],
        [(spec.price_ticks(p), lots_of(spec, q), n) for p, q, n in reply["asks"]],
        None if ref is None else spec.price_ticks(ref),
    )


def market_differences(local: MarketConfig, remote: MarketConfig) -> list[str]:
    """How the markets a run was given (a ``--markets`` file, or the built-in ones) differ
    from the exchange's: prices and sizes on another grid cannot be read or sent."""
    out = []
    for symbol, mine in local.markets.items():
        theirs = remote.markets.get(symbol)
        if theirs is None:
            out.append(f"{symbol}: the exchange has no such market")
            continue
        if (mine.base.name, mine.quote.name) != (theirs.base.name, theirs.quote.name):
            out.append(f"{symbol}: {mine.base.name}/{mine.quote.name} here, "
                       f"{theirs.base.name}/{theirs.quote.name} on the exchange")
        for attr in ("tick_size", "lot_size", "min_qty"):
            here, there = getattr(mine, attr), getattr(theirs, attr)
            if Decimal(here) != Decimal(there):
                out.append(f"{symbol} {attr}: {here} here, {there} on the exchange")
    return out


# Requests that change nothing or only fund (queries, subscriptions, deposits): when the
# exchange's --rate-limit refuses one, it is sent again after a pause rather than failing the
# run's start or its end. Orders, cancels and modifies are not: their refusal is the agent's
# to handle (it counts it and backs off).
_PATIENT_OPS = frozenset({"markets", "book", "subscribe", "balances", "orders", "deposit", "queue_position"})


async def _patiently(client: ExchangeClient, op: str, **fields: Any) -> dict[str, Any]:
    """``client.request``, sent again while the exchange's rate limit refuses it."""
    return await patiently(lambda: client.request(op, **fields))


def _decimals(text: str) -> int:
    _, _, frac = text.partition(".")
    return len(frac.rstrip("0"))


class BookMirror:
    """Every market's book, kept from one shared ``book`` subscription, for ``top()``.

    An agent asks for the best prices before nearly every order; asking the exchange each
    time doubled the round trips of a simulation step. One extra connection subscribes to
    every market's book (a full snapshot, then deltas that cover every level) and all the
    run's gateways read the best prices from it. The view is as fresh as the last delta
    received, which is what a trader with a market-data feed sees: a delta caused by an
    agent's own order may arrive just after that order's acknowledgement. A gap in the
    sequence numbers resubscribes (a fresh snapshot); until the snapshot arrives ``top``
    returns None and the gateway asks the exchange. So it does while the connection is
    lost (the exchange drops a consumer that falls too far behind, and a busy run can be
    one): the mirror connects again, with a growing pause between tries, and follows from
    fresh snapshots. A delta it cannot read (a markets file on another grid), or a
    subscription refused for anything but the rate limit, ends it for good.
    """

    def __init__(self, client: ExchangeClient, config: MarketConfig) -> None:
        self.client = client
        self.config = config
        self.bids: dict[str, SortedDict] = {}
        self.asks: dict[str, SortedDict] = {}
        self.seq: dict[str, int] = {}  # markets whose book is known, with its last sequence
        self.resyncs = 0
        self.reconnects = 0
        self._numbers = {m: WireNumbers(spec) for m, spec in config.markets.items()}
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    async def start(
        cls, host: str, port: int, config: MarketConfig, timeout: float = DEFAULT_TIMEOUT,
    ) -> BookMirror:
        client = ExchangeClient(host, port, timeout=timeout)
        mirror = cls(client, config)
        try:
            await mirror._subscribe()
        except BaseException as exc:
            await client.close()
            if isinstance(exc, ExchangeConnectionError):
                raise GatewayConnectionError(exc.message) from None
            if isinstance(exc, ExchangeError):
                raise GatewayError(exc.code, exc.message) from None
            raise
        mirror._task = asyncio.get_running_loop().create_task(mirror._follow(), name="book-mirror")
        return mirror

    async def _subscribe(self) -> None:
        """Connect (again) and subscribe to every market's book."""
        await self.client.connect()
        for market in self.config.markets:
            await _patiently(self.client, "subscribe", channel="book", market=market)

    async def close(self) -> None:
        """Stop following and close the connection, whatever became of the feed."""
        self._closing = True
        try:
            if self._task is not None:
                self._task.cancel()
                try:
                    await self._task
                except (asyncio.CancelledError, Exception):  # a feed that failed has said so
                    pass
                self._task = None
        finally:
            self.seq.clear()
            await self.client.close()

    def top(self, market: str) -> tuple[int | None, int | None] | None:
        """Best bid and ask in ticks, or None if this market's book is not known right now."""
        if market not in self.seq:
            return None
        bids, asks = self.bids[market], self.asks[market]
        return (bids.peekitem(-1)[0] if bids else None, asks.peekitem(0)[0] if asks else None)

    def asks_for(self, market: str, lots: int, depth: int) -> list[tuple[int, int, int]] | None:
        """The ask levels a buy of ``lots`` would walk (at most ``depth``), best first, as
        ``Gateway.asks_for`` gives them; None if this market's book is not known right now.
        Level counts are not in the deltas: each level says 1."""
        if market not in self.seq:
            return None
        lots_of_text = self._numbers[market].lots
        out = []
        left = lots
        for price, qty in self.asks[market].items():
            size = lots_of_text(qty)
            out.append((price, size, 1))
            left -= size
            if left <= 0 or len(out) >= depth:
                break
        return out

    async def _follow(self) -> None:
        pause = RECONNECT_FIRST
        while True:
            try:
                async for msg in self.client.events():
                    self.apply(msg)
            finally:
                self.seq.clear()  # the feed is gone: gateways ask the exchange again
            while not self._closing:
                await asyncio.sleep(pause)
                pause = min(RECONNECT_MAX, pause * 2)
                try:
                    await self._subscribe()
                except ExchangeConnectionError:
                    continue
                except ExchangeError:
                    return  # the exchange refuses it (a market it no longer has): asked instead
                self.reconnects += 1
                pause = RECONNECT_FIRST
                break
            if self._closing:
                return

    def apply(self, msg: dict[str, Any]) -> None:
        """Take one pushed message: a ``book`` snapshot or a ``book_update`` delta."""
        kind = msg.get("type")
        market = msg.get("market")
        spec = self.config.markets.get(market) if isinstance(market, str) else None
        if spec is None:
            return
        if kind == "book":
            price_ticks = self._numbers[spec.symbol].price
            self.bids[spec.symbol] = SortedDict((price_ticks(p), q) for p, q, _ in msg["bids"])
            self.asks[spec.symbol] = SortedDict((price_ticks(p), q) for p, q, _ in msg["asks"])
            self.seq[spec.symbol] = msg["seq"]
        elif kind == "book_update":
            last = self.seq.get(spec.symbol)
            if last is None:
                return  # waiting for the snapshot a resync asked for
            if msg["seq"] != last + 1:
                self._resync(spec.symbol)
                return
            self.seq[spec.symbol] = last + 1
            levels = self.bids[spec.symbol] if msg["side"] == "buy" else self.asks[spec.symbol]
            price = self._numbers[spec.symbol].price(msg["price"])
            qty = msg["qty"]
            if qty == "0":
                levels.pop(price, None)
            else:
                levels[price] = qty

    def _resync(self, market: str) -> None:
        self.seq.pop(market, None)
        self.resyncs += 1
        self._ask_snapshot(market)

    def _ask_snapshot(self, market: str) -> None:
        try:
            reply = self.client.send("subscribe", channel="book", market=market)  # a fresh snapshot
        except ExchangeConnectionError:
            return  # the feed is lost: following again subscribes to everything
        reply.add_done_callback(lambda fut: self._snapshot_asked(fut, market))

    def _snapshot_asked(self, fut: asyncio.Future[Any], market: str) -> None:
        """A resync the exchange refused (its rate limit, say) is asked again a little later:
        until a snapshot arrives the agents ask the exchange for every order's prices."""
        if fut.cancelled() or fut.exception() is not None:
            return  # the feed is lost: following again subscribes to everything
        reply = fut.result()
        if reply.get("type") == "error" and reply.get("code") == "rate_limited" and not self._closing:
            asyncio.get_running_loop().call_later(RESYNC_PAUSE, self._retry_snapshot, market)

    def _retry_snapshot(self, market: str) -> None:
        if market not in self.seq and not self._closing and self.client.connected:
            self._ask_snapshot(market)


class Credentials:
    """Tokens for an exchange run with ``--auth keys``, read from ``--credentials FILE``.

    Such an exchange admits only the users of its accounts file, each with its token, and
    takes deposits only from an admin session. So the agents log in with the tokens given
    here, and are funded through the admin session when the file names one; without one
    they trade what their accounts already hold. Against an exchange in ``--auth open``
    mode the tokens are not needed and are ignored, but an ``admin`` is refused: such an
    exchange has no admins (leave it out there; the agents fund themselves).

    The file::

        {"admin": {"user": "ops", "token": "..."},      (optional)
         "token": "...",                                 (any account not listed below)
         "users": {"random01": "...", "mm01": "..."}}    (optional)
    """

    def __init__(self, users: dict[str, str], token: str | None = None,
                 admin: tuple[str, str] | None = None) -> None:
        self.users = users
        self.token = token
        self.admin = admin

    def token_for(self, account: str) -> str | None:
        return self.users.get(account, self.token)

    @classmethod
    def from_dict(cls, data: Any) -> Credentials:
        """Raises ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("it must hold a JSON object")
        unknown = set(data) - {"admin", "token", "users"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} (known: admin, token, users)")
        token = data.get("token")
        if token is not None and not isinstance(token, str):
            raise ValueError("'token' must be a string")
        users = data.get("users", {})
        if not isinstance(users, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in users.items()
        ):
            raise ValueError("'users' maps account names to their tokens, e.g. {\"random01\": \"secret\"}")
        admin = data.get("admin")
        pair = None
        if admin is not None:
            if not (isinstance(admin, dict) and set(admin) == {"user", "token"}
                    and isinstance(admin["user"], str) and isinstance(admin["token"], str)):
                raise ValueError("'admin' must be {\"user\": NAME, \"token\": TOKEN}")
            pair = (admin["user"], admin["token"])
        if token is None and not users:
            raise ValueError("give the agents' tokens: 'token' (one for every account), 'users', or both")
        return cls(dict(users), token, pair)


class TcpGateway(Gateway):
    """One logged-in session of one account (see the module docstring)."""

    def __init__(
        self, client: ExchangeClient, account: str, config: MarketConfig,
        mirror: BookMirror | None = None,
    ) -> None:
        self.client = client
        self.account = account
        self.config = config
        self.mirror = mirror
        # The admin session deposits go through (keys mode), or None: the account funds itself.
        self.funder: TcpGateway | None = None
        self.admin = False  # this session's own rights, as its login answered
        self.one_at_a_time = asyncio.Lock()  # for the deposits it makes as a funder
        self.halt: asyncio.Event | None = None  # set when the run ends: long sleeps end early
        self.ack_latencies_ns: list[int] = []
        self._costs: dict[int, int] = {}  # order id -> cumulative price x lots (avg price basis)
        self._queue: deque[Event] = deque()
        self._numbers = {m: WireNumbers(spec) for m, spec in config.markets.items()}

    @classmethod
    async def connect(
        cls, host: str, port: int, account: str, config: MarketConfig,
        timeout: float = DEFAULT_TIMEOUT, mirror: BookMirror | None = None,
        token: str | None = None,
    ) -> TcpGateway:
        client = ExchangeClient(host, port, timeout=timeout)
        try:
            await client.connect()
            reply = await client.login(account, token)
        except BaseException as exc:  # a failed or interrupted login leaves no connection open
            await client.close()
            if isinstance(exc, ExchangeConnectionError):
                raise GatewayConnectionError(exc.message) from None
            if isinstance(exc, ExchangeError):
                raise GatewayError(exc.code, exc.message) from None
            raise
        gw = cls(client, account, config, mirror)
        gw.admin = reply.get("admin") is True
        return gw

    async def close(self) -> None:
        await self.client.close()

    # -- time -------------------------------------------------------------------------

    def now_ns(self) -> int:
        return time.time_ns()

    async def sleep(self, seconds: float) -> None:
        halt = self.halt
        if halt is None or seconds < 0.05:
            await asyncio.sleep(seconds)
            return
        # A TWAP waits for its next slice up to window / slices: the run's end must not.
        try:
            await asyncio.wait_for(halt.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    # -- requests ---------------------------------------------------------------------

    async def _request(self, op: str, *, patient: bool = False, **fields: Any) -> dict[str, Any]:
        """``patient`` (and every op of ``_PATIENT_OPS``): wait out the exchange's rate limit."""
        try:
            if patient or op in _PATIENT_OPS:
                return await _patiently(self.client, op, **fields)
            return await self.client.request(op, **fields)
        except ExchangeConnectionError as exc:
            raise GatewayConnectionError(exc.message) from None
        except ExchangeError as exc:
            raise GatewayError(exc.code, exc.message) from None

    async def place(
        self, market: str, side: str, qty: PriceLike, price: PriceLike | None = None, *,
        order_type: str | None = None, tif: str | None = None, post_only: bool = False,
        client_order_id: str | None = None,
    ) -> ExecReport:
        if order_type is None:
            order_type = "limit" if price is not None else "market"
        started = time.perf_counter_ns()
        reply = await self._request(
            "order", market=market, side=side, type=order_type, qty=_text(qty),
            price=None if price is None else _text(price), tif=tif,
            post_only=True if post_only else None, client_order_id=client_order_id,
        )
        self.ack_latencies_ns.append(time.perf_counter_ns() - started)
        return self._take_events(reply) or self._report(reply)

    async def cancel(self, order_id: int) -> ExecReport:
        reply = await self._request("cancel", order_id=order_id)
        return self._take_events(reply) or self._report(reply)

    async def final_cancel(self, order_id: int) -> ExecReport:
        reply = await self._request("cancel", patient=True, order_id=order_id)
        return self._take_events(reply) or self._report(reply)

    async def final_cancel_all(self, known: Iterable[int]) -> int:
        """One ``cancel_all`` instead of a query and a cancel per order: it also finds the
        orders the agent never saw acknowledged, and takes one request of the rate limit."""
        try:
            await self._request("cancel_all", patient=True)
        except GatewayConnectionError:
            return len(set(known))
        except GatewayError:  # still refused for the rate limit: what the agent knows of
            return len(set(known))
        self._take_events()
        return 0

    async def modify(
        self, order_id: int, price: PriceLike | None = None, qty: PriceLike | None = None,
    ) -> ExecReport:
        reply = await self._request(
            "modify", order_id=order_id, price=None if price is None else _text(price),
            qty=None if qty is None else _text(qty),
        )
        return self._take_events(reply) or self._report(reply)

    async def deposit(self, asset: str, amount: PriceLike) -> dict[str, Holding]:
        funder = self.funder
        if funder is not None:
            # One admin connection funds every agent: one deposit at a time, so that its
            # rate limit (per connection) is waited out in turn, not by all of them at once.
            async with funder.one_at_a_time:
                reply = await funder._request("deposit", asset=asset, amount=_text(amount), user=self.account)
        else:
            reply = await self._request("deposit", asset=asset, amount=_text(amount))
        return holdings_from_wire(self.config, reply["balances"])

    async def balances(self) -> dict[str, Holding]:
        reply = await self._request("balances")
        return holdings_from_wire(self.config, reply["balances"])

    async def open_orders(self, market: str | None = None) -> list[OpenOrderView]:
        reply = await self._request("orders", market=market)
        out = []
        for o in reply["orders"]:
            spec = self.config.markets[o["market"]]
            out.append(OpenOrderView(
                int(o["order_id"]), o["market"], o["side"],
                None if o.get("price") is None else spec.price_ticks(o["price"]),
                lots_of(spec, o["qty"]), lots_of(spec, o["filled_qty"]),
                lots_of(spec, o["remaining_qty"]), o.get("client_order_id"),
            ))
        return out

    async def book(self, market: str, depth: int = 20) -> BookView:
        return book_view(self.config.markets[market], await self._request("book", market=market, depth=depth))

    def top_now(self, market: str) -> tuple[int | None, int | None] | None:
        return self.mirror.top(market) if self.mirror is not None else None

    async def asks_for(self, market: str, lots: int, depth: int = 50) -> list[tuple[int, int, int]]:
        """From the shared book mirror when there is one and it knows the market: sizing a
        market buy then costs no round trip (and no 50-level reply to parse)."""
        if self.mirror is not None:
            asks = self.mirror.asks_for(market, lots, depth)
            if asks is not None:
                return asks
        return await super().asks_for(market, lots, depth)

    async def top(self, market: str) -> tuple[int | None, int | None]:
        """From the shared book mirror when there is one and it knows the market."""
        best = self.top_now(market)
        return best if best is not None else await super().top(market)

    async def queue_position(self, order_id: int) -> int | None:
        try:
            reply = await self._request("queue_position", order_id=order_id)
        except GatewayError as exc:
            if exc.code == "unknown_order":
                return None
            raise
        return lots_of(self.config.markets[reply["market"]], reply["ahead_qty"])

    async def subscribe(self, channel: str, market: str) -> None:
        await self._request("subscribe", channel=channel, market=market)

    # -- events -----------------------------------------------------------------------

    def _take_events(self, reply: dict[str, Any] | None = None) -> ExecReport | None:
        """Move what the client received into our queue, converted, in arrival order.

        An ``exec`` reply to a request is among them (the client delivers it both ways):
        its conversion is returned, so the caller does not convert it a second time.
        """
        answer = None
        for msg in self.client.pending_events():
            event = self._event(msg)
            if event is not None:
                self._queue.append(event)
                if msg is reply:
                    answer = event
        return answer  # type: ignore[return-value]

    def poll_events(self) -> list[Event]:
        self._take_events()
        out = list(self._queue)
        self._queue.clear()
        return out

    async def next_event(self, timeout: float) -> Event | None:
        self._take_events()
        deadline = time.monotonic() + timeout
        while not self._queue:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = await self.client.next_event(left)
            except asyncio.TimeoutError:
                return None
            if msg is None:
                raise GatewayConnectionError(self.client.closed_reason or "connection closed")
            event = self._event(msg)
            if event is not None:
                self._queue.append(event)
        return self._queue.popleft()

    def _event(self, msg: dict[str, Any]) -> Event | None:
        kind = msg.get("type")
        if kind == "exec":
            return self._report(msg)
        spec = self.config.markets.get(msg.get("market", ""))
        if spec is None:
            return None
        num = self._numbers[spec.symbol]
        if kind == "trade":
            return Trade(
                spec.symbol, msg["trade_id"], num.price(msg["price"]),
                num.lots(msg["qty"]), _SIDES[msg["taker_side"]], 0, 0, "", "", 0, 0, msg["ts"],
            )
        if kind == "book_update":
            return BookDelta(
                spec.symbol, msg["seq"], _SIDES[msg["side"]], num.price(msg["price"]),
                num.lots(msg["qty"]), msg["ts"],
            )
        return None

    def _report(self, msg: dict[str, Any]) -> ExecReport:
        """An ``exec`` message as the ``ExecReport`` the engine produced (integers again)."""
        market = msg.get("market")
        spec: Market | None = self.config.markets.get(market) if isinstance(market, str) else None
        status = _STATUSES[msg["status"]]
        exec_type = _EXEC_TYPES[msg["exec_type"]]
        # A rejection may echo what the client sent, not a member: kept as it came.
        order_type = _member(_ORDER_TYPES, msg.get("order_type"))
        tif = _member(_TIFS, msg.get("tif"))
        side = _member(_SIDES, msg.get("side"))
        reason = _REASONS.get(msg.get("reason", "")) if "reason" in msg else None
        oid = msg.get("order_id")
        if spec is None or exec_type is ExecType.REJECTED and oid is None and msg.get("price") is None and msg.get("qty") is None:
            return ExecReport(exec_type, oid, self.account, market, side, order_type, tif,
                              msg.get("client_order_id"), None, 0, 0, 0, 0, status, msg["ts"],
                              reason=reason)
        num = self._numbers[spec.symbol]
        try:
            price = None if msg.get("price") is None else num.price(msg["price"])
            qty = num.lots(msg["qty"])
        except Exception:  # an edge rejection echoes what the client sent, maybe off-grid
            price, qty = None, 0
        filled = num.lots(msg["filled_qty"])
        trade_id = msg.get("trade_id")
        last_price = last_qty = fee = None
        liquidity = None
        cost = 0
        if oid is not None:
            cost = self._costs.get(oid, 0)
        if trade_id is not None:
            last_price = num.price(msg["last_price"])
            last_qty = num.lots(msg["last_qty"])
            fee = num.amount(msg["fee"])
            liquidity = _LIQUIDITY[msg["liquidity"]]
            if oid is not None and msg.get("id") is None:
                cost = self._costs[oid] = cost + last_price * last_qty
        if oid is not None and status in FINAL_STATUSES:
            self._costs.pop(oid, None)
        return ExecReport(
            exec_type, oid, self.account, spec.symbol, side, order_type, tif,
            msg.get("client_order_id"), price, qty, filled, num.lots(msg["remaining_qty"]),
            cost, status, msg["ts"], trade_id, last_price, last_qty, liquidity, fee, reason,
        )
