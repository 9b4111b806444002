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
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from secvf.machine.plan import qemu_binary
from secvf.model.config import Accel
from secvf.store import paths

PROBE_MARKER = "SECVF-PROBE-OK"
PROBE_TIMEOUT_S = 10.0
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator for one run and why it was chosen."""

    accel: str  # "kvm" or "tcg"
    reason: str  # human-readable justification, shown by status


def choose_accel(requested: Accel, kernel: Path | None, initrd: Path | None) -> AccelChoice:
    """Resolve ``requested`` into ``kvm`` or ``tcg`` (probing and caching for ``auto``)."""
    if requested is Accel.TCG:
        return AccelChoice("tcg", "requested")
    if requested is Accel.KVM:
        return AccelChoice("kvm", "requested")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"{KVM_DEVICE} is not available")
    cache = probe_cache_path()
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    if kernel is None or initrd is None:
        return AccelChoice("tcg", "no SecVF kernel to probe KVM with (build an image)")
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
