"""The end-of-run report: what was sent, what happened to it, what it cost and earned.

Built only from what the agents saw through their gateways (their own reports), so it reads
the same in embedded and TCP mode. A trade between two agents is seen twice (maker and
taker); volumes and VWAPs count the taker side only, so each trade counts once. Money is
formatted from integers; the only floats are rates and latencies.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from exchange.markets import MarketConfig
from simulation.agents import Agent, MarketMaker, PassiveBuyer, TwapExecutor


def percentile(values: Sequence[int], pct: float) -> int | None:
    """Nearest-rank percentile of integer samples (None when there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def last_prices(agents: Sequence[Agent]) -> dict[str, int]:
    """The last trade price per market (ticks), from the highest trade id any agent saw."""
    best: dict[str, tuple[int, int]] = {}
    for agent in agents:
        for market, (trade_id, price) in agent.wallet.last_trade.items():
            if market not in best or trade_id > best[market][0]:
                best[market] = (trade_id, price)
    return {m: p for m, (_, p) in best.items()}


def build_report(
    agents: Sequence[Agent], config: MarketConfig, *, mode: str, elapsed_s: float,
    sim_elapsed_s: float | None, orders_sent: int, interrupted: bool,
    ack_latencies_ns: Sequence[int] = (), seed: int | None = None,
    failures: Sequence[str] = (),
) -> dict[str, Any]:
    orders_by_type: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    skipped = cancels = modifies = rejects = fills = 0
    for agent in agents:
        orders_by_type.update(agent.stats.orders)
        outcomes.update(agent.stats.outcomes)
        errors.update(agent.stats.errors)
        skipped += agent.stats.skipped_for_budget
        cancels += agent.stats.cancels
        modifies += agent.stats.modifies
        rejects += agent.stats.rejects
        fills += agent.wallet.trades
    marks = last_prices(agents)
    markets: dict[str, Any] = {}
    for symbol, spec in config.markets.items():
        volume = sum(a.wallet.taker_volume[symbol] for a in agents)
        cost = sum(a.wallet.taker_cost[symbol] for a in agents)
        notional = cost * spec.quote_per_tick_lot
        if not volume:
            continue
        markets[symbol] = {
            "trades": None,  # filled below from the taker fills
            "volume": spec.format_qty(volume),
            "notional": spec.quote.format(notional),
            "vwap": spec.format_avg_price(cost, volume),
            "last_price": spec.format_price(marks[symbol]) if symbol in marks else None,
        }
    trades_total = 0
    for symbol in markets:
        markets[symbol]["trades"] = n = sum(a.wallet.taker_fills[symbol] for a in agents)
        trades_total += n
    per_agent = {}
    for agent in agents:
        entry: dict[str, Any] = {
            "kind": agent.kind,
            "orders": sum(agent.stats.orders.values()),
            "fills": agent.wallet.trades,
            "maker_fills": agent.wallet.maker_trades,
            "rejects": agent.stats.rejects,
            "skipped_for_budget": agent.stats.skipped_for_budget,
            "pnl": agent.pnl(marks),
            "budget": agent.wallet.utilization(),
        }
        if isinstance(agent, MarketMaker):
            entry["refreshes"] = agent.refreshes
            entry["two_sided"] = f"{agent.two_sided_steps}/{agent.steps}"
        if isinstance(agent, TwapExecutor):
            spec = config.markets[agent.market]
            entry["twap"] = {
                "target": spec.format_qty(agent.target), "filled": spec.format_qty(agent.filled),
                "slices": agent.slices_sent,
                "took_s": (
                    round((agent.finished_ns - agent.started_ns) / 1e9, 6)
                    if agent.finished_ns is not None and agent.started_ns is not None else None
                ),
                "window_s": agent.window,
            }
        if isinstance(agent, PassiveBuyer):
            spec = config.markets[agent.market]
            entry["passive"] = {
                "target": spec.format_qty(agent.target), "filled": spec.format_qty(agent.filled),
                "reprices": agent.reprices,
            }
        per_agent[agent.name] = entry
    report: dict[str, Any] = {
        "mode": mode,
        "seed": seed,
        "interrupted": interrupted,
        "elapsed_s": round(elapsed_s, 3),
        "simulated_s": None if sim_elapsed_s is None else round(sim_elapsed_s, 6),
        "orders_sent": orders_sent,
        "orders_per_s": round(orders_sent / elapsed_s, 1) if elapsed_s > 0 else None,
        "orders_by_type": dict(sorted(orders_by_type.items())),
        "outcomes": dict(sorted(outcomes.items())),
        "cancels": cancels,
        "modifies": modifies,
        "rejects": rejects,
        "errors": dict(sorted(errors.items())),
        "skipped_for_budget": skipped,
        "fills": fills,
        "trades": trades_total,
        "markets": markets,
        "agents": per_agent,
        "agent_failures": list(failures),
    }
    if ack_latencies_ns:
        report["ack_latency_us"] = {
            "p50": round(percentile(ack_latencies_ns, 50) / 1000, 1),  # type: ignore[operator]
            "p99": round(percentile(ack_latencies_ns, 99) / 1000, 1),  # type: ignore[operator]
            "samples": len(ack_latencies_ns),
        }
    return report


def settle_outcomes(report: dict[str, Any], left_resting: int) -> None:
    """Every order sent gets an outcome, so they add up to ``orders_sent``: ``open`` for one
    the final cancels could not take back (the exchange stopped answering), ``no_answer``
    for one whose answer never came (the connection was lost with it on the way)."""
    report["left_resting"] = left_resting
    outcomes = report["outcomes"]
    if left_resting:
        outcomes["open"] = outcomes.get("open", 0) + left_resting
    missing = report["orders_sent"] - sum(outcomes.values())
    if missing > 0:
        outcomes["no_answer"] = missing
    report["outcomes"] = dict(sorted(outcomes.items()))


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines for the terminal."""
    lines = [
        f"Simulation ({report['mode']}) {_ending(report)}: "
        f"{report['orders_sent']} orders in {report['elapsed_s']} s "
        f"({report['orders_per_s']} orders/s wall"
        + (f", {report['simulated_s']} s simulated" if report.get("simulated_s") is not None else "")
        + ")",
        f"  orders by type: {report['orders_by_type']}",
        f"  outcomes: {report['outcomes']}",
        f"  fills {report['fills']}, trades {report['trades']}, cancels {report['cancels']}, "
        f"modifies {report['modifies']}, rejects {report['rejects']}, errors {report['errors']}, "
        f"skipped for budget {report['skipped_for_budget']}",
    ]
    if "ack_latency_us" in report:
        lat = report["ack_latency_us"]
        lines.append(f"  ack latency: p50 {lat['p50']} us, p99 {lat['p99']} us ({lat['samples']} orders)")
    for symbol, m in report["markets"].items():
        lines.append(
            f"  {symbol}: {m['trades']} trades, volume {m['volume']}, VWAP {m['vwap']}, "
            f"last {m['last_price']}"
        )
    for name, a in report["agents"].items():
        pnl = {k: v for k, v in a["pnl"].items() if k != "fees"}
        extra = ""
        if "twap" in a:
            took = a["twap"]["took_s"]
            extra = f" twap {a['twap']['filled']}/{a['twap']['target']} " + (
                f"in {took} s" if took is not None else "(not finished)")
        if "passive" in a:
            extra = f" bought {a['passive']['filled']}/{a['passive']['target']}"
        if "refreshes" in a:
            extra = f" refreshes {a['refreshes']}, two-sided {a['two_sided']}"
        lines.append(
            f"  {name:<14} {a['kind']:<8} orders {a['orders']:>6} fills {a['fills']:>6} "
            f"P&L {pnl} fees {a['pnl'].get('fees', {})}{extra}"
        )
    if report.get("left_resting"):
        why = ("the cancels were cut short" if report.get("cancels_cut_short")
               else "the exchange refused or did not answer their cancels")
        lines.append(f"  {report['left_resting']} orders left resting at the exchange ({why})")
    if report["agent_failures"]:
        lines.append(f"  agent failures ({len(report['agent_failures'])}):")
        for reason, names in failures_by_reason(report["agent_failures"]):
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"    {reason}: {shown}")
    return "\n".join(lines)


def _ending(report: dict[str, Any]) -> str:
    if report["interrupted"]:
        return "interrupted"
    if report.get("stopped_early"):
        return f"stopped early ({report['stopped_early']})"
    return "finished"


def failures_by_reason(failures: list[str]) -> list[tuple[str, list[str]]]:
    """``"agent: reason"`` lines grouped by reason, the most frequent first: when the
    exchange goes away, every agent fails the same way and one line says so."""
    groups: dict[str, list[str]] = {}
    for line in failures:
        name, _, reason = line.partition(": ")
        groups.setdefault(reason or name, []).append(name)
    return sorted(groups.items(), key=lambda item: -len(item[1]))
