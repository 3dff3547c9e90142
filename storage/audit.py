"""Per-user audit trail: ``<data>/logs/<user>.log``, one readable line per order event.

The gateway hands over each command's events; their lines are formatted right then, into
memory (a few microseconds a command), and a background task appends what gathered to the
files every ``interval`` from a worker thread, so the event loop never waits on disk and
no file is touched per order. Formatting as the events come, rather than a whole interval
at once in the background task, spreads its cost evenly: the batched version stalled the
loop for milliseconds every interval, which showed up directly in the 99th percentile of
acknowledgement latency (docs/performance.md). Lines are appended only; a file is never
rewritten.

A user's append can fail (a full disk, a file size limit, an I/O error, a path that is not
a file) while the others' succeed. What did not reach that user's file is kept, as the
bytes still to write, and goes out first, before any newer line of that user, on the next
append (the trade ledger's ``_unwritten``, per user; a write cut short is resumed where it
stopped, so no part is written twice). Meanwhile ``.position`` stays where it was: it
says the files are complete through it, and recovery rebuilds only the lines of commands
after it. A snapshot, and the end of a recovery, need every line in the files (the journal
behind them goes) and raise ``OSError`` while some are kept (``require_written``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Final

from exchange.markets import MarketConfig
from exchange.protocol import Formatter
from exchange.types import CommandRejected, Event, ExecReport, ExecType

log = logging.getLogger("storage.audit")


POSITION_FILE: Final = ".position"  # in the logs directory: the journal position written through


class _Clock:
    """ISO-8601 UTC stamps; the date-and-second part is formatted once per second."""

    __slots__ = ("second", "prefix", "last_ts", "last_text")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""
        self.last_ts = -1
        self.last_text = ""

    def __call__(self, ts: int) -> str:
        if ts == self.last_ts:  # the events of one command share their timestamp
            return self.last_text
        # Plain integer arithmetic and concatenation: ``divmod`` and a ``:06d`` format spec
        # cost about 0.8 µs a call compiled, most of the audit log's time per command.
        second = ts // 1_000_000_000
        if second != self.second:
            self.second = second
            self.prefix = datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.")
        micros = (ts - second * 1_000_000_000) // 1000
        text = self.prefix + str(micros + 1_000_000)[1:] + "Z"
        self.last_ts = ts
        self.last_text = text
        return text


_LABELS: Final = {
    ExecType.NEW.value: "PLACED", ExecType.CANCELED.value: "CANCELED",
    ExecType.EXPIRED.value: "EXPIRED", ExecType.REPLACED.value: "MODIFIED",
    ExecType.SELF_TRADE_PREVENTED.value: "SELF-TRADE-PREVENTED",
}
_UPPER: Final = {"buy": "BUY", "sell": "SELL"}


RAW_MAX: Final = 40  # characters of a raw request value an audit line shows


def _text(value: object) -> str:
    """An enum as its wire string, anything else (a raw echoed value) through ``_raw``."""
    return getattr(value, "_value_", None) or _raw(str(value))


def _raw(text: str) -> str:
    """A value the client wrote, made safe for a line of the log.

    A rejected request's text is the client's: a newline in it would forge a line of its
    own, so anything unprintable is escaped, and a long value is cut to ``RAW_MAX``.
    """
    if len(text) <= RAW_MAX and text.isprintable():
        return text
    shown = repr(text)[1:-1]
    return shown if len(shown) <= RAW_MAX else shown[:RAW_MAX] + "..."


class AuditLog:
    """Buffers events in memory and appends their lines to per-user files in the background."""

    def __init__(
        self, directory: str | Path, config: MarketConfig, interval: float = 0.2,
        formatter: Formatter | None = None,
        mark: Callable[[], int] | None = None, durable: Callable[[], int] | None = None,
    ) -> None:
        """``mark`` and ``durable``: the journal's last record and how far the journal is
        durable (and register ``seal`` as a durability callback).
        With them, a line is written only once its command is durable, like the ledger's
        trades: a crash cannot leave a line in a user's audit trail for an order the
        recovered exchange never had (whose id it then reuses)."""
        self.directory = Path(directory)
        self.config = config
        self.fmt = formatter or Formatter(config)
        self.stamp = _Clock()
        self.interval = interval
        self._mark = mark
        self._durable = durable
        # Formatted, not yet written, per user: the lines since the journal last reported
        # progress (``seal``); then the older such groups with the journal's last position
        # when they were sealed, each written once that position is durable. A position per
        # group, read when it is sealed: a tuple per line cost 3-4 % of the gateway's
        # throughput.
        self._lines: dict[str, list[str]] = {}
        self._sealed: deque[tuple[int, dict[str, list[str]]]] = deque()
        # The journal position through which every line is in the files (``.position``,
        # rewritten after each append): recovery rebuilds the lines of the commands after it.
        self._written: int | None = self._read_position() if mark is not None else None
        self._saved: int | None = self._written
        self._rebuild: dict[str, list[str]] = {}
        self._rebuild_lines = 0
        self._rebuilt = 0
        self._seen: dict[str, set[str]] = {}
        self._torn: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._write_lock: asyncio.Lock | None = None
        self._closing = False
        # Bytes of lines already taken whose append failed, by user: written first, before
        # any newer line of theirs, on the next append. Replaced whole by ``_append`` (a
        # worker thread), never changed in place, so the loop reads it consistently.
        self._unwritten: dict[str, bytes] = {}
        # Users whose failure is logged, and its reason: once an episode, not every pass.
        self._failing: dict[str, str] = {}
        self._position_failing = False

    # -- hot path ---------------------------------------------------------------------

    def __call__(self, events: list[Event]) -> None:
        """Gateway listener: format the command's lines into memory; writing is later."""
        self._collect(events, self._lines)

    def _collect(self, events: list[Event], by_user: dict[str, list[str]]) -> int:
        """Add the lines of one command's events to ``by_user``; returns how many."""
        added = 0
        for ev in events:
            line = self.line(ev)
            if line is not None:
                lines = by_user.get(ev.account)  # type: ignore[attr-defined]
                if lines is None:
                    lines = by_user[ev.account] = []  # type: ignore[attr-defined]
                lines.append(line)
                added += 1
        return added

    def seal(self, _upto: int = 0) -> None:
        """Journal durability callback: close the current group of lines (the next ones may
        belong to commands that are not durable yet)."""
        if self._lines:
            # Every command whose lines are here is at or before the journal's last record.
            self._sealed.append((self._mark() if self._mark is not None else 0, self._lines))
            self._lines = {}

    def _take_ready(self) -> dict[str, list[str]]:
        """The lines whose commands are durable, by user, in order; the rest stay.

        Also moves ``_written`` to the journal position these lines complete: the durable
        position itself when nothing is left waiting (commands without lines count too).
        """
        self.seal()
        sealed = self._sealed
        durable = self._durable() if self._durable is not None else None
        ready: dict[str, list[str]] = {}
        upto = self._written
        while sealed and (durable is None or sealed[0][0] <= durable):
            mark, group = sealed.popleft()
            upto = mark
            for user, lines in group.items():
                have = ready.get(user)
                if have is None:
                    ready[user] = lines
                else:
                    have.extend(lines)
        if durable is not None and not sealed:
            upto = durable
        if upto is not None and self._mark is not None:
            self._written = upto if self._written is None else max(self._written, upto)
        return ready

    # -- position and recovery ----------------------------------------------------------

    def reload_position(self) -> None:
        """Read the position again (before recovery): a follower process of an earlier
        exchange may have moved it after this log was created."""
        if self._mark is not None:
            self._written = self._saved = self._read_position()

    def _read_position(self) -> int | None:
        try:
            return int((self.directory / POSITION_FILE).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def _save_position(self, upto: int | None) -> None:
        """After the lines are appended (so a crash in between repeats them, never loses)."""
        if upto is None or upto == self._saved:
            return
        path = self.directory / POSITION_FILE
        tmp = path.with_name(POSITION_FILE + ".tmp")
        try:
            tmp.write_text(f"{upto}\n", encoding="ascii")
            os.replace(tmp, path)
            self._saved = upto
        except OSError as exc:  # tried again with the next append; logged once
            if not self._position_failing:
                self._position_failing = True
                log.error("cannot record the audit log position in %s: %s", path, exc.strerror or exc)
            return
        if self._position_failing:
            self._position_failing = False
            log.warning("audit log position recorded again in %s (record %d)", path, upto)

    @property
    def behind(self) -> bool:
        """Whether lines already taken are still unwritten (an append failed)."""
        return bool(self._unwritten)

    def require_written(self, what: str) -> None:
        """Raise ``OSError`` if lines are still unwritten: ``what`` (a snapshot, the end of
        a recovery) would let the journal behind them go, and with it what recovery could
        rebuild them from. (A plain ``OSError``, which every caller handles already:
        mypyc compiles no subclass of it.)"""
        unwritten = self._unwritten
        if unwritten:
            users = sorted(unwritten)
            files = ", ".join(f"{user}.log ({self._failing.get(user, '?')})" for user in users[:5])
            more = f" and {len(users) - 5} more files" if len(users) > 5 else ""
            raise OSError(f"audit log: lines not written yet to {files}{more}; {what} before they "
                          "are (the journal keeps their commands)")

    async def flush_through(self, lsn: int) -> None:
        """Until every line of the commands up to journal position ``lsn`` is in the files.

        Called before a snapshot at ``lsn`` is written: from then on recovery never replays
        those commands, so their lines could no longer be rebuilt. Writes at once, and
        raises ``OSError`` if lines an append could not write are still kept: the
        snapshot must not be written then.
        """
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done():
            await self._write_ready(loop)  # now, with any lines an earlier append left
        self.require_written(f"no snapshot at journal record {lsn}")
        deadline = loop.time() + 5.0
        while (self._saved is None or self._saved < lsn) and self._task is not None and not self._task.done():
            self._wake.set()
            await asyncio.sleep(self.interval / 4)
            if loop.time() > deadline:
                log.warning("audit log: not written through journal record %d after 5 s", lsn)
                return

    def replay_begin(self, snapshot_lsn: int) -> int:
        """Recovery starts replaying the journal after ``snapshot_lsn``; returns the
        position after which this log wants the replayed commands."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._written is None:  # no position recorded: assume the files are complete
            self._written = self._saved = snapshot_lsn
        elif self._written < snapshot_lsn:
            log.warning("audit log: lines of journal records %d..%d were never written and "
                        "cannot be rebuilt (the snapshot covers them)", self._written + 1, snapshot_lsn)
            self._written = snapshot_lsn
        return self._written

    def replay_record(self, lsn: int, events: list[Event]) -> None:
        """A replayed command: write its lines if the files stopped before it (a crash)."""
        if self._written is not None and lsn <= self._written:
            return
        added = self._collect(events, self._rebuild)
        self._rebuilt += added
        self._rebuild_lines += added
        if self._rebuild_lines >= 20_000:  # a long journal: write as it goes, position too
            self._write_gathered(lsn)
            self._written = lsn

    def replay_end(self, lsn: int) -> None:
        """Recovery is done at journal position ``lsn``: every line through it is written.

        Raises ``OSError`` if some could not be: the recovery snapshot that follows
        would let the journal go, and those lines with it."""
        self._write_gathered(lsn)
        if self._rebuilt and not self._unwritten:
            log.warning("audit log: rebuilt %d lines of commands acknowledged before a crash",
                        self._rebuilt)
        if self._written is not None and self._written > lsn:
            log.warning("audit log: its position (record %d) was ahead of the journal (record "
                        "%d): lines of commands up to it were not rebuilt", self._written, lsn)
        self._written = lsn
        self.require_written("recovery cannot finish")

    def write_through(self, lsn: int) -> None:
        """The follower's periodic write: the lines gathered by ``replay_record`` so far
        (every command through journal position ``lsn``) after any an earlier append could
        not write, then the position if every line is in."""
        self._write_gathered(lsn)
        self._written = lsn

    def _write_gathered(self, lsn: int) -> None:
        """Append the lines ``replay_record`` gathered (commands through ``lsn``), then the
        position once every line is in."""
        lines = self._rebuild
        self._rebuild = {}
        self._rebuild_lines = 0
        self._append_rebuilt(lines, lsn)

    # -- background -------------------------------------------------------------------

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_lock = asyncio.Lock()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self._write_ready(loop)
            if self._closing:
                await self._write_ready(loop)  # what became durable while that was written
                self._drop_undurable()
                self.report_unwritten()
                return

    async def _write_ready(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._write_lock is not None
        async with self._write_lock:  # groups reach the files in the order they were taken
            lines = self._take_ready()
            upto = self._written
            if lines or upto != self._saved or self._unwritten:
                try:
                    await loop.run_in_executor(None, self._append, lines, upto)
                except OSError:
                    log.exception("cannot write the audit log in %s", self.directory)

    async def flush_now(self) -> None:
        """Write the lines whose commands are durable now, not at the next interval."""
        if self._task is None:
            lines = self._take_ready()
            if lines or self._written != self._saved or self._unwritten:
                self._append(lines, self._written)
            return
        await self._write_ready(asyncio.get_running_loop())

    async def close(self) -> None:
        """Write every line whose command is durable (close the journal first), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        else:
            lines = self._take_ready()
            if lines or self._written != self._saved or self._unwritten:
                self._append(lines, self._written)
            self._drop_undurable()
            self.report_unwritten()

    def report_unwritten(self) -> None:
        """At the end: say which lines could not be written at all, and what becomes of them."""
        if not self._unwritten:
            return
        users = sorted(self._unwritten)
        fate = ("the next start rebuilds those of journaled commands from the journal (the "
                "position stays before them)" if self._mark is not None else
                "they are lost (refused requests are not journaled)")
        log.error("audit log: the last lines of %d users could not be written (%s); %s",
                  len(users), ", ".join(users[:5]) + (" ..." if len(users) > 5 else ""), fate)

    def _drop_undurable(self) -> None:
        dropped = sum(len(lines) for _, group in self._sealed for lines in group.values())
        dropped += sum(len(lines) for lines in self._lines.values())
        if dropped:
            log.warning("audit log: %d lines of commands that never became durable (never "
                        "acknowledged) were not written", dropped)
        self._sealed.clear()
        self._lines = {}

    def line(self, ev: Event) -> str | None:
        # Enum fields are written through ``_value_``: an f-string would call the enum's
        # Python-level ``__format__``, several of which per line were most of its cost.
        stamp = self.stamp
        if ev.__class__ is ExecReport:
            symbol = ev.market
            market = self.config.markets.get(symbol)
            if market is None:
                return f"{stamp(ev.ts)} REJECTED order on unknown market {_raw(symbol)}: {_text(ev.reason)}"
            price, qty = self.fmt.price, self.fmt.qty
            oid = f"order {ev.order_id}" if ev.order_id is not None else "order"
            et = ev.exec_type
            if et is ExecType.TRADE:
                assert ev.last_price is not None and ev.last_qty is not None and ev.fee is not None
                assert ev.liquidity is not None
                return (f"{stamp(ev.ts)} FILL {oid} {ev.side._value_} {qty(symbol, ev.last_qty)} "
                        f"{symbol} @ {price(symbol, ev.last_price)} ({ev.liquidity._value_}, fee "
                        f"{market.quote.format(ev.fee)} {market.quote.name}, trade {ev.trade_id}); "
                        f"filled {qty(symbol, ev.filled)}/{qty(symbol, ev.qty)}, "
                        f"{ev.status._value_}")
            # A rejected order may echo the request's raw text (an off-grid "100.001").
            at = ("market" if ev.price is None else
                  price(symbol, ev.price) if type(ev.price) is int else _text(ev.price))
            size = qty(symbol, ev.qty) if type(ev.qty) is int else _text(ev.qty)
            if et is ExecType.REJECTED:  # may echo raw request values: format them plainly
                what = (f"{_text(ev.side).upper()} {size} {symbol} @ {at} {_text(ev.order_type)} "
                        f"{_text(ev.tif)}")
                return f"{stamp(ev.ts)} REJECTED {what}: {_text(ev.reason)}"
            what = (f"{_UPPER[ev.side._value_]} {size} {symbol} @ {at} {ev.order_type._value_} "
                    f"{ev.tif._value_}")
            return (f"{stamp(ev.ts)} {_LABELS[et._value_]} {oid} {what}; filled "
                    f"{qty(symbol, ev.filled)}, remaining {qty(symbol, ev.remaining)}, "
                    f"{ev.status._value_}")
        if ev.__class__ is CommandRejected:
            target = f" order {_text(ev.order_id)}" if ev.order_id is not None else ""  # type: ignore[attr-defined]
            return f"{stamp(ev.ts)} REJECTED {ev.command}{target}: {_text(ev.reason)}"  # type: ignore[attr-defined]
        return None

    def _append_rebuilt(self, lines: dict[str, list[str]], upto: int) -> None:
        """Rebuilt lines, minus those a crash left written but not yet counted in the position
        (appended, then killed before the position file was updated).

        The first time a user comes up, the end of their file back to the stamp of their
        first rebuilt line is read (before anything is appended): every line there is of a
        command after the position, or of a request that was never journaled, and any
        rebuilt line found there is skipped. Lines carry microsecond stamps and ids, so a
        match is the same line, not a look-alike.
        """
        out: dict[str, list[str]] = {}
        for user, user_lines in lines.items():
            seen = self._seen.get(user)
            if seen is None:
                seen, torn = _written_since(self.directory / f"{user}.log", user_lines[0][:_STAMP_LEN])
                self._seen[user] = seen
                if torn:
                    self._torn.add(user)
            fresh = [line for line in user_lines if line not in seen] if seen else user_lines
            self._rebuilt -= len(user_lines) - len(fresh)
            if fresh:
                if user in self._torn:  # a line cut short by the crash: start a line of our own
                    self._torn.discard(user)
                    fresh[0] = "\n" + fresh[0]
                out[user] = fresh
        self._append(out, upto)

    def _append(self, lines: dict[str, list[str]], upto: int | None = None) -> None:
        """Append each user's lines after whatever of theirs an earlier append left
        unwritten (worker thread), then record the position they reach: only once nothing
        is left unwritten, since recovery rebuilds only the lines after the position."""
        before = self._unwritten
        left: dict[str, bytes] = {}
        failing = self._failing
        users = list(before)
        users += [user for user in lines if user not in before]
        for user in users:
            if not safe_user_file(user):
                continue
            data = before.get(user, b"")
            user_lines = lines.get(user)
            if user_lines:
                data += ("\n".join(user_lines) + "\n").encode("utf-8")
            path = self.directory / f"{user}.log"
            done, exc = _append_bytes(path, data)
            if exc is not None:  # one user's file must not cost the others their lines
                left[user] = data[done:]  # a write cut short: only the rest, next time
                if user not in failing:
                    log.error("cannot append to the audit log %s: %s; its lines are kept and "
                              "tried again with each append (the position stays before them)",
                              path, exc.strerror or exc)
                failing[user] = exc.strerror or str(exc)
                continue
            if user in failing:
                del failing[user]
                log.warning("audit log %s written again: the lines kept since its append failed "
                            "are in it now", path)
        self._unwritten = left  # one assignment: the loop reads either the old or the new
        if not left:
            self._save_position(upto)


def _append_bytes(path: Path, data: bytes) -> tuple[int, OSError | None]:
    """Append ``data`` to ``path``: how many bytes got there, and the error that stopped
    the rest (a short write then an error leaves the start of ``data`` in the file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        return 0, exc
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
    except OSError as exc:
        return done, exc
    finally:
        os.close(fd)
    return done, None


_STAMP_LEN: Final = len("2026-01-01T00:00:00.000000Z")


def _written_since(path: Path, stamp: str, chunk: int = 1 << 20) -> tuple[set[str], bool]:
    """The complete lines at the end of ``path`` stamped ``stamp`` or later (read backwards
    a chunk at a time until an older line shows up), and whether the file ends in the middle
    of a line."""
    try:
        fh = open(path, "rb")
    except OSError:
        return set(), False
    with fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return set(), False
        data = b""
        pos = size
        key = stamp.encode("ascii", "replace")
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
            first_newline = data.find(b"\n")
            if pos > 0 and first_newline < 0:
                continue  # not one whole line yet
            oldest = data if pos == 0 else data[first_newline + 1:]
            if oldest[:_STAMP_LEN] < key:
                break
    torn = not data.endswith(b"\n")
    lines = data.split(b"\n")
    if pos > 0:
        lines = lines[1:]  # cut by the chunk boundary
    lines = lines[:-1]  # after the last newline: nothing, or a line the crash cut short
    found = set()
    for raw in lines:
        if raw[:_STAMP_LEN] >= key:
            found.add(raw.decode("utf-8", "replace"))
    return found, torn


def safe_user_file(user: str) -> bool:
    """Users are validated by the protocol; this is the last check before a file name."""
    return bool(user) and os.sep not in user and user not in (".", "..") and "/" not in user
