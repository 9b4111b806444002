"""Choosing the accelerator: KVM only when a guest provably runs under it.

``/dev/kvm`` existing is not enough: on some hosts (nested setups, broken
firmware) Linux guests hang under KVM. So ``auto`` boots SecVF's own kernel and
initramfs under KVM with ``secvf_probe=1``; the initramfs prints
:data:`PROBE_MARKER` and powers off at once. If the marker arrives within
:data:`PROBE_TIMEOUT_S`, KVM works; otherwise TCG is used. The probe runs the QEMU
SecVF drives (``$SECVF_QEMU`` or ``qemu-system-x86_64``), and the verdict is cached
per host boot and QEMU binary: the cache file is named by
``/proc/sys/kernel/random/boot_id`` and a hash of the binary's resolved path, size
and mtime, so another or a rebuilt QEMU is probed afresh (:func:`probe_cache_path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from secvf.errors import ConfigError
from secvf.machine.common import resolve_image
from secvf.machine.plan import qemu_binary
from secvf.model.config import Accel, ImageBoot, VMConfig
from secvf.store import paths

PROBE_MARKER = "SECVF-PROBE-OK"
PROBE_TIMEOUT_S = 10.0
#: How long the firmware-only check waits for QEMU's firmware to write its first byte.
FIRMWARE_PROBE_TIMEOUT_S = 5.0
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator for one run and why it was chosen."""

    accel: str  # "kvm" or "tcg"
    reason: str  # human-readable justification, shown by status


def accel_for_vm(config: VMConfig) -> AccelChoice:
    """:func:`choose_accel` for VM ``config``'s own setting, probing KVM with its image's
    kernel when it boots a SecVF image.

    Raises:
        NotFound: the VM's image build is gone.
        ConfigError: as :func:`choose_accel`.
    """
    image = resolve_image(config.boot) if isinstance(config.boot, ImageBoot) else None
    return choose_accel(config.accel, image.kernel if image else None,
                        image.initrd if image else None)


def choose_accel(requested: Accel, kernel: Path | None, initrd: Path | None) -> AccelChoice:
    """Resolve ``requested`` into ``kvm`` or ``tcg`` (probing and caching for ``auto``).

    Raises:
        ConfigError: ``kvm`` was asked for explicitly and KVM does not work here.
    """
    if requested is Accel.TCG:
        return AccelChoice("tcg", "requested")
    if requested is Accel.KVM:
        problem = kvm_problem(kernel, initrd)
        if problem is not None:
            raise ConfigError(f"KVM is not usable here: {problem}; use --accel tcg or auto")
        return AccelChoice("kvm", "requested")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"{KVM_DEVICE} is not available")
    if kernel is None or initrd is None:
        return AccelChoice("tcg", "no SecVF kernel to probe KVM with (build an image)")
    return _kvm_verdict(kernel, initrd)


def kvm_problem(kernel: Path | None, initrd: Path | None) -> str | None:
    """Why KVM does not work on this host, or None if it does as far as can be seen.

    With a SecVF kernel this is the (cached) boot probe ``auto`` uses; without one,
    QEMU runs only its firmware under KVM (:func:`firmware_problem`), which catches a
    QEMU that cannot use KVM at all but not a Linux guest that hangs.
    """
    if not KVM_DEVICE.exists():
        return f"{KVM_DEVICE} does not exist (no KVM module, or no nested virtualization)"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"this user cannot open {KVM_DEVICE} (add it to the 'kvm' group)"
    if kernel is None or initrd is None:
        return firmware_problem()
    verdict = _kvm_verdict(kernel, initrd)
    return None if verdict.accel == "kvm" else verdict.reason


def firmware_problem(timeout_s: float = FIRMWARE_PROBE_TIMEOUT_S) -> str | None:
    """Start QEMU under KVM with nothing but its firmware; None once the firmware wrote
    its first byte to the debug console (or QEMU neither wrote nor exited in
    ``timeout_s``: KVM is not ruled out), else why QEMU failed."""
    argv = [qemu_binary(), "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "64",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-chardev", "stdio,id=fw", "-device", "isa-debugcon,iobase=0x402,chardev=fw"]
    try:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        return f"cannot run {argv[0]}: {exc.strerror}"
    assert qemu.stdout is not None
    try:
        readable, _, _ = select.select([qemu.stdout], [], [], timeout_s)
        if not readable or os.read(qemu.stdout.fileno(), 1):
            return None
    finally:
        qemu.kill()
        _, stderr = qemu.communicate()
    lines = [line for line in stderr.decode(errors="replace").splitlines()
             if line.strip() and "warning:" not in line]
    return f"QEMU under KVM failed: {lines[0] if lines else f'exit status {qemu.returncode}'}"


def _kvm_verdict(kernel: Path, initrd: Path) -> AccelChoice:
    """The boot probe's verdict for this host boot and QEMU binary (probed once)."""
    cache = probe_cache_path()
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    choice = probe_accel("kvm", kernel, initrd)
    _write_cache(cache, choice)
    return choice


def probe_accel(
    accel: str, kernel: Path, initrd: Path, timeout_s: float = PROBE_TIMEOUT_S
) -> AccelChoice:
    """Boot ``kernel`` under ``accel`` with SecVF's QEMU (:func:`qemu_binary`) and report
    whether its initramfs reached userspace.

    Returns ``accel`` on success, ``tcg`` (with the reason) otherwise.
    """
    argv = [
        qemu_binary(), "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-m", "256", "-nodefaults",
        "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet secvf_probe=1",
    ]
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return AccelChoice("tcg", f"{accel} probe: no guest output within {timeout_s:.0f} s")
    except OSError as exc:
        return AccelChoice("tcg", f"{accel} probe could not run QEMU: {exc}")
    if PROBE_MARKER.encode() in proc.stdout:
        took = time.monotonic() - started
        return AccelChoice(accel, f"{accel} probe booted a guest in {took:.1f} s")
    tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    return AccelChoice("tcg", f"{accel} probe failed: {tail[0]}")


def probe_cache_path(qemu: str | None = None) -> Path:
    """The cache file of the KVM verdict for this host boot and QEMU binary
    (``qemu``, default :func:`qemu_binary`)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    binary = _binary_identity(qemu or qemu_binary())
    digest = hashlib.sha256(binary.encode()).hexdigest()[:16]
    return paths.cache_dir() / f"kvm-probe-{boot_id}-{digest}.json"


def _binary_identity(qemu: str) -> str:
    """Resolved path, size and mtime of ``qemu`` (just the name if it cannot be found)."""
    found = shutil.which(qemu)
    if found is None:
        return qemu
    real = os.path.realpath(found)
    try:
        st = os.stat(real)
    except OSError:
        return real
    return f"{real}\0{st.st_size}\0{st.st_mtime_ns}"


def _read_cache(path: Path) -> AccelChoice | None:
    try:
        data = json.loads(path.read_text())
        return AccelChoice(str(data["accel"]), str(data["reason"]) + " (cached for this boot)")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, choice: AccelChoice) -> None:
    try:
        path.write_text(json.dumps({"accel": choice.accel, "reason": choice.reason,
                                    "qemu": qemu_binary()}))
    except OSError:
        pass
