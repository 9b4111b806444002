"""A VM bundle: the directory ``$SECVF_HOME/vms/<name>/`` and the runtime files of one VM.

Persistent files (in the bundle): ``vm.json``, ``disk.qcow2``, one serial log per run
(``serial-<N>.log``, the last :data:`SERIAL_RUNS_KEPT` runs, with ``serial.log`` a
symlink to the current or last one), ``supervisor.log``, ``last_run.json`` and the lock
files.
Runtime files (in the private runtime dir, named by the VM's UUID so a rename
never confuses a running VM): QMP socket, console socket, VNC socket, supervisor
control socket, runtime state, vsock and exec-bridge sockets.

Finding a VM's bundle by name (:func:`get_bundle`) and the paths here need neither
pydantic nor the rest of the library, so a command as small as ``vm exec`` can use
them; :meth:`Bundle.load` imports the ``vm.json`` schema when it is called.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from secvf.errors import NotFound
from secvf.model.names import validate_name
from secvf.store import paths

if TYPE_CHECKING:
    from secvf.model.config import VMConfig

#: How many runs' serial logs a VM keeps (the current run's included).
SERIAL_RUNS_KEPT = 5

_RUN_LOG = re.compile(r"^serial-(?P<run>[1-9][0-9]*)\.log$")


@dataclass(frozen=True)
class RuntimeFiles:
    """Paths of a VM's runtime files (they exist only while it runs)."""

    vm_id: str  # the VM's UUID

    @property
    def dir(self) -> Path:
        """The private runtime directory shared by all VMs of this user."""
        return paths.runtime_dir()

    @property
    def vm_dir(self) -> Path:
        """This VM's own directory in the runtime directory, for the sockets QEMU and the
        device helpers create: a jailed VM sees this directory and none of the others."""
        return self.dir / f"vm-{self.vm_id}"

    def _path(self, prefix: str, suffix: str) -> Path:
        return self.dir / f"{prefix}-{self.vm_id}{suffix}"

    def _own(self, prefix: str, suffix: str) -> Path:
        return self.vm_dir / f"{prefix}{suffix}"  # short: a socket path has 108 bytes

    @property
    def qmp_socket(self) -> Path:
        """QEMU's QMP socket (only the supervisor connects)."""
        return self._own("qmp", ".sock")

    @property
    def console_socket(self) -> Path:
        """Serial console socket (absent for malware-analysis VMs: output-only)."""
        return self._own("console", ".sock")

    @property
    def vnc_socket(self) -> Path:
        """The VNC server of the VM's graphical console (``--display vnc`` only), 0600."""
        return self._own("vnc", ".sock")

    @property
    def control_socket(self) -> Path:
        """The supervisor's control socket (stop, status)."""
        return self._path("ctl", ".sock")

    @property
    def state_file(self) -> Path:
        """The supervisor's runtime state (JSON)."""
        return self._path("state", ".json")

    @property
    def vsock_socket(self) -> Path:
        """Hybrid vsock socket of the userspace vsock backend (AI sandbox only)."""
        return self._own("vsock", ".sock")

    @property
    def vhost_vsock_socket(self) -> Path:
        """vhost-user socket between QEMU and the vsock backend (AI sandbox only)."""
        return self._own("vsock-backend", ".sock")

    @property
    def exec_socket(self) -> Path:
        """The exec bridge socket ``secvf-exec-<UUID>.sock`` (AI sandbox only)."""
        return self.dir / f"secvf-exec-{self.vm_id}.sock"

    @property
    def ram_file(self) -> Path:
        """The guest's RAM, a file on a memory filesystem (:func:`secvf.store.paths.ram_dir`)."""
        return paths.ram_dir() / f"ram-{self.vm_id}"

    @property
    def helper_events(self) -> Path:
        """Where a jailed device helper writes its security events (an event log
        directory the supervisor relays into the security log)."""
        return self.vm_dir / "events"

    def virtiofs_socket(self, tag: str) -> Path:
        """vhost-user socket of the virtiofsd serving share ``tag``."""
        return self._own(f"virtiofs-{tag}", ".sock")

    def all_files(self) -> list[Path]:
        """Every runtime path this VM may create (globbing vsock side sockets too)."""
        fixed = [
            self.qmp_socket, self.console_socket, self.vnc_socket, self.control_socket,
            self.state_file,
            self.vsock_socket, self.vhost_vsock_socket, self.exec_socket, self.ram_file,
        ]
        extra = sorted(self.vm_dir.glob("virtiofs-*.sock"))
        extra += sorted(self.vm_dir.glob("vsock.sock_*"))
        extra += sorted(self.helper_events.glob("*"))
        return fixed + extra


@dataclass(frozen=True)
class Bundle:
    """One VM's directory in the library."""

    path: Path  # $SECVF_HOME/vms/<name>

    @property
    def name(self) -> str:
        """The VM's name (its directory name)."""
        return self.path.name

    @property
    def config_file(self) -> Path:
        """``vm.json``."""
        return self.path / "vm.json"

    @property
    def disk(self) -> Path:
        """The VM's qcow2 disk (an overlay over its base image, or a blank disk)."""
        return self.path / "disk.qcow2"

    @property
    def serial_log(self) -> Path:
        """What the guest wrote to its serial console in the current (or last) run: a
        symlink to that run's :meth:`run_serial_log` (a regular file in bundles from
        before per-run logs, until the next start)."""
        return self.path / "serial.log"

    @property
    def monitor_log(self) -> Path:
        """What a malware-analysis guest wrote to its second serial port (ttyS1): the
        detonator's monitor log (``secvf analyze``); QEMU appends to it."""
        return self.path / "monitor.log"

    def run_serial_log(self, run: int) -> Path:
        """The serial log of run ``run`` (runs are numbered from 1, one per start)."""
        return self.path / f"serial-{run}.log"

    def serial_runs(self) -> list[int]:
        """The runs whose serial logs are kept, oldest first."""
        runs = (_RUN_LOG.match(p.name) for p in self.path.glob("serial-*.log"))
        return sorted(int(m["run"]) for m in runs if m)

    def current_run(self) -> int | None:
        """The run ``serial.log`` points at (the current or last one); None before the
        first run with per-run logs."""
        try:
            match = _RUN_LOG.match(os.readlink(self.serial_log))
        except OSError:
            return None
        return int(match["run"]) if match else None

    def begin_serial_run(self) -> int:
        """Start the serial log of a new run and return its number (the supervisor's job,
        holding ``run.lock``).

        The new ``serial-<N>.log`` is created empty (0600, never through a symlink),
        ``serial.log`` is pointed at it atomically, and the logs of all but the last
        :data:`SERIAL_RUNS_KEPT` runs are removed. A ``serial.log`` that is a regular
        file (a bundle from before per-run logs) is kept as the run before this one.

        Raises:
            OSError: the bundle directory cannot be written.
        """
        runs = self.serial_runs()
        run = max(runs, default=0) + 1
        if self.serial_log.is_file() and not self.serial_log.is_symlink():
            self.serial_log.rename(self.run_serial_log(run))
            runs.append(run)
            run += 1
        fd = os.open(self.run_serial_log(run),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        link = self.path / f".serial.log.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(self.run_serial_log(run).name)
        os.replace(link, self.serial_log)
        for old in runs[:max(len(runs) + 1 - SERIAL_RUNS_KEPT, 0)]:
            with contextlib.suppress(FileNotFoundError):
                self.run_serial_log(old).unlink()
        return run

    @property
    def supervisor_log(self) -> Path:
        """The supervisor's log (and the stderr of QEMU and helpers)."""
        return self.path / "supervisor.log"

    @property
    def last_run_file(self) -> Path:
        """How the last run ended (stopped or crashed, and why)."""
        return self.path / "last_run.json"

    @property
    def edit_lock(self) -> Path:
        """Lock held by commands that change the VM."""
        return self.path / ".lock"

    @property
    def run_lock(self) -> Path:
        """Lock held by the supervisor while the VM runs."""
        return self.path / "run.lock"

    def load(self) -> VMConfig:
        """Read and validate ``vm.json`` (see :func:`secvf.model.config.load_config`)."""
        from secvf.model.config import load_config  # pydantic: only for who reads vm.json

        return load_config(self.config_file)


def bundle_for(name: str) -> Bundle:
    """Return the bundle of VM ``name`` (validating the name; the VM may not exist)."""
    return Bundle(paths.vms_dir() / validate_name(name))


def get_bundle(name: str) -> Bundle:
    """Return the bundle of an existing VM: a directory in the library, usable or not
    (so that ``vm delete`` can remove one without a valid ``vm.json``).

    Raises:
        InvalidName: the name is not valid. NotFound: no such VM.
    """
    bundle = bundle_for(name)
    if not bundle.path.is_dir() or bundle.path.is_symlink():
        raise NotFound(f"no VM named '{name}' (see: secvf vm list)")
    return bundle
