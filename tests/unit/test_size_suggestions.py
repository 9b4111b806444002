"""Sizes SecVF suggests in messages ("use --disk 2G or more") are exact and big enough."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secvf.model.sizes import format_size, parse_size, round_up_size


@pytest.mark.parametrize(("size", "expected"), [
    (0, "0B"), (1000, "1000B"), (1 << 30, "1G"), (1300 << 20, "2G"), (300 << 20, "300M"),
    ((1 << 40) + 1, "2T"), ((64 << 20) + 1, "65M"),
])
def test_round_up_size(size: int, expected: str) -> None:
    assert format_size(round_up_size(size)) == expected


@given(st.integers(min_value=0, max_value=1 << 50))
def test_a_rounded_size_is_at_least_the_size_and_reads_back_exactly(size: int) -> None:
    rounded = round_up_size(size)
    assert rounded >= size
    assert parse_size(format_size(rounded)) == rounded
