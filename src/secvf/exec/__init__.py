"""Host side of the exec channel: a client for the guest agent (see docs/protocol.md).

The CLI (``secvf vm exec``), the SDK (:mod:`secvf.sdk`) and the MCP server are thin
layers over :class:`ExecClient`: they connect to a VM's exec socket, call ``run`` /
``start`` / ``put_file`` / ``get_file``, and map outcomes with :func:`exit_code_for`.
"""

import logging

from secvf.exec.client import (
    AgentInfo,
    Command,
    ExecClient,
    ExecEvent,
    ExecResult,
    ExecSession,
    Exited,
    FileTransfer,
    Started,
    Stderr,
    StdinError,
    Stdout,
    exit_code_for,
)
from secvf.exec.errors import (
    AgentUnavailable,
    CommandStartFailed,
    ConnectFailed,
    ExecRefused,
    FileTransferError,
    ProtocolError,
)

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
]

logging.getLogger("secvf.exec").addHandler(logging.NullHandler())
