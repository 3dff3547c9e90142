"""``exchange/state.py``: export -> import -> export is identical, and matching continues identically.

The snapshot and the journal's recovery stand on this: a restored engine must be the same
engine, not just one with the same balances. Each case runs a seeded command stream part
way, restores a copy from the exported state (through JSON bytes, as a snapshot file
would), then feeds the rest of the stream to both and requires identical events for every
command and identical final state.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from engine_helpers import fingerprint
from test_engine_determinism import seeded_stream

from exchange.engine import Exchange
from exchange.markets import build_config, default_config, DEFAULT_CONFIG
from exchange.state import (
    FINISHED_FIELDS, STATE_VERSION, FinishedOrders, StateError, export_state, import_state, same_unit_markets,
)
from exchange.types import ExecReport, ExecType, OrderStatus, OrderType, Side, STPMode, TimeInForce
from storage.persistence import config_fingerprint, load_finished


def through_json(data: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(data))


def engine_after(seed: int, count: int, stp: STPMode = STPMode.CANCEL_RESTING) -> tuple[Exchange, list]:
    commands = seeded_stream(seed, count)
    split = len(commands) * 2 // 3
    ex = Exchange(default_stp=stp)
    for cmd in commands[:split]:
        ex.handle(cmd)
    return ex, commands[split:]


@pytest.mark.parametrize("seed", [1, 2, 3, 11])
def test_round_trip_is_identical_and_matching_continues_identically(seed: int) -> None:
    stp = list(STPMode)[seed % 4]
    ex, rest = engine_after(seed, 1500, stp)
    assert ex.orders, "the stream should leave resting orders to restore"
    first = export_state(ex)
    restored = import_state(ex.config, through_json(first))
    assert orjson.dumps(export_state(restored)) == orjson.dumps(first)
    assert fingerprint(restored) == fingerprint(ex)
    assert restored.default_stp is ex.default_stp
    for ms_a, ms_b in zip(ex.markets.values(), restored.markets.values()):
        assert (ms_a.book.top_bid, ms_a.book.top_ask) == (ms_b.book.top_bid, ms_b.book.top_ask)
        assert ms_b.fee_bal is restored.accounts.balances["__fees__"][ms_b.quote]
    for order in restored.orders.values():
        bals = restored.accounts.balances[order.account]
        ms = restored.markets[order.market]
        assert order.base_bal is bals[ms.base] and order.quote_bal is bals[ms.quote]
        assert order.lock is (order.quote_bal if order.side == "buy" else order.base_bal)
    for cmd in rest:
        a = [e.to_dict() for e in ex.handle(cmd)]
        b = [e.to_dict() for e in restored.handle(cmd)]
        assert a == b, cmd.to_dict()
        restored.check_invariants()
    assert orjson.dumps(export_state(restored)) == orjson.dumps(export_state(ex))


def test_an_empty_engine_round_trips() -> None:
    ex = Exchange()
    data = through_json(export_state(ex))
    assert data["version"] == STATE_VERSION
    assert export_state(import_state(ex.config, data)) == data


def tampered(mutate) -> dict[str, Any]:
    ex, _ = engine_after(5, 800)
    data = through_json(export_state(ex))
    assert any(m["orders"] for m in data["markets"].values())
    mutate(data)
    return data


def first_order(data: dict[str, Any]) -> list[Any]:
    return next(m["orders"][0] for m in data["markets"].values() if m["orders"])


def _field(name: str) -> int:
    from exchange.state import ORDER_FIELDS
    return ORDER_FIELDS.index(name)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(version=99), "unknown state format version 99"),
        (lambda d: first_order(d).__setitem__(_field("locked"), first_order(d)[_field("locked")] + 1),
         "invariant"),
        (lambda d: d["deposits"].__setitem__("USD", d["deposits"]["USD"] + 1), "not conserved"),
        (lambda d: d["counters"].__setitem__("next_order_id", 1), "next_order_id"),
        (lambda d: first_order(d).__setitem__(_field("side"), "up"), "malformed"),
        (lambda d: first_order(d).__setitem__(_field("qty"), "1"), "qty"),
        (lambda d: d["assets"].__setitem__("USD", 2), "decimals"),
        (lambda d: d.pop("balances"), "malformed"),
        (lambda d: next(m for m in d["markets"].values() if m["orders"])["orders"].reverse(),
         "priority order"),
    ],
    ids=["version", "locked", "deposits", "counter", "enum", "type", "units", "missing", "fifo"],
)
def test_an_inconsistent_state_is_refused_with_a_clear_error(mutate, expected: str) -> None:
    data = tampered(mutate)
    with pytest.raises(StateError, match=expected):
        import_state(default_config(), data)


def test_a_market_with_other_units_is_refused() -> None:
    ex, _ = engine_after(6, 300)
    data = through_json(export_state(ex))
    changed = copy.deepcopy(DEFAULT_CONFIG)
    changed["markets"][0]["tick_size"] = "0.1"
    with pytest.raises(StateError, match="tick_size"):
        import_state(build_config(changed), data)


def finished_table(seed: int, count: int, kept: int, per_user: int) -> FinishedOrders:
    """The finished orders of a seeded stream, as the gateway keeps them."""
    ex = Exchange()
    table = FinishedOrders(kept, per_user)
    for cmd in seeded_stream(seed, count):
        table.observe(ex.handle(cmd))
    return table


def table_view(table: FinishedOrders) -> list[tuple[Any, ...]]:
    """What ``order_status`` shows of each (the fill details of a last trade are not kept)."""
    return [tuple(getattr(ev, f) for f in FINISHED_FIELDS) for ev in table.by_id.values()]


@pytest.mark.parametrize("kept,per_user", [(100_000, 1_000), (40, 1_000), (1_000, 7)])
def test_finished_orders_round_trip_through_a_snapshot_and_keep_their_bounds(kept: int, per_user: int) -> None:
    """What ``order_status`` answers for is the same after a restart (snapshot + replay):
    loading the export and then observing the rest of the stream gives the table that
    observing everything gives, bounds included."""
    commands = seeded_stream(5, 3_000)
    whole = finished_table(5, 3_000, kept, per_user)
    assert 0 < len(whole) <= kept
    ex = Exchange()
    first = FinishedOrders(kept, per_user)
    split = len(commands) // 2
    for cmd in commands[:split]:
        first.observe(ex.handle(cmd))
    restored = FinishedOrders(kept, per_user)
    restored.load(through_json(first.export()))
    assert table_view(restored) == table_view(first)
    for cmd in commands[split:]:
        restored.observe(ex.handle(cmd))
    assert table_view(restored) == table_view(whole)
    counts: dict[str, int] = {}
    for ev in restored.by_id.values():
        counts[ev.account] = counts.get(ev.account, 0) + 1
        assert ev.status in (OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.EXPIRED)
        if ev.client_order_id is not None:
            assert restored.by_client_id(ev.account, ev.client_order_id) is not None
    assert max(counts.values()) <= per_user


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d.update(fields=["order_id"]), "unknown fields"),
    (lambda d: d["rows"][0].__setitem__(0, "7"), "must be integers >= 0"),
    (lambda d: d["rows"][0].__setitem__(9, -1), "must be integers >= 0"),
    (lambda d: d["rows"][0].__setitem__(1, 7), "must be strings"),
    (lambda d: d["rows"][0].__setitem__(12, "open"), "malformed"),
    (lambda d: d["rows"][0].pop(), "malformed"),
    (lambda d: d.pop("rows"), "malformed"),
])
def test_malformed_finished_orders_are_refused_with_a_clear_error(mutate, expected: str) -> None:
    data = through_json(finished_table(2, 500, 100, 100).export())
    assert data["rows"]
    mutate(data)
    with pytest.raises(StateError, match=expected):
        FinishedOrders().load(data)


def test_a_finished_order_with_amounts_beyond_64_bits_is_kept_exactly() -> None:
    """Amounts in minor units may exceed 64 bits; the kept order and its snapshot row keep
    them exact (the snapshot falls back to the standard library's JSON for them)."""
    big = 2**70 + 3
    report = ExecReport(ExecType.TRADE, 7, "whale", "BTC-USD", Side.BUY, OrderType.LIMIT,
                        TimeInForce.GTC, "w-1", 10**20, big, big, 0, big * 3, OrderStatus.FILLED, 5)
    table = FinishedOrders()
    table.add(report)
    kept = table.by_client_id("whale", "w-1")
    assert kept is not None and (kept.qty, kept.filled, kept.cost, kept.price) == (big, big, big * 3, 10**20)
    restored = FinishedOrders()
    restored.load(json.loads(json.dumps(table.export())))
    assert table_view(restored) == table_view(table)


def canceled(oid: int, account: str, market: str = "BTC-USD") -> ExecReport:
    return ExecReport(ExecType.CANCELED, oid, account, market, Side.BUY, OrderType.LIMIT,
                      TimeInForce.GTC, f"c{oid % 3}", 100, 5, 0, 5, 0, OrderStatus.CANCELED, oid)


@settings(max_examples=300, deadline=None)
@given(accounts=st.lists(st.sampled_from("abcdefg"), max_size=300), kept=st.integers(1, 25),
       per_user=st.integers(0, 10))
def test_the_table_is_each_users_last_orders_then_the_newest_of_those(accounts: list[str], kept: int,
                                                                       per_user: int) -> None:
    """The rule ``order_status`` keeps, stated plainly: of each account's last ``per_user``
    finished orders, the newest ``kept``, oldest first. Memory follows the table: no
    per-account queue outlives the account's last kept order."""
    table = FinishedOrders(kept, per_user)
    for oid, account in enumerate(accounts, 1):
        table.add(canceled(oid, account))
        last = {a: [i for i, x in enumerate(accounts[:oid], 1) if x == a][-per_user:] if per_user else []
                for a in set(accounts[:oid])}
        expected = sorted(i for ids in last.values() for i in ids)[-kept:]
        assert list(table.by_id) == expected
        assert set(table._per_user) == {table.by_id[i].account for i in expected}
        for n in range(3):
            newest = [i for i in expected if i % 3 == n]
            for a in "abcdefg":
                mine = [i for i in newest if accounts[i - 1] == a]
                found = table.by_client_id(a, f"c{n}")
                latest = max((i for i, x in enumerate(accounts[:oid], 1) if x == a and i % 3 == n), default=None)
                assert (found.order_id if found else None) == (latest if latest in mine else None)


def test_an_account_that_finished_one_order_long_ago_holds_no_memory() -> None:
    table = FinishedOrders(kept=100, per_user=10)
    for oid in range(1, 10_001):
        table.add(canceled(oid, f"user{oid}"))  # every order a new account, as open mode allows
    assert len(table) == 100 and len(table._per_user) == 100 and len(table._ids) <= 2 * 100 + 1024


def test_loading_finished_orders_is_all_or_nothing_and_leaves_out_other_markets() -> None:
    table = FinishedOrders()
    for oid, market in enumerate(["BTC-USD", "ACME-USD", "BTC-USD"], 1):
        table.add(canceled(oid, "alice", market))
    data = through_json(table.export())
    restored = FinishedOrders()
    assert restored.load(data, {"BTC-USD"}) == 1
    assert list(restored.by_id) == [1, 3]
    twice = copy.deepcopy(data)
    twice["rows"].append(twice["rows"][0])
    fresh = FinishedOrders()
    with pytest.raises(StateError, match="appears twice"):
        fresh.load(twice)
    assert len(fresh) == 0  # nothing half-loaded
    with pytest.raises(StateError, match="must be a list"):
        fresh.load({"fields": data["fields"], "rows": {}})


def test_markets_keep_their_finished_orders_only_with_the_same_units() -> None:
    saved = config_fingerprint(default_config())
    changed = copy.deepcopy(DEFAULT_CONFIG)
    changed["markets"][1]["tick_size"] = "0.001"  # ACME-USD prices mean something else now
    assert same_unit_markets(saved, build_config(changed)) == {"BTC-USD"}
    fees = copy.deepcopy(DEFAULT_CONFIG)
    fees["fees"] = {"maker_fee_bps": 0, "taker_fee_bps": 5}  # fees do not change stored integers
    assert same_unit_markets(saved, build_config(fees)) == {"BTC-USD", "ACME-USD"}
    decimals = copy.deepcopy(DEFAULT_CONFIG)
    decimals["assets"]["USD"] = 8  # every USD amount is stored in other minor units
    assert same_unit_markets(saved, build_config(decimals)) == set()
    assert same_unit_markets({"assets": 1, "markets": 2}, default_config()) == set()


def test_a_snapshot_whose_finished_orders_cannot_be_read_still_starts_without_them(caplog, tmp_path) -> None:
    """They are order history, not trading state: a start is not refused for them."""
    good = FinishedOrders()
    good.add(canceled(1, "alice"))
    content = {"config": config_fingerprint(default_config()), "finished": through_json(good.export())}
    table = FinishedOrders()
    engine = Exchange()
    engine.next_order_id = 2  # order 1 was handed out, and is not open
    load_finished(table, content, default_config(), tmp_path / "snapshot.json", engine)
    assert list(table.by_id) == [1]
    not_yet = copy.deepcopy(content["finished"])
    not_yet["rows"][0][0] = 2  # an id the state has not handed out: it would finish twice
    for broken in ("garbage", {"fields": FINISHED_FIELDS}, {"fields": list(FINISHED_FIELDS), "rows": [[1]]},
                   not_yet):
        table = FinishedOrders()
        with caplog.at_level("ERROR"):
            load_finished(table, {**content, "finished": broken}, default_config(), tmp_path / "snapshot.json",
                          engine)
        assert len(table) == 0
        assert "finished orders cannot be restored" in caplog.text
        caplog.clear()
    table = FinishedOrders()
    load_finished(table, {"state": {}}, default_config(), tmp_path / "snapshot.json", engine)  # from before
    assert len(table) == 0


def test_new_fees_are_refitted_releases_first_so_one_market_pays_for_another() -> None:
    """A resting buy's reservation follows its market's new fees; lower fees on one market
    free what higher fees on another need, whatever order the markets come in."""
    from exchange.types import Deposit, PlaceOrder

    ex = Exchange()  # 1 / 2 bps: each buy of 100.00 USD reserves 100.02
    ex.handle(Deposit(1, "alice", "USD", 200_040_000))
    for ts, (symbol, qty) in enumerate((("BTC-USD", 10_000), ("ACME-USD", 1)), start=2):
        events = ex.handle(PlaceOrder(ts, "alice", symbol, Side.BUY, OrderType.LIMIT, qty, 10_000,
                                      TimeInForce.GTC, False, None, None))
        assert events[0].exec_type is ExecType.NEW
    assert ex.accounts.balances["alice"]["USD"].available == 0
    saved = through_json(export_state(ex))
    data = copy.deepcopy(DEFAULT_CONFIG)
    data["markets"][0].update(maker_fee_bps=1, taker_fee_bps=3)  # BTC-USD: 0.01 USD more
    data["markets"][1].update(maker_fee_bps=0, taker_fee_bps=0)  # ACME-USD: 0.02 USD less
    restored = import_state(build_config(data), saved)
    usd = restored.accounts.balances["alice"]["USD"]
    assert (usd.available, usd.locked) == (10_000, 200_030_000)
    assert sorted(o.locked for o in restored.orders.values()) == [100_000_000, 100_030_000]
    data["markets"][1].update(maker_fee_bps=1, taker_fee_bps=2)  # nothing freed: 0.01 short
    with pytest.raises(StateError, match="alice's buy order 1 would need 0.010000 USD more"):
        import_state(build_config(data), saved)
