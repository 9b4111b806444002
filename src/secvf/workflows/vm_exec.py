"""Finding a VM's exec channel, connecting to it, and running one command through it.

This is the layer between the faces and :class:`~secvf.exec.client.ExecClient`: it
refuses VMs that have no channel (by design, or because they are stopped), and it tells
a VM whose guest agent does not answer yet (still booting) from a broken channel:

* no exec socket while the supervisor is still starting the VM, a socket that refuses
  connections, or the bridge answering ``agent_unavailable`` (nothing listens on guest
  port 2222 yet) all become :class:`~secvf.errors.AgentUnavailable` with the message
  of :func:`not_ready_message`;
* :func:`wait_for_exec` retries exactly those cases until the agent answers or its
  timeout passes (``secvf vm exec --wait SECONDS``).

The common case, a running sandbox, is found without pydantic (:mod:`secvf.store.peek`),
so ``vm exec`` starts fast; the VM's records are validated whenever that quick look is
not a plain yes, and the errors come from there.

The CLI's terminal handling (live output, stdin, raw mode) is in
:mod:`secvf.faces.cli.terminal`.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secvf.errors import AgentUnavailable, NoExecChannel
from secvf.exec import ExecClient, ExecResult, exit_code_for
from secvf.exec.channel import CONNECT_TIMEOUT_S
from secvf.model.enums import VMKind, VmState
from secvf.store.bundle import Bundle, RuntimeFiles, get_bundle
from secvf.store.peek import running_exec_socket

if TYPE_CHECKING:  # made by the client when asked for (secvf.exec.replies)
    from secvf.exec import DetachedProcessInfo, DetachedStart

#: Pause between two attempts of :func:`wait_for_exec`.
WAIT_RETRY_S = 0.25
#: Shortest connect timeout of one attempt of :func:`wait_for_exec` near its deadline.
MIN_ATTEMPT_TIMEOUT_S = 1.0


def not_ready_message(name: str) -> str:
    """What to tell a user whose VM ``name`` does not answer on its exec channel (yet).

    The guest's init starts the agent before it prints its ready marker and restarts
    it a second after it exits, so "not answering" is, while the VM runs, "not yet".
    """
    return (f"VM '{name}' is not ready yet (the guest agent is not answering); "
            "retry or use --wait SECONDS")


def exec_socket_for(name: str) -> Path:
    """The exec socket of running AI sandbox ``name``.

    Raises:
        NotFound: there is no such VM.
        NoExecChannel: the VM has no channel by design, is not running, is paused, or is
            stopping.
        AgentUnavailable: the VM is still starting (its bridge is not up yet).
        CorruptRecord: the VM's runtime record is unreadable.
        ConfigError: its ``vm.json`` is not usable.
    """
    bundle = get_bundle(name)
    return running_exec_socket(bundle) or _checked_exec_socket(bundle)


def _checked_exec_socket(bundle: Bundle) -> Path:
    """:func:`exec_socket_for` with the VM's records validated: why there is no exec
    socket to use, or (if the quick look was not sure) the socket after all."""
    from secvf.store.library import load_vm  # pydantic: not on the hot path
    from secvf.store.runstate import current_state

    name, config = bundle.name, load_vm(bundle)
    if config.kind is not VMKind.AI_SANDBOX:
        raise NoExecChannel(f"VM '{name}' is a {config.kind} VM: it has no exec channel by design")
    view = current_state(bundle, config.id)
    if not view.live:
        raise NoExecChannel(f"VM '{name}' is not running (start it: secvf vm start {name})")
    if view.state is VmState.PAUSED:
        raise NoExecChannel(f"VM '{name}' is paused; resume it: secvf vm resume {name}")
    path = RuntimeFiles(config.id).exec_socket
    if path.exists():
        return path
    if view.state is VmState.STARTING:
        raise AgentUnavailable(not_ready_message(name))
    raise NoExecChannel(f"VM '{name}' has no exec socket (it is {view.state})")


def connect(name: str, *, timeout: float = CONNECT_TIMEOUT_S) -> ExecClient:
    """A handshaken connection to running AI sandbox ``name``'s guest agent.

    ``timeout`` bounds dialling plus the handshake.

    Raises:
        NotFound, NoExecChannel: as for :func:`exec_socket_for`.
        AgentUnavailable: the VM is starting, or its agent does not answer (yet): the
            message is :func:`not_ready_message`, the bridge's own words its cause.
        ExecRefused: the bridge refused this user (``refused``) or is full (``busy``).
        ProtocolError: the peer's answer is not valid protocol.
    """
    path = exec_socket_for(name)
    try:
        return ExecClient.connect(path, timeout=timeout)
    except AgentUnavailable as exc:  # ConnectFailed, agent_unavailable, no hello in time
        raise AgentUnavailable(not_ready_message(name)) from exc


def wait_for_exec(name: str, timeout: float) -> float:
    """Wait up to ``timeout`` seconds until VM ``name``'s guest agent answers a ping.

    Retries while the VM is starting or its agent does not answer; everything else
    fails at once (a stopped VM is not waited for). Returns the answering ping's
    round-trip time in seconds.

    Raises:
        AgentUnavailable: the agent still did not answer when ``timeout`` passed.
        NotFound, NoExecChannel, ExecRefused, ProtocolError: as for :func:`connect`.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            attempt = min(CONNECT_TIMEOUT_S, max(remaining, MIN_ATTEMPT_TIMEOUT_S))
            with connect(name, timeout=attempt) as client:
                return client.ping()
        except AgentUnavailable:
            if time.monotonic() + WAIT_RETRY_S >= deadline:
                raise
        time.sleep(WAIT_RETRY_S)


def run_captured(name: str, command: str | Sequence[str], **options: Any) -> ExecResult:
    """Run ``command`` in VM ``name`` and capture its output (for ``--json``).

    ``options`` are those of :meth:`ExecClient.run` (``stdin`` included).

    Raises:
        CommandStartFailed: the command did not start; and as for :func:`connect`.
    """
    with connect(name) as client:
        return client.run(command, **options)


def start_detached(name: str, command: str | Sequence[str], **options: Any) -> DetachedStart:
    """Start ``command`` as a background process in VM ``name`` (``vm exec --detach``).

    ``options`` are those of :meth:`ExecClient.start_detached` (env, cwd, user).

    Raises:
        DetachedProcessError: ``limit_reached``, or ``unsupported`` (an old agent).
        CommandStartFailed: the command did not start; and as for :func:`connect`.
    """
    with connect(name) as client:
        return client.start_detached(command, **options)


def list_detached(name: str) -> list[DetachedProcessInfo]:
    """VM ``name``'s background processes, running and recently exited (``vm ps``).

    Raises:
        DetachedProcessError: ``unsupported`` (an old agent); and as for :func:`connect`.
    """
    with connect(name) as client:
        return client.list_detached()


def kill_detached(name: str, process_id: str, signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` to background process ``process_id``'s group in VM ``name``.

    Raises:
        DetachedProcessError: ``not_found``, ``not_running``, ``invalid_request`` or
            ``unsupported``; and as for :func:`connect`.
    """
    with connect(name) as client:
        client.kill_detached(process_id, signum)


def detached_json(info: DetachedProcessInfo) -> dict[str, Any]:
    """The ``vm ps --json`` shape of one background process (argv as a list)."""
    data = asdict(info)
    data["argv"] = list(info.argv)
    return data


def result_json(result: ExecResult) -> dict[str, Any]:
    """The ``--json`` shape: exit status, timing, output (UTF-8, invalid bytes replaced)."""
    data = asdict(result)
    data["stdout"] = result.stdout.decode("utf-8", "replace")
    data["stderr"] = result.stderr.decode("utf-8", "replace")
    data["exit_status"] = exit_code_for(result)
    return data
