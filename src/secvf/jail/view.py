"""What each jailed process of a VM sees and is: the :class:`JailSpec` of its QEMU, its
vsock backend and its share servers.

Every path a process needs appears in its jail at the same path as on the host, so no
command line changes: QEMU sees its disk chain (the top layer writable), its kernel and
initrd or ISO, its serial logs, its RAM file, its own runtime directory (sockets) and its
networks' port directories; the vsock backend sees its runtime directory and the Python
it runs on, read-only. Neither sees another VM's files, SecVF's state, or home
directories. virtiofsd sandboxes itself (its own mount, PID and network namespaces,
``pivot_root`` into the share, in the id-mapped user namespace of
:mod:`secvf.machine.share_launcher`): its jail adds the cgroup and an IPC namespace.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import secvf
from secvf.jail.identity import JailIdentity
from secvf.jail.spec import Bind, JailSpec
from secvf.machine.plan import MachinePlan
from secvf.model.config import NetworkMode, VMConfig
from secvf.store.bundle import RuntimeFiles

#: Device nodes every jailed process gets (QEMU adds /dev/kvm when it uses KVM).
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
JAIL_NAMESPACES = ["mount", "pid", "ipc", "net"]


@dataclass(frozen=True)
class JailContext:
    """What the specs of one VM's run share."""

    identity: JailIdentity | None  # None: SecVF is not root (a user namespace instead)
    cgroup_procs: tuple[str, ...]  # the VM cgroup's cgroup.procs files (empty: none)
    root: Path  # an empty directory the jails' roots are mounted on

    def _spec(self, name: str, **fields: object) -> JailSpec:
        ids = self.identity
        return JailSpec(name=name, cgroup_procs=list(self.cgroup_procs),
                        uid=ids.uid if ids else None, gid=ids.gid if ids else None,
                        user_namespace=ids is None, **fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class QemuFiles:
    """The host files one run's QEMU opens by path."""

    writable: tuple[Path, ...]  # the disk's top layer, serial logs, RAM file
    readable: tuple[Path, ...]  # lower disk layers, kernel, initrd, a boot ISO


def qemu_spec(ctx: JailContext, plan: MachinePlan, files: RuntimeFiles,
              qemu_files: QemuFiles, serial_logs: Sequence[tuple[Path, Path]]) -> JailSpec:
    """QEMU's jail. ``serial_logs`` pairs the path QEMU is given with the file it is
    (a bundle's ``serial.log`` is a symlink to the run's log)."""
    binds = [Bind(str(files.vm_dir), str(files.vm_dir), writable=True)]
    binds += [Bind(str(p.resolve()), str(p), writable=True) for p in qemu_files.writable]
    binds += [Bind(str(p.resolve()), str(p)) for p in qemu_files.readable]
    binds += [Bind(str(real), str(given), writable=True) for given, real in serial_logs]
    binds += [Bind(str(port.netdir / "p"), str(port.netdir / "p"), writable=True)
              for port in plan.switch_ports]
    devices = [*DEVICES, *(["/dev/kvm"] if plan.accel == "kvm" else [])]
    return ctx._spec("qemu", namespaces=qemu_namespaces(plan.vm), root=str(ctx.root),
                     binds=binds, devices=devices)


def qemu_namespaces(config: VMConfig) -> list[str]:
    """The namespaces of ``config``'s QEMU: all of :data:`JAIL_NAMESPACES`, but the
    host's network for a NAT NIC (QEMU's own user-mode network stack needs it)."""
    nat = any(nic.mode is NetworkMode.NAT for nic in config.nics)
    return [n for n in JAIL_NAMESPACES if not (n == "net" and nat)]


def python_binds() -> list[Bind]:
    """The Python that runs SecVF, and SecVF's code, read-only."""
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix),
             Path(secvf.__file__).resolve().parent.parent}
    outside_usr = sorted(r for r in roots if not r.is_relative_to("/usr"))
    return [Bind(str(r.resolve()), str(r)) for r in outside_usr]


def vsock_spec(ctx: JailContext, files: RuntimeFiles) -> JailSpec:
    """The vsock backend's jail: its runtime directory, Python, and the helper filter."""
    binds = [Bind(str(files.vm_dir), str(files.vm_dir), writable=True), *python_binds()]
    return ctx._spec("vsock", namespaces=list(JAIL_NAMESPACES), root=str(ctx.root),
                     binds=binds, devices=list(DEVICES), seccomp="helper")


def share_server_spec(ctx: JailContext, name: str) -> JailSpec:
    """A virtiofsd's jail: the cgroup and, as root, an IPC namespace. Its capabilities
    stay: its chain mounts the share and makes the user namespace, where the share
    launcher and virtiofsd's own sandbox do the rest (without root, ``newuidmap`` must still be
    able to run, so no ``no_new_privs`` before it — the share launcher sets it)."""
    as_root = ctx.identity is not None
    return JailSpec(name=name, cgroup_procs=list(ctx.cgroup_procs),
                    namespaces=["ipc"] if as_root else [], no_new_privs=as_root,
                    drop_capabilities=False)


def jailed_argv(spec: JailSpec, argv: Sequence[str]) -> list[str]:
    """``argv`` run through the jail launcher (its program made an absolute path)."""
    program = argv[0] if argv[0].startswith("/") else (shutil.which(argv[0]) or argv[0])
    return [sys.executable, "-m", "secvf.jail.launcher", "--spec", spec.to_json(), "--",
            program, *argv[1:]]


__all__ = ["DEVICES", "JailContext", "QemuFiles", "jailed_argv", "python_binds",
           "qemu_namespaces", "qemu_spec", "share_server_spec", "vsock_spec"]
