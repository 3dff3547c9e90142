"""Wires the parts together: markets, engine, gateway, storage; starts and stops cleanly.

``run/start_engine.py`` calls ``main``; tests and the embedded simulation build an
``ExchangeServer`` directly. Start-up first recovers the state from the data directory
(snapshot + journal replay, ``storage/persistence.py``) and refuses to start, with exit
code 2 and a message naming the file, if the data cannot be trusted. Shutdown (Ctrl-C,
SIGTERM) stops accepting, tells connected clients (once their last acknowledgements are
durable), writes a final snapshot, closes the journal, the ledger and the audit log, then
returns exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exchange.engine import Exchange
from exchange.gateway import (
    DEFAULT_DEMO_BALANCES,
    DEFAULT_MAX_BUFFER,
    Gateway,
    GatewayOptions,
    Session,
    UserEntry,
    hash_token,
)
from exchange.markets import ConfigError, InvalidValue, MarketConfig, default_config, load_config
from exchange.protocol import DEFAULT_PORT, RECENT_TRADES
from exchange.runtime import CommandLine, install_event_loop_policy, tune_gc, tune_malloc
from exchange.types import STPMode
from storage.audit import AuditLog
from storage.follower import FollowerProcess, wait_for_old_follower
from storage.journal import POLICIES as FSYNC_POLICIES
from storage.ledger import recent_fills, recent_trades, tail_records
from storage.lock import DataDirBusy
from storage.persistence import FollowerError, Persistence, RecoveryError

log = logging.getLogger("exchange.server")

WRITERS = ("process", "inline")


class StartupError(Exception):
    """A configuration or data problem that stops start-up with a clear message."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = Path("data")
    markets_file: Path | None = None
    auth: str = "open"
    accounts_file: Path | None = None
    # None: the built-in demo balances of the assets the markets have (a markets file
    # without BTC must not stop the exchange from starting over BTC's demo balance).
    demo_balances: dict[str, str] | None = None
    default_stp: STPMode = STPMode.CANCEL_RESTING
    max_buffer: int = DEFAULT_MAX_BUFFER
    rate_limit: int = 0  # requests per second per connection (0: no limit)
    stats_interval: float = 10.0
    fsync: str = "batch"  # journal policy: always, batch or off (see storage/journal.py)
    snapshot_interval: float = 300.0  # seconds between periodic snapshots (0: only at shutdown)
    snapshot_records: int = 1_000_000  # ... or after this many journal records
    # Who writes the trade ledger and the audit logs: "process" (the follower, a second
    # process replaying the journal: storage/follower.py) or "inline" (this process).
    writer: str = "process"
    log_level: str = "INFO"  # passed on to the follower


def load_users(path: Path) -> dict[str, UserEntry]:
    """An accounts file: ``{"users": {"alice": {"token_hash": "sha256:...", "admin": false}}}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StartupError(f"cannot read accounts file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise StartupError(f"accounts file {path} is not valid JSON: {exc}") from None
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict) or not users:
        raise StartupError(f"accounts file {path}: 'users' must map user names to entries")
    out = {}
    for name, entry in users.items():
        if not isinstance(entry, dict) or not str(entry.get("token_hash", "")).startswith("sha256:"):
            raise StartupError(
                f"accounts file {path}: user {name!r} needs a 'token_hash' (sha256:...; "
                "make one with: run/start_engine.py --hash-token TOKEN)"
            )
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise StartupError(f"accounts file {path}: user {name!r}: 'admin' must be true or false")
        out[name] = UserEntry(entry["token_hash"], admin)
    return out


class ExchangeServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        try:
            markets: MarketConfig = (
                load_config(config.markets_file) if config.markets_file else default_config()
            )
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        users = {}
        if config.auth == "keys":
            if config.accounts_file is None:
                raise StartupError("--auth keys needs --accounts FILE")
            users = load_users(config.accounts_file)
        elif config.auth != "open":
            raise StartupError(f"unknown auth mode {config.auth!r} (open or keys)")
        demo = config.demo_balances
        if demo is None:
            demo = {a: v for a, v in DEFAULT_DEMO_BALANCES.items() if a in markets.assets}
        for asset_name, amount in demo.items():
            asset = markets.assets.get(asset_name)
            if asset is None:
                raise StartupError(f"--demo-balances: the markets have no asset {asset_name!r} "
                                   f"(they have {', '.join(sorted(markets.assets))})")
            try:
                asset.to_units(amount)
            except InvalidValue as exc:
                raise StartupError(f"demo balance for {asset_name}: {exc.message}") from None
        if config.fsync not in FSYNC_POLICIES:
            raise StartupError(f"unknown fsync policy {config.fsync!r} ({', '.join(FSYNC_POLICIES)})")
        if config.writer not in WRITERS:
            raise StartupError(f"unknown writer {config.writer!r} ({', '.join(WRITERS)})")
        if config.rate_limit < 0:
            raise StartupError("--rate-limit must be 0 (no limit) or a positive number of requests a second")
        if not config.snapshot_interval >= 0:  # NaN too
            raise StartupError("--snapshot-interval must be 0 (only at shutdown) or a positive number of seconds")
        # An empty engine until ``start`` recovers the real one from the data directory.
        self.engine = Exchange(markets, default_stp=config.default_stp)
        self.gateway = Gateway(self.engine, GatewayOptions(
            auth=config.auth, users=users, demo_balances=dict(demo),
            max_buffer=config.max_buffer, rate_limit=config.rate_limit,
        ))
        self.persistence = Persistence(
            config.data_dir, markets, default_stp=config.default_stp, fsync=config.fsync,
            snapshot_interval=config.snapshot_interval, snapshot_records=config.snapshot_records,
            last_ts=lambda: self.gateway.last_ts, finished=self.gateway.finished,
        )
        self.ledger = self.persistence.ledger
        self.journal = self.persistence.journal
        self.audit = AuditLog(
            Path(config.data_dir) / "logs", markets, formatter=self.gateway.fmt,
            mark=self.journal.mark, durable=self.journal.durable,
        )
        # Inline, ``audit`` writes every line; with the follower it only rebuilds lines at
        # recovery, and ``rejections`` writes the lines of what the journal does not hold.
        self.rejections: AuditLog | None = None
        self.follower: FollowerProcess | None = None
        if config.writer == "inline":
            self._write_inline()
        else:
            self.rejections = AuditLog(Path(config.data_dir) / "logs", markets, formatter=self.gateway.fmt)
            self.gateway.reject_listeners.append(self.rejections)
        self._server: asyncio.base_events.Server | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None
        self.failure: BaseException | None = None
        self.on_failure: Any = None  # called when the journal fails: the server must stop

    @property
    def _local_audit(self) -> AuditLog:
        """The audit log this process writes: every line inline, the rejections' otherwise."""
        return self.rejections if self.rejections is not None else self.audit

    def _write_inline(self) -> None:
        """The ledger and the audit log written by this process, off the hot path."""
        self.journal.on_durable.append(self.audit.seal)
        self.persistence.before_snapshot = self.audit.flush_through
        self.gateway.listeners.append(self.ledger)
        self.gateway.listeners.append(self.audit)

    async def _start_follower(self) -> None:
        """Start the follower; if it cannot start, write inline instead (nothing is served yet)."""
        assert self.rejections is not None
        follower = FollowerProcess(Path(self.config.data_dir), self.config.markets_file, self.config.log_level)
        try:
            await follower.start()
        except (OSError, FollowerError) as exc:
            log.warning("the ledger and audit-log writer process cannot start (%s); writing them "
                        "in this process instead (as with --writer inline)", exc)
            await follower.close(0)
            self.gateway.reject_listeners.remove(self.rejections)
            self.rejections = None
            self._write_inline()
            return
        self.follower = follower
        self.persistence.writer = follower
        self.journal.on_durable.append(follower.notify)

    async def start(self) -> tuple[str, int]:
        try:
            Path(self.config.data_dir).mkdir(parents=True, exist_ok=True)
            self.persistence.dir_lock.acquire()  # first: a second exchange is refused as such
        except DataDirBusy as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:  # a file of that name, a path that cannot be created...
            raise StartupError(f"cannot use {self.config.data_dir} as the data directory: "
                               f"{exc.strerror or exc}") from None
        if not wait_for_old_follower(Path(self.config.data_dir)):
            self.persistence.dir_lock.release()
            raise StartupError(
                f"a ledger and audit-log writer of an earlier exchange still runs on "
                f"{self.config.data_dir} (it holds {Path(self.config.data_dir) / '.follower.lock'}); "
                "stop it first")
        loop = asyncio.get_running_loop()
        # The address is taken before recovery (which may write a snapshot), so a port in use
        # is refused before the data directory is touched; connections are accepted only
        # once the state is recovered.
        try:
            self._server = await loop.create_server(
                lambda: Session(self.gateway), self.config.host, self.config.port,
                reuse_address=True, start_serving=False,
            )
        except OSError as exc:
            self.persistence.dir_lock.release()
            raise StartupError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from None
        self.audit.reload_position()
        try:
            engine = self.persistence.recover(replay=self.audit)
        except (RecoveryError, OSError) as exc:
            self._server.close()
            self._server = None
            await self.persistence.ledger.close()
            await self.journal.close()  # recovery may have opened its new segment
            self.persistence.dir_lock.release()
            if isinstance(exc, RecoveryError):
                raise StartupError(str(exc)) from None
            raise StartupError(f"cannot use the data directory {self.config.data_dir}: {exc}") from None
        self.engine = self.gateway.engine = engine
        self.gateway.last_ts = max(self.gateway.last_ts, self.persistence.recovered_ts)
        try:
            records = tail_records(self.ledger.path)
        except OSError as exc:  # only ``trades`` and ``fills`` lack them; nothing else depends on it
            log.warning("cannot read the last trades from the ledger: %s", exc)
            records = []
        self.gateway.seed_recent(recent_trades(records, RECENT_TRADES))
        # Fills at or below the first trade read back are not known here: not whole.
        floor = records[0]["trade_id"] - 1 if records else engine.next_trade_id - 1
        self.gateway.seed_fills(recent_fills(records), floor)
        self.gateway.journal = self.journal
        self.journal.on_durable.append(self.gateway.release)
        self.journal.on_failure.append(self._journal_failed)
        if self.rejections is not None:
            await self._start_follower()
        self.persistence.start()
        self._local_audit.start()
        try:
            await self._server.start_serving()
        except OSError as exc:
            # Bound before recovery, but another socket bound the port too (SO_REUSEADDR) and
            # listens now: nothing was served yet.
            self._server.close()
            self._server = None
            try:
                await self.persistence.close(release_lock=False)
                await self._local_audit.close()
            finally:
                self.persistence.dir_lock.release()
            raise StartupError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from None
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        self.address = (host, port)
        if self.config.stats_interval > 0:
            self._stats_task = loop.create_task(self._log_stats(), name="stats")
        return self.address

    def _journal_failed(self, exc: BaseException) -> None:
        """Nothing can be acknowledged any more: stop, keeping what is durable."""
        self.failure = exc
        if self.on_failure is not None:
            self.on_failure()

    async def _log_stats(self) -> None:
        last = (self.gateway.stats["orders"], self.gateway.stats["trades"], len(self.gateway.sessions))
        while True:
            await asyncio.sleep(self.config.stats_interval)
            rates = self.gateway.update_rates()
            stats = self.gateway.stats
            snapshot = (stats["orders"], stats["trades"], len(self.gateway.sessions))
            if snapshot != last:
                log.info(
                    "%d connections, %d orders (%.0f/s), %d trades (%.0f/s), %.0f msgs/s in",
                    len(self.gateway.sessions), stats["orders"], rates["orders_per_sec"],
                    stats["trades"], rates["trades_per_sec"], rates["messages_per_sec"],
                )
                last = snapshot

    async def stop(self) -> None:
        """Stop accepting, tell the clients, drain, close the writers."""
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        if self._server is not None:
            self._server.close()
        self.gateway.close_all()
        self.gateway.flush()
        if self.journal.failed is None and self.gateway.journal is not None:
            # The last acknowledgements (and the goodbyes behind them) leave once durable.
            await self.journal.wait_durable()
        await asyncio.sleep(0.05)  # let the transports write their goodbyes
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                log.warning("some connections did not close in time")
            self._server = None
        try:
            await self.persistence.close(release_lock=False)
            await self._local_audit.close()
        finally:
            self.persistence.dir_lock.release()  # last: the audit files are written too

    async def flush_logs(self) -> None:
        """Until the ledger and the audit logs hold everything acknowledged so far (tests,
        tools): the follower syncs through the journal's durable end."""
        await self.journal.wait_durable()
        if self.follower is not None:
            await self.follower.sync_through(self.journal.durable_lsn)
        else:
            await self.ledger.sync()
        await self._local_audit.flush_now()


def parse_balances(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        asset, _, amount = part.partition("=")
        if not asset or not amount:
            raise argparse.ArgumentTypeError(f"expected ASSET=AMOUNT, got {part!r}")
        out[asset.strip()] = amount.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = CommandLine(
        prog="start_engine.py", description="Run the exchange: matching engine and TCP gateway.",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    ap.add_argument("--data-dir", type=Path, default=Path("data"), help="where data and logs go (default ./data)")
    ap.add_argument("--markets", type=Path, default=None, help="JSON file overriding the built-in markets")
    ap.add_argument("--auth", choices=["open", "keys"], default="open",
                    help="open: any user name logs in and is funded once; keys: tokens from --accounts")
    ap.add_argument("--accounts", type=Path, default=None, help="accounts file for --auth keys")
    ap.add_argument("--demo-balances", type=parse_balances, default=None,
                    help="open mode: what a new user is credited (default USD=100000,BTC=10,"
                    "ACME=1000, for those of the assets the markets have)")
    ap.add_argument("--stp", choices=[m.value for m in STPMode], default=STPMode.CANCEL_RESTING.value,
                    help="default self-trade prevention (default cancel_resting)")
    ap.add_argument("--fsync", choices=list(FSYNC_POLICIES), default="batch",
                    help="journal durability: batch (default; fsync once per event-loop batch "
                    "before acknowledging), always (fsync every command), off (no fsync: "
                    "survives a process crash, not a power cut)")
    ap.add_argument("--snapshot-interval", type=float, default=300.0,
                    help="seconds between periodic snapshots (default 300; 0: only at shutdown)")
    ap.add_argument("--rate-limit", type=int, default=0, metavar="N",
                    help="requests per second per connection, bursts up to N (default 0: no "
                    "limit); over it a request is answered rate_limited and not carried out")
    ap.add_argument("--writer", choices=list(WRITERS), default="process",
                    help="who writes the trade ledger and the audit logs: process (default; a "
                    "second process replaying the journal, on another core) or inline (this "
                    "process, in the background)")
    ap.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    ap.add_argument("--hash-token", metavar="TOKEN", help="print the token_hash for an accounts file and exit")
    return ap


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=args.port, data_dir=args.data_dir, markets_file=args.markets,
        auth=args.auth, accounts_file=args.accounts, demo_balances=args.demo_balances,
        default_stp=STPMode(args.stp), fsync=args.fsync,
        snapshot_interval=args.snapshot_interval, rate_limit=args.rate_limit,
        writer=args.writer, log_level=str(args.log_level).upper(),
    )


async def serve(config: ServerConfig, ready: Any = None) -> int:
    server = ExchangeServer(config)
    host, port = await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server.on_failure = stop.set

    def stopping() -> None:
        # At once, not when stop() runs a loop pass later: a client that dies with us (one
        # Ctrl-C to the whole process group) must not have its orders canceled on disconnect.
        server.gateway.accepting = False
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stopping)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on this platform
            pass
    log.info("exchange listening on %s:%d (auth %s, data in %s)", host, port, config.auth, config.data_dir)
    print(f"Exchange listening on {host}:{port} (auth {config.auth}, data in {config.data_dir}); "
          "Ctrl-C to stop", flush=True)
    if ready is not None:
        ready(host, port)
    await stop.wait()
    log.info("shutting down")
    await server.stop()
    if server.failure is not None:
        print(f"error: the journal failed ({server.failure}); stopped without acknowledging "
              "what was not durable", file=sys.stderr, flush=True)
        return 1
    print("Exchange stopped cleanly.", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hash_token is not None:
        print(hash_token(args.hash_token))
        return 0
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        print(f"error: unknown log level {args.log_level!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc()
    tune_gc()
    loop_kind = install_event_loop_policy()
    log.debug("event loop: %s", loop_kind)
    try:
        return asyncio.run(serve(config_from_args(args)))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were set: during recovery
        print("interrupted before the exchange was listening; the next start recovers the data "
              "directory", file=sys.stderr, flush=True)
        return 130
