"""Sandbox workspaces over a VM's life: a fresh one for every new sandbox and clone,
moved along on rename, copied only on request, deleted on purge.

The default workspace of sandbox NAME is ``$SECVF_HOME/sandboxes/NAME/workspace``
(:func:`secvf.machine.shares.default_workspace`); a workspace at that place is the
default one, however it was chosen. It belongs to the VM of that name alone, so:

* a new sandbox (create, clone) gets a **new, empty** directory there. If one exists
  already — left by an earlier sandbox of that name, holding whatever its guest
  wrote — it is refused with a message naming it and saying how to delete it
  (``secvf sandbox rm --purge NAME``) or reuse it on purpose (``--workspace DIR``).
  A failed create or clone removes the directory it made;
* a rename moves the default workspace to the new name's place (a workspace the user
  named with ``--workspace`` stays where it is);
* ``clone --copy-workspace`` copies the source's files without trusting them (see
  :func:`copy_workspace`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from secvf.errors import AlreadyExists, SecVFError
from secvf.machine.shares import WORKSPACE_TAG, default_workspace
from secvf.model.config import VMConfig, VMKind
from secvf.store import library

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID


class WorkspaceError(SecVFError):
    """A workspace directory cannot be copied or deleted."""


def workspace_of(config: VMConfig) -> Path | None:
    """The host directory of the VM's read-write workspace share (None: it has none)."""
    shares = config.channels.shares if config.channels else []
    return next((Path(s.host_path) for s in shares if s.tag == WORKSPACE_TAG), None)


def is_default(config: VMConfig) -> bool:
    """True if the VM's workspace is the default one of its name."""
    path = workspace_of(config)
    return path is not None and path == default_workspace(config.name).resolve()


def with_workspace(config: VMConfig, path: Path) -> VMConfig:
    """``config`` with its workspace share pointing at ``path``."""
    channels = config.channels
    if channels is None:
        raise WorkspaceError(f"VM '{config.name}' is a {config.kind} VM: it has no workspace")
    shares = [s.model_copy(update={"host_path": str(path)}) if s.tag == WORKSPACE_TAG else s
              for s in channels.shares]
    channels = channels.model_copy(update={"shares": shares})
    return config.model_copy(update={"channels": channels})


def users_of(path: Path) -> list[str]:
    """Names of the VMs that share host directory ``path`` (any mode)."""
    target = path.resolve()
    return [item.config.name for item in library.list_vms()
            if item.config is not None and item.config.channels is not None
            and any(Path(s.host_path) == target for s in item.config.channels.shares)]


def leftover_message(name: str, path: Path) -> str:
    """Why a new sandbox ``name`` cannot have its default workspace ``path``, and what to do."""
    users = users_of(path)
    if users:
        return (f"the default workspace of '{name}', {path}, is the workspace of VM "
                f"{', '.join(repr(u) for u in users)}; choose another name")
    return (f"an earlier sandbox '{name}' left its workspace at {path}, with whatever its "
            f"guest wrote there; delete it with: secvf sandbox rm --purge {name}, or reuse "
            f"it on purpose with: --workspace {path}")


@contextlib.contextmanager
def for_new_vm(name: str, kind: VMKind, workspace: Path | None) -> Iterator[None]:
    """Around creating VM ``name``: an AI sandbox given no ``workspace`` gets a fresh,
    empty default workspace (see :func:`fresh_default`)."""
    if kind is VMKind.AI_SANDBOX and workspace is None:
        with fresh_default(name):
            yield
    else:
        yield


@contextlib.contextmanager
def fresh_default(name: str) -> Iterator[Path]:
    """Make new sandbox ``name``'s default workspace, empty, and yield it; if the block
    fails, delete it again (with whatever was put in it).

    Raises:
        AlreadyExists: a VM named ``name`` exists, or its default workspace does
            (the message says how to delete or reuse it).
    """
    if library.bundle_for(name).path.exists():
        raise AlreadyExists(f"a VM named '{name}' already exists")
    path = default_workspace(name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        raise AlreadyExists(leftover_message(name, path)) from None
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        raise


def purge_default(name: str) -> Path | None:
    """Delete sandbox ``name``'s default workspace directory (``sandboxes/NAME``) if it
    exists and no VM uses it; return the workspace path deleted, or None.

    Raises:
        WorkspaceError: a VM uses it, or it cannot be deleted (the message says why).
    """
    path = default_workspace(name)
    if not path.parent.exists():
        return None
    users = users_of(path)
    if users:
        raise WorkspaceError(f"not deleting {path}: it is the workspace of VM "
                             f"{', '.join(repr(u) for u in users)}")
    try:
        shutil.rmtree(path.parent)
    except OSError as exc:
        raise WorkspaceError(f"cannot delete {exc.filename or path.parent}: {exc.strerror}; "
                             f"delete {path.parent} by hand (as root if the guest left "
                             "files of other users)") from None
    return path


def copy_workspace(source: Path, target: Path) -> list[str]:
    """Copy workspace tree ``source`` into the empty directory ``target``, trusting
    nothing in it (a guest wrote it): symlinks are copied as symlinks, never followed;
    setuid and setgid bits are dropped; fifos, sockets and device nodes are left out.
    Owners are kept when running as root (else everything is yours). Returns the
    paths (relative to ``source``) left out.

    Raises:
        WorkspaceError: ``source`` cannot be read, or copying failed.
    """
    try:
        src_fd = os.open(source, _DIR_FLAGS)
    except OSError as exc:
        raise WorkspaceError(f"cannot read workspace {source}: {exc.strerror}; clone "
                             "without --copy-workspace") from None
    skipped: list[str] = []
    try:
        dst_fd = os.open(target, _DIR_FLAGS)
        try:
            _copy_dir(src_fd, dst_fd, Path(), skipped)
        finally:
            os.close(dst_fd)
    except OSError as exc:
        raise WorkspaceError(f"copying workspace {source} to {target} failed at "
                             f"{exc.filename or '?'}: {exc.strerror}") from None
    finally:
        os.close(src_fd)
    for rel in skipped:
        log.warning("not copied from workspace %s (not a file, directory or symlink): %s",
                    source, rel)
    return skipped


def _copy_dir(src_fd: int, dst_fd: int, rel: Path, skipped: list[str]) -> None:
    with os.scandir(src_fd) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            child_src = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
            try:
                child_dst = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
                try:
                    _copy_dir(child_src, child_dst, rel / name, skipped)
                    _copy_metadata(child_dst, st)
                finally:
                    os.close(child_dst)
            finally:
                os.close(child_src)
        elif stat.S_ISREG(st.st_mode):
            if not _copy_file(src_fd, dst_fd, name):
                skipped.append(str(rel / name))
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
            if os.geteuid() == 0:
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
        else:
            skipped.append(str(rel / name))


def _copy_file(src_fd: int, dst_fd: int, name: str) -> bool:
    """Copy regular file ``name``; False if it is not one any more (it was swapped)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=src_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # now a symlink
            return False
        raise
    with open(fd, "rb") as src:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=dst_fd)
        with open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
            _copy_metadata(out, st)
    return True


def _copy_metadata(fd: int, st: os.stat_result) -> None:
    """Owner (as root), mode without setuid/setgid, and times of ``st`` onto ``fd``."""
    if os.geteuid() == 0:
        os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~_PRIVILEGE_BITS)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
