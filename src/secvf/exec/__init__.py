"""Host side of the exec channel: a client for the guest agent (see docs/protocol.md).

The CLI (``secvf vm exec``), the SDK (:mod:`secvf.sdk`) and the MCP server are thin
layers over :class:`ExecClient`: they connect to a VM's exec socket, call ``run`` /
``start`` / ``put_file`` / ``get_file``, and map outcomes with :func:`exit_code_for`.

Modules, one concept each: ``protocol`` (the wire format, standard-library only, shared
with the guest agent), ``channel`` (the framed connection: dialling, frames, deadlines,
limits), ``outcome`` (events, results, exit codes), ``replies`` (what the other requests
return: background processes, files, info, restore), ``stream`` (a running command:
events, stdin, signals, resize; an attach), ``client`` (:class:`ExecClient`: run, start,
files, info, restore, background processes) and ``bridge`` (the supervisor's per-VM exec
socket). The errors are in :mod:`secvf.errors`.
"""

import logging
from typing import TYPE_CHECKING

from secvf import lazy_exports
from secvf.errors import (
    AgentUnavailable,
    CommandStartFailed,
    ConnectFailed,
    DetachedProcessError,
    ExecRefused,
    FileTransferError,
    ProtocolError,
    RestoreFailed,
)

if TYPE_CHECKING:
    from secvf.exec.client import Command, ExecClient
    from secvf.exec.outcome import (
        ExecEvent,
        ExecResult,
        Exited,
        OutputDropped,
        Started,
        Stderr,
        StdinError,
        Stdout,
        exit_code_for,
    )
    from secvf.exec.replies import (
        AgentInfo,
        AttachResult,
        DetachedProcessInfo,
        DetachedStart,
        FileTransfer,
        RestoreIssue,
        RestoreResult,
        RestoreShare,
    )
    from secvf.exec.stream import AttachSession, ExecSession

__all__ = [
    "ExecClient",
    "ExecSession",
    "ExecResult",
    "exit_code_for",
    "Command",
    "ExecEvent",
    "Started",
    "Stdout",
    "Stderr",
    "StdinError",
    "Exited",
    "FileTransfer",
    "AgentInfo",
    "AgentUnavailable",
    "ConnectFailed",
    "ExecRefused",
    "ProtocolError",
    "CommandStartFailed",
    "FileTransferError",
    "RestoreResult",
    "RestoreShare",
    "RestoreIssue",
    "RestoreFailed",
    "DetachedStart",
    "DetachedProcessInfo",
    "AttachSession",
    "AttachResult",
    "OutputDropped",
    "DetachedProcessError",
]

#: Each class and function above and the module it is imported from on first use. The
#: package imports none of its modules itself: they import ``secvf.exec.protocol`` through
#: it, and a package that imported them while two threads made their first imports (one
#: of the package, one of a module) would deadlock on Python's import locks.
_LAZY = {
    **dict.fromkeys(("Command", "ExecClient"), "secvf.exec.client"),
    **dict.fromkeys(("ExecEvent", "ExecResult", "Exited", "OutputDropped", "Started",
                     "Stderr", "StdinError", "Stdout", "exit_code_for"), "secvf.exec.outcome"),
    **dict.fromkeys(("AgentInfo", "AttachResult", "DetachedProcessInfo", "DetachedStart",
                     "FileTransfer", "RestoreIssue", "RestoreResult", "RestoreShare"),
                    "secvf.exec.replies"),
    **dict.fromkeys(("AttachSession", "ExecSession"), "secvf.exec.stream"),
}

if not TYPE_CHECKING:  # mypy sees the imports above, so a misspelt name stays an error
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)

logging.getLogger("secvf.exec").addHandler(logging.NullHandler())
