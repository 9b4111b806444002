"""What the ``test_logs_*`` tests share: a clock they set, and a log in a temp directory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from secvf.store.eventlog import EventLog, RetentionPolicy

#: The day the tests' clocks start on (a Monday, 12:00 UTC).
START = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock that stands still until a test moves it."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        """Move the clock on by ``timedelta(**delta)``; return the new time."""
        self.now += timedelta(**delta)
        return self.now


def make_log(tmp_path: Path, clock: Clock | None = None,
             policy: RetentionPolicy | None = None) -> EventLog:
    """An event log in ``tmp_path/home/logs`` (0700), on ``clock``, keeping everything
    unless ``policy`` says otherwise."""
    directory = tmp_path / "home" / "logs"
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    return EventLog(directory, clock=clock or Clock(),
                    policy=policy or RetentionPolicy(retention_days=None, max_total_bytes=None))


def write_days(log: EventLog, clock: Clock, days: int, per_day: int,
               stream: str = "security", vm: str = "web") -> None:
    """``per_day`` events on each of ``days`` consecutive days, from the clock's day on
    (the clock ends on the last day)."""
    for day in range(days):
        if day:
            clock.advance(days=1)
        for i in range(per_day):
            log.write("vm_started", stream=stream, vm=vm, day=day, i=i)


def lines(path: Path) -> list[bytes]:
    """The lines of ``path``, with their newlines."""
    return path.read_bytes().splitlines(keepends=True)
