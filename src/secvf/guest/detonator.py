#!/usr/bin/python3 -I
"""The detonator: runs one sample from a read-only cdrom medium under strace, in the guest.

It runs as root in the ``analysis`` image (started by ``/sbin/secvf-init`` before the
ready marker, so a clean state saved right after that marker holds a detonator already
waiting). Standard library only (Python 3.11). It has no channel to the host: it takes no
input but the medium's ``manifest.json`` (size-bounded, strictly validated), listens on
nothing and reads nothing from the network. Its results leave the guest as

* the **monitor log** on the output-only serial port ``/dev/ttyS1`` (format:
  ``docs/analysis-report.md``, "Monitor log format": ``# `` banner, ``E {json}`` events,
  ``S `` + each strace line, every line at most 4,096 bytes with its ``\\n``);
* console lines on ``/dev/ttyS0`` prefixed ``secvf-detonator: `` and, last,
  :data:`DONE_MARKER` (the host waits for it, then powers the VM off);
* the root filesystem, left consistent (remounted read-only) for the host's offline diff.

One run, in order::

    hello -> (wait for a medium in /dev/sr0) -> medium -> start -> S lines ...
          [write_medium_denied] [pid_limit] [monitor_died] [timeout]
          -> exit -> (kill leftovers, sync, remount / read-only) -> done -> DONE_MARKER

or, when the medium cannot be used: ``hello -> [medium] -> error -> done``.

Containment of the sample: it runs as ``analyst`` (uid 1000, via ``setpriv``, no
capabilities) or as root when the manifest says so, with a clean environment, its
home as working directory, in the cgroup v2 ``secvf-sample`` whose ``pids.max`` is the
manifest's ``pid_limit`` (``RLIMIT_NPROC`` too, for the analyst), and in its own session.
strace is started in that cgroup, so the tracee it forks is born there, and strace itself
is then moved to ``secvf-monitor``: killing the sample's cgroup (``cgroup.kill``) at the
timeout leaves strace alive to write the last lines and exit with the sample's status.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import resource
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = "1.0"
#: The monitor log's format (``hello.format``, the banner).
LOG_FORMAT = 1
#: A monitor-log line's maximum length in bytes, with its ``\n``.
MAX_LINE_BYTES = 4096
#: What the console gets once the log is complete and the disk consistent.
DONE_MARKER = "SECVF-DETONATION-DONE"
CONSOLE_PREFIX = "secvf-detonator: "

MONITOR_PORT = "/dev/ttyS1"
RTC_SINCE_EPOCH = "/sys/class/rtc/rtc0/since_epoch"
CONSOLE = "/dev/ttyS0"
MEDIUM_DEVICE = "/dev/sr0"
MOUNT_POINT = "/media/sample"
MANIFEST_NAME = "manifest.json"
CGROUP_ROOT = "/sys/fs/cgroup"
SAMPLE_CGROUP = "secvf-sample"
MONITOR_CGROUP = "secvf-monitor"
RUN_DIR = "/run/secvf/detonator"
STRACE = "/usr/bin/strace"
SETPRIV = "/usr/bin/setpriv"
STRACE_OPTIONS = ("-f", "-tt", "-s", "256", "-e", "trace=process,file,network")

MEDIUM_POLL_S = 0.1  # how often the empty drive is asked for a disc
MOUNT_TRIES = 50  # mount attempts, MEDIUM_POLL_S apart (a disc may spin up slowly)
RUN_POLL_S = 0.1  # the run loop's longest sleep (pids.events, cgroup checks)
READ_CHUNK_BYTES = 65536
KILL_WAIT_S = 5.0  # after killing the sample: how long strace gets to exit
REMOUNT_WAIT_S = 5.0  # how long an emergency remount gets to take effect
MAX_DENIED_EVENTS = 100  # write_medium_denied events per run
#: After a restore the wall clock is where it was when the clean state was saved, until
#: the image's restore watch steps it (within about a second): the sample waits for that,
#: so the monitor log's times are the host's. How far off counts as not yet stepped, and
#: how long to wait for the step.
CLOCK_MAX_SKEW_S = 2.0
CLOCK_WAIT_S = 10.0

MANIFEST_MAX_BYTES = 65536
MANIFEST_KEYS = frozenset({"format", "sample", "args", "user", "timeout_s", "pid_limit"})
MAX_ARGS = 256
MAX_ARG_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_TIMEOUT_S = 86400.0
MIN_PID_LIMIT = 2  # strace counts until it is moved out, and the sample is one more
MAX_PID_LIMIT = 65536
MAX_MEDIUM_FILES = 256
#: RLIMIT_NPROC of the analyst is pid_limit plus this: the cgroup's limit is met first (and
#: reported), the rlimit only holds if the cgroup could not be set up.
NPROC_MARGIN = 16

#: The accounts a manifest may name: uid, gid, home.
USERS = {"analyst": (1000, 1000, "/home/analyst"), "root": (0, 0, "/root")}
SAMPLE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CDROM_DRIVE_STATUS = 0x5326
CDSL_CURRENT = 0x7FFFFFFF
CDS_DISC_OK = 4

assert len(USERS) == 2 and MIN_PID_LIMIT >= 2  # noqa: S101  (import-time relations)


class ManifestError(Exception):
    """The medium's manifest is missing, too big, not JSON or not valid; says why."""


# ---- the monitor log -------------------------------------------------------------------


def bound_line(prefix: bytes, body: bytes) -> bytes:
    """``prefix + body + b"\\n"``, cut to :data:`MAX_LINE_BYTES` (newlines in ``body``,
    and a trailing ``\\r``, removed so one call is one line)."""
    body = body.replace(b"\n", b" ").rstrip(b"\r")
    line = prefix + body
    if len(line) > MAX_LINE_BYTES - 1:
        line = line[: MAX_LINE_BYTES - 1]
    return line + b"\n"


def event_line(name: str, now: float, **fields: Any) -> bytes:
    """One ``E`` line: compact JSON with ``event`` first and ``time`` (bounded)."""
    body = {"event": name, **fields, "time": round(now, 6)}
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    if len(text) > MAX_LINE_BYTES - 3:  # cut lists and strings rather than break the JSON
        body = {"event": name, "time": round(now, 6), "truncated": True}
        text = json.dumps(body, separators=(",", ":"))
    return bound_line(b"E ", text.encode())


class MonitorLog:
    """Writes the monitor log to a file descriptor (the serial port, or a file in tests).

    Writes never raise: a failing port must not stop the run (the disk and the network
    capture still tell the story); failures are counted in ``write_errors``.
    """

    def __init__(self, fd: int, clock: Callable[[], float] = time.time) -> None:
        self.fd = fd
        self.clock = clock
        self.write_errors = 0
        self.events: list[str] = []  #: names of the events written, in order

    def comment(self, text: str) -> None:
        self._write(bound_line(b"# ", text.encode(errors="replace")))

    def event(self, name: str, **fields: Any) -> None:
        self.events.append(name)
        self._write(event_line(name, self.clock(), **fields))

    def strace(self, line: bytes) -> None:
        self._write(bound_line(b"S ", line))

    def _write(self, data: bytes) -> None:
        while data:
            try:
                done = os.write(self.fd, data)
            except InterruptedError:
                continue
            except OSError:
                self.write_errors += 1
                return
            data = data[done:]


class LineSplitter:
    """Splits a byte stream into lines, each cut to ``limit`` bytes (the rest of a long
    line is dropped up to its newline); memory stays bounded whatever the stream holds."""

    def __init__(self, limit: int = MAX_LINE_BYTES - 3) -> None:
        self.limit = limit
        self.buffer = b""
        self.skipping = False  # inside the dropped rest of a long line

    def feed(self, data: bytes) -> Iterator[bytes]:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > self.limit:
                    if not self.skipping:
                        yield self.buffer[: self.limit]
                    self.skipping = True
                    self.buffer = b""
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
            if self.skipping:
                self.skipping = False
                continue
            yield line[: self.limit]

    def flush(self) -> Iterator[bytes]:
        if self.buffer and not self.skipping:
            yield self.buffer[: self.limit]
        self.buffer, self.skipping = b"", False


_WRITE_SYSCALLS = ("open|openat|openat2|creat|mkdir|mkdirat|unlink|unlinkat|rmdir|rename|"
                   "renameat|renameat2|link|linkat|symlink|symlinkat|truncate|chmod|fchmodat|"
                   "chown|lchown|fchownat|mknod|mknodat|utimensat")
_DENIED = re.compile(
    rb"^(?P<pid>\d+)\s+\S+\s+(?:<\.\.\. )?(?P<call>" + _WRITE_SYSCALLS.encode()
    + rb")(?: resumed>|\()(?P<args>.*)\)\s*=\s*-1\s+(?P<err>EROFS|EACCES)\b"
)
_OPEN_CALLS = (b"open", b"openat", b"openat2")
_LINE_PID = re.compile(rb"^(?P<pid>\d+)\s+\S+\s+(?P<end>\+\+\+ (?:exited with|killed by) )?")
_OPEN_WRITE_FLAGS = (b"O_WRONLY", b"O_RDWR", b"O_CREAT", b"O_TRUNC")


def denied_medium_write(line: bytes, medium: str = MOUNT_POINT) -> tuple[str, int] | None:
    """``(path, pid)`` when the strace ``line`` is a write to the medium that failed with
    EROFS or EACCES (a read-only open that fails is not a write); else None."""
    match = _DENIED.match(line)
    if match is None:
        return None
    args = match["args"]
    if match["call"] in _OPEN_CALLS and not any(f in args for f in _OPEN_WRITE_FLAGS):
        return None
    prefix = medium.encode() + b"/"
    for quoted in re.findall(rb'"((?:[^"\\]|\\.)*)"', args):
        if quoted.startswith(prefix) or quoted == medium.encode():
            return quoted.decode(errors="replace"), int(match["pid"])
    return None


def note_traced_end(line: bytes, result: RunResult) -> None:
    """Keep in ``result`` which process the strace ``line`` is about if it is the first
    (the sample's own process) and whether it is that process's ``+++ exited with`` or
    ``+++ killed by`` line."""
    match = _LINE_PID.match(line)
    if match is None:
        return
    pid = int(match["pid"])
    if result.traced_pid is None:
        result.traced_pid = pid
    if pid == result.traced_pid and match["end"]:
        result.traced_end_seen = True


# ---- the manifest ----------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """What the host asks for, from the medium's ``manifest.json`` (format 1)."""

    sample: str  #: the sample's file name on the medium (no directories)
    args: tuple[str, ...]  #: arguments after the sample's path
    user: str  #: ``analyst`` or ``root``
    timeout_s: float  #: seconds from start to the kill
    pid_limit: int  #: the sample cgroup's ``pids.max``


def parse_manifest(data: bytes) -> Manifest:
    """Validate ``manifest.json``'s bytes strictly and return the manifest.

    Raises:
        ManifestError: too big, not UTF-8 JSON, an unknown or missing key, a value of the
            wrong type or out of range, a sample name that is not a plain file name.
    """
    if len(data) > MANIFEST_MAX_BYTES:
        raise ManifestError(f"manifest.json is larger than {MANIFEST_MAX_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant,
                         object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"manifest.json is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest.json must hold a JSON object")
    unknown, missing = set(doc) - MANIFEST_KEYS, MANIFEST_KEYS - set(doc)
    if unknown or missing:
        raise ManifestError(f"manifest keys: unknown {sorted(unknown)[:8]}, "
                            f"missing {sorted(missing)}")
    if type(doc["format"]) is not int or doc["format"] != 1:
        raise ManifestError("manifest format must be 1")
    sample = doc["sample"]
    if not isinstance(sample, str) or not _plain_name(sample) or sample == MANIFEST_NAME:
        raise ManifestError("manifest sample must be a plain file name on the medium")
    args = doc["args"]
    if not isinstance(args, list) or len(args) > MAX_ARGS:
        raise ManifestError(f"manifest args must be a list of at most {MAX_ARGS} strings")
    for arg in args:
        if (not isinstance(arg, str) or "\0" in arg
                or len(arg.encode("utf-8", "surrogatepass")) > MAX_ARG_BYTES):
            raise ManifestError("manifest args must be strings without NUL, "
                                f"at most {MAX_ARG_BYTES} bytes")
    if doc["user"] not in USERS:
        raise ManifestError(f"manifest user must be one of {sorted(USERS)}")
    timeout = doc["timeout_s"]
    if (type(timeout) not in (int, float) or not math.isfinite(timeout)
            or not 0 < timeout <= MAX_TIMEOUT_S):
        raise ManifestError(f"manifest timeout_s must be a number in (0, {MAX_TIMEOUT_S:.0f}]")
    limit = doc["pid_limit"]
    if type(limit) is not int or not MIN_PID_LIMIT <= limit <= MAX_PID_LIMIT:
        raise ManifestError("manifest pid_limit must be an integer in "
                            f"[{MIN_PID_LIMIT}, {MAX_PID_LIMIT}]")
    return Manifest(sample, tuple(args), doc["user"], float(timeout), limit)


def _plain_name(name: str) -> bool:
    return (0 < len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
            and name not in (".", "..") and "/" not in name and "\0" not in name)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def read_manifest(medium: Path) -> Manifest:
    """Read and validate ``medium``/manifest.json (a regular file, not a link).

    Raises:
        ManifestError: as :func:`parse_manifest`, or the file is missing or not regular.
    """
    try:
        fd = os.open(medium / MANIFEST_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ManifestError(f"cannot open {MANIFEST_NAME} on the medium: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ManifestError(f"{MANIFEST_NAME} is not a regular file")
        data = os.read(fd, MANIFEST_MAX_BYTES + 1)
    finally:
        os.close(fd)
    return parse_manifest(data)


def medium_files(medium: Path) -> list[dict[str, Any]]:
    """The medium's top-level entries as ``{"name", "size"}`` (at most a bounded number)."""
    files: list[dict[str, Any]] = []
    with os.scandir(medium) as entries:
        for entry in entries:
            if len(files) >= MAX_MEDIUM_FILES:
                break
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except OSError:
                size = 0
            files.append({"name": entry.name, "size": size})
    return sorted(files, key=lambda f: f["name"])


# ---- the sample's cgroup -----------------------------------------------------------------


class Cgroups:
    """The sample's and strace's cgroups (v2) under ``root``.

    ``usable`` is False when cgroup v2 cannot be set up (no controller, a test host):
    the run then relies on RLIMIT_NPROC and the process group alone.
    """

    def __init__(self, root: Path = Path(CGROUP_ROOT)) -> None:
        self.root = root
        self.sample = root / SAMPLE_CGROUP
        self.monitor = root / MONITOR_CGROUP
        self.usable = False
        self.problem = ""

    def setup(self, pid_limit: int) -> None:
        try:
            if not (self.root / "cgroup.controllers").exists():
                self._mount()
            controllers = (self.root / "cgroup.controllers").read_text().split()
            if "pids" not in controllers:
                raise OSError(errno.ENOTSUP, "the pids controller is not available")
            (self.root / "cgroup.subtree_control").write_text("+pids")
            for group in (self.sample, self.monitor):
                group.mkdir(exist_ok=True)
            (self.sample / "pids.max").write_text(str(pid_limit))
            self.usable = True
        except OSError as exc:
            self.problem = f"no cgroup for the sample ({exc.strerror or exc})"

    def _mount(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "cgroup2", "-o", "nosuid,nodev,noexec",
                               "cgroup2", str(self.root)], capture_output=True, check=False)
        if done.returncode != 0:
            raise OSError(errno.EIO, done.stderr.decode(errors="replace").strip()[:200])

    def join_sample(self) -> None:
        """Move the calling process into the sample's cgroup (run in the child, pre-exec)."""
        if self.usable:
            (self.sample / "cgroup.procs").write_text(str(os.getpid()))

    def move_to_monitor(self, pid: int) -> None:
        if self.usable:
            try:
                (self.monitor / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass

    def pids(self) -> list[int]:
        if not self.usable:
            return []
        try:
            text = (self.sample / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split() if p.isdigit()]

    def max_events(self) -> int:
        """How often a fork in the sample's cgroup failed at ``pids.max``."""
        if not self.usable:
            return 0
        try:
            for line in (self.sample / "pids.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max" and value.strip().isdigit():
                    return int(value)
        except OSError:
            pass
        return 0

    def kill(self, spare: int | None = None) -> None:
        """SIGKILL every process of the sample's cgroup (``cgroup.kill``, else one by one,
        again until none is left or a few rounds passed); ``spare`` is never signalled."""
        if not self.usable:
            return
        try:
            (self.sample / "cgroup.kill").write_text("1")
        except OSError:
            pass
        for _ in range(100):
            left = [p for p in self.pids() if p != spare]
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.01)


# ---- one run -----------------------------------------------------------------------------


@dataclass
class RunResult:
    """How the traced command ended."""

    code: int | None = None  #: strace's exit code
    signal: str | None = None  #: the signal that killed strace
    timed_out: bool = False
    monitor_died: bool = False
    pid_limit_hit: bool = False
    denied: list[tuple[str, int]] = field(default_factory=list)
    traced_pid: int | None = None  #: the pid of strace's first line (the sample's process)
    traced_end_seen: bool = False  #: strace logged how that process ended

    @property
    def end_missing(self) -> bool:
        """strace traced the sample but did not log how its process ended: strace was
        killed (or crashed) before that, whatever became of the sample."""
        return self.traced_pid is not None and not self.traced_end_seen


def strace_argv(fifo: Path, manifest: Manifest, sample_path: str,
                strace: str = STRACE, setpriv: str = SETPRIV) -> list[str]:
    """The command line: strace (fixed options, output to ``fifo``), then the sample
    (via setpriv as the analyst: no capabilities, no supplementary groups)."""
    argv = [strace, *STRACE_OPTIONS, "-o", str(fifo), "--"]
    uid, gid, _ = USERS[manifest.user]
    if uid != 0:
        argv += [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                 "--inh-caps=-all", "--"]
    return [*argv, sample_path, *manifest.args]


def sample_env(user: str) -> dict[str, str]:
    _, _, home = USERS[user]
    return {"HOME": home, "USER": user, "LOGNAME": user, "SHELL": "/bin/sh",
            "PATH": SAMPLE_PATH, "LANG": "C.UTF-8", "TERM": "dumb"}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


class Runner:
    """Runs strace on the sample and copies its output to the monitor log.

    Usage: ``Runner(log, cgroups, run_dir).run(manifest, sample_path)``. The paths are
    parameters so the unit tests run it on the host with a temporary directory.
    """

    def __init__(self, log: MonitorLog, cgroups: Cgroups, run_dir: Path, *,
                 medium: str = MOUNT_POINT, strace: str = STRACE, setpriv: str = SETPRIV,
                 cwd: str | None = None) -> None:
        self.log = log
        self.cgroups = cgroups
        self.run_dir = run_dir
        self.medium = medium
        self.strace = strace
        self.setpriv = setpriv
        self.cwd = cwd

    def run(self, manifest: Manifest, sample_path: str) -> RunResult:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fifo = self.run_dir / "strace.fifo"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        # read-write: strace's open for writing never blocks, and the FIFO never reports
        # EOF; the run's end is strace's exit, after which the FIFO is drained
        fifo_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            return self._run(manifest, sample_path, fifo, fifo_fd)
        finally:
            os.close(fifo_fd)
            fifo.unlink(missing_ok=True)

    def _run(self, manifest: Manifest, sample_path: str, fifo: Path, fifo_fd: int) -> RunResult:
        result = RunResult()
        self.cgroups.setup(manifest.pid_limit)
        if not self.cgroups.usable:
            self.log.comment(self.cgroups.problem)
        uid, _, home = USERS[manifest.user]
        cwd = self.cwd or home
        argv = strace_argv(fifo, manifest, sample_path, self.strace, self.setpriv)

        def prepare() -> None:  # in the child, before exec: no threads in this process
            self.cgroups.join_sample()
            if uid != 0:
                nproc = manifest.pid_limit + NPROC_MARGIN
                resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            for number in (signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGTERM):
                signal.signal(number, signal.SIG_DFL)

        base_events = self.cgroups.max_events()
        proc = subprocess.Popen(argv, cwd=cwd, env=sample_env(manifest.user),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=prepare,
                                start_new_session=True, close_fds=True)
        started = time.monotonic()
        deadline = started + manifest.timeout_s
        self.log.event("start", pid=proc.pid, argv=[sample_path, *manifest.args],
                       user=manifest.user, cwd=cwd, timeout_s=manifest.timeout_s)
        splitter = LineSplitter()
        moved = False
        poller = select.poll()
        poller.register(fifo_fd, select.POLLIN)
        while True:
            if not moved and (len(self.cgroups.pids()) > 1 or not self.cgroups.usable):
                self.cgroups.move_to_monitor(proc.pid)
                moved = True
            now = time.monotonic()
            if poller.poll(max(0.0, min(RUN_POLL_S, deadline - now)) * 1000):
                self._copy(fifo_fd, splitter, result)
            if not result.pid_limit_hit and self.cgroups.max_events() > base_events:
                result.pid_limit_hit = True
                self.log.event("pid_limit", limit=manifest.pid_limit)
            status = proc.poll()
            if status is not None and not result.monitor_died:
                self._drain(fifo_fd, splitter, result)
                if not self._sample_left(proc.pid) and not result.end_missing:
                    self._exit(result, status)
                    return result
                # strace is gone before the sample's end: what follows is not traced
                result.monitor_died = True
                self._status(result, status)
                self.log.event("monitor_died", code=result.code, signal=result.signal)
            if result.monitor_died and not self._sample_left(proc.pid):
                self.log.event("exit", code=result.code, signal=result.signal)
                return result
            if time.monotonic() >= deadline:
                result.timed_out = True
                self.log.event("timeout", after_s=round(time.monotonic() - started, 3))
                self._kill(proc)
                if result.monitor_died:
                    return result
                status = self._wait(proc)
                self._drain(fifo_fd, splitter, result)
                self._exit(result, status)
                return result

    def _sample_left(self, group: int) -> bool:
        """True while a process of the sample runs (its cgroup, else its process group)."""
        if self.cgroups.usable:
            return bool(self.cgroups.pids())
        try:
            os.killpg(group, 0)
        except OSError:
            return False
        return True

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        self.cgroups.kill(spare=proc.pid)
        try:  # the process group too: the only handle when there is no cgroup
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        try:
            return proc.wait(KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _exit(self, result: RunResult, status: int) -> None:
        self._status(result, status)
        self.log.event("exit", code=result.code, signal=result.signal)

    @staticmethod
    def _status(result: RunResult, status: int) -> None:
        if status < 0:
            result.code, result.signal = None, signal_name(-status)
        else:
            result.code, result.signal = status, None

    def _copy(self, fd: int, splitter: LineSplitter, result: RunResult) -> None:
        for _ in range(64):  # bounded per wake-up, so the deadline is still checked
            try:
                data = os.read(fd, READ_CHUNK_BYTES)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            if not data:
                return
            for line in splitter.feed(data):
                self._strace_line(line, result)

    def _drain(self, fd: int, splitter: LineSplitter, result: RunResult) -> None:
        """Copy what strace left in the FIFO once it has exited, its last line too."""
        self._copy(fd, splitter, result)
        for line in splitter.flush():
            self._strace_line(line, result)

    def _strace_line(self, line: bytes, result: RunResult) -> None:
        self.log.strace(line)
        note_traced_end(line, result)
        denied = denied_medium_write(line, self.medium)
        if denied is not None and len(result.denied) < MAX_DENIED_EVENTS:
            result.denied.append(denied)
            self.log.event("write_medium_denied", path=denied[0], pid=denied[1])


# ---- the guest's devices ----------------------------------------------------------------


def open_monitor_port(path: str = MONITOR_PORT) -> int:
    """Open the monitor port for writing, raw (no ``\\n`` -> ``\\r\\n``), not as a
    controlling terminal; a regular file (tests) is opened for appending."""
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_APPEND | os.O_CLOEXEC)
    if os.isatty(fd):
        import termios

        attrs = termios.tcgetattr(fd)
        attrs[1] &= ~termios.OPOST
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


def say(text: str, console: str = CONSOLE) -> None:
    """A line on the serial console (never raises)."""
    try:
        with open(console, "w", encoding="utf-8", errors="replace") as out:
            out.write(CONSOLE_PREFIX + text + "\n")
    except OSError:
        pass


def disc_present(fd: int) -> bool:
    """True when the drive behind ``fd`` holds a readable disc."""
    try:
        return fcntl.ioctl(fd, CDROM_DRIVE_STATUS, CDSL_CURRENT) == CDS_DISC_OK
    except OSError:
        return False


def open_drive(device: str = MEDIUM_DEVICE) -> int:
    """A descriptor of the (empty) drive, or -1 while the device does not exist."""
    try:
        return os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1  # the driver may bind later


def wait_for_disc(fd: int, device: str = MEDIUM_DEVICE, poll_s: float = MEDIUM_POLL_S) -> None:
    """Block until ``device`` holds a disc: one ioctl per poll on a descriptor kept open.

    Nothing here depends on the wall clock, so a save and restore of the VM (the clock
    steps) changes nothing: the loop just asks again.
    """
    while True:
        if fd < 0:
            fd = open_drive(device)
        if fd >= 0 and disc_present(fd):
            os.close(fd)
            return
        time.sleep(poll_s)


def mount_medium(device: str = MEDIUM_DEVICE, target: str = MOUNT_POINT) -> str | None:
    """Mount the disc read-only; None on success, else the last error (after retries)."""
    os.makedirs(target, mode=0o755, exist_ok=True)
    error = "not tried"
    for _ in range(MOUNT_TRIES):
        done = subprocess.run(["mount", "-t", "iso9660", "-o", "ro,nodev,nosuid", device, target],
                              capture_output=True, check=False, stdin=subprocess.DEVNULL)
        if done.returncode == 0:
            return None
        error = done.stderr.decode(errors="replace").strip()[:300] or f"status {done.returncode}"
        time.sleep(MEDIUM_POLL_S)
    return error


def root_is_read_only(mounts: str = "/proc/mounts") -> bool:
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[1] == "/" and fields[0] != "rootfs":
                    return "ro" in fields[3].split(",")
    except OSError:
        pass
    return False


def make_root_consistent() -> str | None:
    """Sync, then remount ``/`` read-only (else an emergency remount via sysrq ``u``)
    so the host can read the ext4 without replaying its journal. None on success."""
    os.sync()
    done = subprocess.run(["mount", "-o", "remount,ro", "/"], capture_output=True, check=False)
    if done.returncode == 0 and root_is_read_only():
        return None
    try:
        with open("/proc/sys/kernel/sysrq", "w") as f:
            f.write("1\n")
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("u\n")
    except OSError as exc:
        return f"cannot remount / read-only: {exc.strerror}"
    deadline = time.monotonic() + REMOUNT_WAIT_S
    while time.monotonic() < deadline:
        if root_is_read_only():
            return None
        time.sleep(0.05)
    return "/ is still read-write after remount and sysrq u"


def strace_version(strace: str = STRACE) -> str:
    try:
        done = subprocess.run([strace, "-V"], capture_output=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"[:200]
    return done.stdout.decode(errors="replace").partition("\n")[0][:200]


def detonate(log: MonitorLog) -> None:
    """One detonation, from a mounted... (see :func:`run_medium`), then a consistent disk
    and ``done`` (never raises)."""
    try:
        run_medium(log, Path(MOUNT_POINT))
    except Exception as exc:  # noqa: BLE001  (the log must end with done whatever happened)
        log.event("error", message=f"detonator failure: {type(exc).__name__}: {exc}"[:1000])
    finally:
        problem = make_root_consistent()
        if problem is not None:
            log.event("error", message=problem)
        log.event("done")
        _console_marker()


def clock_skew(rtc: str = RTC_SINCE_EPOCH) -> float | None:
    """Seconds the wall clock is off the emulated RTC (which counts on the host's clock
    across a restore); None without a readable RTC."""
    try:
        with open(rtc, "rb") as fh:
            return time.time() - int(fh.read().strip() or b"0")
    except (OSError, ValueError):
        return None


def wait_for_clock(skew: Callable[[], float | None] = clock_skew,
                   wait_s: float = CLOCK_WAIT_S) -> str | None:
    """Wait until the wall clock agrees with the RTC (the restore watch stepped it);
    returns what is wrong if it does not within ``wait_s`` (None: it agrees)."""
    deadline = time.monotonic() + wait_s
    while True:
        off = skew()
        if off is None:
            return "no readable RTC: the clock was not checked"
        if abs(off) <= CLOCK_MAX_SKEW_S:
            return None
        if time.monotonic() >= deadline:
            return (f"the clock is {off:+.0f} s off the RTC after {wait_s:g} s; "
                    "times in this log are the guest's")
        time.sleep(MEDIUM_POLL_S)


def run_medium(log: MonitorLog, medium: Path, mount: Callable[[], str | None] = mount_medium,
               runner: Callable[[MonitorLog], Runner] | None = None,
               settle_clock: Callable[[], str | None] = wait_for_clock) -> RunResult | None:
    """Wait for a right clock, mount the medium, check its manifest and sample, run the
    sample; write ``medium``, then ``error`` or the run's events. Returns the run's
    result (None: no run)."""
    clock_problem = settle_clock()
    if clock_problem is not None:
        log.comment(clock_problem)
    problem = mount()
    if problem is not None:
        log.event("error", message=f"cannot mount the medium: {problem}")
        return None
    log.event("medium", path=str(medium), files=medium_files(medium))
    try:
        manifest = read_manifest(medium)
    except ManifestError as exc:
        log.event("error", message=str(exc))
        return None
    sample = medium / manifest.sample
    try:
        is_file = stat.S_ISREG(os.lstat(sample).st_mode)
    except OSError:
        is_file = False
    if not is_file:
        log.event("error", message=f"sample {manifest.sample!r} is not a file on the medium")
        return None
    say(f"running {manifest.sample} as {manifest.user} for up to {manifest.timeout_s:g} s")
    make = runner or (lambda lg: Runner(lg, Cgroups(), Path(RUN_DIR), medium=str(medium)))
    the_runner = make(log)
    result = the_runner.run(manifest, str(sample))
    the_runner.cgroups.kill()  # whatever is left (after monitor_died, say)
    say(f"sample ended: code {result.code}, signal {result.signal}, timeout {result.timed_out}")
    return result


def _console_marker(console: str = CONSOLE) -> None:
    try:
        with open(console, "w") as out:
            out.write(DONE_MARKER + "\n")
    except OSError:
        pass


def _signal_ready(argv: list[str]) -> None:
    """Write ``detonator`` to init's ready FIFO (``--ready-fifo PATH``), if given."""
    if len(argv) != 3 or argv[1] != "--ready-fifo":
        return
    try:
        fd = os.open(argv[2], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, b"detonator\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    # the sample must not stop the detonator with a terminal signal from its session
    for number in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                   signal.SIGPIPE, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)
    os.umask(0o022)
    version = strace_version()
    try:
        fd = open_monitor_port()
    except OSError as exc:
        say(f"cannot open the monitor port {MONITOR_PORT}: {exc.strerror}; using the console")
        fd = os.open(CONSOLE, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    drive = open_drive()
    # made before the clean state is saved, so the session's disk diff does not show it
    os.makedirs(MOUNT_POINT, mode=0o755, exist_ok=True)
    say("waiting for a sample medium in " + MEDIUM_DEVICE)
    _signal_ready(argv)
    # A clean state is saved while this waits; the log starts only once the medium is
    # in, so the restored VM's port carries the whole log.
    wait_for_disc(drive)
    log = MonitorLog(fd)
    log.comment(f"secvf detonator {LOG_FORMAT}")
    log.event("hello", format=LOG_FORMAT, detonator=VERSION, strace=version)
    detonate(log)
    while True:  # the host powers the VM off (perhaps after a memory dump)
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
