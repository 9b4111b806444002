"""Published stand-in images for tests that create (never boot) image-based VMs."""

from __future__ import annotations

from datetime import UTC, datetime

from secvf.image import store
from secvf.image.store import ImageInfo, ImageManifest

ROOTFS_BYTES = 1 << 20


def publish_fake_image(name: str, digest: str | None = None) -> ImageInfo:
    """Publish image ``name`` in the current ``SECVF_CACHE``: a sparse 1 MiB raw rootfs
    and placeholder kernel files (``sandbox`` has the agent, like the real one)."""
    digest = digest or ("a" if name == "sandbox" else "b") * 64
    manifest = ImageManifest(
        format_version=1, name=name, recipe_hash=digest, built_at=datetime.now(UTC),
        size_bytes=ROOTFS_BYTES, kernel_version="6.1.0-test", kernel_package="linux-test",
        cmdline="console=ttyS0", has_agent=name == "sandbox",
    )
    with store.build_lock(), store.staging_dir(name, digest) as work:
        (work / "vmlinuz").write_bytes(b"kernel")
        (work / "initrd.img").write_bytes(b"initrd")
        with open(work / "rootfs.img", "wb") as rootfs:
            rootfs.truncate(ROOTFS_BYTES)
        return store.publish(work, manifest)
