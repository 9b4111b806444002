"""The API the TUI added (``# --- TUI ---`` in secvf/api.py): watches of the security
log and of a serial log that end when their ``stop()`` says so."""

from __future__ import annotations

import threading

from secvf import api


def test_watch_vm_changes_yields_change_events_only_and_stops() -> None:
    stop = threading.Event()
    seen: list[str] = []

    def watch() -> None:
        for record in api.watch_vm_changes(stop=stop.is_set, poll_s=0.01):
            seen.append(record["event"])
            if record["event"] == "vm_crashed":
                stop.set()
    thread = threading.Thread(target=watch)
    thread.start()
    for _ in range(500):  # until the watch sees one (it reads only what comes after it began)
        api.write_log_event("security", "vm_started", vm="web")
        if seen:
            break
        threading.Event().wait(0.02)
    api.write_log_event("security", "template_built", template="t")
    api.write_log_event("security", "vm_crashed", severity="ERROR", vm="web")
    thread.join(30)
    assert not thread.is_alive()
    assert seen[0] == "vm_started" and seen[-1] == "vm_crashed"
    assert "template_built" not in seen


def test_watch_logs_ends_when_stopped_with_nothing_written() -> None:
    calls = iter([False, False, True])
    assert list(api.watch_logs("exec", stop=lambda: next(calls, True), poll_s=0.01)) == []


def test_watch_serial_log_of_a_vm_that_never_ran(tmp_path: object) -> None:
    import pytest

    from secvf.errors import NotFound

    with pytest.raises(NotFound):
        list(api.watch_serial_log("nosuch", stop=lambda: True))
