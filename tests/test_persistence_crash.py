"""kill -9 under load: nothing acknowledged is lost, nothing is counted twice.

Several clients pipeline orders and cancels at the engine subprocess; at a random moment
(seeded) the engine is killed with SIGKILL. After a restart on the same data directory:

* every order that was acknowledged is there: still resting (with at least the fills it
  was told about), or it was reported finished, or the ledger shows it filled, or its
  owner had sent a cancel for it; an acknowledged cancel stays cancelled;
* every trade any client was told about is in ``trades.jsonl`` exactly once, and the
  ledger holds trade ids 1..N with no gap and no repeat;
* the ledger bytes written before the crash are unchanged (only appended to);
* the recovered state conserves every asset and keeps every invariant;
* ids continue after everything ever handed out: a new order and a new trade get fresh ids;
* every user's audit log has each acknowledged order and each fill it was told of, once.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from test_persistence_restart import T, Engine, next_exec

from client import ExchangeClient
from client.client import ExchangeConnectionError
from exchange.markets import default_config
from exchange.state import import_state
from storage.ledger import read_ledger
from storage.snapshot import read_snapshot

USERS = ("u0", "u1", "u2", "u3")


class Trader:
    """One client's pipelined flow and everything it was told."""

    def __init__(self, client: ExchangeClient, user: str, rng: random.Random) -> None:
        self.client = client
        self.user = user
        self.rng = rng
        self.acked: dict[int, dict[str, Any]] = {}  # order id -> its acknowledgement
        self.cancel_sent: set[int] = set()
        self.cancel_acked: set[int] = set()
        self.inflight: set[asyncio.Future[dict[str, Any]]] = set()
        self.sent = 0
        self.budget = 0

    def request(self) -> None:
        rng = self.rng
        open_ids = [oid for oid in self.acked if oid not in self.cancel_sent]
        if open_ids and rng.random() < 0.25:
            oid = rng.choice(open_ids)
            self.cancel_sent.add(oid)
            fut = self.client.send("cancel", order_id=oid)
            fut.add_done_callback(lambda f, oid=oid: self._cancelled(f, oid))
        else:
            side = rng.choice(("buy", "sell"))
            ticks = 10_000 + (rng.randint(-30, 5) if side == "buy" else rng.randint(-5, 30))
            fut = self.client.send(
                "order", market="BTC-USD", side=side, type="limit",
                price=f"{ticks // 100}.{ticks % 100:02d}", qty=f"0.{rng.randint(1, 50):04d}",
                stp="none",
            )
            fut.add_done_callback(self._placed)
        self.inflight.add(fut)
        fut.add_done_callback(self.inflight.discard)

    def _placed(self, fut: asyncio.Future[dict[str, Any]]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            reply = fut.result()
            if reply.get("exec_type") == "new":
                self.acked[reply["order_id"]] = reply

    def _cancelled(self, fut: asyncio.Future[dict[str, Any]], oid: int) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result().get("exec_type") == "canceled":
            self.cancel_acked.add(oid)

    async def run(self, budget: int, window: int = 8) -> None:
        self.budget = budget
        try:
            while self.sent < budget:
                while len(self.inflight) < window and self.sent < budget:
                    self.request()
                    self.sent += 1
                await asyncio.wait(set(self.inflight), timeout=T, return_when=asyncio.FIRST_COMPLETED)
        except ExchangeConnectionError:
            pass
        for fut in list(self.inflight):  # the crash fails them; nothing else to wait for
            try:
                await asyncio.wait_for(fut, T)
            except Exception:
                pass

    def reports(self) -> list[dict[str, Any]]:
        return [e for e in self.client.pending_events() if e.get("type") == "exec"]


def conserved(state: dict[str, Any]) -> None:
    fields = state["balance_fields"]
    totals: Counter[str] = Counter()
    for per_asset in state["balances"].values():
        for asset, row in per_asset.items():
            bal = dict(zip(fields, row))
            assert bal["available"] >= 0 and bal["locked"] >= 0
            totals[asset] += bal["available"] + bal["locked"]
    for asset, net in state["deposits"].items():
        assert totals[asset] == net, asset


def taker_first(trade: dict[str, Any]) -> list[tuple[int, str]]:
    """A ledger line's (order id, user) of each side, the taker's first (as reports come)."""
    buy, sell = (trade["buy_order_id"], trade["buyer"]), (trade["sell_order_id"], trade["seller"])
    return [buy, sell] if trade["taker_side"] == "buy" else [sell, buy]


@pytest.mark.parametrize(("seed", "fsync"), [(1, "batch"), (2, "batch"), (3, "off")])
async def test_kill_9_under_load_loses_no_acknowledged_order_or_trade(
    tmp_path: Path, seed: int, fsync: str,
) -> None:
    # ``off`` never fsyncs but still writes each batch before acknowledging: a killed
    # process loses nothing it acknowledged (only a power cut could).
    rng = random.Random(seed)
    eng = Engine(tmp_path / "data", "--fsync", fsync)
    try:
        await eng.start()
        traders = [Trader(await eng.client(u), u, random.Random(seed * 10 + i)) for i, u in enumerate(USERS)]
        runs = [asyncio.ensure_future(t.run(budget=5000)) for t in traders]
        await asyncio.sleep(rng.uniform(0.15, 0.6))
        eng.proc.kill()  # type: ignore[union-attr]
        await asyncio.wait_for(eng.proc.wait(), T)  # type: ignore[union-attr]
        await asyncio.wait_for(asyncio.gather(*runs), T)
        ledger_at_crash = (eng.data / "trades.jsonl").read_bytes()
        reports = {t.user: t.reports() for t in traders}
        for t in traders:
            t.client.abort()
        assert sum(len(t.acked) for t in traders) > 20, "the crash came too early to test much"
        assert any(t.sent < t.budget for t in traders), "the load ended before the crash"

        await eng.start()
        ledger_bytes = (eng.data / "trades.jsonl").read_bytes()
        assert ledger_bytes.startswith(ledger_at_crash)
        ledger = read_ledger(eng.data / "trades.jsonl")
        ids = [t["trade_id"] for t in ledger]
        assert ids == list(range(1, len(ids) + 1)), "trade ids must be 1..N, each once"
        by_id = {t["trade_id"]: t for t in ledger}
        filled: dict[int, Decimal] = defaultdict(Decimal)
        for t in ledger:
            filled[t["buy_order_id"]] += Decimal(t["qty"])
            filled[t["sell_order_id"]] += Decimal(t["qty"])

        # The recovered state: conserved, consistent (import_state checks every invariant).
        snap = read_snapshot(eng.data / "snapshot.json")
        assert snap is not None
        conserved(snap["state"])
        import_state(default_config(), snap["state"])
        assert snap["state"]["counters"]["next_trade_id"] == len(ids) + 1

        max_order_id = 0
        for t in traders:
            c = await eng.client(t.user)
            open_now = {o["order_id"]: o for o in await c.orders()}
            told = reports[t.user]
            terminal = {r["order_id"] for r in told if r["status"] in ("filled", "canceled", "expired")}
            seen_filled: dict[int, Decimal] = defaultdict(Decimal)
            for r in told:
                if r.get("trade_id") is not None:
                    trade = by_id.get(r["trade_id"])
                    assert trade is not None, f"acknowledged trade {r['trade_id']} is not in the ledger"
                    assert r["order_id"] in (trade["buy_order_id"], trade["sell_order_id"])
                    assert Decimal(trade["qty"]) == Decimal(r["last_qty"])
                    seen_filled[r["order_id"]] = max(seen_filled[r["order_id"]], Decimal(r["filled_qty"]))
            # ``fills`` after the restart: exactly the user's sides of the ledger's trades,
            # read back from it (paging forward; the ledger is far below the 4 MiB read).
            fills: list[dict[str, Any]] = []
            while True:
                page = (await c.fills(limit=100, after=fills[-1]["trade_id"] if fills else 0))["fills"]
                fills += page
                if len(page) < 100:
                    break
            assert [(f["trade_id"], f["order_id"]) for f in fills] == [
                (x["trade_id"], oid) for x in ledger for oid, who in taker_first(x) if who == t.user]
            for oid, ack in t.acked.items():
                max_order_id = max(max_order_id, oid)
                if oid in open_now:
                    assert oid not in t.cancel_acked
                    assert Decimal(open_now[oid]["filled_qty"]) >= seen_filled[oid]
                    assert open_now[oid]["qty"] == ack["qty"] and open_now[oid]["price"] == ack["price"]
                else:
                    assert (oid in terminal or oid in t.cancel_sent
                            or filled[oid] == Decimal(ack["qty"])), f"acknowledged order {oid} vanished"

        # Ids continue after everything handed out before the crash (on the market the load
        # left alone, so the new trade is exactly this pair).
        buyer, seller = await eng.client("late_buyer"), await eng.client("late_seller")
        await seller.sell("ACME-USD", "1", "100.00")
        new = await buyer.buy("ACME-USD", "1", "100.00")
        assert new["order_id"] > max(max_order_id, max((max(t["buy_order_id"], t["sell_order_id"]) for t in ledger), default=0))
        fill = await next_exec(buyer, "trade")
        assert fill["trade_id"] == len(ids) + 1
        assert await eng.stop() == 0
        # Every user's audit log has each acknowledged order placed, and each fill it was
        # told of, exactly once: lines lost with the crash were rebuilt from the journal.
        for t in traders:
            log = (eng.data / "logs" / f"{t.user}.log").read_text()
            lines = log.splitlines()
            for oid in t.acked:
                assert log.count(f" PLACED order {oid} ") == 1, (t.user, oid)
            for r in reports[t.user]:
                if r.get("trade_id") is not None:  # (a user may be both sides of a trade)
                    fill = f" FILL order {r['order_id']} "
                    tag = f"trade {r['trade_id']}); "
                    assert sum(fill in x and tag in x for x in lines) == 1, (t.user, r["trade_id"])
        final = read_ledger(eng.data / "trades.jsonl")
        assert [t["trade_id"] for t in final] == list(range(1, len(ids) + 2))
        assert (eng.data / "trades.jsonl").read_bytes().startswith(ledger_bytes)
    finally:
        if eng.proc is not None and eng.proc.returncode is None:
            eng.proc.kill()
            await eng.proc.wait()
