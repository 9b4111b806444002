"""VM lifecycle with real QEMU processes (firmware-only guests booting a blank ISO:
no guest image needed, so these run in every test session)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from secvf.errors import CorruptRecord, IllegalTransition, StateError
from secvf.faces.cli.app import LIVE_STATES as CLI_LIVE_STATES
from secvf.model.config import VMKind
from secvf.model.enums import LIVE_STATES
from secvf.model.runtime import LastRun, RuntimeRecord, VmState
from secvf.runtime.lifecycle import FINAL_STATES, TRANSITIONS, Lifecycle, paused_error
from secvf.store import events as seclog
from secvf.store.bundle import RuntimeFiles
from secvf.store.library import get_vm
from secvf.store.locks import FileLock
from secvf.store.runstate import (
    current_state,
    reap_stale_runtime,
    write_last_run,
    write_runtime_state,
)
from secvf.workflows.audit import audit_vm
from tests.helpers import run_cli
from tests.unit.fake_vm import jails_off


@pytest.fixture
def iso(tmp_path: Path) -> Path:
    path = tmp_path / "blank.iso"
    path.write_bytes(b"\0" * 2048)
    return path


def status(name: str) -> dict:
    return json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)


def qemu_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def wait_until(pred, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_start_status_stop_transitions_in_order(iso: Path) -> None:
    run_cli("vm", "create", "life", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    assert status("life")["state"] == "stopped"
    run_cli("vm", "start", "life", check=True)
    st = status("life")
    assert st["state"] == "running" and st["accel"] == "tcg"
    assert qemu_alive(st["qemu_pid"])
    types = {d["type"] for d in st["devices"]}
    assert {"virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci", "ide-cd", "pvpanic"} <= types
    assert st["channels"] == []
    proc = run_cli("vm", "start", "life")  # idempotent, like systemctl start
    assert proc.returncode == 0 and "already running" in proc.stderr
    run_cli("vm", "stop", "life", "--timeout", "1", check=True)
    qemu_pid = st["qemu_pid"]
    st = status("life")
    assert st["state"] == "stopped" and not qemu_alive(qemu_pid)
    states = [s for s, _ in st["last_run"]["transitions"]]
    assert states == ["starting", "running", "stopping", "stopped"]
    events = [e["event"] for e in seclog.read_events() if e.get("vm") == "life"]
    assert events == ["vm_created", "vm_started", "vm_forced_stop", "vm_stopped"]


def test_kill_9_of_the_supervisor_takes_qemu_down(iso: Path) -> None:
    run_cli("vm", "create", "k9", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    run_cli("vm", "start", "k9", check=True)
    st = status("k9")
    runtime = Path(os.environ["SECVF_RUNTIME_DIR"])
    assert RuntimeFiles(st["id"]).qmp_socket.exists()
    os.kill(st["pid"], signal.SIGKILL)
    assert wait_until(lambda: not qemu_alive(st["qemu_pid"])), "QEMU outlived its supervisor"
    assert status("k9")["state"] == "stopped"
    assert [p.name for p in runtime.iterdir() if st["id"] in p.name] == []


def test_concurrent_starts_exactly_one_wins(iso: Path) -> None:
    run_cli("vm", "create", "race", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(run_cli("vm", "start", "race")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [p for p in results if p.returncode == 0 and "already running" not in p.stderr]
    assert len(winners) == 1, [(p.returncode, p.stderr) for p in results]
    losers = [p for p in results if p is not winners[0]]
    assert all(p.returncode != 0 or "already running" in p.stderr for p in losers)
    assert status("race")["state"] == "running"
    started = [e for e in seclog.read_events() if e.get("vm") == "race"
               and e["event"] == "vm_started"]
    assert len(started) == 1
    run_cli("vm", "stop", "race", "--force", check=True)


def test_delete_running_vm_needs_force(iso: Path, secvf_env: Path) -> None:
    run_cli("vm", "create", "del", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    run_cli("vm", "start", "del", check=True)
    qemu = status("del")["qemu_pid"]
    proc = run_cli("vm", "delete", "del")
    assert proc.returncode != 0 and "running" in proc.stderr
    assert (secvf_env / "vms" / "del" / "vm.json").exists()
    run_cli("vm", "delete", "del", "--force", check=True)
    assert not (secvf_env / "vms" / "del").exists()
    assert not qemu_alive(qemu)


def test_qemu_failure_shows_stderr_and_command_line(iso: Path, tmp_path: Path,
                                                    monkeypatch) -> None:
    """The real QEMU refuses its command line (an extra device it does not know)."""
    run_cli("vm", "create", "bad", "--iso", str(iso), "--accel", "tcg", check=True)
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text('#!/bin/sh\nexec qemu-system-x86_64 "$@" -device no-such-device\n')
    qemu.chmod(0o755)
    monkeypatch.setenv("SECVF_QEMU", str(qemu))
    jails_off()  # the wrapper script is not in a jail's view
    proc = run_cli("vm", "start", "bad")
    assert proc.returncode != 0
    assert "QEMU failed to start" in proc.stderr
    assert f"command line: {qemu}" in proc.stderr
    assert str(iso) in proc.stderr and "no-such-device" in proc.stderr
    assert status("bad")["state"] == "stopped"


def test_runtime_check_stops_a_vm_with_a_smuggled_channel(iso: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    wrapper = tmp_path / "qemu-wrapper"
    wrapper.write_text('#!/bin/sh\nexec qemu-system-x86_64 "$@" '
                       "-device virtio-serial-pci,id=smuggled\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("SECVF_QEMU", str(wrapper))
    jails_off()  # the wrapper script is not in a jail's view
    run_cli("vm", "create", "evil", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    proc = run_cli("vm", "start", "evil")
    assert proc.returncode != 0 and "forbidden host-guest channel" in proc.stderr
    assert status("evil")["state"] == "stopped"
    critical = [e for e in seclog.read_events() if e["event"] == "forbidden_device"]
    assert critical and critical[0]["severity"] == "CRITICAL"
    assert "virtio-serial" in json.dumps(critical[0]["devices"])


def test_clone_and_rename_keep_kind_and_get_new_identity(iso: Path) -> None:
    run_cli("vm", "create", "src", "--kind", "malware-analysis", "--iso", str(iso),
            check=True)
    run_cli("vm", "clone", "src", "dst", check=True)
    a, b = status("src"), status("dst")
    assert b["kind"] == "malware-analysis" and b["network"] == "none"
    assert a["id"] != b["id"]
    run_cli("vm", "rename", "dst", "dst2", check=True)
    assert status("dst2")["id"] == b["id"]
    run_cli("vm", "start", "dst2", "--accel", "tcg", check=True)
    assert status("dst2")["state"] == "running"
    run_cli("vm", "stop", "dst2", "--force", check=True)


# ---- the supervisor's state machine (no QEMU) ----------------------------------------------

#: The shortest way to each state from a fresh lifecycle.
PATH_TO = {
    VmState.STOPPED: [],
    VmState.STARTING: [VmState.STARTING],
    VmState.RUNNING: [VmState.STARTING, VmState.RUNNING],
    VmState.PAUSED: [VmState.STARTING, VmState.RUNNING, VmState.PAUSED],
    VmState.STOPPING: [VmState.STARTING, VmState.RUNNING, VmState.STOPPING],
    VmState.CRASHED: [VmState.STARTING, VmState.CRASHED],
}
EXPECTED_EDGES = {
    (VmState.STOPPED, VmState.STARTING),
    (VmState.STARTING, VmState.RUNNING), (VmState.STARTING, VmState.STOPPING),
    (VmState.STARTING, VmState.STOPPED), (VmState.STARTING, VmState.CRASHED),
    (VmState.RUNNING, VmState.STOPPING), (VmState.RUNNING, VmState.STOPPED),
    (VmState.RUNNING, VmState.CRASHED), (VmState.RUNNING, VmState.PAUSED),
    (VmState.PAUSED, VmState.RUNNING), (VmState.PAUSED, VmState.STOPPING),
    (VmState.PAUSED, VmState.CRASHED),
    (VmState.STOPPING, VmState.STOPPED), (VmState.STOPPING, VmState.CRASHED),
}


def new_lifecycle(published: list[RuntimeRecord] | None = None) -> Lifecycle:
    sink = published.append if published is not None else (lambda record: None)
    return Lifecycle(name="vm", vm_id="00000000-0000-0000-0000-000000000001",
                     kind=VMKind.GENERIC, publish=sink)


def walk(life: Lifecycle, states: list[VmState]) -> None:
    for state in states:
        extra = {"supervisor_pid": 1, "started_at": "t"} if state is VmState.STARTING else {}
        life.transition(state, **extra)


def test_the_table_is_the_documented_one() -> None:
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == EXPECTED_EDGES
    assert set(TRANSITIONS) == set(VmState)


@pytest.mark.parametrize("src", list(VmState))
@pytest.mark.parametrize("dst", list(VmState))
def test_every_transition_is_checked(src: VmState, dst: VmState) -> None:
    life = new_lifecycle()
    walk(life, PATH_TO[src])
    extra = {"supervisor_pid": 1, "started_at": "t"} if dst is VmState.STARTING else {}
    if (src, dst) in EXPECTED_EDGES:
        assert life.transition(dst, **extra).state is dst
    else:
        with pytest.raises(IllegalTransition) as caught:
            life.transition(dst, **extra)
        assert caught.value.state == src.value
        assert life.state is src


def test_publishes_every_change_and_records_the_sequence() -> None:
    published: list[RuntimeRecord] = []
    life = new_lifecycle(published)
    walk(life, [VmState.STARTING])
    life.update(accel="tcg", accel_reason="requested")
    walk(life, [VmState.RUNNING])
    life.update(guest_ready=True)
    walk(life, [VmState.STOPPING, VmState.STOPPED])
    assert [r.state for r in published] == [
        VmState.STARTING, VmState.STARTING, VmState.RUNNING, VmState.RUNNING,
        VmState.STOPPING, VmState.STOPPED]
    assert [t.state for t in published[-1].transitions] == [
        VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.STOPPED]
    assert published[-1].accel == "tcg" and published[-1].guest_ready
    assert life.record == published[-1]


def test_updates_never_change_the_state_and_need_a_live_run() -> None:
    life = new_lifecycle()
    with pytest.raises(StateError):
        life.update(accel="tcg")  # not started
    walk(life, [VmState.STARTING])
    with pytest.raises(TypeError):
        life.update(state=VmState.RUNNING)
    with pytest.raises(TypeError):
        life.transition(VmState.RUNNING, transitions=[])
    walk(life, [VmState.STOPPED])
    with pytest.raises(StateError):
        life.update(accel="tcg")  # ended
    with pytest.raises(IllegalTransition, match="ended"):
        walk(life, [VmState.STARTING])  # one run per lifecycle
    assert VmState.STOPPED in FINAL_STATES


def test_a_pause_is_a_state_of_the_run_and_leaves_through_stopping_or_crashed() -> None:
    published: list[RuntimeRecord] = []
    life = new_lifecycle(published)
    walk(life, [VmState.STARTING, VmState.RUNNING, VmState.PAUSED])
    life.update(guest_ready=True)  # a paused run is live: its record still changes
    assert published[-1].state is VmState.PAUSED and published[-1].guest_ready
    with pytest.raises(IllegalTransition) as caught:
        life.transition(VmState.STOPPED)  # a paused guest cannot power itself off
    assert caught.value.state == "paused" and life.state is VmState.PAUSED
    walk(life, [VmState.RUNNING, VmState.PAUSED, VmState.STOPPING, VmState.STOPPED])
    assert [t.state for t in life.transitions] == [
        VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.RUNNING, VmState.PAUSED,
        VmState.STOPPING, VmState.STOPPED]
    assert VmState.PAUSED in LIVE_STATES and VmState.PAUSED not in FINAL_STATES
    assert set(CLI_LIVE_STATES) == {s.value for s in LIVE_STATES}


def test_before_publish_sees_the_new_record_before_anyone_else() -> None:
    published: list[RuntimeRecord] = []
    life = new_lifecycle(published)
    walk(life, [VmState.STARTING, VmState.RUNNING])
    seen: list[tuple[VmState, int]] = []
    record = life.transition(VmState.CRASHED, before_publish=lambda rec: seen.append(
        (rec.transitions[-1].state, len(published))))
    assert seen == [(VmState.CRASHED, 2)]  # the final transition, before its publication
    assert published[-1] is record and len(published) == 3


def test_paused_error_says_how_to_resume() -> None:
    exc = paused_error("web", "take a snapshot")
    assert isinstance(exc, StateError) and (exc.state, exc.required) == ("paused", ("running",))
    assert str(exc) == "VM 'web' is paused; resume it to take a snapshot: secvf vm resume web"


def test_require_names_the_state_it_needed() -> None:
    life = new_lifecycle()
    walk(life, [VmState.STARTING, VmState.STOPPING])
    with pytest.raises(StateError) as caught:
        life.require(VmState.STARTING)
    assert caught.value.state == "stopping" and caught.value.required == ("starting",)


# ---- reading is pure; reaping is explicit ----------------------------------------------------

def test_current_state_is_pure_and_reaping_is_explicit(iso: Path) -> None:
    run_cli("vm", "create", "stale", "--iso", str(iso), check=True)
    bundle, config = get_vm("stale")
    files = RuntimeFiles(config.id)
    for path in (files.state_file, files.control_socket, files.exec_socket):
        path.write_text("left by a supervisor that was killed")
    view = current_state(bundle, config.id)
    assert view.state is VmState.STOPPED and view.record is None and not view.live
    assert files.state_file.exists() and files.exec_socket.exists()
    with FileLock(bundle.run_lock, "test"):  # a live supervisor: nothing is touched
        assert reap_stale_runtime(bundle, config.id) == []
        assert files.control_socket.exists()
    assert sorted(reap_stale_runtime(bundle, config.id)) == sorted(
        p.name for p in (files.state_file, files.control_socket, files.exec_socket))
    assert not files.state_file.exists() and reap_stale_runtime(bundle, config.id) == []


def test_audit_reports_leftovers_before_it_reaps_them(iso: Path) -> None:
    run_cli("vm", "create", "leaky", "--iso", str(iso), check=True)
    bundle, config = get_vm("leaky")
    files = RuntimeFiles(config.id)
    files.exec_socket.write_text("")
    files.state_file.write_text("{}")
    result = audit_vm(config, bundle)
    assert result.state == "stopped"
    assert result.exec_socket is not None and result.exec_socket["path"] == str(files.exec_socket)
    assert any("exec socket" in f for f in result.findings)
    assert not files.exec_socket.exists() and not files.state_file.exists()
    assert audit_vm(config, bundle).findings == []


def test_corrupt_run_records_are_one_line_errors_naming_the_file(iso: Path) -> None:
    run_cli("vm", "create", "torn", "--iso", str(iso), check=True)
    bundle, config = get_vm("torn")
    bundle.last_run_file.write_text('{"state": "exploded", "reason": "?", "ended_at": "t"}')
    with pytest.raises(CorruptRecord, match=r"last_run\.json: field 'state'"):
        current_state(bundle, config.id)
    proc = run_cli("vm", "status", "torn")
    assert proc.returncode == 1 and "last_run.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    RuntimeFiles(config.id).state_file.write_text("not json")
    with FileLock(bundle.run_lock, "test"), pytest.raises(CorruptRecord, match="not valid JSON"):
        current_state(bundle, config.id)


def test_a_run_seen_ending_shows_why_it_ended(iso: Path) -> None:
    """Between publishing its final state and releasing the run lock, a supervisor is
    still running: the view of that moment carries the last run it wrote just before."""
    run_cli("vm", "create", "ending", "--iso", str(iso), check=True)
    bundle, config = get_vm("ending")
    published: list[RuntimeRecord] = []
    life = Lifecycle(name="ending", vm_id=config.id, kind=VMKind.GENERIC, publish=published.append)
    walk(life, [VmState.STARTING, VmState.RUNNING])
    write_last_run(bundle, LastRun(state=VmState.STOPPED, reason="an earlier run", ended_at="t",
                                   transitions=life.transitions))
    with FileLock(bundle.run_lock, "test"):
        write_runtime_state(RuntimeFiles(config.id), published[-1])
        view = current_state(bundle, config.id)
        assert view.state is VmState.RUNNING and view.live and view.last_run is None
        write_last_run(bundle, LastRun(state=VmState.CRASHED, reason="forbidden device",
                                       ended_at="t", transitions=life.transitions))
        life.transition(VmState.CRASHED)
        write_runtime_state(RuntimeFiles(config.id), published[-1])
        view = current_state(bundle, config.id)
    assert view.state is VmState.CRASHED and not view.live
    assert view.last_run is not None and view.last_run.reason == "forbidden device"
