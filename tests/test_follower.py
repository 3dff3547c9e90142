"""The follower process (storage/follower.py): the trade ledger and the audit logs written by a
second process replaying the journal. Real servers, real subprocesses, real files."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from client import ExchangeClient, ExchangeError
from crash_scripts import five_orders_then
from exchange.server import ExchangeServer, ServerConfig
from exchange.state import export_state
from exchange.types import CancelOrder, Deposit
from storage.follower import wait_for_old_follower
from storage.tail import JournalTail
from storage.journal import MAGIC, encode, frame, segment_name
from storage.ledger import read_ledger
from storage.snapshot import read_snapshot
from storage.persistence import FollowerError

T = 20.0
ROOT = Path(__file__).resolve().parent.parent
USERS = ("alice", "bob", "carol")
LABELS = {"new": "PLACED", "trade": "FILL", "canceled": "CANCELED", "replaced": "MODIFIED",
          "expired": "EXPIRED", "rejected": "REJECTED", "self_trade_prevented": "SELF-TRADE-PREVENTED"}


def _server(data: Path, **kw: Any) -> ExchangeServer:
    return ExchangeServer(ServerConfig(port=0, data_dir=data, stats_interval=0, **kw))


async def _clients(srv: ExchangeServer) -> dict[str, ExchangeClient]:
    assert srv.address is not None
    out = {}
    for user in USERS:
        c = ExchangeClient(*srv.address, timeout=T)
        await asyncio.wait_for(c.connect(), T)
        await asyncio.wait_for(c.login(user), T)
        out[user] = c
    return out


def _abort(clients: dict[str, ExchangeClient]) -> None:
    for c in clients.values():
        c.abort()


class Seen:
    """Every execution report each user received (the direct answers are among the client's
    events too), and every trade of the trades channel."""

    def __init__(self) -> None:
        self.reports: dict[str, list[dict[str, Any]]] = {u: [] for u in USERS}
        self.trades: list[dict[str, Any]] = []

    def take(self, clients: dict[str, ExchangeClient], watcher: ExchangeClient) -> None:
        for user, c in clients.items():
            self.reports[user] += [e for e in c.pending_events() if e.get("type") == "exec"]
        self.trades += [e for e in watcher.pending_events() if e.get("type") == "trade"]


async def trade_randomly(clients: dict[str, ExchangeClient], seed: int, n: int) -> None:
    """Limit, market and IOC orders, cancels, modifies and some refused requests."""
    rng = random.Random(seed)
    live: dict[str, list[int]] = {u: [] for u in USERS}
    for _ in range(n):
        user = rng.choice(USERS)
        c = clients[user]
        roll = rng.random()
        if roll < 0.55:
            price = f"{rng.randint(95, 105)}.00" if rng.random() > 0.05 else "100.001"  # off grid
            reply = await c.place("BTC-USD", rng.choice(["buy", "sell"]), f"0.{rng.randint(1, 9)}",
                                  price, tif="ioc" if rng.random() < 0.1 else None,
                                  raise_on_reject=False)
            if reply.get("status") in ("new", "partially_filled"):
                live[user].append(reply["order_id"])
        elif roll < 0.65:
            reply = await c.place("BTC-USD", rng.choice(["buy", "sell"]), "0.1", raise_on_reject=False)
        elif roll < 0.85 and live[user]:
            try:
                reply = await c.cancel(live[user].pop(rng.randrange(len(live[user]))))
            except ExchangeError:  # filled meanwhile
                continue
        elif live[user]:
            try:
                reply = await c.modify(rng.choice(live[user]), qty=f"0.{rng.randint(1, 9)}")
            except ExchangeError:
                continue
        else:
            continue


def audit_lines(data: Path, user: str) -> tuple[list[str], list[str]]:
    """A user's audit lines without their timestamps: the order lines in order, and the
    rejections in order (the server writes those itself, so they interleave differently)."""
    orders, rejected = [], []
    for line in (data / "logs" / f"{user}.log").read_text(encoding="utf-8").splitlines():
        text = line.split(" ", 1)[1]
        (rejected if text.startswith("REJECTED") else orders).append(text)
    return orders, rejected


def files(data: Path) -> dict[str, Any]:
    """The ledger and the audit logs, without timestamps (two runs of the same session)."""
    ledger = read_ledger(data / "trades.jsonl")
    for t in ledger:
        del t["ts"]
    return {"ledger": ledger, "logs": {u: audit_lines(data, u) for u in USERS}}


def check_files(data: Path, seen: Seen) -> None:
    """The ledger holds exactly the trades the market saw, and each user's audit log one
    line per report the user got (each once, whatever crashed and restarted in between)."""
    ledger = read_ledger(data / "trades.jsonl")
    assert [(t["trade_id"], t["price"], t["qty"], t["taker_side"], t["ts"]) for t in ledger] == [
        (t["trade_id"], t["price"], t["qty"], t["taker_side"], t["ts"]) for t in seen.trades]
    assert [t["trade_id"] for t in ledger] == list(range(1, len(ledger) + 1))
    for user in USERS:
        orders, _ = audit_lines(data, user)
        assert len(orders) == len(set(orders)) == sum(
            r["exec_type"] != "rejected" for r in seen.reports[user]), user


async def _session(srv: ExchangeServer, seen: Seen, seed: int, n: int) -> None:
    clients = await _clients(srv)
    assert srv.address is not None
    watcher = ExchangeClient(*srv.address, timeout=T)
    await asyncio.wait_for(watcher.connect(), T)
    await watcher.subscribe("trades", "BTC-USD")
    try:
        await asyncio.wait_for(trade_randomly(clients, seed, n), 60)
        await asyncio.sleep(0.1)  # the last pushed reports
        seen.take(clients, watcher)
    finally:
        _abort(clients)
        watcher.abort()


async def reference(data: Path, seeds: tuple[int, ...], n: int) -> dict[str, Any]:
    """The same sessions against an exchange writing its files in-process."""
    srv = _server(data, writer="inline")
    await asyncio.wait_for(srv.start(), T)
    try:
        for seed in seeds:
            await _session(srv, Seen(), seed, n)
    finally:
        await asyncio.wait_for(srv.stop(), T)
    return files(data)


async def test_the_follower_writes_exactly_what_the_exchange_did(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = _server(data)
    await asyncio.wait_for(srv.start(), T)
    seen = Seen()
    try:
        assert srv.follower is not None and srv.follower.alive
        await _session(srv, seen, seed=1, n=400)
        await asyncio.wait_for(srv.flush_logs(), T)
        assert len(seen.trades) > 20 and sum(len(r) for r in seen.reports.values()) > 400
        check_files(data, seen)
        # The follower writes the snapshot, from its own engine: the same state as the
        # server's, at the same journal position; the journal it covers is removed.
        segments = sorted((data / "journal").iterdir())
        assert await asyncio.wait_for(srv.persistence.snapshot(), T)
        snap = read_snapshot(data / "snapshot.json")
        assert snap is not None and snap["journal_lsn"] == srv.journal.last_lsn > 0
        assert snap["state"] == orjson.loads(orjson.dumps(export_state(srv.engine)))
        assert snap["last_ts"] >= max(t["ts"] for t in seen.trades)
        assert not any(p.exists() for p in segments)
    finally:
        await asyncio.wait_for(srv.stop(), T)
    check_files(data, seen)
    assert wait_for_old_follower(data, timeout=1.0)  # it exited with the server
    assert files(data) == await reference(tmp_path / "inline", (1,), 400)


async def test_a_killed_follower_is_restarted_and_misses_nothing(tmp_path: Path, caplog) -> None:
    data = tmp_path / "data"
    srv = _server(data)
    await asyncio.wait_for(srv.start(), T)
    seen = Seen()
    try:
        assert srv.follower is not None
        srv.follower.RESTART_DELAY = 0.1  # type: ignore[misc]
        srv.follower._delay = 0.1
        await _session(srv, seen, seed=2, n=150)
        first = srv.follower._proc
        assert first is not None
        first.send_signal(signal.SIGKILL)  # mid-way: some lines written, some not
        await _session(srv, seen, seed=3, n=150)  # meanwhile the exchange trades on
        for _ in range(int(T / 0.05)):
            if srv.follower.alive and srv.follower._proc is not first:
                break
            await asyncio.sleep(0.05)
        assert srv.follower.restarts == 1 and srv.follower.alive
        await asyncio.wait_for(srv.flush_logs(), T)
        check_files(data, seen)
    finally:
        await asyncio.wait_for(srv.stop(), T)
    assert "exited with code -9; restarting it" in caplog.text
    check_files(data, seen)
    assert files(data) == await reference(tmp_path / "inline", (2, 3), 150)


CRASH_AT_SYNC = five_orders_then(
    "    if sys.argv[2] == 'synced':\n"
    "        await srv.flush_logs()  # the lines are written: recovery must not write them again\n"
    "    async def killed(lsn, last_ts, timeout=0.0):  # kill -9 while the follower writes the snapshot\n"
    "        os._exit(9)\n"
    "    srv.follower.snapshot_through = killed\n"
)


@pytest.mark.parametrize("when", ["synced", "unsynced"])
async def test_a_crash_while_a_snapshot_waits_for_the_follower_loses_no_line(tmp_path: Path, when: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_AT_SYNC, str(data), when, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), T)
    assert proc.returncode == 9, err
    assert wait_for_old_follower(data, timeout=5.0), "the follower outlived its server"
    srv = _server(data)
    await asyncio.wait_for(srv.start(), T)
    await asyncio.wait_for(srv.stop(), T)
    text = (data / "logs" / "alice.log").read_text()
    assert [text.count(f" PLACED order {oid} ") for oid in range(1, 6)] == [1] * 5, text


async def test_a_follower_that_cannot_start_leaves_the_server_writing_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog,
) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the follower exits at once
    data = tmp_path / "data"
    srv = _server(data)
    await asyncio.wait_for(srv.start(), T)
    seen = Seen()
    try:
        assert srv.follower is None and srv.audit in srv.gateway.listeners
        assert "writing them in this process instead" in caplog.text
        await _session(srv, seen, seed=4, n=100)
        await asyncio.wait_for(srv.flush_logs(), T)
        check_files(data, seen)
    finally:
        await asyncio.wait_for(srv.stop(), T)


async def test_sync_through_refuses_when_the_follower_is_gone(tmp_path: Path) -> None:
    srv = _server(tmp_path / "data")
    await asyncio.wait_for(srv.start(), T)
    try:
        assert srv.follower is not None and srv.follower._proc is not None
        srv.follower._closing = True  # no restart: see what a snapshot does without it
        srv.follower._proc.kill()
        await asyncio.wait_for(srv.follower._proc.wait(), T)
        with pytest.raises(FollowerError):
            await srv.follower.sync_through(1)
    finally:
        await asyncio.wait_for(srv.stop(), T)  # final snapshot skipped, journal kept
    assert any((tmp_path / "data" / "journal").iterdir())


def _write(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_the_journal_tail_reads_across_rotations_and_half_written_records(tmp_path: Path) -> None:
    records = {lsn: encode(Deposit(lsn, "alice", "USD", lsn * 100)) for lsn in range(1, 8)}
    records[4] = encode(CancelOrder(4, "bob", 123))
    first, second = tmp_path / segment_name(1), tmp_path / segment_name(5)
    _write(first, MAGIC + frame(1, records[1]) + frame(2, records[2]))
    third = frame(3, records[3])
    _write(first, third[:10])  # half a header
    tail = JournalTail(tmp_path, 0)
    got: list[tuple[int, bytes]] = []
    sink = lambda lsn, payload: got.append((lsn, payload))  # noqa: E731
    assert tail.read(2, sink) == 2
    _write(first, third[10:] + frame(4, records[4])[:30])  # half a body
    assert tail.read(2, sink) == 0  # nothing beyond what is durable
    with pytest.raises(FollowerError, match="inside record 4"):
        JournalTail(tmp_path, 0).read(4, lambda *a: None)
    _write(first, frame(4, records[4])[30:])
    _write(second, MAGIC + frame(5, records[5]) + frame(6, records[6]))
    assert tail.read(6, sink) == 4
    assert got == [(lsn, records[lsn]) for lsn in range(1, 7)]
    with pytest.raises(FollowerError, match="no segment"):
        tail.read(7, sink)  # durable, but written nowhere
    tail.close()
    damaged = bytearray((tmp_path / segment_name(1)).read_bytes())
    damaged[len(MAGIC) + 20] ^= 0xFF  # in record 1's payload
    (tmp_path / segment_name(1)).write_bytes(bytes(damaged))
    with pytest.raises(FollowerError, match="damaged"):
        JournalTail(tmp_path, 0).read(1, lambda *a: None)


async def test_start_engine_runs_its_follower_and_stops_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run" / "start_engine.py"), "--port", "0", "--data-dir", str(data),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), T)).decode()
        assert "listening" in line
        assert not wait_for_old_follower(data, timeout=0.2)  # the follower holds its lock
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), T)
        assert proc.returncode == 0, err
        assert b"ERROR" not in err and b"Traceback" not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert wait_for_old_follower(data, timeout=1.0)


def test_the_journal_tail_starts_inside_a_segment_after_a_snapshot_past_the_cut(tmp_path: Path) -> None:
    """The follower writes a snapshot at its own position, which may be past the journal's
    cut: a follower restarted from it starts inside the segment that begins at the cut."""
    records = {lsn: encode(Deposit(lsn, "alice", "USD", lsn)) for lsn in range(1, 9)}
    _write(tmp_path / segment_name(1), MAGIC + b"".join(frame(n, records[n]) for n in (1, 2, 3)))
    _write(tmp_path / segment_name(4), MAGIC + b"".join(frame(n, records[n]) for n in (4, 5, 6)))
    got: list[int] = []
    tail = JournalTail(tmp_path, 5)  # snapshot at 5, the cut at 3
    assert tail.read(6, lambda lsn, payload: got.append(lsn)) == 1
    _write(tmp_path / segment_name(7), MAGIC + frame(7, records[7]) + frame(8, records[8]))
    assert tail.read(8, lambda lsn, payload: got.append(lsn)) == 2
    assert got == [6, 7, 8]


async def test_the_last_trades_reach_the_ledger_while_the_exchange_idles(tmp_path: Path) -> None:
    """Short bursts, then quiet: every trade is in the ledger well within a second, whether
    or not the audit log's write came in between (it once left the last ones waiting)."""
    data = tmp_path / "data"
    srv = _server(data)
    await asyncio.wait_for(srv.start(), T)
    clients = await _clients(srv)
    rng = random.Random(5)
    try:
        for _ in range(5):
            for _ in range(rng.randint(2, 8)):
                await clients["alice"].sell("BTC-USD", "0.01", "100.00")
                await clients["bob"].buy("BTC-USD", "0.01", "100.00")
                await asyncio.sleep(0.02 + rng.random() * 0.03)
            await asyncio.sleep(0.8)
            trades = srv.engine.next_trade_id - 1
            assert len(read_ledger(data / "trades.jsonl")) == trades
    finally:
        _abort(clients)
        await asyncio.wait_for(srv.stop(), T)


async def test_a_sigterm_to_the_whole_process_group_stops_cleanly(tmp_path: Path) -> None:
    """systemd and ``kill -TERM -PGID`` signal the follower too: it leaves the stopping to
    the server, which still ends it last, after the final snapshot."""
    data = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run" / "start_engine.py"), "--port", "0", "--data-dir", str(data),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), T)).decode()
        port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        c = ExchangeClient("127.0.0.1", port, timeout=T)
        await c.connect()
        await c.login("alice")
        await c.sell("BTC-USD", "1", "100.00")
        c.abort()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), T)
        assert proc.returncode == 0, err
        assert b"ERROR" not in err, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert len(list((data / "journal").iterdir())) == 1  # the final snapshot covered the rest
