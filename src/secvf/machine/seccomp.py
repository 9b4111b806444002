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
from collections.abc import Iterator
from dataclasses import dataclass

# classic BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h)
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_AND_K = 0x54
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARGS = 16  # args[i]'s low 32 bits on a little-endian ABI: 16 + 8 * i
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
    """A system-call ABI: its ``AUDIT_ARCH_*`` value and system-call numbers."""

    audit_arch: int
    syscalls: dict[str, int]
    x32_bit: bool  # the ABI has x32 calls (same audit arch, bit 30 set in the number)


ARCHES = {
    "x86_64": Arch(0xC000003E, {
        "open": 2, "creat": 85, "chmod": 90, "fchmod": 91, "mknod": 133, "setxattr": 188,
        "lsetxattr": 189, "fsetxattr": 190, "openat": 257, "mknodat": 259, "fchmodat": 268,
        "renameat2": 316, "io_uring_setup": 425, "openat2": 437, "fchmodat2": 452,
        "setxattrat": 463}, x32_bit=True),
    "aarch64": Arch(0xC00000B7, {
        "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "mknodat": 33, "fchmod": 52,
        "fchmodat": 53, "openat": 56, "renameat2": 276, "io_uring_setup": 425,
        "openat2": 437, "fchmodat2": 452, "setxattrat": 463}, x32_bit=False),
}

# (jump-if-true label, jump-if-false label); None falls through to the next instruction
_Insn = tuple[int, int, str | None, str | None]


def _load_arg(index: int) -> _Insn:
    return (_LD_W_ABS, _OFFSET_ARGS + 8 * index, None, None)


def _refuse_privileged_mode(mode_arg: int) -> list[_Insn]:
    return [_load_arg(mode_arg), (_JSET_K, PRIVILEGED_MODE_BITS, "eperm", "allow")]


def _refuse_privileged_create(flags_arg: int, mode_arg: int) -> list[_Insn]:
    return [_load_arg(flags_arg), (_JSET_K, CREATING_OPEN_FLAGS, None, "allow"),
            *_refuse_privileged_mode(mode_arg)]


def _refuse_privileged_node(mode_arg: int) -> list[_Insn]:
    return [_load_arg(mode_arg), (_JSET_K, PRIVILEGED_MODE_BITS, "eperm", None),
            (_AND_K, FILE_TYPE_MASK, None, None),
            (_JEQ_K, stat.S_IFCHR, "eperm", None),
            (_JEQ_K, stat.S_IFBLK, "eperm", "allow")]


def _refuse_flag(flags_arg: int, flag: int) -> list[_Insn]:
    return [_load_arg(flags_arg), (_JSET_K, flag, "eperm", "allow")]


#: What each filtered system call is checked for (argument indexes per its signature),
#: or the outcome (a label) of every such call.
RULES: dict[str, list[_Insn] | str] = {
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


def _source(arch: Arch) -> Iterator[_Insn | str]:
    """The filter as instructions with symbolic jump targets, and labels (``str``)."""
    yield (_LD_W_ABS, _OFFSET_ARCH, None, None)
    yield (_JEQ_K, arch.audit_arch, None, "kill")
    yield (_LD_W_ABS, _OFFSET_NR, None, None)
    if arch.x32_bit:
        yield (_JGE_K, _X32_SYSCALL_BIT, "kill", None)
    for name, checks in RULES.items():
        if name not in arch.syscalls:
            continue
        if isinstance(checks, str):
            yield (_JEQ_K, arch.syscalls[name], checks, None)
            continue
        yield (_JEQ_K, arch.syscalls[name], None, f"after-{name}")
        yield from checks
        yield f"after-{name}"  # reached from the number test only: A still holds it
    yield "allow"
    yield (_RET_K, RET_ALLOW, None, None)
    yield "eperm"
    yield (_RET_K, RET_ERRNO | errno.EPERM, None, None)
    yield "enosys"
    yield (_RET_K, RET_ERRNO | errno.ENOSYS, None, None)
    yield "kill"
    yield (_RET_K, RET_KILL_PROCESS, None, None)


def assemble(arch: Arch) -> list[tuple[int, int, int, int]]:
    """The filter program for ``arch`` as ``(code, jt, jf, k)`` BPF instructions."""
    items = list(_source(arch))
    labels: dict[str, int] = {}
    insns: list[_Insn] = []
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


def install_share_filter() -> None:
    """Install the filter on the calling thread (and everything it execs); sets
    ``no_new_privs``, so call it after anything that needs a setuid helper.

    Raises:
        OSError: the kernel refused the filter, or the ABI is not supported.
    """
    arch = native_arch()
    if arch is None:
        raise OSError(errno.ENOSYS, f"no seccomp system-call table for {os.uname().machine}")
    program = assemble(arch)
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


__all__ = ["ARCHES", "RULES", "Arch", "assemble", "install_share_filter", "native_arch"]
