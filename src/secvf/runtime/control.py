"""Starting, stopping and inspecting VMs from any ``secvf`` process.

``start_vm`` starts a detached supervisor (forked from this process where that is safe,
else ``python -m secvf.runtime.supervisor``: :mod:`secvf.runtime.supervisor_start`) and
waits for its one-line :class:`~secvf.model.runtime.StartReport` on a pipe: success
once QEMU is up and its device tree passed the channel check, or a typed failure
that :func:`error_from_failure` turns back into the matching
:class:`~secvf.errors.SecVFError`. ``stop_vm`` sends a
:class:`~secvf.model.runtime.StopRequest` over the supervisor's control socket and
falls back to signals if the supervisor does not answer; it tells a listener how long
the guest has left to power off, and whether the stop had to be forced.
``change_medium`` sends a :class:`~secvf.model.runtime.MediaRequest` (``vm media`` on a
running VM); ``pause_vm`` / ``resume_vm`` a :class:`~secvf.model.runtime.PauseRequest`.
``vm_status`` combines
``vm.json`` with the supervisor's published record (or the last run's). Start and
status remove the runtime files of a supervisor that died
(:func:`~secvf.store.runstate.reap_stale_runtime`).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from secvf.errors import (
    ConfigError,
    CorruptRecord,
    ForbiddenDevice,
    LaunchFailed,
    NotFound,
    SecVFError,
    SnapshotError,
    StateError,
    SupervisorFailed,
)
from secvf.model.config import DisplayMode, ImageBoot, IsoBoot, VMConfig
from secvf.model.runtime import (
    ControlReply,
    DumpRequest,
    FailureKind,
    JailInfo,
    LaunchStage,
    MediaRequest,
    PauseRequest,
    SnapshotRequest,
    Started,
    StartFailed,
    StartReport,
    StopRequest,
    VmState,
    VmStatus,
    decode,
    encode,
)
from secvf.runtime.lifecycle import paused_error
from secvf.runtime.supervisor_start import start_supervisor
from secvf.store import events as seclog
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.events import Severity
from secvf.store.library import get_vm
from secvf.store.locks import locked
from secvf.store.runstate import current_state, is_running, reap_stale_runtime
from secvf.store.snapshots import list_snapshots

log = logging.getLogger("secvf.runtime.control")

START_REPORT_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
#: How often ``stop_vm`` tells its listener how long the guest has left.
STOP_PROGRESS_EVERY_S = 1.0
#: How long a medium change may take (the supervisor gives QEMU 30 s of it).
MEDIA_REPLY_TIMEOUT_S = 45.0
#: How long a snapshot of a running VM may take (the supervisor gives a save 120 s).
SNAPSHOT_REPLY_TIMEOUT_S = 180.0
#: How long a pause or resume may take (the supervisor gives QEMU 30 s of it).
PAUSE_REPLY_TIMEOUT_S = 45.0


@dataclass(frozen=True)
class StopWaiting:
    """``stop_vm`` is waiting for the guest to power off (sent about once a second)."""

    left_s: float  # seconds until the stop is forced
    timeout_s: float  # the whole wait (``--timeout``)


@dataclass(frozen=True)
class StopDone:
    """``stop_vm`` is done: QEMU is gone (sent once, last)."""

    forced: bool  # QEMU was quit or killed: the guest did not power off by itself
    why: str  # what happened, in words


#: What ``stop_vm`` calls with its progress (from the calling thread).
StopListener = Callable[[StopWaiting | StopDone], None]


def start_vm(
    name: str, *, accel: str | None = None, wait_ready: float | None = None,
    restore: Path | None = None, save_template: Path | None = None,
    before_start: Callable[[Bundle], None] | None = None,
) -> dict[str, Any]:
    """Start VM ``name`` under a detached supervisor; return its status once running.

    With ``wait_ready`` (seconds), also wait for the guest's ready marker; only a VM
    booted from a SecVF image has one (:func:`check_ready_marker`, checked before
    anything starts). When this raises, the supervisor has already torn the run down and
    written ``last_run.json``. ``restore`` and ``save_template`` are the supervisor's
    (:class:`~secvf.runtime.supervisor.Supervisor`): begin from a saved state, or boot a
    sandbox to save as a template. ``before_start`` runs while the VM's lock is held and
    the VM is known to be stopped, just before the supervisor starts (a snapshot revert
    puts the disk back there).

    Raises:
        ConfigError: ``wait_ready`` for a VM whose guest prints no ready marker.
        StateError: it is already running (or was stopped while starting).
        LockBusy: another command is starting it.
        LaunchFailed: QEMU or a device helper failed (carries argv and output).
        SupervisorFailed: the supervisor itself failed (``.stage``), or sent no report.
        NotFound, ConfigError, ForbiddenDevice: the VM's image or files are unusable.
    """
    bundle, config = get_vm(name)
    if wait_ready is not None:
        check_ready_marker(config)
    with locked(bundle.edit_lock, f"VM '{name}'"):
        if is_running(bundle):
            if current_state(bundle, config.id).state is VmState.PAUSED:
                raise StateError(f"VM '{name}' is already running, paused; resume it: secvf "
                                 f"vm resume {name}", "paused", ["stopped"])
            raise StateError(f"VM '{name}' is already running", "running", ["stopped"])
        reap_stale_runtime(bundle, config.id)
        if before_start is not None:
            before_start(bundle)
        report = _spawn_supervisor(bundle, name, accel, restore, save_template)
    if isinstance(report, StartFailed):
        raise error_from_failure(report)
    if wait_ready:
        wait_for_ready(name, wait_ready)
    return vm_status(name)


def _spawn_supervisor(bundle: Bundle, name: str, accel: str | None,
                      restore: Path | None, save_template: Path | None) -> Started | StartFailed:
    read_fd, write_fd = os.pipe()
    try:
        try:
            with bundle.supervisor_log.open("ab") as out:
                start_supervisor(name, report_fd=write_fd, log=out, accel=accel,
                                 restore=restore, save_template=save_template)
        finally:
            os.close(write_fd)  # the supervisor has its own copy
        data, timed_out = _read_report(read_fd, START_REPORT_TIMEOUT_S)
    finally:
        os.close(read_fd)
    if not data:
        what = (f"sent no report within {START_REPORT_TIMEOUT_S:.0f} s" if timed_out
                else "exited without a report")
        return _no_report(f"the supervisor {what}; see {bundle.supervisor_log}")
    try:
        return decode(StartReport, data, source="the supervisor's start report").root
    except CorruptRecord as exc:
        return _no_report(f"{exc}; see {bundle.supervisor_log}")


def _no_report(message: str) -> StartFailed:
    return StartFailed(kind=FailureKind.SUPERVISOR_FAILED, stage=LaunchStage.REPORT,
                       message=message)


def _read_report(fd: int, timeout: float) -> tuple[bytes, bool]:
    """Read one line from ``fd``; return it and whether ``timeout`` ran out first."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return data.strip(), True
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return data.strip(), True
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.strip(), False


def error_from_failure(failure: StartFailed) -> SecVFError:
    """The exception a supervisor's start failure stands for (the inverse of
    :func:`secvf.runtime.supervisor.failure_of`)."""
    match failure.kind:
        case FailureKind.LAUNCH_FAILED:
            return LaunchFailed(failure.what or "QEMU", failure.argv, failure.output,
                                failure.exitcode)
        case FailureKind.STATE:
            return StateError(failure.message, failure.state or "", failure.required)
        case FailureKind.NOT_FOUND:
            return NotFound(failure.message)
        case FailureKind.INVALID_CONFIG:
            return ConfigError(failure.message)
        case FailureKind.FORBIDDEN_DEVICE:
            exc = ForbiddenDevice(failure.field or "", failure.vm_kind or "")
            exc.args = (failure.message,)  # the supervisor's wording, detail included
            return exc
        case FailureKind.SUPERVISOR_FAILED:
            return SupervisorFailed(failure.stage, failure.message, failure.errno)
    return SecVFError(failure.message)


def check_ready_marker(config: VMConfig) -> None:
    """Refuse to wait for the ready marker of a VM whose guest never prints one.

    Only the init of a SecVF image prints it; an installer ISO or a disk image of your
    own does not, so waiting would always time out (and leave the VM running).

    Raises:
        ConfigError: the VM boots an ISO or a disk image (says how to watch it instead).
    """
    if isinstance(config.boot, ImageBoot):
        return
    source = "an ISO" if isinstance(config.boot, IsoBoot) else "a disk image"
    watch = f"'secvf vm logs {config.name} -f'"
    if config.display is not DisplayMode.NONE:
        watch += f" or 'secvf vm display {config.name}'"
    raise ConfigError(f"VM '{config.name}' boots {source}: only the guest of a SecVF image "
                      "prints the ready marker --wait-ready waits for, so it would always time"
                      f" out; start it without --wait-ready and watch it with {watch}")


def wait_for_ready(name: str, timeout: float) -> dict[str, Any]:
    """Wait until the guest printed its ready marker; return the status.

    Raises:
        ConfigError: the VM's guest prints no ready marker (:func:`check_ready_marker`).
        StateError: the VM stopped or did not become ready within ``timeout``.
    """
    check_ready_marker(get_vm(name)[1])
    deadline = time.monotonic() + timeout
    while True:
        status = get_status(name)
        if status.guest_ready:
            return status.to_json()
        if status.state is VmState.PAUSED:
            raise StateError(f"VM '{name}' is paused, so its guest cannot become ready; "
                             f"resume it: secvf vm resume {name}", str(status.state),
                             [str(VmState.RUNNING)])
        if status.state not in (VmState.STARTING, VmState.RUNNING):
            raise StateError(f"VM '{name}' is {status.state} (it did not become ready)",
                             str(status.state))
        if time.monotonic() > deadline:
            raise StateError(f"VM '{name}' did not report ready within {timeout:.0f} s; "
                             f"see: secvf vm logs {name}", str(status.state))
        time.sleep(0.2)


def stop_vm(name: str, *, force: bool = False, timeout: float = 30.0,
            progress: StopListener | None = None) -> dict[str, Any]:
    """Stop VM ``name``: graceful powerdown within ``timeout`` then forced (or forced now,
    with ``force`` or a ``timeout`` of 0); return its status.

    If the supervisor does not answer (or refuses), it gets SIGTERM, then SIGKILL.
    ``progress`` gets a :class:`StopWaiting` about once a second while the guest has
    time left to power off, and a :class:`StopDone` (forced or not) at the end.

    Raises:
        StateError: the VM is not running, or still runs after all that.
    """
    bundle, config = get_vm(name)
    if not is_running(bundle):
        raise StateError(f"VM '{name}' is not running", "stopped", ["running"])
    files = RuntimeFiles(config.id)
    gentle = not force and timeout > 0

    def waiting(elapsed: float) -> None:
        if progress is not None and gentle and elapsed < timeout:
            progress(StopWaiting(left_s=timeout - elapsed, timeout_s=timeout))

    waiting(0.0)
    started = time.monotonic()
    reply = _control(files, StopRequest(force=force, timeout=timeout),
                     timeout + STOP_GRACE_S + 10, on_wait=waiting)
    if reply is None or not reply.ok:
        _signal_supervisor(bundle, config)
        done = StopDone(forced=True, why="the supervisor did not answer; it was stopped with "
                                         "signals")
    else:
        done = _stop_outcome(bool(reply.forced), gentle, timeout,
                             time.monotonic() - started)
    _wait_unlocked(bundle, STOP_GRACE_S + (0 if force else timeout))
    if progress is not None:
        progress(done)
    return vm_status(name)


def _stop_outcome(forced: bool, gentle: bool, timeout: float, elapsed: float) -> StopDone:
    """How a stop the supervisor carried out went, in words."""
    if not forced:
        return StopDone(forced=False, why="the guest powered off")
    if not gentle:
        return StopDone(forced=True, why="QEMU was quit without waiting for the guest")
    if elapsed >= timeout:
        return StopDone(forced=True, why=f"the guest did not power off within {timeout:g} s;"
                                         " forced")
    return StopDone(forced=True, why="QEMU was quit before the guest could power off (it was "
                                     "still starting, or failed)")


def change_medium(name: str, iso: Path | None) -> None:
    """Have running VM ``name``'s supervisor eject the medium of its cdrom drive
    (``iso`` None) or insert ``iso`` (read-only); returns once QEMU confirmed it.

    The caller checks ``iso`` first (the supervisor checks it again).

    Raises:
        StateError: the VM is not running, or is paused.
        SecVFError: the supervisor refused (its reason: no cdrom drive, QEMU's error) or
            did not answer.
    """
    bundle, config = get_vm(name)
    if not is_running(bundle):
        raise StateError(f"VM '{name}' is not running", "stopped", ["running"])
    _refuse_paused(bundle, config, "change its medium")
    reply = _control(RuntimeFiles(config.id), MediaRequest(iso=None if iso is None else str(iso)),
                     MEDIA_REPLY_TIMEOUT_S)
    if reply is None:
        raise SecVFError(f"the supervisor of VM '{name}' did not answer the medium change; "
                         f"see {bundle.supervisor_log}")
    if not reply.ok:
        raise SecVFError(f"VM '{name}': {reply.error}")


def snapshot_running(name: str, request: SnapshotRequest) -> ControlReply:
    """Have running VM ``name``'s supervisor take a snapshot (see
    :class:`~secvf.model.runtime.SnapshotRequest`); returns its reply once the guest runs
    again.

    Raises:
        StateError: the VM is not running, or is paused.
        SnapshotError: the supervisor refused or failed (its reason), or did not answer.
    """
    bundle, config = get_vm(name)
    _refuse_paused(bundle, config, "take or delete a snapshot")
    return _ask_running(name, request, "snapshot request")


def dump_memory(name: str, path: Path) -> int:
    """Have running VM ``name``'s supervisor write the guest's memory to new file
    ``path`` (an ELF core, 0600); returns its size once the guest runs again.

    Raises:
        StateError: the VM is not running.
        SnapshotError: the supervisor refused or failed (its reason), or did not answer.
    """
    _ask_running(name, DumpRequest(path=str(path.absolute())), "memory dump")
    return path.stat().st_size


def pause_vm(name: str) -> dict[str, Any]:
    """Pause running VM ``name``: its supervisor has QEMU stop the vCPUs (QMP ``stop``,
    checked with ``query-status``); returns its status, ``paused``. The guest's memory,
    devices and connections stay as they are; its clock stands still until
    :func:`resume_vm`. Already paused: nothing happens.

    Raises:
        StateError: the VM is not running (stopped, starting or stopping).
        SecVFError: the supervisor or QEMU refused (its reason), or did not answer.
    """
    return _set_paused(name, True)


def resume_vm(name: str) -> dict[str, Any]:
    """Resume paused VM ``name`` (QMP ``cont``, checked with ``query-status``); returns
    its status, ``running``. Already running: nothing happens.

    Raises:
        StateError: the VM is not running or paused (stopped, starting or stopping).
        SecVFError: the supervisor or QEMU refused (its reason), or did not answer.
    """
    return _set_paused(name, False)


def _refuse_paused(bundle: Bundle, config: VMConfig, to: str) -> None:
    """Raise :func:`~secvf.runtime.lifecycle.paused_error` if the VM is paused (its
    supervisor refuses such a request too; this says so before anything is sent)."""
    if current_state(bundle, config.id).state is VmState.PAUSED:
        raise paused_error(config.name, to)


def _set_paused(name: str, paused: bool) -> dict[str, Any]:
    verb = "pause" if paused else "resume"
    bundle, config = get_vm(name)
    state = current_state(bundle, config.id).state
    if state not in (VmState.RUNNING, VmState.PAUSED):
        hint = f"start it: secvf vm start {name}" if state in (VmState.STOPPED, VmState.CRASHED) \
            else "wait until it runs"
        raise StateError(f"VM '{name}' is {state}, so it cannot {verb} ({hint})", str(state),
                         [str(VmState.RUNNING), str(VmState.PAUSED)])
    _ask_running(name, PauseRequest(paused=paused), f"{verb} request", error=SecVFError,
                 timeout=PAUSE_REPLY_TIMEOUT_S)
    return vm_status(name)


def _ask_running(name: str, request: SnapshotRequest | DumpRequest | PauseRequest, what: str,
                 *, error: type[SecVFError] = SnapshotError,
                 timeout: float = SNAPSHOT_REPLY_TIMEOUT_S) -> ControlReply:
    """Send ``request`` (named ``what`` in errors) to running VM ``name``'s supervisor and
    return its reply once it was carried out.

    Raises:
        StateError: the VM is not running.
        error: the supervisor refused or failed (its reason), or did not answer within
            ``timeout``.
    """
    bundle, config = get_vm(name)
    if not is_running(bundle):
        raise StateError(f"VM '{name}' is not running", "stopped", ["running"])
    reply = _control(RuntimeFiles(config.id), request, timeout)
    if reply is None:
        raise error(f"the supervisor of VM '{name}' did not answer the {what}; "
                    f"see {bundle.supervisor_log}")
    if not reply.ok:
        raise error(f"VM '{name}': {reply.error}")
    return reply


def _signal_supervisor(bundle: Bundle, config: VMConfig) -> None:
    record = current_state(bundle, config.id).record
    if record is None:
        return
    pid = record.supervisor_pid
    seclog.write_event("supervisor_unresponsive", severity=Severity.WARNING, vm=config.name,
                       vm_id=config.id, pid=pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_unlocked(bundle, STOP_GRACE_S, raise_on_timeout=False):
            return


def _wait_unlocked(bundle: Bundle, timeout: float, *, raise_on_timeout: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while is_running(bundle):
        if time.monotonic() > deadline:
            if raise_on_timeout:
                raise StateError(f"VM '{bundle.name}' is still running after {timeout:.0f} s",
                                 "stopping")
            return False
        time.sleep(0.05)
    return True


def _control(files: RuntimeFiles,
             request: StopRequest | MediaRequest | SnapshotRequest | DumpRequest | PauseRequest,
             timeout: float, *,
             on_wait: Callable[[float], None] | None = None) -> ControlReply | None:
    """Send one request to the supervisor's control socket; None if it does not answer
    within ``timeout`` (no socket, a timeout, or a reply that does not parse).

    While it waits for the reply, ``on_wait`` is called with the seconds since the
    request was sent, every :data:`STOP_PROGRESS_EVERY_S`.
    """
    sent = time.monotonic()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(files.control_socket))
            sock.sendall(encode(request))
            sock.settimeout(STOP_PROGRESS_EVERY_S if on_wait is not None else timeout)
            data = b""
            while not data.endswith(b"\n"):
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    elapsed = time.monotonic() - sent
                    if on_wait is None or elapsed > timeout:
                        raise
                    on_wait(elapsed)
                    continue
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        log.info("control socket %s: %s", files.control_socket, exc)
        return None
    try:
        return decode(ControlReply, data, source="the supervisor's control reply")
    except CorruptRecord as exc:
        log.warning("%s", exc)
        return None


def get_status(name: str) -> VmStatus:
    """Status of VM ``name``: ``vm.json`` plus the live record (or the last run).

    Removes the runtime files of a supervisor that died, first.

    Raises:
        NotFound, ConfigError: no such VM, or its ``vm.json`` is invalid.
        CorruptRecord: its state file or ``last_run.json`` does not parse.
    """
    bundle, config = get_vm(name)
    reap_stale_runtime(bundle, config.id)
    view = current_state(bundle, config.id)
    record = view.record
    uptime = None
    if record is not None and view.live:
        begin = datetime.fromisoformat(record.started_at.replace("Z", "+00:00"))
        uptime = round(time.time() - begin.timestamp(), 1)
    return VmStatus(
        name=config.name, id=config.id, kind=str(config.kind), state=view.state,
        pid=record.supervisor_pid if record else None,
        qemu_pid=record.qemu_pid if record else None,
        accel=record.accel if record else None,
        accel_reason=record.accel_reason if record else None,
        uptime_s=uptime, guest_ready=record.guest_ready if record else False,
        devices=record.devices if record else [], channels=record.channels if record else [],
        network=config.network_summary, nics=config.nics, cpus=config.cpus,
        memory_mib=config.memory_mib,
        exec_socket=record.exec_socket if record else None, last_run=view.last_run,
        vsock_backend=config.channels.vsock_backend if config.channels else None,
        device_errors=record.device_errors if record else [],
        snapshots=[snap.name for snap in list_snapshots(bundle)[0]],
        restored_from=record.restored_from if record and view.live else None,
        hotplugged=record.hotplugged if record and view.live else [],
        resource_warnings=record.resource_warnings if record and view.live else [],
        jail=_live_jail(record.jail, config.id) if record and view.live else None,
    )


def _live_jail(jail: JailInfo | None, vm_id: str) -> JailInfo | None:
    """The run's jail record with its cgroup's current use."""
    if jail is None or not jail.cgroup:
        return jail
    from secvf.jail.cgroup import find_vm_cgroup
    from secvf.jail.vmjail import live_usage

    try:
        cgroup = find_vm_cgroup(vm_id)
    except OSError:
        return jail
    return jail.model_copy(update={"usage": live_usage(cgroup)})


def vm_status(name: str) -> dict[str, Any]:
    """:func:`get_status` as the JSON-able dict ``vm status --json`` prints
    (the fields of :class:`~secvf.model.runtime.VmStatus`, in that order)."""
    return get_status(name).to_json()
