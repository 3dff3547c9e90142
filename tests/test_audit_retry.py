"""A user's audit log that cannot be appended to for a while (storage/audit.py).

Its lines are kept and written once the file takes them again, each exactly once, and
``logs/.position`` never moves past a line that is not in the files (recovery rebuilds only
the lines after it). Real servers, real follower and engine processes, real files: the log
is made unwritable by putting a directory in its place (which stops root too), or by a
file size limit (``RLIMIT_FSIZE``) on the follower process, which also cuts a write short.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import signal
from pathlib import Path
from typing import Any

import pytest

from client import ExchangeClient
from exchange.server import ExchangeServer, ServerConfig
from storage.journal import list_segments
from storage.persistence import FollowerError
from storage.snapshot import read_snapshot
from test_persistence_restart import Engine, engine  # noqa: F401  (``engine``: the fixture)

T = 20.0
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z ")
PLACED = re.compile(r" PLACED order (\d+) ")


def _server(data: Path, **kw: Any) -> ExchangeServer:
    options: dict[str, Any] = {"snapshot_interval": 0, "snapshot_records": 0, **kw}
    return ExchangeServer(ServerConfig(port=0, data_dir=data, stats_interval=0, **options))


async def _login(address: tuple[str, int], user: str) -> ExchangeClient:
    c = ExchangeClient(*address, timeout=T)
    await asyncio.wait_for(c.connect(), T)
    await asyncio.wait_for(c.login(user), T)
    return c


async def _rest(client: ExchangeClient, n: int) -> list[int]:
    """``n`` resting buy orders (far below the market: nothing trades); their ids."""
    return [(await asyncio.wait_for(client.buy("BTC-USD", "0.01", "90.00"), T))["order_id"]
            for _ in range(n)]


def _position(data: Path) -> int:
    return int((data / "logs" / ".position").read_text())


def _placed(data: Path, user: str) -> list[int]:
    """The order ids of a user's PLACED lines, in file order; every line must be whole."""
    lines = (data / "logs" / f"{user}.log").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "the file ends inside a line"
    bad = [line for line in lines[:-1] if not STAMP.match(line)]
    assert not bad, f"lines that are not whole lines: {bad}"
    return [int(m.group(1)) for m in map(PLACED.search, lines) if m]


def _block(data: Path, user: str) -> None:
    """Put a directory where the user's log is: every append to it fails, as root too."""
    path = data / "logs" / f"{user}.log"
    path.rename(path.with_suffix(".saved"))
    path.mkdir()


def _unblock(data: Path, user: str) -> None:
    path = data / "logs" / f"{user}.log"
    path.rmdir()
    path.with_suffix(".saved").rename(path)


@pytest.mark.parametrize("writer", ["inline", "process"])
async def test_lines_a_log_refused_are_written_once_it_takes_them_and_the_position_waits(
    tmp_path: Path, writer: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    data = tmp_path / "data"
    srv = _server(data, writer=writer)
    await asyncio.wait_for(srv.start(), T)
    clients: list[ExchangeClient] = []
    try:
        assert srv.address is not None
        heavy, alice = await _login(srv.address, "heavy"), await _login(srv.address, "alice")
        clients += [heavy, alice]
        ids = await _rest(heavy, 5)
        await asyncio.wait_for(srv.flush_logs(), T)
        before = _position(data)
        assert before == srv.journal.durable_lsn

        _block(data, "heavy")
        ids += await _rest(heavy, 5)
        refused = await heavy.buy("BTC-USD", "0.01", "90.001", raise_on_reject=False)  # off grid
        assert refused["exec_type"] == "rejected"
        alice_ids = await _rest(alice, 2)
        for _ in range(3):  # several appends, each failing for heavy
            await asyncio.wait_for(srv.flush_logs(), T)
        assert _placed(data, "alice") == alice_ids  # the other users' lines go on
        assert _position(data) == before  # not past heavy's unwritten lines
        snapshot_lsn = read_snapshot(data / "snapshot.json")["journal_lsn"]  # type: ignore[index]
        segments = len(list_segments(data / "journal"))
        for _ in range(3):
            with pytest.raises((OSError, FollowerError)):  # not while lines are unwritten
                await asyncio.wait_for(srv.persistence.snapshot(), T)
            ids += await _rest(heavy, 1)  # something new for the next try
        assert len(list_segments(data / "journal")) <= segments + 1  # one cut, not one a try
        assert read_snapshot(data / "snapshot.json")["journal_lsn"] == snapshot_lsn  # type: ignore[index]

        _unblock(data, "heavy")
        if writer == "process":  # the follower tries again by itself, with no new record
            await asyncio.sleep(1.0)
            assert _placed(data, "heavy") == ids
            assert _position(data) == srv.journal.durable_lsn
        ids += await _rest(heavy, 2)
        await asyncio.wait_for(srv.flush_logs(), T)
        assert _placed(data, "heavy") == ids
        assert _position(data) == srv.journal.durable_lsn
        assert (data / "logs" / "heavy.log").read_text().count(" REJECTED ") == 1
        assert await asyncio.wait_for(srv.persistence.snapshot(), T)
    finally:
        for c in clients:
            c.abort()
        await asyncio.wait_for(srv.stop(), T)
    assert _placed(data, "heavy") == ids
    if writer == "inline":  # the follower process logs to its own stderr
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "heavy.log" in r.getMessage()]
        assert len(errors) == 1, [r.getMessage() for r in errors]  # once, not once an append
        assert any("heavy.log written again" in r.getMessage() for r in caplog.records)

    srv = _server(data, writer=writer)  # a restart rebuilds nothing twice
    await asyncio.wait_for(srv.start(), T)
    await asyncio.wait_for(srv.stop(), T)
    assert _placed(data, "heavy") == ids
    assert (data / "logs" / "heavy.log").read_text().count(" REJECTED ") == 1


@pytest.mark.parametrize("writer", ["inline", "process"])
async def test_a_stop_while_a_log_refuses_keeps_the_journal_and_the_next_start_rebuilds(
    tmp_path: Path, writer: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """No snapshot (periodic or final) while lines are unwritten, so the journal that can
    rebuild them stays; a failed periodic snapshot is not tried again every second."""
    data = tmp_path / "data"
    srv = _server(data, writer=writer, snapshot_interval=0.2)
    await asyncio.wait_for(srv.start(), T)
    try:
        assert srv.address is not None
        heavy = await _login(srv.address, "heavy")
        ids = await _rest(heavy, 3)
        await asyncio.wait_for(srv.flush_logs(), T)
        before = _position(data)
        _block(data, "heavy")
        ids += await _rest(heavy, 3)
        await asyncio.sleep(1.5)  # periodic snapshots fall due every 0.2 s meanwhile
        heavy.abort()
    finally:
        await asyncio.wait_for(srv.stop(), T)
    failed = [r for r in caplog.records if "periodic snapshot failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    assert read_snapshot(data / "snapshot.json")["journal_lsn"] <= before  # type: ignore[index]
    assert _position(data) == before
    _unblock(data, "heavy")
    assert _placed(data, "heavy") == ids[:3]

    srv = _server(data, writer=writer)
    await asyncio.wait_for(srv.start(), T)  # recovery rebuilds the lines after the position
    await asyncio.wait_for(srv.stop(), T)
    assert _placed(data, "heavy") == ids
    assert _position(data) > before


# ----------------------------------------------------------------- a real engine process


async def _twenty_in_the_log(engine: Engine) -> tuple[ExchangeClient, list[int], int, int]:
    """Start the engine; heavy rests 20 orders whose lines reach heavy.log: heavy's client,
    the order ids, the audit position and heavy.log's size then."""
    data = engine.data
    await engine.start()
    assert engine.proc is not None
    heavy = await engine.client("heavy")
    ids = await _rest(heavy, 20)
    await _settled(data, "heavy", ids)
    return heavy, ids, _position(data), (data / "logs" / "heavy.log").stat().st_size


def _limit_follower(engine: Engine, size: int) -> tuple[int, tuple[int, int]]:
    """Hold the follower's files to ``size`` bytes (RLIMIT_FSIZE); its pid and the limits
    it had."""
    assert engine.proc is not None
    follower = _follower_pid(engine.proc.pid)
    limits = resource.prlimit(follower, resource.RLIMIT_FSIZE)
    resource.prlimit(follower, resource.RLIMIT_FSIZE, (size, limits[1]))
    return follower, limits


def _follower_pid(engine_pid: int) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == engine_pid and b"storage.follower" in cmdline:
            return int(entry)
    raise AssertionError(f"no follower process under the engine (pid {engine_pid})")


async def _settled(data: Path, user: str, ids: list[int]) -> None:
    """Until the follower has written the lines of ``ids`` and the position after them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + T
    position = -1
    while loop.time() < deadline:
        await asyncio.sleep(0.2)
        try:
            if _placed(data, user) == ids and _position(data) == position:
                return
            position = _position(data)
        except (OSError, AssertionError, ValueError):
            pass
    raise AssertionError(f"{user}'s audit log never showed orders {ids}")


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")
async def test_a_file_size_limit_on_the_follower_loses_no_line_and_writes_none_twice(
    engine: Engine,
) -> None:
    """The reviewer's case: a file size limit just above heavy.log's size cuts one write
    short and refuses the next; lifted, the rest of the cut line and the refused lines go
    out, once; a restart finds nothing to add."""
    data = engine.data
    heavy, ids, before, size = await _twenty_in_the_log(engine)
    follower, limits = _limit_follower(engine, size + 10)  # mid-line
    try:
        ids += await _rest(heavy, 10)
        await asyncio.sleep(1.0)  # several of the follower's appends
        assert (data / "logs" / "heavy.log").stat().st_size == size + 10  # a write cut short
        assert _position(data) == before  # not past the lines that are not in the file
    finally:
        resource.prlimit(follower, resource.RLIMIT_FSIZE, limits)
    ids += await _rest(heavy, 5)
    await _settled(data, "heavy", ids)
    assert await engine.stop() == 0
    assert _placed(data, "heavy") == ids
    stderr = engine.stderr.decode()
    assert stderr.count("cannot append to the audit log") == 1, stderr
    assert "heavy.log written again" in stderr, stderr

    await engine.start()
    assert await engine.stop() == 0
    assert _placed(data, "heavy") == ids


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")
async def test_lines_still_unwritten_at_a_stop_are_rebuilt_at_the_next_start(engine: Engine) -> None:
    """Stopped while the follower cannot append heavy's lines: no final snapshot lets the
    journal behind them go, the position stays before them, and the next start rebuilds
    them, each once. A start that cannot write them either is refused, saying why."""
    data = engine.data
    heavy, ids, before, size = await _twenty_in_the_log(engine)
    _limit_follower(engine, size)  # not one byte more
    ids += await _rest(heavy, 10)
    await asyncio.sleep(1.0)
    assert _position(data) == before
    assert await engine.stop(signal.SIGTERM) == 0  # the follower ends with the limit on
    assert _placed(data, "heavy") == ids[:20]
    assert _position(data) == before

    _block(data, "heavy")  # a start that cannot write the rebuilt lines must not go on
    err = await engine.refuse()
    assert "heavy.log" in err, err
    assert _position(data) == before
    _unblock(data, "heavy")

    await engine.start()
    heavy = await engine.client("heavy")
    ids += await _rest(heavy, 2)
    await _settled(data, "heavy", ids)
    assert await engine.stop() == 0
    assert _placed(data, "heavy") == ids
    await engine.start()
    assert await engine.stop() == 0
    assert _placed(data, "heavy") == ids
