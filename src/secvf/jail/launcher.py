"""The jail launcher: ``python -m secvf.jail.launcher --spec JSON -- COMMAND...``.

Run by the supervisor (as the user SecVF runs as) in front of each VM host process;
what it does, in order:

1. joins the VM's cgroup (writes its pid to each ``cgroup.procs`` of the spec);
2. when SecVF is not root, enters a new user namespace in which the caller's uid and
   gid map to themselves (the other namespaces then belong to it);
3. unshares the spec's namespaces; with a PID namespace it forks: the child is the
   namespace's init and goes on, the parent stays outside, drops the same privileges,
   forwards termination signals to the child and exits with the child's status;
4. with a ``root``: makes every mount private, mounts a small tmpfs on the root
   directory and shows in it only the host's system directories (read-only), the
   spec's device nodes, a fresh ``/proc``, a private ``/tmp`` and the spec's binds
   (``nosuid``, ``nodev``, read-only unless writable) at their own paths; then
   ``pivot_root`` into it, detaches the old root and makes the new one read-only;
5. drops every capability from the bounding set, switches to the spec's uid and gid
   (no supplementary groups) — all capabilities are gone — sets ``no_new_privs``,
   re-arms the parent-death signal the identity change cleared, installs the seccomp
   filter the spec names, and execs ``COMMAND`` (an absolute path).

Standard library only (with :mod:`secvf.jail.spec` and the filter module).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Sequence

from secvf.jail.spec import NAMESPACE_FLAGS, Bind, JailSpec

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
#: statvfs flags a bind must keep when remounted (the kernel refuses to clear locked ones)
_KEPT_FLAGS = ((os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
               (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
               (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
#: Host system trees a jail shows read-only (a symlink, as merged-/usr systems have, is
#: copied as a symlink).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/localtime")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


class JailError(OSError):
    """A step of building the jail failed (the message names it)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise JailError(code, f"{what}: {os.strerror(code)}")


def _prctl(option: int, arg: int, what: str) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                       enc(data)), f"mount {source or fstype or ''} on {target}")


def _unshare(flags: int, what: str) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({what})")


def join_cgroups(procs_files: Sequence[str]) -> None:
    """Move this process into each cgroup whose ``cgroup.procs`` is listed."""
    for path in procs_files:
        try:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:
            raise JailError(exc.errno or 0, f"joining cgroup {path}: {exc.strerror}") from None


def enter_own_user_namespace() -> None:
    """A new user namespace where this process's uid and gid map to themselves."""
    uid, gid = os.getuid(), os.getgid()
    _unshare(CLONE_NEWUSER, "user")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _kept_flags(path: str) -> int:
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _KEPT_FLAGS if f_flag & st)


def _bind(source: str, target: str, flags: int) -> None:
    """Bind ``source`` on ``target`` (made as an empty file or directory first)."""
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    _mount(source, target, None, MS_BIND)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | flags | _kept_flags(source))


def _show_system(root: str) -> None:
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            os.makedirs(root + os.path.dirname(path), mode=0o755, exist_ok=True)
            os.symlink(os.readlink(path), root + path)
        elif os.path.exists(path):
            _bind(path, root + path, MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_root(spec: JailSpec) -> None:
    """Mount the jail's file tree on ``spec.root`` and pivot into it."""
    assert spec.root is not None
    root = spec.root.rstrip("/")
    umask = os.umask(0o022)  # the tree's directories must be passable by the jailed uid
    try:
        _build_tree(spec, root)
    finally:
        os.umask(umask)
    os.chdir(root)
    _pivot(root)


def _build_tree(spec: JailSpec, root: str) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("secvf-jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m")
    _show_system(root)
    os.mkdir(root + "/dev", 0o755)
    _mount("secvf-jail-dev", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for node in spec.devices:
        _bind(node, root + node, MS_NOSUID | MS_NOEXEC)
    os.mkdir(root + "/proc", 0o555)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(root + "/tmp", 0o1777)
    _mount("secvf-jail-tmp", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           "mode=1777,size=16m")
    for bind in spec.binds:
        _show(bind, root)


def _pivot(root: str) -> None:
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise JailError(0, f"no pivot_root system call number for {os.uname().machine}")
    _check(_libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "detaching the old root")
    os.chdir("/")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _show(bind: Bind, root: str) -> None:
    if not bind.target.startswith("/") or "/../" in bind.target + "/":
        raise JailError(0, f"bind target {bind.target!r} is not a clean absolute path")
    flags = MS_NOSUID | MS_NODEV | (0 if bind.writable else MS_RDONLY)
    _bind(bind.source, root + bind.target, flags)


def drop_privileges(spec: JailSpec) -> None:
    """Empty the capability bounding and ambient sets (unless the spec keeps them),
    become the spec's uid and gid, set ``no_new_privs`` and the parent-death signal."""
    if spec.drop_capabilities:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):
            _prctl(_PR_CAPBSET_DROP, cap, f"dropping capability {cap}")
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clearing ambient capabilities")
    if spec.uid is not None and spec.gid is not None:
        os.setgroups([])
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
    if spec.no_new_privs:
        _prctl(_PR_SET_NO_NEW_PRIVS, 1, "setting no_new_privs")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "setting the parent-death signal")


def _wait_for(child: int) -> None:
    """Outside the PID namespace: pass termination signals on, exit as the child did."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def enter(spec: JailSpec) -> None:
    """Steps 1-5 but the exec: on return, this process is the jailed one."""
    join_cgroups(spec.cgroup_procs)
    if spec.user_namespace:
        enter_own_user_namespace()
    flags = sum(NAMESPACE_FLAGS[name] for name in spec.namespaces)
    if flags:
        _unshare(flags, ",".join(spec.namespaces))
    if "pid" in spec.namespaces:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "setting the parent-death signal")
        child = os.fork()
        if child:
            drop_privileges(spec)
            _wait_for(child)
    if spec.root is not None:
        build_root(spec)
    drop_privileges(spec)


def _filter(spec: JailSpec) -> Callable[[], None] | None:
    if spec.seccomp is None:
        return None
    if spec.seccomp != "helper":
        raise JailError(0, f"unknown seccomp filter {spec.seccomp!r}")
    from secvf.jail.seccomp import install_helper_filter

    return install_helper_filter


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, build the jail, exec the command."""
    parser = argparse.ArgumentParser(prog="python -m secvf.jail.launcher")
    parser.add_argument("--spec", required=True, help="the JailSpec as JSON")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    try:
        spec = JailSpec.from_json(args.spec)
    except (ValueError, TypeError) as exc:
        sys.exit(f"secvf jail: bad spec: {exc}")
    if not os.path.isabs(args.command[0]):
        sys.exit(f"secvf jail: {args.command[0]!r} is not an absolute path")
    try:
        install_filter = _filter(spec)  # imported now: the jail may not show its source
        enter(spec)
        if install_filter is not None:
            install_filter()
        os.execv(args.command[0], args.command)
    except OSError as exc:
        sys.exit(f"secvf jail ({spec.name}): {exc}")


if __name__ == "__main__":
    main()
