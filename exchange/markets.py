"""Markets and assets, and the one place where decimal strings become integers and back.

Theory of operation
-------------------
Inside the engine a price is a whole number of ticks, a quantity a whole number of lots and
an amount a whole number of the asset's minor units. Conversion is exact: a decimal string
is split into an integer and a power of ten, then divided by the unit with ``divmod``; a
remainder means the value is off the grid and is rejected, never rounded. Floats never
take part: the gateway hands over a JSON number's digits as written (see
``exchange/protocol.decode_request``), and a float from a Python caller is read through
its shortest repr.

A market is valid only if every value it can produce is exact in minor units:
``lot`` must be a whole number of base minor units and ``tick x lot`` a whole number of quote
minor units, so ``notional = price_ticks * qty_lots * quote_per_tick_lot`` is exact.

Fees are charged in the quote asset on the order's cumulative fee basis (sum of
notional x bps over its fills) and rounded up once on that cumulative figure; each fill
pays the cumulative fee after it minus the cumulative fee before it. Many small fills
therefore never cost more than one fill of the same size, and a buy never pays more fee
than it reserved (see ``exchange/accounts.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

from exchange.types import RejectReason

# No price, quantity or amount may exceed this many whole units: far beyond anything real,
# small enough that products of them stay cheap integers.
MAX_WHOLE_UNITS: Final = 10**12
MAX_TEXT_LENGTH: Final = 40
BPS: Final = 10_000
_POW10: Final = [10**i for i in range(64)]  # powers of ten as ints (``10**n`` is typed as Any)
MAX_FEE_BPS: Final = 1_000
CONVERSION_CACHE_LIMIT: Final = 50_000


class InvalidValue(ValueError):
    """A value that cannot be taken exactly; carries the reject reason the caller reports."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ConfigError(ValueError):
    """A markets file or market definition that cannot be used."""


def split_decimal(value: Any) -> tuple[int, int]:
    """Return ``(digits, scale)`` with ``value == digits / 10**scale``, exactly.

    Accepts a plain decimal string (``"101.25"``, no sign, no exponent), an int, or a float
    (read through its repr). Raises ``ValueError`` for anything else, NaN, infinity, a
    negative value or an absurd size.
    """
    if isinstance(value, str):
        if not value or len(value) > MAX_TEXT_LENGTH:
            raise ValueError("not a decimal number")
        whole, dot, frac = value.partition(".")
        if not whole and not frac:
            raise ValueError("not a plain decimal number")
        if not whole:  # ".5", as people write it; "5." too (its fraction is empty)
            whole = "0"
        if not (whole.isascii() and whole.isdigit()) or (
            frac and not (frac.isascii() and frac.isdigit())
        ):
            raise ValueError("not a plain decimal number")
        digits = int(whole + frac) if frac else int(whole)
        scale = len(frac)
    elif isinstance(value, bool):
        raise ValueError("not a number")
    elif isinstance(value, int):
        if value < 0:
            raise ValueError("negative")
        digits, scale = value, 0
    elif isinstance(value, float):
        try:
            dec = Decimal(repr(value))
        except InvalidOperation as exc:  # pragma: no cover - repr of a float always parses
            raise ValueError("not a number") from exc
        if not dec.is_finite():
            raise ValueError("not a finite number")
        sign, dtuple, exponent = dec.as_tuple()
        if sign:
            raise ValueError("negative")
        digits = int("".join(map(str, dtuple))) if dtuple else 0
        assert isinstance(exponent, int)
        if exponent >= 0:
            digits *= 10**exponent
            scale = 0
        else:
            scale = -exponent
        if scale > MAX_TEXT_LENGTH:
            raise ValueError("too many decimal places")
    else:
        raise ValueError("not a number")
    if digits >= MAX_WHOLE_UNITS * 10**scale:
        raise ValueError("too large")
    return digits, scale


def format_scaled(units: int, decimals: int) -> str:
    """``units / 10**decimals`` as a plain decimal string with exactly ``decimals`` places."""
    if decimals <= 0:
        return str(units * _POW10[-decimals]) if decimals else str(units)
    # Cutting the digits is about three times faster than ``f"{frac:0{decimals}d}"`` (whose
    # format spec is built on every call), and this runs for every number on the wire.
    digits = str(units) if units >= 0 else str(-units)
    if len(digits) <= decimals:
        digits = digits.rjust(decimals + 1, "0")
    text = digits[:-decimals] + "." + digits[-decimals:]
    return text if units >= 0 else "-" + text


def decimal_text(value: Any, what: str) -> str:
    """A config value (string or JSON number) as its canonical plain decimal string."""
    try:
        digits, scale = split_decimal(value)
    except ValueError as exc:
        raise ConfigError(f"{what} {value!r} is not a plain non-negative decimal") from exc
    return format_scaled(digits, scale)


def _unit_parts(text: str, what: str) -> tuple[int, int]:
    """A grid unit such as ``"0.05"`` as ``(mantissa, decimals)``: 0.05 == 5 / 10**2."""
    try:
        digits, scale = split_decimal(text)
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r} is not a plain positive decimal") from exc
    if digits <= 0:
        raise ConfigError(f"{what} must be positive")
    while scale and digits % 10 == 0:
        digits //= 10
        scale -= 1
    return digits, scale


@dataclass(slots=True)
class Asset:
    name: str
    decimals: int

    def to_units(self, value: Any) -> int:
        """An amount as minor units; rejects zero, negatives and anything off the unit."""
        try:
            digits, scale = split_decimal(value)
        except ValueError as exc:
            raise InvalidValue(RejectReason.INVALID_AMOUNT, f"amount {value!r}: {exc}") from None
        units, rest = divmod(digits * _POW10[self.decimals], _POW10[scale])
        if rest or units <= 0:
            raise InvalidValue(
                RejectReason.INVALID_AMOUNT,
                f"amount {value!r} must be positive and a multiple of "
                f"{format_scaled(1, self.decimals)} {self.name}",
            )
        return units

    def format(self, units: int) -> str:
        return format_scaled(units, self.decimals)


@dataclass(slots=True)
class Market:
    """A market's static definition, with the integer factors the engine computes with."""

    symbol: str
    base: Asset
    quote: Asset
    tick_size: str
    lot_size: str
    min_qty: str
    price_band: str | None = None
    reference_price: str | None = None
    # Whole basis points; typed loosely so a bad value reaches the check in __post_init__
    # (and raises ConfigError) rather than failing in the constructor of a compiled build.
    maker_fee_bps: Any = 1
    taker_fee_bps: Any = 2
    # Derived, filled in by __post_init__.
    tick_mantissa: int = field(init=False, default=0)
    tick_decimals: int = field(init=False, default=0)
    lot_mantissa: int = field(init=False, default=0)
    lot_decimals: int = field(init=False, default=0)
    base_per_lot: int = field(init=False, default=0)
    quote_per_tick_lot: int = field(init=False, default=0)
    min_qty_lots: int = field(init=False, default=0)
    band_num: int = field(init=False, default=0)
    band_den: int = field(init=False, default=1)
    reference_ticks: int | None = field(init=False, default=None)
    # Decimal strings already converted: clients repeat the same few prices and sizes, and
    # a dict hit is far cheaper than parsing. Only valid conversions are kept; bounded.
    _price_cache: dict[str, int] = field(init=False, default_factory=dict, repr=False, compare=False)
    _qty_cache: dict[str, int] = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tick_mantissa, self.tick_decimals = _unit_parts(self.tick_size, "tick_size")
        self.lot_mantissa, self.lot_decimals = _unit_parts(self.lot_size, "lot_size")
        tick = Fraction(self.tick_mantissa, 10**self.tick_decimals)
        lot = Fraction(self.lot_mantissa, 10**self.lot_decimals)
        base_per_lot = lot * 10**self.base.decimals
        quote_per_tick_lot = tick * lot * 10**self.quote.decimals
        if base_per_lot.denominator != 1:
            raise ConfigError(
                f"{self.symbol}: lot_size {self.lot_size} is finer than {self.base.name}'s "
                f"{self.base.decimals} decimals"
            )
        if quote_per_tick_lot.denominator != 1:
            raise ConfigError(
                f"{self.symbol}: tick_size x lot_size is finer than {self.quote.name}'s "
                f"{self.quote.decimals} decimals, so price x quantity would not be exact"
            )
        self.base_per_lot = int(base_per_lot)
        self.quote_per_tick_lot = int(quote_per_tick_lot)
        try:
            self.min_qty_lots = self.qty_lots(self.min_qty)
        except InvalidValue as exc:
            raise ConfigError(f"{self.symbol}: min_qty: {exc.message}") from None
        for name in ("maker_fee_bps", "taker_fee_bps"):
            bps = getattr(self, name)
            if isinstance(bps, bool) or not isinstance(bps, int) or not 0 <= bps <= MAX_FEE_BPS:
                raise ConfigError(f"{self.symbol}: {name} must be an integer from 0 to {MAX_FEE_BPS}")
        if self.price_band is not None:
            try:
                digits, scale = split_decimal(self.price_band)
            except ValueError:
                raise ConfigError(f"{self.symbol}: price_band must be a decimal fraction") from None
            band = Fraction(digits, 10**scale)
            if not 0 < band < 1:
                raise ConfigError(f"{self.symbol}: price_band must be between 0 and 1")
            self.band_num, self.band_den = band.numerator, band.denominator
        if self.reference_price is not None:
            try:
                self.reference_ticks = self.price_ticks(self.reference_price)
            except InvalidValue as exc:
                raise ConfigError(f"{self.symbol}: reference_price: {exc.message}") from None

    # -- conversions at the edge ------------------------------------------------------

    def price_ticks(self, value: Any) -> int:
        return self._on_grid(
            value, self.tick_mantissa, self.tick_decimals, self._price_cache,
            RejectReason.INVALID_PRICE, "price", self.tick_size,
        )

    def qty_lots(self, value: Any) -> int:
        return self._on_grid(
            value, self.lot_mantissa, self.lot_decimals, self._qty_cache,
            RejectReason.INVALID_QUANTITY, "quantity", self.lot_size,
        )

    @staticmethod
    def _on_grid(
        value: Any, mantissa: int, decimals: int, cache: dict[str, int], reason: RejectReason,
        what: str, unit: str,
    ) -> int:
        """``value`` as a whole number of grid units (``mantissa / 10**decimals`` each)."""
        if value.__class__ is str:
            cached = cache.get(value)
            if cached is not None:
                return cached
        try:
            digits, scale = split_decimal(value)
        except ValueError as exc:
            raise InvalidValue(reason, f"{what} {value!r}: {exc}") from None
        units, rest = divmod(digits * _POW10[decimals], _POW10[scale] * mantissa)
        if rest or units <= 0:
            raise InvalidValue(reason, f"{what} {value!r} must be positive and a multiple of {unit}")
        if value.__class__ is str and len(cache) < CONVERSION_CACHE_LIMIT:
            cache[value] = units
        return units

    def format_price(self, ticks: int) -> str:
        return format_scaled(ticks * self.tick_mantissa, self.tick_decimals)

    def format_qty(self, lots: int) -> str:
        return format_scaled(lots * self.lot_mantissa, self.lot_decimals)

    def format_avg_price(self, cost: int, filled: int) -> str | None:
        """Average fill price from cumulative ``price_ticks x lots``; exact or 8 more places."""
        if not filled:
            return None
        extra = 8
        scaled = (cost * self.tick_mantissa * 10**extra) // filled
        text = format_scaled(scaled, self.tick_decimals + extra)
        whole, _, frac = text.partition(".")
        frac = frac.rstrip("0").ljust(self.tick_decimals, "0")
        return f"{whole}.{frac}" if frac else whole

    def notional(self, price_ticks: int, qty_lots: int) -> int:
        """Quote minor units for ``qty_lots`` at ``price_ticks``: exact by construction."""
        return price_ticks * qty_lots * self.quote_per_tick_lot

    def band_limits(self, reference_ticks: int | None) -> tuple[int, int] | None:
        """The inclusive [low, high] tick range allowed around ``reference_ticks``, or None."""
        if not self.band_num or reference_ticks is None:
            return None
        num, den = self.band_num, self.band_den
        low = -((-reference_ticks * (den - num)) // den)  # ceil
        high = (reference_ticks * (den + num)) // den  # floor
        return max(low, 1), high

    def describe(self) -> dict[str, Any]:
        """The public description, in decimal strings, as the ``markets`` op sends it."""
        band = self.price_band if self.band_num else None  # as configured, e.g. "0.10"
        return {
            "symbol": self.symbol,
            "base": self.base.name,
            "quote": self.quote.name,
            "tick_size": self.tick_size,
            "lot_size": self.lot_size,
            "min_qty": self.min_qty,
            "price_band": band,
            "reference_price": self.reference_price,
            "maker_fee_bps": self.maker_fee_bps,
            "taker_fee_bps": self.taker_fee_bps,
        }


@dataclass(slots=True)
class MarketConfig:
    assets: dict[str, Asset]
    markets: dict[str, Market]


DEFAULT_CONFIG: dict[str, Any] = {
    "assets": {"USD": 6, "BTC": 8, "ACME": 0},
    "fees": {"maker_fee_bps": 1, "taker_fee_bps": 2},
    "markets": [
        {
            "symbol": "BTC-USD", "base": "BTC", "quote": "USD",
            "tick_size": "0.01", "lot_size": "0.0001", "min_qty": "0.0001",
            "price_band": None,
        },
        {
            "symbol": "ACME-USD", "base": "ACME", "quote": "USD",
            "tick_size": "0.01", "lot_size": "1", "min_qty": "1",
            "price_band": "0.10", "reference_price": "100.00",
        },
    ],
}


def _bps(value: Any, symbol: str, name: str) -> int:
    """Fee rates are whole basis points from 0 to ``MAX_FEE_BPS``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_FEE_BPS:
        raise ConfigError(f"{symbol}: {name} must be an integer from 0 to {MAX_FEE_BPS}")
    return value


def build_config(data: Any) -> MarketConfig:
    """Validate a markets definition (the shape of ``DEFAULT_CONFIG``) and build it."""
    if not isinstance(data, dict):
        raise ConfigError("a markets file must hold a JSON object")
    raw_assets = data.get("assets")
    if not isinstance(raw_assets, dict) or not raw_assets:
        raise ConfigError("'assets' must map asset names to their number of decimals")
    assets: dict[str, Asset] = {}
    for name, decimals in raw_assets.items():
        if isinstance(decimals, dict):
            decimals = decimals.get("decimals")
        if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 18:
            raise ConfigError(f"asset {name}: decimals must be an integer from 0 to 18")
        assets[name] = Asset(name, decimals)
    fees = data.get("fees") or {}
    if not isinstance(fees, dict):
        raise ConfigError("'fees' must be an object with maker_fee_bps and taker_fee_bps")
    raw_markets = data.get("markets")
    if not isinstance(raw_markets, list) or not raw_markets:
        raise ConfigError("'markets' must be a non-empty list")
    markets: dict[str, Market] = {}
    for raw in raw_markets:
        if not isinstance(raw, dict):
            raise ConfigError("each market must be a JSON object")
        symbol = raw.get("symbol")
        if not isinstance(symbol, str) or not symbol:
            raise ConfigError("each market needs a 'symbol'")
        if symbol in markets:
            raise ConfigError(f"market {symbol} is defined twice")
        base_name, quote_name = raw.get("base"), raw.get("quote")
        if not isinstance(base_name, str) or not isinstance(quote_name, str):
            raise ConfigError(f"{symbol}: 'base' and 'quote' must be asset names")
        try:
            base, quote = assets[base_name], assets[quote_name]
        except KeyError as exc:
            raise ConfigError(f"{symbol}: unknown asset {exc}") from None
        if base is quote:
            raise ConfigError(f"{symbol}: base and quote must differ")
        try:
            markets[symbol] = Market(
                symbol=symbol, base=base, quote=quote,
                tick_size=decimal_text(raw["tick_size"], f"{symbol}: tick_size"),
                lot_size=decimal_text(raw["lot_size"], f"{symbol}: lot_size"),
                min_qty=decimal_text(raw.get("min_qty", raw["lot_size"]), f"{symbol}: min_qty"),
                price_band=(
                    None if raw.get("price_band") is None
                    else decimal_text(raw["price_band"], f"{symbol}: price_band")
                ),
                reference_price=(
                    None if raw.get("reference_price") is None
                    else decimal_text(raw["reference_price"], f"{symbol}: reference_price")
                ),
                maker_fee_bps=_bps(
                    raw.get("maker_fee_bps", fees.get("maker_fee_bps", 1)), symbol, "maker_fee_bps"
                ),
                taker_fee_bps=_bps(
                    raw.get("taker_fee_bps", fees.get("taker_fee_bps", 2)), symbol, "taker_fee_bps"
                ),
            )
        except KeyError as exc:
            raise ConfigError(f"{symbol}: missing field {exc}") from None
    return MarketConfig(assets, markets)


def default_config(maker_fee_bps: int | None = None, taker_fee_bps: int | None = None) -> MarketConfig:
    """The built-in markets (BTC-USD unregulated, ACME-USD with a +-10 % band)."""
    data = json.loads(json.dumps(DEFAULT_CONFIG))
    if maker_fee_bps is not None:
        data["fees"]["maker_fee_bps"] = maker_fee_bps
    if taker_fee_bps is not None:
        data["fees"]["taker_fee_bps"] = taker_fee_bps
    return build_config(data)


def load_config(path: str | Path) -> MarketConfig:
    """Read a markets JSON file; every problem is a ``ConfigError`` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read markets file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"markets file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"markets file {path} is not valid JSON: {exc}") from None
    try:
        return build_config(data)
    except ConfigError as exc:
        raise ConfigError(f"markets file {path}: {exc}") from None
