"""Baseline guest disks for the benchmarks, built with SecVF's own image code as a library.

Two disks, both booted by the benchmarks with plain QEMU (never through SecVF's machine
builders) and with the *same* ``vmlinuz`` and ``initrd.img`` as SecVF's ``base`` image:

* :func:`systemd_disk` — a Debian rootfs with systemd (``systemd-sysv``, ``udev``, ``dbus``),
  ``openssh-server``, ``qemu-guest-agent`` and ``iproute2``, networking by systemd-networkd
  (DHCP on ``en*``/``eth*``). SecVF's initramfs hands over to ``/sbin/secvf-init``, which
  here is a two-line script that execs systemd. Once ``multi-user.target`` is reached a
  oneshot unit prints :data:`MULTI_USER_MARKER` on ``ttyS0``. Root logs in over SSH with a
  key the benchmark generates per run and passes on the kernel command line as
  ``bench_authkey=<base64>`` (read by an ``AuthorizedKeysCommand``), so the cached disk
  holds no key.
* :func:`tcp_server_disk` — SecVF's ``sandbox`` disk with one file changed (with
  ``debugfs``, no mount): the exec agent's path holds the benchmark's guest servers, so
  the guest init starts them in TCP mode instead of the agent. Same kernel, init, Python
  and rootfs as the sandbox; the vsock benchmark reaches it over a ``hostfwd`` port.

Both are cached under ``~/.cache/secvf/bench/`` keyed by everything that decides their
content, so a rerun costs nothing. Building needs root (as SecVF's own image builds).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from secvf.image import ImageInfo, rootfs
from secvf.image import disk as image_disk
from secvf.image.kernel import KernelTree
from secvf.image.recipe import AGENT_GUEST_PATH, Recipe, host_suite
from secvf.store import paths

#: Bump when this module changes what it produces.
BUILDER_VERSION = 1

MULTI_USER_MARKER = "BENCH-MULTI-USER"
AUTHKEY_PARAM = "bench_authkey"

SYSTEMD_PACKAGES = (
    "systemd-sysv", "udev", "dbus", "openssh-server", "qemu-guest-agent", "iproute2",
)  # fmt: skip

INIT_EXEC_SYSTEMD = "#!/bin/sh\n# SecVF's initramfs runs this as PID 1: hand over to systemd.\n" \
    "exec /lib/systemd/systemd \"$@\"\n"  # fmt: skip

NETWORK_UNIT = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"

READY_UNIT = f"""[Unit]
Description=Benchmark marker: multi-user.target reached
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "{MULTI_USER_MARKER} $(cut -d" " -f1 /proc/uptime)" >/dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""

AUTHKEYS_SCRIPT = f"""#!/bin/sh
# sshd AuthorizedKeysCommand: root's key comes from the kernel command line.
[ "$1" = root ] || exit 0
for word in $(cat /proc/cmdline); do
    case "$word" in {AUTHKEY_PARAM}=*) echo "${{word#{AUTHKEY_PARAM}=}}" | base64 -d ;; esac
done
"""

SSHD_CONFIG = """AuthorizedKeysCommand /usr/local/sbin/bench-authorized-keys %u
AuthorizedKeysCommandUser nobody
PermitRootLogin prohibit-password
UseDNS no
"""

ADDED_FILES: dict[str, tuple[str, int]] = {
    "/sbin/secvf-init": (INIT_EXEC_SYSTEMD, 0o755),
    "/etc/systemd/network/10-bench.network": (NETWORK_UNIT, 0o644),
    "/etc/systemd/system/bench-ready.service": (READY_UNIT, 0o644),
    "/usr/local/sbin/bench-authorized-keys": (AUTHKEYS_SCRIPT, 0o755),
    "/etc/ssh/sshd_config.d/bench.conf": (SSHD_CONFIG, 0o644),
    "/etc/hostname": ("baseline\n", 0o644),
}
ENABLED_UNITS = ("systemd-networkd.service", "bench-ready.service")


@dataclass(frozen=True)
class BaselineDisk:
    """A cached baseline root disk (raw ext4, used read-only behind a qcow2 overlay)."""

    name: str
    key: str  #: hash of everything that decides the content
    rootfs: Path

    @property
    def short(self) -> str:
        """The 12-digit key shown in benchmark tables."""
        return self.key[:12]


def authkey_param(public_key_line: str) -> str:
    """Kernel command-line word that authorises ``public_key_line`` for root over SSH."""
    encoded = base64.b64encode(public_key_line.strip().encode()).decode()
    return f"{AUTHKEY_PARAM}={encoded}"


def bench_cache() -> Path:
    """``~/.cache/secvf/bench`` (or under ``$SECVF_CACHE``)."""
    return paths.ensure_private_dir(paths.cache_dir() / "bench")


def systemd_disk(base: ImageInfo, progress=print) -> BaselineDisk:
    """Return the systemd + sshd + qemu-guest-agent disk for ``base``'s kernel, building it
    (about a minute with mmdebstrap) if it is not cached."""
    recipe = Recipe(
        name="bench-systemd",
        description="benchmark baseline",
        suite=host_suite(),
        packages=SYSTEMD_PACKAGES,
    )
    described = {
        "builder": BUILDER_VERSION,
        "suite": recipe.suite,
        "packages": recipe.packages,
        "files": ADDED_FILES,
        "units": ENABLED_UNITS,
        "kernel": base.kernel_version,
        "headroom_mib": recipe.disk_headroom_mib,
    }
    key = _digest(described)
    target = bench_cache() / f"systemd-{key[:12]}"
    disk = BaselineDisk("systemd", key, target / "rootfs.img")
    if disk.rootfs.is_file():
        return disk
    progress(f"building baseline disk {target.name} (mmdebstrap: about a minute, once)")
    kernel = _kernel_tree(base)
    with _staging(target) as work:
        stage = rootfs.package_stage(recipe, paths.cache_dir())
        tree = work / "tree"
        rootfs.unpack_stage(stage, tree)
        rootfs.customize(tree, recipe, kernel)
        for dest, (text, mode) in ADDED_FILES.items():
            _write(rootfs.guest_path(tree, dest), text, mode)
        subprocess.run(
            ["systemctl", f"--root={tree}", "enable", *ENABLED_UNITS],
            check=True,
            capture_output=True,
        )
        size = image_disk.disk_size(rootfs.tree_size(tree), recipe.disk_headroom_mib)
        image_disk.make_ext4(tree, work / "rootfs.img", size)
        rootfs.remove_tree(tree)
        (work / "key.json").write_text(json.dumps(described, default=str, indent=1))
    return disk


def tcp_server_disk(sandbox: ImageInfo, server_script: Path, progress=print) -> BaselineDisk:
    """Return a copy of ``sandbox``'s disk whose agent path holds ``server_script``."""
    key = _digest(
        {
            "builder": BUILDER_VERSION,
            "sandbox": sandbox.recipe_hash,
            "script": hashlib.sha256(server_script.read_bytes()).hexdigest(),
        }
    )
    target = bench_cache() / f"tcpsrv-{key[:12]}"
    disk = BaselineDisk("sandbox+tcp-servers", key, target / "rootfs.img")
    if disk.rootfs.is_file():
        return disk
    progress(f"building baseline disk {target.name} (copy of sandbox, agent swapped)")
    agent = AGENT_GUEST_PATH  # python3 runs a plain script under this name too
    with _staging(target) as work:
        image = work / "rootfs.img"
        subprocess.run(["cp", "--sparse=always", str(sandbox.rootfs), str(image)], check=True)
        os.chmod(image, 0o644)
        commands = f"rm {agent}\nwrite {server_script} {agent}\n"
        subprocess.run(
            ["debugfs", "-w", "-f", "-", str(image)],
            input=commands.encode(),
            check=True,
            capture_output=True,
        )
        check = subprocess.run(
            ["debugfs", "-R", f"stat {agent}", str(image)],
            capture_output=True,
            text=True,
            check=True,
        )
        if f"Size: {server_script.stat().st_size}" not in check.stdout:
            raise RuntimeError(f"debugfs did not write {agent} into {image}")
        os.chmod(image, 0o444)
    return disk


class _staging:
    """A temporary build dir next to ``target``, renamed into place on success."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.work = Path(tempfile.mkdtemp(prefix=f".build-{target.name}-", dir=target.parent))

    def __enter__(self) -> Path:
        return self.work

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is None:
            os.rename(self.work, self.target)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def _kernel_tree(base: ImageInfo) -> KernelTree:
    kernels = paths.cache_dir() / "kernels"
    for root in sorted(kernels.glob("linux-image-*")):
        if (root / "lib" / "modules" / base.kernel_version).is_dir():
            return KernelTree(base.kernel_version, f"linux-image-{base.kernel_version}", root)
    raise RuntimeError(
        f"kernel {base.kernel_version} is not unpacked under {kernels}; "
        "rebuild the base image: secvf image build base --force"
    )


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_text(text)
    os.chmod(path, mode)


def _digest(described: dict) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
