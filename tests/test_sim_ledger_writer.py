"""The embedded ledger's writer process (``simulation/ledger_writer.py``): the same bytes as
writing inline, nothing lost when either side dies, and a clear error when the writer does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from exchange.types import OrderType, PlaceOrder, Side, TimeInForce
from simulation.embedded import LEDGER_BATCH, EmbeddedExchange
from simulation.ledger_writer import LedgerWriterError
from simulation.runner import SimConfig, SimulationError, run_embedded
from process_helpers import signal_group

ROOT = Path(__file__).resolve().parent.parent
MARKET = "BTC-USD"

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer process needs os.fork")


def trade(ex: EmbeddedExchange, n: int, start: int = 0) -> None:
    """Trades ``start`` to ``start + n``: a resting sell then a crossing buy, prices wandering."""
    for i in range(start, start + n):
        price = 10_000 + (i * 7919) % 300
        ex.execute(PlaceOrder(0, "seller", MARKET, Side.SELL, OrderType.LIMIT, 1 + i % 5, price,
                              TimeInForce.GTC, False, None, None))
        ex.execute(PlaceOrder(0, "buyer", MARKET, Side.BUY, OrderType.LIMIT, 1 + i % 5, price,
                              TimeInForce.GTC, False, None, None))


def funded(data: Path, in_child: bool) -> EmbeddedExchange:
    ex = EmbeddedExchange(data_dir=data, ledger_process=in_child)
    for account, asset, amount in (("seller", "BTC", "1000"), ("buyer", "USD", "100000000")):
        ex.kernel.run_until_complete(ex.session(account).deposit(asset, amount))
    return ex


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for a reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_writer_process_writes_the_inline_ledger_byte_for_byte(tmp_path: Path) -> None:
    n = 2 * LEDGER_BATCH + 123  # several batches and a last partial one
    inline = funded(tmp_path / "inline", in_child=False)
    trade(inline, n)
    inline.close()
    expected = (tmp_path / "inline" / "trades.jsonl").read_bytes()
    assert expected.count(b"\n") == n

    ex = funded(tmp_path / "child", in_child=True)
    writer = ex._writer
    assert writer is not None and alive(writer.pid)
    os.kill(writer.pid, signal.SIGINT)  # a Ctrl-C in the terminal reaches it too: it carries on
    trade(ex, LEDGER_BATCH + 5)
    ex.flush_ledger(wait=True)  # once it returns, what was sent is in the file
    written = (tmp_path / "child" / "trades.jsonl").read_bytes()
    assert written == expected[:len(written)] and written.count(b"\n") == LEDGER_BATCH + 5
    trade(ex, n - LEDGER_BATCH - 5, start=LEDGER_BATCH + 5)
    ex.close()
    assert not alive(writer.pid)
    assert (tmp_path / "child" / "trades.jsonl").read_bytes() == expected


def test_a_writer_that_dies_is_a_clear_error_and_frees_the_directory(tmp_path: Path) -> None:
    data = tmp_path / "d"
    ex = funded(data, in_child=True)
    writer = ex._writer
    assert writer is not None
    os.kill(writer.pid, signal.SIGKILL)
    with pytest.raises(LedgerWriterError, match="writer"):
        trade(ex, 3 * LEDGER_BATCH)  # a batch goes out on the way: the pipe is broken
        ex.flush_ledger(wait=True)
    with pytest.raises(LedgerWriterError):
        ex.close()
    again = EmbeddedExchange(data_dir=data)  # the directory's lock was released
    again.close()


def test_the_writer_finishes_the_ledger_when_its_parent_is_killed(tmp_path: Path) -> None:
    data = tmp_path / "d"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_sim_ledger_writer import funded, trade
        ex = funded(Path({str(data)!r}), in_child=True)
        trade(ex, 5000)
        ex.flush_ledger()  # sent, not waited for
        print(ex._writer.pid, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 20
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the writer should end once its parent is gone"
    lines = (data / "trades.jsonl").read_bytes().splitlines()
    assert len(lines) == 5000 and all(line.endswith(b"}") for line in lines)


def test_a_run_whose_ledger_writer_dies_stops_with_a_clear_error(tmp_path: Path) -> None:
    class KillTheWriter(dict):  # type: ignore[type-arg]
        """``run_embedded`` hands its exchange over here just before trading starts."""

        def update(self, *args: object, **kwargs: object) -> None:
            super().update(*args, **kwargs)
            os.kill(kwargs["exchange"]._writer.pid, signal.SIGKILL)  # type: ignore[attr-defined]

    cfg = SimConfig(orders=50_000, duration_s=None, seed=3, embedded=True, data_dir=tmp_path,
                    progress=False)
    with pytest.raises(SimulationError, match="trade ledger could not be written"):
        run_embedded(cfg, stream=None, out=KillTheWriter())
    again = EmbeddedExchange(data_dir=tmp_path)  # nothing left holding the directory
    again.close()


def test_closing_one_exchange_does_not_wait_for_another(tmp_path: Path) -> None:
    """A second writer must not hold the first one's pipe open (it would never see the end)."""
    a = funded(tmp_path / "a", in_child=True)
    b = funded(tmp_path / "b", in_child=True)
    trade(a, 10)
    start = time.monotonic()
    a.close()
    assert time.monotonic() - start < 5
    assert (tmp_path / "a" / "trades.jsonl").read_bytes().count(b"\n") == 10
    b.close()


def test_ctrl_c_stops_an_embedded_run_with_its_report_and_whole_ledger(tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal sends it: the run stops cleanly (no
    traceback from a compiled agent cut mid-step), the writer finishes the file, and every
    trade the report counts is in it exactly once."""
    data, report = tmp_path / "d", tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run" / "start_simulation.py"), "--embedded", "--no-progress",
         "--duration", "3600s", "--rate", "200000", "--data-dir", str(data), "--report", str(report)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 30
    ledger = data / "trades.jsonl"
    while time.monotonic() < deadline and (not ledger.exists() or ledger.stat().st_size < 2_000_000):
        time.sleep(0.05)  # several batches handed over already
    out, err = signal_group(proc, signal.SIGINT, 60)
    assert proc.returncode == 130, (out + err)[-2000:]
    assert "Traceback" not in err, err[-2000:]
    import json

    trades = json.loads(report.read_text())["trades"]
    ids = [json.loads(line)["trade_id"] for line in ledger.read_bytes().splitlines()]
    assert trades > LEDGER_BATCH and len(ids) == trades == len(set(ids))


def test_no_process_to_spare_means_writing_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    fds = len(os.listdir("/proc/self/fd"))
    ex = funded(tmp_path, in_child=True)
    assert ex._writer is None
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # Ctrl-C still works
    trade(ex, 100)
    ex.close()
    assert (tmp_path / "trades.jsonl").read_bytes().count(b"\n") == 100
    assert len(os.listdir("/proc/self/fd")) == fds  # the pipes were closed
