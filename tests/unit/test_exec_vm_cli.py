"""``secvf vm exec`` (and ``sandbox run``) through the real CLI against a running sandbox
without QEMU (tests/unit/running_sandbox.py): where options end, exit codes of SecVF's
own failures, ``--json`` always JSON, Ctrl-C, and a VM whose agent is not up yet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secvf.store.events import read_events
from tests.helpers import run_cli
from tests.unit.running_sandbox import WAIT_S, RunningSandbox, wait_for

NOT_READY = ("secvf: error: VM 'agent1' is not ready yet (the guest agent is not answering); "
             "retry or use --wait SECONDS\n")


@pytest.fixture
def box(tmp_path: Path) -> Iterator[RunningSandbox]:
    with RunningSandbox(tmp_path, "agent1") as running:
        yield running


@pytest.fixture
def booting(tmp_path: Path) -> Iterator[RunningSandbox]:
    """A sandbox whose bridge is up but whose guest agent does not listen yet."""
    with RunningSandbox(tmp_path, "agent1", agent_listening=False) as running:
        yield running


def exec_records() -> list[dict[str, Any]]:
    return [e for e in read_events("exec") if e.get("event") == "exec"]


def start_cli(*args: str) -> subprocess.Popen[bytes]:
    """The real CLI in the background, its stdout and stderr captured."""
    return subprocess.Popen([sys.executable, "-m", "secvf", *args], env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# ---- where secvf's options end --------------------------------------------------------------


def test_options_after_the_command_are_the_commands(box: RunningSandbox) -> None:
    proc = run_cli("vm", "exec", "agent1", "echo", "-w", "200", "--json", "-i")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "-w 200 --json -i\n", "")


def test_options_before_the_command_are_secvfs_on_either_side_of_name(
        box: RunningSandbox) -> None:
    assert run_cli("vm", "exec", "agent1", "-w", "/tmp", "pwd").stdout == "/tmp\n"
    assert run_cli("vm", "exec", "-w", "/tmp", "agent1", "-e", "A=1", "--", "sh", "-c",
                   "pwd; echo $A").stdout == "/tmp\n1\n"
    assert run_cli("vm", "exec", "agent1", "-c", "echo shell").stdout == "shell\n"


@pytest.mark.parametrize("args", [
    ("--bogus", "agent1", "--", "true"),
    ("agent1", "--bogus", "true"),
    ("agent1", "--timeout", "-1", "--", "true"),
    (),
])
def test_a_bad_command_line_exits_125_before_anything_runs(
        box: RunningSandbox, args: tuple[str, ...]) -> None:
    proc = run_cli("vm", "exec", *args)
    assert proc.returncode == 125 and "Usage:" in proc.stderr and proc.stdout == ""
    assert box.vsock.requests == [] and exec_records() == []


def test_a_bad_command_line_with_json_is_a_json_error(box: RunningSandbox) -> None:
    proc = run_cli("vm", "exec", "--json", "--bogus", "agent1", "--", "true")
    assert proc.returncode == 125 and "No such option" in proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert (error["type"], error["exit_code"]) == ("UsageError", 125)
    assert "--bogus" in error["message"]


def test_sandbox_run_refuses_unknown_options_before_creating_anything() -> None:
    proc = run_cli("sandbox", "run", "--rm", "--bogus", "--", "true")
    assert proc.returncode == 125 and "No such option" in proc.stderr
    assert json.loads(run_cli("vm", "list", "--json", check=True).stdout) == []


# ---- exit codes and --json -------------------------------------------------------------------


@pytest.mark.parametrize(("args", "error_type"), [
    (("ghost", "--", "true"), "NotFound"),
    (("agent1", "-e", "NOVALUE", "--", "true"), "ConfigError"),
    (("agent1", "--root", "-u", "x", "--", "true"), "ConfigError"),
    (("agent1",), "ConfigError"),
])
def test_secvf_errors_exit_125_and_are_json_with_json(
        box: RunningSandbox, args: tuple[str, ...], error_type: str) -> None:
    plain = run_cli("vm", "exec", *args)
    assert plain.returncode == 125 and plain.stderr.startswith("secvf: error: ")
    as_json = run_cli("vm", "exec", "--json", *args)
    assert as_json.returncode == 125 and as_json.stderr == plain.stderr
    assert json.loads(as_json.stdout)["error"] == {
        "type": error_type, "message": plain.stderr[len("secvf: error: "):-1],
        "exit_code": 125}


def test_the_commands_own_status_stays_its_own(box: RunningSandbox) -> None:
    assert run_cli("vm", "exec", "agent1", "-c", "exit 3").returncode == 3
    assert run_cli("vm", "exec", "agent1", "--", "no-such-command-xyz").returncode == 127
    proc = run_cli("vm", "exec", "--json", "agent1", "--", "no-such-command-xyz")
    assert (proc.returncode, json.loads(proc.stdout)["error"]["type"]) == (
        127, "CommandStartFailed")


def test_json_with_i_forwards_stdin(box: RunningSandbox) -> None:
    proc = run_cli("vm", "exec", "--json", "-i", "agent1", "--", "wc", "-c",
                   input_bytes=b"x" * 12345)
    result = json.loads(proc.stdout)
    assert (proc.returncode, result["stdout"].strip(), result["exit_status"]) == (0, "12345", 0)


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_exits_130_quietly_and_the_guest_kills_the_command(
        box: RunningSandbox, tmp_path: Path, as_json: bool) -> None:
    marker = tmp_path / "running"
    cli = start_cli("vm", "exec", *(["--json"] if as_json else []), "agent1", "--", "sh", "-c",
                    f"touch {marker}; exec sleep 300")
    wait_for(marker.exists)
    cli.send_signal(signal.SIGINT)
    stdout, stderr = cli.communicate(timeout=WAIT_S)
    assert cli.returncode == 130 and b"Aborted" not in stderr and b"Traceback" not in stderr
    if as_json:
        assert json.loads(stdout)["error"]["exit_code"] == 130
    record = wait_for(lambda: [r for r in exec_records() if r["outcome"] == "disconnected"])
    assert record[0]["argv"][:2] == ["sh", "-c"]


# ---- a VM whose agent does not answer yet ---------------------------------------------------


def test_a_booting_vm_is_not_ready_yet_not_a_protocol_error(booting: RunningSandbox) -> None:
    proc = run_cli("vm", "exec", "agent1", "--", "true")
    assert (proc.returncode, proc.stderr) == (125, NOT_READY)
    as_json = json.loads(run_cli("vm", "exec", "--json", "agent1", "--", "true").stdout)
    assert as_json["error"]["type"] == "AgentUnavailable"
    assert booting.vsock.refused >= 2  # the bridge asked the guest each time


def test_a_vm_whose_supervisor_is_still_starting_is_not_ready_yet(
        booting: RunningSandbox) -> None:
    booting.stop_bridge()  # before the supervisor started the bridge: no socket yet
    booting.files.state_file.unlink()  # a supervisor that has not published its record
    proc = run_cli("vm", "exec", "agent1", "--", "true")
    assert (proc.returncode, proc.stderr) == (125, NOT_READY)


def test_wait_runs_the_command_once_the_agent_answers(booting: RunningSandbox) -> None:
    cli = start_cli("vm", "exec", "--wait", "120", "agent1", "--", "echo", "ready")
    wait_for(lambda: booting.vsock.refused >= 1)  # it tried while the guest was booting
    booting.agent_starts_listening()
    stdout, stderr = cli.communicate(timeout=WAIT_S)
    assert (cli.returncode, stdout, stderr) == (0, b"ready\n", b"")


def test_wait_gives_up_with_the_not_ready_message(booting: RunningSandbox) -> None:
    proc = run_cli("vm", "exec", "--wait", "0.5", "agent1", "--", "true")
    assert (proc.returncode, proc.stderr) == (125, NOT_READY)


def test_wait_does_not_wait_for_a_stopped_vm(box: RunningSandbox) -> None:
    box.stop()  # the supervisor is gone
    proc = run_cli("vm", "exec", "--wait", "3600", "agent1", "--", "true")
    assert proc.returncode == 125 and "is not running" in proc.stderr
