"""Scheduled budget runs: crossing slots for every strategy, back-off, decisions, save and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exchange.markets import default_config
from simulation.embedded import EmbeddedExchange
from simulation.gateway import GatewayError
from simulation.scheduler import (
    COMPLETED,
    SKIPPED,
    STRATEGIES,
    RunStore,
    ScheduleConfig,
    SlotProcessor,
    build_slots,
    new_run,
)

CONFIG = default_config()


def schedule(strategy: str, n: int = 4, **kw: Any) -> ScheduleConfig:
    return ScheduleConfig.from_dict({
        "strategy": strategy, "accounts": [f"acct{i}" for i in range(n)],
        "markets": ["BTC-USD", "ACME-USD"], "trades_per_account": 4, **kw,
    })


def fund_all(ex: EmbeddedExchange, sched: ScheduleConfig) -> dict[str, Any]:
    gateways = {a: ex.session(a) for a in sched.accounts}

    async def fund() -> None:
        for gw in gateways.values():
            for asset, amount in sched.funding.items():
                await gw.deposit(asset, amount)

    ex.kernel.run_until_complete(fund())
    return gateways


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_slots_come_in_crossing_pairs_with_alternating_sides(strategy: str) -> None:
    sched = schedule(strategy)
    slots = build_slots(sched, CONFIG)
    assert len(slots) == 16  # 4 accounts x 4 trades = 8 pairs of 2 slots
    for maker, taker in zip(slots[::2], slots[1::2]):
        assert (maker.role, taker.role) == ("maker", "taker") and maker.pair == taker.pair
        assert maker.account != taker.account
        assert (maker.market, maker.qty, maker.price) == (taker.market, taker.qty, taker.price)
        assert {maker.side, taker.side} == {"buy", "sell"}
        assert maker.tif == "gtc" and taker.tif == "ioc"  # the taker crosses the resting maker
    for account in sched.accounts:
        sides = [s.side for s in slots if s.account == account]
        assert len(sides) == 4
        assert all(a != b for a, b in zip(sides, sides[1:])), (account, sides)
    assert build_slots(sched, CONFIG) == slots  # deterministic for a seed
    markets = [s.market for s in slots[::2]]
    if strategy == "same_market":
        assert markets[:2] == ["BTC-USD"] * 2 and markets[2:4] == ["ACME-USD"] * 2
    else:
        assert set(markets) == {"BTC-USD", "ACME-USD"}
    if strategy == "sequential":
        assert [s.account for s in slots[:8]] == ["acct0", "acct1"] * 4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_pair_trades_in_an_embedded_run(tmp_path: Path, strategy: str) -> None:
    sched = schedule(strategy)
    ex = EmbeddedExchange(CONFIG, data_dir=tmp_path)
    gateways = fund_all(ex, sched)
    run = new_run(sched, CONFIG)
    proc = SlotProcessor(run, gateways, RunStore(tmp_path / "simulations"), CONFIG)
    ex.kernel.run_until_complete(proc.execute())
    ex.close()
    assert run.status == "completed" and run.stats["completed"] == len(run.slots) == 16
    trades = [json.loads(line) for line in (tmp_path / "trades.jsonl").read_text().splitlines()]
    assert len(trades) == 8
    for trade, maker, taker in zip(trades, run.slots[::2], run.slots[1::2]):
        buyer = maker.account if maker.side == "buy" else taker.account
        seller = taker.account if maker.side == "buy" else maker.account
        assert (trade["buyer"], trade["seller"], trade["qty"], trade["price"]) == (
            buyer, seller, maker.qty, maker.price)
    budgets = proc.summary()["budgets"]
    assert set(budgets) == set(sched.accounts) and "USD" in budgets["acct0"]
    for account in sched.accounts:
        engine = ex.engine.balances(account)
        wallet = proc.budget.wallets[account]
        assert all(wallet.holdings[a] == engine[a].available + engine[a].locked for a in engine)


class FlakyGateway:
    """Fails its first ``failures`` orders with an error, then passes to a real gateway."""

    def __init__(self, real: Any, failures: int) -> None:
        self.real, self.failures = real, failures
        self.account, self.config = real.account, real.config

    async def place(self, *args: Any, **kw: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise GatewayError("connection_refused", "try again")
        return await self.real.place(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def flaky_setup(tmp_path: Path, failures: int, **kw: Any) -> tuple[EmbeddedExchange, SlotProcessor, list[float]]:
    sched = schedule("round_robin", trades_per_account=1, markets=["BTC-USD"])
    ex = EmbeddedExchange(CONFIG)
    gateways = fund_all(ex, sched)
    gateways["acct0"] = FlakyGateway(gateways["acct0"], failures)
    waited: list[float] = []

    async def sleep(seconds: float) -> None:
        waited.append(seconds)

    run = new_run(sched, CONFIG)
    proc = SlotProcessor(run, gateways, RunStore(tmp_path), CONFIG, max_retries=3,
                         backoff_base=0.1, backoff_max=10, sleep=sleep, **kw)
    return ex, proc, waited


def test_a_failing_slot_is_retried_with_exponential_backoff(tmp_path: Path) -> None:
    ex, proc, waited = flaky_setup(tmp_path, failures=3)
    run = ex.kernel.run_until_complete(proc.execute())
    assert waited == [0.1, 0.2, 0.4]
    assert run.status == "completed" and run.slots[0].attempts == 4
    assert run.stats["retries"] == 3 and run.stats["completed"] == len(run.slots)
    assert proc.backoff(10) == 10  # capped


def test_after_max_retries_skip_or_quit_decides(tmp_path: Path) -> None:
    ex, proc, waited = flaky_setup(tmp_path / "skip", failures=99, on_failure="skip")
    run = ex.kernel.run_until_complete(proc.execute())
    assert waited == [0.1, 0.2, 0.4] * 2  # the maker, then its taker
    assert run.slots[0].status == SKIPPED and run.slots[0].error == "connection_refused"
    assert run.status == "completed"
    # Its taker then has nothing to cross: retried, then skipped too; the other pair trades.
    assert run.slots[1].status == SKIPPED and run.slots[1].error == "not_filled"
    assert [s.status for s in run.slots[2:]] == [COMPLETED, COMPLETED]

    ex, proc, _ = flaky_setup(tmp_path / "quit", failures=99, on_failure="quit")
    run = ex.kernel.run_until_complete(proc.execute())
    assert run.status == "quit" and run.position == 0
    assert RunStore(tmp_path / "quit").load(run.id).status == "quit"


def test_a_taker_given_up_on_withdraws_its_makers_order(tmp_path: Path) -> None:
    """Otherwise the maker rests on, and a later pair's taker on that side trades with it
    instead of its own maker (and reports that pair done while its maker still rests)."""
    sched = schedule("round_robin", trades_per_account=1, markets=["BTC-USD"])
    ex = EmbeddedExchange(CONFIG)
    gateways = fund_all(ex, sched)
    run = new_run(sched, CONFIG)
    taker = run.slots[1]
    assert taker.role == "taker"
    gateways[taker.account] = FlakyGateway(gateways[taker.account], 99)

    async def sleep(seconds: float) -> None:
        pass

    proc = SlotProcessor(run, gateways, None, CONFIG, max_retries=1, sleep=sleep, on_failure="skip")
    ex.kernel.run_until_complete(proc.execute())
    assert [s.status for s in run.slots[:2]] == [COMPLETED, SKIPPED]
    assert not ex.engine.open_orders(run.slots[0].account, None)  # the maker was withdrawn


def test_the_terminal_is_asked_and_retry_starts_over(tmp_path: Path) -> None:
    asked: list[int] = []

    def ask(slot: Any, reason: str) -> str:
        asked.append(slot.index)
        return "retry" if len(asked) == 1 else "continue"

    ex, proc, waited = flaky_setup(tmp_path, failures=5, ask=ask)
    run = ex.kernel.run_until_complete(proc.execute())
    assert asked == [0]  # 4 attempts fail, retry, then the 6th attempt succeeds
    assert run.slots[0].status == COMPLETED and waited == [0.1, 0.2, 0.4, 0.1]


def test_an_interrupted_run_resumes_without_repeating_a_completed_slot(tmp_path: Path) -> None:
    sched = schedule("round_robin")
    ex = EmbeddedExchange(CONFIG, data_dir=tmp_path)
    gateways = fund_all(ex, sched)
    store = RunStore(tmp_path / "simulations")
    run = new_run(sched, CONFIG)
    first = SlotProcessor(run, gateways, store, CONFIG)
    ex.kernel.run_until_complete(first.execute(stop_after=7))
    saved = store.load(run.id)
    assert saved.status == "interrupted" and saved.position == 7
    assert [s.status for s in saved.slots[:7]] == [COMPLETED] * 7
    assert saved.slots[7].status == "pending"
    # A crash after slot 7 was sent and acknowledged but before it was marked done:
    ex.kernel.run_until_complete(gateways[saved.slots[7].account].place(
        saved.slots[7].market, saved.slots[7].side, saved.slots[7].qty, saved.slots[7].price,
        tif="ioc", client_order_id=f"{run.id}-7"))
    saved.slots[7].status, saved.slots[7].order_id = "in_progress", 999
    store.save(saved)

    resumed = store.load(run.id)
    second = SlotProcessor(resumed, gateways, store, CONFIG)
    ex.kernel.run_until_complete(second.execute())
    ex.close()
    assert resumed.status == "completed" and resumed.position == 16
    assert all(s.status == COMPLETED for s in resumed.slots)
    assert all(s.attempts == 1 for i, s in enumerate(resumed.slots) if i != 7)
    lines = (tmp_path / "trades.jsonl").read_text().splitlines()
    assert len(lines) == 8  # one trade per pair: nothing was sent twice
    assert [r.id for r in store.list()] == [run.id]
    assert not list((tmp_path / "simulations").glob("*.tmp"))


def _plain(run: Any) -> Any:
    return json.loads(json.dumps(run.to_dict()))  # tuples as the file has them: lists


def _advance(store: RunStore, run: Any, i: int) -> None:
    """What the processor saves for slot ``i``: in progress, then done at the next position."""
    run.slots[i].status = "in_progress"
    store.save(run)
    run.slots[i].status, run.slots[i].order_id = COMPLETED, 100 + i
    run.stats["completed"] += 1
    run.position += 1
    store.save(run)


def test_saves_between_full_rewrites_are_appended_and_read_back(tmp_path: Path) -> None:
    """Rewriting the whole file after every slot made a plan's time grow with its square;
    the saves in between are lines of a log, read back on load, ``--list`` and ``--resume``."""
    run = new_run(schedule("round_robin"), CONFIG)
    store = RunStore(tmp_path)
    store.save(run, full=True)
    written = store.path(run.id).read_bytes()
    for i in range(5):
        _advance(store, run, i)
    assert store.path(run.id).read_bytes() == written  # not rewritten
    assert _plain(RunStore(tmp_path).load(run.id)) == _plain(run)
    assert [r.position for r in RunStore(tmp_path).list()] == [5]

    # A crash in the middle of an append: the cut line is not applied, the rest stands.
    run.slots[5].status = "in_progress"
    store.save(run)
    with open(store.log_path(run.id), "ab") as fh:
        fh.write(b'{"generation": 1, "slots": [{"index": 5, "sta')
    back = RunStore(tmp_path).load(run.id)
    assert back.position == 5 and back.slots[5].status == "in_progress"

    # A full save takes it all into the file; a log of an older generation (a crash between
    # the rename and the unlink) is not applied on top of it.
    stale = store.log_path(run.id).read_bytes()
    store.save(run, full=True)
    assert not store.log_path(run.id).exists()
    store.log_path(run.id).write_bytes(stale)
    assert _plain(RunStore(tmp_path).load(run.id)) == _plain(run)


def test_a_full_rewrite_comes_every_so_many_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import simulation.scheduler as scheduler

    monkeypatch.setattr(scheduler, "FULL_SAVE_EVERY", 4)
    run = new_run(schedule("round_robin"), CONFIG)
    store = RunStore(tmp_path)
    store.save(run)  # a process's first save of a run rewrites the file
    assert not store.log_path(run.id).exists()
    _advance(store, run, 0)
    run.slots[1].status = "in_progress"
    store.save(run)
    assert len(store.log_path(run.id).read_bytes().splitlines()) == 3
    store.save(run)  # the fourth since the full one
    assert not store.log_path(run.id).exists()
    assert json.loads(store.path(run.id).read_text())["position"] == 1


@pytest.mark.parametrize("position", [6, 7], ids=["maker", "taker"])
def test_an_order_sent_just_before_an_interruption_is_not_sent_again(tmp_path: Path, position: int) -> None:
    """Interrupted between sending a slot's order and reading the answer (saved in progress,
    no order id): the resume asks the exchange. A maker found resting under the slot's client
    order id, or a taker whose maker has traded, counts as done; nothing trades twice."""
    sched = schedule("round_robin")
    ex = EmbeddedExchange(CONFIG, data_dir=tmp_path)
    gateways = fund_all(ex, sched)
    store = RunStore(tmp_path / "simulations")
    run = new_run(sched, CONFIG)
    ex.kernel.run_until_complete(SlotProcessor(run, gateways, store, CONFIG).execute(stop_after=position))
    saved = store.load(run.id)
    slot = saved.slots[position]
    assert slot.role == ("maker" if position == 6 else "taker")
    ex.kernel.run_until_complete(gateways[slot.account].place(
        slot.market, slot.side, slot.qty, slot.price, tif=slot.tif, client_order_id=f"{run.id}-{position}"))
    slot.status, slot.order_id = "in_progress", None  # the answer never made it to the file
    store.save(saved)

    resumed = store.load(run.id)
    ex.kernel.run_until_complete(SlotProcessor(resumed, gateways, store, CONFIG).execute())
    ex.close()
    assert resumed.status == "completed" and all(s.status == COMPLETED for s in resumed.slots)
    assert resumed.slots[position].attempts == 0  # found at the exchange, not sent again
    assert len((tmp_path / "trades.jsonl").read_text().splitlines()) == 8  # one trade per pair
    assert all(not ex.engine.open_orders(a, None) for a in gateways)


def test_budget_depletion_is_detected_and_summarised(tmp_path: Path) -> None:
    sched = schedule("round_robin", funding={"USD": "50", "BTC": "0.001", "ACME": "1"})
    ex = EmbeddedExchange(CONFIG)
    gateways = fund_all(ex, sched)
    waited: list[float] = []

    async def sleep(seconds: float) -> None:
        waited.append(seconds)

    run = new_run(sched, CONFIG)
    proc = SlotProcessor(run, gateways, None, CONFIG, max_retries=1, sleep=sleep)
    ex.kernel.run_until_complete(proc.execute())
    assert any(s.error == "budget_depleted" for s in run.slots)
    assert run.depleted and all(":" in d for d in run.depleted)
    summary = proc.summary()["budgets"]["acct0"]["USD"]
    assert set(summary) == {"initial", "available", "locked", "spent", "utilization"}
    assert summary["initial"] == "50.000000"


def test_bad_schedules_are_refused() -> None:
    for bad in ({"strategy": "zigzag"}, {"accounts": ["solo"]}, {"trades_per_account": 0},
                {"colour": "red"}, {"trades_per_account": 2.5}, {"max_retries": -1},
                {"backoff_base": -1}):
        with pytest.raises(ValueError):
            ScheduleConfig.from_dict(bad)
    with pytest.raises(ValueError):
        build_slots(ScheduleConfig.from_dict({"markets": ["NOPE"]}), CONFIG)


def test_the_summary_waits_for_fills_still_in_flight_under_a_latency_model(tmp_path: Path) -> None:
    """With a latency model the last maker's fill is delivered after the taker's slot
    completes: the budget summary must include it (it showed the funds still locked)."""
    sched = schedule("round_robin", seed=1)
    ex = EmbeddedExchange(CONFIG, seed=1, latency="gamma:mean=20ms")
    gateways = fund_all(ex, sched)
    run = new_run(sched, CONFIG)
    proc = SlotProcessor(run, gateways, RunStore(tmp_path), CONFIG)
    ex.kernel.run_until_complete(proc.execute())
    ex.close()
    assert run.status == "completed"
    budgets = proc.summary()["budgets"]
    for account in sched.accounts:
        engine = ex.engine.balances(account)
        for asset, b in budgets[account].items():
            fmt = CONFIG.assets[asset].format
            assert (b["available"], b["locked"]) == (fmt(engine[asset].available), fmt(engine[asset].locked)), (
                account, asset)
