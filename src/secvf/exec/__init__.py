"""Host side of the exec channel: a client for the guest agent (see docs/protocol.md).

The CLI (``secvf vm exec``), the SDK (:mod:`secvf.sdk`) and the MCP server are thin
layers over :class:`ExecClient`: they connect to a VM's exec socket, call ``run`` /
``start`` / ``put_file`` / ``get_file``, and map outcomes with :func:`exit_code_for`.

Modules, one concept each: ``protocol`` (the wire format, standard-library only, shared
with the guest agent), ``channel`` (the framed connection: dialling, frames, deadlines,
limits), ``outcome`` (events, results, exit codes), ``stream`` (a running command:
events, stdin, signals, resize; an attach), ``client`` (:class:`ExecClient`: run, start,
files, info, restore, background processes) and ``bridge`` (the supervisor's per-VM exec
socket). The errors are in :mod:`secvf.errors`.
"""

import logging

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
from secvf.exec.client import Command, ExecClient
from secvf.exec.outcome import (
    AgentInfo,
    AttachResult,
    DetachedProcessInfo,
    DetachedStart,
    ExecEvent,
    ExecResult,
    Exited,
    FileTransfer,
    OutputDropped,
    RestoreIssue,
    RestoreResult,
    RestoreShare,
    Started,
    Stderr,
    StdinError,
    Stdout,
    exit_code_for,
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

logging.getLogger("secvf.exec").addHandler(logging.NullHandler())
