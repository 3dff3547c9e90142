"""``ExchangeClient``: the asyncio client library every tool here uses (UI, simulation, tests).

One TCP connection; requests carry an ``id`` and their reply is matched to it, so many
requests may be in flight at once. Everything the server pushes (execution reports, trades,
book updates) is available from ``events()``; execution reports that answer a request are
delivered there as well, so a consumer tracking orders sees every report exactly once.

Exceptions (all ``ExchangeError``):

    ExchangeError               an ``error`` reply: .code, .message, .field
     +-- OrderRejectedError     an order refused: .reason, .report (the ``exec`` rejected)
     +-- ExchangeConnectionError  cannot connect, connection lost, or no reply in time
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
from collections import deque
from decimal import Decimal
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import orjson

from exchange.protocol import DEFAULT_PORT, MAX_LINE

READ_LIMIT = 16 * 1024 * 1024


class ExchangeError(Exception):
    def __init__(self, code: str, message: str, field: str | None = None, reply: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.reply = reply or {}


class OrderRejectedError(ExchangeError):
    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__(report.get("reason", "rejected"), report.get("message", "order rejected"), reply=report)
        self.reason = report.get("reason")
        self.report = report


class ExchangeConnectionError(ExchangeError):
    def __init__(self, message: str) -> None:
        super().__init__("connection", message)


_CLOSED = object()


def _time_out(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


class _Protocol(asyncio.Protocol):
    """One connection's callbacks, handed to its client while it is the client's current one.

    A protocol rather than asyncio streams: every received chunk is split into lines and
    each reply resolves its request at once, in the callback, with no reader task to wake
    in between (about a fifth of a simulation agent's time went to the stream machinery).
    """

    def __init__(self, client: ExchangeClient) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.client._protocol is self:
            self.client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client._protocol is self:
            self.client._received(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client._protocol is self:
            self.client._lost(exc)

    def pause_writing(self) -> None:
        if self.client._protocol is self:
            self.client._write_paused = True

    def resume_writing(self) -> None:
        if self.client._protocol is self:
            self.client._resume_writing()


class ExchangeClient:
    def __init__(
        self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, timeout: float = 10.0,
        max_events: int = 100_000,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.user: str | None = None
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None  # the current connection's; None once it ended
        self._parts: list[bytes] = []  # the start of a line whose end has not arrived
        self._partial_len = 0
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._events: deque[Any] = deque()
        self._max_events = max_events
        self.dropped_events = 0
        self._event_ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed_reason: str | None = None

    # -- connection -------------------------------------------------------------------

    async def connect(self) -> ExchangeClient:
        """Connect (again, after a close or a lost connection: a live connection is dropped)."""
        # Kept: asking for the running loop costs a getpid() system call on CPython 3.11,
        # and a request needs it twice (its future, its timer).
        loop = self._loop = asyncio.get_running_loop()
        if self._protocol is not None:
            self._end("the connection was replaced by a new one", abort=True)
        # Everything is ready before the connection exists: the exchange may send a line and
        # close (it is shutting down) before ``create_connection`` returns.
        protocol = self._protocol = _Protocol(self)
        self._transport = None
        self._parts, self._partial_len = [], 0
        self._write_paused = self._closing = False
        self._closed = loop.create_future()
        self._events = deque(item for item in self._events if item is not _CLOSED)
        self.closed_reason = None
        try:
            await asyncio.wait_for(loop.create_connection(lambda: protocol, self.host, self.port), self.timeout)
        except (OSError, OverflowError, ValueError, asyncio.TimeoutError) as exc:
            if isinstance(exc, socket.gaierror):  # no such host: "is it running?" would mislead
                reason = f"cannot find the exchange's host {self.host!r} ({exc.strerror}); check --host"
            else:
                reason = (f"cannot connect to the exchange at {self.host}:{self.port} "
                          f"({getattr(exc, 'strerror', None) or type(exc).__name__}); is it running?")
            if self._protocol is protocol:
                self._end(reason)
            raise ExchangeConnectionError(reason) from None
        except BaseException:
            if self._protocol is protocol:
                self._end("the connection attempt was interrupted", abort=True)
            raise
        return self

    async def close(self) -> None:
        """Close cleanly (what was written is sent first), at most a second's wait; then abort."""
        transport, closed = self._transport, self._closed
        if self._protocol is not None and transport is not None and closed is not None:
            self._closing = True
            transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(closed), 1.0)
            except asyncio.TimeoutError:
                pass
        if self._protocol is not None:
            self._end("the connection was closed", abort=True)
        self._fail_pending("the connection was closed")

    def abort(self) -> None:
        """Drop the connection at once, without closing it cleanly (what a crash looks like
        to the exchange); the client then behaves as after a lost connection."""
        if self._protocol is not None:
            self._end("the connection was aborted", abort=True)

    async def __aenter__(self) -> ExchangeClient:
        return await self.connect()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._transport is not None and self.closed_reason is None

    def _received(self, data: bytes) -> None:
        if b"\n" not in data:  # the middle of a long line (a deep book, say)
            self._parts.append(data)
            self._partial_len += len(data)
            if self._partial_len > READ_LIMIT:
                self._too_long()
            return
        joined = bool(self._parts)
        if joined:
            self._parts.append(data)
            data = b"".join(self._parts)
        lines = data.split(b"\n")
        tail = lines.pop()
        # A line inside one chunk is shorter than the chunk (a few hundred kilobytes at
        # most); only one that was gathered from pieces can be over the limit.
        if joined and len(lines[0]) > READ_LIMIT or len(tail) > READ_LIMIT:
            self._too_long()
            return
        self._parts, self._partial_len = ([tail], len(tail)) if tail else ([], 0)
        loads, dispatch = orjson.loads, self._dispatch
        for line in lines:
            try:
                msg = loads(line)
            except orjson.JSONDecodeError:
                continue
            if msg.__class__ is dict:
                dispatch(msg)

    def _too_long(self) -> None:
        self._parts, self._partial_len = [], 0
        self._end(f"connection lost: a line from the exchange is over {READ_LIMIT} bytes", abort=True)

    def _lost(self, exc: Exception | None) -> None:
        if exc is not None:
            reason = f"connection lost: {exc}"
        elif self._closing:
            reason = "the connection was closed"
        else:
            reason = "the exchange closed the connection"
        self._end(reason)

    def _end(self, reason: str, abort: bool = False) -> None:
        """The current connection is over: say why to everyone waiting, once. ``abort`` also
        drops the transport (its own ``connection_lost`` then finds it detached)."""
        transport = self._transport
        self._protocol = None
        if abort and transport is not None:
            transport.abort()
        self.closed_reason = reason
        self._fail_pending(reason)
        self._push(_CLOSED)
        self._resume_writing(ConnectionResetError(reason))
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _resume_writing(self, exc: Exception | None = None) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        fut = self._pending.pop(rid, None) if rid is not None else None
        if fut is not None and not fut.done():
            fut.set_result(msg)
        if fut is None or msg.get("type") == "exec":
            self._push(msg)

    def _push(self, item: Any) -> None:
        if len(self._events) >= self._max_events and item is not _CLOSED:
            self._events.popleft()
            self.dropped_events += 1
        self._events.append(item)
        self._event_ready.set()

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ExchangeConnectionError(reason))

    # -- requests ---------------------------------------------------------------------

    def send(self, op: str, **fields: Any) -> asyncio.Future[dict[str, Any]]:
        """Send a request now and return the future of its reply (for pipelining)."""
        transport = self._transport
        if transport is None or self.closed_reason is not None:
            raise ExchangeConnectionError(self.closed_reason or "not connected")
        rid = next(self._ids)
        payload = {"op": op, "id": rid}
        payload.update((k, v) for k, v in fields.items() if v is not None)
        line = orjson.dumps(payload)
        if len(line) > MAX_LINE:  # the exchange would refuse it and close the connection
            raise ExchangeError(
                "line_too_long", f"the '{op}' request is {len(line)} bytes; at most {MAX_LINE}", None, None,
            )
        loop = self._loop
        assert loop is not None
        try:
            transport.write(line + b"\n")
        except (RuntimeError, OSError) as exc:  # a transport closing under us
            raise ExchangeConnectionError(self.closed_reason or f"connection lost: {exc}") from None
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[rid] = fut
        return fut

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its reply; an ``error`` reply raises ``ExchangeError``."""
        fut = self.send(op, **fields)
        loop = self._loop
        assert loop is not None
        try:
            if self._write_paused:
                # The exchange is not reading what we write: the drain and the reply share
                # the timeout.
                reply = await asyncio.wait_for(self._drain_then(fut), self.timeout)
            else:
                # The usual case. A timer rather than ``wait_for``, which would wrap every
                # request in a task of its own (a third of a simulation agent's time).
                timer = loop.call_later(self.timeout, _time_out, fut)
                try:
                    reply = await fut
                finally:
                    timer.cancel()
        except asyncio.TimeoutError:
            self._forget(fut)
            raise ExchangeConnectionError(f"no reply to '{op}' within {self.timeout} s") from None
        except (ConnectionError, OSError) as exc:
            self._forget(fut)
            raise ExchangeConnectionError(self.closed_reason or f"connection lost: {exc}") from None
        except BaseException:  # cancelled: nobody will take the reply
            self._forget(fut)
            raise
        if reply.get("type") == "error":
            raise ExchangeError(reply.get("code", "error"), reply.get("message", ""), reply.get("field"), reply)
        return reply

    def _forget(self, fut: asyncio.Future[dict[str, Any]]) -> None:
        """Stop waiting for a reply whose caller already has its error: nobody else will
        take the future's outcome, so it is settled here (no 'never retrieved' warning)."""
        self._pending = {k: f for k, f in self._pending.items() if f is not fut}
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()

    async def _drain_then(self, fut: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        if self._write_paused:
            assert self._loop is not None
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        return await fut

    # -- the operations -----------------------------------------------------------------

    async def login(self, user: str, token: str | None = None, *, cancel_on_disconnect: bool = False) -> dict[str, Any]:
        """``cancel_on_disconnect``: when this connection ends (but not when the exchange
        stops), the exchange cancels the orders placed through it that are still open."""
        reply = await self.request("login", user=user, token=token,
                                   cancel_on_disconnect=True if cancel_on_disconnect else None)
        self.user = user
        return reply

    async def ping(self) -> dict[str, Any]:
        return await self.request("ping")

    async def markets(self) -> list[dict[str, Any]]:
        return (await self.request("markets"))["markets"]

    async def place(
        self, market: str, side: str, qty: Any = None, price: Any = None, type: str | None = None,
        tif: str | None = None, post_only: bool | None = None, stp: str | None = None,
        client_order_id: str | None = None, raise_on_reject: bool = True, quote_qty: Any = None,
    ) -> dict[str, Any]:
        """Place an order; returns its first report (``new``). Rejections raise by default.
        A market order may be sized by ``quote_qty`` instead of ``qty`` (None): the most a
        buy spends, fee included, or a sell sells for; its ``new`` report says the size."""
        if type is None:
            type = "limit" if price is not None else "market"
        report = await self.request(
            "order", market=market, side=side, type=type, qty=_text(qty), price=_text(price),
            tif=tif, post_only=post_only, stp=stp, client_order_id=client_order_id,
            quote_qty=_text(quote_qty),
        )
        if raise_on_reject and report.get("exec_type") == "rejected":
            raise OrderRejectedError(report)
        return report

    async def buy(self, market: str, qty: Any = None, price: Any = None, **kw: Any) -> dict[str, Any]:
        return await self.place(market, "buy", qty, price, **kw)

    async def sell(self, market: str, qty: Any = None, price: Any = None, **kw: Any) -> dict[str, Any]:
        return await self.place(market, "sell", qty, price, **kw)

    async def cancel(self, order_id: int | None = None, *, client_order_id: str | None = None) -> dict[str, Any]:
        """Cancel an open order named by its ``order_id`` or by the ``client_order_id`` it
        was placed with."""
        return await self.request("cancel", order_id=order_id, client_order_id=client_order_id)

    async def modify(self, order_id: int, price: Any = None, qty: Any = None) -> dict[str, Any]:
        return await self.request("modify", order_id=order_id, price=_text(price), qty=_text(qty))

    async def balances(self) -> dict[str, dict[str, str]]:
        return (await self.request("balances"))["balances"]

    async def orders(self, market: str | None = None) -> list[dict[str, Any]]:
        return (await self.request("orders", market=market))["orders"]

    async def book(self, market: str, depth: int | None = None, level: int | None = None) -> dict[str, Any]:
        return await self.request("book", market=market, depth=depth, level=level)

    async def cancel_all(self, market: str | None = None) -> dict[str, Any]:
        """Cancel every open order of this user (in ``market`` only, if given); the answer's
        ``order_ids`` lists them, after each one's ``canceled`` report."""
        return await self.request("cancel_all", market=market)

    async def recent_trades(self, market: str, limit: int | None = None) -> dict[str, Any]:
        """The market's last trades, oldest first (at most 100; 50 by default)."""
        return await self.request("trades", market=market, limit=limit)

    async def fills(self, market: str | None = None, limit: int | None = None, after: int | None = None) -> dict[str, Any]:
        """This user's last fills (of one market, or all), oldest first: the last ``limit``
        (100 by default, at most 1,000), or with ``after`` the first ``limit`` whose trade id
        is above it, to page forward from a fill already seen. The answer's
        ``complete_after`` is the trade id above which every fill of the user is there (the
        exchange keeps at most 1,000 a user, among its last 100,000, and reads the ledger's
        tail back at a restart; the ledger holds them all)."""
        return await self.request("fills", market=market, limit=limit, after=after)

    async def order_status(self, order_id: int | None = None, *, client_order_id: str | None = None) -> dict[str, Any]:
        """One of this user's orders, open or recently finished (the exchange keeps each
        account's last 1,000 finished orders, across its restarts), named by
        ``order_id`` or by its ``client_order_id`` (``ExchangeError`` ``unknown_order`` if
        none)."""
        return await self.request("order_status", order_id=order_id, client_order_id=client_order_id)

    async def queue_position(self, order_id: int) -> dict[str, Any]:
        return await self.request("queue_position", order_id=order_id)

    async def subscribe(self, channel: str, market: str) -> dict[str, Any]:
        return await self.request("subscribe", channel=channel, market=market)

    async def unsubscribe(self, channel: str, market: str) -> dict[str, Any]:
        return await self.request("unsubscribe", channel=channel, market=market)

    async def deposit(self, asset: str, amount: Any, user: str | None = None) -> dict[str, Any]:
        return await self.request("deposit", asset=asset, amount=_text(amount), user=user)

    async def withdraw(self, asset: str, amount: Any, user: str | None = None) -> dict[str, Any]:
        return await self.request("withdraw", asset=asset, amount=_text(amount), user=user)

    async def stats(self) -> dict[str, Any]:
        return await self.request("stats")

    # -- pushed events ------------------------------------------------------------------

    def pending_events(self) -> list[dict[str, Any]]:
        """Every event received so far and not yet taken, without waiting."""
        out = []
        while self._events and self._events[0] is not _CLOSED:
            out.append(self._events.popleft())
        if not self._events:
            self._event_ready.clear()
        return out

    async def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next pushed message, or None when the connection has closed."""
        while not self._events:
            self._event_ready.clear()
            if timeout is None:
                await self._event_ready.wait()
            else:
                await asyncio.wait_for(self._event_ready.wait(), timeout)
        item = self._events[0]
        if item is _CLOSED:
            return None
        self._events.popleft()
        return item  # type: ignore[no-any-return]

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Async iterator over pushed messages; ends when the connection closes."""
        while True:
            event = await self.next_event()
            if event is None:
                return
            yield event


T = TypeVar("T")


async def patiently(call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, again while the exchange's rate limit refuses it (``rate_limited``;
    50 ms doubling, about 3 s in all). For what a program must have to go on (its start-up
    queries, its subscriptions), not for orders: an order refused for the rate limit was not
    carried out, and whether to send it again is the trader's decision."""
    delay = 0.05
    while True:
        try:
            return await call()
        except ExchangeConnectionError:
            raise
        except ExchangeError as exc:
            if exc.code != "rate_limited" or delay > 1.6:
                raise
        await asyncio.sleep(delay)
        delay *= 2


def port_number(text: str) -> int:
    """An argparse type for ``--port``: 99999 is a mistake to name, not a refused connection."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError("a port is a number from 1 to 65535")
    return port


def _text(value: Any) -> Any:
    """Numbers go out as plain decimal strings (never ``5e-05``: the exchange refuses exponents).

    A float is read through its shortest repr, the digits the caller wrote for any sane number.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        value = Decimal(repr(value))
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)
