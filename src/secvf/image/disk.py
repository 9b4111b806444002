"""The root disk: a sparse raw ext4 image made from a directory tree, without mounting.

``mkfs.ext4 -d`` copies the tree (owners, modes, device nodes, symlinks) into the new
filesystem. The image is used read-only, as the backing file of each VM's qcow2
overlay, so its free space is what every guest starts with: the tree's size plus
the recipe's headroom. Being sparse, it costs the host only what the tree needs.
"""

from __future__ import annotations

import os
from pathlib import Path

from secvf.image.commands import run

STEP = "disk"

MIB = 1024 * 1024
FS_LABEL = "secvf-root"


def disk_size(tree_bytes: int, headroom_mib: int) -> int:
    """Image size in bytes: the tree plus 10% for metadata, plus headroom, in whole MiB."""
    needed = tree_bytes + tree_bytes // 10 + headroom_mib * MIB
    return -(-needed // MIB) * MIB


def make_ext4(tree: Path, image: Path, size_bytes: int) -> None:
    """Create the sparse file ``image`` of ``size_bytes`` holding an ext4 copy of ``tree``.

    The image is left read-only (0444): it is only ever a backing file.
    """
    with image.open("xb") as f:
        os.truncate(f.fileno(), size_bytes)
    run(STEP, ["mkfs.ext4", "-q", "-F", "-L", FS_LABEL, "-m", "0", "-d", tree, image])
    os.chmod(image, 0o444)
