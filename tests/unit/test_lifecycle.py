"""VM lifecycle with real QEMU processes (firmware-only guests booting a blank ISO:
no guest image needed, so these run in every test session)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from secvf.store import events as seclog
from tests.helpers import run_cli


@pytest.fixture
def iso(tmp_path: Path) -> Path:
    path = tmp_path / "blank.iso"
    path.write_bytes(b"\0" * 2048)
    return path


def status(name: str) -> dict:
    return json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)


def qemu_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def wait_until(pred, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_start_status_stop_transitions_in_order(iso: Path) -> None:
    run_cli("vm", "create", "life", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    assert status("life")["state"] == "stopped"
    run_cli("vm", "start", "life", check=True)
    st = status("life")
    assert st["state"] == "running" and st["accel"] == "tcg"
    assert qemu_alive(st["qemu_pid"])
    types = {d["type"] for d in st["devices"]}
    assert {"virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci", "ide-cd", "pvpanic"} <= types
    assert st["channels"] == []
    proc = run_cli("vm", "start", "life")
    assert proc.returncode != 0 and "already running" in proc.stderr
    run_cli("vm", "stop", "life", "--timeout", "1", check=True)
    qemu_pid = st["qemu_pid"]
    st = status("life")
    assert st["state"] == "stopped" and not qemu_alive(qemu_pid)
    states = [s for s, _ in st["last_run"]["transitions"]]
    assert states == ["starting", "running", "stopping", "stopped"]
    events = [e["event"] for e in seclog.read_events() if e.get("vm") == "life"]
    assert events == ["vm_created", "vm_started", "vm_forced_stop", "vm_stopped"]


def test_kill_9_of_the_supervisor_takes_qemu_down(iso: Path) -> None:
    run_cli("vm", "create", "k9", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    run_cli("vm", "start", "k9", check=True)
    st = status("k9")
    runtime = Path(os.environ["SECVF_RUNTIME_DIR"])
    assert (runtime / f"qmp-{st['id']}.sock").exists()
    os.kill(st["pid"], signal.SIGKILL)
    assert wait_until(lambda: not qemu_alive(st["qemu_pid"])), "QEMU outlived its supervisor"
    assert status("k9")["state"] == "stopped"
    assert [p.name for p in runtime.iterdir() if st["id"] in p.name] == []


def test_concurrent_starts_exactly_one_wins(iso: Path) -> None:
    run_cli("vm", "create", "race", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(
        run_cli("vm", "start", "race").returncode)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(0) == 1, results
    assert status("race")["state"] == "running"
    run_cli("vm", "stop", "race", "--force", check=True)


def test_delete_running_vm_needs_force(iso: Path, secvf_env: Path) -> None:
    run_cli("vm", "create", "del", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    run_cli("vm", "start", "del", check=True)
    qemu = status("del")["qemu_pid"]
    proc = run_cli("vm", "delete", "del")
    assert proc.returncode != 0 and "running" in proc.stderr
    assert (secvf_env / "vms" / "del" / "vm.json").exists()
    run_cli("vm", "delete", "del", "--force", check=True)
    assert not (secvf_env / "vms" / "del").exists()
    assert not qemu_alive(qemu)


def test_qemu_failure_shows_stderr_and_command_line(iso: Path) -> None:
    run_cli("vm", "create", "bad", "--iso", str(iso), "--accel", "tcg", check=True)
    iso.unlink()
    proc = run_cli("vm", "start", "bad")
    assert proc.returncode != 0
    assert "QEMU failed to start" in proc.stderr
    assert "command line: qemu-system-x86_64" in proc.stderr
    assert str(iso) in proc.stderr
    assert status("bad")["state"] == "stopped"


def test_runtime_check_stops_a_vm_with_a_smuggled_channel(iso: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    wrapper = tmp_path / "qemu-wrapper"
    wrapper.write_text('#!/bin/sh\nexec qemu-system-x86_64 "$@" '
                       "-device virtio-serial-pci,id=smuggled\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("SECVF_QEMU", str(wrapper))
    run_cli("vm", "create", "evil", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    proc = run_cli("vm", "start", "evil")
    assert proc.returncode != 0 and "forbidden host-guest channel" in proc.stderr
    assert status("evil")["state"] == "stopped"
    critical = [e for e in seclog.read_events() if e["event"] == "forbidden_device"]
    assert critical and critical[0]["severity"] == "CRITICAL"
    assert "virtio-serial" in json.dumps(critical[0]["devices"])


def test_clone_and_rename_keep_kind_and_get_new_identity(iso: Path) -> None:
    run_cli("vm", "create", "src", "--kind", "malware-analysis", "--iso", str(iso),
            check=True)
    run_cli("vm", "clone", "src", "dst", check=True)
    a, b = status("src"), status("dst")
    assert b["kind"] == "malware-analysis" and b["network"] == "none"
    assert a["id"] != b["id"]
    run_cli("vm", "rename", "dst", "dst2", check=True)
    assert status("dst2")["id"] == b["id"]
    run_cli("vm", "start", "dst2", "--accel", "tcg", check=True)
    assert status("dst2")["state"] == "running"
    run_cli("vm", "stop", "dst2", "--force", check=True)
