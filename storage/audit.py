"""Per-user audit trail: ``<data>/logs/<user>.log``, one readable line per order event.

The gateway hands over whole event lists (a list append, nothing more, on the hot path);
a background task formats them and appends them to the files from a worker thread, so the
event loop never waits on disk and no line is written per order on the engine's path.
Lines are appended only; a file is never rewritten.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from exchange.markets import MarketConfig
from exchange.types import CommandRejected, Event, ExecReport, ExecType

log = logging.getLogger("storage.audit")


def _stamp(ts: int) -> str:
    dt = datetime.fromtimestamp(ts / 1e9, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{(ts // 1000) % 1_000_000:06d}Z"


class AuditLog:
    """Buffers events in memory and appends their lines to per-user files in the background."""

    def __init__(self, directory: str | Path, config: MarketConfig, interval: float = 0.2) -> None:
        self.directory = Path(directory)
        self.config = config
        self.interval = interval
        self._pending: list[list[Event]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False

    # -- hot path ---------------------------------------------------------------------

    def __call__(self, events: list[Event]) -> None:
        """Gateway listener: remember the batch; formatting happens later, elsewhere."""
        self._pending.append(events)

    # -- background -------------------------------------------------------------------

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch:
                lines = self.format(batch)
                try:
                    await loop.run_in_executor(None, self._append, lines)
                except OSError:
                    log.exception("cannot write the audit log in %s", self.directory)
            if self._closing and not self._pending:
                return

    async def close(self) -> None:
        """Write everything still buffered, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        elif self._pending:
            batch, self._pending = self._pending, []
            self._append(self.format(batch))

    def format(self, batch: list[list[Event]]) -> dict[str, list[str]]:
        by_user: dict[str, list[str]] = {}
        for events in batch:
            for ev in events:
                line = self.line(ev)
                if line is not None:
                    by_user.setdefault(ev.account, []).append(line)  # type: ignore[attr-defined]
        return by_user

    def line(self, ev: Event) -> str | None:
        if isinstance(ev, ExecReport):
            market = self.config.markets.get(ev.market)
            if market is None:
                return f"{_stamp(ev.ts)} REJECTED order on unknown market {ev.market}: {ev.reason}"
            price = "market" if ev.price is None else market.format_price(ev.price)
            what = (f"{ev.side.upper()} {market.format_qty(ev.qty)} {ev.market} @ {price} "
                    f"{ev.order_type} {ev.tif}")
            oid = f"order {ev.order_id}" if ev.order_id is not None else "order"
            et = ev.exec_type
            if et is ExecType.TRADE:
                assert ev.last_price is not None and ev.last_qty is not None and ev.fee is not None
                return (f"{_stamp(ev.ts)} FILL {oid} {ev.side} {market.format_qty(ev.last_qty)} "
                        f"@ {market.format_price(ev.last_price)} ({ev.liquidity}, fee "
                        f"{market.quote.format(ev.fee)} {market.quote.name}, trade {ev.trade_id}); "
                        f"filled {market.format_qty(ev.filled)}/{market.format_qty(ev.qty)}, {ev.status}")
            if et is ExecType.REJECTED:
                return f"{_stamp(ev.ts)} REJECTED {what}: {ev.reason}"
            label = {
                ExecType.NEW: "PLACED", ExecType.CANCELED: "CANCELED", ExecType.EXPIRED: "EXPIRED",
                ExecType.REPLACED: "MODIFIED", ExecType.SELF_TRADE_PREVENTED: "SELF-TRADE-PREVENTED",
            }[et]
            return (f"{_stamp(ev.ts)} {label} {oid} {what}; filled "
                    f"{market.format_qty(ev.filled)}, remaining {market.format_qty(ev.remaining)}, {ev.status}")
        if isinstance(ev, CommandRejected):
            target = f" order {ev.order_id}" if ev.order_id is not None else ""
            return f"{_stamp(ev.ts)} REJECTED {ev.command}{target}: {ev.reason}"
        return None

    def _append(self, lines: dict[str, list[str]]) -> None:
        for user, user_lines in lines.items():
            if not safe_user_file(user):
                continue
            path = self.directory / f"{user}.log"
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(user_lines) + "\n")


def safe_user_file(user: str) -> bool:
    """Users are validated by the protocol; this is the last check before a file name."""
    return bool(user) and os.sep not in user and user not in (".", "..") and "/" not in user
