"""The house rules of ARCHITECTURE.md, checked by reading the imports of every module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ["exchange/types.py", "exchange/markets.py", "exchange/book.py", "exchange/accounts.py",
        "exchange/engine.py"]
# What the sans-I/O core may never import: I/O, clocks, randomness, concurrency, our shells.
FORBIDDEN_IN_CORE = {
    "asyncio", "socket", "time", "datetime", "random", "secrets", "os", "io", "pathlib",
    "threading", "subprocess", "logging", "uvloop", "aiofiles", "storage", "client",
    "simulation", "exchange.gateway", "exchange.server", "exchange.protocol", "exchange.runtime",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def reaches(name: str, forbidden: set[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


def test_the_engine_core_does_no_io_and_reads_no_clock() -> None:
    markets_may_read_files = {"exchange/markets.py": {"pathlib"}}
    for rel in CORE:
        allowed = markets_may_read_files.get(rel, set())
        bad = {n for n in imports_of(ROOT / rel) if reaches(n, FORBIDDEN_IN_CORE - allowed)}
        assert not bad, f"{rel} imports {sorted(bad)}: the core must stay sans-I/O"


def test_the_engine_draws_no_randomness_and_iterates_no_sets() -> None:
    for rel in ["exchange/engine.py", "exchange/book.py", "exchange/accounts.py"]:
        source = (ROOT / rel).read_text(encoding="utf-8")
        assert "import random" not in source and "time.time" not in source, rel


def test_client_and_simulation_never_reach_into_the_engine() -> None:
    for folder in ("client", "simulation"):
        for path in (ROOT / folder).rglob("*.py"):
            bad = {n for n in imports_of(path) if reaches(n, {"exchange.engine", "exchange.book", "exchange.accounts", "exchange.gateway"})}
            if folder == "simulation" and path.name.startswith("embedded"):
                bad.discard("exchange.engine")  # the embedded gateway hosts the engine in-process
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_storage_knows_files_not_trading_rules() -> None:
    for path in (ROOT / "storage").rglob("*.py"):
        bad = {n for n in imports_of(path) if reaches(n, {"exchange.gateway", "client", "simulation"})}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
