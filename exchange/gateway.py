"""The asyncio shell around the engine: connections, sessions, auth, routing, backpressure.

Theory of operation
-------------------
Each TCP connection is an ``asyncio.Protocol`` (``Session``); there is no task per message.
``data_received`` splits the chunk into lines (at most ``MAX_LINE`` bytes each), and each
line is decoded by ``exchange/protocol.py``, stamped with the time and the session's user,
and handed to the one ``Exchange``. The events that come back are routed at once: private
execution reports to *every* session of the order's owner, public trades and book deltas
to the subscribers of that market. Outgoing messages are queued per session and written
with one ``transport.write`` per session after the whole chunk has been handled, which is
where most of a line protocol's speed comes from.

The gateway decides nothing a trader would call a rule: funds, matching and priority are
the engine's. It protects itself instead:

* a line over 64 KiB gets ``line_too_long`` and the connection is closed;
* a client that stops reading its replies has its reading paused (``pause_writing``), so it
  cannot make us buffer without bound;
* a session whose outgoing buffer still grows past ``max_buffer`` (a subscriber that never
  reads) is disconnected with a logged reason, without slowing the engine or anyone else;
  one burst from a buffer under half of it is let through (a large request's answer).

Every state-changing command goes through ``execute``, the single door to the engine.
With a write-ahead journal attached (``Gateway.journal``, see ``storage/journal.py``),
``execute`` appends every command the engine accepted, and ``flush`` holds all outgoing
messages while any appended record is not yet durable: they are queued, in order, with the
journal position they wait for, and ``release`` writes them once the journal reports that
position durable. Everything queued after a held message is held too, so no session ever
sees a reply overtake an earlier one. Input keeps being read and matched meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Protocol, cast

from exchange.engine import Exchange
from exchange.protocol import (
    MAX_LINE,
    PUBLIC_OPS,
    FILLS_KEPT,
    FILLS_PER_USER,
    RECENT_TRADES,
    ErrorCode,
    Formatter,
    OrderRejected,
    ProtocolError,
    book_request,
    cancel_command,
    check_op_fields,
    decode_request,
    encode,
    error_message,
    fills_request,
    funding_command,
    modify_command,
    order_command,
    order_id_of,
    optional_market,
    order_ref,
    subscription,
    trades_request,
    user_name,
)
from exchange.state import FinishedOrders, is_finished
from exchange.types import (
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
    OrderStatus,
    REJECT_MESSAGES,
    RejectReason,
    Side,
    Trade,
)

log = logging.getLogger("exchange.gateway")

DEFAULT_MAX_BUFFER: Final = 8 * 1024 * 1024
DEFAULT_DEMO_BALANCES: Final = {"USD": "100000", "BTC": "10", "ACME": "1000"}


def hash_token(token: str) -> str:
    """How tokens are stored in an accounts file: ``sha256:<hex>`` of the UTF-8 token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class CommandJournal(Protocol):
    """What the gateway needs from a write-ahead journal (``storage.journal.Journal``)."""

    last_lsn: int  # position of the last record appended
    durable_lsn: int  # position up to which records are durable

    def append(self, command: Command) -> int: ...


_REJECTED: Final = ExecType.REJECTED
_CANCELED: Final = ExecType.CANCELED
_NEW: Final = ExecType.NEW
_BUY: Final = Side.BUY
_MAKER: Final = Liquidity.MAKER


@dataclass
class UserEntry:
    token_hash: str
    admin: bool = False


@dataclass
class GatewayOptions:
    auth: str = "open"  # "open" or "keys"
    users: dict[str, UserEntry] = field(default_factory=dict)
    demo_balances: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DEMO_BALANCES))
    max_buffer: int = DEFAULT_MAX_BUFFER
    # Requests per second per connection, with bursts of up to one second's worth (a token
    # bucket); 0: no limit. Over it, a request gets ``rate_limited`` and is not carried out.
    rate_limit: int = 0


class Session(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "gateway", "transport", "peer", "user", "admin", "buf", "out", "queued", "paused",
        "closed", "closing", "subscriptions", "reading_paused", "tokens", "refilled", "owned",
        "owned_limit",
    )

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.user: str | None = None
        self.admin = False
        self.buf = bytearray()  # an incomplete line waiting for its newline
        self.out: list[bytes] = []
        self.queued = False
        self.paused = False
        self.reading_paused = False
        self.closed = False
        self.closing = False  # closed, and its transport closes once held output is written
        self.subscriptions: set[tuple[str, str]] = set()
        self.tokens = float(gateway.options.rate_limit)  # requests it may still send now
        self.refilled = time.monotonic()
        # With cancel_on_disconnect: the ids of the orders it placed (some may have ended).
        self.owned: set[int] | None = None
        self.owned_limit = 1024  # past this many, the ended ones are dropped (then twice what stays)

    # -- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        self.gateway.connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gateway.disconnected(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if b"\n" not in data:
            # Part of a line: append (amortised O(1)) and look at it again only once its
            # newline arrives, so a line sent in many small pieces costs linear time.
            self.buf += data
            if len(self.buf) > MAX_LINE:
                self.fatal(ErrorCode.LINE_TOO_LONG, f"a line may be at most {MAX_LINE} bytes")
            return
        if self.buf:
            self.buf += data
            buf = bytes(self.buf)
        else:
            buf = data
        lines = buf.split(b"\n")
        rest = lines.pop()
        gateway = self.gateway
        if gateway.options.rate_limit:  # refill once per chunk received, not per line
            self._refill()
        for line in lines:
            if len(line) > MAX_LINE:
                self.fatal(ErrorCode.LINE_TOO_LONG, f"a line may be at most {MAX_LINE} bytes")
                break
            if line.strip():
                gateway.handle_line(self, line)
            if self.closed:
                break
        else:
            if len(rest) > MAX_LINE:
                self.fatal(ErrorCode.LINE_TOO_LONG, f"a line may be at most {MAX_LINE} bytes")
            self.buf = bytearray(rest)
        gateway.flush()

    def eof_received(self) -> bool | None:
        """The client is done sending (half-close): answer what it sent, then close.

        A last line without its newline is still a request. Replies held for the journal
        keep the connection half-open until they are written, so a script that shuts down
        its sending side after its requests still reads every acknowledgement.
        """
        if self.closed:  # a goodbye still waiting for the journal keeps the connection
            return True if self.closing else None
        if self.buf.strip():
            line = bytes(self.buf)
            self.buf = bytearray()
            if self.gateway.options.rate_limit:
                self._refill()
            self.gateway.handle_line(self, line)
        if self.closed:  # the last line closed it: its goodbye is already arranged
            return True if self.closing else None
        gateway = self.gateway
        gateway.flush()
        self.closed = True
        if gateway.held:
            gateway.close_after_release(self)
            return True
        return None  # nothing held: the transport writes what it has, then closes

    def _refill(self) -> None:
        """The rate limit's allowance grows with the time since the last chunk."""
        limit = self.gateway.options.rate_limit
        now = time.monotonic()
        self.tokens = min(float(limit), self.tokens + (now - self.refilled) * limit)
        self.refilled = now

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it does.
        self.paused = True
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- output -----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.out.append(data)
        if not self.queued:
            self.queued = True
            self.gateway.pending.append(self)

    def send_msg(self, message: dict[str, Any]) -> None:
        self.send(encode(message))

    def fatal(self, code: str, message: str) -> None:
        """Tell the client why, then close the connection after what is queued."""
        gateway = self.gateway
        self.send_msg(error_message(code, message))
        gateway.flush()
        self.closed = True
        if self.transport is not None:
            if gateway.held:
                gateway.close_after_release(self)  # the goodbye waits for the journal too
            else:
                self.transport.close()


class _Fifo:
    """A first-in first-out queue on a list: appending and dropping the first are a few
    native operations (a ``deque`` method is a generic call from compiled code); the list
    sheds its dropped head now and then, which costs a move of the pointers kept."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.start = 0

    def size(self) -> int:
        return len(self.items) - self.start

    def push(self, item: Any) -> None:
        self.items.append(item)

    def first(self) -> Any:
        return self.items[self.start]

    def pop_first(self) -> Any:
        items = self.items
        start = self.start
        item = items[start]
        items[start] = None
        start += 1
        if start >= 64 and start * 2 >= len(items):
            del items[:start]
            start = 0
        self.start = start
        return item

    def values(self) -> list[Any]:
        return self.items[self.start:]


class RecentFills:
    """Each user's fills among the exchange's last ``kept`` (two a trade), at most
    ``per_user`` of them, oldest first, for ``fills``: rows of (trade id, order id, market,
    side, price, qty, liquidity, fee, ts, client order id), formatted only when asked for
    (``Formatter.fill``), from the engine's trade reports and the ledger's lines of before
    this start. Tuples of numbers and strings only: the collector stops tracking them, where
    100,000 kept reports would be visited by each of its older-generation passes.

    Bounded per user and in all, in constant time a fill, so that an exchange open to any
    user name holds a fixed amount however many trade. Not part of the state: the ledger
    holds every fill for good, and a restart reads its tail back. ``complete_after`` says
    from where a user's rows are whole, so that a client can tell a gap from an end.
    """

    def __init__(self, per_user: int = FILLS_PER_USER, kept: int = FILLS_KEPT) -> None:
        if per_user < 1 or kept < 1:
            raise ValueError("RecentFills keeps at least one fill")
        self.per_user = per_user
        self.kept = kept
        self.by_user: dict[str, _Fifo] = {}
        # Every fill above this trade id is kept, unless its user's own rows say otherwise
        # (``_dropped``): raised by the start-up's read of the ledger and by users forgotten.
        self.floor = 0
        self._dropped: dict[str, int] = {}
        # The last ``kept`` fills of all users, oldest first (rows a user's own bound has
        # dropped since included), with their owners.
        self._owners = _Fifo()
        self._rows = _Fifo()

    def add(self, account: str, row: Any) -> None:
        mine = self.by_user.get(account)
        if mine is None:
            mine = self.by_user[account] = _Fifo()
        mine.push(row)
        if mine.size() > self.per_user:
            self._dropped[account] = mine.pop_first()[0]
        rows = self._rows
        self._owners.push(account)
        rows.push(row)
        if rows.size() > self.kept:
            owner: str = self._owners.pop_first()
            old = rows.pop_first()
            theirs = self.by_user.get(owner)
            if theirs is not None and theirs.first() is old:  # else the user's own bound dropped it
                theirs.pop_first()
                if theirs.size():
                    self._dropped[owner] = old[0]
                else:
                    del self.by_user[owner]
                    self._dropped.pop(owner, None)
                    self.floor = max(self.floor, old[0])

    def rows(self, account: str | None) -> list[Any]:
        mine = self.by_user.get(account or "")
        return mine.values() if mine is not None else []

    def complete_after(self, account: str | None) -> int:
        """The trade id above which every fill of ``account`` is kept."""
        return max(self.floor, self._dropped.get(account or "", 0))


class Gateway:
    """Routes between sessions and the engine. Owns no trading state."""

    def __init__(
        self,
        engine: Exchange,
        options: GatewayOptions | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.engine = engine
        self.options = options or GatewayOptions()
        self.config = engine.config
        self.fmt = Formatter(engine.config)
        self.clock = clock
        self.last_ts = 0
        self.sessions: set[Session] = set()
        self.by_user: dict[str, list[Session]] = {}
        self.subscribers: dict[tuple[str, str], list[Session]] = {}
        self.pending: list[Session] = []
        self.accepting = True
        # Observers of every event (ledger, audit...): called after the engine, in order.
        self.listeners: list[Callable[[list[Event]], None]] = []
        # Observers of the rejections only, which the journal does not record (with the
        # ledger and audit logs written by the follower process, its audit lines come here).
        self.reject_listeners: list[Callable[[list[Event]], None]] = []
        # Write-ahead journal, if any; output waiting for it: (position, [(session, data)]).
        self.journal: CommandJournal | None = None
        self.held: deque[tuple[int, list[tuple[Session, list[bytes]]]]] = deque()
        self._close_after: list[tuple[int, Session]] = []
        self.stats = {
            "orders": 0, "trades": 0, "messages_in": 0, "messages_out": 0,
            "connections_total": 0, "slow_consumers": 0,
        }
        self.started = time.monotonic()
        self._rate_mark = (time.monotonic(), 0, 0, 0)
        self.rates = {"orders_per_sec": 0.0, "trades_per_sec": 0.0, "messages_per_sec": 0.0}
        # What ``order_status`` answers once an order is gone; the server hands in the one
        # recovery rebuilt (exchange/state.py), so it survives restarts.
        self.finished = FinishedOrders()
        # Each market's last trades for ``trades``: engine events, formatted only when asked
        # for, and rows from the ledger of before this start (``seed_recent``).
        self.recent: dict[str, deque[Any]] = {
            symbol: deque(maxlen=RECENT_TRADES) for symbol in engine.config.markets
        }
        # Each user's last fills for ``fills`` (``seed_fills`` adds the ledger's).
        self.fills = RecentFills()
        self._ops: dict[str, Callable[[Session, dict[str, Any], Any], None]] = {
            "login": self.op_login,
            "markets": self.op_markets,
            "order": self.op_order,
            "cancel": self.op_cancel,
            "cancel_all": self.op_cancel_all,
            "modify": self.op_modify,
            "balances": self.op_balances,
            "orders": self.op_orders,
            "book": self.op_book,
            "trades": self.op_trades,
            "fills": self.op_fills,
            "subscribe": self.op_subscribe,
            "unsubscribe": self.op_unsubscribe,
            "deposit": self.op_funding,
            "withdraw": self.op_funding,
            "ping": self.op_ping,
            "stats": self.op_stats,
            "queue_position": self.op_queue_position,
            "order_status": self.op_order_status,
        }

    # -- connection bookkeeping -------------------------------------------------------

    def connected(self, session: Session) -> None:
        self.sessions.add(session)
        self.stats["connections_total"] += 1
        if not self.accepting:
            session.fatal(ErrorCode.SHUTTING_DOWN, "the exchange is shutting down")

    def disconnected(self, session: Session) -> None:
        self.sessions.discard(session)
        if session.user is not None:
            others = self.by_user.get(session.user)
            if others and session in others:
                others.remove(session)
                if not others:
                    del self.by_user[session.user]
        for key in session.subscriptions:
            subs = self.subscribers.get(key)
            if subs and session in subs:
                subs.remove(session)
        session.subscriptions.clear()
        owned = session.owned
        if owned and self.accepting and session.user is not None:
            try:
                self._cancel_owned(session.user, owned)
            except Exception:  # a bug must not leave the session half-forgotten, nor stop the loop
                log.exception("cancel_on_disconnect failed for %s (user %s)", session.peer, session.user)

    def _cancel_owned(self, user: str, owned: set[int]) -> None:
        """cancel_on_disconnect: the orders this session placed that are still open, each as
        its own journaled ``cancel`` with one ts, reported to the user's other sessions. Not
        when the exchange stops: resting orders survive a restart."""
        still_open = [oid for oid in sorted(owned) if self.engine.order(user, oid) is not None]
        self._cancel_each(user, still_open, None)
        owned.clear()
        self.flush()

    def _cancel_each(self, user: str, order_ids: list[int], requester: Session | None) -> list[int]:
        """Each order canceled as its own journaled ``cancel`` (so replay and the audit logs
        need nothing new), all with one ts; returns the ids it canceled."""
        ts = self.now()
        canceled: list[int] = []
        for oid in order_ids:
            events = self.execute(CancelOrder(ts, user, oid))
            self.route(events, requester, None)
            if any(ev.__class__ is ExecReport and ev.exec_type is _CANCELED for ev in events):  # type: ignore[attr-defined]
                canceled.append(oid)
        return canceled

    def flush(self) -> None:
        """Write everything queued, one write per session; drop sessions that fell too far behind.

        With a journal, output is held while any journaled command is not yet durable (and
        behind any output already held), and ``release`` writes it later.
        """
        pending = self.pending
        if not pending:
            return
        self.pending = []
        journal = self.journal
        if journal is not None and (self.held or journal.durable_lsn < journal.last_lsn):
            batch = []
            for session in pending:
                session.queued = False
                if session.out:
                    batch.append((session, session.out))
                    session.out = []
            if batch:
                self.held.append((journal.last_lsn, batch))
            return
        for session in pending:
            session.queued = False
            out = session.out
            if not out or session.closed:
                out.clear()
                continue
            session.out = []
            self._write(session, out)

    def _write(self, session: Session, out: list[bytes]) -> None:
        transport = session.transport
        if transport is None or transport.is_closing():
            return
        self.stats["messages_out"] += len(out)
        limit = self.options.max_buffer
        # A consumer that keeps up may still get one burst beyond the limit (the reports of
        # a large cancel_all): only a buffer already half full and growing past it counts.
        behind = transport.get_write_buffer_size() > limit // 2
        transport.write(b"".join(out) if len(out) > 1 else out[0])
        if behind and transport.get_write_buffer_size() > limit:
            self.stats["slow_consumers"] += 1
            log.warning(
                "disconnecting %s (user %s): slow consumer, %d bytes unsent",
                session.peer, session.user, transport.get_write_buffer_size(),
            )
            session.closed = True
            transport.abort()

    def release(self, durable_lsn: int) -> None:
        """Journal callback: write the held output whose commands are now durable."""
        held = self.held
        while held and held[0][0] <= durable_lsn:
            for session, out in held.popleft()[1]:
                self._write(session, out)
        if self._close_after:
            still = []
            for mark, session in self._close_after:
                if mark <= durable_lsn or not held:
                    if session.transport is not None:
                        session.transport.close()
                else:
                    still.append((mark, session))
            self._close_after = still
        self.flush()

    def close_after_release(self, session: Session) -> None:
        """Close ``session`` once the output held so far (its last words included) is written."""
        session.closing = True
        self._close_after.append((self.held[-1][0], session))

    # -- the door to the engine -------------------------------------------------------

    def now(self) -> int:
        ts = self.clock()
        if ts <= self.last_ts:
            ts = self.last_ts + 1
        self.last_ts = ts
        return ts

    def execute(self, command: Command) -> list[Event]:
        """Run one command through the engine, journal it if it changed anything, and tell
        every listener about its events (listeners see the journal position it got)."""
        events = self.engine.handle(command)
        journal = self.journal
        if journal is not None:
            # A rejection is a single event and changes nothing: not worth a record.
            if len(events) != 1 or not (
                events[0].__class__ is CommandRejected
                or (events[0].__class__ is ExecReport and events[0].exec_type is _REJECTED)  # type: ignore[attr-defined]
            ):
                journal.append(command)
            else:
                for listener in self.reject_listeners:
                    try:
                        listener(events)
                    except Exception:
                        log.exception("a listener failed on a rejection")
        for listener in self.listeners:
            try:
                listener(events)
            except Exception:  # the command happened: its reports must still reach the user
                log.exception("a listener failed on the events of %s", type(command).__name__)
        return events

    def route(self, events: list[Event], requester: Session | None, rid: Any) -> None:
        """Send each event where it belongs; the requester's first report echoes ``rid``."""
        fmt = self.fmt
        first = requester is not None and rid is not None  # no id given: nothing to echo
        for ev in events:
            cls = ev.__class__
            if cls is ExecReport:
                # A typed name: compiled, its fields are read directly (on ``ev``, an Event,
                # each would be a generic attribute lookup).
                rep = cast(ExecReport, ev)
                if is_finished(rep.status):
                    self.finished.add(rep)
                if rep.trade_id is not None:
                    self.fills.add(rep.account, (
                        rep.trade_id, rep.order_id, rep.market, "buy" if rep.side is _BUY else "sell",
                        rep.last_price, rep.last_qty, "maker" if rep.liquidity is _MAKER else "taker",
                        rep.fee, rep.ts, rep.client_order_id,
                    ))
                sessions = self.by_user.get(rep.account)
                if not sessions:
                    continue
                msg = fmt.exec_report(rep)
                plain = None
                for session in sessions:
                    if first and session is requester:
                        first = False
                        msg["id"] = rid
                        session.send(encode(msg))
                        del msg["id"]
                    else:
                        if plain is None:
                            plain = encode(msg)
                        session.send(plain)
            elif cls is BookDelta:
                delta = cast(BookDelta, ev)
                subs = self.subscribers.get(("book", delta.market))
                if subs:
                    data = encode(fmt.book_update(delta))
                    for session in subs:
                        session.send(data)
            elif cls is Trade:
                trade = cast(Trade, ev)
                self.stats["trades"] += 1
                self.recent[trade.market].append(trade)
                subs = self.subscribers.get(("trades", trade.market))
                if subs:
                    data = encode(fmt.trade(trade))
                    for session in subs:
                        session.send(data)
            elif cls is CommandRejected and requester is not None:
                requester.send_msg(fmt.command_rejected(ev, rid))  # type: ignore[arg-type]

    # -- requests -------------------------------------------------------------------

    def handle_line(self, session: Session, line: bytes) -> None:
        self.stats["messages_in"] += 1
        rid = None
        try:
            # Every line counts against the rate limit, garbage too: a client must not be
            # able to flood the exchange with lines it knows will be refused.
            limit = self.options.rate_limit
            over = False
            if limit:
                if session.tokens < 1.0:
                    over = True
                else:
                    session.tokens -= 1.0
            msg = decode_request(line)
            rid = msg.get("id")
            op = msg["op"]
            if over:
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"more than {limit} requests a second on this connection: '{op}' was "
                    "not carried out; slow down and send it again",
                )
            if session.user is None and op not in PUBLIC_OPS:
                raise ProtocolError(ErrorCode.NOT_LOGGED_IN, f"log in before '{op}'")
            check_op_fields(msg, op)
            self._ops[op](session, msg, rid)
        except ProtocolError as exc:
            extra: dict[str, Any] = {"field": exc.field} if exc.field else {}
            if exc.order_id is not None:
                extra["order_id"] = exc.order_id
            if exc.client_order_id is not None:
                extra["client_order_id"] = exc.client_order_id
            if rid is None:
                rid = exc.rid
            session.send_msg(error_message(exc.code, exc.message, rid, **extra))
        except Exception:  # a bug must not take the exchange down; the client gets told
            log.exception("internal error handling a request from %s", session.peer)
            session.send_msg(error_message("internal_error", "the server failed on this request", rid))

    def op_ping(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        reply: dict[str, Any] = {"type": "pong", "ts": self.now()}
        if rid is not None:
            reply["id"] = rid
        session.send_msg(reply)

    def op_markets(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        reply: dict[str, Any] = {
            "type": "markets", "markets": [m.describe() for m in self.config.markets.values()],
        }
        if rid is not None:
            reply["id"] = rid
        session.send_msg(reply)

    def op_login(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        user = user_name(msg)
        cancel_on_disconnect = msg.get("cancel_on_disconnect")
        if cancel_on_disconnect is not None and type(cancel_on_disconnect) is not bool:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'cancel_on_disconnect' must be true or false",
                                "cancel_on_disconnect")
        if session.user is not None:
            if session.user == user:
                if cancel_on_disconnect is not None and cancel_on_disconnect != (session.owned is not None):
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "cancel_on_disconnect is chosen at a "
                                        "session's first login; log in on a new connection to change it",
                                        "cancel_on_disconnect")
                reply = {"type": "logged_in", "user": user, "funded": False, "admin": session.admin}
                if session.owned is not None:
                    reply["cancel_on_disconnect"] = True
                self._reply(session, rid, reply)
                return
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"this session is already logged in as {session.user}",
                                "user")
        admin = False
        if self.options.auth == "keys":
            token = msg.get("token")
            entry = self.options.users.get(user)
            expected = entry.token_hash if entry else hash_token("\x00no such user")
            given = hash_token(token) if isinstance(token, str) else ""
            if not hmac.compare_digest(given.encode(), expected.encode()) or entry is None:
                raise ProtocolError(ErrorCode.AUTH_FAILED, "unknown user or wrong token")
            admin = entry.admin
        funded = False
        if self.options.auth == "open" and not self.engine.accounts.known(user):
            funded = self._fund_new_user(user)
        session.user = user
        session.admin = admin
        self.by_user.setdefault(user, []).append(session)
        reply = {"type": "logged_in", "user": user, "funded": funded, "admin": admin}
        if cancel_on_disconnect:
            session.owned = set()
            reply["cancel_on_disconnect"] = True
        self._reply(session, rid, reply)

    def _fund_new_user(self, user: str) -> bool:
        """Open mode: a user's first login credits the demo balances, once."""
        funded = False
        for asset_name, amount in self.options.demo_balances.items():
            asset = self.config.assets.get(asset_name)
            if asset is None:
                continue
            self.execute(Deposit(self.now(), user, asset_name, asset.to_units(amount)))
            funded = True
        return funded

    def op_order(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        ts = self.now()
        try:
            cmd = order_command(self.config, msg, session.user, ts)  # type: ignore[arg-type]
            coid = cmd.client_order_id
            # Checked here, not in the engine, so that journals written before client order
            # ids were unique replay exactly as they were acknowledged.
            if coid is not None and self.engine.order_by_client_id(cmd.account, coid) is not None:
                raise OrderRejected(RejectReason.DUPLICATE_CLIENT_ORDER_ID,
                                    REJECT_MESSAGES[RejectReason.DUPLICATE_CLIENT_ORDER_ID])
        except OrderRejected as exc:
            reply = self.fmt.rejected(msg, session.user, exc.reason, exc.message, ts)  # type: ignore[arg-type]
            self._tell_listeners_rejected(session.user, reply, exc.reason, ts)  # type: ignore[arg-type]
            # Like every report of the user's orders, to each of its sessions (the id to the sender's).
            for other in self.by_user.get(session.user, ()):  # type: ignore[arg-type]
                if other is not session:
                    other.send_msg(reply)
            if rid is not None:
                reply["id"] = rid
            session.send_msg(reply)
            return
        self.stats["orders"] += 1
        events = self.execute(cmd)
        owned = session.owned
        if owned is not None:
            self._own(session, owned, events)
        self.route(events, session, rid)

    def _own(self, session: Session, owned: set[int], events: list[Event]) -> None:
        for ev in events:
            if ev.__class__ is ExecReport and ev.exec_type is _NEW:  # type: ignore[attr-defined]
                oid: int | None = ev.order_id  # type: ignore[attr-defined]
                if oid is not None:
                    owned.add(oid)
        if len(owned) > session.owned_limit:
            user: str = session.user  # type: ignore[assignment]
            kept = {oid for oid in owned if self.engine.order(user, oid) is not None}
            session.owned = kept
            session.owned_limit = max(1024, 2 * len(kept))

    def _tell_listeners_rejected(
        self, user: str, reply: dict[str, Any], reason: RejectReason, ts: int,
    ) -> None:
        """An order refused before the engine (off-grid price...) still belongs in the audit trail.

        The report echoes the request's raw values; it changes no state and is not journaled.
        """
        qty = reply.get("qty")
        if qty is None and reply.get("quote_qty") is not None:
            qty = f"for {reply['quote_qty']}"  # sized by the quote: the amount asked
        report = ExecReport(
            ExecType.REJECTED, None, user, reply.get("market"), reply.get("side"),
            reply.get("order_type"), reply.get("tif"), reply.get("client_order_id"),
            reply.get("price"), qty, 0, 0, 0, OrderStatus.REJECTED, ts,
            reason=reason,
        )
        for listener in self.listeners:
            listener([report])
        for listener in self.reject_listeners:
            listener([report])

    def op_cancel(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        cmd = cancel_command(msg, session.user, self.now(), self.engine.order_by_client_id)  # type: ignore[arg-type]
        self.route(self.execute(cmd), session, rid)

    def op_cancel_all(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        """The user's open orders (in one market, if named), each one's ``canceled`` report
        going out as usual, then the list answers the request."""
        market = optional_market(self.config, msg)
        user: str = session.user  # type: ignore[assignment]
        canceled = self._cancel_each(user, [o.id for o in self.engine.open_orders(user, market)], session)
        self._reply(session, rid, {"type": "canceled_all", "market": market, "order_ids": canceled})

    def op_modify(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        cmd = modify_command(msg, session.user, self.now(), self.engine.order, self.config)  # type: ignore[arg-type]
        self.route(self.execute(cmd), session, rid)

    def op_funding(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        withdraw = msg["op"] == "withdraw"
        target = session.user
        if msg.get("user") is not None:
            target = user_name(msg)
        if target != session.user and not session.admin:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only an admin session may deposit to or withdraw "
                                "from another user's account", "user")
        if self.options.auth == "keys":
            if not withdraw and not session.admin:
                raise ProtocolError(ErrorCode.FORBIDDEN, "deposits need an admin session in keys mode")
            if target not in self.options.users:  # the money would wait for a login nobody can make
                raise ProtocolError(ErrorCode.FORBIDDEN, f"no user {str(target)[:40]!r} in the accounts file",
                                    "user")
        cmd = funding_command(self.config, msg, target, self.now(), withdraw)  # type: ignore[arg-type]
        events = self.execute(cmd)
        for ev in events:
            if ev.__class__ is CommandRejected:
                session.send_msg(self.fmt.command_rejected(ev, rid))  # type: ignore[arg-type]
                return
        assert events and events[0].__class__ is BalanceChanged
        self._reply(session, rid, {
            "type": "balances", "user": target,
            "balances": self.fmt.balances(self.engine.balances(target)),  # type: ignore[arg-type]
        })

    def op_balances(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        self._reply(session, rid, {
            "type": "balances", "user": session.user,
            "balances": self.fmt.balances(self.engine.balances(session.user)),  # type: ignore[arg-type]
        })

    def op_orders(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        market = optional_market(self.config, msg)
        orders = self.engine.open_orders(session.user, market)  # type: ignore[arg-type]
        self._reply(session, rid, {"type": "orders", "orders": [self.fmt.order(o) for o in orders]})

    def op_queue_position(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        oid = order_id_of(msg)
        order = self.engine.order(session.user, oid)  # type: ignore[arg-type]
        ahead = self.engine.queue_position(session.user, oid)  # type: ignore[arg-type]
        if order is None or ahead is None:
            raise ProtocolError(ErrorCode.UNKNOWN_ORDER, REJECT_MESSAGES[RejectReason.UNKNOWN_ORDER], order_id=oid)
        self._reply(session, rid, {
            "type": "queue_position", "order_id": oid, "market": order.market,
            "price": self.fmt.price(order.market, order.price),  # type: ignore[arg-type]
            "ahead_qty": self.fmt.qty(order.market, ahead),
            "remaining_qty": self.fmt.qty(order.market, order.remaining),
        })

    def op_order_status(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        user: str = session.user  # type: ignore[assignment]
        oid, coid = order_ref(msg)
        if coid is None:
            assert oid is not None
            order = self.engine.order(user, oid)
            done = self.finished.get(oid)
        else:
            order = self.engine.order_by_client_id(user, coid)
            done = self.finished.by_client_id(user, coid)
        if order is not None:
            entry = self.fmt.order(order)
        elif done is not None and done.account == user:
            entry = self.fmt.finished_order(done)
        elif coid is not None:
            raise ProtocolError(ErrorCode.UNKNOWN_ORDER, "no order of this account has this client_order_id: "
                                f"{self._not_kept()}", client_order_id=coid)
        else:
            raise ProtocolError(ErrorCode.UNKNOWN_ORDER, f"no such order of this account: {self._not_kept()}",
                                order_id=oid)
        self._reply(session, rid, {"type": "order_status", **entry})

    def _not_kept(self) -> str:
        return (f"not open, and not among the finished orders the exchange keeps (each account's "
                f"last {self.finished.per_user:,}, {self.finished.kept:,} in all)")

    def op_book(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        market, depth, level = book_request(self.config, msg)
        self._reply(session, rid, self._book(market.symbol, depth, level))

    def _book(self, market: str, depth: int | None, level: int) -> dict[str, Any]:
        if level == 2:
            seq, bids, asks = self.engine.book_l2(market, depth or 1 << 30)
        else:
            seq, bids, asks = self.engine.book_l3(market, depth)
        return self.fmt.book(market, seq, bids, asks, level, self.engine.reference_price(market))

    def op_trades(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        market, limit = trades_request(self.config, msg)
        ring = self.recent[market.symbol]
        fmt = self.fmt
        rows = [fmt.recent_trade(row) if row.__class__ is Trade else row
                for row in list(ring)[-limit:]]
        self._reply(session, rid, {"type": "trades", "market": market.symbol, "trades": rows})

    def seed_recent(self, trades: dict[str, list[dict[str, Any]]]) -> None:
        """The last trades from before this start (the ledger's), oldest first, so that
        ``trades`` has an answer at once after a restart."""
        for symbol, rows in trades.items():
            ring = self.recent.get(symbol)
            if ring is not None:
                ring.extend(rows)

    def op_fills(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        market, limit, after = fills_request(self.config, msg)
        picked: list[Any] = []
        for row in self.fills.rows(session.user):
            if (market is None or row[2] == market) and (after is None or row[0] > after):
                picked.append(row)
        # After a trade id: the first ``limit`` (page forward with the last one's id), and
        # the other side of a trade with itself, which the next page's ``after`` would skip;
        # otherwise the last ``limit``.
        if after is None:
            if len(picked) > limit and picked[-limit][0] == picked[-limit - 1][0]:
                limit += 1  # nor begins between the two sides of a trade with itself
            picked = picked[-limit:]
        elif len(picked) > limit:
            picked = picked[:limit + 1] if picked[limit][0] == picked[limit - 1][0] else picked[:limit]
        fmt = self.fmt
        rows = [fmt.fill(row) for row in picked]
        self._reply(session, rid, {"type": "fills", "market": market, "fills": rows,
                                   "complete_after": self.fills.complete_after(session.user)})

    def seed_fills(self, fills: list[tuple[str, dict[str, Any]]], floor: int) -> None:
        """The fills from before this start that the ledger's tail holds (user, row), in
        trade order; ``floor``: the trade id at or below which the read found none (where
        the tail begins). Fills of a market the exchange no longer lists are left out."""
        table = self.fills
        table.floor = max(table.floor, floor)
        markets = self.config.markets
        for account, row in fills:
            if row.get("market") in markets:
                order_id = row.get("order_id")
                table.add(account, (
                    row.get("trade_id"), order_id, row.get("market"), row.get("side"), row.get("price"),
                    row.get("qty"), row.get("liquidity"), row.get("fee"), row.get("ts"),
                    # The ledger does not keep it; the order may still say.
                    self._client_order_id(account, order_id),
                ))

    def _client_order_id(self, account: str, order_id: Any) -> str | None:
        """The client order id of one of ``account``'s orders, open or finished and kept."""
        if type(order_id) is not int:
            return None
        order = self.engine.order(account, order_id)
        if order is not None:
            return order.client_order_id
        done = self.finished.get(order_id)
        return done.client_order_id if done is not None and done.account == account else None

    def op_subscribe(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        channel, market = subscription(self.config, msg)
        key = (channel, market.symbol)
        if key not in session.subscriptions:
            session.subscriptions.add(key)
            self.subscribers.setdefault(key, []).append(session)
        self._reply(session, rid, {"type": "subscribed", "channel": channel, "market": market.symbol})
        if channel == "book":
            # The full book, so that deltas (which cover every level) rebuild it exactly.
            session.send_msg(self._book(market.symbol, None, 2))

    def op_unsubscribe(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        channel, market = subscription(self.config, msg)
        key = (channel, market.symbol)
        if key in session.subscriptions:
            session.subscriptions.discard(key)
            subs = self.subscribers.get(key)
            if subs and session in subs:
                subs.remove(session)
        self._reply(session, rid, {"type": "unsubscribed", "channel": channel, "market": market.symbol})

    def op_stats(self, session: Session, msg: dict[str, Any], rid: Any) -> None:
        self.update_rates()
        reply = {
            "type": "stats", **self.stats, **self.rates,
            "connections": len(self.sessions), "users_online": len(self.by_user),
            "open_orders": len(self.engine.orders),
            "uptime_s": round(time.monotonic() - self.started, 3),
        }
        self._reply(session, rid, reply)

    def update_rates(self) -> dict[str, float]:
        now = time.monotonic()
        t0, orders0, trades0, msgs0 = self._rate_mark
        dt = now - t0
        if dt >= 0.5:
            self.rates = {
                "orders_per_sec": round((self.stats["orders"] - orders0) / dt, 1),
                "trades_per_sec": round((self.stats["trades"] - trades0) / dt, 1),
                "messages_per_sec": round((self.stats["messages_in"] - msgs0) / dt, 1),
            }
            self._rate_mark = (now, self.stats["orders"], self.stats["trades"], self.stats["messages_in"])
        return self.rates

    @staticmethod
    def _reply(session: Session, rid: Any, message: dict[str, Any]) -> None:
        if rid is not None:
            message["id"] = rid
        session.send_msg(message)

    # -- shutdown ---------------------------------------------------------------------

    def close_all(self, reason: str = "the exchange is shutting down") -> None:
        self.accepting = False
        for session in list(self.sessions):
            if not session.closed:
                session.fatal(ErrorCode.SHUTTING_DOWN, reason)
