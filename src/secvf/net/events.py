"""The switch's security events: names, the once-per-interval gate, and the emitter.

Every event goes to the ``security`` stream of :class:`secvf.store.eventlog.EventLog`
in ``switch.json``'s ``logs_dir``, with ``vm``/``vm_id`` of the port's VM (None for
events about the whole network) and always a ``network`` field.

A hostile guest can trigger a drop on every frame, so no event is written per frame:
:class:`EventGate` lets one event per key through per interval and counts the rest,
which the next event reports as ``suppressed``. Its table is bounded: a guest that
claims a new MAC on every frame fills at most :data:`MAX_GATE_KEYS` entries, and the
keys past that share one overflow entry.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from secvf.store.eventlog import EventLog, Severity

SWITCH_STARTED = "switch_started"
SWITCH_RESTARTED = "switch_restarted"
SWITCH_STOPPED = "switch_stopped"
MAC_SPOOF = "mac_spoof"
FRAME_RATE_LIMITED = "frame_rate_limited"
FRAME_SIZE_DROPPED = "frame_size_dropped"
FOREIGN_SENDER = "foreign_sender"

GATE_INTERVAL_S = 60.0
MAX_GATE_KEYS = 64
OVERFLOW = "(other)"  # the key that stands for every key past MAX_GATE_KEYS

#: ``emit(event, severity, fields)``; ``fields`` holds ``vm``, ``vm_id`` and the rest.
Emit = Callable[[str, Severity, dict[str, Any]], None]


class EventGate:
    """At most one event per key per ``interval`` seconds, counting the suppressed ones."""

    __slots__ = ("interval", "max_keys", "_marks")

    def __init__(self, interval: float = GATE_INTERVAL_S, max_keys: int = MAX_GATE_KEYS) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._marks: dict[Hashable, list[float]] = {}  # key -> [last event time, suppressed]

    def __repr__(self) -> str:
        return f"EventGate(interval={self.interval}, keys={len(self._marks)})"

    def key_for(self, key: Hashable, now: float) -> Hashable:
        """``key`` itself, or :data:`OVERFLOW` when the table is full of live keys."""
        if key in self._marks or len(self._marks) < self.max_keys:
            return key
        self._marks = {k: m for k, m in self._marks.items() if now - m[0] < self.interval}
        return key if len(self._marks) < self.max_keys else OVERFLOW

    def passes(self, key: Hashable, now: float) -> int | None:
        """None if an event for ``key`` was let through less than ``interval`` ago (this
        one is counted as suppressed); else the count suppressed since the last one."""
        mark = self._marks.get(key)
        if mark is not None and now - mark[0] < self.interval:
            mark[1] += 1
            return None
        suppressed = int(mark[1]) if mark is not None else 0
        self._marks[key] = [now, 0]
        return suppressed


def log_emitter(logs_dir: Path) -> Emit:
    """An :data:`Emit` that appends to the security stream of the event log in ``logs_dir``."""
    log = EventLog(logs_dir)

    def emit(event: str, severity: Severity, fields: dict[str, Any]) -> None:
        log.write(event, severity=severity, stream="security", **fields)

    return emit
