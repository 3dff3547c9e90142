"""The terminal UI: command parsing (pure), notifications, completion, and the real app driven
through prompt_toolkit's pipe input against a real server.

The end-to-end tests type into ``create_pipe_input()`` exactly as a keyboard would and read
what the app printed from a ``PlainTextOutput`` (the terminal output minus escape codes).
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from client.session_manager import SessionManager
from client.tui import (
    EXIT_CONNECTION,
    EXIT_OK,
    EXIT_USAGE,
    Cancel,
    CancelAll,
    ClientOptions,
    TerminalApp,
    CommandCompleter,
    Deposit,
    GuidedOrder,
    Help,
    Invalid,
    PROMPT_OPTIONS,
    LocalBook,
    Modify,
    Nothing,
    Place,
    Quit,
    ShowBalance,
    ShowBook,
    ShowHistory,
    ShowMarkets,
    ShowOrders,
    ShowStatus,
    ShowFills,
    ShowTrades,
    SwitchMarket,
    describe_report,
    parse_command,
    place_text,
    plain,
    run_client,
)
from tui_helpers import WAIT, Terminal

ROOT = Path(__file__).resolve().parent.parent

# ============================================================================ parsing

GOOD = [
    ("buy 2 @ 101.5", Place("buy", "2", "101.5", "limit", "gtc")),
    ("buy 2@101.5", Place("buy", "2", "101.5", "limit", "gtc")),
    ("BUY 2 at 101.5", Place("buy", "2", "101.5", "limit", "gtc")),
    ("buy 2 101.5", Place("buy", "2", "101.5", "limit", "gtc")),
    ("sell 0.5 @ .5 gtc", Place("sell", "0.5", ".5", "limit", "gtc")),
    ("buy 2. @ 100.", Place("buy", "2.", "100.", "limit", "gtc")),  # as the exchange reads them
    ("sell 1 market", Place("sell", "1", None, "market", "ioc")),
    ("sell 1 mkt", Place("sell", "1", None, "market", "ioc")),
    ("buy 1 MARKET fok", Place("buy", "1", None, "market", "fok")),
    ("buy for 250", Place("buy", None, None, "market", "ioc", False, "250")),
    ("sell FOR 10.5", Place("sell", None, None, "market", "ioc", False, "10.5")),
    ("buy 5 @ 100 ioc", Place("buy", "5", "100", "limit", "ioc")),
    ("buy 1 @ 99 fok", Place("buy", "1", "99", "limit", "fok")),
    ("buy 1 @ 99 post", Place("buy", "1", "99", "limit", "gtc", True)),
    ("buy 1 @ 99 post gtc", Place("buy", "1", "99", "limit", "gtc", True)),
    ("  s 3 @ 100.25  ", Place("sell", "3", "100.25", "limit", "gtc")),
    ("cancel 17", Cancel(17)),
    ("cancel #17", Cancel(17)),
    ("cancel all", CancelAll()),
    ("Cancel ALL acme-usd", CancelAll("ACME-USD")),
    ("modify 17 qty 1", Modify(17, None, "1")),
    ("modify 17 price 100.5", Modify(17, "100.5", None)),
    ("modify 17 price 100.5 qty 2", Modify(17, "100.5", "2")),
    ("amend 17 quantity 2", Modify(17, None, "2")),
    ("orders", ShowOrders()),
    ("status 17", ShowStatus(17)),
    ("status #17", ShowStatus(17)),
    ("status 9223372036854775807", ShowStatus(9223372036854775807)),
    ("balance", ShowBalance()),
    ("balances", ShowBalance()),
    ("book", ShowBook()),
    ("book 5", ShowBook(5)),
    ("trades", ShowTrades()),
    ("trades 3", ShowTrades(3)),
    ("fills", ShowFills()),
    ("fills 5", ShowFills(5)),
    ("fills 99999", ShowFills(1000)),
    ("market acme-usd", SwitchMarket("ACME-USD")),
    ("market", SwitchMarket(None)),
    ("markets", ShowMarkets()),
    ("history", ShowHistory()),
    ("history 50", ShowHistory(50)),
    ("deposit usd 1000", Deposit("USD", "1000")),
    ("deposit BTC 0.5", Deposit("BTC", "0.5")),
    ("order", GuidedOrder()),
    ("help", Help()),
    ("help bal", Help("balance")),
    ("?", Help()),
    ("quit", Quit()),
    ("exit", Quit()),
    ("", Nothing()),
    ("   ", Nothing()),
]

BAD = [
    ("buy", "usage: buy QTY @ PRICE"),
    ("buy 2", "give a price"),
    ("buy two @ 100", "'two' is not a positive quantity"),
    ("buy 0 @ 100", "'0' is not a positive quantity"),
    ("buy -1 @ 100", "'-1' is not a positive quantity"),
    ("buy 1e3 @ 100", "'1e3' has an exponent; write the quantity in full (e.g. 1000)"),
    ("buy 2 @", "a price must follow '@'"),
    ("buy 2 @ abc", "'abc' is not a positive price"),
    ("buy 2 @ .", "'.' is not a positive price"),
    ("buy 2 @ 0", "'0' is not a positive price"),
    ("buy 1 @ 1e5", "'1e5' has an exponent; write the price in full (e.g. 100000)"),
    ("buy 1e-3 @ 100", "'1e-3' has an exponent; write the quantity in full (e.g. 0.001)"),
    ("buy 1 @ 1e999999999", "'1e999999999' has an exponent; write the price in full;"),  # not a billion digits
    ("modify 17 price 2E1", "'2E1' has an exponent; write the price in full (e.g. 20)"),
    ("buy 2 @ 100 ioc fok", "at most one of gtc, ioc, fok"),
    ("buy 2 @ 100 soon", "unknown option 'soon'"),
    ("buy 2 @ 100 post ioc", "post-only order rests on the book"),
    ("sell 1 market post", "market order cannot be post-only"),
    ("sell 1 market gtc", "never rests on the book"),
    ("buy for", "an amount must follow for"),
    ("buy for ten", "'ten' is not a positive amount"),
    ("buy for 10 fok", "'buy for' takes no options"),
    ("cancel", "usage: cancel ORDER_ID"),
    ("cancel abc", "usage: cancel ORDER_ID"),
    ("cancel 1 2", "usage: cancel ORDER_ID"),
    ("cancel all BTC-USD now", "usage: cancel ORDER_ID  |  cancel all [MARKET]"),
    ("status", "usage: status ORDER_ID"),
    ("status last", "usage: status ORDER_ID"),
    ("status 9223372036854775808", "usage: status ORDER_ID"),
    ("modify", "usage: modify ORDER_ID"),
    ("modify x qty 1", "'x' is not an order id"),
    ("modify 17", "say what to change"),
    ("modify 17 qty", "say what to change"),
    ("modify 17 colour 1", "can change 'qty' or 'price'"),
    ("modify 17 qty 1 qty 2", "'qty' given twice"),
    ("modify 17 price -3", "'-3' is not a positive price"),
    ("deposit USD", "usage: deposit ASSET AMOUNT"),
    ("deposit USD lots", "'lots' is not a positive amount"),
    ("book 0", "usage: book [DEPTH]"),
    ("book deep", "usage: book [DEPTH]"),
    ("history 1 2", "usage: history [N]"),
    ("market A B", "usage: market SYMBOL"),
    ("orders now", "'orders' takes no arguments"),
    ("quit please", "'quit' takes no arguments"),
    ("help a b", "usage: help"),
    ("sudo buy", "unknown command 'sudo'; type 'help'"),
]


@pytest.mark.parametrize("line,expected", GOOD)
def test_parse_good_commands(line: str, expected: Any) -> None:
    assert parse_command(line) == expected


@pytest.mark.parametrize("line,fragment", BAD)
def test_parse_bad_commands_give_a_one_line_hint(line: str, fragment: str) -> None:
    action = parse_command(line)
    assert isinstance(action, Invalid), action
    assert fragment in action.message
    assert "\n" not in action.message


def test_place_text_round_trips_through_the_parser() -> None:
    for line, expected in GOOD:
        if isinstance(expected, Place):
            assert parse_command(place_text(expected)) == expected


# ============================================================================ presentation


def _report(**fields: Any) -> dict[str, Any]:
    base = {
        "type": "exec", "exec_type": "new", "order_id": 7, "market": "BTC-USD", "side": "buy",
        "order_type": "limit", "tif": "gtc", "price": "100.00", "qty": "1.0000",
        "filled_qty": "0.0000", "remaining_qty": "1.0000", "avg_price": None, "status": "new",
        "ts": 1_700_000_000_000_000_000,
    }
    base.update(fields)
    return base


def test_notifications_say_what_happened_in_the_side_colour() -> None:
    new = describe_report(_report())
    assert "NEW order 7 accepted: BUY 1.0000 BTC-USD @ 100.00" in plain(new)
    assert any(style == "class:buy" and "BUY 1.0000" in text for style, text in new)
    fill = describe_report(_report(
        exec_type="trade", side="sell", filled_qty="0.4000", remaining_qty="0.6000", avg_price="100.00",
        status="partially_filled", trade_id=3, last_price="100.00", last_qty="0.4000",
        liquidity="maker", fee="0.004", fee_asset="USD",
    ))
    text = plain(fill)
    assert "FILL order 7: SOLD 0.4000 BTC-USD @ 100.00 (maker, fee 0.004 USD)" in text
    assert "filled 0.4000 of 1.0000" in text and text.endswith("partially filled")
    assert any(style.startswith("class:sell") and "SOLD" in t for style, t in fill)
    rejected = plain(describe_report(_report(
        exec_type="rejected", order_id=None, status="rejected", reason="insufficient_funds",
        message="not enough available balance",
    )))
    assert "REJECTED BUY 1.0000 BTC-USD @ 100.00: insufficient_funds - not enough available balance" in rejected
    assert "CANCELED order 7" in plain(describe_report(_report(exec_type="canceled", status="canceled")))
    assert "EXPIRED order 7" in plain(describe_report(_report(exec_type="expired", status="expired", tif="ioc")))
    assert "MODIFIED order 7 is now" in plain(describe_report(_report(exec_type="replaced")))
    stp = plain(describe_report(_report(exec_type="self_trade_prevented", status="canceled")))
    assert "SELF-TRADE PREVENTED order 7 canceled" in stp
    market = plain(describe_report(_report(order_type="market", price=None, tif="ioc")))
    assert "BUY 1.0000 BTC-USD at market" in market


def test_local_book_applies_deltas_and_detects_gaps() -> None:
    book = LocalBook("BTC-USD")
    book.reset({"seq": 4, "bids": [["99.00", "1.0000", 1], ["100.00", "2.0000", 1]], "asks": [["101.00", "1.0000", 1]]})
    assert book.best_bid() == ("100.00", "2.0000") and book.best_ask() == ("101.00", "1.0000")
    assert book.apply({"seq": 4, "side": "buy", "price": "100.00", "qty": "0.0000"})  # old: ignored
    assert book.best_bid() == ("100.00", "2.0000")
    assert book.apply({"seq": 5, "side": "buy", "price": "100.00", "qty": "0.0000"})
    assert book.best_bid() == ("99.00", "1.0000")
    assert book.apply({"seq": 6, "side": "sell", "price": "100.50", "qty": "3.0000"})
    assert book.best_ask() == ("100.50", "3.0000")
    assert not book.apply({"seq": 8, "side": "sell", "price": "100.50", "qty": "0"})  # gap
    assert book.seq is None


class _StubHistory:
    def open_orders(self) -> list[dict[str, Any]]:
        return [{"order_id": 17, "side": "buy", "qty": "1", "market": "BTC-USD", "price": "99.00"}]


class _StubApp:
    markets = ["BTC-USD", "ACME-USD"]
    market = "BTC-USD"
    assets = ["ACME", "BTC", "USD"]
    history = _StubHistory()

    def open_records(self) -> list:
        return self.history.open_orders()


def _complete(text: str) -> list[str]:
    completer = CommandCompleter(_StubApp())  # type: ignore[arg-type]
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]


def test_completion_of_commands_markets_and_options() -> None:
    assert _complete("ma") == ["market", "markets"]
    assert "balance" in _complete("") and "quit" in _complete("")
    assert _complete("market ac") == ["ACME-USD"]
    assert _complete("market ") == ["BTC-USD", "ACME-USD"]
    assert _complete("deposit u") == ["USD"]
    assert _complete("cancel ") == ["all", "17"]
    assert _complete("cancel all ") == ["BTC-USD", "ACME-USD"]
    assert _complete("buy 2 ") == ["@", "market"]
    assert _complete("buy 2 m") == ["market"]
    assert _complete("buy 2 @ 100 ") == ["ioc", "fok", "post"]
    assert _complete("buy 2@100 i") == ["ioc"]
    assert _complete("modify 17 ") == ["qty", "price"]
    assert _complete("help can") == ["cancel"]


async def test_tab_completes_through_the_real_key_bindings() -> None:
    with create_pipe_input() as inp:
        session: PromptSession[str] = PromptSession(
            completer=CommandCompleter(_StubApp()), input=inp, output=DummyOutput(),  # type: ignore[arg-type]
            **PROMPT_OPTIONS,  # as the app's command prompt
        )
        task = asyncio.create_task(session.prompt_async("> "))
        inp.send_text("market ac\t")
        for _ in range(200):
            if session.default_buffer.text == "market ACME-USD":
                break
            await asyncio.sleep(0.01)
        inp.send_text("\r")
        assert await asyncio.wait_for(task, WAIT) == "market ACME-USD"


# ============================================================================ the real app


def _history(data_dir: Path, user: str) -> dict[int, dict[str, Any]]:
    records = orjson.loads((data_dir / "sessions" / f"orders_{user}.json").read_bytes())["orders"]
    return {r["order_id"]: r for r in records}


async def test_trade_from_the_terminal_see_the_fill_cancel_and_quit(server, connect, tmp_path: Path) -> None:
    data_dir = tmp_path / "client"
    async with Terminal(server, "alice", data_dir) as term:
        assert "Connected to the exchange" in term.screen.text and "as alice" in term.screen.text

        m = await term.type("sell 1 @ 100", r"NEW order (\d+) accepted: SELL 1\.0000 BTC-USD @ 100\.00")
        sell_id = int(m.group(1))

        bob = await connect("bob")
        await bob.buy("BTC-USD", "1", "100.00")
        await term.screen.wait_for(
            rf"FILL order {sell_id}: SOLD 1\.0000 BTC-USD @ 100\.00 \(maker, fee [0-9.]+ USD\); "
            r"filled 1\.0000 of 1\.0000, avg 100\.00 - filled", after=term.mark,
        )

        m = await term.type("buy 0.5 @ 90", r"NEW order (\d+) accepted: BUY 0\.5000 BTC-USD @ 90\.00")
        cancel_id = int(m.group(1))
        await term.type(f"cancel {cancel_id}", rf"CANCELED order {cancel_id}: BUY 0\.5000 BTC-USD @ 90\.00; filled 0\.0000 of 0\.5000")
        await term.type(f"cancel {cancel_id}", rf"error: cannot cancel order {cancel_id}: no such open order")

        m = await term.type("buy 0.25 @ 95 post", r"NEW order (\d+) accepted: BUY 0\.2500 BTC-USD @ 95\.00 gtc post-only")
        resting_id = int(m.group(1))

        await term.type("orders", rf"\n\s*{resting_id}\s+BTC-USD\s+buy\s+limit\s+gtc post\s+95\.00\s+0\.2500\s+0\.0000\s+0\.2500\s+NEW")
        await term.type("balance", r"asset\s+available\s+locked[\s\S]*\nBTC\s+9\.00000000\s+0\.00000000")
        await term.type("book", r"BTC-USD order book \(seq \d+\)[\s\S]*\(no asks\)[\s\S]*bid\s+95\.00\s+0\.2500\s+1\s+<- yours")
        await term.type("trades", r"\d+\s+100\.00\s+1\.0000\s+buy \(taker\)")
        await term.type("fills", rf"your fills \(oldest first\)(.*\n)+.*BTC-USD\s+{sell_id}\s+sell\s+1\.0000\s+100\.00\s+maker\s+[0-9.]+ USD")
        await term.type("history", r"your last 3 orders")
        await bob.sell("BTC-USD", "0.25", "100.00")
        await term.type("buy for 25.005", r"NEW order \d+ accepted: BUY 0\.2500 BTC-USD at market")
        await term.screen.wait_for(r"FILL order \d+: BOUGHT 0\.2500 BTC-USD @ 100\.00 \(taker, fee 0\.005000 USD\)",
                                   after=term.mark)
        await term.type("buy two", r"error: 'two' is not a positive quantity; usage: buy QTY @ PRICE")

        term.keys.send_text("quit\r")
        assert await term.exit_code() == EXIT_OK
        assert "Traceback" not in term.screen.text

    history = _history(data_dir, "alice")
    assert history[sell_id]["status"] == "FILLED" and history[sell_id]["filled"] == "1.0000"
    assert history[sell_id]["fills"][0]["price"] == "100.00"
    assert history[cancel_id]["status"] == "CANCELED"
    assert history[resting_id]["status"] == "NEW"
    assert (data_dir / "sessions" / "commands_alice.history").read_text().count("sell 1 @ 100") == 1


async def test_guided_order_rejection_market_switch_and_history_across_runs(server, connect, tmp_path: Path) -> None:
    data_dir = tmp_path / "client"
    async with Terminal(server, "carol", data_dir) as term:
        await term.type("market ACME-USD", r"now trading ACME-USD")
        await term.type("order", r"side \(buy/sell\)")
        await term.type("buy", r"type \(limit/market\) \[limit\]")
        await term.type("", r"price \(USD per ACME")
        await term.type("nine", r"error: give a positive number")
        await term.type("99", r"quantity \(ACME")
        await term.type("3", r"time in force")
        await term.type("", r"send 'buy 3 @ 99' on ACME-USD\?")
        m = await term.type("y", r"NEW order (\d+) accepted: BUY 3 ACME-USD @ 99\.00")
        guided_id = int(m.group(1))

        await term.type("buy 1 @ 200", r"REJECTED BUY 1 ACME-USD @ 200(\.00)?: price_out_of_band - price is outside")
        await term.type("buy 1 @ 98 fok", rf"EXPIRED order {guided_id + 1}: BUY 1 ACME-USD @ 98\.00 fok")
        await term.type("order", r"side \(buy/sell\)")
        await term.type("cancel", r"order abandoned")
        await term.type("deposit USD 1000", r"deposited 1000 USD; available USD is now \d+")
        await term.type("market DOGE-USD", r"error: no market 'DOGE-USD'; markets are BTC-USD, ACME-USD")

        # Another terminal of the same user modifies the order: this one is told too.
        other = await connect("carol")
        await other.modify(guided_id, qty="2")
        await term.screen.wait_for(rf"MODIFIED order {guided_id} is now BUY 2 ACME-USD @ 99\.00", after=term.mark)
        term.keys.send_text("exit\r")
        assert await term.exit_code() == EXIT_OK

    async with Terminal(server, "carol", data_dir, market="ACME-USD") as term:
        assert "(3 orders, 1 open)" in term.screen.text
        await term.type("history", rf"{guided_id}\s+ACME-USD\s+buy\s+limit\s+99\.00\s+2\s+0\s+-\s+NEW")
        term.keys.close()  # Ctrl-D / end of input leaves cleanly
        assert await term.exit_code() == EXIT_OK
    history = _history(data_dir, "carol")
    assert history[guided_id]["status"] == "NEW" and history[guided_id]["qty"] == "2"
    assert history[guided_id + 1]["status"] == "EXPIRED"
    assert history[None]["status"] == "REJECTED" and history[None]["reason"] == "price_out_of_band"


async def test_a_dropped_connection_is_reported_and_exits_non_zero(server, tmp_path: Path) -> None:
    async with Terminal(server, "dave", tmp_path / "client") as term:
        await server.stop()
        assert await term.exit_code() == EXIT_CONNECTION
        assert "the exchange is shutting down" in term.screen.text
        assert re.search(r"the connection to the exchange at 127\.0\.0\.1:\d+ was lost", term.screen.text)
        assert "Traceback" not in term.screen.text


async def test_an_unknown_start_market_is_refused(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host, port = server.address
    code = await run_client(ClientOptions(user="erin", host=host, port=port, market="DOGE-USD", data_dir=tmp_path))
    assert code == EXIT_USAGE
    assert "has no market 'DOGE-USD'; markets: BTC-USD, ACME-USD" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_start_client_against_a_closed_port_exits_with_a_friendly_message(tmp_path: Path) -> None:
    port = _closed_port()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run" / "start_client.py"), "--user", "X", "--port", str(port)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert (f"cannot connect to the exchange at 127.0.0.1:{port}; is it running? "
            "(start it with `make run`)") in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "data").exists()  # nothing written when nothing happened


def test_start_client_requires_a_user(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run" / "start_client.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2 and "--user" in proc.stderr and "Traceback" not in proc.stderr


async def test_a_login_refused_by_a_keys_mode_exchange_says_what_it_wants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from exchange.server import ExchangeServer, ServerConfig, hash_token

    accounts = tmp_path / "accounts.json"
    accounts.write_text(json.dumps({"users": {"alice": {"token_hash": hash_token("s3cret")}}}))
    srv = ExchangeServer(ServerConfig(port=0, data_dir=tmp_path / "data", stats_interval=0,
                                      auth="keys", accounts_file=accounts))
    await srv.start()
    try:
        assert srv.address is not None
        host, port = srv.address
        code = await run_client(ClientOptions(user="alice", host=host, port=port, data_dir=tmp_path))
        assert code == EXIT_CONNECTION
        assert "this exchange wants a known user and its token: --token TOKEN" in capsys.readouterr().err
        code = await run_client(ClientOptions(user="alice", host=host, port=port, data_dir=tmp_path, token="nope"))
        assert code == EXIT_CONNECTION
        assert "refused the login as 'alice': unknown user or wrong token; check the user name and --token" \
            in capsys.readouterr().err
    finally:
        await srv.stop()


async def test_trades_shows_the_markets_last_trades_from_before_the_client_started(
    server, connect, tmp_path: Path,
) -> None:
    """Asked for when the client starts watching a market: a trader sees where it traded
    without waiting for the next trade, and a trade pushed meanwhile is listed once."""
    alice, bob = await connect("alice"), await connect("bob")
    await alice.sell("ACME-USD", "3", "101.00")
    first = await bob.buy("ACME-USD", "2", "101.00")
    async with Terminal(server, "dave", tmp_path / "client", market="ACME-USD") as term:
        await term.type("trades", r"recent trades in ACME-USD \(oldest first\)(.*\n)+.*aggressor")
        shown = term.screen.text[term.mark:]
        assert re.search(r"\s1\s+101\.00\s+2\s+buy \(taker\)", shown), shown
        await bob.buy("ACME-USD", "1", "101.00")
        await asyncio.sleep(0.3)  # the push reaches the client
        await term.type("trades", r"recent trades in ACME-USD")
        await term.screen.wait_for(r"\s2\s+101\.00\s+1\s+buy \(taker\)", after=term.mark)
        shown = term.screen.text[term.mark:]
        assert len(re.findall(r"\s1\s+101\.00\s+2\s+buy", shown)) == 1, shown
        await term.type("market BTC-USD", r"now trading BTC-USD")
        await term.type("trades", r"no recent trades in BTC-USD\.")
    assert first["exec_type"] == "new"


async def test_cancel_all_from_the_terminal_in_one_market_then_everywhere(server, tmp_path: Path) -> None:
    async with Terminal(server, "erin", tmp_path / "client") as term:
        ids = []
        for line in ("buy 0.1 @ 90", "buy 0.2 @ 91"):
            ids.append(int((await term.type(line, r"NEW order (\d+) accepted")).group(1)))
        await term.type("market ACME-USD", r"now trading ACME-USD")
        other = int((await term.type("sell 1 @ 105", r"NEW order (\d+) accepted")).group(1))
        await term.type("cancel all btc-usd", rf"canceled 2 orders in BTC-USD: {ids[0]}, {ids[1]}")
        shown = term.screen.text[term.mark:]
        assert f"CANCELED order {ids[0]}" in shown and f"CANCELED order {ids[1]}" in shown
        await term.type("cancel all", rf"canceled 1 order: {other}")
        await term.type("cancel all", r"no open orders to cancel\.")
        await term.type("cancel all DOGE-USD", r"error: cannot cancel your orders in DOGE-USD: no market 'DOGE-USD'")
        await term.type("orders", r"no open orders")


async def test_trades_both_pushed_and_in_the_recent_answer_are_listed_once(server, connect, tmp_path: Path) -> None:
    """At start-up the client subscribes, then asks for the recent trades, before it reads
    its pushes: a trade made between the two is in both, and must be listed once."""
    alice, bob, watcher = await connect("alice"), await connect("bob"), await connect()
    await alice.sell("BTC-USD", "1", "101.00")
    await bob.buy("BTC-USD", "0.1", "101.00")  # before the subscription: in the answer only
    await watcher.subscribe("trades", "BTC-USD")
    for _ in range(3):  # after it: pushed, and in the answer too
        await bob.buy("BTC-USD", "0.1", "101.00")
    recent = (await watcher.recent_trades("BTC-USD"))["trades"]
    pushed = [e for e in watcher.pending_events() if e.get("type") == "trade"]
    assert [t["trade_id"] for t in recent] == [1, 2, 3, 4] and [e["trade_id"] for e in pushed] == [2, 3, 4]
    await bob.buy("BTC-USD", "0.1", "101.00")
    await watcher.ping()
    pushed += [e for e in watcher.pending_events() if e.get("type") == "trade"]

    app = TerminalApp(watcher, "watcher", "BTC-USD", [], SessionManager("watcher", tmp_path))
    app._merge_trades("BTC-USD", recent)
    for event in pushed:
        app.on_event(event)
    assert [t["trade_id"] for t in app.trades] == [1, 2, 3, 4, 5]
