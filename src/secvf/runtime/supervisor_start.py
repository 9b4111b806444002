"""How a VM's supervisor process comes to be: forked from its caller, or a fresh
interpreter.

A fresh ``python -m secvf.runtime.supervisor`` pays for a Python start and for the
supervisor's imports before it can start QEMU: 0.4-0.5 s of one core on the 2-core test
host, on the critical path of every start. A caller that has imported most of that
already (the CLI and an SDK script have: the workflows import the machine builders,
the models and the stores) can fork instead, and the child imports only the rest
(0.07-0.11 s there).

A fork copies only the calling thread: a lock another thread held at that instant (the
import lock, a logging handler's, malloc's) would stay held for ever in the child. And
the child shares the caller's memory, keeping a copy of each page the caller changes
later. So a fork is used only when the caller has one thread, is its main thread, runs
no asyncio loop and has at most :data:`FORK_MAX_RSS_MIB` resident; otherwise (the TUI,
the MCP server, an SDK caller's thread pool), or with ``SECVF_SUPERVISOR_START=exec`` in
the environment, the supervisor is a fresh interpreter, as it always was.
``SECVF_SUPERVISOR_START=fork`` refuses the fallback (a
:class:`~secvf.errors.ConfigError` where a fork is unsafe), for tests.

The forked child leaves the caller behind before it runs one line of the supervisor:

* it forks again and the middle process exits at once, so the caller reaps it and the
  supervisor never becomes the caller's zombie; the supervisor has a session of its
  own (``setsid``), as ``start_new_session`` gives the fresh one;
* stdin is ``/dev/null``, stdout and stderr the supervisor log, with new ``sys.std*``
  objects on them (a caller's own, a test runner's capture files say, go nowhere);
* every other descriptor it inherited, except the report pipe, is pointed at
  ``/dev/null`` (``dup2``, close-on-exec) rather than closed: the caller's locks, pipes
  and sockets are let go (a ``flock`` the caller still holds is not held twice), and a
  caller's object that still has the number (a file closed when it is collected) can
  only ever close or write ``/dev/null``, never a descriptor the supervisor opened;
* signal dispositions, the signal mask and the wakeup descriptor are a fresh
  interpreter's; logging has no handlers but plain ``NullHandler`` s (none on the root
  logger) and ``secvf`` loggers their default levels; the process is named
  ``secvf-supervisor`` (``comm``; its command line stays the caller's);
* the caller's objects are frozen (``gc.freeze``): the child's collector never walks
  them, so their pages stay shared;
* it ends with ``os._exit``: the caller's ``finally`` blocks, ``atexit`` handlers and
  buffers never run a second time.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, BinaryIO

from secvf.errors import ConfigError

#: The environment variable that chooses how supervisors start (``auto`` if unset).
START_ENV = "SECVF_SUPERVISOR_START"
#: The name a forked supervisor gives itself (``/proc/PID/comm``: the kernel keeps the
#: first 15 bytes).
PROCESS_NAME = "secvf-supervisor"
#: Where a process's open descriptors are listed.
FD_DIR = "/proc/self/fd"
#: Above this much resident memory a caller starts fresh interpreters instead: a forked
#: supervisor shares the caller's pages, and keeps a copy of each the caller changes.
FORK_MAX_RSS_MIB = 256
#: Exit status of a forked supervisor that raised instead of returning.
EXIT_UNEXPECTED = 1


class StartMode(enum.StrEnum):
    """How a supervisor process was started."""

    FORK = "fork"  # forked from the caller, its imports kept
    EXEC = "exec"  # a fresh ``python -m secvf.runtime.supervisor``


def why_not_fork() -> str | None:
    """Why this process cannot fork a supervisor safely right now, or None if it can."""
    rss_mib = _resident_mib()
    if rss_mib > FORK_MAX_RSS_MIB:
        return (f"the process has {rss_mib} MiB resident (a forked supervisor would keep "
                f"what of it the caller changes later, for as long as the VM runs)")
    if threading.active_count() != 1:
        return f"the process runs {threading.active_count()} threads"
    if threading.current_thread() is not threading.main_thread():
        return "the caller is not the main thread"
    asyncio = sys.modules.get("asyncio")  # not imported: no loop can run
    if asyncio is not None and asyncio.events._get_running_loop() is not None:
        return "the caller runs an asyncio loop"
    return None


def _resident_mib() -> int:
    """This process's resident memory in MiB (0 if ``/proc`` cannot tell)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") >> 20


def choose_mode() -> StartMode:
    """The start mode ``$SECVF_SUPERVISOR_START`` (``auto``, ``fork``, ``exec``) and this
    process allow.

    Raises:
        ConfigError: an unknown value, or ``fork`` where a fork is unsafe.
    """
    wanted = os.environ.get(START_ENV, "auto") or "auto"
    if wanted not in ("auto", *StartMode):
        raise ConfigError(f"{START_ENV}={wanted!r}: expected auto, fork or exec")
    if wanted == StartMode.EXEC:
        return StartMode.EXEC
    problem = why_not_fork()
    if problem is None:
        return StartMode.FORK
    if wanted == StartMode.FORK:
        raise ConfigError(f"{START_ENV}=fork, but a fork is unsafe here: {problem}")
    return StartMode.EXEC


def start_supervisor(name: str, *, report_fd: int, log: BinaryIO, accel: str | None = None,
                     restore: Path | None = None,
                     save_template: Path | None = None) -> None:
    """Start the supervisor of VM ``name`` detached (forked or a fresh interpreter, as
    :func:`choose_mode` says), its output appended to ``log``; it writes its start
    report to ``report_fd`` (the caller closes its own copy after this returns).

    Raises:
        ConfigError: ``$SECVF_SUPERVISOR_START`` is invalid or cannot be honoured.
        OSError: the process could not be created.
    """
    mode = choose_mode()
    if mode is StartMode.EXEC:
        argv = [sys.executable, "-m", "secvf.runtime.supervisor", "--vm", name,
                "--report-fd", str(report_fd)]
        if restore is not None:
            argv += ["--restore", str(restore)]
        if save_template is not None:
            argv += ["--save-template", str(save_template)]
        if accel:
            argv += ["--accel", accel]
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         pass_fds=(report_fd,), start_new_session=True, close_fds=True)
        return
    _flush_stdio()  # what is buffered now is the caller's to write, once
    middle = os.fork()
    if middle == 0:
        _middle_process(name, report_fd=report_fd, log_fd=log.fileno(), accel=accel,
                        restore=restore, save_template=save_template)
    os.waitpid(middle, 0)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or odd stream is not ours to fix
            stream.flush()


def _middle_process(name: str, *, report_fd: int, log_fd: int, accel: str | None,
                    restore: Path | None, save_template: Path | None) -> None:
    """In the first child: start a new session, fork the supervisor, exit at once."""
    code = EXIT_UNEXPECTED
    try:
        os.setsid()
        if os.fork() == 0:
            _supervisor_process(name, report_fd=report_fd, log_fd=log_fd, accel=accel,
                                restore=restore, save_template=save_template)
        code = 0
    finally:
        os._exit(code)


def _supervisor_process(name: str, *, report_fd: int, log_fd: int, accel: str | None,
                        restore: Path | None, save_template: Path | None) -> None:
    """In the second child: become a clean process, run the supervisor, exit with its
    status (never return into the caller's code)."""
    code = EXIT_UNEXPECTED
    try:
        gc.freeze()  # the caller's objects: never scanned here, so their pages stay shared
        _leave_caller_descriptors(keep=report_fd, log_fd=log_fd)
        _fresh_signals()
        _fresh_logging()
        with contextlib.suppress(OSError):
            with open(f"/proc/{os.getpid()}/comm", "w") as comm:
                comm.write(PROCESS_NAME)
        from secvf.runtime.supervisor import run_supervisor

        code = run_supervisor(name, accel=accel, report_fd=report_fd, restore=restore,
                              save_template=save_template)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_UNEXPECTED
    except BaseException:  # noqa: BLE001 - the log says why; nothing may unwind further
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        _flush_stdio()
        os._exit(code)


def _leave_caller_descriptors(*, keep: int, log_fd: int) -> None:
    """stdin ``/dev/null``, stdout and stderr ``log_fd``, every other inherited
    descriptor but ``keep`` pointed at ``/dev/null``; new ``sys.std*`` objects."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for entry in os.listdir(FD_DIR):
        fd = int(entry)
        if fd > 2 and fd not in (keep, null):
            with contextlib.suppress(OSError):  # the listing's own, closed by now
                os.dup2(null, fd, inheritable=False)
    os.close(null)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _fresh_signals() -> None:
    """Signal dispositions, mask and wakeup descriptor as a fresh interpreter has them."""
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if sig == signal.SIGINT:
            handler: Any = signal.default_int_handler
        elif sig in (signal.SIGPIPE, signal.SIGXFSZ):
            handler = signal.SIG_IGN  # as Python's start-up leaves them
        else:
            handler = signal.SIG_DFL
        with contextlib.suppress(OSError, ValueError):  # signals the C library keeps
            signal.signal(sig, handler)


def _fresh_logging() -> None:
    """No handler on the root logger, none but plain ``NullHandler`` s elsewhere (a
    subclass may be a caller's, a test runner's say); ``secvf`` loggers at their
    defaults."""
    logging.disable(logging.NOTSET)
    logging.root.handlers = []
    loggers = [item for item in logging.Logger.manager.loggerDict.values()
               if isinstance(item, logging.Logger)]
    for logger in loggers:
        logger.handlers = [h for h in logger.handlers if type(h) is logging.NullHandler]
        if logger.name == "secvf" or logger.name.startswith("secvf."):
            logger.setLevel(logging.NOTSET)
            logger.disabled = False
            logger.propagate = True
