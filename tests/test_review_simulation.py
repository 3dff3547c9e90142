"""Review findings for the simulation, each pinned by a test that failed before its fix.

A zero-mean gamma latency crashed every agent; a slot the run quit on was never retried by
--resume; a resume forgot the budgets an earlier part had found depleted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulation.embedded import parse_latency

ROOT = Path(__file__).resolve().parent.parent
SIM = [sys.executable, str(ROOT / "run" / "start_simulation.py")]


def test_gamma_zero_mean_latency_rejected() -> None:
    with pytest.raises(ValueError):
        parse_latency("gamma:mean=0")


def _quit_then_resume(tmp_path: Path) -> tuple[dict, dict]:
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps({"schedule": {
        "accounts": ["a", "b"], "trades_per_account": 3,
        "funding": {"USD": "200", "BTC": "2"}, "backoff_base": 0.01, "max_retries": 1}}))
    data = tmp_path / "d"
    common = ["--embedded", "--data-dir", str(data), "--on-failure", "quit"]
    subprocess.run(SIM + ["--schedule", "--config", str(cfg)] + common, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=60, cwd=ROOT)
    (path,) = (data / "simulations").glob("*.json")
    first = json.loads(path.read_text())
    subprocess.run(SIM + ["--resume", path.stem] + common, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=60, cwd=ROOT)
    return first, json.loads(path.read_text())


def test_resume_after_quit_retries_the_quit_slot(tmp_path: Path) -> None:
    first, second = _quit_then_resume(tmp_path)
    assert first["status"] == "quit"
    quit_slot = first["position"]
    assert first["slots"][quit_slot]["attempts"] > 0
    # on resume the slot where the user quit must be attempted again
    assert second["slots"][quit_slot]["attempts"] > first["slots"][quit_slot]["attempts"]


def test_resume_keeps_depleted_history(tmp_path: Path) -> None:
    first, second = _quit_then_resume(tmp_path)
    assert first["depleted"]
    assert set(first["depleted"]) <= set(second["depleted"])


def test_a_non_positive_order_count_is_refused() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(root / "run" / "start_simulation.py"), "--embedded", "--orders", "-3"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "--orders must be a positive" in result.stderr
    assert "Traceback" not in result.stderr
