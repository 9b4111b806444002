"""Per-tool rate limits: at most N calls of a tool per window, per server.

The limit of a tool is its own entry in the server's settings, else the default one
(``--rate-limit TOOL=N/SECONDS``, ``--rate-limit default=N/SECONDS``). A call past the
limit is refused (and audited) with an error that says when to retry; it never
waits. The window slides: only calls in the last SECONDS count.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from secvf.errors import ConfigError, SecVFError


class RateLimited(SecVFError):
    """A tool was called more often than its rate limit allows."""


@dataclass(frozen=True)
class Limit:
    """``calls`` per ``per_s`` seconds."""

    calls: int
    per_s: float

    def __str__(self) -> str:
        return f"{self.calls}/{self.per_s:g}s"


#: The limit of every tool without one of its own.
DEFAULT_LIMIT = Limit(120, 60.0)

_SPEC = re.compile(r"^(?P<tool>[\w.-]+)=(?P<calls>\d+)/(?P<per>\d+(\.\d+)?)s?$")


def parse_limit(spec: str) -> tuple[str, Limit]:
    """``TOOL=N/SECONDS`` (``default`` as TOOL: the default limit). Raises ConfigError."""
    match = _SPEC.match(spec.strip())
    if not match or int(match["calls"]) < 1 or float(match["per"]) <= 0:
        raise ConfigError(f"bad rate limit {spec!r}: use TOOL=N/SECONDS, e.g. "
                          "sandbox_exec=30/60 or default=120/60")
    return match["tool"], Limit(int(match["calls"]), float(match["per"]))


class RateLimiter:
    """Sliding-window counters, one per tool; thread-safe."""

    def __init__(self, limits: Mapping[str, Limit], default: Limit = DEFAULT_LIMIT, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = dict(limits)
        self._default = self._limits.pop("default", default)
        self._clock = clock
        self._calls: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def limit_of(self, tool: str) -> Limit:
        """The limit that applies to ``tool``."""
        return self._limits.get(tool, self._default)

    def check(self, tool: str) -> None:
        """Count one call of ``tool``. Raises RateLimited (not counted) past its limit."""
        limit = self.limit_of(tool)
        now = self._clock()
        with self._lock:
            calls = self._calls.setdefault(tool, deque())
            while calls and calls[0] <= now - limit.per_s:
                calls.popleft()
            if len(calls) >= limit.calls:
                retry = calls[0] + limit.per_s - now
                raise RateLimited(f"rate limit of tool {tool!r} reached ({limit}); retry in "
                                  f"{retry:.1f} s, or raise it with --rate-limit {tool}=N/SECONDS")
            calls.append(now)
