"""Parsing of human sizes (``512M``, ``1G``, ``8GiB``) into bytes."""

from __future__ import annotations

import re

from secvf.errors import SecVFError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


class InvalidSize(SecVFError):
    """A size string that cannot be parsed or is out of range."""


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Parse ``text`` into a number of bytes.

    A bare number uses ``default_unit`` (``"M"`` for memory flags, for example).

    Raises:
        InvalidSize: the text is not a size.
    """
    match = _SIZE.match(text)
    if not match:
        raise InvalidSize(f"cannot parse size {text!r} (examples: 512M, 1G, 8GiB)")
    number, unit = match.groups()
    unit = (unit or default_unit).upper()
    value = float(number) * _UNITS[unit]
    if value != int(value):
        raise InvalidSize(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(size: int) -> str:
    """Format a byte count the way ``parse_size`` reads it back (``1G``, ``512M``)."""
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit]:
            if size % _UNITS[unit] == 0:
                return f"{size // _UNITS[unit]}{unit}"
            return f"{size / _UNITS[unit]:.1f}{unit}"
    return f"{size}B"


def round_up_size(size: int) -> int:
    """``size`` rounded up to a whole number of its largest unit, so that
    :func:`format_size` writes it exactly: 1.3G becomes 2G, 300M stays 300M."""
    for unit in ("T", "G", "M", "K"):
        step = _UNITS[unit]
        if size >= step:
            return -(-size // step) * step
    return size
