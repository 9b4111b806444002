"""One run's jail: the VM's identity and cgroup, and the files its QEMU opens made its own.

The supervisor opens it before the machine starts (:meth:`VmJail.open`), runs QEMU and
each device helper through :func:`~secvf.jail.view.jailed_argv` with the specs of
:mod:`secvf.jail.view`, and closes it when the run ends (the cgroup is removed; the
identity stays the VM's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from secvf.errors import ConfigError
from secvf.jail.cgroup import CgroupUnavailable, VmCgroup, create_vm_cgroup
from secvf.jail.identity import JailIdentity, claim_identity
from secvf.jail.settings import JailSettings, load_settings
from secvf.jail.view import (
    JailContext,
    QemuFiles,
    jailed_argv,
    qemu_namespaces,
    qemu_spec,
    share_server_spec,
    vsock_spec,
)
from secvf.machine.plan import MachinePlan
from secvf.model.config import VMConfig
from secvf.model.runtime import JailInfo, JailLimits, JailUsage
from secvf.store import paths
from secvf.store.bundle import Bundle, RuntimeFiles

log = logging.getLogger(__name__)


def make_vm_dir(files: RuntimeFiles, identity: JailIdentity | None) -> Path:
    """Create the VM's runtime directory and its helpers' event spool (0700), owned by
    its jail identity if any."""
    for directory in (files.vm_dir, files.helper_events):
        directory.mkdir(mode=0o700, exist_ok=True)
        if identity is not None:
            os.chown(directory, identity.uid, identity.gid)
    return files.vm_dir


@dataclass
class VmJail:
    """The jail of one run of one VM."""

    config: VMConfig
    files: RuntimeFiles
    settings: JailSettings
    identity: JailIdentity | None  # None: SecVF is not root
    cgroup: VmCgroup | None
    cgroup_problem: str | None  # why there is no cgroup

    @classmethod
    def open(cls, config: VMConfig, bundle: Bundle, files: RuntimeFiles) -> VmJail | None:
        """The run's jail (None: jails are off in ``config/jail.json``).

        Raises:
            ConfigError: the settings are invalid, or no identity is free.
        """
        settings = load_settings()
        if not settings.enabled:
            return None
        identity = claim_identity(config.id, bundle.path) if os.geteuid() == 0 else None
        cgroup, problem = None, None
        try:
            cgroup = create_vm_cgroup(config.id, settings.limits(config))
        except CgroupUnavailable as exc:
            problem = str(exc)
            log.warning("VM %s runs without a cgroup: %s", config.name, problem)
        return cls(config, files, settings, identity, cgroup, problem)

    @property
    def context(self) -> JailContext:
        """What the process specs of this run share."""
        root = paths.runtime_dir() / "jail-root"
        root.mkdir(mode=0o700, exist_ok=True)
        procs = tuple(str(p) for p in self.cgroup.procs_files) if self.cgroup else ()
        return JailContext(self.identity, procs, root)

    def give(self, writable: Iterable[Path], readable: Iterable[Path]) -> None:
        """Make ``writable`` the VM identity's (0600) and check it can read ``readable``.

        Raises:
            ConfigError: a read-only file is outside SecVF's own files and others
                cannot read it (SecVF does not change the mode of your files).
        """
        if self.identity is None:
            return
        for path in writable:
            os.chown(path, self.identity.uid, self.identity.gid)
        home = paths.secvf_home().resolve()
        for path in readable:
            real = path.resolve()
            mode = real.stat().st_mode
            if mode & stat.S_IROTH:
                continue
            if not real.is_relative_to(home):
                raise ConfigError(f"VM '{self.config.name}' runs as an unprivileged uid that "
                                  f"cannot read {real}: make it readable (chmod o+r), or "
                                  "import it into SecVF (secvf iso add)")
            os.chmod(real, stat.S_IMODE(mode) | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)

    def qemu_argv(self, argv: list[str], plan: MachinePlan, qemu_files: QemuFiles,
                  serial_logs: list[tuple[Path, Path]]) -> list[str]:
        """QEMU's command line run in its jail; its files made the VM identity's first.

        Raises:
            ConfigError: QEMU could not read a file it needs (see :meth:`give`).
        """
        self.give([*qemu_files.writable, *(real for _, real in serial_logs)],
                  qemu_files.readable)
        return jailed_argv(qemu_spec(self.context, plan, self.files, qemu_files, serial_logs),
                           argv)

    def helper_argv(self, name: str, argv: list[str]) -> list[str]:
        """Device helper ``name``'s command line run in its jail."""
        if name == "vsock":
            return jailed_argv(vsock_spec(self.context, self.files), argv)
        return jailed_argv(share_server_spec(self.context, name), argv)

    def info(self) -> JailInfo:
        """The jail as the runtime record shows it."""
        ids = self.identity
        limits = self.settings.limits(self.config)
        return JailInfo(
            uid=ids.uid if ids else os.getuid(), gid=ids.gid if ids else os.getgid(),
            slot=ids.slot if ids else None, user_namespace=ids is None,
            namespaces=qemu_namespaces(self.config),
            cgroup=[str(d) for d in self.cgroup.dirs] if self.cgroup else [],
            cgroup_version=self.cgroup.version if self.cgroup else None,
            cgroup_problem=self.cgroup_problem,
            limits=JailLimits(memory_bytes=limits.memory_bytes, pids_max=limits.pids_max,
                              cpu_quota_us=limits.cpu_quota_us,
                              cpu_period_us=limits.cpu_period_us) if self.cgroup else None)

    def oom_kills(self) -> int:
        """How many processes the cgroup's memory limit killed (0 without a cgroup)."""
        if self.cgroup is None:
            return 0
        try:
            return self.cgroup.usage().oom_kills
        except OSError:
            return 0

    def close(self) -> None:
        """Remove the cgroup (killing what is left in it)."""
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except OSError as exc:
                log.warning("cannot remove cgroup of VM %s: %s", self.config.name, exc)


def live_usage(cgroup: VmCgroup | None) -> JailUsage | None:
    """A cgroup's current use (None: no cgroup, or it is gone)."""
    if cgroup is None:
        return None
    with contextlib.suppress(OSError):
        use = cgroup.usage()
        return JailUsage(memory_bytes=use.memory_bytes, memory_peak_bytes=use.memory_peak_bytes,
                         pids=use.pids, cpu_usage_us=use.cpu_usage_us, oom_kills=use.oom_kills)
    return None


__all__ = ["VmJail", "live_usage", "make_vm_dir"]
