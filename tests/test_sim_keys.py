"""The TCP simulation against an exchange run with ``--auth keys``: ``--credentials FILE``.

Such an exchange admits only the users of its accounts file and takes deposits only from an
admin session, so the agents log in with tokens and are funded by the admin (or, with no
admin given, trade what their accounts already hold). A real engine subprocess each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from client import ExchangeClient
from client.client import patiently
from exchange.gateway import hash_token
from simulation.runner import SimConfig, SimulationError, read_credentials, run_tcp
from simulation.tcp import Credentials
from tests.test_sim_tcp import T, _engine, _open_connections, run_cli

AGENT_TOKEN = "agent-secret"
ADMIN_TOKEN = "ops-secret"
AGENTS = ["random01", "random02", "mm01"]


@contextlib.asynccontextmanager
async def keys_engine(tmp_path: Path, *extra: str) -> AsyncIterator[tuple[str, int, Path]]:
    accounts = tmp_path / "accounts.json"
    users: dict[str, Any] = {name: {"token_hash": hash_token(AGENT_TOKEN)} for name in AGENTS}
    users["ops"] = {"token_hash": hash_token(ADMIN_TOKEN), "admin": True}
    users["alice"] = {"token_hash": hash_token("alice-secret")}
    accounts.write_text(json.dumps({"users": users}))
    async with _engine(tmp_path, "--auth", "keys", "--accounts", str(accounts), *extra) as (host, port, data, _):
        yield host, port, data


async def _session(host: str, port: int, user: str, token: str) -> ExchangeClient:
    client = ExchangeClient(host, port, timeout=T)
    await asyncio.wait_for(client.connect(), T)
    await asyncio.wait_for(client.login(user, token), T)
    return client


async def _holdings(host: str, port: int) -> dict[str, dict[str, dict[str, str]]]:
    out = {}
    for name in AGENTS:
        client = await _session(host, port, name, AGENT_TOKEN)
        try:
            out[name] = await asyncio.wait_for(patiently(client.balances), T)
            assert await asyncio.wait_for(patiently(client.orders), T) == []  # the run cancelled what rested
        finally:
            await client.close()
    return out


def _config(host: str, port: int, creds: Credentials | None) -> SimConfig:
    return SimConfig(agents={"random": 2, "mm": 1}, duration_s=1.5, orders=None, rate=200,
                     host=host, port=port, progress=False, credentials=creds)


def _conserved(held: dict[str, dict[str, dict[str, str]]]) -> dict[str, Decimal]:
    """Per asset, what the agents hold plus the fees they paid equals what was deposited to
    them (the fees went to the exchange's fee account): returns the deposits."""
    deposited: dict[str, Decimal] = {}
    kept: dict[str, Decimal] = {}
    for balances in held.values():
        for asset, bal in balances.items():
            deposited[asset] = deposited.get(asset, Decimal(0)) + Decimal(bal["deposited"])
            kept[asset] = (kept.get(asset, Decimal(0)) + Decimal(bal["available"]) + Decimal(bal["locked"])
                           + Decimal(bal["fees"]))
    assert kept == deposited
    return deposited


async def test_with_credentials_the_agents_log_in_with_tokens_and_the_admin_funds_them(tmp_path: Path) -> None:
    async with keys_engine(tmp_path) as (host, port, _):
        creds = Credentials({}, AGENT_TOKEN, ("ops", ADMIN_TOKEN))
        out: dict[str, Any] = {}
        report = await asyncio.wait_for(run_tcp(_config(host, port, creds), stream=None, out=out), 60)
        assert not report["agent_failures"] and report["orders_sent"] > 20
        assert sorted(a.name for a in out["agents"]) == sorted(AGENTS)  # the listed accounts, as named
        held = await _holdings(host, port)
        deposited = _conserved(held)
        assert deposited["USD"] > 0 and deposited["BTC"] > 0  # the admin's deposits reached them
        for agent in out["agents"]:
            for asset, bal in held[agent.name].items():
                total = Decimal(bal["available"]) + Decimal(bal["locked"])
                assert agent.wallet.holdings[asset] == int(total * 10**agent.config.assets[asset].decimals)
        assert await _open_connections(host, port) == 0  # the admin's session is closed too


async def test_without_an_admin_the_agents_trade_what_their_accounts_hold(tmp_path: Path) -> None:
    async with keys_engine(tmp_path) as (host, port, _):
        admin = await _session(host, port, "ops", ADMIN_TOKEN)
        try:
            for name in AGENTS:
                for asset, amount in (("USD", "500000"), ("BTC", "10"), ("ACME", "5000")):
                    await asyncio.wait_for(admin.request("deposit", asset=asset, amount=amount, user=name), T)
        finally:
            await admin.close()
        before = await _holdings(host, port)
        report = await asyncio.wait_for(
            run_tcp(_config(host, port, Credentials({}, AGENT_TOKEN)), stream=None), 60)
        assert not report["agent_failures"] and report["orders_sent"] > 20 and report["trades"] > 0
        after = await _holdings(host, port)
        assert _conserved(after) == _conserved(before)  # nothing deposited by the run
        assert after != before  # and they did trade


async def test_a_keys_exchange_without_credentials_or_with_wrong_ones_is_explained(tmp_path: Path) -> None:
    async with keys_engine(tmp_path) as (host, port, _):
        with pytest.raises(SimulationError, match="--credentials FILE"):
            await asyncio.wait_for(run_tcp(_config(host, port, None), stream=None), T)
        wrong = Credentials({"random02": "not-it"}, AGENT_TOKEN, ("ops", ADMIN_TOKEN))
        with pytest.raises(SimulationError, match="wrong token.*'random02'"):
            await asyncio.wait_for(run_tcp(_config(host, port, wrong), stream=None), T)
        not_admin = Credentials({}, AGENT_TOKEN, ("alice", "alice-secret"))
        with pytest.raises(SimulationError, match="'alice' has no admin rights"):
            await asyncio.wait_for(run_tcp(_config(host, port, not_admin), stream=None), T)
        await asyncio.sleep(0.2)
        assert await _open_connections(host, port) == 0


def test_a_credentials_file_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"admin": {"user": "ops", "token": "t0"}, "token": "t",
                                "users": {"mm01": "t1"}}))
    creds = read_credentials(path)
    assert creds.admin == ("ops", "t0")
    assert creds.token_for("mm01") == "t1" and creds.token_for("random01") == "t"
    for bad, why in (([], "JSON object"), ({"token": 5}, "'token' must be a string"),
                     ({"users": {"a": 1}}, "'users' maps"), ({"admin": {"user": "ops"}, "token": "t"}, "'admin' must be"),
                     ({"admin": {"user": "ops", "token": "t0"}}, "give the agents' tokens"),
                     ({"tokens": "t"}, "unknown keys")):
        path.write_text(json.dumps(bad))
        with pytest.raises(SimulationError, match=why):
            read_credentials(path)
    path.write_text("{nope")
    with pytest.raises(SimulationError, match="not valid JSON"):
        read_credentials(path)
    with pytest.raises(SimulationError, match="cannot read the credentials file"):
        read_credentials(tmp_path / "missing.json")


def test_the_command_line_takes_credentials_for_tcp_runs_only(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"token": "t"}))
    result = run_cli("--embedded", "--credentials", str(path), "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "--credentials applies to TCP runs" in result.stderr
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"credentials": str(tmp_path / "missing.json")}))
    result = run_cli("--config", str(config), "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "cannot read the credentials file" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_scheduled_run_uses_the_credentials_too(tmp_path: Path) -> None:
    async with keys_engine(tmp_path) as (host, port, _):
        creds = tmp_path / "creds.json"
        creds.write_text(json.dumps({"admin": {"user": "ops", "token": ADMIN_TOKEN}, "token": AGENT_TOKEN}))
        config = tmp_path / "sim.json"
        config.write_text(json.dumps({"schedule": {"accounts": ["random01", "random02"], "trades_per_account": 2}}))
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, lambda: run_cli(
            "--schedule", "--port", str(port), "--credentials", str(creds), "--config", str(config),
            "--data-dir", str(tmp_path / "runs"), "--no-progress"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "4 slots" in result.stdout
        held = await _holdings(host, port)
        assert Decimal(held["random01"]["USD"]["deposited"]) > 0  # funded by the admin
        assert await _open_connections(host, port) == 0


async def test_the_admin_funds_the_agents_one_deposit_at_a_time_under_a_rate_limit(tmp_path: Path) -> None:
    """Every agent's deposits go through the one admin connection: sent all at once, they
    used up its allowance together and the run could not start ("funding the agents failed:
    rate_limited"), where agents funding themselves each have their own."""
    async with keys_engine(tmp_path, "--rate-limit", "4") as (host, port, _):
        creds = Credentials({}, AGENT_TOKEN, ("ops", ADMIN_TOKEN))
        report = await asyncio.wait_for(run_tcp(_config(host, port, creds), stream=None), 90)
        assert not report["agent_failures"]
        deposited = _conserved(await _holdings(host, port))
        assert deposited["USD"] > 0 and deposited["BTC"] > 0 and deposited["ACME"] > 0


async def test_an_admin_in_the_credentials_against_an_open_exchange_is_explained(tmp_path: Path) -> None:
    async with _engine(tmp_path) as (host, port, _, _):
        creds = Credentials({}, AGENT_TOKEN, ("ops", ADMIN_TOKEN))
        with pytest.raises(SimulationError, match="--auth open mode has no admins: leave 'admin' out"):
            await asyncio.wait_for(run_tcp(_config(host, port, creds), stream=None), T)
