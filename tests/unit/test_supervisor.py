"""The supervisor's launch, failure and stop paths against a fake QEMU (no QEMU needed).

QEMU is replaced by ``python -m secvf.testing.qmp`` through ``$SECVF_QEMU``: a real child
process that serves the fake QMP peer on the socket named in QEMU's own command line.
Helpers are real too (an AI sandbox's vsock backend). Failure paths run the supervisor in
this process, so what its teardown did — not ``PR_SET_PDEATHSIG`` — is what the
assertions see; the happy paths go through ``runtime.control`` and a detached supervisor.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from secvf.errors import (
    ConfigError,
    CorruptRecord,
    ForbiddenDevice,
    LaunchFailed,
    NotFound,
    SecVFError,
    StateError,
    SupervisorFailed,
)
from secvf.model.config import (
    VMConfig,
)
from secvf.model.runtime import (
    FailureKind,
    LaunchStage,
    MediaRequest,
    SnapshotRequest,
    Started,
    StartFailed,
    StartReport,
    decode,
    encode,
)
from secvf.runtime import accel, control
from secvf.runtime.devtree import walk_devices
from secvf.runtime.supervisor import Supervisor, failure_of
from secvf.store import events as seclog
from secvf.store import paths
from secvf.store.bundle import RuntimeFiles
from secvf.testing.qmp import FakeQMPServer, QMPScript, generic_tree, write_fake_qemu
from tests.helpers import run_cli
from tests.unit import fake_vm
from tests.unit.fake_vm import jails_off

REPORT_WAIT_S = 30.0
#: What ``vm status --json`` prints, in order (scripts depend on it).
STATUS_KEYS = ["name", "id", "kind", "state", "pid", "qemu_pid", "accel", "accel_reason",
               "uptime_s", "guest_ready", "devices", "channels", "network", "nics", "cpus",
               "memory_mib", "exec_socket", "last_run", "vsock_backend", "device_errors",
               "snapshots", "restored_from", "hotplugged", "resource_warnings", "jail"]


# ---- fixtures ------------------------------------------------------------------------------

def make_vm(name: str, kind: str = "generic") -> VMConfig:
    """A VM bundle with real (never booted) boot files under ``$SECVF_HOME``."""
    return fake_vm.make_vm(name, paths.ensure_private_dir(paths.secvf_home() / "files"), kind)


@pytest.fixture(autouse=True)
def no_jails(secvf_env: Path) -> None:
    """Every QEMU here is a stand-in (see :func:`tests.unit.fake_vm.jails_off`)."""
    jails_off()


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """``fake_qemu(**script)``: point $SECVF_QEMU at a fake QEMU; return its command log."""

    def install(**script: object) -> Path:
        log = tmp_path / "qmp-commands.log"
        exe = write_fake_qemu(tmp_path, QMPScript(command_log=str(log), **script))
        monkeypatch.setenv("SECVF_QEMU", str(exe))
        return log

    return install


def processes_of(vm_id: str) -> list[int]:
    """Live processes whose command line names the VM (fake QEMU, helpers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if vm_id.encode() in cmdline and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def leftovers() -> Iterator[list[str]]:
    """Append VM ids; whatever process still names one at teardown is killed (by pid)."""
    ids: list[str] = []
    yield ids
    for vm_id in ids:
        for pid in processes_of(vm_id):
            os.kill(pid, signal.SIGKILL)


def run_in_process(name: str) -> tuple[Supervisor, int, Started | StartFailed]:
    """Run a supervisor for ``name`` here until it returns; decode its start report."""
    read_fd, write_fd = os.pipe()
    supervisor = Supervisor(name, report_fd=write_fd)
    try:
        code = asyncio.run(supervisor.run())
    finally:
        if supervisor.report_fd is not None:
            os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], REPORT_WAIT_S)
    data = os.read(read_fd, 65536) if ready else b""
    os.close(read_fd)
    return supervisor, code, decode(StartReport, data, source="start report").root


def runtime_files_of(vm_id: str) -> list[str]:
    return sorted(p.name for p in paths.runtime_dir().iterdir() if vm_id in p.name)


def last_run(name: str) -> dict:
    return json.loads((paths.vms_dir() / name / "last_run.json").read_text())


def assert_all_gone(supervisor: Supervisor) -> None:
    """QEMU and every helper were killed and reaped by the supervisor itself."""
    children = [supervisor.qemu, *supervisor.helpers.values()]
    assert all(c is not None and c.returncode is not None for c in children), children
    assert processes_of(supervisor.config.id) == []
    assert runtime_files_of(supervisor.config.id) == []


# ---- failure paths: teardown in finally ----------------------------------------------------

def test_qmp_error_from_cont_tears_down_and_records_a_crash(fake_qemu, leftovers) -> None:
    commands = fake_qemu(fail={"cont": "resume refused by the fake"})
    config = make_vm("nocont", "ai-sandbox")
    leftovers.append(config.id)
    supervisor, code, report = run_in_process("nocont")
    assert code == 1
    assert isinstance(report, StartFailed)
    assert (report.kind, report.stage) == (FailureKind.SUPERVISOR_FAILED, LaunchStage.RESUME)
    assert "resume refused by the fake" in report.message
    assert set(supervisor.helpers) == {"vsock"}
    assert_all_gone(supervisor)
    ended = last_run("nocont")
    assert ended["state"] == "crashed"
    assert "step 'resume'" in ended["reason"] and "resume refused by the fake" in ended["reason"]
    assert [s for s, _ in ended["transitions"]] == ["starting", "crashed"]
    assert commands.read_text().split()[-1] == "cont"
    events = [e["event"] for e in seclog.read_events() if e.get("vm") == "nocont"]
    assert events == ["vm_crashed"]


def test_qmp_error_from_the_device_walk_tears_down_and_records_a_crash(
        fake_qemu, leftovers) -> None:
    fake_qemu(fail={"qom-list": "the fake has no QOM tree"})
    config = make_vm("nowalk", "ai-sandbox")
    leftovers.append(config.id)
    supervisor, code, report = run_in_process("nowalk")
    assert code == 1
    assert isinstance(report, StartFailed)
    assert (report.kind, report.stage) == (FailureKind.SUPERVISOR_FAILED, LaunchStage.DEVICES)
    assert "the fake has no QOM tree" in report.message
    assert_all_gone(supervisor)
    ended = last_run("nowalk")
    assert ended["state"] == "crashed" and "the fake has no QOM tree" in ended["reason"]
    assert [s for s, _ in ended["transitions"]] == ["starting", "crashed"]


def test_control_socket_bind_failure_is_a_typed_failure_and_a_recorded_crash(
        fake_qemu, leftovers) -> None:
    commands = fake_qemu()
    config = make_vm("nobind")
    leftovers.append(config.id)
    blocker = RuntimeFiles(config.id).control_socket
    blocker.mkdir()  # nothing can bind a socket where a directory is
    try:
        with pytest.raises(SupervisorFailed) as caught:
            control.start_vm("nobind")
        assert caught.value.stage == LaunchStage.CONTROL
        assert caught.value.errno == errno.EADDRINUSE
        assert str(blocker) in str(caught.value)
        status = control.vm_status("nobind")
        assert status["state"] == "crashed"
        assert "step 'control'" in status["last_run"]["reason"]
        assert str(blocker) in status["last_run"]["reason"]
        assert runtime_files_of(config.id) == [blocker.name]
    finally:
        blocker.rmdir()
    assert not commands.exists(), "QEMU must not start without a control socket"
    assert processes_of(config.id) == []


def test_launch_failure_of_qemu_is_stopped_with_the_command_line(leftovers,
                                                                  monkeypatch) -> None:
    monkeypatch.setenv("SECVF_QEMU", "/nonexistent/qemu")
    config = make_vm("noqemu")
    leftovers.append(config.id)
    with pytest.raises(LaunchFailed) as caught:
        control.start_vm("noqemu")
    assert caught.value.what == "QEMU" and caught.value.argv[0] == "/nonexistent/qemu"
    status = control.vm_status("noqemu")
    assert status["state"] == "stopped"
    assert status["last_run"]["reason"].startswith("launch failed: QEMU failed to start")


def test_runtime_check_refuses_a_smuggled_channel_from_the_live_tree(fake_qemu,
                                                                     leftovers) -> None:
    tree = generic_tree()
    tree["/machine/peripheral"].append(("smuggled", "virtio-serial-pci"))
    commands = fake_qemu(tree=tree)
    config = make_vm("smuggler")
    leftovers.append(config.id)
    with pytest.raises(LaunchFailed, match="forbidden host-guest channel"):
        control.start_vm("smuggler")
    assert "cont" not in commands.read_text().split()
    status = control.vm_status("smuggler")
    assert status["state"] == "stopped"
    critical = [e for e in seclog.read_events() if e["event"] == "forbidden_device"]
    assert critical and critical[0]["devices"][0]["path"] == "/machine/peripheral/smuggled"


def test_a_stop_request_while_starting_ends_the_launch_cleanly(fake_qemu, leftovers) -> None:
    commands = fake_qemu(slow={"cont": 2.0})  # the stop request arrives meanwhile
    config = make_vm("hasty", "ai-sandbox")
    leftovers.append(config.id)
    statuses: list[dict] = []

    def stop_once_qemu_is_resuming() -> None:
        deadline = time.monotonic() + REPORT_WAIT_S
        while not (commands.exists() and "cont" in commands.read_text().split()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        statuses.append(control.stop_vm("hasty", timeout=5))

    stopper = threading.Thread(target=stop_once_qemu_is_resuming)
    stopper.start()
    supervisor, code, report = run_in_process("hasty")
    stopper.join()
    assert code == 1
    assert isinstance(report, StartFailed)
    assert (report.kind, report.state) == (FailureKind.STATE, "stopping")
    assert isinstance(control.error_from_failure(report), StateError)
    assert_all_gone(supervisor)
    assert [s["state"] for s in statuses] == ["stopped"]
    ended = last_run("hasty")
    assert (ended["state"], ended["reason"]) == ("stopped", "stop requested while starting")
    assert [s for s, _ in ended["transitions"]] == ["starting", "stopping", "stopped"]
    sent = commands.read_text().split()
    assert "cont" in sent and "system_powerdown" not in sent  # no guest to power down yet


# ---- happy paths through runtime.control ---------------------------------------------------

def test_start_and_stop_follow_the_transition_table(fake_qemu, leftovers) -> None:
    commands = fake_qemu()
    config = make_vm("happy")
    leftovers.append(config.id)
    status = control.start_vm("happy")
    assert list(status) == STATUS_KEYS
    assert status["state"] == "running" and status["accel"] == "tcg"
    assert {d["type"] for d in status["devices"]} == {"virtio-blk-pci", "virtio-rng-pci",
                                                      "pvpanic"}
    status = control.stop_vm("happy", timeout=10)
    assert list(status) == STATUS_KEYS and json.loads(json.dumps(status)) == status
    assert set(status["last_run"]) == {"state", "reason", "ended_at", "accel", "transitions"}
    assert status["state"] == "stopped" and status["last_run"]["reason"] == "stop requested"
    assert [s for s, _ in status["last_run"]["transitions"]] == [
        "starting", "running", "stopping", "stopped"]
    sent = commands.read_text().split()
    # migration set-up, the device walk, cont; then only the device watch's polls
    before, after = sent[:sent.index("cont")], sent[sent.index("cont") + 1:]
    assert before[:3] == ["qmp_capabilities", "migrate-set-capabilities",
                          "migrate-set-parameters"]
    assert set(before[3:]) == {"qom-list"}
    assert after[-1] == "system_powerdown" and set(after[:-1]) <= {"qom-list"}
    assert runtime_files_of(config.id) == []


def test_a_guest_panic_event_ends_the_run_as_crashed(fake_qemu, leftovers) -> None:
    commands = fake_qemu(events={"cont": [{"event": "GUEST_PANICKED",
                                           "data": {"action": "pause"}}]})
    config = make_vm("panics")
    leftovers.append(config.id)
    control.start_vm("panics")
    deadline = time.monotonic() + REPORT_WAIT_S
    # "crashed" is published first; last_run.json follows once teardown is done
    while (status := control.vm_status("panics"))["last_run"] is None:
        assert time.monotonic() < deadline, "the supervisor did not act on the panic"
        time.sleep(0.05)
    assert status["state"] == "crashed" and status["last_run"]["reason"] == "guest panic"
    # the last command but the device watch's qom-list polls (every 0.5 s while running)
    assert [c for c in commands.read_text().split() if c != "qom-list"][-1] == "quit"


# ---- pause and resume ----------------------------------------------------------------------

def vm_events(name: str) -> list[dict]:
    return [e for e in seclog.read_events() if e.get("vm") == name]


def after_last(commands: Path, command: str) -> list[str]:
    """The commands QEMU got after its last ``command`` (the device watch's polls left out)."""
    sent = [c for c in commands.read_text().split() if c != "qom-list"]
    return sent[len(sent) - sent[::-1].index(command):]


def test_pause_resume_and_a_graceful_stop_of_a_paused_vm(fake_qemu, leftovers) -> None:
    commands = fake_qemu()
    config = make_vm("napper")
    leftovers.append(config.id)
    control.start_vm("napper")
    status = control.pause_vm("napper")
    assert list(status) == STATUS_KEYS and status["state"] == "paused"
    assert status["pid"] and status["uptime_s"] is not None  # still a live run
    assert after_last(commands, "stop") == ["query-status"]
    assert control.pause_vm("napper")["state"] == "paused"  # again: nothing is sent
    assert [c for c in commands.read_text().split() if c == "stop"] == ["stop"]
    status = control.resume_vm("napper")
    assert status["state"] == "running" and after_last(commands, "cont") == ["query-status"]
    control.pause_vm("napper")
    events: list[control.StopWaiting | control.StopDone] = []
    status = control.stop_vm("napper", timeout=10, progress=events.append)
    # the fake guest, like a real one, sees the power button only once it runs again
    assert events[-1] == control.StopDone(forced=False, why="the guest powered off")
    assert after_last(commands, "stop") == ["query-status", "cont", "system_powerdown"]
    assert status["state"] == "stopped" and status["last_run"]["reason"] == "stop requested"
    assert [s for s, _ in status["last_run"]["transitions"]] == [
        "starting", "running", "paused", "running", "paused", "stopping", "stopped"]
    assert [(e["event"], e.get("reason")) for e in vm_events("napper")] == [
        ("vm_started", None), ("vm_paused", None), ("vm_resumed", None), ("vm_paused", None),
        ("vm_resumed", "to power off"), ("vm_stopped", "stop requested")]


def test_a_forced_stop_of_a_paused_vm_quits_without_resuming(fake_qemu, leftovers) -> None:
    commands = fake_qemu()
    config = make_vm("frozen")
    leftovers.append(config.id)
    control.start_vm("frozen")
    control.pause_vm("frozen")
    status = control.stop_vm("frozen", force=True)
    assert after_last(commands, "stop") == ["query-status", "quit"]
    assert [s for s, _ in status["last_run"]["transitions"]] == [
        "starting", "running", "paused", "stopping", "stopped"]
    assert status["state"] == "stopped" and runtime_files_of(config.id) == []


def test_a_paused_vm_refuses_snapshots_and_media_changes_and_says_how_to_resume(
        fake_qemu, leftovers, monkeypatch) -> None:
    fake_qemu()
    config = make_vm("still")
    leftovers.append(config.id)
    control.start_vm("still")
    control.pause_vm("still")
    hint = "VM 'still' is paused; resume it to {}: secvf vm resume still"
    with pytest.raises(StateError) as caught:  # refused before anything is sent
        control.snapshot_running("still", SnapshotRequest(disk_tag="t"))
    assert str(caught.value) == hint.format("take or delete a snapshot")
    with pytest.raises(StateError, match="is paused; resume it to change its medium"):
        control.change_medium("still", None)
    files = RuntimeFiles(config.id)  # and the supervisor refuses them itself
    for request, what in ((SnapshotRequest(disk_tag="t"), "take or delete a snapshot"),
                          (MediaRequest(iso=None), "change the medium")):
        reply = control._control(files, request, 10)
        assert reply is not None and not reply.ok and reply.error == hint.format(what)
    monkeypatch.setattr(control, "check_ready_marker", lambda config: None)  # an ISO VM
    with pytest.raises(StateError, match="is paused, so its guest cannot become ready"):
        control.wait_for_ready("still", 5)
    with pytest.raises(StateError, match="already running, paused; resume it"):
        control.start_vm("still")
    assert control.vm_status("still")["state"] == "paused"
    control.stop_vm("still", force=True)


def test_pause_of_a_vm_that_is_not_running_is_a_state_error(fake_qemu) -> None:
    make_vm("idle")
    for call, verb in ((control.pause_vm, "pause"), (control.resume_vm, "resume")):
        with pytest.raises(StateError) as caught:
            call("idle")
        assert str(caught.value) == (f"VM 'idle' is stopped, so it cannot {verb} (start it: "
                                     "secvf vm start idle)")
        assert caught.value.state == "stopped"


@pytest.mark.parametrize(("fail", "message"), [
    ({"stop": "the fake refuses"}, "QEMU could not pause VM 'balky': the fake refuses"),
    ({"query-status": "no status"}, "QEMU did not report the run state of VM 'balky'"),
])
def test_a_pause_qemu_does_not_confirm_leaves_the_vm_running(
        fake_qemu, leftovers, fail: dict[str, str], message: str) -> None:
    commands = fake_qemu(fail=fail)
    config = make_vm("balky")
    leftovers.append(config.id)
    control.start_vm("balky")
    with pytest.raises(SecVFError, match=message):
        control.pause_vm("balky")
    assert control.vm_status("balky")["state"] == "running"
    sent = [c for c in commands.read_text().split() if c != "qom-list"]
    assert sent[-1] == ("cont" if "query-status" in fail else "stop")  # undone, or never done
    assert "vm_paused" not in [e["event"] for e in vm_events("balky")]
    control.stop_vm("balky", force=True)


def test_the_cli_pauses_and_resumes_and_shows_paused(fake_qemu, leftovers) -> None:
    fake_qemu()
    config = make_vm("clinap")
    leftovers.append(config.id)
    control.start_vm("clinap")
    paused = run_cli("vm", "pause", "clinap", check=True)
    assert paused.stdout == "paused clinap\n"
    again = run_cli("vm", "pause", "clinap", "--json", check=True)
    assert "already paused" in again.stderr and json.loads(again.stdout)["state"] == "paused"
    assert "state:   paused" in run_cli("vm", "status", "clinap", check=True).stdout
    rows = json.loads(run_cli("vm", "list", "--json", check=True).stdout)
    assert [r["state"] for r in rows if r["name"] == "clinap"] == ["paused"]
    resumed = run_cli("vm", "resume", "clinap", "--json", check=True)
    assert json.loads(resumed.stdout)["state"] == "running"
    assert "already running" in run_cli("vm", "resume", "clinap", check=True).stderr
    run_cli("vm", "stop", "--force", "clinap", check=True)
    stopped = run_cli("vm", "pause", "clinap")
    assert stopped.returncode == 1 and "is stopped, so it cannot pause" in stopped.stderr
    assert "Traceback" not in stopped.stderr


# ---- the start report is data: round trip to the right exception ---------------------------

@pytest.mark.parametrize("exc", [
    LaunchFailed("device helper 'vsock'", ["vsock", "--x"], "line 1\nno such socket", 3),
    StateError("VM 'a' is stopping, not starting", "stopping", ["starting"]),
    NotFound("image 'base' is missing"),
    ConfigError("/x/vm.json: field 'cpus': too many"),
    ForbiddenDevice("device:virtio-serial-pci", "generic", "in /x/vm.json"),
    SupervisorFailed(LaunchStage.QMP, "QMP broke", errno.ECONNRESET),
    SecVFError("something else"),
])
def test_failures_cross_the_pipe_and_come_back_as_the_same_error(exc: SecVFError) -> None:
    wire = encode(failure_of(exc, LaunchStage.HELPERS))
    report = decode(StartReport, wire, source="start report").root
    assert isinstance(report, StartFailed)
    back = control.error_from_failure(report)
    assert type(back) is type(exc) and str(back) == str(exc)
    for attr in ("what", "argv", "output", "exitcode", "state", "required", "field", "kind",
                 "stage", "errno"):
        assert getattr(back, attr, None) == getattr(exc, attr, None), attr


def test_an_unexpected_os_error_is_a_supervisor_failure_with_its_errno() -> None:
    report = failure_of(PermissionError(errno.EACCES, "Permission denied"), LaunchStage.PLAN)
    assert (report.kind, report.stage) == (FailureKind.SUPERVISOR_FAILED, LaunchStage.PLAN)
    assert (report.errno, report.errno_name) == (errno.EACCES, "EACCES")
    assert "PermissionError" in report.message
    assert isinstance(control.error_from_failure(report), SupervisorFailed)


@pytest.mark.parametrize("line", [b"", b"LaunchFailed", b'{"ok": false, "type": "StateError"}',
                                  b'{"outcome": "failed", "kind": "exploded", "stage": "qemu",'
                                  b' "message": "x"}'])
def test_a_corrupt_report_is_a_clear_error(line: bytes) -> None:
    with pytest.raises(CorruptRecord, match="start report"):
        decode(StartReport, line, source="start report")


# ---- the fake QMP peer itself --------------------------------------------------------------

def test_the_fake_peer_negotiates_and_serves_the_device_walk(tmp_path: Path) -> None:
    from qemu.qmp import QMPClient

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        sock = tmp_path / "qmp.sock"
        async with FakeQMPServer(sock, QMPScript(events={"cont": [{"event": "X"}]})) as peer:
            qmp = QMPClient("test")
            await qmp.connect(str(sock))
            devices = await walk_devices(qmp)
            status = await qmp.execute("query-status")
            await qmp.execute("cont")
            names = [(await qmp.events.get())["event"] for _ in range(2)]
            assert status == {"running": False, "singlestep": False, "status": "prelaunch"}
            assert await qmp.execute("qom-get", {"path": "/machine/peripheral/panic0",
                                                 "property": "type"}) == "pvpanic"
            await peer.emit("GUEST_PANICKED")
            names.append((await qmp.events.get())["event"])
            await qmp.disconnect()
            return peer.commands, [d.type for d in devices], names

    commands, types, events = asyncio.run(scenario())
    assert commands[:2] == ["qmp_capabilities", "qom-list"]
    assert "virtio-blk-device" in types and "pvpanic" in types
    assert events == ["X", "RESUME", "GUEST_PANICKED"]


# ---- the accelerator probe runs $SECVF_QEMU and caches per binary --------------------------

def fake_probe_qemu(path: Path, argv_log: Path) -> Path:
    path.write_text(f'#!/bin/sh\necho "$@" > {argv_log}\necho {accel.PROBE_MARKER}\n')
    path.chmod(0o755)
    return path


def test_the_probe_runs_secvf_qemu(tmp_path: Path, monkeypatch) -> None:
    argv_log = tmp_path / "argv"
    monkeypatch.setenv("SECVF_QEMU", str(fake_probe_qemu(tmp_path / "q", argv_log)))
    choice = accel.probe_accel("kvm", tmp_path / "kernel", tmp_path / "initrd")
    assert choice.accel == "kvm" and "booted a guest" in choice.reason
    assert argv_log.read_text().startswith("-accel kvm")


def test_the_verdict_cache_is_keyed_by_qemu_binary(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SECVF_CACHE", str(tmp_path / "cache"))
    one = fake_probe_qemu(tmp_path / "one", tmp_path / "argv")
    two = fake_probe_qemu(tmp_path / "two", tmp_path / "argv")
    assert accel.probe_cache_path(str(one)) == accel.probe_cache_path(str(one))
    assert accel.probe_cache_path(str(one)) != accel.probe_cache_path(str(two))
    before = accel.probe_cache_path(str(one))
    os.utime(one, ns=(1, 1))  # a rebuilt binary at the same path
    assert accel.probe_cache_path(str(one)) != before
    monkeypatch.setenv("SECVF_QEMU", str(two))
    assert accel.probe_cache_path() == accel.probe_cache_path(str(two))
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert accel.probe_cache_path().name.startswith(f"kvm-probe-{boot_id}-")


def test_an_explicit_kvm_request_is_refused_with_the_probe_reason(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """``--accel kvm`` where KVM does not work fails with the reason, not with QEMU's exit."""
    from secvf.errors import ConfigError
    from secvf.model.config import Accel
    from secvf.runtime import accel

    monkeypatch.setattr(accel, "kvm_problem", lambda kernel, initrd: "probe failed: MSR")
    with pytest.raises(ConfigError, match="KVM is not usable here: probe failed: MSR"):
        accel.choose_accel(Accel.KVM, None, None)
    assert accel.choose_accel(Accel.TCG, None, None).accel == "tcg"
