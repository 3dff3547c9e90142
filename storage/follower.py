"""The follower: a second process that writes the trade ledger and the audit logs from the journal.

Why a process. With the ledger and the audit log written by the server itself, holding
each command's events and formatting their lines took about a third of the server's one
busy core: the pipelined gateway benchmark acknowledged ~74,000 orders a second with them
and ~105,000 without (docs/performance.md). The engine is deterministic and every accepted
command is in the journal, so a second process can replay the journal through its own
engine, get exactly the server's events, and write both files on the machine's other core.
Crash recovery already rebuilds audit lines and ledger trades that way; the follower simply
never stops doing it.

Theory of operation
-------------------
The server starts the follower after its own recovery (``python -m storage.follower``), so
the follower begins from a consistent directory: ``snapshot.json`` at journal record ``S``,
a ledger holding every trade of that state, audit logs written through ``logs/.position``.
It loads the snapshot, then reads the journal after ``S`` as it grows, and for each record
runs the command through its engine: trades above the ledger's last id go to the ledger,
lines of records after the audit position go to the users' files (the same code as
recovery's rebuild, which also skips lines a crash left written but uncounted).

The server talks to it over its standard input and output, one short line each way:

* ``d <lsn>``: the journal is durable through ``lsn``. The follower reads only that far, so
  the files never hold a trade or a line of a command that a crash could still take back
  (the same rule the in-process writers follow).
* ``s <lsn>``: write and fsync everything through ``lsn``, then answer ``synced <lsn>``
  (``ExchangeServer.flush_logs``).
* ``n <lsn> <ts>``: write the snapshot (the server cut the journal after ``lsn``, or
  earlier when a failed snapshot's cut is reused): the
  follower holds the same state as the server, so it writes and fsyncs the ledger and the
  audit logs, exports its own engine at its position (``lsn`` or a little later) and
  writes ``snapshot.json``, then answers ``snapshot <position>``; the server then deletes
  the journal segments it covers (``storage/persistence.py``, rule 2). While audit lines
  are kept unwritten (a user's file refused an append) it answers ``snapfail`` instead:
  the journal must stay (it rebuilds at the next start what is still unwritten). Exporting a large
  book takes a fraction of a second, which the server's event loop no longer pauses for.
* end of input: the server is stopping: finish through the last durable record, fsync,
  exit 0. The follower also dies with the server (``PR_SET_PDEATHSIG``), and holds
  ``<data>/.follower.lock`` while it runs, so a server restarted after a crash recovers
  only once the old follower is gone.

Commands refused by the engine are not journaled; the server writes their audit lines
itself (``AuditLog`` without a journal gate), as it writes nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import select
import signal
import sys
import time
from pathlib import Path

from exchange.markets import ConfigError, MarketConfig, default_config, load_config
from exchange.protocol import Formatter
from exchange.state import FinishedOrders, StateError, export_state, import_state
from storage.audit import POSITION_FILE, AuditLog
from storage.journal import JOURNAL_DIR, JournalError
from storage.ledger import LEDGER_FILE, TradeLedger
from storage.persistence import FollowerError, config_fingerprint, load_finished, same_config
from storage.snapshot import SNAPSHOT_FILE, SnapshotError, read_snapshot, write_snapshot
from storage.tail import JournalTail, Replay

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("storage.follower")

LOCK_FILE = ".follower.lock"
LEDGER_INTERVAL = 0.05  # seconds between ledger appends while records arrive
AUDIT_INTERVAL = 0.2  # seconds between audit-log appends (one open and write per user)
ROOT = Path(__file__).resolve().parent.parent


class Follower:
    """The follower's state: an engine at the journal's position, and the two writers."""

    def __init__(self, data_dir: Path, config: MarketConfig) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.ledger = TradeLedger(self.data_dir / LEDGER_FILE, config)
        # A journal gate that is always open: the follower only reads durable records.
        self.audit = AuditLog(self.data_dir / "logs", config, formatter=Formatter(config),
                              mark=lambda: 0, durable=None)
        self._synced_at = 0.0  # wall time of the last audit fsync (0: fsync every file once)
        self._tail: JournalTail | None = None
        self._replay: Replay | None = None

    @property
    def lsn(self) -> int:
        """The journal position the follower's engine is at."""
        return self._replay.lsn if self._replay is not None else 0

    def start(self) -> int:
        """Load the snapshot and open the files; returns the journal position it starts at."""
        path = self.data_dir / SNAPSHOT_FILE
        try:
            content = read_snapshot(path)
        except SnapshotError as exc:
            raise FollowerError(str(exc)) from None
        if content is None:
            raise FollowerError(f"no snapshot in {self.data_dir}: the server writes one at start-up")
        if not same_config(content.get("config"), config_fingerprint(self.config)):
            raise FollowerError("the snapshot was written under another market configuration")
        try:
            engine = import_state(self.config, content["state"])
        except (StateError, KeyError, TypeError) as exc:
            raise FollowerError(f"snapshot {path} cannot be restored: {exc}") from None
        finished = FinishedOrders()
        load_finished(finished, content, self.config, path, engine)
        lsn = int(content["journal_lsn"])
        self._replay = Replay(engine, self.audit, lsn, int(content.get("last_ts", 0)), finished)
        self.ledger.open()
        self.audit.replay_begin(lsn)
        self._tail = JournalTail(self.data_dir / JOURNAL_DIR, lsn)
        return lsn

    def advance(self, upto: int) -> int:
        """Run the durable records up to ``upto``; returns how many."""
        assert self._tail is not None and self._replay is not None
        return self._tail.read(upto, self._replay)

    def snapshot(self, last_ts: int) -> int:
        """Write ``snapshot.json`` of the state at the current position, once the ledger and
        the audit logs hold (fsynced) everything it covers; returns that position. The
        export runs here, so the server's event loop never pauses for it. ``OSError`` if
        audit lines are still unwritten (an append failed): the journal they could be
        rebuilt from must stay."""
        self.sync()
        self.audit.require_written("no snapshot")
        self._fsync_audit()  # the journal behind the snapshot goes: the lines must stay
        replay = self._replay
        assert replay is not None
        content = {
            "journal_lsn": replay.lsn,
            "last_ts": max(last_ts, replay.last_ts),
            "written_ns": time.time_ns(),
            "config": config_fingerprint(self.config),
            "state": export_state(replay.engine),
            "finished": replay.finished.export(),
        }
        write_snapshot(self.data_dir / SNAPSHOT_FILE, content)
        return self.lsn

    def _fsync_audit(self) -> None:
        """Make the audit files written since the last snapshot durable, and the position."""
        since = self._synced_at
        self._synced_at = time.time() - 1.0  # mtime granularity: overlap a little
        directory = self.audit.directory
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            try:
                if entry.name.endswith(".log") or entry.name == POSITION_FILE:
                    if entry.stat().st_mtime >= since:
                        fd = os.open(entry.path, os.O_RDONLY)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
            except OSError as exc:
                log.error("cannot fsync the audit log %s: %s", entry.path, exc)

    def sync(self) -> None:
        """Everything run so far in the files; the ledger fsynced."""
        self.write_ledger(fsync=True)
        self.write_audit()

    def write_ledger(self, fsync: bool = False) -> None:
        replay = self._replay
        trades = replay.trades if replay is not None else []
        if trades or fsync:
            self.ledger.add(trades)
            if replay is not None:
                replay.trades = []
            self.ledger.write_blocking(fsync)

    def write_audit(self) -> None:
        self.audit.write_through(self.lsn)

    def close(self) -> None:
        self.sync()
        self.audit.report_unwritten()
        if self._tail is not None:
            self._tail.close()
        self.ledger.close_blocking()


def _die_with_parent() -> None:
    """Linux: be killed when the server dies, however it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: end of input still works
        pass


def _lock(data_dir: Path) -> int | None:
    """Hold ``.follower.lock`` for the process's life (the kernel drops it at exit)."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def wait_for_old_follower(data_dir: Path, timeout: float = 10.0) -> bool:
    """Until no follower of an earlier server holds the directory; False on timeout."""
    if fcntl is None:  # pragma: no cover
        return True
    path = Path(data_dir) / LOCK_FILE
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
    finally:
        os.close(fd)  # drops the lock if we took it


def run(data_dir: Path, config: MarketConfig, parent: int | None) -> int:
    """The follower's loop (see the module docstring for the protocol)."""
    lock = _lock(data_dir)
    follower = Follower(data_dir, config)
    out = sys.stdout.buffer
    try:
        start = follower.start()
    except (FollowerError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    out.write(b"ready %d\n" % start)
    out.flush()
    durable = start
    syncs: list[int] = []
    snaps: list[tuple[int, int]] = []  # snapshot requests: (through lsn, the server's clock)
    last_ledger = last_audit = time.monotonic()
    dirty = False
    stdin = sys.stdin.fileno()
    pending = b""
    eof = False
    try:
        while not eof:
            ready, _, _ = select.select([stdin], [], [], LEDGER_INTERVAL if dirty else 1.0)
            if ready:
                data = os.read(stdin, 1 << 16)
                if not data:
                    eof = True
                pending += data
                lines = pending.split(b"\n")
                pending = lines.pop()
                for line in lines:
                    kind, _, value = line.partition(b" ")
                    if kind == b"d":
                        durable = max(durable, int(value))
                    elif kind == b"s":
                        syncs.append(int(value))
                    elif kind == b"n":
                        lsn_text, _, ts_text = value.partition(b" ")
                        snaps.append((int(lsn_text), int(ts_text or b"0")))
            elif parent is not None and os.getppid() != parent:
                return 0  # the server is gone (PR_SET_PDEATHSIG missing): recovery takes over
            if follower.advance(durable):
                dirty = True
            now = time.monotonic()
            while snaps and snaps[0][0] <= follower.lsn:
                _, last_ts = snaps.pop(0)
                try:
                    out.write(b"snapshot %d\n" % follower.snapshot(last_ts))
                except (OSError, ValueError) as exc:
                    log.error("cannot write the snapshot: %s", exc)
                    out.write(b"snapfail\n")
                out.flush()
                last_ledger = last_audit = now
            if syncs or eof:
                follower.sync()
                done = [lsn for lsn in syncs if lsn <= follower.lsn]
                syncs = [lsn for lsn in syncs if lsn > follower.lsn]
                for lsn in done:
                    out.write(b"synced %d\n" % lsn)
                out.flush()
                last_ledger = last_audit = now
                dirty = follower.audit.behind  # lines kept after a failed append: try again
                continue
            if dirty and now - last_ledger >= LEDGER_INTERVAL:
                follower.write_ledger()
                last_ledger = now
            if dirty and now - last_audit >= AUDIT_INTERVAL:
                follower.write_ledger()  # never an audit line for a trade the ledger lacks
                last_ledger = now
                follower.write_audit()
                last_audit = now
                dirty = follower.audit.behind  # lines kept after a failed append: try again
    except (FollowerError, JournalError, OSError) as exc:
        log.error("stopped: %s (the journal keeps everything; the next start rebuilds it)", exc)
        return 1
    finally:
        try:
            follower.close()
        finally:
            if lock is not None:
                os.close(lock)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m storage.follower", description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--markets", type=Path, default=None)
    ap.add_argument("--parent", type=int, default=None, help="the server's pid")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C, and a SIGTERM to the whole process group (systemd, ``kill -TERM -PGID``), are
    # the server's to handle: it stops the follower last, through end of input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if args.parent is not None and os.getppid() != args.parent:
        return 0
    from exchange.runtime import tune_gc, tune_malloc

    tune_malloc()
    tune_gc()
    try:
        config = load_config(args.markets) if args.markets else default_config()
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    return run(args.data_dir, config, args.parent)


class FollowerProcess:
    """The server's handle on its follower: starts it, tells it what is durable, asks it
    to sync before a snapshot, restarts it if it dies, stops it last."""

    RESTART_DELAY = 1.0  # first restart; doubles while restarts keep failing, up to 30 s

    def __init__(self, data_dir: Path, markets_file: Path | None, log_level: str = "INFO") -> None:
        self.data_dir = Path(data_dir)
        self.markets_file = markets_file
        self.log_level = log_level
        self.durable = 0
        self.synced = 0
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._notify: asyncio.TimerHandle | None = None
        self._sent = 0
        self._closing = False
        self._restart: asyncio.TimerHandle | None = None
        self._ready: asyncio.Future[int] | None = None
        self._delay = self.RESTART_DELAY
        self._snapshots: list[asyncio.Future[int]] = []  # answered in the order asked
        self._started = 0.0

    async def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until it has loaded the snapshot (``FollowerError`` if it cannot)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "storage.follower", "--data-dir", str(self.data_dir),
               "--parent", str(os.getpid()), "--log-level", self.log_level]
        if self.markets_file is not None:
            cmd += ["--markets", str(self.markets_file)]
        self._sent = 0
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )
        if self._closing:  # closed while this one was being started (a restart)
            proc.kill()
            await proc.wait()
            raise FollowerError("the exchange is stopping")
        self._proc = proc
        self._started = time.monotonic()
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._reader = loop.create_task(self._read(self._proc), name="follower")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            self._proc.kill()
            raise FollowerError(f"the ledger and audit-log writer did not start in {timeout:.0f} s") from None
        self._send()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            kind, _, value = line.strip().partition(b" ")
            if kind == b"ready":
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(int(value))
            elif kind in (b"snapshot", b"snapfail"):
                fut = self._snapshots.pop(0) if self._snapshots else None
                if fut is not None and not fut.done():
                    if kind == b"snapshot":
                        fut.set_result(int(value))
                    else:
                        fut.set_exception(FollowerError("the follower could not write the snapshot "
                                                        "(its reason is logged above)"))
            elif kind == b"synced":
                self.synced = max(self.synced, int(value))
                still = []
                for lsn, waiter in self._waiters:
                    if lsn <= self.synced:
                        if not waiter.done():
                            waiter.set_result(None)
                    else:
                        still.append((lsn, waiter))
                self._waiters = still
        code = await proc.wait()
        failure = FollowerError(f"the ledger and audit-log writer exited with code {code} (its "
                                "reason is logged above)")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(failure)
            self._ready.exception()  # retrieved: ``start`` may have given up waiting already
        self._fail_waiters(failure)
        if not self._closing and proc is self._proc:
            if time.monotonic() - self._started > 60.0:
                self._delay = self.RESTART_DELAY  # it had been running: not a crash loop
            log.error("the ledger and audit-log writer (pid %d) exited with code %s; restarting "
                      "it in %.0f s (the journal keeps everything meanwhile)", proc.pid, code,
                      self._delay)
            self.restarts += 1
            loop = asyncio.get_running_loop()
            self._restart = loop.call_later(self._delay, lambda: loop.create_task(self._respawn()))
            self._delay = min(30.0, self._delay * 2)

    async def _respawn(self) -> None:
        self._restart = None
        if self._closing:
            return
        try:
            await self.start()
        except (OSError, FollowerError) as exc:
            log.error("cannot restart the ledger and audit-log writer: %s", exc)

    def _fail_waiters(self, exc: BaseException) -> None:
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters = []
        for snap in self._snapshots:
            if not snap.done():
                snap.set_exception(exc)
        self._snapshots = []

    def notify(self, durable: int) -> None:
        """Journal durability callback: tell the follower soon (one line per 2 ms at most)."""
        self.durable = durable
        if self._notify is None:
            self._notify = asyncio.get_running_loop().call_later(0.002, self._send)

    def _send(self, extra: bytes = b"") -> None:
        self._notify = None
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None or proc.stdin.is_closing():
            return
        line = b"d %d\n" % self.durable if self.durable != self._sent else b""
        self._sent = self.durable
        if line or extra:
            proc.stdin.write(line + extra)

    async def sync_through(self, lsn: int, timeout: float = 60.0) -> None:
        """Until the ledger and the audit logs hold everything through ``lsn``, fsynced."""
        if not self.alive:
            raise FollowerError("the ledger and audit-log writer is not running")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((lsn, fut))
        self.durable = max(self.durable, lsn)
        self._send(b"s %d\n" % lsn)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise FollowerError(f"the ledger and audit-log writer did not sync through record "
                                f"{lsn} in {timeout:.0f} s") from None

    async def snapshot_through(self, lsn: int, last_ts: int, timeout: float = 120.0) -> int:
        """Have the follower write the snapshot, at ``lsn`` or later (``lsn`` must be
        durable): it syncs the ledger and the audit logs first. Returns the snapshot's
        position."""
        if not self.alive:
            raise FollowerError("the ledger and audit-log writer is not running")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._snapshots.append(fut)
        self.durable = max(self.durable, lsn)
        self._send(b"n %d %d\n" % (lsn, last_ts))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise FollowerError(f"the follower did not write the snapshot through record {lsn} "
                                f"in {timeout:.0f} s") from None

    async def close(self, durable: int, timeout: float = 60.0) -> None:
        """Let it finish through ``durable`` and exit."""
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        if self._notify is not None:
            self._notify.cancel()
        self.durable = max(self.durable, durable)
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None and proc.stdin is not None:
            self._send()
            proc.stdin.close()
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            log.error("the ledger and audit-log writer did not finish in %.0f s; stopping it (the "
                      "next start rebuilds what it did not write)", timeout)
            proc.kill()
            code = await proc.wait()
        if self._reader is not None:
            await self._reader
            self._reader = None
        if code != 0:
            log.error("the ledger and audit-log writer ended with code %s; the next start rebuilds "
                      "what it did not write from the journal", code)


if __name__ == "__main__":
    sys.exit(main())
