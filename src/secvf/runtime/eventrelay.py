"""Security events of a jailed device helper, carried into SecVF's security log.

The vsock backend runs as the VM's unprivileged identity and must not be able to write
(or truncate) the security log every VM shares, so it writes its events to a spool in
the VM's runtime directory (``events/``, an event log of its own). The supervisor reads
the spool's new lines every :data:`RELAY_INTERVAL_S` and once more when the run ends,
and writes each event again into the security log, marked ``relayed_from``.

The spool is written by a process a hostile guest may have taken over, so each line is
untrusted: only event names of :data:`RELAYED_EVENTS` pass, with only their known
fields (strings cut to :data:`MAX_TEXT`), the VM's name and id are the supervisor's,
lines over :data:`MAX_LINE_BYTES` and what does not parse are counted and reported in
one ``relay_rejected`` event per pass, and at most :data:`MAX_EVENTS_PER_PASS` events are
relayed per pass (the rest is counted as suppressed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secvf.store import events as seclog
from secvf.store.events import Severity
from secvf.vsock.incidents import EVENT_NAME

RELAY_INTERVAL_S = 1.0
MAX_LINE_BYTES = 16 * 1024
MAX_TEXT = 2000
MAX_EVENTS_PER_PASS = 100
MAX_READ_BYTES = 4 << 20  # per file and pass
#: The one event a helper writes (:mod:`secvf.vsock.incidents`), and its own fields.
RELAYED_EVENTS = {EVENT_NAME: ("detail", "suppressed")}
_SEVERITIES = {s.value: s for s in Severity}


@dataclass
class EventRelay:
    """Relays one VM's helper spool (``spool``) into the security log."""

    spool: Path
    vm: str
    vm_id: str
    source: str = "vsock backend"
    offsets: dict[str, int] = field(default_factory=dict)

    def pump(self) -> int:
        """Relay what was added since the last pass; return the number of events."""
        relayed = rejected = suppressed = 0
        try:
            names = sorted(p.name for p in self.spool.glob("security-*.jsonl"))
        except OSError:
            return 0
        for name in names:
            for line in self._new_lines(self.spool / name):
                record = _parse(line)
                if record is None:
                    rejected += 1
                elif relayed >= MAX_EVENTS_PER_PASS:
                    suppressed += 1
                else:
                    self._write(record)
                    relayed += 1
        if rejected or suppressed:
            seclog.write_event("relay_rejected", severity=Severity.WARNING, vm=self.vm,
                               vm_id=self.vm_id, relayed_from=self.source, rejected=rejected,
                               suppressed=suppressed)
        return relayed

    def _new_lines(self, path: Path) -> list[bytes]:
        start = self.offsets.get(path.name, 0)
        try:
            with path.open("rb") as f:
                f.seek(start)
                data = f.read(MAX_READ_BYTES)
        except OSError:
            return []
        end = data.rfind(b"\n") + 1  # a torn last line waits for the next pass
        if end == 0 and len(data) >= MAX_READ_BYTES:
            end = len(data)  # one huge line: skipped as a whole
        self.offsets[path.name] = start + end
        return data[:end].splitlines()

    def _write(self, record: dict[str, Any]) -> None:
        fields = {k: _clean(record[k]) for k in RELAYED_EVENTS[EVENT_NAME] if k in record}
        severity = _SEVERITIES.get(str(record.get("severity")), Severity.WARNING)
        seclog.write_event(EVENT_NAME, severity=severity,
                           vm=self.vm, vm_id=self.vm_id, relayed_from=self.source,
                           helper_time=_clean(record.get("time")), **fields)


def _parse(line: bytes) -> dict[str, Any] | None:
    if len(line) > MAX_LINE_BYTES:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("event") not in RELAYED_EVENTS:
        return None
    return record


def _clean(value: Any) -> Any:
    """A field value as relayed: numbers as they are, anything else a bounded string."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return value
    return str(value)[:MAX_TEXT]


__all__ = ["MAX_EVENTS_PER_PASS", "RELAYED_EVENTS", "RELAY_INTERVAL_S", "EventRelay"]
