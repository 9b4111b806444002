"""Starting another account's commands without forking the agent: one spawner per account.

The agent runs as root and most commands run as the sandbox user. Forking the agent to
switch user is slow under TCG (its page tables are copied, and CPython cannot vfork when
it must change credentials), so each account gets a **spawner**: a small Python process
started once, already running as that account, that starts the account's commands.

* **The command is the agent's child.** The spawner starts it with
  ``clone(CLONE_PARENT)``: its parent is the agent, which waits for it, signals its
  process group and reads its exit status exactly as for a command it started itself.
  Nothing is lost when a spawner dies (the account may kill its own spawner): the next
  request starts a new one.
* **Access is the account's own.** The spawner changes into the working directory
  itself, so a directory the account may not enter fails with the account's
  ``EACCES`` (no check by the root agent in its place), and the program is looked up
  along the request's ``PATH`` with the account's rights.
* **The agent trusts nothing the spawner says.** The account can ptrace or replace
  its spawner, so a reply is only a claim: the agent accepts a pid only if it is its
  own child (``waitid(WNOWAIT)``) running as the account.

Wire format (one ``socketpair``): a request is ``len(4 bytes) + JSON`` ``{"argv",
"env", "cwd"}`` with the command's stdin, stdout and stderr attached (SCM_RIGHTS); the
reply is ``len + JSON``: ``{"pid": N}`` or ``{"errno": E, "stage": "chdir"|"exec",
"pid": N|None}`` (a command that could not exec still exited: the agent reaps it).

Standard library only (the agent runs in minimal guests).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from secvf.guest.agent import spawner_process
from secvf.guest.agent.spawner_process import ProtocolBroken, read_message

log = logging.getLogger("secvf.agent")

#: Most spawners kept at once (one per account in use); the oldest is stopped first.
MAX_SPAWNERS = 8
#: How long a spawner may take to answer one request (it never waits for a command).
REPLY_TIMEOUT_S = 30.0
#: How long a spawner gets to exit once its socket is closed, before it is killed.
STOP_GRACE_S = 1.0
#: The spawner's command line: read the process module's source from stdin, serve the
#: socket whose fd is the first argument.
SPAWNER_BOOT = ("import sys; exec(compile(sys.stdin.read(), 'secvf-spawner', 'exec')); "
                "serve(int(sys.argv[1]))")


class SpawnerFailed(Exception):
    """The spawner could not be reached or broke the protocol (the caller falls back)."""


@dataclass(frozen=True)
class Account:
    """What a spawner runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...]


class ChildProcess:
    """A command the spawner started as the agent's child: the part of
    :class:`subprocess.Popen` the agent uses (``pid``, ``poll``, ``wait``,
    ``returncode``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code (negative: the signal) if the command has ended, else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        """Wait for the command to end; its exit code."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class Spawner:
    """The agent's end of one account's spawner (started on first use, restarted if it
    died). Thread-safe: one request at a time."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str,
              fds: tuple[int, int, int]) -> ChildProcess:
        """Start ``argv`` as the account in ``cwd`` with ``fds`` as stdin/stdout/stderr.

        Raises:
            OSError: the command could not start (``filename`` is ``cwd`` when the
                directory could not be entered, else the program).
            SpawnerFailed: the spawner is unusable (started afresh next time).
        """
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()
        with self._lock:
            try:
                reply = self._exchange(request, fds)
            except (OSError, ValueError, ProtocolBroken, SpawnerFailed) as exc:
                self._stop()
                raise SpawnerFailed(f"spawner for uid {self.account.uid}: {exc}") from exc
        pid = reply.get("pid")
        if pid is not None:
            self._check_child(pid)  # raises unless it is the agent's child
        code = reply.get("errno")
        if code is None:
            if pid is None:
                raise SpawnerFailed("the spawner's reply has neither pid nor errno")
            return ChildProcess(pid)
        if pid is not None:
            ChildProcess(pid).wait()  # it exited 127 after its exec failed
        where = cwd if reply.get("stage") == "chdir" else argv[0]
        raise OSError(code, os.strerror(code), where)

    def start(self) -> None:
        """Start the spawner now if it is not running (so the first command need not).

        Raises:
            OSError: it could not be started.
        """
        with self._lock:
            if self._sock is None:
                self._start()

    def close(self) -> None:
        """Stop the spawner (its commands go on: they are the agent's)."""
        with self._lock:
            self._stop()

    def _exchange(self, request: bytes, fds: tuple[int, int, int]) -> dict[str, Any]:
        """Send one request and read its reply; a spawner found dead when sending (it
        cannot have seen the request) is replaced once."""
        for attempt in (1, 2):
            if self._sock is None:
                self._start()
            assert self._sock is not None
            try:
                socket.send_fds(self._sock, [struct.pack(">I", len(request))], list(fds))
                break
            except (BrokenPipeError, ConnectionResetError):
                if attempt == 2:
                    raise
                log.warning("spawner for uid %d is gone; starting another", self.account.uid)
                self._stop()
        assert self._sock is not None
        self._sock.sendall(request)
        reply = json.loads(read_message(self._sock))
        if not isinstance(reply, dict):
            raise SpawnerFailed("the spawner's reply is not an object")
        return reply

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(REPLY_TIMEOUT_S)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-I", "-c", SPAWNER_BOOT, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], user=self.account.uid, group=self.account.gid,
                extra_groups=list(self.account.groups), cwd="/", env={},
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
            assert self._proc.stdin is not None
            with self._proc.stdin:
                self._proc.stdin.write(process_source().encode())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        log.info("spawner for uid %d started (pid %d)", self.account.uid, self._proc.pid)

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the spawner sees EOF and exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _check_child(self, pid: int) -> None:
        """Accept ``pid`` only if it is the agent's own child running as the account."""
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise SpawnerFailed(f"the spawner's pid {pid!r} is not a process id")
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                status = os.read(fd, 1 << 16)
            finally:
                os.close(fd)
            real_uid = int(status.split(b"\nUid:", 1)[1].split(None, 1)[0])
        except (ChildProcessError, OSError, IndexError, ValueError) as exc:
            raise SpawnerFailed(f"pid {pid!r} from the spawner is not the agent's child") from exc
        if real_uid != self.account.uid:
            raise SpawnerFailed(f"pid {pid} from the spawner does not run as uid "
                                f"{self.account.uid}")


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




def process_source() -> str:
    """The source of :mod:`secvf.guest.agent.spawner_process` (from the zipapp too)."""
    return inspect.getsource(spawner_process)
