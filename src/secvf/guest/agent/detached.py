"""Background processes: commands started with ``exec`` ``detach`` that outlive their
connection, and the agent's table of them.

A :class:`DetachedProcess` is an :class:`~secvf.guest.agent.command.ExecTask` whose
output goes to an :class:`~secvf.guest.agent.output_ring.OutputRing` instead of a
stream: it starts exactly as an exec does (same user, environment and cwd rules, same
spawn path, the user's spawner included), runs in its own session and process group,
and when its leader exits whatever is left of its group is killed, as for any exec.
Unlike an exec it is not killed when the connection that started it ends; it ends by
itself, by ``kill`` (a signal to its process group), or with the VM (the agent, on
SIGTERM, kills every one still running).

Limits (constants below, documented in docs/protocol.md):

* output: the last :data:`OUTPUT_BYTES` (1 MiB) per process, in at most
  :data:`OUTPUT_PIECES` pieces; older bytes are dropped and counted;
* :data:`MAX_RUNNING` (64) running at once; the next ``detach`` gets ``limit_reached``;
* :data:`MAX_EXITED` (32) exited ones remembered (with their output), oldest first out;
* :data:`MAX_ATTACHERS` (8) attach streams per process at once.

Ids are ``<counter><random>`` in hex (``0001a7f3``; the counter has at least 4 digits):
never a pid, never reused by one
agent run.
"""

from __future__ import annotations

import collections
import itertools
import os
import secrets
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from secvf.exec import protocol
from secvf.guest.agent.command import ExecTask, TaskState
from secvf.guest.agent.errors import RequestFailed
from secvf.guest.agent.output_ring import OutputRing

if TYPE_CHECKING:
    from secvf.guest.agent.session import Session

#: Output kept per background process (the newest bytes; older ones are dropped, counted).
OUTPUT_BYTES = 1024 * 1024
#: Most separate pieces of output kept per process (bounds the bookkeeping of tiny writes
#: that alternate between stdout and stderr).
OUTPUT_PIECES = 4096
#: Most background processes running at once.
MAX_RUNNING = 64
#: Most exited background processes remembered (oldest forgotten first).
MAX_EXITED = 32
#: Most attach streams following one process at once.
MAX_ATTACHERS = 8
#: Longest argv text and most words ``ps`` reports per process (longer ones are shortened,
#: marked "..."), so a ``process_list`` of every process stays far below a frame's limit.
PS_ARGV_CHARS = 1024
PS_ARGV_WORDS = 64
#: How long the agent, when it is stopped, waits for its background processes to end after
#: SIGTERM before it sends SIGKILL.
SHUTDOWN_GRACE_S = protocol.KILL_GRACE_S
SHUTDOWN_POLL_S = 0.02


class DetachedRefused(RequestFailed):
    """A background-process request refused; becomes a ``detached_error`` message.

    ``kind`` is a :class:`~secvf.exec.protocol.DetachedErrorKind` value.
    """

    def __init__(self, kind: str, message: str, process_id: str = "") -> None:
        super().__init__(kind, message)
        self.process_id = process_id  # the id the request named, if any


class DetachedProcess(ExecTask):
    """One background process: an exec whose output is kept in a ring, not streamed."""

    def __init__(
        self,
        session: Session,
        stream_id: int,
        request: dict[str, Any],
        process_id: str,
        registry: DetachedRegistry,
    ) -> None:
        super().__init__(session, stream_id, request)
        self.id = process_id  # the agent's id for it
        self.output = OutputRing(OUTPUT_BYTES, OUTPUT_PIECES)  # its last output
        self.started_at_wall = time.time()  # for ps (guest clock)
        self.outcome: dict[str, Any] | None = None  # the ``exit`` payload once it ended
        self.user = request["user"] or self.agent.default_user  # the account it runs as
        self.attachers = 0  # attach streams following it (the registry's lock guards it)
        self._registry = registry

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<DetachedProcess {self.id} pid={pid} state={self.state.value}>"

    @property
    def argv(self) -> list[str]:
        """What runs (a shell command as ``/bin/sh -c ...``)."""
        req = self.request
        return list(req["argv"]) if req["argv"] is not None else ["/bin/sh", "-c", req["shell"]]

    def _start(self) -> None:
        """Check what a background process may not have, then start it as exec does.

        Raises:
            RequestFailed: kind ``invalid_request`` (a tty, stdin or a timeout was asked
                for), or the command did not start.
        """
        req = self.request
        if req["tty"] or req["stdin"]:
            raise RequestFailed(
                "invalid_request",
                "a detached command has no terminal and no stdin (attach reads its output)",
            )
        if req["timeout_s"] is not None:
            raise RequestFailed(
                "invalid_request", "a detached command has no timeout; kill it by its id"
            )
        super()._start()

    def describe(self) -> dict[str, Any]:
        """This process as a ``process_list`` item (:data:`protocol.PROCESS_FIELDS`)."""
        outcome = self.outcome
        return {
            "id": self.id,
            "argv": _shortened(self.argv, PS_ARGV_CHARS, PS_ARGV_WORDS),
            "user": self.user,
            "pid": self.proc.pid if self.proc is not None else 0,
            "state": "running" if outcome is None else "exited",
            "started_at": round(self.started_at_wall, 3),
            "code": None if outcome is None else outcome["code"],
            "signal": None if outcome is None else outcome["signal"],
            "duration_ms": None if outcome is None else outcome["duration_ms"],
            "buffered_bytes": self.output.buffered,
            "dropped_bytes": self.output.start,
        }

    def kill(self, signum: int) -> bool:
        """Send ``signum`` to the process group; False if the process is no longer running."""
        if self.proc is None or self.state is not TaskState.RUNNING:
            return False
        self.send_signal(signum)
        return True

    # -- where output and outcome go ------------------------------------------------------

    def _announce_started(self) -> None:
        """Nothing to announce: the session answered ``detached`` already."""

    def _emit_output(self, frame_type: protocol.FrameType, data: memoryview) -> None:
        """Keep the bytes in the ring (never blocks: the process is read at its own pace)."""
        self.output.append(frame_type, bytes(data))

    def _report_exit(self, outcome: dict[str, Any]) -> None:
        """Remember the outcome, then end the output (attachers send ``exit``)."""
        self.outcome = outcome
        self.output.close()

    def _ended(self) -> None:
        """Move to the registry's exited processes."""
        self._registry.exited(self)


class DetachedRegistry:
    """The agent's background processes: running ones, and the last exited ones."""

    def __init__(self, max_running: int = MAX_RUNNING, max_exited: int = MAX_EXITED) -> None:
        self.max_running = max_running
        self.max_exited = max_exited
        self._lock = threading.Lock()
        self._running: dict[str, DetachedProcess] = {}  # in start order
        self._exited: collections.OrderedDict[str, DetachedProcess] = collections.OrderedDict()
        self._counter = itertools.count(1)

    def __repr__(self) -> str:
        return f"<DetachedRegistry running={len(self._running)} exited={len(self._exited)}>"

    def launch(self, session: Session, stream_id: int, request: dict[str, Any]) -> DetachedProcess:
        """Start the ``exec`` ``request`` (``detach`` set) as a background process.

        Raises:
            DetachedRefused: kind ``limit_reached`` (:attr:`max_running` are running).
            RequestFailed: the command did not start (becomes ``start_failed``).
        """
        with self._lock:
            if len(self._running) >= self.max_running:
                raise DetachedRefused(
                    protocol.DetachedErrorKind.LIMIT_REACHED,
                    f"{self.max_running} detached processes are running already; "
                    "kill one (or let one end) first",
                )
            process_id = f"{next(self._counter):04x}{secrets.randbits(16):04x}"
            process = DetachedProcess(session, stream_id, request, process_id, self)
            self._running[process_id] = process  # counts towards the limit from now on
        try:
            process.start()
        except BaseException:
            with self._lock:
                self._running.pop(process_id, None)
            raise
        return process

    def exited(self, process: DetachedProcess) -> None:
        """``process`` ended: keep it among the exited, forgetting the oldest beyond the cap."""
        with self._lock:
            self._running.pop(process.id, None)
            self._exited[process.id] = process
            while len(self._exited) > self.max_exited:
                self._exited.popitem(last=False)

    def _find(self, process_id: str) -> DetachedProcess:
        """The process called ``process_id`` (lock held).

        Raises:
            DetachedRefused: kind ``not_found``.
        """
        process = self._running.get(process_id) or self._exited.get(process_id)
        if process is None or process.proc is None:
            raise DetachedRefused(
                protocol.DetachedErrorKind.NOT_FOUND,
                f"no detached process {process_id[:80]!r} (never started, or exited and "
                f"forgotten: the last {self.max_exited} exited are kept)",
                process_id,
            )
        return process

    def describe_all(self) -> list[dict[str, Any]]:
        """Every known process as ``process_list`` items, oldest start first."""
        with self._lock:
            processes = [p for p in (*self._exited.values(), *self._running.values()) if p.proc]
        processes.sort(key=lambda p: p.started_at)
        return [p.describe() for p in processes]

    def kill(self, process_id: str, signum: int) -> None:
        """Send ``signum`` to the process group of ``process_id``.

        Raises:
            DetachedRefused: kind ``not_found``, or ``not_running`` (it has exited).
        """
        with self._lock:
            process = self._find(process_id)
        if not process.kill(signum):
            raise DetachedRefused(
                protocol.DetachedErrorKind.NOT_RUNNING,
                f"detached process {process_id} has exited already",
                process_id,
            )

    def attach(self, process_id: str) -> DetachedProcess:
        """Count one more attacher of ``process_id`` and return the process (call
        :meth:`release` when the attach ends).

        Raises:
            DetachedRefused: kind ``not_found``, or ``limit_reached`` (MAX_ATTACHERS).
        """
        with self._lock:
            process = self._find(process_id)
            if process.attachers >= MAX_ATTACHERS:
                raise DetachedRefused(
                    protocol.DetachedErrorKind.LIMIT_REACHED,
                    f"{MAX_ATTACHERS} attach streams follow {process_id} already",
                    process_id,
                )
            process.attachers += 1
        return process

    def release(self, process: DetachedProcess) -> None:
        """An attach of ``process`` ended."""
        with self._lock:
            process.attachers -= 1

    def stop_all(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """End every running process's group: SIGTERM, SIGKILL after ``grace_s`` (the agent
        is being stopped)."""
        with self._lock:
            leaders = [p.proc.pid for p in self._running.values() if p.proc is not None]
        deadline = time.monotonic() + grace_s
        sig = signal.SIGTERM
        while leaders and time.monotonic() < deadline + grace_s:  # zombies never go
            for leader in list(leaders):
                try:
                    os.killpg(leader, sig)
                except ProcessLookupError:  # the group is empty (reaped or not)
                    leaders.remove(leader)
            if sig == signal.SIGTERM and time.monotonic() >= deadline:
                sig = signal.SIGKILL
            time.sleep(SHUTDOWN_POLL_S)


def _shortened(argv: list[str], limit: int, words: int) -> list[str]:
    """``argv`` cut to at most ``words`` words and about ``limit`` characters in all, the
    cut marked with ``...``."""
    out: list[str] = []
    room = limit
    for arg in argv:
        if len(arg) > room or len(out) == words:
            out.append(arg[: min(room, len(arg))] + "..." if len(out) < words else "...")
            break
        out.append(arg)
        room -= len(arg)
    return out
