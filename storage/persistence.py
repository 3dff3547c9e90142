"""Recovery at start-up and the snapshot cycle: ledger, snapshot and journal working together.

Theory of operation
-------------------
On disk (``--data-dir``): ``snapshot.json`` (the whole engine state as of journal record
``journal_lsn``), ``journal/*.wal`` (every accepted command after that), ``trades.jsonl``
(every trade, once). The three are kept in step by two rules:

1. *A trade reaches the ledger only after the command that made it is durable in the
   journal* (``TradeLedger`` durability gate). So the ledger never holds a trade that
   recovery cannot recreate, and trade ids are never handed out twice. (Under ``--fsync
   off`` "durable" means handed to the operating system: after a power cut the ledger may
   hold trades the journal lost. Recovery moves their lines to ``trades.lost-*.jsonl`` and
   keeps the ids counting after theirs.)
2. *A snapshot is written only after the ledger holds (fsynced) every trade of the state it
   records, and journal segments go only after the snapshot that covers them is durable.*
   So replaying the journal from the snapshot always recreates every trade the ledger
   may be missing, and nothing needed for recovery is ever deleted first.

``recover()`` (start-up, synchronous, before anything is served): read the snapshot (or
start empty when there is none), replay every journal record after it through the same
engine, give the ledger the trades it does not have yet (ids above its last), discard a
torn last record with a warning, and refuse with a clear error on anything else. Then it
opens a new segment, writes a fresh snapshot when anything was replayed, and removes the
journal segments it covers: the next start replays only what happens from now on. In that
order, so that a crash during recovery leaves a directory the next start recovers from.

``snapshot()`` (periodic and at shutdown): export the state and cut the journal at the
same instant (both on the event loop, between two commands), wait until the cut is
durable and the ledger synced, write the snapshot atomically in a worker thread, then
delete the old segments. With the follower process (``storage/follower.py``), the journal
is cut here and the follower, which replays the same journal, writes the snapshot of its
own state at that record or a little later, after syncing the ledger and the audit logs.
After a snapshot that failed, the next one keeps the cut it made rather than cutting again
(``_cut``): the segment it opened is covered only in part, read from where it left off.

Knows files and their order, not trading rules: the engine and ``exchange/state.py``
decide what the state means.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import orjson

from exchange.engine import Exchange
from exchange.markets import MarketConfig
from exchange.state import FinishedOrders, StateError, export_state, import_state, same_unit_markets
from exchange.types import CommandRejected, Event, ExecReport, ExecType, STPMode, Trade
from storage.lock import DataDirBusy, DataDirLock
from storage.journal import (
    JOURNAL_DIR, Journal, JournalError, cut_torn, decode, list_segments, read_journal,
    segment_name,
)
from storage.ledger import (
    LEDGER_FILE, LOST_PREFIX, LedgerError, TradeLedger, last_trade_id, lost_files, read_ledger,
    trade_line, unterminated_line, whole_record, write_lost,
)
from storage.snapshot import (
    SNAPSHOT_FILE, SnapshotError, read_snapshot, remove_leftover_temp_files, write_snapshot,
)

if TYPE_CHECKING:
    from storage.follower import FollowerProcess

log = logging.getLogger("storage.persistence")

# Seconds after a failed periodic snapshot before the next try: what fails it (a full disk,
# an audit log that cannot be appended to) seldom clears within a second, and every try
# cuts the journal and logs the failure.
SNAPSHOT_RETRY = 30.0


def names_its_orders(record: dict[str, Any]) -> bool:
    """Whether a ledger record carries both order ids: the ids a lost trade used, which
    must not be handed out again (``Persistence._lost_ids``)."""
    return all(type(record.get(key)) is int for key in ("buy_order_id", "sell_order_id"))


class FollowerError(Exception):
    """The follower process cannot do what was asked (message says why); the journal keeps
    everything, and the next start rebuilds what it did not write."""


class RecoveryError(Exception):
    """Start-up must stop: the data on disk cannot be recovered safely (message says why)."""


def config_fingerprint(config: MarketConfig) -> dict[str, Any]:
    """What the journal's commands depend on besides the state: markets and assets."""
    return {
        "assets": {name: a.decimals for name, a in config.assets.items()},
        "markets": [m.describe() for m in config.markets.values()],
    }


def load_finished(finished: FinishedOrders, content: dict[str, Any], config: MarketConfig, where: Path,
                  engine: Exchange) -> None:
    """A snapshot's finished orders into ``finished`` (``engine``: the snapshot's state,
    restored). What cannot be restored is left out
    with a log line, never a refused start: it is order history, not trading state. Orders
    of a market removed or given other units since are left out (their integers would be
    misread); snapshots from before finished orders were kept have none."""
    data = content.get("finished")
    if data is None:
        return
    saved = content.get("config")
    markets = None
    if saved is not None and not same_config(saved, config_fingerprint(config)):
        markets = same_unit_markets(saved, config)
    try:
        dropped = finished.load(data, markets, engine)
    except StateError as exc:
        log.error("snapshot %s: its finished orders cannot be restored (%s); order_status "
                  "will not answer for them", where, exc)
        return
    if dropped:
        log.warning("snapshot %s: %d finished orders of markets removed or given other units "
                    "since are left out; order_status will not answer for them", where, dropped)


class ReplayListener(Protocol):
    """Told of every command replayed at recovery (the audit log rebuilds lost lines)."""

    def replay_begin(self, snapshot_lsn: int) -> int:
        """Returns the position after which it wants the records."""

    def replay_record(self, lsn: int, events: list[Event]) -> None: ...

    def replay_end(self, lsn: int) -> None: ...


def same_config(saved: Any, current: dict[str, Any]) -> bool:
    """Whether a snapshot's market configuration is the current one, in whatever order the
    markets were listed: the engine keys everything by symbol, so the order changes nothing
    a replay depends on."""
    def normal(fp: Any) -> Any:
        if not isinstance(fp, dict) or not isinstance(fp.get("markets"), list):
            return fp
        markets = fp["markets"]
        if not all(isinstance(m, dict) for m in markets):
            return fp
        return {**fp, "markets": sorted(markets, key=lambda m: str(m.get("symbol")))}
    return bool(normal(saved) == normal(current))


class Persistence:
    """Owns the ledger, the journal and the snapshot file of one data directory."""

    def __init__(
        self,
        data_dir: str | Path,
        config: MarketConfig,
        default_stp: STPMode = STPMode.CANCEL_RESTING,
        fsync: str = "batch",
        snapshot_interval: float = 300.0,
        snapshot_records: int = 1_000_000,
        last_ts: Callable[[], int] | None = None,
        finished: FinishedOrders | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.default_stp = default_stp
        self.snapshot_path = self.data_dir / SNAPSHOT_FILE
        self.dir_lock = DataDirLock(self.data_dir, "an exchange")
        self.journal = Journal(self.data_dir / JOURNAL_DIR, fsync)
        self.ledger = TradeLedger(
            self.data_dir / LEDGER_FILE, config, mark=self.journal.mark, durable=self.journal.durable,
        )
        self.journal.on_durable.append(lambda _lsn: self.ledger.wake())
        self.snapshot_interval = snapshot_interval
        self.snapshot_records = snapshot_records
        self.last_ts = last_ts or (lambda: 0)
        # The finished orders ``order_status`` answers for (the gateway's): snapshotted with
        # the engine and rebuilt by the replay, so they survive a restart.
        self.finished = finished if finished is not None else FinishedOrders()
        self.engine: Exchange | None = None
        self.snapshot_lsn = 0
        self.recovered_ts = 0
        self.report: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._last_snapshot = time.monotonic()
        # Awaited before a snapshot at a journal position is written (the audit log catches
        # up to it): from then on, recovery never replays the records it covers.
        self.before_snapshot: Callable[[int], Awaitable[None]] | None = None
        # The journal was cut for a snapshot that then failed: the next one needs no new cut
        # (a segment a snapshot covers only in part is read from where it left off), so a
        # failure that lasts (an audit file that refuses appends) does not leave a segment
        # behind at every try.
        self._cut_unused = False
        # The follower process writing the ledger and the audit logs (storage/follower.py),
        # when the server uses one: set before ``start``; the ledger is then its to write.
        self.writer: FollowerProcess | None = None

    # -- start-up ---------------------------------------------------------------------

    def recover(self, replay: ReplayListener | None = None) -> Exchange:
        """Rebuild the engine from disk (see the module docstring); raises RecoveryError.

        Takes the data directory's lock first and keeps it until ``close``: a second
        exchange on the same directory is refused before it reads or touches anything.
        """
        try:
            self.dir_lock.acquire()
        except DataDirBusy as exc:
            raise RecoveryError(str(exc)) from None
        try:
            return self._recover(replay)
        except BaseException:
            self.dir_lock.release()
            raise

    def _recover(self, replay: ReplayListener | None) -> Exchange:
        started = time.perf_counter()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftover_temp_files(self.snapshot_path):
            log.warning("removed %s, a snapshot left half-written by a crash (the previous "
                        "snapshot is intact)", leftover)
        try:
            content = read_snapshot(self.snapshot_path)
        except SnapshotError as exc:
            raise RecoveryError(f"{exc}; the file is left as it is for inspection") from None
        fingerprint = config_fingerprint(self.config)
        if content is None:
            engine = Exchange(self.config, default_stp=self.default_stp)
            lsn, last_ts, saved_fingerprint = 0, 0, fingerprint
            snap_trades = 0
        else:
            try:
                lsn = content["journal_lsn"]
                last_ts = content.get("last_ts", 0)
                state = content["state"]
                saved_fingerprint = content.get("config", fingerprint)
                if type(lsn) is not int or lsn < 0 or type(last_ts) is not int:
                    raise StateError("journal_lsn and last_ts must be integers")
                engine = import_state(self.config, state)
            except (StateError, KeyError, TypeError) as exc:
                raise RecoveryError(
                    f"snapshot {self.snapshot_path} cannot be restored: {exc}; "
                    "the file is left as it is for inspection"
                ) from None
            snap_trades = engine.next_trade_id - 1
            load_finished(self.finished, content, self.config, self.snapshot_path, engine)
        snapshot_lsn = lsn

        # Replay the journal through the same engine.
        replayed_trades: list[Trade] = []
        finished = self.finished
        ts_box = [last_ts]
        config_matches = same_config(saved_fingerprint, fingerprint)  # once, not per record

        def apply(lsn: int, payload: bytes) -> None:
            if not config_matches:
                raise RecoveryError(
                    f"journal record {lsn} was accepted under a different market configuration "
                    f"than the current one (snapshot {self.snapshot_path}); start once with the "
                    "previous --markets file so the journal replays exactly, then change it"
                )
            try:
                command = decode(payload)
            except (ValueError, KeyError, TypeError) as exc:
                raise JournalError(f"journal record {lsn} cannot be decoded: {exc}") from None
            events = engine.handle(command)
            if len(events) == 1 and (
                isinstance(events[0], CommandRejected)
                or (isinstance(events[0], ExecReport) and events[0].exec_type is ExecType.REJECTED)
            ):
                raise JournalError(
                    f"journal record {lsn} ({type(command).__name__}) was accepted when written "
                    f"but is rejected on replay ({getattr(events[0], 'reason', '?')}): the journal "
                    "does not belong to this snapshot"
                )
            for ev in events:
                if ev.__class__ is Trade:
                    replayed_trades.append(ev)  # type: ignore[arg-type]
            finished.observe(events)
            if lsn > replay_after:
                replay.replay_record(lsn, events)  # type: ignore[union-attr]
            ts_box[0] = command.ts

        journal_dir = self.data_dir / JOURNAL_DIR
        if content is not None and not list_segments(journal_dir):
            # A snapshot is always followed by an open segment (rotation happens before the
            # snapshot is written), so none at all means the journal was lost or removed.
            first = journal_dir / segment_name(snapshot_lsn + 1)
            raise RecoveryError(
                f"the journal in {journal_dir} has no segment after snapshot record "
                f"{snapshot_lsn} ({self.snapshot_path}): it was removed or lost, and commands "
                "acknowledged after that snapshot would be silently dropped. Restore it; or, to "
                f"start from the snapshot alone on purpose, create the empty file {first}"
            )
        if content is None and not list_segments(journal_dir):
            self._refuse_foreign_ledger()
        replay_after = replay.replay_begin(lsn) if replay is not None else 1 << 62
        try:
            scan = read_journal(journal_dir, lsn, apply)
        except JournalError as exc:
            raise RecoveryError(f"{exc}; the journal is left as it is for inspection") from None
        except OSError as exc:
            raise RecoveryError(f"cannot read the journal in {journal_dir}: {exc}") from None
        lsn = scan.last_lsn
        if scan.torn is not None:
            log.warning(
                "journal %s: discarded a torn last record at byte %d (%d bytes); it was never "
                "acknowledged", scan.torn.path, scan.torn.offset, scan.torn.size,
            )
        engine.check_invariants()

        # The ledger, once the state is known: its last line may be a whole record that lost
        # only its newline (kept when it is the trade the state has next); it must hold every
        # trade the snapshot counts (nothing could recreate them); replay adds the rest.
        ledger = self.ledger
        try:
            ledger_last = last_trade_id(ledger.path)
            tail = unterminated_line(ledger.path)
        except (LedgerError, OSError) as exc:
            raise RecoveryError(str(exc)) from None
        # Trades an earlier recovery moved out of the ledger (``_move_lost_trades``): their
        # ids were skipped, so the ledger lacks them by design.
        lost_trades, lost_orders = self._lost_ids()
        expected = ledger_last + 1
        while expected in lost_trades:
            expected += 1
        keep = bool(tail) and self._next_trade_line(tail, expected, engine, snap_trades, replayed_trades)
        if keep:
            ledger_last = expected
        if ledger_last < snap_trades and sum(
                ledger_last < i <= snap_trades for i in lost_trades) < snap_trades - ledger_last:
            self._ledger_short(ledger_last, snap_trades)
        try:
            ledger.open(keep_last_line=keep)
        except (LedgerError, OSError) as exc:
            raise RecoveryError(str(exc)) from None
        missing = [t for t in replayed_trades if t.trade_id > ledger_last]
        if missing:
            ledger.add(missing)
        if ledger_last >= engine.next_trade_id:
            self._move_lost_trades(engine)
            lost_trades, lost_orders = self._lost_ids()  # with the side file just written
        # Ids continue after every id of a trade the state lost: a trader was told of them.
        bumped = False
        if lost_trades and max(lost_trades) >= engine.next_trade_id:
            engine.next_trade_id = max(lost_trades) + 1
            bumped = True
        if lost_orders >= engine.next_order_id:
            engine.next_order_id = lost_orders + 1
            bumped = True
        if bumped:
            log.warning("ids continue after those of the trades in %s: next trade id %d, next "
                        "order id %d", self.data_dir / (LOST_PREFIX + "*.jsonl"),
                        engine.next_trade_id, engine.next_order_id)
        engine.default_stp = self.default_stp
        self.engine = engine
        self.recovered_ts = ts_box[0]

        # Make the recovered state the new starting point, then journal afresh after it.
        needs_snapshot = (
            content is None or scan.records > 0 or scan.torn is not None or bumped
            or not config_matches or lsn != snapshot_lsn
            or content.get("state", {}).get("default_stp") != self.default_stp.value
        )
        ledger.sync_blocking()  # every trade of the state is in the ledger before the snapshot
        if replay is not None:
            # Before the snapshot: once it covers these records, they are never replayed again.
            replay.replay_end(lsn)
        # In this order, so that a crash (or Ctrl-C) at any step leaves a directory the next
        # start recovers from by itself; deleting the old segments before the new one
        # existed left a snapshot with no journal after it, which is refused as a lost one.
        # 1. The torn record goes (never acknowledged): the journal ends cleanly at ``lsn``,
        #    so a segment may follow it.
        if scan.torn is not None:
            cut_torn(scan.torn)
        # 2. The new segment at ``lsn + 1``, durable with its directory entry: read after
        #    the old segments, it holds nothing; read after the new snapshot, it is all
        #    there is to read (``read_journal`` skips the segments the snapshot covers).
        self.journal.open(lsn + 1)
        # 3. The snapshot at ``lsn`` (atomic: the old one or the new one, never a mix).
        if needs_snapshot:
            write_snapshot(self.snapshot_path, self._content(engine, lsn, self.recovered_ts))
        self.snapshot_lsn = lsn
        # 4. The segments it covers, oldest first: any of them left over is skipped unread.
        self.journal.remove_before(lsn + 1)
        self.report = {
            "snapshot": content is not None, "snapshot_lsn": snapshot_lsn, "replayed": scan.records,
            "torn": scan.torn is not None, "lsn": lsn, "ledger_added": len(missing),
            "seconds": round(time.perf_counter() - started, 3), "orders": len(engine.orders),
            "next_order_id": engine.next_order_id, "next_trade_id": engine.next_trade_id,
        }
        log.info(
            "recovered: snapshot %s (record %d), %d journal records replayed%s, %d open orders, "
            "%d trades added to the ledger, in %.2f s",
            "yes" if content is not None else "none", snapshot_lsn, scan.records,
            ", torn tail discarded" if scan.torn is not None else "", len(engine.orders),
            len(missing), self.report["seconds"],
        )
        return engine

    def _next_trade_line(self, line: bytes, expected: int, engine: Exchange, snap_trades: int,
                         replayed: list[Trade]) -> bool:
        """Whether a ledger's last line without its newline is the whole record of trade
        ``expected``, the one the recovered state has right after the ledger's last: then
        only the newline was lost (a power cut between the two), and the line is kept. A
        replayed trade must match byte for byte; one the snapshot covers has no journal left
        to compare with, and a whole record with the right id is taken as it. One beyond the
        state is kept too, to be moved out with the other lines the state lacks
        (``_move_lost_trades``)."""
        record = whole_record(line)
        if record is None:
            return False
        trade_id = record["trade_id"]
        if trade_id != expected:
            return False
        if trade_id >= engine.next_trade_id:  # beyond the state: kept, then moved out with the
            # others it lacks, which needs its order ids (else it is not a whole record)
            return names_its_orders(record)
        if trade_id > snap_trades:
            trade = replayed[trade_id - snap_trades - 1]
            assert trade.trade_id == trade_id
            return line + b"\n" == trade_line(trade, self.config)
        return True

    def _move_lost_trades(self, engine: Exchange) -> None:
        """The ledger holds trades beyond the recovered state: the journal lost (or never
        kept) the commands that made them, yet they were acknowledged and written. Their
        lines move to a side file, so the ledger again matches the state, and
        ``_recover`` keeps their ids from being handed out again.

        The side file is durable before the ledger is cut, and the ids are taken from the
        side files at every start: a crash anywhere in between repeats or finishes the move,
        and the fresh snapshot recovery writes next carries the counters."""
        ledger = self.ledger
        try:
            offset, data, damaged = ledger.lines_from(engine.next_trade_id)
        except OSError as exc:
            raise RecoveryError(f"cannot read the ledger {ledger.path}: {exc}") from None
        if not data:
            return
        records = [orjson.loads(line) for line in data.splitlines()]
        ids = [r["trade_id"] for r in records]
        # Checked before anything moves: a move cut short by a bad line would leave the
        # ledger ending in it, which no start could read.
        if damaged:
            raise RecoveryError(
                f"ledger {ledger.path} holds trades {ids[0]}..{ids[-1]} beyond the recovered state "
                f"(next trade id {engine.next_trade_id}), and the line before them is not a trade "
                "record: the file is damaged there. Restore it from a copy"
            )
        for record in records:
            if not names_its_orders(record):
                raise RecoveryError(
                    f"ledger {ledger.path}: trade {record['trade_id']}, beyond the recovered state, "
                    "lacks its order ids, so the ids it used cannot be kept from being handed out "
                    "again. Restore the file from a copy"
                )
        try:
            side = write_lost(self.data_dir, data)
            ledger.truncate(offset)
        except (OSError, LedgerError) as exc:
            raise RecoveryError(f"cannot move the ledger's lines the state lacks aside: {exc}") from None
        log.error(
            "ledger %s held trades %d..%d that the recovered state does not have (next trade id "
            "%d): the journal lost the commands that made them, to a power cut or kernel crash "
            "under --fsync off, or to a damaged journal. Those trades and the commands after "
            "them are not in the state; their ledger lines are moved to %s so that the ledger "
            "matches the state, and trade and order ids continue after theirs",
            ledger.path, ids[0], ids[-1], engine.next_trade_id, side,
        )

    def _lost_ids(self) -> tuple[set[int], int]:
        """The trade ids in the side files of lost ledger lines, and their highest order id
        (0 if none). Read at every start, and the counters kept above them: a crash after a
        move cut the ledger but before the snapshot carried the counters loses nothing."""
        trades: set[int] = set()
        orders = 0
        for path in lost_files(self.data_dir):
            try:
                for record in read_ledger(path):
                    trades.add(int(record["trade_id"]))
                    orders = max(orders, int(record["buy_order_id"]), int(record["sell_order_id"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise RecoveryError(
                    f"{path} (ledger lines an earlier recovery moved aside) cannot be read as "
                    f"trade records ({exc}); it tells the trades the state lost from a ledger cut "
                    "short, and ids must continue after theirs: restore it"
                ) from None
        return trades, orders

    def _refuse_foreign_ledger(self) -> None:
        """No snapshot and no journal, yet a ledger with trades: an exchange never leaves a
        directory so (its first start writes both before any trade), but an embedded
        simulation does (it writes only ``trades.jsonl``). Taking those trades as lost ones
        of this exchange would be wrong, and so would appending to them."""
        path = self.ledger.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RecoveryError(f"cannot read the ledger {path}: {exc}") from None
        if size:
            raise RecoveryError(
                f"{self.data_dir} holds a trade ledger ({path.name}) but no snapshot and no journal: "
                "it is not an exchange's data directory (an embedded simulation's, say, which "
                "writes only the ledger). Start the exchange with another --data-dir; or move "
                f"{path.name} aside to start a new exchange here"
            )

    def _ledger_short(self, ledger_last: int, snap_trades: int) -> None:
        """The ledger lacks trades the snapshot counts. It held them, fsynced, before that
        snapshot was written (rule 2), so the file was cut short, replaced or damaged since,
        and the journal that made them is gone: refuse, leaving the files as they are (the
        exchange would append after the hole for good). A ledger removed altogether is taken
        as moved aside on purpose, the way out the message names: a new one starts."""
        path = self.ledger.path
        if not path.exists():
            log.error(
                "ledger %s is missing but the snapshot %s already counts %d trades: trades 1..%d "
                "are in no ledger and cannot be recreated; a new ledger starts at trade %d",
                path, self.snapshot_path, snap_trades, snap_trades, snap_trades + 1,
            )
            return
        raise RecoveryError(
            f"ledger {path} ends at trade {ledger_last} but the snapshot {self.snapshot_path} "
            f"already counts {snap_trades} trades: trades {ledger_last + 1}..{snap_trades} are "
            "missing, and the journal that made them is gone (the snapshot covers it), so they "
            "cannot be recreated; the ledger was cut short or damaged after it was written (or an "
            f"earlier recovery moved them to a {LOST_PREFIX}*.jsonl file that is gone: put it back). "
            "Restore it from a copy; or, to go on without those trades on purpose, move it "
            f"aside (a new ledger then starts at trade {snap_trades + 1}). The files are left as "
            "they are"
        )

    def _content(self, engine: Exchange, lsn: int, last_ts: int) -> dict[str, Any]:
        return {
            "journal_lsn": lsn,
            "last_ts": last_ts,
            "written_ns": time.time_ns(),
            "config": config_fingerprint(self.config),
            "state": export_state(engine),
            "finished": self.finished.export(),
        }

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the ledger writer and the periodic snapshots (after ``recover``)."""
        self._lock = asyncio.Lock()
        if self.writer is not None:
            self.ledger.close_blocking()  # recovery left it complete; the follower appends
        else:
            self.ledger.start()
        if self.snapshot_interval > 0 or self.snapshot_records > 0:
            self._task = asyncio.get_running_loop().create_task(self._periodic(), name="snapshots")

    async def _periodic(self) -> None:
        retry_at = 0.0
        while True:
            await asyncio.sleep(min(1.0, self.snapshot_interval) if self.snapshot_interval > 0 else 1.0)
            behind = self.journal.last_lsn - self.snapshot_lsn
            if not behind or time.monotonic() < retry_at:
                continue
            due = self.snapshot_interval > 0 and (
                time.monotonic() - self._last_snapshot >= self.snapshot_interval)
            if due or (self.snapshot_records > 0 and behind >= self.snapshot_records):
                try:
                    await self.snapshot()
                except Exception:
                    log.exception("periodic snapshot failed; the journal keeps everything (next "
                                  "try in %.0f s)", SNAPSHOT_RETRY)
                    retry_at = time.monotonic() + SNAPSHOT_RETRY

    async def snapshot(self) -> bool:
        """Write a snapshot of the current state; returns False if nothing changed.

        Shielded: cancelling the caller (shutdown stops the periodic task) must not abandon
        a snapshot that a worker thread is still writing; the lock then orders that write
        before the final one, so an older snapshot can never land over a newer.
        """
        return await asyncio.shield(self._snapshot())

    async def _snapshot(self) -> bool:
        assert self.engine is not None and self._lock is not None
        async with self._lock:
            journal = self.journal
            lsn = journal.last_lsn
            if lsn == self.snapshot_lsn and self.snapshot_path.exists():
                return False
            started = time.perf_counter()
            if self.writer is not None:
                return await self._snapshot_by_writer(lsn, started)
            # Same instant, no await between: the state is exactly records 1..lsn.
            content = self._content(self.engine, lsn, self.last_ts())
            self._cut()
            await journal.wait_durable(lsn)
            await self.ledger.sync()
            if self.before_snapshot is not None:
                await self.before_snapshot(lsn)
            loop = asyncio.get_running_loop()
            size = await loop.run_in_executor(None, write_snapshot, self.snapshot_path, content)
            self.snapshot_lsn = lsn
            self._last_snapshot = time.monotonic()
            self._cut_unused = False
            removed = await loop.run_in_executor(None, journal.remove_before, lsn + 1)
            log.info("snapshot at journal record %d: %d open orders, %d bytes, %.2f s; %d old "
                     "journal segments removed", lsn, len(self.engine.orders), size,
                     time.perf_counter() - started, removed)
            return True

    def _cut(self) -> None:
        """Start a new journal segment for the snapshot about to be written, unless a failed
        one's cut is still unused."""
        if not self._cut_unused:
            self.journal.rotate()
            self._cut_unused = True

    async def _snapshot_by_writer(self, lsn: int, started: float) -> bool:
        """The follower holds the same state (it replays the same journal): it writes the
        snapshot, at ``lsn`` or a little later, so the event loop never pauses to export a
        large book. The journal is cut here first, so the segments before the cut can go
        once the snapshot covers them."""
        assert self.writer is not None
        if not self.writer.alive:  # before cutting the journal: nothing to cut it for
            raise FollowerError("the ledger and audit-log writer is not running")
        journal = self.journal
        self._cut()
        await journal.wait_durable(lsn)
        at = await self.writer.snapshot_through(lsn, self.last_ts())
        self.snapshot_lsn = at
        self._last_snapshot = time.monotonic()
        self._cut_unused = False
        removed = await asyncio.get_running_loop().run_in_executor(None, journal.remove_before, at + 1)
        log.info("snapshot at journal record %d (written by the follower), %.2f s; %d old journal "
                 "segments removed", at, time.perf_counter() - started, removed)
        return True

    async def close(self, release_lock: bool = True) -> None:
        """Final snapshot, then the journal and the ledger, durable and closed.

        ``release_lock=False`` keeps the data directory locked: the server still has the
        audit log to close, and another exchange must not start on it meanwhile.
        """
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.journal.failed is None:
            await self.journal.wait_durable()
            if self.engine is not None and self._lock is not None:
                try:
                    await self.snapshot()
                except (FollowerError, OSError) as exc:  # OSError: the audit log is behind, say
                    log.error("no final snapshot: %s; the next start replays the journal", exc)
        try:
            try:
                await self.journal.close()
            finally:
                if self.writer is not None:
                    await self.writer.close(self.journal.durable_lsn)
            await self.ledger.close()
        finally:
            if release_lock:
                self.dir_lock.release()
