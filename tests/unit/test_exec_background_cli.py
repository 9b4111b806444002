"""``secvf vm exec --detach``, ``vm ps``, ``vm attach`` and ``vm kill`` through the real CLI
against a running sandbox without QEMU (tests/unit/running_sandbox.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.store.events import read_events
from tests.helpers import run_cli
from tests.unit.running_sandbox import RunningSandbox, wait_for


@pytest.fixture
def box(tmp_path: Path) -> Iterator[RunningSandbox]:
    with RunningSandbox(tmp_path, "agent1") as running:
        yield running


def ps(name: str = "agent1") -> list[dict]:
    proc = run_cli("vm", "ps", name, "--json", check=True)
    return json.loads(proc.stdout)


def one(process_id: str) -> dict:
    (found,) = [p for p in ps() if p["id"] == process_id]
    return found


def test_detach_prints_the_id_and_ps_lists_it(box: RunningSandbox) -> None:
    proc = run_cli("vm", "exec", "agent1", "--detach", "-e", "A=1", "--", "sleep", "300")
    assert proc.returncode == 0 and proc.stderr == ""
    process_id = proc.stdout.strip()
    listed = one(process_id)
    assert (listed["argv"], listed["state"], listed["exit_code"]) == (
        ["sleep", "300"], "running", None)
    assert set(listed) == {"id", "argv", "user", "pid", "state", "started_at", "exit_code",
                           "signal", "duration_ms", "buffered_bytes", "dropped_bytes"}
    table = run_cli("vm", "ps", "agent1", check=True).stdout
    assert process_id in table and "sleep 300" in table and "running" in table
    assert run_cli("vm", "kill", "agent1", process_id, "--signal", "KILL").returncode == 0
    wait_for(lambda: one(process_id)["state"] == "exited")
    assert one(process_id)["signal"] == signal.SIGKILL
    audit = {e["op"]: e for e in read_events("exec") if e.get("event") == "exec"}
    assert (audit["exec"]["outcome"], audit["exec"]["detach"], audit["exec"]["started_id"],
            audit["exec"]["argv"]) == ("detached", True, process_id, ["sleep", "300"])
    assert (audit["kill"]["outcome"], audit["kill"]["process_id"], audit["kill"]["signum"]) == (
        "killed", process_id, signal.SIGKILL)


def test_detach_json_and_attach_exits_with_the_process_status(box: RunningSandbox) -> None:
    proc = run_cli("vm", "exec", "agent1", "--detach", "--json", "-c",
                   "echo out; echo err >&2; exit 3")
    started = json.loads(proc.stdout)
    assert set(started) == {"id", "pid"} and proc.returncode == 0
    attached = run_cli("vm", "attach", "agent1", started["id"])
    assert (attached.returncode, attached.stdout, attached.stderr) == (3, "out\n", "err\n")


def test_detach_refuses_a_terminal_stdin_or_timeout(box: RunningSandbox) -> None:
    for option in (["-t"], ["-i"], ["--timeout", "5"]):
        proc = run_cli("vm", "exec", "agent1", "--detach", *option, "--", "true")
        assert proc.returncode == 125, option
        assert "--detach takes no -t, -i or --timeout" in proc.stderr
    assert ps() == []


def test_unknown_ids_and_bad_signals_are_secvf_errors(box: RunningSandbox) -> None:
    attach = run_cli("vm", "attach", "agent1", "0000dead")
    assert attach.returncode == 125
    assert "no detached process '0000dead'" in attach.stderr
    kill = run_cli("vm", "kill", "agent1", "0000dead")
    assert kill.returncode == 125 and "not_found" in kill.stderr
    bad = run_cli("vm", "kill", "agent1", "0000dead", "--signal", "NOPE")
    assert bad.returncode == 1 and "not a signal" in bad.stderr


def test_ctrl_c_in_attach_detaches_and_the_process_keeps_running(box: RunningSandbox) -> None:
    process_id = run_cli("vm", "exec", "agent1", "--detach", "-c",
                         "echo ready; exec sleep 300", check=True).stdout.strip()
    follower = subprocess.Popen([sys.executable, "-m", "secvf", "vm", "attach", "agent1",
                                 process_id], env=os.environ.copy(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    assert follower.stdout is not None and follower.stdout.readline() == b"ready\n"
    follower.send_signal(signal.SIGINT)
    _, stderr = follower.communicate(timeout=60)
    assert follower.returncode == 130
    assert b"detached from " + process_id.encode() in stderr
    assert one(process_id)["state"] == "running"
    run_cli("vm", "kill", "agent1", process_id, check=True)
