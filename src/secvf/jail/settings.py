"""The jail settings: ``$SECVF_HOME/config/jail.json`` (every key optional).

``{"enabled": true, "memory_overhead_mib": 512, "pids_max": 1024, "cpu_extra": 1}``

* ``enabled``: jail every VM's host processes (default). Off, they run as SecVF does
  and ``secvf audit`` reports every VM started that way as a finding.
* ``memory_overhead_mib``: a VM's memory limit is its guest RAM plus this, for QEMU
  itself (under TCG its translated-code cache is most of it), the device helpers and
  the jail launchers. Under TCG a 1-vCPU sandbox used 150-250 MiB beside its RAM
  (docs/security.md, "Limits").
* ``pids_max``: processes and threads of the VM's cgroup.
* ``cpu_extra``: CPUs the VM may use beyond its vCPUs (QEMU's I/O and helper threads).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from secvf.jail.cgroup import CgroupLimits
from secvf.model.config import VMConfig
from secvf.model.runtime import read_settings
from secvf.store import paths

CONFIG_FILE = "jail.json"


class JailSettings(BaseModel):
    """What ``config/jail.json`` says (defaults for what it leaves out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    memory_overhead_mib: int = Field(default=512, ge=0, le=1 << 20)
    pids_max: int = Field(default=1024, ge=16, le=1 << 22)
    cpu_extra: int = Field(default=1, ge=0, le=1024)

    def limits(self, config: VMConfig) -> CgroupLimits:
        """The cgroup limits of VM ``config``."""
        return CgroupLimits(memory_bytes=(config.memory_mib + self.memory_overhead_mib) << 20,
                            pids_max=self.pids_max,
                            cpu_quota_us=(config.cpus + self.cpu_extra) * 100_000)


def settings_path() -> Path:
    """``$SECVF_HOME/config/jail.json``."""
    return paths.settings_file(CONFIG_FILE)


def load_settings() -> JailSettings:
    """The settings in force (defaults when the file does not exist).

    Raises:
        ConfigError: the file is unreadable or not valid settings.
    """
    return read_settings(JailSettings, settings_path())


__all__ = ["CONFIG_FILE", "JailSettings", "load_settings", "settings_path"]
