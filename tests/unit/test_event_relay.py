"""The relay of a jailed helper's events: what passes, what is refused, the bounds."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from secvf.runtime import eventrelay
from secvf.runtime.eventrelay import EventRelay
from secvf.store.eventlog import EventLog
from secvf.store.events import read_events


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SECVF_HOME", str(tmp_path / "home"))
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    return spool


def _relay(spool: Path) -> EventRelay:
    return EventRelay(spool, "box", str(uuid.uuid4()))


def _relayed() -> list[dict]:
    return [e for e in read_events() if e.get("relayed_from")]


def test_helper_events_are_relayed_once_with_the_supervisors_vm(home):
    helper = EventLog(home)
    helper.write("vsock_guest_violation", vm="forged", vm_id="forged", detail="bad ring",
                 suppressed=3)
    relay = _relay(home)
    assert relay.pump() == 1
    assert relay.pump() == 0  # nothing new
    (event,) = _relayed()
    assert event["event"] == "vsock_guest_violation" and event["detail"] == "bad ring"
    assert event["suppressed"] == 3 and event["vm"] == "box" and event["vm_id"] == relay.vm_id
    assert event["relayed_from"] == "vsock backend"


def test_unknown_events_garbage_and_huge_lines_are_refused_and_counted(home):
    lines = [json.dumps({"event": "vm_started", "vm": "x"}), "not json",
             json.dumps({"event": "vsock_guest_violation", "detail": "x" * 20_000}),
             json.dumps({"event": "vsock_guest_violation", "detail": "y" * 5000,
                         "extra": "dropped"})]
    (home / "security-2026-12-01.jsonl").write_text("\n".join(lines) + "\n")
    assert _relay(home).pump() == 1
    events = list(read_events())
    (ok,) = [e for e in events if e["event"] == "vsock_guest_violation"]
    assert len(ok["detail"]) == eventrelay.MAX_TEXT and "extra" not in ok
    (rejected,) = [e for e in events if e["event"] == "relay_rejected"]
    assert rejected["rejected"] == 3


def test_a_torn_last_line_waits_and_a_flood_is_capped(home, monkeypatch):
    monkeypatch.setattr(eventrelay, "MAX_EVENTS_PER_PASS", 5)
    line = json.dumps({"event": "vsock_guest_violation", "detail": "d"})
    path = home / "security-2026-12-01.jsonl"
    path.write_text((line + "\n") * 8 + line[:10])
    relay = _relay(home)
    assert relay.pump() == 5
    (rejected,) = [e for e in read_events() if e["event"] == "relay_rejected"]
    assert rejected["suppressed"] == 3
    with path.open("a") as f:
        f.write(line[10:] + "\n")
    assert relay.pump() == 1  # the line completed since
