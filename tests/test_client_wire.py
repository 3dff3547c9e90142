"""``ExchangeClient`` reading the wire: lines cut anywhere, several in one chunk, a line
too long, a server that goes away, and a reconnect. A scripted server on loopback sends
exactly the bytes each test needs, which the real exchange cannot be made to do.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
import pytest

import client.client as client_module
from client.client import ExchangeClient, ExchangeConnectionError

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(script: Script) -> tuple[asyncio.base_events.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[ExchangeClient]:
    """A client connected to a server that runs ``script`` for each connection."""
    srv, port = await serve(script)
    client = ExchangeClient("127.0.0.1", port, timeout=5)
    try:
        await client.connect()
        yield client
    finally:
        await client.close()
        srv.close()


async def request_id(reader: asyncio.StreamReader) -> Any:
    return orjson.loads(await reader.readline())["id"]


def line(**msg: Any) -> bytes:
    return orjson.dumps(msg) + b"\n"


async def test_replies_cut_byte_by_byte_and_lines_sharing_a_chunk() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rid = await request_id(reader)
        for byte in line(type="pong", id=rid):  # one byte per write, each its own chunk
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.002)
        rid = await request_id(reader)
        # A pushed trade, the reply, and the first half of another push: one chunk.
        push = line(type="trade", market="BTC-USD", trade_id=7, price="1", qty="1")
        writer.write(line(type="trade", market="BTC-USD", trade_id=6, price="1", qty="1")
                     + line(type="pong", id=rid) + push[:10])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(push[10:])
        await writer.drain()
        await reader.read()

    async with scripted(script) as client:
        assert await asyncio.wait_for(client.ping(), 5) == {"type": "pong", "id": 1}
        assert await asyncio.wait_for(client.ping(), 5) == {"type": "pong", "id": 2}
        first = await asyncio.wait_for(client.next_event(), 5)
        second = await asyncio.wait_for(client.next_event(), 5)
        assert first is not None and second is not None
        assert (first["trade_id"], second["trade_id"]) == (6, 7)


async def test_a_line_over_the_limit_closes_the_connection_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "READ_LIMIT", 1000)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_id(reader)
        writer.write(line(type="trade", market="BTC-USD", trade_id=1, price="1", qty="1"))
        for _ in range(5):  # 1,500 bytes and still no end of line
            writer.write(b"x" * 300)
            await writer.drain()
            await asyncio.sleep(0.01)
        await reader.read()

    async with scripted(script) as client:
        with pytest.raises(ExchangeConnectionError, match="over 1000 bytes"):
            await asyncio.wait_for(client.ping(), 5)
        assert not client.connected
        event = await asyncio.wait_for(client.next_event(), 5)
        assert event is not None and event["trade_id"] == 1  # what came before the long line
        assert await asyncio.wait_for(client.next_event(), 5) is None


async def test_the_server_going_away_fails_the_waiting_request_then_a_reconnect_works() -> None:
    calls = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        rid = await request_id(reader)
        if calls == 1:
            return  # closes without answering
        writer.write(line(type="pong", id=rid) + line(type="trade", market="BTC-USD", trade_id=3))
        await writer.drain()
        await reader.read()

    async with scripted(script) as client:
        with pytest.raises(ExchangeConnectionError, match="the exchange closed the connection"):
            await asyncio.wait_for(client.ping(), 5)
        assert client.closed_reason == "the exchange closed the connection"
        assert await asyncio.wait_for(client.next_event(), 5) is None
        with pytest.raises(ExchangeConnectionError, match="closed the connection"):
            client.send("ping")

        await client.connect()
        assert client.connected
        assert (await asyncio.wait_for(client.ping(), 5))["type"] == "pong"
        event = await asyncio.wait_for(client.next_event(), 5)  # the old connection's end is gone
        assert event is not None and event["trade_id"] == 3
        await client.close()
        assert client.closed_reason == "the connection was closed"
        assert not client.connected


def test_a_connection_the_exchange_ends_before_connect_returns_is_seen_as_ended() -> None:
    """What the exchange does while shutting down: one line, then close, at once. The end
    may arrive before ``connect`` returns (under uvloop with a busy loop, nearly always)."""
    import socket
    import threading
    import time

    import uvloop

    async def trial() -> None:
        listener = socket.create_server(("127.0.0.1", 0))

        def serve_one() -> None:  # another thread, as the exchange is another process
            conn, _ = listener.accept()
            conn.sendall(line(type="error", code="shutting_down", message="the exchange is shutting down"))
            conn.close()

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()

        async def busy() -> None:  # other work on the loop, as a simulation's agents do
            while True:
                time.sleep(0.002)
                await asyncio.sleep(0)

        hog = asyncio.get_running_loop().create_task(busy())
        client = ExchangeClient("127.0.0.1", listener.getsockname()[1], timeout=2)
        try:
            await client.connect()
        finally:
            hog.cancel()
        try:
            event = await asyncio.wait_for(client.next_event(), 2)
            assert event is not None and event["code"] == "shutting_down"
            assert await asyncio.wait_for(client.next_event(), 2) is None
            assert not client.connected
            assert client.closed_reason == "the exchange closed the connection"
            with pytest.raises(ExchangeConnectionError, match="closed the connection"):
                await asyncio.wait_for(client.ping(), 2)
        finally:
            await client.close()
            listener.close()
            thread.join(5)

    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        for _ in range(5):
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(trial())


async def test_close_while_the_exchange_is_not_reading_ends_the_connection_at_once() -> None:
    import socket

    release = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await release.wait()

    srv, port = await serve(deaf)
    client = ExchangeClient("127.0.0.1", port, timeout=5)
    try:
        await client.connect()
        assert client._transport is not None
        client._transport.write(b" " * (8 << 20))  # nothing of it is read
        pending = client.send("ping")
        await client.close()  # a second of trying, then abort (bounded by close itself)
        assert not client.connected and client.closed_reason == "the connection was closed"
        with pytest.raises(ExchangeConnectionError):
            await pending
        with pytest.raises(ExchangeConnectionError, match="the connection was closed"):
            client.send("ping")
    finally:
        release.set()
        srv.close()
