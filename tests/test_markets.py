"""Markets: exact decimal conversion, formatting, the default markets, config files, bands.

Spec (issue 2, "Markets"): conversion from decimal strings and JSON numbers is exact; a value
off the tick/lot grid, zero, negative, NaN, infinite or absurdly large is rejected, never
rounded; asset precision must make every price x quantity exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exchange.markets import (
    DEFAULT_CONFIG,
    MAX_WHOLE_UNITS,
    Asset,
    ConfigError,
    InvalidValue,
    Market,
    build_config,
    default_config,
    format_scaled,
    load_config,
    split_decimal,
)
from exchange.types import REJECT_MESSAGES, RejectReason


def btc() -> Market:
    return default_config().markets["BTC-USD"]


def acme() -> Market:
    return default_config().markets["ACME-USD"]


def a_market(**fields: object) -> Market:
    """A market over USD (2 decimals) and XYZ (3 decimals) with sane defaults."""
    values: dict = dict(
        symbol="XYZ-USD", base=Asset("XYZ", 3), quote=Asset("USD", 2),
        tick_size="0.01", lot_size="1", min_qty="1",
    )
    values.update(fields)
    return Market(**values)


# ---------------------------------------------------------------------- exact conversion


@pytest.mark.parametrize(
    ("text", "ticks"),
    [
        ("100.00", 10_000), ("100", 10_000), ("100.0", 10_000), ("0.01", 1), ("00042.50", 4_250),
        ("101.25", 10_125), ("999999999999.99", 99_999_999_999_999),
        ("100.0100000000", 10_001),  # trailing zeros are still exact
        ("100.", 10_000), (".5", 50),  # either side of the point may be left out
    ],
)
def test_price_from_decimal_string_is_exact(text: str, ticks: int) -> None:
    assert btc().price_ticks(text) == ticks


@pytest.mark.parametrize(("text", "lots"), [("1", 10_000), ("0.0001", 1), ("0.5", 5_000), ("12.3456", 123_456)])
def test_quantity_from_decimal_string_is_exact(text: str, lots: int) -> None:
    assert btc().qty_lots(text) == lots


def test_price_and_quantity_from_ints() -> None:
    assert btc().price_ticks(100) == 10_000
    assert btc().qty_lots(3) == 30_000
    assert acme().qty_lots(7) == 7


@pytest.mark.parametrize(("number", "ticks"), [(100.0, 10_000), (0.1, 10), (101.25, 10_125), (0.07, 7)])
def test_price_from_json_float_uses_its_shortest_digits(number: float, ticks: int) -> None:
    # 0.07 is 0.0700000000000000066... in binary; the sender wrote 0.07 and means it.
    assert btc().price_ticks(number) == ticks


def test_price_from_json_number_parsed_by_json_module() -> None:
    value = json.loads('{"price": 19.99}')["price"]
    assert btc().price_ticks(value) == 1_999


def test_float_arithmetic_noise_is_rejected_not_rounded() -> None:
    with pytest.raises(InvalidValue) as info:
        btc().price_ticks(0.1 + 0.2)  # 0.30000000000000004
    assert info.value.reason is RejectReason.INVALID_PRICE


@pytest.mark.parametrize("text", ["100.001", "0.005", "100.0000001"])
def test_price_off_tick_is_rejected_never_rounded(text: str) -> None:
    with pytest.raises(InvalidValue) as info:
        btc().price_ticks(text)
    assert info.value.reason is RejectReason.INVALID_PRICE


@pytest.mark.parametrize("text", ["0.00005", "1.00001", "0.00019"])
def test_quantity_off_lot_is_rejected_never_rounded(text: str) -> None:
    with pytest.raises(InvalidValue) as info:
        btc().qty_lots(text)
    assert info.value.reason is RejectReason.INVALID_QUANTITY


def test_acme_quantity_must_be_whole_shares() -> None:
    with pytest.raises(InvalidValue) as info:
        acme().qty_lots("1.5")
    assert info.value.reason is RejectReason.INVALID_QUANTITY


BAD_VALUES = [
    "0", "0.00", "0.0000", 0, 0.0, -0.0,  # zero
    "-1", "-0.01", -1, -1.5,  # negative
    "nan", "NaN", "inf", "Infinity", float("nan"), float("inf"), float("-inf"),
    "1e2", "1E2", "1e-2", "2.5e1",  # exponent strings
    "", ".", "5..", "+1", " 1", "1 ", "1,5", "1_000", "0x10", "12a", "1.2.3",
    "\u0661", "\uff11",  # non-ASCII digits (Arabic-Indic one, fullwidth one)
    "1000000000000", "99999999999999999999999999", 1e20, 10**13, 1e-300,  # absurd
    "0." + "0" * 50 + "1",  # absurdly long
    True, False, None, [1], {"v": 1}, b"1",
]


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_bad_price_is_invalid_price(value: object) -> None:
    with pytest.raises(InvalidValue) as info:
        btc().price_ticks(value)
    assert info.value.reason is RejectReason.INVALID_PRICE


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_bad_quantity_is_invalid_quantity(value: object) -> None:
    with pytest.raises(InvalidValue) as info:
        btc().qty_lots(value)
    assert info.value.reason is RejectReason.INVALID_QUANTITY


@pytest.mark.parametrize("value", BAD_VALUES + ["0.0000001"], ids=repr)
def test_bad_amount_is_invalid_amount(value: object) -> None:
    usd = default_config().assets["USD"]
    with pytest.raises(InvalidValue) as info:
        usd.to_units(value)
    assert info.value.reason is RejectReason.INVALID_AMOUNT


def test_invalid_value_carries_a_message_and_is_a_value_error() -> None:
    with pytest.raises(ValueError) as info:
        btc().price_ticks("100.001")
    assert isinstance(info.value, InvalidValue)
    assert "100.001" in info.value.message and "0.01" in info.value.message


def test_largest_allowed_value_just_below_the_cap() -> None:
    largest = str(MAX_WHOLE_UNITS - 1)
    assert btc().price_ticks(largest) == (MAX_WHOLE_UNITS - 1) * 100
    with pytest.raises(InvalidValue):
        btc().price_ticks(str(MAX_WHOLE_UNITS))


def test_amounts_in_minor_units() -> None:
    assets = default_config().assets
    assert assets["USD"].to_units("1") == 1_000_000
    assert assets["USD"].to_units("0.000001") == 1
    assert assets["USD"].to_units(2.5) == 2_500_000
    assert assets["BTC"].to_units("0.00000001") == 1
    assert assets["ACME"].to_units(3) == 3
    with pytest.raises(InvalidValue):
        assets["ACME"].to_units("0.5")


def test_split_decimal_returns_digits_and_scale() -> None:
    assert split_decimal("101.25") == (10_125, 2)
    assert split_decimal(7) == (7, 0)
    assert split_decimal(1e-7) == (1, 7)
    digits, scale = split_decimal(1e3)  # repr "1000.0": same value, whatever the scale
    assert digits == 1_000 * 10**scale
    assert split_decimal(".5") == (5, 1)  # accepted: a leading dot is still a plain decimal
    assert split_decimal("5.") == (5, 0)  # and so is a trailing one


# ---------------------------------------------------------------------- formatting


def test_format_price_qty_and_amount_back_to_strings() -> None:
    m = btc()
    assert m.format_price(10_000) == "100.00"
    assert m.format_price(1) == "0.01"
    assert m.format_qty(1) == "0.0001"
    assert m.format_qty(10_000) == "1.0000"
    assert m.base.format(1) == "0.00000001"
    assert m.quote.format(1_234_567) == "1.234567"
    assert acme().format_qty(12) == "12"
    assert format_scaled(-5, 2) == "-0.05"
    assert format_scaled(42, 0) == "42"


@pytest.mark.parametrize("text", ["0.01", "100.00", "123456.78", "999999999999.99"])
def test_price_round_trips_through_its_string(text: str) -> None:
    m = btc()
    assert m.format_price(m.price_ticks(text)) == text


def test_coarse_tick_formats_in_units_of_the_tick() -> None:
    m = a_market(tick_size="0.05")
    assert m.price_ticks("1.05") == 21
    assert m.format_price(21) == "1.05"
    with pytest.raises(InvalidValue):
        m.price_ticks("1.03")
    whole = a_market(tick_size="10")
    assert whole.price_ticks("120") == 12
    assert whole.format_price(12) == "120"


def test_average_price_formatting() -> None:
    m = btc()
    assert m.format_avg_price(0, 0) is None
    assert m.format_avg_price(10_000 * 3, 3) == "100.00"
    # (100.00 x 1 + 100.01 x 2) / 3 = 100.00666...: exact to 8 more places, never rounded up
    assert m.format_avg_price(10_000 + 10_001 * 2, 3) == "100.0066666666"


def test_average_price_keeps_its_fraction_on_a_whole_number_tick() -> None:
    # Tick 1 (no decimal places): fills at 100 and 101 average 100.5, not 100.
    m = a_market(tick_size="1")
    assert m.format_avg_price(100 + 101, 2) == "100.5"
    assert m.format_avg_price(200, 2) == "100"


def test_notional_is_price_times_quantity_in_quote_minor_units() -> None:
    m = btc()  # 1 tick x 1 lot = 0.01 x 0.0001 USD = 1 micro-dollar
    assert m.quote_per_tick_lot == 1
    assert m.notional(m.price_ticks("100.00"), m.qty_lots("1")) == 100 * 10**6
    a = acme()  # 0.01 USD x 1 share = 10,000 micro-dollars
    assert a.notional(a.price_ticks("100.00"), a.qty_lots("3")) == 300 * 10**6


# ---------------------------------------------------------------------- default markets


def test_default_markets() -> None:
    config = default_config()
    assert list(config.markets) == ["BTC-USD", "ACME-USD"]
    b = config.markets["BTC-USD"]
    assert (b.base.name, b.quote.name, b.tick_size, b.lot_size) == ("BTC", "USD", "0.01", "0.0001")
    assert b.band_limits(10_000) is None  # unregulated: any price
    assert (b.maker_fee_bps, b.taker_fee_bps) == (1, 2)
    a = config.markets["ACME-USD"]
    assert (a.base.name, a.quote.name, a.tick_size, a.lot_size) == ("ACME", "USD", "0.01", "1")
    assert a.reference_ticks == a.price_ticks("100.00")
    assert a.band_limits(a.reference_ticks) == (a.price_ticks("90.00"), a.price_ticks("110.00"))
    assert (a.maker_fee_bps, a.taker_fee_bps) == (1, 2)


def test_default_market_descriptions_are_decimal_strings() -> None:
    described = {m.symbol: m.describe() for m in default_config().markets.values()}
    assert described["BTC-USD"] == {
        "symbol": "BTC-USD", "base": "BTC", "quote": "USD", "tick_size": "0.01",
        "lot_size": "0.0001", "min_qty": "0.0001", "price_band": None, "reference_price": None,
        "maker_fee_bps": 1, "taker_fee_bps": 2,
    }
    assert described["ACME-USD"]["price_band"] == "0.10"  # as configured, like the example
    assert described["ACME-USD"]["reference_price"] == "100.00"


def test_default_fees_are_configurable_and_zero_is_allowed() -> None:
    config = default_config(maker_fee_bps=0, taker_fee_bps=0)
    for m in config.markets.values():
        assert (m.maker_fee_bps, m.taker_fee_bps) == (0, 0)
    config = default_config(maker_fee_bps=5, taker_fee_bps=7)
    assert config.markets["BTC-USD"].taker_fee_bps == 7


def test_building_the_default_config_does_not_mutate_it() -> None:
    before = json.dumps(DEFAULT_CONFIG, sort_keys=True)
    default_config(maker_fee_bps=9, taker_fee_bps=9)
    assert json.dumps(DEFAULT_CONFIG, sort_keys=True) == before


# ---------------------------------------------------------------------- price bands


def test_band_limits_are_inclusive_and_rounded_inward() -> None:
    a = acme()
    assert a.band_limits(10_500) == (9_450, 11_550)  # 105.00: [94.50, 115.50]
    # 100.05 x 0.9 = 90.045 -> 90.05 (ceil); 100.05 x 1.1 = 110.055 -> 110.05 (floor)
    assert a.band_limits(10_005) == (9_005, 11_005)
    assert a.band_limits(None) is None


def test_band_low_never_below_one_tick() -> None:
    a = acme()
    assert a.band_limits(1) == (1, 1)


def test_band_must_be_a_fraction_between_zero_and_one() -> None:
    for band in ("0", "1", "1.5", "-0.1", "abc"):
        with pytest.raises(ConfigError):
            a_market(price_band=band)
    assert a_market(price_band="0.25").band_limits(400) == (300, 500)


# ---------------------------------------------------------------------- market validation


def test_tick_times_lot_finer_than_quote_decimals_is_refused() -> None:
    # 0.01 USD x 0.001 XYZ = 0.00001 USD, finer than USD's 2 decimals.
    with pytest.raises(ConfigError, match="tick_size x lot_size"):
        a_market(lot_size="0.001")


def test_lot_finer_than_base_decimals_is_refused() -> None:
    with pytest.raises(ConfigError, match="lot_size"):
        a_market(lot_size="0.0001")  # XYZ has 3 decimals


def test_exact_market_is_accepted() -> None:
    m = a_market(tick_size="0.01", lot_size="1")
    assert m.quote_per_tick_lot == 1 and m.base_per_lot == 1000


@pytest.mark.parametrize(
    "fields",
    [
        {"tick_size": "0"}, {"tick_size": "-0.01"}, {"tick_size": "abc"}, {"lot_size": "0"},
        {"min_qty": "0.5"}, {"min_qty": "0"}, {"reference_price": "100.001"},
        {"maker_fee_bps": -1}, {"taker_fee_bps": 1_001}, {"maker_fee_bps": 1.5},
        {"taker_fee_bps": True},
    ],
    ids=repr,
)
def test_invalid_market_definition_is_refused(fields: dict) -> None:
    with pytest.raises(ConfigError):
        a_market(**fields)


def test_min_quantity_is_converted_to_lots() -> None:
    assert a_market(lot_size="1", min_qty="5").min_qty_lots == 5


# ---------------------------------------------------------------------- config files


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def a_config() -> dict:
    return {
        "assets": {"USD": 4, "ETH": {"decimals": 6}},  # 0.05 x 0.01 = 0.0005 USD: exact
        "fees": {"maker_fee_bps": 0, "taker_fee_bps": 5},
        "markets": [
            {"symbol": "ETH-USD", "base": "ETH", "quote": "USD", "tick_size": "0.05",
             "lot_size": "0.01", "min_qty": "0.1", "price_band": "0.2",
             "reference_price": "2000.00", "taker_fee_bps": 3},
        ],
    }


def test_valid_config_file_overrides_the_defaults(tmp_path: Path) -> None:
    config = load_config(write_json(tmp_path / "markets.json", a_config()))
    assert list(config.markets) == ["ETH-USD"]
    assert set(config.assets) == {"USD", "ETH"}
    m = config.markets["ETH-USD"]
    assert m.price_ticks("2000.05") == 40_001
    assert m.qty_lots("0.1") == 10 and m.min_qty_lots == 10
    assert (m.maker_fee_bps, m.taker_fee_bps) == (0, 3)  # market overrides the file's fees
    assert m.band_limits(m.reference_ticks) == (m.price_ticks("1600.00"), m.price_ticks("2400.00"))


def test_config_file_with_json_numbers(tmp_path: Path) -> None:
    data = a_config()
    data["markets"][0].update(tick_size=0.05, lot_size=0.01, min_qty=0.1, price_band=0.2)
    m = load_config(write_json(tmp_path / "m.json", data)).markets["ETH-USD"]
    assert m.price_ticks("2000.05") == 40_001 and m.qty_lots("0.1") == 10


def test_config_accepts_small_sizes_written_as_json_numbers(tmp_path: Path) -> None:
    # JSON "lot_size": 0.00001 is read by Python as 1e-05, whose str() is "1e-05". The spec
    # says JSON numbers convert exactly, so this must mean 0.00001, not a config error.
    data = {
        "assets": {"USD": 8, "BTC": 8},
        "markets": [{"symbol": "BTC-USD", "base": "BTC", "quote": "USD",
                     "tick_size": 0.01, "lot_size": 0.00001}],
    }
    m = load_config(write_json(tmp_path / "m.json", data)).markets["BTC-USD"]
    assert m.qty_lots("0.00001") == 1


def test_config_file_missing_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json"):
        load_config(path)


def test_config_file_not_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.json"):
        load_config(path)


def _broken(change) -> dict:
    data = a_config()
    change(data)
    return data


INVALID_CONFIGS = {
    "not an object": [1, 2],
    "no assets": {"markets": []},
    "empty markets": _broken(lambda d: d.update(markets=[])),
    "bad decimals": _broken(lambda d: d["assets"].update(USD=-1)),
    "bool decimals": _broken(lambda d: d["assets"].update(USD=True)),
    "unknown asset": _broken(lambda d: d["markets"][0].update(base="DOGE")),
    "same base and quote": _broken(lambda d: d["markets"][0].update(base="USD")),
    "no symbol": _broken(lambda d: d["markets"][0].pop("symbol")),
    "no tick": _broken(lambda d: d["markets"][0].pop("tick_size")),
    "duplicate": _broken(lambda d: d["markets"].append(dict(d["markets"][0]))),
    "market not an object": _broken(lambda d: d["markets"].append("BTC-USD")),
    "inexact market": _broken(lambda d: d["markets"][0].update(lot_size="0.0001")),
    "off-tick reference": _broken(lambda d: d["markets"][0].update(reference_price="2000.01")),
    "bad band": _broken(lambda d: d["markets"][0].update(price_band="2")),
    "bad fee": _broken(lambda d: d["markets"][0].update(maker_fee_bps=20_000)),
    "exponent tick": _broken(lambda d: d["markets"][0].update(tick_size="5e-2")),
}


@pytest.mark.parametrize("name", list(INVALID_CONFIGS))
def test_invalid_config_file_is_a_config_error_naming_the_file(tmp_path: Path, name: str) -> None:
    path = write_json(tmp_path / "bad-markets.json", INVALID_CONFIGS[name])
    with pytest.raises(ConfigError, match="bad-markets.json"):
        load_config(path)


# Wrong JSON *types* where a name or an object is expected must still be a ConfigError that
# names the file ("every problem is a ConfigError naming the file"), not a TypeError or an
# AttributeError escaping from inside the loader.
WRONGLY_TYPED_CONFIGS = {
    "base is a list": _broken(lambda d: d["markets"][0].update(base=["ETH"])),
    "fees is a list": _broken(lambda d: d.update(fees=[0, 5])),
}


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin-markets.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="latin-markets.json"):
        load_config(path)


@pytest.mark.parametrize("name", list(WRONGLY_TYPED_CONFIGS))
def test_wrongly_typed_config_file_is_a_config_error(tmp_path: Path, name: str) -> None:
    path = write_json(tmp_path / "typed-markets.json", WRONGLY_TYPED_CONFIGS[name])
    with pytest.raises(ConfigError, match="typed-markets.json"):
        load_config(path)


def test_build_config_accepts_the_default_shape() -> None:
    config = build_config(json.loads(json.dumps(DEFAULT_CONFIG)))
    assert set(config.markets) == {"BTC-USD", "ACME-USD"}


# ---------------------------------------------------------------------- reject messages


def test_every_reject_reason_has_a_human_message() -> None:
    assert set(REJECT_MESSAGES) == set(RejectReason)
    assert all(isinstance(msg, str) and msg for msg in REJECT_MESSAGES.values())


def test_reject_reasons_are_their_wire_strings() -> None:
    assert RejectReason.PRICE_OUT_OF_BAND == "price_out_of_band"
    assert RejectReason("would_take_liquidity") is RejectReason.WOULD_TAKE_LIQUIDITY
