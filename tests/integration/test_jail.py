"""Jails on real VMs: each VM's QEMU, vsock backend and virtiofsd run as its own uid, with
no capabilities, no_new_privs, seccomp and their own namespaces; a compromised process
(the test enters its namespace as its uid) cannot open another VM's files; the cgroup
stops a fork bomb and a guest that outgrows its memory limit; audit reports the jails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.jail.inspect import ProcessJail, read_process
from secvf.jail.settings import settings_path
from tests.helpers import run_cli

pytestmark = pytest.mark.vm

PIDS_MAX = 160  # the test VMs' pids limit (QEMU, the backend and virtiofsd use ~20-70)
ROOT_SECRET = Path("/root/secvf-jail-test-secret")

#: ``UID N PROCS... MAX``: forks as UID inside the cgroup whose N procs files follow,
#: until the pids limit refuses (or MAX); prints how many forks succeeded and failed,
#: then kills and reaps them.
FORK_BOMB = r"""
import os, sys, time
CGROUP_FILES = int(sys.argv[2])
for procs in sys.argv[3:3 + CGROUP_FILES]:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
uid = int(sys.argv[1])
os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
kids, failed = [], 0
while failed < 5 and len(kids) < int(sys.argv[-1]):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    kids.append(pid)
print(len(kids), failed, flush=True)
for pid in kids:
    os.kill(pid, 9)
for pid in kids:
    os.waitpid(pid, 0)
"""


def _write_settings(**values: object) -> None:
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))


def _status(name: str) -> dict:
    return json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)


def _command_lines() -> Iterator[tuple[int, bytes]]:
    """Every process on the host and its command line (arguments joined by spaces)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            yield pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue


def _processes(name: str) -> dict[str, ProcessJail]:
    """The VM's QEMU and vsock backend, by role."""
    status = _status(name)
    found = {"qemu": read_process(status["qemu_pid"])}
    for pid, text in _command_lines():
        if (status["id"].encode() in text and b"secvf.jail.launcher" not in text
                and b"secvf.vsock" in text):
            found["vsock"] = read_process(pid)
    return found


def _virtiofsd(name: str) -> list[ProcessJail]:
    """Every virtiofsd process serving VM ``name``'s workspace (both of its processes)."""
    workspace = f"/sandboxes/{name}/workspace".encode()
    return [read_process(pid) for pid, text in _command_lines()
            if text.startswith(b"/usr/lib/qemu/virtiofsd") and workspace in text]


@pytest.fixture(scope="module")
def pair(vm_library: Path) -> Iterator[tuple[str, str]]:
    """Two running sandboxes, each with its default workspace holding a file."""
    _write_settings(pids_max=PIDS_MAX)
    names = ("jail-a", "jail-b")
    try:
        for name in names:
            run_cli("sandbox", "create", name, "--memory", "512M", "--network", "none",
                    check=True)
            (vm_library / "sandboxes" / name / "workspace" / "mine.txt").write_text(name)
            run_cli("sandbox", "start", name, check=True)
        yield names
    finally:
        for name in names:
            run_cli("sandbox", "rm", "--purge", "--force", name)
        settings_path().unlink(missing_ok=True)


def test_each_vm_process_is_unprivileged_and_apart(pair):
    a, b = (_processes(n) for n in pair)
    for procs in (a, b):
        assert {"qemu", "vsock"} <= set(procs), procs
        for role in ("qemu", "vsock"):
            p = procs[role]
            assert p.uid != 0 and p.cap_eff == 0 and p.no_new_privs and p.seccomp == 2, p
            assert {"mnt", "pid", "ipc", "net"} <= set(p.own_namespaces), p
        assert procs["qemu"].uid == procs["vsock"].uid
    assert a["qemu"].uid != b["qemu"].uid
    for name, procs in zip(pair, (a, b), strict=True):
        servers = _virtiofsd(name)
        assert servers, f"no virtiofsd for {name}"
        for server in servers:  # in its user namespace, as the VM's uid seen from here
            assert server.uid == procs["qemu"].uid and "user" in server.own_namespaces
            assert server.no_new_privs and server.seccomp == 2
    status = _status(pair[0])
    assert status["jail"]["uid"] == a["qemu"].uid
    assert status["jail"]["limits"]["pids_max"] == PIDS_MAX
    assert status["jail"]["usage"]["pids"] >= 3


def _as_jailed(pid: int, uid: int, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` in process ``pid``'s mount namespace as ``uid`` (what that process,
    taken over, could do)."""
    return subprocess.run(["nsenter", f"--target={pid}", "--mount", f"--setuid={uid}",
                           f"--setgid={uid}", "--", *command],
                          capture_output=True, text=True, timeout=30, check=False)


def test_a_compromised_process_cannot_open_what_is_not_its_vms(pair, vm_library):
    ROOT_SECRET.write_text("host root's file\n")
    try:
        procs = _processes(pair[0])
        mine = vm_library / "vms" / pair[0] / "disk.qcow2"
        theirs = [vm_library / "vms" / pair[1] / "disk.qcow2", ROOT_SECRET,
                  vm_library / "sandboxes" / pair[1] / "workspace" / "mine.txt",
                  vm_library / "sandboxes" / pair[0] / "workspace" / "mine.txt",
                  vm_library / "logs"]
        qemu = procs["qemu"]
        # the view works: QEMU's own disk is there and readable as its uid
        own = _as_jailed(qemu.pid, qemu.uid, "head", "-c", "3", str(mine))
        assert own.returncode == 0 and own.stdout == "QFI", own
        for role in ("qemu", "vsock"):
            proc = procs[role]
            for path in theirs:
                done = _as_jailed(proc.pid, proc.uid, "cat", str(path))
                assert done.returncode != 0, (role, path, done.stdout)
                assert "No such file or directory" in done.stderr, (role, path, done.stderr)
    finally:
        ROOT_SECRET.unlink(missing_ok=True)


def test_fork_bomb_as_the_vms_uid_is_stopped_by_the_pids_limit(pair):
    status = _status(pair[0])
    procs_files = [str(Path(d) / "cgroup.procs") for d in status["jail"]["cgroup"]]
    done = subprocess.run([sys.executable, "-c", FORK_BOMB, str(status["jail"]["uid"]),
                           str(len(procs_files)), *procs_files, str(4 * PIDS_MAX)],
                          capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    made, failed = (int(n) for n in done.stdout.split())
    assert failed >= 1 and made < PIDS_MAX, done.stdout
    assert run_cli("vm", "exec", pair[0], "--", "true").returncode == 0  # it still works


def test_guest_past_its_memory_limit_stops_its_vm_only(pair, vm_factory):
    _write_settings(pids_max=PIDS_MAX, memory_overhead_mib=16)
    try:
        name = vm_factory.sandbox("jail-mem", "--memory", "768M")
        run_cli("sandbox", "start", name, check=True)
    finally:
        _write_settings(pids_max=PIDS_MAX)
    limit = _status(name)["jail"]["limits"]["memory_bytes"]
    assert limit == (768 + 16) << 20
    fill = ("import re; n = int(re.search(r'MemAvailable:\\s+(\\d+)', "
            "open('/proc/meminfo').read())[1]) * 1024 * 9 // 10; "
            "b = bytearray(b'x') * n; print(len(b))")
    run_cli("vm", "exec", name, "--", "python3", "-c", fill, timeout=300)
    status = _status(name)
    assert status["state"] == "crashed", status
    assert "memory limit exceeded" in status["last_run"]["reason"], status["last_run"]
    events = run_cli("logs", "security", "--event", "vm_memory_limit", "--vm", name,
                     "--json", check=True).stdout.splitlines()
    assert events and json.loads(events[-1])["limit_mib"] == 768 + 16
    assert run_cli("vm", "exec", pair[0], "--", "true").returncode == 0  # the neighbour


def test_audit_reports_each_jail_and_flags_a_vm_without_one(pair, vm_factory):
    name = vm_factory.vm("jail-off", "--memory", "256M", "--network", "none")
    _write_settings(enabled=False)
    try:
        run_cli("vm", "start", name, check=True)
    finally:
        _write_settings(pids_max=PIDS_MAX)
    audit = json.loads(run_cli("audit", "--json").stdout)
    by_name = {v["name"]: v for v in audit["vms"]}
    for jailed in pair:
        assert by_name[jailed]["jail"]["qemu"]["cap_eff"] == 0
        assert by_name[jailed]["findings"] == [], by_name[jailed]
    assert by_name[pair[0]]["jail"]["uid"] != by_name[pair[1]]["jail"]["uid"]
    assert any("without a jail" in f for f in by_name[name]["findings"]), by_name[name]
