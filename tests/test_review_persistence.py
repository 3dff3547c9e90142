"""Bugs a review of the persistence layer found, each pinned by a test that failed before its fix.

A shutdown during a periodic snapshot let the stale snapshot land over the final one (and
the journal it needed was already gone); a transient ledger write error dropped the trades
it was writing; a journal removed after a snapshot went unnoticed. Each test is bounded (every wait has a timeout) and runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import storage.persistence as persistence_mod
from client import ExchangeClient
from exchange.server import ExchangeServer, ServerConfig, StartupError
from storage.ledger import read_ledger
from storage.snapshot import write_snapshot as real_write_snapshot

T = 10.0


def _server(data: Path, **kw: object) -> ExchangeServer:
    return ExchangeServer(ServerConfig(port=0, data_dir=data, stats_interval=0, **kw))  # type: ignore[arg-type]


async def _client(srv: ExchangeServer, user: str) -> ExchangeClient:
    assert srv.address is not None
    c = ExchangeClient(*srv.address, timeout=T)
    await asyncio.wait_for(c.connect(), T)
    await asyncio.wait_for(c.login(user), T)
    return c


def _abort(*clients: ExchangeClient) -> None:
    for c in clients:
        c.abort()


async def test_sigterm_during_a_periodic_snapshot_keeps_the_data_recoverable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    calls: list[int] = []

    def slow_first_write(path, content, durable=True):  # type: ignore[no-untyped-def]
        calls.append(content["journal_lsn"])
        if len(calls) == 1:
            time.sleep(1.0)  # a large book / slow disk: the periodic write takes a while
        return real_write_snapshot(path, content, durable)

    # The server's own snapshot path (with the follower process, the follower writes them
    # one request at a time, in order: test_follower.py).
    srv = _server(data, snapshot_interval=0.2, writer="inline")
    await asyncio.wait_for(srv.start(), T)
    monkeypatch.setattr(persistence_mod, "write_snapshot", slow_first_write)
    alice = await _client(srv, "alice")
    try:
        await asyncio.wait_for(alice.sell("BTC-USD", "1", "100.00"), T)
        for _ in range(100):  # until the periodic snapshot is inside its (slow) write
            if calls:
                break
            await asyncio.sleep(0.02)
        assert calls, "the periodic snapshot did not start"
        ack = await asyncio.wait_for(alice.sell("BTC-USD", "1", "101.00"), T)  # acknowledged
    finally:
        _abort(alice)
        await asyncio.wait_for(srv.stop(), T)  # SIGTERM path: cancels the periodic snapshot
    monkeypatch.setattr(persistence_mod, "write_snapshot", real_write_snapshot)
    await asyncio.sleep(1.2)  # the cancelled write finishes in its thread (asyncio.run would wait)

    again = _server(data)
    try:
        await asyncio.wait_for(again.start(), T)
    except StartupError as exc:
        pytest.fail(f"restart after a clean stop refused: {exc}")
    try:
        assert ack["order_id"] in again.engine.orders, "an acknowledged order was lost"
    finally:
        await asyncio.wait_for(again.stop(), T)


async def test_a_transient_ledger_write_error_does_not_lose_trades(tmp_path: Path) -> None:
    """The in-process ledger writer (with the follower process, an error stops the follower
    and it is restarted: test_follower.py)."""
    data = tmp_path / "data"
    srv = _server(data, writer="inline")
    await asyncio.wait_for(srv.start(), T)
    ledger = srv.ledger
    real_append = ledger._append
    failures = [0]

    def flaky(chunk: bytes, fsync: bool) -> None:
        if chunk and not failures[0]:
            failures[0] += 1
            raise OSError(28, "No space left on device")
        real_append(chunk, fsync)

    ledger._append = flaky  # type: ignore[method-assign]
    alice, bob = await _client(srv, "alice"), await _client(srv, "bob")
    try:
        await asyncio.wait_for(alice.sell("BTC-USD", "1", "100.00"), T)
        await asyncio.wait_for(bob.buy("BTC-USD", "0.5", "100.00"), T)  # trade 1
        for _ in range(100):
            if failures[0]:
                break
            await asyncio.sleep(0.02)
        assert failures[0], "the ledger write did not fail"
        await asyncio.sleep(1.2)  # the writer's back-off after the error
        await asyncio.wait_for(bob.buy("BTC-USD", "0.5", "100.00"), T)  # trade 2
    finally:
        _abort(alice, bob)
        await asyncio.wait_for(srv.stop(), T)  # final snapshot, journal segments removed

    again = _server(data, writer="inline")
    await asyncio.wait_for(again.start(), T)  # recovery: the ledger should be complete
    await asyncio.wait_for(again.stop(), T)
    ids = [t["trade_id"] for t in read_ledger(data / "trades.jsonl")]
    assert ids == [1, 2]


async def test_a_journal_removed_after_a_snapshot_refuses_to_start(tmp_path: Path) -> None:
    from exchange.server import ExchangeServer, ServerConfig, StartupError

    data = tmp_path / "data"
    srv = ExchangeServer(ServerConfig(port=0, data_dir=data, stats_interval=0))
    await asyncio.wait_for(srv.start(), 10)
    await asyncio.wait_for(srv.stop(), 10)
    journal = data / "journal"
    segments = sorted(journal.iterdir())
    assert segments, "a stopped exchange leaves the segment that follows its snapshot"
    for path in segments:
        path.unlink()
    again = ExchangeServer(ServerConfig(port=0, data_dir=data, stats_interval=0))
    with pytest.raises(StartupError, match="no segment after snapshot record") as refused:
        await asyncio.wait_for(again.start(), 10)
    assert segments[0].name in str(refused.value)
    # The way out the message names: an empty segment right after the snapshot.
    segments[0].touch()
    third = ExchangeServer(ServerConfig(port=0, data_dir=data, stats_interval=0))
    await asyncio.wait_for(third.start(), 10)
    await asyncio.wait_for(third.stop(), 10)
