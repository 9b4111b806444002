"""CLI conventions that need built images or a booted sandbox (see
tests/unit/test_cli_conventions.py for the rest): idempotent sandbox start, sizes and
image hints in units and recipe names."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.vm


def test_sandbox_start_of_a_running_sandbox_is_a_note(fleet: dict) -> None:
    proc = run_cli("sandbox", "start", "sbx")
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr == "secvf: note: sandbox 'sbx' is already running\n"
    status = json.loads(run_cli("sandbox", "start", "sbx", "--json", check=True).stdout)
    assert status["state"] == "running" and status["exec_socket"] == fleet["sbx"]["exec_socket"]


def test_disk_smaller_than_its_image_is_told_in_units(built_images: dict) -> None:
    proc = run_cli("vm", "create", "tiny", "--disk", "64M")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--disk 64M is smaller than image 'base' (" in proc.stderr
    assert " bytes" not in proc.stderr and "or more" in proc.stderr
    proc = run_cli("sandbox", "create", "tiny", "--image", "nope")
    assert proc.returncode == 1 and "image build" not in proc.stderr
