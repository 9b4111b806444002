"""ISO installs: the disk boots first once it is bootable, the cdrom's medium can be
changed (live over QMP, and for the next start), and ``--wait-ready`` is refused where no
ready marker can come. Real QEMU boots a firmware-only guest from a tiny bootable ISO
(tests/unit/boot_media.py); the refusal paths use the fake QMP peer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from secvf.machine import build_machine
from secvf.model.config import IsoBoot, load_config
from secvf.store import events as seclog
from secvf.store.bundle import RuntimeFiles
from secvf.store.library import get_vm
from tests.helpers import run_cli
from tests.unit.boot_media import boot_sector, bootable_iso
from tests.unit.fake_images import publish_fake_image
from tests.unit.fake_vm import make_vm, open_files, use_fake_qemu, wait_for_text

CD_MARKER = "SECVF-TEST-BOOTED-CD"
DISK_MARKER = "SECVF-TEST-BOOTED-DISK"


@pytest.fixture
def installer(tmp_path: Path) -> Path:
    return bootable_iso(tmp_path / "installer.iso", f"{CD_MARKER}\r\n".encode())


def create_iso_vm(name: str, iso: Path, *extra: str) -> None:
    run_cli("vm", "create", name, "--iso", str(iso), "--memory", "256M", "--disk", "64M",
            "--accel", "tcg", "--network", "none", *extra, check=True)


def status(name: str) -> dict:
    return json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)


def serial_of_run(name: str, run: int) -> str:
    return run_cli("vm", "logs", name, "--run", str(run), check=True).stdout


def make_disk_bootable(name: str, tmp_path: Path) -> None:
    """What an installer leaves behind: a disk with a boot sector (written as qcow2)."""
    bundle, config = get_vm(name)
    raw = tmp_path / "installed.raw"
    with raw.open("wb") as fh:
        fh.write(boot_sector(f"{DISK_MARKER}\r\n".encode()))
        fh.truncate(config.disk_bytes)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(bundle.disk)], check=True)


def test_a_blank_disk_falls_through_to_the_cdrom_and_an_installed_one_boots_first(
        installer: Path, tmp_path: Path) -> None:
    create_iso_vm("inst", installer)
    run_cli("vm", "start", "inst", check=True)
    bundle, _ = get_vm("inst")
    assert wait_for_text(bundle.serial_log, CD_MARKER), "the installer did not boot"
    run_cli("vm", "stop", "inst", "--force", check=True)
    make_disk_bootable("inst", tmp_path)
    run_cli("vm", "start", "inst", check=True)  # the ISO is still in the drive
    assert wait_for_text(bundle.serial_log, DISK_MARKER), "the installed disk did not boot"
    run_cli("vm", "stop", "inst", "--force", check=True)
    assert CD_MARKER not in serial_of_run("inst", 2)


def boot_indexes(name: str) -> dict[str, int]:
    """``{device id: bootindex}`` of VM ``name``'s machine plan."""
    bundle, config = get_vm(name)
    plan = build_machine(config, bundle, RuntimeFiles(config.id), "tcg")
    found = {}
    for flag, value in zip(plan.args, plan.args[1:], strict=False):
        opts = dict(o.partition("=")[::2] for o in value.split(",")[1:])
        if flag == "-device" and "bootindex" in opts:
            found[opts["id"]] = int(opts["bootindex"])
    return found


def test_the_disk_comes_before_the_cdrom_and_never_takes_the_kernel_roms_index(
        installer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    create_iso_vm("order", installer)
    assert boot_indexes("order") == {"disk0dev": 1, "cd0dev": 2}
    monkeypatch.setenv("SECVF_CACHE", str(tmp_path / "cache"))
    publish_fake_image("base")
    run_cli("vm", "create", "kernel", "--disk", "64M", check=True)
    # with -kernel, QEMU's linuxboot ROM has bootindex 0: a device asking for it fails
    assert boot_indexes("kernel") == {"disk0dev": 1}


def test_media_eject_and_insert_change_a_running_vm_and_its_next_start(
        installer: Path, tmp_path: Path) -> None:
    create_iso_vm("media", installer)
    run_cli("vm", "start", "media", check=True)
    bundle, _ = get_vm("media")
    assert wait_for_text(bundle.serial_log, CD_MARKER)
    qemu = status("media")["qemu_pid"]
    assert str(installer) in open_files(qemu)

    out = json.loads(run_cli("vm", "media", "eject", "media", "--json", check=True).stdout)
    assert out == {"name": "media", "medium": None, "live": True}
    assert str(installer) not in open_files(qemu)  # QEMU let go of the ISO at once
    boot = load_config(bundle.config_file).boot
    assert isinstance(boot, IsoBoot) and boot.ejected and boot.path == str(installer)

    other = bootable_iso(tmp_path / "tools.iso", b"SECVF-TEST-TOOLS\r\n")
    proc = run_cli("vm", "media", "insert", "media", str(other), check=True)
    assert "now and from the next start" in proc.stdout
    assert str(other) in open_files(qemu)
    run_cli("vm", "media", "eject", "media", check=True)
    run_cli("vm", "stop", "media", "--force", check=True)

    run_cli("vm", "start", "media", check=True)  # run 2: an empty drive, nothing to boot
    assert str(installer) not in open_files(status("media")["qemu_pid"])
    run_cli("vm", "stop", "media", "--force", check=True)
    assert CD_MARKER not in serial_of_run("media", 2)

    proc = run_cli("vm", "media", "insert", "media", str(other), check=True)  # stopped
    assert "from the next start" in proc.stdout and "now" not in proc.stdout
    run_cli("vm", "start", "media", check=True)  # run 3 boots what was inserted
    assert wait_for_text(bundle.run_serial_log(3), "SECVF-TEST-TOOLS")
    run_cli("vm", "stop", "media", "--force", check=True)
    changes = [e["medium"] for e in seclog.read_events() if e["event"] == "vm_media_changed"]
    assert changes == [None, str(other), None]


def test_media_refuses_what_create_refuses_and_vms_without_a_cdrom(
        installer: Path, tmp_path: Path) -> None:
    create_iso_vm("picky", installer)
    before = get_vm("picky")[1]
    for bad, why in ((Path("/etc/hostname"), "is in /etc"),
                     (tmp_path / "missing.iso", "does not exist"),
                     (tmp_path, "directory")):
        proc = run_cli("vm", "media", "insert", "picky", str(bad))
        assert proc.returncode == 1 and why in proc.stderr, proc.stderr
    assert get_vm("picky")[1] == before
    disk = tmp_path / "appliance.raw"
    disk.write_bytes(bytes(1 << 20))
    run_cli("vm", "create", "appliance", "--disk-image", str(disk), "--disk", "64M",
            check=True)
    proc = run_cli("vm", "media", "eject", "appliance")
    assert proc.returncode == 1
    assert "has no cdrom drive" in proc.stderr and "--iso" in proc.stderr


def test_a_medium_change_qemu_refuses_is_an_error_and_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = use_fake_qemu(tmp_path, monkeypatch.setenv,
                             fail={"eject": "Device 'cd0dev' is locked"})
    make_vm("locked", tmp_path)
    run_cli("vm", "start", "locked", check=True)
    before = get_vm("locked")[1]
    proc = run_cli("vm", "media", "eject", "locked", "--json")
    assert proc.returncode == 1
    assert "QEMU could not eject the cdrom: Device 'cd0dev' is locked" in proc.stderr
    assert json.loads(proc.stdout)["error"]["type"] == "SecVFError"
    assert get_vm("locked")[1] == before
    # the last command but the device watch's qom-list polls (every 0.5 s while running)
    assert [c for c in commands.read_text().split() if c != "qom-list"][-1] == "eject"
    run_cli("vm", "stop", "locked", check=True)


@pytest.mark.parametrize("source", ["iso", "disk-image"])
def test_wait_ready_is_refused_before_anything_starts_where_no_marker_can_come(
        source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = use_fake_qemu(tmp_path, monkeypatch.setenv)
    file = tmp_path / "boot.img"
    file.write_bytes(bytes(1 << 20))
    run_cli("vm", "create", "quiet", f"--{source}", str(file), "--disk", "64M", check=True)
    proc = run_cli("vm", "start", "quiet", "--wait-ready", "5")
    assert proc.returncode == 1
    what = "an ISO" if source == "iso" else "a disk image"
    assert f"VM 'quiet' boots {what}: only the guest of a SecVF image prints the ready " \
           "marker" in proc.stderr
    assert "start it without --wait-ready" in proc.stderr
    assert not commands.exists(), "nothing may start"
    assert status("quiet")["state"] == "stopped" and status("quiet")["last_run"] is None
    run_cli("vm", "start", "quiet", check=True)  # already running: the check still holds
    proc = run_cli("vm", "start", "quiet", "--wait-ready", "5")
    assert proc.returncode == 1 and "boots" in proc.stderr
    run_cli("vm", "stop", "quiet", check=True)
