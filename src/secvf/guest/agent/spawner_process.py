"""The spawner process: what runs, as one account, to start that account's commands.

See :mod:`secvf.guest.agent.spawner` for why and for the wire format. The agent starts
a spawner as ``python3 -S -I -c BOOT`` and writes this module's source to its stdin, so
the spawner needs no access to the agent's files (a pytest tmp dir, a root-only path);
hence this module imports nothing but the standard library, not even the rest of the
agent.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import stat
import struct
from typing import Any

#: ``clone`` flags: the child's parent is the caller's parent; SIGCHLD on exit.
CLONE_PARENT = 0x00008000
#: ``clone`` system call numbers (the raw call: glibc's wrapper needs a stack).
SYS_CLONE = {"x86_64": 56, "aarch64": 220}
#: Largest request or reply either side reads (argv + environment).
MAX_MESSAGE_BYTES = 4 << 20
#: Signals Python ignores in the spawner; a command starts with them at their default
#: (as subprocess's ``restore_signals`` does). Handled signals are reset by exec itself.
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


class ProtocolBroken(Exception):
    """The other end closed the socket or sent a message this side cannot take."""


def read_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes.

    Raises:
        ProtocolBroken: EOF first.
    """
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 16))
        if not chunk:
            raise ProtocolBroken("the other end closed the spawner socket")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(sock: socket.socket) -> bytes:
    """Read one ``len(4 bytes) + body`` message; its body.

    Raises:
        ProtocolBroken: EOF first, or a length over :data:`MAX_MESSAGE_BYTES`.
    """
    (size,) = struct.unpack(">I", read_exact(sock, 4))
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolBroken(f"a spawner message of {size} bytes is too big")
    return read_exact(sock, size)


def serve(fd: int) -> None:  # pragma: no cover - runs in the spawner process
    """The spawner's loop: one request at a time until the agent closes the socket."""
    os.set_inheritable(fd, False)  # commands must not get the spawner's socket
    _default_signals()
    own_stdio = _own_stdio()
    sock = socket.socket(fileno=fd)
    clone = _clone_function()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 4, 3, socket.MSG_CMSG_CLOEXEC)
        except OSError:
            return
        if len(msg) < 4:
            return  # EOF: the agent is done with us
        try:
            rest = read_exact(sock, struct.unpack(">I", msg)[0])
            request = json.loads(rest)
            reply = _start_command(clone, request, fds, own_stdio)
        except (ProtocolBroken, ValueError, KeyError, TypeError) as exc:
            reply = {"errno": errno.EINVAL, "stage": "exec", "pid": None, "detail": str(exc)}
        finally:
            for received in fds:
                os.close(received)
        data = json.dumps(reply).encode()
        sock.sendall(struct.pack(">I", len(data)) + data)


def _default_signals() -> None:  # pragma: no cover - runs in the spawner process
    """Put the signals a command must start with at their defaults in the spawner itself,
    once, so a cloned child inherits them and has nothing to reset before its exec (each
    Python step in the child costs page copies under TCG). The spawner is single-threaded
    and writes only to the agent's socket: with SIGPIPE at its default it ends when the
    agent has gone, which it would do anyway."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for signum in RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def _own_stdio() -> list[int]:  # pragma: no cover - runs in the spawner process
    """The spawner's own stdin, stdout and stderr, kept aside (close-on-exec) to be put
    back after each command's are staged there (:func:`_start_command`)."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    os.dup2(null, 0)  # the source the agent wrote there has been read
    own = [null, os.dup(1), os.dup(2)]  # os.dup: not inheritable
    return own


def _clone_function() -> Any:  # pragma: no cover - runs in the spawner process
    libc = ctypes.CDLL(None, use_errno=True)
    number = SYS_CLONE[os.uname().machine]

    def clone() -> int:
        pid = libc.syscall(ctypes.c_long(number), ctypes.c_ulong(CLONE_PARENT | signal.SIGCHLD),
                           None, None, None, None)
        if pid < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return int(pid)

    return clone


def _start_command(clone: Any, request: dict[str, Any], fds: list[int],
                   own_stdio: list[int]) -> dict[str, Any]:  # pragma: no cover - spawner
    """Start one command; the reply. The command's stdio is staged on the spawner's own
    0-2 before the clone and the spawner's put back once the child has exec'd, so the
    child inherits it as it is (the spawner is single-threaded: nothing else writes to
    its stdio meanwhile)."""
    argv, env, cwd = request["argv"], request["env"], request["cwd"]
    if len(fds) != 3 or not argv:
        raise ProtocolBroken("a request needs argv and three descriptors")
    try:
        os.chdir(cwd)
    except OSError as exc:
        return {"errno": exc.errno, "stage": "chdir", "pid": None}
    programs = program_candidates(argv[0], env)
    report_r, report_w = os.pipe()
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        pid = clone()
        if pid == 0:
            _exec_in_child(programs, argv, env, report_w)
        os.close(report_w)
        report_w = -1
        failed = os.read(report_r, 4)
    finally:
        for target, fd in enumerate(own_stdio):
            os.dup2(fd, target)
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
    if failed:
        return {"errno": struct.unpack(">i", failed)[0], "stage": "exec", "pid": pid}
    return {"pid": pid}


def _exec_in_child(programs: list[str], argv: list[str], env: dict[str, str],
                   report_w: int) -> None:  # pragma: no cover - runs in the command
    """Become the command: new session, exec the first of ``programs`` that runs (stdio
    and signals are already as the command needs them); on failure write the errno to
    ``report_w`` and exit 127. Never returns."""
    code = errno.ENOENT
    try:
        os.setsid()
        code = _exec_first(programs, argv, env)  # every other descriptor is close-on-exec
    except OSError as exc:
        code = exc.errno or errno.EIO
    except BaseException:  # noqa: BLE001 - the child must never return into the spawner
        code = errno.EIO
    finally:
        try:
            os.write(report_w, struct.pack(">i", code))
        finally:
            os._exit(127)


def program_candidates(program: str, env: dict[str, str]) -> list[str]:
    """The paths to try to exec for ``program``, as subprocess tries them: as it is when
    it has a slash, else in each directory of the request's ``PATH`` in turn.

    Looked up here, in the spawner, with the account's own rights, so that the child
    (where every Python step costs page copies) normally needs one ``execve``: the list
    starts at the first regular file the account may execute. Where none is found the
    whole list is kept, so the child reports the same error an ``execvpe`` would.
    """
    if "/" in program:
        return [program]
    path = env.get("PATH", os.defpath)
    candidates = [os.path.join(d or ".", program) for d in path.split(os.pathsep)]
    for index, candidate in enumerate(candidates):
        try:
            if stat.S_ISREG(os.stat(candidate).st_mode) and os.access(candidate, os.X_OK):
                return candidates[index:]
        except OSError:
            continue
    return candidates


def _exec_first(programs: list[str], argv: list[str],
                env: dict[str, str]) -> int:  # pragma: no cover - runs in the command
    """``execve`` each of ``programs`` in turn; the errno to report if none ran (the
    first that is not ENOENT/ENOTDIR, as ``execvpe`` reports)."""
    first_error = errno.ENOENT
    for candidate in programs:
        try:
            os.execve(candidate, argv, env)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and first_error == errno.ENOENT:
                first_error = exc.errno or errno.EIO
    return first_error
