"""Embedded simulation: the gateway, the simulated clock and latency, and determinism.

Every run here is in simulated time and bounded by an order count or a simulated
duration, so each test takes well under a second of wall time.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from exchange.markets import InvalidValue, default_config, format_scaled
from exchange.types import ExecType, OrderStatus, RejectReason, Side, Trade
from simulation.embedded import SIM_EPOCH_NS, EmbeddedExchange, LedgerLines, parse_duration_ns, parse_latency
from simulation.gateway import GatewayError, MarketTexts, WireNumbers, scaled_text
from storage.ledger import trade_line
from simulation.runner import SimConfig, run_embedded

AGENTS = {"random": 6, "mm": 1, "twap": 1, "passive": 1}


def run(tmp: Path, seed: int = 7, latency: str | None = None, orders: int = 3000,
        out: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = SimConfig(agents=dict(AGENTS), orders=orders, duration_s=None, seed=seed,
                    embedded=True, latency=latency, data_dir=tmp, progress=False)
    return run_embedded(cfg, stream=None, out=out)


def ledger(tmp: Path) -> bytes:
    return (tmp / "trades.jsonl").read_bytes()


@pytest.mark.parametrize("latency", [None, "gamma:mean=5ms"], ids=["no-latency", "gamma"])
def test_same_seed_same_ledger_bytes_and_another_seed_differs(tmp_path: Path, latency: str | None) -> None:
    first = run(tmp_path / "a", latency=latency)
    run(tmp_path / "b", latency=latency)
    run(tmp_path / "c", seed=8, latency=latency)
    a, b, c = ledger(tmp_path / "a"), ledger(tmp_path / "b"), ledger(tmp_path / "c")
    assert a.count(b"\n") > 100, "the agents should trade"
    assert a == b
    assert a != c
    assert first["orders_sent"] == 3000 and not first["agent_failures"]


def test_agents_books_match_the_engine_and_assets_are_conserved(tmp_path: Path) -> None:
    out: dict[str, Any] = {}
    report = run(tmp_path, out=out)
    exchange = out["exchange"]
    exchange.engine.check_invariants()
    for agent in out["agents"]:
        engine = exchange.engine.balances(agent.name)
        for asset, total in agent.wallet.holdings.items():
            assert total == engine[asset].available + engine[asset].locked, (agent.name, asset)
            assert total >= 0
        assert not agent.wallet.orders, "shutdown cancels everything still resting"
        assert not exchange.engine.open_orders(agent.name)
    # Every ledger line is a trade some agent took (counted once, on the taker side).
    assert report["trades"] == ledger(tmp_path).count(b"\n")


def test_latency_delays_acknowledgements_on_the_simulated_clock() -> None:
    ex = EmbeddedExchange(latency="fixed:500us")
    alice, bob = ex.session("alice"), ex.session("bob")

    async def flow() -> tuple[int, int, Any, Any]:
        await alice.deposit("USD", "1000")
        await bob.deposit("BTC", "1")
        t0 = alice.now_ns()
        new = await alice.place("BTC-USD", "buy", "0.5", "100.00")
        took = alice.now_ns() - t0
        alice.poll_events()
        sent = bob.now_ns()
        await bob.sleep(0.0002)
        assert not alice.poll_events()
        await bob.place("BTC-USD", "sell", "0.2", "99.00")
        # bob's order reached the engine 500 us after it left; alice hears 500 us later
        assert bob.now_ns() - sent == 200_000 + 1_000_000
        fill = [e for e in alice.poll_events() if e.exec_type is ExecType.TRADE]
        return took, fill[0].ts - sent if fill else -1, new, fill

    took, engine_after, new, fill = ex.kernel.run_until_complete(flow())
    assert took == 1_000_000  # one way there, one way back
    assert engine_after == 200_000 + 500_000
    assert new.status is OrderStatus.NEW and len(fill) == 1
    assert alice.wire(fill[0])["last_qty"] == "0.2000"


def test_gateway_answers_queries_and_refusals_like_the_exchange() -> None:
    ex = EmbeddedExchange()
    gw = ex.session("carol")

    async def flow() -> None:
        await gw.deposit("USD", "1000")
        bad = await gw.place("BTC-USD", "buy", "1", "100.001")
        assert bad.exec_type is ExecType.REJECTED and bad.reason.value == "invalid_price"
        broke = await gw.place("BTC-USD", "buy", "100", "100.00")
        assert broke.reason.value == "insufficient_funds"
        first = await gw.place("BTC-USD", "buy", "1", "100.00")
        second = await gw.place("BTC-USD", "buy", "2", "100.00")
        assert await gw.queue_position(first.order_id) == 0
        assert await gw.queue_position(second.order_id) == 10_000  # 1 BTC in lots of 0.0001
        book = await gw.book("BTC-USD")
        assert book.bids == [(10_000, 30_000, 2)] and book.asks == []
        assert gw.top_now("BTC-USD") == (10_000, None) == await gw.top("BTC-USD")
        assert gw.top_now("DOGE-USD") is None  # unknown here: ``top`` says why
        assert [o.order_id for o in await gw.open_orders()] == [first.order_id, second.order_id]
        replaced = await gw.modify(second.order_id, price="99.00")
        assert replaced.exec_type is ExecType.REPLACED and replaced.price == 9_900
        await gw.cancel(first.order_id)
        with pytest.raises(GatewayError) as err:
            await gw.cancel(first.order_id)
        assert err.value.code == "unknown_order"
        with pytest.raises(GatewayError):
            await gw.deposit("DOGE", "1")

    ex.kernel.run_until_complete(flow())


@pytest.mark.parametrize("latency", [None, "fixed:500us"])
def test_a_client_order_id_in_use_is_refused_embedded_as_over_tcp(latency: str | None) -> None:
    """Strategies run unchanged in both modes: embedded refuses a second open order under a
    client order id as the TCP gateway does (at arrival), and frees the id with the order."""
    ex = EmbeddedExchange(latency=parse_latency(latency) if latency else None)
    gw = ex.session("carol")
    other = ex.session("dave")

    async def flow() -> None:
        await gw.deposit("USD", "1000")
        await other.deposit("USD", "1000")
        first = await gw.place("BTC-USD", "buy", "1", "100.00", client_order_id="q1")
        again = await gw.place("BTC-USD", "buy", "1", "99.00", client_order_id="q1")
        assert again.exec_type is ExecType.REJECTED and again.reason is RejectReason.DUPLICATE_CLIENT_ORDER_ID
        assert again.client_order_id == "q1"
        theirs = await other.place("BTC-USD", "buy", "1", "99.00", client_order_id="q1")
        assert theirs.exec_type is ExecType.NEW
        await gw.cancel(first.order_id)
        reused = await gw.place("BTC-USD", "buy", "1", "98.00", client_order_id="q1")
        assert reused.exec_type is ExecType.NEW
        for bad in ("", "a\nb", "x" * 65):
            with pytest.raises(GatewayError) as err:
                await gw.place("BTC-USD", "buy", "1", "98.00", client_order_id=bad)
            assert err.value.code == "bad_request"

    ex.kernel.run_until_complete(flow())


def test_latency_and_duration_parsing() -> None:
    assert parse_duration_ns("500us") == 500_000 and parse_duration_ns("2s") == 2 * 10**9
    assert parse_latency("fixed:500us").mean_ns == 500_000  # type: ignore[union-attr]
    model = parse_latency("gamma:mean=5ms,shape=3")
    assert model is not None and model.kind == "gamma" and model.mean_ns == 5_000_000
    assert parse_latency("none") is None and parse_latency(None) is None
    for bad in ("fixed:soon", "gamma:shape=2", "uniform:1ms"):
        with pytest.raises(ValueError):
            parse_latency(bad)


def test_the_cached_ledger_lines_are_trade_line_byte_for_byte() -> None:
    """The embedded ledger formats trades itself (for speed); the bytes must be the server's."""
    config = default_config()
    lines = LedgerLines(config)
    rng = random.Random(5)
    for i in range(3000):
        market = rng.choice(list(config.markets))
        trade = Trade(
            market, i + 1, rng.choice([1, 7, 100, rng.randint(1, 10**7)]),
            rng.choice([1, 10, rng.randint(1, 10**6)]), rng.choice([Side.BUY, Side.SELL]),
            rng.randint(1, 10**6), rng.randint(1, 10**6), rng.choice(["random01", "mm02", 'q"é\\']),
            "mm01", rng.choice([0, 1, 99, rng.randint(0, 10**9)]), rng.choice([0, 5, rng.randint(0, 10**9)]),
            SIM_EPOCH_NS + rng.randint(0, 10**12),
        )
        assert lines(trade) == trade_line(trade, config)


def test_scaled_text_and_market_texts_are_the_markets_own_formatting() -> None:
    for decimals in range(-2, 10):
        for units in [0, 1, -1, 9, 10, 11, 99, 100, 101, 123456789, -123456789, 10**20, -(10**20)]:
            assert scaled_text(units, decimals) == format_scaled(units, decimals), (units, decimals)
    for spec in default_config().markets.values():
        texts = MarketTexts(spec)
        for n in [1, 5, 10, 99, 100, 12345, 3_000_000, 10**12] * 2:  # twice: cached the second time
            assert texts.price(n) == spec.format_price(n)
            assert texts.qty(n) == spec.format_qty(n)
            assert texts.amount(n) == spec.quote.format(n)


def test_wire_numbers_parse_as_the_market_does_and_refuse_what_it_refuses() -> None:
    for spec in default_config().markets.values():
        num, texts = WireNumbers(spec), MarketTexts(spec)
        for n in [1, 5, 10, 99, 100, 12345, 3_000_000] * 2:  # twice: cached the second time
            assert num.price(texts.price(n)) == n == spec.price_ticks(spec.format_price(n))
            assert num.lots(texts.qty(n)) == n
            assert num.amount(texts.amount(n)) == n
        assert num.lots("0") == 0 and num.amount("0") == 0
        off_grid = spec.format_price(100) + "1"
        for _ in range(2):  # a refusal is not remembered as a value
            with pytest.raises(InvalidValue):
                num.price(off_grid)
        assert off_grid not in num.prices


def test_an_embedded_run_refuses_an_exchanges_data_directory(tmp_path: Path) -> None:
    """``start_simulation.py --embedded`` defaults to ./data, where the exchange keeps its
    append-only ledger: a run there must not rewrite it, whether the exchange is running
    (it holds the directory's lock) or stopped (its snapshot and journal are there)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    sim = [sys.executable, str(root / "run" / "start_simulation.py"), "--embedded", "--orders", "200",
           "--data-dir", str(data)]
    engine = subprocess.Popen(
        [sys.executable, str(root / "run" / "start_engine.py"), "--port", "0", "--data-dir", str(data),
         "--log-level", "WARNING"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert engine.stdout is not None and "listening" in engine.stdout.readline()
        (data / "trades.jsonl").write_bytes(b'{"trade_id":1}\n')  # stands for the real ledger
        running = subprocess.run(sim, cwd=root, capture_output=True, text=True, timeout=60)
        assert running.returncode != 0 and "in use by an exchange" in running.stderr
        assert (data / "trades.jsonl").read_bytes() == b'{"trade_id":1}\n'
    finally:
        engine.terminate()
        engine.wait(30)
    stopped = subprocess.run(sim, cwd=root, capture_output=True, text=True, timeout=60)
    assert stopped.returncode != 0 and "holds an exchange's data" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (data / "trades.jsonl").read_bytes() == b'{"trade_id":1}\n'
    # Its own directory is fine, and a second run there starts the file afresh.
    fresh = subprocess.run([*sim[:-1], str(tmp_path / "sim")], cwd=root, capture_output=True,
                           text=True, timeout=60)
    assert fresh.returncode == 0, fresh.stderr
    assert (tmp_path / "sim" / "trades.jsonl").stat().st_size > 0


def _random_orders(report: dict[str, Any]) -> int:
    return sum(a["orders"] for a in report["agents"].values() if a["kind"] == "random")


@pytest.mark.parametrize("latency", [None, "gamma:mean=5ms"], ids=["no-latency", "gamma-5ms"])
def test_the_random_traders_send_the_rate_asked_for_in_simulated_time(tmp_path: Path, latency: str | None) -> None:
    """``--rate 200`` for 10 simulated seconds: about 2,000 random orders, although a quarter
    of their steps cancel and, with a latency model, each request waits 5 ms on average for
    its acknowledgement (a pause counted from the step's end would lose both)."""
    cfg = SimConfig(agents=dict(AGENTS), orders=None, duration_s=10.0, rate=200, seed=3,
                    embedded=True, latency=latency, data_dir=tmp_path, progress=False)
    report = run_embedded(cfg, stream=None)
    assert report["simulated_s"] == pytest.approx(10.0, abs=0.1)
    assert 1_850 <= _random_orders(report) <= 2_150, _random_orders(report)
