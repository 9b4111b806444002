"""Copying sparse files (guest RAM images) without filling their holes.

A guest's RAM file is as big as its memory but holds data only where the guest
touched it; :func:`copy_sparse` copies the data extents (``SEEK_DATA``/``SEEK_HOLE``)
with ``copy_file_range`` and leaves the rest a hole, so a 1 GiB guest that used
150 MiB costs 150 MiB to save and to restore. The standard library's
``shutil.copyfile`` would write every zero.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

_CHUNK = 64 << 20
#: The read/write buffer of :func:`copy_into`.
_BUFFERED_CHUNK = 8 << 20


def copy_sparse(src: Path, dst: Path, *, mode: int = 0o600) -> int:
    """Copy ``src`` to a new file ``dst`` (``O_EXCL``), holes kept; return the data bytes
    copied. ``dst`` is fsynced, and removed again if the copy fails.

    Raises:
        OSError: ``src`` cannot be read or ``dst`` written (e.g. ``ENOSPC``).
    """
    copied = 0
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.ftruncate(fd, size)
            for start, end in data_extents(fin.fileno(), size):
                copied += _copy_range(fin.fileno(), fd, start, end)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                dst.unlink()
            raise
        os.close(fd)
    return copied


def copy_into(src: Path, dst: Path) -> int:
    """Copy the data extents of ``src`` into existing file ``dst`` of the same size (a
    fresh, empty RAM file another process may already have mapped); return the data
    bytes copied.

    Raises:
        OSError: a file cannot be read or written, or the sizes differ (``EINVAL``).
    """
    copied = 0
    buffer = memoryview(bytearray(_BUFFERED_CHUNK))
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        if os.fstat(fout.fileno()).st_size != size:
            raise OSError(errno.EINVAL, f"{dst} is not {size} bytes like {src}")
        for start, end in data_extents(fin.fileno(), size):
            copied += _copy_range_buffered(fin.fileno(), fout.fileno(), start, end, buffer)
    return copied


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte ranges of ``fd`` that hold data (all of it where the
    filesystem cannot tell holes apart)."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                break
            if exc.errno == errno.EINVAL:  # no SEEK_DATA here: all data
                return [(0, size)] if size else []
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(end, size)))
        offset = end
    return extents


def allocated_bytes(path: Path) -> int:
    """Bytes ``path`` (a file, or a directory tree) occupies on its filesystem (0 if it
    does not exist or cannot be read)."""
    try:
        if path.is_file() or path.is_symlink():
            return path.lstat().st_blocks * 512
        return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))
    except OSError:
        return 0


def _copy_range(fin: int, fout: int, start: int, end: int) -> int:
    offset = start
    while offset < end:
        count = min(_CHUNK, end - offset)
        try:
            done = os.copy_file_range(fin, fout, count, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            done = _copy_range_buffered(fin, fout, offset, offset + count,
                                        memoryview(bytearray(min(count, _BUFFERED_CHUNK))))
        if done == 0:  # the source shrank under us
            break
        offset += done
    return offset - start


def _copy_range_buffered(fin: int, fout: int, start: int, end: int,
                         buffer: memoryview) -> int:
    """Copy ``[start, end)`` through ``buffer`` (read, then write at the same offset).

    For a RAM file, whose destination is on tmpfs: there ``copy_file_range`` cannot
    share extents and falls back to splicing page by page, about half as fast as this
    (measured: 146 MiB from an ext4 template in 0.11 s against 0.065 s).
    """
    offset = start
    while offset < end:
        want = buffer[:min(len(buffer), end - offset)]
        got = os.preadv(fin, [want], offset)
        if got == 0:  # the source shrank under us
            break
        view = want[:got]
        while view:
            view = view[os.pwrite(fout, view, offset + got - len(view)):]
        offset += got
    return offset - start
