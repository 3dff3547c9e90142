"""Start-up recovery itself interrupted or handed damaged files: a crash at any step of it
leaves a directory the next start recovers from on its own, without losing or repeating
anything acknowledged.

Real engine processes (``run/start_engine.py``) on temporary data directories, real files;
the kills are real process exits in the middle of recovery (a child ``python -c`` that wraps
the file operations it wants to die after, as ``crash_scripts.py`` does for snapshots).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest
from test_persistence_restart import (  # noqa: F401  (``engine``: the fixture)
    ROOT, T, Engine, crash_with_journal, data_files, engine, ledger_holds, next_exec, view,
)

from storage import journal as jr
from storage.ledger import read_ledger
from storage.snapshot import read_snapshot


def split_journal(directory: Path, torn_tail: bool = False) -> int:
    """Rewrite the journal's one segment as two (as a snapshot's rotation leaves them), the
    last with a record cut short after it when ``torn_tail`` (the process died writing it,
    never acknowledged); returns the last whole record."""
    records: list[tuple[int, bytes]] = []
    jr.read_journal(directory, 0, lambda lsn, payload: records.append((lsn, payload)))
    for _, path in jr.list_segments(directory):
        path.unlink()
    half = len(records) // 2
    for part in (records[:half], records[half:]):
        body = jr.MAGIC + b"".join(jr.frame(lsn, payload) for lsn, payload in part)
        (directory / jr.segment_name(part[0][0])).write_bytes(body)
    if torn_tail:
        last_lsn, last_payload = records[-1]
        with open(directory / jr.segment_name(records[half][0]), "ab") as fh:
            fh.write(jr.frame(last_lsn + 1, last_payload)[:10])
    return records[-1][0]


async def recovers(eng: Engine, before: dict[str, object], trades: int) -> None:
    """A real start on ``eng.data`` shows exactly ``before``; a clean stop; the ledger once each."""
    await eng.start()
    assert await view(eng) == before
    assert await eng.stop() == 0
    assert b"Traceback" not in eng.stderr and b"ERROR" not in eng.stderr, eng.stderr.decode()
    assert [t["trade_id"] for t in read_ledger(eng.data / "trades.jsonl")] == list(range(1, trades + 1))


# --------------------------------------------------------------------------- 1. journal vs snapshot


async def test_every_state_a_crash_during_recovery_leaves_is_recovered(engine: Engine, tmp_path: Path) -> None:
    """Recovery opens the new segment after the replayed records, writes the snapshot, then
    deletes the segments it covers: each on-disk state in between starts on its own."""
    before = await crash_with_journal(engine)
    last = split_journal(engine.data / "journal")
    base = tmp_path / "base"
    shutil.copytree(engine.data, base)
    await engine.start()  # the recovery that runs to its end: snapshot at ``last``, segment last+1
    await engine.kill()
    snapshot = read_snapshot(engine.data / "snapshot.json")
    assert snapshot is not None and snapshot["journal_lsn"] == last
    assert [s for s, _ in jr.list_segments(engine.data / "journal")] == [last + 1]
    new_segment = engine.data / "journal" / jr.segment_name(last + 1)
    old = [p.name for _, p in jr.list_segments(base / "journal")]

    states = {
        # the new (empty) segment is there, the old snapshot still is
        "segment opened": lambda d: shutil.copy(new_segment, d / "journal"),
        # the new snapshot too: the old segments are wholly covered by it
        "snapshot written": lambda d: (shutil.copy(new_segment, d / "journal"),
                                       shutil.copy(engine.data / "snapshot.json", d)),
        # the first old segment deleted
        "one segment deleted": lambda d: (shutil.copy(new_segment, d / "journal"),
                                          shutil.copy(engine.data / "snapshot.json", d),
                                          (d / "journal" / old[0]).unlink()),
    }
    for name, build in states.items():
        data = tmp_path / name.replace(" ", "-")
        shutil.copytree(base, data)
        build(data)
        eng = Engine(data)
        try:
            await recovers(eng, before, 2)
        except AssertionError as exc:
            raise AssertionError(f"after a crash at '{name}': {exc}") from exc
        finally:
            if eng.proc is not None and eng.proc.returncode is None:
                eng.proc.kill()
                await eng.proc.wait()
    await recovers(engine, before, 2)  # every old segment deleted: the end state


KILLED_IN_RECOVERY = r'''
import asyncio, os, sys
from pathlib import Path
import storage.journal as jr
import storage.persistence as ps
from exchange.server import ExchangeServer, ServerConfig

where = sys.argv[2]
real_open, real_write, real_unlink = jr.Journal.open, ps.write_snapshot, Path.unlink

def journal_open(self, next_lsn):
    if where == "before the new segment":
        os._exit(9)
    real_open(self, next_lsn)
    if where == "after the new segment":
        os._exit(9)

def write_snapshot(*args, **kwargs):
    size = real_write(*args, **kwargs)
    if where == "after the snapshot":
        os._exit(9)
    return size

def unlink(self, *args, **kwargs):
    real_unlink(self, *args, **kwargs)
    if where == "after deleting an old segment" and self.suffix == ".wal":
        os._exit(9)

jr.Journal.open = journal_open
ps.write_snapshot = write_snapshot
Path.unlink = unlink

async def main():
    srv = ExchangeServer(ServerConfig(port=0, data_dir=Path(sys.argv[1]), stats_interval=0))
    await srv.start()
    await srv.stop()
    sys.exit(3)  # recovery never reached the point

asyncio.run(main())
'''


@pytest.mark.parametrize("where", ["before the new segment", "after the new segment", "after the snapshot",
                                   "after deleting an old segment"])
async def test_a_kill_at_any_step_of_recovery_leaves_a_directory_the_next_start_recovers(
    engine: Engine, where: str,
) -> None:
    before = await crash_with_journal(engine)
    split_journal(engine.data / "journal", torn_tail=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_IN_RECOVERY, str(engine.data), where, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), T)
    assert proc.returncode == 9, err.decode()  # killed in the middle of recovery
    await recovers(engine, before, 2)


# --------------------------------------------------------------------------- 2. ledger tail


async def one_trade(eng: Engine) -> bytes:
    """Alice sells 1 BTC @ 100, Bob buys it: trade 1; returns the ledger once it holds it."""
    alice, bob = await eng.client("alice"), await eng.client("bob")
    await alice.sell("BTC-USD", "1", "100.00")
    await bob.buy("BTC-USD", "1", "100.00")
    await ledger_holds(eng, 1)
    return (eng.data / "trades.jsonl").read_bytes()


async def trade_again(eng: Engine) -> dict[str, object]:
    """One more trade between carol and dave; returns dave's fill."""
    carol, dave = await eng.client("carol"), await eng.client("dave")
    await carol.sell("ACME-USD", "1", "100.00")
    await dave.buy("ACME-USD", "1", "100.00")
    return await next_exec(dave, "trade")


@pytest.mark.parametrize("stop", ["clean stop", "kill -9"])
async def test_a_ledger_record_missing_only_its_final_newline_is_kept(engine: Engine, stop: str) -> None:
    """The whole record is there (only the newline never landed): it is the trade the state
    has, so the newline is added back. After a clean stop the snapshot covers the trade and
    the journal that made it is gone: cutting the line lost the trade for good."""
    await engine.start()
    ledger = await one_trade(engine)
    if stop == "clean stop":
        assert await engine.stop() == 0
    else:
        await engine.kill()
    path = engine.data / "trades.jsonl"
    path.write_bytes(ledger[:-1])
    await engine.start()
    assert path.read_bytes() == ledger
    fill = await trade_again(engine)
    assert fill["trade_id"] == 2
    assert await engine.stop() == 0
    assert b"ERROR" not in engine.stderr and b"no final newline" in engine.stderr, engine.stderr.decode()
    assert [t["trade_id"] for t in read_ledger(path)] == [1, 2]
    assert path.read_bytes().startswith(ledger)


@pytest.mark.parametrize("damage", ["torn", "another record"])
async def test_a_ledger_last_line_that_is_not_the_states_trade_is_cut_and_written_again(
    engine: Engine, damage: str,
) -> None:
    """Cut inside the record, it never was one; a whole record that is not the trade the
    state has (here another price) is not kept either. The journal recreates the trade."""
    await engine.start()
    ledger = await one_trade(engine)
    await engine.kill()
    path = engine.data / "trades.jsonl"
    if damage == "torn":
        path.write_bytes(ledger[:-40])
    else:
        assert b'"price":"100.00"' in ledger
        path.write_bytes(ledger.replace(b'"price":"100.00"', b'"price":"100.01"')[:-1])
    await engine.start()
    assert path.read_bytes() == ledger  # replay recreated it
    assert await engine.stop() == 0
    assert b"cut off a torn last line" in engine.stderr


async def test_a_ledger_missing_trades_no_journal_can_recreate_refuses_to_start(engine: Engine) -> None:
    """The snapshot counts a trade the ledger lost (it was written and fsynced before that
    snapshot, so the file was damaged since): starting would append after the hole for
    good. Refused, everything left as it is, with the way out; moved aside on purpose, a
    new ledger starts after the snapshot's trades."""
    await engine.start()
    ledger = await one_trade(engine)
    assert await engine.stop() == 0
    path = engine.data / "trades.jsonl"
    path.write_bytes(ledger[:-40])
    files = data_files(engine.data)
    err = await engine.refuse()
    assert str(path) in err and "trades 1..1 are missing" in err and "move it aside" in err, err
    assert data_files(engine.data) == files
    path.rename(engine.data / "trades.damaged.jsonl")
    await engine.start()
    fill = await trade_again(engine)
    assert fill["trade_id"] == 2
    assert await engine.stop() == 0
    assert b"trades 1..1 are in no ledger" in engine.stderr, engine.stderr.decode()
    assert [t["trade_id"] for t in read_ledger(path)] == [2]


# --------------------------------------------------------------------------- 3. ledger ahead


async def power_cut_after_a_trade(eng: Engine) -> bytes:
    """Under ``--fsync off``: trade 1 (alice's order 1, bob's order 2) acknowledged and in
    the ledger, then what a power cut can leave: the journal's last record (bob's order)
    torn, the ledger written. Returns the ledger's bytes."""
    await eng.start()
    ledger = await one_trade(eng)
    await eng.kill()
    (_, path), = jr.list_segments(eng.data / "journal")
    data = path.read_bytes()
    last_lsn, last = list(jr.iter_commands(eng.data / "journal"))[-1]
    assert type(last).__name__ == "PlaceOrder" and last.account == "bob"
    path.write_bytes(data[:-5])
    return ledger


async def test_ids_never_repeat_when_a_power_cut_under_fsync_off_leaves_the_ledger_ahead(
    engine: Engine,
) -> None:
    engine.args = ("--fsync", "off")
    ledger = await power_cut_after_a_trade(engine)
    assert [t["buy_order_id"] for t in read_ledger(engine.data / "trades.jsonl")] == [2]
    await engine.start()
    # The state lost bob's order and the trade; the ledger says so and matches it again.
    assert (engine.data / "trades.jsonl").read_bytes() == b""
    (side,) = engine.data.glob("trades.lost-*.jsonl")
    assert side.read_bytes() == ledger
    assert await (await engine.client("bob")).orders() == []
    # New ids come after every id the ledger (and bob's audit log) used.
    fill = await trade_again(engine)
    assert fill["trade_id"] == 2 and fill["order_id"] > 2
    assert await engine.stop() == 0
    err = engine.stderr.decode()
    assert "ERROR" in err and "trades 1..1 that the recovered state does not have" in err, err
    assert "--fsync off" in err and side.name in err
    final = read_ledger(engine.data / "trades.jsonl")
    assert [t["trade_id"] for t in final] == [2]
    assert min(final[0]["buy_order_id"], final[0]["sell_order_id"]) == 3
    snapshot = read_snapshot(engine.data / "snapshot.json")
    assert snapshot is not None and snapshot["state"]["counters"]["next_trade_id"] == 3
    assert snapshot["state"]["counters"]["next_order_id"] == 5
    # The next start (and its follower, from the snapshot) go on from there, quietly.
    await engine.start()
    fill = await trade_again(engine)
    assert fill["trade_id"] == 3 and fill["order_id"] > 5
    await ledger_holds(engine, 2)
    assert await engine.stop() == 0
    assert b"ERROR" not in engine.stderr and b"ids continue" not in engine.stderr
    assert [t["trade_id"] for t in read_ledger(engine.data / "trades.jsonl")] == [2, 3]
    assert side.read_bytes() == ledger


KILLED_MOVING_LOST_TRADES = r'''
import asyncio, os, sys
from pathlib import Path
import storage.ledger as ld
from exchange.server import ExchangeServer, ServerConfig

where = sys.argv[2]
real_truncate = ld.TradeLedger.truncate

def truncate(self, size):
    if where == "before cutting the ledger":
        os._exit(9)
    real_truncate(self, size)
    if where == "after cutting the ledger":
        os._exit(9)

ld.TradeLedger.truncate = truncate

async def main():
    srv = ExchangeServer(ServerConfig(port=0, data_dir=Path(sys.argv[1]), stats_interval=0,
                                      fsync="off"))
    await srv.start()
    await srv.stop()
    sys.exit(3)  # recovery never reached the point

asyncio.run(main())
'''


@pytest.mark.parametrize("where", ["before cutting the ledger", "after cutting the ledger"])
async def test_a_kill_while_moving_lost_trades_still_keeps_their_ids(engine: Engine, where: str) -> None:
    engine.args = ("--fsync", "off")
    ledger = await power_cut_after_a_trade(engine)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_MOVING_LOST_TRADES, str(engine.data), where, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), T)
    assert proc.returncode == 9, err.decode()
    await engine.start()
    fill = await trade_again(engine)
    assert fill["trade_id"] == 2 and fill["order_id"] > 2
    assert await engine.stop() == 0
    assert [side.read_bytes() for side in engine.data.glob("trades.lost-*.jsonl")] == [ledger]
    assert [t["trade_id"] for t in read_ledger(engine.data / "trades.jsonl")] == [2]


async def test_a_simulations_data_directory_is_refused_not_taken_for_lost_trades(
    engine: Engine, tmp_path: Path,
) -> None:
    """An embedded simulation leaves only ``trades.jsonl``; an exchange never leaves a ledger
    without a snapshot or a journal. Started there, it refuses, changing nothing, instead of
    filing the run's trades as its own lost ones."""
    import subprocess

    run = subprocess.run(
        [sys.executable, str(ROOT / "run" / "start_simulation.py"), "--embedded", "--orders", "300",
         "--data-dir", str(engine.data), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=T, stdin=subprocess.DEVNULL, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert read_ledger(engine.data / "trades.jsonl")
    files = data_files(engine.data)
    err = await engine.refuse()
    assert "holds a trade ledger (trades.jsonl) but no snapshot and no journal" in err, err
    assert "another --data-dir" in err
    assert data_files(engine.data) == files


@pytest.mark.parametrize("damage", ["a line that is no record", "a record without its order ids"])
async def test_lines_beyond_the_state_are_moved_only_when_all_of_them_can_be(engine: Engine, damage: str) -> None:
    """Trades beyond the state with a damaged line among them (or a record lacking the order
    ids the counters must stay above): refused before anything moves, not half moved with
    a traceback and a ledger no start could read."""
    import orjson

    await engine.start()
    ledger = await one_trade(engine)
    assert await engine.stop() == 0
    record = orjson.loads(ledger.splitlines()[-1])
    beyond = [orjson.dumps({**record, "trade_id": n}) for n in (2, 3)]
    bad = b"garbage-line" if damage.startswith("a line") else orjson.dumps({"trade_id": 3})
    if bad.startswith(b"{"):
        beyond[1] = bad
    else:
        beyond.insert(1, bad)
    path = engine.data / "trades.jsonl"
    path.write_bytes(ledger + b"\n".join(beyond) + b"\n")
    files = data_files(engine.data)
    err = await engine.refuse()
    assert str(path) in err and "Restore" in err and "from a copy" in err, err
    assert data_files(engine.data) == files


async def test_a_ledger_ending_in_a_megabyte_of_zeros_is_cut_back_to_its_last_record(engine: Engine) -> None:
    """What a power cut can leave after the last line: read a bounded piece of it (a record
    is far shorter), cut it off, and go on."""
    await engine.start()
    ledger = await one_trade(engine)
    await engine.kill()
    path = engine.data / "trades.jsonl"
    path.write_bytes(ledger + b"\0" * (1 << 20))
    await engine.start()
    assert path.read_bytes() == ledger
    assert (await trade_again(engine))["trade_id"] == 2
    assert await engine.stop() == 0


async def test_a_last_line_beyond_the_state_lacking_its_order_ids_is_cut_as_torn(engine: Engine) -> None:
    """Not a whole trade record, so not one to keep and move aside: cut like any torn line
    (it used to be given its newline, and the start then refused over it for good)."""
    await engine.start()
    ledger = await one_trade(engine)
    assert await engine.stop() == 0
    path = engine.data / "trades.jsonl"
    path.write_bytes(ledger + b'{"trade_id":2,"market":"BTC-USD"}')
    await engine.start()
    assert path.read_bytes() == ledger
    assert (await trade_again(engine))["trade_id"] == 2
    assert await engine.stop() == 0


async def test_without_its_side_file_a_moved_ledger_is_refused_saying_where_to_look(engine: Engine) -> None:
    """The lines moved aside end the ledger's trades: without their side file the ledger
    looks cut short, and the message names the side file before any damage."""
    engine.args = ("--fsync", "off")
    await power_cut_after_a_trade(engine)
    await engine.start()
    assert await engine.stop() == 0
    (side,) = engine.data.glob("trades.lost-*.jsonl")
    side.rename(engine.data / "elsewhere.jsonl")
    err = await engine.refuse()
    assert "trades.lost-*.jsonl file that is gone: put it back" in err, err
    (engine.data / "elsewhere.jsonl").rename(side)
    await engine.start()
    assert await engine.stop() == 0
