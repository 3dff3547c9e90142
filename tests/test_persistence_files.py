"""The storage formats on their own: ledger, snapshot file, journal records and segments.

Each test works on a temporary directory with the real classes; nothing is mocked except,
in the last test, the speed of the journal's disk (to prove acknowledgements wait for it).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from client import ExchangeClient
from exchange.markets import default_config
from exchange.server import ExchangeServer, ServerConfig
from exchange.types import (
    CancelOrder, Deposit, ModifyOrder, OrderType, PlaceOrder, Side, STPMode, TimeInForce, Trade,
    Withdraw,
)
from storage import journal as jr
from storage.ledger import TradeLedger, last_trade_id, read_ledger, trade_line
from storage.snapshot import SnapshotError, read_snapshot, write_snapshot

T = 5.0
CONFIG = default_config()


def trade(tid: int, qty: int = 10) -> Trade:
    return Trade("BTC-USD", tid, 10_000_00, qty, Side.BUY, 2 * tid, 2 * tid - 1, "bob", "alice", 1, 2, tid)


# --------------------------------------------------------------------------- ledger


async def test_ledger_writes_only_durable_trades_exactly_once_in_order(tmp_path: Path) -> None:
    durable = [0]
    marks = iter(range(1, 100))
    ledger = TradeLedger(tmp_path / "trades.jsonl", CONFIG, interval=0.01,
                         mark=lambda: next(marks), durable=lambda: durable[0])
    assert ledger.open() == 0
    ledger.start()
    ledger([trade(1)])  # mark 1
    ledger([trade(2), trade(3)])  # mark 2
    await asyncio.sleep(0.05)
    assert read_ledger(ledger.path) == []  # nothing durable yet
    durable[0] = 1
    ledger.wake()
    await asyncio.sleep(0.05)
    assert [r["trade_id"] for r in read_ledger(ledger.path)] == [1]
    durable[0] = 2
    ledger.add([trade(1), trade(2), trade(3), trade(4)])  # replay overlap: only 4 is new
    await ledger.sync()
    await ledger.close()
    assert [r["trade_id"] for r in read_ledger(ledger.path)] == [1, 2, 3, 4]
    assert ledger.path.read_bytes() == b"".join(trade_line(trade(i), CONFIG) for i in (1, 2, 3, 4))
    assert last_trade_id(ledger.path) == 4


async def test_ledger_reopen_continues_and_cuts_only_a_torn_fragment(tmp_path: Path) -> None:
    path = tmp_path / "trades.jsonl"
    whole = b"".join(trade_line(trade(i), CONFIG) for i in range(1, 2001))
    path.write_bytes(whole + b'{"trade_id":2001,"mar')  # power cut mid-line
    ledger = TradeLedger(path, CONFIG)
    assert ledger.open() == 2000
    assert ledger.torn_bytes == len(b'{"trade_id":2001,"mar')
    ledger.add([trade(2000), trade(2001)])
    await ledger.close()
    data = path.read_bytes()
    assert data.startswith(whole) and data[len(whole):] == trade_line(trade(2001), CONFIG)


def test_last_trade_id_of_missing_and_empty_files(tmp_path: Path) -> None:
    assert last_trade_id(tmp_path / "none.jsonl") == 0
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert last_trade_id(tmp_path / "empty.jsonl") == 0


# --------------------------------------------------------------------------- snapshot file


def test_snapshot_round_trips_exactly_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    content = {"journal_lsn": 7, "big": 10**30, "neg": -(2**70), "s": "é", "state": {"x": [1, None]}}
    path = tmp_path / "snapshot.json"
    write_snapshot(path, content)
    assert read_snapshot(path) == content
    assert type(read_snapshot(path)["big"]) is int
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot.json"]
    assert read_snapshot(tmp_path / "missing.json") is None


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda b: b.replace(b'"journal_lsn":7', b'"journal_lsn":8'), "integrity check"),
        (lambda b: b[: len(b) // 2], "not a snapshot file"),
        (lambda b: b.replace(b'"version":1', b'"version":9'), "format version 9"),
        (lambda b: b"not json at all", "not a snapshot file"),
        (lambda b: b.replace(b'{"format"', b'{"format" x'), "not valid JSON"),
    ],
    ids=["bit-flip", "truncated", "version", "garbage", "bad-json"],
)
def test_a_damaged_snapshot_is_refused_naming_the_file(tmp_path: Path, damage, expected: str) -> None:
    path = tmp_path / "snapshot.json"
    write_snapshot(path, {"journal_lsn": 7, "state": {}})
    path.write_bytes(damage(path.read_bytes()))
    before = path.read_bytes()
    with pytest.raises(SnapshotError, match=expected) as info:
        read_snapshot(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- journal

COMMANDS = [
    PlaceOrder(1, "alice", "BTC-USD", Side.BUY, OrderType.LIMIT, 5, 100, TimeInForce.GTC, True,
               STPMode.CANCEL_BOTH, "c-1"),
    PlaceOrder(2, "bob", "ACME-USD", Side.SELL, OrderType.MARKET, 3, None, TimeInForce.IOC),
    CancelOrder(3, "alice", 17),
    ModifyOrder(4, "alice", 17, None, 9),
    Deposit(5, "carol", "USD", 10**22),  # beyond 64 bits: must stay exact
    Withdraw(6, "carol", "BTC", 12),
]


SIZED_BY_QUOTE = PlaceOrder(2, "bob", "BTC-USD", Side.BUY, OrderType.MARKET, None, None, TimeInForce.FOK,
                            quote_qty=250_000_000)


def test_every_command_survives_encode_decode() -> None:
    for lsn, cmd in enumerate([*COMMANDS, SIZED_BY_QUOTE], 1):
        assert jr.record(lsn, cmd) == jr.frame(lsn, jr.encode(cmd))  # what the journal appends
        back = jr.decode(jr.encode(cmd))
        assert type(back) is type(cmd) and back.to_dict() == cmd.to_dict()
        for name in ("side", "order_type", "tif", "stp"):
            if getattr(cmd, name, None) is not None:
                assert getattr(back, name) is getattr(cmd, name)  # enum members, not strings
    # An order sized by its quantity is recorded as before quote_qty existed (12 fields), and
    # such a record reads back with none.
    assert orjson.loads(jr.encode(COMMANDS[0])[1:]) == [
        "P", 1, "alice", "BTC-USD", "buy", "limit", 5, 100, "gtc", True, "cancel_both", "c-1"]
    assert jr.decode(jr.encode(COMMANDS[1])).quote_qty is None
    assert orjson.loads(jr.encode(SIZED_BY_QUOTE)[1:])[-1] == 250_000_000
    with pytest.raises(ValueError):
        jr.decode(b"o" + orjson.dumps(["P", 1, "a", "BTC-USD", "buy", "market", None, None, "ioc", False, None,
                                       None, 5, 6]))


async def write_journal(directory: Path, commands, policy: str = "batch", rotate_at=()) -> jr.Journal:
    journal = jr.Journal(directory, policy)
    journal.open(1)
    for i, cmd in enumerate(commands, start=1):
        journal.append(cmd)
        if i in rotate_at:
            journal.rotate()
        if i % 3 == 0:
            await asyncio.sleep(0)  # several batches
    await journal.close()
    return journal


@pytest.mark.parametrize("policy", jr.POLICIES)
async def test_journal_writes_batches_and_reads_back_in_order(tmp_path: Path, policy: str) -> None:
    journal = await write_journal(tmp_path, COMMANDS * 5, policy, rotate_at=(7, 20))
    assert journal.durable_lsn == 30 and journal.batches >= 2
    segments = [s for s, _ in jr.list_segments(tmp_path)]
    assert segments == [1, 8, 21]
    got = list(jr.iter_commands(tmp_path))
    assert [lsn for lsn, _ in got] == list(range(1, 31))
    assert [c.to_dict() for _, c in got] == [c.to_dict() for c in COMMANDS * 5]
    assert [lsn for lsn, _ in jr.iter_commands(tmp_path, after=25)] == [26, 27, 28, 29, 30]
    assert journal.remove_before(21) == 2
    assert [s for s, _ in jr.list_segments(tmp_path)] == [21]
    with pytest.raises(jr.JournalError, match="missing"):
        list(jr.iter_commands(tmp_path, after=0))  # records 1..20 are gone
    assert len(list(jr.iter_commands(tmp_path, after=20))) == 10


async def test_a_torn_last_record_is_reported_and_everything_before_it_kept(tmp_path: Path) -> None:
    await write_journal(tmp_path, COMMANDS)
    (_, path), = jr.list_segments(tmp_path)
    data = path.read_bytes()
    for cut in (3, 19, 25):  # inside the header, at the payload, inside the payload
        path.write_bytes(data[:-cut] if cut != 19 else data[: len(data) - len(jr.encode(COMMANDS[-1])) - 1])
        seen: list[int] = []
        result = jr.read_journal(tmp_path, 0, lambda lsn, _p: seen.append(lsn))
        assert seen == [1, 2, 3, 4, 5] and result.last_lsn == 5
        assert result.torn is not None and result.torn.path == path
    path.write_bytes(data + b"\x00" * 100)  # zeros past the end (a preallocated tail)
    result = jr.read_journal(tmp_path, 0, lambda lsn, _p: None)
    assert result.last_lsn == 6 and result.torn is not None


async def test_a_whole_last_record_failing_its_checksum_is_torn_only_with_zeros_in_it(
    tmp_path: Path,
) -> None:
    """The part of an append that never reached the disk reads as zeros, and a payload never
    holds one; a whole last record with other damage may have been acknowledged, so it stops
    the read and says how to drop it by hand."""
    await write_journal(tmp_path, COMMANDS)
    (_, path), = jr.list_segments(tmp_path)
    data = path.read_bytes()
    last = len(data) - len(jr.encode(COMMANDS[-1])) - jr.HEADER.size
    unlanded = data[:-8] + b"\x00" * 8
    path.write_bytes(unlanded)
    result = jr.read_journal(tmp_path, 0, lambda lsn, _p: None)
    assert result.last_lsn == 5 and result.torn is not None and result.torn.offset == last
    rotten = bytearray(data)
    rotten[-3] ^= 0x01
    path.write_bytes(bytes(rotten))
    with pytest.raises(jr.JournalError, match="whole but fails its checksum") as info:
        jr.read_journal(tmp_path, 0, lambda lsn, _p: None)
    assert f"`truncate -s {last} {path}`" in str(info.value)


@pytest.mark.parametrize("start", ["inside an earlier record's payload", "inside a header"])
async def test_zeros_from_inside_an_earlier_record_to_the_end_are_a_torn_group_write(
    tmp_path: Path, start: str,
) -> None:
    """One write carries a whole group of records: a power cut can leave its tail as zeros
    from inside any record of it, header or payload; everything from that record on goes."""
    await write_journal(tmp_path, COMMANDS)  # records 4, 5 and 6 went out in one write
    (_, path), = jr.list_segments(tmp_path)
    data = path.read_bytes()
    sixth = len(data) - len(jr.encode(COMMANDS[-1])) - jr.HEADER.size
    fifth = sixth - len(jr.encode(COMMANDS[-2])) - jr.HEADER.size
    cut = sixth - 5 if start.startswith("inside an earlier") else fifth + 6
    path.write_bytes(data[:cut] + b"\x00" * (len(data) - cut))
    seen: list[int] = []
    result = jr.read_journal(tmp_path, 0, lambda lsn, _p: seen.append(lsn))
    assert seen == [1, 2, 3, 4] and result.torn is not None and result.torn.offset == fifth
    rotten = bytearray(data)
    rotten[sixth - 5] ^= 0x01  # the same record damaged, with a whole record after it
    path.write_bytes(bytes(rotten))
    with pytest.raises(jr.JournalError, match="record is damaged"):
        jr.read_journal(tmp_path, 0, lambda lsn, _p: None)


async def test_a_new_segments_header_is_durable_before_any_record_under_every_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await write_journal(tmp_path, COMMANDS, "off", rotate_at=(3,))
    assert (str(tmp_path / jr.segment_name(4)), len(jr.MAGIC)) in synced, synced


async def test_a_rotation_makes_the_finished_segment_durable_under_every_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ``off`` too: after a power cut a newer segment must not follow a torn older one,
    which recovery could only refuse as damage in the middle."""
    synced: list[tuple[str, int, list[int]]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        segments = [s for s, _ in jr.list_segments(tmp_path)]
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size, segments))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await write_journal(tmp_path, COMMANDS, "off", rotate_at=(3,))
    first = tmp_path / jr.segment_name(1)
    assert (str(first), first.stat().st_size, [1]) in synced, synced


@pytest.mark.parametrize("where", ["payload", "header"])
async def test_damage_in_the_middle_stops_the_read(tmp_path: Path, where: str) -> None:
    await write_journal(tmp_path, COMMANDS)
    (_, path), = jr.list_segments(tmp_path)
    data = bytearray(path.read_bytes())
    offset = len(jr.MAGIC) + (jr.HEADER.size + 3 if where == "payload" else 2)
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(jr.JournalError, match=f"{path} at byte") as info:
        jr.read_journal(tmp_path, 0, lambda lsn, _p: None)
    assert "damaged" in str(info.value)


async def test_a_damaged_record_in_an_older_segment_is_not_a_torn_tail(tmp_path: Path) -> None:
    await write_journal(tmp_path, COMMANDS, rotate_at=(3,))
    (_, first), _ = jr.list_segments(tmp_path)
    first.write_bytes(first.read_bytes()[:-4])
    with pytest.raises(jr.JournalError, match="ends inside a record"):
        jr.read_journal(tmp_path, 0, lambda lsn, _p: None)


# --------------------------------------------------------------------------- write-ahead


@pytest.mark.parametrize("path", ["aio", "thread"])
async def test_acknowledgements_wait_until_the_journal_record_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str,
) -> None:
    """Whichever way the fsync runs (native AIO, or the worker thread where AIO is refused),
    no acknowledgement leaves before its record is durable: here durability is made slow."""
    if path == "thread":
        monkeypatch.setattr(jr.AsyncFsync, "create", classmethod(lambda cls: None))
    elif jr.AsyncFsync.create() is None:
        pytest.skip("no native AIO fsync on this system")
    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0))
    await srv.start()
    loop = asyncio.get_running_loop()
    # Whoever waits on durability hears of it 0.15 s late (the journal itself may be compiled).
    srv.journal.on_durable[:] = [
        lambda upto, tell=tell: loop.call_later(0.15, tell, upto) for tell in srv.journal.on_durable
    ]
    try:
        assert srv.address is not None
        client = ExchangeClient(*srv.address, timeout=T)
        await client.connect()
        assert (srv.persistence.journal._aio is not None) == (path == "aio")
        t0 = loop.time()
        await client.login("alice")  # funding deposits are journaled too
        ack = await client.sell("BTC-USD", "1", "100.00")
        assert loop.time() - t0 >= 0.25  # two journal batches, one per round trip
        journaled = [c for _, c in jr.iter_commands(tmp_path / "data" / "journal")]
        assert [type(c).__name__ for c in journaled] == ["Deposit"] * 3 + ["PlaceOrder"]
        assert journaled[-1].ts == ack["ts"]
        # A rejected order changes nothing and is not journaled.
        bad = await client.sell("BTC-USD", "1000", "100.00", raise_on_reject=False)
        assert bad["exec_type"] == "rejected"
        assert len(list(jr.iter_commands(tmp_path / "data" / "journal"))) == 4
        await client.close()
    finally:
        await srv.stop()


@pytest.mark.parametrize("policy,aio", [("batch", None), ("batch", False), ("off", None), ("always", None)])
async def test_a_failed_journal_write_withholds_durability_and_says_so(
    tmp_path: Path, policy: str, aio: bool | None,
) -> None:
    """A disk that refuses the write (here /dev/full under the segment's descriptor) fails
    the journal: nothing after the failure is reported durable, waiters get the error."""
    journal = jr.Journal(tmp_path, policy, aio=aio)
    journal.open(1)
    failures: list[BaseException] = []
    journal.on_failure.append(failures.append)
    journal.append(COMMANDS[0])
    await asyncio.wait_for(journal.wait_durable(), T)
    assert journal.durable_lsn == 1
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, journal._fd)  # type: ignore[arg-type]
        journal.append(COMMANDS[1])
        with pytest.raises(OSError):
            await asyncio.wait_for(journal.wait_durable(), T)
        assert journal.durable_lsn == 1 and journal.failed is not None
        assert len(failures) == 1 and isinstance(failures[0], OSError)
        with pytest.raises(OSError):
            await journal.wait_durable()  # stays failed
    finally:
        os.close(full)
        if journal._aio is not None:
            journal._aio.close()
            journal._aio = None
        os.close(journal._fd)  # type: ignore[arg-type]
        journal._fd = None


class _FailingFsync(jr.AsyncFsync):
    """The real AIO fdatasync, but its result reported as an I/O error (a failing disk)."""

    def reap(self) -> int | None:
        res = super().reap()
        return None if res is None else -errno.EIO


async def test_close_releases_the_files_even_when_the_last_fsync_fails(tmp_path: Path) -> None:
    if jr.AsyncFsync.create() is None:
        pytest.skip("no native AIO fsync on this system")
    journal = jr.Journal(tmp_path, "batch", aio=True)
    journal.open(1)
    real = journal._aio
    failing = _FailingFsync.__new__(_FailingFsync)
    failing.__dict__.update(real.__dict__)  # type: ignore[union-attr]
    journal._aio = failing
    journal.append(COMMANDS[0])
    efd = failing.fileno()
    with pytest.raises(OSError):
        await journal.close()
    assert journal.durable_lsn == 0 and journal._aio is None and journal._fd is None
    with pytest.raises(OSError):
        os.fstat(efd)  # the eventfd is closed (and so no longer watched by the loop)


@pytest.mark.parametrize("aio", [None, False])
async def test_a_rotation_queued_just_before_close_is_carried_out(tmp_path: Path, aio: bool | None) -> None:
    errors: list[object] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    journal = jr.Journal(tmp_path, "batch", aio=aio)
    journal.open(1)
    journal.append(COMMANDS[0])
    await asyncio.wait_for(journal.wait_durable(), T)
    journal.rotate()
    await journal.close()
    await asyncio.sleep(0.05)  # a kick scheduled before close must not run after it
    assert not errors and journal.failed is None
    assert [start for start, _ in jr.list_segments(tmp_path)] == [1, 2]


@pytest.mark.parametrize("aio", [None, False])
async def test_random_appends_rotations_and_yields_keep_every_record_once_in_order(
    tmp_path: Path, aio: bool | None,
) -> None:
    rng = random.Random(11)
    journal = jr.Journal(tmp_path, "batch", aio=aio)
    journal.open(1)
    reported: list[int] = []
    journal.on_durable.append(reported.append)
    n = 0
    for _ in range(200):
        for _ in range(rng.randint(0, 5)):
            n += 1
            journal.append(COMMANDS[n % len(COMMANDS)])
        if rng.random() < 0.2:
            journal.rotate()
        await asyncio.sleep(0 if rng.random() < 0.7 else 0.001)
    await journal.close()
    assert reported == sorted(reported) and journal.durable_lsn == n
    assert [lsn for lsn, _ in jr.iter_commands(tmp_path)] == list(range(1, n + 1))


def test_an_aio_fdatasync_goes_to_the_descriptor_it_is_given_each_time(tmp_path: Path) -> None:
    """The iocb is filled in once per descriptor (``storage/aio.py``): after a rotation the
    next fdatasync must go to the new segment, not the old one. A descriptor that is not
    open any more must then fail, not quietly sync the previous file."""
    aio = jr.AsyncFsync.create()
    if aio is None:
        pytest.skip("no native AIO fdatasync here")
    first = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT)
    second = os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT)
    try:
        for fd in (first, second, first):
            os.write(fd, b"x")
            assert aio.probe(fd)
        os.close(second)
        assert not aio.probe(second)  # EBADF, from io_submit or from the reaped result
        assert aio.probe(first)
    finally:
        aio.close()
        os.close(first)


def test_recent_trades_read_only_the_ledgers_tail_and_keep_whole_public_records(tmp_path: Path) -> None:
    from storage.ledger import recent_trades, tail_records

    def recent(path: Path, per_market: int, **kw: Any) -> dict[str, list[dict[str, Any]]]:
        return recent_trades(tail_records(path, **kw), per_market)

    path = tmp_path / "trades.jsonl"
    assert recent(path, 3) == {}
    lines = [orjson.dumps({"trade_id": i, "market": "ACME-USD" if i % 4 == 0 else "BTC-USD",
                           "price": f"{100 + i}.00", "qty": "1", "buyer": "alice", "seller": "bob",
                           "taker_side": "buy", "maker_fee": "0.01", "ts": 1000 + i}) + b"\n"
             for i in range(1, 41)]
    path.write_bytes(b"".join(lines) + b'{"trade_id":41,"market":"BTC')  # a torn last line
    got = recent(path, 3)
    assert [r["trade_id"] for r in got["BTC-USD"]] == [37, 38, 39]
    assert [r["trade_id"] for r in got["ACME-USD"]] == [32, 36, 40]
    assert got["ACME-USD"][-1] == {"trade_id": 40, "price": "140.00", "qty": "1", "taker_side": "buy", "ts": 1040}
    tail = len(lines[-1]) * 2 + 10  # starts inside line 38: that line is not taken for a record
    short = recent(path, 5, tail=tail + len(b'{"trade_id":41,"market":"BTC'))
    assert {m: [r["trade_id"] for r in rows] for m, rows in short.items()} == {"BTC-USD": [39], "ACME-USD": [40]}
    exact = sum(map(len, lines[-3:])) + len(b'{"trade_id":41,"market":"BTC')  # begins where line 38 does
    assert [r["trade_id"] for r in recent(path, 5, tail=exact)["BTC-USD"]] == [38, 39]
