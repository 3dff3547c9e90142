"""The user's own order history: ``<data-dir>/sessions/orders_<user>.json``.

Theory of operation
-------------------
The exchange is the truth; this file is a diary of what it told us. Every execution report
the client receives (the ``exec`` dicts of ``ExchangeClient.events()``) goes to ``apply``,
which creates the order's record on its first report (normally ``new``, status NEW) and
afterwards copies the cumulative state each report carries (filled, remaining, average
price, status). Nothing here computes a fill or guesses a status: a report carries the
order's whole state after the change, so the record is simply the last word the exchange
said, plus the list of fills it reported.

Statuses are stored in upper case (NEW, PARTIALLY_FILLED, FILLED, CANCELED, EXPIRED,
REJECTED). Two rules keep a late or repeated report from rewriting history: a report
older than the record's last one is ignored, and a final status (FILLED, CANCELED,
EXPIRED, REJECTED) is never replaced by an open one. A fill is recorded once per
``trade_id``.

The file is rewritten atomically after each change (a temporary file in the same
directory, flush, fsync, ``os.replace``, then fsync of the directory), so a crash leaves
either the old file or the new one, never half of one. Two clients of one user (two
terminals) share the file: each save takes a lock (``flock`` on a file beside it), reads
what the other wrote, keeps records it does not know (a rejection is reported only to the
terminal that sent the order) and, for a record both know, the later word, then writes. A file that cannot be read as
history is renamed aside (``orders_<user>.json.corrupt-<time>``) with a warning and a
fresh history is started; it is never deleted.

File layout::

    {"version": 1, "user": "alice", "orders": [{order_id, client_order_id, market, side,
     type, tif, price, qty, filled, remaining, avg_price, status, last_exec_type,
     created_ts, updated_ts, created_at, updated_at, fills: [...], reason?, message?}, ...]}

Quantities and prices are the exchange's decimal strings; ``*_ts`` are the exchange's
integer nanosecond timestamps and ``*_at`` the same instants in ISO 8601 (UTC) for people.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from contextlib import contextmanager
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import orjson

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: saves are then not coordinated
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("client.session")

FORMAT_VERSION = 1

# Wire status -> stored status.
STATUSES = {
    "new": "NEW",
    "partially_filled": "PARTIALLY_FILLED",
    "filled": "FILLED",
    "canceled": "CANCELED",
    "expired": "EXPIRED",
    "rejected": "REJECTED",
}
# GONE: no longer at the exchange, and how it ended could not be told for sure (the exchange
# keeps each account's last 1,000 finished orders, 100,000 in all; its audit log has the
# story of older ones). Final, but any
# word of the exchange about the order (a report, a listing, ``settle``) replaces it.
GONE = "GONE"
FINAL = frozenset({"FILLED", "CANCELED", "EXPIRED", "REJECTED", GONE})
SETTLED = FINAL - {GONE}  # the final states the exchange itself reported
_GONE_MESSAGE = ("no longer at the exchange, and how it ended could not be told for sure; "
                 "'status' asks again, the exchange's audit log has it")
OPEN = frozenset({"NEW", "PARTIALLY_FILLED"})


class SessionError(Exception):
    """The history file cannot be used at all (unsafe user name, unwritable directory)."""


def history_path(data_dir: str | os.PathLike[str], user: str) -> Path:
    """Where ``user``'s history lives under ``data_dir``."""
    if not user or any(c in user for c in "/\\\x00") or user in (".", ".."):
        raise SessionError(f"user name {user!r} cannot be used in a file name")
    return Path(data_dir) / "sessions" / f"orders_{user}.json"


def _created(record: dict[str, Any]) -> int:
    ts = record.get("created_ts")
    return ts if type(ts) is int else 0


def _identity(record: dict[str, Any]) -> tuple[Any, ...]:
    """Which order a record is about, across the clients that share the file: the exchange
    id with the client's id (unique per client run), or with the creation time where there
    is no client id, since ids are reused after an exchange restart without its snapshot.
    A rejected order has no exchange id and never matches an accepted one."""
    coid = record.get("client_order_id")
    if coid is not None:
        return (record.get("order_id"), coid)
    return (record.get("order_id"), None, record.get("created_ts"))


def _created_ts(record: dict[str, Any]) -> int:
    """Sort key: when the order was created (0 for a record that does not say, or says nonsense)."""
    ts = record.get("created_ts")
    return ts if type(ts) is int else 0


def _later(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether record ``a`` holds a later word of the exchange than ``b`` (a final status
    is never replaced by an open one; GONE, the client's own guess, gives way to any real
    end, and against an open record the later of the two wins)."""
    sa, sb = a.get("status"), b.get("status")
    ta, tb = a.get("updated_ts"), b.get("updated_ts")
    if sa == GONE or sb == GONE:
        if sb in SETTLED:
            return False  # another terminal knows how it ended
        if sa in SETTLED:
            return True
        # GONE against an open record: marking and undoing it stamp the time.
        return type(ta) is int and type(tb) is int and ta > tb
    if sb in FINAL and sa not in FINAL:
        return False
    if sa in FINAL and sb not in FINAL:
        return True
    return type(ta) is int and type(tb) is int and ta > tb


def _stamp_now(record: dict[str, Any]) -> None:
    """A change of the client's own (GONE, or undoing it): stamped with this machine's clock,
    which on a laptop exchange is the exchange's clock too."""
    old = record.get("updated_ts")
    now = max(time.time_ns(), old if type(old) is int else 0)
    record["updated_ts"] = now
    record["updated_at"] = _iso(now)


def _iso(ts: Any) -> str | None:
    if type(ts) is not int:
        return None
    return datetime.fromtimestamp(ts / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds")


def _fill_entry(source: dict[str, Any], price: str, qty: str) -> dict[str, Any]:
    """A fill as the history keeps it, from a ``trade`` report (its ``last_price`` and
    ``last_qty``) or a row of ``fills`` (``price``, ``qty``)."""
    return {
        "trade_id": source.get("trade_id"), "price": source.get(price), "qty": source.get(qty),
        "liquidity": source.get("liquidity"), "fee": source.get("fee"),
        "fee_asset": source.get("fee_asset"), "ts": source.get("ts"),
    }


class SessionManager:
    """One user's order history, loaded on construction and saved after every change.

    ``warnings`` lists what went wrong while loading (a corrupt file set aside), for the
    UI to show; the same text is logged.
    """

    def __init__(self, user: str, data_dir: str | os.PathLike[str] = "data", autosave: bool = True) -> None:
        self.user = user
        self.path = history_path(data_dir, user)
        self.autosave = autosave
        self.warnings: list[str] = []
        self.orders: list[dict[str, Any]] = []
        self._by_id: dict[int, dict[str, Any]] = {}
        self._by_coid: dict[str, dict[str, Any]] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionError(f"cannot create {self.path.parent}: {exc.strerror or exc}") from None
        self._remove_stale_temp_files()
        self.load()

    # -- loading and saving -------------------------------------------------------------

    def load(self) -> None:
        """Read the file (creating it if missing); set a corrupt one aside."""
        self.orders, self._by_id, self._by_coid = [], {}, {}
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self.save()
            return
        except OSError as exc:
            raise SessionError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            orders = self._parse(raw)
        except ValueError as exc:
            self._set_aside(str(exc))
            self.save()
            return
        for record in orders:
            self._index(record)
            self.orders.append(record)

    def _parse(self, raw: bytes) -> list[dict[str, Any]]:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("orders"), list):
            raise ValueError("not an order history (no 'orders' list)")
        orders = data["orders"]
        if not all(isinstance(r, dict) for r in orders):
            raise ValueError("an entry of 'orders' is not an object")
        return orders

    def _set_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.replace(self.path, target)
        except OSError as exc:
            raise SessionError(f"{self.path} is unreadable ({why}) and cannot be moved aside: "
                               f"{exc.strerror or exc}") from None
        message = f"order history {self.path} was unreadable ({why}); kept it as {target.name} and started a new one"
        log.warning("%s", message)
        self.warnings.append(message)

    def _remove_stale_temp_files(self) -> None:
        # A temporary file left behind is a write that never reached os.replace: the
        # real file still holds the previous complete version, so the leftover is junk.
        for leftover in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"):
            try:
                leftover.unlink()
            except OSError:
                pass

    def save(self) -> None:
        """Write the whole history atomically: temp file, flush, fsync, rename, fsync dir;
        under the lock, after taking in what another client of the user saved meanwhile."""
        with self._locked():
            self._merge_saved()
            self._write()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        try:
            fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # a read-only directory fails in the write below, with its reason
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _merge_saved(self) -> None:
        """Take in the records another client of this user saved since we last looked."""
        try:
            saved = self._parse(self.path.read_bytes())
        except (OSError, ValueError):
            return  # missing or unreadable: ours is written over it, as at load
        ours_by_key = {_identity(r): r for r in self.orders}
        for theirs in saved:
            ours = ours_by_key.get(_identity(theirs))
            if ours is None:
                self.orders.append(theirs)
                ours_by_key[_identity(theirs)] = theirs
                self._index_if_newer(theirs)
            elif ours is not theirs and _later(theirs, ours):
                ours.clear()
                ours.update(theirs)
        self.orders.sort(key=_created_ts)

    def _index_if_newer(self, record: dict[str, Any]) -> None:
        """Index a record taken from the file unless we index a later order under its id
        (ids are reused after an exchange restart without its snapshot)."""
        for key, index in ((record.get("order_id"), self._by_id), (record.get("client_order_id"), self._by_coid)):
            if key is None:
                continue
            known = index.get(key)
            if known is None or _created(known) < _created(record):
                index[key] = record

    def _write(self) -> None:
        data = orjson.dumps(
            {"version": FORMAT_VERSION, "user": self.user, "orders": self.orders},
            option=orjson.OPT_INDENT_2,
        ) + b"\n"
        directory = self.path.parent
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    # -- recording reports ----------------------------------------------------------------

    def apply(self, report: dict[str, Any]) -> dict[str, Any] | None:
        """Record one execution report; returns the order's record, or None if ignored.

        Anything that is not an ``exec`` report with a known status is ignored, as is a
        report older than the last one recorded for the order or one that would reopen a
        finished order.
        """
        if report.get("type", "exec") != "exec":
            return None
        status = STATUSES.get(report.get("status"))  # type: ignore[arg-type]
        if status is None:
            return None
        record = self._find(report)
        ts = report.get("ts")
        if record is None:
            record = self._new_record(report, status)
            self.orders.append(record)
        else:
            last = record.get("updated_ts")
            if type(ts) is int and type(last) is int and ts < last and record.get("status") != GONE:
                return None  # (GONE's time is the client's: any report of the exchange beats it)
            if record.get("status") in SETTLED and status not in FINAL:
                return None
            if report.get("exec_type") == "trade" and self._has_fill(record, report.get("trade_id")):
                return None
            revived = record.get("status") == GONE
            self._update(record, report, status)
            if revived and status not in FINAL:
                _stamp_now(record)  # later than the GONE it replaces, for the merge
        self._index(record)
        if self.autosave:
            self.save()
        return record

    def _find(self, report: dict[str, Any]) -> dict[str, Any] | None:
        oid = report.get("order_id")
        coid = report.get("client_order_id")
        if oid is not None:
            record = self._by_id.get(oid)
            if record is not None and not self._reused_id(record, report):
                return record
        if coid is not None:
            record = self._by_coid.get(coid)
            # The same client id on an order the exchange numbered differently is
            # another order (client ids are the client's, and may repeat), and so is a
            # report without a number (a rejection) for a record that has one: an order
            # refused for reusing an open order's client id is not that order.
            if record is not None and record.get("order_id") in (None, oid):
                return record
        return None

    @staticmethod
    def _reused_id(record: dict[str, Any], report: dict[str, Any]) -> bool:
        """Whether a report names a recorded order id but is about another order.

        An exchange restarted without its snapshot numbers orders from 1 again, so an id
        alone does not identify an order across runs: a ``new`` report starts an order (a
        different arrival time means a different order), and two different client order
        ids are two different orders.
        """
        coid, known = report.get("client_order_id"), record.get("client_order_id")
        if coid is not None and known is not None and coid != known:
            return True
        ts, created = report.get("ts"), record.get("created_ts")
        return (report.get("exec_type") == "new" and type(ts) is int and type(created) is int
                and ts != created)

    def _new_record(self, report: dict[str, Any], status: str) -> dict[str, Any]:
        ts = report.get("ts")
        record: dict[str, Any] = {
            "order_id": report.get("order_id"),
            "client_order_id": report.get("client_order_id"),
            "market": report.get("market"),
            "side": report.get("side"),
            "type": report.get("order_type"),
            "tif": report.get("tif"),
            "price": report.get("price"),
            "qty": report.get("qty"),
            "filled": report.get("filled_qty"),
            "remaining": report.get("remaining_qty"),
            "avg_price": report.get("avg_price"),
            "status": status,
            "last_exec_type": report.get("exec_type"),
            "created_ts": ts,
            "updated_ts": ts,
            "created_at": _iso(ts),
            "updated_at": _iso(ts),
            "fills": [],
        }
        self._note_extras(record, report)
        return record

    def _update(self, record: dict[str, Any], report: dict[str, Any], status: str) -> None:
        if record.get("order_id") is None and report.get("order_id") is not None:
            record["order_id"] = report["order_id"]
        if record.get("status") == GONE and record.get("message") == _GONE_MESSAGE:
            del record["message"]  # the exchange has spoken of it again
        for key, field in (("price", "price"), ("qty", "qty"), ("filled", "filled_qty"),
                           ("remaining", "remaining_qty"), ("avg_price", "avg_price"),
                           ("tif", "tif"), ("type", "order_type")):
            if field in report and (report[field] is not None or key in ("price", "avg_price")):
                record[key] = report[field]
        record["status"] = status
        record["last_exec_type"] = report.get("exec_type")
        ts = report.get("ts")
        if type(ts) is int:
            record["updated_ts"] = ts
            record["updated_at"] = _iso(ts)
        self._note_extras(record, report)

    @staticmethod
    def _note_extras(record: dict[str, Any], report: dict[str, Any]) -> None:
        if report.get("exec_type") == "trade" and report.get("trade_id") is not None:
            record.setdefault("fills", []).append(_fill_entry(report, "last_price", "last_qty"))
        if report.get("reason") is not None:
            record["reason"] = report.get("reason")
            record["message"] = report.get("message")

    @staticmethod
    def _has_fill(record: dict[str, Any], trade_id: Any) -> bool:
        return trade_id is not None and any(f.get("trade_id") == trade_id for f in record.get("fills", ()))

    def _index(self, record: dict[str, Any]) -> None:
        oid = record.get("order_id")
        if type(oid) is int:
            self._by_id[oid] = record
        coid = record.get("client_order_id")
        if isinstance(coid, str):
            self._by_coid[coid] = record

    # -- reconciliation with the exchange's open orders ---------------------------------

    def sync_open_orders(self, open_orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Take in the exchange's list of this user's open orders (the ``orders`` op).

        Open orders missing from the history (placed elsewhere, or before the file
        existed) are added and known ones refreshed, from what the exchange says. Returns
        the records the history still calls open but the exchange no longer lists: their
        end was never reported to this client, so their status is left alone for the
        caller to mention rather than guessed.
        """
        listed: set[int] = set()  # the records (by identity) of the orders listed
        changed = False
        for order in open_orders:
            oid = order.get("order_id")
            if type(oid) is not int:
                continue
            status = STATUSES.get(order.get("status"))  # type: ignore[arg-type]
            if status is None:
                continue
            record = self._by_id.get(oid)
            if record is not None and self._reused_id(record, {**order, "exec_type": "new"}):
                record = None  # an id reused by a restarted exchange: another order
            if record is None:
                record = self._new_record({**order, "exec_type": None}, status)
                self.orders.append(record)
                self._index(record)
                changed = True
            elif record.get("status") not in SETTLED and (
                record.get("filled") != order.get("filled_qty") or record.get("status") != status
                or record.get("price") != order.get("price") or record.get("qty") != order.get("qty")
            ):
                # The list's ts is the order's arrival, not the time of this change: keep
                # the record's own times and last report type.
                kept = {k: record.get(k) for k in ("updated_ts", "updated_at", "last_exec_type")}
                revived = record.get("status") == GONE
                self._update(record, {**order, "ts": None}, status)
                record.update(kept)
                if revived:
                    _stamp_now(record)  # later than the GONE it replaces, for the merge
                changed = True
            listed.add(id(record))
        if changed and self.autosave:
            self.save()
        # By record, not by order id: after an exchange restart without its snapshot, an old
        # record can carry the id of a new order the exchange lists.
        return [r for r in self.orders if r.get("status") in OPEN and id(r) not in listed]

    def settle(self, record: dict[str, Any], status: dict[str, Any]) -> bool:
        """Record how an order that ended while this client was away ended, from the
        exchange's ``order_status`` reply; False (nothing changed) unless the reply is that
        order's final state: same order id, market, side and client order id, not older.

        An exchange restarted without its snapshot numbers orders from 1 again, and a
        finished order's reply does not say when it arrived, so an order id alone could
        name another order: the client order id must match (the terminal client gives every
        order one unique to its run), or, for an order without one, the price and size."""
        final = STATUSES.get(status.get("status"))  # type: ignore[arg-type]
        if final not in SETTLED or record.get("status") in SETTLED:
            return False
        if (status.get("order_id"), status.get("market"), status.get("side")) != (
                record.get("order_id"), record.get("market"), record.get("side")):
            return False
        coid = record.get("client_order_id")
        if status.get("client_order_id") != coid:
            return False
        if coid is None and (status.get("price"), status.get("qty")) != (record.get("price"), record.get("qty")):
            return False  # no client id: at least the same price and size
        ts, created = status.get("ts"), record.get("created_ts")
        if type(ts) is int and type(created) is int and ts < created:
            return False
        self._update(record, {**status, "exec_type": None}, final)
        if self.autosave:
            self.save()
        return True

    def add_fills(self, fills: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record the fills of the exchange's ``fills`` reply that the history lacks (those
        of orders that traded while this client was away); returns the records that gained
        one. A fill goes to the record of its order id only if the record is that order:
        same market and side, not older than the fill, and the same client order id when the
        fill has one (an exchange restarted without its snapshot hands out ids again)."""
        changed: list[dict[str, Any]] = []
        for fill in fills:
            record = self._by_id.get(fill.get("order_id"))  # type: ignore[arg-type]
            if record is None or self._has_fill(record, fill.get("trade_id")):
                continue
            if (fill.get("market"), fill.get("side")) != (record.get("market"), record.get("side")):
                continue
            coid = fill.get("client_order_id")
            if coid is not None and coid != record.get("client_order_id"):
                continue
            ts, created = fill.get("ts"), record.get("created_ts")
            if type(ts) is not int or type(created) is not int or ts < created:
                continue
            record.setdefault("fills", []).append(_fill_entry(fill, "price", "qty"))
            record["fills"].sort(key=lambda f: f.get("trade_id") or 0)
            if not any(r is record for r in changed):
                changed.append(record)
        if changed and self.autosave:
            self.save()
        return changed

    def mark_gone(self, records: list[dict[str, Any]]) -> None:
        """These orders are no longer at the exchange, which cannot say how they ended:
        final as ``GONE``, so that they stop counting as open (their times are kept: a
        terminal that saw how they ended still wins when the files are merged)."""
        changed = False
        for record in records:
            if record.get("status") in OPEN:
                record["status"] = GONE
                record["message"] = _GONE_MESSAGE
                _stamp_now(record)
                changed = True
        if changed and self.autosave:
            self.save()

    # -- queries --------------------------------------------------------------------------

    def get(self, order_id: int) -> dict[str, Any] | None:
        return self._by_id.get(order_id)

    def open_orders(self) -> list[dict[str, Any]]:
        return [r for r in self.orders if r.get("status") in OPEN]

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The last ``limit`` orders, oldest first."""
        return list(self.orders if limit is None else self.orders[-limit:])

    def __len__(self) -> int:
        return len(self.orders)
