"""Simulated traders. Each is one funded account that trades only through a ``Gateway``.

Theory of operation
-------------------
An agent is a coroutine (``run``): fund the account by deposit, then repeat *read my
reports, decide, act, sleep* until the run stops, then cancel what it still has resting
(``shutdown``). It keeps its own books in a ``Wallet`` (``simulation/budget.py``), so it
never sends an order it cannot pay for; the exchange stays the judge, and a refusal
(``insufficient_funds`` after a market moved, a post-only that would take, a price out of
band) is counted, not crashed on. Randomness comes from the agent's own ``random.Random``
seeded from the run's seed and the agent's name, and time from the gateway, so an
embedded run is reproducible.

Prices are integer ticks and quantities integer lots inside; they are written as decimal
strings (``Market.format_price``/``format_qty``) only when an order is sent.

* ``RandomTrader``: limit and market orders of random side, size and price around the mid;
  cancels some of its resting orders.
* ``MarketMaker``: a post-only bid and ask around the mid (``spread_bps``, ``size_lots``),
  re-priced with ``modify`` when stale, one side dropped at the inventory limit.
* ``TwapExecutor``: a parent quantity in equal slices over a window, market or limit
  (IOC with a price cap) slices; a slice that fell short is caught up by the next.
* ``PassiveBuyer``: a post-only bid one tick below the best ask, never above its cap,
  re-priced when the spread moves, until its target is filled.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from exchange.markets import Market, MarketConfig
from exchange.types import ExecReport, ExecType, OrderStatus, RejectReason, Side
from simulation.budget import Tracked, Wallet, walk_cost
from simulation.gateway import Gateway, GatewayConnectionError, GatewayError, MarketTexts

_BUY: Final = Side.BUY
_SELL: Final = Side.SELL
_REJECTED: Final = ExecType.REJECTED
_INSUFFICIENT: Final = RejectReason.INSUFFICIENT_FUNDS
# The final statuses the report counts, with their names.
_FINAL_COUNTED: Final = {
    s: s.value for s in (OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.EXPIRED)
}


def below(getrandbits: Any, n: int) -> int:
    """``rng.randrange(n)`` for ``n > 0``: the very same draw, in one call instead of three.

    ``random.Random.randrange`` (and ``randint``) are Python wrappers that check their
    arguments and then draw exactly this way (``Random._randbelow_with_getrandbits``); the
    random trader makes several draws per order. ``tests/test_sim_agents.py`` checks that
    the sequences agree.
    """
    k = n.bit_length()
    r = getrandbits(k)
    while r >= n:
        r = getrandbits(k)
    return r


# --------------------------------------------------------------------------- shared run state


@dataclass(slots=True)
class MarketProfile:
    """Where a market starts and what sizes its traders use, in ticks and lots."""

    spec: Market
    mid: int
    qty_min: int
    qty_max: int

    @classmethod
    def build(cls, spec: Market, overrides: dict[str, Any] | None = None) -> MarketProfile:
        o = overrides or {}
        mid = o.get("mid") or spec.reference_price or "100.00"
        qty_min = spec.qty_lots(str(o["qty_min"])) if "qty_min" in o else spec.min_qty_lots
        qty_max = spec.qty_lots(str(o["qty_max"])) if "qty_max" in o else qty_min * 100
        if "qty_max" in o and qty_max < qty_min:
            raise ValueError(f"qty_max {o['qty_max']} is below qty_min {spec.format_qty(qty_min)}")
        return cls(spec, spec.price_ticks(str(mid)), qty_min, max(qty_min, qty_max))


class RunControl:
    """What all agents of a run share: the stop flag, the order budget and the counters."""

    __slots__ = ("stopping", "max_orders", "orders", "profiles", "texts")

    def __init__(self, profiles: dict[str, MarketProfile], max_orders: int | None = None) -> None:
        self.stopping = False
        self.max_orders = max_orders
        self.orders = 0
        self.profiles = profiles
        # decimal strings of prices and sizes, cached once for all the agents
        self.texts = {symbol: MarketTexts(p.spec) for symbol, p in profiles.items()}

    def take_order(self) -> bool:
        """Count one order about to be sent; False (and stop) once the run's count is used up."""
        if self.stopping:
            return False
        if self.max_orders is not None and self.orders >= self.max_orders:
            self.stopping = True
            return False
        self.orders += 1
        if self.max_orders is not None and self.orders >= self.max_orders:
            self.stopping = True
        return True


@dataclass
class AgentStats:
    """Counters for the report; one per agent."""

    orders: Counter[str] = field(default_factory=Counter)  # by type: limit, market, post_only, ioc
    outcomes: Counter[str] = field(default_factory=Counter)  # final statuses and reject reasons
    cancels: int = 0
    modifies: int = 0
    skipped_for_budget: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    rejects: int = 0
    pnl_samples: list[tuple[int, int]] = field(default_factory=list)  # (ns, quote units)


# --------------------------------------------------------------------------- the base


class Agent:
    """Funding, the report loop, budget-checked order entry and the final clean-up."""

    kind = "agent"

    def __init__(
        self, name: str, gateway: Gateway, control: RunControl, markets: list[str],
        seed: int = 0, funding: dict[str, str] | None = None, interval: float = 0.1,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.gw = gateway
        self.control = control
        self.config: MarketConfig = gateway.config
        self.markets = markets
        self.rng = random.Random(f"{seed}:{name}")
        self.funding = funding or {}
        self.interval = interval
        self.params = params or {}
        self.wallet = Wallet(self.config)
        self.texts = control.texts
        self.stats = AgentStats()
        self.funded = False
        self.done = False
        self.setup()

    def setup(self) -> None:
        """A kind's own state, from ``self.params``: one hook rather than an ``__init__``
        per kind repeating the whole signature (mypyc cannot forward ``*args`` to super)."""

    # -- life cycle -------------------------------------------------------------------

    async def fund(self) -> None:
        """Deposit this agent's budget, then take the exchange's balances as the start."""
        for asset, amount in self.funding.items():
            await self.gw.deposit(asset, amount)
        self.wallet.load(await self.gw.balances())
        self.funded = True

    async def run(self) -> None:
        if not self.funded:
            await self.fund()
        rng_random = self.rng.random
        interval = self.interval
        gw = self.gw
        control = self.control
        backoff = 0.0
        while not control.stopping and not self.done:
            started = gw.now_ns()
            self.sync()
            limited = False
            try:
                await self.step()
            except GatewayConnectionError:
                raise
            except GatewayError as exc:
                self.stats.errors[exc.code] += 1
                limited = exc.code == "rate_limited"
            if limited:  # the exchange's --rate-limit: slow down (outside the handler)
                backoff = min(1.0, backoff * 2 if backoff else 0.05)
                await gw.sleep(backoff)
            else:
                backoff = 0.0
            # The pause runs from the step's start: the time the step waited for the
            # exchange (an acknowledgement, a latency model) is part of it, so the agent
            # keeps its pace however slow the answers. A step that used up its pause
            # still yields (a zero sleep): a step need not have waited for anything (a
            # budget skip), and over TCP the wall clock moves anyway, so without it an
            # agent could hold the loop and nothing else (not even the deadline) would run.
            pause = interval * self.pace() * (0.5 + rng_random()) - (gw.now_ns() - started) * 1e-9
            await gw.sleep(pause if pause > 0 else 0.0)

    async def step(self) -> None:
        raise NotImplementedError

    def pace(self) -> float:
        """How much of ``interval`` the next pause takes (a kind may step faster)."""
        return 1.0

    def quiet_limit(self) -> float:
        """The longest this agent may go without an order while it still has work: a run
        bounded by an order count stops when every agent has been quiet longer."""
        return 20 * self.interval

    async def shutdown(self) -> int:
        """Cancel everything still resting (the run is over); returns how many orders could
        not be cancelled (the exchange stopped answering, or kept refusing for its rate limit).

        Once the last reports have arrived, every open order of the account goes, not only
        the agent's own: an order whose acknowledgement had not come when the run stopped (a
        latency model, a request on its way) is not among them, and would be left resting
        (``Gateway.final_cancel_all``; over TCP one ``cancel_all``).
        """
        gw = self.gw
        try:
            await gw.settled()
        except GatewayConnectionError:
            self.sync()
            return len(self.wallet.orders)
        except GatewayError:
            pass
        self.sync()
        left = await gw.final_cancel_all(list(self.wallet.orders))
        self.sync()
        return min(left, len(self.wallet.orders))  # reports that came meanwhile say more

    def sync(self) -> None:
        """Follow every report received since the last look."""
        wallet = self.wallet  # a direct call of the compiled method, not a bound-method object
        outcomes = self.stats.outcomes
        for ev in self.gw.poll_events():
            rep = wallet.apply(ev)
            if rep is not None:
                final = _FINAL_COUNTED.get(rep.status)
                if final is not None:
                    outcomes[final] += 1

    # -- order entry ------------------------------------------------------------------

    def _reserve(self, asset: str, commit: int) -> bool:
        """Set aside what an order may cost and count it against the run; False: not sent."""
        if not self.wallet.reserve(asset, commit):
            self.stats.skipped_for_budget += 1
            return False
        if not self.control.take_order():
            self.wallet.release(asset, commit)
            return False
        return True

    async def limit(
        self, market: str, side: Side, lots: int, price: int, *, tif: str | None = None,
        post_only: bool = False,
    ) -> ExecReport | None:
        """Send a limit order if the budget allows; returns the first report or None if not sent."""
        spec = self.config.markets[market]
        asset, commit = self.wallet.order_commit(spec, side, price, lots)
        if not self._reserve(asset, commit):
            return None
        kind = "post_only" if post_only else (tif or "limit")
        self.stats.orders[kind] += 1
        texts = self.texts[market]
        try:
            rep = await self.gw.place_units(market, side, lots, price, texts, tif=tif,
                                            post_only=post_only)
        except BaseException as exc:
            self.wallet.release(asset, commit)
            self._refused(exc)
            raise
        return self._accepted(rep, asset, commit)

    async def market_order(self, market: str, side: Side, lots: int) -> ExecReport | None:
        """A market order; a buy is sized against the current asks so its cost is known."""
        spec = self.config.markets[market]
        if side is _BUY:
            asks = await self.gw.asks_for(market, lots, 50)
            fillable, cost = walk_cost(spec, asks, lots)
            if not fillable:
                return None  # nothing to buy: not worth an order
            asset, commit = spec.quote.name, cost
        else:
            asset, commit = spec.base.name, lots * spec.base_per_lot
        if not self._reserve(asset, commit):
            return None
        self.stats.orders["market"] += 1
        try:
            rep = await self.gw.place_units(market, side, lots, None, self.texts[market])
        except BaseException as exc:
            self.wallet.release(asset, commit)
            self._refused(exc)
            raise
        return self._accepted(rep, asset, commit, market_order=True)

    def _refused(self, exc: BaseException) -> None:
        """An order the exchange answered with an error (its rate limit, say) rather than a
        report: it was sent and counted, so it gets an outcome too."""
        if isinstance(exc, GatewayError) and not isinstance(exc, GatewayConnectionError):
            self.stats.outcomes[f"error:{exc.code}"] += 1

    def _accepted(self, rep: ExecReport, asset: str, commit: int, market_order: bool = False) -> ExecReport:
        if rep.exec_type is _REJECTED:
            self.wallet.release(asset, commit)
            self.stats.rejects += 1
            self.stats.outcomes[f"rejected:{rep.reason.value if rep.reason else 'unknown'}"] += 1
            return rep
        t = self.wallet.track(rep, asset, commit, self.gw.now_ns())
        if market_order:
            t.price = None
        return rep

    async def cancel(self, order_id: int) -> bool:
        self.stats.cancels += 1
        try:
            await self.gw.cancel(order_id)
            return True
        except GatewayConnectionError:
            raise
        except GatewayError as exc:
            if exc.code != "unknown_order":  # not a race with a fill: worth counting
                self.stats.errors[f"cancel:{exc.code}"] += 1
            return False  # it traded or expired meanwhile; its reports will say so

    async def reprice(self, t: Tracked, price: int) -> bool:
        """Move a resting limit to ``price`` with ``modify`` if the budget allows it."""
        spec = self.config.markets[t.market]
        asset, new_commit = self.wallet.order_commit(spec, t.side, price, t.remaining)
        extra = new_commit - t.commit
        if extra > 0 and self.wallet.free(asset) < extra:
            self.stats.skipped_for_budget += 1
            return False
        self.stats.modifies += 1
        try:
            await self.gw.reprice_units(t.order_id, price, self.texts[t.market])
        except GatewayConnectionError:
            raise
        except GatewayError as exc:
            self.stats.errors[f"modify:{exc.code}"] += 1
            return False
        self.sync()  # the replaced report re-computes the commitment
        return True

    # -- market view ------------------------------------------------------------------

    async def mid(self, market: str) -> int:
        """The middle of the best bid and ask; one side plus/minus a tick, or the start mid."""
        mid = self.mid_now(market)
        return mid if mid is not None else self._mid(market, await self.gw.top(market))

    def mid_now(self, market: str) -> int | None:
        """``mid`` if the gateway knows the best prices without a round trip, else None."""
        best = self.gw.top_now(market)
        return None if best is None else self._mid(market, best)

    def _mid(self, market: str, best: tuple[int | None, int | None]) -> int:
        bid, ask = best
        if bid is not None and ask is not None:
            return (bid + ask) // 2
        if bid is not None:
            return bid + 1
        if ask is not None:
            return max(1, ask - 1)
        return self.last_price(market)

    def last_price(self, market: str) -> int:
        """Where this agent last traded in ``market``, else where the market started: for an
        empty book, after a run has moved the price (the band is around the last trade)."""
        leg = self.wallet.legs.get(market)
        return leg.last_price if leg is not None and leg.last_trade_id else self.control.profiles[market].mid

    # -- reporting --------------------------------------------------------------------

    def pnl(self, marks: dict[str, int]) -> dict[str, Any]:
        """P&L marked to ``marks`` (last price in ticks per market), in the quote asset, fees included.

        value(now) - value(start), each holding valued at the mark of a market where it is the
        base; quote assets at face value. Fees are already inside the holdings.
        """
        return pnl_of(self.wallet, self.config, marks)


def pnl_of(wallet: Wallet, config: MarketConfig, marks: dict[str, int]) -> dict[str, Any]:
    by_quote: dict[str, int] = {}
    initial = wallet.initial or {}
    valued: set[str] = set()
    for symbol, spec in config.markets.items():
        base, quote = spec.base.name, spec.quote.name
        by_quote.setdefault(quote, 0)
        if quote not in valued:
            valued.add(quote)
            by_quote[quote] += wallet.pots[quote].holdings - initial.get(quote, 0)
        mark = marks.get(symbol)
        if base in valued or mark is None:
            continue
        valued.add(base)
        delta_base = wallet.pots[base].holdings - initial.get(base, 0)
        # base minor units -> lots -> quote units at the mark (floor toward zero)
        quote_units = (delta_base * mark * spec.quote_per_tick_lot) // spec.base_per_lot if delta_base >= 0 else -((-delta_base * mark * spec.quote_per_tick_lot) // spec.base_per_lot)
        by_quote[quote] += quote_units
    return {
        quote: config.assets[quote].format(units) for quote, units in by_quote.items()
    } | {"fees": {a: config.assets[a].format(v) for a, v in wallet.fees.items() if v}}


# --------------------------------------------------------------------------- the agents


class RandomTrader(Agent):
    """Noise: random side, size and price around the mid; some market orders; some cancels.

    params: ``limit_ratio`` (0.85), ``cancel_ratio`` (0.25), ``max_offset_bps`` (50: limit
    prices up to this far either side of the mid, so about half of them cross),
    ``max_open`` (20 resting orders at most).
    """

    kind = "random"

    def setup(self) -> None:
        p = self.params
        self.cancel_ratio = p.get("cancel_ratio", 0.25)
        self.max_open = p.get("max_open", 20)
        self.limit_ratio = p.get("limit_ratio", 0.85)
        self.max_offset_bps = p.get("max_offset_bps", 50)
        self.steps = 0
        self.cancel_steps = 0

    def pace(self) -> float:
        """``interval`` is the time between orders, but some steps cancel instead: step
        faster by the share of steps that were not cancels so far (at least 1 in 20)."""
        return max(0.05, (self.steps - self.cancel_steps + 1) / (self.steps + 1))

    async def step(self) -> None:
        random, bits = self.rng.random, self.rng.getrandbits
        orders = self.wallet.orders
        self.steps += 1
        if orders and (random() < self.cancel_ratio or len(orders) >= self.max_open):
            self.cancel_steps += 1
            oids = list(orders)
            await self.cancel(oids[below(bits, len(oids))])
            return
        markets = self.markets
        market = markets[below(bits, len(markets))] if len(markets) > 1 else markets[0]
        profile = self.control.profiles[market]
        side = _BUY if random() < 0.5 else _SELL
        lots = profile.qty_min + below(bits, profile.qty_max - profile.qty_min + 1)  # randint
        if random() < self.limit_ratio:
            mid = self.mid_now(market)
            if mid is None:
                mid = await self.mid(market)
            span = max(1, mid * self.max_offset_bps // 10_000)
            price = max(1, mid - span + below(bits, 2 * span + 1))  # mid + randint(-span, span)
            await self.limit(market, side, lots, price)
        else:
            await self.market_order(market, side, lots)


class MarketMaker(Agent):
    """Two-sided post-only quotes around the mid, refreshed when stale, within inventory limits.

    params: ``spread_bps`` (20: bid and ask each half of it from the mid), ``size_lots`` (lots
    of each quote; default the market's ``qty_max``), ``requote_ticks`` (re-price when the wanted
    price moved this far; default 1/4 of the half-spread), ``max_age`` (seconds; re-price at
    least this often), ``max_inventory_lots`` (lots of base either way from the start).
    """

    kind = "mm"

    def setup(self) -> None:
        p = self.params
        # Read once: ``_quote`` runs for every market at every step.
        self.spread_bps: Any = p.get("spread_bps", 20)  # as given: checked where used, as before
        self.size_lots: Any = p.get("size_lots")
        self.requote_ticks: Any = p.get("requote_ticks")
        self.max_age_ns: Any = int(p.get("max_age", 2.0) * 1e9)
        self.max_inventory_lots: Any = p.get("max_inventory_lots")
        self.quotes: dict[tuple[str, Side], int] = {}  # (market, side) -> order id
        self.quote_times: dict[int, int] = {}
        self.refreshes = 0
        self.steps = 0
        self.two_sided_steps = 0

    async def step(self) -> None:
        self.steps += 1
        both = True
        for market in self.markets:
            both &= await self._quote(market)
        if both:
            self.two_sided_steps += 1

    async def _fair(self, market: str) -> int:
        """The mid of the best prices that are not our own quotes."""
        ours = {self.wallet.orders[o].price: self.wallet.orders[o].remaining
                for o in (self.quotes.get((market, _BUY)), self.quotes.get((market, _SELL)))
                if o in self.wallet.orders}
        top = self.gw.top_now(market)
        if top is not None and top[0] not in ours and top[1] not in ours:
            bid, ask = top  # neither best price is one of ours: no need for the levels
        else:
            book = await self.gw.book(market, 3)

            def best(levels: list[tuple[int, int, int]]) -> int | None:
                for price, qty, _ in levels:
                    if ours.get(price) != qty:
                        return price
                return None

            bid, ask = best(book.bids), best(book.asks)
        if bid is not None and ask is not None and bid < ask:
            return (bid + ask) // 2
        if bid is not None:
            return bid + 1
        if ask is not None:
            return max(1, ask - 1)
        # Nobody else quotes: hold where we are, or start at the profile's mid.
        current = [self.wallet.orders[o].price for o in (self.quotes.get((market, _BUY)), self.quotes.get((market, _SELL))) if o in self.wallet.orders]
        if len(current) == 2:
            return (current[0] + current[1]) // 2  # type: ignore[operator]
        return self.last_price(market)

    async def _quote(self, market: str) -> bool:
        profile = self.control.profiles[market]
        spec = profile.spec
        fair = await self._fair(market)
        half = max(1, fair * self.spread_bps // 20_000)
        size = self.size_lots or profile.qty_max
        requote = self.requote_ticks or max(1, half // 4)
        max_age_ns = self.max_age_ns
        max_inv = self.max_inventory_lots or size * 10
        inventory = (self.wallet.pots[spec.base.name].holdings - (self.wallet.initial or {}).get(spec.base.name, 0)) // spec.base_per_lot
        now = self.gw.now_ns()
        resting = 0
        for side, price, allowed in (
            (_BUY, fair - half, inventory < max_inv),
            (_SELL, fair + half, inventory > -max_inv),
        ):
            oid = self.quotes.get((market, side))
            t = self.wallet.orders.get(oid) if oid is not None else None
            if t is None:
                self.quotes.pop((market, side), None)
            if not allowed or self.control.stopping:
                if t is not None:
                    await self.cancel(t.order_id)
                    self.quotes.pop((market, side), None)
                continue
            if price <= 0:
                continue
            if t is not None:
                stale = abs(t.price - price) >= requote or now - self.quote_times.get(t.order_id, now) >= max_age_ns  # type: ignore[operator]
                if stale and t.price != price:
                    if await self.reprice(t, price):
                        self.refreshes += 1
                        self.quote_times[t.order_id] = now
                if t.order_id in self.wallet.orders:
                    resting += 1
                continue
            rep = await self.limit(market, side, size, price, post_only=True)
            if rep is not None and rep.exec_type is not _REJECTED:
                self.quotes[(market, side)] = rep.order_id  # type: ignore[assignment]
                self.quote_times[rep.order_id] = now  # type: ignore[index]
                self.sync()
                if rep.order_id in self.wallet.orders:
                    resting += 1
        return resting == 2


class TwapExecutor(Agent):
    """A parent order in equal slices over a window; market or capped-IOC limit slices.

    params: ``market`` (default the first), ``side`` (buy), ``qty_lots`` (parent), ``window``
    (seconds), ``slices``, ``slice_type`` (``market`` | ``limit``), ``limit_ticks`` (limit
    slices: how far through the best opposite price they may trade). A slice the book could
    not fill is caught up by the next; after the last, by retries until the window ends.
    """

    kind = "twap"

    def setup(self) -> None:
        p = self.params
        self.market = p.get("market") or self.markets[0]
        self.side = _SELL if p.get("side") == "sell" else _BUY
        self.target = int(p.get("qty_lots") or self.control.profiles[self.market].qty_max * 10)
        self.window = float(p.get("window", 10.0))
        self.slices = max(1, int(p.get("slices", 10)))
        self.started_ns: int | None = None
        self.finished_ns: int | None = None
        self.slices_sent = 0

    def quiet_limit(self) -> float:
        """It sends nothing between slices, whatever its step interval."""
        return max(20 * self.interval, 2 * self.window / self.slices)

    @property
    def filled(self) -> int:
        spec = self.config.markets[self.market]
        asset = spec.base.name
        if self.side is _BUY:
            return self.wallet.pots[asset].bought // spec.base_per_lot
        return self.wallet.pots[asset].sold // spec.base_per_lot

    async def run(self) -> None:
        if not self.funded:
            await self.fund()
        gw = self.gw
        self.started_ns = start = gw.now_ns()
        step_ns = int(self.window * 1e9) // self.slices
        for i in range(self.slices):
            if self.control.stopping:
                break
            wait_ns = start + i * step_ns - gw.now_ns()
            if wait_ns > 0:
                await gw.sleep(wait_ns / 1e9)
            await self._catch_up(self.target * (i + 1) // self.slices)
            if self.filled >= self.target:
                break
        # The last slice goes out a step before the window ends: if the book was too thin
        # for it, use that step to finish, a quarter step at a time.
        end = start + int(self.window * 1e9)
        retry_ns = max(1, step_ns // 4)
        while not self.control.stopping and self.filled < self.target and gw.now_ns() + retry_ns <= end:
            await gw.sleep(retry_ns / 1e9)
            await self._catch_up(self.target)
        self.sync()
        if self.filled >= self.target:  # else unfinished: stopped early, or the book was too thin
            self.finished_ns = gw.now_ns()
        self.done = True

    async def _catch_up(self, due_total: int) -> None:
        """Send what is due by now (``due_total`` lots in all, less what is filled)."""
        self.sync()
        due = due_total - self.filled
        if due > 0:
            self.slices_sent += 1
            try:
                await self._slice(due)
            except GatewayConnectionError:
                raise
            except GatewayError as exc:
                self.stats.errors[exc.code] += 1
        self.sync()

    async def _slice(self, lots: int) -> None:
        if self.params.get("slice_type", "market") == "limit":
            bid, ask = await self.gw.top(self.market)
            through = int(self.params.get("limit_ticks", 5))
            if self.side is _BUY:
                if ask is None:
                    return
                await self.limit(self.market, _BUY, lots, ask + through, tif="ioc")
            else:
                if bid is None:
                    return
                await self.limit(self.market, _SELL, lots, max(1, bid - through), tif="ioc")
        else:
            await self.market_order(self.market, self.side, lots)

    async def step(self) -> None:  # pragma: no cover - run() is overridden
        return None


class PassiveBuyer(Agent):
    """Post-only bids one tick under the best ask, capped, re-priced as the spread moves.

    params: ``market``, ``qty_lots`` (target), ``price_cap`` (decimal string; default the start
    mid). Never takes liquidity: every order is post-only, and a re-price that would cross is
    refused by the exchange (``would_take_liquidity``) leaving the bid where it was.
    """

    kind = "passive"

    def setup(self) -> None:
        p = self.params
        self.market = p.get("market") or self.markets[0]
        profile = self.control.profiles[self.market]
        self.target = int(p.get("qty_lots") or profile.qty_max * 5)
        cap = p.get("price_cap")
        self.cap = profile.spec.price_ticks(str(cap)) if cap else profile.mid
        self.bid: int | None = None
        self.reprices = 0
        self.queue_ahead: int | None = None

    @property
    def filled(self) -> int:
        spec = self.config.markets[self.market]
        return self.wallet.pots[spec.base.name].bought // spec.base_per_lot

    async def step(self) -> None:
        left = self.target - self.filled
        t = self.wallet.orders.get(self.bid) if self.bid is not None else None
        if left <= 0:
            if t is not None:
                await self.cancel(t.order_id)
            self.done = True
            return
        bid, ask = await self.gw.top(self.market)
        if ask is not None:
            want = min(self.cap, ask - 1)
        elif bid is not None:
            want = min(self.cap, bid if t is None or t.price != bid else bid)
        else:
            want = self.cap
        if want <= 0:
            return
        if t is None:
            rep = await self.limit(self.market, _BUY, left, want, post_only=True)
            if rep is not None and rep.exec_type is not _REJECTED:
                self.bid = rep.order_id
            return
        if t.price != want:
            if await self.reprice(t, want):
                self.reprices += 1
        elif t.order_id in self.wallet.orders:
            self.queue_ahead = await self.gw.queue_position(t.order_id)


AGENT_KINDS: dict[str, type[Agent]] = {
    "random": RandomTrader,
    "mm": MarketMaker,
    "twap": TwapExecutor,
    "passive": PassiveBuyer,
}
