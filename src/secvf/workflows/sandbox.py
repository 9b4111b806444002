"""AI-sandbox sessions (the original's ``bootAISandboxSession``).

A session is an ``ai-sandbox`` VM in the library like any other (it shows in
``vm list``), created from the sealed ``sandbox`` image as a copy-on-write
overlay. Starting it boots the VM, lets the supervisor start the exec bridge
once QEMU is up, and returns only when the guest agent answers ``ping`` through
that bridge — so ``secvf vm exec`` works the moment ``start`` returns. If the
agent never answers, the session is stopped again (bridge, backend, virtiofsd
and QEMU all gone) and the error carries the tail of that boot's serial log.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secvf.errors import CorruptRecord, ExecError, NotFound, SecVFError, StateError
from secvf.exec.client import ExecClient
from secvf.machine.common import guest_hostname
from secvf.model.config import VMConfig, VMKind
from secvf.runtime import control
from secvf.store import library
from secvf.store import templates as template_store
from secvf.store.bundle import RuntimeFiles
from secvf.store.networks import networks_lock
from secvf.store.runstate import is_running
from secvf.workflows import templates, vms, workspaces
from secvf.workflows.create import build_config

AGENT_READY_TIMEOUT_S = 120.0
PING_CONNECT_TIMEOUT_S = 5.0  # a refused connect fails at once; this bounds a slow guest
PING_RETRY_S = 0.05
LOG_TAIL_LINES = 30


class SandboxBootFailed(SecVFError):
    """A sandbox booted but its agent never became reachable; it was stopped again."""


def create_sandbox(
    name: str | None = None,
    *,
    image: str = "sandbox",
    cpus: int = 1,
    memory: str = "1G",
    disk_size: str = "8G",
    workspace: Path | None = None,
    shares: Sequence[str] = (),
    networks: Sequence[str] = ("nat",),
    accel: str = "auto",
    cold: bool = False,
    notes: list[str] | None = None,
) -> VMConfig:
    """Create a sandbox session (a new ``ai-sandbox`` VM); returns its config.

    Without ``workspace`` it gets a fresh, empty default workspace (a leftover one is
    refused; see :mod:`secvf.workflows.workspaces`), removed again if the create fails.
    Unless ``cold``, a session for which a sandbox template fits gets its disk over the
    template's (and its first start restores the template); what the user should hear
    about that (a stale template) is appended to ``notes``.
    """
    name = name or f"sbx-{uuid.uuid4().hex[:8]}"
    with workspaces.for_new_vm(name, VMKind.AI_SANDBOX, workspace), networks_lock():
        config = build_config(name=name, kind=VMKind.AI_SANDBOX, cpus=cpus, memory=memory,
                              disk_size=disk_size, image=image, networks=networks, accel=accel,
                              shares=shares, workspace=workspace)
        choice = templates.TemplateChoice(None) if cold else templates.choose_template(config)
        if choice.note and notes is not None:
            notes.append(choice.note)
        if choice.template is not None and config.channels is not None:
            config = config.model_copy(update={"channels": config.channels.model_copy(
                update={"template": choice.template.id})})
            vms.create_vm(config, backing=Path(choice.template.layer))
        else:
            vms.create_vm(config)
    return config


def start_sandbox(name: str, *, timeout: float = AGENT_READY_TIMEOUT_S,
                  cold: bool = False) -> dict[str, Any]:
    """Start sandbox ``name`` and wait until its agent answers through the exec bridge.

    A session created over a template that has never run is restored from it (unless
    ``cold``): the saved guest resumes, its channel devices are hot-plugged, and its agent
    makes it its own machine (:func:`personalize`). Otherwise it boots. If a restore
    fails, it boots cold instead; the status's ``notes`` say so, and ``start_mode`` is
    ``restored`` or ``booted``.

    Raises:
        StateError: not a sandbox, or already running.
        LaunchFailed: QEMU or a device helper failed.
        SandboxBootFailed: the agent never answered (the VM is stopped again).
    """
    bundle, config = library.get_vm(name)
    if config.kind is not VMKind.AI_SANDBOX:
        raise StateError(f"VM '{name}' is a {config.kind} VM, not an AI sandbox", str(config.kind))
    started = time.monotonic()
    notes: list[str] = []
    restore = None if cold else _template_to_restore(config, notes)
    if restore is not None:
        try:
            control.start_vm(name, restore=restore)
        except SecVFError as exc:
            notes.append(f"restoring the template failed ({exc}); booting cold")
            restore = None
    if restore is None:
        control.start_vm(name)
    run = bundle.current_run()  # this boot's serial log, not an earlier one's
    try:
        with connect_agent(config, timeout - (time.monotonic() - started)) as client:
            if restore is not None:
                personalize(config, client)  # its handshake proved the agent answers
            else:
                client.ping()
    except SecVFError as exc:
        tail = _log_tail(bundle.serial_log if run is None else bundle.run_serial_log(run))
        try:
            control.stop_vm(name, force=True)
        except StateError:
            pass
        raise SandboxBootFailed(f"sandbox '{name}' did not become ready: {exc}\n"
                                f"--- last serial output of this boot (run {run}) ---\n"
                                f"{tail}") from exc
    status = control.vm_status(name)
    status["boot_s"] = round(time.monotonic() - started, 2)
    status["start_mode"] = "restored" if restore is not None else "booted"
    status["notes"] = notes
    return status


def _template_to_restore(config: VMConfig, notes: list[str]) -> Path | None:
    """The template directory a never-started session made over a template restores."""
    template_id = config.channels.template if config.channels else None
    if template_id is None:
        return None
    bundle = library.get_bundle(config.name)
    if bundle.current_run() is not None or bundle.last_run_file.exists():
        return None  # it has run: its disk is its own now
    try:
        template_store.get_template(template_id)
    except (NotFound, CorruptRecord) as exc:
        notes.append(f"the session's template is unusable ({exc}); booting cold")
        return None
    return template_store.template_dir(template_id)


def personalize(config: VMConfig, client: ExecClient) -> None:
    """Make a session restored from a template its own machine, through its agent
    (``client``, connected): the host's time, fresh kernel entropy, its hostname and MAC,
    an empty ``/tmp`` and its shares mounted.

    Raises:
        ExecError: the agent failed or refused.
    """
    shares = config.channels.shares if config.channels else []
    mac = config.nics[0].mac if config.nics else None  # a template's VM has one NIC at most
    client.restore(hostname=guest_hostname(config.name), mac=mac,
                   shares=[(s.tag, s.guest_path, s.read_only) for s in shares])


def connect_agent(config: VMConfig, timeout: float) -> ExecClient:
    """Connect to the agent through the exec socket, retrying until its handshake
    answers; the caller closes the client.

    Uses short connect timeouts and retries, never one long blocking connect.

    Raises:
        StateError: the VM stopped, or the agent did not answer within ``timeout``.
    """
    path = RuntimeFiles(config.id).exec_socket
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        bundle = library.get_bundle(config.name)
        if not is_running(bundle):
            raise StateError(f"VM '{config.name}' stopped while booting", "stopped")
        try:
            return ExecClient.connect(path, timeout=PING_CONNECT_TIMEOUT_S)
        except ExecError as exc:
            last = exc
        time.sleep(PING_RETRY_S)
    raise StateError(f"the guest agent did not answer within {timeout:.0f} s ({last})",
                     "running")


def remove_sandbox(name: str, *, purge: bool = False, force: bool = False) -> None:
    """Delete sandbox ``name``; a running one only with ``force`` (it is stopped first).

    ``purge`` also deletes its default workspace, ``$SECVF_HOME/sandboxes/NAME`` (a
    ``--workspace`` you gave is never deleted) — also when no VM of that name exists
    any more, for a workspace an earlier sandbox left there.

    Raises:
        NotFound: no VM and (with ``purge``) no workspace of that name.
        StateError: the VM is not an AI sandbox (delete it with ``secvf vm delete``),
            or it is running and ``force`` is false (state ``running``).
        WorkspaceError: the workspace is another VM's too, or cannot be deleted.
    """
    try:
        _, config = library.get_vm(name)
    except NotFound:
        if purge and workspaces.purge_default(name) is not None:
            return
        raise
    if config.kind is not VMKind.AI_SANDBOX:
        raise StateError(f"VM '{name}' is a {config.kind} VM, not an AI sandbox; "
                         f"delete it with: secvf vm delete {name}", str(config.kind))
    vms.delete_vm(name, force=force)
    if purge:
        workspaces.purge_default(name)


def list_sandboxes() -> list[dict[str, Any]]:
    """Status of every AI-sandbox VM."""
    return [control.vm_status(item.bundle.name) for item in library.list_vms()
            if item.config is not None and item.config.kind is VMKind.AI_SANDBOX]


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    return "\n".join(lines[-LOG_TAIL_LINES:]) or "(no serial output)"
