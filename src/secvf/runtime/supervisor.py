"""The per-VM supervisor: one process per running VM, owning QEMU and its helpers.

Launch sequence (``Supervisor.run``), each step undone in ``finally``:

1. take the bundle's ``run.lock`` (held for the whole run: the truth of "running");
2. publish state ``starting``; choose the accelerator (KVM only if probed good);
3. build the machine plan with the builder for the VM's kind;
4. start the plan's helpers (vsock backend, virtiofsd) and wait until each is ready;
5. start QEMU paused (``-S``), every child bound to us with ``PR_SET_PDEATHSIG``;
6. connect QMP, walk the live device tree and check it against the VM's kind — a
   channel device on a non-sandbox VM stops the VM before the guest runs one
   instruction, with a CRITICAL event;
7. resume the guest, publish ``running``, report success to whoever started us;
8. start the exec bridge (AI sandboxes only), then watch: QEMU's exit, QMP events
   (shutdown, guest panic), helpers dying, the guest's ready marker on the serial
   log, and stop requests on the control socket or SIGTERM.

Stopping: ``system_powerdown`` and wait; on timeout (or ``force``) QMP ``quit``,
then SIGKILL. How the run ended (stopped or crashed, and why) goes to
``last_run.json`` and the security log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from secvf.errors import LaunchFailed, LockBusy, SecVFError
from secvf.machine import MachinePlan, build_machine
from secvf.machine.common import resolve_image
from secvf.machine.plan import HelperSpec, qemu_binary
from secvf.model.channels import SANDBOX_CHANNELS
from secvf.model.config import Accel, ImageBoot, VMKind, now_iso, write_json_atomic
from secvf.runtime.accel import choose_accel
from secvf.runtime.devtree import LiveDevice, channels_in, walk_devices
from secvf.runtime.guestlog import SerialEvent, SerialScanner
from secvf.runtime.procutil import die_with_parent
from secvf.store import events as seclog
from secvf.store.bundle import RuntimeFiles
from secvf.store.events import Severity
from secvf.store.library import get_vm
from secvf.store.locks import FileLock
from secvf.store.runstate import VmState, remove_stale_runtime_files, write_runtime_state

QMP_CONNECT_TIMEOUT_S = 30.0
HELPER_READY_TIMEOUT_S = 15.0
POWERDOWN_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 5.0
HELPER_EXIT_GRACE_S = 1.0
MARKER_POLL_S = 0.1
SERIAL_POLL_S = 1.0
SERIAL_READ_BYTES = 1 << 20

log = logging.getLogger("secvf.runtime.supervisor")


class Supervisor:
    """Runs one VM from launch to exit. Use :meth:`run` (blocking, asyncio)."""

    def __init__(self, name: str, *, accel: str | None = None, report_fd: int | None = None):
        self.bundle, self.config = get_vm(name)
        self.files = RuntimeFiles(self.config.id)
        self.accel_override = accel
        self.report_fd = report_fd
        self.log = log.getChild(name)
        self.record: dict[str, Any] = {}
        self.qemu: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None
        self.helpers: dict[str, asyncio.subprocess.Process] = {}
        self.stop_reason: str | None = None  # set once a stop was requested
        self.crash_reason: str | None = None  # set when the run ended abnormally
        self.guest_shutdown = False
        self.bridge: Any = None
        self._stop_lock = asyncio.Lock()
        self._exited = asyncio.Event()

    def __repr__(self) -> str:
        return f"Supervisor(vm={self.config.name!r}, state={self.record.get('state')!r})"

    # ---- entry point -------------------------------------------------------------------

    async def run(self) -> int:
        """Launch, watch and clean up the VM; return the process exit code."""
        lock = FileLock(self.bundle.run_lock, f"VM '{self.config.name}'")
        try:
            lock.acquire()
        except LockBusy:
            self._report({"ok": False, "type": "StateError",
                          "error": f"VM '{self.config.name}' is already running"})
            return 3
        try:
            return await self._run_locked()
        finally:
            remove_stale_runtime_files(self.files)
            lock.release()

    async def _run_locked(self) -> int:
        remove_stale_runtime_files(self.files)
        self._publish(VmState.STARTING, supervisor_pid=os.getpid(), started_at=now_iso())
        control = await asyncio.start_unix_server(self._serve_control,
                                                  path=str(self.files.control_socket))
        os.chmod(self.files.control_socket, 0o600)
        try:
            await self._launch()
        except SecVFError as exc:
            self._report_failure(exc)
            await self._teardown()
            self._write_last_run(VmState.STOPPED, f"launch failed: {exc}")
            control.close()
            return 1
        self._report({"ok": True, "state": str(VmState.RUNNING), "accel": self.record["accel"]})
        await self._watch()
        control.close()
        await self._teardown()
        return self._finish()

    # ---- launch --------------------------------------------------------------------------

    async def _launch(self) -> None:
        kernel = initrd = None
        if isinstance(self.config.boot, ImageBoot):
            image = resolve_image(self.config.boot)
            kernel, initrd = image.kernel, image.initrd
        requested = Accel(self.accel_override) if self.accel_override else self.config.accel
        choice = await asyncio.to_thread(choose_accel, requested, kernel, initrd)
        self._publish(VmState.STARTING, accel=choice.accel, accel_reason=choice.reason)
        plan = build_machine(self.config, self.bundle, self.files, choice.accel)
        for spec in plan.helpers:
            await self._start_helper(spec)
        await self._start_qemu(plan)
        await self._connect_qmp()
        walk_started = time.monotonic()
        devices = await walk_devices(self._qmp())
        self.log.info("device tree: %d QOM nodes read in %.2f s", len(devices),
                      time.monotonic() - walk_started)
        self._check_devices(devices)
        await self._qmp().execute("cont")
        self._publish(
            VmState.RUNNING,
            qemu_pid=self._qemu().pid,
            devices=[d.to_json() for d in devices if d.user_visible],
            device_types=sorted({d.type for d in devices}),
            channels=[d.to_json() for d in channels_in(devices)],
            device_count=len(devices),
            guest_ready=False,
            planned_devices=[d.__dict__ for d in plan.devices],
        )
        seclog.write_event("vm_started", vm=self.config.name, vm_id=self.config.id,
                           kind=str(self.config.kind), accel=choice.accel,
                           devices=[d.type for d in devices if d.user_visible])

        await self._start_bridge()

    async def _start_helper(self, spec: HelperSpec) -> None:
        argv = list(spec.argv)
        pass_fds: list[int] = []
        listener: socket.socket | None = None
        read_fd = write_fd = -1
        if spec.listen_socket is not None and spec.fd_arg:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                spec.listen_socket.unlink()
            listener.bind(str(spec.listen_socket))
            os.chmod(spec.listen_socket, 0o600)
            listener.listen(1)
            listener.set_inheritable(True)
            pass_fds.append(listener.fileno())
            argv.append(spec.fd_arg.format(fd=listener.fileno()))
        if spec.ready_fd_arg:
            read_fd, write_fd = os.pipe()
            pass_fds.append(write_fd)
            argv += [spec.ready_fd_arg, str(write_fd)]
        with self.bundle.supervisor_log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                pass_fds=pass_fds, preexec_fn=die_with_parent,
            )
        if listener is not None:
            listener.close()
        self.helpers[spec.name] = proc
        if write_fd >= 0:
            os.close(write_fd)
            line = await asyncio.to_thread(_read_line_with_timeout, read_fd,
                                           HELPER_READY_TIMEOUT_S)
            if not line.startswith("READY"):
                raise LaunchFailed(f"device helper '{spec.name}'", argv,
                                   _tail(self.bundle.supervisor_log), proc.returncode)
        self.log.info("helper %s started (pid %d)", spec.name, proc.pid)

    async def _start_qemu(self, plan: MachinePlan) -> None:
        argv = [str(qemu_binary()), *plan.argv_tail]
        self.record["qemu_argv"] = argv
        self.qemu_log = self.bundle.path / "qemu.log"
        with self.qemu_log.open("wb") as out:
            try:
                self.qemu = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    preexec_fn=die_with_parent,
                )
            except OSError as exc:
                raise LaunchFailed("QEMU", argv, str(exc), None) from exc
        self.log.info("QEMU started (pid %d): %s", self.qemu.pid, " ".join(argv))

    async def _connect_qmp(self) -> None:
        deadline = time.monotonic() + QMP_CONNECT_TIMEOUT_S
        qmp = QMPClient(self.config.name)
        while True:
            if self._qemu().returncode is not None:
                raise self._qemu_failed()
            if self.files.qmp_socket.exists():
                try:
                    await qmp.connect(str(self.files.qmp_socket))
                    self.qmp = qmp
                    return
                except QMPError:
                    pass
            if time.monotonic() > deadline:
                raise LaunchFailed("QEMU", self.record["qemu_argv"],
                                   "QMP socket did not come up", None)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._qemu().wait(), 0.05)

    def _qemu_failed(self) -> LaunchFailed:
        return LaunchFailed("QEMU", self.record.get("qemu_argv", []),
                            self.qemu_log.read_text(errors="replace"), self._qemu().returncode)

    def _check_devices(self, devices: list[LiveDevice]) -> None:
        found = channels_in(devices)
        if self.config.kind is VMKind.AI_SANDBOX:
            bad = [d for d in found if d.channel not in SANDBOX_CHANNELS]
        else:
            bad = found
        if bad:
            detail = ", ".join(f"{d.type} at {d.path}" for d in bad)
            seclog.write_event("forbidden_device", severity=Severity.CRITICAL,
                               vm=self.config.name, vm_id=self.config.id,
                               kind=str(self.config.kind), devices=[d.to_json() for d in bad])
            raise LaunchFailed(
                "QEMU", self.record.get("qemu_argv", []),
                f"forbidden host-guest channel on a {self.config.kind} VM: {detail}", None)

    async def _start_bridge(self) -> None:
        if self.config.kind is not VMKind.AI_SANDBOX:
            return
        from secvf.exec.bridge import start_bridge

        self.bridge = await start_bridge(self.config, self.files)
        self._publish(VmState.RUNNING, exec_socket=str(self.files.exec_socket))

    # ---- watching ----------------------------------------------------------------------

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        tasks = [
            asyncio.create_task(self._watch_events()),
            asyncio.create_task(self._watch_serial()),
            *(asyncio.create_task(self._watch_helper(n, p)) for n, p in self.helpers.items()),
        ]
        rc = await self._qemu().wait()
        self._exited.set()
        self.log.info("QEMU exited with %s", rc)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_signal(self, sig: int) -> None:
        asyncio.get_running_loop().create_task(
            self.stop(force=False, reason=f"signal {signal.Signals(sig).name}"))

    async def _watch_events(self) -> None:
        qmp = self._qmp()
        async for event in qmp.events:
            name = event["event"]
            data = event.get("data", {})
            if not isinstance(data, dict):
                data = {}
            if name == "SHUTDOWN" and data.get("guest"):
                self.guest_shutdown = True
            elif name == "GUEST_PANICKED":
                self.crash_reason = "guest panic"
                seclog.write_event("guest_panic", severity=Severity.ERROR, vm=self.config.name,
                                   vm_id=self.config.id, info=data)
                asyncio.get_running_loop().create_task(self._kill_qemu())

    async def _watch_serial(self) -> None:
        """Follow the serial log: publish readiness, report dead virtio devices."""
        offset = self.bundle.serial_log.stat().st_size if self.bundle.serial_log.exists() else 0
        scanner = SerialScanner()
        while True:
            await asyncio.sleep(MARKER_POLL_S if not scanner.ready else SERIAL_POLL_S)
            try:
                with self.bundle.serial_log.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read(SERIAL_READ_BYTES)
            except OSError:
                continue
            offset += len(chunk)
            for event in scanner.feed(chunk):
                self._on_serial_event(event)

    def _on_serial_event(self, event: SerialEvent) -> None:
        if event.kind == "ready":
            self._publish(VmState.RUNNING, guest_ready=True, ready_at=now_iso())
            self.log.info("guest reported ready")
            return
        errors = [*self.record.get("device_errors", []), event.line]
        self._publish(VmState(self.record["state"]), device_errors=errors)
        self.log.error("guest kernel reports a dead virtio device: %s", event.line)
        seclog.write_event("guest_device_error", severity=Severity.ERROR, vm=self.config.name,
                           vm_id=self.config.id, line=event.line)

    async def _watch_helper(self, name: str, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        with contextlib.suppress(TimeoutError):
            # helpers also exit when QEMU goes away: that is QEMU's story, not theirs
            await asyncio.wait_for(self._exited.wait(), HELPER_EXIT_GRACE_S)
        if self._exited.is_set() or self.stop_reason or self.crash_reason:
            return
        self.crash_reason = f"device helper '{name}' died (exit {rc})"
        seclog.write_event("device_helper_died", severity=Severity.ERROR, vm=self.config.name,
                           vm_id=self.config.id, helper=name, exit_code=rc,
                           action="VM stopped: QEMU cannot reconnect a vhost-user backend")
        await self.stop(force=True, reason=self.crash_reason)

    # ---- stopping ----------------------------------------------------------------------

    async def stop(self, *, force: bool, reason: str, timeout: float = POWERDOWN_TIMEOUT_S) -> None:
        """Stop the VM: ACPI powerdown with ``timeout``, then quit, then SIGKILL."""
        async with self._stop_lock:
            if self._exited.is_set():
                return
            self.stop_reason = self.stop_reason or reason
            self._publish(VmState.STOPPING)
            if not force and await self._powerdown(timeout):
                return
            seclog.write_event("vm_forced_stop", severity=Severity.WARNING, vm=self.config.name,
                               vm_id=self.config.id, reason=reason, requested_force=force)
            await self._kill_qemu()

    async def _powerdown(self, timeout: float) -> bool:
        try:
            await self._qmp().execute("system_powerdown")
        except (QMPError, AttributeError):
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)
        return self._exited.is_set()

    async def _kill_qemu(self) -> None:
        with contextlib.suppress(QMPError, AttributeError):
            await asyncio.wait_for(self._qmp().execute("quit"), QUIT_TIMEOUT_S)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exited.wait(), QUIT_TIMEOUT_S)
        if not self._exited.is_set() and self.qemu and self.qemu.returncode is None:
            self.qemu.kill()

    async def _teardown(self) -> None:
        if self.bridge is not None:
            from secvf.exec.bridge import stop_bridge

            with contextlib.suppress(Exception):
                await stop_bridge(self.config.id)
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
        if self.qemu is not None and self.qemu.returncode is None:
            self.qemu.kill()
            await self.qemu.wait()
        for proc in self.helpers.values():
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 3)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    def _finish(self) -> int:
        rc = self._qemu().returncode
        if self.crash_reason:
            state, reason = VmState.CRASHED, self.crash_reason
        elif self.stop_reason or self.guest_shutdown or rc == 0:
            state, reason = VmState.STOPPED, self.stop_reason or "guest powered off"
        else:
            state, reason = VmState.CRASHED, f"QEMU exited with {rc}: {_tail(self.qemu_log)}"
        self._publish(state)
        self._write_last_run(state, reason)
        event = "vm_stopped" if state is VmState.STOPPED else "vm_crashed"
        seclog.write_event(event, severity=Severity.INFO if state is VmState.STOPPED
                           else Severity.ERROR, vm=self.config.name, vm_id=self.config.id,
                           reason=reason, qemu_exit=rc)
        return 0 if state is VmState.STOPPED else 2

    # ---- control socket --------------------------------------------------------------

    async def _serve_control(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            request = json.loads(line or b"{}")
            op = request.get("op")
            if op == "status":
                reply: dict[str, Any] = {"ok": True, "record": self.record}
            elif op == "stop":
                timeout = float(request.get("timeout", POWERDOWN_TIMEOUT_S))
                await self.stop(force=bool(request.get("force")), reason="stop requested",
                                timeout=timeout)
                await self._exited.wait()
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, AttributeError) as exc:
            self.log.warning("bad control request: %s", exc)
        finally:
            writer.close()

    # ---- helpers -----------------------------------------------------------------------

    def _qemu(self) -> asyncio.subprocess.Process:
        assert self.qemu is not None
        return self.qemu

    def _qmp(self) -> QMPClient:
        assert self.qmp is not None
        return self.qmp

    def _publish(self, state: VmState, **fields: Any) -> None:
        transitions = self.record.setdefault("transitions", [])
        if not transitions or transitions[-1][0] != str(state):
            transitions.append([str(state), now_iso()])
        self.record.update(fields, state=str(state), name=self.config.name, id=self.config.id,
                           kind=str(self.config.kind))
        write_runtime_state(self.files, self.record)

    def _write_last_run(self, state: VmState, reason: str) -> None:
        write_json_atomic(self.bundle.last_run_file,
                          {"state": str(state), "reason": reason, "ended_at": now_iso(),
                           "accel": self.record.get("accel"),
                           "transitions": self.record.get("transitions", [])})

    def _report(self, message: dict[str, Any]) -> None:
        if self.report_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.report_fd, json.dumps(message).encode() + b"\n")
            os.close(self.report_fd)
        self.report_fd = None

    def _report_failure(self, exc: SecVFError) -> None:
        self.log.error("launch failed: %s", exc)
        msg: dict[str, Any] = {"ok": False, "type": type(exc).__name__, "error": str(exc)}
        if isinstance(exc, LaunchFailed):
            msg.update(argv=exc.argv, output=exc.output[-4000:])
        self._report(msg)


def _read_line_with_timeout(fd: int, timeout: float) -> str:
    import select

    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 256).decode(errors="replace") if ready else ""
    finally:
        os.close(fd)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_supervisor(name: str, *, accel: str | None, report_fd: int | None) -> int:
    """Run the supervisor for VM ``name`` in this process until the VM is gone."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # qemu.qmp logs QEMU's exit (EOF / EPIPE on the socket) as an error; we learn about
    # that from the process itself, and every QMP failure we care about raises
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    os.umask(0o077)  # every file and socket QEMU and the helpers create is private
    try:
        supervisor = Supervisor(name, accel=accel, report_fd=report_fd)
    except SecVFError as exc:
        if report_fd is not None:
            os.write(report_fd, json.dumps({"ok": False, "type": type(exc).__name__,
                                            "error": str(exc)}).encode() + b"\n")
        return 1
    return asyncio.run(supervisor.run())


def main(argv: list[str] | None = None) -> int:
    """``python -m secvf.runtime.supervisor --vm NAME [--accel A] [--report-fd N]``."""
    parser = argparse.ArgumentParser(prog="secvf-supervisor")
    parser.add_argument("--vm", required=True)
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--report-fd", type=int)
    args = parser.parse_args(argv)
    return run_supervisor(args.vm, accel=args.accel, report_fd=args.report_fd)


if __name__ == "__main__":
    sys.exit(main())
