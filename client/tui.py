"""The terminal client: a prompt_toolkit command line over ``ExchangeClient``.

Theory of operation
-------------------
Three pieces, each testable on its own:

* ``parse_command(line) -> Action`` is a pure function: one typed line becomes one small
  dataclass (``Place``, ``Cancel``, ``Modify``, ``ShowBook``...) or an ``Invalid`` carrying
  a one-line usage hint. It knows nothing of the exchange.
* ``describe_report(report)`` turns an execution report into the notification the user
  sees (formatted text, buys green, sells red).
* ``TerminalApp`` runs two tasks under ``with patch_stdout():``: the prompt loop
  (``PromptSession.prompt_async``), which executes one action at a time, and the event
  task, which consumes ``client.events()``: execution reports go to the order history
  (``SessionManager``) and are printed above the prompt, public trades and book deltas
  keep the ``trades`` list and the toolbar's best bid/ask current. Replies to the user's
  own orders are printed by the event task too, so every report is shown exactly once
  whichever terminal of the user caused it.

The UI decides nothing: the order id, fills, statuses and balances shown are the
exchange's words. ``TerminalApp`` takes prompt_toolkit ``input``/``output`` objects, so a
test drives the real key handling with ``create_pipe_input()`` and reads what was printed.

Exit codes: 0 after ``quit``/Ctrl-D; 1 when the exchange cannot be reached, refuses the
login, or the connection drops; 2 for bad arguments; 3 if the client itself failed (a bug:
the message says so rather than quitting as if asked to).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import re
import secrets
import sys
import time
from collections import deque
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.application import create_app_session
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, WordCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style

from client.client import ExchangeClient, ExchangeConnectionError, ExchangeError, patiently, port_number
from client.session_manager import SessionError, SessionManager
from exchange.protocol import DEFAULT_PORT, FILLS_PER_USER, MAX_DEPTH, RECENT_TRADES
from exchange.runtime import CommandLine

log = logging.getLogger("client.tui")

EXIT_OK = 0
EXIT_CONNECTION = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3

# ============================================================================ parsing


@dataclass(frozen=True)
class Place:
    side: str  # buy | sell
    qty: str | None  # None for a market order sized by ``quote_qty``
    price: str | None  # None for a market order
    order_type: str  # limit | market
    tif: str  # gtc | ioc | fok
    post_only: bool = False
    quote_qty: str | None = None  # "buy for 100": the most to spend (fee included) or sell for


@dataclass(frozen=True)
class Cancel:
    order_id: int


@dataclass(frozen=True)
class CancelAll:
    market: str | None = None  # None: every market


@dataclass(frozen=True)
class Modify:
    order_id: int
    price: str | None = None
    qty: str | None = None


@dataclass(frozen=True)
class ShowOrders:
    pass


@dataclass(frozen=True)
class ShowStatus:
    order_id: int


@dataclass(frozen=True)
class ShowBalance:
    pass


@dataclass(frozen=True)
class ShowBook:
    depth: int = 10


@dataclass(frozen=True)
class ShowTrades:
    limit: int = 20


@dataclass(frozen=True)
class ShowFills:
    limit: int = 20


@dataclass(frozen=True)
class ShowMarkets:
    pass


@dataclass(frozen=True)
class SwitchMarket:
    symbol: str | None  # None: say which market is current


@dataclass(frozen=True)
class ShowHistory:
    limit: int = 20


@dataclass(frozen=True)
class Deposit:
    asset: str
    amount: str


@dataclass(frozen=True)
class GuidedOrder:
    pass


@dataclass(frozen=True)
class Help:
    topic: str | None = None


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Nothing:
    pass


@dataclass(frozen=True)
class Invalid:
    message: str


Action = Union[
    Place, Cancel, CancelAll, Modify, ShowOrders, ShowStatus, ShowBalance, ShowBook, ShowTrades, ShowFills,
    ShowMarkets,
    SwitchMarket, ShowHistory, Deposit, GuidedOrder, Help, Quit, Nothing, Invalid,
]

# name -> (usage, one-line description); the order is the help's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "buy": ("buy QTY @ PRICE [ioc|fok|post]  |  buy QTY market  |  buy for AMOUNT",
            "buy at a limit price (good till canceled unless ioc/fok/post) or at market; "
            "'buy for 100': at market, spending at most 100 of the quote asset, fee included"),
    "sell": ("sell QTY @ PRICE [ioc|fok|post]  |  sell QTY market  |  sell for AMOUNT",
             "sell at a limit price or at market ('mkt' works too); 'sell for 100': at market, "
             "for at most 100 of the quote asset"),
    "order": ("order", "place an order step by step: side, type, price, quantity"),
    "cancel": ("cancel ORDER_ID  |  cancel all [MARKET]",
               "cancel one of your open orders, or all of them (in every market unless one is named)"),
    "modify": ("modify ORDER_ID [qty QTY] [price PRICE]",
               "change an open order's total quantity and/or price"),
    "orders": ("orders", "your open orders, all markets"),
    "status": ("status ORDER_ID", "one order as the exchange has it now: open, or how it ended"),
    "balance": ("balance", "your balances: available and locked"),
    "book": ("book [DEPTH]", "the order book of the current market (asks above bids; between them the spread and the last trade, or the band's reference price)"),
    "trades": ("trades [N]", "recent trades in the current market"),
    "fills": ("fills [N]", "your last N fills at the exchange, all markets: price, fee, maker or taker"),
    "market": ("market SYMBOL", "switch the current market"),
    "markets": ("markets", "list the markets"),
    "history": ("history [N]", "your last N orders from this computer's order history"),
    "deposit": ("deposit ASSET AMOUNT", "credit your own account (demo exchanges only)"),
    "help": ("help [COMMAND]", "this list, or one command's usage"),
    "quit": ("quit", "leave (also 'exit' or Ctrl-D)"),
}
ALIASES = {
    "exit": "quit", "q": "quit", "bye": "quit",
    "balances": "balance", "bal": "balance",
    "open": "orders",
    "ladder": "book",
    "hist": "history",
    "amend": "modify",
    "?": "help",
    "b": "buy", "s": "sell",
}
TIFS = ("gtc", "ioc", "fok")
POST_WORDS = ("post", "post_only", "postonly", "po")
MARKET_WORDS = ("market", "mkt")

# ASCII digits only (``\d`` also matches ``２`` and ``٣``, which the exchange refuses), on
# either side of a point or both: what the exchange reads as a plain decimal ("5.", ".5").
_NUMBER = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")
_ORDER_ID = re.compile(r"^#?([0-9]{1,19})$")
_COUNT = re.compile(r"^[0-9]{1,9}$")
MAX_NUMBER_LENGTH = 40  # the exchange refuses longer decimal texts (exchange/markets.py)


def _shown(text: str, limit: int = 30) -> str:
    """What a message repeats of the user's input: enough to recognise it, never a page."""
    return text if len(text) <= limit else text[:limit] + "..."


def usage(name: str) -> str:
    return "usage: " + COMMANDS[name][0]


def _positive(text: str) -> bool:
    """A plain positive decimal: 2, 0.5, 101.25 (no sign, no exponent, ASCII digits)."""
    if len(text) > MAX_NUMBER_LENGTH or not _NUMBER.match(text):
        return False
    try:
        return Decimal(text) > 0
    except InvalidOperation:  # pragma: no cover - the pattern already rules this out
        return False


def _not_positive(text: str, what: str) -> str:
    """Why ``text`` is refused as a positive ``what``: an exponent is named as such."""
    try:
        value = Decimal(text) if "e" in text.lower() and len(text) <= MAX_NUMBER_LENGTH else None
    except (InvalidOperation, ValueError):
        value = None
    if value is not None and value.is_finite() and value > 0:
        # Only a short example: 1e999999999 written in full would be a billion digits.
        example = f" (e.g. {value:f})" if -20 <= value.adjusted() <= 20 else ""
        return f"'{_shown(text)}' has an exponent; write the {what} in full{example}"
    return f"'{_shown(text)}' is not a positive {what}"


def _order_id(text: str) -> int | None:
    """An order id as the exchange takes it: a whole number that fits in 64 bits."""
    m = _ORDER_ID.match(text)
    return int(m.group(1)) if m and int(m.group(1)) < 1 << 63 else None


class _CommandHistory(FileHistory):
    """The command history across runs; a file it cannot read or write only costs the
    history (one warning), never the session: prompt_toolkit reads it in a background
    thread, where an error would print a traceback and wait for Enter."""

    def __init__(self, filename: str, warn: Callable[[str], Any]) -> None:
        super().__init__(filename)
        self._warn = warn
        self._failed = False

    def _fail(self, exc: OSError) -> None:
        if not self._failed:
            self._failed = True
            self._warn(f"command history {os.fsdecode(self.filename)} is not usable ({exc.strerror or exc}); "
                       "this session's commands are kept in memory only")

    def load_history_strings(self) -> Iterable[str]:
        try:
            return list(super().load_history_strings())
        except OSError as exc:
            self._fail(exc)
            return []

    def store_string(self, string: str) -> None:
        if self._failed:
            return
        try:
            super().store_string(string)
        except OSError as exc:
            self._fail(exc)


def parse_command(line: str) -> Action:
    """One typed line -> one action. Pure: no I/O, no state, never raises."""
    words = line.replace("@", " @ ").split()
    if not words:
        return Nothing()
    name = words[0].lower()
    name = ALIASES.get(name, name)
    args = words[1:]
    if name in ("buy", "sell"):
        return _parse_place(name, args)
    if name == "cancel":
        if args and args[0].lower() == "all" and len(args) <= 2:
            return CancelAll(args[1].upper() if len(args) == 2 else None)
        oid = _order_id(args[0]) if len(args) == 1 else None
        if oid is None:
            return Invalid(f"{usage('cancel')}   (e.g. cancel 17, cancel all)")
        return Cancel(oid)
    if name == "modify":
        return _parse_modify(args)
    if name == "status":
        oid = _order_id(args[0]) if len(args) == 1 else None
        if oid is None:
            return Invalid(f"{usage('status')}   (e.g. status 17)")
        return ShowStatus(oid)
    if name == "deposit":
        if len(args) != 2:
            return Invalid(f"{usage('deposit')}   (e.g. deposit USD 1000)")
        asset, amount = args[0].upper(), args[1]
        if not _positive(amount):
            return Invalid(f"{_not_positive(amount, 'amount')}; {usage('deposit')}")
        return Deposit(asset, amount)
    if name == "market":
        if len(args) > 1:
            return Invalid(usage("market"))
        return SwitchMarket(args[0].upper() if args else None)
    if name in ("book", "trades", "fills", "history"):
        if len(args) > 1 or (args and (not _COUNT.match(args[0]) or int(args[0]) < 1)):
            return Invalid(f"{usage(name)}   (N a whole number, at least 1)")
        n = int(args[0]) if args else None
        if name == "book":
            return ShowBook(min(n, MAX_DEPTH)) if n else ShowBook()
        if name == "trades":
            return ShowTrades(n) if n else ShowTrades()
        if name == "fills":
            return ShowFills(min(n, FILLS_PER_USER)) if n else ShowFills()
        return ShowHistory(n) if n else ShowHistory()
    if name == "help":
        if len(args) > 1:
            return Invalid(usage("help"))
        topic = ALIASES.get(args[0].lower(), args[0].lower()) if args else None
        return Help(topic)
    simple: dict[str, Action] = {
        "orders": ShowOrders(), "balance": ShowBalance(), "markets": ShowMarkets(),
        "order": GuidedOrder(), "quit": Quit(),
    }
    if name in simple:
        if args:
            return Invalid(f"'{name}' takes no arguments; {usage(name)}")
        return simple[name]
    return Invalid(f"unknown command '{words[0][:30]}'; type 'help' for the list")


def _parse_place(side: str, args: list[str]) -> Action:
    hint = f"{usage(side)}   (e.g. {side} 2 @ 101.5, {side} 1 market, {side} for 250)"
    if not args:
        return Invalid(hint)
    if args[0].lower() == "for":
        amount = args[1] if len(args) > 1 else ""
        if not _positive(amount):
            return Invalid(f"{_not_positive(amount, 'amount') if amount else 'an amount must follow for'}; {hint}")
        if len(args) > 2:
            return Invalid(f"'{side} for' takes no options: it trades what the book gives for the "
                           f"amount now; {hint}")
        return Place(side, None, None, "market", "ioc", False, amount)
    qty = args[0]
    if not _positive(qty):
        return Invalid(f"{_not_positive(qty, 'quantity')}; {hint}")
    rest = args[1:]
    if not rest:
        return Invalid(f"give a price ('@ PRICE') or 'market'; {hint}")
    head = rest[0].lower()
    price: str | None
    if head in MARKET_WORDS:
        price, options = None, rest[1:]
    elif head in ("@", "at"):
        if len(rest) < 2:
            return Invalid(f"a price must follow '@'; {hint}")
        price, options = rest[1], rest[2:]
    else:
        price, options = rest[0], rest[1:]
    if price is not None and not _positive(price):
        return Invalid(f"{_not_positive(price, 'price')}; {hint}")
    tif: str | None = None
    post_only = False
    for word in options:
        option = word.lower()
        if option in TIFS:
            if tif is not None:
                return Invalid(f"give at most one of gtc, ioc, fok; {hint}")
            tif = option
        elif option in POST_WORDS:
            post_only = True
        else:
            return Invalid(f"unknown option '{word[:30]}' (options: ioc, fok, post); {hint}")
    if price is None:
        if post_only:
            return Invalid("a market order cannot be post-only; give a price to rest on the book")
        if tif == "gtc":
            return Invalid("a market order never rests on the book, so it cannot be gtc")
        return Place(side, qty, None, "market", tif or "ioc", False)
    if post_only and tif not in (None, "gtc"):
        return Invalid("a post-only order rests on the book, so it cannot also be ioc or fok")
    return Place(side, qty, price, "limit", tif or "gtc", post_only)


def _parse_modify(args: list[str]) -> Action:
    hint = f"{usage('modify')}   (e.g. modify 17 qty 1, modify 17 price 100.5)"
    if not args:
        return Invalid(hint)
    oid = _order_id(args[0])
    if oid is None:
        return Invalid(f"'{args[0][:30]}' is not an order id; {hint}")
    rest = args[1:]
    if not rest or len(rest) % 2:
        return Invalid(f"say what to change; {hint}")
    changes: dict[str, str] = {}
    for key, value in zip(rest[::2], rest[1::2]):
        key = {"quantity": "qty", "px": "price"}.get(key.lower(), key.lower())
        if key not in ("qty", "price"):
            return Invalid(f"can change 'qty' or 'price', not '{key[:30]}'; {hint}")
        if key in changes:
            return Invalid(f"'{key}' given twice; {hint}")
        if not _positive(value):
            return Invalid(f"{_not_positive(value, key)}; {hint}")
        changes[key] = value
    return Modify(oid, changes.get("price"), changes.get("qty"))


def place_text(action: Place) -> str:
    """The one-line command for a ``Place`` (what the guided order shows it as)."""
    if action.quote_qty is not None:
        return f"{action.side} for {action.quote_qty}"
    if action.price is None:
        text = f"{action.side} {action.qty} market"
        return text + (" fok" if action.tif == "fok" else "")
    text = f"{action.side} {action.qty} @ {action.price}"
    if action.post_only:
        return text + " post"
    return text + ("" if action.tif == "gtc" else f" {action.tif}")


# ============================================================================ presentation

STYLE = Style.from_dict({
    "buy": "ansigreen",
    "sell": "ansired",
    "buy.bold": "ansigreen bold",
    "sell.bold": "ansired bold",
    "tag": "bold",
    "fill": "bold ansicyan",
    "error": "ansired bold",
    "warn": "ansiyellow",
    "dim": "ansibrightblack",
    "head": "bold underline",
    "prompt": "bold",
    "bottom-toolbar": "noreverse bg:#262626 #d0d0d0",
    "bottom-toolbar.user": "bold",
    "bottom-toolbar.bid": "ansigreen bold",
    "bottom-toolbar.ask": "ansired bold",
    "bottom-toolbar.ok": "ansigreen",
    "bottom-toolbar.down": "ansired bold",
})

Fragments = list[tuple[str, str]]


def _side_style(side: Any, bold: bool = False) -> str:
    base = "class:buy" if side == "buy" else "class:sell" if side == "sell" else ""
    return base + ".bold" if base and bold else base


def clock(ts: Any) -> str:
    """HH:MM:SS local time of an exchange timestamp (ns), or '' without one."""
    if type(ts) is not int:
        return ""
    return time.strftime("%H:%M:%S", time.localtime(ts / 1e9))


def _order_words(report: dict[str, Any]) -> str:
    side = str(report.get("side") or "?").upper()
    qty = report.get("qty") or (f"for {report['quote_qty']}" if report.get("quote_qty") else "?")
    market = report.get("market") or "?"
    if report.get("order_type") == "market" or (report.get("price") is None and report.get("order_type") != "limit"):
        return f"{side} {qty} {market} at market"
    return f"{side} {qty} {market} @ {report.get('price')}"


def _progress(report: dict[str, Any]) -> str:
    text = f"filled {report.get('filled_qty', '?')} of {report.get('qty', '?')}"
    if report.get("avg_price"):
        text += f", avg {report['avg_price']}"
    return text


def describe_report(report: dict[str, Any], post_only: bool = False) -> Fragments:
    """The notification for one execution report (the exchange's fields, nothing computed;
    ``post_only``: this terminal sent it so, which the report does not say)."""
    et = report.get("exec_type")
    side = report.get("side")
    oid = report.get("order_id")
    sstyle = _side_style(side)
    out: Fragments = [("class:dim", clock(report.get("ts")) + " ")]
    what = _order_words(report)
    tif = report.get("tif")
    if et == "new":
        out += [("class:tag", "NEW "), ("", f"order {oid} accepted: "), (sstyle, what)]
        if tif and report.get("order_type") == "limit":
            out.append(("class:dim", f" {tif}" + (" post-only" if post_only else "")))
    elif et == "trade":
        verb = "BOUGHT" if side == "buy" else "SOLD"
        fee = report.get("fee")
        out += [
            ("class:fill", "FILL "), ("", f"order {oid}: "),
            (_side_style(side, bold=True), f"{verb} {report.get('last_qty')} {report.get('market')} @ {report.get('last_price')}"),
            ("", f" ({report.get('liquidity', '?')}"
                 + (f", fee {fee} {report.get('fee_asset', '')}".rstrip() if fee is not None else "") + ")"),
            ("", f"; {_progress(report)}"),
            ("class:tag", " - " + str(report.get("status", "")).replace("_", " ")),
        ]
    elif et == "canceled":
        out += [("class:tag", "CANCELED "), ("", f"order {oid}: "), (sstyle, what),
                ("", f"; {_progress(report)}")]
    elif et == "expired":
        out += [("class:tag", "EXPIRED "), ("", f"order {oid}: "), (sstyle, what),
                ("class:dim", f" {tif}" if tif else ""),
                ("", f"; {_progress(report)}; the unfilled {report.get('remaining_qty', 'rest')} was not kept")]
    elif et == "rejected":
        reason = report.get("reason") or "rejected"
        message = report.get("message") or ""
        out += [("class:error", "REJECTED "), (sstyle, what.replace(" @ None", "")),
                ("class:error", f": {reason}"), ("", f" - {message}" if message else "")]
    elif et == "replaced":
        out += [("class:tag", "MODIFIED "), ("", f"order {oid} is now "), (sstyle, what),
                ("", f"; {_progress(report)}")]
    elif et == "self_trade_prevented":
        out += [("class:warn", "SELF-TRADE PREVENTED "), ("", f"order {oid} canceled: "), (sstyle, what),
                ("", f" would have traded with your own order; {_progress(report)}")]
    else:
        out += [("class:tag", f"{str(et).upper()} "), ("", f"order {oid}: "), (sstyle, what),
                ("", f"; status {report.get('status')}")]
    return out


def band_range(reference: Decimal, band: Decimal, tick: Decimal) -> str:
    """``low-high (+-10% of REF)``: the band's inclusive limits on the tick grid, rounded
    inwards as the exchange rounds them (``Market.band_limits``)."""
    low = (max((reference * (1 - band) / tick).to_integral_value(ROUND_CEILING), Decimal(1)) * tick).quantize(tick)
    high = ((reference * (1 + band) / tick).to_integral_value(ROUND_FLOOR) * tick).quantize(tick)
    return f"{low}-{high} (+-{_percent(band)} of {reference})"


def _percent(fraction: Decimal) -> str:
    """``0.10`` as ``10%``."""
    return f"{fraction * 100:f}".rstrip("0").rstrip(".") + "%"


def plain(fragments: Iterable[tuple[str, str]]) -> str:
    return "".join(text for _, text in fragments)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], styles: Sequence[str] | None = None,
          right: Sequence[bool] | None = None) -> Fragments:
    """A padded text table as formatted text; ``styles`` gives each row's style."""
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right = right or [False] * len(headers)

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    out: Fragments = [("class:head", line(list(headers))), ("", "\n")]
    for i, row in enumerate(cells):
        out += [(styles[i] if styles else "", line(row)), ("", "\n")]
    if out and out[-1] == ("", "\n"):
        out.pop()
    return out


class LocalBook:
    """The current market's levels from the ``book`` subscription: only for best bid/ask."""

    def __init__(self, market: str) -> None:
        self.market = market
        self.seq: int | None = None
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}

    def reset(self, snapshot: dict[str, Any]) -> None:
        self.seq = snapshot.get("seq")
        self.bids = {row[0]: row[1] for row in snapshot.get("bids", ())}
        self.asks = {row[0]: row[1] for row in snapshot.get("asks", ())}

    def apply(self, update: dict[str, Any]) -> bool:
        """Apply one delta; False when a gap shows the book must be fetched again."""
        seq = update.get("seq")
        if self.seq is None or type(seq) is not int or seq <= self.seq:
            return True  # waiting for a snapshot, or already included in it
        if seq != self.seq + 1:
            self.seq = None
            return False
        self.seq = seq
        side = self.bids if update.get("side") == "buy" else self.asks
        price, qty = str(update.get("price")), str(update.get("qty"))
        try:
            empty = Decimal(qty) == 0
        except InvalidOperation:
            empty = True
        if empty:
            side.pop(price, None)
        else:
            side[price] = qty
        return True

    def best_bid(self) -> tuple[str, str] | None:
        if not self.bids:
            return None
        price = max(self.bids, key=Decimal)
        return price, self.bids[price]

    def best_ask(self) -> tuple[str, str] | None:
        if not self.asks:
            return None
        price = min(self.asks, key=Decimal)
        return price, self.asks[price]


# How the command prompt completes: on Tab only (a menu popping up while typing is noise
# in a trading terminal), and Up arrow searches the history by what was typed so far.
PROMPT_OPTIONS: dict[str, Any] = {"complete_while_typing": False, "enable_history_search": True}


class CommandCompleter(Completer):
    """Tab completion: command names, then market symbols, assets, order ids, options."""

    def __init__(self, app: TerminalApp) -> None:
        self.app = app

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        spaced = document.text_before_cursor.replace("@", " @ ")
        words = spaced.split()
        if not words or spaced.endswith(" "):
            current, before = "", words
        else:
            current, before = words[-1], words[:-1]
        for word, meta in self._candidates(before):
            if word.lower().startswith(current.lower()) and word != current:
                yield Completion(word, start_position=-len(current), display_meta=meta)

    def _candidates(self, before: list[str]) -> list[tuple[str, str]]:
        if not before:
            return [(name, desc) for name, (_, desc) in COMMANDS.items()]
        name = ALIASES.get(before[0].lower(), before[0].lower())
        n = len(before)
        app = self.app
        if name == "market" and n == 1:
            return [(m, "current" if m == app.market else "") for m in app.markets]
        if name == "help" and n == 1:
            return [(c, "") for c in COMMANDS]
        if name == "deposit" and n == 1:
            return [(a, "") for a in app.assets]
        if name == "cancel" and n == 1:
            return [("all", "every open order of yours"), *_order_choices(app.open_records())]
        if name == "modify" and n == 1:
            return _order_choices(app.open_records())
        if name == "cancel" and n == 2 and before[1].lower() == "all":
            return [(m, "") for m in app.markets]
        if name == "status" and n == 1:
            return _order_choices(reversed(app.history.recent(20)))
        if name == "modify" and n >= 2 and n % 2 == 0:
            return [("qty", "new total quantity"), ("price", "new price")]
        if name in ("buy", "sell") and n == 2:
            return [("@", "limit price follows"), ("market", "at the best prices available")]
        if name in ("buy", "sell") and n >= 4 and before[2] == "@":
            return [("ioc", "fill what you can now, cancel the rest"),
                    ("fok", "fill all now or nothing"),
                    ("post", "only rest on the book, never take")]
        return []


# ============================================================================ the app


class _ConnectionLost(Exception):
    """Raised inside a running prompt to end it when the exchange goes away."""


_ABANDON = ("cancel", "abort", "stop", "q", "quit", "exit")


class TerminalApp:
    """The interactive client. ``run()`` returns the process exit code."""

    def __init__(
        self,
        client: ExchangeClient,
        user: str,
        market: str,
        markets: list[dict[str, Any]],
        history: SessionManager,
        data_dir: str | os.PathLike[str] = "data",
        *,
        input: Input | None = None,
        output: Output | None = None,
        funded: bool = False,
        stale: list[dict[str, Any]] | None = None,
        settled: list[dict[str, Any]] | None = None,
        gone: list[dict[str, Any]] | None = None,
        traded: list[dict[str, Any]] | None = None,
        unlisted: list[dict[str, Any]] | None = None,
        refresh_interval: float = 0.5,
    ) -> None:
        self.client = client
        self.user = user
        self.market_specs = {m["symbol"]: m for m in markets}
        self.markets = list(self.market_specs)
        self.assets = sorted({a for m in markets for a in (m["base"], m["quote"])})
        self.market = market
        self.history = history
        self.data_dir = Path(data_dir)
        self.book = LocalBook(market)
        self.trades: deque[dict[str, Any]] = deque(maxlen=500)
        self.transcript: list[str] = []
        self._input = input
        self._output = output
        self._funded = funded
        self._stale = stale or []
        self._settled = settled or []
        self._gone = gone or []
        self._traded = traded or []
        self._unlisted = unlisted or []
        self._refresh_interval = refresh_interval
        self._coids = itertools.count(1)
        # Unique per client run (two terminals of a user share the history file, which
        # tells their orders apart by it), whatever the process ids and clocks.
        self._coid_prefix = f"tui-{secrets.token_hex(5)}"
        self._post_only: set[str] = set()  # client order ids sent post-only, not yet answered
        self._prompt: PromptSession[str] | None = None
        self._ask_session: PromptSession[str] | None = None
        self._quitting = False
        self._lost = False
        self._save_failed = False
        self._background: set[asyncio.Task[Any]] = set()

    # -- output -------------------------------------------------------------------------

    def say(self, *parts: str | tuple[str, str] | Fragments) -> None:
        """Print one message above the prompt (formatted text; strings are plain)."""
        fragments: Fragments = []
        for part in parts:
            if isinstance(part, str):
                fragments.append(("", part))
            elif isinstance(part, tuple):
                fragments.append(part)
            else:
                fragments.extend(part)
        self.transcript.append(plain(fragments))
        print_formatted_text(FormattedText(fragments), style=STYLE)

    def error(self, message: str) -> None:
        self.say(("class:error", "error: "), message)

    def warn(self, message: str) -> None:
        self.say(("class:warn", message))

    # -- the prompt -----------------------------------------------------------------------

    def _message(self) -> FormattedText:
        return FormattedText([("class:prompt", f"{self.user}@{self.market}> ")])

    def _toolbar(self) -> FormattedText:
        bid, ask = self.book.best_bid(), self.book.best_ask()
        state = ("class:bottom-toolbar.ok", "connected") if self.client.connected else \
            ("class:bottom-toolbar.down", "DISCONNECTED")
        return FormattedText([
            ("class:bottom-toolbar.user", f" {self.user} "), ("", "| "),
            ("", f"{self.market} "), ("", "| bid "),
            ("class:bottom-toolbar.bid", f"{bid[0]} x {bid[1]}" if bid else "-"),
            ("", "  ask "),
            ("class:bottom-toolbar.ask", f"{ask[0]} x {ask[1]}" if ask else "-"),
            ("", " | "), state, ("", " | help, Tab, Ctrl-D "),
        ])

    def _make_sessions(self) -> None:
        history_file = self.data_dir / "sessions" / f"commands_{self.user}.history"
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            loop = asyncio.get_running_loop()
            line_history: Any = _CommandHistory(
                str(history_file), lambda text: loop.call_soon_threadsafe(self.warn, text),
            )
        except OSError:
            line_history = InMemoryHistory()
        self._prompt = PromptSession(
            message=self._message, history=line_history, completer=CommandCompleter(self),
            bottom_toolbar=self._toolbar, style=STYLE, refresh_interval=self._refresh_interval,
            **PROMPT_OPTIONS,
        )
        self._ask_session = PromptSession(
            history=InMemoryHistory(), bottom_toolbar=self._toolbar, style=STYLE,
            refresh_interval=self._refresh_interval,
        )

    def _invalidate(self) -> None:
        for session in (self._prompt, self._ask_session):
            if session is not None:
                session.app.invalidate()

    # -- running --------------------------------------------------------------------------

    async def run(self) -> int:
        with create_app_session(input=self._input, output=self._output):
            with patch_stdout(raw=True):
                return await self._run()

    async def _run(self) -> int:
        self._make_sessions()
        self._greet()
        try:
            await self._watch(self.market)
        except ExchangeConnectionError:
            pass  # reported below, when the event task sees the connection end
        except ExchangeError as exc:
            self.warn(f"no live prices for {self.market}: {exc.message}")
        events = asyncio.create_task(self._consume_events(), name="tui-events")
        repl = asyncio.create_task(self._repl(), name="tui-prompt")
        try:
            await asyncio.wait({events, repl}, return_when=asyncio.FIRST_COMPLETED)
            if not repl.done():  # the connection ended under the prompt
                self._end_prompts()
                try:
                    await asyncio.wait_for(asyncio.shield(repl), 2.0)
                except (asyncio.TimeoutError, Exception):
                    repl.cancel()
        finally:
            self._quitting = True
            for task in (repl, events, *self._background):
                if not task.done():
                    task.cancel()
            await asyncio.gather(repl, events, *self._background, return_exceptions=True)
        failure = repl.exception() if repl.done() and not repl.cancelled() else None
        if failure is not None and not isinstance(failure, _ConnectionLost):
            log.error("the prompt failed", exc_info=failure)
            self.error(f"internal error: {type(failure).__name__}: {failure}; exiting.")
            return EXIT_INTERNAL
        if self._lost or not self.client.connected:
            reason = self.client.closed_reason or "connection lost"
            self.say(("class:error", f"the connection to the exchange at {self.client.host}:"
                      f"{self.client.port} was lost ({reason}); exiting."))
            return EXIT_CONNECTION
        self.say("bye.")
        return EXIT_OK

    def _end_prompts(self) -> None:
        for session in (self._prompt, self._ask_session):
            if session is not None and session.app.is_running:
                try:
                    session.app.exit(exception=_ConnectionLost())
                except Exception:  # already exiting
                    pass

    def _greet(self) -> None:
        c = self.client
        self.say(("class:tag", f"Connected to the exchange at {c.host}:{c.port} as {self.user}"),
                 " (new account, funded with demo balances)" if self._funded else "")
        self.say(f"Market {self.market}. Type 'help' for the commands; Tab completes; Ctrl-D quits.")
        for warning in self.history.warnings:
            self.warn(warning)
        n_open = len(self.history.open_orders())
        self.say(("class:dim", f"Order history: {self.history.path} ({len(self.history)} orders, {n_open} open)"))
        if self._settled:
            ended = _first_ten(self._settled, lambda r: f"{r.get('order_id')} {_how_it_ended(r)}")
            self.say(f"While this client was away: order {ended}")
        if self._traded:
            ids = _first_ten(self._traded, lambda r: str(r.get("order_id")))
            self.say(f"While this client was away: order{'s' if len(self._traded) > 1 else ''} {ids} traded; "
                     "their fills are now in your history")
        if self._unlisted:
            ids = _first_ten(self._unlisted, lambda r: str(r.get("order_id")))
            self.warn(f"orders {ids} traded while this client was away, but the exchange no longer keeps "
                      "those fills: your history has how much filled, not each fill (the exchange's "
                      "ledger, trades.jsonl, has them)")
        if self._gone:
            ids = _first_ten(self._gone, lambda r: str(r.get("order_id")))
            self.warn(f"orders {ids} ended while this client was away, and how could not be "
                      "told for sure (the exchange no longer remembers them, or its answer does not "
                      "match this computer's record): marked GONE in your history; 'status ID' asks "
                      "again, the exchange's audit log has their story")
        if self._stale:
            self.warn(f"orders {_first_ten(self._stale, _order_name)} are open in your history but no longer at the exchange; "
                      "how they ended is not known yet")

    async def _repl(self) -> int:
        assert self._prompt is not None
        while True:
            try:
                line = await self._prompt.prompt_async()
            except KeyboardInterrupt:
                continue
            except (EOFError, _ConnectionLost):
                return EXIT_OK
            try:
                action = parse_command(line)
                if isinstance(action, Quit):
                    return EXIT_OK
                await self.execute(action)
            except _ConnectionLost:
                return EXIT_CONNECTION
            except ExchangeConnectionError as exc:
                if not self.client.connected:
                    self._lost = True
                    return EXIT_CONNECTION
                self.error(exc.message)
            except ExchangeError as exc:
                self.error(f"{exc.message} ({exc.code})")
            except Exception as exc:  # a bug here must not end the session with a traceback
                log.exception("command failed: %s", line)
                self.error(f"internal error while running '{line.strip()[:40]}': {type(exc).__name__}: {exc}")

    # -- events ---------------------------------------------------------------------------

    async def _consume_events(self) -> None:
        async for event in self.client.events():
            try:
                self.on_event(event)
            except Exception as exc:
                log.exception("cannot show event %r", event)
                self.error(f"could not show a message from the exchange: {type(exc).__name__}: {exc}")
        if not self._quitting:
            self._lost = True

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "exec":
            try:
                self.history.apply(event)
            except OSError as exc:
                if not self._save_failed:
                    self._save_failed = True
                    self.warn(f"could not save the order history ({exc.strerror or exc}); "
                              "orders go on, the file may miss some")
            coid = event.get("client_order_id")
            post_only = coid in self._post_only
            if post_only and event.get("exec_type") in ("new", "rejected"):
                self._post_only.discard(coid)  # answered: the set holds only orders on their way
            self.say(describe_report(event, post_only))
        elif kind == "trade":
            # Trades pushed before ``_watch`` merged the ``trades`` answer may be in it too.
            if event.get("market") == self.market and not (
                    self.trades and (event.get("trade_id") or 0) <= (self.trades[-1].get("trade_id") or 0)):
                self.trades.append(event)
        elif kind == "book":
            if event.get("market") == self.market:
                self.book.reset(event)
        elif kind == "book_update":
            if event.get("market") == self.market and not self.book.apply(event):
                self._spawn(self._resync_book(self.market))
        elif kind == "error":
            self.warn(f"message from the exchange: {event.get('message')} ({event.get('code')})")
        self._invalidate()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resync_book(self, market: str) -> None:
        try:
            snapshot = await self.client.book(market, depth=MAX_DEPTH)
        except ExchangeError:
            return
        if market == self.market and self.book.seq is None:
            self.book.reset(snapshot)
            self._invalidate()

    async def _watch(self, market: str) -> None:
        self.book = LocalBook(market)
        self.trades.clear()
        await patiently(lambda: self.client.subscribe("book", market))
        await patiently(lambda: self.client.subscribe("trades", market))
        # Asked for after subscribing, so that no trade falls between the two; the ones in
        # both are told apart by their ids.
        try:
            recent = await patiently(lambda: self.client.recent_trades(market, RECENT_TRADES))
        except ExchangeConnectionError:
            raise
        except ExchangeError:  # an exchange without the op, or its rate limit: pushes only
            return
        if market == self.market:
            self._merge_trades(market, recent.get("trades") or [])

    def _merge_trades(self, market: str, rows: list[dict[str, Any]]) -> None:
        known = {t.get("trade_id") for t in self.trades}
        new = [{**row, "type": "trade", "market": market} for row in rows
               if isinstance(row, dict) and row.get("trade_id") not in known]
        if new:
            merged = sorted([*self.trades, *new], key=lambda t: t.get("trade_id") or 0)
            self.trades.clear()
            self.trades.extend(merged)

    async def _unwatch(self, market: str) -> None:
        for channel in ("book", "trades"):
            try:
                await patiently(lambda: self.client.unsubscribe(channel, market))
            except ExchangeConnectionError:
                raise
            except ExchangeError:
                pass

    # -- commands -------------------------------------------------------------------------

    async def execute(self, action: Action) -> None:
        """Carry out one parsed command."""
        if isinstance(action, Nothing):
            return
        if isinstance(action, Invalid):
            self.error(action.message)
        elif isinstance(action, Place):
            await self.place(action)
        elif isinstance(action, Cancel):
            try:
                await self.client.cancel(action.order_id)
            except ExchangeConnectionError:
                raise
            except ExchangeError as exc:
                self.error(f"cannot cancel order {action.order_id}: {exc.message}")
        elif isinstance(action, CancelAll):
            await self.cancel_all(action.market)
        elif isinstance(action, Modify):
            try:
                await self.client.modify(action.order_id, price=action.price, qty=action.qty)
            except ExchangeConnectionError:
                raise
            except ExchangeError as exc:
                self.error(f"cannot modify order {action.order_id}: {exc.message} ({exc.code})")
        elif isinstance(action, ShowOrders):
            await self.show_orders()
        elif isinstance(action, ShowStatus):
            await self.show_status(action.order_id)
        elif isinstance(action, ShowBalance):
            await self.show_balance()
        elif isinstance(action, ShowBook):
            await self.show_book(action.depth)
        elif isinstance(action, ShowTrades):
            self.show_trades(action.limit)
        elif isinstance(action, ShowFills):
            await self.show_fills(action.limit)
        elif isinstance(action, ShowMarkets):
            await self.show_markets()
        elif isinstance(action, SwitchMarket):
            await self.switch_market(action.symbol)
        elif isinstance(action, ShowHistory):
            self.show_history(action.limit)
        elif isinstance(action, Deposit):
            await self.deposit(action)
        elif isinstance(action, GuidedOrder):
            await self.guided_order()
        elif isinstance(action, Help):
            self.show_help(action.topic)

    async def place(self, action: Place) -> None:
        coid = f"{self._coid_prefix}-{next(self._coids)}"
        if action.post_only:
            self._post_only.add(coid)
        # The reports (new, fills, rejection) arrive on the event stream and are shown there.
        try:
            report = await self.client.place(
                self.market, action.side, action.qty, action.price, type=action.order_type,
                quote_qty=action.quote_qty,
                tif=action.tif, post_only=True if action.post_only else None,
                client_order_id=coid, raise_on_reject=False,
            )
            if report.get("reason") == "price_out_of_band":
                band = await self._band_now(self.market)
                if band:
                    self.say(("class:dim", f"the {self.market} band now allows {band}"))
        except ExchangeConnectionError as exc:
            if not self.client.connected:
                raise
            # Sent, but unanswered in time: the exchange may still carry it out (its report
            # will show up here), so "failed" would invite a duplicate.
            self.error(f"{exc.message}: the order (client id {coid}) may still be placed; "
                       "check 'orders' before sending it again")

    async def show_orders(self) -> None:
        orders = await self.client.orders()
        if not orders:
            self.say("no open orders.")
            return
        self._order_table(orders, "placed")

    def _order_table(self, orders: list[dict[str, Any]], when: str) -> None:
        rows = [[o.get("order_id"), o.get("market"), o.get("side"), o.get("order_type"),
                 str(o.get("tif")) + (" post" if o.get("post_only") else ""), o.get("price") or "market",
                 o.get("qty"), o.get("filled_qty"), o.get("remaining_qty"),
                 str(o.get("status", "")).upper(), clock(o.get("ts"))] for o in orders]
        self.say(table(["id", "market", "side", "type", "tif", "price", "qty", "filled", "remaining",
                        "status", when], rows, [_side_style(o.get("side")) for o in orders],
                       [True, False, False, False, False, True, True, True, True, False, False]))

    async def show_status(self, order_id: int) -> None:
        try:
            status = await self.client.order_status(order_id)
        except ExchangeConnectionError:
            raise
        except ExchangeError as exc:
            if exc.code == "unknown_order":
                self.error(f"order {order_id} is not one of yours at the exchange: not open, and "
                           "not among the finished orders it keeps ('history' shows this "
                           "computer's record)")
            else:
                self.error(f"cannot ask about order {order_id}: {exc.message}")
            return
        final = status.get("status") not in _STILL_OPEN
        self._order_table([status], "ended" if final else "placed")
        record = self.history.get(order_id)
        if final and record is not None and self.history.settle(record, status):
            self.say(("class:dim", f"order {order_id} recorded as {str(status.get('status')).upper()} "
                                   "in your history"))

    async def show_balance(self) -> None:
        balances = await self.client.balances()
        rows = [[asset, b.get("available"), b.get("locked")] for asset, b in balances.items()]
        self.say(table(["asset", "available", "locked"], rows, right=[False, True, True]))

    def open_records(self) -> list[dict[str, Any]]:
        """The history's open orders, less those the exchange no longer lists (they ended
        while this client was away): they are not ours to tag in the book or to offer."""
        if not self._stale:
            return self.history.open_orders()
        gone = {id(r) for r in self._stale}  # by record: an old record may share a new order's id
        return [r for r in self.history.open_orders() if id(r) not in gone]

    async def show_book(self, depth: int) -> None:
        book = await self.client.book(self.market, depth=depth)
        mine = {(r.get("side"), r.get("price")) for r in self.open_records()
                if r.get("market") == self.market}
        asks = list(reversed(book.get("asks", [])))  # worst ask on top, best just above the middle
        bids = book.get("bids", [])
        width = max([len(str(row[0])) for row in asks + bids] + [5])
        qwidth = max([len(str(row[1])) for row in asks + bids] + [3])
        out: Fragments = [("class:head", f"{self.market} order book (seq {book.get('seq')})"), ("", "\n")]
        out.append(("class:dim", f"      {'price'.rjust(width)}  {'qty'.rjust(qwidth)}  orders\n"))
        for price, qty, count in asks:
            tag = "  <- yours" if ("sell", price) in mine else ""
            out.append(("class:sell", f"  ask {price.rjust(width)}  {qty.rjust(qwidth)}  {str(count).rjust(6)}{tag}\n"))
        if not asks:
            out.append(("class:dim", "  (no asks)\n"))
        middle = []
        if asks and bids:
            middle.append(f"spread {Decimal(book['asks'][0][0]) - Decimal(bids[0][0])}")
        seen = [t for t in self.trades if t.get("market") == self.market]
        if seen:
            middle.append(f"last {seen[-1].get('price')}")
        elif book.get("reference_price"):  # the band's reference: a trade before we watched, or the configured one
            middle.append(f"ref {book['reference_price']}")
        out.append(("class:dim", f"  ----- {' · '.join(middle)} -----\n" if middle else "  -----\n"))
        for price, qty, count in bids:
            tag = "  <- yours" if ("buy", price) in mine else ""
            out.append(("class:buy", f"  bid {price.rjust(width)}  {qty.rjust(qwidth)}  {str(count).rjust(6)}{tag}\n"))
        if not bids:
            out.append(("class:dim", "  (no bids)\n"))
        if out[-1][1].endswith("\n"):
            out[-1] = (out[-1][0], out[-1][1][:-1])
        self.say(out)

    async def cancel_all(self, market: str | None) -> None:
        where = f" in {market}" if market else ""
        try:
            reply = await self.client.cancel_all(market)
        except ExchangeConnectionError:
            raise
        except ExchangeError as exc:
            self.error(f"cannot cancel your orders{where}: {exc.message}")
            return
        ids = reply.get("order_ids") or []
        if ids:
            self.say(f"canceled {len(ids)} order{'s' if len(ids) != 1 else ''}{where}: "
                     f"{', '.join(str(i) for i in ids)}")
        else:
            self.say(f"no open orders to cancel{where}.")

    def show_trades(self, limit: int) -> None:
        trades = [t for t in self.trades if t.get("market") == self.market][-limit:]
        if not trades:
            self.say(f"no recent trades in {self.market}.")
            return
        rows = [[clock(t.get("ts")), t.get("trade_id"), t.get("price"), t.get("qty"),
                 f"{t.get('taker_side')} (taker)"] for t in trades]
        self.say(("class:head", f"recent trades in {self.market} (oldest first)"), "\n",
                 table(["time", "trade", "price", "qty", "aggressor"], rows,
                       [_side_style(t.get("taker_side")) for t in trades],
                       [False, True, True, True, False]))

    async def show_fills(self, limit: int) -> None:
        reply = await self.client.fills(limit=limit)
        fills = reply.get("fills") or []
        whole_after = reply.get("complete_after") or 0
        if not fills:
            self.say(f"no fills of yours since trade {whole_after}: the exchange keeps none older "
                     "(its ledger, trades.jsonl, has them all)." if whole_after else
                     "no fills of yours at the exchange yet.")
            return
        rows = [[clock(f.get("ts")), f.get("market"), f.get("order_id"), f.get("side"), f.get("qty"),
                 f.get("price"), f.get("liquidity"), f"{f.get('fee')} {f.get('fee_asset')}"] for f in fills]
        self.say(("class:head", "your fills (oldest first)"), "\n",
                 table(["time", "market", "order", "side", "qty", "price", "as", "fee"], rows,
                       [_side_style(f.get("side")) for f in fills],
                       [False, False, True, False, True, True, False, True]))
        if whole_after and len(fills) < limit:
            self.say(("class:dim", f"the exchange keeps none of your fills before trade {whole_after + 1} "
                                   "(its ledger, trades.jsonl, has them all)"))

    async def _band_now(self, symbol: str) -> str | None:
        """The prices the market's band allows now, around its reference (the last trade, or
        the configured price before the first): what the exchange checks orders against."""
        spec = self.market_specs.get(symbol, {})
        band = spec.get("price_band")
        if not band:
            return None
        try:
            reference = (await self.client.book(symbol, depth=1)).get("reference_price")
        except ExchangeConnectionError:
            raise
        except ExchangeError:
            reference = None
        reference = reference or spec.get("reference_price")
        if not reference:
            return f"+-{_percent(Decimal(band))} of the first trade's price (no reference yet)"
        return band_range(Decimal(reference), Decimal(band), Decimal(spec["tick_size"]))

    async def show_markets(self) -> None:
        rows = []
        for sym, m in self.market_specs.items():
            band_text = await self._band_now(sym) or "-"
            rows.append(["*" if sym == self.market else "", sym, m.get("tick_size"), m.get("lot_size"),
                         m.get("min_qty"), band_text, f"{m.get('maker_fee_bps')}/{m.get('taker_fee_bps')} bps"])
        self.say(table(["", "market", "tick", "lot", "min qty", "price band", "fees maker/taker"], rows))

    async def switch_market(self, symbol: str | None) -> None:
        if symbol is None:
            self.say(f"current market: {self.market} (markets: {', '.join(self.markets)})")
            return
        if symbol not in self.market_specs:
            self.error(f"no market {_shown(symbol)!r}; markets are {', '.join(self.markets)}")
            return
        if symbol == self.market:
            self.say(f"already on {symbol}.")
            return
        await self._unwatch(self.market)
        self.market = symbol
        await self._watch(symbol)
        m = self.market_specs[symbol]
        self.say(f"now trading {symbol} (tick {m.get('tick_size')}, lot {m.get('lot_size')}).")
        self._invalidate()

    def show_history(self, limit: int) -> None:
        records = self.history.recent(limit)
        if not records:
            self.say(f"no orders in your history yet ({self.history.path}).")
            return
        rows = [[clock(r.get("created_ts")), r.get("order_id") if r.get("order_id") is not None else "-",
                 r.get("market"), r.get("side"), r.get("type"), r.get("price") or "market",
                 r.get("qty"), r.get("filled"), r.get("avg_price") or "-",
                 str(r.get("status")) + (f" ({r['reason']})" if r.get("reason") else "")]
                for r in records]
        self.say(("class:head", f"your last {len(records)} orders (of {len(self.history)})"), "\n",
                 table(["placed", "id", "market", "side", "type", "price", "qty", "filled", "avg", "status"],
                       rows, [_side_style(r.get("side")) for r in records],
                       [False, True, False, False, False, True, True, True, True, False]))

    async def deposit(self, action: Deposit) -> None:
        if action.asset not in self.assets:
            self.error(f"no asset {_shown(action.asset)!r}; assets are {', '.join(self.assets)}")
            return
        try:
            reply = await self.client.deposit(action.asset, action.amount)
        except ExchangeConnectionError:
            raise
        except ExchangeError as exc:
            self.error(f"deposit refused: {exc.message} ({exc.code})")
            return
        bal = reply.get("balances", {}).get(action.asset, {})
        self.say(f"deposited {action.amount} {action.asset}; available {action.asset} is now "
                 f"{bal.get('available', '?')}")

    def show_help(self, topic: str | None) -> None:
        if topic is not None:
            if topic not in COMMANDS:
                self.error(f"no command '{topic[:30]}'; type 'help' for the list")
                return
            use, desc = COMMANDS[topic]
            self.say(f"{use}\n    {desc}")
            return
        width = max(len(u) for u, _ in COMMANDS.values())
        lines = [f"  {u.ljust(width)}  {d}" for u, d in COMMANDS.values()]
        self.say(("class:head", "commands"), "\n" + "\n".join(lines) + "\n"
                 "  prices and quantities are plain decimals: buy 0.5 @ 101.25; "
                 "order ids come from the NEW notices and 'orders'.")

    # -- the guided order -------------------------------------------------------------------

    async def _ask(self, question: str, choices: Sequence[str] = (), default: str | None = None,
                   number: bool = False) -> str | None:
        """Ask until a valid answer; None when the user abandons (empty, 'cancel', Ctrl-C/D)."""
        assert self._ask_session is not None
        completer = WordCompleter(list(choices), ignore_case=True) if choices else None
        hint = f" [{default}]" if default else ""
        while True:
            try:
                answer = await self._ask_session.prompt_async(
                    FormattedText([("class:prompt", f"  {question}{hint}: ")]), completer=completer,
                )
            except (KeyboardInterrupt, EOFError):
                return None
            answer = answer.strip()
            low = answer.lower()
            if not answer:
                if default is None:
                    return None
                return default
            if low in _ABANDON:
                return None
            if choices:
                matches = [c for c in choices if c.startswith(low)]
                if len(matches) == 1:
                    return matches[0]
                self.error(f"answer one of: {', '.join(choices)} (or 'cancel')")
            elif number:
                if _positive(answer):
                    return answer
                self.error("give a positive number such as 2 or 101.25 (or 'cancel')")
            else:
                return answer

    async def guided_order(self) -> None:
        spec = self.market_specs[self.market]
        base, quote = spec.get("base"), spec.get("quote")
        self.say(("class:dim", f"new {self.market} order, step by step (Enter on an empty answer or "
                               "'cancel' stops)"))
        side = await self._ask("side (buy/sell)", ["buy", "sell"])
        if side is None:
            self.say("order abandoned.")
            return
        order_type = await self._ask("type (limit/market)", ["limit", "market"], default="limit")
        if order_type is None:
            self.say("order abandoned.")
            return
        price: str | None = None
        if order_type == "limit":
            price = await self._ask(f"price ({quote} per {base}, tick {spec.get('tick_size')})", number=True)
            if price is None:
                self.say("order abandoned.")
                return
        qty = await self._ask(f"quantity ({base}, lot {spec.get('lot_size')})", number=True)
        if qty is None:
            self.say("order abandoned.")
            return
        option = ""
        if order_type == "limit":
            tif = await self._ask("time in force (gtc/ioc/fok/post)", ["gtc", "ioc", "fok", "post"], default="gtc")
            if tif is None:
                self.say("order abandoned.")
                return
            option = "" if tif == "gtc" else f" {tif}"
        text = f"{side} {qty} @ {price}{option}" if price is not None else f"{side} {qty} market"
        action = parse_command(text)
        if not isinstance(action, Place):  # pragma: no cover - the answers were validated
            self.error(action.message if isinstance(action, Invalid) else "cannot build the order")
            return
        confirm = await self._ask(f"send '{place_text(action)}' on {self.market}? (yes/no)", ["yes", "no"], default="yes")
        if confirm != "yes":
            self.say("order abandoned.")
            return
        await self.place(action)


# ============================================================================ entry point


@dataclass
class ClientOptions:
    user: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    market: str = "BTC-USD"
    data_dir: Path = Path("data")
    token: str | None = None
    timeout: float = 10.0


def _order_choices(records: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    """Completions of an order id: each id with what the order is."""
    return [(str(r["order_id"]), f"{r.get('side')} {r.get('qty')} {r.get('market')} @ {r.get('price')}")
            for r in records if r.get("order_id") is not None]


def _order_name(record: dict[str, Any]) -> str:
    """Its order id, or what it was for an order never acknowledged (no id)."""
    oid = record.get("order_id")
    if oid is not None:
        return str(oid)
    return f"({record.get('side')} {record.get('qty')} {record.get('market')} @ {record.get('price')}, never acknowledged)"


def _first_ten(records: list[dict[str, Any]], name: Callable[[dict[str, Any]], str]) -> str:
    """``a, b, c`` for a few orders; the first ten and how many in all for more."""
    listed = ", ".join(name(r) for r in records[:10])
    return listed + (f"... ({len(records)} in all)" if len(records) > 10 else "")


def _how_it_ended(record: dict[str, Any]) -> str:
    """``filled``, ``canceled``, or ``canceled (0.3000 of 1.0000 filled)``."""
    status = str(record.get("status")).lower()
    filled = record.get("filled")
    if status != "filled" and isinstance(filled, str) and filled.strip("0.") != "":
        return f"{status} ({filled} of {record.get('qty')} filled)"
    return status


_STILL_OPEN = ("new", "partially_filled")  # an order's status on the wire while it rests
STATUS_QUERIES = 200  # orders that ended while away asked about at start-up, at most
RATE_LIMIT_PAUSE = 1.0  # seconds: a token bucket refills at its rate per second


async def _ask_how_they_ended(
    client: ExchangeClient, history: SessionManager, gone: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Of the orders the history calls open but the exchange no longer lists, record how
    those it still remembers ended (``order_status``), and mark as ``GONE`` those it does
    not remember or whose answer does not match the record; returns (not asked, settled,
    gone). An order the answer says is open is left as it is.

    The history is saved once at the end, not per order. Against a rate limit the questions
    stop at the first refusal, and the client waits for the allowance to come back, so that
    its subscriptions right after are not refused too; the rest are asked at the next start."""
    unknown: list[dict[str, Any]] = []
    settled: list[dict[str, Any]] = []
    unanswered: list[dict[str, Any]] = []
    rest = gone[STATUS_QUERIES:]
    autosave, history.autosave = history.autosave, False
    try:
        for i, record in enumerate(gone[:STATUS_QUERIES]):
            oid = record.get("order_id")
            if type(oid) is not int:  # never acknowledged: nothing to ask about
                unanswered.append(record)
                continue
            try:
                reply = await client.order_status(oid)
            except ExchangeConnectionError:
                raise
            except ExchangeError as exc:
                if exc.code == "rate_limited":
                    rest = gone[i:]
                    await asyncio.sleep(RATE_LIMIT_PAUSE)
                    break
                if exc.code == "unknown_op":  # an exchange without the query: ask nothing
                    rest = gone[i:]
                    break
                if exc.code != "unknown_order":  # no answer about it: ask again next time
                    unanswered.append(record)
                    continue
                reply = None
            if reply is not None and reply.get("status") in _STILL_OPEN:
                continue  # open after all (placed from another terminal just now): left as it is
            if reply is not None and history.settle(record, reply):
                settled.append(record)
            else:  # forgotten by the exchange, or its answer does not match this record
                unknown.append(record)
        history.mark_gone(unknown)
    finally:
        history.autosave = autosave
    if (settled or unknown) and autosave:
        history.save()
    return unanswered + rest, settled, unknown


async def _record_missed_fills(client: ExchangeClient, history: SessionManager) -> list[dict[str, Any]]:
    """Add to the history the fills its orders had while this client was away (the
    exchange's last 1,000 of this user); returns the records that gained one. An exchange
    without ``fills``, or one refusing it for the rate limit, adds nothing."""
    try:
        fills = (await client.fills(limit=FILLS_PER_USER)).get("fills") or []
    except ExchangeConnectionError:
        raise
    except ExchangeError as exc:
        if exc.code == "rate_limited":
            await asyncio.sleep(RATE_LIMIT_PAUSE)
        return []
    return history.add_fills(fills)


def _fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def run_client(options: ClientOptions, input: Input | None = None, output: Output | None = None,
                     refresh_interval: float = 0.5) -> int:
    """Connect, log in, load the history and run the terminal UI; returns the exit code."""
    where = f"{options.host}:{options.port}"
    client = ExchangeClient(options.host, options.port, timeout=options.timeout)
    try:
        await client.connect()
    except ExchangeConnectionError as exc:
        if exc.message.startswith("cannot find"):
            _fail(exc.message)
        else:
            _fail(f"cannot connect to the exchange at {where}; is it running? (start it with `make run`)")
        return EXIT_CONNECTION
    try:
        try:
            # Against a --rate-limit the start-up's queries wait for the allowance.
            reply = await patiently(lambda: client.login(options.user, options.token))
            markets = await patiently(client.markets)
            symbols = [m["symbol"] for m in markets]
            if options.market not in symbols:
                _fail(f"the exchange at {where} has no market {options.market!r}; "
                      f"markets: {', '.join(symbols)}")
                return EXIT_USAGE
            try:
                history = SessionManager(options.user, options.data_dir)
            except SessionError as exc:
                _fail(f"cannot use the order history: {exc}")
                return EXIT_CONNECTION
            stale, settled, gone = await _ask_how_they_ended(
                client, history, history.sync_open_orders(await patiently(client.orders)))
            traded = await _record_missed_fills(client, history)
            # Settled as (partly) filled, and still without a fill: the exchange no longer has them.
            unlisted = [r for r in settled if _positive(str(r.get("filled") or "")) and not r.get("fills")]
        except ExchangeConnectionError as exc:
            _fail(f"lost the connection to the exchange at {where} while starting: {exc.message}")
            return EXIT_CONNECTION
        except ExchangeError as exc:
            if client.user is not None:  # logged in: a later start-up query was refused
                _fail(f"the exchange at {where} refused a start-up query: {exc.message}")
                return EXIT_CONNECTION
            hint = ""
            if exc.code == "auth_failed":
                hint = ("; this exchange wants a known user and its token: --token TOKEN" if options.token is None
                        else "; check the user name and --token")
            _fail(f"the exchange at {where} refused the login as {options.user!r}: {exc.message}{hint}")
            return EXIT_CONNECTION
        except OSError as exc:
            _fail(f"cannot write the order history under {options.data_dir}: {exc.strerror or exc}")
            return EXIT_CONNECTION
        app = TerminalApp(
            client, options.user, options.market, markets, history, options.data_dir,
            input=input, output=output, funded=bool(reply.get("funded")), stale=stale, settled=settled, gone=gone,
            traded=traded, unlisted=unlisted, refresh_interval=refresh_interval,
        )
        return await app.run()
    finally:
        await client.close()


def build_parser() -> argparse.ArgumentParser:
    ap = CommandLine(
        prog="start_client.py",
        description="Trade on the exchange from a terminal. Type 'help' once connected.",
    )
    ap.add_argument("--user", required=True, help="your user name (open mode: any name, funded on first login)")
    ap.add_argument("--host", default="127.0.0.1", help="exchange address (default 127.0.0.1)")
    ap.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"exchange port (default {DEFAULT_PORT})")
    ap.add_argument("--market", default="BTC-USD", help="market to start on (default BTC-USD)")
    ap.add_argument("--data-dir", type=Path, default=Path("data"),
                    help="where the order and command histories go (default ./data)")
    ap.add_argument("--token", default=None, help="login token (exchanges run with --auth keys)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The UI reports problems itself; keep library log lines from garbling the prompt.
    logging.basicConfig(level=logging.CRITICAL)
    options = ClientOptions(
        user=args.user, host=args.host, port=args.port, market=args.market.upper(),
        data_dir=args.data_dir, token=args.token,
    )
    try:
        return asyncio.run(run_client(options))
    except KeyboardInterrupt:
        _fail("interrupted.")
        return 130
