"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def iso(tmp_path: Path) -> Path:
    """A blank "ISO": QEMU boots its firmware from it, so no guest image is needed."""
    path = tmp_path / "blank.iso"
    path.write_bytes(b"\0" * 2048)
    return path
