"""Adversarial tests of run/start_simulation.py: real subprocesses, a real engine on an
ephemeral port, temporary data directories, every wait bounded.

Each test pins one defect a user would hit; see the report that came with this file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

from process_helpers import signal_group

ROOT = Path(__file__).resolve().parents[1]
SIM = str(ROOT / "run" / "start_simulation.py")
ENGINE = str(ROOT / "run" / "start_engine.py")
LISTENING = re.compile(r"Exchange listening on (\S+):(\d+)")
ENV = {**os.environ, "EXCHANGE_PURE": "1"}


def sim(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, SIM, *args], cwd=ROOT, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]


def start_engine(data: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, ENGINE, "--port", "0", "--data-dir", str(data),
                             "--log-level", "WARNING", *extra], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            break
    match = LISTENING.search(line)
    assert match, f"unexpected first line {line!r}"
    return proc, int(match.group(2))


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    data = tmp_path / "engine-data"
    proc, port = start_engine(data)
    try:
        yield proc, port, data
    finally:
        stop(proc)


def wait_for(pred, timeout: float = 30.0, step: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise AssertionError("condition not reached in time")


def saved(data_dir: Path, run_id: str) -> dict:  # type: ignore[type-arg]
    """The run as saved: its file and the slot log after it (``RunStore``)."""
    from simulation.scheduler import RunStore

    return RunStore(data_dir / "simulations").load(run_id).to_dict()


def run_id_of(first_line: str) -> str:
    match = re.search(r"scheduled run (\S+):", first_line)
    assert match, first_line
    return match.group(1)


def scheduled_run_under_way(args: list[str], data: Path, position: int,
                            **popen: Any) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    """A scheduled run started with ``args`` (data in ``data``), once it has saved
    ``position`` slots: the process and the run's id."""
    run = subprocess.Popen([sys.executable, SIM, "--data-dir", str(data), "--schedule", *args], cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        assert run.stdout is not None
        run_id = run_id_of(run.stdout.readline())
        wait_for(lambda: (data / "simulations" / f"{run_id}.json").exists()
                 and saved(data, run_id)["position"] >= position)
    except BaseException:
        run.kill()
        run.wait(10)
        raise
    return run, run_id


def test_two_concurrent_resumes_of_one_run_are_refused(engine, tmp_path: Path) -> None:
    """Two ``--resume <id>`` of the same run at once would send its orders twice: one runs, the
    other is refused."""
    _, port, _ = engine
    data = tmp_path / "runs"
    cfg = tmp_path / "sched.json"
    cfg.write_text(json.dumps({"schedule": {"accounts": ["cc-a", "cc-b"], "trades_per_account": 60}}))
    base = [sys.executable, SIM, "--port", str(port), "--data-dir", str(data), "--on-failure", "quit"]
    first = subprocess.Popen(base + ["--schedule", "--config", str(cfg)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout is not None
    run_id = run_id_of(first.stdout.readline())
    wait_for(lambda: (data / "simulations" / f"{run_id}.json").exists()
             and saved(data, run_id)["position"] >= 4)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=30)
    assert first.returncode == 130
    position = saved(data, run_id)["position"]
    assert position < 120

    a = subprocess.Popen(base + ["--resume", run_id], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(base + ["--resume", run_id], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out_a, err_a = a.communicate(timeout=90)
        out_b, err_b = b.communicate(timeout=90)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert "Traceback" not in err_a + err_b, (err_a + err_b)[-1500:]
    # Exactly one of them runs the slots; the other is refused while it runs (or, if it
    # came only after the first had finished, finds the run complete and sends nothing).
    assert (out_a + out_b).count("resuming scheduled run") == 1, (out_a[-400:], out_b[-400:])
    other_out, other_err, other_code = (out_b, err_b, b.returncode) if "resuming" in out_a else (out_a, err_a, a.returncode)
    assert (other_code != 0 and "error:" in other_err) or "already complete" in other_out, (other_code, other_err[-400:])


def test_scheduled_run_that_loses_the_exchange_stops_resumable(tmp_path: Path) -> None:
    """When the exchange goes away, the run stops (exit non-zero) with its remaining slots still
    to do for a resume, instead of retrying them on a dead connection and skipping them all."""
    proc, port = start_engine(tmp_path / "engine-data")
    data = tmp_path / "runs"
    cfg = tmp_path / "sched.json"
    cfg.write_text(json.dumps({"schedule": {
        "accounts": ["lost-a", "lost-b"], "trades_per_account": 20,
        "backoff_base": 0.001, "backoff_max": 0.002, "max_retries": 1}}))
    run, run_id = scheduled_run_under_way(["--port", str(port), "--config", str(cfg)], data, 2)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        out, err = run.communicate(timeout=90)
    finally:
        stop(proc)
        if run.poll() is None:
            run.kill()
            run.wait(10)
    state = saved(data, run_id)
    statuses = Counter(s["status"] for s in state["slots"])
    assert "Traceback" not in err, err[-1500:]
    assert run.returncode != 0, out[-600:]
    assert state["status"] != "completed", statuses
    # Slots not attempted because the exchange is gone stay to do for a resume.
    assert statuses["skipped"] <= 2, statuses


def _embedded_two_account_plan(tmp_path: Path) -> tuple[str, Path, Path, Path]:
    """A finished one-pair embedded scheduled run: (its id, its state file, the config, the data dir)."""
    data = tmp_path / "runs"
    cfg = tmp_path / "sched.json"
    cfg.write_text(json.dumps({"embedded": True, "schedule": {
        "accounts": ["em-a", "em-b"], "trades_per_account": 1}}))
    first = sim("--schedule", "--config", str(cfg), "--data-dir", str(data))
    assert first.returncode == 0, first.stderr
    run_id = run_id_of(first.stdout.splitlines()[0])
    return run_id, data / "simulations" / f"{run_id}.json", cfg, data


def _resume_as_saved(run_id: str, path: Path, cfg: Path, data: Path, state: dict, position: int,  # type: ignore[type-arg]
                     completed: int, attempts: int) -> dict:  # type: ignore[type-arg]
    """Write ``state`` as an interrupted run at ``position``, resume it, return what it saved."""
    state.update(status="interrupted", position=position, finished_at=None)
    state["stats"] = {"completed": completed, "failed": 0, "skipped": 0, "retries": 0, "attempts": attempts}
    path.write_text(json.dumps(state))
    resumed = sim("--resume", run_id, "--config", str(cfg), "--data-dir", str(data))
    no_traceback(resumed)
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _unsent(slot: dict) -> None:  # type: ignore[type-arg]
    slot.update(status="pending", attempts=0, order_id=None, filled_qty=None, error=None,
                started_at=None, finished_at=None)


def test_embedded_resume_between_maker_and_taker_completes_the_pair(tmp_path: Path) -> None:
    """An embedded scheduled run stopped between a pair's maker and taker resumes on a fresh
    in-process exchange, where the maker's order is gone: the pair starts again and trades."""
    run_id, path, cfg, data = _embedded_two_account_plan(tmp_path)
    state = json.loads(path.read_text())
    # What SlotProcessor.execute saves when interrupted after slot 0 (the maker) completed.
    _unsent(state["slots"][1])
    after = _resume_as_saved(run_id, path, cfg, data, state, position=1, completed=1, attempts=1)
    assert after["slots"][1]["status"] == "completed", after["slots"][1]


def test_embedded_resume_of_an_acknowledged_maker_sends_it_again(tmp_path: Path) -> None:
    """A maker saved in progress with its order id (acknowledged, then interrupted) rested on
    the interrupted run's exchange: an embedded resume starts a fresh one, so the maker must
    run again, or its taker finds nothing to cross."""
    run_id, path, cfg, data = _embedded_two_account_plan(tmp_path)
    state = json.loads(path.read_text())
    for slot in state["slots"]:
        _unsent(slot)
    state["slots"][0].update(status="in_progress", attempts=1, order_id=1)
    after = _resume_as_saved(run_id, path, cfg, data, state, position=0, completed=0, attempts=1)
    assert [s["status"] for s in after["slots"]] == ["completed"] * len(after["slots"]), after["slots"]


def test_a_resume_goes_on_in_the_mode_the_run_started_in(tmp_path: Path) -> None:
    """An embedded run resumed without ``--embedded`` (as the Ctrl-C hint said) used to go to
    whatever exchange listened on the default port, or fail to reach one; a TCP run resumed
    with ``--embedded`` would go on in a fresh in-process exchange."""
    run_id, path, _cfg, data = _embedded_two_account_plan(tmp_path)
    state = json.loads(path.read_text())
    assert state["mode"] == "embedded"
    for slot in state["slots"]:
        _unsent(slot)
    state.update(status="interrupted", position=0, finished_at=None)
    state["stats"] = {"completed": 0, "failed": 0, "skipped": 0, "retries": 0, "attempts": 0}
    path.write_text(json.dumps(state))
    resumed = sim("--resume", run_id, "--data-dir", str(data), "--port", "1")  # no exchange there
    no_traceback(resumed)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads(path.read_text())["status"] == "completed"

    state.update(status="interrupted", position=0)
    path.write_text(json.dumps(state))
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"token": "x"}))  # would have skipped funding the fresh exchange
    refused = sim("--resume", run_id, "--data-dir", str(data), "--credentials", str(creds))
    no_traceback(refused)
    assert refused.returncode == 2 and "runs embedded: --credentials applies to TCP runs" in refused.stderr

    state.update(mode="tcp")
    path.write_text(json.dumps(state))
    refused = sim("--resume", run_id, "--data-dir", str(data), "--embedded")
    no_traceback(refused)
    assert refused.returncode == 2 and "started against an exchange over TCP" in refused.stderr


def test_scheduled_runs_in_a_data_dir_that_is_a_file_are_refused_clearly(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    result = sim("--schedule", "--embedded", "--data-dir", str(afile))
    no_traceback(result)
    assert result.returncode == 2 and "cannot keep scheduled runs in" in result.stderr


@pytest.mark.parametrize("spec", ["gamma:mean=1ms,shape=nan", "gamma:mean=1ms,shape=inf"])
def test_gamma_latency_with_non_finite_shape_is_refused(tmp_path: Path, spec: str) -> None:
    """``shape=nan`` or ``shape=inf`` is refused (NaN passes ``shape <= 0``, and
    ``random.gammavariate`` would never return)."""
    try:
        proc = sim("--embedded", "--orders", "20", "--no-progress", "--latency", spec,
                   "--data-dir", str(tmp_path / "d"), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"--latency {spec} hangs the run")
    assert proc.returncode == 2 and "error:" in proc.stderr, proc.stderr[-800:]


BAD_CONFIGS = {
    "agents_list": {"agents": ["random"]},
    "agents_count_text": {"agents": {"random": "x"}},
    "rate_text": {"rate": "fast"},
    "duration_text": {"duration": "abc"},
    "funding_not_object": {"funding": {"random": "lots"}},
    "latency_number": {"latency": 5},
    "data_dir_number": {"data_dir": 5},
    "twap_window_text": {"params": {"twap": {"window": "x"}}},
    "twap_unknown_market": {"params": {"twap": {"market": "XYZ-USD"}}},
    "passive_cap_text": {"params": {"passive": {"price_cap": "abc"}}},
    "twap_sideways": {"params": {"twap": {"side": "sideways"}}},  # it bought
    "twap_negative_qty": {"params": {"twap": {"qty_lots": -5}}},
    "twap_no_slices": {"params": {"twap": {"slices": 0}}},
    "twap_no_window": {"params": {"twap": {"window": 0}}},
    "mm_negative_spread": {"params": {"mm": {"spread_bps": -50}}},
    "mm_misspelt_param": {"params": {"mm": {"spred_bps": 10}}},  # ignored, silently
    "random_ratio_above_one": {"params": {"random": {"cancel_ratio": 2}}},
    "random_offset_none": {"params": {"random": {"max_offset_bps": None}}},
    "random_offset_fraction": {"params": {"random": {"max_offset_bps": 12.5}}},  # a TypeError mid-run
    "profile_sizes_reversed": {"profiles": {"BTC-USD": {"qty_min": "0.5", "qty_max": "0.1"}}},
    "schedule_not_object": {"schedule": "x"},
    "markets_a_string": {"markets": "BTC-USD"},
    "markets_empty": {"markets": []},
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_values_give_a_clear_error(tmp_path: Path, name: str) -> None:
    """A --config value of the wrong type gets one ``error:`` line and exit code 2, not a
    Python traceback."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"embedded": True, "orders": 20, **BAD_CONFIGS[name]}))
    args = ["--config", str(cfg), "--no-progress", "--data-dir", str(tmp_path / "d")]
    if name == "schedule_not_object":
        args.append("--schedule")
    proc = sim(*args)
    no_traceback(proc)
    assert proc.returncode == 2 and "error:" in proc.stderr, (proc.returncode, proc.stderr[-800:])


BAD_SCHEDULES = {
    "trades_per_account_text": {"trades_per_account": "4"},
    "amount_range_text": {"amount_range": "x"},
    "no_markets": {"markets": []},
    "funding_not_a_number": {"funding": {"USD": "abc"}},
    "accounts_is_a_string": {"accounts": "alice"},  # silently becomes accounts a, l, i, c, e
    "same_account_twice": {"accounts": ["solo", "solo"]},  # an account cannot cross itself
    "prices_below_zero": {"price_offsets": ["-50000", "-40000"]},  # all traded at 0.01
}


@pytest.mark.parametrize("name", sorted(BAD_SCHEDULES))
def test_bad_schedule_values_give_a_clear_error(tmp_path: Path, name: str) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"embedded": True, "schedule": BAD_SCHEDULES[name]}))
    proc = sim("--schedule", "--config", str(cfg), "--data-dir", str(tmp_path / "d"))
    no_traceback(proc)
    assert proc.returncode == 2 and "error:" in proc.stderr, (proc.returncode, proc.stdout[-600:])


def test_a_schedule_whose_every_slot_was_skipped_is_not_reported_a_success(tmp_path: Path) -> None:
    """Funding too small for any slot: every slot is skipped for budget. The run went through
    its plan, so it is not resumable, but it did nothing: exit 1 with a word, not 0."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"embedded": True, "schedule": {
        "accounts": ["p-a", "p-b"], "trades_per_account": 2, "funding": {"USD": "10"}}}))
    proc = sim("--schedule", "--config", str(cfg), "--data-dir", str(tmp_path / "d"))
    no_traceback(proc)
    assert proc.returncode == 1, proc.stdout[-600:]
    assert "no slot completed" in proc.stderr, proc.stderr


@pytest.mark.parametrize("orders", [0, -5, "10"])
def test_config_orders_the_command_line_refuses_are_refused_in_the_file(tmp_path: Path, orders: object) -> None:
    """Orders the command line refuses (0, negative, text) are refused in the file too."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"embedded": True, "orders": orders}))
    proc = sim("--config", str(cfg), "--no-progress", "--data-dir", str(tmp_path / "d"), timeout=60)
    no_traceback(proc)
    assert proc.returncode == 2 and "orders" in proc.stderr, (proc.returncode, proc.stdout[:300])


def test_scheduled_embedded_run_with_bad_latency_is_a_clear_error(tmp_path: Path) -> None:
    """A scheduled embedded run refuses ``--latency fixed:abc`` as an agent run does."""
    proc = sim("--embedded", "--schedule", "--latency", "fixed:abc", "--data-dir", str(tmp_path / "d"))
    no_traceback(proc)
    assert proc.returncode == 2 and "not a duration" in proc.stderr


def test_scheduled_tcp_run_refused_login_is_a_clear_error(tmp_path: Path) -> None:
    """Against an exchange in keys mode a scheduled run says its sessions were refused, as an
    agent run does, instead of a GatewayError traceback."""
    token_hash = subprocess.run([sys.executable, ENGINE, "--hash-token", "s3cret"], cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=30).stdout.strip()
    accounts = tmp_path / "accounts.json"
    accounts.write_text(json.dumps({"users": {"alice": {"token_hash": token_hash}}}))
    proc, port = start_engine(tmp_path / "engine-data", "--auth", "keys", "--accounts", str(accounts))
    try:
        run = sim("--port", str(port), "--schedule", "--data-dir", str(tmp_path / "runs"))
    finally:
        stop(proc)
    no_traceback(run)
    assert run.returncode == 2 and "error:" in run.stderr


@pytest.mark.parametrize("flag,name", [("--report", "nodir/r.json"), ("--report", "."),
                                       ("--plot", "nodir/p.png"), ("--plot", "p.txt")])
def test_report_and_plot_that_cannot_be_written_do_not_lose_the_run(tmp_path: Path, flag: str, name: str) -> None:
    """A --report or --plot that cannot be written (a missing or blocked directory, a directory,
    an unknown image type) costs that file, never the run's printed report."""
    blocker = tmp_path / "nodir"
    blocker.write_text("a file where a directory is expected")
    target = tmp_path if name == "." else tmp_path / name
    proc = sim("--embedded", "--orders", "50", "--no-progress", "--data-dir", str(tmp_path / "d"),
               flag, str(target))
    no_traceback(proc)
    assert "Simulation (embedded)" in proc.stdout or proc.returncode == 2, proc.stdout[:200]


@pytest.mark.parametrize("content", ["{}", '{"id": "x", "config": {}, "slots": [], "extra": 1}', "[1]",
                                     '{"id": "x", "config": {}, "slots": [{"index": 0}]}'])
def test_resume_of_a_corrupt_state_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    folder = tmp_path / "d" / "simulations"
    folder.mkdir(parents=True)
    (folder / "bad.json").write_text(content)
    proc = sim("--embedded", "--resume", "bad", "--data-dir", str(tmp_path / "d"))
    no_traceback(proc)
    assert proc.returncode == 2 and "bad" in proc.stderr


def test_list_survives_corrupt_state_files(tmp_path: Path) -> None:
    """Damaged files in the runs folder (wrong field types, a directory named *.json) are
    skipped with a note; --list still shows every good run."""
    data = tmp_path / "d"
    good = sim("--embedded", "--schedule", "--data-dir", str(data))
    assert good.returncode == 0, good.stderr
    run_id = run_id_of(good.stdout.splitlines()[0])
    folder = data / "simulations"
    state = json.loads((folder / f"{run_id}.json").read_text())
    (folder / "zz-config-list.json").write_text(json.dumps({**state, "id": "zz-config-list", "config": []}))
    (folder / "zz-no-stats.json").write_text(json.dumps({**state, "id": "zz-no-stats", "stats": {}}))
    (folder / "zz-dir.json").mkdir()
    proc = sim("--list", "--data-dir", str(data))
    no_traceback(proc)
    assert proc.returncode == 0 and run_id in proc.stdout


def test_list_shows_a_run_whose_process_was_killed_as_interrupted(tmp_path: Path) -> None:
    """A kill -9 leaves the file saying "running"; nobody holds the run's lock any more."""
    from simulation.scheduler import RunStore

    data = tmp_path / "d"
    good = sim("--embedded", "--schedule", "--data-dir", str(data))
    run_id = run_id_of(good.stdout.splitlines()[0])
    path = data / "simulations" / f"{run_id}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "running"}))
    line = next(l for l in sim("--list", "--data-dir", str(data)).stdout.splitlines() if run_id in l)
    assert line.split()[1] == "interrupted", line
    store = RunStore(data / "simulations")
    held = store.lock(run_id)  # as a live run holds it
    try:
        line = next(l for l in sim("--list", "--data-dir", str(data)).stdout.splitlines() if run_id in l)
        assert line.split()[1] == "running", line
    finally:
        store.release(held)


def test_tcp_run_that_loses_the_exchange_exits_nonzero(tmp_path: Path) -> None:
    """The exchange stops 1.5 s into a 20 s run: every agent loses its connection, and the
    run's exit code says so (the report is still printed)."""
    proc, port = start_engine(tmp_path / "engine-data")
    run = subprocess.Popen([sys.executable, SIM, "--port", str(port), "--duration", "20s",
                            "--agents", "random=3,mm=1", "--rate", "100", "--no-progress"],
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        out, err = run.communicate(timeout=60)
    finally:
        stop(proc)
        if run.poll() is None:
            run.kill()
            run.wait(10)
    assert "Traceback" not in err, err[-1500:]
    assert run.returncode != 0, out[:300]


def test_embedded_run_whose_funding_is_refused_is_an_error(tmp_path: Path) -> None:
    """Funding the exchange refuses stops an embedded run with 'funding the agents failed'
    (exit 2), as over TCP."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"embedded": True, "orders": 20,
                               "funding": {"random": {"USD": "-5"}}}))
    proc = sim("--config", str(cfg), "--no-progress", "--data-dir", str(tmp_path / "d"))
    no_traceback(proc)
    assert proc.returncode == 2 and "funding" in proc.stderr, (proc.returncode, proc.stdout[:300])


def test_embedded_run_without_agents_is_refused_like_tcp(tmp_path: Path) -> None:
    """No agents: 'no agents to run' (exit 2), embedded as over TCP."""
    proc = sim("--embedded", "--agents", "random=0,mm=0,twap=0,passive=0", "--no-progress",
               "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2 and "no agents" in proc.stderr, proc.stdout[:200]


@pytest.mark.parametrize("rate", ["nan", "inf"])
def test_non_finite_rate_is_refused(tmp_path: Path, rate: str) -> None:
    """``--rate nan`` and ``--rate inf`` are refused (NaN passes ``rate <= 0``)."""
    proc = sim("--embedded", "--orders", "20", "--no-progress", "--rate", rate,
               "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2 and "rate" in proc.stderr


def test_resuming_a_completed_run_says_so_and_changes_nothing(tmp_path: Path) -> None:
    """``--resume`` of a finished run says it is complete and touches neither its state nor
    its ledger."""
    data = tmp_path / "d"
    first = sim("--embedded", "--schedule", "--data-dir", str(data))
    assert first.returncode == 0
    run_id = run_id_of(first.stdout.splitlines()[0])
    before = saved(data, run_id)
    ledger = (data / "trades.jsonl").read_bytes()
    time.sleep(1.1)
    again = sim("--embedded", "--resume", run_id, "--data-dir", str(data))
    after = saved(data, run_id)
    assert after["finished_at"] == before["finished_at"]
    assert (data / "trades.jsonl").read_bytes() == ledger
    assert "already" in (again.stdout + again.stderr)


def broken_sim(tmp_path: Path, method: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The simulation with ``Class.method`` of one agent kind raising TypeError (the plain
    modules, ``EXCHANGE_PURE``: a compiled class cannot be patched). Bad parameters used to
    do this; they are refused before the run now."""
    cls, name = method.split(".")
    script = tmp_path / "broken_sim.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from simulation import agents\n"
        "async def _broken(self, *args):\n    raise TypeError('a broken agent, on purpose')\n"
        f"setattr(agents.{cls}, {name!r}, _broken)\n"
        "from simulation.runner import main\nsys.exit(main())\n")
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=60)


def test_an_embedded_run_stops_when_an_agent_breaks_and_names_it(tmp_path: Path) -> None:
    """Every random trader raises on its first step. With ``--orders`` the others never
    reach the count, and the run went on in simulated time for good; now it stops at the
    first failure, and the report names the agent (not its coroutine, ``Agent.run``)."""
    proc = broken_sim(tmp_path, "RandomTrader.step", "--embedded", "--orders", "500", "--no-progress",
                      "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(r"TypeError\(.*\): random01$", proc.stdout, re.M), proc.stdout[-1500:]
    assert "the run stopped early: 1 of 24 agents failed" in proc.stderr and "Traceback" not in proc.stderr
    assert "Simulation (embedded) stopped early (an agent failed)" in proc.stdout


def test_a_broken_agent_stops_a_seeded_run_at_the_same_place_with_or_without_a_plot(tmp_path: Path) -> None:
    """The stop is checked right after the failing step, not at the progress samples (every
    4,096 steps, or 256 with ``--plot``): the same seed gives the same ledger either way."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"params": {"twap": {"window": 5}}}))
    ledgers = []
    for name, extra in (("a", []), ("b", ["--plot", str(tmp_path / "p.png")])):
        proc = broken_sim(tmp_path, "TwapExecutor._catch_up", "--embedded", "--duration", "20s",
                          "--latency", "gamma:mean=5ms", "--no-progress",
                          "--config", str(config), "--data-dir", str(tmp_path / name), *extra)
        assert proc.returncode == 1 and "stopped early (an agent failed)" in proc.stdout, proc.stderr[-1500:]
        assert "twap01" in proc.stdout
        ledgers.append((tmp_path / name / "trades.jsonl").read_bytes())
    assert ledgers[0] == ledgers[1]


def test_reports_still_on_their_way_at_the_end_are_counted(tmp_path: Path) -> None:
    """With a latency model the last fills reach the agents after the run's end: the
    report counts them, so its trades equal the ledger's lines."""
    report_file = tmp_path / "r.json"
    proc = sim("--embedded", "--duration", "5s", "--latency", "gamma:mean=50ms,shape=0.05", "--no-progress",
               "--data-dir", str(tmp_path / "d"), "--report", str(report_file))
    assert proc.returncode == 0, proc.stderr[-1500:]
    report = json.loads(report_file.read_text())
    lines = (tmp_path / "d" / "trades.jsonl").read_text().splitlines()
    assert report["trades"] == len(lines) > 0


def _exchange_stats(port: int) -> dict:  # type: ignore[type-arg]
    import asyncio

    from client import ExchangeClient

    async def ask() -> dict:  # type: ignore[type-arg]
        async with ExchangeClient("127.0.0.1", port, timeout=10) as client:
            await client.login("stats-peek")
            return await client.stats()

    return asyncio.run(ask())


def test_a_rate_limited_exchange_gets_every_order_accounted_for_and_nothing_left_resting(tmp_path: Path) -> None:
    """Against --rate-limit, refused orders are counted as sent with an outcome of their own,
    the agents back off, and the final cancels are retried until they get through."""
    proc, port = start_engine(tmp_path / "engine-data", "--rate-limit", "20")
    report_file = tmp_path / "r.json"
    try:
        run = sim("--port", str(port), "--duration", "3s", "--agents", "random=4,mm=1", "--rate", "400",
                  "--no-progress", "--data-dir", str(tmp_path / "d"), "--report", str(report_file))
        no_traceback(run)
        assert run.returncode == 0, run.stderr[-1500:]
        report = json.loads(report_file.read_text())
        assert report["outcomes"].get("error:rate_limited", 0) > 0, report["outcomes"]
        assert sum(report["outcomes"].values()) == report["orders_sent"]
        assert report["left_resting"] == 0
        assert _exchange_stats(port)["open_orders"] == 0
    finally:
        stop(proc)


def test_a_frozen_exchange_and_two_ctrl_c_end_the_run_with_its_report(tmp_path: Path) -> None:
    """The exchange stops answering (SIGSTOP); the first Ctrl-C stops the agents, the
    second skips the final cancels: the report comes out, says orders were left, exit 130."""
    proc, port = start_engine(tmp_path / "engine-data")
    run = subprocess.Popen([sys.executable, SIM, "--port", str(port), "--duration", "60s",
                            "--agents", "random=4", "--rate", "200", "--no-progress",
                            "--data-dir", str(tmp_path / "d")],
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        started = time.monotonic()
        run.send_signal(signal.SIGINT)
        time.sleep(1)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGCONT)
        stop(proc)
        if run.poll() is None:
            run.kill()
            run.wait(10)
    assert "Traceback" not in err, err[-1500:]
    assert run.returncode == 130, (out[-800:], err[-800:])
    assert "Simulation (tcp) interrupted" in out
    assert took < 20, took  # the agents' 5 s, not a 10 s timeout per request
    if "left resting" in out:
        assert "the cancels were cut short" in out


def test_embedded_orders_still_on_their_way_at_the_end_are_cancelled(tmp_path: Path) -> None:
    """With a latency model, orders sent just before the end land after it: the agents ask
    the exchange what is open, so nothing stays resting and every order has an outcome."""
    from simulation.runner import SimConfig, run_embedded

    cfg = SimConfig(embedded=True, latency="fixed:200ms", duration_s=5.0, orders=None,
                    data_dir=tmp_path / "d", progress=False)
    out: dict = {}  # type: ignore[type-arg]
    report = run_embedded(cfg, stream=None, out=out)
    engine = out["exchange"].engine
    assert [o for a in out["agents"] for o in engine.open_orders(a.name, None)] == []
    assert sum(report["outcomes"].values()) == report["orders_sent"]
    assert report["left_resting"] == 0


def test_an_embedded_run_whose_agents_cannot_pay_for_any_order_stops(tmp_path: Path) -> None:
    """Under --orders, agents that skip every order for budget would run simulated time on
    for good: the run stops, says why, and exits non-zero."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"funding": {k: {"USD": "10"} for k in ("random", "mm", "twap", "passive")}}))
    proc = sim("--embedded", "--orders", "1000", "--config", str(config), "--no-progress",
               "--data-dir", str(tmp_path / "d"), timeout=120)
    no_traceback(proc)
    assert proc.returncode == 1, proc.stdout[:500]
    assert "stopped early (no order for 60 s: the agents' budgets cannot pay for any)" in proc.stdout
    assert "error: the run stopped early: no order for 60 s" in proc.stderr


@pytest.mark.parametrize("agents", ["passive=1", "mm=1"])
def test_an_embedded_run_whose_agents_have_nothing_more_to_do_stops(tmp_path: Path, agents: str) -> None:
    """A passive buyer (or a market maker) alone on a book nobody else trades sends a few
    orders and then waits for a market that never moves: under --orders the run went on in
    simulated time for good."""
    proc = sim("--embedded", "--orders", "50", "--agents", agents, "--no-progress",
               "--data-dir", str(tmp_path / "d"), timeout=120)
    no_traceback(proc)
    assert proc.returncode == 1, proc.stdout[-500:]
    assert re.search(r"error: the run stopped early: no order for 60 s after \d+ of 50: the agents "
                     r"have nothing more to do", proc.stderr), proc.stderr


def test_a_tcp_run_whose_agents_all_finish_short_of_its_orders_says_so(tmp_path: Path) -> None:
    """A TWAP alone that finds no asks ends its window having sent nothing: the run ended
    with "finished: 0 orders" and exit 0, as if it had done what --orders asked."""
    proc, port = start_engine(tmp_path / "engine-data")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"params": {"twap": {"window": 1.0, "slices": 2}}}))
    try:
        run = sim("--port", str(port), "--orders", "50", "--agents", "twap=1", "--config", str(config),
                  "--no-progress", "--data-dir", str(tmp_path / "d"), "--report", str(tmp_path / "r.json"))
    finally:
        stop(proc)
    no_traceback(run)
    assert run.returncode == 1, run.stdout[-500:]
    assert "every agent finished after 0 of 50 orders" in run.stderr
    assert json.loads((tmp_path / "r.json").read_text())["stopped_early"].startswith("every agent finished")


def test_funding_in_an_asset_the_markets_lack_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"funding": {"random": {"XYZ": "5"}}}))
    proc = sim("--embedded", "--orders", "100", "--config", str(config), "--no-progress",
               "--data-dir", str(tmp_path / "d"))
    no_traceback(proc)
    assert proc.returncode == 2
    assert "funding for random: the markets have no asset 'XYZ' (they have ACME, BTC, USD)" in proc.stderr


def test_a_data_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    proc = sim("--embedded", "--orders", "100", "--no-progress", "--data-dir", str(target))
    no_traceback(proc)
    assert proc.returncode == 2
    assert f"cannot use {target} as the data directory: a part of that path is a file" in proc.stderr


def test_a_plot_named_without_an_extension_is_written_and_named_as_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    proc = sim("--embedded", "--orders", "300", "--no-progress", "--data-dir", str(tmp_path / "d"),
               "--plot", str(tmp_path / "chart"))
    assert proc.returncode == 0, proc.stderr[-800:]
    assert (tmp_path / "chart.png").is_file()
    assert f"plot: {tmp_path / 'chart.png'}" in proc.stdout


def test_a_markets_file_with_assets_the_built_in_funding_lacks_still_trades(tmp_path: Path) -> None:
    """The built-in funding names USD, BTC and ACME; agents of an ETH-USD market are given
    ETH too (worth half their USD at the starting mid), so both sides trade."""
    from simulation.runner import SimConfig, default_funding, market_config, profiles_for, run_embedded

    markets = tmp_path / "m.json"
    markets.write_text(json.dumps({
        "assets": {"USD": 6, "ETH": 4},
        "markets": [{"symbol": "ETH-USD", "base": "ETH", "quote": "USD", "tick_size": "0.01",
                     "lot_size": "0.001", "min_qty": "0.001", "price_band": "0.10",
                     "reference_price": "2000.00"}],
    }))
    cfg = SimConfig(embedded=True, orders=2000, duration_s=None, markets_file=markets,
                    data_dir=tmp_path / "d", progress=False)
    config = market_config(cfg)
    assert default_funding("random", config, profiles_for(cfg, config)) == {"USD": "100000", "ETH": "25.0000"}
    report = run_embedded(cfg, stream=None)
    assert report["markets"]["ETH-USD"]["trades"] > 100
    assert not any(k.startswith("rejected:price_out_of_band") for k in report["outcomes"]), report["outcomes"]


def test_a_stalled_seeded_run_stops_at_the_same_point_with_or_without_a_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"funding": {k: {"USD": "10"} for k in ("random", "mm", "twap", "passive")}}))
    reports = []
    for plot in (False, True):
        report_file = tmp_path / f"r{plot}.json"
        args = ["--embedded", "--orders", "1000", "--config", str(config), "--no-progress",
                "--data-dir", str(tmp_path / f"d{plot}"), "--report", str(report_file)]
        if plot:
            args += ["--plot", str(tmp_path / "p.png")]
        proc = sim(*args, timeout=120)
        assert proc.returncode == 1, proc.stderr[-500:]
        reports.append(json.loads(report_file.read_text()))
    assert reports[0]["simulated_s"] == reports[1]["simulated_s"]
    assert reports[0]["skipped_for_budget"] == reports[1]["skipped_for_budget"]


def test_a_run_starts_and_ends_against_a_two_requests_a_second_limit(tmp_path: Path) -> None:
    """Funding, the books and the mirror's subscriptions wait the limit out instead of
    failing the run's start."""
    proc, port = start_engine(tmp_path / "engine-data", "--rate-limit", "2")
    report_file = tmp_path / "r.json"
    try:
        run = sim("--port", str(port), "--duration", "2s", "--agents", "random=2,mm=1", "--no-progress",
                  "--data-dir", str(tmp_path / "d"), "--report", str(report_file))
    finally:
        stop(proc)
    no_traceback(run)
    assert run.returncode == 0, run.stderr[-1500:]
    report = json.loads(report_file.read_text())
    assert sum(report["outcomes"].values()) == report["orders_sent"] > 0


def test_a_scheduled_run_stopped_by_sigterm_is_saved_and_says_how_to_resume(tmp_path: Path) -> None:
    """``kill`` (SIGTERM) stops a scheduled run the way Ctrl-C does: saved, the resume
    options told, exit code 143; it used to die mid-slot without a word."""
    data = tmp_path / "runs"
    cfg = tmp_path / "sched.json"
    cfg.write_text(json.dumps({"schedule": {"trades_per_account": 500}}))
    base = [sys.executable, SIM, "--embedded", "--data-dir", str(data)]
    run, run_id = scheduled_run_under_way(["--embedded", "--config", str(cfg)], data, 4)
    try:
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
    assert run.returncode == 143, err[-800:]
    assert f"interrupted; resume with: --resume {run_id}" in out and "Traceback" not in err
    position = saved(data, run_id)["position"]
    assert 4 <= position < 2000
    resumed = subprocess.run(base + ["--resume", run_id], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stderr[-800:]
    final = saved(data, run_id)
    assert final["status"] == "completed" and final["stats"]["completed"] == 2000


def test_a_sigterm_to_the_whole_group_keeps_the_embedded_ledger(tmp_path: Path) -> None:
    """A service manager signals the whole process group: the ledger writer (a forked
    child) must outlive the signal and write every trade the run made, not die with it
    and leave an empty ledger behind a clean-looking exit."""
    import orjson

    data = tmp_path / "runs"
    cfg = tmp_path / "sched.json"
    cfg.write_text(json.dumps({"schedule": {"trades_per_account": 5000}}))
    run, run_id = scheduled_run_under_way(["--embedded", "--config", str(cfg)], data, 5000,
                                          start_new_session=True)
    out, err = signal_group(run, signal.SIGTERM, 30)
    assert run.returncode == 143 and "Traceback" not in err, err[-800:]
    ids = [orjson.loads(line)["trade_id"] for line in (data / "trades.jsonl").read_bytes().splitlines()]
    assert len(ids) >= 2000 and ids == list(range(1, len(ids) + 1)), len(ids)
