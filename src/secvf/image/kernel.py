"""Fetching the guest kernel: a Debian ``linux-image-*`` package, unpacked, never installed.

The recipe names a meta package (``linux-image-cloud-amd64``); apt resolves it to the
concrete ``linux-image-<version>-cloud-amd64`` package, which is downloaded with
``apt-get download`` (using the host's apt sources) into ``<cache>/kernels/``, checked
against the archive's SHA-256, unpacked with ``dpkg-deb -x`` and given a ``modules.dep``
with ``depmod -b``. The unpacked tree is kept next to the ``.deb``, so a warm build
does no work here at all.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from secvf.errors import ImageBuildFailed
from secvf.image.commands import run
from secvf.store.digest import sha256_file

STEP = "kernel"

_URI_LINE = re.compile(r"^'(?P<url>[^']+)' (?P<file>\S+) \d+ SHA256:(?P<sha>[0-9a-f]{64})$")


@dataclass(frozen=True)
class KernelTree:
    """An unpacked kernel package with a usable ``modules.dep``."""

    version: str  #: the ``uname -r`` of the kernel, e.g. ``6.1.0-56-cloud-amd64``
    package: str  #: the concrete package it came from
    root: Path  #: where the package was unpacked

    @property
    def vmlinuz(self) -> Path:
        """The compressed kernel image QEMU boots with ``-kernel``."""
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules_dir(self) -> Path:
        """``lib/modules/<version>`` inside the unpacked tree."""
        return self.root / "lib" / "modules" / self.version


def fetch_kernel(meta_package: str, cache: Path) -> KernelTree:
    """Return the unpacked kernel for ``meta_package``, downloading it if needed."""
    package = resolve_kernel_package(meta_package)
    deb = _download(package, cache)
    unpacked = cache / deb.name.removesuffix(".deb")
    if not unpacked.is_dir():
        _unpack(deb, unpacked)
    return KernelTree(version=_kernel_version(unpacked), package=package, root=unpacked)


def resolve_kernel_package(meta_package: str) -> str:
    """Return the concrete ``linux-image-<version>-<flavour>`` package behind a meta package."""
    out = run(STEP, ["apt-cache", "show", "--no-all-versions", meta_package])
    for line in out.splitlines():
        if line.startswith("Depends:"):
            for dep in line.removeprefix("Depends:").split(","):
                name = dep.split()[0]
                if name.startswith("linux-image-"):
                    return name
    if re.fullmatch(r"linux-image-\d.*", meta_package):
        return meta_package
    raise ImageBuildFailed(STEP, f"{meta_package} does not depend on any linux-image-* package")


def _download(package: str, cache: Path) -> Path:
    match = _URI_LINE.match(run(STEP, ["apt-get", "download", "--print-uris", package]).strip())
    if match is None:
        raise ImageBuildFailed(
            STEP, f"apt cannot download {package}; check the host's apt sources (apt-get update)"
        )
    deb = cache / match["file"]
    if deb.is_file() and sha256_file(deb) == match["sha"]:
        return deb
    run(STEP, ["apt-get", "download", package], cwd=cache)
    if not deb.is_file() or sha256_file(deb) != match["sha"]:
        raise ImageBuildFailed(STEP, f"downloaded {deb.name} does not match the archive's SHA-256")
    return deb


def _unpack(deb: Path, dest: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        run(STEP, ["dpkg-deb", "-x", deb, work])
        run(STEP, ["depmod", "-b", work, _kernel_version(work)])
        os.rename(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kernel_version(root: Path) -> str:
    versions = [p.name for p in (root / "lib" / "modules").glob("*") if p.is_dir()]
    if len(versions) != 1 or not (root / "boot" / f"vmlinuz-{versions[0]}").is_file():
        raise ImageBuildFailed(STEP, f"{root} does not hold exactly one kernel and its modules")
    return versions[0]

