"""The run's own helpers: when a stalled run stops, what agents of unknown assets are
funded with, and how the final cancels are counted when they are cut short."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from exchange.markets import build_config
from simulation.runner import SimConfig, StallWatch, _wind_down, default_funding, profiles_for


def _agent(interval: float, skips: int = 0) -> Any:
    return SimpleNamespace(interval=interval, done=False, stats=SimpleNamespace(skipped_for_budget=skips),
                           quiet_limit=lambda: 20 * interval)


def test_a_stall_needs_a_minute_without_orders_and_says_why() -> None:
    agents = [_agent(0.04), _agent(0.04)]
    control = SimpleNamespace(orders=5, max_orders=50)
    watch = StallWatch(agents)  # type: ignore[arg-type]
    assert not watch.stalled(agents, control, 0.0)  # type: ignore[arg-type]
    agents[0].stats.skipped_for_budget = 100  # one agent skips, the other is quiet
    assert not watch.stalled(agents, control, 59.0)  # type: ignore[arg-type]
    assert watch.stalled(agents, control, 61.0)  # type: ignore[arg-type]
    assert watch.reason == "no order for 60 s after 5 of 50: the agents have nothing more to do"
    agents[1].stats.skipped_for_budget = 1  # both skip for budget
    assert watch.stalled(agents, control, 62.0)  # type: ignore[arg-type]
    assert watch.reason == "no order for 60 s: the agents' budgets cannot pay for any"
    control.orders = 6  # an order went out: the clock starts again
    assert not watch.stalled(agents, control, 200.0)  # type: ignore[arg-type]
    assert not watch.stalled(agents, control, 259.0)  # type: ignore[arg-type]


def test_a_slow_rate_is_not_taken_for_a_stall() -> None:
    """One order every 67 s (--rate 0.015): twenty of its steps, not a minute."""
    agents = [_agent(1 / 0.015)]
    control = SimpleNamespace(orders=0)
    watch = StallWatch(agents)  # type: ignore[arg-type]
    assert not watch.stalled(agents, control, 0.0)  # type: ignore[arg-type]
    agents[0].stats.skipped_for_budget = 2
    assert not watch.stalled(agents, control, 70.0)  # type: ignore[arg-type]
    assert watch.stalled(agents, control, 20 / 0.015 + 1)  # type: ignore[arg-type]


def _market(symbol: str, base: str, quote: str, tick: str, lot: str, ref: str) -> dict[str, str]:
    return {"symbol": symbol, "base": base, "quote": quote, "tick_size": tick, "lot_size": lot,
            "min_qty": lot, "reference_price": ref}


def _funding(assets: dict[str, int], *markets: dict[str, str]) -> dict[str, dict[str, str]]:
    config = build_config({"assets": assets, "markets": list(markets)})
    profiles = profiles_for(SimConfig(), config)
    return {kind: default_funding(kind, config, profiles) for kind in ("random", "passive")}


def test_unknown_assets_are_funded_by_worth_whatever_the_order_of_the_markets() -> None:
    eth_usd = _market("ETH-USD", "ETH", "USD", "0.01", "0.001", "2000.00")
    xyz_eth = _market("XYZ-ETH", "XYZ", "ETH", "0.0001", "0.01", "0.5000")
    one = _funding({"USD": 6, "ETH": 6, "XYZ": 2}, eth_usd, xyz_eth)
    assert one == _funding({"USD": 6, "ETH": 6, "XYZ": 2}, xyz_eth, eth_usd)
    # ETH is a quote too: a full 100,000 USD's worth; XYZ half of the agent's ETH at 0.5 ETH.
    assert one["random"] == {"USD": "100000", "ETH": "50.000000", "XYZ": "50.00"}
    assert one["passive"] == {"USD": "500000", "ETH": "250.000000"}  # it only buys


def test_a_base_is_valued_against_its_own_quote_not_in_usd_units() -> None:
    funded = _funding({"BTC": 8, "ETH": 8}, _market("ETH-BTC", "ETH", "BTC", "0.00001", "0.001", "0.05000"))
    assert funded["random"] == {"BTC": "2", "ETH": "20.00000000"}  # half of 2 BTC's worth


def test_a_base_too_dear_for_the_budget_still_gets_one_minimum_order() -> None:
    funded = _funding({"USD": 2, "GOLD": 0}, _market("GOLD-USD", "GOLD", "USD", "1", "1", "250000"))
    assert funded["random"] == {"USD": "100000", "GOLD": "1"}


async def test_cancels_cut_short_count_only_what_is_still_open() -> None:
    """A second Ctrl-C ends the final cancels: the count takes in the reports of those that
    got through before it (each agent's ``sync``), not the agents' stale books."""
    hurry = asyncio.Event()

    class Agent:
        def __init__(self) -> None:
            self.wallet = SimpleNamespace(orders={1: None, 2: None, 3: None})
            self.received: list[int] = []

        async def shutdown(self) -> int:
            self.received.append(1)  # its cancel of order 1 was answered...
            hurry.set()  # ...then the user pressed Ctrl-C again
            await asyncio.sleep(30)
            return 0

        def sync(self) -> None:
            for oid in self.received:
                self.wallet.orders.pop(oid, None)
            self.received.clear()

    class Gw:
        halt: Any = None

        async def settled(self) -> None:
            return None

    agents = [Agent(), Agent()]
    left, cut_short = await asyncio.wait_for(_wind_down(agents, [Gw(), Gw()], hurry), 5)  # type: ignore[arg-type]
    assert (left, cut_short) == (4, True)


@pytest.mark.parametrize("value", ["0", "0s"])
def test_a_config_duration_of_zero_is_refused(value: str) -> None:
    from simulation.runner import SimulationError, apply_file_config

    with pytest.raises(SimulationError, match="the duration must be more than zero"):
        apply_file_config(SimConfig(), {"duration": value})
