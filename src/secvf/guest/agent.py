"""SecVF guest exec agent: runs commands and moves files for the host, over vsock.

Standard library only (Python 3.11, Debian's ``python3`` package: ``json``, ``pty`` and
``termios`` are not in ``python3-minimal``). Installed into AI-sandbox images as
``/usr/lib/secvf/agent/agent.py`` with ``protocol.py`` next to it, started by init.

Primer
======

* **Listening.** AF_VSOCK port 2222 on VMADDR_CID_ANY (``--port``), or a Unix socket
  (``--unix PATH``) for host-side tests. One accepted connection is one *session*,
  served by its own thread; sessions are independent, and a session that sends garbage
  gets an ERROR frame and is closed while the others carry on. At most MAX_SESSIONS
  sessions run at once; the next one is refused with ERROR ``busy``.
* **Session lifecycle** (:class:`SessionState`): HANDSHAKE (the client must send
  ``hello`` within HELLO_TIMEOUT_S) → READY (any number of streams) → CLOSED. Closing,
  for whatever reason (client EOF, protocol error, send failure), aborts every stream of
  the session: commands are killed, partial uploads removed.
* **Exec.** A command runs in a new session and process group (``start_new_session``)
  as the requested user (``setgroups/setgid/setuid`` in the child) with a clean
  environment plus the requested variables, in the requested cwd (default
  ``/workspace`` if it exists, else the user's home). Two threads per command:
  the *pump* copies the child's stdout/stderr (or PTY) into frames and blocks when the
  client does not read (back-pressure: the pipes fill and the child blocks); the
  *supervisor* waits on a pidfd and enforces the timeout and ``cancel`` even while the
  pump is blocked. When the command ends - normally, by timeout, by cancel or because
  the client went away - every process still in its process group or session is sent
  SIGTERM, then SIGKILL after KILL_GRACE_S. A process that calls ``setsid`` itself
  escapes this (as it would escape any process-group based supervisor).
* **Files.** Uploads and downloads open the file *as the requested user*: a short
  forked helper takes that user's credentials, opens the file and passes the descriptor
  back (SCM_RIGHTS). Permission checks are therefore the user's own, and an uploaded
  file is owned by that user. Uploads go to a temporary file in the target directory
  and are renamed into place at ``upload_end``.
* **Keepalive.** While a session has a command running, the agent sends ``keepalive``
  every ``--keepalive-interval`` seconds so the host can tell a silent command from a
  dead agent.
* **Running unprivileged** (host tests): switching to another user is impossible, so an
  exec or file request for any user but the agent's own fails with kind
  ``permission_denied`` (stage ``switch_user``); nothing half-starts.
"""

from __future__ import annotations

import argparse
import enum
import errno
import fcntl
import logging
import os
import pty
import pwd
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:
    from secvf.exec import protocol
except ImportError:  # inside the guest image: protocol.py sits next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import protocol  # type: ignore[no-redef,import-not-found]

AGENT_VERSION = "0.1.0"
DEFAULT_USER = "agent"
DEFAULT_WORKSPACE = "/workspace"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TERM = "xterm-256color"
MAX_SESSIONS = 64
HELLO_TIMEOUT_S = 10.0
RECV_BYTES = 256 * 1024
#: After the command exits, how long output still held by escaped processes is drained.
DRAIN_AFTER_EXIT_S = 2.0
#: How often a blocked stdin write re-checks whether the command is gone.
STDIN_POLL_S = 0.2
GROUP_POLL_S = 0.02
MAX_TERMINAL_DIM = 65535
DEFAULT_NEW_FILE_MODE = 0o644
CAPABILITIES = ["exec", "tty", "stdin", "signal", "resize", "files", "info", "keepalive"]

log = logging.getLogger("secvf.agent")


# --------------------------------------------------------------------------- identity


class RequestFailed(Exception):
    """A request cannot be carried out; becomes a start_failed / file_error message."""

    def __init__(
        self, kind: str, message: str, err: int | None = None, stage: str = "", path: str = ""
    ) -> None:
        super().__init__(message)
        self.kind = kind  # a START_FAILURE_KINDS or FILE_ERROR_KINDS value
        self.errno = err  # the OS errno behind the failure, if any
        self.stage = stage  # exec only: which step failed (switch_user, chdir, exec)
        self.path = path  # files only: the guest path concerned

    def fields(self) -> dict[str, Any]:
        """Return errno, errno_name and message for the wire."""
        name = errno.errorcode.get(self.errno) if self.errno is not None else None
        return {"errno": self.errno, "errno_name": name, "message": str(self)}


@dataclass(frozen=True)
class Identity:
    """A guest account a request runs as."""

    name: str  # login name
    uid: int  # numeric user id
    gid: int  # primary group id
    groups: tuple[int, ...]  # supplementary groups (initgroups equivalent)
    home: str  # home directory from passwd
    shell: str  # login shell from passwd

    @property
    def is_self(self) -> bool:
        """True if this is the identity the agent already runs as (no switch needed)."""
        return self.uid == os.geteuid()


def resolve_identity(name: str) -> Identity:
    """Look up ``name`` and check the agent may act as it.

    Raises:
        RequestFailed: unknown account (``unknown_user``), or the agent is not root and
            ``name`` is another account (``permission_denied``, stage ``switch_user``).
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise RequestFailed(
            "unknown_user", f"no such user: {name!r}", stage="switch_user"
        ) from None
    identity = Identity(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
        home=entry.pw_dir,
        shell=entry.pw_shell or "/bin/sh",
    )
    if not identity.is_self and os.geteuid() != 0:
        raise RequestFailed(
            "permission_denied",
            f"the agent runs unprivileged and cannot act as {name!r}",
            errno.EPERM,
            "switch_user",
        )
    return identity


def default_cwd(identity: Identity) -> str:
    """Return /workspace if it exists, else the user's home, else /."""
    for candidate in (DEFAULT_WORKSPACE, identity.home):
        if os.path.isdir(candidate):
            return candidate
    return "/"


def login_users() -> list[str]:
    """Return root and the regular accounts (uid >= 1000, not nobody)."""
    return sorted(e.pw_name for e in pwd.getpwall() if e.pw_uid == 0 or 1000 <= e.pw_uid < 65534)


def call_as(identity: Identity, action: Callable[[], int | None]) -> int | None:
    """Run ``action`` with ``identity``'s credentials; return the fd it returns, if any.

    When a switch is needed a child is forked: it drops to the identity, runs
    ``action`` and passes the resulting descriptor back over a socketpair. The child
    only calls async-signal-safe-in-spirit OS functions (no locks, no logging).

    Raises:
        OSError: ``action`` failed in the child (errno preserved).
    """
    if identity.is_self:
        return action()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        _run_child_action(identity, action, child)
    child.close()
    try:
        reply, fds, _, _ = socket.recv_fds(parent, 8, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if reply[:1] == b"E":
        err = struct.unpack(">i", reply[1:5])[0]
        raise OSError(err, os.strerror(err))
    return fds[0] if fds else None


def _run_child_action(identity: Identity, action: Callable[[], int | None], sock: Any) -> None:
    code = 0
    try:
        os.setgroups(list(identity.groups))
        os.setgid(identity.gid)
        os.setuid(identity.uid)
        fd = action()
        socket.send_fds(sock, [b"K"], [fd] if fd is not None else [])
    except OSError as exc:
        sock.sendall(b"E" + struct.pack(">i", exc.errno or errno.EIO))
    except BaseException:  # noqa: BLE001 - the child must never return into the agent
        code = 1
    finally:
        os._exit(code)


# --------------------------------------------------------------------------- processes


def group_members(leader: int) -> list[int]:
    """Return live pids whose process group or session is ``leader`` (zombies excluded)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if state != b"Z" and leader in (pgrp, session):
            members.append(int(entry))
    return members


def terminate_group(leader: int, grace_s: float = protocol.KILL_GRACE_S) -> None:
    """SIGTERM every process of ``leader``'s group/session, SIGKILL survivors after grace."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while members := group_members(leader):
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            time.sleep(GROUP_POLL_S)
        elif time.monotonic() >= deadline:
            sig = signal.SIGKILL
        else:
            time.sleep(GROUP_POLL_S)


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


def _start_failure(exc: OSError, cwd: str) -> RequestFailed:
    err = exc.errno
    if exc.filename == cwd:
        return RequestFailed("bad_cwd", f"cannot enter {cwd}: {exc.strerror}", err, "chdir")
    kind = {
        errno.ENOENT: "not_found",
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
    }.get(err or 0, "other")
    return RequestFailed(kind, f"cannot execute: {exc.strerror}", err, "exec")


# --------------------------------------------------------------------------- connection


class ConnectionGone(Exception):
    """Sending failed: the client went away."""


class _InputClosed(Exception):
    """The command's stdin is closed or the command has ended: drop the input."""


class Connection:
    """The socket of one session; sends are serialised by a lock (thread-safe)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self.broken = False

    def send(self, data: bytes) -> None:
        """Send whole frames; blocks while the client does not read (back-pressure).

        Raises:
            ConnectionGone: the socket is closed or the peer went away.
        """
        with self._send_lock:
            if self.broken:
                raise ConnectionGone("connection already failed")
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self.broken = True
                raise ConnectionGone(str(exc)) from exc

    def message(self, name: str, stream_id: int = 0, **fields: Any) -> None:
        """Encode and send one control message."""
        self.send(protocol.encode_message(name, stream_id, **fields))

    def close(self) -> None:
        """Shut the socket down both ways (wakes a blocked recv) and close it."""
        self.broken = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# --------------------------------------------------------------------------- exec


class TaskState(enum.Enum):
    """Lifecycle of one exec stream."""

    RUNNING = "running"
    ENDING = "ending"  # the command exited or is being killed; output is draining
    DONE = "done"  # exit sent (or the connection is gone)


class ExecTask:
    """One running command: spawn, pump output, supervise, accept input."""

    def __init__(self, session: Session, stream_id: int, request: dict[str, Any]) -> None:
        self.session = session
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
        self._drain_until: float | None = None
        self.started_at = time.monotonic()

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<ExecTask stream={self.stream_id} pid={pid} state={self.state.value}>"

    # -- start (reader thread) ----------------------------------------------------------

    def start(self) -> None:
        """Spawn the command and its two threads (the pump sends ``started`` first).

        Raises:
            RequestFailed: the command could not start (sent as start_failed by caller).
        """
        req = self.request
        if (req["argv"] is None) == (req["shell"] is None):
            raise RequestFailed("invalid_request", "exactly one of argv and shell is required")
        argv = req["argv"] if req["argv"] is not None else ["/bin/sh", "-c", req["shell"]]
        if not argv:
            raise RequestFailed("invalid_request", "argv is empty")
        if req["timeout_s"] is not None and req["timeout_s"] <= 0:
            raise RequestFailed("invalid_request", "timeout_s must be positive")
        _check_dims(req["rows"], req["cols"])
        identity = resolve_identity(req["user"] or self.session.agent.default_user)
        env = build_env(identity, req["env"], req["tty"])
        cwd = req["cwd"] or default_cwd(identity)
        if not os.path.isdir(cwd):
            raise RequestFailed(
                "bad_cwd", f"working directory {cwd} does not exist", errno.ENOENT, "chdir"
            )
        _check_cwd_access(identity, cwd)
        self._spawn(argv, identity, env, cwd)
        threading.Thread(target=self._bh_pump, name=f"pump-{self.stream_id}", daemon=True).start()
        threading.Thread(
            target=self._bh_supervise, name=f"supervise-{self.stream_id}", daemon=True
        ).start()

    def _spawn(self, argv: list[str], identity: Identity, env: dict[str, str], cwd: str) -> None:
        kwargs: dict[str, Any] = {"cwd": cwd, "env": env, "start_new_session": True}
        if not identity.is_self:
            kwargs.update(user=identity.uid, group=identity.gid, extra_groups=identity.groups)
        child_fds: list[int] = []
        try:
            if self.request["tty"]:
                child_fds = self._prepare_tty(identity, kwargs)
            else:
                child_fds = self._prepare_pipes(kwargs)
            self.proc = subprocess.Popen(argv, **kwargs)
        except OSError as exc:
            self._close_own_fds()
            raise _start_failure(exc, cwd) from exc
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

    def _prepare_pipes(self, kwargs: dict[str, Any]) -> list[int]:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        child_fds = [out_w, err_w]
        self.output_fds = {out_r: protocol.FrameType.STDOUT, err_r: protocol.FrameType.STDERR}
        if self.request["stdin"]:
            in_r, in_w = os.pipe()
            os.set_blocking(in_w, False)
            self.stdin_fd = in_w
            child_fds.append(in_r)
            kwargs["stdin"] = in_r
        else:
            kwargs["stdin"] = subprocess.DEVNULL
        kwargs.update(stdout=out_w, stderr=err_w)
        return child_fds

    # -- input (reader thread) ------------------------------------------------------------

    def write_stdin(self, data: bytes) -> None:
        """Write ``data`` to the command's stdin, waiting while the pipe is full.

        A failed write is reported once as ``stdin_error``; later input is dropped.
        """
        view = memoryview(data)
        while view:
            try:
                view = view[self._write_some(view) :]
            except _InputClosed:
                return
            except OSError as exc:
                self._report_stdin_error(exc)
                return

    def _write_some(self, view: memoryview) -> int:
        """Write what the pipe takes now, else wait up to STDIN_POLL_S; return bytes written."""
        with self._fd_lock:
            fd = self.stdin_fd
            if not self._fds_open or fd is None or self.state is not TaskState.RUNNING:
                raise _InputClosed
            try:
                return os.write(fd, view)
            except BlockingIOError:
                with selectors.DefaultSelector() as sel:
                    sel.register(fd, selectors.EVENT_WRITE)
                    sel.select(STDIN_POLL_S)
                return 0

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
            self.conn.message("started", self.stream_id, pid=self.proc.pid)  # type: ignore[union-attr]
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
        try:
            data = os.read(fd, protocol.DATA_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:  # EIO from a PTY master once the last slave fd closes
            data = b""
        if data:
            self.conn.send(protocol.encode_data(self.output_fds[fd], self.stream_id, data))
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
        terminate_group(proc.pid)
        proc.wait()
        self._finish(proc.returncode, timed_out, cancelled)

    def _finish(self, returncode: int, timed_out: bool, cancelled: bool) -> None:
        self._drain_until = time.monotonic() + DRAIN_AFTER_EXIT_S
        self._pump_done.wait()
        duration_ms = int((time.monotonic() - self.started_at) * 1000)
        code, sig = (returncode, None) if returncode >= 0 else (None, -returncode)
        try:
            self.conn.message(
                "exit",
                self.stream_id,
                code=code,
                signal=sig,
                timed_out=timed_out,
                cancelled=cancelled,
                duration_ms=duration_ms,
            )
        except ConnectionGone:
            pass
        self.state = TaskState.DONE
        self._close_own_fds()
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


# --------------------------------------------------------------------------- files


def _file_failure(exc: OSError, path: str) -> RequestFailed:
    kind = {
        errno.ENOENT: "not_found",
        errno.ENOTDIR: "not_found",
        errno.EISDIR: "is_a_directory",
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
    }.get(exc.errno or 0, "other")
    return RequestFailed(kind, exc.strerror or "failed", exc.errno, path=path)


class UploadTask:
    """One upload: a temporary file opened as the user, renamed into place at the end."""

    def __init__(self, session: Session, stream_id: int, request: dict[str, Any]) -> None:
        self.session = session
        self.stream_id = stream_id
        self.request = request
        self.identity: Identity | None = None
        self.path = ""
        self.tmp_path = ""
        self.fd: int | None = None
        self.size = 0

    def start(self) -> None:
        """Open the temporary file as the user and send ``upload_ready``.

        Raises:
            RequestFailed: unknown user, bad path, no permission.
        """
        self.identity = resolve_identity(self.request["user"] or self.session.agent.default_user)
        self.path = os.path.join(default_cwd(self.identity), self.request["path"])
        if os.path.isdir(self.path):
            raise RequestFailed("is_a_directory", "is a directory", errno.EISDIR, path=self.path)
        directory, name = os.path.split(self.path)
        self.tmp_path = os.path.join(directory, f".{name}.secvf-upload-{os.getpid()}-{id(self)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self.fd = call_as(self.identity, lambda: os.open(self.tmp_path, flags, 0o600))
        except OSError as exc:
            raise _file_failure(exc, self.path) from exc
        self.session.conn.message("upload_ready", self.stream_id)

    def write_chunk(self, data: bytes) -> None:
        """Append one FILE_DATA chunk."""
        assert self.fd is not None
        try:
            self._write_all(data)
        except OSError as exc:
            self._fail(_file_failure(exc, self.path))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]  # type: ignore[arg-type]
        self.size += len(data)

    def finish(self) -> None:
        """Apply the mode, rename into place, send ``upload_done``."""
        assert self.fd is not None and self.identity is not None
        mode = self.request["mode"]
        try:
            if mode is None:
                mode = _existing_mode(self.path, DEFAULT_NEW_FILE_MODE)
            os.fchmod(self.fd, mode & 0o7777)
            os.close(self.fd)
            self.fd = None
            call_as(self.identity, lambda: os.rename(self.tmp_path, self.path))
        except OSError as exc:
            self._fail(_file_failure(exc, self.path))
            return
        self.session.conn.message(
            "upload_done", self.stream_id, path=self.path, size=self.size, mode=mode & 0o7777
        )
        self.session.stream_ended(self.stream_id)

    def _fail(self, failure: RequestFailed) -> None:
        self.abort()
        fields = {"kind": failure.kind, "path": self.path, **failure.fields()}
        self.session.conn.message("file_error", self.stream_id, **fields)
        self.session.stream_ended(self.stream_id)

    def abort(self) -> None:
        """Close and remove the temporary file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass


def _existing_mode(path: str, fallback: int) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return fallback


class DownloadTask:
    """One download: open as the user, stream FILE_DATA chunks in a thread."""

    def __init__(self, session: Session, stream_id: int, request: dict[str, Any]) -> None:
        self.session = session
        self.stream_id = stream_id
        self.request = request
        self._aborted = threading.Event()

    def start(self) -> None:
        """Open the file and start the sending thread.

        Raises:
            RequestFailed: unknown user, missing file, directory, no permission.
        """
        identity = resolve_identity(self.request["user"] or self.session.agent.default_user)
        path = os.path.join(default_cwd(identity), self.request["path"])
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = call_as(identity, lambda: os.open(path, flags))
        except OSError as exc:
            raise _file_failure(exc, path) from exc
        assert fd is not None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            if stat.S_ISDIR(info.st_mode):
                raise RequestFailed("is_a_directory", "is a directory", errno.EISDIR, path=path)
            raise RequestFailed("not_regular_file", "not a regular file", path=path)
        os.set_blocking(fd, True)
        mode = stat.S_IMODE(info.st_mode)
        self.session.conn.message(
            "download_start", self.stream_id, path=path, size=info.st_size, mode=mode
        )
        threading.Thread(
            target=self._bh_send, args=(fd,), name=f"download-{self.stream_id}", daemon=True
        ).start()

    def _bh_send(self, fd: int) -> None:
        sent = 0
        try:
            while not self._aborted.is_set():
                chunk = os.read(fd, protocol.DATA_CHUNK_BYTES)
                if not chunk:
                    break
                frame = protocol.encode_data(protocol.FrameType.FILE_DATA, self.stream_id, chunk)
                self.session.conn.send(frame)
                sent += len(chunk)
            self.session.conn.message("download_end", self.stream_id, size=sent)
        except ConnectionGone:
            pass
        except OSError as exc:
            failure = _file_failure(exc, self.request["path"])
            self._send_error(failure)
        finally:
            os.close(fd)
            self.session.stream_ended(self.stream_id)

    def _send_error(self, failure: RequestFailed) -> None:
        try:
            fields = {"kind": failure.kind, "path": failure.path, **failure.fields()}
            self.session.conn.message("file_error", self.stream_id, **fields)
        except ConnectionGone:
            pass

    def abort(self) -> None:
        """Stop sending."""
        self._aborted.set()


# --------------------------------------------------------------------------- session


class SessionState(enum.Enum):
    """Lifecycle of one connection."""

    HANDSHAKE = "handshake"
    READY = "ready"
    CLOSED = "closed"


Task = ExecTask | UploadTask | DownloadTask

_OPENERS: dict[str, type[ExecTask] | type[UploadTask] | type[DownloadTask]] = {
    "exec": ExecTask,
    "upload": UploadTask,
    "download": DownloadTask,
}


class Session:
    """One client connection: handshake, then frames routed to its streams."""

    def __init__(self, agent: Agent, sock: socket.socket, number: int) -> None:
        self.agent = agent
        self.conn = Connection(sock)
        self.number = number
        self.state = SessionState.HANDSHAKE
        self.generation = protocol.GENERATION
        self.log = log.getChild(f"s{number}")
        self._streams: dict[int, Task] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"<Session {self.number} state={self.state.value} streams={len(self._streams)}>"

    def serve(self) -> None:
        """Run the session until the client leaves or breaks the protocol (reader thread)."""
        decoder = protocol.FrameDecoder()
        try:
            self.conn.sock.settimeout(HELLO_TIMEOUT_S)
            while data := self.conn.sock.recv(RECV_BYTES):
                for frame in decoder.feed(data):
                    self._handle(frame)
            self.log.debug("client closed the connection")
        except protocol.ProtocolViolation as exc:
            self.log.warning("protocol violation: %s", exc)
            self._send_error(exc.code, str(exc))
        except TimeoutError:
            self._send_error("bad_frame", "no hello within the handshake timeout")
        except (OSError, ConnectionGone) as exc:
            self.log.debug("connection lost: %s", exc)
        finally:
            self.close()

    def _send_error(self, code: str, message: str) -> None:
        try:
            self.conn.send(protocol.encode_error_frame(code, message))
        except ConnectionGone:
            pass

    def close(self) -> None:
        """Abort every stream and close the socket (idempotent)."""
        with self._lock:
            self.state = SessionState.CLOSED
            tasks = list(self._streams.values())
            self._streams.clear()
        self._closed.set()
        for task in tasks:
            task.abort()
        self.conn.close()

    def stream_ended(self, stream_id: int) -> None:
        """Forget a finished stream (called by the task that ended it)."""
        with self._lock:
            self._streams.pop(stream_id, None)

    def running_commands(self) -> int:
        """Number of exec streams in progress."""
        with self._lock:
            return sum(isinstance(t, ExecTask) for t in self._streams.values())

    # -- dispatch (reader thread) ---------------------------------------------------------

    def _handle(self, frame: protocol.Frame) -> None:
        self.log.debug(
            "<- %s stream=%d %d bytes", frame.type.name, frame.stream_id, len(frame.body)
        )
        if self.state is SessionState.HANDSHAKE:
            self._handshake(frame)
        elif frame.type is protocol.FrameType.CONTROL:
            self._handle_message(protocol.decode_message(frame))
        elif frame.type is protocol.FrameType.STDIN:
            task = self._task(frame.stream_id)
            if isinstance(task, ExecTask):
                task.write_stdin(frame.body)
        elif frame.type is protocol.FrameType.FILE_DATA:
            task = self._task(frame.stream_id)
            if isinstance(task, UploadTask):
                task.write_chunk(frame.body)
        elif frame.type is protocol.FrameType.ERROR:
            raise ConnectionGone(f"client sent error: {frame.body[:200]!r}")
        else:
            raise protocol.BadFrame(f"{frame.type.name} frames cannot be sent to the agent")

    def _handshake(self, frame: protocol.Frame) -> None:
        msg = protocol.decode_message(frame)
        if msg.name != "hello":
            raise protocol.BadMessage(f"expected hello, got {msg.name!r}")
        self.generation = protocol.negotiate_generation(msg["generation"])
        self.conn.message(
            "hello",
            generation=self.generation,
            software=f"secvf-agent/{AGENT_VERSION}",
            capabilities=CAPABILITIES,
            keepalive_interval_ms=int(self.agent.keepalive_interval_s * 1000),
            max_frame_bytes=protocol.MAX_FRAME_BYTES,
        )
        self.conn.sock.settimeout(None)
        self.state = SessionState.READY
        threading.Thread(target=self._bh_keepalive, name=f"keepalive-s{self.number}").start()

    def _handle_message(self, msg: protocol.Message) -> None:
        if msg.name in _OPENERS:
            self._open_stream(msg)
        elif msg.name == "ping":
            self.conn.message("pong", agent_version=AGENT_VERSION)
        elif msg.name == "info":
            self.conn.message("agent_info", **self.agent.describe(self.generation))
        elif msg.name in ("stdin_eof", "signal", "resize", "cancel", "upload_end"):
            self._stream_control(msg)
        else:
            raise protocol.BadMessage(f"{msg.name!r} cannot be sent to the agent")

    def _open_stream(self, msg: protocol.Message) -> None:
        sid = msg.stream_id
        if sid == 0:
            raise protocol.BadMessage(f"{msg.name} needs a non-zero stream id")
        with self._lock:
            if sid in self._streams:
                raise protocol.BadMessage(f"stream {sid} is already in use")
            task = _OPENERS[msg.name](self, sid, msg.payload)
            self._streams[sid] = task
        try:
            task.start()
        except RequestFailed as failure:
            self.stream_ended(sid)
            self._report_failure(msg.name, sid, failure)

    def _report_failure(self, opener: str, sid: int, failure: RequestFailed) -> None:
        if opener == "exec":
            stage = failure.stage or "exec"
            fields = {"kind": failure.kind, "stage": stage, **failure.fields()}
            self.conn.message("start_failed", sid, **fields)
        else:
            fields = {"kind": failure.kind, "path": failure.path, **failure.fields()}
            self.conn.message("file_error", sid, **fields)

    def _stream_control(self, msg: protocol.Message) -> None:
        task = self._task(msg.stream_id)
        if msg.name == "signal" and not 1 <= msg["signum"] <= signal.SIGRTMAX:
            raise protocol.BadMessage(f"invalid signal number {msg['signum']}")
        if isinstance(task, ExecTask):
            if msg.name == "stdin_eof":
                task.close_stdin()
            elif msg.name == "signal":
                task.send_signal(msg["signum"])
            elif msg.name == "resize":
                self._resize(task, msg)
            elif msg.name == "cancel":
                task.cancel()
        elif isinstance(task, UploadTask) and msg.name == "upload_end":
            task.finish()

    @staticmethod
    def _resize(task: ExecTask, msg: protocol.Message) -> None:
        try:
            task.resize(msg["rows"], msg["cols"])
        except RequestFailed as exc:
            raise protocol.BadMessage(str(exc)) from None

    def _task(self, stream_id: int) -> Task | None:
        with self._lock:
            return self._streams.get(stream_id)

    def _bh_keepalive(self) -> None:
        frame = protocol.encode_message("keepalive")
        while not self._closed.wait(self.agent.keepalive_interval_s):
            if self.running_commands():
                try:
                    self.conn.send(frame)
                except ConnectionGone:
                    return


# --------------------------------------------------------------------------- server


class Agent:
    """The listening agent: accepts connections and runs one Session thread each."""

    def __init__(
        self,
        listener: socket.socket,
        *,
        default_user: str = DEFAULT_USER,
        keepalive_interval_s: float = protocol.KEEPALIVE_INTERVAL_S,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.listener = listener
        self.default_user = default_user
        self.keepalive_interval_s = keepalive_interval_s
        self.started_at = time.monotonic()
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._count = 0

    def serve_forever(self) -> None:
        """Accept connections until the listener is closed."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                if self.listener.fileno() < 0:
                    return
                raise
            self._count += 1
            if not self._slots.acquire(blocking=False):
                self._refuse(sock)
                continue
            threading.Thread(
                target=self._run_session, args=(sock, self._count), name=f"session-{self._count}"
            ).start()

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.sendall(protocol.encode_error_frame("busy", "too many sessions; retry later"))
        except OSError:
            pass
        sock.close()

    def _run_session(self, sock: socket.socket, number: int) -> None:
        try:
            Session(self, sock, number).serve()
        except Exception:  # a bug must end one session, never the agent
            log.exception("session %d crashed", number)
        finally:
            self._slots.release()

    def describe(self, generation: int) -> dict[str, Any]:
        """Return the ``agent_info`` payload."""
        return {
            "agent_version": AGENT_VERSION,
            "generation": generation,
            "hostname": socket.gethostname(),
            "uptime_s": round(_system_uptime_s(), 3),
            "users": login_users(),
            "default_user": self.default_user,
            "python": sys.version.split()[0],
            "kernel": os.uname().release,
        }


def _system_uptime_s() -> float:
    try:
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def listen_vsock(port: int) -> socket.socket:
    """Return a listening AF_VSOCK socket on ``port`` for any CID."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(64)
    return sock


def listen_unix(path: str) -> socket.socket:
    """Return a listening Unix socket at ``path`` (an existing socket file is replaced)."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return sock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the agent's command line."""
    parser = argparse.ArgumentParser(description="SecVF guest exec agent")
    parser.add_argument("--port", type=int, default=protocol.AGENT_VSOCK_PORT, help="vsock port")
    parser.add_argument("--unix", metavar="PATH", help="listen on a Unix socket instead of vsock")
    parser.add_argument("--default-user", default=DEFAULT_USER, help="user when none is asked")
    parser.add_argument(
        "--keepalive-interval", type=float, default=protocol.KEEPALIVE_INTERVAL_S, metavar="S"
    )
    parser.add_argument("--max-sessions", type=int, default=MAX_SESSIONS)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: listen and serve until killed."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="secvf-agent %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    listener = listen_unix(args.unix) if args.unix else listen_vsock(args.port)
    where = args.unix or f"vsock port {args.port}"
    log.info("agent %s listening on %s (generation %d)", AGENT_VERSION, where, protocol.GENERATION)
    agent = Agent(
        listener,
        default_user=args.default_user,
        keepalive_interval_s=args.keepalive_interval,
        max_sessions=args.max_sessions,
    )
    agent.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
