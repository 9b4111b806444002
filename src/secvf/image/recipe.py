"""Image recipes: what goes into a guest image, and the hash that names a build.

A :class:`Recipe` is everything that decides a build's output: the Debian suite, the
package list, the kernel package and the modules the initramfs loads, files the image
gets from the project's source (the exec agent), users, disk headroom and the kernel
command line. :func:`recipe_hash` digests all of it together with the *content* of the
guest scripts (``secvf/guest/init.sh`` and ``secvf/guest/initramfs-init.sh``), of every
file the image gets, and :data:`FORMAT_VERSION` (bump it when the builder changes what it
produces), so editing any of them yields a new hash and therefore a new build.

Recipes: ``base`` (minimal Debian with Python 3, busybox, procps, iproute2, e2fsprogs, and
the restore watch ``/usr/lib/secvf/restore-watch.py`` that init starts in every image) and
``sandbox`` (``base`` + the unprivileged user ``agent`` + the exec agent as one zipapp,
``/usr/lib/secvf/agent/agent.pyz``, built by :func:`~secvf.image.agent_zipapp.agent_zipapp`).

Two more recipes for malware detonation, not built by default (``docs/analysis-images.md``):
``analysis`` (``base`` + strace + the unprivileged user ``analyst`` + the detonator
``/usr/lib/secvf/detonator.py``, and the cdrom drivers in the initramfs; no exec agent) and
``fakenet`` (``base`` + dnsmasq + INetSim + ``/usr/lib/secvf/fakenet.py``: a fake internet
for an isolated network's router address).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from secvf.errors import ImageBuildFailed
from secvf.image.agent_zipapp import agent_zipapp

#: Version of what the builder produces; part of every recipe hash.
FORMAT_VERSION = 1

#: Characters of the recipe hash shown to users and used in directory names.
SHORT_HASH_LEN = 12

#: Where the guest scripts live in the source tree (and in the installed package).
PACKAGE_DIR = Path(__file__).resolve().parent.parent
GUEST_SOURCE_DIR = PACKAGE_DIR / "guest"
INIT_SCRIPT = GUEST_SOURCE_DIR / "init.sh"
INITRAMFS_SCRIPT = GUEST_SOURCE_DIR / "initramfs-init.sh"

#: Path of the exec agent zipapp inside sandbox images; init starts it when it exists.
AGENT_GUEST_PATH = "/usr/lib/secvf/agent/agent.pyz"
#: The restore watch (source ``secvf/guest/restore_watch.py``), in every image; init starts it.
RESTORE_WATCH_SOURCE = GUEST_SOURCE_DIR / "restore_watch.py"
RESTORE_WATCH_GUEST_PATH = "/usr/lib/secvf/restore-watch.py"
#: The detonator (source ``secvf/guest/detonator.py``), in analysis images; init starts it.
DETONATOR_SOURCE = GUEST_SOURCE_DIR / "detonator.py"
DETONATOR_GUEST_PATH = "/usr/lib/secvf/detonator.py"
#: A file in the sample medium's mount point (hidden by the mount): the image has the
#: directory, so no session's disk diff lists it as created.
MOUNT_POINT_MARKER = "/media/sample/.mount-point"
#: The fake internet (source ``secvf/guest/fakenet.py``), in fakenet images; init starts it.
FAKENET_SOURCE = GUEST_SOURCE_DIR / "fakenet.py"
FAKENET_GUEST_PATH = "/usr/lib/secvf/fakenet.py"

#: The agent zipapp's parent packages, as stubs: their real ``__init__`` is host code.

DEFAULT_SUITE = "bookworm"
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"

#: Modules the initramfs loads (with their dependencies) before switching to the rootfs.
BOOT_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport",
    "fuse",
    "virtiofs",
    "pvpanic_pci",
    "pvpanic_mmio",
    "button",  # ACPI power button: QMP system_powerdown
    "evdev",  # /dev/input/event* for busybox acpid
)

#: e2fsprogs: init grows the root filesystem with resize2fs (Priority: required in bookworm,
#: so minbase has it anyway, but named here so a suite that demotes it keeps it). The serial
#: console's agetty (util-linux) and login are Essential.
BASE_PACKAGES = ("python3", "busybox-static", "procps", "iproute2", "e2fsprogs")

#: The analysis image's cdrom: the sample medium arrives in an empty drive after a restore,
#: and with no udev nobody would load a driver then. The cloud kernel has no AHCI driver
#: (q35's own IDE controller), so the drive sits on a PIIX IDE controller (ata_piix) or on
#: virtio-scsi; sr_mod makes /dev/sr0 and isofs reads the medium.
CDROM_MODULES = ("ata_piix", "virtio_scsi", "sr_mod", "isofs")
#: Drivers of host<->guest channels, left out of the analysis initramfs: with ``vsock``
#: loaded /dev/vsock exists even without a device, and a sample should find no channel.
CHANNEL_DRIVERS = ("vsock", "vmw_vsock_virtio_transport", "fuse", "virtiofs")
#: strace runs the sample; setpriv and runuser (util-linux) are Essential, so no more.
ANALYSIS_PACKAGES = (*BASE_PACKAGES, "strace")
#: What agents run in a workspace: git, and venv with pip (python3-venv carries pip and
#: setuptools as wheels, so ``python3 -m venv`` works with no index).
SANDBOX_PACKAGES = (*BASE_PACKAGES, "git", "python3-venv")
#: dnsmasq-base is the daemon without its service scripts (fakenet.py runs it).
FAKENET_PACKAGES = (*BASE_PACKAGES, "dnsmasq-base", "inetsim")


@dataclass(frozen=True)
class GuestFile:
    """A file the image gets from the project's source: a copy, or built from it."""

    dest: str  #: absolute path inside the guest
    source: Path  #: file on the host (with ``build``: what it is built from)
    mode: int = 0o644
    build: Callable[[Path], bytes] | None = None  #: makes the file's bytes from ``source``

    def content(self) -> bytes:
        """Return the file's bytes in the image.

        Raises:
            OSError: a source file cannot be read.
        """
        return self.build(self.source) if self.build else self.source.read_bytes()


@dataclass(frozen=True)
class GuestUser:
    """An account created in the image (with its own group of the same id)."""

    name: str
    uid: int
    home: str
    shell: str = "/bin/sh"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what a guest image contains."""

    name: str
    description: str
    suite: str = DEFAULT_SUITE
    packages: tuple[str, ...] = BASE_PACKAGES
    kernel_package: str = "linux-image-cloud-amd64"
    boot_modules: tuple[str, ...] = BOOT_MODULES
    files: tuple[GuestFile, ...] = ()
    users: tuple[GuestUser, ...] = ()
    disk_headroom_mib: int = 1024
    cmdline: str = DEFAULT_CMDLINE

    @property
    def has_agent(self) -> bool:
        """True if the image carries the exec agent (init will start it)."""
        return any(f.dest == AGENT_GUEST_PATH for f in self.files)


def recipe_hash(recipe: Recipe) -> str:
    """Return the sha256 (hex) of everything that changes ``recipe``'s build output.

    Raises:
        ImageBuildFailed: a file the recipe copies into the image does not exist.
    """
    described = asdict(recipe)
    del described["description"]
    described["files"] = [
        {"dest": f.dest, "mode": f.mode, "sha256": _sha256(f.content, f.source)}
        for f in recipe.files
    ]
    described["format_version"] = FORMAT_VERSION
    described["init_sh"] = _sha256(INIT_SCRIPT.read_bytes, INIT_SCRIPT)
    described["initramfs_init_sh"] = _sha256(INITRAMFS_SCRIPT.read_bytes, INITRAMFS_SCRIPT)
    canonical = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """Return the host's Debian codename, or :data:`DEFAULT_SUITE` on other systems."""
    try:
        text = os_release.read_text()
    except OSError:
        return DEFAULT_SUITE
    fields = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    if fields.get("ID", "").strip('"') != "debian":
        return DEFAULT_SUITE
    return fields.get("VERSION_CODENAME", "").strip('"') or DEFAULT_SUITE


def _sha256(read: Callable[[], bytes], source: Path) -> str:
    try:
        return hashlib.sha256(read()).hexdigest()
    except FileNotFoundError as exc:
        raise ImageBuildFailed(
            "recipe", f"{exc.filename or source} does not exist (it is part of the image recipe)"
        ) from None
    except OSError as exc:
        where = exc.filename or source
        raise ImageBuildFailed("recipe", f"cannot read {where}: {exc.strerror}") from None


def _empty(_source: Path) -> bytes:
    return b""


def _builtin_recipes() -> dict[str, Recipe]:
    suite = host_suite()
    base = Recipe(
        name="base",
        description="Debian minbase with Python 3, busybox, procps, iproute2 and e2fsprogs, "
                    "and the restore watch; no exec agent",
        suite=suite,
        files=(GuestFile(RESTORE_WATCH_GUEST_PATH, RESTORE_WATCH_SOURCE),),
    )
    sandbox = replace(
        base,
        name="sandbox",
        description="base + git + python3-venv + unprivileged user 'agent' (uid 1000) + the "
                    "SecVF exec agent",
        packages=SANDBOX_PACKAGES,
        files=(*base.files, GuestFile(AGENT_GUEST_PATH, PACKAGE_DIR, build=agent_zipapp)),
        users=(GuestUser("agent", 1000, "/home/agent"),),
    )
    analysis = replace(
        base,
        name="analysis",
        description="base + strace + unprivileged user 'analyst' (uid 1000) + the detonator "
                    "(runs the sample of a read-only cdrom medium under strace); no exec agent",
        packages=ANALYSIS_PACKAGES,
        boot_modules=(*(m for m in BOOT_MODULES if m not in CHANNEL_DRIVERS), *CDROM_MODULES),
        files=(*base.files, GuestFile(DETONATOR_GUEST_PATH, DETONATOR_SOURCE, mode=0o755),
               # the medium's mount point is in the image, so no disk diff shows it made
               GuestFile(MOUNT_POINT_MARKER, DETONATOR_SOURCE, build=_empty)),
        users=(GuestUser("analyst", 1000, "/home/analyst"),),
    )
    fakenet = replace(
        base,
        name="fakenet",
        description="base + dnsmasq + INetSim: a fake internet (every name resolves to it, "
                    "HTTP/HTTPS/SMTP/FTP/IRC/... answer) on an isolated network's router address",
        packages=FAKENET_PACKAGES,
        files=(*base.files, GuestFile(FAKENET_GUEST_PATH, FAKENET_SOURCE, mode=0o755)),
    )
    return {r.name: r for r in (base, sandbox, analysis, fakenet)}


#: The recipes ``secvf image build`` knows, by name.
RECIPES: dict[str, Recipe] = _builtin_recipes()

#: Images the test session and ``secvf image build`` (without a name) build.
DEFAULT_IMAGES = ("base", "sandbox")
