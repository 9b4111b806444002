"""The agent's reusable threads (:mod:`secvf.guest.agent.workers`): jobs run on idle
workers, idle workers end after ``idle_s``, at most ``max_idle`` wait, a failing job is
logged and its worker carries on. Every wait polls for the end state under a generous
bound; nothing is timed."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import pytest

from secvf.guest.agent import workers as workers_module
from secvf.guest.agent.workers import Workers, _Worker
from tests.unit.running_sandbox import WAIT_S, wait_for

#: Long enough that no parked worker ends during a test that expects it to be reused.
LONG_IDLE_S = 60.0


class Recorder:
    """Jobs that note the thread they ran on; :meth:`blocking` ones wait for
    :attr:`release` (so that they are running at the same time)."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.release = threading.Event()
        self._lock = threading.Lock()

    def _note(self) -> None:
        with self._lock:
            self.threads.append(threading.current_thread())

    def quick(self) -> Callable[[], None]:
        return self._note

    def blocking(self) -> Callable[[], None]:
        def job() -> None:
            self._note()
            assert self.release.wait(WAIT_S)
        return job

    def ran(self, count: int) -> list[threading.Thread]:
        """Wait until ``count`` jobs have started; the threads they ran on."""
        wait_for(lambda: len(self.threads) >= count)
        with self._lock:
            return list(self.threads)


def test_a_job_after_the_first_has_finished_runs_on_the_same_thread():
    pool = Workers(idle_s=LONG_IDLE_S)
    ran: list[tuple[int, threading.Thread]] = []

    def job() -> None:
        ran.append((threading.get_ident(), threading.current_thread()))

    pool.run(job)
    wait_for(lambda: pool.idle() == 1)  # the first job is done and its worker waits
    pool.run(job)
    wait_for(lambda: len(ran) == 2 and pool.idle() == 1)
    (first_ident, thread), (second_ident, second_thread) = ran
    assert first_ident == second_ident and thread is second_thread
    assert pool.started == 1
    assert thread.daemon and thread.is_alive()
    assert thread.name == "worker-1"


def test_jobs_running_at_the_same_time_get_threads_of_their_own():
    pool, jobs = Workers(idle_s=LONG_IDLE_S), Recorder()
    barrier = threading.Barrier(3)  # both jobs and the test: passes only if both run at once
    for _ in range(2):
        pool.run(lambda: (jobs.quick()(), barrier.wait(WAIT_S)))
    barrier.wait(WAIT_S)
    threads = jobs.ran(2)
    assert threads[0] is not threads[1]
    assert threads[0].ident != threads[1].ident
    assert all(thread.daemon for thread in threads)
    assert pool.started == 2
    wait_for(lambda: pool.idle() == 2)  # both wait for the next job now
    pool.run(jobs.quick())
    pool.run(jobs.quick())
    assert set(jobs.ran(4)[2:]) <= set(threads)  # and take the next ones: none started
    assert pool.started == 2


def test_a_worker_idle_for_idle_s_ends_and_the_next_job_gets_a_new_one():
    pool, jobs = Workers(idle_s=0.05), Recorder()
    pool.run(jobs.quick())
    [first] = jobs.ran(1)
    wait_for(lambda: not first.is_alive())
    assert pool.idle() == 0  # an ended worker is no longer offered a job
    pool.run(jobs.quick())
    second = jobs.ran(2)[1]
    assert second is not first and second.name == "worker-2"
    assert pool.started == 2
    wait_for(lambda: not second.is_alive() and pool.idle() == 0)


def test_at_most_max_idle_workers_wait_the_others_end():
    pool, jobs = Workers(idle_s=LONG_IDLE_S, max_idle=2), Recorder()
    for _ in range(4):
        pool.run(jobs.blocking())
    threads = jobs.ran(4)
    assert len(set(threads)) == 4 and pool.started == 4
    jobs.release.set()
    wait_for(lambda: pool.idle() == 2 and sum(thread.is_alive() for thread in threads) == 2)
    parked = [thread for thread in threads if thread.is_alive()]
    # The parked ones live on (idle_s is long) and take the next jobs: no thread starts.
    later = Recorder()
    pool.run(later.blocking())
    pool.run(later.blocking())
    assert set(later.ran(2)) == set(parked)
    assert pool.started == 4 and pool.idle() == 0
    later.release.set()
    wait_for(lambda: pool.idle() == 2)


def test_max_idle_zero_keeps_no_worker():
    pool, jobs = Workers(idle_s=LONG_IDLE_S, max_idle=0), Recorder()
    pool.run(jobs.quick())
    [first] = jobs.ran(1)
    wait_for(lambda: not first.is_alive())
    assert pool.idle() == 0
    pool.run(jobs.quick())
    assert jobs.ran(2)[1] is not first and pool.started == 2


def test_a_job_that_raises_is_logged_and_its_worker_takes_the_next_job(caplog):
    caplog.set_level(logging.ERROR, logger="secvf.agent")
    pool, jobs = Workers(idle_s=LONG_IDLE_S), Recorder()

    def broken() -> None:
        jobs.quick()()
        raise RuntimeError("job bug")

    pool.run(broken)
    wait_for(lambda: pool.idle() == 1)  # logged, then parked: the worker did not end
    [failure] = [record for record in caplog.records if record.name == "secvf.agent"]
    assert failure.levelno == logging.ERROR and "failed" in failure.getMessage()
    assert failure.exc_info is not None and failure.exc_info[0] is RuntimeError
    pool.run(jobs.quick())
    threads = jobs.ran(2)
    assert threads[0] is threads[1] and threads[0].is_alive()
    assert pool.started == 1


class FakePool:
    """What a :class:`_Worker` asks its pool, scripted: whether it may park, and whether
    its idle wait ending retires it (False: :meth:`Workers.run` has just picked it)."""

    def __init__(self, park: bool = True, retire: bool = True, idle_s: float = 0.01,
                 on_retire: Callable[[_Worker], None] | None = None) -> None:
        self.idle_s = idle_s
        self.park, self.retire = park, retire
        self.on_retire = on_retire
        self.calls: list[str] = []

    def _park(self, worker: _Worker) -> bool:
        self.calls.append("park")
        return self.park

    def _retire(self, worker: _Worker) -> bool:
        self.calls.append("retire")
        if self.on_retire is not None:
            self.on_retire(worker)
        return self.retire


def test_next_job_after_the_idle_wait_is_picked_just_as_it_times_out_still_runs():
    def job() -> None:
        pass

    def put_later(worker: _Worker) -> None:
        # run() has taken the worker out of the idle list but not yet put the job: it
        # arrives only after the worker has found itself not retired.
        timer = threading.Timer(0.05, worker.jobs.put, args=(job,))
        timer.daemon = True
        timer.start()

    pool = FakePool(retire=False, on_retire=put_later)
    worker = _Worker(pool)  # type: ignore[arg-type]
    assert worker._next_job() is job
    assert pool.calls == ["park", "retire"]


class TimingOutQueue:
    """A job queue whose wait always times out at once; notes the timeouts asked for."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def get(self, timeout: float | None = None) -> object:
        assert timeout is not None, "an idle worker must not wait for ever"
        self.timeouts.append(timeout)
        raise queue.Empty


def test_next_job_is_none_when_retired_after_waiting_idle_s():
    pool = FakePool(retire=True, idle_s=12.5)
    worker = _Worker(pool)  # type: ignore[arg-type]
    worker.jobs = TimingOutQueue()  # type: ignore[assignment]
    assert worker._next_job() is None
    assert pool.calls == ["park", "retire"]
    assert worker.jobs.timeouts == [12.5]  # the pool's idle_s, not a constant


def test_next_job_is_none_without_waiting_when_enough_workers_are_idle():
    pool = FakePool(park=False, idle_s=LONG_IDLE_S)  # a wait would outlast the test
    worker = _Worker(pool)  # type: ignore[arg-type]
    assert worker._next_job() is None
    assert pool.calls == ["park"]


def test_next_job_returns_a_job_put_while_parked():
    def job() -> None:
        pass

    pool = FakePool(idle_s=LONG_IDLE_S)
    worker = _Worker(pool)  # type: ignore[arg-type]
    worker.jobs.put(job)
    assert worker._next_job() is job
    assert pool.calls == ["park"]


def test_a_job_handed_over_as_the_idle_wait_times_out_runs_on_that_worker(monkeypatch):
    """The race in the real pool: the worker's idle wait times out, and before it can
    retire, :meth:`Workers.run` picks it and hands it a job. The worker must not end
    (the job would be lost) but run it."""
    pool, jobs = Workers(idle_s=0.05), Recorder()
    retire = Workers._retire
    raced: list[bool] = []

    def run_first(self: Workers, worker: _Worker) -> bool:
        if not raced:
            raced.append(self.idle() == 1)  # still parked: run() will pick it
            self.run(jobs.quick())  # picks this very worker; it is no longer idle
        result = retire(self, worker)
        raced.append(result)
        return result

    monkeypatch.setattr(Workers, "_retire", run_first)
    pool.run(jobs.quick())
    threads = jobs.ran(2)
    assert threads[0] is threads[1]
    assert pool.started == 1
    assert raced[:2] == [True, False]  # the race happened: _retire said "picked"
    wait_for(lambda: not threads[0].is_alive())  # later, idle again, it does retire
    assert raced[-1] is True and pool.idle() == 0


def test_the_defaults_are_the_modules_constants():
    pool = Workers()
    assert (pool.idle_s, pool.max_idle) == (workers_module.IDLE_S, workers_module.MAX_IDLE)
    assert pool.started == 0 and pool.idle() == 0


@pytest.mark.parametrize("count", [1, 8])
def test_every_job_runs_exactly_once(count):
    pool = Workers(idle_s=LONG_IDLE_S, max_idle=4)
    done: queue.SimpleQueue[int] = queue.SimpleQueue()
    for round_ in range(3):
        for number in range(count):
            pool.run(lambda n=round_ * count + number: done.put(n))
        expected = (round_ + 1) * count
        wait_for(lambda expected=expected: done.qsize() == expected)
    assert sorted(done.get() for _ in range(3 * count)) == list(range(3 * count))
    assert done.empty()
