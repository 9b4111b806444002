"""AI-sandbox sessions: shares, isolation, the exec allowlist, cleanup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import secvf
from secvf.exec.bridge import allowlist_path
from secvf.exec.client import ExecClient
from secvf.workflows.vm_exec import exec_socket_for
from tests.helpers import run_cli

pytestmark = pytest.mark.vm

NOBODY = 65534


def sh(name: str, script: str, *, root: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["vm", "exec", name, *(["--root"] if root else []), "-c", script]
    return run_cli(*args)


def status(name: str) -> dict:
    return json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)


def processes_mentioning(text: str) -> list[str]:
    # -ww: full command lines whatever $COLUMNS says
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def test_workspace_round_trip_and_ownership(fleet: dict, vm_library: Path) -> None:
    workspace = vm_library / "sandboxes" / "sbx" / "workspace"
    (workspace / "from-host.txt").write_text("hello guest\n")
    assert sh("sbx", "cat /workspace/from-host.txt").stdout == "hello guest\n"
    assert sh("sbx", "echo hello host > /workspace/from-guest.txt").returncode == 0
    created = workspace / "from-guest.txt"
    assert created.read_text() == "hello host\n"
    assert created.stat().st_mode & 0o777 == 0o644  # the guest's umask, not the host's
    # guest uid 1000 (agent) is you on the host; guest root is your subordinate range
    assert (created.stat().st_uid, created.stat().st_gid) == (os.getuid(), os.getgid())
    assert sh("sbx", "echo x > /workspace/r && chmod 4755 /workspace/r", root=True).returncode != 0
    assert not (workspace / "r").stat().st_mode & 0o6000
    assert (workspace / "r").stat().st_uid not in (0, os.getuid())


def test_read_only_share_resists_root_in_the_guest(vm_library: Path, tmp_path: Path) -> None:
    ro = tmp_path / "reference"
    ro.mkdir()
    (ro / "data.txt").write_text("original\n")
    (ro / "data.txt").chmod(0o644)
    before = (ro / "data.txt").stat()
    run_cli("sandbox", "create", "rosbx", "--memory", "512M", "--share", f"{ro}:/ref:ro",
            check=True)
    run_cli("sandbox", "start", "rosbx", check=True)
    try:
        assert sh("rosbx", "cat /ref/data.txt").stdout == "original\n"
        attacks = [
            "echo pwned > /ref/data.txt",
            "touch /ref/new",
            "chmod 777 /ref/data.txt",
            "rm /ref/data.txt",
            "mount -o remount,rw /ref && echo pwned > /ref/data.txt",
            "umount /ref; mount -t virtiofs ro0 /ref && echo pwned > /ref/data.txt",
        ]
        for attack in attacks:
            assert sh("rosbx", attack, root=True).returncode != 0, attack
        after = (ro / "data.txt").stat()
        assert (ro / "data.txt").read_text() == "original\n"
        assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
        assert sorted(p.name for p in ro.iterdir()) == ["data.txt"]
    finally:
        run_cli("sandbox", "rm", "rosbx", "--purge", "--force", check=True)


def test_allowlist_three_cases(fleet: dict, vm_library: Path) -> None:
    """Empty allowlist: another uid cannot even connect. Allowlist names someone else:
    the path opens, the other uid is refused with an error frame. Names the uid: works."""
    sock = exec_socket_for("sbx")
    probe = ("import sys; from pathlib import Path; from secvf.exec.client import ExecClient;"
             "c = ExecClient.connect(Path(sys.argv[1]), timeout=5);"
             "print(c.run(['id', '-un']).stdout.decode().strip())")

    # the client runs as nobody with the system Python and a world-readable copy of the
    # package (the checkout and the venv may live under a 0700 home)
    pkg = Path(tempfile.mkdtemp(prefix="secvf-nobody-"))
    shutil.copytree(Path(secvf.__file__).parent, pkg / "secvf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [pkg, *pkg.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    def as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/usr/bin/python3", "-c", probe, str(path)], capture_output=True,
                              text=True, timeout=60, user=NOBODY, group=NOBODY,
                              env={"PYTHONPATH": str(pkg)}, cwd="/")

    refused = as_nobody(sock)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr

    allowlist_path().write_text("# trusted operators\ndaemon\n")
    try:
        run_cli("sandbox", "create", "shared", "--memory", "512M", check=True)
        run_cli("sandbox", "start", "shared", check=True)
        shared = exec_socket_for("shared")
        assert oct(shared.stat().st_mode & 0o777) == "0o666"
        refused = as_nobody(shared)
        assert refused.returncode != 0 and "refused" in refused.stderr, refused.stderr
        allowlist_path().write_text("daemon\nnobody  # reviewer\n")
        allowed = as_nobody(shared)
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout.strip() == "agent"
        events = [json.loads(line) for p in (vm_library / "logs").glob("security-*.jsonl")
                  for line in p.read_text().splitlines()]
        assert any(e["event"] == "exec_refused" and e["peer_uid"] == NOBODY for e in events)
    finally:
        allowlist_path().unlink()
        shutil.rmtree(pkg)
        run_cli("sandbox", "rm", "shared", "--purge", "--force")


def test_two_sessions_are_isolated(fleet: dict, vm_library: Path) -> None:
    run_cli("sandbox", "create", "other", "--memory", "512M", check=True)
    run_cli("sandbox", "start", "other", check=True)
    try:
        assert exec_socket_for("other") != exec_socket_for("sbx")
        sh("sbx", "echo secret-a > /workspace/only-a.txt")
        assert sh("other", "cat /workspace/only-a.txt").returncode != 0
        # the other guest's vsock reaches only its own host side: CID 2 port 9999 has no
        # listener there, even while sbx's backend exists
        probe = ("import socket; s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM);"
                 "s.settimeout(5); s.connect((2, 9999))")
        assert run_cli("vm", "exec", "other", "--", "python3", "-c", probe).returncode != 0
    finally:
        run_cli("sandbox", "rm", "other", "--purge", "--force", check=True)


def test_run_rm_leaves_nothing_behind(vm_library: Path) -> None:
    runtime = Path(os.environ["SECVF_RUNTIME_DIR"])
    before = set(runtime.iterdir())
    proc = run_cli("sandbox", "run", "--rm", "--name", "oneshot", "--memory", "512M", "--",
                   "sh", "-c", "echo ran; exit 5")
    assert proc.returncode == 5 and proc.stdout.strip().endswith("ran")
    assert not (vm_library / "vms" / "oneshot").exists()
    assert not (vm_library / "sandboxes" / "oneshot").exists()
    assert set(runtime.iterdir()) == before
    assert processes_mentioning("oneshot") == []


def test_failed_boot_cleans_up(vm_library: Path, vm_factory) -> None:
    vm_factory.sandbox("slow", "--memory", "512M")
    proc = run_cli("sandbox", "start", "slow", "--timeout", "0.5")
    assert proc.returncode != 0 and "did not become ready" in proc.stderr
    st = status("slow")
    assert st["state"] == "stopped"
    assert not list(Path(os.environ["SECVF_RUNTIME_DIR"]).glob(f"*{st['id']}*"))
    assert (vm_library / "vms" / "slow" / "disk.qcow2").exists()
    run_cli("sandbox", "start", "slow", check=True)
    assert sh("slow", "echo recovered").stdout == "recovered\n"
    run_cli("sandbox", "rm", "slow", "--purge", "--force", check=True)


def test_kill_9_of_qemu_removes_the_socket_and_marks_crashed(vm_library: Path, vm_factory) -> None:
    vm_factory.sandbox("victim", "--memory", "512M")
    run_cli("sandbox", "start", "victim", check=True)
    st = status("victim")
    sock = Path(st["exec_socket"])
    assert sock.exists()
    os.kill(st["qemu_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while status("victim")["state"] not in ("crashed", "stopped"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status("victim")["state"] == "crashed"
    assert not sock.exists()
    assert not list(Path(os.environ["SECVF_RUNTIME_DIR"]).glob(f"*{st['id']}*"))
    run_cli("sandbox", "rm", "victim", "--purge", "--force", check=True)


def test_sandbox_stop_leaves_no_helper_processes(vm_library: Path, vm_factory) -> None:
    vm_factory.sandbox("tidy", "--memory", "512M")
    run_cli("sandbox", "start", "tidy", check=True)
    vm_id = status("tidy")["id"]
    assert processes_mentioning(vm_id), "no processes for the running sandbox"
    run_cli("sandbox", "stop", "tidy", check=True)
    assert processes_mentioning(vm_id) == []
    assert not list(Path(os.environ["SECVF_RUNTIME_DIR"]).glob(f"*{vm_id}*"))
    with pytest.raises(Exception, match="not running"):
        ExecClient.connect(exec_socket_for("tidy"))
    run_cli("sandbox", "rm", "tidy", "--purge", "--force", check=True)


def test_guest_panic_is_a_crash_with_an_event(vm_library: Path, vm_factory) -> None:
    vm_factory.sandbox("panicky", "--memory", "512M")
    run_cli("sandbox", "start", "panicky", check=True)
    vm_id = status("panicky")["id"]
    sh("panicky", "echo c > /proc/sysrq-trigger", root=True)
    deadline = time.monotonic() + 60
    while status("panicky")["state"] not in ("crashed", "stopped"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    st = status("panicky")
    assert st["state"] == "crashed" and st["last_run"]["reason"] == "guest panic"
    events = [json.loads(line) for p in (vm_library / "logs").glob("security-*.jsonl")
              for line in p.read_text().splitlines()]
    assert any(e["event"] == "guest_panic" and e["vm_id"] == vm_id for e in events)
    assert any(e["event"] == "vm_crashed" and e["vm_id"] == vm_id for e in events)
    run_cli("sandbox", "rm", "panicky", "--purge", "--force", check=True)


def test_agent_restarts_after_it_dies(fleet: dict) -> None:
    sh("sbx", "kill -9 $(pgrep -f secvf/agent/agent.pyz)", root=True)
    deadline = time.monotonic() + 60
    while sh("sbx", "echo back").stdout != "back\n":
        assert time.monotonic() < deadline, "agent did not come back"
        time.sleep(0.5)


def test_dead_virtio_device_messages_are_reported(fleet: dict, vm_library: Path) -> None:
    line = "vmw_vsock_virtio_transport virtio0: rx:id 117 is not a head!"
    sh("sbx", f"echo '<3>{line}' > /dev/kmsg", root=True)
    deadline = time.monotonic() + 20
    while not status("sbx")["device_errors"]:
        assert time.monotonic() < deadline, "the supervisor did not notice"
        time.sleep(0.5)
    assert line in status("sbx")["device_errors"][0]
    events = [json.loads(x) for p in (vm_library / "logs").glob("security-*.jsonl")
              for x in p.read_text().splitlines()]
    assert any(e["event"] == "guest_device_error" and line in e["line"] for e in events)


def test_run_rm_cleans_up_after_ctrl_c(vm_library: Path) -> None:
    import sys

    runtime = Path(os.environ["SECVF_RUNTIME_DIR"])
    before = set(runtime.iterdir())
    proc = subprocess.Popen([sys.executable, "-m", "secvf", "sandbox", "run", "--rm", "--name",
                             "interrupted", "--memory", "512M", "--", "sh", "-c",
                             "echo started; sleep 120"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not (vm_library / "vms" / "interrupted").exists()
    assert set(runtime.iterdir()) == before
    assert processes_mentioning("interrupted") == []
