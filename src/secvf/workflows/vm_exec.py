"""Finding a VM's exec channel and running one command through it.

This is the layer between the faces and :class:`~secvf.exec.client.ExecClient`:
it refuses VMs that have no channel (by design, or because they are stopped). The
CLI's terminal handling (live output, stdin, raw mode) is in
:mod:`secvf.faces.cli.terminal`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from secvf.errors import NoExecChannel
from secvf.exec import ExecClient, ExecResult, exit_code_for
from secvf.model.config import VMKind
from secvf.store.bundle import RuntimeFiles
from secvf.store.library import get_vm
from secvf.store.runstate import is_running

STDIN_CHUNK_BYTES = 64 * 1024


def exec_socket_for(name: str) -> Path:
    """The exec socket of running AI sandbox ``name``.

    Raises:
        NoExecChannel: the VM has no channel by design, or is not running.
    """
    bundle, config = get_vm(name)
    if config.kind is not VMKind.AI_SANDBOX:
        raise NoExecChannel(f"VM '{name}' is a {config.kind} VM: it has no exec channel by design")
    if not is_running(bundle):
        raise NoExecChannel(f"VM '{name}' is not running (start it: secvf vm start {name})")
    path = RuntimeFiles(config.id).exec_socket
    if not path.exists():
        raise NoExecChannel(f"VM '{name}' has no exec socket yet (is it still booting?)")
    return path


def run_captured(name: str, command: str | Sequence[str], **options: Any) -> ExecResult:
    """Run ``command`` in VM ``name`` and capture its output (for ``--json``)."""
    with ExecClient.connect(exec_socket_for(name)) as client:
        return client.run(command, **options)


def result_json(result: ExecResult) -> dict[str, Any]:
    """The ``--json`` shape: exit status, timing, output (UTF-8, invalid bytes replaced)."""
    data = asdict(result)
    data["stdout"] = result.stdout.decode("utf-8", "replace")
    data["stderr"] = result.stderr.decode("utf-8", "replace")
    data["exit_status"] = exit_code_for(result)
    return data
