"""What the jail launcher builds for one process: the data it gets on its command line.

Standard library only: :mod:`secvf.jail.launcher` reads it before anything else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

#: Namespaces a jailed process can get (``unshare`` flags by name).
NAMESPACE_FLAGS = {"mount": 0x00020000, "ipc": 0x08000000, "net": 0x40000000,
                   "pid": 0x20000000}


@dataclass(frozen=True)
class Bind:
    """One host path shown in the jail at ``target`` (same path as on the host, as a
    rule, so command lines need no rewriting)."""

    source: str  # the host path (resolved: a file, a directory or a device node)
    target: str  # where it appears in the jail
    writable: bool = False


@dataclass(frozen=True)
class JailSpec:
    """How to confine one process.

    ``uid``/``gid`` None keeps the caller's identity: when SecVF does not run as root, the
    jail is a user namespace in which the caller's ids map to themselves
    (``user_namespace``), with the other namespaces owned by it.
    """

    name: str  # what runs, for messages ("qemu", "vsock", "virtiofsd-workspace")
    cgroup_procs: list[str] = field(default_factory=list)  # cgroup.procs files to join
    uid: int | None = None
    gid: int | None = None
    user_namespace: bool = False
    namespaces: list[str] = field(default_factory=list)  # keys of NAMESPACE_FLAGS
    root: str | None = None  # an empty host directory the jail's root is mounted on
    binds: list[Bind] = field(default_factory=list)  # what the root shows (with ``root``)
    devices: list[str] = field(default_factory=list)  # /dev nodes shown (with ``root``)
    seccomp: str | None = None  # "helper": the filter of :mod:`secvf.jail.seccomp`
    no_new_privs: bool = True
    # False for a process that must set up its own sandbox as root (virtiofsd's chain)
    drop_capabilities: bool = True

    def to_json(self) -> str:
        """The spec as one JSON text (the launcher's ``--spec``)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JailSpec:
        """Parse :meth:`to_json`'s output.

        Raises:
            ValueError: not a spec (bad JSON, unknown field or namespace, bad types).
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a jail spec is a JSON object")
        binds = [Bind(**b) for b in data.pop("binds", [])]
        spec = cls(**data, binds=binds)
        unknown = set(spec.namespaces) - set(NAMESPACE_FLAGS)
        if unknown:
            raise ValueError(f"unknown namespaces {sorted(unknown)}")
        if (spec.uid is None) != (spec.gid is None):
            raise ValueError("a jail spec gives both uid and gid, or neither")
        if spec.binds and spec.root is None:
            raise ValueError("binds need a root")
        return spec


__all__ = ["NAMESPACE_FLAGS", "Bind", "JailSpec"]
