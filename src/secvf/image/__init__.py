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
"""

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
