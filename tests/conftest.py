"""Shared fixtures: every test gets its own SECVF_HOME and runtime dir.

The image cache (SECVF_CACHE) is shared across the session on purpose: images are
expensive to build and are keyed by recipe hash, so reuse is always correct.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def secvf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Isolate the VM library and runtime dir of each test (short paths: sockets)."""
    home = tmp_path / "home"
    runtime = Path(tempfile.mkdtemp(prefix="sv", dir="/tmp"))
    monkeypatch.setenv("SECVF_HOME", str(home))
    monkeypatch.setenv("SECVF_RUNTIME_DIR", str(runtime))
    yield home
    shutil.rmtree(runtime, ignore_errors=True)
