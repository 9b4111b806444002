"""Frozen disk layers: ``$SECVF_HOME/layers/<uuid>.qcow2``, shared by clones.

A clone freezes its source's disk into a read-only layer and puts a fresh overlay on
it for each of them. Between the freeze and the moment the new overlays exist, a
layer is referenced by no VM, so cloning and collecting garbage exclude each other:
clones hold the layer lock shared, the collector holds it exclusively.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from secvf.errors import LockBusy
from secvf.store import paths

LAYER_SUFFIX = ".qcow2"


def layers_dir() -> Path:
    """The directory of frozen layers (created 0700)."""
    return paths.ensure_private_dir(paths.secvf_home() / "layers")


@contextlib.contextmanager
def using_layers() -> Iterator[None]:
    """Hold the layer lock shared while making or referencing layers (waits for a
    running collection, which is short)."""
    fd = _open_lock()
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def collecting_layers() -> Iterator[None]:
    """Hold the layer lock exclusively, for the garbage collector.

    Raises:
        LockBusy: a clone is in progress right now.
    """
    fd = _open_lock()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy("disk layers are busy: a clone is in progress; run secvf gc "
                           "again when it is done") from None
        yield
    finally:
        os.close(fd)


def _open_lock() -> int:
    # beside the layers directory, so that directory holds nothing but layers
    path = paths.secvf_home() / ".layers.lock"
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
