"""The system-call filter of SecVF's jailed helper processes (the userspace vsock backend).

``python -m secvf.vsock`` parses virtqueues that a hostile guest writes. It needs only
Unix sockets, guest RAM mapped from passed fds, threads, eventfds, epoll/select and
files in its log directory. QEMU keeps its own ``-sandbox on`` filter; the backend runs
under this one, which the jail launcher (:mod:`secvf.jail.launcher`) installs as its
last step before it execs the backend. The filter:

* kills the process for a system call of another ABI (i386, x32), as the share filter
  of :mod:`secvf.machine.seccomp` does;
* fails with ``EPERM`` every call of :data:`REFUSED`: mounts and the new mount API,
  namespaces, ``ptrace`` and cross-process memory, kernel modules and ``kexec``, BPF,
  perf, keyrings, ``userfaultfd``, file handles, swap, reboot, the clock, identity and
  capability changes, ``personality``, port I/O and a few obsolete calls;
* fails with ``EPERM`` a ``clone`` whose flags (argument 0 on x86-64 and arm64) ask
  for a new namespace (:data:`CLONE_NAMESPACE_FLAGS`); thread and fork clones pass;
* fails with ``ENOSYS`` (see :data:`UNIMPLEMENTED`) ``clone3``, whose flags sit in a
  struct a filter cannot read (glibc then falls back to ``clone``), and io_uring,
  whose queued operations would bypass the filter;
* allows everything else.

Exec. The launcher installs the filter and then execs, so the filter must let that one
``execve`` through, and a classic-BPF filter keeps no state to allow "the first exec
only". By default (``allow_exec=True``) ``execve`` and ``execveat`` are allowed, and
three things bound what an exec can gain: the filter itself stays on across it (it
cannot be removed), ``no_new_privs`` (set with the filter) keeps setuid bits and file
capabilities from raising privileges, and the jail's mount view shows only the host's
read-only system directories and the VM's own files. A process that will not exec
again can shut exec too: filters stack (the kernel runs every installed filter and the
strictest answer wins), so ``install_helper_filter(allow_exec=False)`` on top of the
launcher's filter makes ``execve`` and ``execveat`` fail with ``EPERM`` for the rest of
the process's life and its children's.

Jumps. Classic BPF jumps forward at most 255 instructions, so no rule jumps to a
return shared by the whole program: the ABI checks and the clone rule return right
after their tests, and the number tests of one outcome are emitted in runs of at most
:data:`RUN_LENGTH`, each followed by its own return. The program links whatever the
number of rules.

Standard library only, besides the assembler of :mod:`secvf.machine.seccomp`.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator, Sequence

from secvf.machine.seccomp import (
    JEQ_K,
    JSET_K,
    RET_ALLOW,
    RET_ERRNO,
    RET_K,
    Arch,
    Insn,
    Program,
    abi_check,
    install_filter,
    link,
    load_arg,
    require_native_arch,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
#: a ``clone`` asking for any of these fails with EPERM
CLONE_NAMESPACE_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC
                         | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)
CLONE_FLAGS_ARG = 0  # clone's flags argument on x86-64 and arm64 (s390 swaps the first two)
#: at most this many number tests share one return: every jump stays this short
RUN_LENGTH = 32

#: Calls that fail with EPERM (a name the ABI has no number for is skipped: no such call).
REFUSED: tuple[str, ...] = (
    # mounts, the new mount API, namespaces
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "unshare", "setns",
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
    # the kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf",
    "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd", "lookup_dcookie",
    "syslog", "swapon", "swapoff", "reboot", "acct", "quotactl", "iopl", "ioperm",
    "personality", "vhangup", "uselib", "nfsservctl",
    # files by handle, past the mount view
    "open_by_handle_at", "name_to_handle_at",
    # the clock
    "settimeofday", "clock_settime", "adjtimex",
    # identity and capabilities
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid", "capset",
)
#: Calls that fail with ENOSYS, so that callers fall back to calls the filter can judge.
UNIMPLEMENTED: tuple[str, ...] = ("clone3", "io_uring_setup", "io_uring_enter",
                                  "io_uring_register")
#: Calls that fail with EPERM too under ``allow_exec=False``.
EXEC_CALLS: tuple[str, ...] = ("execve", "execveat")


def _numbers(arch: Arch, names: Iterable[str]) -> list[int]:
    return [arch.syscalls[name] for name in names if name in arch.syscalls]


def _refuse(numbers: Sequence[int], verdict: int, tag: str) -> Iterator[Insn | str]:
    """Return ``verdict`` for every call in ``numbers`` (A holds the call's number); let
    the others fall through. Each run of tests ends in its own copy of the return."""
    for start in range(0, len(numbers), RUN_LENGTH):
        run = numbers[start:start + RUN_LENGTH]
        verdict_label, next_label = f"{tag}-{start}", f"after-{tag}-{start}"
        for number in run[:-1]:
            yield (JEQ_K, number, verdict_label, None)
        yield (JEQ_K, run[-1], None, next_label)
        yield verdict_label
        yield (RET_K, verdict, None, None)
        yield next_label


def _clone_rule(arch: Arch) -> Iterator[Insn | str]:
    """EPERM for a ``clone`` into a new namespace, allow any other ``clone``."""
    yield (JEQ_K, arch.syscalls["clone"], None, "after-clone")
    yield load_arg(CLONE_FLAGS_ARG)
    yield (JSET_K, CLONE_NAMESPACE_FLAGS, None, "clone-allowed")
    yield (RET_K, RET_ERRNO | errno.EPERM, None, None)
    yield "clone-allowed"
    yield (RET_K, RET_ALLOW, None, None)
    yield "after-clone"  # reached from the number test only: A still holds the number


def _source(arch: Arch, allow_exec: bool) -> Iterator[Insn | str]:
    refused = REFUSED if allow_exec else REFUSED + EXEC_CALLS
    yield from abi_check(arch)
    yield from _clone_rule(arch)
    yield from _refuse(_numbers(arch, UNIMPLEMENTED), RET_ERRNO | errno.ENOSYS, "enosys")
    yield from _refuse(_numbers(arch, refused), RET_ERRNO | errno.EPERM, "eperm")
    yield (RET_K, RET_ALLOW, None, None)


def helper_program(arch: Arch, *, allow_exec: bool = True) -> Program:
    """The helper filter for ``arch`` as ``(code, jt, jf, k)`` BPF instructions.

    Args:
        arch: the ABI, one of :data:`secvf.machine.seccomp.ARCHES`.
        allow_exec: let ``execve``/``execveat`` through (the launcher's case); False
            refuses them with EPERM.

    Raises:
        KeyError: ``arch`` has no number for ``clone``.
    """
    return link(_source(arch, allow_exec))


def install_helper_filter(*, allow_exec: bool = True) -> None:
    """Install the helper filter on the calling thread: threads it starts later, its
    children and the programs it execs inherit it. Sets ``no_new_privs``; call it after
    the identity change (``setuid`` and the like fail under it) and while the process
    has one thread, as the launcher does right before its exec.

    Args:
        allow_exec: see :func:`helper_program` and the module docstring.

    Raises:
        OSError: the kernel refused the filter, or the filters have no system-call
            table for this ABI (``ENOSYS``); no filter was installed.
    """
    install_filter(helper_program(require_native_arch(), allow_exec=allow_exec))


__all__ = ["CLONE_NAMESPACE_FLAGS", "EXEC_CALLS", "REFUSED", "UNIMPLEMENTED",
           "helper_program", "install_helper_filter"]
