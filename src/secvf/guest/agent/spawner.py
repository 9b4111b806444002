"""Starting another account's commands without forking the agent: one thread per account.

The agent runs as root and most commands run as the sandbox user. CPython cannot vfork
when the child must change credentials, so a command started with ``Popen(user=...)``
forks the agent, whose page tables are copied: slow under TCG. On Linux, credentials
belong to a thread, not to the process, and the raw ``setresuid`` family of system
calls changes only the calling thread's (glibc's wrappers change every thread's). So
each account in use gets a **spawner**: a thread of the agent that has made itself that
account for good, and that starts the account's commands with a plain
:class:`subprocess.Popen`, which vforks from a thread already running as the account.

* **The command is the agent's child**, started the way a root command is: the agent
  waits for it, signals its process group and reads its exit status as for any other.
* **Access is the account's own.** The child changes into the working directory and
  looks the program up along the request's ``PATH`` with the account's rights, so a
  directory the account may not enter fails with the account's ``EACCES``.
* **What the thread is.** Its real, effective and saved ids and its supplementary groups
  are the account's and it has no capabilities (checked in ``/proc/thread-self/status``
  before it starts anything; a thread whose switch failed ends). It runs nothing but
  ``Popen`` for its account. Changing ids makes the kernel mark the agent non-dumpable,
  so the account cannot ptrace the agent or read its memory or environment.
* **What the account can do to it**: signal that thread or lower the agent's resource
  limits (both name a thread), so the account can stop or end the agent, as it could
  already by exhausting the guest's memory or pids; init starts an agent that exited
  again. It cannot gain root through it: nothing of the thread is root any more.

Standard library only (the agent runs in minimal guests).
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("secvf.agent")

#: Most spawners kept at once (one per account in use); the oldest is stopped first.
MAX_SPAWNERS = 8
#: The per-thread credential system calls: (setgroups, setresgid, setresuid).
CREDENTIAL_CALLS = {"x86_64": (116, 119, 117), "aarch64": (159, 149, 147)}


class SpawnerFailed(Exception):
    """The spawner thread could not become its account (the caller falls back)."""


@dataclass(frozen=True)
class Account:
    """What a spawner runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...]


_Job = Callable[[], Any]
_T = TypeVar("_T")


class Spawner:
    """One account's spawner thread (started on first use). Thread-safe."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[_Job, Any] | None] | None = None
        self._failure: str | None = None

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str,
              fds: tuple[int, int, int]) -> subprocess.Popen[bytes]:
        """Start ``argv`` as the account in ``cwd`` with ``fds`` as stdin/stdout/stderr,
        in a new session (as :class:`subprocess.Popen` would).

        Raises:
            OSError: the command could not start (``filename`` is ``cwd`` when the
                directory could not be entered, else the program).
            SpawnerFailed: the thread could not become the account.
        """
        stdin, stdout, stderr = fds
        return self._call(lambda: subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
            start_new_session=True))

    def start(self) -> None:
        """Start the thread now if it is not running (so the first command need not).

        Raises:
            SpawnerFailed: it could not become the account.
        """
        self._call(lambda: None)

    def close(self) -> None:
        """End the thread (its commands go on: they are the agent's)."""
        with self._lock:
            if self._jobs is not None:
                self._jobs.put(None)
                self._jobs = None

    def _call(self, job: Callable[[], _T]) -> _T:
        """Run ``job`` on the thread; its result, or what it raised."""
        reply: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        with self._lock:
            if self._failure is not None:
                raise SpawnerFailed(self._failure)
            if self._jobs is None:
                self._jobs = self._start_thread()
            self._jobs.put((job, reply))
        ok, value = reply.get()
        if ok:
            return value  # type: ignore[no-any-return]  # what ``job`` returned
        raise value

    def _start_thread(self) -> queue.SimpleQueue[tuple[_Job, Any] | None]:
        jobs: queue.SimpleQueue[tuple[_Job, Any] | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, args=(jobs,), daemon=True,
                         name=f"spawner-{self.account.uid}").start()
        return jobs

    def _run(self, jobs: queue.SimpleQueue[tuple[_Job, Any] | None]) -> None:
        """The thread: become the account, then run jobs until told to end. A thread
        that could not become the account answers every job with SpawnerFailed."""
        try:
            become(self.account)
        except OSError as exc:
            failure = f"cannot run as uid {self.account.uid}: {exc}"
            log.warning("spawner: %s", failure)
            with self._lock:  # no job reaches this queue after this
                self._failure, self._jobs = failure, None
            while True:
                try:
                    item = jobs.get_nowait()
                except queue.Empty:
                    return
                if item is not None:
                    item[1].put((False, SpawnerFailed(failure)))
        log.info("spawner for uid %d started", self.account.uid)
        while (item := jobs.get()) is not None:
            job, reply = item
            try:
                reply.put((True, job()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                reply.put((False, exc))


def become(account: Account) -> None:
    """Make the calling thread ``account`` for good: its groups, gid and uid (real,
    effective, saved), with the raw system calls so no other thread changes; then
    check the kernel agrees.

    Raises:
        OSError: a call failed or the thread's credentials are not the account's (the
            thread must then run nothing).
    """
    numbers = CREDENTIAL_CALLS.get(os.uname().machine)
    if numbers is None:
        raise OSError(f"no credential system calls known for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    setgroups, setresgid, setresuid = numbers
    groups = (ctypes.c_uint * len(account.groups))(*account.groups)
    gid, uid = ctypes.c_uint(account.gid), ctypes.c_uint(account.uid)
    for number, args in ((setgroups, (ctypes.c_size_t(len(account.groups)), groups)),
                         (setresgid, (gid, gid, gid)), (setresuid, (uid, uid, uid))):
        if libc.syscall(ctypes.c_long(number), *args) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    _check_credentials(account)


def _check_credentials(account: Account) -> None:
    """Raises OSError unless this thread's ids, groups and capabilities are exactly the
    account's and none."""
    with open("/proc/thread-self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if ":" in line)
    uids, gids = fields["Uid"].split(), fields["Gid"].split()
    groups = sorted(int(g) for g in fields["Groups"].split())
    if (uids != [str(account.uid)] * 4 or gids != [str(account.gid)] * 4
            or groups != sorted(account.groups) or int(fields["CapEff"], 16)
            or int(fields["CapPrm"], 16)):  # fmt: skip
        raise OSError(f"thread credentials are {uids}/{gids}/{groups}, not the account's")


class Spawners:
    """The agent's spawners, one per account, at most :data:`MAX_SPAWNERS`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_account: dict[Account, Spawner] = {}

    def for_account(self, account: Account) -> Spawner:
        """The spawner of ``account`` (made on first use; not started until it spawns)."""
        with self._lock:
            spawner = self._by_account.pop(account, None)
            if spawner is None:
                spawner = Spawner(account)
                if len(self._by_account) >= MAX_SPAWNERS:
                    oldest = next(iter(self._by_account))
                    self._by_account.pop(oldest).close()
            self._by_account[account] = spawner  # most recently used last
            return spawner
