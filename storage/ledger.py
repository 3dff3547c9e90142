"""The trade ledger: ``<data>/trades.jsonl``, one JSON object per trade, one line each.

The record format (``trade_record`` / ``trade_line``) is shared by every writer of a
ledger (the server's background ``TradeLedger`` and the embedded simulation), so that two
runs can be compared file to file. Amounts are decimal strings exactly as on the wire; ids
and timestamps are integers.

Theory of operation (``TradeLedger``)
-------------------------------------
The gateway hands over whole event lists (a list append on the hot path). A background
task picks the trades out, formats them on the loop in small slices (a formatting thread
would hold the GIL for up to 5 ms at a time and stall every client), and appends each
batch with one ``os.write`` from a worker thread, so the event loop never waits on disk.

* Append-only: the file is opened with ``O_APPEND`` and never rewritten, truncated or
  reordered. The one exception is a torn last line left by a power cut (bytes without a
  final newline): it was never a complete record, so it is cut off, with a warning,
  before anything is appended. A last line that lost only its newline is a whole record:
  recovery keeps it (the newline added) when it is the trade the recovered state has next
  (``unterminated_line``, ``open(keep_last_line=True)``).
* Exactly once: trade ids only grow, and the writer drops any trade whose id is not above
  the highest id already in the file. Recovery can therefore feed it every trade that
  journal replay produces and only the missing ones are written.
* Durability gate: with a write-ahead journal, a trade may reach the file only once the
  command that caused it is durable in the journal; otherwise a crash could leave a trade
  in the ledger that recovery never recreates, and its id would be handed out again. The
  gateway listener tags each event list with ``mark()`` (the journal position of its
  command) and the writer only takes entries whose mark is ``<= durable()``.
* ``sync()`` writes and fsyncs everything eligible (the snapshot waits for it before it
  lets old journal segments go); ``close()`` does the same and stops.

A reader can tail the file while the exchange runs: every write is whole lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson

from exchange.markets import MarketConfig
from exchange.types import Event, Trade
from storage.snapshot import replace_file

log = logging.getLogger("storage.ledger")

LEDGER_FILE = "trades.jsonl"
_TAIL_PROBE = 64 * 1024  # bytes read back from the end to find the last record


def trade_record(trade: Trade, config: MarketConfig) -> dict[str, Any]:
    """The ledger's view of one trade: both sides, both fees, in decimal strings."""
    market = config.markets[trade.market]
    return {
        "trade_id": trade.trade_id,
        "market": trade.market,
        "price": market.format_price(trade.price),
        "qty": market.format_qty(trade.qty),
        "buy_order_id": trade.buy_order_id,
        "sell_order_id": trade.sell_order_id,
        "buyer": trade.buyer,
        "seller": trade.seller,
        "taker_side": trade.taker_side.value,
        "maker_fee": market.quote.format(trade.maker_fee),
        "taker_fee": market.quote.format(trade.taker_fee),
        "fee_asset": market.quote.name,
        "ts": trade.ts,
    }


def trade_line(trade: Trade, config: MarketConfig) -> bytes:
    """One ledger line, newline included."""
    return orjson.dumps(trade_record(trade, config)) + b"\n"


class LedgerError(Exception):
    """The ledger file cannot be used (unreadable, or its last record is not a trade)."""


def last_trade_id(path: str | Path) -> int:
    """The id of the last complete record in a ledger file (0 if it is missing or empty).

    Reads only the file's tail: start-up cost does not grow with the ledger. A torn last
    line (no final newline) is ignored here; ``TradeLedger.open`` cuts it off.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    probe = _TAIL_PROBE
    with open(path, "rb") as fh:
        while True:
            start = max(0, size - probe)
            fh.seek(start)
            tail = fh.read(size - start)
            end = tail.rfind(b"\n")  # the end of the last complete line
            if end < 0:
                if start == 0:
                    return 0  # only a torn first line
                probe *= 4
                continue
            begin = tail.rfind(b"\n", 0, end) + 1
            if begin == 0 and start > 0:
                probe *= 4
                continue
            line = tail[begin:end]
            record = whole_record(line)
            if record is None:
                raise LedgerError(
                    f"ledger {path}: the last line is not a trade record: {line[:200]!r}"
                )
            return record["trade_id"]


MAX_RECORD_TAIL = 1 << 16


def unterminated_line(path: str | Path) -> bytes:
    """The bytes after a ledger's last newline: b"" when it ends with one (or is missing or
    empty), else its last line, torn or only missing its newline. Reads only the tail."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return b""
    try:
        size = os.fstat(fd).st_size
        if not size or os.pread(fd, 1, size - 1) == b"\n":
            return b""
        start = TradeLedger._complete_prefix(fd, size)
        # At most this much: a record is far shorter, so a longer tail is torn whatever it
        # holds (after a power cut, maybe megabytes of zeros), and a cut one reads as torn.
        return os.pread(fd, min(size - start, MAX_RECORD_TAIL), start)
    finally:
        os.close(fd)


def whole_record(line: bytes) -> dict[str, Any] | None:
    """``line`` (without its newline) as a trade record, or None when it is not a whole one:
    a JSON object with a positive integer ``trade_id`` (a line cut short is not JSON)."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    trade_id = record.get("trade_id")
    return record if type(trade_id) is int and trade_id > 0 else None


RECENT_TAIL = 4 << 20  # bytes of the ledger read back at start-up (~13,000 lines)
PUBLIC_FIELDS = ("trade_id", "price", "qty", "taker_side", "ts")


def tail_records(path: str | Path, tail: int = RECENT_TAIL) -> list[dict[str, Any]]:
    """The whole trade records in the ledger's last ``tail`` bytes, oldest first: what a
    start-up reads back for ``trades`` and ``fills``. Bounded so that start-up does not grow
    with the ledger. A line that is not a whole record is skipped."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - tail - 1)  # and the byte before: does a line begin there?
            fh.seek(start)
            data = fh.read(size - start)
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # up to the first newline: the end of a line begun before
    records = []
    for line in lines:
        record = whole_record(line) if line else None
        if record is not None:
            records.append(record)
    return records


def recent_trades(records: list[dict[str, Any]], per_market: int) -> dict[str, list[dict[str, Any]]]:
    """Each market's last ``per_market`` of ``records``, oldest first, as the public rows of
    a ``trades`` reply (who traded and the fees left out)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in reversed(records):
        rows = out.setdefault(str(record.get("market")), [])
        if len(rows) < per_market:
            rows.append({name: record.get(name) for name in PUBLIC_FIELDS})
    for rows in out.values():
        rows.reverse()
    return out


def recent_fills(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The fills in ``records`` as (user, row of a ``fills`` reply), in trade order: a trade
    is a fill of its buyer and one of its seller, the taker's first, as the exchange reports
    them (two of one user who traded with itself). The ledger does not keep client order
    ids, so these rows have none."""
    out: list[tuple[str, dict[str, Any]]] = []
    for record in records:
        taker = record.get("taker_side")
        sides = (("buy", "buyer", "buy_order_id"), ("sell", "seller", "sell_order_id"))
        for side, who, order_key in (sides if taker == "buy" else sides[::-1]):
            account = record.get(who)
            if type(account) is not str:
                continue
            is_taker = taker == side
            out.append((account, {
                "trade_id": record.get("trade_id"), "order_id": record.get(order_key),
                "market": record.get("market"), "side": side, "price": record.get("price"),
                "qty": record.get("qty"), "liquidity": "taker" if is_taker else "maker",
                "fee": record.get("taker_fee" if is_taker else "maker_fee"),
                "fee_asset": record.get("fee_asset"), "ts": record.get("ts"),
            }))
    return out


LOST_PREFIX = "trades.lost-"  # + a UTC timestamp + ".jsonl": ledger lines the state lost


def lost_files(directory: str | Path) -> list[Path]:
    """The side files recovery moved ledger lines to (``write_lost``)."""
    return sorted(Path(directory).glob(LOST_PREFIX + "*.jsonl"))


def write_lost(directory: str | Path, data: bytes) -> Path:
    """Keep ``data`` (whole ledger lines) in a new side file ``trades.lost-<UTC time>.jsonl``,
    written atomically and durably (temporary file, fsync, rename, directory fsync). A file
    already holding exactly ``data`` (a crash came before the ledger was cut) is reused."""
    directory = Path(directory)
    for path in lost_files(directory):
        if path.read_bytes() == data:
            return path
    for leftover in directory.glob("." + LOST_PREFIX + "*"):
        leftover.unlink(missing_ok=True)  # a write a crash interrupted: never renamed
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = directory / f"{LOST_PREFIX}{stamp}.jsonl"
    serial = 1
    while path.exists():
        serial += 1
        path = directory / f"{LOST_PREFIX}{stamp}-{serial}.jsonl"
    replace_file(path, data)
    return path


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a ledger file, in file order (for tests and tools)."""
    data = Path(path).read_bytes() if Path(path).exists() else b""
    end = data.rfind(b"\n") + 1
    return [orjson.loads(line) for line in data[:end].splitlines() if line]


class LedgerWriteError(OSError):
    """A ledger write that failed part-way; ``rest`` is what did not reach the file."""

    def __init__(self, rest: bytes, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.rest = rest


class TradeLedger:
    """Appends trades to the ledger in the background, exactly once, in trade id order."""

    SLICE = 256  # trades formatted between two yields to the event loop

    def __init__(
        self,
        path: str | Path,
        config: MarketConfig,
        interval: float = 0.05,
        mark: Callable[[], int] | None = None,
        durable: Callable[[], int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.interval = interval
        self._mark = mark
        self._durable = durable
        self._pending: deque[tuple[int, list[Event]]] = deque()
        self._fd: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._write_lock: asyncio.Lock | None = None
        # Lines already taken from the queue whose write failed (disk full...): they go out
        # first on the next attempt, so a transient error never loses a trade.
        self._unwritten = b""
        self.last_id = 0  # highest trade id in the file (written or being written)
        self.written = 0  # trades appended by this process
        self.torn_bytes = 0  # size of a torn last line cut off at open

    # -- opening ----------------------------------------------------------------------

    def open(self, keep_last_line: bool = False) -> int:
        """Open for appending; returns the highest trade id already in the file.

        A last line without its newline is cut off, unless ``keep_last_line`` (the caller
        found it a whole record it wants, ``unterminated_line``): then the newline is added.
        Synchronous on purpose: it runs once at start-up, before anything is served.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                last = os.pread(fd, 1, size - 1)
                if last != b"\n" and keep_last_line:
                    # A whole record whose newline never landed: it is one; finish it.
                    keep = self._complete_prefix(fd, size)
                    log.warning(
                        "ledger %s: its last record (%d bytes) had no final newline; kept it and "
                        "added the newline", self.path, size - keep,
                    )
                    os.write(fd, b"\n")
                    os.fsync(fd)
                elif last != b"\n":
                    # Torn last line (power cut mid-write): never a record; cut it off.
                    keep = self._complete_prefix(fd, size)
                    self.torn_bytes = size - keep
                    log.warning(
                        "ledger %s: cut off a torn last line of %d bytes (not a complete record)",
                        self.path, self.torn_bytes,
                    )
                    os.ftruncate(fd, keep)
                    os.fsync(fd)
            self.last_id = last_trade_id(self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self.last_id

    def lines_from(self, trade_id: int) -> tuple[int, bytes, bool]:
        """The file's last lines from the first whose trade id is ``trade_id`` or more:
        (where they start, their bytes, whether the line before them is not a trade record
        at all, i.e. the file is damaged there). Reads backwards from the end, so the cost
        grows with what it returns, not with the ledger (start-up, after ``open``)."""
        fd = self._fd
        assert fd is not None
        size = os.fstat(fd).st_size
        buf, pos = b"", size  # buf holds the file's bytes [pos, size)
        start = size  # the lines from here on are returned
        damaged = False
        while start > 0:
            end = start - 1  # the newline that ends the line before ``start``
            while True:
                nl = buf.rfind(b"\n", 0, end - pos)
                if nl >= 0 or pos == 0:
                    break
                chunk = max(0, pos - _TAIL_PROBE)
                buf, pos = os.pread(fd, pos - chunk, chunk) + buf, chunk
            begin = pos + nl + 1  # (nl is -1 when the line is the file's first)
            record = whole_record(buf[begin - pos:end - pos])
            if record is None or record["trade_id"] < trade_id:
                damaged = record is None
                break
            start = begin
        return start, os.pread(fd, size - start, start), damaged

    def truncate(self, size: int) -> None:
        """Cut the file to its first ``size`` bytes, durably (recovery moved the rest away)."""
        fd = self._fd
        assert fd is not None
        os.ftruncate(fd, size)
        os.fsync(fd)
        self.last_id = last_trade_id(self.path)

    @staticmethod
    def _complete_prefix(fd: int, size: int) -> int:
        """Length of the file up to and including its last newline."""
        pos = size
        while pos > 0:
            start = max(0, pos - _TAIL_PROBE)
            chunk = os.pread(fd, pos - start, start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                return start + i + 1
            pos = start
        return 0

    # -- hot path ---------------------------------------------------------------------

    def __call__(self, events: list[Event]) -> None:
        """Gateway listener: remember the batch with its journal mark; no work here."""
        self._pending.append((self._mark() if self._mark is not None else 0, events))

    def add(self, trades: Iterable[Event]) -> None:
        """Queue trades that need no durability gate (journal replay at start-up)."""
        self._pending.append((0, list(trades)))

    # -- background -------------------------------------------------------------------

    def start(self) -> None:
        if self._fd is None:
            self.open()
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self._task = loop.create_task(self._run(), name="trade-ledger")

    def wake(self) -> None:
        """Something became durable: write it without waiting for the next interval."""
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._write_eligible(fsync=False)
            except OSError:
                log.exception("cannot append to the trade ledger %s", self.path)
                await asyncio.sleep(1.0)
            if self._closing:
                return

    def _take_eligible(self) -> list[Trade]:
        durable = self._durable() if self._durable is not None else None
        pending = self._pending
        trades: list[Trade] = []
        last = self.last_id
        while pending:
            mark, events = pending[0]
            if durable is not None and mark > durable:
                break
            pending.popleft()
            for ev in events:
                if ev.__class__ is Trade and ev.trade_id > last:  # type: ignore[attr-defined]
                    trades.append(ev)  # type: ignore[arg-type]
                    last = ev.trade_id  # type: ignore[attr-defined]
        self.last_id = last
        return trades

    async def _write_eligible(self, fsync: bool) -> None:
        assert self._write_lock is not None
        async with self._write_lock:  # batches reach the file in the order they were taken
            trades = self._take_eligible()
            lines: list[bytes] = []
            config = self.config
            for start in range(0, len(trades), self.SLICE):
                lines.extend(trade_line(t, config) for t in trades[start:start + self.SLICE])
                if start + self.SLICE < len(trades):
                    await asyncio.sleep(0)
            if lines or fsync or self._unwritten:
                data = self._unwritten + b"".join(lines)
                self._unwritten = b""
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._append, data, fsync,
                    )
                except OSError as exc:
                    self._unwritten = exc.rest if isinstance(exc, LedgerWriteError) else data
                    raise
                self.written += len(lines)

    def _append(self, data: bytes, fsync: bool) -> None:
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if fsync:
                os.fsync(fd)
        except OSError as exc:  # keep what did not reach the file, to write it next time
            raise LedgerWriteError(bytes(view), exc) from exc

    async def sync(self) -> None:
        """Write every eligible trade now and make the file durable."""
        if self._task is None:
            self.sync_blocking()
            return
        await self._write_eligible(fsync=True)

    def sync_blocking(self) -> None:
        """``sync`` without an event loop (start-up, before the writer task runs)."""
        self.write_blocking(True)

    def write_blocking(self, fsync: bool) -> None:
        """Write every eligible trade now, without an event loop (start-up; the follower)."""
        trades = self._take_eligible()
        data = self._unwritten + b"".join(trade_line(t, self.config) for t in trades)
        self._unwritten = b""
        if not data and not fsync:
            return
        try:
            self._append(data, fsync)
        except OSError as exc:
            self._unwritten = exc.rest if isinstance(exc, LedgerWriteError) else data
            raise
        self.written += len(trades)

    def close_blocking(self) -> None:
        """Write what is eligible, fsync and close, without an event loop."""
        if self._fd is not None:
            try:
                self.sync_blocking()
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def backlog(self) -> int:
        """Event lists waiting (for durability or for the next write)."""
        return len(self._pending)

    async def close(self) -> None:
        """Write everything eligible, fsync, close the file. Entries still waiting for the
        journal are dropped: their commands were never durable, so they never happened."""
        self._closing = True
        if self._task is not None:
            self.wake()
            await self._task
            self._task = None
            await self._write_eligible(fsync=True)
        elif self._fd is not None:
            self.sync_blocking()
        if self._pending:
            log.warning("ledger: %d event lists were never durable and are not written",
                        len(self._pending))
            self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
