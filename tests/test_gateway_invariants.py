"""Seeded random end to end run over real sockets, checked only from what the clients receive.

Five users (two with a second session, one session also subscribed to market data, one
guest session that logs in mid-run, logs in again and leaves), a market-data watcher from
the start and one that joins (and re-/unsubscribes) mid-run pipeline random batches of
orders (limit/market, gtc/ioc/fok, post_only, every stp mode, client order ids from a small
pool so they collide, JSON numbers now and then, off-grid and out-of-band values), cancels
(by id, by client order id, another user's id, a made-up id), ``cancel_all`` (with and
without a market), modifies (price and quantity, up and down, invalid ones), deposits and
withdrawals, and the queries (``balances``, ``orders``, ``order_status``,
``queue_position``, ``book`` levels 2 and 3, ``trades``). Then the exchange is stopped and
started again on the same data directory, and a second, shorter run goes on from there.

Every message each connection receives is recorded in arrival order (the client's
dispatcher is wrapped). Afterwards each connection's log is replayed through a model built
*only* from the execution reports and funding replies, and every reply is checked against
the model at the exact point of the stream where it arrived (the server writes a
connection's messages in the order they happened, and handles one request at a time):

1. per order: the exec reports are identical on all sessions of the owner, start with
   ``new`` (or are a lone ``rejected``), fills are consistent (``filled + remaining = qty``,
   qty/price change only on ``replaced``, ``avg_price`` and each fee recomputed from the
   fills), at most one terminal report and nothing after it, FOK all or nothing;
2. every trade: one maker and one taker report (different owners unless the taker's stp is
   ``none``), one ``trade`` on the channel, one ledger line (order ids, owners, fees), equal
   price/qty/ts, trade ids strictly increasing;
3. the book rebuilt from snapshot + deltas (contiguous seq) equals every ``book`` reply on the
   same connection (and the book after the restart); every level-3 reply equals the book of
   all the reports replayed in ts order, in time priority; ``queue_position`` agrees;
4. ``orders``/``order_status`` (within the documented bound of finished orders kept) agree
   with the model; ``balances``: locked is exactly what the open orders reserve (sells:
   remaining base; buys: remaining notional at the limit + the largest fee still
   chargeable), totals follow from funding and fills, an order is accepted iff it can
   reserve; conservation of every asset over all accounts plus the fees;
5. ``trades`` answers the last N trades the connection saw on the channel (after the restart
   too, from the ledger).

Matching, from the public book just before each arrival (deltas carry their request's ts):
post-only and band decisions, the arrival's fills (best price first, as deep as its limit,
quantity and FOK allow), and the makers filled at each price are the front of the queue.

Seeds: ``INV_SEEDS=1,2,3`` (default 1-6); size: ``INV_BATCHES`` x ``INV_BATCH`` (40 x 30).
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest

from client import ExchangeClient
from exchange.markets import DEFAULT_CONFIG
from exchange.server import ExchangeServer, ServerConfig
from exchange.state import FINISHED_PER_USER

T = 10.0
BTC, ACME = "BTC-USD", "ACME-USD"
MARKETS = (BTC, ACME)
SEEDS = [int(s) for s in os.environ.get("INV_SEEDS", "1,2,3,4,5,6").split(",") if s.strip()]
BATCHES = int(os.environ.get("INV_BATCHES", "40"))
BATCH = int(os.environ.get("INV_BATCH", "30"))
ASSET_DEC: dict[str, int] = dict(DEFAULT_CONFIG["assets"])
DEMO = {"USD": Decimal("100000"), "BTC": Decimal("10"), "ACME": Decimal("1000")}
TERMINAL = {"filled", "canceled", "expired", "rejected"}
OPEN = {"new", "partially_filled"}
REPORT_ONLY = ("type", "exec_type", "trade_id", "last_price", "last_qty", "liquidity", "fee",
               "fee_asset", "reason", "message")
D = Decimal
COIDS = [f"c{i}" for i in range(6)] + ["grid 7", "ü-8"]


async def w(aw: Any, timeout: float = T) -> Any:
    return await asyncio.wait_for(aw, timeout)


async def answered(futs: list[asyncio.Future[dict[str, Any]]], timeout: float = 30) -> list[dict[str, Any]]:
    """Every reply, or a failure naming how many never came (rather than a bare timeout)."""
    done, pending = await asyncio.wait(futs, timeout=timeout)
    for fut in pending:
        fut.cancel()
    assert not pending, f"{len(pending)} of {len(futs)} requests unanswered after {timeout} s"
    return [fut.result() for fut in futs]


def num(value: Any) -> Decimal:
    """A request's number as the client wrote it on the wire (a float by its shortest repr)."""
    return D(repr(value)) if isinstance(value, float) else D(value)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def units(amount: Decimal, decimals: int) -> int:
    scaled = amount * (10 ** decimals)
    assert scaled == scaled.to_integral_value(), (amount, decimals)
    return int(scaled)


def avg_text(cost: Fraction, filled: Fraction, tick_dec: int) -> str:
    """As the server writes it: exact average truncated after tick decimals + 8, trailing
    zeros removed down to the tick's decimals."""
    extra = tick_dec + 8
    scaled = (cost / filled * 10 ** extra).__floor__()
    whole, frac = divmod(scaled, 10 ** extra)
    frac_text = str(frac).rjust(extra, "0").rstrip("0").ljust(tick_dec, "0")
    return f"{whole}.{frac_text}" if frac_text else str(whole)


# --------------------------------------------------------------------------- connections


class Sess:
    """One connection and everything it received, in arrival order."""

    def __init__(self, name: str, user: str | None, idx: int, client: ExchangeClient) -> None:
        self.name = name
        self.user = user
        self.idx = idx  # 0: the user's primary session (the only one that funds)
        self.client = client
        self.log: list[dict[str, Any]] = []
        self.requests: dict[Any, dict[str, Any]] = {}
        self.full_trades: set[str] = set()  # markets whose trades it follows from the start
        original = client._dispatch

        def hook(msg: dict[str, Any]) -> None:
            self.log.append(msg)
            original(msg)

        client._dispatch = hook  # type: ignore[method-assign]

    def send(self, op: str, **fields: Any) -> asyncio.Future[dict[str, Any]]:
        fut = self.client.send(op, **fields)
        rid = next(reversed(self.client._pending))
        assert self.client._pending[rid] is fut
        self.requests[rid] = {"op": op, **{k: v for k, v in fields.items() if v is not None}}
        return fut

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        return await w(self.send(op, **fields))

    def drain(self) -> None:
        self.client.pending_events()  # the log keeps everything; keep the client's queue small


# --------------------------------------------------------------------------- the model


@dataclass
class OrderModel:
    oid: int
    user: str
    market: str
    side: str
    order_type: str
    tif: str
    price: str | None
    qty: Decimal
    filled: Decimal
    remaining: Decimal
    status: str
    coid: str | None
    placed_ts: int
    post_only: bool
    stp: str
    queue_ts: int = 0  # when it last joined the back of its level
    cost: Fraction = Fraction(0)
    fee_basis: int = 0  # quote minor units x bps
    fee_paid: int = 0  # quote minor units
    last: dict[str, Any] = field(default_factory=dict)


@dataclass
class Spec:
    symbol: str
    base: str
    quote: str
    tick_dec: int
    maker_bps: int
    taker_bps: int

    @property
    def max_bps(self) -> int:
        return max(self.maker_bps, self.taker_bps)


class Replica:
    """A user's orders and balances as one of its sessions learns them, message by message."""

    def __init__(self, ctx: Ctx, sess: Sess) -> None:
        self.ctx = ctx
        self.sess = sess
        self.user = sess.user
        self.orders: dict[int, OrderModel] = {}
        self.latest_by_coid: dict[str, int] = {}
        assets = list(ASSET_DEC)
        self.exec_total = {a: D(0) for a in assets}
        self.bought = {a: D(0) for a in assets}
        self.sold = {a: D(0) for a in assets}
        self.fees = {a: D(0) for a in assets}
        self.deposited = dict(DEMO)
        self.withdrawn = {a: D(0) for a in assets}
        self.last_ts = 0
        self.trades: list[dict[str, Any]] = []  # this user's trade reports, in order
        self.finished: list[int] = []  # order ids in the order they finished

    def remembered(self, oid: int) -> bool:
        """Whether ``order_status`` still knows the order: open, or among the user's last
        ``FINISHED_PER_USER`` finished orders (docs: "each user's last 1,000")."""
        o = self.orders.get(oid)
        if o is None:
            return False
        return o.status in OPEN or oid in set(self.finished[-FINISHED_PER_USER:])

    def fork(self, sess: Sess) -> Replica:
        """The same knowledge, for another session of the user (after a restart)."""
        other = copy.copy(self)
        other.sess = sess
        other.orders = {oid: copy.copy(o) for oid, o in self.orders.items()}
        for name in ("latest_by_coid", "exec_total", "bought", "sold", "fees", "deposited", "withdrawn"):
            setattr(other, name, dict(getattr(self, name)))
        other.trades = list(self.trades)
        other.finished = list(self.finished)
        return other

    # -- views
    def open_orders(self, market: str | None = None) -> list[OrderModel]:
        return sorted(
            (o for o in self.orders.values() if o.status in OPEN and market in (None, o.market)),
            key=lambda o: o.oid,
        )

    def open_by_coid(self, coid: str) -> OrderModel | None:
        found = [o for o in self.open_orders() if o.coid == coid]
        assert len(found) <= 1, f"{self.user}: two open orders share client_order_id {coid!r}: {found}"
        return found[0] if found else None

    def is_open(self, oid: Any) -> bool:
        o = self.orders.get(oid)
        return o is not None and o.status in OPEN

    def locked(self) -> dict[str, Decimal]:
        out = {a: D(0) for a in ASSET_DEC}
        for o in self.open_orders():
            spec = self.ctx.specs[o.market]
            if o.side == "sell":
                out[spec.base] += o.remaining
            else:
                qdec = ASSET_DEC[spec.quote]
                rest = units(D(o.price) * o.remaining, qdec)  # type: ignore[arg-type]
                need = rest + ceil_div(o.fee_basis + rest * spec.max_bps, 10_000) - o.fee_paid
                out[spec.quote] += D(need) / (10 ** qdec)
        return out

    def open_entry(self, o: OrderModel) -> dict[str, Any]:
        """What ``orders`` (and ``order_status`` of an open order) should list."""
        last = o.last
        entry = {k: last[k] for k in ("order_id", "market", "side", "order_type", "tif", "price", "qty",
                                      "filled_qty", "remaining_qty", "avg_price", "status")}
        entry["post_only"] = o.post_only
        entry["ts"] = o.placed_ts
        if o.coid is not None:
            entry["client_order_id"] = o.coid
        return entry

    # -- execution reports
    def on_exec(self, m: dict[str, Any], where: str) -> None:
        assert m["ts"] >= self.last_ts, f"{where}: ts went back: {m}"
        self.last_ts = m["ts"]
        et, oid = m["exec_type"], m["order_id"]
        if self.sess.idx == 0 and et in ("new", "rejected") and m["market"] in self.ctx.specs:
            self.check_funds_for(m, where)
        if et == "rejected":
            assert oid is None and m["status"] == "rejected", f"{where}: {m}"
            assert D(m["filled_qty"]) == 0 and D(m["remaining_qty"]) == 0 and m["avg_price"] is None, m
            assert "reason" in m and "message" in m, m
            if m["reason"] == "duplicate_client_order_id":
                assert self.open_by_coid(m.get("client_order_id")) is not None, \
                    f"{where}: duplicate_client_order_id but no open order has it: {m}"
            return
        assert isinstance(oid, int), f"{where}: {m}"
        spec = self.ctx.specs[m["market"]]
        qty, filled, remaining = D(m["qty"]), D(m["filled_qty"]), D(m["remaining_qty"])
        assert filled + remaining == qty, f"{where}: filled + remaining != qty: {m}"
        assert filled >= 0 and remaining >= 0, m
        o = self.orders.get(oid)
        if o is None:
            assert et == "new", f"{where}: first report of order {oid} is {et}: {m}"
            assert m["status"] == "new" and filled == 0 and m["avg_price"] is None, f"{where}: {m}"
            coid = m.get("client_order_id")
            if coid is not None:
                held = self.open_by_coid(coid)
                assert held is None, f"{where}: order {oid} accepted with {coid!r} held by open order {held.oid}"
                self.latest_by_coid[coid] = oid
            if m["order_type"] == "market":
                assert m["price"] is None and m["tif"] in ("ioc", "fok"), m
            req = self.ctx.order_requests.get(oid, {})
            o = self.orders[oid] = OrderModel(
                oid, self.user, m["market"], m["side"], m["order_type"], m["tif"], m["price"], qty,
                filled, remaining, "new", coid, m["ts"], bool(req.get("post_only")),
                req.get("stp") or "cancel_resting", queue_ts=m["ts"], last=m,
            )
            return
        assert o.status not in TERMINAL, f"{where}: report after the terminal one for order {oid}: {m}"
        for k, v in (("market", o.market), ("side", o.side), ("order_type", o.order_type), ("tif", o.tif),
                     ("client_order_id", o.coid)):
            assert m.get(k) == v, f"{where}: order {oid}'s {k} changed: {m}"
        assert filled >= o.filled, f"{where}: filled_qty went down: {m}"
        if et != "replaced":
            assert qty == o.qty and m["price"] == o.price, f"{where}: qty/price changed by {et}: {m}"
        if et == "trade":
            lp, lq = D(m["last_price"]), D(m["last_qty"])
            assert lq > 0 and filled == o.filled + lq, f"{where}: fill does not add up: {m}"
            assert m["status"] == ("filled" if remaining == 0 else "partially_filled"), m
            liq = m["liquidity"]
            assert liq in ("maker", "taker"), m
            if o.price is not None:
                if liq == "maker":
                    assert lp == D(o.price), f"{where}: maker filled away from its price: {m}"
                elif o.side == "buy":
                    assert lp <= D(o.price), f"{where}: buy filled above its limit: {m}"
                else:
                    assert lp >= D(o.price), f"{where}: sell filled below its limit: {m}"
            qdec = ASSET_DEC[spec.quote]
            notional = units(lp * lq, qdec)
            bps = spec.maker_bps if liq == "maker" else spec.taker_bps
            basis = o.fee_basis + notional * bps
            fee = ceil_div(basis, 10_000) - o.fee_paid
            assert m["fee_asset"] == spec.quote and units(D(m["fee"]), qdec) == fee, \
                f"{where}: fee {m['fee']} but the cumulative rule gives {fee}: {m}"
            o.fee_basis, o.fee_paid = basis, o.fee_paid + fee
            o.cost += Fraction(lp) * Fraction(lq)
            fee_d = D(fee) / (10 ** qdec)
            notional_d = D(notional) / (10 ** qdec)
            if o.side == "buy":
                self.exec_total[spec.base] += lq
                self.bought[spec.base] += lq
                self.exec_total[spec.quote] -= notional_d + fee_d
                self.sold[spec.quote] += notional_d
            else:
                self.exec_total[spec.base] -= lq
                self.sold[spec.base] += lq
                self.exec_total[spec.quote] += notional_d - fee_d
                self.bought[spec.quote] += notional_d
            self.fees[spec.quote] += fee_d
            self.trades.append(m)
        elif et == "replaced":
            assert filled == o.filled, f"{where}: replaced changed filled_qty: {m}"
            assert m["status"] == o.status, f"{where}: replaced changed the status: {m}"
            assert o.order_type == "limit" and o.tif == "gtc", m
            if m["price"] != o.price or qty > o.qty:  # a cancel/replace: to the back of the queue
                o.queue_ts = m["ts"]
        elif et in ("canceled", "expired", "self_trade_prevented"):
            assert filled == o.filled and remaining == o.remaining, f"{where}: {m}"
            assert remaining > 0, f"{where}: {et} of an order with nothing left: {m}"
            want = "expired" if et == "expired" else "canceled"
            assert m["status"] == want, f"{where}: {m}"
            if et == "expired":
                assert o.tif in ("ioc", "fok"), f"{where}: a gtc order expired: {m}"
        else:
            raise AssertionError(f"{where}: unexpected exec_type {et} for a known order: {m}")
        if o.filled or filled:
            want_avg = avg_text(o.cost, Fraction(filled), spec.tick_dec)
            assert m["avg_price"] == want_avg, f"{where}: avg_price {m['avg_price']} != {want_avg}: {m}"
        else:
            assert m["avg_price"] is None, m
        o.qty, o.filled, o.remaining, o.price, o.status, o.last = qty, filled, remaining, m["price"], m["status"], m
        if o.status in TERMINAL:
            self.finished.append(oid)
            if o.tif == "fok":  # all or nothing
                assert filled in (0, qty), f"{where}: a FOK order ended {filled} of {qty} filled: {m}"

    # -- balances
    def check_balances(self, bal: dict[str, Any], where: str) -> None:
        locked = self.locked()
        funded = {}
        for asset, b in bal.items():
            dec = ASSET_DEC[asset]
            for k, v in b.items():
                assert len(v.partition(".")[2]) == dec, f"{where}: {asset} {k} {v} not at {dec} decimals"
            assert D(b["locked"]) == locked[asset], \
                f"{where}: {asset} locked {b['locked']} but open orders reserve {locked[asset]}"
            assert D(b["bought"]) == self.bought[asset], f"{where}: {asset} bought {b} vs {self.bought[asset]}"
            assert D(b["sold"]) == self.sold[asset], f"{where}: {asset} sold {b} vs {self.sold[asset]}"
            assert D(b["fees"]) == self.fees[asset], f"{where}: {asset} fees {b} vs {self.fees[asset]}"
            assert D(b["spent"]) == D(b["sold"]) + D(b["fees"]), b
            total = D(b["available"]) + D(b["locked"])
            assert D(b["available"]) >= 0
            assert total == self.exec_total[asset] + D(b["deposited"]) - D(b["withdrawn"]), \
                f"{where}: {asset} total {total} != fills {self.exec_total[asset]} + funding {b}"
            funded[asset] = (D(b["deposited"]), D(b["withdrawn"]))
        if self.sess.idx == 0:  # every funding request went through this session
            for asset, (dep, wd) in funded.items():
                assert (dep, wd) == (self.deposited[asset], self.withdrawn[asset]), \
                    f"{where}: {asset} funding {dep}/{wd} vs {self.deposited[asset]}/{self.withdrawn[asset]}"
        else:  # some prefix of the primary session's funding
            assert funded in self.ctx.funding_prefixes[self.user], f"{where}: funding {funded} is no prefix"

    def check_funds_for(self, m: dict[str, Any], where: str) -> None:
        """On the primary session the available balance is known exactly at every report: an
        order is accepted if and only if it can reserve what it needs (market buys aside:
        theirs depends on the book)."""
        spec = self.ctx.specs[m["market"]]
        reason = m.get("reason")
        if m["exec_type"] == "rejected" and reason != "insufficient_funds":
            return
        try:
            qty = D(m["qty"])
            price = D(m["price"]) if m["price"] is not None else None
        except Exception:
            return
        if m["side"] == "sell":
            asset, need = spec.base, qty
        elif price is not None:
            qdec = ASSET_DEC[spec.quote]
            notional = units(price * qty, qdec)
            need = D(notional + ceil_div(notional * spec.max_bps, 10_000)) / (10 ** qdec)
            asset = spec.quote
        else:
            self.ctx.cover["market buy " + m["exec_type"]] += 1
            return
        avail = self.available(asset)
        if m["exec_type"] == "new":
            assert avail >= need, f"{where}: accepted needing {need} {asset} with {avail} available: {m}"
        else:
            self.ctx.cover["rejected insufficient_funds"] += 1
            assert avail < need, f"{where}: insufficient_funds needing {need} {asset} with {avail}: {m}"

    def available(self, asset: str) -> Decimal:
        return self.exec_total[asset] + self.deposited[asset] - self.withdrawn[asset] - self.locked()[asset]


class MarketData:
    """One connection's view of the public feeds it subscribed to."""

    def __init__(self, sess: Sess) -> None:
        self.sess = sess
        self.subs: set[tuple[str, str]] = set()
        self.books: dict[str, dict[str, Any]] = {}
        self.awaiting: list[str] = []
        self.trades: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.last_trade_id = 0
        self.snapshots = 0
        self.updates = 0
        self.book_replies = 0
        self.trades_replies = 0
        self.first_snapshot: dict[str, dict[str, Any]] = {}
        self.deltas: list[dict[str, Any]] = []

    def ladder(self, market: str) -> tuple[list[tuple[Decimal, Decimal]], list[tuple[Decimal, Decimal]]]:
        book = self.books[market]
        bids = sorted(((D(p), q) for p, q in book["buy"].items()), reverse=True)
        asks = sorted((D(p), q) for p, q in book["sell"].items())
        return bids, asks

    def check_reference(self, m: dict[str, Any], where: str) -> None:
        """``reference_price``: the last trade's price, or the configured one before any."""
        market = m["market"]
        if market in self.sess.full_trades:
            seen = self.trades[market]
            want = seen[-1]["price"] if seen else ("100.00" if market == ACME else None)
            assert m["reference_price"] == want, f"{where}: reference_price {m['reference_price']} != {want}"

    def on(self, m: dict[str, Any], req: dict[str, Any] | None, where: str) -> None:
        t = m["type"]
        if t == "subscribed":
            self.subs.add((m["channel"], m["market"]))
            if m["channel"] == "book":
                self.awaiting.append(m["market"])
        elif t == "unsubscribed":
            self.subs.discard((m["channel"], m["market"]))
        elif t == "book" and "id" not in m:
            assert self.awaiting and self.awaiting[0] == m["market"], f"{where}: unexpected snapshot {m}"
            self.awaiting.pop(0)
            assert m["level"] == 2
            self.books[m["market"]] = {
                "seq": m["seq"],
                "buy": {p: D(q) for p, q, _n in m["bids"]},
                "sell": {p: D(q) for p, q, _n in m["asks"]},
            }
            self.first_snapshot.setdefault(m["market"], copy.deepcopy(self.books[m["market"]]))
            self.check_reference(m, where)
            self.snapshots += 1
        elif t == "book":
            assert req is not None and req["op"] == "book", m
            market = m["market"]
            self.check_reference(m, where)
            if ("book", market) in self.subs and market in self.books and req.get("depth", 20) >= 10_000 \
                    and req.get("level", 2) == 2:
                book = self.books[market]
                assert m["seq"] == book["seq"], f"{where}: book reply seq {m['seq']} != rebuilt {book['seq']}"
                bids, asks = self.ladder(market)
                assert [(D(p), D(q)) for p, q, _ in m["bids"]] == bids, f"{where}: bids differ at seq {m['seq']}"
                assert [(D(p), D(q)) for p, q, _ in m["asks"]] == asks, f"{where}: asks differ at seq {m['seq']}"
                self.book_replies += 1
        elif t == "book_update":
            market = m["market"]
            assert ("book", market) in self.subs and market in self.books, f"{where}: unsubscribed {m}"
            book = self.books[market]
            assert m["seq"] == book["seq"] + 1, f"{where}: seq gap {book['seq']} -> {m['seq']}"
            self.deltas.append(m)
            book["seq"] = m["seq"]
            qty = D(m["qty"])
            if qty == 0:
                assert m["qty"] == "0", m
                assert m["price"] in book[m["side"]], f"{where}: removes a level not there: {m}"
                del book[m["side"]][m["price"]]
            else:
                book[m["side"]][m["price"]] = qty
            bids, asks = self.ladder(market)
            if bids and asks:
                assert bids[0][0] < asks[0][0], f"{where}: crossed book after {m}"
            self.updates += 1
        elif t == "trade":
            assert ("trades", m["market"]) in self.subs, f"{where}: unsubscribed {m}"
            assert m["trade_id"] > self.last_trade_id, f"{where}: trade ids not increasing: {m}"
            self.last_trade_id = m["trade_id"]
            self.trades[m["market"]].append(m)
        elif t == "trades":
            assert req is not None and req["op"] == "trades", m
            market = m["market"]
            limit = req.get("limit", 50)
            seen = [{k: v for k, v in tr.items() if k not in ("type", "market")} for tr in self.trades[market]]
            rows = m["trades"]
            assert len(rows) <= limit
            k = min(len(rows), len(seen))
            assert rows[len(rows) - k:] == seen[len(seen) - k:], f"{where}: trades reply != last trades seen"
            if market in self.sess.full_trades:
                assert len(rows) == min(limit, len(seen), 100), f"{where}: {len(rows)} rows, {len(seen)} seen"
            self.trades_replies += 1


@dataclass
class Ctx:
    specs: dict[str, Spec]
    order_requests: dict[int, dict[str, Any]] = field(default_factory=dict)
    funding_prefixes: dict[str, list[dict[str, tuple[Decimal, Decimal]]]] = field(default_factory=dict)
    all_oids: dict[int, str] = field(default_factory=dict)
    cover: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Users with a guest session: (each exec of the primary session, open orders after it).
    history: dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]] = field(default_factory=dict)
    # Level-3 answers to the watcher: (ts of the last book change before them, the answer).
    l3_checkpoints: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    # For the matching check: each order's arrival (new, engine rejection, replaced) with the
    # user's other open orders at that moment, and every report of the user by (ts, order id).
    arrivals: list[dict[str, Any]] = field(default_factory=list)
    by_ts: dict[tuple[str, int, Any], list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))


# --------------------------------------------------------------------------- checking a session


def check_session(
    ctx: Ctx, sess: Sess, rep: Replica | None = None, md: MarketData | None = None,
) -> tuple[Replica | None, MarketData]:
    """Replay one connection's log; ``rep``/``md``: the state it starts from (after a restart)."""
    if rep is None and sess.user is not None:
        rep = Replica(ctx, sess)
    if md is None:
        md = MarketData(sess)
    replies: dict[Any, int] = defaultdict(int)
    log = sess.log
    for i, m in enumerate(log):
        where = f"{sess.name} msg {i}"
        t = m["type"]
        rid = m.get("id")
        req = sess.requests.get(rid) if rid is not None else None
        if rid is not None:
            assert req is not None, f"{where}: reply to an id never sent: {m}"
            replies[rid] += 1
            assert replies[rid] == 1, f"{where}: second reply to {rid}: {m}"
        op = req["op"] if req else None
        if t == "exec":
            assert rep is not None, f"{where}: an exec on an anonymous connection: {m}"
            if sess.idx == 0:
                plain = {k: v for k, v in m.items() if k != "id"}
                ctx.by_ts[(sess.user, m["ts"], m["order_id"])].append(plain)  # type: ignore[index]
                engine_reject = m["exec_type"] == "rejected" and m.get("reason") in (
                    "price_out_of_band", "would_take_liquidity", "insufficient_funds")
                if m["exec_type"] in ("new", "replaced") or engine_reject:
                    o = rep.orders.get(m["order_id"])
                    ctx.arrivals.append({
                        "user": sess.user, "msg": plain, "phase": sess.name.split(":")[0],
                        "own": [(x.market, x.side, D(x.price)) for x in rep.open_orders() if x.oid != m["order_id"]],
                        "stp": (o.stp if o is not None else ctx.order_requests.get(m["order_id"], {}).get("stp"))
                        or (req or {}).get("stp") or "cancel_resting",
                        "post_only": o.post_only if o is not None else bool((req or {}).get("post_only")),
                        "remaining": o.remaining if o is not None else None,
                    })
                ctx.cover[f"exec {m['exec_type']}" + (f" {m['reason']}" if "reason" in m else "")] += 1
                if m["exec_type"] == "trade" and rep.orders[m["order_id"]].last["exec_type"] == "replaced":
                    ctx.cover["trade right after replaced"] += 1
                if m["exec_type"] == "self_trade_prevented" and m["order_type"] == "market":
                    ctx.cover["stp of a market order"] += 1
            if m["order_id"] is not None:
                assert ctx.all_oids[m["order_id"]] == sess.user, f"{where}: another user's report: {m}"
            if req is not None:
                check_exec_reply(rep, req, m, where)
            rep.on_exec({k: v for k, v in m.items() if k != "id"}, where)  # type: ignore[union-attr]
            if sess.idx == 0 and sess.user in ctx.history:  # what a guest session would list
                ctx.history[sess.user].append(
                    ({k: v for k, v in m.items() if k != "id"}, [rep.open_entry(o) for o in rep.open_orders()]))
        elif t == "error":
            assert req is not None, f"{where}: unsolicited error {m}"
            ctx.cover[f"error {req['op']} {m['code']}"] += 1
            check_error(rep, req, m, where)
        elif t == "canceled_all":
            assert op == "cancel_all" and rep is not None
            ids = m["order_ids"]
            assert m["market"] == req.get("market"), m
            assert ids == sorted(ids), f"{where}: not oldest first: {ids}"
            # Each cancel's report came first, as its own message, without the id.
            got: list[int] = []
            j = i - 1
            while len(got) < len(ids):
                assert j >= 0, f"{where}: fewer canceled reports than {ids}"
                prev = log[j]
                if prev["type"] == "exec":
                    assert prev["exec_type"] == "canceled" and "id" not in prev, f"{where}: {prev}"
                    got.append(prev["order_id"])
                else:
                    assert prev["type"] in ("book_update",), f"{where}: {prev} inside cancel_all's reports"
                j -= 1
            assert got[::-1] == ids, f"{where}: canceled reports {got[::-1]} vs {ids}"
            stamps = [x["ts"] for x in log[j + 1:i] if x["type"] == "exec"]
            assert len(set(stamps)) <= 1, f"{where}: cancel_all's reports' ts {stamps}"  # the request's one ts
            ctx.cover["cancel_all non-empty" if ids else "cancel_all empty"] += 1
            assert not rep.open_orders(req.get("market")), \
                f"{where}: cancel_all left open orders {[o.oid for o in rep.open_orders(req.get('market'))]}"
        elif t in ("balances",):
            assert op in ("balances", "deposit", "withdraw") and rep is not None, m
            assert m["user"] == sess.user
            if op in ("deposit", "withdraw"):
                asset, amount = req["asset"], num(req["amount"])
                if op == "deposit":
                    rep.deposited[asset] += amount
                else:
                    rep.withdrawn[asset] += amount
            rep.check_balances(m["balances"], where)
        elif t == "orders":
            assert op == "orders" and rep is not None
            want = [rep.open_entry(o) for o in rep.open_orders(req.get("market"))]
            assert m["orders"] == want, f"{where}: orders reply differs from the reports:\n{m['orders']}\n{want}"
        elif t == "order_status":
            assert op == "order_status" and rep is not None
            if "client_order_id" in req:
                oid = rep.latest_by_coid.get(req["client_order_id"])
            else:
                oid = int(req["order_id"])
            o = rep.orders.get(oid)  # type: ignore[arg-type]
            assert o is not None and m["order_id"] == oid, f"{where}: order_status of {req}: {m}"
            ctx.cover[f"order_status {o.status}"] += 1
            assert rep.remembered(o.oid), f"{where}: order_status of an order beyond the bound: {m}"
            if o.status in OPEN:
                want = rep.open_entry(o)
            else:
                want = {k: v for k, v in o.last.items() if k not in REPORT_ONLY}
            got_entry = {k: v for k, v in m.items() if k not in ("type", "id")}
            assert got_entry == want, f"{where}: order_status {got_entry} != {want}"
        elif t == "queue_position":
            assert op == "queue_position" and rep is not None
            o = rep.orders.get(int(req["order_id"]))
            assert o is not None and o.status in OPEN, f"{where}: queue_position of a closed order {m}"
            assert m["price"] == o.price and D(m["remaining_qty"]) == o.remaining and D(m["ahead_qty"]) >= 0, m
        elif t in ("subscribed", "unsubscribed", "book", "book_update", "trade", "trades"):
            md.on(m, req, where)
        elif t == "pong":
            if rep is not None:
                assert m["ts"] > rep.last_ts, f"{where}: pong ts {m['ts']} not after the reports' {rep.last_ts}"
        elif t in ("logged_in", "markets", "stats"):
            pass
        else:
            raise AssertionError(f"{where}: unexpected message {m}")
    missing = set(sess.requests) - set(replies)
    assert not missing, f"{sess.name}: no reply to {sorted(missing)[:10]}"
    return rep, md


def check_exec_reply(rep: Replica | None, req: dict[str, Any], m: dict[str, Any], where: str) -> None:
    assert rep is not None
    op = req["op"]
    if op == "order":
        assert m["exec_type"] in ("new", "rejected"), f"{where}: first report {m}"
        assert m["market"] == req["market"] and m["side"] == req["side"], m
        otype = req.get("type") or "limit"
        assert m["order_type"] == otype, m
        tif = req.get("tif") or ("gtc" if otype == "limit" else "ioc")
        if otype == "market" and tif == "gtc":
            tif = "ioc"
        assert m["tif"] == tif, f"{where}: tif {m['tif']} for {req}"
        assert m.get("client_order_id") == req.get("client_order_id"), m
        if m["exec_type"] == "new":
            assert D(m["qty"]) == num(req["qty"]), m
            assert (m["price"] is None) == ("price" not in req), m
            if "price" in req:
                assert D(m["price"]) == num(req["price"]), m
    elif op == "cancel":
        assert m["exec_type"] == "canceled", f"{where}: cancel answered {m}"
        if "client_order_id" in req:
            held = rep.open_by_coid(req["client_order_id"])
            assert held is not None and held.oid == m["order_id"], f"{where}: cancel {req} hit {m['order_id']}"
        else:
            assert m["order_id"] == int(req["order_id"]), m
        assert rep.is_open(m["order_id"]), f"{where}: canceled an order that was not open: {m}"
    elif op == "modify":
        assert m["exec_type"] == "replaced", f"{where}: modify answered {m}"
        assert m["order_id"] == int(req["order_id"]) and rep.is_open(m["order_id"]), m
        o = rep.orders[m["order_id"]]
        assert D(m["price"]) == D(req.get("price", o.price)), f"{where}: {req} -> {m}"
        assert D(m["qty"]) == D(req.get("qty", o.qty)), f"{where}: {req} -> {m}"
    else:
        raise AssertionError(f"{where}: an exec answers {req}: {m}")


def check_error(rep: Replica | None, req: dict[str, Any], m: dict[str, Any], where: str) -> None:
    op, code = req["op"], m["code"]
    assert rep is not None, f"{where}: {req} -> {m}"
    if code == "unknown_order":
        if op == "order_status":
            if "client_order_id" in req:
                oid = rep.latest_by_coid.get(req["client_order_id"])
            else:
                oid = int(req["order_id"])
            assert oid is None or not rep.remembered(oid), f"{where}: {req} -> {m} but it should be kept"
        elif "client_order_id" in req:
            assert op == "cancel" and m.get("client_order_id") == req["client_order_id"], m
            assert rep.open_by_coid(req["client_order_id"]) is None, f"{where}: {req} -> {m} but it is open"
        else:
            assert op in ("cancel", "modify", "queue_position"), m
            assert m.get("order_id") == int(req["order_id"]), m
            assert not rep.is_open(int(req["order_id"])), f"{where}: {req} -> {m} but it is open"
        return
    if op == "modify":
        oid = int(req["order_id"])
        assert m.get("order_id") == oid and rep.is_open(oid), f"{where}: {req} -> {m}"
        o = rep.orders[oid]
        if code == "invalid_quantity":
            q = D(req["qty"])
            assert q <= o.filled or q != q.quantize(D(1) if o.market == ACME else D("0.0001")), \
                f"{where}: {req} refused {m} (filled {o.filled})"
        elif code == "invalid_price":
            p = D(req["price"])
            assert p <= 0 or p != p.quantize(D("0.01")), f"{where}: {req} -> {m}"
        elif code == "would_take_liquidity":
            assert o.post_only and "price" in req and D(req["price"]) != D(o.price), f"{where}: {req} -> {m}"
        elif code == "price_out_of_band":
            assert o.market == ACME, m
        elif code == "insufficient_funds":
            pass
        else:
            raise AssertionError(f"{where}: unexpected {m} for {req}")
        return
    if op == "withdraw" and code == "insufficient_funds":
        if rep.sess.idx == 0:
            avail = rep.available(req["asset"])
            assert avail < num(req["amount"]), f"{where}: refused {req} with {avail} available"
        return
    raise AssertionError(f"{where}: unexpected error {m} for {req}")


# --------------------------------------------------------------------------- the workload


class Hints:
    """What the workload knows of each user's orders, from its primary session's log so far."""

    def __init__(self, users: list[str]) -> None:
        self.open: dict[str, dict[int, dict[str, Any]]] = {u: {} for u in users}
        self.known: dict[str, list[int]] = {u: [] for u in users}
        self.pos: dict[str, int] = {u: 0 for u in users}

    def update(self, user: str, log: list[dict[str, Any]]) -> None:
        mine = self.open[user]
        for m in log[self.pos[user]:]:
            if m["type"] != "exec" or m["order_id"] is None:
                continue
            oid = m["order_id"]
            if m["exec_type"] == "new":
                self.known[user].append(oid)
            if m["status"] in OPEN:
                mine[oid] = m
            else:
                mine.pop(oid, None)
        self.pos[user] = len(log)


def btc_price(rng: random.Random, side: str) -> str:
    """Mostly passive (buys below 100, sells above), sometimes through the book."""
    ticks = rng.randint(9700, 10000) if side == "buy" else rng.randint(10000, 10300)
    if rng.random() < 0.3:
        ticks = 20000 - ticks
    if rng.random() < 0.6:  # a few popular levels, so that queues form
        ticks -= ticks % 25
    return f"{ticks / 100:.2f}"


def acme_price(rng: random.Random, side: str) -> str:
    ticks = rng.randint(9500, 10000) if side == "buy" else rng.randint(10000, 10500)
    if rng.random() < 0.3:
        ticks = 20000 - ticks
    if rng.random() < 0.6:
        ticks -= ticks % 50
    return f"{ticks / 100:.2f}"


def gen_order(rng: random.Random, coids: list[str]) -> dict[str, Any]:
    market = BTC if rng.random() < 0.7 else ACME
    f: dict[str, Any] = {"market": market, "side": rng.choice(["buy", "sell"])}
    if market == BTC:
        f["qty"] = f"{rng.randint(1, 2500) / 10000:.4f}"
        if rng.random() < 0.02:
            f["qty"] = "0.00005"  # off the lot grid
    else:
        f["qty"] = str(rng.randint(1, 12))
    if rng.random() < 0.12:
        f["type"] = "market"
        f["tif"] = rng.choice([None, "ioc", "fok", "gtc"])
    else:
        f["type"] = rng.choice(["limit", None])
        f["price"] = btc_price(rng, f["side"]) if market == BTC else acme_price(rng, f["side"])
        if rng.random() < 0.02:
            f["price"] = "100.005"  # off the tick grid
        if market == ACME and rng.random() < 0.03:
            f["price"] = "140.00"  # out of the band
        f["tif"] = rng.choice(["gtc"] * 6 + ["ioc"] * 2 + ["fok"] * 2 + [None])
        if rng.random() < 0.15:
            f["post_only"] = True
    if rng.random() < 0.5:
        f["stp"] = rng.choice(["cancel_resting", "cancel_incoming", "cancel_both", "none"])
    if rng.random() < 0.35:
        f["client_order_id"] = rng.choice(coids)
    if rng.random() < 0.005:
        f["market"] = "DOGE-USD"
    if rng.random() < 0.1:  # JSON numbers: read from the digits as written
        for k in ("qty", "price"):
            if k in f:
                f[k] = float(f[k]) if rng.random() < 0.7 else (int(D(f[k])) if D(f[k]) == int(D(f[k])) else f[k])
    if rng.random() < 0.01 and f.get("type") == "market":
        f["post_only"] = True  # not for a market order: invalid_order
    return f


def gen_modify(rng: random.Random, o: dict[str, Any]) -> dict[str, Any]:
    acme = o["market"] == ACME
    lot = D(1) if acme else D("0.0001")
    filled, qty = D(o["filled_qty"]), D(o["qty"])
    f: dict[str, Any] = {"order_id": o["order_id"]}
    roll = rng.random()
    if roll < 0.35 or roll >= 0.8:
        step = D(rng.randint(1, 5)) if acme else D(rng.choice([rng.randint(1, 50), rng.randint(1, 1500)])) * lot
        new_qty = qty + step if rng.random() < 0.5 else qty - step
        if rng.random() < 0.05:
            new_qty = filled  # not above what is filled: refused
        if new_qty <= 0:
            new_qty = lot
        f["qty"] = str(new_qty)
    if roll >= 0.35:
        delta = D(rng.randint(-80, 80)) / 100
        new_price = D(o["price"]) + delta
        if new_price <= 0:
            new_price = D("1.00")
        f["price"] = f"{new_price:.2f}"
        if rng.random() < 0.03:
            f["price"] = f"{new_price}5"  # off grid
    return f


def pick_request(
    rng: random.Random, sess_of: dict[str, list[Sess]], user: str, hints: Hints, users: list[str],
    coids: list[str],
) -> tuple[Sess, str, dict[str, Any]]:
    sessions = sess_of[user]
    sess = rng.choice(sessions)
    mine = list(hints.open[user].values())
    roll = rng.random()
    if roll < 0.50:
        return sess, "order", gen_order(rng, coids)
    if roll < 0.64:
        if mine and rng.random() < 0.85:
            o = rng.choice(mine)
            if o.get("client_order_id") and rng.random() < 0.3:
                return sess, "cancel", {"client_order_id": o["client_order_id"]}
            oid = o["order_id"]
            return sess, "cancel", {"order_id": str(oid) if rng.random() < 0.2 else oid}
        other = rng.choice(users)
        if hints.known[other] and rng.random() < 0.6:
            return sess, "cancel", {"order_id": rng.choice(hints.known[other])}
        if rng.random() < 0.5:
            return sess, "cancel", {"client_order_id": rng.choice(coids)}
        return sess, "cancel", {"order_id": 10_000_000 + rng.randrange(1000)}
    if roll < 0.76:
        if mine:
            return sess, "modify", gen_modify(rng, rng.choice(mine))
        return sess, "modify", {"order_id": 424242, "qty": "1"}
    if roll < 0.775:
        return sess, "cancel_all", {"market": rng.choice([None, BTC, ACME])}
    if roll < 0.84:
        primary = sessions[0]
        asset = rng.choice(list(ASSET_DEC))
        op = rng.choice(["deposit", "withdraw"])
        if asset == "USD":
            amount = f"{rng.randint(1, 500_000_000) / 100:.2f}"
        elif asset == "BTC":
            amount = f"{rng.randint(1, 300_000_000) / 10**8:.8f}"
        else:
            amount = str(rng.randint(1, 400))
        if rng.random() < 0.1:
            return primary, op, {"asset": asset, "amount": float(amount)}  # a JSON number
        return primary, op, {"asset": asset, "amount": amount}
    if roll < 0.88:
        return sess, "balances", {}
    if roll < 0.92:
        return sess, "orders", {"market": rng.choice([None, BTC, ACME])}
    if roll < 0.97:
        known = hints.known[user]
        if rng.random() < 0.3:
            return sess, "order_status", {"client_order_id": rng.choice(coids)}
        other = hints.known[rng.choice(users)]
        if other and rng.random() < 0.15:  # another user's: looks exactly like no such order
            return sess, "order_status", {"order_id": rng.choice(other)}
        if known and rng.random() < 0.9:
            return sess, "order_status", {"order_id": rng.choice(known)}
        return sess, "order_status", {"order_id": 10_000_000 + rng.randrange(1000)}
    if mine and rng.random() < 0.8:
        return sess, "queue_position", {"order_id": rng.choice(mine)["order_id"]}
    return sess, "queue_position", {"order_id": 10_000_000 + rng.randrange(1000)}


# --------------------------------------------------------------------------- the test


def check_guest(ctx: Ctx, guest: Sess, phase_history: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
    """A session that logged in mid-run and left: it got exactly the user's reports of its
    lifetime, each once, in order (a contiguous run of the primary session's), its second
    login changed nothing, and its ``orders`` answers are the open orders at their moment."""
    execs = [(i, {k: v for k, v in m.items() if k != "id"}) for i, m in enumerate(guest.log) if m["type"] == "exec"]
    primary = [e for e, _ in phase_history]
    assert execs, f"{guest.name}: no report at all"
    start = primary.index(execs[0][1])
    assert [e for _, e in execs] == primary[start:start + len(execs)], f"{guest.name}: not a contiguous run"
    replied = {m.get("id") for m in guest.log if "id" in m}
    assert set(guest.requests) <= replied, f"{guest.name}: unanswered {set(guest.requests) - replied}"
    positions = [i for i, _ in execs]
    for i, m in enumerate(guest.log):
        req = guest.requests.get(m.get("id"))
        if req is None:
            continue
        if req["op"] == "login":
            assert m["type"] == "logged_in" and m["funded"] is False, m
        elif m["type"] == "orders":
            before = sum(1 for p in positions if p < i)  # the guest's reports before this answer
            if before:
                k = start + before - 1
            elif positions:
                k = start - 1
            else:
                continue
            want = [o for o in (phase_history[k][1] if k >= 0 else []) if req.get("market") in (None, o["market"])]
            assert m["orders"] == want, f"{guest.name} msg {i}: orders {m['orders']} != {want}"
            ctx.cover["guest orders checked"] += 1


def check_matching(ctx: Ctx, phases: list[Phase], feeds: list[dict[str, MarketData]]) -> None:
    """Each arriving order against the public book just before it (deltas carry the ts of the
    request that caused them, and every request has its own ts): post-only and band
    decisions, and the fills of the arrival (the reports with its ts) are the walk of the
    opposite side, best price first, as deep as its limit, its quantity (and FOK) allow.
    Skipped where the user's own orders are in the way (self-trade prevention)."""
    acme_trades = sorted(((t["ts"], D(t["price"])) for feed, ph in zip(feeds, phases)
                          for t in feed[ph.watcher.name].trades[ACME]), key=lambda tp: tp[0])  # stable
    ref0 = D("100.00")
    for n, (ph, feed) in enumerate(zip(phases, feeds)):
        md = feed[ph.watcher.name]
        books = {m: {"buy": dict(md.first_snapshot[m]["buy"]), "sell": dict(md.first_snapshot[m]["sell"])}
                 for m in MARKETS}
        deltas = sorted((u["ts"], u["seq"], u) for u in md.deltas)
        arrivals = sorted((a for a in ctx.arrivals if a["phase"] == f"p{n}"), key=lambda a: a["msg"]["ts"])
        di = 0
        for a in arrivals:
            m = a["msg"]
            ts = m["ts"]
            while di < len(deltas) and deltas[di][0] < ts:
                u = deltas[di][2]
                if D(u["qty"]) == 0:
                    del books[u["market"]][u["side"]][u["price"]]
                else:
                    books[u["market"]][u["side"]][u["price"]] = D(u["qty"])
                di += 1
            check_arrival(ctx, a, books[m["market"]], acme_trades, ref0)


def check_arrival(ctx: Ctx, a: dict[str, Any], book: dict[str, dict[str, Decimal]],
                  acme_trades: list[tuple[int, Decimal]], ref0: Decimal) -> None:
    m = a["msg"]
    where = f"{a['user']} arrival {m}"
    market, side, ts, et = m["market"], m["side"], m["ts"], m["exec_type"]
    price = D(m["price"]) if m["price"] is not None else None
    band = None
    if market == ACME:
        ref = ref0
        for t_ts, t_price in acme_trades:
            if t_ts >= ts:
                break
            ref = t_price
        ticks = int(ref * 100)
        band = (D(max(1, ceil_div(ticks * 9, 10))) / 100, D((ticks * 11) // 10) / 100)
        if price is not None and et != "replaced":
            inside = band[0] <= price <= band[1]
            if et == "new":
                assert inside, f"{where}: accepted outside the band {band}"
            elif m["reason"] == "price_out_of_band":
                assert not inside, f"{where}: refused as out of band {band}"
            ctx.cover["band decisions checked"] += 1
    opposite = "sell" if side == "buy" else "buy"
    levels = sorted(book[opposite].items(), key=lambda kv: D(kv[0]), reverse=(side == "sell"))
    best = D(levels[0][0]) if levels else None
    crosses = best is not None and price is not None and (best <= price if side == "buy" else best >= price)
    if et == "rejected":
        if m["reason"] == "would_take_liquidity":
            assert crosses, f"{where}: post-only refused, best {opposite} {best}"
            ctx.cover["post-only decisions checked"] += 1
        return
    if a["post_only"] and et == "new":
        assert not crosses, f"{where}: post-only accepted through best {opposite} {best}"
        ctx.cover["post-only decisions checked"] += 1
    if price is not None:
        lo, hi = (D(0), price) if side == "buy" else (price, D(10) ** 12)
    else:
        lo, hi = band if band is not None else (D(0), D(10) ** 12)
    in_range = [(D(p), q) for p, q in levels if lo <= D(p) <= hi]
    own = [x for x in a["own"] if x[0] == market and x[1] == opposite and lo <= x[2] <= hi]
    if own and a["stp"] != "none":
        ctx.cover["arrivals skipped (own orders in the way)"] += 1
        return
    qty = D(m["remaining_qty"]) if et == "replaced" else D(m["qty"])
    want: list[tuple[Decimal, Decimal]] = []
    left = qty
    for p, q in in_range:
        if not left:
            break
        take = min(left, q)
        want.append((p, take))
        left -= take
    reports = ctx.by_ts[(a["user"], ts, m["order_id"])]
    mine = [r for r in reports if r["exec_type"] == "trade" and r["liquidity"] == "taker"]
    got: list[tuple[Decimal, Decimal]] = []
    for r in mine:  # fills at one level, consecutive, count as one
        p, q = D(r["last_price"]), D(r["last_qty"])
        if got and got[-1][0] == p:
            got[-1] = (p, got[-1][1] + q)
        else:
            got.append((p, q))
    if m["tif"] == "fok" and left:
        want = []  # cannot fill completely: nothing at all
    if m["order_type"] == "market" and side == "buy" and a["user"].endswith("_4"):
        return  # the poor user's market buys may stop where the money ends
    assert got == want, f"{where}: fills {got}, the book before it ({opposite}: {in_range}) gives {want}"
    ctx.cover["arrivals whose fills were checked"] += 1
    if want:
        ctx.cover["arrivals with fills checked"] += 1
    last = reports[-1]
    filled_now = sum((q for _, q in got), D(0))
    if filled_now < qty:
        if m["tif"] in ("ioc", "fok") or m["order_type"] == "market":
            assert last["exec_type"] == "expired", f"{where}: remainder not expired: {reports}"
        else:
            assert last["status"] in OPEN, f"{where}: gtc remainder does not rest: {reports}"


def check_fifo(ctx: Ctx) -> None:
    """Time priority in matching: the book of every order's reports, replayed in ts order (a
    request's reports share its ts; requests have distinct ones), and each request's maker
    fills at a price are the front of that level's queue, oldest first (skipping the taker
    owner's own orders, which self-trade prevention cancels, unless its stp is none)."""
    by_ts: dict[int, list[tuple[str, int, list[dict[str, Any]]]]] = defaultdict(list)
    for (user, ts, oid), reports in ctx.by_ts.items():
        if oid is not None:
            by_ts[ts].append((user, oid, reports))
    state: dict[int, dict[str, Any]] = {}
    checkpoints = sorted(ctx.l3_checkpoints, key=lambda c: c[0])
    ci = 0

    def check_l3(cut: int, reply: dict[str, Any]) -> None:
        market = reply["market"]
        for side, key, desc in (("buy", "bids", True), ("sell", "asks", False)):
            live = [st for st in state.values() if st["open"] and st["market"] == market and st["side"] == side]
            live.sort(key=lambda st: (-D(st["price"]) if desc else D(st["price"]), st["queue_ts"]))
            want = [[st["oid"], st["price"], st["remaining"]] for st in live]
            got = [[oid, p, D(q)] for oid, p, q in reply[key]]
            assert got == want, f"level-3 {market} {key} at seq {reply['seq']} (ts {cut}): {got} != {want}"
            ctx.cover["level-3 rows checked against the timeline"] += len(got)

    for ts in sorted(by_ts):
        while ci < len(checkpoints) and checkpoints[ci][0] < ts:
            check_l3(*checkpoints[ci])
            ci += 1
        entries = by_ts[ts]
        fills = sorted((r for _, _, reports in entries for r in reports if r["exec_type"] == "trade"),
                       key=lambda r: (r["trade_id"], r["liquidity"] == "maker"))
        if fills:
            takers = {r["order_id"] for r in fills if r["liquidity"] == "taker"}
            assert len(takers) == 1, f"ts {ts}: takers {takers}"
            taker = takers.pop()
            tuser = next(u for u, oid, _ in entries if oid == taker)
            tstp = ctx.order_requests.get(taker, {}).get("stp") or "cancel_resting"
            makers = [r for r in fills if r["liquidity"] == "maker"]
            levels: dict[str, list[int]] = {}
            for r in makers:
                levels.setdefault(r["last_price"], []).append(r["order_id"])
            side = makers[0]["side"]
            for price, oids in levels.items():
                queue = sorted((st for st in state.values() if st["open"] and st["market"] == makers[0]["market"]
                                and st["side"] == side and st["price"] == price), key=lambda st: st["queue_ts"])
                if tstp != "none":
                    queue = [st for st in queue if st["user"] != tuser]
                assert oids == [st["oid"] for st in queue[:len(oids)]], (
                    f"ts {ts}: makers filled at {price}: {oids}, but the queue was {[st['oid'] for st in queue]}")
                ctx.cover["maker fills checked for time priority"] += len(oids)
        for user, oid, reports in entries:
            st = state.get(oid)
            for r in reports:
                if st is None:
                    st = state[oid] = {"oid": oid, "user": user, "market": r["market"], "side": r["side"],
                                       "price": r["price"], "qty": D(r["qty"]), "queue_ts": ts}
                elif r["exec_type"] == "replaced" and (r["price"] != st["price"] or D(r["qty"]) > st["qty"]):
                    st["queue_ts"] = ts
                st["price"], st["qty"], st["remaining"] = r["price"], D(r["qty"]), D(r["remaining_qty"])
                st["open"] = r["status"] in OPEN and r["tif"] == "gtc" and r["order_type"] == "limit"
    for checkpoint in checkpoints[ci:]:
        check_l3(*checkpoint)


@dataclass
class Phase:
    """One server lifetime's connections."""

    sessions: list[Sess]
    sess_of: dict[str, list[Sess]]
    watcher: Sess
    late: Sess
    mixed: Sess
    l3: dict[str, dict[str, Any]] = field(default_factory=dict)
    guests: list[Sess] = field(default_factory=list)
    queue: list[dict[str, Any]] = field(default_factory=list)


async def _phase(
    server: ExchangeServer, rng: random.Random, users: list[str], hints: Hints, batches: int, first: bool,
    sessions: list[Sess], tag: str,
) -> Phase:
    assert server.address is not None
    start = len(sessions)

    async def open_session(name: str, user: str | None, idx: int) -> Sess:
        client = ExchangeClient(*server.address, timeout=T)  # type: ignore[misc]
        await w(client.connect())
        s = Sess(f"{tag}{name}", user, idx, client)
        sessions.append(s)
        if user is not None:
            reply = await s.request("login", user=user)
            assert reply["type"] == "logged_in" and reply["funded"] == (first and idx == 0), reply
        return s

    coids = COIDS
    sess_of: dict[str, list[Sess]] = {}
    for i, user in enumerate(users):
        sess_of[user] = [await open_session(f"{user}/0", user, 0)]
        if i < 2:
            sess_of[user].append(await open_session(f"{user}/1", user, 1))
    if first:
        poor = sess_of[users[4]][0]  # little money: its orders run into insufficient_funds
        for asset, amount in (("USD", "99950"), ("BTC", "9.5"), ("ACME", "980")):
            assert (await poor.request("withdraw", asset=asset, amount=amount))["type"] == "balances"
    watcher = await open_session("watcher", None, 0)
    for market in MARKETS:
        for channel in ("book", "trades"):
            assert (await watcher.request("subscribe", channel=channel, market=market))["type"] == "subscribed"
        watcher.full_trades.add(market)
    mixed = sess_of[users[0]][1]  # a trading session that also follows BTC-USD
    await mixed.request("subscribe", channel="book", market=BTC)
    await mixed.request("subscribe", channel="trades", market=BTC)
    mixed.full_trades.add(BTC)
    if not first:
        # Straight after the restart: what the exchange remembers, before anything changes.
        probes = []
        for user in users:
            s = sess_of[user][-1]
            probes += [s.send("orders"), s.send("balances")]
            for oid in rng.sample(hints.known[user], min(15, len(hints.known[user]))):
                probes.append(s.send("order_status", order_id=oid))
            for coid in coids:
                probes.append(s.send("order_status", client_order_id=coid))
        for market in MARKETS:
            probes += [watcher.send("trades", market=market, limit=100), watcher.send("book", market=market,
                                                                                      depth=10_000)]
        await answered(probes)
    late: Sess | None = None
    loop = asyncio.get_running_loop()
    started = loop.time()
    guest: Sess | None = None
    guests: list[Sess] = []
    for batch in range(batches):
        if batch == batches // 4:
            guest = await open_session(f"{users[2]}/g", users[2], 2)
            guests.append(guest)
            await guest.request("orders")
        if batch == batches // 2 and guest is not None:
            await guest.request("orders")
            await w(guest.client.close())
            guest = None
        if batch == batches // 3:
            late = await open_session("late", None, 0)
            await late.request("subscribe", channel="book", market=ACME)
        futs = []
        for _ in range(BATCH):
            user = rng.choice(users)
            sess, op, fields = pick_request(rng, sess_of, user, hints, users, coids)
            futs.append(sess.send(op, **fields))
        if guest is not None:
            for _ in range(3):
                _, op, fields = pick_request(rng, sess_of, users[2], hints, users, coids)
                if op in ("order", "cancel", "modify", "cancel_all", "orders"):
                    futs.append(guest.send(op, **fields))
            if rng.random() < 0.1:
                futs.append(guest.send("login", user=users[2]))  # again: changes nothing
        if rng.random() < 0.5:
            market = rng.choice(MARKETS)
            futs.append(watcher.send("book", market=market, depth=10_000))
            futs.append(watcher.send("trades", market=market, limit=rng.choice([None, 1, 7, 100])))
            futs.append(watcher.send("book", market=market, depth=10_000, level=3))
            futs.append(mixed.send("book", market=BTC, depth=10_000))
            futs.append(mixed.send("trades", market=BTC, limit=rng.randint(1, 100)))
        if late is not None and rng.random() < 0.3:
            futs.append(late.send("book", market=ACME, depth=10_000))
            if rng.random() < 0.3:  # subscribing again sends a fresh snapshot
                futs.append(late.send("subscribe", channel="book", market=ACME))
            elif rng.random() < 0.2:  # nothing after unsubscribed; a new snapshot after subscribed
                futs.append(late.send("unsubscribe", channel="book", market=ACME))
                futs.append(late.send("ping"))
                futs.append(late.send("subscribe", channel="book", market=ACME))
        await answered(futs)
        for user in users:
            hints.update(user, sess_of[user][0].log)
        for s in sessions[start:]:
            s.drain()
        assert loop.time() - started < 60, "the run takes too long"

    # The end: everyone settles, then the final state from every session.
    live = [s for s in sessions[start:] if s not in guests]
    for s in live:
        await s.request("ping")
    final = []
    for s in live:
        if s.user is not None:
            final.append(s.send("orders"))
            final.append(s.send("balances"))
    for market in MARKETS:
        final.append(watcher.send("book", market=market, depth=10_000))
        final.append(watcher.send("trades", market=market, limit=100))
        final.append(watcher.send("trades", market=market))
    assert late is not None
    final.append(late.send("book", market=ACME, depth=10_000))
    await answered(final)
    phase = Phase(sessions[start:], sess_of, watcher, late, mixed, guests=guests)
    for market in MARKETS:
        phase.l3[market] = await watcher.request("book", market=market, depth=10_000, level=3)
    # Nothing changes any more: the queue positions of every open order, against level 3.
    positions = []
    for market in MARKETS:
        for row in phase.l3[market]["bids"] + phase.l3[market]["asks"]:
            oid = row[0]
            owner = next(u for u in users if oid in hints.open[u])
            positions.append(sess_of[owner][0].send("queue_position", order_id=oid))
    phase.queue = await answered(positions)
    for s in live:
        await s.request("ping")
    return phase


async def _run(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    users = [f"u{seed}_{i}" for i in range(5)]
    hints = Hints(users)
    sessions: list[Sess] = []
    phases: list[Phase] = []
    for n in range(2):  # the second time on the same data directory: a restart
        server = ExchangeServer(ServerConfig(
            port=0, data_dir=data_dir, stats_interval=0,
            fsync=("batch", "off", "always")[seed % 3], writer=("process", "inline")[(seed // 3) % 2],
        ))
        await w(server.start())
        try:
            if n:
                hints.pos = {u: 0 for u in users}
            phases.append(await _phase(server, rng, users, hints, BATCHES if n == 0 else BATCHES // 2,
                                       n == 0, sessions, f"p{n}:"))
            if n:  # the first server is just stopped: its ledger must be complete all the same
                await w(server.flush_logs(), 30)
        finally:
            for s in sessions:
                s.client.abort()
            await w(server.stop(), 20)
    ledger = [orjson.loads(line) for line in (data_dir / "trades.jsonl").read_bytes().splitlines()]
    check_all(phases, users, _markets(), ledger)


def _markets() -> dict[str, Spec]:
    from exchange.markets import default_config
    out = {}
    for symbol, m in default_config().markets.items():
        d = m.describe()
        out[symbol] = Spec(symbol, d["base"], d["quote"], -D(d["tick_size"]).as_tuple().exponent,
                           d["maker_fee_bps"], d["taker_fee_bps"])
    return out


def check_all(phases: list[Phase], users: list[str], specs: dict[str, Spec], ledger: list[dict[str, Any]]) -> None:
    ctx = Ctx(specs)
    sessions = [s for ph in phases for s in ph.sessions]
    # Who placed what (stp, post_only), and every order id's owner: from the direct answers.
    for s in sessions:
        for m in s.log:
            if m["type"] == "exec" and m["exec_type"] == "new" and "id" in m:
                ctx.order_requests[m["order_id"]] = s.requests[m["id"]]
            if m["type"] == "exec" and m["order_id"] is not None:
                owner = ctx.all_oids.setdefault(m["order_id"], s.user)  # type: ignore[arg-type]
                assert owner == s.user, f"order {m['order_id']} reported to {owner} and {s.user}"
    # The funding prefixes of each user, from its primary sessions' answers, in order.
    for user in users:
        dep = dict(DEMO)
        wd = {a: D(0) for a in ASSET_DEC}
        prefixes = [{a: (dep[a], wd[a]) for a in ASSET_DEC}]
        for ph in phases:
            primary = ph.sess_of[user][0]
            for m in primary.log:
                if m["type"] == "balances" and "id" in m:
                    req = primary.requests[m["id"]]
                    if req["op"] in ("deposit", "withdraw"):
                        (dep if req["op"] == "deposit" else wd)[req["asset"]] += num(req["amount"])
                        prefixes.append({a: (dep[a], wd[a]) for a in ASSET_DEC})
        ctx.funding_prefixes[user] = prefixes

    # 1. Identical execution reports on every session of a user (within a server's lifetime).
    for ph in phases:
        for user in users:
            streams = [[{k: v for k, v in m.items() if k != "id"} for m in s.log if m["type"] == "exec"]
                       for s in ph.sess_of[user]]
            for other in streams[1:]:
                assert other == streams[0], f"{user}: sessions saw different exec reports"

    # Every connection replayed through the model; every reply checked where it arrived. After
    # the restart each user's model goes on from where the first server left it.
    replicas: dict[str, Replica] = {}
    feeds: list[dict[str, MarketData]] = []
    prev_watcher: MarketData | None = None
    for ph in phases:
        feed: dict[str, MarketData] = {}
        carried = dict(replicas)
        for g in ph.guests:
            ctx.history[g.user] = []  # type: ignore[index]
        for s in ph.sessions:
            if s in ph.guests:
                continue
            start_rep = None
            if s.user is not None and s.user in carried:
                start_rep = carried[s.user].fork(s)
            start_md = None
            if s in (ph.watcher, ph.mixed) and prev_watcher is not None:
                start_md = MarketData(s)  # the trades seen before the restart
                for market in s.full_trades:
                    start_md.trades[market] = list(prev_watcher.trades[market])
                start_md.last_trade_id = prev_watcher.last_trade_id
            rep, md = check_session(ctx, s, start_rep, start_md)
            if rep is not None and s.idx == 0:
                replicas[s.user] = rep  # type: ignore[index]
            feed[s.name] = md
        for g in ph.guests:
            check_guest(ctx, g, ctx.history[g.user])  # type: ignore[index]
        ctx.history.clear()
        if prev_watcher is not None:  # the book after the restart is the book before it
            now = feed[ph.watcher.name]
            for market in MARKETS:
                assert now.first_snapshot[market]["seq"] == prev_watcher.books[market]["seq"], market
                assert now.first_snapshot[market]["buy"] == prev_watcher.books[market]["buy"], market
                assert now.first_snapshot[market]["sell"] == prev_watcher.books[market]["sell"], market
        prev_watcher = feed[ph.watcher.name]
        feeds.append(feed)

        # The open orders of the reports are the book.
        book_orders = {m: {} for m in MARKETS}  # type: dict[str, dict[int, tuple[str, Decimal, Decimal]]]
        for user, rep in replicas.items():
            for o in rep.open_orders():
                book_orders[o.market][o.oid] = (o.side, D(o.price), o.remaining)  # type: ignore[arg-type]
        for market in MARKETS:
            reply = ph.l3[market]
            rows = {oid: ("buy", D(p), D(q)) for oid, p, q in reply["bids"]}
            rows.update({oid: ("sell", D(p), D(q)) for oid, p, q in reply["asks"]})
            assert rows == book_orders[market], f"{market}: level-3 book != open orders of the reports"
            assert reply["seq"] == feed[ph.watcher.name].books[market]["seq"]
            # Time priority: within a level, by when each order last joined its back.
            queue_ts = {o.oid: o.queue_ts for rep in replicas.values() for o in rep.open_orders()}
            for side in ("bids", "asks"):
                ahead: dict[str, Decimal] = defaultdict(Decimal)
                last: dict[str, int] = {}
                for oid, p, q in reply[side]:
                    assert queue_ts[oid] > last.get(p, 0), f"{market} {p}: order {oid} out of time priority"
                    last[p] = queue_ts[oid]
                    ctx.cover["level-3 priorities checked"] += 1
                    pos = next(r for r in ph.queue if r["order_id"] == oid)
                    assert (pos["price"], D(pos["remaining_qty"]), D(pos["ahead_qty"])) == (p, D(q), ahead[p]), pos
                    ahead[p] += D(q)

    check_matching(ctx, phases, feeds)
    # Each level-3 answer to a watcher is the book after the last change it had seen.
    last_change: dict[str, int] = {m: 0 for m in MARKETS}
    for ph in phases:
        for m in ph.watcher.log:
            if m["type"] == "book_update":
                last_change[m["market"]] = m["ts"]
            elif m["type"] == "book" and m.get("level") == 3:
                ctx.l3_checkpoints.append((last_change[m["market"]], m))
    check_fifo(ctx)

    # 2. Trades: two reports, one channel message, one ledger line each.
    reports: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for user, rep in replicas.items():
        for m in rep.trades:
            reports[m["trade_id"]].append((user, m))
    channel = {t["trade_id"]: t for feed, ph in zip(feeds, phases) for market in MARKETS
               for t in feed[ph.watcher.name].trades[market]}
    ids = [t["trade_id"] for t in ledger]
    assert ids == sorted(set(ids)), "ledger trade ids not strictly increasing"
    assert set(reports) == set(channel) == set(ids), (
        f"trade ids: reports {len(reports)}, channel {len(channel)}, ledger {len(ids)}"
    )
    by_ledger = {t["trade_id"]: t for t in ledger}
    for tid, pair in reports.items():
        assert len(pair) == 2, f"trade {tid}: {len(pair)} reports"
        (u1, a), (u2, b) = pair
        taker, maker = (a, b) if a["liquidity"] == "taker" else (b, a)
        tu, mu = (u1, u2) if a["liquidity"] == "taker" else (u2, u1)
        assert taker["liquidity"] == "taker" and maker["liquidity"] == "maker", pair
        assert taker["side"] != maker["side"] and taker["market"] == maker["market"], pair
        for k in ("last_price", "last_qty", "ts"):
            assert taker[k] == maker[k], (k, pair)
        if tu == mu:
            ctx.cover["self-trades (stp none)"] += 1
            stp = ctx.order_requests[taker["order_id"]].get("stp") or "cancel_resting"
            assert stp == "none", f"trade {tid}: {tu} traded with itself under stp {stp}"
        ch = channel[tid]
        assert (ch["market"], ch["price"], ch["qty"], ch["taker_side"], ch["ts"]) == (
            taker["market"], taker["last_price"], taker["last_qty"], taker["side"], taker["ts"]), (ch, taker)
        led = by_ledger[tid]
        buyer, seller = (taker, maker) if taker["side"] == "buy" else (maker, taker)
        bu, su = (tu, mu) if taker["side"] == "buy" else (mu, tu)
        assert (led["market"], led["price"], led["qty"], led["taker_side"], led["ts"]) == (
            ch["market"], ch["price"], ch["qty"], ch["taker_side"], ch["ts"]), (led, ch)
        assert (led["buy_order_id"], led["sell_order_id"], led["buyer"], led["seller"]) == (
            buyer["order_id"], seller["order_id"], bu, su), (led, pair)
        assert (led["maker_fee"], led["taker_fee"], led["fee_asset"]) == (
            maker["fee"], taker["fee"], taker["fee_asset"]), (led, pair)
    last_before = 0
    for feed, ph in zip(feeds, phases):
        mixed_ids = [t["trade_id"] for t in feed[ph.mixed.name].trades[BTC] if t["trade_id"] > last_before]
        watched = [t["trade_id"] for t in feed[ph.watcher.name].trades[BTC] if t["trade_id"] > last_before]
        assert mixed_ids == watched
        last_before = feed[ph.watcher.name].last_trade_id

    # 4. Conservation over all accounts plus the fees (the fee account is not visible: its
    # balance is the sum of every fee charged).
    totals = {a: D(0) for a in ASSET_DEC}
    net = {a: D(0) for a in ASSET_DEC}
    for user, rep in replicas.items():
        for a in ASSET_DEC:
            totals[a] += rep.exec_total[a] + rep.deposited[a] - rep.withdrawn[a] + rep.fees[a]
            net[a] += rep.deposited[a] - rep.withdrawn[a]
    assert totals == net, f"not conserved: {totals} vs {net}"

    # Everything was exercised (a run that checks nothing proves nothing).
    for feed, ph in zip(feeds, phases):
        w_md = feed[ph.watcher.name]
        assert w_md.book_replies >= 2 and w_md.trades_replies >= 2 and w_md.updates > 50, vars(w_md)
        assert feed[ph.late.name].snapshots >= 1 and feed[ph.late.name].book_replies >= 1
    assert len(reports) > 50, len(reports)
    kinds: dict[str, int] = defaultdict(int)
    for rep in replicas.values():
        for o in rep.orders.values():
            kinds[o.last["exec_type"]] += 1
    assert all(kinds[k] for k in ("trade", "canceled", "expired", "self_trade_prevented")), kinds
    if os.environ.get("INV_VERBOSE"):
        print(f"\ntrades {len(reports)}, last reports {dict(kinds)}, "
              f"messages {sum(len(s.log) for s in sessions)}")
        for k in sorted(ctx.cover):
            print(f"  {k}: {ctx.cover[k]}")


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_traffic_keeps_every_invariant(tmp_path: Path, seed: int) -> None:
    await _run(tmp_path, seed)
