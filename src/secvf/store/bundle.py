"""A VM bundle: the directory ``$SECVF_HOME/vms/<name>/`` and the runtime files of one VM.

Persistent files (in the bundle): ``vm.json``, ``disk.qcow2``, ``serial.log``,
``supervisor.log``, ``last_run.json`` and the two lock files.
Runtime files (in the private runtime dir, named by the VM's UUID so a rename
never confuses a running VM): QMP socket, console socket, supervisor control
socket, runtime state, vsock and exec-bridge sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from secvf.model.config import VMConfig, load_config
from secvf.store import paths


@dataclass(frozen=True)
class RuntimeFiles:
    """Paths of a VM's runtime files (they exist only while it runs)."""

    vm_id: str  # the VM's UUID

    @property
    def dir(self) -> Path:
        """The private runtime directory shared by all VMs of this user."""
        return paths.runtime_dir()

    def _path(self, prefix: str, suffix: str) -> Path:
        return self.dir / f"{prefix}-{self.vm_id}{suffix}"

    @property
    def qmp_socket(self) -> Path:
        """QEMU's QMP socket (only the supervisor connects)."""
        return self._path("qmp", ".sock")

    @property
    def console_socket(self) -> Path:
        """Serial console socket (absent for malware-analysis VMs: output-only)."""
        return self._path("console", ".sock")

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
        return self._path("vsock", ".sock")

    @property
    def vhost_vsock_socket(self) -> Path:
        """vhost-user socket between QEMU and the vsock backend (AI sandbox only)."""
        return self._path("vsock-backend", ".sock")

    @property
    def exec_socket(self) -> Path:
        """The exec bridge socket ``secvf-exec-<UUID>.sock`` (AI sandbox only)."""
        return self.dir / f"secvf-exec-{self.vm_id}.sock"

    def virtiofs_socket(self, tag: str) -> Path:
        """vhost-user socket of the virtiofsd serving share ``tag``."""
        return self._path(f"virtiofs-{tag}", ".sock")

    def all_files(self) -> list[Path]:
        """Every runtime path this VM may create (globbing vsock side sockets too)."""
        fixed = [
            self.qmp_socket, self.console_socket, self.control_socket, self.state_file,
            self.vsock_socket, self.vhost_vsock_socket, self.exec_socket,
        ]
        extra = sorted(self.dir.glob(f"virtiofs-*-{self.vm_id}.sock"))
        extra += sorted(self.dir.glob(f"vsock-{self.vm_id}.sock_*"))
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
        """Everything the guest wrote to its serial console."""
        return self.path / "serial.log"

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
        return load_config(self.config_file)
