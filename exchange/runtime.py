"""Process-wide tuning shared by the server, the simulation and the benchmarks.

Not part of the engine (which must not care what process it runs in): these settings
change how CPython and glibc manage memory for a long-running, allocation-heavy process.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import sys
from typing import NoReturn

# Young-generation threshold: CPython's default (700) runs a collection every 700 container
# allocations; an order flow allocates several per order (order, reports, deltas, lists)
# and keeps the live book in the older generations, so the default spends about a fifth of
# the engine's time re-scanning. Measured in docs/performance.md.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Move start-up objects out of the collector's way and collect young objects in bulk."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def tune_malloc() -> bool:
    """Stop glibc from trimming and re-faulting the heap around the receive buffers.

    On these virtual machines a minor page fault costs microseconds; glibc's default trim
    threshold lets the heap shrink and grow again around large reads. Returns whether the
    settings were applied (False off glibc).
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_trim_threshold, 256 * 1024 * 1024)
        ok &= libc.mallopt(m_top_pad, 64 * 1024 * 1024)
        ok &= libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def install_event_loop_policy() -> str:
    """uvloop where it can be imported, the standard loop otherwise; returns which."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


class CommandLine(argparse.ArgumentParser):
    """The command-line parser of the three programs: a bad option is one line, not the
    usage block that would bury it (``--help`` still shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
