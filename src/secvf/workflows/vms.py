"""VM library operations that need more than the store: a disk made from a built
image, and deleting a VM that may still be running.

The store (:mod:`secvf.store.library`) never resolves images or stops VMs; these
functions do that and then call it.
"""

from __future__ import annotations

from secvf.image import get_image
from secvf.model.config import ImageBoot, VMConfig
from secvf.runtime import control
from secvf.store import library
from secvf.store.bundle import Bundle
from secvf.store.runstate import is_running


def create_vm(config: VMConfig) -> Bundle:
    """Create the VM ``config`` describes; an image-booted VM's disk is an overlay
    over that image's root filesystem.

    Raises:
        NotFound: the image is not built.
        AlreadyExists, DiskError: as :func:`secvf.store.library.create_vm`.
    """
    rootfs = get_image(config.boot.image).rootfs if isinstance(config.boot, ImageBoot) else None
    return library.create_vm(config, image_rootfs=rootfs)


def delete_vm(name: str, *, force: bool = False) -> VMConfig | None:
    """Delete VM ``name``; a running VM is refused unless ``force`` (then stopped first).

    Returns the deleted VM's config (None if its vm.json was unreadable).

    Raises:
        NotFound: there is no such VM.
        StateError: the VM is running and ``force`` is false (or it was started again
            between the stop and the delete).
    """
    bundle = library.get_bundle(name)
    if force and is_running(bundle):
        control.stop_vm(name, force=True)
    return library.delete_vm(name)
