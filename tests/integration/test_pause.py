"""``secvf vm pause`` / ``vm resume`` on a real AI sandbox: a paused guest does not run
(its clock stands still, exec is refused), a resumed one runs on (exec works, the restore
watch steps its clock past the pause), and a paused guest can still be stopped gracefully
(the supervisor resumes it so it sees the ACPI power button)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.vm

NAME = "napper"
#: How long the guest stays paused: longer than a ``vm exec`` takes to reach the guest.
PAUSE_S = 6.0
#: How long the restore watch may take to notice the pause (it samples once a second).
WATCH_WAIT_S = 60.0


def status() -> dict:
    return json.loads(run_cli("vm", "status", NAME, "--json", check=True).stdout)


def sh(script: str) -> subprocess.CompletedProcess[str]:
    return run_cli("vm", "exec", NAME, "-c", script)


def guest_uptime() -> float:
    """The guest's CLOCK_MONOTONIC-based uptime; it stands still while QEMU is paused."""
    proc = sh("cat /proc/uptime")
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.split()[0])


def wait_for_log(text: str) -> str:
    """The VM's serial log of this run once it holds ``text``."""
    deadline = time.monotonic() + WATCH_WAIT_S
    while text not in (log := run_cli("vm", "logs", NAME).stdout):
        assert time.monotonic() < deadline, f"no {text!r} in the serial log:\n{log}"
        time.sleep(1)
    return log


def test_a_paused_guest_stands_still_and_a_resumed_one_runs_on(vm_library: Path,
                                                               vm_factory) -> None:
    vm_factory.sandbox(NAME, "--memory", "512M")
    run_cli("sandbox", "start", NAME, check=True)
    # init does not wait for the watch: paused before it is armed, its arming would fix the
    # clock instead (a different line)
    wait_for_log("restore watch armed")
    guest_before = guest_uptime()
    host_before = time.monotonic()  # after the guest read its clock

    paused = json.loads(run_cli("vm", "pause", NAME, "--json", check=True).stdout)
    assert paused["state"] == "paused" and status()["state"] == "paused"
    assert paused["qemu_pid"] and paused["exec_socket"]  # the run goes on, only frozen
    refused = sh("echo should-not-run")
    assert refused.returncode == 125, refused
    assert f"VM '{NAME}' is paused; resume it: secvf vm resume {NAME}" in refused.stderr
    again = run_cli("vm", "pause", NAME, check=True)
    assert f"VM '{NAME}' is already paused" in again.stderr
    serial_paused = run_cli("vm", "logs", NAME, check=True).stdout
    time.sleep(PAUSE_S)

    resumed = json.loads(run_cli("vm", "resume", NAME, "--json", check=True).stdout)
    assert resumed["state"] == "running"
    guest_after = guest_uptime()
    host_elapsed = time.monotonic() - host_before  # at most a round trip more than the guest's
    guest_elapsed = guest_after - guest_before
    print(f"host {host_elapsed:.2f} s, guest {guest_elapsed:.2f} s across a {PAUSE_S} s pause")
    # a guest that kept running would have seen at least the host's time go by
    assert guest_elapsed < host_elapsed - PAUSE_S / 2
    assert sh("echo awake").stdout == "awake\n"
    log = wait_for_log("(restored or paused)")  # the restore watch stepped the clock
    assert log.startswith(serial_paused)  # the same run's log, grown after the resume

    run_cli("vm", "pause", NAME, check=True)
    stopped = json.loads(run_cli("vm", "stop", NAME, "--json", check=True).stdout)
    assert stopped["state"] == "stopped" and stopped["forced"] is False
    assert stopped["last_run"]["reason"] == "stop requested"
    assert [s for s, _ in stopped["last_run"]["transitions"]] == [
        "starting", "running", "paused", "running", "paused", "stopping", "stopped"]
    events = [e["event"] for path in sorted((vm_library / "logs").glob("security-*.jsonl"))
              for line in path.read_text().splitlines()
              if (e := json.loads(line)).get("vm_id") == stopped["id"]
              and e["event"] in ("vm_paused", "vm_resumed")]
    assert events == ["vm_paused", "vm_resumed", "vm_paused", "vm_resumed"]
