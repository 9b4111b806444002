"""Where a VM's graphical console is, and how to reach it (``secvf vm display``).

A VM created with ``--display vnc`` gets a VNC server on a Unix socket in the private
runtime directory, ``vnc-<UUID>.sock``, mode 0600: only its owner (and root) can
connect, and there is no TCP port to find. The socket exists while the VM runs.
"""

from __future__ import annotations

import os
import shlex
import stat
from dataclasses import asdict, dataclass
from typing import Any

from secvf.errors import ConfigError, SecVFError, StateError
from secvf.machine.common import display_is_view_only
from secvf.model.config import DisplayMode, VMKind
from secvf.store import library
from secvf.store.bundle import RuntimeFiles
from secvf.store.runstate import is_running


@dataclass(frozen=True)
class DisplayInfo:
    """How to connect to one running VM's graphical console."""

    name: str  # the VM
    protocol: str  # "vnc"
    socket: str  # the VNC server's Unix socket
    mode: str  # its permission bits, e.g. "0600" (owner only)
    view_only: bool  # the guest has no keyboard or pointer (malware analysis)
    connect: str  # a command that opens it here (TigerVNC's viewer takes a socket path)

    def as_json(self) -> dict[str, Any]:
        """The dict ``vm display --json`` prints."""
        return asdict(self)


def display_info(name: str) -> DisplayInfo:
    """Where running VM ``name``'s graphical console listens.

    Raises:
        NotFound: no such VM.
        ConfigError: the VM has no graphical console (``--display none``).
        StateError: it is not running (the socket exists only while it runs).
        SecVFError: it runs but its VNC socket is missing.
    """
    bundle, config = library.get_vm(name)
    if config.display is DisplayMode.NONE:
        hint = ("an ai-sandbox VM has none; use 'secvf vm exec'"
                if config.kind is VMKind.AI_SANDBOX
                else "create a VM with --display vnc to have one")
        raise ConfigError(f"VM '{name}' has no graphical console (display: none); {hint}")
    if not is_running(bundle):
        raise StateError(f"VM '{name}' is not running, and its display exists only while "
                         f"it runs; start it with: secvf vm start {name}", "stopped",
                         ["running"])
    path = RuntimeFiles(config.id).vnc_socket
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SecVFError(f"VM '{name}' runs but its VNC socket {path} is missing "
                         f"({exc.strerror}); see: secvf vm status {name}") from exc
    return DisplayInfo(name=name, protocol=str(config.display), socket=str(path),
                       mode=f"{stat.S_IMODE(mode):04o}",
                       view_only=display_is_view_only(config),
                       connect=f"vncviewer {shlex.quote(str(path))}")
