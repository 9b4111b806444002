from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

from secvf.store import events as seclog
from secvf.store.eventlog import EventLog
from secvf.store.events import Severity


def test_events_are_json_lines_in_private_files(secvf_env: Path) -> None:
    rec = seclog.write_event("vm_started", severity=Severity.WARNING, vm="a", vm_id="x", n=1)
    path = seclog.log_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    line = json.loads(path.read_text().splitlines()[-1])
    assert line == rec and line["severity"] == "WARNING" and line["uid"] == os.getuid()
    assert line["time"].endswith("Z")


def test_concurrent_writers_never_interleave(secvf_env: Path) -> None:
    def writer(i: int) -> None:
        for j in range(200):
            seclog.write_event("e", stream="exec", payload="x" * 500, i=i, j=j)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = list(seclog.read_events("exec"))
    assert len(events) == 1600 and all(e["payload"] == "x" * 500 for e in events)


def test_unwritable_log_never_raises(secvf_env: Path, monkeypatch, capfd) -> None:
    monkeypatch.setattr(seclog, "default_log", lambda: EventLog(Path("/proc/nonexistent")))
    seclog.write_event("dropped")
    assert "cannot write security log" in capfd.readouterr().err


def test_unusable_secvf_home_never_raises(tmp_path: Path, monkeypatch, capfd) -> None:
    """A $SECVF_HOME that cannot be created (a file is in the way) drops the event."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SECVF_HOME", str(blocker / "home"))
    record = seclog.write_event("dropped", detail="x")
    assert record["event"] == "dropped" and record["detail"] == "x"
    assert "cannot write security log" in capfd.readouterr().err
