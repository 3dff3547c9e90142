"""Edges of the terminal client found by an adversarial tester: odd digits, pasted pages,
an unusable history file, two terminals of one user, stale records, a stalled exchange.

Driven like tests/test_tui.py: prompt_toolkit pipe input against a real server on 127.0.0.1
(ephemeral port, temporary data directory, the ``server``/``connect`` fixtures of conftest),
output read back as plain text. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from tui_helpers import Terminal

from client.session_manager import SessionManager
from client.tui import Invalid, parse_command


def _records(data_dir: Path, user: str) -> list[dict[str, Any]]:
    return orjson.loads((data_dir / "sessions" / f"orders_{user}.json").read_bytes())["orders"]



@pytest.mark.parametrize("line", ["book ²", "history ²", "trades ³"])
def test_parse_command_never_raises_on_non_ascii_digits(line: str) -> None:
    """'²'.isdigit() is True but int('²') raises: parse_command must never raise."""
    action = parse_command(line)
    assert isinstance(action, Invalid)


async def test_a_superscript_digit_in_book_depth_does_not_end_the_session(server, tmp_path: Path) -> None:
    async with Terminal(server, "alice", tmp_path / "client") as term:
        term.mark = len(term.screen.text)
        term.keys.send_text("book ²\r")  # e.g. AltGr+2 on a European keyboard instead of 2
        await term.screen.wait_for(r"error: .*usage: book", after=term.mark)
        assert "bye." not in term.screen.text
        await term.assert_still_usable()



async def test_a_line_longer_than_the_exchange_limit_is_refused_locally(server, tmp_path: Path) -> None:
    """A pasted number of 66,000 digits would make a request line over the exchange's
    64 KiB limit, which closes the connection: it is refused locally instead."""
    async with Terminal(server, "alice", tmp_path / "client") as term:
        text = "\x1b[200~buy 1 @ " + "1" * 66_000 + "\x1b[201~"  # a bracketed paste
        for i in range(0, len(text), 8192):  # the pipe holds 64 KiB: feed it in pieces
            term.keys.send_text(text[i:i + 8192])
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        term.mark = len(term.screen.text)
        term.keys.send_text("\r")
        await term.screen.wait_for(r"error:|REJECTED|was lost", after=term.mark)
        assert "was lost" not in term.screen.text
        await term.assert_still_usable()



async def test_an_unreadable_command_history_file_gives_a_message_not_a_traceback(server, tmp_path: Path) -> None:
    """The command history cannot be opened (here a directory; for a normal user also a file
    left by `sudo`, mode 600 root): a warning, then the session as usual."""
    data_dir = tmp_path / "client"
    (data_dir / "sessions" / "commands_alice.history").mkdir(parents=True)
    async with Terminal(server, "alice", data_dir) as term:
        await asyncio.sleep(1.0)
        await term.type("balance", r"asset\s+available")
        await asyncio.sleep(0.3)
        assert "Unhandled exception" not in term.screen.text
        assert "Press ENTER to continue" not in term.screen.text
        assert "Traceback" not in term.screen.text and 'File "' not in term.screen.text



async def test_two_terminals_of_one_user_keep_each_others_records(server, tmp_path: Path) -> None:
    """A rejection is reported only to the terminal that sent the order: the other
    terminal's next save must keep it."""
    data_dir = tmp_path / "client"
    async with Terminal(server, "alice", data_dir) as a, Terminal(server, "alice", data_dir) as b:
        await b.type("buy 1 @ 100.001", r"REJECTED BUY 1 BTC-USD @ 100\.001: invalid_price")
        assert [r["status"] for r in _records(data_dir, "alice")] == ["REJECTED"]
        await a.type("buy 1 @ 90", r"NEW order \d+ accepted")
        await b.screen.wait_for(r"NEW order \d+ accepted", after=b.mark)
        await asyncio.sleep(0.3)
        statuses = sorted(r["status"] for r in _records(data_dir, "alice"))
        assert statuses == ["NEW", "REJECTED"], statuses



async def test_book_does_not_mark_a_level_as_yours_from_a_stale_history_record(server, connect, tmp_path: Path) -> None:
    """An order filled while the client was away stays NEW in the history; 'book' must not
    tag someone else's level at that price as '<- yours'."""
    data_dir = tmp_path / "client"
    async with Terminal(server, "alice", data_dir) as term:
        await term.type("buy 1 @ 90", r"NEW order \d+ accepted")
        await term.type("quit", r"bye\.")
    bob = await connect("bob")
    await bob.sell("BTC-USD", "1", "90.00")   # fills alice's order while she is away
    await bob.buy("BTC-USD", "2", "90.00")    # bob's own bid at the same price
    async with Terminal(server, "alice", data_dir) as term:
        await term.type("orders", r"no open orders")
        m = await term.type("book", r"bid\s+90\.00\s+2\.0000\s+1[^\n]*")
        assert "yours" not in m.group(0), m.group(0)


async def test_orders_that_ended_while_away_are_settled_from_the_exchange(server, connect, tmp_path: Path) -> None:
    """At start-up the client asks the exchange how the orders its history still calls open
    ended (``order_status``), records it and says so; an order the exchange no longer
    remembers is marked GONE, said once, and no longer counts as open."""
    data_dir = tmp_path / "client"
    server.gateway.finished.kept = 4  # the exchange remembers the last four orders that finished
    async with Terminal(server, "alice", data_dir) as term:
        filled = int((await term.type("buy 1 @ 90", r"NEW order (\d+) accepted")).group(1))
        canceled = int((await term.type("buy 1 @ 80", r"NEW order (\d+) accepted")).group(1))
        forgotten = int((await term.type("buy 1 @ 70", r"NEW order (\d+) accepted")).group(1))
        await term.type("quit", r"bye\.")
    other = await connect("alice")
    await other.cancel(forgotten)
    bob = await connect("bob")
    await bob.sell("BTC-USD", "1", "90.00")  # two orders finish: Alice's and Bob's
    await bob.sell("BTC-USD", "0.25", "80.00")  # Bob's finishes, Alice's is partly filled
    await other.cancel(canceled)  # the fifth to finish: the first (forgotten) is forgotten
    async with Terminal(server, "alice", data_dir) as term:
        await term.screen.wait_for(rf"While this client was away: order {filled} filled, {canceled} canceled "
                                   r"\(0\.2500 of 1\.0000 filled\)")
        await term.screen.wait_for(rf"orders {forgotten} ended while this client was away, and how could not "
                                   r"be told for sure")
        await term.screen.wait_for(rf"While this client was away: orders {filled}, {canceled} traded; their "
                                   r"fills are now in your history")
        await term.type("orders", r"no open orders")
    records = {r["order_id"]: r for r in _records(data_dir, "alice")}
    assert (records[filled]["status"], records[filled]["filled"]) == ("FILLED", "1.0000")
    assert records[canceled]["status"] == "CANCELED"
    assert records[forgotten]["status"] == "GONE"
    assert [(f["price"], f["qty"], f["liquidity"]) for f in records[filled]["fills"]] == [("90.00", "1.0000", "maker")]
    assert [(f["price"], f["qty"]) for f in records[canceled]["fills"]] == [("80.00", "0.2500")]
    assert records[forgotten]["fills"] == []
    async with Terminal(server, "alice", data_dir) as term:  # said once: nothing open is left to ask about
        await term.screen.wait_for(r"Order history: .*\(3 orders, 0 open\)")
        await term.type("history", rf"{forgotten}\s.*GONE")
        assert "while this client was away" not in term.screen.text and "traded; their fills" not in term.screen.text
    assert [len(r["fills"]) for r in _records(data_dir, "alice")] == [1, 1, 0]  # recorded once


async def test_fills_the_exchange_no_longer_keeps_are_said_to_be_missing(server, connect, tmp_path: Path) -> None:
    """An order that filled while the client was away, whose fills the exchange has
    dropped since: the history gets how much filled, and the client says the fills are
    missing rather than that there were none."""
    from exchange.gateway import RecentFills

    data_dir = tmp_path / "client"
    server.gateway.fills = RecentFills(per_user=1, kept=2)  # one fill a user, two in all
    async with Terminal(server, "alice", data_dir) as term:
        first = int((await term.type("buy 1 @ 90", r"NEW order (\d+) accepted")).group(1))
        second = int((await term.type("buy 1 @ 89", r"NEW order (\d+) accepted")).group(1))
        await term.type("quit", r"bye\.")
    bob = await connect("bob")
    await bob.sell("BTC-USD", "2", "89.00")  # fills both: the exchange keeps alice's second fill only
    async with Terminal(server, "alice", data_dir) as term:
        await term.screen.wait_for(rf"orders {first} traded while this client was away, but the exchange no "
                                   r"longer keeps those fills")
        await term.type("fills", r"the exchange keeps none of your fills before trade \d+ \(its ledger")
        assert re.search(rf"BTC-USD\s+{second}\s+buy\s+1\.0000\s+89\.00\s+maker", term.screen.text)
    records = {r["order_id"]: r for r in _records(data_dir, "alice")}
    assert records[first]["status"] == "FILLED" and records[first]["fills"] == []
    assert [f["price"] for f in records[second]["fills"]] == ["89.00"]
    # Then someone else's two fills push hers out.
    carol = await connect("carol")
    await carol.sell("BTC-USD", "0.5", "100.00")
    await bob.buy("BTC-USD", "0.5", "100.00")
    async with Terminal(server, "alice", data_dir) as term:
        await term.type("fills", r"no fills of yours since trade \d+: the exchange keeps none older")


async def test_settling_at_start_up_stops_at_the_rate_limit_and_keeps_live_prices(server, connect, tmp_path: Path) -> None:
    """Against --rate-limit 10, thirty orders cancelled while away: the client asks until it
    is refused, waits for its allowance, and still subscribes to the market's prices; the
    orders it could not ask about stay as they were, named in the warning."""
    data_dir = tmp_path / "client"
    async with Terminal(server, "alice", data_dir) as term:
        for n in range(30):
            await term.type(f"buy 1 @ {60 + n}", r"NEW order \d+ accepted")
        await term.type("quit", r"bye\.")
    other = await connect("alice")
    for order in await other.orders():
        await other.cancel(order["order_id"])
    server.gateway.options.rate_limit = 10
    bob = await connect("bob")
    async with Terminal(server, "alice", data_dir) as term:
        await term.screen.wait_for(r"While this client was away: order \d+ canceled")
        await term.screen.wait_for(r"are open in your history but no longer at the exchange; how they "
                                   r"ended is not known yet")
        await asyncio.sleep(1.0)
        await bob.sell("BTC-USD", "1", "95.00")  # a live price the subscription must show
        await term.type("book", r"95\.00")
        assert "no live prices" not in term.screen.text
    statuses = [r["status"] for r in _records(data_dir, "alice")]
    assert 0 < statuses.count("CANCELED") < 30 and statuses.count("CANCELED") + statuses.count("NEW") == 30


async def test_the_client_starts_against_a_rate_limit_of_two_requests_a_second(server, connect, tmp_path: Path) -> None:
    """Log-in, markets, open orders, two subscriptions: five requests at start-up. Against
    --rate-limit 2 the client said the exchange "refused the login" and exited (the login
    had worked; 'orders' was refused), or, at 3, started without live prices for good."""
    server.gateway.options.rate_limit = 2
    bob = await connect("bob")
    async with Terminal(server, "alice", tmp_path / "client") as term:
        await term.screen.wait_for(r"Order history")
        await asyncio.sleep(2.5)  # the subscriptions wait for the allowance
        await bob.sell("BTC-USD", "1", "95.00")  # a live price the subscription must show
        await asyncio.sleep(1.2)
        await term.type("book", r"95\.00")
        assert "refused" not in term.screen.text and "no live prices" not in term.screen.text


async def test_status_shows_an_order_as_the_exchange_has_it_and_records_how_it_ended(server, connect, tmp_path: Path) -> None:
    data_dir = tmp_path / "client"
    bob = await connect("bob")
    async with Terminal(server, "alice", data_dir) as term:
        oid = int((await term.type("buy 2 @ 90", r"NEW order (\d+) accepted")).group(1))
        await term.type(f"status {oid}", rf"{oid}\s+BTC-USD\s+buy .*NEW\s")
        other = await connect("alice")  # a second session: its cancel reaches this one as a report
        await bob.sell("BTC-USD", "0.5", "90.00")
        await term.screen.wait_for(r"FILL order", after=term.mark)
        await term.type(f"status {oid}", rf"{oid}\s+BTC-USD\s+buy .*0\.5000\s+1\.5000\s+PARTIALLY_FILLED")
        await other.cancel(oid)
        await term.type(f"status {oid}", rf"{oid}\s+BTC-USD .*CANCELED")
        await term.type("status 999999", r"order 999999 is not one of yours at the exchange")
        await term.assert_still_usable()
    records = {r["order_id"]: r for r in _records(data_dir, "alice")}
    assert records[oid]["status"] == "CANCELED"


async def test_book_shows_the_last_trade_or_the_reference_price_between_the_sides(server, connect, tmp_path: Path) -> None:
    bob = await connect("bob")
    async with Terminal(server, "alice", tmp_path / "client") as term:
        await term.type("book", r"\(no asks\)\s+-----\s+\(no bids\)")  # BTC-USD: no trade, no reference
        await term.type("buy 1 @ 95", r"NEW order \d+ accepted")
        await bob.sell("BTC-USD", "1", "95.00")
        await term.type("buy 1 @ 94", r"NEW order \d+ accepted")
        await bob.sell("BTC-USD", "1", "96.50")
        await term.type("book", r"----- spread 2\.50 · last 95\.00 -----")
        await term.type("market ACME-USD", r"ACME-USD")
        await term.type("book", r"----- ref 100\.00 -----")  # no trade seen: the band's reference



async def test_markets_shows_the_band_around_the_last_trade_and_a_refusal_says_it(server, connect, tmp_path: Path) -> None:
    """The band's reference moves with the last trade: ``markets`` shows today's limits,
    not the configured reference's, and an order refused for the band is told them."""
    bob = await connect("bob")
    async with Terminal(server, "alice", tmp_path / "client", market="ACME-USD") as term:
        await term.type("markets", r"ACME-USD .* 90\.00-110\.00 \(\+-10% of 100\.00\)")
        await term.type("buy 1 @ 103.23", r"NEW order \d+ accepted")
        await bob.sell("ACME-USD", "1", "103.23")
        await term.screen.wait_for(r"FILL order", after=term.mark)
        await term.type("markets", r"ACME-USD .* 92\.91-113\.55 \(\+-10% of 103\.23\)")
        await term.type("buy 1 @ 91", r"price_out_of_band")
        await term.screen.wait_for(r"the ACME-USD band now allows 92\.91-113\.55 \(\+-10% of 103\.23\)",
                                   after=term.mark)
        await term.type("buy 1 @ 112", r"NEW order \d+ accepted")  # outside the configured band, inside today's


class ProcessServer:
    """run/start_engine.py as a process (to stop it with a signal), ephemeral port, temp data dir."""

    def __init__(self, tmp: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, str(root / "run" / "start_engine.py"), "--port", str(port),
             "--data-dir", str(tmp / "server")],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.address = ("127.0.0.1", port)

    async def ready(self) -> None:
        for _ in range(400):
            try:
                _, writer = await asyncio.open_connection(*self.address)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("the exchange did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


async def test_an_order_whose_reply_times_out_is_not_reported_as_simply_failed(tmp_path: Path) -> None:
    """The exchange stalls (overloaded, SIGSTOP, a long GC): the order was sent and is
    placed once it resumes, so the message must not read as 'not placed'."""
    srv = ProcessServer(tmp_path)
    try:
        await srv.ready()
        async with Terminal(srv, "alice", tmp_path / "client") as term:
            srv.proc.send_signal(signal.SIGSTOP)
            m = await term.type("buy 1 @ 90", r"error: [^\n]*", timeout=15)
            srv.proc.send_signal(signal.SIGCONT)
            await term.screen.wait_for(r"NEW order \d+ accepted: BUY 1\.0000 BTC-USD @ 90\.00", after=term.mark)
            assert re.search(r"may|might|check 'orders'", m.group(0)), m.group(0)
    finally:
        srv.stop()



def test_a_glob_character_in_the_user_name_does_not_touch_other_users_files(tmp_path: Path) -> None:
    """The exchange accepts '*' and '[...]' in user names: the stale temp-file clean-up
    must not take them as patterns and delete another user's save in progress."""
    SessionManager("bob", tmp_path)
    in_flight = tmp_path / "sessions" / ".orders_bob.json.k3j2h1.tmp"  # bob's save() before os.replace
    in_flight.write_bytes(b'{"version": 1, "user": "bob", "orders": []}\n')
    SessionManager("*", tmp_path)
    assert in_flight.exists()
    SessionManager("[bc]ob", tmp_path)
    assert in_flight.exists()



@pytest.mark.parametrize("line", ["market " + "X" * 5000, "deposit " + "Y" * 5000 + " 1",
                                  "buy " + "Z" * 5000 + " @ 1", "buy 1 @ " + "W" * 5000])
async def test_error_messages_do_not_echo_unbounded_input(server, tmp_path: Path, line: str) -> None:
    async with Terminal(server, "alice", tmp_path / "client") as term:
        term.mark = len(term.screen.text)
        term.keys.send_text("\x1b[200~" + line + "\x1b[201~\r")
        m = await term.screen.wait_for(r"error: [^\n]*", after=term.mark)
        assert len(m.group(0)) < 400, f"error line of {len(m.group(0))} characters"



@pytest.mark.parametrize("line", ["buy 1.. @ 100", "buy 1 @ .", "buy ２ @ 100", "buy 1 @ １００",
                                  "modify 3 qty ٣"])
def test_numbers_the_exchange_always_refuses_are_refused_locally(line: str) -> None:
    """The help promises plain decimals: a lone point and non-ASCII digits, which the
    exchange refuses, are refused locally instead of being stored as REJECTED orders."""
    assert isinstance(parse_command(line), Invalid)
