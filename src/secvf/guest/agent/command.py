"""One exec stream: a command spawned, its output pumped, its life supervised, its input fed."""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import logging
import os
import pty
import select
import selectors
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from secvf.exec import protocol
from secvf.guest.agent.connection import ConnectionGone
from secvf.guest.agent.errors import RequestFailed
from secvf.guest.agent.identity import Identity, call_as, default_cwd, resolve_identity
from secvf.guest.agent.process_groups import ForkMark, terminate_group
from secvf.guest.agent.spawner import SpawnerFailed

log = logging.getLogger("secvf.agent")

if TYPE_CHECKING:
    from secvf.guest.agent.session import Session

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TERM = "xterm-256color"
#: After the command exits, how long output still held by escaped processes is drained.
DRAIN_AFTER_EXIT_S = 2.0
#: How often a blocked stdin write re-checks whether the command is gone.
STDIN_POLL_S = 0.2
#: Size the command's stdout and stdin pipes are grown to (``F_SETPIPE_SZ``; 64 KiB if the
#: kernel refuses). Under TCG every pipe refill is a context switch the guest pays dearly
#: for, so larger pipes mean fewer of them (docs/performance.md, "Exec throughput").
PIPE_BYTES = 1024 * 1024
#: Most output bytes read from one fd per wakeup; they leave as DATA_CHUNK_BYTES frames in
#: one ``sendmsg``, straight from this buffer (no copy in the agent).
PUMP_READ_BYTES = 1024 * 1024
MAX_TERMINAL_DIM = 65535


def build_env(identity: Identity, extra: dict[str, str], tty: bool) -> dict[str, str]:
    """Return the clean default environment for ``identity`` overlaid with ``extra``.

    Raises:
        RequestFailed: a variable name is empty or contains ``=`` or NUL.
    """
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": identity.home,
        "USER": identity.name,
        "LOGNAME": identity.name,
        "SHELL": identity.shell,
        "LANG": "C.UTF-8",
    }
    if tty:
        env["TERM"] = DEFAULT_TERM
    for key in extra:
        if not key or "=" in key or "\0" in key:
            raise RequestFailed("invalid_request", f"invalid environment variable name {key!r}")
    env.update(extra)
    return env


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_controlling_tty() -> None:  # pragma: no cover - runs in the child before exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _check_dims(rows: int, cols: int) -> None:
    if not (1 <= rows <= MAX_TERMINAL_DIM and 1 <= cols <= MAX_TERMINAL_DIM):
        raise RequestFailed("invalid_request", f"terminal size {rows}x{cols} out of range")


def _check_cwd_access(identity: Identity, cwd: str) -> None:
    """Check ``identity`` itself may enter ``cwd``.

    subprocess changes directory *before* dropping privileges, so without this check an
    unprivileged command could start inside a directory it has no search permission on.

    Raises:
        RequestFailed: kind ``bad_cwd``.
    """
    if identity.is_self:
        return  # no switch: subprocess's own chdir error is already the user's
    try:
        call_as(identity, lambda: os.chdir(cwd))
    except OSError as exc:
        msg = f"cannot enter {cwd}: {exc.strerror}"
        raise RequestFailed("bad_cwd", msg, exc.errno, "chdir") from exc


def _start_failure(exc: OSError, program: str, cwd: str) -> RequestFailed:
    err = exc.errno
    if exc.filename == cwd:
        return RequestFailed("bad_cwd", f"cannot enter {cwd}: {exc.strerror}", err, "chdir")
    kind = {
        errno.ENOENT: "not_found",
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
    }.get(err or 0, "other")
    return RequestFailed(kind, f"cannot execute {program!r}: {exc.strerror}", err, "exec")


def _grow_pipe(fd: int) -> None:
    """Grow the pipe of ``fd`` to :data:`PIPE_BYTES` if the kernel allows (else keep it)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:  # EPERM above fs.pipe-max-size or the user's pipe quota
        pass


class _InputClosed(Exception):
    """The command's stdin is closed or the command has ended: drop the input."""


class TaskState(enum.Enum):
    """Lifecycle of one exec stream."""

    RUNNING = "running"
    ENDING = "ending"  # the command exited or is being killed; output is draining
    DONE = "done"  # exit sent (or the connection is gone)


class ExecTask:
    """One running command: spawn, pump output, supervise, accept input.

    Where its ``started``, output and ``exit`` go is four small methods (``_announce_started``,
    ``_emit_output``, ``_report_exit``, ``_ended``): here, the session's stream; a
    background process (:class:`~secvf.guest.agent.detached.DetachedProcess`) overrides
    them to keep its output in a buffer instead.
    """

    def __init__(self, session: Session, stream_id: int, request: dict[str, Any]) -> None:
        self.session = session
        self.agent = session.agent
        self.conn = session.conn
        self.stream_id = stream_id
        self.request = request
        self.state = TaskState.RUNNING
        self.proc: subprocess.Popen[bytes] | None = None
        self.tty_fd: int | None = None  # PTY master (tty mode)
        self.stdin_fd: int | None = None  # our end of the child's stdin
        self.output_fds: dict[int, protocol.FrameType] = {}
        self._stdin_failed = False
        self._cancel = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        # Guards every use of our fds from the reader thread against their closing by
        # the supervisor (a closed fd number may be reused by another stream at once).
        self._fd_lock = threading.RLock()
        self._fds_open = True
        self._pump_done = threading.Event()
        self._pump_buffer = memoryview(bytearray(protocol.DATA_CHUNK_BYTES))  # see _pump_one
        self._drain_until: float | None = None
        #: Taken just before the command starts (what the group sweep reads: see
        #: :mod:`secvf.guest.agent.process_groups`).
        self._fork_mark: ForkMark | None = None
        self.started_at = time.monotonic()

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<ExecTask stream={self.stream_id} pid={pid} state={self.state.value}>"

    # -- start (reader thread) ----------------------------------------------------------

    def start(self) -> None:
        """Spawn the command and its two threads (the pump sends ``started`` first).

        Raises:
            RequestFailed: the command could not start (sent as start_failed by caller);
                every descriptor of the task is closed then.
        """
        try:
            self._start()
        except RequestFailed:
            self._close_own_fds()
            raise

    def _start(self) -> None:
        """Check the request and spawn (see :meth:`start`)."""
        req = self.request
        if (req["argv"] is None) == (req["shell"] is None):
            raise RequestFailed("invalid_request", "exactly one of argv and shell is required")
        argv = req["argv"] if req["argv"] is not None else ["/bin/sh", "-c", req["shell"]]
        if not argv:
            raise RequestFailed("invalid_request", "argv is empty")
        if req["timeout_s"] is not None and req["timeout_s"] <= 0:
            raise RequestFailed("invalid_request", "timeout_s must be positive")
        _check_dims(req["rows"], req["cols"])
        identity = resolve_identity(req["user"] or self.agent.default_user)
        env = build_env(identity, req["env"], req["tty"])
        cwd = req["cwd"] or default_cwd(identity)
        if not os.path.isdir(cwd):
            raise RequestFailed(
                "bad_cwd", f"working directory {cwd} does not exist", errno.ENOENT, "chdir"
            )
        self._fork_mark = ForkMark.before_start()
        if identity.is_self or req["tty"] or not self._spawn_as(argv, identity, env, cwd):
            _check_cwd_access(identity, cwd)
            self._spawn(argv, identity, env, cwd)
        self.agent.workers.run(self._bh_pump)
        self.agent.workers.run(self._bh_supervise)

    def _spawn_as(self, argv: list[str], identity: Identity, env: dict[str, str],
                  cwd: str) -> bool:
        """Start the command from ``identity``'s spawner (a pipe command as another
        account: see :mod:`secvf.guest.agent.spawner`); False if the spawner is unusable
        (the caller starts it itself then).

        Raises:
            RequestFailed: the command could not start.
        """
        spawner = self.agent.spawners.for_account(identity.account)

        def launch(kwargs: dict[str, Any]) -> subprocess.Popen[bytes]:
            stdio = (kwargs["stdin"], kwargs["stdout"], kwargs["stderr"])
            return spawner.spawn(argv, env, cwd, stdio)

        try:
            self._start_child({}, self._prepare_pipes, launch, argv[0], cwd)
        except SpawnerFailed as exc:
            log.warning("exec: %s; starting the command from the agent", exc)
            self._drop_pipes()
            return False
        return True

    def _spawn(self, argv: list[str], identity: Identity, env: dict[str, str], cwd: str) -> None:
        kwargs: dict[str, Any] = {"cwd": cwd, "env": env, "start_new_session": True}
        if not identity.is_self:
            kwargs.update(user=identity.uid, group=identity.gid, extra_groups=identity.groups)
        if self.request["tty"]:
            prepare: Callable[[dict[str, Any]], list[int]] = functools.partial(
                self._prepare_tty, identity)
        else:
            prepare = self._prepare_pipes
        self._start_child(kwargs, prepare, lambda kw: subprocess.Popen(argv, **kw), argv[0], cwd)

    def _start_child(self, kwargs: dict[str, Any],
                     prepare: Callable[[dict[str, Any]], list[int]],
                     launch: Callable[[dict[str, Any]], subprocess.Popen[bytes]],
                     program: str, cwd: str) -> None:
        """Make the command's descriptors (``prepare`` fills ``kwargs`` and returns the
        child's ends), start it (``self.proc = launch(kwargs)``), close the child's ends.

        Raises:
            RequestFailed: it could not start (every descriptor of the task is closed).
            SpawnerFailed: from a spawner (the task's own descriptors stay open).
        """
        child_fds: list[int] = []
        try:
            child_fds = prepare(kwargs)
            self.proc = launch(kwargs)
        except OSError as exc:
            self._close_own_fds()
            raise _start_failure(exc, program, cwd) from exc
        except (ValueError, TypeError) as exc:
            self._close_own_fds()
            raise RequestFailed("invalid_request", str(exc)) from exc
        finally:
            for fd in child_fds:
                os.close(fd)

    def _prepare_tty(self, identity: Identity, kwargs: dict[str, Any]) -> list[int]:
        master, slave = pty.openpty()
        _set_winsize(slave, self.request["rows"], self.request["cols"])
        if os.geteuid() == 0:
            os.fchown(slave, identity.uid, -1)
        os.set_blocking(master, False)
        self.tty_fd = master
        self.stdin_fd = master
        self.output_fds = {master: protocol.FrameType.STDOUT}
        kwargs.update(stdin=slave, stdout=slave, stderr=slave, preexec_fn=_take_controlling_tty)
        return [slave]

    def _drop_pipes(self) -> None:
        """Close our ends of the pipes :meth:`_prepare_pipes` made (before a retry)."""
        with self._fd_lock:
            ours = [*self.output_fds, *([self.stdin_fd] if self.stdin_fd is not None else [])]
            self.output_fds, self.stdin_fd = {}, None
        for fd in ours:
            os.close(fd)

    def _prepare_pipes(self, kwargs: dict[str, Any]) -> list[int]:
        out_r, out_w = os.pipe()
        _grow_pipe(out_r)
        err_r, err_w = os.pipe()
        child_fds = [out_w, err_w]
        self.output_fds = {out_r: protocol.FrameType.STDOUT, err_r: protocol.FrameType.STDERR}
        if self.request["stdin"]:
            in_r, in_w = os.pipe()
            _grow_pipe(in_w)
            os.set_blocking(in_w, False)
            self.stdin_fd = in_w
            child_fds.append(in_r)
            kwargs["stdin"] = in_r
        else:
            kwargs["stdin"] = subprocess.DEVNULL
        kwargs.update(stdout=out_w, stderr=err_w)
        return child_fds

    # -- input (reader thread) ------------------------------------------------------------

    def write_stdin(self, data: bytes | memoryview) -> None:
        """Write ``data`` to the command's stdin, waiting while the pipe is full (``data``
        is not kept: a frame's body view is written before this returns).

        A failed write is reported once as ``stdin_error``; later input is dropped.
        """
        view = memoryview(data)

        def write(fd: int) -> int:
            return os.write(fd, view)  # what is left of it, at each call

        try:
            while view:
                view = view[self._stdin_step(write) or 0 :]
        except _InputClosed:
            return

    def take_stdin_rest(self, reader: protocol.FrameReader) -> None:
        """Move the rest of a STDIN frame's body from the socket to the command: spliced
        into its stdin pipe (no copy through Python), or for a terminal received and
        written. What is not taken (the command is gone, the write failed) the reader
        drops."""
        if self.tty_fd is not None:
            for piece in reader.receive_rest():
                self.write_stdin(piece)
            return
        try:
            while reader.rest:
                reader.wait_for_rest()
                if self._stdin_step(reader.splice_rest) == 0:
                    return  # the client closed inside the frame
        except _InputClosed:
            return

    def _stdin_step(self, move: Callable[[int], int]) -> int | None:
        """Run ``move(stdin_fd)`` (a write or a splice into the pipe) once; return what it
        returned, or None after waiting up to STDIN_POLL_S if the pipe was full.

        Raises:
            _InputClosed: stdin is closed or the command has ended, or the move failed
                (reported once as ``stdin_error``): drop the input.
        """
        with self._fd_lock:
            fd = self.stdin_fd
            if not self._fds_open or fd is None or self.state is not TaskState.RUNNING:
                raise _InputClosed
            try:
                return move(fd)
            except BlockingIOError:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                poller.poll(STDIN_POLL_S * 1000)
                return None
            except OSError as exc:
                failure = exc
        self._report_stdin_error(failure)  # outside the lock: it sends a message
        raise _InputClosed from failure

    def _report_stdin_error(self, exc: OSError) -> None:
        self.close_stdin()
        if not self._stdin_failed:
            self._stdin_failed = True
            err = RequestFailed("other", f"writing stdin failed: {exc.strerror}", exc.errno)
            self.conn.message("stdin_error", self.stream_id, **err.fields())

    def close_stdin(self) -> None:
        """Signal EOF on stdin (closes the pipe; sends the EOF character to a PTY)."""
        with self._fd_lock:
            if self.tty_fd is not None:
                if self.state is TaskState.RUNNING:
                    eof = termios.tcgetattr(self.tty_fd)[6][termios.VEOF]
                    self.write_stdin(eof if isinstance(eof, bytes) else bytes([eof]))
                return
            if self.stdin_fd is not None:
                fd, self.stdin_fd = self.stdin_fd, None
                os.close(fd)

    def send_signal(self, signum: int) -> None:
        """Deliver ``signum`` to the command's process group."""
        if self.proc is not None and self.state is TaskState.RUNNING:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def resize(self, rows: int, cols: int) -> None:
        """Set the PTY size; the kernel sends SIGWINCH to the foreground group."""
        _check_dims(rows, cols)
        with self._fd_lock:
            if self.tty_fd is not None and self.state is TaskState.RUNNING:
                _set_winsize(self.tty_fd, rows, cols)

    def cancel(self) -> None:
        """Ask the supervisor to kill the process group (returns at once)."""
        self._cancel.set()
        with self._fd_lock:
            if self._fds_open:
                os.write(self._wake_w, b"x")

    # -- background threads ---------------------------------------------------------------

    def _bh_pump(self) -> None:
        """Send ``started``, then copy output until EOF or the drain deadline passes."""
        try:
            self._announce_started()
            with selectors.DefaultSelector() as sel:
                for fd in self.output_fds:
                    sel.register(fd, selectors.EVENT_READ)
                while sel.get_map():
                    if self._drain_until is not None and time.monotonic() > self._drain_until:
                        break
                    for key, _ in sel.select(0.2):
                        self._pump_one(sel, key.fd)
        except ConnectionGone:
            self.cancel()
        finally:
            self._pump_done.set()

    def _pump_one(self, sel: selectors.BaseSelector, fd: int) -> None:
        """Move what ``fd`` holds now (up to the buffer's size) to the client; the send
        blocks while the client does not read, so the pipe is read no faster.

        The buffer starts at DATA_CHUNK_BYTES (a short command never touches more) and
        grows to PUMP_READ_BYTES the first time a read fills it."""
        buffer = self._pump_buffer
        try:
            size = os.readv(fd, [buffer])
        except BlockingIOError:
            return
        except OSError:  # EIO from a PTY master once the last slave fd closes
            size = 0
        if size:
            self._emit_output(self.output_fds[fd], buffer[:size])
            if size == len(buffer) < PUMP_READ_BYTES:
                self._pump_buffer = memoryview(bytearray(PUMP_READ_BYTES))
        else:
            sel.unregister(fd)

    def _bh_supervise(self) -> None:
        """Wait for exit, enforce timeout/cancel, clean the group, then send ``exit``."""
        proc = self.proc
        assert proc is not None
        timed_out = cancelled = False
        deadline = None
        if self.request["timeout_s"] is not None:
            deadline = self.started_at + self.request["timeout_s"]
        pidfd = os.pidfd_open(proc.pid)
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(pidfd, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                while proc.poll() is None:
                    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                    sel.select(wait)
                    if proc.poll() is not None:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        timed_out = True
                        break
                    if self._cancel.is_set():
                        cancelled = True
                        break
        finally:
            os.close(pidfd)
        self.state = TaskState.ENDING
        terminate_group(proc.pid, self._fork_mark)
        self._finish(proc.wait(), timed_out, cancelled)

    def _finish(self, returncode: int, timed_out: bool, cancelled: bool) -> None:
        self._drain_until = time.monotonic() + DRAIN_AFTER_EXIT_S
        self._pump_done.wait()
        duration_ms = int((time.monotonic() - self.started_at) * 1000)
        code, sig = (returncode, None) if returncode >= 0 else (None, -returncode)
        self._report_exit(
            {
                "code": code,
                "signal": sig,
                "timed_out": timed_out,
                "cancelled": cancelled,
                "duration_ms": duration_ms,
            }
        )
        self.state = TaskState.DONE
        self._close_own_fds()
        self._ended()

    # -- where started, output and exit go (overridden by DetachedProcess) ----------------

    def _announce_started(self) -> None:
        """Send ``started`` (pump thread, before any output).

        Raises:
            ConnectionGone: the client went away.
        """
        self.conn.message("started", self.stream_id, pid=self.proc.pid)  # type: ignore[union-attr]

    def _emit_output(self, frame_type: protocol.FrameType, data: memoryview) -> None:
        """Send one read of output (``data`` is only valid during the call); blocks while
        the client does not read, so the pipe is read no faster.

        Raises:
            ConnectionGone: the client went away.
        """
        self.conn.send_parts(protocol.data_frame_parts(frame_type, self.stream_id, data))

    def _report_exit(self, outcome: dict[str, Any]) -> None:
        """Send ``exit`` with ``outcome`` (its payload); a client already gone is fine."""
        try:
            self.conn.message("exit", self.stream_id, **outcome)
        except ConnectionGone:
            pass

    def _ended(self) -> None:
        """The command is over and its descriptors are closed: forget the stream."""
        self.session.stream_ended(self.stream_id)

    def _close_own_fds(self) -> None:
        with self._fd_lock:
            if not self._fds_open:
                return
            self._fds_open = False
            fds = set(self.output_fds) | {self._wake_r, self._wake_w}
            if self.stdin_fd is not None:
                fds.add(self.stdin_fd)
            self.output_fds, self.stdin_fd, self.tty_fd = {}, None, None
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def abort(self) -> None:
        """The connection is gone: kill the command (same path as cancel)."""
        self.cancel()
