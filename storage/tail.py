"""Reading the journal as it grows: the follower's hot loop, compiled with mypyc.

The follower (``storage/follower.py``) replays every durable journal record through its
own engine. At the gateway's rates that is about a third of the machine's second core, and
the loop around the engine (framing checks, decoding, handing events to the audit log)
was interpreted Python: ``bench/bench_follower.py`` measures it (docs/performance.md).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Callable, Final

from exchange.engine import Exchange
from exchange.state import FinishedOrders
from exchange.types import Trade
from storage.audit import AuditLog
from storage.journal import HEADER, MAGIC, MAX_RECORD, JournalError, decode, list_segments, segment_name
from storage.persistence import FollowerError

_HSIZE: Final = HEADER.size
_unpack_header: Final = HEADER.unpack_from
_crc32: Final = zlib.crc32


class JournalTail:
    """Reads the journal's records in order as they are written, across segment rotations.

    Only records the caller says are complete (``upto``, from the server's durability
    notices) are read, so a record is never seen half-written; a record found damaged is
    an error, not a torn tail.
    """

    def __init__(self, directory: Path, after: int) -> None:
        self.directory = directory
        self.expected = after + 1  # the next record to read
        self._segment = -1  # first record of the open (or last) segment
        self._fd: int | None = None
        self._buf = b""

    def _open(self) -> bool:
        """Open the segment holding the next record: the last one starting at or before it
        (after a snapshot written a little past the journal's cut, that is an earlier one)
        and after the segment just finished."""
        path = None
        found = -1
        for start, candidate in list_segments(self.directory):
            if start <= self.expected and start > self._segment:
                path, found = candidate, start
        if path is None:
            return False
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        self._segment = found
        magic = os.read(fd, len(MAGIC))
        if magic != MAGIC:
            os.close(fd)
            raise FollowerError(f"journal {path} does not start with the journal header")
        self._fd = fd
        self._buf = b""
        return True

    def read(self, upto: int, sink: Callable[[int, bytes], None]) -> int:
        """Feed ``sink(lsn, payload)`` every record up to ``upto``; returns how many."""
        fed = 0
        hsize = _HSIZE
        crc32 = _crc32
        data = self._buf
        pos = 0
        while self.expected <= upto:
            size = len(data)
            if size - pos >= hsize:
                header = _unpack_header(data, pos)
                length: int = header[0]
                lsn: int = header[1]
                crc: int = header[2]
                if crc32(data[pos:pos + 16]) != header[3] or lsn > self.expected or length > MAX_RECORD:
                    raise FollowerError(f"journal record {self.expected} is damaged or out of order")
                end = pos + hsize + length
                if end <= size:
                    payload = data[pos + hsize:end]
                    if crc32(payload) != crc:
                        raise FollowerError(f"journal record {lsn} is damaged (checksum mismatch)")
                    if lsn < self.expected:  # covered by the snapshot this started from
                        pos = end
                        continue
                    sink(lsn, payload)
                    fed += 1
                    self.expected = lsn + 1
                    pos = end
                    continue
            # Not a whole record in hand: read on (the server wrote it before saying durable).
            if self._fd is None and not self._open():
                raise FollowerError(
                    f"journal record {self.expected} is durable but no segment "
                    f"{segment_name(self.expected)} holds it")
            assert self._fd is not None
            chunk = os.read(self._fd, 1 << 20)
            if chunk:
                data = data[pos:] + chunk
                pos = 0
                continue
            if pos < len(data):
                raise FollowerError(
                    f"journal segment ends inside record {self.expected} although the server "
                    "reported it durable")
            # The rest is in the next segment: the server rotated after a snapshot.
            os.close(self._fd)
            self._fd = None
            data, pos = b"", 0
            if not self._open():
                raise FollowerError(
                    f"journal record {self.expected} is durable but no segment "
                    f"{segment_name(self.expected)} holds it")
        self._buf = data[pos:]
        return fed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Replay:
    """The follower's sink for ``JournalTail.read``: runs each record through the engine,
    keeps its trades for the ledger, gives its events to the audit log and keeps the
    finished orders the snapshot carries."""

    def __init__(self, engine: Exchange, audit: AuditLog, lsn: int, last_ts: int,
                 finished: FinishedOrders) -> None:
        self.engine = engine
        self.audit = audit
        self.lsn = lsn
        self.last_ts = last_ts
        self.trades: list[Trade] = []
        self.finished = finished  # the server's ``order_status`` table, for the snapshots

    def __call__(self, lsn: int, payload: bytes) -> None:
        try:
            command = decode(payload)
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(f"journal record {lsn} cannot be decoded: {exc}") from None
        events = self.engine.handle(command)
        trades = self.trades
        for ev in events:
            if isinstance(ev, Trade):
                trades.append(ev)
        self.audit.replay_record(lsn, events)
        self.finished.observe(events)
        self.lsn = lsn
        self.last_ts = command.ts
