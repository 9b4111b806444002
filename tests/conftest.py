"""Shared fixtures: every test gets its own SECVF_HOME and runtime dir.

The image cache (SECVF_CACHE) is shared across the session on purpose: images are
expensive to build and are keyed by recipe hash, so reuse is always correct.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def secvf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Isolate the VM library and runtime dir of each test (short paths: sockets)."""
    home = tmp_path / "home"
    runtime = Path(tempfile.mkdtemp(prefix="sv", dir="/tmp"))
    monkeypatch.setenv("SECVF_HOME", str(home))
    monkeypatch.setenv("SECVF_RUNTIME_DIR", str(runtime))
    yield home
    _stop_leftover_vms(home)
    shutil.rmtree(runtime, ignore_errors=True)


def _stop_leftover_vms(home: Path) -> None:
    """Force-stop every VM a test left running (a failed assertion skips its own stop),
    so no supervisor or QEMU outlives the test."""
    vms = home / "vms"
    if not vms.is_dir():
        return
    from secvf import api

    for vm_dir in vms.iterdir():
        with contextlib.suppress(Exception):
            if api.vm_status(vm_dir.name)["state"] != "stopped":
                api.stop_vm(vm_dir.name, force=True)


# ---- the vsock backend under a fake guest driver (tests/unit/test_vsock_*.py) ------------------
VSOCK_TEST_CID = 42


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A real ``python -m secvf.vsock`` process serving guest CID 42."""
    from secvf.vsock.testing import BackendProcess

    monkeypatch.setenv("SECVF_HOME", str(tmp_path / "home"))
    with BackendProcess(tmp_path, VSOCK_TEST_CID) as process:
        yield process


@pytest.fixture
def guest(backend: Any) -> Iterator[object]:
    """A fake guest driver connected to ``backend`` over vhost-user, driver started."""
    from secvf.vsock.testing import FakeGuest

    with FakeGuest(backend.vhost_user_socket, VSOCK_TEST_CID) as fake:
        fake.start()
        yield fake
