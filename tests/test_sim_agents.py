"""Each agent's behaviour, in embedded runs (simulated time, a few hundred ms of wall time each)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from exchange.types import ExecType, Liquidity
from simulation.agents import Agent, MarketMaker, PassiveBuyer, RandomTrader, RunControl, TwapExecutor, below
from simulation.embedded import EmbeddedExchange
from simulation.runner import SimConfig, profiles_for, run_embedded


def run(tmp: Path, agents: dict[str, int], duration: float = 5.0, **kw: Any) -> tuple[dict[str, Any], list[Agent], Any]:
    out: dict[str, Any] = {}
    cfg = SimConfig(agents=agents, duration_s=duration, orders=None, seed=3, embedded=True,
                    data_dir=tmp, progress=False, trade_markets=["BTC-USD"], **kw)
    report = run_embedded(cfg, stream=None, out=out)
    assert not report["agent_failures"], report["agent_failures"]
    return report, out["agents"], out["exchange"]


def of(agents: list[Agent], cls: type) -> list[Any]:
    return [a for a in agents if isinstance(a, cls)]


def test_market_maker_stays_two_sided_and_refreshes(tmp_path: Path) -> None:
    report, agents, _ = run(tmp_path, {"random": 6, "mm": 1})
    (mm,) = of(agents, MarketMaker)
    assert mm.steps > 50
    assert mm.two_sided_steps >= 0.8 * mm.steps
    assert mm.refreshes > 0 and mm.stats.modifies >= mm.refreshes
    assert mm.wallet.trades > 0
    assert report["agents"][mm.name]["refreshes"] == mm.refreshes


def test_market_maker_respects_its_inventory_limit(tmp_path: Path) -> None:
    limit = 100  # lots of 0.0001 BTC
    _, agents, _ = run(tmp_path, {"random": 6, "mm": 1},
                       params={"mm": {"size_lots": 20, "max_inventory_lots": limit}})
    (mm,) = of(agents, MarketMaker)
    spec = mm.config.markets["BTC-USD"]
    inventory = (mm.wallet.holdings["BTC"] - mm.wallet.initial["BTC"]) // spec.base_per_lot
    # It stops adding on a side at the limit; one more quote's fill can cross it at most.
    assert abs(inventory) <= limit + 20


def test_twap_finishes_its_quantity_within_the_window(tmp_path: Path) -> None:
    _, agents, _ = run(tmp_path, {"random": 4, "mm": 1, "twap": 1}, duration=8.0,
                       params={"twap": {"qty_lots": 500, "window": 3.0, "slices": 6}})
    (twap,) = of(agents, TwapExecutor)
    assert twap.filled == 500
    assert twap.finished_ns - twap.started_ns <= 3 * 10**9
    assert 1 <= twap.slices_sent <= 6


def test_twap_limit_slices_finish_too(tmp_path: Path) -> None:
    _, agents, _ = run(tmp_path, {"random": 4, "mm": 1, "twap": 1}, duration=8.0,
                       params={"twap": {"qty_lots": 300, "window": 2.0, "slices": 4,
                                        "slice_type": "limit", "limit_ticks": 2000, "side": "sell"}})
    (twap,) = of(agents, TwapExecutor)
    assert twap.filled == 300
    assert twap.stats.orders["ioc"] >= 1 and not twap.stats.orders["market"]


def test_passive_buyer_never_takes_liquidity_and_stops_at_its_target(tmp_path: Path) -> None:
    _, agents, _ = run(tmp_path, {"random": 8, "passive": 1}, duration=20.0,
                       params={"passive": {"qty_lots": 3000, "price_cap": "31000.00"}})
    (buyer,) = of(agents, PassiveBuyer)
    assert buyer.wallet.trades > 0
    assert buyer.wallet.maker_trades == buyer.wallet.trades  # every fill as maker
    assert buyer.filled <= buyer.target
    assert buyer.stats.orders["post_only"] >= 1 and set(buyer.stats.orders) == {"post_only"}
    assert buyer.reprices > 0


def test_random_traders_respect_their_budgets(tmp_path: Path) -> None:
    small = {"USD": "300", "BTC": "0.01"}
    report, agents, exchange = run(tmp_path, {"random": 8}, duration=20.0, funding={"random": small})
    traders = of(agents, RandomTrader)
    assert sum(t.stats.skipped_for_budget for t in traders) > 0  # the budget did bind
    for t in traders:
        # Nothing the agent sent was refused for money: it only sends what it can pay.
        assert not any(k == "rejected:insufficient_funds" for k in t.stats.outcomes)
        engine = exchange.engine.balances(t.name)
        for asset in ("USD", "BTC"):
            assert t.wallet.holdings[asset] == engine[asset].available + engine[asset].locked >= 0
    assert report["orders_sent"] > 100


def test_an_insufficient_funds_refusal_is_counted_not_crashed_on() -> None:
    ex = EmbeddedExchange()
    config = ex.config
    control = RunControl(profiles_for(SimConfig(), config))
    agent = RandomTrader("dave", ex.session("dave"), control, ["BTC-USD"], funding={"USD": "100"})

    async def flow() -> Any:
        await agent.fund()
        agent.wallet.pots["USD"].holdings += 10**12  # a stale view: it believes it is rich
        return await agent.limit("BTC-USD", agent_side_buy(), 10_000, 3_000_000)

    rep = ex.kernel.run_until_complete(flow())
    assert rep.exec_type is ExecType.REJECTED
    assert agent.stats.outcomes["rejected:insufficient_funds"] == 1
    assert agent.wallet.committed["USD"] == 0  # the reservation was given back


def agent_side_buy() -> Any:
    from exchange.types import Side

    return Side.BUY


def test_maker_fills_are_reported_as_maker(tmp_path: Path) -> None:
    _, agents, _ = run(tmp_path, {"random": 4, "mm": 1}, duration=2.0)
    (mm,) = of(agents, MarketMaker)
    assert 0 < mm.wallet.maker_trades <= mm.wallet.trades
    assert Liquidity.MAKER.value == "maker"


def test_below_draws_exactly_what_randrange_and_randint_draw() -> None:
    """The random trader's draws are ``randrange``/``randint``'s, so seeded runs stay the same."""
    ours, ref = random.Random(11), random.Random(11)
    for n in [1, 2, 3, 7, 20, 50, 101, 1000, 2**20 + 3]:
        for _ in range(200):
            assert below(ours.getrandbits, n) == ref.randrange(n)
            assert 5 + below(ours.getrandbits, 11) == ref.randint(5, 15)
            assert -n + below(ours.getrandbits, 2 * n + 1) == ref.randint(-n, n)


def test_an_empty_book_is_priced_at_the_agents_last_trade_not_the_start(tmp_path: Path) -> None:
    """After the run has moved the price, a random trader that finds the book empty quotes
    around where it last traded; where it never traded, around the market's start."""
    _, agents, _ = run(tmp_path, {"random": 4}, duration=20.0, params={"random": {"max_offset_bps": 200}})
    trader = max(of(agents, RandomTrader), key=lambda a: a.wallet.trades)
    last = trader.wallet.legs["BTC-USD"].last_price
    start = trader.control.profiles["BTC-USD"].mid
    assert trader.wallet.trades > 0 and last != start
    assert trader._mid("BTC-USD", (None, None)) == last
    assert trader._mid("ACME-USD", (None, None)) == trader.control.profiles["ACME-USD"].mid  # no trade there
