"""The per-VM supervisor: one process per running VM, owning QEMU and its helpers.

Launch sequence (``Supervisor.run``); a failure names the
:class:`~secvf.model.runtime.LaunchStage` it happened in:

1. take the bundle's ``run.lock`` (held for the whole run: the truth of "running"),
   remove a dead run's leftovers and enter ``starting`` (``lock``);
2. listen on the control socket, so a stop request works from now on (``control``);
3. find the VM's image and choose the accelerator, KVM only if probed good
   (``image``, ``accel``);
4. build the machine plan with the builder for the VM's kind (``plan``);
5. start the plan's helpers (vsock backend, virtiofsd), each ready before QEMU
   (``helpers``);
6. start QEMU paused (``-S``), every child bound to us with ``PR_SET_PDEATHSIG``
   (``qemu``);
7. connect QMP, walk the live device tree and check it against the VM's kind — a
   channel device on a non-sandbox VM stops the VM before the guest runs one
   instruction, with a CRITICAL event (``qmp``, ``devices``);
8. resume the guest and enter ``running`` (``resume``), start the exec bridge (AI
   sandboxes only, ``bridge``), report success to whoever started us;
9. watch: QEMU's exit, QMP events (shutdown, guest panic), helpers dying, the guest's
   ready marker on the serial log, the disk overlay and host free space
   (:mod:`secvf.runtime.resources`), and stop requests on the control socket or SIGTERM
   (both also work while starting: the launch then ends at its next step).

Whatever happens, teardown runs in ``finally``: the bridge, QMP, QEMU and the helpers
are stopped, ``last_run.json`` is written, the final state is published (in that
order: whoever sees the final state finds why) and the runtime files are removed;
only then, with ``run.lock`` released, does a failed start send its report, so the
starter sees a VM that is already cleaned up. How a run ends:

* a deliberate launch failure (a :class:`~secvf.errors.SecVFError`: QEMU or a helper
  did not start, a forbidden device, a missing image) → ``stopped``,
  "launch failed: …";
* the supervisor's own failure (a QMP error, an OS error such as a control socket
  that cannot be bound, a bug) → ``crashed``, "supervisor failed at step …";
* after ``running``: ``crashed`` for a guest panic, a dead helper or QEMU dying on
  its own, ``stopped`` for a stop request or a guest that powered off.

Pausing (a :class:`~secvf.model.runtime.PauseRequest`): QMP ``stop`` or ``cont`` under
the media lock, checked with ``query-status``, and ``running`` ⇄ ``paused``. A paused
guest cannot answer the ACPI power button, so a graceful stop of a paused VM resumes it
first (a forced stop quits QEMU at once); snapshots and medium changes are refused while
it is paused, a memory dump is not (QEMU leaves a paused guest paused).

Stopping: ``system_powerdown`` and wait; on timeout (or ``force``) QMP ``quit``, then
SIGKILL. The state machine is :mod:`secvf.runtime.lifecycle`; the messages on the
report pipe and the control socket are in :mod:`secvf.model.runtime`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from secvf.errors import (
    ConfigError,
    CorruptRecord,
    ForbiddenDevice,
    IllegalTransition,
    LaunchFailed,
    LockBusy,
    NotFound,
    SecVFError,
    SnapshotError,
    StateError,
    SupervisorFailed,
)
from secvf.jail.inspect import jailed_pid
from secvf.jail.view import QemuFiles
from secvf.jail.vmjail import VmJail, make_vm_dir
from secvf.machine import MachinePlan, build_machine
from secvf.machine.common import (
    CDROM_DEVICE_ID,
    CONSOLE_CHARDEV,
    MONITOR_CHARDEV,
    has_cdrom,
    resolve_image,
    restamp_kernel_time,
)
from secvf.machine.plan import HelperSpec, RunMode, SwitchPort, qemu_binary
from secvf.model.channels import SANDBOX_CHANNELS
from secvf.model.config import Accel, DisplayMode, ImageBoot, IsoBoot, VMKind, now_iso
from secvf.model.runtime import (
    MAX_FAILURE_OUTPUT_CHARS,
    ControlReply,
    ControlRequest,
    DumpRequest,
    FailureKind,
    LastRun,
    LaunchStage,
    MediaRequest,
    PauseRequest,
    PlannedDeviceInfo,
    SnapshotRequest,
    Started,
    StartFailed,
    Transition,
    VmState,
    decode,
    encode,
)
from secvf.model.savedstate import SavedState
from secvf.runtime.accel import choose_accel
from secvf.runtime.devtree import LiveDevice, channels_in, walk_devices
from secvf.runtime.devwatch import DeviceWatch
from secvf.runtime.eventrelay import RELAY_INTERVAL_S, EventRelay
from secvf.runtime.guestlog import SerialEvent, SerialScanner
from secvf.runtime.hotplug import plug
from secvf.runtime.lifecycle import Lifecycle, paused_error
from secvf.runtime.logcap import GuestLogCap, GuestLogPort
from secvf.runtime.media import add_medium_fd, remove_medium_fd
from secvf.runtime.procutil import die_with_parent
from secvf.runtime.qmpclient import QuietQMPClient
from secvf.runtime.resources import ResourceWatch
from secvf.runtime.savestate import (
    delete_disk_snapshot,
    dump_guest_memory,
    load_device_state,
    prepare_migration,
    save_device_state,
    snapshot_disk,
)
from secvf.store import events as seclog
from secvf.store.bundle import RuntimeFiles
from secvf.store.disks import UnsafeDisk, check_host_file, check_vm_files
from secvf.store.events import Severity
from secvf.store.library import get_vm
from secvf.store.locks import FileLock
from secvf.store.runstate import (
    LIVE_STATES,
    remove_runtime_files,
    write_last_run,
    write_runtime_state,
)
from secvf.store.savedstate import (
    SAVED_RECORD,
    ram_file,
    read_saved_state,
    state_file,
    write_record,
)
from secvf.store.sparse import allocated_bytes, copy_into, copy_sparse

if TYPE_CHECKING:
    from secvf.exec.bridge import ExecBridge

QMP_CONNECT_TIMEOUT_S = 30.0
HELPER_READY_TIMEOUT_S = 15.0
HELPER_TERM_GRACE_S = 3.0
POWERDOWN_TIMEOUT_S = 30.0
QUIT_TIMEOUT_S = 5.0
HELPER_EXIT_GRACE_S = 1.0
CONTROL_READ_TIMEOUT_S = 5.0
#: A control request that QEMU's monitor answers (a medium change) gets this long.
MEDIA_CHANGE_TIMEOUT_S = 30.0
#: How long to wait for run.lock while readers or a reaper hold it shared for a moment.
RUN_LOCK_WAIT_S = 2.0
RUN_LOCK_POLL_S = 0.02
MARKER_POLL_S = 0.1
SERIAL_POLL_S = 1.0
SERIAL_READ_BYTES = 1 << 20
#: How long a template guest idles after its ready marker before it is saved (its agent
#: has started listening; the first seconds after boot are its busiest).
TEMPLATE_SETTLE_S = 1.0
#: A dead vsock queue is recovered at most this often (the guest controls the trigger).
VSOCK_RECOVERY_INTERVAL_S = 30.0
#: How long the guest may take to let go of an unplugged device.
UNPLUG_TIMEOUT_S = 15.0

EXIT_STOPPED = 0
EXIT_LAUNCH_FAILED = 1
EXIT_CRASHED = 2
EXIT_ALREADY_RUNNING = 3

log = logging.getLogger("secvf.runtime.supervisor")

T = TypeVar("T")


class Supervisor:
    """Runs one VM from launch to exit. Use :meth:`run` (blocking, asyncio), once."""

    def __init__(self, name: str, *, accel: str | None = None,
                 report_fd: int | None = None, restore: Path | None = None,
                 save_template: Path | None = None) -> None:
        """Load VM ``name``; ``report_fd`` is the write end of the starter's report pipe.

        ``restore``: begin the run from the saved state in that directory (a snapshot's or
        a template's) instead of booting. ``save_template``: boot an AI sandbox without
        channels, save its state into that (empty) directory once the guest is ready, and
        end the run.

        Raises:
            NotFound, ConfigError, ForbiddenDevice: ``vm.json`` is missing or invalid.
        """
        self.bundle, self.config = get_vm(name)
        self.restore = restore
        self.save_template = save_template
        self.mode = (RunMode.RESTORE if restore else RunMode.TEMPLATE if save_template
                     else RunMode.COLD)
        self.files = RuntimeFiles(self.config.id)
        self.accel_override = accel
        self.report_fd = report_fd  # None once the report was sent
        self.log = log.getChild(name)
        self.lifecycle = Lifecycle(name=self.config.name, vm_id=self.config.id,
                                   kind=self.config.kind,
                                   publish=functools.partial(write_runtime_state, self.files))
        self.stage = LaunchStage.LOCK  # the launch step in progress
        self.qemu_log = self.bundle.path / "qemu.log"
        # where this run's own lines of supervisor.log (shared by every run) begin
        self.log_offset = _size(self.bundle.supervisor_log)
        self.serial_log = self.bundle.serial_log  # this run's serial log, set at the plan step
        self.qemu_argv: list[str] = []  # set when QEMU is started
        self.qemu: asyncio.subprocess.Process | None = None
        self.qmp: QMPClient | None = None
        self.helpers: dict[str, asyncio.subprocess.Process] = {}
        self.bridge: ExecBridge | None = None
        self.plan: MachinePlan | None = None  # set at the plan step
        self.jail: VmJail | None = None  # set at the plan step (None: jails are off)
        self.relay = EventRelay(self.files.helper_events, self.config.name, self.config.id)
        self.qemu_files: QemuFiles | None = None  # set at the plan step
        self.joined: list[SwitchPort] = []  # switch ports registered for this run
        self.restored_ready = False  # the restored state was saved from a ready guest
        self._replacing: set[str] = set()  # helpers being restarted on purpose
        self._deleted: dict[str, asyncio.Event] = {}  # device id -> set on DEVICE_DELETED
        self._last_recovery = -VSOCK_RECOVERY_INTERVAL_S
        self.watch: DeviceWatch | None = None  # set once QMP is up
        self.stop_reason: str | None = None  # set once a stop was requested
        self.crash_reason: str | None = None  # set when the run ended abnormally
        self.failure: StartFailed | None = None  # set when an exception ended the run
        self.guest_shutdown = False  # the guest powered itself off
        self.forced: bool | None = None  # set by a stop: QEMU was quit/killed, no powerdown
        self._stop_lock = asyncio.Lock()
        self._media_lock = asyncio.Lock()  # one medium change or snapshot at a time
        self._exited = asyncio.Event()  # QEMU is gone (or was never started and never will)
        self._tasks: set[asyncio.Task[None]] = set()  # fire-and-forget tasks, kept alive

    def __repr__(self) -> str:
        return f"Supervisor(vm={self.config.name!r}, state={self.lifecycle.state.value!r})"

    # ---- entry point -------------------------------------------------------------------

    async def run(self) -> int:
        """Launch, watch and tear down the VM; return the process exit code.

        0: stopped; 1: the launch failed; 2: crashed; 3: the VM was already running.
        Every failure is recorded (``last_run.json``, the report pipe), not raised;
        only cancellation propagates (after teardown).
        """
        lock = FileLock(self.bundle.run_lock, f"VM '{self.config.name}'")
        try:
            await _take_lock(lock)
        except LockBusy:
            self._report(StartFailed(
                kind=FailureKind.STATE, stage=LaunchStage.LOCK,
                message=f"VM '{self.config.name}' is already running",
                state=VmState.RUNNING, required=[VmState.STOPPED]))
            return EXIT_ALREADY_RUNNING
        try:
            code = await self._run_locked()
        finally:
            remove_runtime_files(self.files)
            lock.release()
        if self.failure is not None:
            self._report(self.failure)  # a no-op if success was reported already
        return code

    async def _run_locked(self) -> int:
        control: asyncio.Server | None = None
        try:
            remove_runtime_files(self.files)  # a dead run's leftovers
            self.lifecycle.transition(VmState.STARTING, supervisor_pid=os.getpid(),
                                      started_at=now_iso())
            self._handle_signals()
            self._step(LaunchStage.CONTROL)
            control = await self._listen_control()
            await self._launch()
            self.stage = LaunchStage.WATCH
            self._report(Started(state=self.lifecycle.state, accel=self._accel() or ""))
            await self._watch()
        except Exception as exc:  # every failure is recorded, then torn down
            self._fail(exc)
        finally:
            if control is not None:
                control.close()
            await self._teardown()
            code = self._finish()
        return code

    def _step(self, stage: LaunchStage) -> None:
        """Enter launch step ``stage``; a stop request since the last step ends the launch.

        Raises:
            StateError: the VM is no longer starting (a stop request came in).
        """
        self.stage = stage
        self.lifecycle.require(VmState.STARTING)

    # ---- launch --------------------------------------------------------------------------

    def _check_files(self, boot_files: list[Path]) -> None:
        """Refuse a disk chain or boot file outside SecVF's places (a hand-edited bundle):
        QEMU would open whatever vm.json names. Records what QEMU will open
        (:attr:`qemu_files`) for its jail."""
        try:
            layers = check_vm_files(self.bundle, self.config)
        except UnsafeDisk as exc:
            seclog.write_event("vm_unsafe_files", severity=Severity.CRITICAL,
                               vm=self.config.name, vm_id=self.config.id, detail=str(exc))
            raise
        boot = self.config.boot
        if isinstance(boot, IsoBoot) and not boot.ejected:
            boot_files.append(check_host_file(boot.path, "ISO"))
        top = [layer.path for layer in layers[:1]]
        monitor = [self.bundle.monitor_log] if self.config.kind is VMKind.MALWARE_ANALYSIS else []
        for log_file in monitor:  # QEMU appends to it; the jail shows only what exists
            log_file.touch(mode=0o600)
        self.qemu_files = QemuFiles(
            writable=(*top, *monitor, self.files.ram_file),
            readable=(*(layer.path for layer in layers[1:]), *boot_files))

    def _open_jail(self) -> None:
        """The run's jail (identity, cgroup) and the VM's runtime directory."""
        self.jail = VmJail.open(self.config, self.bundle, self.files)
        make_vm_dir(self.files, self.jail.identity if self.jail else None)
        if self.jail is not None:
            self.lifecycle.update(jail=self.jail.info())

    async def _launch(self) -> None:
        self._step(LaunchStage.IMAGE)
        kernel = initrd = None
        if isinstance(self.config.boot, ImageBoot):
            image = resolve_image(self.config.boot)
            kernel, initrd = image.kernel, image.initrd
        self._step(LaunchStage.ACCEL)
        requested = Accel(self.accel_override) if self.accel_override else self.config.accel
        choice = await asyncio.to_thread(choose_accel, requested, kernel, initrd)
        self.lifecycle.update(accel=choice.accel, accel_reason=choice.reason)
        self._step(LaunchStage.PLAN)
        boot_files = [p for p in (kernel, initrd) if p is not None]
        await asyncio.to_thread(self._check_files, boot_files)
        await asyncio.to_thread(self._open_jail)
        run = self.bundle.begin_serial_run()
        self.serial_log = self.bundle.run_serial_log(run)
        self.log.info("run %d (%s): serial log %s", run, self.mode, self.serial_log)
        identity = self.jail.identity if self.jail else None
        plan = self.plan = build_machine(self.config, self.bundle, self.files, choice.accel,
                                         self.mode, id_base=identity.uid if identity else None)
        await asyncio.to_thread(self._prepare_ram, plan)
        ram_copy = (asyncio.ensure_future(asyncio.to_thread(self._copy_ram))
                    if self.restore is not None else None)
        try:
            await self._start_machine(plan)
        finally:
            if ram_copy is not None:
                await asyncio.wait([ram_copy])  # a thread cannot be cancelled
        if ram_copy is not None:
            ram_copy.result()  # what it raised
        await self._qmp_step("setting up migration", prepare_migration(self._qmp()))
        if self.restore is not None:
            self._step(LaunchStage.RESTORE)
            began = time.monotonic()
            await load_device_state(self._qmp(), state_file(self.restore))
            self.log.info("guest state loaded from %s in %.3f s", self.restore,
                          time.monotonic() - began)
        if plan.hotplug:  # a restore's channels: added while the guest is still paused, so
            # they are there from its first instant and the one walk below checks them
            self._step(LaunchStage.HOTPLUG)
            await plug(self._qmp(), plan.hotplug)
        self._step(LaunchStage.DEVICES)
        walk_started = time.monotonic()
        devices = await self._qmp_step("reading the device tree", walk_devices(self._qmp()))
        self.log.info("device tree: %d QOM nodes read in %.2f s", len(devices),
                      time.monotonic() - walk_started)
        self._check_devices(devices)
        self._step(LaunchStage.RESUME)
        await self._qmp_step("resuming the guest", self._qmp().execute("cont"))
        self.lifecycle.require(VmState.STARTING)  # a stop request may have come in meanwhile
        plugged_ids = {h.device["id"] for h in plan.hotplug}
        plugged = [d for d in devices if d.device_id in plugged_ids]
        self.lifecycle.transition(
            VmState.RUNNING,
            qemu_pid=jailed_pid(self._qemu().pid),
            devices=[d.info() for d in devices if d.user_visible],
            device_types=sorted({d.type for d in devices}),
            channels=[d.info() for d in channels_in(devices)],
            device_count=len(devices),
            guest_ready=False,
            planned_devices=[PlannedDeviceInfo(id=d.id, driver=d.driver, purpose=d.purpose)
                             for d in [*plan.devices, *(h.planned for h in plan.hotplug)]],
            restored_from=str(self.restore) if self.restore else None,
            hotplugged=[d.info() for d in plugged],
        )
        if self.restored_ready:  # its marker is in the log of the run that saved it
            self.lifecycle.update(guest_ready=True, ready_at=now_iso())
        seclog.write_event("vm_started", vm=self.config.name, vm_id=self.config.id,
                           kind=str(self.config.kind), accel=choice.accel,
                           devices=[d.type for d in devices if d.user_visible],
                           restored_from=str(self.restore) if self.restore else None)
        self._log_added(plugged)
        self.watch = DeviceWatch(self._qmp(), self._devices_changed)
        await self._qmp_step("listing devices", self.watch.expect())
        self.stage = LaunchStage.BRIDGE
        await self._start_bridge()

    async def _start_machine(self, plan: MachinePlan) -> None:
        """Start the plan's helpers, then QEMU (paused), and connect QMP. Helpers of
        hot-plugged devices only (a restore's channels) start while QEMU does: they must
        be ready by the hot-plug, not before QEMU."""
        self._step(LaunchStage.HELPERS)
        await asyncio.to_thread(self._join_networks, plan)
        for spec in plan.helpers:
            if not spec.for_hotplug:
                await self._start_helper(spec)
        later = [spec for spec in plan.helpers if spec.for_hotplug]
        helpers = (asyncio.ensure_future(self._start_helpers(later)) if later else None)
        try:
            self._step(LaunchStage.QEMU)
            await self._start_qemu(plan)
            self._step(LaunchStage.QMP)
            await self._connect_qmp()
            self._secure_display()
        finally:
            if helpers is not None:
                await asyncio.wait([helpers])  # never leave one half-started
        if helpers is not None:
            helpers.result()  # what it raised

    def _join_networks(self, plan: MachinePlan) -> None:
        """Register each isolated NIC's port with its network's switch, starting the
        switch if no other VM's run did: frames QEMU sends before would be lost."""
        from secvf.net.config import ConfigError as SwitchConfigError
        from secvf.net.launcher import ensure_switch, write_port

        for port in plan.switch_ports:
            with contextlib.suppress(FileNotFoundError):  # QEMU leaves its socket behind
                os.unlink(port.record["qemu_path"])
            try:
                write_port(port.netdir, {**port.record, "pid": os.getpid()})
                self.joined.append(port)
                ensure_switch(port.netdir, port.switch_config)
            except (OSError, SwitchConfigError) as exc:
                network = port.switch_config["network"]
                raise LaunchFailed(f"the switch of network '{network}'",
                                   [sys.executable, "-m", "secvf.net.watchdog",
                                    str(port.netdir)], str(exc), None) from exc
        if self.joined:
            self.log.info("switch ports: %s", ", ".join(
                f"{p.switch_config['network']}/{p.name}" for p in self.joined))

    def _leave_networks(self) -> None:
        """Unregister this run's switch ports (the last one out stops its switch)."""
        from secvf.net.launcher import release_port

        for port in self.joined:
            try:
                release_port(port.netdir, port.name)
            except OSError as exc:
                self.log.debug("releasing switch port %s: %s", port.name, exc)
        self.joined.clear()

    async def _start_helpers(self, specs: list[HelperSpec]) -> None:
        for spec in specs:
            await self._start_helper(spec)

    def _prepare_ram(self, plan: MachinePlan) -> None:
        """Create the guest's RAM file, empty and sparse; for a restore, first check that
        the saved state fits this machine (its RAM is copied in by :meth:`_copy_ram`
        while the helpers and QEMU start).

        Raises:
            SnapshotError: the saved state was saved from another machine.
            NotFound, CorruptRecord: its files are missing or damaged.
        """
        if self.restore is not None:
            saved, what = read_saved_state(self.restore)
            self.restored_ready = saved.guest_ready
            problem = saved.shape.mismatch(plan.shape())
            if problem:
                raise SnapshotError(f"{what} cannot be restored into VM '{self.config.name}': "
                                    f"{problem}")
        ram = self.files.ram_file
        ram.unlink(missing_ok=True)
        fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.config.memory_mib << 20)
        finally:
            os.close(fd)

    def _copy_ram(self) -> None:
        """Copy the saved RAM into the guest's RAM file. QEMU may have mapped it already;
        the guest runs only after the state is loaded, which waits for this.

        Raises:
            SnapshotError: the copy failed.
        """
        assert self.restore is not None
        began = time.monotonic()
        try:
            copied = copy_into(ram_file(self.restore), self.files.ram_file)
        except OSError as exc:
            raise SnapshotError(f"cannot copy the saved RAM of {self.restore}: "
                                f"{exc.strerror or exc}") from exc
        self.log.info("saved RAM copied (%d MiB of data) in %.3f s", copied >> 20,
                      time.monotonic() - began)

    async def snapshot(self, request: SnapshotRequest) -> ControlReply:
        """Snapshot the running guest: pause it, take the disk snapshot, save the device
        state and RAM if asked, and resume it whatever happened (a failed save removes
        what it wrote, the disk snapshot too). Or delete a disk snapshot.

        Raises:
            StateError: the VM is not running (or is paused: the snapshot pauses it
                itself, and resumes it).
            ForbiddenDevice: a memory snapshot of an AI sandbox (QEMU 7.2 cannot save the
                state of its vhost-user devices).
            SnapshotError: QEMU failed, or the state could not be written.
        """
        async with self._media_lock:
            self._require_running("take or delete a snapshot")
            if request.action == "delete":
                await delete_disk_snapshot(self._qmp(), request.disk_tag)
                return ControlReply(ok=True)
            if request.state_dir is not None and self.config.kind is VMKind.AI_SANDBOX:
                raise ForbiddenDevice(
                    "snapshot --memory", str(self.config.kind),
                    "QEMU 7.2 cannot save the state of the vhost-user vsock and virtio-fs "
                    "devices; take a --disk-only snapshot of the stopped sandbox, or use a "
                    "sandbox template")
            qmp = self._qmp()
            began = time.monotonic()
            await self._qmp_step("pausing the guest", qmp.execute("stop"))
            saved = None
            failure: BaseException | None = None
            try:
                await snapshot_disk(qmp, request.disk_tag)
                if request.state_dir is not None:
                    try:
                        saved = await self._save_state(Path(request.state_dir), began)
                    except BaseException as exc:
                        failure = exc
            finally:
                # cont also re-activates the disk a completed migration left inactive
                await self._qmp_step("resuming the guest", qmp.execute("cont"))
            pause = time.monotonic() - began
            if failure is not None:
                with contextlib.suppress(SnapshotError):  # the disk is writable again now
                    await delete_disk_snapshot(qmp, request.disk_tag)
                raise failure
        self.log.info("snapshot %s taken (guest paused %.3f s)", request.disk_tag, pause)
        return ControlReply(ok=True, saved=saved, pause_s=round(pause, 3))

    async def _save_state(self, directory: Path, began: float) -> SavedState:
        """Save the paused guest's device state and a copy of its RAM into ``directory``.

        Raises:
            SnapshotError: QEMU failed or a file could not be written (what was written
                is removed).
        """
        assert self.plan is not None
        state = state_file(directory)
        try:
            size = await save_device_state(self._qmp(), state)
            copied = await asyncio.to_thread(copy_sparse, self.files.ram_file,
                                             ram_file(directory))
        except OSError as exc:
            state.unlink(missing_ok=True)
            raise SnapshotError(f"cannot write the guest's RAM to {directory}: "
                                f"{exc.strerror or exc}") from exc
        except BaseException:
            state.unlink(missing_ok=True)
            raise
        self.log.info("guest state saved: %d bytes of device state, %d MiB of RAM data",
                      size, copied >> 20)
        record = self.lifecycle.record
        return SavedState(shape=self.plan.shape(), state_bytes=size,
                          guest_ready=bool(record and record.guest_ready),
                          ram_bytes=self.config.memory_mib << 20,
                          ram_allocated_bytes=allocated_bytes(ram_file(directory)),
                          saved_at=now_iso(), pause_s=round(time.monotonic() - began, 3))

    async def _save_as_template(self) -> None:
        """Save the ready guest into :attr:`save_template` and end the run (QEMU quits
        without the guest running another instruction, so the disk is as it was saved)."""
        assert self.save_template is not None
        await asyncio.sleep(TEMPLATE_SETTLE_S)
        async with self._stop_lock:
            if self.lifecycle.state is not VmState.RUNNING:
                return
            began = time.monotonic()
            try:
                await self._qmp().execute("stop")
                saved = await self._save_state(self.save_template, began)
                write_record(self.save_template / SAVED_RECORD, saved)
            except Exception as exc:  # reported through last_run.json
                self.crash_reason = f"saving the template failed: {exc}"
                self.log.error("%s", self.crash_reason)
            else:
                self.stop_reason = "saved as a template"
            self.lifecycle.transition(VmState.STOPPING)
            self.forced = True
        await self._kill_qemu()

    async def _devices_changed(self, _ids: frozenset[str]) -> None:
        """Walk the live device tree again and judge it: a channel device the VM's kind
        must not have stops the VM as crashed, with a CRITICAL event."""
        devices = await walk_devices(self._qmp())
        record = self.lifecycle.record
        before = {d.path for d in record.devices} if record else set()
        added = [d for d in devices if d.user_visible and d.path not in before]
        try:
            self._check_devices(devices)
        except LaunchFailed as exc:
            self.crash_reason = f"a forbidden device appeared: {exc.output}"
            await self.stop(force=True, reason=self.crash_reason)
            return
        if self.lifecycle.state not in (VmState.RUNNING, VmState.PAUSED):
            return
        hot = [*(record.hotplugged if record else []), *(d.info() for d in added)]
        self.lifecycle.update(
            devices=[d.info() for d in devices if d.user_visible],
            device_types=sorted({d.type for d in devices}),
            channels=[d.info() for d in channels_in(devices)],
            device_count=len(devices), hotplugged=hot)
        self._log_added(added)

    def _log_added(self, devices: list[LiveDevice]) -> None:
        """The ``vm_devices_added`` event for ``devices`` (none: no event)."""
        if devices:
            seclog.write_event("vm_devices_added", vm=self.config.name, vm_id=self.config.id,
                               devices=[d.info().model_dump() for d in devices])

    async def _start_helper(self, spec: HelperSpec) -> None:
        """Start one helper and wait until it is ready.

        Raises:
            LaunchFailed: it could not be started or did not report ready.
            SupervisorFailed: its listening socket could not be created.
        """
        argv = list(spec.argv)
        pass_fds: list[int] = []
        listener: socket.socket | None = None
        read_fd = write_fd = -1
        try:
            if spec.listen_socket is not None and spec.fd_arg:
                listener = _listen_for(spec.listen_socket, f"helper '{spec.name}'")
                if self.jail is not None:  # QEMU connects to it as the VM's identity
                    self.jail.give([spec.listen_socket], [])
                pass_fds.append(listener.fileno())
                argv.append(spec.fd_arg.format(fd=listener.fileno()))
            if spec.ready_fd_arg:
                read_fd, write_fd = os.pipe()
                pass_fds.append(write_fd)
                argv += [spec.ready_fd_arg, str(write_fd)]
            run = self.jail.helper_argv(spec.name, argv) if self.jail else argv
            proc = await self._spawn(f"device helper '{spec.name}'", run, pass_fds,
                                     self.bundle.supervisor_log, append=True)
        except BaseException:
            if read_fd >= 0:
                os.close(read_fd)
            raise
        finally:
            if listener is not None:
                listener.close()
            if write_fd >= 0:
                os.close(write_fd)
        self.helpers[spec.name] = proc
        if read_fd >= 0:
            line = await asyncio.to_thread(_read_line_with_timeout, read_fd,
                                           HELPER_READY_TIMEOUT_S)
            if not line.startswith("READY"):
                raise LaunchFailed(f"device helper '{spec.name}'", argv,
                                   _tail(self.bundle.supervisor_log, offset=self.log_offset),
                                   proc.returncode)
        self.log.info("helper %s started (pid %d)", spec.name, proc.pid)

    async def _spawn(self, what: str, argv: list[str], pass_fds: list[int], out_path: Path,
                     *, append: bool) -> asyncio.subprocess.Process:
        """Start a child that dies with us, its output going to ``out_path``.

        Raises:
            LaunchFailed: the program could not be executed (named ``what``).
        """
        with out_path.open("ab" if append else "wb") as out:
            try:
                return await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    pass_fds=pass_fds, preexec_fn=die_with_parent,
                )
            except OSError as exc:
                raise LaunchFailed(what, argv, str(exc), None) from exc

    async def _start_qemu(self, plan: MachinePlan) -> None:
        self.qemu_argv = [str(qemu_binary()), *restamp_kernel_time(plan.argv_tail, plan.accel)]
        self.lifecycle.update(qemu_argv=self.qemu_argv)
        run = self.qemu_argv
        if self.jail is not None and self.qemu_files is not None:
            run = await asyncio.to_thread(
                self.jail.qemu_argv, self.qemu_argv, plan, self.qemu_files,
                [(self.bundle.serial_log, self.serial_log)])
        self.qemu = await self._spawn("QEMU", run, [], self.qemu_log, append=False)
        self.log.info("QEMU started (pid %d): %s", self.qemu.pid, " ".join(self.qemu_argv))

    async def _connect_qmp(self) -> None:
        """Connect QMP (greeting and negotiation included) within the connect timeout.

        Raises:
            LaunchFailed: QEMU exited, or QMP did not come up in time.
        """
        deadline = time.monotonic() + QMP_CONNECT_TIMEOUT_S
        while True:
            if self._qemu().returncode is not None:
                raise self._qemu_failed()
            if self.files.qmp_socket.exists():
                qmp = QuietQMPClient(self.config.name)
                try:
                    await asyncio.wait_for(qmp.connect(str(self.files.qmp_socket)),
                                           max(deadline - time.monotonic(), 0.1))
                    self.qmp = qmp
                    return
                except (QMPError, TimeoutError):
                    pass
            if time.monotonic() > deadline:
                raise LaunchFailed("QEMU", self.qemu_argv, "QMP socket did not come up", None)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._qemu().wait(), 0.05)

    def _secure_display(self) -> None:
        """Make the VNC socket yours and owner-only (0600) once QEMU listens on it
        (``--display vnc``).

        Raises:
            LaunchFailed: QEMU is up but the socket is not there.
        """
        if self.config.display is DisplayMode.NONE:
            return
        try:
            os.chmod(self.files.vnc_socket, 0o600)
            # yours, not the jailed QEMU's uid (QEMU keeps serving on its bound socket)
            os.chown(self.files.vnc_socket, os.getuid(), os.getgid())
        except OSError as exc:
            raise LaunchFailed("QEMU", self.qemu_argv, f"no VNC socket at {self.files.vnc_socket}"
                               f": {exc.strerror}", None) from exc

    async def _qmp_step(self, what: str, call: Awaitable[T]) -> T:
        """Await one QMP exchange of the launch.

        Raises:
            SupervisorFailed: QMP failed (an error reply or a broken connection).
        """
        try:
            return await call
        except QMPError as exc:
            detail = str(exc) or type(exc).__name__
            raise SupervisorFailed(self.stage, f"QMP failed while {what}: {detail}") from exc

    def _qemu_failed(self) -> LaunchFailed:
        return LaunchFailed("QEMU", self.qemu_argv, self.qemu_log.read_text(errors="replace"),
                            self._qemu().returncode)

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
                               kind=str(self.config.kind),
                               devices=[d.info().model_dump() for d in bad])
            raise LaunchFailed(
                "QEMU", self.qemu_argv,
                f"forbidden host-guest channel on a {self.config.kind} VM: {detail}", None)

    async def _start_bridge(self) -> None:
        if self.config.kind is not VMKind.AI_SANDBOX or self.mode is RunMode.TEMPLATE:
            return
        from secvf.exec.bridge import start_bridge

        self.bridge = await start_bridge(self.config, self.files)
        self.lifecycle.update(exec_socket=str(self.files.exec_socket))

    # ---- watching ----------------------------------------------------------------------

    def _handle_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP stop the VM (while starting too) instead of killing us."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)

    async def _watch(self) -> None:
        tasks = [
            asyncio.create_task(self._watch_events()),
            asyncio.create_task(self._watch_serial()),
            asyncio.create_task(self._watch_devices()),
            asyncio.create_task(self._resource_watch().run()),
            *(asyncio.create_task(self._watch_helper(n, p)) for n, p in self.helpers.items()),
        ]
        if self.config.kind is VMKind.AI_SANDBOX:
            tasks.append(asyncio.create_task(self._relay_events()))
        if self.config.kind is VMKind.MALWARE_ANALYSIS:  # its serial ports are plain files
            tasks.append(asyncio.create_task(self._guest_log_cap().watch(self._qmp)))
        rc = await self._qemu().wait()
        self._exited.set()
        self.log.info("QEMU exited with %s", rc)
        self._check_memory_limit()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _relay_events(self) -> None:
        """Carry the vsock backend's security events into the security log."""
        while True:
            await asyncio.sleep(RELAY_INTERVAL_S)
            await asyncio.to_thread(self.relay.pump)

    def _resource_watch(self) -> ResourceWatch:
        """The disk overlay and host free space checks (:mod:`secvf.runtime.resources`);
        the warnings in force go into the runtime record."""
        return ResourceWatch.for_vm(
            disk=self.bundle.disk, virtual_size=self.config.disk_bytes, vm=self.config.name,
            vm_id=self.config.id,
            publish=lambda warnings: self.lifecycle.update(resource_warnings=warnings))

    async def _watch_devices(self) -> None:
        """Poll for added devices while the VM runs (:mod:`secvf.runtime.devwatch`)."""
        if self.watch is None:
            return
        with contextlib.suppress(QMPError):  # QMP closes when QEMU goes
            await self.watch.run()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task of its own; what it raises is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("background task failed: %s", task.exception())

    def _on_signal(self, sig: int) -> None:
        self._background(self.stop(force=False, reason=f"signal {signal.Signals(sig).name}"))

    async def _watch_events(self) -> None:
        qmp = self._qmp()
        async for event in qmp.events:
            name = event["event"]
            data = event.get("data", {})
            if not isinstance(data, dict):
                data = {}
            if name == "SHUTDOWN" and data.get("guest"):
                self.guest_shutdown = True
            elif name == "DEVICE_DELETED" and str(data.get("device")) in self._deleted:
                self._deleted[str(data["device"])].set()
            elif name == "GUEST_PANICKED":
                self.crash_reason = "guest panic"
                seclog.write_event("guest_panic", severity=Severity.ERROR, vm=self.config.name,
                                   vm_id=self.config.id, info=data)
                self._background(self._kill_qemu())

    async def _watch_serial(self) -> None:
        """Follow the serial log: publish readiness, report dead virtio devices."""
        offset = 0  # a run's serial log starts empty
        scanner = SerialScanner()
        while True:
            await asyncio.sleep(MARKER_POLL_S if not scanner.ready else SERIAL_POLL_S)
            try:
                with self.serial_log.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read(SERIAL_READ_BYTES)
            except OSError:
                continue
            offset += len(chunk)
            for event in scanner.feed(chunk):
                self._on_serial_event(event)

    def _guest_log_cap(self) -> GuestLogCap:
        def cut(port: GuestLogPort, size: int) -> None:
            self.log.warning("%s passed %d bytes: cut", port.path, limit)
            seclog.write_event("guest_log_cut", severity=Severity.WARNING, vm=self.config.name,
                               vm_id=self.config.id, chardev=port.chardev, path=str(port.path),
                               size=size, limit=limit)

        limit = self.config.guest_log_max_bytes
        return GuestLogCap([GuestLogPort(CONSOLE_CHARDEV, self.serial_log),
                            GuestLogPort(MONITOR_CHARDEV, self.bundle.monitor_log)], limit, cut)

    def _on_serial_event(self, event: SerialEvent) -> None:
        if event.kind == "ready":
            self.lifecycle.update(guest_ready=True, ready_at=now_iso())
            self.log.info("guest reported ready")
            if self.save_template is not None:
                self._background(self._save_as_template())
            return
        record = self.lifecycle.record
        errors = [*(record.device_errors if record else []), event.line]
        self.lifecycle.update(device_errors=errors)
        self.log.error("guest kernel reports a dead virtio device: %s", event.line)
        seclog.write_event("guest_device_error", severity=Severity.ERROR, vm=self.config.name,
                           vm_id=self.config.id, line=event.line)
        if "vsock" in event.line.lower() and self.plan is not None and "vsock" in self.plan.replug:
            self._background(self._recover_channel("vsock", event.line))

    async def _recover_channel(self, helper: str, line: str) -> None:
        """Unplug the device ``helper`` serves, restart the helper and plug the device
        again: the guest's driver starts over with new queues. At most once per
        :data:`VSOCK_RECOVERY_INTERVAL_S` (the line comes from the guest, which must not
        be able to keep the supervisor busy); a failed recovery stops the VM as crashed."""
        now = time.monotonic()
        if now - self._last_recovery < VSOCK_RECOVERY_INTERVAL_S or helper in self._replacing:
            self.log.warning("not recovering the %s device again so soon", helper)
            return
        assert self.plan is not None
        self._last_recovery = now
        self._replacing.add(helper)
        device = self.plan.replug[helper]
        dev_id = str(device.device["id"])
        try:
            async with self._media_lock:
                if self.lifecycle.state is VmState.PAUSED:  # the guest cannot let go of
                    # the device now; a line read late from the log is not worth a crash
                    self.log.warning("not recovering the %s device while the guest is "
                                     "paused", helper)
                    self._last_recovery = -VSOCK_RECOVERY_INTERVAL_S
                    return
                self.lifecycle.require(VmState.RUNNING)
                deleted = self._deleted[dev_id] = asyncio.Event()
                await self._qmp().execute("device_del", {"id": dev_id})
                await asyncio.wait_for(deleted.wait(), UNPLUG_TIMEOUT_S)
                await self._qmp().execute("chardev-remove", {"id": device.chardev["id"]})
                old = self.helpers.pop(helper)
                await _end_process(old, grace=HELPER_TERM_GRACE_S)
                spec = next(h for h in self.plan.helpers if h.name == helper)
                await self._start_helper(spec)
                self._background(self._watch_helper(helper, self.helpers[helper]))
                await plug(self._qmp(), [device])
                await self._devices_changed(frozenset())
        except (QMPError, SecVFError, TimeoutError, OSError) as exc:
            self.crash_reason = f"the {helper} device could not be recovered: {exc or 'timeout'}"
            self.log.error("%s", self.crash_reason)
            await self.stop(force=True, reason=self.crash_reason)
            return
        finally:
            self._replacing.discard(helper)
            self._deleted.pop(dev_id, None)
        self.log.warning("%s device recovered after: %s", helper, line)
        seclog.write_event("guest_device_recovered", severity=Severity.WARNING,
                           vm=self.config.name, vm_id=self.config.id, device=dev_id,
                           took_s=round(time.monotonic() - now, 3), line=line)

    async def _watch_helper(self, name: str, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if self.helpers.get(name) is not proc:
            return  # replaced on purpose (a channel recovery)
        with contextlib.suppress(TimeoutError):
            # helpers also exit when QEMU goes away: that is QEMU's story, not theirs
            await asyncio.wait_for(self._exited.wait(), HELPER_EXIT_GRACE_S)
        if self._exited.is_set() or self.stop_reason or self.crash_reason:
            return
        if name in self._replacing or self.helpers.get(name) is not proc:
            return
        if self._check_memory_limit():
            await self.stop(force=True, reason=str(self.crash_reason))
            return
        self.crash_reason = f"device helper '{name}' died (exit {rc})"
        seclog.write_event("device_helper_died", severity=Severity.ERROR, vm=self.config.name,
                           vm_id=self.config.id, helper=name, exit_code=rc,
                           action="VM stopped: QEMU cannot reconnect a vhost-user backend")
        await self.stop(force=True, reason=self.crash_reason)

    def _check_memory_limit(self) -> bool:
        """Whether the cgroup's memory limit killed a process of this VM; if so, the run
        is a crash with that reason and a ``vm_memory_limit`` event (once)."""
        if self.jail is None or self.crash_reason or not self.jail.oom_kills():
            return False
        limit = self.jail.settings.limits(self.config).memory_bytes >> 20
        self.crash_reason = (f"memory limit exceeded: the VM's host processes needed more than "
                             f"{limit} MiB (guest RAM {self.config.memory_mib} MiB + "
                             f"{self.jail.settings.memory_overhead_mib} MiB overhead); its "
                             "cgroup killed it")
        seclog.write_event("vm_memory_limit", severity=Severity.ERROR, vm=self.config.name,
                           vm_id=self.config.id, limit_mib=limit,
                           oom_kills=self.jail.oom_kills(), action="VM stopped")
        return True

    # ---- stopping ----------------------------------------------------------------------

    async def stop(self, *, force: bool, reason: str, timeout: float = POWERDOWN_TIMEOUT_S) -> None:
        """Stop the VM: ACPI powerdown within ``timeout``, then QMP quit, then SIGKILL.

        A running guest gets the powerdown unless ``force``; a paused one is resumed
        first (a paused guest cannot see the power button), unless ``force``: then QEMU
        is quit with the guest still paused. While the VM is still starting QEMU is quit
        at once and the launch ends at its next step. Returns at once if QEMU is already
        gone; returns before QEMU is reaped after a kill. Sets :attr:`forced`: False if
        the guest powered off, True if QEMU was quit.
        """
        async with self._stop_lock:
            if self._exited.is_set():
                return
            self.stop_reason = self.stop_reason or reason
            before = self.lifecycle.state
            if before in (VmState.STARTING, VmState.RUNNING, VmState.PAUSED):
                self.lifecycle.transition(VmState.STOPPING)
            self.forced = True  # unless the guest powers off below
            if before not in (VmState.RUNNING, VmState.PAUSED):
                await self._kill_qemu()
                return
            gentle = not force and (before is VmState.RUNNING or await self._resume_to_stop())
            if gentle and await self._powerdown(timeout):
                self.forced = False
                return
            seclog.write_event("vm_forced_stop", severity=Severity.WARNING, vm=self.config.name,
                               vm_id=self.config.id, reason=reason, requested_force=force)
            await self._kill_qemu()

    async def _resume_to_stop(self) -> bool:
        """Resume the paused guest so it can power off; False if QEMU refused."""
        try:
            await self._qmp().execute("cont")
        except QMPError as exc:
            self.log.warning("could not resume the paused guest to stop it: %s", exc)
            return False
        seclog.write_event("vm_resumed", vm=self.config.name, vm_id=self.config.id,
                           reason="to power off")
        return True

    async def _powerdown(self, timeout: float) -> bool:
        if self.qmp is None:
            return False
        try:
            await self.qmp.execute("system_powerdown")
        except QMPError:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)
        return self._exited.is_set()

    async def _kill_qemu(self) -> None:
        """QMP ``quit``, and SIGKILL if QEMU is still there :data:`QUIT_TIMEOUT_S` later."""
        qemu = self.qemu
        if qemu is None or qemu.returncode is not None:
            return
        if self.qmp is not None:
            with contextlib.suppress(QMPError, asyncio.TimeoutError):
                await asyncio.wait_for(self.qmp.execute("quit"), QUIT_TIMEOUT_S)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(qemu.wait(), QUIT_TIMEOUT_S)
        if qemu.returncode is None:
            qemu.kill()

    async def _teardown(self) -> None:
        """Stop whatever this run started; one step failing never skips the others."""
        if self.bridge is not None:
            from secvf.exec.bridge import stop_bridge

            await self._quietly("stopping the exec bridge", stop_bridge(self.config.id))
        if self.qmp is not None:
            # disconnect() re-raises whatever broke the connection: that was handled
            await self._quietly("closing QMP", self.qmp.disconnect())
        if self.qemu is not None:
            await _end_process(self.qemu, grace=0)
        for proc in self.helpers.values():
            await _end_process(proc, grace=HELPER_TERM_GRACE_S)
        await asyncio.to_thread(self._leave_networks)
        await asyncio.to_thread(self.relay.pump)  # what the helpers wrote last
        if self.jail is not None:
            await asyncio.to_thread(self.jail.close)
        self._exited.set()

    async def _quietly(self, what: str, call: Awaitable[None]) -> None:
        try:
            await call
        except Exception as exc:  # teardown goes on regardless
            self.log.debug("%s: %s", what, exc)

    # ---- the end of a run ----------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        self.failure = failure_of(exc, self.stage)
        if self.failure.kind is not FailureKind.SUPERVISOR_FAILED:
            self.log.error("launch failed: %s", exc)
        else:  # a traceback only for what nobody meant to raise
            self.log.error("supervisor failed at step '%s': %s", self.failure.stage, exc,
                           exc_info=None if isinstance(exc, SecVFError) else exc)

    def _verdict(self) -> tuple[VmState, str]:
        """How the run ended: the final state and why."""
        failure = self.failure
        if failure is not None and failure.stage is not LaunchStage.WATCH:
            if self.stop_reason:
                return VmState.STOPPED, f"{self.stop_reason} while starting"
            if failure.kind is FailureKind.SUPERVISOR_FAILED:
                return (VmState.CRASHED,
                        f"supervisor failed at step '{failure.stage}': {failure.message}")
            return VmState.STOPPED, f"launch failed: {failure.message}"
        if failure is not None:
            return VmState.CRASHED, f"supervisor failed while running: {failure.message}"
        rc = self.qemu.returncode if self.qemu else None
        if self.crash_reason:
            return VmState.CRASHED, self.crash_reason
        if self.lifecycle.state is VmState.PAUSED:  # gone without a stop (which would
            # have entered stopping): not the guest's doing, it was not running
            return VmState.CRASHED, f"QEMU exited with {rc} while the guest was paused"
        if self.stop_reason or self.guest_shutdown or rc == 0:
            return VmState.STOPPED, self.stop_reason or "guest powered off"
        return VmState.CRASHED, f"QEMU exited with {rc}: {_tail(self.qemu_log)}"

    def _finish(self) -> int:
        """Publish the final state, write ``last_run.json`` and the security event."""
        state, reason = self._verdict()
        ran = any(t.state is VmState.RUNNING for t in self.lifecycle.transitions)

        def write_why(transitions: list[Transition]) -> None:
            try:
                write_last_run(self.bundle, LastRun(state=state, reason=reason,
                                                    ended_at=now_iso(), accel=self._accel(),
                                                    transitions=transitions))
            except OSError as exc:
                self.log.error("could not write %s: %s", self.bundle.last_run_file, exc)

        if self.lifecycle.state in LIVE_STATES:
            try:  # why first: whoever sees the final state finds why, too
                self.lifecycle.transition(
                    state, before_publish=lambda record: write_why(record.transitions))
            except OSError as exc:
                self.log.error("could not publish the final state: %s", exc)
        else:
            write_why(self.lifecycle.transitions)
        if ran or state is VmState.CRASHED:
            event = "vm_stopped" if state is VmState.STOPPED else "vm_crashed"
            seclog.write_event(event, severity=Severity.INFO if state is VmState.STOPPED
                               else Severity.ERROR, vm=self.config.name, vm_id=self.config.id,
                               reason=reason,
                               qemu_exit=self.qemu.returncode if self.qemu else None)
        if self.failure is not None and self.failure.stage is not LaunchStage.WATCH:
            return EXIT_LAUNCH_FAILED
        return EXIT_STOPPED if state is VmState.STOPPED else EXIT_CRASHED

    # ---- control socket --------------------------------------------------------------

    async def _listen_control(self) -> asyncio.Server:
        """Listen on the control socket (mode 0600).

        Raises:
            SupervisorFailed: the socket could not be created (stage ``control``).
        """
        path = self.files.control_socket
        server: asyncio.Server | None = None
        try:
            server = await asyncio.start_unix_server(self._serve_control, path=str(path))
            os.chmod(path, 0o600)
        except OSError as exc:
            if server is not None:
                server.close()
            raise SupervisorFailed(LaunchStage.CONTROL, f"cannot listen on the control socket "
                                   f"{path}: {exc.strerror or exc}", exc.errno) from exc
        return server

    async def _serve_control(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        """Answer one control connection: a :class:`ControlRequest` line, a reply line."""
        try:
            line = await asyncio.wait_for(reader.readline(), CONTROL_READ_TIMEOUT_S)
            writer.write(encode(await self._answer(line)))
            await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            self.log.warning("control connection dropped: %s", exc)
        finally:
            writer.close()

    async def _answer(self, line: bytes) -> ControlReply:
        try:
            request = decode(ControlRequest, line, source="control request").root
        except CorruptRecord as exc:
            self.log.warning("%s", exc)
            return ControlReply(ok=False, error=str(exc))
        try:
            if isinstance(request, PauseRequest):
                changed = await asyncio.wait_for(self.set_paused(request.paused),
                                                 MEDIA_CHANGE_TIMEOUT_S)
                return ControlReply(ok=True, changed=changed)
            if isinstance(request, MediaRequest):
                await asyncio.wait_for(self.change_medium(request.iso), MEDIA_CHANGE_TIMEOUT_S)
                return ControlReply(ok=True)
            if isinstance(request, SnapshotRequest):
                return await self.snapshot(request)
            if isinstance(request, DumpRequest):
                await self.dump_memory(Path(request.path))
                return ControlReply(ok=True)
            await self.stop(force=request.force, reason="stop requested",
                            timeout=request.timeout)
        except SecVFError as exc:
            return ControlReply(ok=False, error=str(exc))
        except TimeoutError:
            return ControlReply(ok=False, error=f"QEMU did not answer within "
                                                f"{MEDIA_CHANGE_TIMEOUT_S:.0f} s")
        await self._exited.wait()
        return ControlReply(ok=True, forced=bool(self.forced))

    async def dump_memory(self, path: Path) -> None:
        """Write the running guest's memory to new file ``path`` (an ELF core).

        A paused guest stays paused (QEMU resumes only a guest it paused for the dump;
        that is checked).

        Raises:
            StateError: the VM is neither running nor paused.
            SnapshotError: ``path`` is not absolute or cannot be created, or QEMU failed.
        """
        if not path.is_absolute():
            raise SnapshotError(f"memory dump path {path} is not absolute")
        async with self._media_lock:
            self.lifecycle.require(VmState.RUNNING, VmState.PAUSED)
            began = time.monotonic()
            size = await dump_guest_memory(self._qmp(), path)
            if self.lifecycle.state is VmState.PAUSED and (await self._run_state())[0]:
                self.log.warning("QEMU resumed the paused guest after the dump: pausing it")
                try:
                    await self._qmp().execute("stop")
                except QMPError as exc:
                    raise SecVFError(f"QEMU could not pause VM '{self.config.name}' again "
                                     f"after the dump: {exc}") from exc
        self.log.info("guest memory dumped to %s: %d bytes in %.1f s", path, size,
                      time.monotonic() - began)
        seclog.write_event("vm_memory_dumped", vm=self.config.name, vm_id=self.config.id,
                           path=str(path), size=size)

    # ---- pause and resume ------------------------------------------------------------

    async def set_paused(self, paused: bool) -> bool:
        """Pause the guest (``paused``: QMP ``stop``) or resume it (QMP ``cont``), check
        with ``query-status`` that QEMU's run state is the one asked for, enter ``paused``
        or ``running`` and write the ``vm_paused`` / ``vm_resumed`` event. Returns whether
        anything changed (False: the VM already was so).

        A stop that begins meanwhile wins: a pause is undone (the stop's powerdown needs
        a running guest) and this raises. So is a change QEMU does not confirm.

        Raises:
            StateError: the VM is neither running nor paused (starting, stopping), or is
                being saved as a template, or a stop began meanwhile.
            SecVFError: QEMU refused, or reports another run state afterwards.
        """
        want, have = ((VmState.PAUSED, VmState.RUNNING) if paused
                      else (VmState.RUNNING, VmState.PAUSED))
        verb = "pause" if paused else "resume"
        async with self._media_lock:
            if self.lifecycle.state is want:
                return False
            self.lifecycle.require(have)
            if self.mode is RunMode.TEMPLATE:
                raise StateError(f"VM '{self.config.name}' is being saved as a sandbox "
                                 f"template; it cannot {verb}", str(self.lifecycle.state),
                                 [str(VmState.RUNNING)])
            began = time.monotonic()
            try:
                await self._qmp().execute("stop" if paused else "cont")
            except QMPError as exc:
                raise SecVFError(f"QEMU could not {verb} VM '{self.config.name}': "
                                 f"{exc}") from exc
            try:
                running, reported = await self._run_state()
                if running is paused:
                    raise SecVFError(f"QEMU reports VM '{self.config.name}' {reported} after "
                                     f"the {verb}, not {want}")
            except SecVFError:  # put QEMU back as the record says, if it can be
                with contextlib.suppress(QMPError):
                    await self._qmp().execute("cont" if paused else "stop")
                raise
            if self.lifecycle.state is not have:  # a stop request came in meanwhile
                if paused:
                    with contextlib.suppress(QMPError):
                        await self._qmp().execute("cont")
                self.lifecycle.require(have)
            self.lifecycle.transition(want)
        self.log.info("guest %s (%.3f s)", "paused" if paused else "resumed",
                      time.monotonic() - began)
        seclog.write_event("vm_paused" if paused else "vm_resumed", vm=self.config.name,
                           vm_id=self.config.id)
        return True

    async def _run_state(self) -> tuple[bool, str]:
        """Whether QEMU's vCPUs run, and the name of its run state (``query-status``).

        Raises:
            SecVFError: QEMU did not answer, or not with a status.
        """
        try:
            status = await self._qmp().execute("query-status")
        except QMPError as exc:
            raise SecVFError(f"QEMU did not report the run state of VM "
                             f"'{self.config.name}': {exc}") from exc
        if not isinstance(status, dict):
            raise SecVFError(f"QEMU answered query-status with {status!r}")
        return bool(status.get("running")), str(status.get("status", "?"))

    def _require_running(self, to: str) -> None:
        """Declare that the caller needs a running guest, to do ``to``.

        Raises:
            StateError: it is not running; if paused, the message says how to resume it.
        """
        if self.lifecycle.state is VmState.PAUSED:
            raise paused_error(self.config.name, to)
        self.lifecycle.require(VmState.RUNNING)

    # ---- the cdrom drive -------------------------------------------------------------

    async def change_medium(self, iso: str | None) -> None:
        """Eject the medium of the VM's cdrom drive (``iso`` None) or insert ISO ``iso``
        read-only, then check with ``query-block`` that the drive holds what was asked.

        The ISO is checked as ``vm create --iso`` checks it (again: this process is the
        one that hands it to QEMU). A guest that locked the drive's tray is overruled.

        Raises:
            StateError: the VM is not running (or is paused).
            ConfigError: the VM has no cdrom drive (it was not created with an ISO).
            DiskError: the ISO is missing, unreadable, not a regular file, or in a
                system tree (``UnsafeDisk``).
            SecVFError: QEMU refused the change or the drive does not hold the medium.
        """
        async with self._media_lock:
            self._require_running("change the medium")
            if not has_cdrom(self.config):
                raise ConfigError(f"VM '{self.config.name}' has no cdrom drive: only VMs "
                                  "created with --iso and malware-analysis VMs have one")
            path = None if iso is None else str(check_host_file(iso, "ISO"))
            before = await self._medium_or_none()
            try:
                name = None
                if path is None:
                    await self._qmp().execute("eject", {"id": CDROM_DEVICE_ID, "force": True})
                else:
                    name = await add_medium_fd(self._qmp(), Path(path))
                    await self._qmp().execute("blockdev-change-medium", {
                        "id": CDROM_DEVICE_ID, "filename": name, "format": "raw",
                        "read-only-mode": "read-only"})
                held = await self._medium()
            except QMPError as exc:
                what = "eject the cdrom" if path is None else f"insert {path}"
                raise SecVFError(f"QEMU could not {what}: {exc}") from exc
            if held != name:
                raise SecVFError(f"the cdrom drive holds {held or 'nothing'} after the change, "
                                 f"not {path or 'nothing'}")
            await remove_medium_fd(self._qmp(), before)
        self.log.info("cdrom: %s", f"inserted {path}" if path else "ejected")
        seclog.write_event("vm_media_changed", vm=self.config.name, vm_id=self.config.id,
                           medium=path)

    async def _medium_or_none(self) -> str | None:
        with contextlib.suppress(QMPError, SecVFError):
            return await self._medium()
        return None

    async def _medium(self) -> str | None:
        """The file in the cdrom drive, as QEMU reports it (None: the drive is empty).

        Raises:
            QMPError: ``query-block`` failed.
            SecVFError: QEMU reports no such drive.
        """
        blocks = await self._qmp().execute("query-block")
        for block in blocks if isinstance(blocks, list) else []:
            if str(block.get("qdev", "")).rsplit("/", 1)[-1] == CDROM_DEVICE_ID:
                inserted = block.get("inserted")
                return str(inserted["file"]) if isinstance(inserted, dict) else None
        raise SecVFError(f"QEMU reports no cdrom drive '{CDROM_DEVICE_ID}'")

    # ---- helpers -----------------------------------------------------------------------

    def _qemu(self) -> asyncio.subprocess.Process:
        assert self.qemu is not None
        return self.qemu

    def _qmp(self) -> QMPClient:
        assert self.qmp is not None
        return self.qmp

    def _accel(self) -> str | None:
        record = self.lifecycle.record
        return record.accel if record else None

    def _report(self, message: Started | StartFailed) -> None:
        if self.report_fd is not None:
            send_report(self.report_fd, message)
            self.report_fd = None


def failure_of(exc: BaseException, stage: LaunchStage) -> StartFailed:
    """The start report for ``exc``, raised during launch step ``stage``.

    Each :class:`~secvf.errors.SecVFError` subclass maps to one
    :class:`~secvf.model.runtime.FailureKind` with the fields needed to rebuild it
    (``runtime.control`` does); anything else — an OS or QMP error nobody wrapped,
    a bug — is ``supervisor_failed``.
    """
    message = str(exc) or type(exc).__name__
    kind = FailureKind.SUPERVISOR_FAILED
    if isinstance(exc, SupervisorFailed):
        return StartFailed(kind=kind, stage=_stage(exc.stage, stage), message=message,
                           errno=exc.errno, errno_name=_errno_name(exc.errno))
    if isinstance(exc, IllegalTransition):
        return StartFailed(kind=kind, stage=stage, message=message)
    if isinstance(exc, LaunchFailed):
        return StartFailed(kind=FailureKind.LAUNCH_FAILED, stage=stage, message=message,
                           what=exc.what, argv=exc.argv,
                           output=exc.output[-MAX_FAILURE_OUTPUT_CHARS:], exitcode=exc.exitcode)
    if isinstance(exc, StateError):
        return StartFailed(kind=FailureKind.STATE, stage=stage, message=message,
                           state=exc.state, required=list(exc.required))
    if isinstance(exc, ForbiddenDevice):
        return StartFailed(kind=FailureKind.FORBIDDEN_DEVICE, stage=stage, message=message,
                           field=exc.field, vm_kind=exc.kind)
    for cls, simple in ((NotFound, FailureKind.NOT_FOUND),
                        (ConfigError, FailureKind.INVALID_CONFIG),
                        (SecVFError, FailureKind.ERROR)):
        if isinstance(exc, cls):
            return StartFailed(kind=simple, stage=stage, message=message)
    code = exc.errno if isinstance(exc, OSError) else None
    return StartFailed(kind=kind, stage=stage,
                       message=f"unexpected {type(exc).__name__}: {message}",
                       errno=code, errno_name=_errno_name(code))


def _errno_name(code: int | None) -> str | None:
    return errno.errorcode.get(code) if code is not None else None


def _stage(value: str, default: LaunchStage) -> LaunchStage:
    try:
        return LaunchStage(value)
    except ValueError:
        return default


def send_report(fd: int, message: Started | StartFailed) -> None:
    """Write the start report line to ``fd`` and close it (a starter that left is fine)."""
    with contextlib.suppress(OSError):
        os.write(fd, encode(message))
    with contextlib.suppress(OSError):
        os.close(fd)


async def _take_lock(lock: FileLock) -> None:
    """Take ``lock``, waiting out readers and reapers that hold it shared for a moment.

    Raises:
        LockBusy: another supervisor holds it (the VM is running).
    """
    deadline = time.monotonic() + RUN_LOCK_WAIT_S
    while True:
        try:
            lock.acquire()
            return
        except LockBusy:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(RUN_LOCK_POLL_S)


def _listen_for(path: Path, what: str) -> socket.socket:
    """A listening Unix socket at ``path`` (0600) whose fd a helper inherits.

    Raises:
        SupervisorFailed: it could not be created (stage ``helpers``).
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(1)
        listener.set_inheritable(True)
    except OSError as exc:
        listener.close()
        raise SupervisorFailed(LaunchStage.HELPERS, f"cannot listen on {path} for {what}: "
                               f"{exc.strerror or exc}", exc.errno) from exc
    return listener


async def _end_process(proc: asyncio.subprocess.Process, *, grace: float) -> None:
    """SIGTERM ``proc`` and SIGKILL it after ``grace`` seconds (at once if 0); reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            if grace > 0:
                proc.terminate()
            else:
                proc.kill()
        try:
            await asyncio.wait_for(proc.wait(), grace or None)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _read_line_with_timeout(fd: int, timeout: float) -> str:
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 256).decode(errors="replace") if ready else ""
    finally:
        os.close(fd)


def _tail(path: Path, lines: int = 20, *, offset: int = 0) -> str:
    """The last ``lines`` lines of ``path`` after byte ``offset`` ("" if unreadable)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _size(path: Path) -> int:
    """The size of ``path`` in bytes (0 if it does not exist)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def run_supervisor(name: str, *, accel: str | None, report_fd: int | None,
                   restore: Path | None = None, save_template: Path | None = None) -> int:
    """Run the supervisor for VM ``name`` in this process until the VM is gone."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # qemu.qmp logs QEMU's exit (EOF / EPIPE on the socket) as an error; we learn about
    # that from the process itself, and every QMP failure we care about raises
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    os.umask(0o077)  # every file and socket QEMU and the helpers create is private
    try:
        supervisor = Supervisor(name, accel=accel, report_fd=report_fd, restore=restore,
                                save_template=save_template)
    except SecVFError as exc:
        if report_fd is not None:
            send_report(report_fd, failure_of(exc, LaunchStage.CONFIG))
        return EXIT_LAUNCH_FAILED
    return asyncio.run(supervisor.run())


def main(argv: list[str] | None = None) -> int:
    """``python -m secvf.runtime.supervisor --vm NAME [--accel A] [--report-fd N]
    [--restore DIR | --save-template DIR]``."""
    parser = argparse.ArgumentParser(prog="secvf-supervisor")
    parser.add_argument("--vm", required=True)
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"])
    parser.add_argument("--report-fd", type=int)
    parser.add_argument("--restore", type=Path, help="saved-state directory to begin from")
    parser.add_argument("--save-template", type=Path, help="directory to save the ready guest to")
    args = parser.parse_args(argv)
    return run_supervisor(args.vm, accel=args.accel, report_fd=args.report_fd,
                          restore=args.restore, save_template=args.save_template)


if __name__ == "__main__":
    sys.exit(main())
