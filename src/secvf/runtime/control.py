"""Starting, stopping and inspecting VMs from any ``secvf`` process.

``start_vm`` spawns a detached supervisor (``python -m secvf.runtime.supervisor``) and
waits for its one-line JSON report on a pipe: success once QEMU is up and its
device tree passed the channel check, or the failure with QEMU's output and
command line. ``stop_vm`` asks the supervisor over its control socket and falls
back to signals if the supervisor does not answer. ``vm_status`` combines
``vm.json`` with the supervisor's published runtime state.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

from secvf.errors import LaunchFailed, SecVFError, StateError
from secvf.model.config import VMConfig
from secvf.store import events as seclog
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.events import Severity
from secvf.store.library import get_vm
from secvf.store.locks import locked
from secvf.store.runstate import VmState, current_state, is_running

START_REPORT_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


def start_vm(
    name: str, *, accel: str | None = None, wait_ready: float | None = None
) -> dict[str, Any]:
    """Start VM ``name`` under a detached supervisor; return its status once running.

    With ``wait_ready`` (seconds), also wait for the guest's ready marker.

    Raises:
        StateError: it is already running. LockBusy: another command is starting it.
        LaunchFailed: QEMU or a device helper failed (carries argv and output).
    """
    bundle, config = get_vm(name)
    with locked(bundle.edit_lock, f"VM '{name}'"):
        if is_running(bundle):
            raise StateError(f"VM '{name}' is already running", "running", ["stopped"])
        report = _spawn_supervisor(bundle, name, accel)
    if not report.get("ok"):
        _raise_report(report)
    if wait_ready:
        wait_for_ready(name, wait_ready)
    return vm_status(name)


def _spawn_supervisor(bundle: Bundle, name: str, accel: str | None) -> dict[str, Any]:
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
        data = _read_report(read_fd, START_REPORT_TIMEOUT_S)
    finally:
        os.close(read_fd)
    if not data:
        return {"ok": False, "type": "LaunchFailed",
                "error": f"the supervisor exited without a report; see {bundle.supervisor_log}"}
    try:
        report = json.loads(data)
    except json.JSONDecodeError:
        return {"ok": False, "type": "LaunchFailed", "error": f"bad supervisor report: {data!r}"}
    return report if isinstance(report, dict) else {"ok": False, "error": "bad report"}


def _read_report(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.strip()


def _raise_report(report: dict[str, Any]) -> None:
    if report.get("type") == "StateError":
        raise StateError(str(report.get("error")), "running")
    if "argv" in report:
        raise LaunchFailed("QEMU", report["argv"], str(report.get("output", "")), None)
    raise SecVFError(str(report.get("error", "the VM failed to start")))


def wait_for_ready(name: str, timeout: float) -> dict[str, Any]:
    """Wait until the guest printed its ready marker; return the status.

    Raises:
        StateError: the VM stopped or did not become ready within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = vm_status(name)
        if status.get("guest_ready"):
            return status
        if status["state"] not in (VmState.STARTING, VmState.RUNNING):
            raise StateError(f"VM '{name}' is {status['state']} (it did not become ready)",
                             str(status["state"]))
        if time.monotonic() > deadline:
            raise StateError(f"VM '{name}' did not report ready within {timeout:.0f} s; "
                             f"see: secvf vm logs {name}", str(status["state"]))
        time.sleep(0.2)


def stop_vm(name: str, *, force: bool = False, timeout: float = 30.0) -> dict[str, Any]:
    """Stop VM ``name``: graceful powerdown within ``timeout`` then forced (or forced now).

    Raises:
        StateError: the VM is not running.
    """
    bundle, config = get_vm(name)
    if not is_running(bundle):
        raise StateError(f"VM '{name}' is not running", "stopped", ["running"])
    files = RuntimeFiles(config.id)
    reply = _control(files, {"op": "stop", "force": force, "timeout": timeout},
                     timeout + STOP_GRACE_S + 10)
    if reply is None:
        _signal_supervisor(bundle, files, config)
    _wait_unlocked(bundle, STOP_GRACE_S + (0 if force else timeout))
    return vm_status(name)


def _signal_supervisor(bundle: Bundle, files: RuntimeFiles, config: VMConfig) -> None:
    state, record = current_state(bundle, config.id)
    pid = record.get("supervisor_pid")
    if not isinstance(pid, int):
        return
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


def _control(files: RuntimeFiles, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """Send one request to the supervisor's control socket; None if it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(files.control_socket))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    try:
        reply = json.loads(data)
    except json.JSONDecodeError:
        return None
    return reply if isinstance(reply, dict) else None


def vm_status(name: str) -> dict[str, Any]:
    """Status of VM ``name`` as a JSON-able dict.

    Keys: name, id, kind, state, pid (supervisor), qemu_pid, accel, uptime_s,
    guest_ready, devices (live, from QMP), channels, network, cpus, memory_mib,
    exec_socket (AI sandboxes while running), last_run.
    """
    bundle, config = get_vm(name)
    state, record = current_state(bundle, config.id)
    status: dict[str, Any] = {
        "name": config.name, "id": config.id, "kind": str(config.kind), "state": str(state),
        "pid": record.get("supervisor_pid"), "qemu_pid": record.get("qemu_pid"),
        "accel": record.get("accel"), "accel_reason": record.get("accel_reason"),
        "uptime_s": None, "guest_ready": bool(record.get("guest_ready")),
        "devices": record.get("devices", []), "channels": record.get("channels", []),
        "network": str(config.network), "cpus": config.cpus, "memory_mib": config.memory_mib,
        "exec_socket": record.get("exec_socket"), "last_run": record.get("last_run"),
        "vsock_backend": config.channels.vsock_backend if config.channels else None,
        "device_errors": record.get("device_errors", []),
    }
    started = record.get("started_at")
    if started and state in (VmState.RUNNING, VmState.STARTING, VmState.STOPPING):
        begin = datetime.fromisoformat(str(started).replace("Z", "+00:00"))
        status["uptime_s"] = round(time.time() - begin.timestamp(), 1)
    return status
