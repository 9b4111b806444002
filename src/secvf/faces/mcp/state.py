"""What a running server holds: its settings, rate limiter and open work.

Tool bodies reach it through :func:`current_state`: the server binds it for each
``tools/call`` (a context variable, so worker threads see it too), which keeps
several servers in one process (the tests) apart.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from .jobs import Jobs
from .processes import ExecProcesses
from .ratelimit import RateLimiter
from .settings import ServerSettings


@dataclass
class ServerState:
    """One server's settings and the work its tools started."""

    settings: ServerSettings
    limiter: RateLimiter
    processes: ExecProcesses = field(default_factory=ExecProcesses)
    jobs: Jobs = field(default_factory=Jobs)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ServerState:
        """A fresh state for ``settings``."""
        return cls(settings, RateLimiter(settings.rate_limits, settings.default_rate_limit))

    def close(self) -> None:
        """Stop what the tools started (the server is shutting down)."""
        self.processes.close_all()
        self.jobs.close_all()


_STATE: contextvars.ContextVar[ServerState] = contextvars.ContextVar("secvf_mcp_state")


def bind_state(state: ServerState) -> contextvars.Token[ServerState]:
    """Make ``state`` the current server's (undo with ``_STATE.reset``: :func:`unbind_state`)."""
    return _STATE.set(state)


def unbind_state(token: contextvars.Token[ServerState]) -> None:
    """Undo :func:`bind_state`."""
    _STATE.reset(token)


def current_state() -> ServerState:
    """The state of the server whose tool is running. Raises LookupError outside one."""
    return _STATE.get()
