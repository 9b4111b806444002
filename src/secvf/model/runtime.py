"""Typed records and messages about a VM's run, exchanged between SecVF processes.

A running VM is a detached supervisor process; every other ``secvf`` process learns
about it only through the contracts below. All are pydantic models, strict
(``extra="forbid"``, frozen), one JSON document each; this module does no I/O.

* :class:`RuntimeRecord` — ``state-<UUID>.json`` in the runtime dir: written by the
  supervisor on every change, read by any command (status, list, audit) while the
  supervisor holds ``run.lock``;
* :class:`LastRun` — ``last_run.json`` in the bundle: how the previous run ended;
* :class:`ControlRequest` (a :class:`StopRequest`, :class:`MediaRequest`,
  :class:`SnapshotRequest`, :class:`DumpRequest` or :class:`PauseRequest`) /
  :class:`ControlReply` — one JSON line each way on the supervisor's control socket
  (``secvf vm stop``, ``secvf vm media``, ``secvf vm pause``/``resume``);
* :class:`StartReport` — the one JSON line the supervisor writes on the report pipe
  of ``secvf vm start``;
* :class:`VmStatus` — what ``runtime.control.get_status`` returns (``vm_status``: as
  a dict) and ``vm status --json`` prints.

The start report is :class:`Started` or :class:`StartFailed`, told apart by
``outcome``. A failure is data, not a class name: a :class:`FailureKind`, the
:class:`LaunchStage` that failed and the fields the matching
:class:`~secvf.errors.SecVFError` subclass needs; ``runtime.control`` maps it back
to that exception. Anything that does not parse — a corrupt file, a torn line, a
message of another shape — is a :class:`~secvf.errors.CorruptRecord` naming the
source and the first bad field (:func:`decode`), never a traceback.

Rules for changing these shapes: new fields get defaults, so a reader accepts what
an older supervisor wrote; removing or renaming a field, or a value of
:class:`VmState`, is a break that ``last_run.json`` files on disk would notice.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from secvf.errors import ConfigError, CorruptRecord
from secvf.model.config import Nic
from secvf.model.enums import VMKind
from secvf.model.enums import VmState as VmState  # re-exported: defined without pydantic
from secvf.model.savedstate import SavedState
from secvf.model.settingsfile import read_settings_text

#: Longest QEMU/helper output a start failure carries (its tail).
MAX_FAILURE_OUTPUT_CHARS = 4000


class Transition(NamedTuple):
    """One state change of a run; JSON: ``["running", "2025-01-01T00:00:00Z"]``."""

    state: VmState  # the state entered
    at: str  # when (RFC 3339, UTC)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class DeviceInfo(_Message):
    """One live QOM device, as status, audit and the security log show it."""

    path: str  # QOM path, e.g. /machine/peripheral/disk0dev
    type: str  # QOM type, e.g. virtio-blk-pci
    channel: str | None = None  # host-guest channel kind it provides, if any


class PlannedDeviceInfo(_Message):
    """One ``-device`` of the machine plan the run was started with."""

    id: str  # QEMU device id
    driver: str  # QEMU device type
    purpose: str  # what it is for


class ResourceAlert(_Message):
    """A resource past a threshold while the VM runs (:mod:`secvf.runtime.resources`)."""

    resource: str  # "disk_overlay" or "host_free_space"
    level: str  # "warning" or "critical"
    value: int  # bytes when it crossed: the overlay's allocation, or the free space
    threshold: int  # the mark it crossed, in bytes
    total: int  # the virtual disk size, or the filesystem's size, in bytes
    path: str  # what was measured: the overlay file, or $SECVF_HOME
    since: str  # when it crossed (RFC 3339)
    message: str  # the same in one line, for people


class JailLimits(_Message):
    """A VM's cgroup limits."""

    memory_bytes: int
    pids_max: int
    cpu_quota_us: int  # per cpu_period_us; <= 0: no CPU limit
    cpu_period_us: int


class JailUsage(_Message):
    """What a VM's cgroup holds now."""

    memory_bytes: int
    memory_peak_bytes: int | None = None
    pids: int
    cpu_usage_us: int
    oom_kills: int


class JailInfo(_Message):
    """How a run's host processes are confined (:mod:`secvf.jail`); absent: not jailed."""

    uid: int  # host uid (and gid) of QEMU and its helpers
    gid: int
    slot: int | None = None  # the VM's slot of SecVF's id range (None: not root)
    user_namespace: bool = False  # not root: the caller's ids in a user namespace
    namespaces: list[str] = []  # QEMU's namespaces (the vsock backend has all four)
    cgroup: list[str] = []  # the VM's cgroup directories (none: no cgroup)
    cgroup_version: int | None = None
    cgroup_problem: str | None = None  # why there is no cgroup
    limits: JailLimits | None = None
    usage: JailUsage | None = None  # filled in by ``vm status`` (live)


class RuntimeRecord(_Message):
    """The supervisor's published state, rewritten atomically on every change.

    Trusted only while the supervisor holds the bundle's ``run.lock``.
    """

    state: VmState  # current lifecycle state
    name: str  # VM name when the run started
    id: str  # VM UUID (names the runtime files)
    kind: VMKind  # VM kind
    supervisor_pid: int  # pid of the supervisor process
    started_at: str  # when the run started (RFC 3339)
    transitions: list[Transition]  # every state entered, in order
    accel: str | None = None  # "kvm" or "tcg", once chosen
    accel_reason: str | None = None  # why that accelerator
    qemu_argv: list[str] = []  # QEMU's command line, once started
    qemu_pid: int | None = None  # set when the guest runs
    devices: list[DeviceInfo] = []  # user-visible live devices (set when running)
    device_types: list[str] = []  # every QOM type in the live tree
    channels: list[DeviceInfo] = []  # live devices that are host-guest channels
    device_count: int = 0  # QOM nodes walked
    planned_devices: list[PlannedDeviceInfo] = []  # what the machine plan asked for
    guest_ready: bool = False  # the guest printed its ready marker
    ready_at: str | None = None  # when it did
    exec_socket: str | None = None  # exec bridge socket (AI sandboxes, while running)
    device_errors: list[str] = []  # guest kernel lines reporting a dead virtio device
    restored_from: str | None = None  # the saved state this run began from (a directory)
    hotplugged: list[DeviceInfo] = []  # devices added after the start, by SecVF or not
    resource_warnings: list[ResourceAlert] = []  # resources past a threshold now
    jail: JailInfo | None = None  # the run's jail (None: jails are off)


class LastRun(_Message):
    """How the previous run ended (``last_run.json``)."""

    state: VmState  # stopped or crashed
    reason: str  # why, in words
    ended_at: str  # when (RFC 3339)
    accel: str | None = None  # accelerator the run used, if it got that far
    transitions: list[Transition] = []  # every state the run entered


class FailureKind(StrEnum):
    """What kind of start failure a :class:`StartFailed` reports (one error class each)."""

    STATE = "state"  # StateError: e.g. already running, stopped while starting
    NOT_FOUND = "not_found"  # NotFound: the VM or its image is gone
    INVALID_CONFIG = "invalid_config"  # ConfigError: vm.json or another file is bad
    FORBIDDEN_DEVICE = "forbidden_device"  # ForbiddenDevice: the plan asked for a channel
    LAUNCH_FAILED = "launch_failed"  # LaunchFailed: QEMU or a helper did not start
    SUPERVISOR_FAILED = "supervisor_failed"  # SupervisorFailed: a supervisor step broke
    ERROR = "error"  # any other SecVFError


class LaunchStage(StrEnum):
    """The supervisor's launch steps, in order; a failure names the one it was in."""

    CONFIG = "config"  # reading vm.json
    LOCK = "lock"  # taking run.lock
    CONTROL = "control"  # listening on the control socket
    IMAGE = "image"  # finding the image the VM boots
    ACCEL = "accel"  # choosing the accelerator
    PLAN = "plan"  # building the machine plan
    HELPERS = "helpers"  # starting device helpers
    QEMU = "qemu"  # starting QEMU
    QMP = "qmp"  # connecting QMP
    RESTORE = "restore"  # loading a saved state (a snapshot or template)
    DEVICES = "devices"  # walking and checking the live device tree
    RESUME = "resume"  # QMP cont
    HOTPLUG = "hotplug"  # adding a restored sandbox's channel devices
    BRIDGE = "bridge"  # starting the exec bridge
    WATCH = "watch"  # running (after the start report)
    REPORT = "report"  # the start report itself (seen by the reader only)


class Started(_Message):
    """Start report: the guest runs and its devices passed the check."""

    outcome: Literal["started"] = "started"
    state: VmState  # running
    accel: str  # accelerator in use


class StartFailed(_Message):
    """Start report: the VM did not start; enough to rebuild the error on the other side."""

    outcome: Literal["failed"] = "failed"
    kind: FailureKind  # which error class
    stage: LaunchStage  # the step that failed
    message: str  # the error's one-line text
    what: str | None = None  # launch_failed: the process, e.g. "QEMU"
    argv: list[str] = []  # launch_failed: its command line
    output: str = Field(default="", max_length=MAX_FAILURE_OUTPUT_CHARS)  # its output (tail)
    exitcode: int | None = None  # launch_failed: its exit status, if it exited
    state: str | None = None  # state: the state the VM was in
    required: list[str] = []  # state: the states the operation needed
    field: str | None = None  # forbidden_device: the offending field or device
    vm_kind: str | None = None  # forbidden_device: the VM's kind
    errno: int | None = None  # supervisor_failed: OS errno, if an OS call failed
    errno_name: str | None = None  # e.g. "EADDRINUSE"


class StartReport(RootModel[Annotated[Started | StartFailed, Field(discriminator="outcome")]]):
    """The one line the supervisor writes on its report pipe (decode, then ``.root``)."""


class StopRequest(_Message):
    """Control request: stop the VM (powerdown, then forced after ``timeout``)."""

    op: Literal["stop"] = "stop"  # which request this is
    force: bool = False  # skip the ACPI powerdown
    timeout: float = Field(default=30.0, ge=0)  # seconds to wait for the guest to power off


class MediaRequest(_Message):
    """Control request: change the medium in the running VM's cdrom drive.

    The supervisor does it over QMP (``eject``, or ``blockdev-change-medium`` read-only)
    and replies once QEMU confirms the drive holds what was asked for.
    """

    op: Literal["media"] = "media"  # which request this is
    iso: str | None = None  # absolute path of the ISO to insert; None ejects the medium


class SnapshotRequest(_Message):
    """Control request: snapshot the running VM (see :mod:`secvf.runtime.savestate`).

    ``take``: the supervisor pauses the guest, takes internal snapshot ``disk_tag`` of
    its disk, saves the device state and RAM into directory ``state_dir`` if given (a
    memory snapshot; it must exist and be empty), and resumes the guest, whatever
    happened. ``delete``: it deletes internal snapshot ``disk_tag`` of the running disk.
    """

    op: Literal["snapshot"] = "snapshot"  # which request this is
    action: Literal["take", "delete"] = "take"
    disk_tag: str = Field(min_length=1, max_length=300)
    state_dir: str | None = None  # absolute path; None: a disk-only snapshot


class DumpRequest(_Message):
    """Control request: write the running guest's memory to new file ``path`` as an ELF
    core (QMP ``dump-guest-memory``, for Volatility and the like). The guest is paused
    while QEMU writes it and runs on afterwards."""

    op: Literal["dump"] = "dump"  # which request this is
    path: str = Field(min_length=2, max_length=4096)  # absolute; must not exist


class PauseRequest(_Message):
    """Control request: pause the running guest (``paused`` true: QMP ``stop``) or resume
    the paused one (false: QMP ``cont``).

    The supervisor replies once ``query-status`` confirms QEMU's run state; asking for
    the state the VM is already in is not an error (the reply says ``changed`` false).
    """

    op: Literal["pause"] = "pause"  # which request this is
    paused: bool  # true: pause; false: resume


class ControlRequest(RootModel[Annotated[StopRequest | MediaRequest | SnapshotRequest
                                         | DumpRequest | PauseRequest,
                                         Field(discriminator="op")]]):
    """Any request on the control socket, told apart by ``op`` (decode, then ``.root``)."""


class ControlReply(_Message):
    """Control reply, sent once the request is done (for stop: once QEMU is gone)."""

    ok: bool  # the request was understood and carried out
    error: str | None = None  # why not, when not ok
    forced: bool | None = None  # stop: QEMU was quit or killed; the guest did not power off
    saved: SavedState | None = None  # snapshot with state_dir: what was saved
    pause_s: float | None = None  # snapshot: how long the guest was paused
    changed: bool | None = None  # pause: the run state changed (False: it already was so)


class VmStatus(_Message):
    """What ``vm status --json`` prints (built from ``vm.json`` and the run records)."""

    name: str
    id: str
    kind: str
    state: VmState
    pid: int | None = None  # supervisor pid, while running
    qemu_pid: int | None = None
    accel: str | None = None
    accel_reason: str | None = None
    uptime_s: float | None = None  # while starting, running or stopping
    guest_ready: bool = False
    devices: list[DeviceInfo] = []  # live, user-visible
    channels: list[DeviceInfo] = []  # live host-guest channels
    network: str
    nics: list[Nic] = []  # the VM's NICs: mode, network, MAC, fixed address
    cpus: int
    memory_mib: int
    exec_socket: str | None = None
    last_run: LastRun | None = None  # only while not running
    vsock_backend: str | None = None  # AI sandboxes: "userspace" or "kernel"
    device_errors: list[str] = []
    snapshots: list[str] = []  # names of the VM's snapshots, oldest first
    restored_from: str | None = None  # while running: the saved state the run began from
    hotplugged: list[DeviceInfo] = []  # while running: devices added after the start
    resource_warnings: list[ResourceAlert] = []  # while running: resources past a threshold
    jail: JailInfo | None = None  # while running: its jail, with the cgroup's current use

    def to_json(self) -> dict[str, Any]:
        """The JSON-able dict the CLI prints."""
        return self.model_dump(mode="json")


M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    """One message as a single JSON line (for the pipe and the control socket)."""
    return message.model_dump_json().encode() + b"\n"


def decode(schema: type[M], data: bytes | str, *, source: str) -> M:
    """Parse one JSON document into ``schema``.

    Args:
        schema: the model expected (use :class:`StartReport` for the report pipe).
        data: the raw document.
        source: what it is, for the error (a file path, "start report", ...).

    Raises:
        CorruptRecord: not JSON, or not of that shape (names the first bad field).
    """
    try:
        return schema.model_validate_json(data)
    except ValidationError as exc:
        raise CorruptRecord(describe_invalid(exc, source)) from None


def describe_invalid(exc: ValidationError, source: str) -> str:
    """A one-line description of the first problem in ``exc``."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return f"{source} is not valid JSON: {err['msg']}"
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{source}: field '{loc}': {err['msg']}"


def read_settings(schema: type[M], path: Path) -> M:
    """The settings file ``path`` (JSON) as ``schema``; ``schema``'s defaults if the file
    does not exist.

    Raises:
        ConfigError: it cannot be read, is not JSON, or a setting is invalid (the message
            names the file and the setting).
    """
    text = read_settings_text(path)
    if text is None:
        return schema()
    try:
        return schema.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(describe_invalid(exc, str(path))) from None
