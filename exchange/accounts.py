"""Balances and the money rules: reserve before matching, settle on fills, release on exit.

Theory of operation
-------------------
Every account holds, per asset, ``available`` (free to use or withdraw) and ``locked``
(reserved by open orders). An order reserves what it can possibly spend before it reaches
the matcher, so a fill can always be paid from its own reservation and nothing ever goes
negative:

* a sell reserves its remaining quantity in the base asset;
* a buy limit reserves ``notional(limit, remaining)`` plus the most fee that could still be
  charged: ``ceil((fee_basis + notional(limit, remaining) x max_bps) / 10000) - fee_paid``;
* a market buy reserves the cost of walking the current book for its quantity plus the
  taker fee, and never spends beyond it.

After every fill the buy's reservation is recomputed with that formula and the surplus
(a better fill price, a smaller fee) is released at once. Fees are charged in the quote
asset and go to the fee account, so for every asset the sum of ``available + locked``
over all accounts equals deposits minus withdrawals: assets are conserved.

The running totals (deposited, withdrawn, bought, sold, fees) exist for reports; they are
not needed by the money rules.
"""

from __future__ import annotations

from typing import Any, Final

FEE_ACCOUNT: Final = "__fees__"


class Balance:
    __slots__ = ("available", "locked", "deposited", "withdrawn", "bought", "sold", "fees")

    def __init__(self) -> None:
        self.available = 0
        self.locked = 0
        self.deposited = 0
        self.withdrawn = 0
        self.bought = 0  # received through trades
        self.sold = 0  # delivered through trades
        self.fees = 0  # fees paid in this asset

    @property
    def spent(self) -> int:
        """What left the account through trading: delivered plus fees."""
        return self.sold + self.fees

    def as_dict(self) -> dict[str, int]:
        return {
            "available": self.available, "locked": self.locked,
            "deposited": self.deposited, "withdrawn": self.withdrawn,
            "bought": self.bought, "sold": self.sold, "fees": self.fees,
        }


class Accounts:
    """All balances, keyed by account then asset; the fee account is an ordinary account."""

    __slots__ = ("assets", "balances", "deposits")

    def __init__(self, assets: list[str]) -> None:
        self.assets = list(assets)
        self.balances: dict[str, dict[str, Balance]] = {}
        # Net external flow per asset (deposits - withdrawals): what conservation is checked against.
        self.deposits: dict[str, int] = {a: 0 for a in self.assets}

    def balance(self, account: str, asset: str) -> Balance:
        """The account's balance of ``asset``, created at zero the first time it is asked for."""
        per_asset = self.balances.get(account)
        if per_asset is None:
            per_asset = self.balances[account] = {}
        bal = per_asset.get(asset)
        if bal is None:
            bal = per_asset[asset] = Balance()
        return bal

    def known(self, account: str) -> bool:
        return account in self.balances

    def deposit(self, account: str, asset: str, amount: int) -> Balance:
        bal = self.balance(account, asset)
        bal.available += amount
        bal.deposited += amount
        self.deposits[asset] += amount
        return bal

    def can_withdraw(self, account: str, asset: str, amount: int) -> bool:
        per_asset = self.balances.get(account)
        bal = per_asset.get(asset) if per_asset else None
        return bal is not None and bal.available >= amount

    def withdraw(self, account: str, asset: str, amount: int) -> Balance:
        bal = self.balance(account, asset)
        if bal.available < amount:  # callers check first; this guards the invariant
            raise ValueError("withdrawal exceeds available balance")
        bal.available -= amount
        bal.withdrawn += amount
        self.deposits[asset] -= amount
        return bal

    def view(self, account: str) -> dict[str, Balance]:
        """Every asset of the account (zero balances for assets it never touched)."""
        per_asset = self.balances.get(account, {})
        return {asset: per_asset.get(asset) or Balance() for asset in self.assets}

    def check_invariants(self, locked_by_orders: dict[tuple[str, str], int]) -> None:
        """Assert non-negativity, conservation and that locks match open orders' reservations."""
        totals = {a: 0 for a in self.assets}
        for account, per_asset in self.balances.items():
            for asset, bal in per_asset.items():
                assert bal.available >= 0, f"{account} {asset} available {bal.available} < 0"
                assert bal.locked >= 0, f"{account} {asset} locked {bal.locked} < 0"
                totals[asset] += bal.available + bal.locked
                expected = locked_by_orders.get((account, asset), 0)
                assert bal.locked == expected, (
                    f"{account} {asset}: locked {bal.locked} but open orders reserve {expected}"
                )
        for key, amount in locked_by_orders.items():
            if amount:
                assert key[0] in self.balances and key[1] in self.balances[key[0]], key
        for asset in self.assets:
            assert totals[asset] == self.deposits[asset], (
                f"{asset} not conserved: balances {totals[asset]} != net deposits {self.deposits[asset]}"
            )

    def snapshot(self) -> dict[str, Any]:
        return {
            "deposits": dict(self.deposits),
            "balances": {
                acct: {asset: bal.as_dict() for asset, bal in per_asset.items()}
                for acct, per_asset in self.balances.items()
            },
        }
