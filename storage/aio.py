"""fdatasync without a Python thread: Linux native AIO, completion signalled on an eventfd.

Why not a worker thread: on the 2-core virtual machines we run on, handing each group
commit to a thread and back cost several milliseconds at the 99th percentile (two thread
wake-ups and two hand-overs of the interpreter lock per batch), while the fsync itself
takes 0.1-0.4 ms. With ``io_submit`` the kernel runs the fdatasync on its own worker and
bumps an eventfd the event loop already watches: no Python thread, no lock hand-over.
Measured in docs/performance.md.

Linux only (``IOCB_CMD_FDSYNC`` needs 4.18+). ``AsyncFsync.create()`` returns None where
the system refuses (another OS, an old kernel, a sandbox that forbids the syscalls), and
the journal then falls back to its worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import sys

# x86-64 and arm64 syscall numbers.
_SYSCALLS = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
}
IOCB_CMD_FDSYNC = 3
IOCB_FLAG_RESFD = 1


class _Iocb(ctypes.Structure):
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class AsyncFsync:
    """One fdatasync in flight at a time; ``fileno()`` becomes readable when it is done."""

    def __init__(self, libc: ctypes.CDLL, numbers: dict[str, int], ctx: int, efd: int) -> None:
        self._syscall = libc.syscall
        self._n = numbers
        self._ctx = ctx
        self._efd = efd
        self._iocb = _Iocb()
        self._iocbp = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._event = _IoEvent()
        self._zero = (ctypes.c_long * 2)(0, 0)  # timespec {0, 0}: never wait
        self.inflight = False
        # The call arguments, built once: a group commit submits and reaps thousands of times
        # a second, and building them per call was most of the event loop's cost of it.
        self._submit_args = (ctypes.c_long(numbers["io_submit"]), ctypes.c_ulong(ctx),
                             ctypes.c_long(1), self._iocbp)
        self._reap_args = (ctypes.c_long(numbers["io_getevents"]), ctypes.c_ulong(ctx),
                           ctypes.c_long(0), ctypes.c_long(1), ctypes.byref(self._event), self._zero)
        self._fd = -1  # the descriptor the iocb is filled in for

    @classmethod
    def create(cls) -> AsyncFsync | None:
        """An instance, or None where native AIO fsync is not available."""
        numbers = _SYSCALLS.get(os.uname().machine) if sys.platform.startswith("linux") else None
        name = ctypes.util.find_library("c")
        if numbers is None or name is None or not hasattr(os, "eventfd"):
            return None
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            ctx = ctypes.c_ulong(0)
            if libc.syscall(ctypes.c_long(numbers["io_setup"]), ctypes.c_int(8), ctypes.byref(ctx)) != 0:
                return None
        except (OSError, AttributeError):
            return None
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            libc.syscall(ctypes.c_long(numbers["io_destroy"]), ctypes.c_ulong(ctx.value))
            return None
        return cls(libc, numbers, ctx.value, efd)

    def fileno(self) -> int:
        return self._efd

    def submit(self, fd: int) -> None:
        """Start an fdatasync of ``fd``; raises OSError if the kernel refuses it."""
        assert not self.inflight
        if fd != self._fd:  # the kernel only reads the iocb (and zeroes its key): fill it once
            cb = self._iocb
            ctypes.memset(ctypes.byref(cb), 0, ctypes.sizeof(cb))
            cb.aio_lio_opcode = IOCB_CMD_FDSYNC
            cb.aio_fildes = fd
            cb.aio_flags = IOCB_FLAG_RESFD
            cb.aio_resfd = self._efd
            self._fd = fd
        n = self._syscall(*self._submit_args)
        if n != 1:
            err = ctypes.get_errno()
            raise OSError(err, f"io_submit(fdatasync) failed: {os.strerror(err)}")
        self.inflight = True

    def probe(self, fd: int) -> bool:
        """Whether an fdatasync of ``fd`` goes through (some file systems refuse AIO fsync)."""
        try:
            self.submit(fd)
        except OSError:
            return False
        select.select([self._efd], [], [], 5.0)
        self.drain()
        return self.reap() == 0

    def reap(self) -> int | None:
        """The finished fdatasync's result (0, or -errno), or None if it is still running."""
        if not self.inflight:
            return None
        n = self._syscall(*self._reap_args)
        if n != 1:
            return None
        self.inflight = False
        return int(self._event.res)

    def drain(self) -> None:
        """Clear the eventfd's counter (call when it reads readable)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Wait for an fdatasync still running, then free the context and the eventfd."""
        if self._ctx:
            self._syscall(ctypes.c_long(self._n["io_destroy"]), ctypes.c_ulong(self._ctx))
            self._ctx = 0
            self.inflight = False
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1

