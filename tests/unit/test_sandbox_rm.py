"""``sandbox rm`` deletes AI sandboxes only, and a running one only when told to
(``--force``, ``--yes`` or a yes on a terminal).

"Running" is what every command takes it for: a process holds the VM's ``run.lock``
(here the test does, as a supervisor would); the real thing is in
tests/integration/test_workspaces.py."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from secvf import api
from secvf.store import library
from tests.helpers import run_cli
from tests.terminal_helpers import run_on_a_terminal
from tests.unit.fake_images import publish_fake_image


@pytest.fixture(autouse=True)
def sandbox_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECVF_CACHE", str(tmp_path / "cache"))
    publish_fake_image("sandbox")


@contextmanager
def looks_running(name: str) -> Iterator[None]:
    fd = os.open(library.get_bundle(name).run_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["generic", "malware-analysis"])
def test_sandbox_rm_refuses_a_vm_that_is_not_a_sandbox(iso: Path, kind: str) -> None:
    api.create_vm("lab", kind=api.VMKind(kind), iso=iso)
    with looks_running("lab"):
        for flags in ((), ("--force",), ("--purge", "--yes")):
            proc = run_cli("sandbox", "rm", "lab", *flags)
            assert proc.returncode != 0
            assert f"is a {kind} VM, not an AI sandbox" in proc.stderr
            assert "secvf vm delete lab" in proc.stderr
        assert library.get_bundle("lab").disk.is_file()
    run_cli("vm", "delete", "lab", check=True)


def test_a_running_sandbox_is_not_removed_without_force() -> None:
    api.create_sandbox("sbx")
    with looks_running("sbx"):
        proc = run_cli("sandbox", "rm", "sbx", "--purge")
        assert proc.returncode != 0
        assert "running" in proc.stderr and "--force" in proc.stderr
        assert library.get_bundle("sbx").disk.is_file()
    assert {i.bundle.name for i in api.list_vms()} == {"sbx"}


def test_on_a_terminal_a_running_sandbox_is_removed_only_after_a_yes() -> None:
    api.create_sandbox("sbx")
    with looks_running("sbx"):
        code, output = run_on_a_terminal(["sandbox", "rm", "sbx"], b"n\n")
        assert code != 0
        assert "sandbox 'sbx' is running; stop it and delete it?" in output
    assert library.get_bundle("sbx").disk.is_file()


def test_a_stopped_sandbox_is_removed_without_asking() -> None:
    api.create_sandbox("sbx")
    proc = run_cli("sandbox", "rm", "sbx")
    assert proc.returncode == 0, proc.stderr
    assert api.list_vms() == []
