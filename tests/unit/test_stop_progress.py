"""``vm stop`` says what it waits for and whether it forced: progress on stderr, a
``forced`` flag in ``--json``, and the same as typed events for API callers. The guest is
the fake QMP peer: one that obeys the ACPI power button and one that ignores it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secvf import api
from tests.helpers import run_cli
from tests.unit.fake_vm import make_vm, use_fake_qemu


@pytest.fixture
def stubborn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A running VM whose guest ignores the ACPI power button."""
    use_fake_qemu(tmp_path, monkeypatch.setenv, ignore_powerdown=True)
    make_vm("stubborn", tmp_path)
    run_cli("vm", "start", "stubborn", check=True)
    return "stubborn"


def test_a_guest_that_ignores_acpi_gets_a_countdown_and_a_forced_stop(stubborn: str) -> None:
    proc = run_cli("vm", "stop", stubborn, "--timeout", "2", "--json", check=True)
    assert "secvf: note: waiting for the guest to power off (2 s left)…" in proc.stderr
    assert proc.stderr.rstrip().endswith(
        "secvf: note: the guest did not power off within 2 s; forced")
    status = json.loads(proc.stdout)
    assert status["forced"] is True and status["state"] == "stopped"


def test_the_api_reports_progress_then_one_outcome(stubborn: str) -> None:
    events: list[api.StopWaiting | api.StopDone] = []
    api.stop_vm(stubborn, timeout=2, progress=events.append)
    waiting, done = events[:-1], events[-1]
    assert waiting and all(isinstance(e, api.StopWaiting) for e in waiting)
    assert waiting[0].left_s == 2 == waiting[0].timeout_s
    lefts = [e.left_s for e in waiting]
    assert lefts == sorted(lefts, reverse=True) and all(0 < left <= 2 for left in lefts)
    assert done == api.StopDone(forced=True,
                                why="the guest did not power off within 2 s; forced")


def test_force_skips_the_countdown_and_says_nothing_more(stubborn: str) -> None:
    proc = run_cli("vm", "stop", stubborn, "--force", "--json", check=True)
    assert "waiting" not in proc.stderr and "forced" not in proc.stderr
    assert json.loads(proc.stdout)["forced"] is True


def test_a_guest_that_powers_off_is_not_forced(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_qemu(tmp_path, monkeypatch.setenv)
    make_vm("polite", tmp_path)
    run_cli("vm", "start", "polite", check=True)
    events: list[api.StopWaiting | api.StopDone] = []
    api.stop_vm("polite", timeout=30, progress=events.append)
    assert events[-1] == api.StopDone(forced=False, why="the guest powered off")
    run_cli("vm", "start", "polite", check=True)
    proc = run_cli("vm", "stop", "polite", "--json", check=True)
    assert json.loads(proc.stdout)["forced"] is False and "forced" not in proc.stderr
    proc = run_cli("vm", "stop", "polite", "--json", check=True)  # not running: a note
    assert "is not running" in proc.stderr and json.loads(proc.stdout)["forced"] is False
