"""Two users trade over real sockets and each sees their own reports."""

import asyncio


async def test_two_users_trade_over_tcp(connect) -> None:
    alice = await connect("alice")
    bob = await connect("bob")
    new = await alice.sell("BTC-USD", "1", "100.00")
    assert new["exec_type"] == "new"
    report = await bob.buy("BTC-USD", "0.5", "101.00")
    assert report["exec_type"] == "new"

    async def next_trade(client):
        while True:
            ev = await asyncio.wait_for(client.next_event(), 5)
            if ev.get("exec_type") == "trade":
                return ev

    bob_fill = await next_trade(bob)
    alice_fill = await next_trade(alice)
    assert bob_fill["last_price"] == "100.00" and bob_fill["liquidity"] == "taker"
    assert alice_fill["last_qty"] == "0.5000" and alice_fill["liquidity"] == "maker"
    balances = await bob.balances()
    assert balances["BTC"]["available"] == "10.50000000"
