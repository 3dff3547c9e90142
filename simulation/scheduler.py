"""Scheduled budget runs: a configuration becomes an ordered list of action slots that cross.

Theory of operation
-------------------
Where the agents of ``simulation/agents.py`` decide for themselves, a scheduled run is a
plan written down before it starts, so it can be inspected, interrupted and resumed:

1. ``build_slots`` turns a ``ScheduleConfig`` (accounts, markets, trades per account, an
   amount range, price offsets, a strategy) into *pairs* of slots. The first slot of a pair
   (the maker) rests a GTC limit; the second (the taker, another account) sends an IOC
   limit at the same price and the opposite side, so the two cross and trade. Each
   account's side alternates from one trade to the next, so counterparties pair up and
   no account drifts one way. Amounts and offsets are drawn from a seeded generator: the
   same config and seed give the same slots.
   * ``round_robin``: round after round, accounts paired (0,1), (2,3)... shifted by one each
     round; consecutive pairs take the markets in turn;
   * ``same_market``: the same pairing, but a whole round trades one market;
   * ``sequential``: one pair of accounts does all its trades before the next pair starts.
2. ``SlotProcessor`` executes the slots in order. A slot that fails (refused, not filled,
   budget short, connection error) is retried after ``backoff_base * 2**(attempt-1)``
   seconds (capped at ``backoff_max``) up to ``max_retries`` times; then a person at a
   terminal is asked retry / skip / continue / quit, and without one ``on_failure``
   (``skip`` or ``quit``) decides. ``skip`` marks the slot skipped, ``continue`` leaves it
   failed and goes on, ``quit`` stops the run (resumable).
3. The run (slots with status and attempts, position, statistics, timestamps) is written
   atomically (temporary file, fsync, rename) to ``<data_dir>/simulations/<id>.json``
   after every slot, so ``--resume <id>`` continues where it stopped and never repeats a
   completed slot.
4. ``BudgetTracker`` follows each account's reports in a ``Wallet``: available, locked and
   spent per asset; a slot the account can no longer pay for fails as ``budget_depleted``
   without being sent, and the account/asset is recorded as depleted.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Final

import orjson

from exchange.markets import InvalidValue, MarketConfig
from exchange.protocol import DEFAULT_PORT
from storage.snapshot import fsync_dir
from exchange.types import ExecType, RejectReason
from simulation.budget import Wallet, buy_commit
from simulation.gateway import Gateway, GatewayConnectionError, GatewayError

STRATEGIES = ("round_robin", "same_market", "sequential")
PENDING, IN_PROGRESS, COMPLETED, FAILED, SKIPPED = "pending", "in_progress", "completed", "failed", "skipped"


@dataclass
class ScheduleConfig:
    accounts: list[str] = field(default_factory=lambda: ["sched-a", "sched-b", "sched-c", "sched-d"])
    markets: list[str] = field(default_factory=lambda: ["BTC-USD"])
    trades_per_account: int = 4
    amount_range: tuple[str, str] = ("0.001", "0.01")  # base quantity, decimal strings
    # Per market, overriding amount_range (a market's lot size may not fit the default).
    amount_ranges: dict[str, list[str]] = field(default_factory=lambda: {"ACME-USD": ["1", "10"]})
    price_offsets: tuple[str, str] = ("-0.50", "0.50")  # added to the base price, decimal strings
    base_prices: dict[str, str] = field(default_factory=lambda: {"BTC-USD": "30000.00", "ACME-USD": "100.00"})
    strategy: str = "round_robin"
    max_retries: int = 3
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    funding: dict[str, str] = field(default_factory=lambda: {"USD": "100000", "BTC": "2", "ACME": "1000"})
    seed: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ScheduleConfig:
        cfg = cls()
        if data is not None and not isinstance(data, dict):
            raise ValueError("schedule: must be a JSON object")
        for key, value in (data or {}).items():
            if not hasattr(cfg, key):
                raise ValueError(f"schedule: unknown key {key!r}")
            if key in ("amount_range", "price_offsets"):
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ValueError(f"schedule: {key} must be a pair, e.g. [\"0.01\", \"0.1\"]")
                value = (str(value[0]), str(value[1]))
            default = getattr(cfg, key)
            if isinstance(default, list) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"schedule: {key} must be a list of names")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ValueError(f"schedule: {key} must be a number")
            if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
                raise ValueError(f"schedule: {key} must be a whole number")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and value < 0:
                raise ValueError(f"schedule: {key} cannot be negative")
            if isinstance(default, dict) and not isinstance(value, dict):
                raise ValueError(f"schedule: {key} must be an object")
            setattr(cfg, key, value)
        if len(set(cfg.accounts)) != len(cfg.accounts):
            raise ValueError("schedule: accounts must be distinct (an account cannot cross itself)")
        if isinstance(cfg.markets, list) and not cfg.markets:
            raise ValueError("schedule: give at least one market")
        from exchange.markets import split_decimal

        for asset, amount in cfg.funding.items():
            try:
                split_decimal(amount)
            except ValueError:
                raise ValueError(f"schedule: funding {asset} {amount!r} is not a plain decimal amount") from None
        if cfg.strategy not in STRATEGIES:
            raise ValueError(f"schedule: strategy must be one of {', '.join(STRATEGIES)}")
        if len(cfg.accounts) < 2:
            raise ValueError("schedule: at least two accounts are needed to cross")
        if cfg.trades_per_account < 1:
            raise ValueError("schedule: trades_per_account must be at least 1")
        return cfg


@dataclass
class Slot:
    index: int
    pair: int
    role: str  # "maker" (rests) or "taker" (crosses it)
    account: str
    market: str
    side: str
    qty: str
    price: str
    tif: str
    status: str = PENDING
    attempts: int = 0
    order_id: int | None = None
    filled_qty: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


def _decimal_steps(spec_units: Callable[[str], int], lo: str, hi: str) -> tuple[int, int]:
    a, b = spec_units(lo), spec_units(hi)
    return (a, b) if a <= b else (b, a)


def build_slots(cfg: ScheduleConfig, config: MarketConfig) -> list[Slot]:
    """The ordered slots of a run (see the module docstring); deterministic for a seed."""
    for m in cfg.markets:
        if m not in config.markets:
            raise ValueError(f"schedule: unknown market {m!r}")
    rng = random.Random(f"schedule:{cfg.seed}")
    accounts = cfg.accounts
    n = len(accounts)
    pairs: list[tuple[str, str, str, int]] = []  # (maker, taker, market, round)
    if cfg.strategy == "sequential":
        for i in range(0, n, 2):
            maker, taker = accounts[i], accounts[(i + 1) % n]
            for r in range(cfg.trades_per_account):
                pairs.append((maker, taker, cfg.markets[len(pairs) % len(cfg.markets)], r))
    else:
        for r in range(cfg.trades_per_account):
            for i in range(0, n, 2):
                maker, taker = accounts[(i + r) % n], accounts[(i + 1 + r) % n]
                if cfg.strategy == "same_market":
                    market = cfg.markets[r % len(cfg.markets)]
                else:
                    market = cfg.markets[len(pairs) % len(cfg.markets)]
                pairs.append((maker, taker, market, r))
    slots: list[Slot] = []
    # Each account alternates: its next trade takes the side opposite to its last one. The
    # maker's turn decides the pair (the taker takes the other side); with the pairings
    # above both accounts are almost always due opposite sides anyway.
    last_side: dict[str, str] = {}
    for k, (maker, taker, market, r) in enumerate(pairs):
        spec = config.markets[market]
        lo_text, hi_text = cfg.amount_ranges.get(market) or cfg.amount_range
        try:
            qlo, qhi = _decimal_steps(spec.qty_lots, str(lo_text), str(hi_text))
        except InvalidValue as exc:
            raise ValueError(f"schedule: amount range for {market}: {exc.message}") from None
        lots = rng.randint(max(qlo, spec.min_qty_lots), max(qhi, spec.min_qty_lots))
        base = spec.price_ticks(cfg.base_prices.get(market) or spec.reference_price or "100.00")
        lo_off, hi_off = (_signed_ticks(spec.price_ticks, x) for x in cfg.price_offsets)
        lo_off, hi_off = min(lo_off, hi_off), max(lo_off, hi_off)
        if base + lo_off < 1:  # clamped to one tick, every such pair traded at the minimum price
            raise ValueError(f"schedule: {market} base price {spec.format_price(base)} with offset "
                             f"{spec.format_price(lo_off)} is not a positive price; give "
                             f"price_offsets above -{spec.format_price(base)}")
        price = base + rng.randint(lo_off, hi_off)
        if maker in last_side:
            maker_side = "sell" if last_side[maker] == "buy" else "buy"
        elif taker in last_side:
            maker_side = last_side[taker]  # the taker then takes the other side, alternating
        else:
            maker_side = "buy"
        taker_side = "sell" if maker_side == "buy" else "buy"
        last_side[maker], last_side[taker] = maker_side, taker_side
        qty, px = spec.format_qty(lots), spec.format_price(price)
        slots.append(Slot(len(slots), k, "maker", maker, market, maker_side, qty, px, "gtc"))
        slots.append(Slot(len(slots), k, "taker", taker, market, taker_side, qty, px, "ioc"))
    return slots


def _signed_ticks(to_ticks: Callable[[str], int], text: str) -> int:
    """A signed price offset such as ``-0.50`` in ticks (``0`` allowed)."""
    text = text.strip()
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body.strip("0.") == "":
        return 0
    try:
        return sign * to_ticks(body)
    except InvalidValue as exc:
        raise ValueError(f"schedule: price offset {text!r}: {exc.message}") from None


# --------------------------------------------------------------------------- state on disk


@dataclass
class SimulationRun:
    id: str
    config: dict[str, Any]
    slots: list[Slot]
    status: str = "pending"  # pending, running, interrupted, completed, quit
    position: int = 0
    funded: bool = False
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    stats: dict[str, int] = field(default_factory=lambda: {
        "completed": 0, "failed": 0, "skipped": 0, "retries": 0, "attempts": 0,
    })
    depleted: list[str] = field(default_factory=list)
    # How it runs, so ``--resume`` goes on the same way: "embedded" or "tcp" ("" in runs
    # saved before it was recorded: the command line decides), and the latency model.
    mode: str = ""
    latency: str | None = None
    # Put before each account's name on the exchange: a TCP run's own accounts, so that a
    # second run does not start with the first one's balances and orders ("" embedded, with
    # --credentials, and in runs saved before it was recorded).
    prefix: str = ""
    # The full save this file is: lines of ``<id>.log`` written after it carry the same number
    # (``RunStore.save``); lines of an older one, left by a crash, are not applied.
    generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulationRun:
        data = dict(data)
        data["slots"] = [Slot(**s) for s in data["slots"]]
        return cls(**data)


FULL_SAVE_EVERY = 500  # slot saves between two full rewrites of a run's file


class RunStore:
    """Saved runs: ``<id>.json``, written atomically, and ``<id>.log`` after it.

    A run is saved after every slot (twice: in progress, then done). Rewriting the whole file
    each time made a plan's time grow with its square: 29 s for 4,000 slots, mostly writing
    and fsyncing a file of 1.6 MB 8,000 times. So only one save in ``FULL_SAVE_EVERY``
    rewrites the file (and a process's first save of a run, and every save without a slot
    being run); the others append one line to the log, fsynced: the slots touched since the
    last save (the processor only moves forward) and the run's own fields. Loading applies
    the log's lines of the file's generation in order; a line cut short by a crash is the
    end of it (the save it belonged to never finished).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.damaged: list[Path] = []  # files ``list`` could not read
        self._logged: dict[str, tuple[int, int]] = {}  # run id -> (appends since full, position saved)

    def path(self, run_id: str) -> Path:
        if not run_id or any(c in run_id for c in "/\\") or run_id.startswith("."):
            raise ValueError(f"not a run id: {run_id!r}")
        return self.folder / f"{run_id}.json"

    def lock(self, run_id: str) -> Any:
        """An exclusive hold on the run (None if another process has it): two processes
        running one plan would send its orders twice. ``release`` gives it back."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f".{self.path(run_id).name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - no flock (Windows): not coordinated
            pass
        except OSError:
            os.close(fd)
            return None
        return fd

    def release(self, lock: int) -> None:
        os.close(lock)

    def log_path(self, run_id: str) -> Path:
        return self.path(run_id).with_suffix(".log")

    def save(self, run: SimulationRun, full: bool = False) -> None:
        """Save the run (see the class docstring); ``full``: rewrite the file now."""
        run.updated_at = time.time()
        logged = self._logged.get(run.id)
        if full or logged is None or logged[0] + 1 >= FULL_SAVE_EVERY:
            self._save_full(run)
            self._logged[run.id] = (0, run.position)
            return
        appends, saved_at = logged
        lo = min(saved_at, run.position)
        touched = run.slots[lo:min(run.position + 1, len(run.slots))]
        line = orjson.dumps({
            "generation": run.generation, "slots": touched,
            "run": {k: getattr(run, k) for k in _RUN_FIELDS},
        }) + b"\n"
        path = self.log_path(run.id)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            done = 0
            while done < len(line):  # a short write (a full disk) must not pass for a save
                done += os.write(fd, line[done:])
            os.fdatasync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.folder)  # the log's name is durable too, before its lines count
        self._logged[run.id] = (appends + 1, run.position)

    def _save_full(self, run: SimulationRun) -> None:
        run.generation += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(run.id)
        # orjson writes the dataclasses directly: json.dumps of asdict() cost 65 ms a save
        # for a 2,400-slot plan, twice per slot, so a plan's time grew with its square.
        data = orjson.dumps(run, option=orjson.OPT_INDENT_2)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            fsync_dir(self.folder)  # the new generation is durable before its log lines follow
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:  # the file holds it all now; a log left by a crash here is of an older generation
            os.unlink(self.log_path(run.id))
        except FileNotFoundError:
            pass

    def _read(self, path: Path) -> SimulationRun:
        run = _checked_run(json.loads(path.read_text(encoding="utf-8")))
        try:
            log = path.with_suffix(".log").read_bytes()
        except FileNotFoundError:
            return run
        for raw in log.split(b"\n"):
            try:
                entry = orjson.loads(raw)
                if entry["generation"] != run.generation:
                    continue
                slots = [Slot(**s) for s in entry["slots"]]
                fields = {k: entry["run"][k] for k in _RUN_FIELDS}
            except (orjson.JSONDecodeError, KeyError, TypeError):
                break  # cut short by a crash: that save never finished
            for slot in slots:
                if 0 <= slot.index < len(run.slots):
                    run.slots[slot.index] = slot
            for k, v in fields.items():
                setattr(run, k, v)
        return _checked_run(run.to_dict())

    def load(self, run_id: str) -> SimulationRun:
        path = self.path(run_id)
        try:
            return self._read(path)
        except FileNotFoundError:
            raise ValueError(f"no saved run {run_id!r} in {self.folder}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"saved run {path} is damaged or unreadable: {type(exc).__name__}: {exc}") from None

    def list(self) -> list[SimulationRun]:
        if not self.folder.is_dir():
            return []
        runs = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                runs.append(self._read(path))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.damaged.append(path)
        return runs


# The run's own fields a slot save carries (the slots and the config are the file's).
_RUN_FIELDS: Final = ("status", "position", "funded", "updated_at", "finished_at", "stats", "depleted")


def _maker_before(run: SimulationRun, pos: int) -> Slot | None:
    """The maker of the pair whose taker is at ``pos`` (a pair's maker runs just before it)."""
    slot = run.slots[pos]
    before = run.slots[pos - 1] if pos > 0 else None
    if slot.role == "taker" and before is not None and before.pair == slot.pair and before.role == "maker":
        return before
    return None


def _rewind_open_pair(run: SimulationRun) -> None:
    """An embedded resume starts a fresh in-process exchange: a maker whose taker has not
    run yet rests on an exchange that is gone, so the pair starts again from its maker."""
    pos = run.position
    if 0 <= pos < len(run.slots):
        slot = run.slots[pos]
        if slot.role == "maker" and slot.status == IN_PROGRESS and slot.order_id is not None:
            # Acknowledged before the interruption, on the exchange that is gone: over TCP it
            # would count as done; here its taker would find nothing to cross.
            slot.status, slot.order_id, slot.error = PENDING, None, None
            print(f"slot {slot.index} (the maker of pair {slot.pair}) runs again: its order rested "
                  "on the exchange of the interrupted run, which an embedded resume does not keep")
            return
    if pos <= 0 or pos >= len(run.slots):
        return
    slot, before = run.slots[pos], _maker_before(run, pos)
    if before is not None and before.status == COMPLETED and slot.status in (PENDING, IN_PROGRESS) \
            and slot.order_id is None:
        before.status, before.order_id, before.filled_qty = PENDING, None, None
        before.error, before.finished_at = None, None
        run.stats["completed"] -= 1
        run.position = pos - 1
        print(f"slot {before.index} (the maker of pair {slot.pair}) runs again: its order rested "
              "on the exchange of the interrupted run, which an embedded resume does not keep")


def _checked_run(data: Any) -> SimulationRun:
    """A saved run, with the fields ``--list`` and ``--resume`` rely on of the right shape."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    run = SimulationRun.from_dict(data)
    if not isinstance(run.config, dict) or not isinstance(run.stats, dict) or not all(
        isinstance(run.stats.get(k), int) for k in ("completed", "failed", "skipped")
    ):
        raise ValueError("its config or statistics are not what a saved run holds")
    if not all(isinstance(slot, Slot) for slot in run.slots):
        raise ValueError("its slots are not what a saved run holds")
    if run.mode not in ("", "embedded", "tcp") or not (run.latency is None or isinstance(run.latency, str)) \
            or not isinstance(run.prefix, str):
        raise ValueError("its mode is not what a saved run holds")
    return run


# --------------------------------------------------------------------------- budgets


class BudgetTracker:
    """Each account's available / locked / spent per asset, from its own reports."""

    def __init__(self, config: MarketConfig, gateways: dict[str, Gateway]) -> None:
        self.config = config
        self.gateways = gateways
        self.wallets = {name: Wallet(config) for name in gateways}
        self.depleted: list[str] = []
        self.filled: dict[int, int] = {}  # order id -> lots filled so far (from the reports)

    async def load(self) -> None:
        for name, gw in self.gateways.items():
            self.wallets[name].load(await gw.balances())

    def sync(self) -> None:
        for name, gw in self.gateways.items():
            apply = self.wallets[name].apply
            for ev in gw.poll_events():
                rep = apply(ev)
                if rep is not None and rep.order_id is not None:
                    self.filled[rep.order_id] = rep.filled

    async def settle(self) -> None:
        """Take in every report already on its way (``Gateway.settled``: a round trip over
        TCP, the last scheduled delivery with a latency model). The last slots' orders
        traded against resting ones; those owners' fills could still be in flight, and the
        summary would show their funds locked. A session that is gone keeps what it had."""
        for gw in self.gateways.values():
            try:
                await gw.settled()
            except GatewayError:
                pass
        self.sync()

    def need(self, slot: Slot) -> tuple[str, int]:
        spec = self.config.markets[slot.market]
        lots = spec.qty_lots(slot.qty)
        if slot.side == "buy":
            return spec.quote.name, buy_commit(spec, spec.price_ticks(slot.price), lots)
        return spec.base.name, lots * spec.base_per_lot

    def can_pay(self, slot: Slot) -> bool:
        asset, amount = self.need(slot)
        if self.wallets[slot.account].free(asset) >= amount:
            return True
        key = f"{slot.account}:{asset}"
        if key not in self.depleted:
            self.depleted.append(key)
        return False

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per account and asset: initial, available, locked, spent and utilization."""
        return {name: w.utilization() for name, w in self.wallets.items()}


# --------------------------------------------------------------------------- processing


class SlotFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Decision = str  # "retry" | "skip" | "continue" | "quit"


def ask_terminal(slot: Slot, reason: str) -> Decision:
    """Ask the person at the terminal what to do with a slot that keeps failing."""
    while True:
        answer = input(
            f"\nslot {slot.index} ({slot.account} {slot.side} {slot.qty} {slot.market} @ {slot.price}) "
            f"failed {slot.attempts} times: {reason}\n[r]etry, [s]kip, [c]ontinue, [q]uit? "
        ).strip().lower()
        for choice in ("retry", "skip", "continue", "quit"):
            if answer and choice.startswith(answer):
                return choice
        print("please answer r, s, c or q")


class SlotProcessor:
    """Executes a run's slots in order with retries, decisions and a save after every slot."""

    def __init__(
        self, run: SimulationRun, gateways: dict[str, Gateway], store: RunStore | None,
        config: MarketConfig, *, max_retries: int = 3, backoff_base: float = 0.1,
        backoff_max: float = 5.0, on_failure: str = "skip",
        ask: Callable[[Slot, str], Decision] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run = run
        self.gateways = gateways
        self.store = store
        self.config = config
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.on_failure = on_failure
        self.ask = ask
        first = next(iter(gateways.values()))
        self.sleep = sleep or first.sleep
        self.clock = clock
        self.budget = BudgetTracker(config, gateways)
        self.sleeps: list[float] = []  # every back-off waited, for the summary and the tests

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...): base x 2^(attempt-1), capped."""
        return min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))

    def save(self, full: bool = False) -> None:
        if self.store is not None:
            self.store.save(self.run, full)

    async def execute(self, stop_after: int | None = None) -> SimulationRun:
        """Run from the saved position; ``stop_after`` slots at most (then ``interrupted``)."""
        run = self.run
        await self.budget.load()
        await self._find_in_flight()
        run.status = "running"
        self.save(full=True)
        done_now = 0
        try:
            while run.position < len(run.slots):
                if stop_after is not None and done_now >= stop_after:
                    await self.budget.settle()
                    run.status = "interrupted"
                    return run
                slot = run.slots[run.position]
                if slot.status in (COMPLETED, SKIPPED, FAILED):
                    run.position += 1
                    continue
                if slot.status == IN_PROGRESS and slot.order_id is not None:
                    # Sent and acknowledged before an interruption: never send it twice.
                    slot.status = COMPLETED
                    run.stats["completed"] += 1
                    run.position += 1
                    continue
                decision = await self._run_slot(slot)
                if decision == "quit":
                    await self.budget.settle()
                    run.status = "quit"
                    return run
                if decision == "lost":
                    run.status = "interrupted"
                    return run
                run.position += 1
                done_now += 1
                self.save()
            await self.budget.settle()
            run.status = "completed"
            run.finished_at = self.clock()
            return run
        except (KeyboardInterrupt, asyncio.CancelledError):
            run.status = "interrupted"
            raise
        finally:
            self.budget.sync()
            # A resumed run keeps what an earlier part of it found depleted.
            run.depleted = list(dict.fromkeys([*run.depleted, *self.budget.depleted]))
            self.save(full=True)

    async def _withdraw_maker(self) -> None:
        """The taker being run, given up on, leaves its pair's maker resting, and a later pair's taker on
        that side would trade with it instead of its own maker: cancel it."""
        maker = _maker_before(self.run, self.run.position)  # the slot being run is at the position
        if maker is None or maker.order_id is None:
            return
        try:
            await self.gateways[maker.account].cancel(maker.order_id)
        except GatewayError:
            pass  # it traded or ended meanwhile, or the exchange is gone: nothing to withdraw
        self.budget.sync()

    async def _find_in_flight(self) -> None:
        """A slot saved in progress without an order id was interrupted (Ctrl-C, kill -9)
        between sending its order and reading the answer: the order may have reached the
        exchange. Sending it again would trade twice, so the exchange is asked first. A maker
        that arrived rests there under the slot's client order id; a taker (IOC) never
        rests, but if it traded, its pair's maker order is gone or partly filled."""
        run = self.run
        if run.position >= len(run.slots):
            return
        slot = run.slots[run.position]
        if slot.status != IN_PROGRESS or slot.order_id is not None:
            return
        try:
            found = await self._resting(slot)
            if found is not None:
                slot.order_id = found  # the loop counts it done, and never resends it
                return
            maker = _maker_before(run, run.position)
            if maker is None or maker.order_id is None:
                return
            theirs = await self.gateways[maker.account].open_orders(maker.market)
        except GatewayError:
            return  # cannot tell: the slot runs as usual
        resting = next((o for o in theirs if o.order_id == maker.order_id), None)
        if resting is None or resting.filled > 0:
            slot.status, slot.error, slot.finished_at = COMPLETED, None, self.clock()
            slot.filled_qty = slot.qty
            run.stats["completed"] += 1
            run.position += 1
            print(f"slot {slot.index} was sent before the interruption and traded with its maker: "
                  "not sent again")

    async def _run_slot(self, slot: Slot) -> Decision:
        run = self.run
        slot.status = IN_PROGRESS
        slot.started_at = slot.started_at or self.clock()
        self.save()  # in progress is on disk before the order leaves
        base = slot.attempts  # attempts before this run of the slot (a resume keeps its history)
        while True:
            slot.attempts += 1
            run.stats["attempts"] += 1
            try:
                await self._attempt(slot)
            except SlotFailed as exc:
                slot.error = exc.reason
                retries_used = slot.attempts - base - 1
                if retries_used < self.max_retries:
                    run.stats["retries"] += 1
                    delay = self.backoff(retries_used + 1)
                    self.sleeps.append(delay)
                    await self.sleep(delay)
                    continue
                if exc.reason.startswith("connection:"):
                    # The exchange is gone (sessions do not reconnect): skipping the rest
                    # of the plan would throw it away. Stop here; a resume starts again here.
                    if slot.order_id is None:
                        slot.status = PENDING
                    self.save()
                    return "lost"
                decision = self.ask(slot, exc.reason) if self.ask is not None else self.on_failure
                if decision == "retry":
                    base = slot.attempts
                    continue
                if decision == "quit":
                    # Quitting is not giving up on the slot: a resume starts again here.
                    # (One whose order already left stays in progress and is never resent.)
                    if slot.order_id is None:
                        slot.status = PENDING
                    self.save()
                    return "quit"
                slot.status = SKIPPED if decision == "skip" else FAILED
                run.stats["skipped" if decision == "skip" else "failed"] += 1
                slot.finished_at = self.clock()
                await self._withdraw_maker()
                return decision
            slot.status = COMPLETED
            slot.error = None
            slot.finished_at = self.clock()
            run.stats["completed"] += 1
            return "continue"

    async def _attempt(self, slot: Slot) -> None:
        self.budget.sync()
        if not self.budget.can_pay(slot):
            raise SlotFailed("budget_depleted")
        gw = self.gateways[slot.account]
        asset, commit = self.budget.need(slot)
        wallet = self.budget.wallets[slot.account]
        wallet.reserve(asset, commit)
        try:
            rep = await gw.place(
                slot.market, slot.side, slot.qty, slot.price, tif=slot.tif,
                client_order_id=self._client_order_id(slot),
            )
        except GatewayConnectionError as exc:
            wallet.release(asset, commit)
            raise SlotFailed(f"connection: {exc.message}") from None
        except GatewayError as exc:
            wallet.release(asset, commit)
            raise SlotFailed(exc.code) from None
        if rep.exec_type is ExecType.REJECTED:
            wallet.release(asset, commit)
            if rep.reason is RejectReason.DUPLICATE_CLIENT_ORDER_ID and slot.role == "maker":
                # Sent before, and resting: an interrupted run whose resume could not ask the
                # exchange (``_find_in_flight``). Taken as this slot's order, not sent twice.
                try:
                    found = await self._resting(slot)
                except GatewayError:
                    found = None
                if found is not None:
                    slot.order_id = found
                    return
            raise SlotFailed(rep.reason.value if rep.reason else "rejected")
        wallet.track(rep, asset, commit)
        slot.order_id = rep.order_id
        self.budget.sync()
        if slot.role == "taker":
            spec = self.config.markets[slot.market]
            t_filled = await self._filled(slot)
            slot.filled_qty = spec.format_qty(t_filled)
            if t_filled < spec.qty_lots(slot.qty):
                slot.order_id = None  # the IOC rest expired: nothing to cancel, may retry
                raise SlotFailed("not_filled")

    def _client_order_id(self, slot: Slot) -> str:
        """The id the slot's order is sent with, so that a resumed run can find it."""
        return f"{self.run.id}-{slot.index}"[:64]

    async def _resting(self, slot: Slot) -> int | None:
        """The id of the slot's order resting at the exchange (its client order id, side,
        price and quantity), if any; ``GatewayError`` when the exchange cannot be asked."""
        coid = self._client_order_id(slot)
        spec = self.config.markets[slot.market]
        price, qty = spec.price_ticks(slot.price), spec.qty_lots(slot.qty)
        mine = await self.gateways[slot.account].open_orders(slot.market)
        return next((o.order_id for o in mine if o.client_order_id == coid and o.side == slot.side
                     and o.price == price and o.qty == qty), None)

    async def _filled(self, slot: Slot) -> int:
        """Lots the slot's IOC order filled, once its final report has arrived."""
        gw = self.gateways[slot.account]
        for _ in range(100):  # an IOC ends within its own command; its reports follow the ack
            self.budget.sync()
            if slot.order_id not in self.budget.wallets[slot.account].orders:
                break
            await gw.sleep(0.01)
        return self.budget.filled.get(slot.order_id, 0)  # type: ignore[arg-type]

    def summary(self) -> dict[str, Any]:
        run = self.run
        return {
            "id": run.id, "status": run.status, "slots": len(run.slots),
            "position": run.position, **run.stats, "backoffs_s": list(self.sleeps),
            "depleted": list(self.budget.depleted), "budgets": self.budget.summary(),
        }


# --------------------------------------------------------------------------- command line


def new_run(sched: ScheduleConfig, config: MarketConfig) -> SimulationRun:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_id = f"run-{stamp}-{sched.seed}-{time.time_ns() % 10**6:06d}"
    return SimulationRun(run_id, asdict(sched), build_slots(sched, config))


def _resume_as_started(cfg: Any, args: Any, run: SimulationRun) -> None:
    """A resumed run goes on in the mode it started in: an embedded run's rest must not go to
    whatever exchange listens on the default port, nor a TCP run's to a fresh in-process one."""
    from simulation.runner import SimulationError

    if run.mode == "tcp" and cfg.embedded:
        raise SimulationError(f"run {run.id} was started against an exchange over TCP: resume it "
                              "without --embedded (and with --host/--port if the exchange is elsewhere)")
    if run.mode == "embedded":
        if cfg.credentials is not None:  # funding would be skipped in a fresh, empty exchange
            raise SimulationError(f"run {run.id} runs embedded: --credentials applies to TCP runs")
        cfg.embedded = True
        if cfg.latency is None:
            cfg.latency = run.latency


def _resume_hint(run: SimulationRun, cfg: Any) -> str:
    """The options that resume this run."""
    hint = f"--resume {run.id}"
    if str(cfg.data_dir) != "data":
        hint += f" --data-dir {cfg.data_dir}"
    if not cfg.embedded and cfg.host != "127.0.0.1":
        hint += f" --host {cfg.host}"
    if not cfg.embedded and cfg.port != DEFAULT_PORT:
        hint += f" --port {cfg.port}"
    return hint


def main_schedule(cfg: Any, args: Any) -> int:
    """``--schedule`` / ``--resume ID`` / ``--list`` (called by ``simulation.runner.main``)."""
    from simulation.runner import SimulationError, market_config

    store = RunStore(Path(cfg.data_dir) / "simulations")
    try:
        store.folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SimulationError(f"cannot keep scheduled runs in {store.folder}: {exc.strerror or exc}") from None
    if args.list:
        runs = store.list()
        for path in store.damaged:
            print(f"{path.name}: damaged or unreadable, skipped", file=sys.stderr)
        if not runs:
            print(f"no saved runs in {store.folder}")
        for r in runs:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
            status = r.status
            if status == "running":  # saved so, but is anyone still running it?
                held = store.lock(r.id)
                if held is not None:  # nobody holds it: the process was killed
                    store.release(held)
                    status = "interrupted"
            print(f"{r.id}  {status:<11} {r.position}/{len(r.slots)} slots  "
                  f"completed {r.stats['completed']} failed {r.stats['failed']} "
                  f"skipped {r.stats['skipped']}  {r.config.get('strategy')}  created {created}")
        return 0
    config = market_config(cfg)
    try:
        # The run is held before it is read: another process may be finishing it.
        fresh = None
        if args.resume is None:
            sched = ScheduleConfig.from_dict(cfg.schedule)
            if args.seed is not None:
                sched.seed = args.seed
            fresh = new_run(sched, config)
            fresh.mode = "embedded" if cfg.embedded else "tcp"
            fresh.latency = cfg.latency
            if not cfg.embedded and cfg.prefix is not None:
                fresh.prefix = cfg.prefix
            elif not cfg.embedded and cfg.credentials is None:  # with credentials: the listed names
                from simulation.runner import fresh_prefix

                fresh.prefix = fresh_prefix()
        run_id = args.resume if fresh is None else fresh.id
        lock = store.lock(run_id)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    if lock is None:
        raise SimulationError(f"run {run_id} is being run by another process; wait for it, or stop it first")
    try:
        return _main_locked(cfg, args, store, config, fresh)
    finally:
        store.release(lock)


def _main_locked(cfg: Any, args: Any, store: RunStore, config: MarketConfig,
                 fresh: SimulationRun | None) -> int:
    """``main_schedule`` once the run is held: load (or take the fresh run) and execute."""
    from simulation.runner import SimulationError, close_embedded

    try:
        run = fresh if fresh is not None else store.load(args.resume)
        sched = ScheduleConfig.from_dict(run.config)
        if fresh is None:
            _resume_as_started(cfg, args, run)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    if run.status == "completed":
        print(f"run {run.id} is already complete ({run.stats['completed']} slots completed); nothing to resume")
        return 0
    if cfg.embedded and args.resume is not None:
        _rewind_open_pair(run)
    if cfg.embedded:
        from simulation.embedded import parse_latency

        try:
            parse_latency(cfg.latency)
        except ValueError as exc:
            raise SimulationError(str(exc)) from None
    ask = ask_terminal if sys.stdin.isatty() else None

    async def body(gateways: dict[str, Gateway], fund: bool) -> SlotProcessor:
        # Keys mode with no admin in --credentials: the accounts trade what they hold.
        if fund and (cfg.credentials is None or cfg.credentials.admin is not None):
            for gw in gateways.values():
                for asset, amount in sched.funding.items():
                    if asset in config.assets:
                        await gw.deposit(asset, amount)
            run.funded = True
        proc = SlotProcessor(run, gateways, store, config, max_retries=sched.max_retries,
                             backoff_base=sched.backoff_base, backoff_max=sched.backoff_max,
                             on_failure=args.on_failure, ask=ask)
        await proc.execute()
        return proc

    names = ", ".join(run.prefix + a for a in sched.accounts)
    # SIGTERM (``kill``, a service manager) stops a run the way Ctrl-C does: saved, with the
    # options that resume it, not cut off mid-slot without a word.
    terminated: list[bool] = []

    def on_term(signum: int, frame: Any) -> None:
        terminated.append(True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the first one stops it; more would cut the save
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: left as it is
        previous = None
    print(f"{'resuming' if args.resume else 'starting'} scheduled run {run.id}: "
          f"{len(run.slots)} slots, strategy {sched.strategy}, accounts {names}", flush=True)
    try:
        if cfg.embedded:
            from simulation.embedded import EmbeddedExchange
            from storage.lock import DataDirBusy

            try:
                exchange = EmbeddedExchange(config, seed=sched.seed, latency=cfg.latency, data_dir=cfg.data_dir)
            except DataDirBusy as exc:
                raise SimulationError(str(exc)) from None
            gateways: dict[str, Gateway] = {a: exchange.session(a) for a in sched.accounts}
            try:
                # A fresh in-process exchange: its accounts are funded again, even on resume.
                proc = exchange.kernel.run_until_complete(body(gateways, True))
            except BaseException:
                close_embedded(exchange, failed=True)  # what went wrong first is what is told
                raise
            close_embedded(exchange)
        else:
            proc = asyncio.run(_tcp_schedule(cfg, sched, config, run, body))
    except KeyboardInterrupt:
        store.save(run, full=True)
        print(f"\ninterrupted; resume with: {_resume_hint(run, cfg)}")
        return 143 if terminated else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    summary = proc.summary()
    print(json.dumps({k: v for k, v in summary.items() if k != "budgets"}))
    width = max([12] + [len(run.prefix + a) for a in summary["budgets"]])
    for account, assets in summary["budgets"].items():
        for asset, b in assets.items():
            print(f"  {run.prefix + account:<{width}} {asset:<5} initial {b['initial']:>18} available {b['available']:>18} "
                  f"locked {b['locked']:>14} spent {b['spent']:>16}  {b['utilization']}")
    if run.status != "completed":
        print(f"run {run.id} stopped ({run.status}); resume with: {_resume_hint(run, cfg)}")
        return 1
    if run.stats["completed"] == 0 and run.slots:
        print(f"error: run {run.id} went through its plan but no slot completed ({run.stats['skipped']} "
              f"skipped, {run.stats['failed']} failed): see the budgets above", file=sys.stderr)
        return 1
    return 0


async def _tcp_schedule(cfg: Any, sched: ScheduleConfig, config: MarketConfig, run: SimulationRun,
                        body: Callable[[dict[str, Gateway], bool], Awaitable[SlotProcessor]]) -> SlotProcessor:
    from simulation.runner import _connect_all, close_gateways, exchange_markets

    await exchange_markets(cfg, config, f"the markets file {cfg.markets_file}" if cfg.markets_file else "the built-in markets")
    gws = await _connect_all(cfg, config, [run.prefix + a for a in sched.accounts], None)
    try:
        return await body(dict(zip(sched.accounts, gws)), not run.funded)
    finally:
        await close_gateways(gws)

