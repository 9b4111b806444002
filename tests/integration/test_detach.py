"""Background processes in a booted sandbox: ``secvf vm exec --detach``, ``vm ps``,
``vm attach`` and ``vm kill`` with real processes in the guest, and the output cap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from secvf.exec import ExecClient
from secvf.workflows.vm_exec import exec_socket_for
from tests.helpers import run_cli

pytestmark = pytest.mark.vm

#: Generous bound for the guest to get somewhere; reaching it fails the test.
WAIT_S = 120.0
#: What the guest agent keeps of a background process's output.
OUTPUT_CAP = 1024 * 1024


def detach(*command: str) -> str:
    proc = run_cli("vm", "exec", "sbx", "--detach", "--json", "--", *command, check=True)
    return json.loads(proc.stdout)["id"]


def listed(process_id: str) -> dict:
    (found,) = [p for p in json.loads(run_cli("vm", "ps", "sbx", "--json", check=True).stdout)
                if p["id"] == process_id]
    return found


def wait_until_exited(process_id: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while (info := listed(process_id))["state"] != "exited":
        assert time.monotonic() < deadline, f"{process_id} did not exit: {info}"
        time.sleep(0.2)
    return info


def alive_in_guest(pid: int) -> bool:
    with ExecClient.connect(exec_socket_for("sbx")) as c:
        result = c.run(["sh", "-c", f"kill -0 {pid} 2>/dev/null && echo yes || echo no"],
                       user="root")
    return result.stdout.strip() == b"yes"


def test_detach_ps_attach_kill_with_real_processes(fleet: dict) -> None:
    server = detach("python3", "-c", "import sys, time\nprint('serving', flush=True)\n"
                    "print('warming up', file=sys.stderr, flush=True)\ntime.sleep(600)")
    info = listed(server)
    assert (info["state"], info["user"], info["argv"][0]) == ("running", "agent", "python3")
    assert alive_in_guest(info["pid"])  # the exec that started it is long over

    # Ctrl-C in attach only detaches
    follower = subprocess.Popen([sys.executable, "-m", "secvf", "vm", "attach", "sbx", server],
                                env=os.environ.copy(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    assert follower.stdout is not None and follower.stdout.readline() == b"serving\n"
    follower.send_signal(signal.SIGINT)
    _, stderr = follower.communicate(timeout=WAIT_S)
    assert follower.returncode == 130 and f"detached from {server}".encode() in stderr
    assert listed(server)["state"] == "running" and alive_in_guest(info["pid"])

    # a client killed mid-attach leaves it running as well
    follower = subprocess.Popen([sys.executable, "-m", "secvf", "vm", "attach", "sbx", server],
                                env=os.environ.copy(), stdout=subprocess.PIPE)
    assert follower.stdout is not None and follower.stdout.readline() == b"serving\n"
    follower.kill()
    follower.wait()
    assert listed(server)["state"] == "running"

    assert run_cli("vm", "kill", "sbx", server).returncode == 0
    ended = wait_until_exited(server)
    assert (ended["exit_code"], ended["signal"]) == (None, signal.SIGTERM)
    assert not alive_in_guest(info["pid"])
    # what it wrote, each stream to its own, and the status of its death by SIGTERM
    replay = run_cli("vm", "attach", "sbx", server)
    assert (replay.returncode, replay.stdout, replay.stderr) == (
        128 + signal.SIGTERM, "serving\n", "warming up\n")
    again = run_cli("vm", "kill", "sbx", server)
    assert again.returncode == 125 and "not_running" in again.stderr


def test_attach_follows_live_output_to_the_exit_status(fleet: dict) -> None:
    job = detach("sh", "-c", "echo start; sleep 2; echo late >&2; echo end; exit 5")
    attached = run_cli("vm", "attach", "sbx", job)
    assert (attached.returncode, attached.stdout, attached.stderr) == (5, "start\nend\n",
                                                                       "late\n")
    assert wait_until_exited(job)["exit_code"] == 5
    missing = run_cli("vm", "attach", "sbx", "0000dead")
    assert missing.returncode == 125 and "not_found" in missing.stderr


def test_the_output_cap_is_reported(fleet: dict) -> None:
    total = 3_000_000
    job = detach("sh", "-c", f"head -c {total} /dev/zero; echo done")
    info = wait_until_exited(job)
    assert info["buffered_bytes"] == OUTPUT_CAP
    assert info["dropped_bytes"] == total + len("done\n") - OUTPUT_CAP
    attached = subprocess.run([sys.executable, "-m", "secvf", "vm", "attach", "sbx", job],
                              env=os.environ.copy(), capture_output=True, timeout=WAIT_S)
    assert attached.returncode == 0
    assert len(attached.stdout) == OUTPUT_CAP and attached.stdout.endswith(b"\0done\n")
    assert f"{info['dropped_bytes']} bytes of output of {job} were dropped".encode() in (
        attached.stderr)
