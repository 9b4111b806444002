"""Where SecVF keeps things on the host.

* ``$SECVF_HOME`` (default: the XDG data dir, ``~/.local/share/secvf``) holds the VM
  library (``vms/<name>/``), sandbox workspaces, config and logs.
* The image cache lives under ``$SECVF_CACHE`` (default ``~/.cache/secvf``), keyed by
  recipe hash, so it survives a wiped ``$SECVF_HOME``.
* The runtime dir (sockets, pid files) is private (0700) and per user:
  ``$SECVF_RUNTIME_DIR`` or ``$XDG_RUNTIME_DIR/secvf`` or ``/tmp/secvf-<uid>``.
* Running guests' RAM files live in a private directory on a memory filesystem:
  ``$SECVF_RAM_DIR`` or ``/dev/shm/secvf-<uid>``.
"""

from __future__ import annotations

import os
from pathlib import Path

from secvf.errors import ConfigError

PRIVATE_DIR_MODE = 0o700


def secvf_home() -> Path:
    """Return the root of the VM library (created 0700 on first use)."""
    env = os.environ.get("SECVF_HOME")
    if env:
        path = Path(env)
    else:
        import platformdirs  # (and the tempfile module it loads) only to find the default

        path = Path(platformdirs.user_data_dir("secvf"))
    return ensure_private_dir(path)


def cache_dir() -> Path:
    """Return the cache root (image builds live under ``images/``)."""
    env = os.environ.get("SECVF_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "secvf"
    return ensure_private_dir(path)


def images_dir() -> Path:
    """Where built guest images live: ``<cache dir>/images`` (not created here)."""
    return cache_dir() / "images"


def vms_dir() -> Path:
    """Return the directory that holds one bundle directory per VM."""
    return ensure_private_dir(secvf_home() / "vms")


def logs_dir() -> Path:
    """Return the JSON Lines log directory (0700)."""
    return ensure_private_dir(secvf_home() / "logs")


def config_dir() -> Path:
    """Return the user's SecVF config directory."""
    return ensure_private_dir(secvf_home() / "config")


def settings_file(name: str) -> Path:
    """``$SECVF_HOME/config/<name>``, a settings file (nothing is created: a missing file
    means the defaults)."""
    return secvf_home() / "config" / name


def isos_dir() -> Path:
    """Return the ISO cache: ``$SECVF_HOME/isos`` (0700), one ``<name>/`` per ISO
    (see :mod:`secvf.store.isos`)."""
    return ensure_private_dir(secvf_home() / "isos")


def runtime_dir() -> Path:
    """Return the private per-user runtime directory for sockets and pid files."""
    env = os.environ.get("SECVF_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "secvf"
    else:
        path = Path(f"/tmp/secvf-{os.getuid()}")
    return ensure_private_dir(path)


def network_runtime_dir(network_id: str) -> Path:
    """The runtime directory of an isolated network's switch: its port sockets, port
    records and control socket, named by the network id's first 12 hex digits. Not
    created here (the switch's launcher makes it, 0700, when a VM joins)."""
    return ensure_private_dir(runtime_dir() / "net") / network_id.replace("-", "")[:12]


def templates_dir() -> Path:
    """Return the directory of saved sandbox templates (0700)."""
    return ensure_private_dir(secvf_home() / "templates")


def ram_dir() -> Path:
    """Return the private directory of running guests' RAM files (0700).

    It must be on a memory filesystem (tmpfs): QEMU maps each file as the guest's RAM,
    shared, so on a disk filesystem every guest write would be written back to disk.
    """
    env = os.environ.get("SECVF_RAM_DIR")
    return ensure_private_dir(Path(env) if env else Path(f"/dev/shm/secvf-{os.getuid()}"))


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and refuse one that others could tamper with.

    An existing directory keeps its mode unless others could write to it (then it
    is reset to 0700): the exec bridge may open the runtime dir to 0711 on purpose.

    Raises:
        ConfigError: the path exists but is not a directory, is a symlink, or is
            owned by another user.
    """
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise ConfigError(f"cannot create directory {path}: {exc.strerror}") from exc
    if path.is_symlink() or not path.is_dir():
        raise ConfigError(f"{path} must be a real directory, not a symlink or file")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & 0o022:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path
