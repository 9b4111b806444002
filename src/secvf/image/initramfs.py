"""The busybox initramfs: just enough to find the root disk and switch to it.

Contents: a static busybox (taken from the rootfs, where ``busybox-static`` is
installed), ``/init`` (``secvf/guest/initramfs-init.sh``), ``/etc/secvf-modules`` (the
modules to load) and those modules with everything they depend on, under
``lib/modules/<version>/`` with a ``modules.dep`` restricted to them, so busybox
``modprobe`` loads them in dependency order. The archive is written here as a gzip'd
``newc`` cpio (uid/gid 0, mtime 0) without staging anything on disk, so the same
inputs always give the same bytes, and the device node ``/dev/console`` needs no
``mknod``.
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from secvf.errors import ImageBuildFailed
from secvf.image.kernel import KernelTree

STEP = "initramfs"

_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "newroot", "etc")
_CONSOLE_DEVICE = (5, 1)
_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One member of a ``newc`` archive."""

    name: str  #: path without a leading slash
    mode: int  #: full st_mode (type and permission bits)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def module_closure(modules_dep: str, wanted: Iterable[str], builtin: str = "") -> list[str]:
    """Return the ``modules.dep`` paths of ``wanted`` modules and all their dependencies.

    Names compare as the kernel does (``-`` and ``_`` are the same). Modules built into
    the kernel (listed in ``modules.builtin``) need no file and are skipped.

    Raises:
        ImageBuildFailed: a wanted module is neither a loadable module nor built in.
    """
    deps: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        path_of[module_name(path)] = path
        deps[path] = rest.split()
    builtins = {module_name(p) for p in builtin.split()}
    selected: list[str] = []
    for name in wanted:
        key = name.replace("-", "_")
        if key in builtins:
            continue
        if key not in path_of:
            raise ImageBuildFailed(STEP, f"the kernel has no module named {name!r}")
        _add_with_deps(path_of[key], deps, selected)
    return selected


def module_name(path: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko`` -> ``virtio_rng``."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


def _add_with_deps(path: str, deps: dict[str, list[str]], selected: list[str]) -> None:
    if path in selected:
        return
    for dep in deps.get(path, []):
        _add_with_deps(dep, deps, selected)
    selected.append(path)


def initramfs_entries(
    kernel: KernelTree, modules: Iterable[str], busybox: Path, init_script: Path
) -> list[CpioEntry]:
    """Return every member of the initramfs, directories before their contents."""
    modules = list(modules)
    dep_text = (kernel.modules_dir / "modules.dep").read_text()
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = builtin_file.read_text() if builtin_file.exists() else ""
    files = module_closure(dep_text, modules, builtin)
    kept = set(files)
    restricted_dep = "".join(
        line + "\n" for line in dep_text.splitlines() if line.split(":", 1)[0] in kept
    )
    mod_root = f"lib/modules/{kernel.version}"
    mod_files = [f"{mod_root}/modules.dep", *(f"{mod_root}/{f}" for f in files)]
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in _DIRS]
    entries += [CpioEntry(d, stat.S_IFDIR | 0o755) for d in _parent_dirs(mod_files)]
    entries += [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=_CONSOLE_DEVICE),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, _read(busybox)),
        CpioEntry("init", stat.S_IFREG | 0o755, _read(init_script)),
        CpioEntry("etc/secvf-modules", stat.S_IFREG | 0o644, "\n".join(modules).encode() + b"\n"),
        CpioEntry(f"{mod_root}/modules.dep", stat.S_IFREG | 0o644, restricted_dep.encode()),
    ]
    entries += [
        CpioEntry(f"{mod_root}/{f}", stat.S_IFREG | 0o644, _read(kernel.modules_dir / f))
        for f in files
    ]
    return entries


class ByteSink(Protocol):
    """Anything with ``write(bytes)``: a file, a gzip stream."""

    def write(self, data: bytes, /) -> object: ...


def write_initramfs(entries: Iterable[CpioEntry], dest: Path) -> None:
    """Write ``entries`` as a gzip-compressed ``newc`` cpio archive to ``dest``."""
    with dest.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        write_cpio(entries, out)


def write_cpio(entries: Iterable[CpioEntry], out: ByteSink) -> None:
    """Write ``entries`` and the trailer as an uncompressed ``newc`` archive."""
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        _write_member(out, ino, entry)
    _write_member(out, ino + 1, CpioEntry(_TRAILER, 0))


def _write_member(out: ByteSink, ino: int, entry: CpioEntry) -> None:
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
    header = _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    out.write(header + name + _padding(len(header) + len(name)))
    out.write(entry.data + _padding(len(entry.data)))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _parent_dirs(paths: Iterable[str]) -> list[str]:
    dirs = {str(d) for p in paths for d in Path(p).parents if str(d) != "."}
    return sorted(dirs, key=lambda d: (d.count("/"), d))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageBuildFailed(STEP, f"cannot read {path}: {exc.strerror}") from None
