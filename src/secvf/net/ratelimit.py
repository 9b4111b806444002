"""Per-port frame rate limits in fixed 1 s windows.

A window opens at the first frame after the previous one closed and lasts
:data:`WINDOW_S`. Inside it a port may send ``frames_per_s`` frames of any kind and
``broadcast_per_s`` frames with the I/G bit set; the rest are dropped. Fixed windows
(not a token bucket) keep the per-frame cost to two additions and two comparisons,
which matters because a flooding guest makes the drop path the hot path.

The clock is the caller's: :meth:`RateWindow.expired` and :meth:`RateWindow.open`
take ``now`` (monotonic seconds), so tests drive time by hand. A limit of 0 means
unlimited.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

WINDOW_S = 1.0
UNLIMITED = 0  # a limit of 0 in switch.json turns that limit off
RATE = "rate"
BROADCAST_RATE = "broadcast_rate"


@dataclass(frozen=True)
class WindowReport:
    """What a window that just closed dropped (only made when it dropped something)."""

    started: float  # monotonic time the window opened
    rate: int  # frames dropped by the overall limit
    broadcast_rate: int  # frames dropped by the group-frame limit


class RateWindow:
    """One port's current window: counts, limits and drops."""

    __slots__ = ("end", "start", "frames", "group", "frame_limit", "group_limit",
                 "dropped_rate", "dropped_group")

    def __init__(self, frames_per_s: int, broadcast_per_s: int) -> None:
        self.start = 0.0  # when the current window opened
        self.end = 0.0  # when it closes (0: no window yet)
        self.frames = 0  # frames seen in this window
        self.group = 0  # group frames seen in this window
        self.dropped_rate = 0
        self.dropped_group = 0
        self.frame_limit = self.group_limit = sys.maxsize
        self.set_limits(frames_per_s, broadcast_per_s)

    def __repr__(self) -> str:
        return (f"RateWindow(frames={self.frames}/{self.frame_limit}, "
                f"group={self.group}/{self.group_limit})")

    def set_limits(self, frames_per_s: int, broadcast_per_s: int) -> None:
        """Change the limits (from a reload); 0 means unlimited."""
        self.frame_limit = frames_per_s or sys.maxsize
        self.group_limit = broadcast_per_s or sys.maxsize

    def open(self, now: float) -> WindowReport | None:
        """Close the current window and open one at ``now``; return what the closed
        window dropped, or None if it dropped nothing."""
        report = None
        if self.dropped_rate or self.dropped_group:
            report = WindowReport(self.start, self.dropped_rate, self.dropped_group)
        self.start, self.end = now, now + WINDOW_S
        self.frames = self.group = self.dropped_rate = self.dropped_group = 0
        return report

    def admit(self, group: int) -> str | None:
        """Count one frame in the current window; return the drop reason, or None if
        the frame is within the limits. Call :meth:`open` first when ``now >= end``."""
        self.frames += 1
        if self.frames > self.frame_limit:
            self.dropped_rate += 1
            return RATE
        if group:
            self.group += 1
            if self.group > self.group_limit:
                self.dropped_group += 1
                return BROADCAST_RATE
        return None
