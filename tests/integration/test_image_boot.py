"""Boot the base image under plain QEMU: ready marker, cmdline parameters, ACPI power-off."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from secvf.image import READY_MARKER, ImageInfo

pytestmark = pytest.mark.vm

READY_TIMEOUT_S = 90
POWEROFF_TIMEOUT_S = 20


def _qemu_argv(image: ImageInfo, overlay: Path, serial: Path, qmp: Path) -> list[str]:
    append = f"{image.cmdline} secvf_hostname=imgtest secvf_nics=52:54:00:12:34:56+dhcp"
    return [
        "qemu-system-x86_64",
        "-machine", "q35,memory-backend=mem",
        "-accel", "tcg",
        "-cpu", "max",
        "-m", "512",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", append,
        "-drive", f"file={overlay},if=none,id=root,format=qcow2",
        "-device", "virtio-blk-pci,drive=root",
        "-device", "virtio-rng-pci",
        "-netdev", "user,id=net0",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
        "-serial", f"file:{serial}",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip


def _wait_for_line(path: Path, marker: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if marker in text.splitlines():
            return text
        assert proc.poll() is None, f"QEMU exited early ({proc.returncode}):\n{text}"
        time.sleep(0.05)
    raise AssertionError(f"no {marker!r} line within {timeout} s:\n{path.read_text()}")


def _qmp(path: Path, *commands: str) -> list[dict]:
    replies = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        stream = sock.makefile("rw")
        assert "QMP" in json.loads(stream.readline())
        for command in ("qmp_capabilities", *commands):
            stream.write(json.dumps({"execute": command}) + "\n")
            stream.flush()
            reply = json.loads(stream.readline())
            while "event" in reply:
                reply = json.loads(stream.readline())
            replies.append(reply)
    return replies


def test_base_image_boots_to_ready_and_powers_off_on_acpi_button(
    built_images: dict[str, ImageInfo], tmp_path: Path
) -> None:
    image = built_images["base"]
    overlay, serial = tmp_path / "overlay.qcow2", tmp_path / "serial.log"
    qmp = Path(f"/tmp/secvf-imgtest-{tmp_path.name}.qmp")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.rootfs),
         str(overlay)],
        check=True,
    )  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(
        _qemu_argv(image, overlay, serial, qmp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        console = _wait_for_line(serial, READY_MARKER, proc, READY_TIMEOUT_S)
        print(f"boot to {READY_MARKER}: {time.monotonic() - started:.2f} s")
        assert "secvf-init: network: eth0 10.0.2.15/24 via 10.0.2.2" in console
        assert "secvf-init: ready: hostname imgtest," in console
        assert "SECVF-BOOT-FAILED" not in console

        assert _qmp(qmp, "system_powerdown")[-1] == {"return": {}}
        pressed = time.monotonic()
        assert proc.wait(timeout=POWEROFF_TIMEOUT_S) == 0
        print(f"system_powerdown to QEMU exit: {time.monotonic() - pressed:.2f} s")
        assert "power button pressed: shutting down" in serial.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        qmp.unlink(missing_ok=True)
