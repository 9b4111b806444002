"""Exec tools: one-shot commands, long commands (start/poll/write-stdin/signal/close)
and background processes, in AI sandboxes only (any other VM has no exec channel).

Commands matching a danger pattern ask the user first (:mod:`..confirm`). Output is
capped per field with its sizes, and marked untrusted.
"""

from __future__ import annotations

import signal as signals
import threading
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from secvf import api
from secvf.errors import ConfigError

from ..confirm import CommandConfirmation, settle
from ..output import capped_text, untrusted
from ..registry import tool
from ..state import current_state
from ..tiers import Tier

_OUTPUT_FIELDS = ("stdout", "stderr")


@dataclass(frozen=True)
class ExecOptions:
    """How to run a command: environment, directory, user, timeout, stdin, cap."""

    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    timeout_s: float | None = None
    stdin: str | None = None
    max_output_bytes: int | None = None


def _cap(requested: int | None) -> int:
    limit = current_state().settings.output_cap
    return limit if requested is None else max(0, min(requested, limit))


def one_shot(name: str, command: str | list[str], options: ExecOptions) -> dict[str, Any]:
    """Run ``command`` to its end; exit status and capped, untrusted output."""
    cap = _cap(options.max_output_bytes)
    totals = {"stdout": 0, "stderr": 0}

    def counter(stream: str) -> Any:
        def count(chunk: bytes) -> None:
            totals[stream] += len(chunk)
        return count

    result = api.run_command(
        name, command, env=options.env, cwd=options.cwd, user=options.user,
        timeout=options.timeout_s,
        stdin=options.stdin.encode() if options.stdin is not None else None,
        on_stdout=counter("stdout"), on_stderr=counter("stderr"), max_output_bytes=cap)
    out: dict[str, Any] = {"exit_code": result.exit_code, "signal": result.signal,
                           "timed_out": result.timed_out, "duration_ms": result.duration_ms,
                           "exit_status": api.exit_code_for(result)}
    out |= capped_text("stdout", result.stdout, cap, total=totals["stdout"])
    out |= capped_text("stderr", result.stderr, cap, total=totals["stderr"])
    return untrusted(out, _OUTPUT_FIELDS)


@tool(Tier.SAFE_MUTATE, untrusted_output=True)
def exec_run(name: str, command: str | list[str], confirmation: CommandConfirmation,
             env: dict[str, str] | None = None, cwd: str | None = None,
             user: str | None = None,
             timeout_s: float | None = Field(60.0, gt=0),
             stdin: str | None = None,
             max_output_bytes: int | None = Field(None, ge=0)) -> dict[str, Any]:
    """Run ``command`` in sandbox ``name`` to its end (an argv list, or a string run with
    /bin/sh -c) and return its exit status and output. ``user``: the unprivileged
    ``agent`` by default, ``root`` on request. For long commands use exec_start."""
    settle(confirmation)
    return one_shot(name, command, ExecOptions(env, cwd, user, timeout_s, stdin,
                                               max_output_bytes))


@tool(Tier.SAFE_MUTATE)
def exec_start(name: str, command: str | list[str], confirmation: CommandConfirmation,
               env: dict[str, str] | None = None, cwd: str | None = None,
               user: str | None = None, timeout_s: float | None = Field(None, gt=0),
               stdin: bool = False) -> dict[str, Any]:
    """Start ``command`` in sandbox ``name`` and return a process id at once; follow it
    with exec_poll (``stdin``: keep stdin open for exec_write_stdin)."""
    settle(confirmation)
    process = current_state().processes.start(name, command, env=env, cwd=cwd, user=user,
                                              timeout=timeout_s, stdin=stdin)
    return {"process_id": process.id, "name": name}


@tool(Tier.SAFE_MUTATE, untrusted_output=True)
def exec_poll(process_id: str, wait_s: float = Field(5.0, ge=0, le=60),
              max_output_bytes: int | None = Field(None, ge=0)) -> dict[str, Any]:
    """New output of process ``process_id`` since the last poll (waiting up to
    ``wait_s`` for some), and its exit once it has ended and all output was returned
    (the process is then forgotten)."""
    processes = current_state().processes
    process = processes.get(process_id)
    result = process.poll(_cap(max_output_bytes), wait_s)
    if result["exit"] is not None or (result["error"] and not result["running"]
                                      and not result["stdout_pending_bytes"]
                                      and not result["stderr_pending_bytes"]):
        processes.forget(process_id)
    return untrusted(result, _OUTPUT_FIELDS)


@tool(Tier.SAFE_MUTATE)
def exec_write_stdin(process_id: str, data: str = "", eof: bool = False) -> dict[str, Any]:
    """Send ``data`` (UTF-8) to process ``process_id``'s stdin, then EOF if ``eof``."""
    current_state().processes.get(process_id).write_stdin(data.encode(), eof=eof)
    return {"process_id": process_id, "written_bytes": len(data.encode()), "eof": eof}


def _signal_number(name: str | int) -> int:
    if isinstance(name, int):
        return name
    text = name.upper().removeprefix("SIG")
    try:
        return int(signals.Signals[f"SIG{text}"])
    except KeyError:
        raise ConfigError(f"unknown signal {name!r}: use a name like TERM, INT, KILL or a "
                          "number") from None


@tool(Tier.SAFE_MUTATE)
def exec_signal(process_id: str, signal: str | int = "TERM") -> dict[str, Any]:
    """Send ``signal`` to process ``process_id``'s process group in the guest."""
    signum = _signal_number(signal)
    current_state().processes.get(process_id).signal(signum)
    return {"process_id": process_id, "signal": signum}


@tool(Tier.SAFE_MUTATE)
def exec_close(process_id: str) -> dict[str, Any]:
    """Close process ``process_id``'s connection (the guest kills it if it still runs)
    and forget it."""
    processes = current_state().processes
    processes.get(process_id).close()
    processes.forget(process_id)
    return {"process_id": process_id, "closed": True}


@tool(Tier.SAFE_MUTATE, idempotent=True)
def exec_list() -> dict[str, Any]:
    """The long commands this server started and has not forgotten yet."""
    return {"processes": current_state().processes.list()}


@tool(Tier.SAFE_MUTATE)
def detached_start(name: str, command: str | list[str], confirmation: CommandConfirmation,
                   env: dict[str, str] | None = None, cwd: str | None = None,
                   user: str | None = None) -> dict[str, Any]:
    """Start ``command`` in sandbox ``name`` as a background process that outlives this
    server (a dev server, a watcher); returns its id and pid."""
    settle(confirmation)
    started = api.start_detached(name, command, env=env, cwd=cwd, user=user)
    return {"name": name, "id": started.id, "pid": started.pid}


@tool(Tier.SAFE_MUTATE, idempotent=True)
def detached_list(name: str) -> dict[str, Any]:
    """Sandbox ``name``'s background processes, running and recently exited."""
    return {"processes": [api.detached_as_json(p) for p in api.list_detached(name)]}


@tool(Tier.SAFE_MUTATE)
def detached_kill(name: str, id: str, signal: str | int = "TERM") -> dict[str, Any]:
    """Send ``signal`` to background process ``id`` of sandbox ``name``."""
    signum = _signal_number(signal)
    api.kill_detached(name, id, signum)
    return {"name": name, "id": id, "signal": signum}


@tool(Tier.SAFE_MUTATE, untrusted_output=True)
def detached_output(name: str, id: str, wait_s: float = Field(1.0, ge=0, le=60),
                    max_output_bytes: int | None = Field(None, ge=0)) -> dict[str, Any]:
    """What background process ``id`` of sandbox ``name`` printed (the guest keeps its
    last 1 MiB), reading live output for up to ``wait_s``; it keeps running."""
    cap = _cap(max_output_bytes)
    attachment = api.Sandbox.from_vm(name).attach(id)
    buffer = bytearray()
    total = 0
    exited: dict[str, Any] | None = None

    def read() -> None:
        nonlocal total, exited
        try:
            for event in attachment:
                if isinstance(event, api.Stdout | api.Stderr):
                    total += len(event.data)
                    buffer.extend(event.data[:max(cap - len(buffer), 0)])
                elif isinstance(event, api.Exited):
                    exited = {"exit_code": event.exit_code, "signal": event.signal}
        except api.AgentUnavailable:
            pass  # closed below, after wait_s: the attach ends, the process runs on

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(wait_s)
    attachment.close()
    reader.join(5.0)
    out: dict[str, Any] = {"name": name, "id": id, "exit": exited,
                           "dropped_bytes": attachment.dropped_bytes}
    out |= capped_text("output", bytes(buffer), cap, total=total)
    return untrusted(out, ["output"])
