"""Wire edges found by a cold review: exact JSON numbers whatever else the line holds,
half-closing clients, and the rate limit on a last unterminated line. Real sockets on
127.0.0.1 with an ephemeral port; every read bounded."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from exchange.server import ExchangeServer, ServerConfig


async def _open(srv: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = srv.address
    return await asyncio.wait_for(asyncio.open_connection(host, port), 5)


async def _read_until_close(reader: asyncio.StreamReader, limit: float = 5) -> list[dict]:
    got = []
    try:
        while line := await asyncio.wait_for(reader.readline(), limit):
            got.append(orjson.loads(line))
    except (ConnectionResetError, asyncio.IncompleteReadError):
        pass
    return got


async def _replies(reader: asyncio.StreamReader, ids: set[Any]) -> dict[Any, dict]:
    out: dict[Any, dict] = {}
    while len(out) < len(ids):
        msg = orjson.loads(await asyncio.wait_for(reader.readline(), 5))
        if msg.get("id") in ids:
            out[msg["id"]] = msg
    return out



async def test_a_json_number_too_deep_for_the_exact_parser_is_refused_not_rounded(server) -> None:
    """The exact re-parse (stdlib json) gives up on nesting that orjson (limit 1024)
    accepts: the request is refused rather than taken with the double's reading (1)."""
    reader, writer = await _open(server)
    pad = b"[" * 1000 + b"]" * 1000  # 2 KB, far below the 64 KiB line limit
    writer.write(
        b'{"op":"login","user":"alice"}\n'
        b'{"op":"order","id":"n","market":"BTC-USD","side":"buy","price":"100",'
        b'"qty":1.00000000000000001,"pad":' + pad + b"}\n"
    )
    reply = (await _replies(reader, {"n"}))["n"]
    writer.close()
    assert (reply.get("code"), reply.get("field")) == ("bad_request", "qty"), reply
    assert server.engine.open_orders("alice") == []



async def test_a_float_id_is_refused_even_when_the_line_also_holds_1e400(server) -> None:
    """A float id gets bad_request (field id), unechoed, also when orjson could not read the
    line (a 1e400 elsewhere) and the exact parser read it instead."""
    reader, writer = await _open(server)
    writer.write(b'{"op":"ping","id":1.5}\n{"op":"ping","id":1.5,"x":1e400}\n')
    first = orjson.loads(await asyncio.wait_for(reader.readline(), 5))
    second = orjson.loads(await asyncio.wait_for(reader.readline(), 5))
    writer.close()
    assert first["code"] == "bad_request" and first["field"] == "id" and "id" not in first
    assert second.get("code") == "bad_request" and "id" not in second, second


async def test_a_float_order_id_cancels_nothing_even_with_1e400_in_the_line(server) -> None:
    """``"order_id": 1e0`` is refused (bad_request), with or without a 1e400 elsewhere."""
    reader, writer = await _open(server)
    writer.write(b'{"op":"login","user":"alice","id":"l"}\n'
                 b'{"op":"order","id":"o","market":"BTC-USD","side":"buy","price":"90","qty":"1"}\n')
    placed = (await _replies(reader, {"l", "o"}))["o"]
    oid = placed["order_id"]
    writer.write(b'{"op":"cancel","id":"c1","order_id":%de0}\n' % oid)
    plain = (await _replies(reader, {"c1"}))["c1"]
    assert plain["code"] == "bad_request" and plain["field"] == "order_id"  # as documented
    writer.write(b'{"op":"cancel","id":"c2","order_id":%de0,"x":1e400}\n' % oid)
    odd = (await _replies(reader, {"c2"}))["c2"]
    writer.close()
    assert odd.get("code") == "bad_request", odd
    assert [o.id for o in server.engine.open_orders("alice")] == [oid]


_PIPE = (
    b'{"op":"login","user":"alice","id":"l"}\n'
    b'{"op":"order","id":"o1","market":"BTC-USD","side":"buy","price":"100","qty":"1"}\n'
    + b'{"op":"ping","pad":"' + b"x" * 70_000 + b'"}\n'
)


@pytest.mark.parametrize("fsync", ["batch", "always"])
async def test_half_close_after_line_too_long_still_delivers_the_held_replies(tmp_path, fsync: str) -> None:
    """A script pipes its requests and shuts down its sending side (``nc -N``); its last
    line is too long. The order's ack and the line_too_long error wait for the journal;
    the EOF that arrives meanwhile must not close the connection before they are written."""
    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0, fsync=fsync))
    await srv.start()
    try:
        reader, writer = await _open(srv)
        writer.write(_PIPE)
        writer.write_eof()
        got = await _read_until_close(reader)
        writer.close()
        assert len(srv.engine.open_orders("alice")) == 1  # the order was carried out ...
        assert [(m["type"], m.get("id") or m.get("code")) for m in got] == [  # ... and acked
            ("logged_in", "l"), ("exec", "o1"), ("error", "line_too_long"),
        ], got
    finally:
        await srv.stop()


@pytest.mark.parametrize("fsync", ["batch", "always"])
async def test_control_the_same_bytes_without_half_close_get_every_reply(tmp_path, fsync: str) -> None:
    """The same bytes without ``write_eof``: all three replies, then the close."""
    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0, fsync=fsync))
    await srv.start()
    try:
        reader, writer = await _open(srv)
        writer.write(_PIPE)
        got = await _read_until_close(reader)
        writer.close()
        assert [(m["type"], m.get("id") or m.get("code")) for m in got] == [
            ("logged_in", "l"), ("exec", "o1"), ("error", "line_too_long"),
        ], got
    finally:
        await srv.stop()



async def test_a_last_line_without_newline_gets_its_refilled_allowance(tmp_path) -> None:
    """--rate-limit 5: five requests use the burst; 1.2 s later the bucket is full again,
    also for a last request without its newline that a half-close hands over."""
    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0, rate_limit=5))
    await srv.start()
    try:
        reader, writer = await _open(srv)
        writer.write(b"".join(b'{"op":"ping","id":%d}\n' % i for i in range(5)))
        for _ in range(5):
            assert orjson.loads(await asyncio.wait_for(reader.readline(), 5))["type"] == "pong"
        await asyncio.sleep(1.2)
        writer.write(b'{"op":"ping","id":"last"}')
        await writer.drain()
        writer.write_eof()
        got = await _read_until_close(reader)
        writer.close()
        assert [(m["type"], m.get("id")) for m in got] == [("pong", "last")], got
    finally:
        await srv.stop()




async def test_lines_the_server_refuses_count_against_the_rate_limit(tmp_path) -> None:
    """--rate-limit 5: garbage, an unknown op and a line without one use the allowance like
    requests do (each still answered with its own error), so the request after them is
    ``rate_limited``; flooding refused lines cannot get around the limit."""
    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0, rate_limit=5))
    await srv.start()
    try:
        reader, writer = await _open(srv)
        writer.write(b'{oops\n{"op":"teleport","id":1}\n{"id":2}\n[]\n{"op":"ping","id":3}\n'
                     b'{"op":"ping","id":4}\nnot json either\n')
        got = [orjson.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(7)]
        writer.close()
        assert [m.get("code", m["type"]) for m in got] == [
            "bad_json", "unknown_op", "bad_request", "bad_request", "pong", "rate_limited", "bad_json"], got
        assert got[5]["id"] == 4
    finally:
        await srv.stop()


async def test_an_id_wider_than_4300_digits_is_a_bad_request_on_id_as_documented(server) -> None:
    """An integer id wider than 64 bits gets bad_request on id, however wide (orjson reads
    5000 digits as an infinite double; Python refuses such a string as an int)."""
    reader, writer = await _open(server)
    writer.write(b'{"op":"ping","id":' + b"9" * 400 + b'}\n{"op":"ping","id":' + b"9" * 5000 + b"}\n")
    first = orjson.loads(await asyncio.wait_for(reader.readline(), 5))
    second = orjson.loads(await asyncio.wait_for(reader.readline(), 5))
    writer.close()
    assert (first["code"], first.get("field")) == ("bad_request", "id")
    assert (second["code"], second.get("field")) == ("bad_request", "id"), second
