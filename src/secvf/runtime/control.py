"""Starting, stopping and inspecting VMs from any ``secvf`` process.

``start_vm`` spawns a detached supervisor (``python -m secvf.runtime.supervisor``) and
waits for its one-line :class:`~secvf.model.runtime.StartReport` on a pipe: success
once QEMU is up and its device tree passed the channel check, or a typed failure
that :func:`error_from_failure` turns back into the matching
:class:`~secvf.errors.SecVFError`. ``stop_vm`` sends a
:class:`~secvf.model.runtime.StopRequest` over the supervisor's control socket and
falls back to signals if the supervisor does not answer. ``vm_status`` combines
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
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

from secvf.errors import (
    ConfigError,
    CorruptRecord,
    ForbiddenDevice,
    LaunchFailed,
    NotFound,
    SecVFError,
    StateError,
    SupervisorFailed,
)
from secvf.model.config import VMConfig
from secvf.model.runtime import (
    ControlReply,
    FailureKind,
    LaunchStage,
    Started,
    StartFailed,
    StartReport,
    StopRequest,
    VmState,
    VmStatus,
    decode,
    encode,
)
from secvf.store import events as seclog
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.events import Severity
from secvf.store.library import get_vm
from secvf.store.locks import locked
from secvf.store.runstate import current_state, is_running, reap_stale_runtime

log = logging.getLogger("secvf.runtime.control")

START_REPORT_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


def start_vm(
    name: str, *, accel: str | None = None, wait_ready: float | None = None
) -> dict[str, Any]:
    """Start VM ``name`` under a detached supervisor; return its status once running.

    With ``wait_ready`` (seconds), also wait for the guest's ready marker. When this
    raises, the supervisor has already torn the run down and written ``last_run.json``.

    Raises:
        StateError: it is already running (or was stopped while starting).
        LockBusy: another command is starting it.
        LaunchFailed: QEMU or a device helper failed (carries argv and output).
        SupervisorFailed: the supervisor itself failed (``.stage``), or sent no report.
        NotFound, ConfigError, ForbiddenDevice: the VM's image or files are unusable.
    """
    bundle, config = get_vm(name)
    with locked(bundle.edit_lock, f"VM '{name}'"):
        if is_running(bundle):
            raise StateError(f"VM '{name}' is already running", "running", ["stopped"])
        reap_stale_runtime(bundle, config.id)
        report = _spawn_supervisor(bundle, name, accel)
    if isinstance(report, StartFailed):
        raise error_from_failure(report)
    if wait_ready:
        wait_for_ready(name, wait_ready)
    return vm_status(name)


def _spawn_supervisor(bundle: Bundle, name: str, accel: str | None) -> Started | StartFailed:
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "secvf.runtime.supervisor", "--vm", name,
            "--report-fd", str(write_fd)]
    if accel:
        argv += ["--accel", accel]
    with bundle.supervisor_log.open("ab") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         pass_fds=(write_fd,), start_new_session=True, close_fds=True)
    os.close(write_fd)
    try:
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


def wait_for_ready(name: str, timeout: float) -> dict[str, Any]:
    """Wait until the guest printed its ready marker; return the status.

    Raises:
        StateError: the VM stopped or did not become ready within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = get_status(name)
        if status.guest_ready:
            return status.to_json()
        if status.state not in (VmState.STARTING, VmState.RUNNING):
            raise StateError(f"VM '{name}' is {status.state} (it did not become ready)",
                             str(status.state))
        if time.monotonic() > deadline:
            raise StateError(f"VM '{name}' did not report ready within {timeout:.0f} s; "
                             f"see: secvf vm logs {name}", str(status.state))
        time.sleep(0.2)


def stop_vm(name: str, *, force: bool = False, timeout: float = 30.0) -> dict[str, Any]:
    """Stop VM ``name``: graceful powerdown within ``timeout`` then forced (or forced now).

    If the supervisor does not answer (or refuses), it gets SIGTERM, then SIGKILL.

    Raises:
        StateError: the VM is not running, or still runs after all that.
    """
    bundle, config = get_vm(name)
    if not is_running(bundle):
        raise StateError(f"VM '{name}' is not running", "stopped", ["running"])
    files = RuntimeFiles(config.id)
    reply = _control(files, StopRequest(force=force, timeout=timeout),
                     timeout + STOP_GRACE_S + 10)
    if reply is None or not reply.ok:
        _signal_supervisor(bundle, config)
    _wait_unlocked(bundle, STOP_GRACE_S + (0 if force else timeout))
    return vm_status(name)


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


def _control(files: RuntimeFiles, request: StopRequest, timeout: float) -> ControlReply | None:
    """Send one request to the supervisor's control socket; None if it does not answer
    (no socket, a timeout, or a reply that does not parse)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(files.control_socket))
            sock.sendall(encode(request))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
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
        network=str(config.network), cpus=config.cpus, memory_mib=config.memory_mib,
        exec_socket=record.exec_socket if record else None, last_run=view.last_run,
        vsock_backend=config.channels.vsock_backend if config.channels else None,
        device_errors=record.device_errors if record else [],
    )


def vm_status(name: str) -> dict[str, Any]:
    """:func:`get_status` as the JSON-able dict ``vm status --json`` prints
    (the fields of :class:`~secvf.model.runtime.VmStatus`, in that order)."""
    return get_status(name).to_json()
