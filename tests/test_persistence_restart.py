"""Restarts of the real engine process: graceful (SIGTERM), torn journal tail, damaged files.

Each test runs ``run/start_engine.py`` as a subprocess on a temporary data directory and
talks to it over TCP with the client library, as a trader would. Every wait is bounded;
a process still running when a test ends is killed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from client import ExchangeClient, ExchangeError
from crash_scripts import five_orders_then
from storage import journal as jr
from storage.ledger import read_ledger
from storage.lock import LOCK_FILE
from storage.snapshot import read_snapshot

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run" / "start_engine.py"
T = 15.0
LISTENING = re.compile(r"Exchange listening on (\S+):(\d+)")
USERS = ("alice", "bob", "carol")


def data_files(directory: Path) -> dict[Path, bytes]:
    """Every file of a data directory and its bytes, except the lock file (which names
    whoever last took the directory, a refused start included)."""
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file() and p.name != LOCK_FILE}


async def settled_files(directory: Path, timeout: float = 10.0) -> dict[Path, bytes]:
    """``data_files`` once the follower has written what the acknowledged orders give it
    (the audit logs, the ledger): an acknowledgement comes before those writes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    files = data_files(directory)
    while loop.time() < deadline:
        await asyncio.sleep(0.2)
        again = data_files(directory)
        if again == files and any(p.parent.name == "logs" for p in files):
            return files
        files = again
    raise AssertionError(f"the files of {directory} kept changing or the audit log never came")


class Engine:
    """One engine process on a data directory; ``start`` again after ``stop``/``kill``."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.clients: list[ExchangeClient] = []
        self.stderr = b""

    async def start(self, *extra: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--port", "0", "--data-dir", str(self.data),
            "--log-level", "WARNING", *self.args, *extra, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), T)).decode()
        match = LISTENING.search(line)
        if not match:
            err = await asyncio.wait_for(self.proc.stderr.read(), T)  # type: ignore[union-attr]
            raise AssertionError(f"engine did not start: {line!r} {err.decode()}")
        self.port = int(match.group(2))

    async def client(self, user: str | None = None) -> ExchangeClient:
        c = ExchangeClient("127.0.0.1", self.port, timeout=T)
        await asyncio.wait_for(c.connect(), T)
        self.clients.append(c)
        if user is not None:
            await asyncio.wait_for(c.login(user), T)
        return c

    async def _drop_clients(self) -> None:
        for c in self.clients:
            c.abort()
        self.clients.clear()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = await asyncio.wait_for(self.proc.wait(), T)
        assert self.proc.stderr is not None
        self.stderr = await asyncio.wait_for(self.proc.stderr.read(), T)
        await self._drop_clients()
        return rc

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)

    async def refuse(self) -> str:
        """Start expecting a refusal: exit code 2, a message, never listening."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--port", "0", "--data-dir", str(self.data), *self.args,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), T)
        except asyncio.TimeoutError:  # it started: not left running
            proc.kill()
            await proc.wait()
            raise AssertionError("the engine started instead of refusing") from None
        assert proc.returncode == 2, (out, err)
        assert b"listening" not in out and b"Traceback" not in err
        return err.decode()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    eng = Engine(tmp_path / "data")
    yield eng
    await eng._drop_clients()
    if eng.proc is not None and eng.proc.returncode is None:
        eng.proc.kill()
        await asyncio.wait_for(eng.proc.wait(), T)


async def next_exec(client: ExchangeClient, exec_type: str) -> dict[str, Any]:
    while True:
        ev = await asyncio.wait_for(client.next_event(T), T)
        assert ev is not None, "connection closed"
        if ev.get("type") == "exec" and ev.get("exec_type") == exec_type:
            return ev


async def view(eng: Engine) -> dict[str, Any]:
    """Everything a client can see: L3 books, and each user's balances and open orders."""
    out: dict[str, Any] = {"books": {}, "balances": {}, "orders": {}}
    watcher = await eng.client()
    for market in ("BTC-USD", "ACME-USD"):
        book = await watcher.book(market, level=3)
        book.pop("id", None)
        out["books"][market] = book
    for user in USERS:
        c = await eng.client(user)
        out["balances"][user] = await c.balances()
        out["orders"][user] = await c.orders()
    return out


async def place_resting_orders(eng: Engine) -> dict[str, ExchangeClient]:
    clients = {u: await eng.client(u) for u in USERS}
    a, b, c = clients["alice"], clients["bob"], clients["carol"]
    await a.sell("BTC-USD", "0.5", "101.00")
    await b.sell("BTC-USD", "0.25", "101.00")  # same level, behind alice
    await c.sell("BTC-USD", "1", "102.50")
    await a.buy("BTC-USD", "0.3", "99.00")
    await b.buy("BTC-USD", "0.3", "99.00")
    await c.buy("BTC-USD", "0.2", "101.00")  # partly fills alice: a partly filled maker rests
    await a.sell("ACME-USD", "10", "100.50")
    await c.buy("ACME-USD", "4", "100.50")  # a trade moves the band reference
    await b.buy("ACME-USD", "7", "99.00", post_only=True)
    await c.sell("ACME-USD", "3", "101.00", client_order_id="keep-me")
    order = await a.buy("ACME-USD", "5", "98.00")
    await a.modify(order["order_id"], qty="4")  # keeps priority
    await c.withdraw("USD", "5")
    return clients


async def test_graceful_restart_restores_books_balances_and_orders_then_trades_on(engine: Engine) -> None:
    await engine.start()
    await place_resting_orders(engine)
    before = await view(engine)
    await ledger_holds(engine, 2)  # written by the follower process, a moment later
    ledger_before = (engine.data / "trades.jsonl").read_bytes()
    assert await engine.stop() == 0
    assert b"Traceback" not in engine.stderr

    await engine.start()
    after = await view(engine)
    assert after == before
    assert (engine.data / "trades.jsonl").read_bytes() == ledger_before

    # Trade against a restored order: dave buys 0.3 at 101.00, exactly what remains of
    # alice's partly filled ask, first in its level (bob's ask behind it must stay whole).
    alice_ask = next(o for o in before["orders"]["alice"] if o["market"] == "BTC-USD" and o["side"] == "sell")
    assert alice_ask["remaining_qty"] == "0.3000"
    dave = await engine.client("dave")
    report = await dave.buy("BTC-USD", "0.3", "101.00")
    fill = await next_exec(dave, "trade")
    assert fill["status"] == "filled" and fill["filled_qty"] == "0.3000"
    assert fill["liquidity"] == "taker" and fill["fee"] == "0.006060"
    alice = await engine.client("alice")
    bal = await alice.balances()
    sold = Decimal("0.3") * Decimal("101.00")
    fee = Decimal("0.003030")  # 1 bp maker fee on 30.30 USD
    was = before["balances"]["alice"]
    assert Decimal(bal["BTC"]["locked"]) == Decimal(was["BTC"]["locked"]) - Decimal("0.3")
    assert Decimal(bal["USD"]["available"]) - Decimal(was["USD"]["available"]) == sold - fee
    dbal = await dave.balances()
    assert Decimal(dbal["BTC"]["available"]) == Decimal("10.3")
    assert Decimal(dbal["USD"]["available"]) == Decimal("100000") - sold - Decimal("0.006060")
    assert all(o["order_id"] != alice_ask["order_id"] for o in await alice.orders())
    # New ids continue after the restored ones; the ledger gets the trade once, with the next id.
    assert report["order_id"] > max(o["order_id"] for u in USERS for o in before["orders"][u])
    assert await engine.stop() == 0
    ledger = read_ledger(engine.data / "trades.jsonl")
    assert [t["trade_id"] for t in ledger] == [1, 2, 3]
    assert ledger[-1]["sell_order_id"] == alice_ask["order_id"] and ledger[-1]["buyer"] == "dave"
    assert (engine.data / "trades.jsonl").read_bytes().startswith(ledger_before)


async def ledger_holds(engine: Engine, count: int) -> None:
    """Until the ledger holds ``count`` trades (exactly that many, in the end)."""
    path = engine.data / "trades.jsonl"
    for _ in range(int(T / 0.02)):
        if path.exists() and len(read_ledger(path)) >= count:
            break
        await asyncio.sleep(0.02)
    assert len(read_ledger(path)) == count


async def crash_with_journal(engine: Engine) -> dict[str, Any]:
    """Orders, then kill -9: the state after the start-up snapshot lives only in the journal."""
    await engine.start()
    await place_resting_orders(engine)
    before = await view(engine)
    await ledger_holds(engine, 2)
    await engine.kill()
    segments = jr.list_segments(engine.data / "journal")
    assert len(segments) == 1 and segments[0][1].stat().st_size > 100
    return before


async def test_kill_9_recovers_everything_from_the_journal(engine: Engine) -> None:
    before = await crash_with_journal(engine)
    ledger_before = (engine.data / "trades.jsonl").read_bytes()
    await engine.start()
    assert await view(engine) == before
    assert (engine.data / "trades.jsonl").read_bytes() == ledger_before  # already complete
    # The journal was folded into a fresh snapshot; a second restart replays nothing.
    snap = read_snapshot(engine.data / "snapshot.json")
    assert snap is not None and snap["journal_lsn"] > 0
    assert await engine.stop() == 0
    await engine.start()
    assert await view(engine) == before


async def test_orders_sized_by_the_quote_come_back_the_same_after_kill_9(engine: Engine) -> None:
    """A market order sized by ``quote_qty`` is journaled as sent and sized by the engine:
    recovery (and the follower, which writes the snapshots) size it again the same way."""
    await engine.start()
    clients = await place_resting_orders(engine)
    alice, carol = clients["alice"], clients["carol"]
    bought = await alice.place("BTC-USD", "buy", None, quote_qty="60")
    await alice.ping()  # every report of the order has arrived before the answer
    fills = [e for e in alice.pending_events()
             if e.get("exec_type") == "trade" and e.get("order_id") == bought["order_id"]]
    assert bought["order_type"] == "market" and Decimal(bought["qty"]) == sum(Decimal(f["last_qty"]) for f in fills)
    spent = sum(Decimal(f["last_qty"]) * Decimal(f["last_price"]) + Decimal(f["fee"]) for f in fills)
    assert Decimal("59.9") < spent <= Decimal("60")
    sold = await carol.place("ACME-USD", "sell", None, quote_qty="200.00")
    assert sold["qty"] == "2"  # bob's bid at 99.00: two shares for 198.00, three would be 297
    before = await view(engine)
    await engine.kill()
    await engine.start()
    assert await view(engine) == before


async def test_a_cancel_all_answered_before_a_kill_9_stays_done(engine: Engine) -> None:
    """Each of its cancels is journaled; the answer leaves once they are durable."""
    await engine.start()
    clients = await place_resting_orders(engine)
    reply = await clients["alice"].cancel_all()
    assert len(reply["order_ids"]) == 4
    before = await view(engine)
    assert before["orders"]["alice"] == []
    await engine.kill()
    await engine.start()
    assert await view(engine) == before
    assert await engine.stop() == 0


async def test_a_torn_journal_tail_is_discarded_and_reported(engine: Engine) -> None:
    before = await crash_with_journal(engine)
    (_, path), = jr.list_segments(engine.data / "journal")
    records = list(jr.iter_commands(engine.data / "journal"))
    last_lsn, last_cmd = records[-1]
    assert type(last_cmd).__name__ == "Withdraw"  # carol's withdrawal: the last command
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the crash hit in the middle of writing it
    await engine.start()
    await all_back_but_carols_withdrawal(engine, before)
    assert await engine.stop() == 0
    assert b"torn" in engine.stderr


async def all_back_but_carols_withdrawal(engine: Engine, before: dict[str, Any]) -> None:
    """After ``crash_with_journal`` and a journal cut before its last command."""
    after = await view(engine)
    assert after["books"] == before["books"] and after["orders"] == before["orders"]
    carol_usd = Decimal(after["balances"]["carol"]["USD"]["available"])
    assert carol_usd == Decimal(before["balances"]["carol"]["USD"]["available"]) + 5


async def test_a_rotten_last_journal_record_refuses_until_cut_by_the_command_named(engine: Engine) -> None:
    """Whole but failing its checksum with no zeros in it: not a torn write, and it may have
    been acknowledged, so the exchange will not drop it by itself; the refusal's command does."""
    before = await crash_with_journal(engine)
    (_, path), = jr.list_segments(engine.data / "journal")
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # inside carol's withdrawal, the last command
    path.write_bytes(bytes(data))
    files = data_files(engine.data)
    err = await engine.refuse()
    assert "whole but fails its checksum" in err and data_files(engine.data) == files
    command = re.search(r"`truncate -s (\d+) ([^`]+)`", err)
    assert command is not None and command.group(2) == str(path)
    os.truncate(path, int(command.group(1)))
    await engine.start()
    await all_back_but_carols_withdrawal(engine, before)
    assert await engine.stop() == 0


async def test_a_damaged_journal_record_in_the_middle_refuses_to_start(engine: Engine) -> None:
    await crash_with_journal(engine)
    (_, path), = jr.list_segments(engine.data / "journal")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    files = data_files(engine.data)
    err = await engine.refuse()
    assert str(path) in err and "damaged" in err and "left as it is" in err
    assert data_files(engine.data) == files


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda b: b.replace(b'"next_order_id":', b'"next_order_id":9'), "integrity check"),
        (lambda b: b[:-40], "not a snapshot file"),
        (lambda b: b.replace(b'"version":1', b'"version":2'), "format version 2"),
        (None, "invariant"),
    ],
    ids=["checksum", "bad-json", "version", "invariants"],
)
async def test_a_damaged_snapshot_refuses_to_start_and_is_left_alone(engine: Engine, damage, expected: str) -> None:
    await engine.start()
    await place_resting_orders(engine)
    assert await engine.stop() == 0
    path = engine.data / "snapshot.json"
    if damage is None:
        # Consistent bytes, inconsistent state: re-sign a snapshot whose order reserves too much.
        from storage.snapshot import write_snapshot
        content = read_snapshot(path)
        assert content is not None
        row = next(m["orders"][0] for m in content["state"]["markets"].values() if m["orders"])
        row[content["state"]["order_fields"].index("locked")] += 1
        write_snapshot(path, content)
    else:
        path.write_bytes(damage(path.read_bytes()))
    files = data_files(engine.data)
    err = await engine.refuse()
    assert str(path) in err and expected in err, err
    assert data_files(engine.data) == files


async def test_a_missing_snapshot_with_a_later_journal_refuses_to_start_empty(engine: Engine) -> None:
    await crash_with_journal(engine)
    await engine.start()  # folds the journal into a snapshot, starts a new segment
    c = await engine.client("alice")
    await c.sell("BTC-USD", "0.1", "120.00")
    await engine.kill()
    (engine.data / "snapshot.json").unlink()
    err = await engine.refuse()
    assert "journal" in err and "missing" in err


async def test_a_second_exchange_on_the_same_data_directory_is_refused(engine: Engine) -> None:
    """It would recover from the same files and start its journal over the running one's;
    it must stop before touching anything, and the first exchange keeps working."""
    await engine.start()
    alice = await engine.client("alice")
    await alice.sell("BTC-USD", "1", "100.00")
    files = await settled_files(engine.data)
    err = await engine.refuse()
    assert "in use by an exchange (pid" in err and str(engine.data) in err
    assert data_files(engine.data) == files
    # The first one is unharmed: it still acknowledges and journals.
    ack = await alice.sell("BTC-USD", "1", "101.00")
    assert ack["exec_type"] == "new"
    assert len(list(jr.iter_commands(engine.data / "journal"))) == 5  # 3 deposits, 2 orders
    assert await engine.stop() == 0
    await engine.start()  # the lock went with the process
    orders = await (await engine.client("alice")).orders()
    assert sorted(o["price"] for o in orders) == ["100.00", "101.00"]
    assert await engine.stop() == 0


async def test_an_exchange_killed_with_sigkill_leaves_no_stale_lock(engine: Engine) -> None:
    await engine.start()
    await engine.client("alice")
    await engine.kill()
    await engine.start()
    assert await engine.stop() == 0


async def test_a_snapshot_left_half_written_by_a_crash_is_removed_at_start(engine: Engine) -> None:
    await engine.start()
    await (await engine.client("alice")).sell("BTC-USD", "1", "100.00")
    await engine.kill()
    leftover = engine.data / ".snapshot.json.tmp-99999-1"
    leftover.write_bytes(b'{"version":1,"content":{"half')  # the crash hit mid-write
    await engine.start()
    assert not leftover.exists()
    orders = await (await engine.client("alice")).orders()
    assert [o["price"] for o in orders] == ["100.00"]
    assert await engine.stop() == 0
    assert b"half-written" in engine.stderr


@pytest.mark.parametrize("change", ["reordered", "fees"])
async def test_a_markets_file_is_checked_against_the_journal_it_must_replay(
    engine: Engine, change: str,
) -> None:
    """The same markets listed in another order replay exactly; different fees would not,
    so with journal records to replay they are refused, naming the way out."""
    import copy
    import json

    from exchange.markets import DEFAULT_CONFIG

    before = await crash_with_journal(engine)
    markets = copy.deepcopy(DEFAULT_CONFIG)
    markets["markets"].reverse()
    if change == "fees":
        markets["fees"] = {"maker_fee_bps": 0, "taker_fee_bps": 5}
    path = engine.data.parent / "markets.json"
    path.write_text(json.dumps(markets))
    if change == "reordered":
        await engine.start("--markets", str(path))
        assert await view(engine) == before
        assert await engine.stop() == 0
    else:
        files = data_files(engine.data)
        engine.args = ("--markets", str(path))
        err = await engine.refuse()
        assert "different market configuration" in err and "previous --markets file" in err
        assert data_files(engine.data) == files


async def test_changed_fees_refit_the_reservations_of_resting_buys(engine: Engine, tmp_path: Path) -> None:
    """After a clean stop, new fees in the markets file change what a resting buy must hold:
    higher fees lock more from the account (or stop the start, saying what to do), lower
    ones release the difference, and the order still fills and settles to the last unit."""
    import copy
    import json

    from exchange.markets import DEFAULT_CONFIG

    def markets(maker: int, taker: int) -> str:
        config = copy.deepcopy(DEFAULT_CONFIG)
        config["fees"] = {"maker_fee_bps": maker, "taker_fee_bps": taker}
        path = tmp_path / f"markets-{maker}-{taker}.json"
        path.write_text(json.dumps(config))
        return str(path)

    async def usd(client: ExchangeClient) -> tuple[str, str]:
        held = (await client.balances())["USD"]
        return held["available"], held["locked"]

    await engine.start()
    alice = await engine.client("alice")
    order = await alice.buy("BTC-USD", "1", "100.00")
    assert (await alice.balances())["USD"]["locked"] == "100.020000"  # 2 bps taker, the larger
    await alice.withdraw("USD", "99899")
    assert (await alice.balances())["USD"]["available"] == "0.980000"
    assert await engine.stop() == 0

    engine.args = ("--markets", markets(500, 1000))  # 10 % would need 10 USD more
    files = data_files(engine.data)
    err = await engine.refuse()
    assert "the fees are maker 500 / taker 1000 bps in the market configuration but 1 / 2" in err
    assert f"alice's buy order {order['order_id']} would need 9.980000 USD more reserved" in err
    assert "start with the previous markets file and cancel the order (or deposit)" in err
    assert data_files(engine.data) == files

    engine.args = ("--markets", markets(50, 100))  # 1 %: 0.98 USD more, which alice has
    await engine.start()
    alice = await engine.client("alice")
    assert await usd(alice) == ("0.000000", "101.000000")
    assert await engine.stop() == 0

    engine.args = ("--markets", markets(0, 0))  # no fees: the reservation is the notional
    await engine.start()
    alice, bob = await engine.client("alice"), await engine.client("bob")
    assert await usd(alice) == ("1.000000", "100.000000")
    await bob.sell("BTC-USD", "1", "100.00")
    await next_exec(alice, "trade")
    assert await usd(alice) == ("1.000000", "0.000000")
    assert await engine.stop() == 0


CRASH_AT_SNAPSHOT = five_orders_then(
    "    async def killed(lsn):  # kill -9 while the snapshot waits for the audit log\n"
    "        os._exit(9)\n"
    "    srv.persistence.before_snapshot = killed\n",
    config=", writer='inline'",
    setup="    srv.audit.interval = 60.0  # the audit writer's next pass has not come yet\n",
)


async def test_audit_lines_survive_a_kill_while_a_snapshot_waits_for_them(engine: Engine) -> None:
    """A snapshot waits for the audit log to catch up before it is written: killed in
    between, the journal still covers those commands and recovery rebuilds their lines."""
    engine.data.mkdir(parents=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_AT_SNAPSHOT, str(engine.data), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.wait_for(proc.communicate(), T)
    assert proc.returncode == 9
    assert not (engine.data / "logs" / "alice.log").exists()  # nothing written before the kill
    await engine.start()
    assert await engine.stop() == 0
    text = (engine.data / "logs" / "alice.log").read_text()
    assert [text.count(f" PLACED order {oid} ") for oid in range(1, 6)] == [1] * 5


async def finished_answers(eng: Engine, asks: list[tuple[str, int, str | None]]) -> list[dict[str, Any]]:
    """``order_status`` of each (user, order id, client order id), by id and by client id."""
    out = []
    clients = {user: await eng.client(user) for user in {u for u, _, _ in asks}}
    for user, oid, coid in asks:
        by_id = await clients[user].order_status(oid)
        by_id.pop("id", None)
        out.append(by_id)
        if coid is not None:
            by_coid = await clients[user].order_status(client_order_id=coid)
            by_coid.pop("id", None)
            assert by_coid == by_id
    return out


@pytest.mark.parametrize("writer", ["process", "inline"])
async def test_order_status_still_answers_for_finished_orders_after_restarts_and_kill_9(
        tmp_path: Path, writer: str) -> None:
    """A bot or a terminal that reconnects after the exchange restarted can still learn how
    its orders ended: the finished orders are in the snapshot (written by the follower, or
    by the exchange itself with ``--writer inline``) and rebuilt from the journal after a
    kill -9."""
    eng = Engine(tmp_path / "data", "--writer", writer)
    try:
        await eng.start()
        alice, bob = await eng.client("alice"), await eng.client("bob")
        canceled = await alice.buy("BTC-USD", "0.5", "90.00", client_order_id="a-1")
        await alice.cancel(canceled["order_id"])
        maker = await alice.sell("BTC-USD", "0.25", "101.00", client_order_id="a-2")
        taker = await bob.buy("BTC-USD", "0.25", "101.00", client_order_id="b-1")  # fills both
        expired = await bob.buy("BTC-USD", "1", "95.00", tif="ioc")
        asks = [("alice", canceled["order_id"], "a-1"), ("alice", maker["order_id"], "a-2"),
                ("bob", taker["order_id"], "b-1"), ("bob", expired["order_id"], None)]
        before = await finished_answers(eng, asks)
        assert [a["status"] for a in before] == ["canceled", "filled", "filled", "expired"]
        assert before[1]["avg_price"] == "101.00" and before[0]["client_order_id"] == "a-1"

        assert await eng.stop() == 0  # the snapshot at shutdown carries them
        await eng.start()
        assert await finished_answers(eng, asks) == before

        # One more after the restart, then kill -9: it is only in the journal.
        late = await (await eng.client("carol")).buy("ACME-USD", "2", "90.00", client_order_id="c-1")
        await (eng.clients[-1]).cancel(late["order_id"])
        asks.append(("carol", late["order_id"], "c-1"))
        before = await finished_answers(eng, asks)
        await eng.kill()
        await eng.start()  # replays the journal, then folds it into a new snapshot
        assert await finished_answers(eng, asks) == before
        assert await eng.stop() == 0
        await eng.start()
        assert await finished_answers(eng, asks) == before
        with pytest.raises(ExchangeError) as err:
            await (await eng.client("alice")).order_status(late["order_id"])  # carol's, not alice's
        assert err.value.code == "unknown_order"
        assert await eng.stop() == 0
    finally:
        await eng._drop_clients()
        if eng.proc is not None and eng.proc.returncode is None:
            eng.proc.kill()
            await asyncio.wait_for(eng.proc.wait(), T)


async def test_finished_orders_of_a_removed_market_are_left_out_after_a_restart(tmp_path: Path) -> None:
    """Restarted without ACME-USD, the exchange has no units to read that market's old orders
    with: they are left out (with a warning), the other markets' stay, and they do not come
    back misread when ACME-USD returns with another tick (a price of 99.00 would have read
    as 9.900)."""
    import copy
    import json

    from exchange.markets import DEFAULT_CONFIG

    eng = Engine(tmp_path / "data")
    try:
        await eng.start()
        alice = await eng.client("alice")
        acme = await alice.buy("ACME-USD", "2", "99.00", client_order_id="acme-1")
        await alice.cancel(acme["order_id"])
        btc = await alice.buy("BTC-USD", "0.5", "90.00", client_order_id="btc-1")
        await alice.cancel(btc["order_id"])
        before = await finished_answers(eng, [("alice", btc["order_id"], "btc-1")])
        assert await eng.stop() == 0
        without = copy.deepcopy(DEFAULT_CONFIG)
        without["markets"] = [m for m in without["markets"] if m["symbol"] != "ACME-USD"]
        retick = copy.deepcopy(DEFAULT_CONFIG)
        next(m for m in retick["markets"] if m["symbol"] == "ACME-USD")["tick_size"] = "0.001"
        for n, markets in enumerate((without, retick)):
            path = tmp_path / f"markets{n}.json"
            path.write_text(json.dumps(markets))
            await eng.start("--markets", str(path))
            assert await finished_answers(eng, [("alice", btc["order_id"], "btc-1")]) == before
            alice = await eng.client("alice")
            for ask in (alice.order_status(acme["order_id"]), alice.order_status(client_order_id="acme-1")):
                with pytest.raises(ExchangeError) as err:
                    await ask
                assert err.value.code == "unknown_order"
            assert await eng.stop() == 0
            assert b"Traceback" not in eng.stderr
            if n == 0:
                assert b"1 finished orders of markets removed or given other units" in eng.stderr
    finally:
        await eng._drop_clients()
        if eng.proc is not None and eng.proc.returncode is None:
            eng.proc.kill()
            await asyncio.wait_for(eng.proc.wait(), T)
