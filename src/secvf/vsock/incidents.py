"""Rate-limited security events for what a hostile guest does to the vsock device."""

from __future__ import annotations

import logging
import time

from secvf.store.eventlog import EventLog, Severity
from secvf.vsock.limits import VIOLATION_EVENTS_PER_S

log = logging.getLogger(__name__)

EVENT_NAME = "vsock_guest_violation"


class RateLimiter:
    """Allows at most ``per_second`` actions in each one-second window."""

    def __init__(self, per_second: int) -> None:
        self._per_second = per_second
        self._window_start = 0.0
        self._in_window = 0

    def allow(self) -> bool:
        """Count one action; return whether it is within the rate."""
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self._per_second:
            return False
        self._in_window += 1
        return True


class ViolationReporter:
    """Writes ``vsock_guest_violation`` events, at most ``per_second`` each second.

    Violations beyond the rate are counted, and the count goes out as ``suppressed``
    with the next event that is written, so nothing disappears silently. Without an
    event log (``log=None``) violations go to the process log only.
    """

    def __init__(
        self,
        vm: str | None,
        vm_id: str | None,
        per_second: int = VIOLATION_EVENTS_PER_S,
        *,
        log: EventLog | None = None,
    ) -> None:
        self._log = log
        self._vm = vm
        self._vm_id = vm_id
        self._limiter = RateLimiter(per_second)
        self.suppressed = 0  # violations not written since the last written event
        self.total = 0  # violations seen since start

    def report(self, detail: str, severity: Severity = Severity.WARNING) -> None:
        """Record one violation; log and write an event unless the rate is exceeded."""
        self.total += 1
        if not self._limiter.allow():
            self.suppressed += 1
            return
        log.warning("guest violation (%s): %s", severity, detail)
        if self._log is None:
            return
        self._log.write(
            EVENT_NAME,
            severity=severity,
            vm=self._vm,
            vm_id=self._vm_id,
            detail=detail,
            suppressed=self.suppressed,
        )
        self.suppressed = 0
