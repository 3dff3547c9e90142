"""One writer per data directory: an exclusive ``flock`` on ``<data_dir>/.lock``.

Why: a second exchange started on the same ``--data-dir`` (another port, another terminal)
would recover from the same files, then start its own journal over the first one's
segments and append to the same ledger, and the first exchange's acknowledged commands
would be gone. An embedded simulation pointed at the exchange's directory would rewrite
its ``trades.jsonl``. The kernel drops the lock when the holder exits, however it exits
(``kill -9`` included), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no locking, say so in the docs
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class DataDirBusy(Exception):
    """Another process holds the directory."""


class DataDirLock:
    """Held from ``acquire`` until ``release`` (or the process ends)."""

    def __init__(self, directory: str | Path, holder: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.holder = holder  # what to tell a second process: "exchange", "simulation"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``DataDirBusy`` naming who has it (pid and kind)."""
        if self._fd is not None or fcntl is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                who = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise DataDirBusy(
                f"the data directory {self.directory} is in use by {who}; one exchange (or "
                "embedded simulation) per data directory: stop it, or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.holder} (pid {os.getpid()})\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
