"""The jailed helpers' system-call filter: its program run by a small classic-BPF
interpreter written from the kernel headers, and the filter installed in real child
processes (as root, so that identity calls would succeed without it), the vsock
backend's ``--help`` among them."""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from secvf.jail import seccomp as jail_seccomp
from secvf.jail.seccomp import (
    CLONE_NAMESPACE_FLAGS,
    EXEC_CALLS,
    REFUSED,
    UNIMPLEMENTED,
    helper_program,
    install_helper_filter,
)
from secvf.machine import seccomp as machine_seccomp
from secvf.machine.seccomp import ARCHES, Program, assemble

# Written out here from linux/bpf_common.h, linux/seccomp.h and linux/audit.h, not taken
# from the module under test.
BPF_LD_W_ABS, BPF_JA, BPF_JEQ_K, BPF_JGT_K, BPF_JGE_K, BPF_JSET_K = 0x20, 0x05, 0x15, 0x25, \
    0x35, 0x45
BPF_ALU_AND_K, BPF_RET_K = 0x54, 0x06
ALLOW, KILL_PROCESS = 0x7FFF0000, 0x80000000
EPERM, ENOSYS = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
X86 = ARCHES["x86_64"]
NR = X86.syscalls
THREAD_CLONE_FLAGS = 0x003D0F00  # glibc pthread_create: VM|FS|FILES|SIGHAND|THREAD|...
FORK_CLONE_FLAGS = 0x01200011  # glibc fork: CHILD_SETTID|CHILD_CLEARTID|SIGCHLD
NAMESPACE_FLAGS = {"newns": 0x00020000, "newuts": 0x04000000, "newipc": 0x08000000,
                   "newuser": 0x10000000, "newpid": 0x20000000, "newnet": 0x40000000,
                   "newcgroup": 0x02000000}


def run_bpf(program: Program, nr: int, args: tuple[int, ...] = (),
            audit_arch: int = X86.audit_arch) -> int:
    """What the kernel would answer: ``program`` run on a little-endian seccomp_data."""
    data = struct.pack("<iIQ6Q", nr, audit_arch, 0, *args, *[0] * (6 - len(args)))
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]  # IndexError: ran off the end
        pc += 1
        if code == BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == BPF_ALU_AND_K:
            acc &= k
        elif code == BPF_JA:
            pc += k
        elif code in (BPF_JEQ_K, BPF_JGT_K, BPF_JGE_K, BPF_JSET_K):
            taken = {BPF_JEQ_K: acc == k, BPF_JGT_K: acc > k, BPF_JGE_K: acc >= k,
                     BPF_JSET_K: bool(acc & k)}[code]
            pc += jt if taken else jf
        elif code == BPF_RET_K:
            return k
        else:
            raise AssertionError(f"opcode {code:#x} at {pc - 1} is not interpreted")


# ---- the program -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_call_fails_with_eperm(name: str) -> None:
    assert run_bpf(helper_program(X86), NR[name]) == EPERM


@pytest.mark.parametrize("name", UNIMPLEMENTED)
def test_clone3_and_io_uring_fail_with_enosys(name: str) -> None:
    assert run_bpf(helper_program(X86), NR[name]) == ENOSYS


@pytest.mark.parametrize("flag", sorted(NAMESPACE_FLAGS))
def test_a_clone_into_a_new_namespace_fails_with_eperm(flag: str) -> None:
    program = helper_program(X86)
    assert run_bpf(program, NR["clone"], (NAMESPACE_FLAGS[flag],)) == EPERM
    assert run_bpf(program, NR["clone"], (FORK_CLONE_FLAGS | NAMESPACE_FLAGS[flag],)) == EPERM


def test_the_namespace_mask_is_exactly_the_seven_flags() -> None:
    mask = 0
    for flag in NAMESPACE_FLAGS.values():
        mask |= flag
    assert CLONE_NAMESPACE_FLAGS == mask


@pytest.mark.parametrize("flags", [THREAD_CLONE_FLAGS, FORK_CLONE_FLAGS, 0x4111])
def test_thread_fork_and_vfork_clones_are_allowed(flags: int) -> None:
    assert run_bpf(helper_program(X86), NR["clone"], (flags,)) == ALLOW


@pytest.mark.parametrize("nr", [0, 1, 9, 257, 232, 291, 284, 41, 53])
def test_io_memory_and_event_calls_are_allowed(nr: int) -> None:
    # read, write, mmap, openat, epoll_wait, epoll_create1, eventfd, socket, socketpair
    assert run_bpf(helper_program(X86), nr) == ALLOW


def test_every_call_not_named_is_allowed() -> None:
    program = helper_program(X86)
    named = {NR[name] for name in (*REFUSED, *UNIMPLEMENTED, "clone")}
    answers = {nr: run_bpf(program, nr) for nr in range(600) if nr not in named}
    assert set(answers.values()) == {ALLOW}


def test_exec_is_allowed_unless_asked_otherwise() -> None:
    for name in EXEC_CALLS:
        assert run_bpf(helper_program(X86), NR[name]) == ALLOW
        assert run_bpf(helper_program(X86, allow_exec=False), NR[name]) == EPERM
    assert run_bpf(helper_program(X86, allow_exec=False), 0) == ALLOW  # read


@pytest.mark.parametrize("audit_arch", [AUDIT_ARCH_I386, ARCHES["aarch64"].audit_arch, 0])
def test_a_call_of_another_arch_kills(audit_arch: int) -> None:
    assert run_bpf(helper_program(X86), 0, audit_arch=audit_arch) == KILL_PROCESS


@pytest.mark.parametrize("nr", [0, NR["mount"], 520])  # read, mount, x32 execve
def test_an_x32_call_kills(nr: int) -> None:
    assert run_bpf(helper_program(X86), X32_SYSCALL_BIT | nr) == KILL_PROCESS


def test_the_aarch64_program_judges_its_own_numbers() -> None:
    arm = ARCHES["aarch64"]
    program = helper_program(arm)
    run = lambda nr, *args: run_bpf(program, nr, args, audit_arch=arm.audit_arch)  # noqa: E731
    assert run(arm.syscalls["mount"]) == run(arm.syscalls["setuid"]) == EPERM
    assert run(arm.syscalls["clone3"]) == ENOSYS
    assert run(arm.syscalls["clone"], CLONE_NAMESPACE_FLAGS) == EPERM
    assert run(arm.syscalls["clone"], THREAD_CLONE_FLAGS) == ALLOW
    assert run(63) == run(64) == run(222) == ALLOW  # read, write, mmap
    assert run_bpf(program, 0, audit_arch=X86.audit_arch) == KILL_PROCESS


@pytest.mark.parametrize("allow_exec", [True, False])
@pytest.mark.parametrize("arch_name", sorted(ARCHES))
def test_the_program_assembles_for_every_arch(arch_name: str, allow_exec: bool) -> None:
    program = helper_program(ARCHES[arch_name], allow_exec=allow_exec)
    for i, (code, jt, jf, _k) in enumerate(program):
        if code & 0x07 == 0x05:  # a jump
            assert i + 1 + max(jt, jf) < len(program)
            assert max(jt, jf) <= jail_seccomp.RUN_LENGTH + 1
    assert program[-1] == (BPF_RET_K, 0, 0, ALLOW)


def test_a_rule_list_far_longer_than_a_jump_still_links(monkeypatch) -> None:
    many = {f"call{n}": 1000 + n for n in range(700)}
    arch = replace(X86, syscalls={**X86.syscalls, **many})
    monkeypatch.setattr(jail_seccomp, "REFUSED", tuple(many))
    program = helper_program(arch)
    assert len(program) > 700
    assert run_bpf(program, 1000) == run_bpf(program, 1699) == EPERM
    assert run_bpf(program, 1700) == run_bpf(program, 0) == ALLOW


def test_every_named_call_has_a_number_on_x86_64_and_arm64_lacks_only_x86_calls() -> None:
    names = {*REFUSED, *UNIMPLEMENTED, *EXEC_CALLS, "clone"}
    assert names <= set(X86.syscalls)
    assert names - set(ARCHES["aarch64"].syscalls) == {"iopl", "ioperm", "uselib"}


def _header_numbers(path: Path) -> dict[str, int]:
    text = path.read_text()
    return {name: int(nr) for name, nr in re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", text)}


@pytest.mark.parametrize("arch_name, header", [
    ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    ("aarch64", "/usr/include/asm-generic/unistd.h"),  # arm64's table is the generic one
])
def test_the_numbers_match_the_kernel_headers(arch_name: str, header: str) -> None:
    if not Path(header).exists():
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    known = _header_numbers(Path(header))
    table = ARCHES[arch_name].syscalls
    checked = {name: nr for name, nr in table.items() if name in known}
    assert checked == {name: known[name] for name in checked}
    # names the headers may predate (a newer kernel's calls) are the only ones unchecked
    assert set(table) - set(checked) <= {"fchmodat2", "setxattrat", "mount_setattr"}


def test_the_share_filter_still_assembles_with_the_shared_prologue() -> None:
    for arch in ARCHES.values():
        program = assemble(arch)
        assert program[:3] == [(BPF_LD_W_ABS, 0, 0, 4), (BPF_JEQ_K, 1, 0, arch.audit_arch),
                               (BPF_RET_K, 0, 0, KILL_PROCESS)]


def test_the_filter_cannot_be_installed_on_an_unknown_architecture(monkeypatch) -> None:
    def must_not_install(program: Program) -> None:
        raise AssertionError("installed a filter into the test process")

    monkeypatch.setattr(machine_seccomp, "native_arch", lambda: None)
    monkeypatch.setattr(jail_seccomp, "install_filter", must_not_install)
    with pytest.raises(OSError, match="no seccomp system-call table") as caught:
        install_helper_filter()
    assert caught.value.errno == errno.ENOSYS


# ---- the filter in real processes ------------------------------------------------------------

PROBE = r"""
import ctypes, errno, json, mmap, os, select, socket, sys, threading
from secvf.jail.seccomp import install_helper_filter
from secvf.machine.seccomp import native_arch

mode, data_file = sys.argv[1], sys.argv[2]
if mode == "filtered":
    install_helper_filter()
libc = ctypes.CDLL(None, use_errno=True)
numbers = native_arch().syscalls
results = {}

def attempt(name, call):
    try:
        call()
        results[name] = "ok"
    except OSError as exc:
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))

def checked(result):
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result

def read_file():
    with open(data_file) as f:
        if f.read() != "guest-log":
            raise OSError(0, "wrong content")

def socket_pair():
    a, b = socket.socketpair()
    a.sendall(b"ping")
    if b.recv(4) != b"ping":
        raise OSError(0, "lost data")

def thread():
    seen = []
    t = threading.Thread(target=seen.append, args=(1,))
    t.start()
    t.join()
    if seen != [1]:
        raise OSError(0, "thread did not run")

def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 7:
        raise OSError(0, "child did not exit 7")

def guest_ram():
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 4096)
    with mmap.mmap(fd, 4096) as ram:
        ram[:4] = b"virt"
    os.close(fd)

def events():
    efd = os.eventfd(0)
    ep = select.epoll()
    ep.register(efd, select.EPOLLIN)
    os.eventfd_write(efd, 1)
    if not ep.poll(0):
        raise OSError(0, "no event")
    ep.close()
    os.close(efd)

def ptrace_self():  # PTRACE_PEEKUSER on a process this one does not trace: ESRCH
    ctypes.set_errno(0)
    libc.ptrace(ctypes.c_long(3), ctypes.c_int(os.getpid()), None, None)
    if ctypes.get_errno():
        raise OSError(ctypes.get_errno(), "")

def raw_clone(flags):
    pid = checked(libc.syscall(ctypes.c_long(numbers["clone"]), ctypes.c_ulong(flags | 17),
                               None, None, None, None))
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

def unshare_user():
    if hasattr(os, "unshare"):
        os.unshare(os.CLONE_NEWUSER)
    else:
        checked(libc.unshare(ctypes.c_int(0x10000000)))

attempt("read-file", read_file)
attempt("socketpair", socket_pair)
attempt("thread", thread)
attempt("fork", fork)
attempt("guest-ram", guest_ram)
attempt("eventfd-epoll", events)
attempt("setuid", lambda: os.setuid(0))
attempt("setgroups", lambda: os.setgroups([0]))
attempt("mount", lambda: checked(libc.mount(b"none", b"/nonexistent-secvf-probe", b"tmpfs",
                                            ctypes.c_ulong(0), None)))
attempt("ptrace", ptrace_self)
attempt("clone3", lambda: checked(libc.syscall(ctypes.c_long(numbers["clone3"]), None,
                                               ctypes.c_size_t(0))))
attempt("clone-newnet", lambda: raw_clone(0x40000000))
attempt("clone-newuser", lambda: raw_clone(0x10000000))
attempt("unshare-newuser", unshare_user)  # last: unfiltered, it moves this process
with open("/proc/self/status") as status:
    results["seccomp"] = next(l.split()[1] for l in status if l.startswith("Seccomp:"))
print(json.dumps(results))
"""

ALLOWED_PROBES = ("read-file", "socketpair", "thread", "fork", "guest-ram", "eventfd-epoll")


def _probe(mode: str, tmp_path: Path) -> dict[str, str]:
    data = tmp_path / "log.txt"
    data.write_text("guest-log")
    proc = subprocess.run([sys.executable, "-c", PROBE, mode, str(data)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


needs_table = pytest.mark.skipif(machine_seccomp.native_arch() is None,
                                 reason="no seccomp system-call table for this CPU")
needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="as non-root the identity calls fail anyway")


@needs_table
@needs_root
def test_the_filter_refuses_privileged_calls_and_keeps_the_backends_calls(tmp_path) -> None:
    results = _probe("filtered", tmp_path)
    assert results == {
        **dict.fromkeys(ALLOWED_PROBES, "ok"),
        "setuid": "EPERM", "setgroups": "EPERM", "mount": "EPERM", "ptrace": "EPERM",
        "clone3": "ENOSYS", "clone-newnet": "EPERM", "clone-newuser": "EPERM",
        "unshare-newuser": "EPERM", "seccomp": "2",
    }


@needs_table
@needs_root
def test_without_the_filter_the_same_probes_get_other_answers(tmp_path) -> None:
    """The control run: the EPERMs above come from the filter. Only answers no container
    runtime changes are checked (one with its own filter may already refuse namespaces,
    mounts or clone3)."""
    results = _probe("control", tmp_path)
    assert {name: results[name] for name in ALLOWED_PROBES} == dict.fromkeys(ALLOWED_PROBES,
                                                                             "ok")
    assert results["setuid"] == results["setgroups"] == "ok"
    assert results["ptrace"] == "ESRCH"
    assert results["seccomp"] == "0"


def _under_filter(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=60, check=False)


@needs_table
def test_the_vsock_backend_runs_after_the_filter_is_installed() -> None:
    wrapper = ("from secvf.jail.seccomp import install_helper_filter; install_helper_filter(); "
               "import os, sys; "
               "os.execv(sys.executable, [sys.executable, '-m', 'secvf.vsock', '--help'])")
    proc = _under_filter(wrapper)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m secvf.vsock")


EXEC_THEN_PROBE = r"""
import os, sys
from secvf.jail.seccomp import install_helper_filter
for allow_exec in sys.argv[1:]:
    install_helper_filter(allow_exec=allow_exec == "allow")
probe = ("import os\n"
         "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
         "try:\n"
         "    os.setuid(os.getuid())\n"
         "    setuid = 'ok'\n"
         "except OSError as exc:\n"
         "    setuid = exc.errno\n"
         "print(status['Seccomp'].strip(), status['Seccomp_filters'].strip(),\n"
         "      status['NoNewPrivs'].strip(), setuid)")
try:
    os.execv(sys.executable, [sys.executable, "-c", probe])
except OSError as exc:
    print("exec", exc.errno)
"""


@needs_table
def test_the_filter_stays_on_across_the_exec() -> None:
    proc = _under_filter(EXEC_THEN_PROBE, "allow")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "1", "1", str(errno.EPERM)]


@needs_table
@pytest.mark.parametrize("stack", [["deny"], ["allow", "deny"]])
def test_a_filter_without_exec_refuses_it_stacked_or_alone(stack: list[str]) -> None:
    proc = _under_filter(EXEC_THEN_PROBE, *stack)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["exec", str(errno.EPERM)]
