"""The order history file: created, updated report by report, reloaded, written atomically.

The reports in the sequence tests are produced the way the client receives them: the real
engine handles the commands and ``protocol.Formatter`` renders its execution reports as
wire dicts (through a JSON round trip), so the session manager is tested on the exchange's
own words rather than on hand-made approximations of them.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from client.session_manager import SessionError, SessionManager, history_path
from exchange.engine import Exchange
from exchange.markets import default_config
from exchange.protocol import Formatter
from exchange.types import (
    CancelOrder,
    Deposit,
    ExecReport,
    ModifyOrder,
    OrderType,
    PlaceOrder,
    Side,
    TimeInForce,
)

BTC = "BTC-USD"


class WireDesk:
    """An engine whose execution reports come out as the dicts a client reads off the wire."""

    def __init__(self) -> None:
        self.ex = Exchange(default_config())
        self.fmt = Formatter(self.ex.config)
        self.clock = itertools.count(1_700_000_000_000_000_000, 1_000_000)
        for user in ("alice", "bob"):
            for asset, amount in (("USD", "100000"), ("BTC", "10")):
                units = self.ex.config.assets[asset].to_units(amount)
                self.ex.handle(Deposit(next(self.clock), user, asset, units))

    def _run(self, cmd: Any, user: str) -> list[dict[str, Any]]:
        out = []
        for ev in self.ex.handle(cmd):
            if isinstance(ev, ExecReport) and ev.account == user:
                out.append(orjson.loads(orjson.dumps(self.fmt.exec_report(ev))))
        return out

    def order(self, user: str, side: str, qty: str, price: str | None, tif: str = "gtc",
              coid: str | None = None, report_to: str | None = None) -> list[dict[str, Any]]:
        m = self.ex.market(BTC)
        assert m is not None
        cmd = PlaceOrder(
            next(self.clock), user, BTC, Side(side),
            OrderType.LIMIT if price is not None else OrderType.MARKET, m.qty_lots(qty),
            m.price_ticks(price) if price is not None else None,
            TimeInForce(tif) if price is not None else TimeInForce.IOC, client_order_id=coid,
        )
        return self._run(cmd, report_to or user)

    def cancel(self, user: str, order_id: int) -> list[dict[str, Any]]:
        return self._run(CancelOrder(next(self.clock), user, order_id), user)

    def modify(self, user: str, order_id: int, qty: str) -> list[dict[str, Any]]:
        m = self.ex.market(BTC)
        assert m is not None
        return self._run(ModifyOrder(next(self.clock), user, order_id, None, m.qty_lots(qty)), user)


def stored(path: Path) -> dict[str, Any]:
    return orjson.loads(path.read_bytes())


def files_in(directory: Path) -> list[str]:
    """The directory's files, less the lock that coordinates two clients' saves."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".json.lock"))


# ---------------------------------------------------------------------------- creation


def test_creates_the_file_when_missing(tmp_path: Path) -> None:
    history = SessionManager("alice", tmp_path / "data")
    path = tmp_path / "data" / "sessions" / "orders_alice.json"
    assert history.path == path == history_path(tmp_path / "data", "alice")
    assert stored(path) == {"version": 1, "user": "alice", "orders": []}
    assert len(history) == 0 and history.warnings == []


def test_unsafe_user_names_are_refused(tmp_path: Path) -> None:
    for bad in ("../evil", "a/b", "a\\b", "..", ""):
        with pytest.raises(SessionError):
            SessionManager(bad, tmp_path)


# ---------------------------------------------------------------------------- updates


def test_new_partial_fill_and_fill_then_reload(tmp_path: Path) -> None:
    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    [new] = desk.order("alice", "sell", "1", "100.00", coid="c-1")
    rec = history.apply(new)
    assert rec is not None and rec["status"] == "NEW"
    oid = new["order_id"]
    on_disk = stored(history.path)["orders"]
    assert len(on_disk) == 1
    assert {k: on_disk[0][k] for k in ("order_id", "client_order_id", "market", "side", "type", "price",
                                       "qty", "filled", "avg_price", "status")} == {
        "order_id": oid, "client_order_id": "c-1", "market": BTC, "side": "sell", "type": "limit",
        "price": "100.00", "qty": "1.0000", "filled": "0.0000", "avg_price": None, "status": "NEW",
    }
    assert on_disk[0]["created_ts"] == new["ts"] and on_disk[0]["created_at"].startswith("2023-")

    # Bob buys 0.4 then 0.6: alice's order is reported partially filled, then filled.
    [partial] = [r for r in desk.order("bob", "buy", "0.4", "100.00", report_to="alice") if r["exec_type"] == "trade"]
    history.apply(partial)
    assert stored(history.path)["orders"][0]["status"] == "PARTIALLY_FILLED"
    assert stored(history.path)["orders"][0]["filled"] == "0.4000"
    [full] = [r for r in desk.order("bob", "buy", "0.6", "100.00", report_to="alice") if r["exec_type"] == "trade"]
    history.apply(full)

    reloaded = SessionManager("alice", tmp_path)
    rec = reloaded.get(oid)
    assert rec is not None
    assert rec["status"] == "FILLED" and rec["filled"] == "1.0000" and rec["avg_price"] == "100.00"
    assert rec["remaining"] == "0.0000" and rec["updated_ts"] == full["ts"] > rec["created_ts"]
    assert [(f["qty"], f["price"], f["liquidity"]) for f in rec["fills"]] == [
        ("0.4000", "100.00", "maker"), ("0.6000", "100.00", "maker"),
    ]
    assert reloaded.open_orders() == []


def test_cancel_expire_reject_and_modify(tmp_path: Path) -> None:
    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    [new] = desk.order("alice", "buy", "2", "90.00")
    history.apply(new)
    [replaced] = desk.modify("alice", new["order_id"], "1")
    history.apply(replaced)
    assert history.get(new["order_id"])["qty"] == "1.0000"  # type: ignore[index]
    assert history.get(new["order_id"])["status"] == "NEW"  # type: ignore[index]
    [canceled] = desk.cancel("alice", new["order_id"])
    history.apply(canceled)

    ioc = desk.order("alice", "buy", "1", "80.00", tif="ioc")  # nothing to buy: new, then expired
    assert [r["exec_type"] for r in ioc] == ["new", "expired"]
    for report in ioc:
        history.apply(report)

    [rejected] = desk.order("alice", "buy", "100000", "100.00", coid="too-big")
    assert rejected["order_id"] is None
    history.apply(rejected)

    statuses = {(r["order_id"], r["client_order_id"]): r["status"] for r in stored(history.path)["orders"]}
    assert statuses == {
        (new["order_id"], None): "CANCELED",
        (ioc[0]["order_id"], None): "EXPIRED",
        (None, "too-big"): "REJECTED",
    }
    rejected_rec = SessionManager("alice", tmp_path).recent()[-1]
    assert rejected_rec["reason"] == "insufficient_funds" and rejected_rec["message"]


def test_late_duplicate_and_reopening_reports_change_nothing(tmp_path: Path) -> None:
    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    [new] = desk.order("alice", "sell", "1", "100.00")
    trades = [r for r in desk.order("bob", "buy", "1", "100.00", report_to="alice")]
    [fill] = trades
    history.apply(new)
    history.apply(fill)
    before = history.path.read_bytes()
    assert history.apply(fill) is None  # the same trade twice
    assert history.apply(new) is None  # an old report after a newer one
    reopen = {**new, "exec_type": "replaced", "ts": fill["ts"] + 1}
    assert history.apply(reopen) is None  # would reopen a FILLED order
    assert history.apply({"type": "trade", "market": BTC, "trade_id": 1}) is None  # public data
    assert history.apply({"type": "exec", "status": "mystery", "order_id": 99}) is None
    assert history.path.read_bytes() == before


def test_an_order_id_reused_by_a_restarted_exchange_is_another_order(tmp_path: Path) -> None:
    first, second = WireDesk(), WireDesk()  # two exchange runs: both number from 1
    history = SessionManager("alice", tmp_path)
    [old] = first.order("alice", "buy", "1", "50.00")
    history.apply(old)
    next(second.clock)
    [new] = second.order("alice", "buy", "2", "60.00")
    assert new["order_id"] == old["order_id"] and new["ts"] != old["ts"]
    history.apply(new)
    assert [(r["order_id"], r["qty"]) for r in history.recent()] == [(1, "1.0000"), (1, "2.0000")]
    assert history.get(1)["qty"] == "2.0000"  # type: ignore[index]


def test_sync_open_orders_adds_unknown_and_reports_stale(tmp_path: Path) -> None:
    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    [gone] = desk.order("alice", "buy", "1", "50.00")
    history.apply(gone)
    desk.cancel("alice", gone["order_id"])  # its cancel never reached this history
    desk.order("alice", "buy", "3", "40.00")  # placed from elsewhere
    listed = [orjson.loads(orjson.dumps(desk.fmt.order(o))) for o in desk.ex.open_orders("alice")]
    stale = history.sync_open_orders(listed)
    assert [r["order_id"] for r in stale] == [gone["order_id"]]
    assert history.get(gone["order_id"])["status"] == "NEW"  # type: ignore[index]  # not guessed
    added = SessionManager("alice", tmp_path).get(listed[0]["order_id"])
    assert added is not None and added["status"] == "NEW" and added["qty"] == "3.0000"


def test_a_duplicate_client_id_rejection_is_not_the_open_order_it_collided_with(tmp_path: Path) -> None:
    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    [placed] = desk.order("alice", "buy", "1", "50.00", coid="k1")
    history.apply(placed)
    refused = {**placed, "exec_type": "rejected", "order_id": None, "status": "rejected", "price": "49.00",
               "ts": placed["ts"] + 1, "reason": "duplicate_client_order_id", "message": "in use"}
    history.apply(refused)
    record = history.get(placed["order_id"])
    assert record is not None and (record["status"], record["price"]) == ("NEW", "50.00")
    assert [r["status"] for r in history.recent()] == ["NEW", "REJECTED"]
    [filled] = [r for r in desk.order("bob", "sell", "1", "50.00", report_to="alice") if r.get("exec_type") == "trade"]
    history.apply(filled)
    assert history.get(placed["order_id"])["status"] == "FILLED"  # type: ignore[index]


def test_an_old_open_record_whose_id_a_restarted_exchange_reused_is_stale(tmp_path: Path) -> None:
    """The exchange restarted with a fresh data directory and numbers orders from 1 again:
    the old record of order 1 is not the new order 1 the exchange lists."""
    first = WireDesk()
    history = SessionManager("alice", tmp_path)
    [old] = first.order("alice", "buy", "1", "95.00", coid="tui-a-1")
    history.apply(old)
    second = WireDesk()
    next(second.clock)  # a later arrival
    [new] = second.order("alice", "buy", "0.1", "70.00", coid="tui-b-1")
    assert new["order_id"] == old["order_id"]
    history.apply(new)
    listed = [orjson.loads(orjson.dumps(second.fmt.order(o))) for o in second.ex.open_orders("alice")]
    stale = history.sync_open_orders(listed)
    assert [(r["order_id"], r["price"]) for r in stale] == [(old["order_id"], "95.00")]
    history.mark_gone(stale)
    assert [(r["price"], r["status"]) for r in history.recent()] == [("95.00", "GONE"), ("70.00", "NEW")]


def test_settle_takes_only_the_same_orders_final_state(tmp_path: Path) -> None:
    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    [placed] = desk.order("alice", "buy", "1", "50.00", coid="k1")
    history.apply(placed)
    [canceled] = desk.cancel("alice", placed["order_id"])
    final = {k: v for k, v in canceled.items() if k not in ("type", "exec_type")}
    record = history.get(placed["order_id"])
    assert record is not None
    for other in ({"status": "new"}, {"market": "ACME-USD"}, {"side": "sell"}, {"client_order_id": "k2"},
                  {"client_order_id": None}, {"order_id": placed["order_id"] + 1}, {"ts": placed["ts"] - 1}):
        assert not history.settle(record, {**final, **other}), other
        assert record["status"] == "NEW"
    # Without a client id, the price and size must match too: an id alone may name another
    # order (an exchange restarted without its snapshot numbers orders from 1 again).
    anonymous = history.apply(desk.order("alice", "buy", "1", "40.00")[0])
    assert anonymous is not None
    [gone] = desk.cancel("alice", anonymous["order_id"])
    assert not history.settle(anonymous, {**gone, "price": "41.00"})
    assert not history.settle(anonymous, {**gone, "qty": "2.0000"})
    assert history.settle(anonymous, gone) and anonymous["status"] == "CANCELED"
    assert history.settle(record, final)
    stored_again = SessionManager("alice", tmp_path).get(placed["order_id"])
    assert stored_again is not None and stored_again["status"] == "CANCELED"
    assert not history.settle(record, final)  # already final: nothing to do


async def test_start_up_marks_gone_only_what_the_exchange_says_it_does_not_know(tmp_path: Path, monkeypatch) -> None:
    """Only ``unknown_order`` (or an answer about another order) makes an order GONE; an
    error says nothing about it, and a rate limit stops the questions: those are asked at
    the next start."""
    import client.tui as tui
    from client.client import ExchangeError

    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    placed = [desk.order("alice", "buy", "1", f"{50 + n}.00", coid=f"c{n}")[0] for n in range(5)]
    for report in placed:
        history.apply(report)
    ended = {p["order_id"]: {k: v for k, v in desk.cancel("alice", p["order_id"])[0].items()
                             if k not in ("type", "exec_type")} for p in placed}
    answers: dict[int, Any] = {
        placed[0]["order_id"]: ended[placed[0]["order_id"]],
        placed[1]["order_id"]: "unknown_order",
        placed[2]["order_id"]: "internal_error",
        placed[3]["order_id"]: "rate_limited",
    }

    class Client:
        async def order_status(self, oid: int) -> dict[str, Any]:
            answer = answers[oid]
            if isinstance(answer, str):
                raise ExchangeError(answer, "no")
            return answer

    monkeypatch.setattr(tui, "RATE_LIMIT_PAUSE", 0.0)
    stale = history.sync_open_orders([])
    not_asked, settled, gone = await tui._ask_how_they_ended(Client(), history, stale)  # type: ignore[arg-type]
    ids = [p["order_id"] for p in placed]
    assert [r["order_id"] for r in settled] == [ids[0]]
    assert [r["order_id"] for r in gone] == [ids[1]]
    assert [r["order_id"] for r in not_asked] == [ids[2], ids[3], ids[4]]
    stored = {r["order_id"]: r["status"] for r in SessionManager("alice", tmp_path).orders}
    assert stored == {ids[0]: "CANCELED", ids[1]: "GONE", ids[2]: "NEW", ids[3]: "NEW", ids[4]: "NEW"}


def test_gone_gives_way_to_any_word_of_the_exchange(tmp_path: Path) -> None:
    """GONE is the client's guess: a listing, a report, an order_status answer or another
    terminal's record of how the order ended all replace it."""
    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    [a] = desk.order("alice", "buy", "1", "50.00", coid="a")
    [b] = desk.order("alice", "buy", "1", "51.00", coid="b")
    [c] = desk.order("alice", "buy", "1", "52.00", coid="c")
    for report in (a, b, c):
        history.apply(report)
    history.mark_gone([history.get(a["order_id"]), history.get(b["order_id"]), history.get(c["order_id"])])  # type: ignore[list-item]
    # Still open at the exchange: listed again, it is open again.
    listed = [orjson.loads(orjson.dumps(desk.fmt.order(o))) for o in desk.ex.open_orders("alice")]
    assert history.sync_open_orders(listed) == []
    assert {r["status"] for r in history.orders} == {"NEW"} and all("message" not in r for r in history.orders)
    history.mark_gone(list(history.orders))
    # A report about it (a fill) brings it back too.
    [fill] = [r for r in desk.order("bob", "sell", "0.5", "52.00", report_to="alice") if r.get("exec_type") == "trade"]
    history.apply(fill)
    assert history.get(c["order_id"])["status"] == "PARTIALLY_FILLED"  # type: ignore[index]
    # order_status says how it ended: settled over GONE.
    [done] = desk.cancel("alice", a["order_id"])
    assert history.settle(history.get(a["order_id"]), {k: v for k, v in done.items() if k != "exec_type"})  # type: ignore[arg-type]
    assert history.get(a["order_id"])["status"] == "CANCELED"  # type: ignore[index]
    # Two terminals: one says GONE, the other knows it was cancelled; the real end wins the file.
    other = SessionManager("alice", tmp_path)
    [gone_b] = desk.cancel("alice", b["order_id"])
    other.apply(gone_b)
    history.save()
    assert SessionManager("alice", tmp_path).get(b["order_id"])["status"] == "CANCELED"  # type: ignore[index]
    other.save()
    history.save()
    assert SessionManager("alice", tmp_path).get(b["order_id"])["status"] == "CANCELED"  # type: ignore[index]


async def test_an_answer_that_the_order_is_open_leaves_it_alone(tmp_path: Path) -> None:
    import client.tui as tui

    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    [placed] = desk.order("alice", "buy", "1", "50.00", coid="x")
    history.apply(placed)

    class Client:
        async def order_status(self, oid: int) -> dict[str, Any]:
            return {"type": "order_status", **desk.fmt.order(desk.ex.orders[oid])}

    stale = history.sync_open_orders([])  # a listing taken before the order was placed
    not_asked, settled, gone = await tui._ask_how_they_ended(Client(), history, stale)  # type: ignore[arg-type]
    assert (not_asked, settled, gone) == ([], [], [])
    assert history.get(placed["order_id"])["status"] == "NEW"  # type: ignore[index]


# ---------------------------------------------------------------------------- atomicity


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    for i in range(20):
        for report in desk.order("alice", "buy", "0.1", f"{50 + i}.00"):
            history.apply(report)
    sessions = tmp_path / "sessions"
    assert files_in(sessions) == ["orders_alice.json"]
    assert len(stored(history.path)["orders"]) == 20


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    desk = WireDesk()
    history = SessionManager("alice", tmp_path)
    [first] = desk.order("alice", "buy", "1", "50.00")
    history.apply(first)
    before = history.path.read_bytes()

    def crash(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    [second] = desk.order("alice", "buy", "1", "51.00")
    with pytest.raises(OSError):
        history.apply(second)
    monkeypatch.undo()
    assert history.path.read_bytes() == before
    assert files_in(tmp_path / "sessions") == ["orders_alice.json"]


def test_a_leftover_temporary_file_is_cleaned_up_and_ignored(tmp_path: Path) -> None:
    history = SessionManager("alice", tmp_path)
    leftover = history.path.parent / f".{history.path.name}.abc123.tmp"
    leftover.write_bytes(b'{"version": 1, "orde')  # a write cut short by a crash
    again = SessionManager("alice", tmp_path)
    assert again.warnings == [] and len(again) == 0
    assert files_in(tmp_path / "sessions") == ["orders_alice.json"]


# ---------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("content", [b'{"version": 1, "orders": [{"order_id": 1,', b"[1, 2, 3]",
                                     b'{"orders": [1]}', b"\xff\xfe garbage"])
def test_a_corrupt_file_is_set_aside_with_a_warning(tmp_path: Path, content: bytes) -> None:
    path = history_path(tmp_path, "alice")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    history = SessionManager("alice", tmp_path)
    assert len(history) == 0
    assert len(history.warnings) == 1 and "unreadable" in history.warnings[0]
    aside = [p for p in path.parent.iterdir() if p.name.startswith("orders_alice.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content  # kept, never deleted
    assert stored(path)["orders"] == []  # a fresh, valid history
    desk = WireDesk()
    [new] = desk.order("alice", "buy", "1", "50.00")
    history.apply(new)
    assert SessionManager("alice", tmp_path).get(new["order_id"]) is not None


def _report(oid: int, coid: str | None, status: str, ts: int, exec_type: str = "new") -> dict[str, Any]:
    return {"type": "exec", "order_id": oid, "client_order_id": coid, "status": status,
            "exec_type": exec_type, "ts": ts, "market": "BTC-USD", "side": "buy",
            "price": "1", "qty": "1", "filled_qty": "0", "remaining_qty": "1"}


def test_saves_after_an_exchange_restart_that_reuses_ids_do_not_duplicate_records(tmp_path: Path) -> None:
    """An exchange restarted without its snapshot numbers orders from 1 again: the file's
    old order 1 and the new order 1 are two records, however many saves follow."""
    first = SessionManager("alice", tmp_path)
    first.apply(_report(1, "tui-a-1", "new", 100))
    first.apply(_report(1, "tui-a-1", "canceled", 200, "canceled"))
    later = SessionManager("alice", tmp_path)
    later.apply(_report(1, "tui-b-1", "new", 1000))
    for t in range(5):
        later.apply(_report(1, "tui-b-1", "partially_filled", 1001 + t, "trade") | {"trade_id": t})
    saved = orjson.loads(later.path.read_bytes())["orders"]
    assert len(later.orders) == 2 and len(saved) == 2
    assert [len(r["fills"]) for r in saved] == [0, 5]


def test_a_reused_id_without_client_ids_keeps_the_live_order(tmp_path: Path) -> None:
    first = SessionManager("alice", tmp_path)
    first.apply(_report(1, None, "new", 100))
    first.apply(_report(1, None, "canceled", 200, "canceled"))
    later = SessionManager("alice", tmp_path)
    later.apply(_report(1, None, "new", 1000))
    assert sorted(r["status"] for r in later.orders) == ["CANCELED", "NEW"]


def test_fills_from_the_exchange_go_only_to_the_order_they_belong_to(tmp_path: Path) -> None:
    """``add_fills`` (the start-up's fills of orders that traded while the client was away):
    each once, sorted by trade id, and never to a record whose order id a restarted exchange
    handed out again (another market or side, another client order id, or older)."""
    history = SessionManager("alice", tmp_path)
    history.apply(_report(1, "tui-a-1", "new", 100))
    history.apply(_report(2, None, "new", 100))
    history.apply(_report(1, "tui-a-1", "partially_filled", 150, "trade") | {"trade_id": 5, "last_qty": "0.5"})

    def fill(oid: int, trade_id: int, ts: int, **extra: Any) -> dict[str, Any]:
        return {"trade_id": trade_id, "order_id": oid, "market": "BTC-USD", "side": "buy", "price": "1",
                "qty": "0.25", "liquidity": "maker", "fee": "0.01", "fee_asset": "USD", "ts": ts, **extra}

    changed = history.add_fills([
        fill(1, 5, 150, client_order_id="tui-a-1"),  # seen live already
        fill(1, 7, 170, client_order_id="tui-a-1"),
        fill(1, 6, 160),  # read back from the ledger: no client order id
        fill(2, 8, 90),  # older than the order: another order with that id
        fill(2, 9, 190, side="sell"),
        fill(2, 10, 190, market="ACME-USD"),
        fill(2, 11, 190, client_order_id="tui-x-9"),
        fill(3, 12, 190),  # no such order here
    ])
    assert [r["order_id"] for r in changed] == [1]
    stored_fills = [r["fills"] for r in SessionManager("alice", tmp_path).orders]  # saved
    assert [[f["trade_id"] for f in fills] for fills in stored_fills] == [[5, 6, 7], []]
    assert history.add_fills([fill(1, 7, 170)]) == []
