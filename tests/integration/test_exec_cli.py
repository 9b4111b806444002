"""``secvf vm exec`` end to end through the real CLI on one booted sandbox: a VM still
booting (``--wait``), where secvf's options end, and exit status 125 (with JSON) for
SecVF's own failures, a bad command line included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secvf.store.events import read_events
from secvf.workflows.vm_exec import wait_for_exec
from tests.helpers import run_cli

pytestmark = pytest.mark.vm

NAME = "execcli"
#: Generous bound for the guest agent of a sandbox booting under TCG on a busy host.
BOOT_WAIT_S = "600"
NOT_READY = (f"secvf: error: VM '{NAME}' is not ready yet (the guest agent is not "
             "answering); retry or use --wait SECONDS\n")


@pytest.fixture(scope="module")
def just_started(vm_library: Path) -> Iterator[str]:
    """One sandbox for the module, started (``vm start``, which does not wait for the
    guest agent) and left to boot."""
    run_cli("sandbox", "create", NAME, "--memory", "512M", check=True)
    run_cli("vm", "start", NAME, check=True)
    yield NAME
    run_cli("vm", "stop", "--force", NAME)
    run_cli("sandbox", "rm", "--purge", NAME)


@pytest.fixture
def sandbox(just_started: str) -> str:
    """The module's sandbox once its agent answers."""
    wait_for_exec(just_started, float(BOOT_WAIT_S))
    return just_started


def exec_records() -> list[dict[str, Any]]:
    return [e for e in read_events("exec") if e.get("event") == "exec" and e["vm"] == NAME]


# ---- a VM that was just started ---------------------------------------------------------------


def test_a_booting_vm_is_not_ready_yet_and_wait_runs_the_command(just_started: str) -> None:
    early = run_cli("vm", "exec", NAME, "--", "true")  # most likely still booting
    assert (early.returncode, early.stderr) in ((0, ""), (125, NOT_READY))
    waited = run_cli("vm", "exec", "--wait", BOOT_WAIT_S, NAME, "--", "echo", "after the wait")
    assert (waited.returncode, waited.stdout, waited.stderr) == (0, "after the wait\n", "")


# ---- where secvf's options end ----------------------------------------------------------------


def test_options_after_the_command_are_the_commands(sandbox: str) -> None:
    words = run_cli("vm", "exec", NAME, "ls", "-w", "200", "/")
    after_dashes = run_cli("vm", "exec", NAME, "--", "ls", "-w", "200", "/")
    assert words.returncode == after_dashes.returncode == 0
    assert words.stdout == after_dashes.stdout and "workspace" in words.stdout
    assert run_cli("vm", "exec", NAME, "-w", "/tmp", "pwd").stdout == "/tmp\n"


def test_an_unknown_option_is_a_usage_error_and_nothing_runs(sandbox: str) -> None:
    before = exec_records()
    proc = run_cli("vm", "exec", "--bogus", NAME, "--", "echo", "must not run")
    assert proc.returncode == 125 and "No such option" in proc.stderr and proc.stdout == ""
    vms = run_cli("vm", "list", "--json", check=True).stdout
    run = run_cli("sandbox", "run", "--rm", "--bogus", "--", "true")
    assert run.returncode == 125 and "No such option" in run.stderr
    assert run_cli("vm", "list", "--json", check=True).stdout == vms  # nothing was created
    assert exec_records() == before


# ---- exit status 125 and --json --------------------------------------------------------------


def test_a_missing_vm_is_125_and_json_with_json(vm_library: Path) -> None:
    proc = run_cli("vm", "exec", "--json", "no-such-vm", "--", "true")
    assert proc.returncode == 125 and proc.stderr.startswith("secvf: error: no VM named")
    error = json.loads(proc.stdout)["error"]
    assert (error["type"], error["exit_code"]) == ("NotFound", 125)


def test_json_with_i_forwards_stdin(sandbox: str) -> None:
    proc = run_cli("vm", "exec", "--json", "-i", NAME, "--", "wc", "-c", input_bytes=b"x" * 4321)
    result = json.loads(proc.stdout)
    assert (proc.returncode, result["stdout"].strip(), result["exit_status"]) == (0, "4321", 0)
