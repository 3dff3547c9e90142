"""The embedded simulation's ``trades.jsonl``, formatted and written by a forked child.

Why a second process: turning each trade into its JSON line (a dict of thirteen fields,
decimal strings, ``orjson``) was about 7 % of an embedded run, on a machine whose second
core sat idle. The parent now hands each batch of trades over as a list of plain tuples
(``marshal``, a few hundred nanoseconds a trade) and the child, forked with the same
``LedgerLines``, writes the very same bytes.

Wire, parent to child, on a pipe: frames of a 4-byte little-endian length and a
``marshal`` payload (a list of ``LedgerLines.line`` argument tuples); a zero length asks
the child to flush the file and answer one byte on a second pipe (``sync``), so whoever
reads the file, or stops a clock, knows every trade sent so far is in it. End of input
(the parent closed its end, or died) makes the child write what it holds and exit; it
ignores SIGINT and SIGTERM, so a Ctrl-C in the terminal, or a SIGTERM to the process group,
stops the run and not the ledger's tail.

A child that fails (disk full, say) exits non-zero with its error on stderr; the parent
sees a broken pipe or the exit status and raises ``LedgerWriterError``. Where ``os.fork``
is missing (Windows) ``start`` returns None and the caller writes inline.
"""

from __future__ import annotations

import marshal
import os
import signal
import sys
import traceback
from typing import Any, BinaryIO, Callable

_HEAD = 4
# This process's ends of its live writers' pipes, closed in every later child.
_PARENT_FDS: set[int] = set()


class LedgerWriterError(OSError):
    """The child writing the ledger stopped before it was told to."""


class LedgerWriter:
    """The parent's end: ``send`` batches, ``sync`` to wait for them, ``close`` to finish."""

    def __init__(self, pid: int, out_fd: int, ack_fd: int) -> None:
        self.pid = pid
        self._out = out_fd
        self._ack = ack_fd
        self._closed = False

    def send(self, rows: list[tuple[Any, ...]]) -> None:
        payload = marshal.dumps(rows)
        self._write(len(payload).to_bytes(_HEAD, "little") + payload)

    def sync(self) -> None:
        """Return once the child has written (and flushed) everything sent before."""
        self._write(bytes(_HEAD))
        if os.read(self._ack, 1) != b"s":
            self._failed()

    def close(self) -> None:
        """End the input, wait for the child to write its last lines and exit."""
        if self._closed:
            return
        self._closed = True
        _PARENT_FDS.difference_update((self._out, self._ack))
        os.close(self._out)
        os.close(self._ack)
        _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise LedgerWriterError(f"the trade ledger's writer (pid {self.pid}) failed with exit code {code}")

    def _write(self, data: bytes) -> None:
        if self._closed:
            raise LedgerWriterError(f"the trade ledger's writer (pid {self.pid}) has stopped")
        view = memoryview(data)
        # A frame goes whole or not at all: a Ctrl-C while the pipe is full would otherwise
        # leave half a frame, and the next one would be read as its rest. SIGINT and SIGTERM
        # are held back meanwhile and land as soon as the frame is in.
        mask = _hold_stops()
        try:
            while view:
                view = view[os.write(self._out, view):]
        except BrokenPipeError:
            self._failed()
        finally:
            _release_stops(mask)

    def _failed(self) -> None:
        try:
            self.close()
        except LedgerWriterError:
            raise
        raise LedgerWriterError(f"the trade ledger's writer (pid {self.pid}) stopped early")


def start(file: BinaryIO, line: Callable[..., bytes]) -> LedgerWriter | None:
    """Fork a child that writes ``line(*row)`` of every row sent to ``file`` (already open).

    The parent's copy of ``file`` is closed here: from now on only the child writes it.
    """
    if not hasattr(os, "fork"):
        return None
    out_r, out_w = os.pipe()
    ack_r, ack_w = os.pipe()
    _widen(out_w)
    file.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # SIGINT and SIGTERM are held back across the fork: one landing before the child ignores
    # it would stop the child (or raise KeyboardInterrupt in it) while it still runs the
    # parent's code. The parent gets a held one as soon as the mask is restored.
    mask = _hold_stops()
    try:
        pid = os.fork()
    except OSError:  # no process to spare (EAGAIN, ENOMEM): the caller writes inline
        _release_stops(mask)
        for fd in (out_r, out_w, ack_r, ack_w):
            os.close(fd)
        return None
    if pid == 0:  # the child: never returns
        code = 1
        try:
            # The run decides when the ledger ends (it closes the pipe): a Ctrl-C in the
            # terminal or a SIGTERM to the whole process group must not cut its tail.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _release_stops(mask)
            # Not the parent's ends of other writers' pipes: an inherited copy would keep
            # such a writer's input open, and its close() waiting, until this child ends.
            for fd in (out_w, ack_r, *_PARENT_FDS):
                os.close(fd)
            _serve(out_r, ack_w, file, line)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)
    _release_stops(mask)
    os.close(out_r)
    os.close(ack_w)
    file.close()
    _PARENT_FDS.update((out_w, ack_r))
    return LedgerWriter(pid, out_w, ack_r)


def _hold_stops() -> Any:
    """Block SIGINT and SIGTERM for this thread; returns the mask to restore (None where
    there are no masks)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _release_stops(mask: Any) -> None:
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _widen(fd: int) -> None:
    """A batch is a few hundred kilobytes; the default 64 KiB pipe would take it in pieces,
    each a switch to the child and back. Linux lets a pipe grow to 1 MiB unprivileged."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):
        pass  # another system, or a lower limit: the default pipe works too


def _serve(in_fd: int, ack_fd: int, file: BinaryIO, line: Callable[..., bytes]) -> None:
    with os.fdopen(in_fd, "rb", buffering=1 << 20) as src:
        while True:
            head = src.read(_HEAD)
            if len(head) < _HEAD:
                break  # end of input (a cut frame means the parent died mid-write)
            n = int.from_bytes(head, "little")
            if n == 0:
                file.flush()
                os.write(ack_fd, b"s")
                continue
            payload = src.read(n)
            if len(payload) < n:
                break
            file.write(b"".join([line(*row) for row in marshal.loads(payload)]))
    file.close()
