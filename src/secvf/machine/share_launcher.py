"""The share launcher: run one share's virtiofsd in its id-mapped user namespace.

``python -m secvf.machine.share_launcher --uid-map IN:OUT:N ... --gid-map IN:OUT:N ...
-- COMMAND...`` raises its open-files limit (virtiofsd holds a descriptor for every
file the guest has looked up), creates a user namespace, has the maps written from the
parent namespace (so a map may name several ranges: the invoking user plus its
subordinate ids, or, as root, the VM's jail block — root writes ``/proc/PID/uid_map``
itself, others run ``newuidmap``/``newgidmap``), becomes root of the namespace, re-arms the
parent-death signal that the identity change cleared, installs the seccomp filter of
:mod:`secvf.machine.seccomp`, and execs ``COMMAND``.

:mod:`secvf.machine.shares` builds the command line (and the id map); the supervisor
runs it as a device helper. Standard library only, besides the filter module.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence

from secvf.machine.seccomp import install_share_filter

CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
#: Open files a share server may hold: one per file the guest knows, so a workspace with
#: a node_modules or a git object store needs hundreds of thousands. The C virtiofsd
#: raises its own limit, but inside the user namespace it may not (EPERM), and past the
#: limit the guest's opens and lookups fail with EMFILE.
OPEN_FILES_WANTED = 1 << 20


def parse_range(text: str) -> tuple[int, int, int]:
    """``INSIDE:OUTSIDE:COUNT`` → a map line's three numbers."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[2]) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not INSIDE:OUTSIDE:COUNT")
    return int(parts[0]), int(parts[1]), int(parts[2])


def raise_open_file_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise ``RLIMIT_NOFILE`` towards ``wanted`` (capped by ``fs.nr_open``): both limits
    with ``CAP_SYS_RESOURCE`` (SecVF as root, before the user namespace), else the soft
    limit up to the hard one. Return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            wanted = min(wanted, int(fh.read()))
    except (OSError, ValueError):
        pass
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (OSError, ValueError):
            pass  # no CAP_SYS_RESOURCE: the hard limit stands
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def enter_user_namespace(uid_map: Sequence[tuple[int, int, int]],
                         gid_map: Sequence[tuple[int, int, int]]) -> None:
    """Move this (single-threaded) process into a new user namespace with these maps
    and make it the namespace's root (uid and gid 0, all capabilities in it).

    Raises:
        OSError: the namespace or its maps could not be made.
    """
    ready_read, ready_write = os.pipe()
    pid = os.getpid()
    writer = os.fork()
    if writer == 0:  # stays in the parent namespace: the maps are written from there
        os.close(ready_write)
        ok = os.read(ready_read, 1) == b"1" and all(
            _write_map(tool, pid, ranges)
            for tool, ranges in (("newuidmap", uid_map), ("newgidmap", gid_map)))
        os._exit(0 if ok else 1)
    os.close(ready_read)
    libc = ctypes.CDLL(None, use_errno=True)
    unshared = libc.unshare(ctypes.c_int(CLONE_NEWUSER)) == 0
    unshare_errno = ctypes.get_errno()
    os.write(ready_write, b"1" if unshared else b"0")
    os.close(ready_write)
    _, status = os.waitpid(writer, 0)
    if not unshared:
        raise OSError(unshare_errno, f"unshare(CLONE_NEWUSER): {os.strerror(unshare_errno)}")
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"newuidmap/newgidmap could not map {list(uid_map)} / {list(gid_map)}")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _write_map(tool: str, pid: int, ranges: Sequence[tuple[int, int, int]]) -> bool:
    """Write one id map of process ``pid``: root writes ``/proc/PID/{u,g}id_map`` itself
    (any ids: a VM's jail block), others run ``newuidmap``/``newgidmap`` (their
    ``/etc/subuid`` ranges)."""
    if os.getuid() == 0:
        name = "uid_map" if tool == "newuidmap" else "gid_map"
        try:
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("".join(f"{a} {b} {c}\n" for a, b, c in ranges))
            return True
        except OSError as exc:
            print(f"secvf share launcher: writing {name}: {exc}", file=sys.stderr)
            return False
    return subprocess.run([_tool(tool), str(pid), *(str(n) for line in ranges for n in line)],
                          check=False).returncode == 0


def _tool(name: str) -> str:
    return shutil.which(name) or name


def die_with(parent: int) -> None:
    """Get SIGKILL when ``parent`` dies (changing identity cleared that); exit now if
    it is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL),
               ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if os.getppid() != parent:
        sys.exit("secvf share launcher: parent exited")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, enter the namespace, install the filter, exec."""
    parser = argparse.ArgumentParser(prog="python -m secvf.machine.share_launcher")
    parser.add_argument("--uid-map", type=parse_range, action="append", required=True)
    parser.add_argument("--gid-map", type=parse_range, action="append", required=True)
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    parent = os.getppid()
    try:
        raise_open_file_limit()
        enter_user_namespace(args.uid_map, args.gid_map)
        die_with(parent)
        install_share_filter()
        os.execvp(args.command[0], args.command)
    except OSError as exc:
        sys.exit(f"secvf share launcher: {exc}")


if __name__ == "__main__":
    main()
