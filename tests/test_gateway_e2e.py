"""End to end: real sockets against a real ``ExchangeServer`` (ephemeral port, temp data dir).

Every await is bounded (``w`` below wraps ``asyncio.wait_for``), so a broken server fails a
test instead of hanging it. Two kinds of connection are used: ``ExchangeClient`` (the library
every tool uses) and ``Raw``, a bare line socket for what the library never sends (bad JSON,
garbage bytes, a 1 MB line, a reader that never reads).

Synchronisation without sleeps: the server writes a connection's messages in order, so once a
client has the reply to a ``ping`` it holds every message pushed to it before that ping was
handled; ``settle(client)`` returns them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from client import ExchangeClient, ExchangeError, OrderRejectedError
from exchange.gateway import hash_token
from exchange.protocol import MAX_LINE
from exchange.server import ExchangeServer, ServerConfig

T = 5.0  # seconds any single await may take
R = TypeVar("R")
BTC, ACME = "BTC-USD", "ACME-USD"


async def w(aw: Awaitable[R], timeout: float = T) -> R:
    return await asyncio.wait_for(aw, timeout)


def D(text: str) -> Decimal:
    return Decimal(text)


# ------------------------------------------------------------------------------- helpers


class Raw:
    """A bare JSON-lines connection: send anything, read what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.backlog: list[dict[str, Any]] = []  # messages read while waiting for another
        self._ids = 0

    @classmethod
    async def open(cls, server: ExchangeServer) -> Raw:
        assert server.address is not None
        reader, writer = await w(asyncio.open_connection(*server.address, limit=1 << 24))
        return cls(reader, writer)

    async def send(self, msg: dict[str, Any] | bytes) -> None:
        self.writer.write(msg if isinstance(msg, bytes) else orjson.dumps(msg) + b"\n")
        await w(self.writer.drain())

    async def recv(self, timeout: float = T) -> dict[str, Any]:
        line = await w(self.reader.readline(), timeout)
        assert line, "the server closed the connection"
        msg = orjson.loads(line)
        assert isinstance(msg, dict) and "type" in msg, msg
        return msg

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send with a fresh id (unless given) and return the reply carrying that id."""
        if "id" not in msg:
            self._ids += 1
            msg = {**msg, "id": f"r{self._ids}"}
        await self.send(msg)
        return await self.reply_to(msg["id"])

    async def reply_to(self, rid: Any) -> dict[str, Any]:
        while True:
            reply = await self.recv()
            if reply.get("id") == rid:
                return reply
            self.backlog.append(reply)

    async def until_closed(self, timeout: float = T) -> list[dict[str, Any]]:
        """Read to the end; the connection must close (EOF or reset) within ``timeout``."""
        seen: list[dict[str, Any]] = []

        async def drain() -> None:
            while True:
                try:
                    line = await self.reader.readline()
                except (ConnectionError, OSError):
                    return
                if not line:
                    return
                seen.append(orjson.loads(line))

        await w(drain(), timeout)
        return seen

    def close(self) -> None:
        self.writer.transport.abort()


async def settle(client: ExchangeClient) -> list[dict[str, Any]]:
    """Every message pushed to ``client`` so far (see the module docstring)."""
    await w(client.ping())
    return client.pending_events()


async def next_exec(
    client: ExchangeClient, exec_type: str, order_id: int | None = None
) -> dict[str, Any]:
    """The next ``exec`` of this type (and order), skipping everything before it."""
    while True:
        ev = await w(client.next_event(T))
        assert ev is not None, "connection closed"
        if (
            ev.get("type") == "exec"
            and ev["exec_type"] == exec_type
            and (order_id is None or ev["order_id"] == order_id)
        ):
            return ev


def execs(events: list[dict[str, Any]], exec_type: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == "exec" and exec_type in (None, e["exec_type"])]


def without_id(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != "id"}


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ExchangeServer]]]:
    """``await make_server(max_buffer=...)``: a server with its own config, stopped afterwards."""
    servers: list[ExchangeServer] = []

    async def _make(**overrides: Any) -> ExchangeServer:
        cfg = ServerConfig(
            port=0,
            data_dir=tmp_path / f"data{len(servers)}",
            stats_interval=0,
            **overrides,
        )
        srv = ExchangeServer(cfg)
        await w(srv.start())
        servers.append(srv)
        return srv

    yield _make
    for srv in servers:
        await w(srv.stop(), 10)


@pytest.fixture
async def dial() -> AsyncIterator[Callable[..., Awaitable[ExchangeClient]]]:
    """``await dial(server, "alice", token)``: a client of any server, closed afterwards."""
    clients: list[ExchangeClient] = []

    async def _dial(
        server: ExchangeServer, user: str | None = None, token: str | None = None
    ) -> ExchangeClient:
        assert server.address is not None
        client = ExchangeClient(*server.address, timeout=T)
        await w(client.connect())
        clients.append(client)
        if user is not None:
            await w(client.login(user, token))
        return client

    yield _dial
    for client in clients:
        await w(client.close())


@pytest.fixture
async def raws() -> AsyncIterator[Callable[[ExchangeServer], Awaitable[Raw]]]:
    opened: list[Raw] = []

    async def _open(server: ExchangeServer) -> Raw:
        raw = await Raw.open(server)
        opened.append(raw)
        return raw

    yield _open
    for raw in opened:
        raw.close()


# ------------------------------------------------------------------------------- trading


async def test_two_users_trade_and_both_get_every_report(connect) -> None:
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))

    sell = await w(alice.sell(BTC, "1", "100.00", client_order_id="a-1"))
    assert sell["exec_type"] == "new" and sell["status"] == "new"
    assert sell["client_order_id"] == "a-1" and sell["side"] == "sell"
    assert (sell["qty"], sell["filled_qty"], sell["remaining_qty"]) == (
        "1.0000",
        "0.0000",
        "1.0000",
    )
    assert sell["avg_price"] is None and isinstance(sell["ts"], int)

    buy = await w(bob.buy(BTC, "1.5", "101.00"))
    assert buy["exec_type"] == "new" and buy["remaining_qty"] == "1.5000"
    taker = await next_exec(bob, "trade", buy["order_id"])
    maker = await next_exec(alice, "trade", sell["order_id"])

    assert taker["trade_id"] == maker["trade_id"]
    assert (taker["last_price"], taker["last_qty"], taker["liquidity"]) == (
        "100.00",
        "1.0000",
        "taker",
    )
    assert (taker["fee"], taker["fee_asset"]) == ("0.020000", "USD")  # 2 bps of 100 USD
    assert (taker["status"], taker["filled_qty"], taker["remaining_qty"]) == (
        "partially_filled",
        "1.0000",
        "0.5000",
    )
    assert taker["avg_price"] == "100.00" and taker["price"] == "101.00"
    assert (maker["last_price"], maker["last_qty"], maker["liquidity"]) == (
        "100.00",
        "1.0000",
        "maker",
    )
    assert (maker["fee"], maker["fee_asset"]) == ("0.010000", "USD")  # 1 bp
    assert (maker["status"], maker["filled_qty"], maker["remaining_qty"]) == (
        "filled",
        "1.0000",
        "0.0000",
    )
    assert maker["client_order_id"] == "a-1" and maker["avg_price"] == "100.00"

    # Bob's remainder rests at 101; Alice now takes it, so Bob is told as the maker.
    sell2 = await w(alice.sell(BTC, "0.5", "101.00"))
    a_fill = await next_exec(alice, "trade", sell2["order_id"])
    b_fill = await next_exec(bob, "trade", buy["order_id"])
    assert a_fill["liquidity"] == "taker" and b_fill["liquidity"] == "maker"
    assert b_fill["trade_id"] == a_fill["trade_id"] == taker["trade_id"] + 1
    assert (b_fill["status"], b_fill["filled_qty"], b_fill["remaining_qty"]) == (
        "filled",
        "1.5000",
        "0.0000",
    )
    assert abs(D(b_fill["avg_price"]) - D("150.5") / D("1.5")) < D("1e-9")
    assert b_fill["fee"] == "0.005050"  # 1 bp of 50.50

    bob_bal = await w(bob.balances())
    alice_bal = await w(alice.balances())
    # Bob: paid 150.50 and fees on one cumulative basis (100 x 2bp + 50.5 x 1bp = 0.02505).
    assert bob_bal["BTC"] == {**bob_bal["BTC"], "available": "11.50000000", "locked": "0.00000000"}
    assert bob_bal["USD"]["available"] == "99849.474950" and bob_bal["USD"]["locked"] == "0.000000"
    assert alice_bal["BTC"]["available"] == "8.50000000"
    assert alice_bal["USD"]["available"] == "100150.479900"  # +150.50 - 0.01 - 0.0101
    assert await w(alice.orders()) == [] and await w(bob.orders()) == []


async def test_second_session_gets_the_same_reports(connect) -> None:
    alice1 = await w(connect("alice"))
    alice2 = await w(connect("alice"))
    bob1 = await w(connect("bob"))
    bob2 = await w(connect("bob"))

    rest = await w(alice1.sell(BTC, "2", "100.00"))
    buy = await w(bob1.buy(BTC, "0.5", "100.00"))
    # The resting order's owner hears of the trade in its other session, without asking.
    on2 = await next_exec(alice2, "trade", rest["order_id"])
    assert on2["liquidity"] == "maker" and on2["remaining_qty"] == "1.5000" and "id" not in on2

    cancel = await w(alice2.cancel(rest["order_id"]))
    assert cancel["exec_type"] == "canceled" and cancel["status"] == "canceled"
    a1 = execs(await settle(alice1))
    a2 = [on2] + execs(await settle(alice2))  # next_exec skipped alice2's copy of "new"
    # Every report reaches every session; only the requester's copy carries the id.
    assert [e["exec_type"] for e in a1] == ["new", "trade", "canceled"]
    assert [without_id(e) for e in a1[1:]] == [without_id(e) for e in a2]
    assert "id" in a1[0] and "id" not in a1[1] and "id" not in a1[2]
    assert "id" in a2[-1]
    b1, b2 = execs(await settle(bob1)), execs(await settle(bob2))
    assert [without_id(e) for e in b1] == [without_id(e) for e in b2]
    assert [(e["exec_type"], e["order_id"]) for e in b2] == [
        ("new", buy["order_id"]),
        ("trade", buy["order_id"]),
    ]
    assert "id" in b1[0] and "id" not in b2[0]


async def test_rejections_reach_every_session_and_unknown_orders_are_named(connect) -> None:
    """A rejection made before the engine (an off-grid price) is a report like the others:
    each of the user's sessions gets it. Every ``unknown_order`` names the order."""
    alice1 = await w(connect("alice"))
    alice2 = await w(connect("alice"))
    refused = await w(alice1.place(BTC, "buy", "1", "100.001", raise_on_reject=False))
    assert refused["reason"] == "invalid_price" and "id" in refused
    copy = execs(await settle(alice2))
    assert [without_id(e) for e in copy] == [without_id(refused)]
    for op, fields in (("cancel", {}), ("modify", {"qty": "1"}), ("queue_position", {})):
        with pytest.raises(ExchangeError) as err:
            await w(alice1.request(op, order_id=987654, **fields))
        assert err.value.code == "unknown_order" and err.value.reply.get("order_id") == 987654, (op, err.value.reply)
    with pytest.raises(ExchangeError) as err:
        await w(alice1.login("bob"))
    assert err.value.code == "bad_request" and err.value.field == "user"
    # An order id as a string of digits is read as the same number as a JSON integer would be.
    for text, code in (("9223372036854775807", "unknown_order"), ("18446744073709551616", "bad_request")):
        with pytest.raises(ExchangeError) as err:
            await w(alice1.request("cancel", order_id=text))
        assert err.value.code == code, (text, err.value.reply)


async def test_every_op_refuses_a_field_it_does_not_take(server, raws) -> None:
    """A misspelt field is refused, never ignored: ``{"op":"orders","markt":...}`` would
    otherwise list every market's orders, an admin's deposit with "usr" credit the admin."""
    raw = await raws(server)
    assert (await raw.request({"op": "login", "user": "alice", "id": 0}))["type"] == "logged_in"
    before = await raw.request({"op": "balances", "id": 1})
    for request, field in (
        ({"op": "deposit", "asset": "USD", "amount": "5", "usr": "bob"}, "usr"),
        ({"op": "withdraw", "asset": "USD", "amount": "5", "amt": "1"}, "amt"),
        ({"op": "orders", "markt": BTC}, "markt"),
        ({"op": "book", "market": BTC, "levels": 3}, "levels"),
        ({"op": "trades", "market": BTC, "depth": 3}, "depth"),
        ({"op": "subscribe", "channel": "book", "market": BTC, "depth": 5}, "depth"),
        ({"op": "unsubscribe", "chanel": "book", "market": BTC}, "chanel"),
        ({"op": "ping", "ts": 1}, "ts"),
        ({"op": "markets", "market": BTC}, "market"),
        ({"op": "balances", "user": "bob"}, "user"),
        ({"op": "stats", "reset": True}, "reset"),
        ({"op": "login", "user": "alice", "password": "x"}, "password"),
    ):
        reply = await raw.request({**request, "id": 2})
        assert (reply["type"], reply["code"], reply["field"], reply["id"]) == ("error", "bad_request", field, 2), reply
        assert f"unknown field '{field}' in '{request['op']}'" in reply["message"], reply
    ping = await raw.request({"op": "ping", "ts": 1, "id": 3})
    assert ping["message"] == "unknown field 'ts' in 'ping' (it takes no fields besides 'op' and 'id')"
    assert await raw.request({"op": "balances", "id": 1}) == before
    for user, message in ((".", "'user' may not be '.' or '..'"), ("a/b", "'user' may not contain '/' or '\\'")):
        reply = await raw.request({"op": "login", "user": user, "id": 4})
        assert (reply["code"], reply["message"]) == ("bad_request", message), reply


async def test_a_decimal_may_leave_out_either_side_of_its_point(connect) -> None:
    alice = await w(connect("alice"))
    placed = await w(alice.place(BTC, "buy", "1.", ".5"))
    assert (placed["qty"], placed["price"]) == ("1.0000", "0.50")
    for text in (".", "1..", "1.2.", ""):
        refused = await w(alice.place(BTC, "buy", text, "1", raise_on_reject=False))
        assert refused["reason"] == "invalid_quantity", (text, refused)


async def test_an_order_with_a_misspelt_field_is_refused_and_null_means_the_default(server, raws, connect) -> None:
    alice = await w(connect("alice"))
    for field in ("time_in_force", "postOnly", "quantity"):
        with pytest.raises(ExchangeError) as err:
            await w(alice.request("order", market=BTC, side="buy", price="100.00", qty="1", **{field: "ioc"}))
        assert err.value.code == "bad_request" and err.value.field == field, err.value.reply
        assert "unknown field" in err.value.message and "client_order_id" in err.value.message
    assert await w(alice.orders()) == []  # nothing was placed
    raw = await raws(server)  # the client library leaves nulls out: say them on the wire
    assert (await raw.request({"op": "login", "user": "alice", "id": 0}))["type"] == "logged_in"
    new = await raw.request({"op": "order", "id": 1, "market": BTC, "side": "buy", "price": "100.00", "qty": "1",
                             "type": None, "tif": None, "post_only": None, "stp": None, "client_order_id": None})
    assert (new["exec_type"], new["order_type"], new["tif"]) == ("new", "limit", "gtc"), new


async def test_id_is_echoed_on_direct_replies_only(server, raws) -> None:
    alice = await raws(server)
    bob = await raws(server)
    for rid in ("abc", 7, 0, -3, ""):
        assert (await alice.request({"op": "ping", "id": rid}))["type"] == "pong"
    assert (await alice.request({"op": "login", "user": "alice", "id": "L"}))["type"] == "logged_in"
    assert (await bob.request({"op": "login", "user": "bob"}))["type"] == "logged_in"
    for op in (
        {"op": "markets"},
        {"op": "balances"},
        {"op": "orders"},
        {"op": "stats"},
        {"op": "book", "market": BTC},
        {"op": "subscribe", "channel": "trades", "market": BTC},
    ):
        reply = await alice.request({**op, "id": "x-" + op["op"]})
        assert reply["id"] == "x-" + op["op"] and reply["type"] != "error", reply
    # Errors echo the id too, also when the op itself is what is wrong.
    for bad, code in (
        ({"op": "nope"}, "unknown_op"),
        ({"op": 5}, "bad_request"),
        ({"op": "cancel"}, "bad_request"),
        ({"op": "cancel", "order_id": 999}, "unknown_order"),
    ):
        reply = await alice.request({**bad, "id": 41})
        assert (reply["type"], reply["code"], reply["id"]) == ("error", code, 41)
    # An id that is neither a string nor an integer is refused and not echoed.
    await alice.send(b'{"op":"ping","id":1.5}\n')
    reply = await alice.recv()
    assert reply["code"] == "bad_request" and reply["field"] == "id" and "id" not in reply

    await alice.send(
        {"op": "order", "id": "o1", "market": BTC, "side": "sell", "price": "100", "qty": "1"}
    )
    new = await alice.reply_to("o1")
    assert new["exec_type"] == "new"
    await bob.send(
        {"op": "order", "id": 99, "market": BTC, "side": "buy", "price": "100", "qty": "1"}
    )
    first = await bob.recv()
    second = await bob.recv()
    assert (first["exec_type"], first["id"]) == ("new", 99)
    assert second["exec_type"] == "trade" and "id" not in second
    # Alice's fill and the public trade are pushed: no id.
    pushed = [await alice.recv(), await alice.recv()]
    assert {m["type"] for m in pushed} == {"exec", "trade"}
    assert all("id" not in m for m in pushed)


async def test_ioc_fok_market_and_self_trade_reports(connect) -> None:
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))
    await w(alice.sell(BTC, "1", "100.00"))

    ioc = await w(bob.buy(BTC, "3", "100.00", tif="ioc"))
    assert ioc["exec_type"] == "new"
    ev = [e for e in execs(await settle(bob)) if e["order_id"] == ioc["order_id"]]
    assert [e["exec_type"] for e in ev] == ["new", "trade", "expired"]
    assert (ev[-1]["status"], ev[-1]["filled_qty"], ev[-1]["remaining_qty"]) == (
        "expired",
        "1.0000",
        "2.0000",
    )

    fok = await w(bob.buy(BTC, "1", "100.00", tif="fok"))
    mkt = await w(bob.buy(BTC, "1"))  # no price: a market order
    assert mkt["order_type"] == "market" and mkt["tif"] == "ioc" and mkt["price"] is None
    ev = execs(await settle(bob))
    assert [(e["order_id"], e["exec_type"]) for e in ev] == [
        (fok["order_id"], "new"),
        (fok["order_id"], "expired"),
        (mkt["order_id"], "new"),
        (mkt["order_id"], "expired"),
    ]

    # Self-trade prevention (default cancel_resting): the resting order is cancelled.
    resting = await w(alice.sell(BTC, "1", "105.00"))
    crossing = await w(alice.buy(BTC, "1", "105.00"))
    ev = execs(await settle(alice))
    stp = [e for e in ev if e["exec_type"] == "self_trade_prevented"]
    assert (
        len(stp) == 1
        and stp[0]["order_id"] == resting["order_id"]
        and stp[0]["status"] == "canceled"
    )
    assert [o["order_id"] for o in await w(alice.orders())] == [crossing["order_id"]]

    # Rejections before and inside the engine arrive as exec rejected with a reason.
    for kw, reason in (
        ({"market": BTC, "side": "buy", "qty": "1", "price": "100.001"}, "invalid_price"),
        ({"market": BTC, "side": "buy", "qty": "0.00001", "price": "100"}, "invalid_quantity"),
        ({"market": BTC, "side": "buy", "qty": "100000", "price": "100"}, "insufficient_funds"),
        ({"market": ACME, "side": "buy", "qty": "1", "price": "200"}, "price_out_of_band"),
        (
            {"market": BTC, "side": "sell", "qty": "1", "price": "104", "post_only": True},
            "would_take_liquidity",
        ),
        ({"market": "NOPE-USD", "side": "buy", "qty": "1", "price": "1"}, "unknown_market"),
    ):
        with pytest.raises(OrderRejectedError) as err:
            await w(bob.place(**kw))
        report = err.value.report
        assert (report["exec_type"], report["status"], report["reason"]) == (
            "rejected",
            "rejected",
            reason,
        )
        assert report["order_id"] is None and report["message"]
        assert (report["market"], report["side"], report["tif"]) == (
            kw["market"],
            kw["side"],
            "gtc",
        )


# ------------------------------------------------------------------------------- market data


async def test_book_snapshot_levels_depth_and_no_owner(connect) -> None:
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))
    a = [
        await w(alice.buy(BTC, "1", "99.00")),
        await w(alice.buy(BTC, "2", "98.00")),
        await w(alice.sell(BTC, "1", "101.00")),
    ]
    b = [
        await w(bob.buy(BTC, "0.5", "99.00")),
        await w(bob.sell(BTC, "3", "102.00")),
        await w(bob.sell(BTC, "0.25", "101.00")),
    ]

    l2 = await w(bob.book(BTC))
    assert l2["type"] == "book" and l2["level"] == 2 and l2["market"] == BTC
    assert l2["bids"] == [["99.00", "1.5000", 2], ["98.00", "2.0000", 1]]  # best (highest) first
    assert l2["asks"] == [["101.00", "1.2500", 2], ["102.00", "3.0000", 1]]  # best (lowest) first
    assert l2["seq"] == 6  # one delta per resting order so far

    top = await w(bob.book(BTC, depth=1))
    assert (
        top["bids"] == l2["bids"][:1] and top["asks"] == l2["asks"][:1] and top["seq"] == l2["seq"]
    )

    l3 = await w(alice.book(BTC, level=3))
    assert l3["level"] == 3 and l3["seq"] == l2["seq"]
    assert l3["bids"] == [
        [a[0]["order_id"], "99.00", "1.0000"],
        [b[0]["order_id"], "99.00", "0.5000"],
        [a[1]["order_id"], "98.00", "2.0000"],
    ]
    assert l3["asks"] == [
        [a[2]["order_id"], "101.00", "1.0000"],
        [b[2]["order_id"], "101.00", "0.2500"],
        [b[1]["order_id"], "102.00", "3.0000"],
    ]
    assert (await w(alice.book(BTC, level=3, depth=1)))["asks"] == l3["asks"][:2]
    text = json.dumps(l3)
    assert "alice" not in text and "bob" not in text

    # Default depth is 20 levels.
    for i in range(25):
        await w(alice.buy(ACME, "1", f"{91 + i * 0.25:.2f}"))
    acme = await w(alice.book(ACME))
    assert len(acme["bids"]) == 20 and acme["bids"][0][0] == "97.00" and acme["asks"] == []
    assert len((await w(alice.book(ACME, depth=10_000)))["bids"]) == 25


async def test_book_and_trades_subscriptions_follow_a_random_burst(connect) -> None:
    rng = random.Random(20240607)
    users = [await w(connect(f"trader{i}")) for i in range(4)]
    watcher = await w(connect())  # anonymous: market data needs no login
    # Something on the book before subscribing, so the snapshot is not empty.
    await w(users[0].buy(BTC, "1", "99.00"))
    await w(users[1].sell(BTC, "1", "101.00"))
    assert (await w(watcher.subscribe("book", BTC)))["type"] == "subscribed"
    assert (await w(watcher.subscribe("trades", BTC)))["type"] == "subscribed"

    open_ids: list[list[int]] = [[] for _ in users]
    taker_trades: set[int] = set()
    for _ in range(12):  # batches of pipelined requests
        futures: list[tuple[int, asyncio.Future[dict[str, Any]]]] = []
        for _ in range(25):
            u = rng.randrange(len(users))
            roll = rng.random()
            price = f"{rng.randint(9700, 10300) / 100:.2f}"
            if roll < 0.25 and open_ids[u]:
                oid = open_ids[u].pop(rng.randrange(len(open_ids[u])))
                op, fields = "cancel", {"order_id": oid}
            elif roll < 0.33 and open_ids[u]:
                qty = f"{rng.randint(1, 300) / 1000:.3f}"
                op, fields = (
                    "modify",
                    {"order_id": rng.choice(open_ids[u]), "qty": qty, "price": price},
                )
            elif roll < 0.38:  # other markets must not leak into the BTC-USD feeds
                side = rng.choice(["buy", "sell"])
                op = "order"
                fields = {
                    "market": ACME,
                    "side": side,
                    "qty": "1",
                    "price": f"{rng.randint(95, 105)}.00",
                }
            else:
                side = rng.choice(["buy", "sell"])
                qty = f"{rng.randint(1, 500) / 1000:.3f}"
                tif = rng.choice(["gtc", "gtc", "gtc", "ioc"])
                op = "order"
                fields = {"market": BTC, "side": side, "qty": qty, "price": price, "tif": tif}
            futures.append((u, users[u].send(op, **fields)))
        for u, fut in futures:
            reply = await w(fut)
            if reply.get("exec_type") == "new" and reply["tif"] == "gtc" and reply["market"] == BTC:
                open_ids[u].append(reply["order_id"])
    for client in users:
        for ev in execs(await settle(client), "trade"):
            if ev["market"] == BTC and ev["liquidity"] == "taker":
                taker_trades.add(ev["trade_id"])

    final = await w(watcher.book(BTC, depth=10_000))
    pushed = watcher.pending_events()  # everything before the reply above
    snapshot = pushed[0]
    assert snapshot["type"] == "book" and snapshot["level"] == 2 and "id" not in snapshot
    book = {
        "buy": {p: D(q) for p, q, _ in snapshot["bids"]},
        "sell": {p: D(q) for p, q, _ in snapshot["asks"]},
    }
    seq = snapshot["seq"]
    trade_ids = []
    updates = 0
    for msg in pushed[1:]:
        assert msg["market"] == BTC, msg
        if msg["type"] == "book_update":
            assert msg["seq"] == seq + 1, "book_update seq must continue by exactly one"
            seq = msg["seq"]
            updates += 1
            if D(msg["qty"]) == 0:
                del book[msg["side"]][msg["price"]]
            else:
                book[msg["side"]][msg["price"]] = D(msg["qty"])
        else:
            assert msg["type"] == "trade", msg
            assert set(msg) == {"type", "market", "trade_id", "price", "qty", "taker_side", "ts"}
            trade_ids.append(msg["trade_id"])
    assert updates > 100 and len(trade_ids) > 20, (updates, len(trade_ids))
    assert seq == final["seq"]
    rebuilt_bids = sorted(book["buy"].items(), key=lambda kv: -D(kv[0]))
    rebuilt_asks = sorted(book["sell"].items(), key=lambda kv: D(kv[0]))
    assert rebuilt_bids == [(p, D(q)) for p, q, _ in final["bids"]]
    assert rebuilt_asks == [(p, D(q)) for p, q, _ in final["asks"]]
    assert trade_ids == sorted(trade_ids) and len(set(trade_ids)) == len(trade_ids)
    assert set(trade_ids) == taker_trades

    # Level 3 agrees with level 2.
    l3 = await w(watcher.book(BTC, depth=10_000, level=3))
    for side, l2_rows in (("bids", final["bids"]), ("asks", final["asks"])):
        totals: dict[str, Decimal] = {}
        for _oid, price, qty in l3[side]:
            totals[price] = totals.get(price, D("0")) + D(qty)
        assert [(p, D(q)) for p, q, _ in l2_rows] == list(totals.items())

    # After unsubscribing, nothing more arrives.
    assert (await w(watcher.unsubscribe("book", BTC)))["type"] == "unsubscribed"
    assert (await w(watcher.unsubscribe("trades", BTC)))["type"] == "unsubscribed"
    await w(users[0].buy(BTC, "0.1", "110.00"))
    assert await settle(watcher) == []


# ------------------------------------------------------------------------------- errors


async def test_every_gateway_error_code(server, raws, connect) -> None:
    conn = await raws(server)

    # Before login: public ops work, private ones get not_logged_in.
    assert (await conn.request({"op": "ping"}))["type"] == "pong"
    assert (await conn.request({"op": "markets"}))["type"] == "markets"
    assert (await conn.request({"op": "book", "market": BTC}))["type"] == "book"
    for op in (
        "balances",
        "orders",
        "order",
        "cancel",
        "modify",
        "deposit",
        "withdraw",
        "queue_position",
    ):
        reply = await conn.request({"op": op})
        assert (reply["type"], reply["code"]) == ("error", "not_logged_in"), reply

    # bad_json: the connection stays open.
    for junk in (b"{not json\n", b'{"op":"ping"\n', b"\xff\xfe\n", b'"\\ud800"\n'):
        await conn.send(junk)
        reply = await conn.recv()
        assert (reply["type"], reply["code"]) == ("error", "bad_json") and "id" not in reply
    assert (await conn.request({"op": "ping"}))["type"] == "pong"

    # unknown_op
    reply = await conn.request({"op": "fly"})
    assert reply["code"] == "unknown_op" and "fly" in reply["message"]

    assert (await conn.request({"op": "login", "user": "alice"}))["type"] == "logged_in"
    bob = await w(connect("bob"))
    bob_order = await w(bob.sell(BTC, "1", "150.00"))
    oid = bob_order["order_id"]

    # bad_request names the field, for missing and for ill-typed fields.
    cases = [
        ({"op": 5}, "op"),
        ({"id": 1}, "op"),
        ({"op": "login"}, "user"),
        ({"op": "login", "user": 7}, "user"),
        ({"op": "order", "side": "buy", "qty": "1", "price": "1"}, "market"),
        ({"op": "order", "market": BTC, "qty": "1", "price": "1"}, "side"),
        ({"op": "order", "market": BTC, "side": ["buy"], "qty": "1", "price": "1"}, "side"),
        ({"op": "order", "market": BTC, "side": "buy", "price": "1"}, "qty"),
        ({"op": "order", "market": BTC, "side": "buy", "qty": True, "price": "1"}, "qty"),
        ({"op": "order", "market": BTC, "side": "buy", "qty": "1"}, "price"),
        ({"op": "order", "market": BTC, "side": "buy", "qty": "1", "price": {"p": 1}}, "price"),
        ({"op": "order", "market": BTC, "side": "buy", "type": "stop", "qty": "1"}, "type"),
        (
            {"op": "order", "market": BTC, "side": "buy", "qty": "1", "price": "1", "tif": "day"},
            "tif",
        ),
        (
            {
                "op": "order",
                "market": BTC,
                "side": "buy",
                "qty": "1",
                "price": "1",
                "post_only": "yes",
            },
            "post_only",
        ),
        ({"op": "order", "market": BTC, "side": "buy", "qty": "1", "price": "1", "stp": 1}, "stp"),
        (
            {
                "op": "order",
                "market": BTC,
                "side": "buy",
                "qty": "1",
                "price": "1",
                "client_order_id": "x" * 65,
            },
            "client_order_id",
        ),
        ({"op": "cancel"}, "order_id"),
        ({"op": "cancel", "order_id": "abc"}, "order_id"),
        ({"op": "modify", "order_id": oid}, "qty"),
        ({"op": "modify", "order_id": oid, "price": [1]}, "price"),
        ({"op": "book", "market": BTC, "depth": 0}, "depth"),
        ({"op": "book", "market": BTC, "depth": "5"}, "depth"),
        ({"op": "book", "market": BTC, "level": 1}, "level"),
        ({"op": "book"}, "market"),
        ({"op": "subscribe", "channel": "news", "market": BTC}, "channel"),
        ({"op": "orders", "market": ["x"]}, "market"),
        ({"op": "deposit", "amount": "1"}, "asset"),
        ({"op": "deposit", "asset": "USD"}, "amount"),
        ({"op": "deposit", "asset": "USD", "amount": [1]}, "amount"),
        ({"op": "queue_position", "order_id": None}, "order_id"),
    ]
    for request, field in cases:
        reply = await conn.request(request)
        assert (reply["type"], reply["code"], reply.get("field")) == (
            "error",
            "bad_request",
            field,
        ), (request, reply)
    await conn.send(b"[1, 2]\n")
    assert (await conn.recv())["code"] == "bad_request"

    # unknown_order: an unknown id and another user's order get identical replies.
    replies = []
    for op in (
        {"op": "cancel", "order_id": oid},
        {"op": "modify", "order_id": oid, "qty": "2"},
        {"op": "queue_position", "order_id": oid},
    ):
        theirs = await conn.request({**op, "id": "q"})
        assert theirs["code"] == "unknown_order", theirs
        replies.append(theirs)
    assert [o["order_id"] for o in await w(bob.orders())] == [oid]  # untouched
    await w(bob.cancel(oid))
    for op, theirs in zip(
        (
            {"op": "cancel", "order_id": oid},
            {"op": "modify", "order_id": oid, "qty": "2"},
            {"op": "queue_position", "order_id": oid},
        ),
        replies,
    ):
        assert await conn.request({**op, "id": "q"}) == theirs
    for missing in (10**9, -1, 0):
        reply = await conn.request({"op": "cancel", "order_id": missing})
        assert reply["code"] == "unknown_order"

    # forbidden: funding another user needs an admin session.
    before = await w(bob.balances())
    for op in ("deposit", "withdraw"):
        reply = await conn.request({"op": op, "asset": "USD", "amount": "5", "user": "bob"})
        assert reply["code"] == "forbidden", reply
        assert reply["message"] == "only an admin session may deposit to or withdraw from another user's account"
    assert await w(bob.balances()) == before

    # unknown_market on the data ops (an order on it is an exec rejected instead).
    for request in (
        {"op": "book", "market": "XYZ"},
        {"op": "subscribe", "channel": "book", "market": "XYZ"},
        {"op": "unsubscribe", "channel": "trades", "market": "XYZ"},
        {"op": "orders", "market": "XYZ"},
    ):
        reply = await conn.request(request)
        assert (reply["code"], reply["field"]) == ("unknown_market", "market"), reply

    # Engine reasons as error codes for funding and modify.
    mine = (
        await conn.request(
            {
                "op": "order",
                "market": ACME,
                "side": "sell",
                "qty": "5",
                "price": "105.00",
                "post_only": True,
            }
        )
    )["order_id"]
    await conn.request({"op": "order", "market": ACME, "side": "buy", "qty": "1", "price": "95.00"})
    for request, code in (
        ({"op": "withdraw", "asset": "USD", "amount": "1000000000"}, "insufficient_funds"),
        ({"op": "withdraw", "asset": "DOGE", "amount": "1"}, "unknown_asset"),
        ({"op": "deposit", "asset": "USD", "amount": "0.0000001"}, "invalid_amount"),
        ({"op": "deposit", "asset": "USD", "amount": "0"}, "invalid_amount"),
        ({"op": "deposit", "asset": "USD", "amount": "-5"}, "invalid_amount"),
        ({"op": "modify", "order_id": mine, "qty": "0"}, "invalid_quantity"),
        ({"op": "modify", "order_id": mine, "qty": "1.5"}, "invalid_quantity"),
        ({"op": "modify", "order_id": mine, "price": "105.001"}, "invalid_price"),
        ({"op": "modify", "order_id": mine, "price": "150.00"}, "price_out_of_band"),
        ({"op": "modify", "order_id": mine, "price": "95.00"}, "would_take_liquidity"),
        ({"op": "modify", "order_id": mine, "qty": "100000"}, "insufficient_funds"),
    ):
        reply = await conn.request(request)
        assert (reply["type"], reply["code"]) == ("error", code), (request, reply)
    orders = (await conn.request({"op": "orders", "market": ACME}))["orders"]
    assert [(o["order_id"], o["price"], o["qty"]) for o in orders if o["order_id"] == mine] == [
        (mine, "105.00", "5")
    ]

    # line_too_long: a 1 MB line gets the error and the connection is closed.
    victim = await raws(server)
    try:
        await victim.send(b'{"op":"ping","pad":"' + b"x" * (1 << 20) + b'"}\n')
    except ConnectionError:  # the server may close before the whole megabyte is written
        pass
    seen = await victim.until_closed()
    assert seen[:1] == [
        {
            "type": "error",
            "code": "line_too_long",
            "message": f"a line may be at most {MAX_LINE} bytes",
        }
    ]
    # So does a line that never ends.
    endless = await raws(server)
    await endless.send(b"y" * (MAX_LINE + 1))
    assert [m["code"] for m in await endless.until_closed()] == ["line_too_long"]
    # A line of exactly MAX_LINE bytes is fine.
    exact = b'{"op":"ping","id":"big'  # padded in its id: ping takes no other field
    exact += b"z" * (MAX_LINE - len(exact) - 2) + b'"}'
    assert len(exact) == MAX_LINE
    await conn.send(exact + b"\n")
    assert (await conn.reply_to(exact[19:-2].decode()))["type"] == "pong"
    assert (await w(bob.ping()))["type"] == "pong"


async def test_auth_failed_and_keys_mode(make_server, dial, tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    accounts.write_text(
        json.dumps(
            {
                "users": {
                    "alice": {"token_hash": hash_token("alice-secret")},
                    "bob": {"token_hash": hash_token("bob-secret")},
                    "root": {"token_hash": hash_token("root-secret"), "admin": True},
                }
            }
        )
    )
    server = await make_server(auth="keys", accounts_file=accounts)

    probe = await dial(server)
    refusals = []
    for user, token in (
        ("alice", "wrong"),
        ("alice", None),
        ("mallory", "alice-secret"),
        ("alice", ""),
    ):
        with pytest.raises(ExchangeError) as err:
            await w(probe.login(user, token))
        assert err.value.code == "auth_failed"
        refusals.append(without_id(err.value.reply))
    assert all(r == refusals[0] for r in refusals)  # unknown user and wrong token look alike
    with pytest.raises(ExchangeError) as err:
        await w(probe.balances())
    assert err.value.code == "not_logged_in"

    alice = await dial(server, "alice", "alice-secret")
    root = await dial(server, "root", "root-secret")
    bob = await dial(server, "bob", "bob-secret")
    # No demo funding in keys mode.
    assert (await w(alice.balances()))["USD"]["available"] == "0.000000"

    funded = await w(root.deposit("USD", "2500.5", user="alice"))
    assert funded["type"] == "balances" and funded["user"] == "alice"
    assert funded["balances"]["USD"]["available"] == "2500.500000"
    assert (await w(alice.balances()))["USD"]["available"] == "2500.500000"
    await w(root.deposit("BTC", "1", user="bob"))

    for call in (
        lambda: alice.deposit("USD", "1", user="bob"),
        lambda: alice.deposit("USD", "1"),
        lambda: bob.withdraw("BTC", "1", user="alice"),
    ):
        with pytest.raises(ExchangeError) as err:
            await w(call())
        assert err.value.code == "forbidden"
    taken = await w(alice.withdraw("USD", "0.5"))
    assert taken["balances"]["USD"]["available"] == "2500.000000"
    # Money for a user nobody can log in as would wait for good: refused, naming the user.
    with pytest.raises(ExchangeError) as err:
        await w(root.deposit("USD", "1", user="ghost"))
    assert (err.value.code, err.value.field) == ("forbidden", "user")
    assert "no user 'ghost' in the accounts file" in err.value.message
    # A misspelt target must not credit the admin itself.
    before = await w(root.balances())
    with pytest.raises(ExchangeError) as err:
        await w(root.request("deposit", asset="USD", amount="1", usr="alice"))
    assert (err.value.code, err.value.field) == ("bad_request", "usr")
    assert await w(root.balances()) == before

    # The funded users trade; neither can see the other's orders.
    sell = await w(bob.sell(BTC, "1", "100"))
    assert await w(alice.orders()) == []
    await w(alice.buy(BTC, "1", "100"))
    fill = await next_exec(bob, "trade", sell["order_id"])
    assert fill["status"] == "filled"
    assert (await w(alice.balances()))["BTC"]["available"] == "1.00000000"


async def test_random_garbage_changes_nothing(server, raws, connect, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="exchange")
    rng = random.Random(1234)
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))
    await w(alice.sell(BTC, "1", "101.00"))
    await w(bob.buy(BTC, "2", "99.00"))
    await w(bob.buy(ACME, "3", "99.00"))

    async def state() -> Any:
        return (
            without_id(await w(alice.book(BTC, level=3, depth=10_000))),
            without_id(await w(alice.book(ACME, level=3))),
            await w(alice.balances()),
            await w(bob.balances()),
            await w(alice.orders()),
            await w(bob.orders()),
        )

    before = await state()
    templates = [
        b'{"op":"order","market":"BTC-USD","side":"buy","qty":"1","price":"101.00"}',
        b'{"op":"cancel","order_id":1}',
        b'{"op":"book","market":"BTC-USD","depth":3}',
        b'{"op":"withdraw","asset":"USD","amount":"5"}',
        b'{"op":"modify","order_id":2,"qty":"1"}',
    ]
    anonymous = await raws(server)
    logged_in = await raws(server)
    assert (await logged_in.request({"op": "login", "user": "gremlin"}))["type"] == "logged_in"
    replies = 0
    for round_ in range(150):
        kind = rng.random()
        if kind < 0.4:  # pure noise, NUL bytes and invalid UTF-8 included
            chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
        elif kind < 0.7:  # a real request with bytes flipped
            line = bytearray(rng.choice(templates))
            for _ in range(rng.randint(1, 4)):
                line[rng.randrange(len(line))] = rng.randrange(256)
            chunk = bytes(line)
        else:  # valid JSON with hostile values
            chunk = orjson.dumps(
                {
                    "op": rng.choice(["order", "cancel", "book", "login", "modify"]),
                    "market": rng.choice([BTC, "\x00", None, 5]),
                    "user": rng.choice(["\x00", "../../etc", "", "__fees__", "a/b", 3]),
                    "order_id": rng.choice([1, "1\x00", -1, 2**63 - 1, [1]]),
                    "side": rng.choice(["buy", "\x00sell", {"x": 1}]),
                    "qty": rng.choice(["1e3", "-1", "NaN", "\x00", 1e308]),
                    "price": rng.choice(["0", "1" * 50, 0.1, ""]),
                }
            )
        target = anonymous if round_ % 2 else logged_in
        # The logged-in session only gets pure noise: a flipped byte may spell a valid order.
        if target is logged_in and kind >= 0.4:
            continue
        await target.send(chunk + b"\n")
    for conn in (anonymous, logged_in):
        await conn.send({"op": "ping", "id": "end"})
        await conn.reply_to("end")
        for msg in conn.backlog:
            replies += 1
            assert msg["type"] in ("error", "pong", "book"), msg  # never logged_in, exec...
            if msg["type"] == "error":
                assert msg["code"] in {
                    "bad_json",
                    "bad_request",
                    "unknown_op",
                    "not_logged_in",
                    "unknown_market",
                }, msg
    assert replies > 50
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert await state() == before
    stats = await w(alice.stats())
    assert (stats["connections"], stats["open_orders"], stats["orders"]) == (4, 3, 3)
    # Everyone still trades.
    fill = await w(bob.buy(BTC, "1", "101.00"))
    assert (await next_exec(bob, "trade", fill["order_id"]))["status"] == "filled"


async def test_fifty_concurrent_connections(server, connect) -> None:
    clients = await w(asyncio.gather(*(connect(f"u{i:02d}") for i in range(50))), 20)

    async def trade(i: int, client: ExchangeClient) -> list[dict[str, Any]]:
        side = "buy" if i % 2 else "sell"
        futures = [
            client.send(
                "order",
                market=BTC,
                side=side,
                qty="0.1",
                price=f"{100 + (k - 2) * (1 if i % 2 else -1) * 0.01:.2f}",
            )
            for k in range(4)
        ]
        return [await w(f) for f in futures]

    results = await w(asyncio.gather(*(trade(i, c) for i, c in enumerate(clients))), 20)
    ids = [r["order_id"] for rs in results for r in rs]
    assert all(r["exec_type"] == "new" for rs in results for r in rs)
    assert len(set(ids)) == 200

    # Each trade was reported once to each side, with the same quantity; the engine agrees.
    fills: dict[int, list[dict[str, Any]]] = {}
    for client in clients:
        for ev in execs(await settle(client), "trade"):
            fills.setdefault(ev["trade_id"], []).append(ev)
    assert fills
    for trade_id, pair in fills.items():
        assert sorted(e["liquidity"] for e in pair) == ["maker", "taker"], trade_id
        assert pair[0]["last_qty"] == pair[1]["last_qty"] and pair[0]["side"] != pair[1]["side"]
    stats = await w(clients[0].stats())
    assert stats["connections"] >= 50 and stats["orders"] == 200 and stats["trades"] == len(fills)
    server.engine.check_invariants()


async def test_a_subscriber_that_never_reads_is_dropped(make_server, dial) -> None:
    server = await make_server(max_buffer=64 * 1024)
    assert server.address is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await w(loop.sock_connect(sock, server.address))
        await w(
            loop.sock_sendall(
                sock,
                b'{"op":"subscribe","channel":"book","market":"BTC-USD"}\n'
                b'{"op":"subscribe","channel":"trades","market":"BTC-USD"}\n',
            )
        )
        alice = await dial(server, "alice")
        bob = await dial(server, "bob")
        rounds = 0
        while (await w(alice.stats()))["slow_consumers"] == 0:
            rounds += 1
            assert rounds < 1500, "the slow subscriber was never dropped"
            # Fifty resting orders and their cancels (a hundred book updates), and a trade.
            news = [
                alice.send(
                    "order", market=BTC, side="buy", qty="0.01", price=f"{1 + k}.{rounds % 100:02d}"
                )
                for k in range(50)
            ]
            ids = [(await w(f))["order_id"] for f in news]
            for f in [alice.send("cancel", order_id=oid) for oid in ids]:
                assert (await w(f))["exec_type"] == "canceled"
            await w(alice.sell(BTC, "0.001", "500.00"))
            taker = await w(bob.buy(BTC, "0.001", "500.00"))
            assert (await next_exec(bob, "trade", taker["order_id"]))["status"] == "filled"

        # The dropped socket reaches its end; the others go on trading.
        def read_to_end() -> None:
            sock.setblocking(True)
            sock.settimeout(T)
            try:
                while sock.recv(1 << 16):
                    pass
            except ConnectionResetError:
                pass

        await w(loop.run_in_executor(None, read_to_end), 2 * T)
        sell = await w(alice.sell(BTC, "0.5", "100.00"))
        await w(bob.buy(BTC, "0.5", "100.00"))
        assert (await next_exec(alice, "trade", sell["order_id"]))["status"] == "filled"
        stats = await w(bob.stats())
        assert stats["slow_consumers"] == 1 and stats["connections"] == 2
    finally:
        sock.close()


# ------------------------------------------------------------------------------- the other ops


async def test_deposit_and_withdraw_reply_with_balances(connect) -> None:
    alice = await w(connect("alice"))
    reply = await w(alice.deposit("USD", "12.345678"))
    assert reply["type"] == "balances" and reply["user"] == "alice"
    assert reply["balances"]["USD"]["available"] == "100012.345678"
    assert reply["balances"]["USD"]["deposited"] == "100012.345678"
    assert set(reply["balances"]) == {"USD", "BTC", "ACME"}
    assert set(reply["balances"]["USD"]) >= {"available", "locked"}
    reply = await w(alice.withdraw("BTC", "2.5"))
    assert reply["balances"]["BTC"]["available"] == "7.50000000"
    assert reply["balances"]["BTC"]["withdrawn"] == "2.50000000"
    reply = await w(alice.deposit("ACME", 5, user="alice"))  # oneself by name; a JSON number
    assert reply["balances"]["ACME"]["available"] == "1005"
    # Locked funds cannot be withdrawn.
    await w(alice.sell(BTC, "7", "1000.00"))
    with pytest.raises(ExchangeError) as err:
        await w(alice.withdraw("BTC", "1"))
    assert err.value.code == "insufficient_funds"
    bal = await w(alice.balances())
    assert (bal["BTC"]["available"], bal["BTC"]["locked"]) == ("0.50000000", "7.00000000")


async def test_orders_op_lists_own_open_orders(connect) -> None:
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))
    o1 = await w(alice.buy(BTC, "1", "90.00", client_order_id="first"))
    o2 = await w(alice.sell(BTC, "2", "110.00"))
    o3 = await w(alice.buy(ACME, "4", "95.00", post_only=True))
    await w(bob.buy(BTC, "1", "91.00"))
    await w(bob.buy(BTC, "0.5", "110.00"))  # partly fills o2

    mine = await w(alice.orders())
    assert [o["order_id"] for o in mine] == [o1["order_id"], o2["order_id"], o3["order_id"]]
    first = mine[0]
    assert first == {
        "order_id": o1["order_id"],
        "market": BTC,
        "side": "buy",
        "order_type": "limit",
        "tif": "gtc",
        "price": "90.00",
        "qty": "1.0000",
        "filled_qty": "0.0000",
        "remaining_qty": "1.0000",
        "avg_price": None,
        "status": "new",
        "post_only": False,
        "ts": o1["ts"],
        "client_order_id": "first",
    }
    assert (mine[1]["status"], mine[1]["filled_qty"], mine[1]["avg_price"]) == (
        "partially_filled",
        "0.5000",
        "110.00",
    )
    assert mine[2]["post_only"] is True and mine[2]["qty"] == "4"
    assert [o["order_id"] for o in await w(alice.orders(ACME))] == [o3["order_id"]]
    await w(alice.cancel(o1["order_id"]))
    assert [o["order_id"] for o in await w(alice.orders(BTC))] == [o2["order_id"]]
    assert len(await w(bob.orders())) == 1


async def test_cancel_all_cancels_only_the_users_open_orders_each_reported_before_the_answer(connect) -> None:
    alice, alice2, bob = await w(connect("alice")), await w(connect("alice")), await w(connect("bob"))
    before = await w(alice.balances())
    b1 = await w(alice.buy(BTC, "1", "90.00"))
    b2 = await w(alice.sell(BTC, "2", "110.00"))
    a1 = await w(alice.buy(ACME, "4", "95.00"))
    theirs = await w(bob.buy(BTC, "1", "91.00"))
    await w(bob.buy(BTC, "0.5", "110.00"))  # b2 partly filled: its rest is canceled
    await settle(alice)
    await settle(alice2)

    reply = await w(alice.request("cancel_all", market=BTC))
    assert reply == {"type": "canceled_all", "market": BTC, "order_ids": [b1["order_id"], b2["order_id"]],
                     "id": reply["id"]}
    for session in (alice, alice2):  # every session hears each cancel, before the answer
        canceled = execs(await settle(session), "canceled")
        assert [(e["order_id"], e["remaining_qty"]) for e in canceled] == [
            (b1["order_id"], "1.0000"), (b2["order_id"], "1.5000")]
        assert all("id" not in e for e in canceled)
        assert len({e["ts"] for e in canceled}) == 1  # one request, one ts
    assert [o["order_id"] for o in await w(alice.orders())] == [a1["order_id"]]
    assert [o["order_id"] for o in await w(bob.orders())] == [theirs["order_id"]]

    assert (await w(alice.cancel_all()))["order_ids"] == [a1["order_id"]]
    assert await w(alice.orders()) == []
    assert (await w(alice.cancel_all()))["order_ids"] == []
    after = await w(alice.balances())
    assert after.keys() == before.keys() and all(D(bal["locked"]) == 0 for bal in after.values())
    for bad, code in (({"market": "NOPE-USD"}, "unknown_market"), ({"market": 5}, "bad_request"),
                      ({"markets": BTC}, "bad_request")):
        with pytest.raises(ExchangeError) as info:
            await w(alice.request("cancel_all", **bad))
        assert info.value.code == code
    anon = await w(connect())
    with pytest.raises(ExchangeError) as info:
        await w(anon.request("cancel_all"))
    assert info.value.code == "not_logged_in"


async def test_client_order_ids_are_unique_among_open_orders_and_cancel_by_them(connect) -> None:
    """A client order id names one open order of its account: a second order with it is
    refused until the first leaves the book, and ``cancel`` takes it instead of the id."""
    alice = await w(connect("alice"))
    alice2 = await w(connect("alice"))
    bob = await w(connect("bob"))
    first = await w(alice.buy(BTC, "1", "90.00", client_order_id="q1"))
    before = await w(alice.balances())
    again = await w(alice.sell(BTC, "1", "95.00", client_order_id="q1", raise_on_reject=False))
    assert (again["exec_type"], again["reason"], again["client_order_id"]) == (
        "rejected", "duplicate_client_order_id", "q1"), again
    assert "already" in again["message"]
    assert [without_id(e) for e in execs(await settle(alice2))][-1] == without_id(again)
    assert await w(alice.balances()) == before  # nothing reserved, nothing placed
    assert [o["order_id"] for o in await w(alice.orders())] == [first["order_id"]]
    # Another account may use the same id; an order that does not rest frees nothing of Alice's.
    await w(bob.buy(BTC, "1", "80.00", client_order_id="q1"))
    ioc = await w(alice.buy(BTC, "1", "80.00", tif="ioc", client_order_id="q2", raise_on_reject=False))
    assert ioc["exec_type"] == "new"
    # Cancel by the client order id; then the id is free again.
    done = await w(alice.cancel(client_order_id="q1"))
    assert (done["exec_type"], done["order_id"], done["client_order_id"]) == (
        "canceled", first["order_id"], "q1"), done
    reused = await w(alice.buy(BTC, "1", "90.00", client_order_id="q1"))
    assert reused["order_id"] != first["order_id"]
    # An order that fills completely frees its id too.
    await w(bob.sell(BTC, "1", "90.00"))
    await settle(alice)
    assert await w(alice.orders()) == []
    assert (await w(alice.buy(BTC, "1", "90.00", client_order_id="q1")))["exec_type"] == "new"
    # What a cancel by client order id refuses, with nothing changed.
    for fields, code, field in (
        ({"client_order_id": "nope"}, "unknown_order", None),
        ({"client_order_id": "q1", "order_id": 1}, "bad_request", "client_order_id"),
        ({"client_order_id": 7}, "bad_request", "client_order_id"),
    ):
        with pytest.raises(ExchangeError) as err:
            await w(alice.request("cancel", **fields))
        assert err.value.code == code and err.value.field == field, (fields, err.value.reply)
    with pytest.raises(ExchangeError) as err:
        await w(bob.cancel(client_order_id="q2"))  # Alice's IOC is gone, and it was hers
    assert (err.value.code, err.value.reply.get("client_order_id")) == ("unknown_order", "q2")
    bobs = await w(bob.cancel(client_order_id="q1"))  # his own q1, not Alice's
    assert bobs["exec_type"] == "canceled" and bobs["price"] == "80.00"
    assert len(await w(alice.orders())) == 1
    # An id is 1 to 64 printable characters, wherever it is given; modify and
    # queue_position name the order by order_id only, and say so.
    open_id = (await w(alice.orders()))[0]["order_id"]
    for op, fields in (
        ("order", {"market": BTC, "side": "buy", "price": "90.00", "qty": "1", "client_order_id": ""}),
        ("order", {"market": BTC, "side": "buy", "price": "90.00", "qty": "1", "client_order_id": "a\nb"}),
        ("order", {"market": BTC, "side": "buy", "price": "90.00", "qty": "1", "client_order_id": "x" * 65}),
        ("cancel", {"client_order_id": "x" * 5000}),
        ("order_status", {"client_order_id": "\u2028"}),
        ("modify", {"order_id": open_id, "client_order_id": "new-name", "qty": "2"}),
        ("queue_position", {"client_order_id": "q1"}),
        ("cancel", {"order_id": open_id, "market": BTC}),
    ):
        with pytest.raises(ExchangeError) as err:
            await w(alice.request(op, **fields))
        assert err.value.code == "bad_request", (op, fields, err.value.reply)
        assert err.value.field in ("client_order_id", "market"), (op, fields, err.value.reply)
        assert len(err.value.message) < 200
    with pytest.raises(ExchangeError) as err:
        await w(alice.request("cancel"))
    assert "client_order_id" in err.value.message and err.value.field == "order_id"
    assert [o["order_id"] for o in await w(alice.orders())] == [open_id]  # nothing changed
    assert (await w(alice.orders()))[0]["qty"] == "1.0000"


async def test_order_status_of_open_and_finished_orders(server, connect) -> None:
    """``order_status`` answers for an open order as ``orders`` lists it, and for an order
    that finished (filled, cancelled, expired) with its final state, by order id or client
    order id; never for another user's order."""
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))
    resting = await w(alice.buy(BTC, "1", "90.00", client_order_id="r1"))
    status = without_id(await w(alice.order_status(resting["order_id"])))
    listed = (await w(alice.orders()))[0]
    assert status == {"type": "order_status", **listed}
    assert without_id(await w(alice.order_status(client_order_id="r1"))) == status
    # Partly filled, then cancelled: the final state, with what it filled and its average.
    await w(bob.sell(BTC, "0.4", "90.00"))
    await w(alice.cancel(client_order_id="r1"))
    gone = await w(alice.order_status(resting["order_id"]))
    assert (gone["status"], gone["filled_qty"], gone["remaining_qty"], gone["avg_price"], gone["price"]) == (
        "canceled", "0.4000", "0.6000", "90.00", "90.00"), gone
    assert gone["client_order_id"] == "r1" and "exec_type" not in gone and "trade_id" not in gone
    # The client order id now names the latest order placed with it, open or finished.
    again = await w(alice.buy(BTC, "2", "80.00", client_order_id="r1"))
    assert (await w(alice.order_status(client_order_id="r1")))["order_id"] == again["order_id"]
    ioc = await w(alice.buy(BTC, "1", "80.00", tif="ioc"))
    await settle(alice)
    assert (await w(alice.order_status(ioc["order_id"])))["status"] == "expired"
    taker = await w(bob.buy(BTC, "1", "200.00", tif="ioc", raise_on_reject=False))
    maker_fill = await w(alice.sell(BTC, "1", "95.00"))
    await w(bob.buy(BTC, "1", "95.00"))
    await settle(alice)
    filled = await w(alice.order_status(maker_fill["order_id"]))
    assert (filled["status"], filled["filled_qty"], filled["remaining_qty"]) == ("filled", "1.0000", "0.0000")
    # Another user's order, open or finished, and an id never used: the same unknown_order.
    for ask in (lambda: bob.order_status(again["order_id"]), lambda: bob.order_status(maker_fill["order_id"]),
                lambda: alice.order_status(10**9), lambda: alice.order_status(taker["order_id"])):
        with pytest.raises(ExchangeError) as err:
            await w(ask())
        assert err.value.code == "unknown_order", err.value.reply
    with pytest.raises(ExchangeError) as err:
        await w(bob.order_status(client_order_id="r1"))
    assert (err.value.code, err.value.reply.get("client_order_id")) == ("unknown_order", "r1")
    with pytest.raises(ExchangeError) as err:
        await w(alice.request("order_status", order_id=1, client_order_id="r1"))
    assert (err.value.code, err.value.field) == ("bad_request", "client_order_id")


async def test_order_status_forgets_the_oldest_finished_orders_beyond_its_bound(server, connect) -> None:
    server.gateway.finished.kept = 2
    alice = await w(connect("alice"))
    ids = []
    for n in range(3):
        placed = await w(alice.buy(BTC, "1", "90.00", client_order_id=f"c{n}"))
        await w(alice.cancel(placed["order_id"]))
        ids.append(placed["order_id"])
    for ask in (lambda: alice.order_status(ids[0]), lambda: alice.order_status(client_order_id="c0")):
        with pytest.raises(ExchangeError) as err:
            await w(ask())
        assert err.value.code == "unknown_order"
    for n in (1, 2):
        assert (await w(alice.order_status(client_order_id=f"c{n}")))["order_id"] == ids[n]
        assert (await w(alice.order_status(ids[n])))["status"] == "canceled"
    assert len(server.gateway.finished) == 2


async def test_one_busy_account_cannot_push_out_the_others_finished_orders(server, connect) -> None:
    server.gateway.finished.per_user = 3
    server.gateway.finished.kept = 10
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))
    mine = await w(alice.buy(BTC, "1", "90.00", client_order_id="keep"))
    await w(alice.cancel(mine["order_id"]))
    bobs = []
    for _ in range(8):  # bob's own limit keeps only his last three
        placed = await w(bob.buy(BTC, "1", "80.00", tif="ioc"))
        bobs.append(placed["order_id"])
    await settle(bob)
    assert (await w(alice.order_status(client_order_id="keep")))["status"] == "canceled"
    with pytest.raises(ExchangeError) as err:
        await w(bob.order_status(bobs[0]))
    assert err.value.code == "unknown_order"
    assert (await w(bob.order_status(bobs[-1])))["status"] == "expired"
    assert len(server.gateway.finished) == 4
    # Past the overall bound, the oldest go, whoever they belong to.
    for user in ("carol", "dave", "erin"):
        other = await w(connect(user))
        for _ in range(3):
            await w(other.buy(BTC, "1", "80.00", tif="ioc"))
        await settle(other)
    assert len(server.gateway.finished) == 10
    with pytest.raises(ExchangeError) as err:
        await w(alice.order_status(client_order_id="keep"))
    assert "not among the finished orders the exchange keeps" in err.value.message


async def test_modify_replaces_in_place_and_a_rejection_changes_nothing(connect) -> None:
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))
    carol = await w(connect("carol"))
    a = await w(alice.sell(BTC, "2", "105.00"))
    b = await w(bob.sell(BTC, "1", "105.00"))
    oid = a["order_id"]
    assert (await w(bob.queue_position(b["order_id"])))["ahead_qty"] == "2.0000"

    # Reducing the quantity keeps time priority; qty is the new total.
    rep = await w(alice.modify(oid, qty="1.5"))
    assert (rep["type"], rep["exec_type"], rep["order_id"]) == ("exec", "replaced", oid)
    assert (rep["qty"], rep["remaining_qty"], rep["price"]) == ("1.5000", "1.5000", "105.00")
    qp = await w(bob.queue_position(b["order_id"]))
    assert qp == {
        **qp,
        "type": "queue_position",
        "ahead_qty": "1.5000",
        "remaining_qty": "1.0000",
        "price": "105.00",
        "market": BTC,
    }
    assert (await w(alice.queue_position(oid)))["ahead_qty"] == "0.0000"

    # A partial fill, then a total below what is filled is refused and changes nothing.
    await w(carol.buy(BTC, "0.5", "105.00"))
    await next_exec(alice, "trade", oid)

    async def state() -> Any:
        return (
            await w(alice.orders()),
            without_id(await w(alice.book(BTC, level=3))),
            await w(alice.balances()),
        )

    before = await state()
    for kw, code in (
        ({"qty": "0.5"}, "invalid_quantity"),
        ({"qty": "0.2"}, "invalid_quantity"),
        ({"price": "105.005"}, "invalid_price"),
        ({"qty": "1000"}, "insufficient_funds"),
    ):
        with pytest.raises(ExchangeError) as err:
            await w(alice.modify(oid, **kw))
        assert err.value.code == code and err.value.reply["order_id"] == oid
        if kw == {"qty": "0.2"}:  # says why: the total is below what is filled, not off the grid
            assert err.value.message == "qty is the order's new total and must be more than the 0.5000 already filled"
    after = await state()
    assert after == before

    # Raising the quantity is a new arrival: the order keeps its id but goes to the back.
    rep = await w(alice.modify(oid, qty="3"))
    assert (
        rep["order_id"],
        rep["qty"],
        rep["filled_qty"],
        rep["remaining_qty"],
        rep["status"],
    ) == (oid, "3.0000", "0.5000", "2.5000", "partially_filled")
    assert (await w(alice.queue_position(oid)))["ahead_qty"] == "1.0000"  # all of bob's order

    # A new price that crosses trades at once after the replaced report.
    await w(carol.buy(BTC, "1", "100.00"))
    rep = await w(alice.modify(oid, price="100.00"))
    assert rep["exec_type"] == "replaced" and rep["price"] == "100.00"
    fill = await next_exec(alice, "trade", oid)
    assert (fill["last_price"], fill["last_qty"], fill["liquidity"]) == (
        "100.00",
        "1.0000",
        "taker",
    )
    assert (fill["filled_qty"], fill["remaining_qty"]) == ("1.5000", "1.5000")
    rows = (await w(alice.book(BTC, level=3)))["asks"]
    assert [oid, "100.00", "1.5000"] in rows


async def test_stats(server, connect, raws) -> None:
    anon = await raws(server)
    first = await anon.request({"op": "stats"})
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))
    await w(alice.sell(BTC, "1", "100"))
    await w(bob.buy(BTC, "1", "100"))
    stats = await w(bob.stats())
    assert stats["type"] == "stats"
    for key in (
        "orders",
        "trades",
        "messages_in",
        "messages_out",
        "connections",
        "connections_total",
        "users_online",
        "open_orders",
        "slow_consumers",
        "orders_per_sec",
        "trades_per_sec",
        "messages_per_sec",
        "uptime_s",
    ):
        assert key in stats, key
    assert stats["orders"] == first["orders"] + 2 and stats["trades"] == first["trades"] + 1
    assert stats["connections"] == 3 and stats["users_online"] == 2 and stats["open_orders"] == 0
    assert stats["messages_in"] > first["messages_in"]


async def test_open_mode_funds_a_new_user_once(server, connect) -> None:
    first = await w(connect())
    reply = await w(first.login("dora"))
    assert reply == {**reply, "type": "logged_in", "user": "dora", "funded": True, "admin": False}
    balances = await w(first.balances())
    assert {a: b["available"] for a, b in balances.items()} == {
        "USD": "100000.000000",
        "BTC": "10.00000000",
        "ACME": "1000",
    }
    await w(first.withdraw("USD", "100000"))
    again = await w(first.login("dora"))  # the same session, again
    assert again["funded"] is False
    await w(first.close())

    second = await w(connect())
    reply = await w(second.login("dora"))
    assert reply["funded"] is False
    assert (await w(second.balances()))["USD"]["available"] == "0.000000"
    with pytest.raises(ExchangeError) as err:
        await w(second.login("someone_else"))
    assert err.value.code == "bad_request"


async def test_audit_log_records_each_order_event(server, connect) -> None:
    alice = await w(connect("alice"))
    bob = await w(connect("bob"))
    placed = await w(alice.sell(BTC, "1", "100.00"))
    spare = await w(alice.sell(BTC, "1", "120.00"))
    await w(alice.modify(spare["order_id"], qty="0.5"))
    await w(bob.buy(BTC, "1", "100.00"))
    await next_exec(alice, "trade", placed["order_id"])
    await w(alice.cancel(spare["order_id"]))
    await w(alice.place(BTC, "buy", "100000", "100.00", raise_on_reject=False))
    with pytest.raises(ExchangeError):
        await w(alice.cancel(999))
    await w(server.flush_logs())

    logs = Path(server.config.data_dir) / "logs"
    lines = (logs / "alice.log").read_text(encoding="utf-8").splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z ")
    assert all(stamp.match(line) for line in lines), lines
    body = [stamp.sub("", line) for line in lines]
    p, s = placed["order_id"], spare["order_id"]
    assert body[0].startswith(f"PLACED order {p} SELL 1.0000 BTC-USD @ 100.00 limit gtc")
    assert body[1].startswith(f"PLACED order {s} ")
    assert body[2].startswith(f"MODIFIED order {s} ")
    assert body[3].startswith(f"FILL order {p} ")
    assert "1.0000" in body[3] and "@ 100.00" in body[3] and "maker" in body[3]
    assert body[3].endswith("filled")
    assert body[4].startswith(f"CANCELED order {s} ")
    assert body[5].startswith("REJECTED BUY 100000.0000 BTC-USD @ 100.00") and body[5].endswith(
        "insufficient_funds"
    )
    assert body[6] == "REJECTED CancelOrder order 999: unknown_order"
    assert len(body) == 7
    bob_lines = (logs / "bob.log").read_text(encoding="utf-8").splitlines()
    assert [stamp.sub("", line).split()[0] for line in bob_lines] == ["PLACED", "FILL"]


async def started(config: ServerConfig) -> tuple[ExchangeServer, ExchangeClient]:
    """A server on ``config`` (its own data directory, kept across restarts) and a client of it."""
    srv = ExchangeServer(config)
    await w(srv.start())
    assert srv.address is not None
    client = ExchangeClient(*srv.address, timeout=T)
    await w(client.connect())
    return srv, client


async def test_recent_trades_answer_without_login_per_market_and_survive_a_restart(tmp_path: Path) -> None:
    """``trades``: each market's last 100 trades, oldest first, public fields only; after a
    restart the same rows come back from the ledger, formatted as before."""
    config = ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0)
    srv = ExchangeServer(config)
    await w(srv.start())
    assert srv.address is not None
    alice, bob, anon = (ExchangeClient(*srv.address, timeout=T) for _ in range(3))
    try:
        for client, user in ((alice, "alice"), (bob, "bob"), (anon, None)):
            await w(client.connect())
            if user:
                await w(client.login(user))
        await w(anon.subscribe("trades", BTC))
        await w(alice.sell(BTC, "1.05", "100.00"))
        buys = [bob.send("order", market=BTC, side="buy", type="limit", qty="0.01",
                         price=f"{100 + i % 3}.00", tif="ioc") for i in range(105)]
        for fut in buys:
            assert (await w(fut))["exec_type"] == "new"
        await w(alice.sell(ACME, "2", "100.00"))
        await w(bob.buy(ACME, "2", "100.00"))
        pushed = [e for e in await settle(anon) if e.get("type") == "trade"]
        assert len(pushed) == 105
        public = [{k: e[k] for k in ("trade_id", "price", "qty", "taker_side", "ts")} for e in pushed]

        reply = await w(anon.recent_trades(BTC))  # no login needed
        assert reply["type"] == "trades" and reply["market"] == BTC
        assert reply["trades"] == public[-50:]  # 50 by default, oldest first
        assert (await w(anon.recent_trades(BTC, 100)))["trades"] == public[-100:]
        acme = (await w(anon.recent_trades(ACME, 100)))["trades"]
        assert [(t["price"], t["qty"], t["taker_side"]) for t in acme] == [("100.00", "2", "buy")]
        for bad in (0, 101, "5", True):
            with pytest.raises(ExchangeError) as info:
                await w(anon.request("trades", market=BTC, limit=bad))
            assert info.value.code == "bad_request" and "'limit' must be an integer from 1 to 100" in str(info.value)
        with pytest.raises(ExchangeError) as info:
            await w(anon.request("trades", market="NOPE-USD"))
        assert info.value.code == "unknown_market"
    finally:
        for client in (alice, bob, anon):
            await w(client.close())
        await w(srv.stop(), 10)

    srv, anon = await started(config)
    try:
        assert (await w(anon.recent_trades(BTC, 100)))["trades"] == public[-100:]
        assert (await w(anon.recent_trades(ACME, 100)))["trades"] == acme
    finally:
        await w(anon.close())
        await w(srv.stop(), 10)


def fill_of(report: dict[str, Any]) -> dict[str, Any]:
    """The ``fills`` row a ``trade`` report stands for."""
    row = {"trade_id": report["trade_id"], "order_id": report["order_id"], "market": report["market"],
           "side": report["side"], "price": report["last_price"], "qty": report["last_qty"],
           "liquidity": report["liquidity"], "fee": report["fee"], "fee_asset": report["fee_asset"],
           "ts": report["ts"]}
    if "client_order_id" in report:
        row["client_order_id"] = report["client_order_id"]
    return row


async def test_fills_answer_each_user_its_own_fills_page_forward_and_survive_a_restart(tmp_path: Path) -> None:
    """``fills``: the user's own fills, oldest first, as its trade reports told them (maker
    and taker, fee, client order id); by market, the last N, or the first N after a trade
    id; never another user's. After a restart the same fills come back from the ledger,
    with the client order ids of the orders the exchange still knows."""
    config = ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0)
    srv = ExchangeServer(config)
    await w(srv.start())
    assert srv.address is not None
    alice, bob, carol, anon = (ExchangeClient(*srv.address, timeout=T) for _ in range(4))
    try:
        for client, user in ((alice, "alice"), (bob, "bob"), (carol, "carol"), (anon, None)):
            await w(client.connect())
            if user:
                await w(client.login(user))
        resting = await w(alice.sell(BTC, "1.05", "100.00", client_order_id="a-1"))
        buys = [bob.send("order", market=BTC, side="buy", type="limit", qty="0.01",
                         price="100.00", tif="ioc", client_order_id=f"b-{i}") for i in range(7)]
        for fut in buys:
            assert (await w(fut))["exec_type"] == "new"
        await w(bob.sell(ACME, "2", "100.00"))
        await w(alice.buy(ACME, "2", "100.00"))
        mine = {name: [fill_of(e) for e in execs(await settle(c), "trade")]
                for name, c in (("alice", alice), ("bob", bob))}
        assert len(mine["alice"]) == len(mine["bob"]) == 8
        assert {f["liquidity"] for f in mine["bob"][:7]} == {"taker"}
        assert [f["client_order_id"] for f in mine["bob"][:7]] == [f"b-{i}" for i in range(7)]
        assert {(f["order_id"], f["liquidity"], f["client_order_id"]) for f in mine["alice"][:7]} == {
            (resting["order_id"], "maker", "a-1")}
        assert mine["alice"][-1]["market"] == ACME and mine["alice"][-1]["liquidity"] == "taker"

        for name, client in (("alice", alice), ("bob", bob)):
            reply = await w(client.fills())
            assert reply["type"] == "fills" and reply["market"] is None
            assert reply["fills"] == mine[name]  # all of them: fewer than the default 100
            assert reply["complete_after"] == 0  # and nothing was ever dropped
        kept = srv.gateway.fills.rows("bob")
        gc.collect()  # rows of plain numbers and strings: the collector stops tracking them
        assert kept and not any(gc.is_tracked(row) for row in kept)
        assert (await w(alice.fills(market=BTC)))["fills"] == mine["alice"][:7]
        assert (await w(alice.fills(market=ACME, limit=5)))["fills"] == mine["alice"][7:]
        assert (await w(bob.fills(limit=3)))["fills"] == mine["bob"][-3:]
        first = mine["bob"][1]["trade_id"]
        assert (await w(bob.fills(after=first, limit=3)))["fills"] == mine["bob"][2:5]
        assert (await w(bob.request("fills", after=str(first), limit=3)))["fills"] == mine["bob"][2:5]
        assert (await w(bob.fills(BTC, after=mine["bob"][6]["trade_id"])))["fills"] == []
        assert (await w(carol.fills()))["fills"] == []  # nobody else's
        assert (await w(bob.fills(limit=None, after=None)))["fills"] == mine["bob"]  # null: the default

        for field, bad, text in (("limit", 0, "'limit' must be an integer from 1 to 1,000"),
                                 ("limit", 1001, "from 1 to 1,000"), ("limit", "5", "from 1 to 1,000"),
                                 ("limit", True, "from 1 to 1,000"), ("after", -1, "'after' must be a trade id"),
                                 ("after", "7x", "'after' must be a trade id"), ("after", str(2**64), "64 bits"),
                                 ("user", "alice", "user")):
            with pytest.raises(ExchangeError) as info:
                await w(bob.request("fills", **{field: bad}))
            assert info.value.code == "bad_request" and text in str(info.value), (field, bad)
        with pytest.raises(ExchangeError) as info:
            await w(bob.request("fills", market="NOPE-USD"))
        assert info.value.code == "unknown_market"
        with pytest.raises(ExchangeError) as info:
            await w(anon.request("fills"))
        assert info.value.code == "not_logged_in"
    finally:
        for client in (alice, bob, carol, anon):
            await w(client.close())
        await w(srv.stop(), 10)

    srv, anon = await started(config)
    try:
        # The ledger keeps no client order ids: they come back from the orders still open
        # (alice's a-1) and the finished ones the exchange keeps (bob's IOC orders).
        await w(anon.login("alice"))
        assert (await w(anon.fills()))["fills"] == mine["alice"]
        bob = ExchangeClient(*srv.address, timeout=T)  # type: ignore[misc]
        await w(bob.connect())
        await w(bob.login("bob"))
        assert (await w(bob.fills(after=first, limit=3)))["fills"] == mine["bob"][2:5]
        await w(bob.buy(BTC, "0.01", "100.00", tif="ioc", client_order_id="b-late"))
        late = (await w(bob.fills(limit=2)))["fills"]
        assert late[0] == mine["bob"][-1]
        assert late[1]["client_order_id"] == "b-late" and late[1]["trade_id"] > mine["bob"][-1]["trade_id"]
        await w(bob.close())
    finally:
        await w(anon.close())
        await w(srv.stop(), 10)


async def test_fills_say_from_where_they_are_whole_when_the_exchange_kept_fewer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client paging forward from a fill the exchange no longer holds can tell the gap
    from the end: ``complete_after`` is the trade id above which every fill is there, after
    the table's bounds dropped some, and after a restart read back only the ledger's tail."""
    from exchange import server as server_module
    from exchange.gateway import RecentFills
    from storage.ledger import tail_records

    config = ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0)
    srv, alice = await started(config)
    srv.gateway.fills = RecentFills(per_user=3, kept=100)
    try:
        await w(alice.login("alice"))
        await w(alice.sell(BTC, "1", "100.00"))
        bob = ExchangeClient(*srv.address, timeout=T)  # type: ignore[misc]
        await w(bob.connect())
        await w(bob.login("bob"))
        trades = []
        for _ in range(5):
            await w(bob.buy(BTC, "0.01", "100.00"))
            trades.append(await w(next_exec(bob, "trade")))
        ids = [t["trade_id"] for t in trades]
        reply = await w(bob.fills(after=ids[0]))
        assert [f["trade_id"] for f in reply["fills"]] == ids[2:]  # ids[1] is gone: a gap
        assert reply["complete_after"] == ids[1]
        await w(bob.close())
    finally:
        await w(alice.close())
        await w(srv.stop(), 10)

    # The restart reads back only the last lines of the ledger (a tail of 700 bytes here).
    monkeypatch.setattr(server_module, "tail_records", lambda path: tail_records(path, tail=700))
    srv, bob = await started(config)
    try:
        await w(bob.login("bob"))
        reply = await w(bob.fills())
        kept = [f["trade_id"] for f in reply["fills"]]
        assert kept and kept == ids[-len(kept):] and len(kept) < len(ids)
        assert reply["complete_after"] == kept[0] - 1
        carol = ExchangeClient(*srv.address, timeout=T)  # type: ignore[misc]
        await w(carol.connect())
        await w(carol.login("carol"))  # never traded, but the exchange cannot vouch for before
        assert (await w(carol.fills()))["complete_after"] == kept[0] - 1
        await w(carol.close())
    finally:
        await w(bob.close())
        await w(srv.stop(), 10)


async def test_a_trade_with_oneself_is_two_fills_that_a_page_never_splits(server, connect) -> None:
    carl = await w(connect("carl"))
    sells = [await w(carl.sell(BTC, "0.01", f"{100 + i}.00")) for i in range(3)]
    buy = await w(carl.request("order", market=BTC, side="buy", type="limit", qty="0.03",
                                price="102.00", tif="ioc", stp="none"))
    everything = (await w(carl.fills()))["fills"]
    assert [(f["order_id"], f["liquidity"]) for f in everything] == [
        pair for sell in sells for pair in ((buy["order_id"], "taker"), (sell["order_id"], "maker"))]
    pages, after = [], 0
    while True:
        page = (await w(carl.fills(limit=1, after=after)))["fills"]
        if not page:
            break
        pages.append(page)
        after = page[-1]["trade_id"]
    assert pages == [everything[0:2], everything[2:4], everything[4:6]]  # limit 1: both sides
    assert (await w(carl.fills(limit=3)))["fills"] == everything[-4:]  # nor begins between them
    assert (await w(carl.fills(limit=2)))["fills"] == everything[-2:]


async def test_a_market_order_sized_by_the_quote_over_the_wire(server, connect) -> None:
    alice, bob = await w(connect("alice")), await w(connect("bob"))
    await w(alice.sell(BTC, "0.5", "100.00"))
    report = await w(bob.place(BTC, "buy", None, quote_qty="25.005"))  # 0.25 BTC and its 2 bp fee
    assert (report["exec_type"], report["order_type"], report["qty"], report["tif"]) == ("new", "market", "0.2500", "ioc")
    fill = await w(next_exec(bob, "trade", report["order_id"]))
    assert (fill["last_qty"], fill["fee"], fill["status"]) == ("0.2500", "0.005000", "filled")
    for fields, text in (({"type": "limit", "price": "100.00", "quote_qty": "10"}, "'quote_qty' sizes market orders only"),
                         ({"type": "market", "qty": "0.1", "quote_qty": "10"}, "give 'qty' or 'quote_qty', not both"),
                         ({"type": "market", "quote_qty": True}, "'quote_qty' must be a decimal string")):
        with pytest.raises(ExchangeError) as info:
            await w(bob.request("order", market=BTC, side="buy", **fields))
        assert info.value.code == "bad_request" and text in str(info.value) and info.value.field == "quote_qty"
    for amount, reason in (("0.0000001", "invalid_quantity"), ("-5", "invalid_quantity"),
                           ("0.000001", "below_min_quantity")):
        rejected = await w(bob.place(BTC, "buy", None, quote_qty=amount, raise_on_reject=False))
        assert (rejected["exec_type"], rejected["reason"]) == ("rejected", reason), amount
    rejected = await w(bob.place(ACME, "buy", None, quote_qty="10", raise_on_reject=False))
    assert rejected["reason"] == "no_liquidity"
    with pytest.raises(ExchangeError) as info:
        await w(bob.place(BTC, "buy", None, quote_qty="10", tif="fok"))
    assert info.value.code == "bad_request" and info.value.field == "tif" and "use ioc" in str(info.value)


async def test_a_quote_qty_written_as_a_json_number_is_read_exactly(server, raws, connect) -> None:
    """Never through a binary double: 50.0000000000000001 is off the USD grid (a double
    would read 50.0), and a number on the grid is taken as written."""
    alice = await w(connect("alice"))
    await w(alice.sell(BTC, "0.5", "100.00"))
    raw = await w(raws(server))
    await w(raw.request({"op": "login", "user": "bob"}))
    await w(raw.send(b'{"op":"order","id":1,"market":"BTC-USD","side":"buy","type":"market",'
                     b'"quote_qty":50.0000000000000001}\n'))
    rejected = await w(raw.reply_to(1))
    assert (rejected["exec_type"], rejected["reason"], rejected["quote_qty"]) == (
        "rejected", "invalid_quantity", "50.0000000000000001")
    await w(raw.send(b'{"op":"order","id":2,"market":"BTC-USD","side":"buy","type":"market","quote_qty":25.005}\n'))
    assert (await w(raw.reply_to(2)))["qty"] == "0.2500"


async def test_null_optional_fields_of_book_and_trades_mean_their_defaults(server, raws, connect) -> None:
    alice, bob = await w(connect("alice")), await w(connect("bob"))
    await w(alice.sell(BTC, "1", "100.00"))
    await w(bob.buy(BTC, "1", "100.00"))
    raw = await raws(server)
    trades = await raw.request({"op": "trades", "market": BTC, "limit": None})
    assert trades["type"] == "trades" and [t["qty"] for t in trades["trades"]] == ["1.0000"]
    book = await raw.request({"op": "book", "market": BTC, "depth": None, "level": None})
    assert (book["type"], book["level"]) == ("book", 2)


async def test_cancel_on_disconnect_cancels_what_that_connection_placed_and_nothing_else(make_server, dial) -> None:
    """A bot's dead man's switch: its connection drops, its orders go; the same user's other
    sessions are told, and their own orders stay, as do everyone else's."""
    srv = await make_server()
    bot = await dial(srv)
    reply = await w(bot.login("alice", cancel_on_disconnect=True))
    assert reply["cancel_on_disconnect"] is True
    assert (await w(bot.request("login", user="alice")))["cancel_on_disconnect"] is True
    with pytest.raises(ExchangeError, match="chosen at a session's first login"):
        await w(bot.request("login", user="alice", cancel_on_disconnect=False))
    other, bob = await dial(srv, "alice"), await dial(srv, "bob")
    quotes = [await w(bot.buy(BTC, "1", "90.00")), await w(bot.sell(BTC, "1", "110.00"))]
    gone = await w(bot.buy(BTC, "0.5", "80.00"))
    await w(bot.cancel(gone["order_id"]))  # ended already: nothing to do for it
    mine = await w(other.buy(BTC, "1", "91.00"))
    theirs = await w(bob.sell(BTC, "1", "111.00"))
    await settle(other)
    bot.abort()
    canceled = [await next_exec(other, "canceled") for _ in quotes]
    assert [e["order_id"] for e in canceled] == [q["order_id"] for q in quotes]
    assert len({e["ts"] for e in canceled}) == 1
    assert [o["order_id"] for o in await w(other.orders())] == [mine["order_id"]]
    assert [o["order_id"] for o in await w(bob.orders())] == [theirs["order_id"]]
    anon = await dial(srv)
    with pytest.raises(ExchangeError) as info:
        await w(anon.request("login", user="carol", cancel_on_disconnect="yes"))
    assert info.value.code == "bad_request" and info.value.field == "cancel_on_disconnect"


async def test_cancel_on_disconnect_leaves_the_orders_when_the_exchange_stops(tmp_path: Path) -> None:
    config = ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0)
    srv, bot = await started(config)
    await w(bot.login("alice", cancel_on_disconnect=True))
    placed = await w(bot.buy(BTC, "1", "90.00"))
    await w(srv.stop(), 10)
    await w(bot.close())
    srv, again = await started(config)
    try:
        await w(again.login("alice"))
        assert [o["order_id"] for o in await w(again.orders())] == [placed["order_id"]]
    finally:
        await w(again.close())
        await w(srv.stop(), 10)


async def test_cancel_on_disconnect_forgets_the_orders_that_ended(make_server, dial) -> None:
    """A session that places orders all day keeps only a bounded list of them."""
    srv = await make_server()
    bot = await dial(srv)
    await w(bot.login("alice", cancel_on_disconnect=True))
    resting = await w(bot.buy(BTC, "1", "90.00"))
    futures = [bot.send("order", market=BTC, side="buy", type="limit", qty="0.01", price="95.00", tif="ioc")
               for _ in range(2500)]  # nothing to trade with: each expires at once
    for fut in futures:
        assert (await w(fut))["exec_type"] == "new"
    session = next(s for s in srv.gateway.sessions if s.user == "alice")
    assert session.owned is not None and resting["order_id"] in session.owned and len(session.owned) <= 1025
    other = await dial(srv, "alice")
    bot.abort()
    assert (await next_exec(other, "canceled"))["order_id"] == resting["order_id"]
