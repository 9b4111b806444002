"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.testing.agent import AgentProcess
from tests.unit.running_sandbox import CURRENT_USER


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """The real guest agent on the host (``--unix``), as the current user, keepalives
    every 0.2 s. Test modules that need another agent define their own ``agent``."""
    with AgentProcess(tmp_path, default_user=CURRENT_USER, keepalive_interval_s=0.2) as running:
        yield running


@pytest.fixture
def iso(tmp_path: Path) -> Path:
    """A blank "ISO": QEMU boots its firmware from it, so no guest image is needed."""
    path = tmp_path / "blank.iso"
    path.write_bytes(b"\0" * 2048)
    return path
