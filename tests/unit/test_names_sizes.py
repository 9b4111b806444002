from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secvf.errors import InvalidName
from secvf.model.names import validate_name
from secvf.model.sizes import InvalidSize, format_size, parse_size


@pytest.mark.parametrize("bad", ["", "/", "a/b", "a\\b", "..", ".hidden", "a b", "x" * 256,
                                 "é" * 128, "a\nb", "-", "a:b", "a*b"])
def test_invalid_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(bad)


@pytest.mark.parametrize("good", ["a", "web-01", "A_b.c", "x" * 255, "1"])
def test_valid_names_pass(good: str) -> None:
    assert validate_name(good) == good


@given(st.text(max_size=300))
def test_any_accepted_name_is_one_safe_path_component(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName:
        return
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert len(name.encode()) <= 255 and name not in (".", "..")


@pytest.mark.parametrize(("text", "unit", "expected"), [
    ("512M", "", 512 << 20), ("1G", "", 1 << 30), ("8GiB", "", 8 << 30), ("1.5G", "", 3 << 29),
    ("1024", "M", 1 << 30), ("2g", "", 2 << 30), ("100", "", 100),
])
def test_parse_size(text: str, unit: str, expected: int) -> None:
    assert parse_size(text, default_unit=unit) == expected


@pytest.mark.parametrize("bad", ["", "G", "-1G", "1X", "abc", "1.3"])
def test_parse_size_rejects_garbage(bad: str) -> None:
    with pytest.raises(InvalidSize):
        parse_size(bad)


@given(st.integers(min_value=1, max_value=1 << 44))
def test_format_size_round_trips_whole_units(n: int) -> None:
    text = format_size(n)
    if "." not in text and not text.endswith("B"):
        assert parse_size(text) == n
