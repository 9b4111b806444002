"""One serial log per run: ``vm logs`` shows the current (or last) run, ``--run N`` an
earlier kept one, ``-f`` ends with its run, and failure messages quote only the failed
run (the sandbox boot failure's serial tail, a device helper's output)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from secvf.errors import LaunchFailed
from secvf.runtime import control
from secvf.store.bundle import SERIAL_RUNS_KEPT, Bundle, RuntimeFiles
from secvf.store.library import get_vm
from secvf.workflows.sandbox import SandboxBootFailed, start_sandbox
from tests.helpers import run_cli
from tests.unit.boot_media import bootable_iso
from tests.unit.fake_vm import VM_WAIT_S, make_vm, use_fake_qemu, wait_for_text

MARKER = "SECVF-TEST-RUN"
EARLIER = "output of an earlier run"


def test_each_run_has_its_own_serial_log(tmp_path: Path) -> None:
    iso = bootable_iso(tmp_path / "boot.iso", f"{MARKER}\r\n".encode())
    run_cli("vm", "create", "runs", "--iso", str(iso), "--memory", "256M", "--disk", "64M",
            "--accel", "tcg", "--network", "none", check=True)
    bundle, _ = get_vm("runs")
    for run in (1, 2):
        run_cli("vm", "start", "runs", check=True)
        assert wait_for_text(bundle.run_serial_log(run), MARKER)
        run_cli("vm", "stop", "runs", "--force", check=True)
    assert run_cli("vm", "logs", "runs", check=True).stdout.count(MARKER) == 1
    assert run_cli("vm", "logs", "runs", "--run", "1", check=True).stdout.count(MARKER) == 1
    assert os.readlink(bundle.serial_log) == "serial-2.log"
    proc = run_cli("vm", "logs", "runs", "--run", "3")
    assert proc.returncode == 1 and "no serial log of run 3 (runs kept: 1, 2" in proc.stderr

    run_cli("vm", "start", "runs", check=True)
    follower = subprocess.Popen([sys.executable, "-m", "secvf", "vm", "logs", "runs", "-f"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert wait_for_text(bundle.run_serial_log(3), MARKER)
        run_cli("vm", "stop", "runs", "--force", check=True)
        out, _ = follower.communicate(timeout=VM_WAIT_S)  # -f ends with its run
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0 and out.count(MARKER) == 1


def test_the_last_runs_are_kept_private_and_an_old_serial_log_becomes_one(
        tmp_path: Path) -> None:
    bundle = Bundle(tmp_path)
    bundle.serial_log.write_text(f"{EARLIER}\n")  # a bundle from before per-run logs
    assert bundle.current_run() is None
    assert bundle.begin_serial_run() == 2
    assert bundle.run_serial_log(1).read_text() == f"{EARLIER}\n"
    assert bundle.serial_log.read_text() == "" and bundle.current_run() == 2
    runs = [bundle.begin_serial_run() for _ in range(6)]
    assert runs == [3, 4, 5, 6, 7, 8]
    assert bundle.serial_runs() == list(range(9 - SERIAL_RUNS_KEPT, 9))
    assert bundle.current_run() == 8 and os.readlink(bundle.serial_log) == "serial-8.log"
    assert all(stat.S_IMODE(bundle.run_serial_log(r).stat().st_mode) == 0o600
               for r in bundle.serial_runs())


def test_a_sandbox_boot_failure_shows_only_that_boots_serial_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_qemu(tmp_path, monkeypatch.setenv)  # no guest: the agent never answers
    make_vm("sbx", tmp_path, "ai-sandbox")
    bundle, _ = get_vm("sbx")
    bundle.serial_log.write_text(f"{EARLIER}\n")
    with pytest.raises(SandboxBootFailed) as caught:
        start_sandbox("sbx", timeout=2)
    message = str(caught.value)
    assert "last serial output of this boot (run 2)" in message
    assert EARLIER not in message and "(no serial output)" in message
    assert json.loads(run_cli("vm", "status", "sbx", "--json").stdout)["state"] == "stopped"


def test_a_helper_that_fails_shows_only_this_runs_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_qemu(tmp_path, monkeypatch.setenv)
    config = make_vm("helper", tmp_path, "ai-sandbox")
    bundle, _ = get_vm("helper")
    bundle.supervisor_log.write_text(f"{EARLIER}\n")
    blocker = RuntimeFiles(config.id).vsock_socket
    blocker.parent.mkdir(mode=0o700)
    blocker.mkdir()  # the vsock backend cannot listen there
    try:
        with pytest.raises(LaunchFailed) as caught:
            control.start_vm("helper")
    finally:
        blocker.rmdir()
    assert caught.value.what == "device helper 'vsock'"
    assert "cannot listen on" in caught.value.output
    assert EARLIER not in caught.value.output
