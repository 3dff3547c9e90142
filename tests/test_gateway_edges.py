"""Edges of the gateway that the main end-to-end file does not pin down."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from client import ExchangeClient


async def _next(client: ExchangeClient, kind: str) -> dict:
    while True:
        ev = await asyncio.wait_for(client.next_event(), 5)
        assert ev is not None
        if ev.get("type") == kind:
            return ev


async def test_a_level_that_empties_is_reported_with_qty_zero(connect) -> None:
    alice = await connect("alice")
    watcher = await connect(None)
    await watcher.subscribe("book", "BTC-USD")
    await _next(watcher, "book")
    report = await alice.buy("BTC-USD", "0.5", "99.00")
    update = await _next(watcher, "book_update")
    assert update["qty"] == "0.5000"
    await alice.cancel(report["order_id"])
    update = await _next(watcher, "book_update")
    assert update["qty"] == "0" and update["price"] == "99.00"


async def test_an_order_refused_before_the_engine_is_in_the_audit_log(server, connect) -> None:
    alice = await connect("alice")
    reply = await alice.place("BTC-USD", "buy", "1", "100.001", raise_on_reject=False)
    assert reply["reason"] == "invalid_price"
    await server.flush_logs()
    log = (server.config.data_dir / "logs" / "alice.log").read_text()
    assert "REJECTED BUY 1 BTC-USD @ 100.001" in log and "invalid_price" in log


async def test_an_impossible_port_is_a_clear_connection_error() -> None:
    client = ExchangeClient("127.0.0.1", 70000, timeout=2)
    try:
        await client.connect()
    except Exception as exc:  # noqa: BLE001 - the point is which exception
        assert type(exc).__name__ == "ExchangeConnectionError"
        assert "cannot connect" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("connected to port 70000")


async def test_a_line_sent_a_byte_at_a_time_is_answered(server) -> None:
    host, port = server.address
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        for byte in b'{"op":"ping","id":"slow"}\n':
            writer.write(bytes([byte]))
            await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert b'"pong"' in line and b'"slow"' in line
    finally:
        writer.close()


async def test_a_failing_listener_does_not_cost_the_user_their_reports(server, connect) -> None:
    def broken(events: list) -> None:
        raise RuntimeError("listener bug")

    server.gateway.listeners.insert(0, broken)
    alice = await connect("alice")
    report = await alice.buy("BTC-USD", "0.5", "99.00")
    assert report["exec_type"] == "new"
    assert [o["order_id"] for o in await alice.orders()] == [report["order_id"]]


async def test_a_request_without_an_id_gets_replies_without_one(server) -> None:
    host, port = server.address
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(b'{"op":"login","user":"noid"}\n'
                     b'{"op":"order","market":"BTC-USD","side":"buy","price":"99","qty":"1"}\n')
        await writer.drain()
        for _ in range(2):
            line = await asyncio.wait_for(reader.readline(), 5)
            assert b'"id"' not in line, line
    finally:
        writer.close()


async def test_a_connection_over_its_rate_limit_is_told_and_nothing_happens(tmp_path) -> None:
    """``--rate-limit 20``: a burst of 60 orders gets 19 through (the login took a token),
    the rest ``rate_limited`` with their ids and no effect; the connection stays open, a
    second connection has its own allowance, and a second later the first may send again."""
    import orjson

    from exchange.server import ExchangeServer, ServerConfig

    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0, rate_limit=20))
    await srv.start()
    try:
        assert srv.address is not None

        async def burst(user: str, count: int, first_id: int) -> tuple[list[dict], Any, Any]:
            reader, writer = await asyncio.open_connection(*srv.address)
            lines = [b'{"op":"login","user":"%s","id":0}\n' % user.encode()] + [
                b'{"op":"order","id":%d,"market":"BTC-USD","side":"buy","type":"limit",'
                b'"price":"90.00","qty":"0.01"}\n' % (first_id + i) for i in range(count)
            ]
            writer.write(b"".join(lines))
            replies = []
            while len(replies) < count + 1:
                replies.append(orjson.loads(await asyncio.wait_for(reader.readline(), 5)))
            return replies, reader, writer

        replies, alice_in, alice = await burst("alice", 60, 1)
        direct = [r for r in replies if r.get("id") not in (None, 0)]
        accepted = [r for r in direct if r["type"] == "exec" and r["exec_type"] == "new"]
        limited = [r for r in direct if r["type"] == "error"]
        assert 19 <= len(accepted) <= 20 and len(accepted) + len(limited) == 60
        assert all(r["code"] == "rate_limited" and "not carried out" in r["message"] for r in limited)
        assert len(srv.engine.open_orders("alice")) == len(accepted)  # nothing else happened
        # Another connection is not held back by alice's.
        others, _, bob = await burst("bob", 5, 1000)
        assert sum(r.get("exec_type") == "new" for r in others) == 5
        # A second later alice's allowance is back; her connection was never closed.
        await asyncio.sleep(1.05)
        alice.write(b'{"op":"order","id":99,"market":"BTC-USD","side":"buy","type":"limit",'
                    b'"price":"90.00","qty":"0.01"}\n')
        again = orjson.loads(await asyncio.wait_for(alice_in.readline(), 5))
        assert again["id"] == 99 and again["exec_type"] == "new"
        assert len(srv.engine.open_orders("alice")) == len(accepted) + 1
        for writer in (alice, bob):
            writer.close()
    finally:
        await srv.stop()


async def test_audit_lines_wait_for_their_command_to_be_durable(tmp_path, caplog) -> None:
    """Like the ledger: a crash must not leave a line for an order the recovered exchange
    never had. Positions here stand for the journal's (its mark and durable position)."""
    from exchange.engine import Exchange
    from exchange.markets import default_config
    from exchange.types import Deposit, OrderType, PlaceOrder, Side
    from storage.audit import AuditLog

    config = default_config()
    engine = Exchange(config)
    position = {"mark": 0, "durable": 0}
    audit = AuditLog(tmp_path, config, interval=0.01,
                     mark=lambda: position["mark"], durable=lambda: position["durable"])
    audit.start()
    engine.handle(Deposit(1, "alice", "USD", 10**12))

    def place(n: int, price: int) -> None:
        position["mark"] = n
        audit(engine.handle(PlaceOrder(10 + n, "alice", "BTC-USD", Side.BUY, OrderType.LIMIT, 100, price)))

    log = tmp_path / "alice.log"
    place(1, 9_000)
    await asyncio.sleep(0.05)
    assert not log.exists()  # not durable yet
    position["durable"] = 1
    audit.seal(1)  # as the journal's durability callback does
    place(2, 9_100)
    await asyncio.sleep(0.05)
    assert "PLACED order 1 " in log.read_text() and "order 2 " not in log.read_text()
    await audit.close()  # order 2 never became durable: it was never acknowledged
    assert "order 2 " not in log.read_text()
    assert "1 lines of commands that never became durable" in caplog.text


async def test_rebuilt_audit_lines_skip_what_a_crash_left_written(tmp_path) -> None:
    """Recovery rebuilds the lines of commands after the audit log's recorded position; a
    kill between appending lines and recording the position must not write them twice."""
    from exchange.engine import Exchange
    from exchange.markets import default_config
    from exchange.types import Deposit, OrderType, PlaceOrder, Side
    from storage.audit import AuditLog

    config = default_config()
    engine = Exchange(config)
    engine.handle(Deposit(1, "alice", "USD", 10**12))
    records = [
        (n, engine.handle(PlaceOrder(10 + n, "alice", "BTC-USD", Side.BUY, OrderType.LIMIT, 100, 9_000 + n)))
        for n in (1, 2, 3)
    ]
    position = {"mark": 0, "durable": 0}

    def audit_log() -> AuditLog:
        return AuditLog(tmp_path, config, mark=lambda: position["mark"], durable=lambda: position["durable"])

    before = audit_log()
    for n, events in records[:2]:
        position["mark"] = n
        before(events)
    position["durable"] = 2
    await before.close()  # lines of 1 and 2 written, position 2 ...
    assert (tmp_path / ".position").read_text().strip() == "2"
    (tmp_path / ".position").write_text("0\n")  # ... but killed before it was recorded
    after = audit_log()
    assert after.replay_begin(0) == 0
    for n, events in records:
        after.replay_record(n, events)
    after.replay_end(3)
    text = (tmp_path / "alice.log").read_text()
    assert [text.count(f" PLACED order {oid} ") for oid in (1, 2, 3)] == [1, 1, 1]
    assert text.index(" order 2 ") < text.index(" order 3 ")
    assert (tmp_path / ".position").read_text().strip() == "3"


def _audit_at(tmp_path, position: dict[str, int]):  # type: ignore[no-untyped-def]
    from exchange.markets import default_config
    from storage.audit import AuditLog

    return AuditLog(tmp_path, default_config(), mark=lambda: position["mark"],
                    durable=lambda: position["durable"])


async def test_rebuilt_audit_lines_skip_written_ones_around_a_rejected_request(tmp_path) -> None:
    """A rejection is written to the audit log but never journaled, so it is never rebuilt:
    it can sit between lines the crash left written; they must still be recognised."""
    from exchange.engine import Exchange
    from exchange.markets import default_config
    from exchange.types import CancelOrder, Deposit, OrderType, PlaceOrder, Side

    engine = Exchange(default_config())
    engine.handle(Deposit(1, "alice", "USD", 10**12))
    r1 = engine.handle(PlaceOrder(11, "alice", "BTC-USD", Side.BUY, OrderType.LIMIT, 100, 9_001))
    rejected = engine.handle(CancelOrder(12, "alice", 999_999))
    r2 = engine.handle(PlaceOrder(13, "alice", "BTC-USD", Side.BUY, OrderType.LIMIT, 100, 9_002))
    r3 = engine.handle(PlaceOrder(14, "alice", "BTC-USD", Side.BUY, OrderType.LIMIT, 100, 9_003))
    position = {"mark": 0, "durable": 0}
    before = _audit_at(tmp_path, position)
    position["mark"] = 1
    before(r1)
    before(rejected)  # not journaled: the mark stays
    position["mark"] = 2
    before(r2)
    position["durable"] = 2
    await before.close()
    (tmp_path / ".position").write_text("0\n")  # killed between the append and the position
    after = _audit_at(tmp_path, position)
    after.replay_begin(0)
    for lsn, events in ((1, r1), (2, r2), (3, r3)):
        after.replay_record(lsn, events)
    after.replay_end(3)
    text = (tmp_path / "alice.log").read_text()
    assert [text.count(f" PLACED order {o} ") for o in (1, 2, 3)] == [1, 1, 1]
    assert text.count("REJECTED CancelOrder order 999999") == 1


async def test_rebuilt_audit_lines_skip_more_than_a_mebibyte_of_written_ones(tmp_path) -> None:
    from exchange.engine import Exchange
    from exchange.markets import default_config
    from exchange.types import Deposit, OrderType, PlaceOrder, Side

    engine = Exchange(default_config())
    engine.handle(Deposit(1, "alice", "USD", 10**15))
    records = [(n, engine.handle(PlaceOrder(10 + n, "alice", "BTC-USD", Side.BUY, OrderType.LIMIT, 1,
                                            5_000 + n % 4000))) for n in range(1, 9001)]
    position = {"mark": 0, "durable": 0}
    before = _audit_at(tmp_path, position)
    for n, events in records:
        position["mark"] = n
        before(events)
    position["durable"] = len(records)
    await before.close()
    size = (tmp_path / "alice.log").stat().st_size
    assert size > 1 << 20
    (tmp_path / ".position").write_text("0\n")
    with open(tmp_path / "alice.log", "r+b") as fh:
        fh.truncate(size - 20)  # the kill cut the last line (order 9000's) short
    after = _audit_at(tmp_path, position)
    after.replay_begin(0)
    for n, events in records:
        after.replay_record(n, events)
    after.replay_end(len(records))
    lines = (tmp_path / "alice.log").read_text().splitlines()
    whole = [line for line in lines if line.endswith(", new")]
    assert len(whole) == 9000 and len(set(whole)) == 9000  # each once, order 9000's rebuilt
    assert len(lines) == 9001 and not lines[-2].endswith(", new")  # the cut line, on its own
    assert all(line.count(" PLACED ") == 1 for line in lines)


@pytest.mark.parametrize("fsync", ["batch", "always", "off"])
async def test_a_client_that_half_closes_still_reads_every_answer(tmp_path, fsync: str) -> None:
    """A script that sends its requests and shuts down its sending side (``nc -N``) must
    read the acknowledgement of every request carried out, in order, before the server
    closes; a last line without its newline is a request too."""
    from exchange.server import ExchangeServer, ServerConfig

    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0, fsync=fsync))
    await srv.start()
    try:
        host, port = srv.address
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        writer.write(
            b'{"op":"login","user":"alice","id":"l"}\n'
            b'{"op":"order","id":"o1","market":"BTC-USD","side":"buy","price":"100","qty":"1"}\n'
            b'{"op":"ping","id":"p1"}\n'
            b'{"op":"ping","id":"p2"}'
        )
        writer.write_eof()
        got = []
        while line := await asyncio.wait_for(reader.readline(), 5):
            got.append(orjson.loads(line))
        writer.close()
        assert [(m["type"], m.get("id")) for m in got] == [
            ("logged_in", "l"), ("exec", "o1"), ("pong", "p1"), ("pong", "p2"),
        ], got
        assert [o.price for o in srv.engine.open_orders("alice")] == [10_000]
    finally:
        await srv.stop()


async def test_request_text_cannot_forge_audit_lines(server, connect) -> None:
    """A rejected request's raw values are the client's words: a newline in them must not
    become a line of its own in the audit log, and a huge value is cut short."""
    alice = await connect("alice")
    forged = "2026-01-01T00:00:00.000000Z FILL order 99 BUY 5.0000 BTC-USD @ 1.00"
    r1 = await alice.place("X\n" + forged, "buy", "1", "1", raise_on_reject=False)
    r2 = await alice.place("BTC-USD", "buy", "1", "1\n" + forged, raise_on_reject=False)
    r3 = await alice.place("BTC-USD", "buy", "1" * 5000, "1", raise_on_reject=False)
    assert (r1["reason"], r2["reason"], r3["reason"]) == ("unknown_market", "invalid_price", "invalid_quantity")
    await server.flush_logs()
    lines = (server.config.data_dir / "logs" / "alice.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3, lines
    assert [line.split(" ")[1] for line in lines] == ["REJECTED"] * 3, lines
    assert "X\\n2026" in lines[0] and "@ 1\\n2026" in lines[1]
    assert max(len(line) for line in lines) < 300, lines


@pytest.mark.parametrize(("field", "raw", "reason"), [
    ("qty", "1.00000000000000001", "invalid_quantity"),  # a double would read 1.0
    ("price", "100.00000000000000001", "invalid_price"),  # ... and 100.0
    ("qty", "1e400", "invalid_quantity"),
])
async def test_an_off_grid_json_number_is_refused_not_rounded(server, field, raw, reason) -> None:
    host, port = server.address
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    values = {"price": '"100"', "qty": '"1"', field: raw}
    writer.write(b'{"op":"login","user":"alice"}\n' + (
        '{"op":"order","id":"n","market":"BTC-USD","side":"buy","price":%(price)s,"qty":%(qty)s}\n'
        '{"op":"order","id":"ok","market":"BTC-USD","side":"buy","price":1e2,"qty":0.5e-3}\n'
        % values).encode())
    replies = {}
    while len(replies) < 2:
        msg = orjson.loads(await asyncio.wait_for(reader.readline(), 5))
        if msg.get("id") in ("n", "ok"):
            replies[msg["id"]] = msg
    writer.close()
    assert replies["n"]["exec_type"] == "rejected" and replies["n"]["reason"] == reason, replies["n"]
    assert replies["n"][field] == raw
    # Numbers on the grid are read exactly, exponents included.
    assert (replies["ok"]["price"], replies["ok"]["qty"]) == ("100.00", "0.0005")


async def test_an_integer_id_wider_than_64_bits_is_refused_clearly(server) -> None:
    host, port = server.address
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    writer.write(b'{"op":"ping","id":18446744073709551616}\n{"op":"ping","id":18446744073709551615}\n'
                 b'{"op":"ping","id":1,"x":1e400}\n')
    replies = [orjson.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(3)]
    writer.close()
    assert replies[0]["code"] == "bad_request" and "64 bits" in replies[0]["message"]
    assert replies[1] == {**replies[1], "type": "pong", "id": 18446744073709551615}
    # An exotic number in a field the op does not take: the id is still read, the field named.
    assert (replies[2]["code"], replies[2]["field"], replies[2]["id"]) == ("bad_request", "x", 1)


async def test_a_request_lost_while_its_write_drains_leaves_no_stray_error() -> None:
    """The client's slow path (its write did not all reach the socket) waits for the drain;
    when the peer resets the connection, the caller gets the error and nothing is left for
    asyncio to report as 'Future exception was never retrieved'."""
    import gc
    import socket

    from client.client import ExchangeConnectionError

    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    accepted: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
    release = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if not accepted.done():
            accepted.set_result(writer)
        await release.wait()  # never reads

    srv = await asyncio.start_server(deaf, "127.0.0.1", 0)
    client = ExchangeClient("127.0.0.1", srv.sockets[0].getsockname()[1], timeout=5.0)
    await asyncio.wait_for(client.connect(), 5)
    try:
        peer = await asyncio.wait_for(accepted, 5)
        assert client._transport is not None
        client._transport.write(b" " * (8 << 20))  # blank lines the deaf server never reads
        await asyncio.sleep(0.3)
        req = asyncio.ensure_future(client.request("ping"))
        await asyncio.sleep(0.1)
        assert client._transport is not None and client._transport.get_write_buffer_size() > 0
        peer.get_extra_info("socket").setsockopt(  # reset (RST), not a clean close
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.transport.abort()
        with pytest.raises(ExchangeConnectionError) as lost:
            await asyncio.wait_for(req, 5)
        assert lost.value.message == client.closed_reason  # said once, not twice over
        await asyncio.sleep(0.2)
        await asyncio.wait_for(client.close(), 5)
        del req
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(old)
        release.set()
        srv.close()
    assert not [c for c in seen if "never retrieved" in str(c.get("message"))], seen


async def test_the_client_refuses_a_request_line_the_exchange_would_close_on(connect) -> None:
    from client.client import ExchangeError

    alice = await connect("alice")
    with pytest.raises(ExchangeError) as refused:
        await alice.request("ping", pad="x" * (70 * 1024))
    assert refused.value.code == "line_too_long"
    assert (await alice.request("ping"))["type"] == "pong"  # nothing was sent; still connected


async def test_the_stats_line_is_logged_only_while_something_happens(tmp_path, caplog) -> None:
    from exchange.server import ExchangeServer, ServerConfig

    caplog.set_level(logging.INFO, logger="exchange.server")
    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0.05))
    await srv.start()
    try:
        assert srv.address is not None

        def stats_lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if "msgs/s in" in r.getMessage()]

        await asyncio.sleep(0.3)
        assert stats_lines() == []  # idle since start: nothing to say
        client = ExchangeClient(*srv.address, timeout=5)
        await asyncio.wait_for(client.connect(), 5)
        await asyncio.wait_for(client.login("alice"), 5)
        await asyncio.wait_for(client.buy("BTC-USD", "1", "90.00"), 5)
        await asyncio.sleep(0.3)
        lines = stats_lines()
        assert lines and lines[-1].startswith("1 connections, 1 orders"), lines
        await client.close()
    finally:
        await srv.stop()


class _UnreadPipe(asyncio.Transport):
    """A transport whose peer never reads: everything written stays in its buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.buffered = 0
        self.aborted = False

    def write(self, data: Any) -> None:
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def test_one_burst_past_the_buffer_limit_passes_but_a_buffer_that_keeps_growing_does_not() -> None:
    """The reports of a large cancel_all may exceed the limit in one write to a client that
    reads; a client that does not read is dropped once its buffer grows past the limit again."""
    from exchange.engine import Exchange
    from exchange.gateway import Gateway, GatewayOptions, Session
    from exchange.markets import default_config

    gateway = Gateway(Exchange(default_config()), GatewayOptions(max_buffer=1000))
    burst, steady = Session(gateway), Session(gateway)
    burst.connection_made(_UnreadPipe())
    steady.connection_made(_UnreadPipe())
    gateway._write(burst, [b"x" * 5000])
    assert not burst.transport.aborted and not burst.closed  # type: ignore[union-attr]
    gateway._write(burst, [b"y"])  # still unread
    assert burst.transport.aborted and burst.closed  # type: ignore[union-attr]
    sizes = []
    while not steady.closed:
        gateway._write(steady, [b"z" * 100])
        sizes.append(steady.transport.buffered)  # type: ignore[union-attr]
    assert sizes[-2] <= 1000 < sizes[-1]
    assert gateway.stats["slow_consumers"] == 2
