"""The root filesystem tree: Debian packages from mmdebstrap, then SecVF's own files.

Two stages:

1. **Packages.** ``mmdebstrap --variant=minbase`` installs the recipe's packages
   (documentation, man pages and locales excluded) and writes a tarball. The tarball
   is cached in ``<cache>/stages/`` under a key of the suite and package list only,
   so recipes that share packages (``base`` and ``sandbox``) and rebuilds after an
   init-script edit skip mmdebstrap altogether. Downloaded ``.deb`` files are kept in
   ``<cache>/debs/`` and synced into and out of every mmdebstrap run.
2. **Customisation** of an unpacked copy: the kernel's whole module tree, the guest
   init as ``/sbin/secvf-init``, the recipe's files (copied or built, e.g. the agent
   zipapp) and users.

The apt sources are the host's entries for the suite (``SUITE``, ``SUITE-updates``,
``SUITE-security``), or ``deb.debian.org`` when the host has none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from secvf.errors import ImageBuildFailed
from secvf.image.commands import run
from secvf.image.kernel import KernelTree
from secvf.image.recipe import FORMAT_VERSION, INIT_SCRIPT, GuestUser, Recipe

STEP = "rootfs"

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
EXCLUDED_PATHS = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*",
                  "/usr/share/info/*", "/usr/share/lintian/*")  # fmt: skip
KEPT_PATHS = ("/usr/share/doc/*/copyright",)
GUEST_INIT_PATH = "/sbin/secvf-init"
SOURCES_FILES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def package_stage(recipe: Recipe, cache: Path) -> Path:
    """Return the cached package tarball for ``recipe``, running mmdebstrap on a miss."""
    stages = cache / "stages"
    debs = cache / "debs"
    stages.mkdir(parents=True, exist_ok=True)
    debs.mkdir(parents=True, exist_ok=True)
    stage = stages / f"rootfs-{stage_key(recipe)[:12]}.tar"
    if stage.is_file():
        return stage
    partial = stage.with_suffix(".partial.tar")
    try:
        run(STEP, _mmdebstrap_argv(recipe, debs, partial))
        os.rename(partial, stage)
    finally:
        partial.unlink(missing_ok=True)
    return stage


def stage_key(recipe: Recipe) -> str:
    """Hash of what decides the package stage (not the init script or added files)."""
    described = {
        "format_version": FORMAT_VERSION,
        "suite": recipe.suite,
        "packages": sorted(recipe.packages),
        "excluded": EXCLUDED_PATHS,
        "kept": KEPT_PATHS,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def unpack_stage(stage: Path, tree: Path) -> None:
    """Unpack a package stage into the empty directory ``tree``, keeping owners and modes."""
    tree.mkdir(mode=0o755)
    run(STEP, ["tar", "-C", tree, "--numeric-owner", "--xattrs", "--xattrs-include=*",
               "-xpf", stage])  # fmt: skip


def customize(tree: Path, recipe: Recipe, kernel: KernelTree) -> None:
    """Add the kernel modules, the guest init, the recipe's files and users to ``tree``."""
    modules_dest = guest_path(tree, "/lib/modules")
    modules_dest.mkdir(parents=True, exist_ok=True)
    run(STEP, ["cp", "-a", kernel.modules_dir, modules_dest])
    _install(tree, GUEST_INIT_PATH, INIT_SCRIPT.read_bytes(), 0o755)
    for item in recipe.files:
        _install(tree, item.dest, item.content(), item.mode)
    for user in recipe.users:
        add_user(tree, user)
    guest_path(tree, "/etc/hostname").write_text("secvf\n")


def add_user(tree: Path, user: GuestUser) -> None:
    """Add ``user`` and its group to the tree's passwd/group/shadow, and create its home."""
    etc = guest_path(tree, "/etc")
    for table in ("passwd", "group"):
        for line in (etc / table).read_text().splitlines():
            name, _, ident = line.split(":")[:3]
            if name == user.name or ident == str(user.uid):
                raise ImageBuildFailed(
                    STEP, f"user {user.name} (uid {user.uid}) clashes with '{name}' in /etc/{table}"
                )
    _append(etc / "passwd", f"{user.name}:x:{user.uid}:{user.uid}::{user.home}:{user.shell}\n")
    _append(etc / "group", f"{user.name}:x:{user.uid}:\n")
    _append(etc / "shadow", f"{user.name}:!:19000:0:99999:7:::\n")
    home = guest_path(tree, user.home)
    home.mkdir(mode=0o750, parents=True)
    os.chown(home, user.uid, user.uid)


def guest_path(tree: Path, path: str) -> Path:
    """Map an absolute guest path into ``tree``.

    Raises:
        ImageBuildFailed: the path is relative, has ``..``, or leads out of the tree
            through a symlink (a guest's absolute symlink points into the host).
    """
    if not path.startswith("/") or ".." in Path(path).parts:
        raise ImageBuildFailed(STEP, f"guest path {path!r} must be absolute without '..'")
    target = tree / path.lstrip("/")
    if not target.resolve().is_relative_to(tree.resolve()):
        raise ImageBuildFailed(STEP, f"guest path {path!r} leads out of the tree via a symlink")
    return target


def tree_size(tree: Path) -> int:
    """Bytes the tree will need in a filesystem (file sizes plus a block per entry)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size + 4096
    return total


def apt_sources(suite: str, files: tuple[Path, ...] = SOURCES_FILES) -> list[str]:
    """Return one-line ``deb URI SUITE main`` entries for ``suite`` from the host's apt config."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    found: list[str] = []
    for uri, suites in _host_source_entries(files):
        for s in suites:
            line = f"deb {uri} {s} main"
            if s in wanted and line not in found:
                found.append(line)
    if not any(line.endswith(f" {suite} main") for line in found):
        return [
            f"deb {DEFAULT_MIRROR} {suite} main",
            f"deb {DEFAULT_MIRROR} {suite}-updates main",
            f"deb {DEFAULT_SECURITY_MIRROR} {suite}-security main",
        ]
    return found


def _host_source_entries(files: tuple[Path, ...]) -> list[tuple[str, list[str]]]:
    paths: list[Path] = []
    for f in files:
        paths += sorted(f.glob("*")) if f.is_dir() else [f]
    entries: list[tuple[str, list[str]]] = []
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            entries += _deb822_entries(text)
        elif path.suffix == ".list":
            entries += _one_line_entries(text)
    return entries


def _deb822_entries(text: str) -> list[tuple[str, list[str]]]:
    entries = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if re.match(r"^\w[\w-]*:", line):
                key, value = line.split(":", 1)
                fields[key.lower()] = value.split()
        if "deb" in fields.get("types", []) and "main" in fields.get("components", []):
            entries += [(uri, fields.get("suites", [])) for uri in fields.get("uris", [])]
    return entries


def _one_line_entries(text: str) -> list[tuple[str, list[str]]]:
    entries = []
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 4 and words[0] == "deb" and "main" in words[3:]:
            entries.append((words[1], [words[2]]))
    return entries


def _mmdebstrap_argv(recipe: Recipe, debs: Path, out: Path) -> list[str | Path]:
    argv: list[str | Path] = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--format=tar",
        f"--include={','.join(recipe.packages)}",
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1/var/cache/apt/archives/partial"',
        f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
    ]
    argv += [f"--dpkgopt=path-exclude={p}" for p in EXCLUDED_PATHS]
    argv += [f"--dpkgopt=path-include={p}" for p in KEPT_PATHS]
    return [*argv, recipe.suite, out, *apt_sources(recipe.suite)]


def _install(tree: Path, dest: str, data: bytes, mode: int) -> None:
    target = guest_path(tree, dest)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.write_bytes(data)
    os.chmod(target, mode)


def _append(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line)


def remove_tree(tree: Path) -> None:
    """Delete an unpacked tree (it holds root-owned files and device nodes)."""
    shutil.rmtree(tree, ignore_errors=True)
