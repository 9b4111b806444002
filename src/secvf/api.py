"""SecVF's public API: what the CLI uses, and what the MCP server and the TUI will use.

Everything a face needs is here, so a face never imports the layers below it (a
test enforces that). Errors are :class:`secvf.errors.SecVFError` subclasses, each
with an ``exit_code``; see :mod:`secvf.errors`.

A short tour::

    from secvf import api

    api.create_vm("web", kind=api.VMKind.GENERIC, memory="2G")
    api.start_vm("web", wait_ready=120)
    print(api.vm_status("web")["state"])          # "running"
    api.stop_vm("web")

    api.create_sandbox("agent1")
    api.start_sandbox("agent1")                    # returns once exec works
    result = api.Sandbox.from_vm("agent1").run(["uname", "-a"])
    api.remove_sandbox("agent1", purge=True, force=True)  # force: it is running

    findings = api.audit()                         # every VM's host-guest surfaces

Importing this module is cheap: each function imports the layers it needs when it is
called, and the classes and functions it re-exports (``api.Sandbox``, ``api.VMConfig``,
``api.create_snapshot`` …) are imported on first use (PEP 562), so ``secvf --help`` or
``secvf vm exec`` loads only what it runs. ``from secvf.api import X`` works for every
name in ``__all__``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secvf import lazy_exports
from secvf.model.enums import Accel, DisplayMode, NetworkMode, VMKind  # standard library only

if TYPE_CHECKING:  # what _LAZY resolves at run time (a test keeps the two the same)
    from datetime import datetime  # for annotations only: the standard library is not in _LAZY

    from secvf.errors import AgentUnavailable, CommandStartFailed, DetachedProcessError
    from secvf.exec import (
        AttachSession,
        DetachedProcessInfo,
        DetachedStart,
        ExecClient,
        ExecResult,
        ExecSession,
        Exited,
        OutputDropped,
        Stderr,
        Stdout,
        exit_code_for,
    )
    from secvf.exec.forwarder import ForwardError, PortForward
    from secvf.image import DEFAULT_IMAGES, ImageInfo, Progress, build_image, list_images
    from secvf.model.config import VMConfig
    from secvf.model.network import NetworkConfig
    from secvf.model.savedstate import SnapshotInfo, SnapshotKind, TemplateInfo
    from secvf.model.sizes import format_size, parse_size
    from secvf.net.decode import Packet
    from secvf.runtime.control import StopDone, StopListener, StopWaiting
    from secvf.sdk import AsyncSandbox, Sandbox
    from secvf.store.library import ListedVM
    from secvf.workflows.capture import CaptureProgress, CaptureRequest
    from secvf.workflows.detonation import DetonationRequest, DetonationResult
    from secvf.workflows.display import DisplayInfo
    from secvf.workflows.media import MediaChange
    from secvf.workflows.sandbox import (
        create_sandbox,
        list_sandboxes,
        remove_sandbox,
        start_sandbox,
    )
    from secvf.workflows.snapshots import (
        create_snapshot,
        delete_snapshot,
        list_snapshots,
        revert_snapshot,
    )
    from secvf.workflows.templates import build_template, list_templates, remove_template

__all__ = [
    # the VM library
    "create_vm",
    "list_vms",
    "get_vm",
    "vm_dir",
    "delete_vm",
    "clone_vm",
    "rename_vm",
    "import_vm",
    "collect_garbage",
    # lifecycle and status
    "start_vm",
    "stop_vm",
    "pause_vm",
    "resume_vm",
    "vm_status",
    "wait_for_ready",
    "run_in_foreground",
    "print_serial_log",
    "attach_console",
    "display_info",
    "eject_medium",
    "insert_medium",
    "StopWaiting",
    "StopDone",
    "DisplayInfo",
    "MediaChange",
    # snapshots
    "create_snapshot",
    "list_snapshots",
    "revert_snapshot",
    "delete_snapshot",
    "SnapshotInfo",
    "SnapshotKind",
    # AI-sandbox sessions and templates
    "create_sandbox",
    "start_sandbox",
    "list_sandboxes",
    "remove_sandbox",
    "build_template",
    "list_templates",
    "remove_template",
    "TemplateInfo",
    # exec
    "Sandbox",
    "AsyncSandbox",
    "connect_exec",
    "wait_for_exec",
    "run_command",
    "result_as_json",
    "port_forward",
    "PortForward",
    "ForwardError",
    "exit_code_for",
    "ExecClient",
    "ExecSession",
    "ExecResult",
    "Exited",
    "Stdout",
    "Stderr",
    "AgentUnavailable",
    "CommandStartFailed",
    # background processes in a sandbox
    "start_detached",
    "list_detached",
    "kill_detached",
    "detached_as_json",
    "DetachedStart",
    "DetachedProcessInfo",
    "AttachSession",
    "OutputDropped",
    "DetachedProcessError",
    # audit
    "audit",
    # malware detonation
    "analyze",
    "list_analyses",
    "show_analysis",
    "analysis_dir",
    "remove_analysis",
    "export_analysis",
    "DetonationRequest",
    "DetonationResult",
    # isolated networks
    "create_network",
    "list_networks",
    "show_network",
    "remove_network",
    "set_vm_networks",
    "capture_network",
    "export_ring",
    "CaptureRequest",
    "CaptureProgress",
    "NetworkConfig",
    # packets
    "read_packets",
    "packet_presets",
    "Packet",
    # images
    "build_image",
    "list_images",
    "remove_image",
    "image_recipes",
    "DEFAULT_IMAGES",
    "ImageInfo",
    "Progress",
    # the model
    "VMConfig",
    "VMKind",
    "NetworkMode",
    "Accel",
    "DisplayMode",
    "ListedVM",
    "format_size",
    "parse_size",
]

#: Re-exported names and the module each is imported from on first use.
_LAZY = {
    **dict.fromkeys(("DetonationRequest", "DetonationResult"), "secvf.workflows.detonation"),
    **dict.fromkeys(("CaptureRequest", "CaptureProgress"), "secvf.workflows.capture"),
    "NetworkConfig": "secvf.model.network",
    "Packet": "secvf.net.decode",
    **dict.fromkeys(("AgentUnavailable", "CommandStartFailed", "DetachedProcessError"),
                    "secvf.errors"),
    **dict.fromkeys(("ExecClient", "ExecResult", "ExecSession", "Exited", "Stderr", "Stdout",
                     "exit_code_for", "AttachSession", "DetachedProcessInfo", "DetachedStart",
                     "OutputDropped"), "secvf.exec"),
    **dict.fromkeys(("ForwardError", "PortForward"), "secvf.exec.forwarder"),
    **dict.fromkeys(("DEFAULT_IMAGES", "ImageInfo", "Progress", "build_image", "list_images"),
                    "secvf.image"),
    "VMConfig": "secvf.model.config",
    **dict.fromkeys(("SnapshotInfo", "SnapshotKind", "TemplateInfo"), "secvf.model.savedstate"),
    "format_size": "secvf.model.sizes",
    "parse_size": "secvf.model.sizes",
    **dict.fromkeys(("StopDone", "StopListener", "StopWaiting"), "secvf.runtime.control"),
    **dict.fromkeys(("AsyncSandbox", "Sandbox"), "secvf.sdk"),
    "ListedVM": "secvf.store.library",
    "DisplayInfo": "secvf.workflows.display",
    "MediaChange": "secvf.workflows.media",
    **dict.fromkeys(("create_sandbox", "list_sandboxes", "remove_sandbox", "start_sandbox"),
                    "secvf.workflows.sandbox"),
    **dict.fromkeys(("create_snapshot", "delete_snapshot", "list_snapshots", "revert_snapshot"),
                    "secvf.workflows.snapshots"),
    **dict.fromkeys(("build_template", "list_templates", "remove_template"),
                    "secvf.workflows.templates"),
}

if not TYPE_CHECKING:  # mypy sees the imports above, so a misspelt ``api.name`` stays an error
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)


# ---- the VM library ----------------------------------------------------------------------


def create_vm(
    name: str,
    *,
    kind: VMKind = VMKind.GENERIC,
    cpus: int = 1,
    memory: str = "1G",
    disk_size: str = "8G",
    image: str | None = None,
    disk_image: Path | None = None,
    iso: Path | str | None = None,
    networks: Sequence[str] = (),
    allow_internet: bool = False,
    accel: str = "auto",
    shares: Sequence[str] = (),
    workspace: Path | None = None,
    root_password: str | None = None,
    autologin: bool = False,
    display: str = "none",
) -> VMConfig:
    """Validate the options, create VM ``name`` and return its config.

    A generic VM booted from a SecVF image offers a login on its serial console: as root
    with ``root_password`` (only its SHA-512 crypt hash is kept, in the guest's
    ``/etc/shadow``), or with ``autologin`` a root shell without a password.
    ``display="vnc"`` gives it a graphical console (see :func:`display_info`; view-only
    on a malware-analysis VM, refused for an AI sandbox).

    ``iso``: an installer ISO to boot from, read-only: a file, or a ``str`` without ``/``
    naming a cached ISO (:func:`list_isos`).

    ``networks`` are ``--network`` values: ``none``, ``nat``, ``isolated:NAME[,router]
    [,ip=ADDRESS]`` (several for several NICs; default ``nat``, and ``none`` for a
    malware-analysis VM, which gets ``nat`` only with ``allow_internet``).

    Raises:
        InvalidName, ConfigError, ForbiddenDevice: the options cannot work (nothing
            was written).
        NotFound: the image is not built. DiskError.
        AlreadyExists: the name is taken, or (an AI sandbox without ``workspace``) an
            earlier sandbox of that name left its default workspace behind.
    """
    from secvf.store.networks import networks_lock
    from secvf.workflows import vms, workspaces
    from secvf.workflows.create import build_config, hash_root_password

    with workspaces.for_new_vm(name, kind, workspace), networks_lock():
        config = build_config(name=name, kind=kind, cpus=cpus, memory=memory,
                              disk_size=disk_size, image=image, disk_image=disk_image,
                              iso=iso, networks=networks, allow_internet=allow_internet,
                              accel=accel, shares=shares,
                              workspace=workspace, autologin=autologin,
                              root_password=root_password, display=display)
        hashed = None if root_password is None else hash_root_password(root_password)
        vms.create_vm(config, root_password_hash=hashed)
    return config


def list_vms() -> list[ListedVM]:
    """Every VM bundle in the library, by name; an unreadable one carries its error."""
    from secvf.store import library

    return library.list_vms()


def get_vm(name: str) -> VMConfig:
    """The config of VM ``name``. Raises NotFound, ConfigError (corrupt vm.json)."""
    from secvf.store import library

    return library.get_vm(name)[1]


def vm_dir(name: str) -> Path:
    """Where VM ``name``'s bundle (vm.json, disk, logs) lives. Raises NotFound."""
    from secvf.store.bundle import get_bundle

    return get_bundle(name).path


def delete_vm(name: str, *, force: bool = False) -> VMConfig | None:
    """Delete VM ``name`` (``force``: stop it first if it runs); returns its config."""
    from secvf.workflows import vms

    return vms.delete_vm(name, force=force)


def clone_vm(src: str, dst: str, *, copy_workspace: bool = False) -> VMConfig:
    """Clone stopped VM ``src`` as ``dst`` copy-on-write (new UUID and MAC). A sandbox
    clone gets its own workspace: empty, or a copy of the source's (``copy_workspace``)."""
    from secvf.workflows import vms

    return vms.clone_vm(src, dst, copy_workspace=copy_workspace).load()


def rename_vm(old: str, new: str) -> None:
    """Rename stopped VM ``old`` to ``new`` (a sandbox's default workspace moves along)."""
    from secvf.workflows import vms

    vms.rename_vm(old, new)


def collect_garbage(*, dry_run: bool = False) -> dict[str, Any]:
    """Remove disk layers no VM uses and work directories killed commands left
    (``dry_run``: only list them); the report as ``secvf gc --json`` prints it.

    Raises:
        LockBusy: a clone is in progress.
    """
    from secvf.store import gc

    return gc.collect(dry_run=dry_run).as_json()


def import_vm(path: Path, *, name: str | None = None) -> VMConfig:
    """Import the VM bundle directory ``path`` as ``name`` (default: its vm.json's name).

    The bundle is treated as hostile: its config, boot source, shares and every file of
    its disk chain are checked before anything is written (see
    :func:`secvf.workflows.vms.import_vm`); the new VM gets a new UUID and MAC.

    Raises:
        NotFound, ConfigError, ForbiddenDevice, InvalidName, AlreadyExists.
        UnsafeDisk (a DiskError): the bundle names a host file SecVF will not open.
    """
    from secvf.workflows import vms

    return vms.import_vm(path, name=name).load()


# ---- lifecycle and status ----------------------------------------------------------------


def start_vm(name: str, *, accel: str | None = None,
             wait_ready: float | None = None) -> dict[str, Any]:
    """Start VM ``name`` under its own supervisor; returns its status. ``wait_ready``
    (seconds) also waits for the guest's ready marker: only for a VM booted from a SecVF
    image, the only guest that prints one.

    Raises:
        ConfigError: ``wait_ready`` for an ISO or disk-image VM (nothing was started).
        StateError: already running. LaunchFailed: QEMU or a helper did not start,
        or the device-tree check refused the VM.
    """
    from secvf.runtime import control

    return control.start_vm(name, accel=accel, wait_ready=wait_ready)


def stop_vm(name: str, *, force: bool = False, timeout: float = 30.0,
            progress: StopListener | None = None) -> dict[str, Any]:
    """Stop VM ``name`` (ACPI powerdown, forced after ``timeout``); returns its status.
    A running AI sandbox syncs its disks through its agent first. ``progress`` gets a
    :class:`StopWaiting` about once a second while the guest may still power off, then
    one :class:`StopDone` that says whether the stop was forced."""
    from secvf.workflows import vms

    return vms.stop_vm(name, force=force, timeout=timeout, progress=progress)


def pause_vm(name: str) -> dict[str, Any]:
    """Pause running VM ``name`` (QEMU stops its vCPUs; memory, devices and connections
    stay); returns its status, state ``paused``. Already paused: nothing happens.
    While paused, exec, snapshots and medium changes are refused; ``stop_vm`` works.

    Raises:
        StateError: it is not running (stopped, starting or stopping).
        SecVFError: its supervisor or QEMU refused, or did not answer.
    """
    from secvf.runtime import control

    return control.pause_vm(name)


def resume_vm(name: str) -> dict[str, Any]:
    """Resume paused VM ``name``; returns its status, state ``running``. Already running:
    nothing happens. The guest's clock is behind by the pause until the restore watch
    of a SecVF image steps it (about a second).

    Raises:
        StateError: it is neither running nor paused.
        SecVFError: its supervisor or QEMU refused, or did not answer.
    """
    from secvf.runtime import control

    return control.resume_vm(name)


def vm_status(name: str) -> dict[str, Any]:
    """State, accelerator, uptime, live devices and last run of VM ``name``."""
    from secvf.runtime import control

    return control.vm_status(name)


def wait_for_ready(name: str, timeout: float) -> dict[str, Any]:
    """Wait until VM ``name``'s guest printed its ready marker; returns its status.
    Raises ConfigError at once for a VM whose guest prints none (ISO, disk image)."""
    from secvf.runtime import control

    return control.wait_for_ready(name, timeout)


def run_in_foreground(name: str, *, accel: str | None = None) -> int:
    """Run VM ``name``'s supervisor in this process until the VM stops; its exit status."""
    from secvf.runtime.supervisor import run_supervisor

    return run_supervisor(name, accel=accel, report_fd=None)


def print_serial_log(name: str, *, run: int | None = None, follow: bool = False) -> None:
    """Copy one run's serial console log of VM ``name`` to stdout: run ``run`` (one of
    the last few kept), or the current or last run; ``follow``: keep going while that
    run lasts. Raises NotFound for a run whose log is not kept."""
    from secvf.runtime import console
    from secvf.store import library

    bundle, _ = library.get_vm(name)
    console.print_log(bundle, run=run, follow=follow)


def attach_console(name: str) -> None:
    """Attach this terminal to running VM ``name``'s serial console (detach: Ctrl-])."""
    from secvf.runtime import console

    console.attach_console(name)


def display_info(name: str) -> DisplayInfo:
    """Where running VM ``name``'s graphical console (VNC on a private Unix socket,
    mode 0600) listens, and how to open it. Raises ConfigError (``--display none``),
    StateError (not running)."""
    from secvf.workflows import display

    return display.display_info(name)


def eject_medium(name: str) -> MediaChange:
    """Eject VM ``name``'s cdrom medium, live if it runs, and for the next start.
    Raises ConfigError: it has no cdrom drive (not an ``--iso`` VM)."""
    from secvf.workflows import media

    return media.eject_medium(name)


def insert_medium(name: str, iso: Path) -> MediaChange:
    """Insert ISO ``iso`` (read-only, checked as ``vm create --iso`` checks it) into VM
    ``name``'s cdrom drive, live if it runs, and for the next start."""
    from secvf.workflows import media

    return media.insert_medium(name, iso)


# ---- snapshots, AI-sandbox sessions and templates: the workflows' own functions (_LAZY) ---


# ---- exec ---------------------------------------------------------------------------------


@contextlib.contextmanager
def connect_exec(name: str) -> Iterator[ExecClient]:
    """A handshaken connection to running AI sandbox ``name``'s agent.

    Raises:
        NoExecChannel: the VM has no exec channel (by design) or is not running.
        AgentUnavailable: the agent does not answer (yet: the VM may still be booting,
            see :func:`wait_for_exec`).
    """
    from secvf.workflows import vm_exec

    with vm_exec.connect(name) as client:
        yield client


def wait_for_exec(name: str, timeout: float) -> float:
    """Wait up to ``timeout`` s until running AI sandbox ``name``'s agent answers a ping;
    returns its round-trip time. A VM that is not running fails at once.

    Raises:
        AgentUnavailable: no answer within ``timeout``. NoExecChannel, NotFound.
    """
    from secvf.workflows import vm_exec

    return vm_exec.wait_for_exec(name, timeout)


def run_command(name: str, command: str | Sequence[str], **options: Any) -> ExecResult:
    """Run ``command`` in sandbox ``name`` and capture its output (see ``ExecClient.run``)."""
    from secvf.workflows import vm_exec

    return vm_exec.run_captured(name, command, **options)


def port_forward(name: str, spec: str) -> PortForward:
    """Forward host TCP connections to a TCP port inside running sandbox ``name``.

    ``spec`` is ``[HOST_ADDR:]HOST_PORT:GUEST_PORT``: it listens on 127.0.0.1 unless an
    address is given (``[::1]:8080:80`` for IPv6), and HOST_PORT 0 picks a free port.
    Returns the started forward: a context manager with ``host_port``, ``stats``
    (connections, refused, bytes each way) and ``close()``. A connection to a guest port
    nobody listens on is reset; when the VM stops, the forward's connections end.

    Raises:
        ConfigError: a bad spec. NotFound: no such VM.
        NoExecChannel: not an AI sandbox (no channel by design), or not running.
        ForwardError: the host address or port cannot be listened on.
    """
    from secvf.workflows import port_forward as forward

    return forward.start_port_forward(name, spec)


def start_detached(name: str, command: str | Sequence[str], **options: Any) -> DetachedStart:
    """Start ``command`` in sandbox ``name`` as a background process that outlives the
    call; returns its id and pid (options: env, cwd, user; see
    ``ExecClient.start_detached``).

    Raises:
        DetachedProcessError: too many running (``limit_reached``), or the guest agent is
            too old (``unsupported``). CommandStartFailed, NoExecChannel, AgentUnavailable.
    """
    from secvf.workflows import vm_exec

    return vm_exec.start_detached(name, command, **options)


def list_detached(name: str) -> list[DetachedProcessInfo]:
    """Sandbox ``name``'s background processes, running and recently exited, oldest first.

    Raises:
        DetachedProcessError: ``unsupported``. NoExecChannel, AgentUnavailable.
    """
    from secvf.workflows import vm_exec

    return vm_exec.list_detached(name)


def kill_detached(name: str, process_id: str, signum: int = 15) -> None:
    """Send ``signum`` (default SIGTERM) to background process ``process_id``'s process
    group in sandbox ``name``. Follow one with ``connect_exec(name)`` and
    ``client.attach(process_id)``.

    Raises:
        DetachedProcessError: ``not_found``, ``not_running``, ``invalid_request``,
            ``unsupported``. NoExecChannel, AgentUnavailable.
    """
    from secvf.workflows import vm_exec

    vm_exec.kill_detached(name, process_id, signum)


def detached_as_json(info: DetachedProcessInfo) -> dict[str, Any]:
    """The ``vm ps --json`` shape of one background process."""
    from secvf.workflows import vm_exec

    return vm_exec.detached_json(info)


def result_as_json(result: ExecResult) -> dict[str, Any]:
    """The ``--json`` shape of an exec result: exit status, timing, decoded output."""
    from secvf.workflows import vm_exec

    return vm_exec.result_json(result)


# ---- audit and images ----------------------------------------------------------------------


def audit() -> dict[str, Any]:
    """Every VM's host-guest surfaces and findings, as ``secvf audit --json`` prints them."""
    from secvf.workflows import audit as surfaces

    results, stray = surfaces.audit_all()
    return surfaces.as_json(results, stray)


def remove_image(name: str) -> None:
    """Remove the built image ``name``."""
    from secvf import image

    image.remove_image(name)


def image_recipes() -> list[str]:
    """Names of the image recipes ``build_image`` knows."""
    from secvf.image.recipe import RECIPES

    return sorted(RECIPES)


# ---- packets: decoding and filtering captures --------------------------------------------


def read_packets(source: str | Path, *, filter: str | None = None, preset: str | None = None,
                 limit: int | None = None) -> Iterator[Packet]:
    """The decoded packets of capture file ``source`` (pcapng or pcap) — or, when
    ``source`` names an isolated network and no such file exists, of that network's
    always-on ring (its switch's last frames) — that match
    ``filter`` and ``preset`` (both, if both are given), at most ``limit``; decoded
    as the result is iterated. The filter language: docs/packets.md.

    Raises:
        InvalidFilter: the filter does not parse (at once, before anything is read).
        NotFound: no such preset, or no such file.
        CaptureFileError (a ConfigError): the file is not a capture, or is damaged;
            raised while iterating, after the packets before the damage.
    """
    from secvf.workflows import packets

    path = Path(source)
    if not path.exists() and isinstance(source, str) and _is_network(source):
        from secvf.workflows.capture import ring_frames

        return packets.read_packets(ring_frames(source), filter=filter, preset=preset,
                                    limit=limit)
    return packets.read_file(path, filter=filter, preset=preset, limit=limit)


def _is_network(name: str) -> bool:
    from secvf.errors import SecVFError
    from secvf.store.networks import load_network

    try:
        load_network(name)
    except SecVFError:
        return False
    return True


def packet_presets() -> list[dict[str, str]]:
    """The packet filter presets (name, section, expression, catches, cannot), by section."""
    from secvf.workflows import packets

    return packets.presets()


# ---- isolated networks -------------------------------------------------------------------


def create_network(name: str, *, subnet: str = "10.0.100.0/24", isolate_guests: bool = False,
                   ipam: bool = True, frames_per_s: int | None = None,
                   broadcast_per_s: int | None = None,
                   ring_frames: int | None = None) -> NetworkConfig:
    """Create isolated network ``name``: an L2 segment of its own switch, reachable from
    nothing but its VMs' NICs (``vm create --network isolated:NAME``).

    ``isolate_guests``: guest NICs reach only the network's router NIC (a private VLAN).
    ``ipam``: each NIC gets a fixed address from ``subnet`` (``.1`` is the router's).
    Limits are per port, per second (0: none); ``ring_frames``: the always-on ring's size.

    Raises:
        InvalidName, AlreadyExists, ConfigError (a bad or overlapping subnet), LockBusy.
    """
    from secvf.workflows import networks

    return networks.create_network(name, subnet=subnet, isolate_guests=isolate_guests,
                                   ipam=ipam, frames_per_s=frames_per_s,
                                   broadcast_per_s=broadcast_per_s, ring_frames=ring_frames)


def list_networks() -> list[dict[str, Any]]:
    """One dict per network: name, subnet, isolate_guests, ipam, vms, switch, ports
    (or name and error for an unreadable record)."""
    from secvf.workflows import networks

    return networks.list_networks()


def show_network(name: str) -> dict[str, Any]:
    """Network ``name``'s record, its NICs (VM, MAC, address, live counters and drops by
    reason) and its switch's state. Raises NotFound, ConfigError."""
    from secvf.workflows import networks

    return networks.show_network(name)


def remove_network(name: str) -> None:
    """Remove network ``name``. Raises NotFound, NetworkError (VMs still use it)."""
    from secvf.workflows import networks

    networks.remove_network(name)


def set_vm_networks(name: str, networks: Sequence[str], *,
                    allow_internet: bool = False) -> VMConfig:
    """Give stopped VM ``name`` the NICs ``networks`` ask for (``--network`` values, as
    :func:`create_vm` takes them; ``["none"]``: no NIC). A NIC asked for again keeps its
    MAC and address. Raises StateError (running), ConfigError, NotFound."""
    from secvf.workflows import networks as workflow

    return workflow.set_vm_networks(name, list(networks), allow_internet=allow_internet)


def capture_network(request: CaptureRequest,
                    progress: Callable[[CaptureProgress], None] | None = None,
                    stop: Callable[[], bool] = lambda: False) -> CaptureProgress:
    """Capture a network's frames to pcapng until the request's duration or frame count,
    or ``stop()`` (see :class:`CaptureRequest`); ``progress`` is called about twice a
    second. Raises NotFound, NetworkError (no switch runs; disk full), InvalidFilter."""
    from secvf.workflows.capture import capture

    return capture(request, progress, stop)


def export_ring(name: str, path: Path | None = None) -> CaptureProgress:
    """Write network ``name``'s always-on ring (its last frames) to a pcapng file.
    Raises NotFound, NetworkError (no switch runs)."""
    from secvf.workflows import capture

    return capture.export_ring(name, path)


# ---- malware detonation ------------------------------------------------------------------


def analyze(requests: Sequence[DetonationRequest], *, jobs: int = 1,
            progress: Callable[[str, str], None] | None = None) -> list[DetonationResult]:
    """Detonate each sample of ``requests`` in a malware-analysis VM restored from a
    clean state, with no host-guest channel (docs/analysis.md); ``jobs`` at a time.
    ``progress(analysis_id, stage)`` hears each stage. A sample that fails is a result
    with ``verdict == "failed"`` and its ``error``.

    Raises:
        NotFound, ConfigError: a request cannot run (nothing was started).
    """
    from secvf.workflows.detonation import detonate_all

    return detonate_all(list(requests), jobs=jobs, progress=progress)


def list_analyses() -> list[dict[str, Any]]:
    """Every analysis result: id, state, verdict, sample, times (what a killed
    ``secvf analyze`` left is removed and marked ``interrupted`` first)."""
    from secvf.store import analyses
    from secvf.workflows.detonation import sweep_interrupted

    sweep_interrupted()
    return [{"id": a.id, "running": a.running, "directory": str(a.directory),
             **{k: a.status.get(k) for k in ("state", "verdict", "sample_name",
                                             "sample_sha256", "network", "started_at",
                                             "ended_at", "error")}}
            for a in analyses.list_analyses()]


def show_analysis(analysis_id: str) -> dict[str, Any]:
    """An analysis's report (``report.json``), or its status if it has no report.
    Raises NotFound, ConfigError."""
    import json

    from secvf.store import analyses

    directory = analyses.result_dir(analysis_id)
    report = directory / "report.json"
    if report.exists():
        loaded: dict[str, Any] = json.loads(report.read_text())
        return loaded
    return analyses.read_status(directory)


def analysis_dir(analysis_id: str) -> Path:
    """The result directory of ``analysis_id`` (a unique prefix works). Raises NotFound."""
    from secvf.store import analyses

    return analyses.result_dir(analysis_id)


def remove_analysis(analysis_id: str) -> Path:
    """Remove an analysis's results (what a killed run left is removed first). Raises
    NotFound, StateError (still running)."""
    from secvf.store import analyses
    from secvf.workflows.detonation import sweep_interrupted

    sweep_interrupted()
    return analyses.remove_analysis(analysis_id)


def export_analysis(analysis_id: str, out: Path) -> Path:
    """Write an analysis's results to ``out`` (a .tar.gz). Raises NotFound, StateError,
    ConfigError (``out`` exists)."""
    from secvf.store import analyses

    return analyses.export_analysis(analysis_id, out)


# --- MCP ---------------------------------------------------------------------------------
# What the MCP server (secvf.faces.mcp) needs beyond the functions above.

__all__ += ["write_log_event", "mcp_config_dir"]


def write_log_event(stream: str, event: str, *, severity: str = "INFO", vm: str | None = None,
                    **fields: Any) -> dict[str, Any]:
    """Append one event to ``stream``'s JSON Lines log under ``$SECVF_HOME/logs``
    (``<stream>-YYYY-MM-DD.jsonl``, mode 0600) and return the record. ``severity`` is
    ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL``. Never raises for an unwritable log
    (the failure is reported on stderr)."""
    from secvf.store.events import Severity, write_event

    return write_event(event, severity=Severity(severity), stream=stream, vm=vm, **fields)


def mcp_config_dir() -> Path:
    """Where the MCP server keeps its state (the HTTP bearer token): ``$SECVF_HOME/config/mcp``,
    created 0700."""
    from secvf.store import paths

    return paths.ensure_private_dir(paths.config_dir() / "mcp")


# --- logs --------------------------------------------------------------------------------
# The event log (docs/logs.md, docs/events.md): what `secvf logs`, the MCP server's log
# tools and the TUI's log view read.

__all__ += ["LOG_STREAMS", "LOG_SEVERITIES", "query_logs", "follow_logs", "verify_logs",
            "parse_log_time", "parse_log_severity"]

#: The log streams (``secvf.store.logquery.STREAMS``; a test keeps the two the same).
LOG_STREAMS = ("security", "exec", "mcp")

#: Severities, least urgent first (``secvf.store.logquery.SEVERITIES``; tested the same).
LOG_SEVERITIES = ("INFO", "WARNING", "ERROR", "CRITICAL")


def query_logs(stream: str, *, since: datetime | None = None, until: datetime | None = None,
               severity: str | None = None, vm: str | None = None, event: str | None = None,
               limit: int | None = None) -> list[dict[str, Any]]:
    """The records of log ``stream`` (``security``, ``exec`` or ``mcp``) that match,
    oldest first, each the JSON object of its line (with its ``seq``/``prev``/``hash``).

    ``since``/``until``: a time range, inclusive (naive times are local);
    ``severity``: a minimum (``"WARNING"``: WARNING, ERROR and CRITICAL); ``vm``: a VM's
    name or id; ``event``: an event name (docs/events.md); ``limit``: only the newest
    ``limit`` matches.

    Raises:
        LogQueryError: an unknown stream or severity, ``since`` after ``until``, a
            ``limit`` below 1.
        ConfigError: ``$SECVF_HOME`` cannot be used.
    """
    from secvf.store.events import default_log
    from secvf.store.logquery import LogFilter, query

    filt = LogFilter.make(since=since, until=until, severity=severity, vm=vm, event=event)
    return query(default_log(), stream, filt, limit=limit)


def follow_logs(stream: str, *, since: datetime | None = None, severity: str | None = None,
                vm: str | None = None, event: str | None = None, backlog: int | None = 0,
                poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """Yield log ``stream``'s matching records as they are written, for ever (stop by
    closing the iterator). First the newest ``backlog`` already written (None: every
    match since ``since``; 0: none). Filters as in :func:`query_logs`.

    Raises:
        LogQueryError, ConfigError: as :func:`query_logs` (when iteration starts).
    """
    from secvf.store.events import default_log
    from secvf.store.logquery import LogFilter, follow

    filt = LogFilter.make(since=since, severity=severity, vm=vm, event=event)
    return follow(default_log(), stream, filt, backlog=backlog, poll_s=poll_s)


def verify_logs(stream: str | None = None) -> dict[str, Any]:
    """Check the hash chain of ``stream`` (every stream: None): ``{"ok", "directory",
    "streams": [...], "findings": [{stream, kind, file, line, message}]}``, where kind is
    removed, edited, reordered, duplicate, spliced, corrupt, torn or unchained.

    Raises:
        LogQueryError: an unknown stream.
        ConfigError: ``$SECVF_HOME`` cannot be used.
    """
    from secvf.store.events import default_log
    from secvf.store.logquery import verify

    return verify(default_log(), None if stream is None else [stream])


def parse_log_time(text: str) -> datetime:
    """The UTC time ``text`` means: ``30m``, ``2h``, ``7d`` before now, or ISO 8601
    (local time unless it names a zone). Raises LogQueryError."""
    from secvf.store.logquery import parse_time

    return parse_time(text)


def parse_log_severity(text: str) -> str:
    """The severity ``text`` names (``warning``, ``warning+``, any case): ``"WARNING"``.
    Raises LogQueryError."""
    from secvf.store.logquery import parse_severity

    return str(parse_severity(text))


# --- ISO cache ---------------------------------------------------------------------------
# Verified installer media in $SECVF_HOME/isos (docs/iso.md): `secvf iso`, and what
# `vm create --iso NAME` boots. Each entry is a dict: name, path, size_bytes, sha256,
# source, checksums, added_at, verified_at, error (an unusable record: the others None).

__all__ += ["fetch_iso", "add_iso", "list_isos", "verify_isos", "remove_iso"]


def fetch_iso(url: str, *, sha256: str | None = None, checksums: str | None = None,
              name: str | None = None, ca_file: Path | None = None,
              progress: Callable[[str, int, int | None], None] | None = None
              ) -> dict[str, Any]:
    """Download ``url`` (HTTPS, a host on ``$SECVF_HOME/config/iso-hosts``, redirects
    too) into the ISO cache as ``name`` (default: the URL's file name), published only
    once its SHA-256 is ``sha256`` or the one checksum file URL ``checksums`` lists for
    it (exactly one of the two). A cut-off download resumes when called again.
    ``ca_file``: trust only these CAs (default ``$SECVF_ISO_CA_FILE``, else the
    system's). ``progress(what, done_bytes, total_bytes)`` hears the transfer.

    Raises:
        UntrustedSource (not HTTPS, host not allowed), DownloadFailed (``resumable``),
        ChecksumMismatch (nothing kept), MediaError, ConfigError, InvalidName,
        AlreadyExists, LockBusy.
    """
    from secvf.workflows.iso_fetch import fetch_iso as fetch

    return fetch(url, sha256=sha256, checksums=checksums, name=name, ca_file=ca_file,
                 progress=progress).to_json()


def add_iso(path: Path, *, sha256: str, name: str | None = None,
            progress: Callable[[str, int, int | None], None] | None = None
            ) -> dict[str, Any]:
    """Copy ISO file ``path`` into the cache as ``name`` (default: its file name) if its
    SHA-256 is ``sha256``. Raises ChecksumMismatch, MediaError, ConfigError, DiskError,
    InvalidName, AlreadyExists."""
    from secvf.workflows.iso_fetch import add_iso as add

    return add(path, sha256=sha256, name=name, progress=progress).to_json()


def list_isos() -> list[dict[str, Any]]:
    """Every cached ISO, by name (one with an unusable record carries its ``error``)."""
    from secvf.store import isos

    return [entry.to_json() for entry in isos.list_isos()]


def verify_isos(name: str | None = None,
                progress: Callable[[str, int, int | None], None] | None = None
                ) -> list[dict[str, Any]]:
    """Hash cached ISO ``name`` (every one: None) again: ``[{name, ok, expected, actual,
    error}]``; a match renews its ``verified_at``. Raises NotFound, ConfigError (``name``
    given and unusable)."""
    import dataclasses

    from secvf.workflows.iso_fetch import verify_isos as verify

    return [dataclasses.asdict(check) for check in verify(name, progress)]


def remove_iso(name: str) -> Path:
    """Remove cached ISO ``name``; returns where it was. Raises NotFound, StateError (a
    VM's cdrom drive names it: the VMs are named)."""
    from secvf.store import isos

    return isos.remove_iso(name)


# --- TUI ---------------------------------------------------------------------------------
# What the terminal UI (secvf.faces.tui) needs beyond the functions above: ways to wait
# for what changes (the security log, a serial log) that a worker thread can stop.

__all__ += ["VM_CHANGE_EVENTS", "watch_logs", "watch_vm_changes", "watch_serial_log"]

#: Security events after which a VM's row (state, devices, snapshots, name) may differ.
VM_CHANGE_EVENTS = frozenset({
    "vm_created", "vm_deleted", "vm_cloned", "vm_renamed", "vm_imported", "vm_started",
    "vm_stopped", "vm_crashed", "vm_forced_stop", "vm_paused", "vm_resumed",
    "vm_devices_added", "forbidden_device", "guest_panic", "device_helper_died",
    "vm_snapshot_created", "vm_snapshot_reverted", "vm_snapshot_deleted",
    "exec_bridge_started", "exec_bridge_stopped", "vm_media_changed",
})


class _Stopped(Exception):
    """Raised by the sleep of a watch whose ``stop()`` became true."""


def _stoppable_sleep(stop: Callable[[], bool]) -> Callable[[float], None]:
    import time

    def nap(seconds: float) -> None:
        if stop():
            raise _Stopped
        time.sleep(seconds)
        if stop():
            raise _Stopped
    return nap


def watch_logs(stream: str, *, stop: Callable[[], bool], severity: str | None = None,
               vm: str | None = None, event: str | None = None, backlog: int | None = 0,
               poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """:func:`follow_logs` that ends once ``stop()`` is true (checked between looks at
    the log, every ``poll_s``): what a thread that another thread must be able to end
    iterates. Filters and ``backlog`` as in :func:`follow_logs`.

    Raises:
        LogQueryError, ConfigError: as :func:`query_logs`.
    """
    from secvf.store.events import default_log
    from secvf.store.logquery import LogFilter, follow

    filt = LogFilter.make(severity=severity, vm=vm, event=event)
    try:
        yield from follow(default_log(), stream, filt, backlog=backlog, poll_s=poll_s,
                          sleep=_stoppable_sleep(stop))
    except _Stopped:
        return


def watch_vm_changes(*, stop: Callable[[], bool],
                     poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """Yield each security event written from now on that changes what a VM shows
    (:data:`VM_CHANGE_EVENTS`; its ``vm`` names the VM) until ``stop()`` is true: a
    VM list refreshed from state changes instead of asking every VM's status in a loop.
    A supervisor killed with SIGKILL writes no event; its VM shows as stopped at the
    next :func:`vm_status`."""
    for record in watch_logs("security", stop=stop, poll_s=poll_s):
        if record.get("event") in VM_CHANGE_EVENTS:
            yield record


def watch_serial_log(name: str, *, stop: Callable[[], bool], tail_bytes: int = 64 * 1024,
                     follow: bool = True, poll_s: float = 0.25) -> Iterator[bytes]:
    """The serial console log of VM ``name``'s current (or last) run as raw chunks:
    first its last ``tail_bytes``, then (``follow``) what the guest writes while that
    run lasts, until ``stop()`` is true. The bytes are the guest's: untrusted.

    Raises:
        NotFound, ConfigError: no such VM, or its vm.json is invalid.
    """
    import os

    from secvf.store import library
    from secvf.store.runstate import is_running

    bundle, _ = library.get_vm(name)
    run = bundle.current_run()
    nap = _stoppable_sleep(stop)
    try:
        fh = bundle.serial_log.open("rb")
    except FileNotFoundError:
        return
    with fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - tail_bytes))
        try:
            while True:
                live = follow and is_running(bundle) and bundle.current_run() == run
                while chunk := fh.read(65536):
                    yield chunk
                if not live:
                    return
                nap(poll_s)
        except _Stopped:
            return
