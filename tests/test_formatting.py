"""``format_scaled`` is on every outgoing number: checked against Decimal for any input."""

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.markets import format_scaled


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=-(10**30), max_value=10**30), st.integers(min_value=0, max_value=18))
def test_format_scaled_is_the_exact_decimal_with_fixed_places(units: int, decimals: int) -> None:
    text = format_scaled(units, decimals)
    assert int(text.replace(".", "")) == units  # the same digits, exactly
    assert Decimal(text) == Decimal(units) / Decimal(10) ** decimals or abs(units) >= 10**27
    if decimals:
        assert len(text.partition(".")[2]) == decimals
    else:
        assert "." not in text
    assert "e" not in text.lower() and not text.startswith("+")
