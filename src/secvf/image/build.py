"""Building a guest image from its recipe, step by step, with progress reports.

Steps (the ``progress`` callback receives a label and the overall fraction done):

1. ``kernel`` — fetch and unpack the Debian cloud kernel (:mod:`secvf.image.kernel`);
2. ``rootfs`` — mmdebstrap package stage (cached) + SecVF's files (:mod:`secvf.image.rootfs`);
3. ``initramfs`` — busybox + boot modules (:mod:`secvf.image.initramfs`);
4. ``disk`` — ext4 image of the tree (:mod:`secvf.image.disk`);
5. ``publish`` — manifest, fsync, atomic rename (:mod:`secvf.image.store`).

A build whose recipe hash is already published is returned as is, unless ``force``.
Only one build runs at a time per cache (a flock), so concurrent callers never
corrupt each other; a caller that waited finds the image the other one built.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from secvf.errors import ConfigError, ImageBuildFailed, NotFound
from secvf.image import disk, initramfs, kernel, rootfs, store
from secvf.image.commands import check_tools
from secvf.image.recipe import FORMAT_VERSION, INITRAMFS_SCRIPT, RECIPES, Recipe, recipe_hash
from secvf.image.store import ImageFiles, ImageInfo, ImageManifest
from secvf.store import paths

#: ``progress(step, fraction)``: what the build is doing and how much of it is done (0..1).
Progress = Callable[[str, float], None]


def build_image(name: str, *, force: bool = False, progress: Progress | None = None) -> ImageInfo:
    """Build image ``name`` from its recipe (or return the cached build) and return it.

    Raises:
        NotFound: there is no recipe called ``name``.
        ImageBuildFailed: a step failed; the message names the step and the cause.
        StateError: ``force`` was given while a VM uses the current build (a running
            one, or a stopped one whose disk is an overlay over it).
    """
    recipe = _recipe(name)
    report = progress or _ignore_progress
    digest = recipe_hash(recipe)
    cached = None if force else _published(name, digest)
    if cached is not None:
        report("cached", 1.0)
        return cached
    _preflight()
    with store.build_lock(on_wait=lambda: report("waiting for another build", 0.0)):
        cached = None if force else _published(name, digest)
        if cached is not None:
            report("cached", 1.0)
            return cached
        if force and store.image_dir(name, digest).exists():
            store.ensure_replaceable(store.image_dir(name, digest), "rebuild")
        with store.staging_dir(name, digest) as work:
            info = _build_into(work, recipe, digest, report)
    report("done", 1.0)
    return info


def _build_into(work: Path, recipe: Recipe, digest: str, report: Progress) -> ImageInfo:
    cache = paths.cache_dir()
    files = ImageFiles()
    report(f"kernel: fetching {recipe.kernel_package}", 0.02)
    kernels = cache / "kernels"
    kernels.mkdir(exist_ok=True)
    guest_kernel = kernel.fetch_kernel(recipe.kernel_package, kernels)
    shutil.copyfile(guest_kernel.vmlinuz, work / files.kernel)

    report("rootfs: installing packages (mmdebstrap, cached by package list)", 0.1)
    stage = rootfs.package_stage(recipe, cache)
    report("rootfs: unpacking and adding SecVF files", 0.65)
    tree = work / "tree"
    rootfs.unpack_stage(stage, tree)
    rootfs.customize(tree, recipe, guest_kernel)

    report("initramfs: busybox and boot modules", 0.75)
    entries = initramfs.initramfs_entries(
        guest_kernel,
        recipe.boot_modules,
        busybox=rootfs.guest_path(tree, "/bin/busybox"),
        init_script=INITRAMFS_SCRIPT,
    )
    initramfs.write_initramfs(entries, work / files.initrd)

    report("disk: writing ext4 root image", 0.8)
    size = disk.disk_size(rootfs.tree_size(tree), recipe.disk_headroom_mib)
    disk.make_ext4(tree, work / files.rootfs, size)
    rootfs.remove_tree(tree)

    report("publish", 0.95)
    manifest = ImageManifest(
        format_version=FORMAT_VERSION,
        name=recipe.name,
        recipe_hash=digest,
        built_at=datetime.now(UTC),
        size_bytes=store.allocated_bytes(work),
        kernel_version=guest_kernel.version,
        kernel_package=guest_kernel.package,
        cmdline=recipe.cmdline,
        has_agent=recipe.has_agent,
        files=files,
    )
    return store.publish(work, manifest)


def _recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise NotFound(f"there is no image recipe called '{name}' (known: {known})") from None


def _published(name: str, digest: str) -> ImageInfo | None:
    directory = store.image_dir(name, digest)
    if not directory.is_dir():
        return None
    try:
        return store.load_image(directory)
    except ConfigError:
        return None  # damaged: rebuild it


def _preflight() -> None:
    if os.geteuid() != 0:
        raise ImageBuildFailed(
            "preflight",
            "building images needs root (mmdebstrap --mode=root and mkfs.ext4 -d must keep "
            "the guest's file owners); run the build as root, e.g. sudo secvf image build",
        )
    check_tools()


def _ignore_progress(step: str, fraction: float) -> None:
    del step, fraction
