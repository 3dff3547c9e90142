"""The exchange: engine core (sans-I/O), wire protocol, gateway and server.

The core modules may be compiled with mypyc (``make``); a compiled module older than its
source is stale, and the compiled modules are then removed here before anything imports
them, so an edited engine always runs as the code on disk says (as plain Python until
``make`` compiles it again).
"""

from __future__ import annotations

import os
from pathlib import Path


def _drop_stale_native_modules() -> list[str]:
    """If any compiled core module is older than its source, remove them all.

    All of them, not just the stale one: a mix of compiled and plain modules works but is
    slower than either. ``make`` compiles them again.
    """
    here = Path(__file__).resolve().parent
    compiled = list(here.glob("*.so"))
    stale = []
    for path in compiled:
        source = here / (path.name.split(".", 1)[0] + ".py")
        try:
            if source.exists() and source.stat().st_mtime > path.stat().st_mtime:
                stale.append(source.name)
        except OSError:
            pass
    if stale:
        for path in compiled:
            try:
                path.unlink()
            except OSError:
                pass
    return stale


STALE_NATIVE_DROPPED = _drop_stale_native_modules()


def _prefer_sources() -> None:
    """``EXCHANGE_PURE=1``: import this package's modules from their ``.py`` files even where
    compiled twins exist, so the test suite can check that both builds behave the same."""
    import importlib.machinery
    import sys

    here = str(Path(__file__).resolve().parent)
    sources = importlib.machinery.FileFinder(
        here, (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
    )

    class SourceFirst:
        @staticmethod
        def find_spec(name: str, path: object = None, target: object = None) -> object:
            if name.startswith(__name__ + ".") and name.count(".") == 1:
                return sources.find_spec(name)
            return None

    sys.meta_path.insert(0, SourceFirst)  # type: ignore[arg-type]


if os.environ.get("EXCHANGE_PURE"):
    _prefer_sources()


def native_modules() -> list[str]:
    """Which core modules are running compiled (for logs and benchmarks)."""
    import importlib

    names = []
    for name in ("types", "markets", "book", "accounts", "engine", "protocol"):
        module = importlib.import_module(f"exchange.{name}")
        if not str(module.__file__).endswith(".py"):
            names.append(name)
    return names
