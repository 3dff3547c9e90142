"""The write-ahead journal: every state-changing command, durable before its events leave.

Theory of operation
-------------------
The gateway sends every command through ``Gateway.execute``. A command the engine
accepted (a rejection changes nothing, so it is not logged) is encoded and appended here
with a log sequence number (``lsn``, +1 per record), and the gateway holds every outgoing
message until the journal reports that record durable. Replaying the journal through the
same deterministic engine after the latest snapshot gives back the exact state.

Group commit. ``append`` only adds bytes to an in-memory batch and, once per event-loop
pass, schedules a kick that writes the whole batch with a single ``os.write``. Under
``batch`` one fdatasync then covers it, and whatever is written while that fdatasync
runs goes into the next one; the event loop keeps reading and matching meanwhile. When
a batch is durable the ``on_durable`` callbacks run on the loop: the gateway releases
the held output, the ledger may write the trades. One fsync per batch, not per order.

Who writes. The loop itself writes (a write into the page cache takes microseconds),
and the fdatasync runs in the kernel through Linux native AIO, which signals an eventfd
the loop watches (``storage/aio.py``). An earlier version gave every batch to a worker
thread; on our 2-core virtual machines the thread wake-ups and lock hand-overs that
costs put the 99th percentile of acknowledgement latency at 6-9 ms against a 0.1-0.4 ms
fsync (docs/performance.md). Where AIO fsync is refused, and for ``always``, batches
still go to the worker thread.

Policies (``--fsync``):

* ``batch`` (default): a batch is fsynced before its acknowledgements leave. An
  acknowledged command survives a process crash and a power cut.
* ``always``: every record is written and fsynced on its own before its acknowledgement:
  the same guarantee as ``batch`` at one fsync per command (for comparison, or for file
  systems where one large fsync behaves worse than many small ones).
* ``off``: records are written to the operating system before acknowledgements leave,
  but never fsynced (except at rotation and close). Survives a crash of the process
  (``kill -9``); a power cut or kernel crash may lose the last seconds of acknowledged
  commands.

Files: ``journal/<first lsn, 20 digits>.wal``. Each segment starts with ``MAGIC``; each
record is framed::

    <I length> <Q lsn> <I crc32(payload)> <I crc32(the 16 bytes before)> payload

The header checksum makes the length trustworthy, so a record cut short at the end of the
last segment (a torn write) is told apart from damage in the middle, which stops recovery.
One write carries a whole group of records, and the part of it that never reached the disk
reads as zeros: a record failing its checksum is torn only if zeros run from inside it (its
header, or its payload, which as JSON never holds a zero byte) to the end of the last
segment. A whole last record failing its checksum with no zero in it may have been
acknowledged (bit rot): it stops recovery too, with the command that drops it.

The payload is one tag byte (``o``: orjson-safe, ``j``: contains integers beyond 64 bits,
decode with the standard library so they stay exact) and a JSON array, see ``encode``.

Rotation: after a snapshot, the next record opens a new segment. Older segments are
removed only once that snapshot is durable (``remove_before``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Final, Iterator, cast

import orjson

from storage.aio import AsyncFsync

from exchange.types import (
    CancelOrder,
    Command,
    Deposit,
    ModifyOrder,
    OrderType,
    PlaceOrder,
    Side,
    STPMode,
    TimeInForce,
    Withdraw,
)

log = logging.getLogger("storage.journal")

JOURNAL_DIR: Final = "journal"
MAGIC: Final = b"LXJRNL1\n"
HEADER: Final = struct.Struct("<IQII")  # length, lsn, payload crc, header crc
_HEAD16: Final = struct.Struct("<IQI")
_crc32: Final = zlib.crc32  # bound once: compiled, ``zlib.crc32`` is a lookup per call
_O_CRC: Final = zlib.crc32(b"o")
MAX_RECORD: Final = 1 << 20
SEGMENT_RE: Final = re.compile(r"^(\d{20})\.wal$")
POLICIES: Final = ("always", "batch", "off")


class JournalError(Exception):
    """The journal cannot be read safely; the message names the file and the offset."""


# --------------------------------------------------------------------------- records


def _json_default(value: Any) -> Any:
    raise TypeError(f"cannot journal {type(value).__name__}")


def _row(command: Command) -> list[Any]:
    """A command as the JSON array of its record."""
    cls = command.__class__
    # Typed names (``cast``): compiled, each field is then read directly; through ``Any``
    # every one was a generic attribute lookup.
    if cls is PlaceOrder:
        p = cast(PlaceOrder, command)
        row: list[Any] = ["P", p.ts, p.account, p.market, p.side, p.order_type, p.qty, p.price,
                          p.tif, p.post_only, p.stp, p.client_order_id]
        if p.quote_qty is not None:  # only then: records of other orders stay as they were
            row.append(p.quote_qty)
        return row
    if cls is CancelOrder:
        c = cast(CancelOrder, command)
        return ["C", c.ts, c.account, c.order_id]
    if cls is ModifyOrder:
        m = cast(ModifyOrder, command)
        return ["M", m.ts, m.account, m.order_id, m.price, m.qty]
    if cls is Deposit:
        d = cast(Deposit, command)
        return ["D", d.ts, d.account, d.asset, d.amount]
    if cls is Withdraw:
        w = cast(Withdraw, command)
        return ["W", w.ts, w.account, w.asset, w.amount]
    raise TypeError(f"not a journaled command: {command!r}")


def encode(command: Command) -> bytes:
    """A command as the payload of one record (tag byte + JSON array)."""
    row = _row(command)
    try:
        return b"o" + orjson.dumps(row)
    except TypeError:  # an integer beyond 64 bits: keep it exact
        return b"j" + json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode()


def record(lsn: int, command: Command) -> bytes:
    """``frame(lsn, encode(command))``, the tag not copied in front of the JSON first: the
    payload's checksum runs on from the tag's."""
    row = _row(command)
    try:
        body = orjson.dumps(row)
    except TypeError:
        return frame(lsn, encode(command))
    return b"".join((_header(len(body) + 1, lsn, _crc32(body, _O_CRC)), b"o", body))


# Enum members by value: a dict lookup costs ~50 ns, ``Side(value)`` ~800 ns, and replay
# decodes a million records.
_SIDES: Final = {m.value: m for m in Side}
_TYPES: Final = {m.value: m for m in OrderType}
_TIFS: Final = {m.value: m for m in TimeInForce}
_STPS: dict[Any, STPMode | None] = {m.value: m for m in STPMode}
_STPS[None] = None


def decode(payload: bytes) -> Command:
    """The command a payload holds (raises ValueError/KeyError/TypeError if it is not one)."""
    tag = payload[:1]
    if tag == b"o":
        row = orjson.loads(payload[1:])
    elif tag == b"j":
        row = json.loads(payload[1:])
    else:
        raise ValueError(f"unknown payload tag {tag!r}")
    kind = row[0]
    if kind == "P":
        _, ts, account, market, side, otype, qty, price, tif, post_only, stp, coid, *quote = row
        if len(quote) > 1:
            raise ValueError(f"an order record has {len(row)} fields")
        return PlaceOrder(ts, account, market, _SIDES[side], _TYPES[otype], qty, price,
                          _TIFS[tif], post_only, _STPS[stp], coid, quote[0] if quote else None)
    if kind == "C":
        _, ts, account, order_id = row
        return CancelOrder(ts, account, order_id)
    if kind == "M":
        _, ts, account, order_id, price, qty = row
        return ModifyOrder(ts, account, order_id, price, qty)
    if kind == "D":
        _, ts, account, asset, amount = row
        return Deposit(ts, account, asset, amount)
    if kind == "W":
        _, ts, account, asset, amount = row
        return Withdraw(ts, account, asset, amount)
    raise ValueError(f"unknown command kind {kind!r}")


def _header(size: int, lsn: int, crc: int) -> bytes:
    """A record's header: payload length, lsn, payload crc, then the crc of those 16 bytes."""
    return HEADER.pack(size, lsn, crc, _crc32(_HEAD16.pack(size, lsn, crc)))


def frame(lsn: int, payload: bytes) -> bytes:
    return _header(len(payload), lsn, _crc32(payload)) + payload


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}.wal"


def list_segments(directory: str | Path) -> list[tuple[int, Path]]:
    """(first lsn, path) of every segment, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for path in directory.iterdir():
        m = SEGMENT_RE.match(path.name)
        if m:
            out.append((int(m.group(1)), path))
    out.sort()
    return out


# --------------------------------------------------------------------------- reading


@dataclass
class Torn:
    """A record cut short at the very end of the journal: discarded, never acknowledged."""

    path: Path
    offset: int
    size: int


@dataclass
class ScanResult:
    last_lsn: int  # last valid record (or the starting point if there was none)
    records: int  # records read after ``after``
    torn: Torn | None


def read_journal(
    directory: str | Path, after: int, sink: Callable[[int, bytes], None],
) -> ScanResult:
    """Feed ``sink(lsn, payload)`` every record with lsn > ``after``, in order.

    Segments that end before ``after`` (left over from before a snapshot) are skipped
    unread. Raises ``JournalError`` on a gap, a damaged record or a record out of order
    anywhere but at the very end; a record cut short at the very end is reported in
    ``torn`` and not fed. ``sink`` may raise: the scan stops there.
    """
    segments = list_segments(directory)
    # Drop the segments wholly covered by the snapshot: the next one starts at or before after+1.
    while len(segments) > 1 and segments[1][0] <= after + 1:
        segments.pop(0)
    if not segments:
        return ScanResult(after, 0, None)
    first = segments[0][0]
    if first > after + 1:
        raise JournalError(
            f"journal {segments[0][1]} starts at record {first} but the snapshot covers only up "
            f"to record {after}: records {after + 1}..{first - 1} are missing"
        )
    expected = first
    count = 0
    torn: Torn | None = None
    crc32 = zlib.crc32
    for index, (start, path) in enumerate(segments):
        last_segment = index == len(segments) - 1
        if start != expected:
            raise JournalError(
                f"journal {path} starts at record {start}, expected {expected}: a segment is missing"
            )
        data = path.read_bytes()
        view = memoryview(data)
        size = len(data)
        if data[:len(MAGIC)] != MAGIC:
            if last_segment and size < len(MAGIC) and MAGIC.startswith(data):
                torn = Torn(path, 0, size)
                break
            raise JournalError(f"journal {path} does not start with the journal header")
        pos = len(MAGIC)
        hsize = HEADER.size
        while pos < size:
            rest = size - pos
            if rest < hsize:
                if last_segment:
                    torn = Torn(path, pos, rest)
                    break
                raise JournalError(f"{_where(path, pos, expected)}: segment ends inside a record header")
            length, lsn, crc, hcrc = HEADER.unpack_from(data, pos)
            if crc32(view[pos:pos + 16]) != hcrc:
                if last_segment and len(data[pos:].rstrip(b"\x00")) < hsize:
                    torn = Torn(path, pos, rest)  # zeros from inside the header to the end
                    break
                raise JournalError(f"{_where(path, pos, expected)}: record header is damaged (checksum mismatch)")
            if lsn != expected:
                raise JournalError(f"{_where(path, pos, expected)}: record number {lsn} out of order")
            if length > MAX_RECORD:
                raise JournalError(f"{_where(path, pos, expected)}: record length {length} is implausible")
            end = pos + hsize + length
            if end > size:
                if last_segment:
                    torn = Torn(path, pos, rest)
                    break
                raise JournalError(f"{_where(path, pos, expected)}: segment ends inside a record")
            payload = view[pos + hsize:end]
            if crc32(payload) != crc:
                if last_segment and b"\x00" in payload.tobytes() and not data[end:].strip(b"\x00"):
                    torn = Torn(path, pos, rest)  # the body never fully landed, nor anything after
                    break
                if last_segment and end == size:
                    raise JournalError(
                        f"{_where(path, pos, expected)}: the last record is whole but fails its "
                        f"checksum, and holds no zero bytes as a write cut short by a power cut "
                        f"would; it may be an acknowledged command (bit rot, or a write by "
                        f"another program), so it is not dropped silently. To start without "
                        f"it, losing that command: `truncate -s {pos} {shlex.quote(os.path.abspath(path))}`"
                    )
                raise JournalError(f"{_where(path, pos, expected)}: record is damaged (checksum mismatch)")
            if lsn > after:
                sink(lsn, payload.tobytes())
                count += 1
            expected += 1
            pos = end
        if torn is not None:
            break
    return ScanResult(max(after, expected - 1), count, torn)


def cut_torn(torn: Torn) -> None:
    """Cut a torn last record off its segment, durably (start-up only). It was never
    acknowledged; once it is gone the journal ends cleanly at its last whole record, so a
    new segment may follow it without the torn bytes becoming damage in the middle."""
    fd = os.open(torn.path, os.O_WRONLY)
    try:
        os.ftruncate(fd, torn.offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _where(path: Path, pos: int, lsn: int) -> str:
    return f"journal {path} at byte {pos} (record {lsn})"


def iter_commands(directory: str | Path, after: int = 0) -> Iterator[tuple[int, Command]]:
    """Every journaled command after ``after`` (tools and tests; reads eagerly)."""
    out: list[tuple[int, Command]] = []
    read_journal(directory, after, lambda lsn, payload: out.append((lsn, decode(payload))))
    return iter(out)


# --------------------------------------------------------------------------- writing


class _Rotate:
    """Marker in the write queue: close the segment, open one starting at ``lsn``."""

    __slots__ = ("lsn",)

    def __init__(self, lsn: int) -> None:
        self.lsn = lsn


class Journal:
    """Appends records with group commit; tells ``on_durable`` listeners how far it got."""

    def __init__(self, directory: str | Path, fsync: str = "batch", aio: bool | None = None) -> None:
        """``aio``: for ``batch``, fsync through Linux native AIO (None: where available,
        False: always in the worker thread, True: insist, failing at ``open`` if refused)."""
        if fsync not in POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(POLICIES)}, not {fsync!r}")
        self.directory = Path(directory)
        self.policy = fsync
        self.last_lsn = 0  # last record appended
        self.durable_lsn = 0  # last record known durable (under the policy)
        self.on_durable: list[Callable[[int], None]] = []
        self.on_failure: list[Callable[[BaseException], None]] = []
        self.failed: BaseException | None = None
        self.batches = 0
        self.records = 0
        self._buf: list[Any] = []
        self._scheduled = False
        self._inflight = False
        self._fd: int | None = None
        self._segment_lsn = 0
        self._executor: ThreadPoolExecutor | None = None
        # Any, not AbstractEventLoop: compiled, every call's result would be checked against
        # the stubs, and uvloop's remove_reader returns None where the stubs say bool.
        self._loop: Any = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._want_aio = aio
        self._aio: AsyncFsync | None = None
        self._aio_upto = 0  # the last record the running AIO fdatasync covers
        self._aio_watched = False
        # off and batch-with-AIO write on the loop itself (see "Who writes" above); always,
        # and batch where AIO is refused, hand each batch to a worker thread.
        self._direct = fsync == "off"
        self._written_lsn = 0  # direct mode: last record handed to the operating system
        self._closed = False

    # -- opening ----------------------------------------------------------------------

    def open(self, next_lsn: int) -> None:
        """Start a fresh segment at ``next_lsn`` (synchronous: start-up only). It is durable,
        with its directory entry, whatever the policy: recovery deletes the segments before
        it next, and a snapshot must never be left with no segment after it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.last_lsn = self.durable_lsn = self._written_lsn = next_lsn - 1
        self._open_segment(next_lsn)
        if self.policy == "batch" and self._want_aio is not False and self._aio is None:
            aio = AsyncFsync.create()
            if aio is not None and not aio.probe(self._fd):  # type: ignore[arg-type]
                aio.close()
                aio = None
            if aio is None and self._want_aio:
                raise OSError(f"native AIO fdatasync is not available for {self.directory}")
            if aio is None:
                log.info("journal: native AIO fsync unavailable, fsyncing in a worker thread")
            self._aio = aio
            self._direct = aio is not None

    def _open_segment(self, first_lsn: int) -> None:
        path = self.directory / segment_name(first_lsn)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        os.write(fd, MAGIC)
        os.fsync(fd)  # under ``off`` too (once per snapshot): records must never follow a lost header
        from storage.snapshot import fsync_dir

        fsync_dir(self.directory)
        self._fd = fd
        self._segment_lsn = first_lsn

    @property
    def segment_path(self) -> Path:
        return self.directory / segment_name(self._segment_lsn)

    # -- hot path ---------------------------------------------------------------------

    def append(self, command: Command) -> int:
        """Add one accepted command to the current batch; returns its lsn."""
        lsn = self.last_lsn + 1
        self.last_lsn = lsn
        self._buf.append(record(lsn, command))
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._kick)  # after every callback of this loop pass
        return lsn

    def mark(self) -> int:
        return self.last_lsn

    def durable(self) -> int:
        return self.durable_lsn

    def pending(self) -> bool:
        return self.durable_lsn < self.last_lsn

    # -- background writes ------------------------------------------------------------

    def _kick(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        if self._direct:
            if self._buf and self.failed is None:
                self._write_direct()
            return
        if self._inflight or not self._buf or self.failed is not None:
            return
        batch, self._buf = self._buf, []
        upto = self.last_lsn
        self._inflight = True
        loop = self._loop
        assert loop is not None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="journal")
        fut = loop.run_in_executor(self._executor, self._write, batch)
        fut.add_done_callback(lambda f: self._written(f, upto))

    def _write(self, batch: list[Any], sync: bool = True) -> None:
        """Write the batch, cutting segments where marked; with ``sync`` (the worker
        thread's way) also fsync per policy, without (the loop's) leave that to AIO."""
        policy = self.policy if sync else "off"
        chunk: list[bytes] = []
        for item in batch:
            if item.__class__ is _Rotate:
                self._flush_chunk(chunk)
                chunk = []
                self._cut_segment(item.lsn)
            elif policy == "always":
                self._flush_chunk([item])
                os.fsync(self._fd)  # type: ignore[arg-type]
            else:
                chunk.append(item)
        self._flush_chunk(chunk)
        if chunk and policy == "batch":
            os.fsync(self._fd)  # type: ignore[arg-type]

    def _flush_chunk(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        data = b"".join(chunk) if len(chunk) > 1 else chunk[0]
        fd = self._fd
        assert fd is not None
        # Offsets, not a shrinking memoryview: compiled with mypyc, ``view[n:]`` on a
        # memoryview did not shrink it and every batch was written twice.
        done = os.write(fd, data)
        while done < len(data):  # a short write: rare (a full disk, a signal)
            done += os.write(fd, data[done:])

    def _write_direct(self) -> None:
        """Write the batch from the loop; off: that is all, batch: start an fdatasync."""
        batch, self._buf = self._buf, []
        upto = self.last_lsn
        try:
            self._write(batch, sync=False)
        except OSError as exc:
            self._fail(exc)
            return
        self._written_lsn = upto
        if self._aio is None:
            self._mark_durable(upto)  # off: in the operating system is as far as it goes
        elif not self._aio.inflight:
            self._start_sync()
        # else: _synced starts the next fdatasync, covering this batch too

    def _cut_segment(self, lsn: int) -> None:
        """Close the segment, made durable first whatever ran before (a later fdatasync goes
        to the new file), and open the next. Blocking, but only once per snapshot."""
        assert self._fd is not None
        os.fsync(self._fd)  # under ``off`` too: a newer segment must never follow a torn one
        os.close(self._fd)
        self._fd = None
        self._open_segment(lsn)

    def _start_sync(self) -> None:
        aio = self._aio
        assert aio is not None and self._fd is not None
        if not self._aio_watched:
            assert self._loop is not None
            self._loop.add_reader(aio.fileno(), self._synced)
            self._aio_watched = True
        try:
            aio.submit(self._fd)
        except OSError as exc:
            self._fail(exc)
            return
        self._aio_upto = self._written_lsn

    def _synced(self) -> None:
        """Event loop: the AIO fdatasync finished (its eventfd became readable)."""
        aio = self._aio
        assert aio is not None
        aio.drain()
        res = aio.reap()
        if res is None or self.failed is not None:
            # Failed meanwhile (a rotation's fsync may have been the one told of a write-back
            # error this fdatasync then does not see): nothing more is durable.
            return
        if res < 0:
            self._fail(OSError(-res, f"fdatasync of the journal failed: {os.strerror(-res)}"))
            return
        self._mark_durable(self._aio_upto)
        if self._written_lsn > self.durable_lsn and self.failed is None:
            self._start_sync()  # group commit: what was written meanwhile, in one go

    def _fail(self, exc: BaseException) -> None:
        self.failed = exc
        log.critical("journal write failed in %s: %s; acknowledgements are withheld",
                     self.directory, exc)
        for waiter in self._waiters:
            if not waiter[1].done():
                waiter[1].set_exception(exc)
        self._waiters.clear()
        for callback in self.on_failure:
            callback(exc)

    def _written(self, fut: asyncio.Future[None], upto: int) -> None:
        self._inflight = False
        exc = fut.exception()
        if exc is not None:
            self._fail(exc)
            return
        self._mark_durable(upto)
        if self._buf:
            self._kick()  # group commit: what arrived meanwhile goes now, as one batch

    def _mark_durable(self, upto: int) -> None:
        """Records up to ``upto`` are durable under the policy: release what waits on them."""
        if upto <= self.durable_lsn:
            return
        self.batches += 1
        if upto > self.durable_lsn:
            self.records += upto - self.durable_lsn
            self.durable_lsn = upto
        for callback in self.on_durable:
            callback(upto)
        if self._waiters:
            still = []
            for lsn, waiter in self._waiters:
                if lsn <= upto:
                    if not waiter.done():
                        waiter.set_result(None)
                else:
                    still.append((lsn, waiter))
            self._waiters = still

    async def wait_durable(self, lsn: int | None = None) -> None:
        """Until record ``lsn`` (default: the last appended) is durable."""
        if lsn is None:
            lsn = self.last_lsn
        if self.failed is not None:
            raise self.failed
        if lsn <= self.durable_lsn:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((lsn, waiter))
        if not self._scheduled and not self._inflight:
            self._kick()
        await waiter

    # -- rotation ---------------------------------------------------------------------

    def rotate(self) -> int:
        """The next record opens a new segment; returns the lsn it will start at.

        Queued behind the records already appended, so the cut is exactly here.
        """
        lsn = self.last_lsn + 1
        if lsn == self._segment_lsn and not self._buf:
            return lsn  # nothing written since the last cut
        self._buf.append(_Rotate(lsn))
        self._segment_lsn = lsn
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            loop.call_soon(self._kick)
        return lsn

    def remove_before(self, lsn: int) -> int:
        """Delete the segments that hold only records before ``lsn`` (their snapshot is
        durable). Blocking; returns how many were removed."""
        removed = 0
        segments = list_segments(self.directory)
        for i, (start, path) in enumerate(segments):
            following = segments[i + 1][0] if i + 1 < len(segments) else None
            if following is not None and following <= lsn and start < lsn:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- closing ----------------------------------------------------------------------

    async def close(self) -> None:
        """Make everything durable (fsync whatever the policy), then close the file.

        The file, the AIO context and the worker are released even when that fails; the
        failure is raised afterwards.
        """
        try:
            if self._loop is not None and self.failed is None and (
                self._buf or self._inflight or self.durable_lsn < self.last_lsn
            ):
                await self.wait_durable()
            while self._inflight and self.failed is None:  # a worker still cutting a segment
                await asyncio.sleep(0.001)
            if self._buf and self.failed is None:
                # Only a rotation queued after the last record can be left (it has nothing
                # to make durable, so nothing above ran it): cut the segment here, blocking.
                batch, self._buf = self._buf, []
                self._write(batch)
        finally:
            self._closed = True
            self._release_files()

    def _release_files(self) -> None:
        if self._aio is not None:
            if self._aio_watched and self._loop is not None:
                self._loop.remove_reader(self._aio.fileno())
                self._aio_watched = False
            self._aio.close()  # waits for an fdatasync still running
            self._aio = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
