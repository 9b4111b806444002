"""Guest images: built locally from Debian packages, cached by recipe hash, booted read-only.

An image is a directory with a kernel (``vmlinuz``), a small busybox initramfs
(``initrd.img``), a raw ext4 root disk (``rootfs.img``, used as the read-only backing
file of per-VM qcow2 overlays) and ``image.json``. Boot it with QEMU's ``-kernel``,
``-initrd`` and ``-append f"{info.cmdline} secvf_...=..."``; the guest's init
(``secvf/guest/init.sh``) prints :data:`READY_MARKER` on the serial console when it is
up, and powers off cleanly on an ACPI power-button press (QMP ``system_powerdown``).

Typical use::

    info = build_image("sandbox", progress=lambda step, done: print(step, done))
    info = get_image("sandbox")   # newest build, raises NotFound if never built

See ``docs/images.md`` for the recipes, the build steps and the cache.

The names below are imported from their modules on first use, so code that only looks
images up (``get_image``) does not load the builder.
"""

from typing import TYPE_CHECKING

from secvf import lazy_exports

if TYPE_CHECKING:  # what _LAZY resolves at run time (a test keeps the two the same)
    from secvf.image.build import Progress, build_image
    from secvf.image.recipe import DEFAULT_IMAGES, RECIPES, Recipe, recipe_hash
    from secvf.image.store import ImageInfo, get_image, list_images, remove_image
    from secvf.model.guest import READY_MARKER

__all__ = [
    "DEFAULT_IMAGES",
    "READY_MARKER",
    "RECIPES",
    "ImageInfo",
    "Progress",
    "Recipe",
    "build_image",
    "get_image",
    "list_images",
    "recipe_hash",
    "remove_image",
]

#: Each name above and the module it is imported from on first use.
_LAZY = {
    **dict.fromkeys(("Progress", "build_image"), "secvf.image.build"),
    **dict.fromkeys(("DEFAULT_IMAGES", "RECIPES", "Recipe", "recipe_hash"), "secvf.image.recipe"),
    **dict.fromkeys(("ImageInfo", "get_image", "list_images", "remove_image"),
                    "secvf.image.store"),
    "READY_MARKER": "secvf.model.guest",
}

if not TYPE_CHECKING:  # mypy sees the imports above, so a misspelt name stays an error
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
