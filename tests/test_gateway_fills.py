"""The table behind ``fills`` (each user's last fills, bounded in all) and the rows a
restart reads back from the ledger. The op itself is tested over TCP in
test_gateway_e2e.py."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.gateway import RecentFills
from storage.ledger import recent_fills, tail_records


@settings(max_examples=300, deadline=None)
@given(owners=st.lists(st.sampled_from("abcdefg"), max_size=400), kept=st.integers(1, 25),
       per_user=st.integers(1, 10))
def test_the_table_is_each_users_last_fills_then_the_newest_of_those(owners: list[str], kept: int,
                                                                      per_user: int) -> None:
    """Of each user's last ``per_user`` fills, the newest ``kept`` of all, oldest first; no
    queue outlives its user's last kept fill."""
    table = RecentFills(per_user, kept)
    for n, owner in enumerate(owners):
        table.add(owner, n)
        last = {a: [i for i, x in enumerate(owners[:n + 1]) if x == a][-per_user:] for a in set(owners[:n + 1])}
        expected = sorted(i for rows in last.values() for i in rows)[-kept:]
        assert sorted(i for rows in table.by_user.values() for i in rows) == expected
        for a, rows in table.by_user.items():
            assert list(rows) == [i for i in expected if owners[i] == a] and rows
        assert table.size == len(expected)
        assert len(table._owners) <= 2 * table.size + 1024 + 1


def test_one_user_trading_for_ever_holds_a_fixed_amount() -> None:
    table = RecentFills(per_user=10, kept=1_000)
    for n in range(20_000):
        table.add("alice", n)
    assert list(table.by_user["alice"]) == list(range(19_990, 20_000))
    assert len(table._owners) <= 2 * 10 + 1024 + 1
    for n in range(5_000):  # and every fill a new user's, as open mode allows
        table.add(f"user{n}", n)
    assert table.size == len(table.by_user) == 1_000 and "alice" not in table.by_user


def test_a_ledger_line_is_a_fill_of_its_buyer_and_of_its_seller(tmp_path) -> None:
    path = tmp_path / "trades.jsonl"
    base = {"market": "BTC-USD", "price": "100.00", "qty": "0.5", "fee_asset": "USD", "ts": 7}
    records = [
        {**base, "trade_id": 1, "buy_order_id": 10, "sell_order_id": 11, "buyer": "bob", "seller": "alice",
         "taker_side": "buy", "maker_fee": "0.01", "taker_fee": "0.02"},
        {**base, "trade_id": 2, "buy_order_id": 12, "sell_order_id": 13, "buyer": "carl", "seller": "carl",
         "taker_side": "sell", "maker_fee": "0.03", "taker_fee": "0.04"},
        {**base, "trade_id": 3, "buy_order_id": 14, "sell_order_id": 15, "buyer": "alice", "seller": "bob",
         "taker_side": "sell", "maker_fee": "0.05", "taker_fee": "0.06"},
    ]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + b'{"trade_id":4,"mar')
    fills = recent_fills(tail_records(path), per_user=5)
    row = {"market": "BTC-USD", "price": "100.00", "qty": "0.5", "fee_asset": "USD", "ts": 7}
    assert fills["alice"] == [
        {"trade_id": 1, "order_id": 11, "side": "sell", "liquidity": "maker", "fee": "0.01", **row},
        {"trade_id": 3, "order_id": 14, "side": "buy", "liquidity": "maker", "fee": "0.05", **row},
    ]
    assert [(f["trade_id"], f["side"], f["liquidity"], f["fee"]) for f in fills["bob"]] == [
        (1, "buy", "taker", "0.02"), (3, "sell", "taker", "0.06")]
    assert [(f["order_id"], f["side"], f["liquidity"]) for f in fills["carl"]] == [
        (13, "sell", "taker"), (12, "buy", "maker")]  # a trade with itself: two, the taker's first
    assert [f["trade_id"] for f in recent_fills(tail_records(path), per_user=1)["alice"]] == [3]
