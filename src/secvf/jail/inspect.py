"""What a running process's confinement actually is, read from ``/proc`` (for ``secvf
audit``, ``vm status`` and the tests)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

LAUNCHER_MODULE = "secvf.jail.launcher"


@dataclass(frozen=True)
class ProcessJail:
    """One process's identity, capabilities, filters and namespaces."""

    pid: int
    uid: int
    gid: int
    cap_eff: int
    no_new_privs: bool
    seccomp: int  # 0 none, 1 strict, 2 filter
    own_namespaces: list[str]  # of mnt, pid, ipc, net, user: those not the reader's own
    cgroups: list[str]  # "hierarchy:path" lines of /proc/PID/cgroup

    def to_json(self) -> dict[str, Any]:
        """The JSON-able dict audit prints."""
        return asdict(self)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def read_process(pid: int) -> ProcessJail:
    """The confinement of process ``pid``.

    Raises:
        OSError: it is gone, or /proc cannot be read.
    """
    status = _status(pid)
    own = []
    for ns in ("mnt", "pid", "ipc", "net", "user"):
        try:
            if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                own.append(ns)
        except OSError:
            continue
    with open(f"/proc/{pid}/cgroup") as f:
        cgroups = [line.split(":", 1)[1] for line in f.read().splitlines() if ":" in line]
    return ProcessJail(pid=pid, uid=int(status["Uid"].split()[1]),
                       gid=int(status["Gid"].split()[1]),
                       cap_eff=int(status["CapEff"].strip(), 16),
                       no_new_privs=status.get("NoNewPrivs", "0").strip() == "1",
                       seccomp=int(status.get("Seccomp", "0").strip()), own_namespaces=own,
                       cgroups=cgroups)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _is_launcher(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return LAUNCHER_MODULE.encode() in f.read()
    except OSError:
        return False


def jailed_pid(pid: int) -> int:
    """The process a jail launcher ``pid`` runs (itself if it is not a launcher, or
    while its child does not exist yet)."""
    while _is_launcher(pid):
        children = _children(pid)
        if not children:
            return pid
        pid = children[0]
    return pid


__all__ = ["ProcessJail", "jailed_pid", "read_process"]
