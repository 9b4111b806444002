"""The seccomp filter that keeps privileged files off the host, for share servers.

Guest uid 1000 is the invoking host user inside a share server's user namespace, so
guest root holds ``CAP_FOWNER`` and ``CAP_FSETID`` over that user's files there and
could mark them setuid or setgid. The ``nosuid`` bind mount virtiofsd serves stops such
bits from working through that mount only; the host sees the same files at their own
path. So each ``virtiofsd`` runs under this filter, which refuses with ``EPERM``:

* ``chmod``, ``fchmod``, ``fchmodat``, ``fchmodat2`` whose mode carries ``S_ISUID`` or
  ``S_ISGID``;
* ``creat``, ``mknod``, ``mknodat``, and ``open``/``openat`` with ``O_CREAT`` or
  ``O_TMPFILE``, whose mode carries those bits;
* ``mknod``/``mknodat`` of a character or block device (a ``0:0`` whiteout included,
  which needs no ``CAP_MKNOD``), and ``renameat2`` with ``RENAME_WHITEOUT``;
* every ``set*xattr`` call: file capabilities and ACLs are privilege-carrying metadata
  too (virtiofsd serves no xattrs by default, so it never makes these calls).

It fails with ``ENOSYS`` (callers fall back to the calls above) ``openat2``, whose mode
sits in a struct a filter cannot read, and ``io_uring_setup``, since io_uring opens and
renames without system calls. A system call of another ABI (i386, x32) kills the
process. ``mkdir``/``mkdirat`` need no rule: the kernel drops ``S_ISUID`` and
``S_ISGID`` from their mode.

Standard library only; filters stack, so virtiofsd's own filter still applies.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# classic BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h)
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
JSET_K = 0x45
AND_K = 0x54
RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
OFFSET_NR = 0
OFFSET_ARCH = 4
OFFSET_ARGS = 16  # args[i]'s low 32 bits on a little-endian ABI: 16 + 8 * i
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

PRIVILEGED_MODE_BITS = stat.S_ISUID | stat.S_ISGID
CREATING_OPEN_FLAGS = os.O_CREAT | 0o20000000  # O_CREAT | __O_TMPFILE (x86-64, asm-generic)
RENAME_WHITEOUT = 4
FILE_TYPE_MASK = 0o170000  # S_IFMT
_X32_SYSCALL_BIT = 0x40000000


@dataclass(frozen=True)
class Arch:
    """A system-call ABI: its ``AUDIT_ARCH_*`` value and the numbers of the system calls
    that this filter or :mod:`secvf.jail.seccomp` names (a name it lacks: no such call)."""

    audit_arch: int
    syscalls: dict[str, int]
    x32_bit: bool  # the ABI has x32 calls (same audit arch, bit 30 set in the number)


ARCHES = {
    "x86_64": Arch(0xC000003E, {
        "open": 2, "clone": 56, "execve": 59, "creat": 85, "chmod": 90, "fchmod": 91,
        "ptrace": 101, "syslog": 103, "setuid": 105, "setgid": 106, "setreuid": 113,
        "setregid": 114, "setgroups": 116, "setresuid": 117, "setresgid": 119, "setfsuid": 122,
        "setfsgid": 123, "capset": 126, "mknod": 133, "uselib": 134, "personality": 135,
        "vhangup": 153, "pivot_root": 155, "adjtimex": 159, "chroot": 161, "acct": 163,
        "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
        "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
        "quotactl": 179, "nfsservctl": 180, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
        "lookup_dcookie": 212, "clock_settime": 227, "kexec_load": 246, "add_key": 248,
        "request_key": 249, "keyctl": 250, "openat": 257, "mknodat": 259, "fchmodat": 268,
        "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
        "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313,
        "renameat2": 316, "kexec_file_load": 320, "bpf": 321, "execveat": 322, "userfaultfd": 323,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "clone3": 435, "openat2": 437, "pidfd_getfd": 438, "mount_setattr": 442, "fchmodat2": 452,
        "setxattrat": 463}, x32_bit=True),
    "aarch64": Arch(0xC00000B7, {
        "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "lookup_dcookie": 18, "mknodat": 33,
        "umount2": 39, "mount": 40, "pivot_root": 41, "nfsservctl": 42, "chroot": 51, "fchmod": 52,
        "fchmodat": 53, "openat": 56, "vhangup": 58, "quotactl": 60, "acct": 89, "capset": 91,
        "personality": 92, "unshare": 97, "kexec_load": 104, "init_module": 105,
        "delete_module": 106, "clock_settime": 112, "syslog": 116, "ptrace": 117, "reboot": 142,
        "setregid": 143, "setgid": 144, "setreuid": 145, "setuid": 146, "setresuid": 147,
        "setresgid": 149, "setfsuid": 151, "setfsgid": 152, "setgroups": 159, "settimeofday": 170,
        "adjtimex": 171, "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220,
        "execve": 221, "swapon": 224, "swapoff": 225, "perf_event_open": 241,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268, "process_vm_readv": 270,
        "process_vm_writev": 271, "finit_module": 273, "renameat2": 276, "bpf": 280,
        "execveat": 281, "userfaultfd": 282, "kexec_file_load": 294, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
        "openat2": 437, "pidfd_getfd": 438, "mount_setattr": 442, "fchmodat2": 452,
        "setxattrat": 463}, x32_bit=False),
}

# (code, k, jump-if-true label, jump-if-false label); None falls through to the next
# instruction
Insn = tuple[int, int, str | None, str | None]
# assembled: (code, jt, jf, k), the jumps as offsets, as in struct sock_filter
Program = list[tuple[int, int, int, int]]


def load_arg(index: int) -> Insn:
    """Load the low 32 bits of the call's argument ``index`` into A."""
    return (LD_W_ABS, OFFSET_ARGS + 8 * index, None, None)


def _refuse_privileged_mode(mode_arg: int) -> list[Insn]:
    return [load_arg(mode_arg), (JSET_K, PRIVILEGED_MODE_BITS, "eperm", "allow")]


def _refuse_privileged_create(flags_arg: int, mode_arg: int) -> list[Insn]:
    return [load_arg(flags_arg), (JSET_K, CREATING_OPEN_FLAGS, None, "allow"),
            *_refuse_privileged_mode(mode_arg)]


def _refuse_privileged_node(mode_arg: int) -> list[Insn]:
    return [load_arg(mode_arg), (JSET_K, PRIVILEGED_MODE_BITS, "eperm", None),
            (AND_K, FILE_TYPE_MASK, None, None),
            (JEQ_K, stat.S_IFCHR, "eperm", None),
            (JEQ_K, stat.S_IFBLK, "eperm", "allow")]


def _refuse_flag(flags_arg: int, flag: int) -> list[Insn]:
    return [load_arg(flags_arg), (JSET_K, flag, "eperm", "allow")]


#: What each filtered system call is checked for (argument indexes per its signature),
#: or the outcome (a label) of every such call.
RULES: dict[str, list[Insn] | str] = {
    "chmod": _refuse_privileged_mode(1),
    "fchmod": _refuse_privileged_mode(1),
    "fchmodat": _refuse_privileged_mode(2),
    "fchmodat2": _refuse_privileged_mode(2),
    "creat": _refuse_privileged_mode(1),
    "open": _refuse_privileged_create(1, 2),
    "openat": _refuse_privileged_create(2, 3),
    "mknod": _refuse_privileged_node(1),
    "mknodat": _refuse_privileged_node(2),
    "renameat2": _refuse_flag(4, RENAME_WHITEOUT),
    "setxattr": "eperm",
    "lsetxattr": "eperm",
    "fsetxattr": "eperm",
    "setxattrat": "eperm",
    "openat2": "enosys",
    "io_uring_setup": "enosys",
}


def abi_check(arch: Arch) -> Iterator[Insn | str]:
    """A filter's opening: kill the process for a call of another ABI (another audit
    arch, or x32 on x86-64), and leave the number of a native call in A. Each check is
    followed by its own return, so no jump leaves these few instructions."""
    yield (LD_W_ABS, OFFSET_ARCH, None, None)
    yield (JEQ_K, arch.audit_arch, "native-abi", None)
    yield (RET_K, RET_KILL_PROCESS, None, None)
    yield "native-abi"
    yield (LD_W_ABS, OFFSET_NR, None, None)
    if arch.x32_bit:
        yield (JGE_K, _X32_SYSCALL_BIT, None, "native-call")
        yield (RET_K, RET_KILL_PROCESS, None, None)
        yield "native-call"


def _source(arch: Arch) -> Iterator[Insn | str]:
    """The filter as instructions with symbolic jump targets, and labels (``str``)."""
    yield from abi_check(arch)
    for name, checks in RULES.items():
        if name not in arch.syscalls:
            continue
        if isinstance(checks, str):
            yield (JEQ_K, arch.syscalls[name], checks, None)
            continue
        yield (JEQ_K, arch.syscalls[name], None, f"after-{name}")
        yield from checks
        yield f"after-{name}"  # reached from the number test only: A still holds it
    yield "allow"
    yield (RET_K, RET_ALLOW, None, None)
    yield "eperm"
    yield (RET_K, RET_ERRNO | errno.EPERM, None, None)
    yield "enosys"
    yield (RET_K, RET_ERRNO | errno.ENOSYS, None, None)


def assemble(arch: Arch) -> Program:
    """The filter program for ``arch`` as ``(code, jt, jf, k)`` BPF instructions."""
    return link(_source(arch))


def link(source: Iterable[Insn | str]) -> Program:
    """Resolve the labels (``str`` items) that ``source``'s instructions jump to.

    Raises:
        ValueError: a jump goes backwards or further than classic BPF's 255 instructions.
    """
    items = list(source)
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in items:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)

    def offset(at: int, label: str | None) -> int:
        target = at + 1 if label is None else labels[label]
        jump = target - at - 1
        if not 0 <= jump <= 0xFF:
            raise ValueError(f"seccomp filter jump to {label} out of range")
        return jump

    return [(code, offset(i, jt), offset(i, jf), k) for i, (code, k, jt, jf) in enumerate(insns)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def native_arch() -> Arch | None:
    """The ABI of this process, or None where the filter has no system-call table."""
    return ARCHES.get(os.uname().machine)


def require_native_arch() -> Arch:
    """The ABI of this process.

    Raises:
        OSError: ``ENOSYS``, the filters have no system-call table for it.
    """
    arch = native_arch()
    if arch is None:
        raise OSError(errno.ENOSYS, f"no seccomp system-call table for {os.uname().machine}")
    return arch


def install_share_filter() -> None:
    """Install the filter on the calling thread (and everything it execs); sets
    ``no_new_privs``, so call it after anything that needs a setuid helper.

    Raises:
        OSError: the kernel refused the filter, or the ABI is not supported.
    """
    install_filter(assemble(require_native_arch()))


def install_filter(program: Program) -> None:
    """Set ``no_new_privs`` and install the assembled ``program`` on the calling thread;
    threads it starts later and programs it execs inherit it, and it cannot be removed.

    Raises:
        OSError: the kernel refused it.
    """
    filters = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), filters)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog))


def _prctl(option: int, arg2: int, arg3: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    args = (ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if libc.prctl(ctypes.c_int(option), *args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")


__all__ = ["ARCHES", "RULES", "Arch", "Insn", "Program", "abi_check", "assemble",
           "install_filter", "install_share_filter", "link", "load_arg", "native_arch",
           "require_native_arch"]
