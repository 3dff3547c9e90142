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
def test_the_table_is_each_users_fills_among_the_last_of_all_and_says_where_it_is_whole(
        owners: list[str], kept: int, per_user: int) -> None:
    """Of the last ``kept`` fills of all, each user's last ``per_user``, oldest first; no
    queue outlives its user's last kept fill; and ``complete_after`` never claims a fill
    that is not kept."""
    table = RecentFills(per_user, kept)
    for n, owner in enumerate(owners, 1):
        table.add(owner, (n,))
        window = list(enumerate(owners[:n], 1))[-kept:]
        for a in "abcdefg":
            expected = [i for i, x in window if x == a][-per_user:]
            assert [row[0] for row in table.rows(a)] == expected
            assert (a in table.by_user) == bool(expected)
            after = table.complete_after(a)
            missing = [i for i, x in enumerate(owners[:n], 1) if x == a and i not in expected]
            assert all(i <= after for i in missing), (a, after, missing)
            assert after <= n
        assert table._rows.size() == table._owners.size() == min(n, kept)
    for a in "abcdefg":  # whole from the start while nothing was dropped
        if len(owners) <= kept and owners.count(a) <= per_user:
            assert table.complete_after(a) == 0


def test_one_user_trading_for_ever_holds_a_fixed_amount() -> None:
    table = RecentFills(per_user=10, kept=1_000)
    for n in range(1, 20_001):
        table.add("alice", (n,))
    assert [r[0] for r in table.rows("alice")] == list(range(19_991, 20_001))
    assert table.complete_after("alice") == 19_990 and table._rows.size() == 1_000
    assert len(table._rows.items) <= 2 * 1_000 + 64 and len(table.by_user["alice"].items) <= 2 * 10 + 64
    for n in range(20_001, 25_001):  # and every fill a new user's, as open mode allows
        table.add(f"user{n}", (n,))
    assert len(table.by_user) == 1_000 and "alice" not in table.by_user
    assert table.complete_after("alice") == table.complete_after("nobody") == 24_000


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
    fills: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for account, fill in recent_fills(tail_records(path)):
        fills.setdefault(account, []).append(fill)
    row = {"market": "BTC-USD", "price": "100.00", "qty": "0.5", "fee_asset": "USD", "ts": 7}
    assert fills["alice"] == [
        {"trade_id": 1, "order_id": 11, "side": "sell", "liquidity": "maker", "fee": "0.01", **row},
        {"trade_id": 3, "order_id": 14, "side": "buy", "liquidity": "maker", "fee": "0.05", **row},
    ]
    assert [(f["trade_id"], f["side"], f["liquidity"], f["fee"]) for f in fills["bob"]] == [
        (1, "buy", "taker", "0.02"), (3, "sell", "taker", "0.06")]
    assert [(f["order_id"], f["side"], f["liquidity"]) for f in fills["carl"]] == [
        (13, "sell", "taker"), (12, "buy", "maker")]  # a trade with itself: two, the taker's first
    assert [(a, f["trade_id"], f["liquidity"]) for a, f in recent_fills(tail_records(path))] == [
        ("bob", 1, "taker"), ("alice", 1, "maker"), ("carl", 2, "taker"), ("carl", 2, "maker"),
        ("bob", 3, "taker"), ("alice", 3, "maker")]  # in trade order, as the exchange reported them
