"""VMs whose QEMU is the fake QMP peer (``secvf.testing.qmp``): cheap runs of the real
supervisor and control paths, no guest, no disk opened."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from secvf.jail.settings import settings_path
from secvf.model.config import (
    DiskImageBoot,
    IsoBoot,
    SandboxChannels,
    VMConfig,
    new_mac,
    now_iso,
    save_config,
)
from secvf.store import paths
from secvf.testing.qmp import QMPScript, write_fake_qemu

#: How long a test waits for something a VM does (a marker in its serial log).
VM_WAIT_S = 120.0


def make_vm(name: str, files: Path, kind: str = "generic") -> VMConfig:
    """Write a VM's bundle directly: an ISO VM (an AI sandbox: a disk-image one) whose
    ISO or disk image and qcow2 disk are real files (the start path checks them) that
    nothing boots. ``files``: where the ISO or disk image goes."""
    sandbox = kind == "ai-sandbox"
    image = files / f"{name}-boot.img"
    image.write_bytes(bytes(1 << 20))
    config = VMConfig(
        id=str(uuid.uuid4()), name=name, kind=kind, cpus=1, memory_mib=256,
        disk_bytes=64 << 20, network="none", mac=new_mac(), accel="tcg",
        boot=DiskImageBoot(path=str(image), format="raw") if sandbox
        else IsoBoot(path=str(image)),
        channels=SandboxChannels() if sandbox else None,
        created_at=now_iso(), updated_at=now_iso(),
    )
    bundle = paths.vms_dir() / name
    bundle.mkdir()
    save_config(bundle / "vm.json", config)
    backing = ["-b", str(image), "-F", "raw"] if sandbox else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *backing,
                    str(bundle / "disk.qcow2"), str(config.disk_bytes)], check=True)
    return config


def jails_off() -> None:
    """Turn jails off in the test's library: a stand-in QEMU (a script in the test's
    directory) is not in the file view a jail gives QEMU. Jails are tested with the real
    QEMU (tests/integration/test_jail.py, and the unit tests that boot a blank ISO) and
    the launcher on real processes (test_jail_launcher.py)."""
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"enabled": false}')


def use_fake_qemu(directory: Path, setenv: Callable[[str, str], None],
                  **script: object) -> Path:
    """Point ``$SECVF_QEMU`` (through ``setenv``) at a fake QEMU serving ``script`` (jails
    off: :func:`jails_off`); return the file its QMP commands are logged to."""
    jails_off()
    log = directory / "qmp-commands.log"
    exe = write_fake_qemu(directory, QMPScript(command_log=str(log), **script))
    setenv("SECVF_QEMU", str(exe))
    return log


def wait_for_text(path: Path, text: str, timeout: float = VM_WAIT_S) -> bool:
    """Poll ``path`` until it contains ``text``; False if it did not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def open_files(pid: int) -> set[str]:
    """The files process ``pid`` has open (what ``/proc/PID/fd`` points at)."""
    fds = Path(f"/proc/{pid}/fd")
    found = set()
    for fd in fds.iterdir():
        try:
            found.add(os.readlink(fd))
        except OSError:
            continue
    return found
