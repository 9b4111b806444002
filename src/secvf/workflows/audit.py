"""``secvf audit``: which VMs have a host-guest channel, and does that match their kind?

For every VM in the library (running or not) the audit lists its surfaces:

* devices that are channels (vsock, virtio-fs, 9p, virtio-serial, other
  vhost-user) — from the live QMP device tree for running VMs, from the machine
  builder's plan for stopped ones;
* devices hot-plugged into a running VM since it started (SecVF plugs a restored
  sandbox session's channel devices; anything else was added by someone else), each
  with ``planned``: whether the VM's machine plan asked for it;
* the exec bridge socket (exists? mode? owner?);
* virtio-fs shares (host path, ro/rw) and the NIC mode;
* the disk chain: every file QEMU opens for the VM's disk (path, format, and where it
  is: the bundle, SecVF's image cache or layers, or the disk image ``vm.json`` names);
* for a running VM, its jail (:mod:`secvf.jail`): the recorded uid, namespaces, cgroup
  and limits, and what its QEMU process really is (uid, capabilities, ``no_new_privs``,
  seccomp, namespaces), read from ``/proc``.

Anything that contradicts the VM's kind is a **finding**: a channel on a generic
or malware-analysis VM, an exec socket for a VM that is not a running AI sandbox,
a socket with the wrong mode or owner, a host directory that two VMs share
read-write (one inside the other counts), and stray ``secvf-exec-*.sock`` files that
belong to no VM; and any host file QEMU would open for the VM that ``vm start`` refuses
(:func:`secvf.store.disks.inspect_vm_files`): a disk chain that reaches outside those
places (a hand-edited overlay, say), an external data file, a ``json:`` or protocol
file name, another format than qcow2/raw, an ISO in a system tree; a running VM
without a jail or a cgroup, a QEMU that runs as root or as another VM's uid, holds
capabilities, lacks ``no_new_privs`` or its filter, or sees the host's mounts. Findings are written
to the security log as CRITICAL events.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secvf.errors import CorruptRecord, SecVFError
from secvf.exec.bridge import read_allowlist
from secvf.jail.inspect import read_process
from secvf.machine import build_machine
from secvf.machine.sandbox import VSOCK_DEVICE
from secvf.machine.shares import ShareError, validate_shares
from secvf.model.channels import SANDBOX_CHANNELS, channel_of
from secvf.model.config import VMConfig, VMKind
from secvf.model.runtime import RuntimeRecord
from secvf.store import events as seclog
from secvf.store import paths
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.disks import inspect_vm_files
from secvf.store.events import Severity
from secvf.store.library import list_vms
from secvf.store.runstate import current_state, reap_stale_runtime

_EXEC_SOCKET = re.compile(r"^secvf-exec-(?P<id>[0-9a-f-]{36})\.sock$")


@dataclass
class VMAudit:
    """The surfaces of one VM and the findings about them."""

    name: str
    id: str | None
    kind: str
    state: str
    source: str  # "live" (QMP device tree) or "plan" (machine builder) or "none"
    channel_devices: list[dict[str, Any]] = field(default_factory=list)
    exec_socket: dict[str, Any] | None = None
    shares: list[dict[str, Any]] = field(default_factory=list)
    network: str = ""
    findings: list[str] = field(default_factory=list)
    disk_chain: list[dict[str, str]] = field(default_factory=list)  # path, format, where
    # running: each device added since the start (path, type, channel, planned)
    hotplugged: list[dict[str, Any]] = field(default_factory=list)
    # running: the jail as recorded (uid, namespaces, cgroup, limits) and QEMU's real one
    jail: dict[str, Any] | None = None


def audit_all() -> tuple[list[VMAudit], list[str]]:
    """Audit every VM; return per-VM results and findings not tied to a VM."""
    results = []
    known_ids: set[str] = set()
    for item in list_vms():
        if item.config is None:
            results.append(VMAudit(item.bundle.name, None, "?", "invalid", "none",
                                   findings=[f"unreadable config: {item.error}"]))
            continue
        known_ids.add(item.config.id)
        try:
            results.append(audit_vm(item.config, item.bundle))
        except CorruptRecord as exc:
            results.append(VMAudit(item.config.name, item.config.id, str(item.config.kind),
                                   "invalid", "none", findings=[f"unreadable run record: {exc}"]))
    flag_shared_writable(results)
    flag_shared_identity(results)
    stray = stray_sockets(known_ids)
    for res in results:
        for finding in res.findings:
            seclog.write_event("audit_finding", severity=Severity.CRITICAL, vm=res.name,
                               vm_id=res.id, kind=res.kind, finding=finding)
    for finding in stray:
        seclog.write_event("audit_finding", severity=Severity.CRITICAL, finding=finding)
    return results, stray


def audit_vm(config: VMConfig, bundle: Bundle) -> VMAudit:
    """Audit one VM (see the module docstring for what is checked).

    Reads everything first — the exec socket, the state — and only then removes the
    runtime files of a supervisor that died, so leftovers are reported before they go.
    """
    exec_socket = _socket_facts(RuntimeFiles(config.id).exec_socket)
    view = current_state(bundle, config.id)
    running = view.live
    res = VMAudit(config.name, config.id, str(config.kind), str(view.state),
                  "live" if running else "plan", network=config.network_summary)
    if running:
        channels = view.record.channels if view.record else []
        res.channel_devices = [d.model_dump() for d in channels]
        res.hotplugged = _hotplugged(view.record)
    else:
        res.channel_devices = _planned_channels(config, bundle, res)
    if config.channels is not None:
        res.shares = [{"tag": s.tag, "host_path": s.host_path, "guest_path": s.guest_path,
                       "mode": "ro" if s.read_only else "rw"} for s in config.channels.shares]
    res.exec_socket = exec_socket
    res.findings = _judge(config, res, running)
    if running and view.record is not None:
        res.findings += _jail(view.record, res)
    res.findings += _disk_chain(config, bundle, res)
    reap_stale_runtime(bundle, config.id)
    return res


def _jail(record: RuntimeRecord, res: VMAudit) -> list[str]:
    """Findings about a running VM's jail: none recorded, or a QEMU that is not what
    the record says (root, capabilities, no filter, the host's mount namespace)."""
    if record.jail is None:
        return ["VM runs without a jail: its QEMU and helpers have SecVF's own rights "
                "(jails are off in config/jail.json)"]
    res.jail = record.jail.model_dump(mode="json")
    findings = []
    if not record.jail.cgroup:
        findings.append(f"VM runs without a cgroup: {record.jail.cgroup_problem}")
    if record.qemu_pid is None:
        return findings
    try:
        qemu = read_process(record.qemu_pid)
    except OSError:
        return findings  # it ended while we looked
    res.jail["qemu"] = qemu.to_json()
    if qemu.uid != record.jail.uid or (qemu.uid == 0 and os.getuid() == 0):
        findings.append(f"QEMU runs as uid {qemu.uid}, not the jail's {record.jail.uid}")
    if qemu.cap_eff:
        findings.append(f"QEMU holds capabilities {qemu.cap_eff:#x}")
    if not qemu.no_new_privs or qemu.seccomp != 2:
        findings.append("QEMU runs without no_new_privs or its seccomp filter")
    if "mnt" not in qemu.own_namespaces:
        findings.append("QEMU sees the host's mount namespace")
    return findings


def flag_shared_identity(results: list[VMAudit]) -> None:
    """Two running VMs whose QEMU runs as the same uid (SecVF as root only: without
    root every VM is the user's)."""
    by_uid: dict[int, list[VMAudit]] = {}
    for res in results:
        if res.jail and "qemu" in res.jail and not res.jail.get("user_namespace"):
            by_uid.setdefault(int(res.jail["qemu"]["uid"]), []).append(res)
    for uid, same in by_uid.items():
        if len(same) > 1:
            for res in same:
                others = ", ".join(r.name for r in same if r is not res)
                res.findings.append(f"QEMU runs as uid {uid}, as the QEMU of {others} does")


def _hotplugged(record: RuntimeRecord | None) -> list[dict[str, Any]]:
    """The devices added to a running VM after its start, each marked ``planned`` if its
    QEMU id is one the machine plan asked for (SecVF plugged it)."""
    if record is None:
        return []
    planned = {d.id for d in record.planned_devices}
    return [{**d.model_dump(), "planned": d.path.rsplit("/", 1)[-1] in planned}
            for d in record.hotplugged]


def _planned_channels(config: VMConfig, bundle: Bundle, res: VMAudit) -> list[dict[str, Any]]:
    try:
        plan = build_machine(config, bundle, RuntimeFiles(config.id), "tcg")
    except SecVFError as exc:
        res.source = "none"
        if config.kind is VMKind.AI_SANDBOX:
            return [{"type": VSOCK_DEVICE, "channel": "vsock",
                     "path": f"(plan unavailable: {exc})"}]
        return []
    return [{"type": d.driver, "channel": channel_of(d.driver), "path": d.id}
            for d in plan.devices if channel_of(d.driver)]


def _disk_chain(config: VMConfig, bundle: Bundle, res: VMAudit) -> list[str]:
    """Fill in the VM's disk chain; return the findings about the files QEMU would open."""
    files = inspect_vm_files(bundle, config)
    res.disk_chain = [layer.to_json() for layer in files.chain.layers]
    return [str(exc) for exc in files.errors]


def _socket_facts(path: Path) -> dict[str, Any] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return {"path": str(path), "mode": f"{stat.S_IMODE(st.st_mode):04o}", "owner_uid": st.st_uid,
            "is_socket": stat.S_ISSOCK(st.st_mode)}


def _judge(config: VMConfig, res: VMAudit, running: bool) -> list[str]:
    findings = []
    kinds = {str(d.get("channel")) for d in res.channel_devices}
    if config.kind is not VMKind.AI_SANDBOX:
        findings += [f"{config.kind} VM has a {d.get('channel')} device ({d.get('type')})"
                     for d in res.channel_devices]
        if res.exec_socket:
            findings.append(f"{config.kind} VM has an exec socket {res.exec_socket['path']}")
        return findings
    findings += [f"AI sandbox has an unexpected {k} channel" for k in kinds - SANDBOX_CHANNELS]
    sock = res.exec_socket
    if sock and not running:
        findings.append(f"stopped VM has a leftover exec socket {sock['path']}")
    if sock and sock["owner_uid"] != os.getuid():
        findings.append(f"exec socket owned by uid {sock['owner_uid']}, not by you")
    allowed_modes = {"0600", "0666"} if read_allowlist() - {os.getuid()} else {"0600"}
    if sock and sock["mode"] not in allowed_modes:
        findings.append(f"exec socket mode {sock['mode']} (expected {sorted(allowed_modes)})")
    if running and sock is None:
        findings.append("running AI sandbox has no exec socket")
    try:
        validate_shares(config)
    except ShareError as exc:
        findings.append(f"shares break the share rules (a hand-edited vm.json?): {exc}")
    return findings


def flag_shared_writable(results: list[VMAudit]) -> None:
    """Add a finding to each VM whose read-write share overlaps (is, contains or lies
    in) another VM's read-write share on the host: each guest could plant files for
    the other, a channel between them."""
    writable = [(res, share["tag"], Path(share["host_path"])) for res in results
                for share in res.shares if share["mode"] == "rw"]
    for res, tag, path in writable:
        for other, _, other_path in writable:
            if other is not res and (path == other_path or path in other_path.parents
                                     or other_path in path.parents):
                res.findings.append(
                    f"writable share '{tag}' ({path}) is also writable by VM '{other.name}'"
                    f" ({other_path}): give each VM its own directory (docs/sandbox.md)")


def stray_sockets(known_ids: set[str]) -> list[str]:
    """Exec sockets in the runtime dir that belong to no VM in the library."""
    findings = []
    for path in sorted(paths.runtime_dir().glob("secvf-exec-*.sock")):
        match = _EXEC_SOCKET.match(path.name)
        if match is None or match.group("id") not in known_ids:
            findings.append(f"stray exec socket {path} belongs to no VM")
    return findings


def as_json(results: list[VMAudit], stray: list[str]) -> dict[str, Any]:
    """The audit as one JSON-able object."""
    count = sum(len(r.findings) for r in results) + len(stray)
    return {"vms": [asdict(r) for r in results], "stray": stray, "finding_count": count}
