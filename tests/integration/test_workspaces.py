"""Workspaces with real guests: a sandbox clone boots on a directory of its own, and a
running sandbox is removed only when the user says so."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.terminal_helpers import run_on_a_terminal

pytestmark = pytest.mark.vm


def sh(name: str, script: str) -> subprocess.CompletedProcess[str]:
    return run_cli("vm", "exec", name, "-c", script)


def status(name: str) -> dict:
    return json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)


def processes_mentioning(text: str) -> list[str]:
    # -ww: full command lines whatever $COLUMNS says
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def test_a_clone_boots_on_its_own_workspace_and_rm_asks_first(vm_factory,
                                                              vm_library: Path) -> None:
    source = vm_factory.sandbox("ws-src", "--memory", "512M")
    run_cli("sandbox", "start", source, check=True)
    assert sh(source, "echo from-source > /workspace/a.txt").returncode == 0
    run_cli("sandbox", "stop", source, check=True)

    run_cli("vm", "clone", source, "ws-copy", "--copy-workspace", check=True)
    vm_factory.made["ws-copy"] = "sandbox"
    run_cli("sandbox", "start", "ws-copy", check=True)
    assert sh("ws-copy", "cat /workspace/a.txt").stdout == "from-source\n"
    assert sh("ws-copy", "echo from-copy > /workspace/b.txt").returncode == 0
    sandboxes = vm_library / "sandboxes"
    assert (sandboxes / "ws-copy" / "workspace" / "b.txt").read_text() == "from-copy\n"
    assert sorted(p.name for p in (sandboxes / source / "workspace").iterdir()) == ["a.txt"]

    vm_id = status("ws-copy")["id"]
    refused = run_cli("sandbox", "rm", "ws-copy")
    assert refused.returncode != 0 and "--force" in refused.stderr
    code, output = run_on_a_terminal(["sandbox", "rm", "ws-copy"], b"n\n")
    assert code != 0 and "stop it and delete it?" in output
    assert status("ws-copy")["state"] == "running"
    code, output = run_on_a_terminal(["sandbox", "rm", "--purge", "ws-copy"], b"y\n")
    assert code == 0, output
    assert not (vm_library / "vms" / "ws-copy").exists()
    assert not (sandboxes / "ws-copy").exists()
    assert processes_mentioning(vm_id) == []
    assert (sandboxes / source / "workspace" / "a.txt").exists()
