"""The exchange: engine core (sans-I/O), wire protocol, gateway and server.

The core modules, the gateway, two storage modules (audit, journal) and the simulation's
agents and budgets may be compiled with mypyc (``make``); a compiled module older than its source is stale, and the compiled
modules are then removed here before anything imports them, so an edited engine always runs as the code on disk says (as plain Python until
``make`` compiles it again).
"""

from __future__ import annotations

import os
from pathlib import Path


# The packages whose modules ``make`` may compile (``NATIVE_SRC`` in the Makefile).
_NATIVE_PACKAGES = ("exchange", "storage", "simulation")


def _drop_stale_native_modules() -> list[str]:
    """If any compiled module is older than its source, remove them all.

    All of them, not just the stale one: a mix of compiled and plain modules works but is
    slower than either. ``make`` compiles them again. ``storage`` and ``simulation``
    import ``exchange`` first, so checking every package here covers them all.
    """
    root = Path(__file__).resolve().parent.parent
    compiled = [p for pkg in _NATIVE_PACKAGES for p in (root / pkg).glob("*.so")]
    stale = []
    for path in compiled:
        source = path.parent / (path.name.split(".", 1)[0] + ".py")
        try:
            if source.exists() and source.stat().st_mtime > path.stat().st_mtime:
                stale.append(f"{path.parent.name}/{source.name}")
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
    """``EXCHANGE_PURE=1``: import the compiled packages' modules from their ``.py`` files
    even where compiled twins exist, so the test suite can check that both builds behave
    the same."""
    import importlib.machinery
    import sys

    root = Path(__file__).resolve().parent.parent
    finders = {
        pkg: importlib.machinery.FileFinder(
            str(root / pkg), (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
        )
        for pkg in _NATIVE_PACKAGES
    }

    class SourceFirst:
        @staticmethod
        def find_spec(name: str, path: object = None, target: object = None) -> object:
            pkg, _, rest = name.partition(".")
            if rest and "." not in rest and pkg in finders:
                return finders[pkg].find_spec(name)
            return None

    sys.meta_path.insert(0, SourceFirst)  # type: ignore[arg-type]


if os.environ.get("EXCHANGE_PURE"):
    _prefer_sources()


def native_modules() -> list[str]:
    """Which modules are running compiled (for logs and benchmarks)."""
    import importlib

    names = []
    for name in ("exchange.types", "exchange.markets", "exchange.book", "exchange.accounts",
                 "exchange.engine", "exchange.protocol", "exchange.state", "exchange.gateway",
                 "storage.audit", "storage.journal", "storage.tail", "simulation.agents", "simulation.budget", "simulation.embedded"):
        module = importlib.import_module(name)
        if not str(module.__file__).endswith(".py"):
            names.append(name.split(".", 1)[1])
    return names
