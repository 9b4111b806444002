"""The agent's threads, reused: a session, a command's pump and its supervisor each run on
a worker that waits for the next job when its job is done.

Starting a thread costs ~5 ms under TCG (its stack is mapped, the new thread must run
before ``Thread.start`` returns), and an exec used to start two, a connection two more.
A worker that is idle takes the next job at the cost of one wake-up; a worker idle for
:data:`IDLE_S` ends, and at most :data:`MAX_IDLE` wait at once, so a burst of commands
leaves no lasting crowd of threads behind.

Standard library only (the agent runs in minimal guests).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

#: How long an idle worker waits for a job before it ends.
IDLE_S = 60.0
#: Most workers waiting for a job at once; one more ends when its job is done.
MAX_IDLE = 16

log = logging.getLogger("secvf.agent")

Job = Callable[[], object]


class Workers:
    """A pool of reusable threads with no upper bound on busy ones (a command may run for
    days; every running command needs its threads). Thread-safe."""

    def __init__(self, idle_s: float = IDLE_S, max_idle: int = MAX_IDLE) -> None:
        self.idle_s = idle_s
        self.max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self.started = 0  # threads started in all (for tests and logs)

    def run(self, job: Job) -> None:
        """Run ``job`` on an idle worker, or on a new one if none is idle.

        An exception ``job`` raises is logged; the worker carries on.
        """
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self.started += 1
                number = self.started
        if worker is not None:
            worker.jobs.put(job)
            return
        worker = _Worker(self)
        worker.jobs.put(job)
        threading.Thread(target=worker.loop, name=f"worker-{number}", daemon=True).start()

    def idle(self) -> int:
        """Number of workers waiting for a job now."""
        with self._lock:
            return len(self._idle)

    def _park(self, worker: _Worker) -> bool:
        """Put ``worker`` among the idle ones; False if enough are idle (it ends)."""
        with self._lock:
            if len(self._idle) >= self.max_idle:
                return False
            self._idle.append(worker)
            return True

    def _retire(self, worker: _Worker) -> bool:
        """Take an idle ``worker`` out for good; False if :meth:`run` has just picked it
        (a job is on its way, so it must wait for that)."""
        with self._lock:
            if worker in self._idle:
                self._idle.remove(worker)
                return True
            return False


class _Worker:
    """One reusable thread: runs the jobs put in its queue, one at a time."""

    def __init__(self, pool: Workers) -> None:
        self.pool = pool
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()

    def loop(self) -> None:
        job: Job | None = self.jobs.get()
        while job is not None:
            try:
                job()
            except Exception:  # a bug must end one job, never the worker's pool
                log.exception("agent job %r failed", job)
            del job  # an idle worker must not keep its last job (a task, a socket) alive
            job = self._next_job()

    def _next_job(self) -> Job | None:
        """Wait idle for the next job; None when this worker should end."""
        if not self.pool._park(self):
            return None
        try:
            return self.jobs.get(timeout=self.pool.idle_s)
        except queue.Empty:
            if self.pool._retire(self):
                return None
            return self.jobs.get()  # picked just now: the job is being put
