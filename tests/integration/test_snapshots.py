"""VM snapshots on real VMs: a running generic VM saved and reverted to the saved instant,
disk snapshots of a stopped VM, and every way a snapshot can fail without losing the VM:
damaged or mismatched files, a second command, a killed supervisor, a full disk, and a
channel device planted while the VM runs.

One generic VM with a root shell on its serial console (``--autologin``) is shared by the
module; tests that break a VM make their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf import api
from secvf.errors import (
    CorruptRecord,
    LockBusy,
    SecVFError,
    SnapshotError,
    StateError,
)
from secvf.jail.settings import settings_path
from secvf.runtime.control import wait_for_ready
from secvf.store import snapshots as store
from secvf.store.events import read_events
from secvf.store.library import get_vm
from secvf.store.locks import locked
from secvf.store.savedstate import ram_file
from tests.integration.serial_shell import SerialShell

pytestmark = pytest.mark.vm

VM = "snap-gen"
BOOT_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def gen(vm_library: Path) -> Iterator[str]:
    """A running generic VM with a root shell on its console; deleted at the end."""
    api.create_vm(VM, kind=api.VMKind.GENERIC, image="base", memory="512M", autologin=True)
    api.start_vm(VM, wait_ready=BOOT_TIMEOUT_S)
    yield VM
    api.delete_vm(VM, force=True)


def shell(name: str, command: str) -> str:
    with SerialShell(name) as sh:
        return sh.run(command)


def ensure_running(name: str) -> None:
    if api.vm_status(name)["state"] != "running":
        api.start_vm(name, wait_ready=BOOT_TIMEOUT_S)


def test_a_memory_snapshot_reverts_a_running_vm_to_the_saved_instant(gen: str) -> None:
    ensure_running(gen)
    shell(gen, "echo before > /root/disk-before; echo mem > /tmp/mem-before; sync")
    info = api.create_snapshot(gen, "s1")
    assert info.kind is api.SnapshotKind.MEMORY and info.vm_was == "running"
    assert info.state is not None and info.state.ram_bytes == 512 << 20
    shell(gen, "echo after > /root/disk-after; rm /tmp/mem-before; sync")
    status = api.revert_snapshot(gen, "s1")
    assert status["state"] == "running" and status["restored_from"].endswith("snapshots/s1")
    assert status["guest_ready"]  # it was ready when saved
    # /tmp is RAM only: it is there again because the memory was restored, not rebooted
    assert shell(gen, "cat /root/disk-before /tmp/mem-before; ls /root/disk-after 2>&1"
                 ).splitlines() == ["before", "mem",
                                    "ls: cannot access '/root/disk-after': No such file or "
                                    "directory"]
    assert "s1" in api.vm_status(gen)["snapshots"]
    assert [s.name for s in api.list_snapshots(gen)] == ["s1"]


def test_a_reverted_vm_can_be_reverted_again(gen: str) -> None:
    ensure_running(gen)
    if "s1" not in api.vm_status(gen)["snapshots"]:
        api.create_snapshot(gen, "s1")
    shell(gen, "echo x > /tmp/scratch")
    api.revert_snapshot(gen, "s1")
    assert shell(gen, "ls /tmp/scratch 2>&1 | grep -c 'No such' || true") == "1"


def test_a_disk_snapshot_reverts_a_stopped_vm(gen: str) -> None:
    ensure_running(gen)
    shell(gen, "rm -f /root/later; sync")
    api.stop_vm(gen)
    info = api.create_snapshot(gen, "d1")
    assert info.kind is api.SnapshotKind.DISK and info.state is None
    api.start_vm(gen, wait_ready=BOOT_TIMEOUT_S)
    shell(gen, "echo later > /root/later; sync")
    with pytest.raises(StateError, match="stop the VM first"):
        api.revert_snapshot(gen, "d1")
    api.stop_vm(gen)
    assert api.revert_snapshot(gen, "d1")["state"] == "stopped"
    api.start_vm(gen, wait_ready=BOOT_TIMEOUT_S)
    assert "No such file" in shell(gen, "cat /root/later 2>&1")
    api.delete_snapshot(gen, "d1")
    assert "d1" not in api.vm_status(gen)["snapshots"]


def test_a_damaged_snapshot_is_refused_before_the_vm_is_touched(gen: str) -> None:
    ensure_running(gen)
    api.create_snapshot(gen, "broken")
    bundle, _ = get_vm(gen)
    ram = ram_file(store.snapshot_dir(bundle, "broken"))
    os.truncate(ram, 4096)
    with pytest.raises(CorruptRecord, match="truncated"):
        api.revert_snapshot(gen, "broken")
    assert api.vm_status(gen)["state"] == "running"
    ram.unlink()
    with pytest.raises(SecVFError, match="is missing"):
        api.revert_snapshot(gen, "broken")
    api.delete_snapshot(gen, "broken")


def test_a_snapshot_of_another_machine_shape_is_refused(gen: str) -> None:
    ensure_running(gen)
    api.create_snapshot(gen, "shape")
    bundle, _ = get_vm(gen)
    record = store.snapshot_dir(bundle, "shape") / "snapshot.json"
    data = json.loads(record.read_text())
    data["state"]["shape"]["qemu_version"] = "1.0.0"
    record.write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match="qemu version was 1.0.0 when saved"):
        api.revert_snapshot(gen, "shape")
    assert api.vm_status(gen)["state"] == "running"
    api.delete_snapshot(gen, "shape")


def test_snapshot_commands_on_one_vm_exclude_each_other(gen: str) -> None:
    bundle, _ = get_vm(gen)
    with locked(bundle.edit_lock, "test"):
        with pytest.raises(LockBusy):
            api.create_snapshot(gen, "busy")
        with pytest.raises(LockBusy):
            api.delete_snapshot(gen, "s1")
    assert "busy" not in api.vm_status(gen)["snapshots"]


def test_duplicate_and_bad_names_are_refused(gen: str) -> None:
    ensure_running(gen)
    if "s1" not in api.vm_status(gen)["snapshots"]:
        api.create_snapshot(gen, "s1")
    with pytest.raises(SecVFError, match="already has a snapshot 's1'"):
        api.create_snapshot(gen, "s1")
    for bad in ("../x", ".h", "a b"):
        with pytest.raises(SecVFError):
            api.create_snapshot(gen, bad)
    with pytest.raises(SecVFError, match="does not exist"):
        api.revert_snapshot(gen, "nope")


def test_a_supervisor_killed_during_a_save_leaves_no_snapshot(vm_library: Path) -> None:
    name = "snap-kill"
    api.create_vm(name, kind=api.VMKind.GENERIC, image="base", memory="512M")
    try:
        api.start_vm(name, wait_ready=BOOT_TIMEOUT_S)
        bundle, _ = get_vm(name)
        status = api.vm_status(name)
        pid, qemu_pid = status["pid"], status["qemu_pid"]
        errors: list[BaseException] = []

        def save() -> None:
            try:
                api.create_snapshot(name, "k")
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                errors.append(exc)

        worker = threading.Thread(target=save)
        worker.start()
        deadline = time.monotonic() + 30
        while not list((bundle.path / "snapshots").glob(".saving-*/*")):
            assert time.monotonic() < deadline, "the save never began"
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        worker.join(60)
        assert errors and isinstance(errors[0], SecVFError)
        deadline = time.monotonic() + 30
        while api.vm_status(name)["state"] in ("running", "stopping") or Path(
                f"/proc/{qemu_pid}").exists():  # QEMU dies with its supervisor, a moment later
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert api.vm_status(name)["snapshots"] == []
        api.create_snapshot(name, "after")  # sweeps the killed save's leftovers
        assert not list((bundle.path / "snapshots").glob(".saving-*"))
        assert [s.name for s in api.list_snapshots(name)] == ["after"]
        assert store.sweep(bundle) == []  # no orphan disk snapshot left
    finally:
        api.delete_vm(name, force=True)


def test_a_full_disk_fails_the_save_and_the_vm_keeps_running(vm_library: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    try:
        monkeypatch.setenv("SECVF_HOME", str(small / "home"))
        name = "snap-full"
        api.create_vm(name, kind=api.VMKind.GENERIC, image="base", memory="256M", autologin=True)
        try:
            api.start_vm(name, wait_ready=BOOT_TIMEOUT_S)
            with pytest.raises(SnapshotError, match="No space left"):
                api.create_snapshot(name, "big")
            status = api.vm_status(name)
            assert status["state"] == "running" and status["snapshots"] == []
            bundle, _ = get_vm(name)
            assert not list((bundle.path / "snapshots").glob("*"))
            assert shell(name, "echo alive") == "alive"  # the guest runs on
        finally:
            api.delete_vm(name, force=True)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_channel_device_planted_in_a_running_vm_stops_it(vm_library: Path,
                                                          tmp_path: Path, monkeypatch) -> None:
    """QEMU 7.2 sends no event when a device is added: the supervisor's device watch
    finds it. The device is planted through a second QMP monitor a wrapper gave QEMU."""
    plant = tmp_path / "plant.sock"
    wrapper = tmp_path / "qemu"
    wrapper.write_text("#!/bin/sh\nexec qemu-system-x86_64 \"$@\" "
                       f"-qmp unix:{plant},server=on,wait=off "
                       "-device pcie-root-port,id=plantrp,chassis=9,slot=9\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("SECVF_QEMU", str(wrapper))
    settings = settings_path()  # the wrapper script is not in a jail's view
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text('{"enabled": false}')
    name = "snap-plant"
    api.create_vm(name, kind=api.VMKind.MALWARE_ANALYSIS, image="base", memory="256M")
    try:
        api.start_vm(name)
        wait_for_ready(name, BOOT_TIMEOUT_S)
        qmp_add(plant, {"driver": "virtio-serial-pci", "id": "planted", "bus": "plantrp"})
        deadline = time.monotonic() + 60
        while api.vm_status(name)["state"] != "crashed":
            assert time.monotonic() < deadline, "the planted device went unnoticed"
            time.sleep(0.2)
        reason = api.vm_status(name)["last_run"]["reason"]
        assert "forbidden device appeared" in reason and "virtio-serial" in reason
        events = [e for e in read_events() if e.get("vm") == name
                  and e.get("event") == "forbidden_device"]
        assert events and events[-1]["severity"] == "CRITICAL"
    finally:
        api.delete_vm(name, force=True)
        settings.unlink()


def qmp_add(path: Path, device: dict[str, str]) -> None:
    """``device_add`` through a QMP monitor of one's own (a plain socket, no library)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        reader = sock.makefile("rb")
        reader.readline()  # greeting
        for command in ({"execute": "qmp_capabilities"},
                        {"execute": "device_add", "arguments": device}):
            sock.sendall(json.dumps(command).encode() + b"\n")
            while True:
                reply = json.loads(reader.readline())
                if "event" not in reply:
                    break
            assert "return" in reply, reply
