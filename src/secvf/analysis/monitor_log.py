"""Parsing the in-guest monitor log: strace lines and detonator events.

The monitor log arrives on an output-only serial port from a guest that runs malware,
so it is hostile input. The grammar is in ``docs/analysis-report.md`` ("Monitor log
format"); in short, every line is one of::

    S <a line of `strace -f -tt -s 256 -e trace=process,file,network` output>
    E {"event": "...", "time": ..., ...}     a detonator event
    T truncated after N bytes                the host cut the log
    # comment

:func:`parse_monitor_log` never raises on content: a line it cannot use is counted as
garbage and skipped. Every collection it builds is bounded (``MAX_*`` below), and the
process tree is built without recursion, so a fork chain 4,000 deep costs nothing.

How strace's ``-f`` output is put together:

* ``<unfinished ...>`` halves are kept per pid and joined with the next
  ``<... NAME resumed>`` line of that pid;
* a child's first lines often come *before* its parent's ``fork() = N`` line, so a pid
  first seen without a parent is adopted by the first later fork that returns it;
* a fork returning a pid that already has a parent (pid reuse, or a lying guest) makes
  a new process record, so records only ever point at older records: no cycles;
* a ``clone(... CLONE_THREAD ...)`` makes a thread: its tid's lines count for the
  process that made it, and its ``+++ exited +++`` does not end that process.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dpkt

from secvf.net.decode import DNS_TYPES

__all__ = ["MonitorLog", "Process", "parse_monitor_log", "read_monitor_log",
           "decode_c_string", "split_args", "printable_text", "DEFAULT_MAX_BYTES", "MAX_LINE_BYTES"]

MAX_LINE_BYTES = 4096  # a line, with its "\n"; longer lines are cut
DEFAULT_MAX_BYTES = 8 << 20  # how much of the port's output the host keeps
MAX_PROCESSES = 4096  # process records kept
MAX_TREE_DEPTH = 64  # deeper processes are listed under their depth-64 ancestor
MAX_TIMELINE = 2000  # timeline events kept
MAX_LIST = 500  # rows per file / network list
MAX_OTHER_EVENTS = 64  # unknown detonator events kept
MAX_EVENTS = 1000  # detonator events kept
MAX_GARBAGE_SAMPLES = 5  # garbage lines kept as examples
MAX_GARBAGE_SAMPLE_CHARS = 200
MAX_STR_CHARS = 1024  # strings in events
MAX_EVENT_LIST = 256  # list items in events
MAX_FDS = 1024  # socket fds remembered per process
MAX_PENDING = 4096  # <unfinished ...> halves kept
MAX_MEDIUM_ATTEMPTS = 100
MAX_DETAIL_CHARS = 512  # a timeline event's detail
HALF_DAY_S = 43200.0

_LINE = re.compile(r"(?:(\d{1,10})\s+)?(\d{1,2}):(\d\d):(\d\d)\.(\d{1,9})\s+(.*)\Z", re.DOTALL)
_EXITED = re.compile(r"\+\+\+ exited with (-?\d{1,10}) \+\+\+")
_KILLED = re.compile(r"\+\+\+ killed by (SIG[A-Z0-9+-]{1,16}|[0-9]{1,3})( \(core dumped\))? \+\+\+")
_SIGNAL = re.compile(r"--- (SIG[A-Z0-9+-]{1,16}|stopped by SIG[A-Z0-9]{1,16}) ")
_UNFINISHED = " <unfinished ...>"
_RESUMED = re.compile(r"<\.\.\. ([a-z0-9_]{1,32}) resumed>(.*)\Z", re.DOTALL)
_CALL = re.compile(r"([a-z0-9_]{1,32})\((.*)\Z", re.DOTALL)
_RET = re.compile(r"\s*=\s*(-?\d{1,20}|0x[0-9a-fA-F]{1,20}|\?)(?:\s+(E[A-Z0-9]{1,20}))?")
_TRUNC = re.compile(r"truncated after (\d{1,20}) bytes\Z")
_SCAN = re.compile(r'["\\()\[\]{},]')
_FAMILY = re.compile(r"sa_family=(AF_[A-Z0-9]+)")
_PORT = re.compile(r"sin6?_port=htons\((\d{1,5})\)")
_INET = re.compile(r'inet_addr\("([0-9.]{1,15})"\)')
_INET6 = re.compile(r'inet_pton\(AF_INET6, "([0-9a-fA-F:.]{1,45})"')
_SUN = re.compile(r'sun_path=(@?)("(?:[^"\\]|\\.)*")')
_IOV = re.compile(r'iov_base=("(?:[^"\\]|\\.)*")')

_EXEC = frozenset({"execve", "execveat"})
_FORK = frozenset({"fork", "vfork", "clone", "clone3"})
_OPEN = {"open": 1, "openat": 2, "openat2": 2, "creat": -1}  # flags argument index
_DELETE = {"unlink": 0, "unlinkat": 1, "rmdir": 0}
_RENAME = {"rename": (0, 1), "renameat": (1, 3), "renameat2": (1, 3)}
_MKDIR = {"mkdir": 0, "mkdirat": 1}
_CHMOD = {"chmod": (0, 1), "fchmodat": (1, 2)}
_LINK = {"link": 1, "linkat": 3, "symlink": 1, "symlinkat": 2}
_SEND = frozenset({"sendto", "sendmsg", "sendmmsg"})
_DIRFD_CALLS = frozenset({"openat", "openat2", "unlinkat", "renameat", "renameat2", "mkdirat",
                          "fchmodat", "linkat"})
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")
_QUIET_PATHS = frozenset({"/dev/null", "/dev/tty"})
_MEDIUM_ERRNOS = frozenset({"EROFS", "EACCES", "EPERM"})
_SOCK_TYPES = {"SOCK_STREAM": "tcp", "SOCK_DGRAM": "udp", "SOCK_RAW": "raw",
               "SOCK_SEQPACKET": "seqpacket"}
_FAMILIES = {"AF_INET": "inet", "AF_INET6": "inet6", "AF_UNIX": "unix", "AF_LOCAL": "unix",
             "AF_NETLINK": "netlink", "AF_PACKET": "packet"}
_ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "e": 27,
            '"': 34, "\\": 92, "'": 39, "?": 63}


@dataclass
class Process:
    """One process seen in strace's output (a record: a reused pid gets a new one)."""

    index: int  # position in MonitorLog.processes; a parent's index is always smaller
    pid: int  # the process id (its main thread's tid)
    ppid: int | None = None  # parent's pid; None for a root
    parent: int | None = None  # parent record's index
    argv: list[str] | None = None  # the last successful execve's argv
    exe: str | None = None  # that execve's path
    execs: int = 0  # successful execve calls
    start: str | None = None  # strace time it was first seen
    end: str | None = None  # strace time of its +++ line
    exit_code: int | None = None  # from "+++ exited with N +++"
    signal: str | None = None  # from "+++ killed by SIG +++"
    threads: int = 0  # threads it created
    cwd: str | None = None  # its working directory as far as chdir calls tell
    fds: dict[int, tuple[str, str]] = field(default_factory=dict)  # socket fd → (family, proto)
    peers: dict[int, tuple[str, int | None]] = field(default_factory=dict)  # fd → connect target


@dataclass
class _Call:
    """One syscall line, with its unfinished half joined."""

    tid: int
    time: str
    name: str
    args: list[str]  # top-level arguments, as strace printed them
    raw_args: str  # the argument text
    ret: str | None  # "3", "-1", "?", or None when the line was cut
    errno: str | None  # "ENOENT" …


@dataclass
class MonitorLog:
    """What :func:`parse_monitor_log` found. Use :meth:`to_json` for the report."""

    processes: list[Process] = field(default_factory=list)  # every record, oldest first
    processes_dropped: int = 0  # records not kept past MAX_PROCESSES
    timeline: list[dict[str, Any]] = field(default_factory=list)
    timeline_truncated: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)  # detonator events, in order
    other_events: list[dict[str, Any]] = field(default_factory=list)  # unknown ones
    lines: int = 0  # lines read
    strace_lines: int = 0
    event_lines: int = 0
    garbage_lines: int = 0
    garbage_samples: list[str] = field(default_factory=list)
    truncated: bool = False  # a T line, or the host's reader cut the log
    complete: bool = False  # a done event was seen
    unmatched_unfinished: int = 0  # unfinished halves never resumed
    medium_path: str | None = None  # from the medium event (or the caller)
    medium_attempts: list[dict[str, Any]] = field(default_factory=list)
    files_written: dict[str, list[Any]] = field(default_factory=dict)  # path → [count, pids]
    files_deleted: dict[str, list[Any]] = field(default_factory=dict)
    dirs_created: dict[str, list[Any]] = field(default_factory=dict)
    renamed: list[dict[str, Any]] = field(default_factory=list)
    chmods: list[dict[str, Any]] = field(default_factory=list)
    failed_writes: int = 0
    read_opens: int = 0
    files_truncated: bool = False
    endpoints: dict[tuple[str, str, int | None, str, str], dict[str, Any]] = field(
        default_factory=dict)  # (family, address, port, proto, syscall) → row
    dns_queries: list[dict[str, str]] = field(default_factory=list)
    listening: list[dict[str, Any]] = field(default_factory=list)
    sockets: int = 0
    network_truncated: bool = False

    def event(self, name: str) -> dict[str, Any] | None:
        """The first detonator event called ``name``, or None."""
        return next((e for e in self.events if e.get("event") == name), None)

    def last_event(self, name: str) -> dict[str, Any] | None:
        """The last detonator event called ``name``, or None."""
        return next((e for e in reversed(self.events) if e.get("event") == name), None)

    def process_tree(self) -> list[dict[str, Any]]:
        """The roots, each a process dict with nested ``children`` (depth-capped)."""
        nodes: list[dict[str, Any]] = []
        depth: list[int] = []
        holder: list[int | None] = []  # the record whose children list holds this one
        roots: list[dict[str, Any]] = []
        for proc in self.processes:
            nodes.append({"pid": proc.pid, "ppid": proc.ppid, "argv": proc.argv,
                          "exe": proc.exe, "execs": proc.execs, "start": proc.start,
                          "end": proc.end, "exit_code": proc.exit_code,
                          "signal": proc.signal, "threads": proc.threads, "children": []})
            parent = proc.parent
            if parent is None:
                depth.append(0)
                holder.append(None)
                roots.append(nodes[-1])
                continue
            if depth[parent] >= MAX_TREE_DEPTH:
                parent = holder[parent]
                assert parent is not None
            depth.append(depth[parent] + 1)
            holder.append(parent)
            nodes[parent]["children"].append(nodes[-1])
        return roots

    def run_facts(self) -> dict[str, Any]:
        """What the detonator events say about the run (the report's ``run`` fields)."""
        start = self.event("start") or {}
        exit_ev = self.last_event("exit")
        timeout = self.event("timeout")
        died = self.event("monitor_died")
        code = exit_ev.get("code") if exit_ev else None
        sig = exit_ev.get("signal") if exit_ev else None
        if timeout is not None:
            outcome = "timeout"
        elif exit_ev is not None:
            outcome = "killed" if isinstance(sig, str) and sig else "exited"
        elif died is not None:
            outcome = "monitor_died"
        else:
            outcome = "unknown"
        ended = timeout or exit_ev or died
        argv = start.get("argv")
        return {
            "argv": [str(a) for a in argv] if isinstance(argv, list) else [],
            "user": _str_or_none(start.get("user")),
            "cwd": _str_or_none(start.get("cwd")),
            "timeout_s": _num_or_none(start.get("timeout_s")),
            "started_at": _num_or_none(start.get("time")),
            "ended_at": _num_or_none(ended.get("time")) if ended else None,
            "outcome": outcome,
            "exit_code": code if isinstance(code, int) and not isinstance(code, bool) else None,
            "exit_signal": sig if isinstance(sig, str) else None,
            "timed_out": timeout is not None,
            "monitor_died": died is not None,
            "pid_limit_hit": self.event("pid_limit") is not None,
            "medium_write_attempts": list(self.medium_attempts),
            "detonator_errors": [str(e.get("message", "")) for e in self.events
                                 if e.get("event") == "error"][:MAX_EVENT_LIST],
        }

    def to_json(self) -> dict[str, Any]:
        """The report sections this log fills: ``processes``, ``process_count``,
        ``timeline``, ``timeline_truncated``, ``files``, ``network_syscalls``,
        ``monitor`` and ``run``."""
        hello = self.event("hello") or {}
        fmt = hello.get("format")
        return {
            "processes": self.process_tree(),
            "process_count": len(self.processes) + self.processes_dropped,
            "timeline": list(self.timeline),
            "timeline_truncated": self.timeline_truncated,
            "files": {
                "written": _rows(self.files_written),
                "deleted": _rows(self.files_deleted),
                "created_dirs": _rows(self.dirs_created),
                "renamed": list(self.renamed),
                "chmod": list(self.chmods),
                "failed_writes": self.failed_writes,
                "read_opens": self.read_opens,
                "truncated": self.files_truncated,
            },
            "network_syscalls": {
                "endpoints": [dict(row, pids=sorted(row["pids"]))
                              for row in self.endpoints.values()],
                "dns_servers": sorted({f"{_hostport(r['address'], r['port'])}"
                                       for r in self.endpoints.values()
                                       if r["port"] == 53 and r["family"] != "unix"}),
                "dns_queries": list(self.dns_queries),
                "listening": list(self.listening),
                "sockets": self.sockets,
                "truncated": self.network_truncated,
            },
            "monitor": {
                "lines": self.lines,
                "strace_lines": self.strace_lines,
                "event_lines": self.event_lines,
                "garbage_lines": self.garbage_lines,
                "garbage_samples": list(self.garbage_samples),
                "truncated": self.truncated,
                "complete": self.complete,
                "format": fmt if isinstance(fmt, int) and not isinstance(fmt, bool) else None,
                "detonator": _str_or_none(hello.get("detonator")),
                "other_events": list(self.other_events),
                "unmatched_unfinished": self.unmatched_unfinished,
            },
            "run": self.run_facts(),
        }


def read_monitor_log(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                     medium_path: str | None = None) -> MonitorLog:
    """Read and parse the monitor log file at ``path``, at most ``max_bytes`` of it.

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    cut = len(data) > max_bytes
    if cut:
        data = data[:max_bytes]
        data = data[:data.rfind(b"\n") + 1] if b"\n" in data else data
    return parse_monitor_log(data, medium_path=medium_path, truncated=cut)


def parse_monitor_log(data: bytes | str | Iterable[bytes | str], *,
                      medium_path: str | None = None, truncated: bool = False) -> MonitorLog:
    """Parse a monitor log. Never raises on content.

    Args:
        data: the log's bytes (or text, or an iterable of lines).
        medium_path: where the sample medium is mounted in the guest, if known before
            the ``medium`` event says so (write-opens under it that fail are medium
            write attempts).
        truncated: the host's reader cut the log.

    Returns:
        the :class:`MonitorLog`.
    """
    parser = _Parser(medium_path)
    parser.log.truncated = truncated
    if isinstance(data, bytes | bytearray):
        lines: Iterable[bytes | str] = bytes(data).split(b"\n")
    elif isinstance(data, str):
        lines = data.split("\n")
    else:
        lines = data
    for line in lines:
        parser.feed(line)
    return parser.finish()


class _Parser:
    def __init__(self, medium_path: str | None) -> None:
        self.log = MonitorLog(medium_path=_norm_dir(medium_path))
        self.by_tid: dict[int, int] = {}  # tid → process record index
        self.pending: dict[int, tuple[str, str, str]] = {}  # tid → (time, name, args)
        self.first_s: float | None = None
        self.last_s = 0.0
        self.day_s = 0.0

    # -- lines ---------------------------------------------------------------------

    def feed(self, raw: bytes | str) -> None:
        if isinstance(raw, bytes | bytearray):
            line = bytes(raw[:MAX_LINE_BYTES - 1]).decode("utf-8", "replace")
        else:
            line = raw[:MAX_LINE_BYTES - 1]
        line = line.removesuffix("\r").removesuffix("\n").removesuffix("\r")
        if not line:
            return
        log = self.log
        log.lines += 1
        try:
            ok = self._line(line)
        except Exception:  # noqa: BLE001 — hostile input must never stop the parse
            ok = False
        if not ok:
            log.garbage_lines += 1
            if len(log.garbage_samples) < MAX_GARBAGE_SAMPLES:
                log.garbage_samples.append(printable_text(line[:MAX_GARBAGE_SAMPLE_CHARS]))

    def _line(self, line: str) -> bool:
        kind, rest = line[:2], line[2:]
        if line.startswith("#"):
            return True
        if kind == "S ":
            self.log.strace_lines += 1
            return self._strace(rest)
        if kind == "E ":
            self.log.event_lines += 1
            return self._event(rest)
        if kind == "T " and _TRUNC.match(rest):
            self.log.truncated = True
            return True
        return False

    def finish(self) -> MonitorLog:
        self.log.unmatched_unfinished = len(self.pending)
        return self.log

    # -- events --------------------------------------------------------------------

    def _event(self, text: str) -> bool:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return False
        if not isinstance(value, dict) or not isinstance(value.get("event"), str):
            return False
        event = _clean(value, 0)
        assert isinstance(event, dict)
        name = event["event"]
        log = self.log
        if name not in _KNOWN_EVENTS:
            if len(log.other_events) < MAX_OTHER_EVENTS:
                log.other_events.append(event)
        elif len(log.events) < MAX_EVENTS:
            log.events.append(event)
        if name == "done":
            log.complete = True
        elif name == "medium" and isinstance(event.get("path"), str) and event["path"]:
            log.medium_path = _norm_dir(event["path"])
        elif name == "write_medium_denied":
            pid = event.get("pid")
            self._medium_attempt(str(event.get("path", "")),
                                 pid if isinstance(pid, int) else None, "event")
        detail = _event_detail(event)
        self._timeline(None, "", 0, f"event:{name}", detail, True)
        return True

    # -- strace --------------------------------------------------------------------

    def _strace(self, text: str) -> bool:
        m = _LINE.match(text)
        if not m:
            return False
        tid = int(m.group(1)) if m.group(1) else 0
        hh, mm, ss = int(m.group(2)), int(m.group(3)), int(m.group(4))
        if hh > 23 or mm > 59 or ss > 60:
            return False
        time = f"{m.group(2)}:{m.group(3)}:{m.group(4)}.{m.group(5)}"
        seconds = hh * 3600 + mm * 60 + ss + int(m.group(5)) / 10 ** len(m.group(5))
        t = self._offset(seconds)
        body = m.group(6)
        proc = self._proc(tid, time)
        if body.startswith("+++ "):
            return self._ended(proc, tid, time, t, body)
        if body.startswith("--- "):
            sm = _SIGNAL.match(body)
            if not sm:
                return False
            if sm.group(1) != "SIGCHLD":
                self._timeline(t, time, proc.pid, "signal", sm.group(1), True)
            return True
        rm = _RESUMED.match(body)
        if rm:
            name, rest = rm.group(1), rm.group(2)
            first = self.pending.pop(tid, None)
            if first is not None and first[1] == name:
                time, t, rest = first[0], self._offset_of(first[0], t), first[2] + rest
            return self._call(proc, tid, time, t, name, rest)
        cm = _CALL.match(body)
        if not cm:
            return False
        name, rest = cm.group(1), cm.group(2)
        if rest.endswith(_UNFINISHED):
            if len(self.pending) < MAX_PENDING or tid in self.pending:
                self.pending[tid] = (time, name, rest[:-len(_UNFINISHED)])
            return True
        return self._call(proc, tid, time, t, name, rest)

    def _offset(self, seconds: float) -> float:
        seconds += self.day_s
        if self.first_s is None:
            self.first_s = self.last_s = seconds
        elif seconds < self.last_s - HALF_DAY_S:
            self.day_s += 86400.0
            seconds += 86400.0
        self.last_s = max(self.last_s, seconds)
        return round(seconds - self.first_s, 6)

    def _offset_of(self, time: str, default: float) -> float:
        try:
            hh, mm, rest = time.split(":")
            seconds = int(hh) * 3600 + int(mm) * 60 + float(rest) + self.day_s
        except ValueError:
            return default
        assert self.first_s is not None
        value = seconds - self.first_s
        return round(value, 6) if value <= default else default

    def _proc(self, tid: int, time: str) -> Process:
        index = self.by_tid.get(tid)
        if index is not None:
            return self.log.processes[index]
        return self._new_proc(tid, time, None)

    def _new_proc(self, pid: int, time: str, parent: Process | None) -> Process:
        log = self.log
        if len(log.processes) >= MAX_PROCESSES:
            log.processes_dropped += 1
            # Over the cap: count it, and let its lines land on an older record.
            other = parent if parent is not None else log.processes[-1]
            self.by_tid[pid] = other.index
            return other
        proc = Process(index=len(log.processes), pid=pid, start=time)
        if parent is not None:
            proc.parent, proc.ppid = parent.index, parent.pid
            proc.cwd = parent.cwd
            proc.fds = dict(parent.fds)
            proc.peers = dict(parent.peers)
        elif not log.processes:
            start = next((e for e in log.events if e.get("event") == "start"), None)
            cwd = start.get("cwd") if start else None
            proc.cwd = cwd if isinstance(cwd, str) and cwd.startswith("/") else None
        log.processes.append(proc)
        self.by_tid[pid] = proc.index
        return proc

    def _ended(self, proc: Process, tid: int, time: str, t: float, body: str) -> bool:
        em = _EXITED.match(body)
        km = _KILLED.match(body) if em is None else None
        if em is None and km is None:
            return body.startswith("+++ superseded by execve in pid ")
        if tid != proc.pid:  # a thread ended, not the process
            return True
        proc.end = time
        if em is not None:
            proc.exit_code = int(em.group(1))
            self._timeline(t, time, proc.pid, "exit", f"exited with {proc.exit_code}", True)
        elif km is not None:
            proc.signal = km.group(1)
            detail = f"killed by {proc.signal}" + (" (core dumped)" if km.group(2) else "")
            self._timeline(t, time, proc.pid, "killed", detail, True)
        return True

    def _call(self, proc: Process, tid: int, time: str, t: float, name: str,
              rest: str) -> bool:
        args, tail = split_args(rest)
        ret = errno = None
        if tail is not None:
            rm = _RET.match(tail)
            if rm is None:
                return False
            ret, errno = rm.group(1), rm.group(2)
        call = _Call(tid, time, name, args, rest if tail is None else rest[:len(rest)
                                                                           - len(tail) - 1],
                     ret, errno)
        handler = _HANDLERS.get(name)
        if handler is not None:
            handler(self, proc, call, t)
        return True

    # -- syscalls ------------------------------------------------------------------

    def _execve(self, proc: Process, call: _Call, t: float) -> None:
        path_i = 1 if call.name == "execveat" else 0
        exe = _path_arg(call.args, path_i)
        argv = _str_list(call.args[path_i + 1]) if len(call.args) > path_i + 1 else None
        ok = call.ret == "0"
        if ok:
            proc.execs += 1
            proc.exe, proc.argv = exe, argv
        shown = " ".join(_quote(a) for a in (argv or []))
        if not argv or argv[0] != exe:
            shown = f"{exe or '?'}: {shown}"
        self._timeline(t, call.time, proc.pid, "execve", shown + _err(call), ok)

    def _fork(self, proc: Process, call: _Call, t: float) -> None:
        if call.ret is None or not call.ret.isdigit() or int(call.ret) <= 0:
            return
        child = int(call.ret)
        if "CLONE_THREAD" in call.raw_args:
            proc.threads += 1
            self.by_tid[child] = proc.index
            return
        index = self.by_tid.get(child)
        existing = self.log.processes[index] if index is not None else None
        if (existing is not None and existing.parent is None and existing.index > proc.index
                and existing.pid == child):
            existing.parent, existing.ppid = proc.index, proc.pid
            if existing.cwd is None:
                existing.cwd = proc.cwd
            for fd, sock in proc.fds.items():
                existing.fds.setdefault(fd, sock)
            for fd, peer in proc.peers.items():
                existing.peers.setdefault(fd, peer)
        else:
            self._new_proc(child, call.time, proc)
        self._timeline(t, call.time, proc.pid, "fork", f"{call.name} → pid {child}", True)

    def _chdir(self, proc: Process, call: _Call, t: float) -> None:
        path = _path_arg(call.args, 0)
        if call.ret == "0" and path is not None:
            proc.cwd = self._abs(proc, path)

    def _open(self, proc: Process, call: _Call, t: float) -> None:
        flag_i = _OPEN[call.name]
        path = _path_arg(call.args, 1 if call.name in ("openat", "openat2") else 0)
        flags = call.args[flag_i] if 0 <= flag_i < len(call.args) else ""
        if flag_i >= 0 and not any(f in flags for f in _WRITE_FLAGS):
            self.log.read_opens += 1
            return
        if path is None:
            return
        full = self._abs(proc, path, call)
        ok = call.ret is not None and not call.ret.startswith("-")
        medium = self.log.medium_path
        if not ok:
            self.log.failed_writes += 1
            if medium is not None and call.errno in _MEDIUM_ERRNOS and _under(full, medium):
                self._medium_attempt(full, proc.pid, "strace")
                self._timeline(t, call.time, proc.pid, "medium_write",
                               f"{full} {flags}" + _err(call), False)
            return
        if full in _QUIET_PATHS:
            return
        kind = "file_create" if call.name == "creat" or "O_CREAT" in flags else "file_write"
        self._count(self.log.files_written, full, proc.pid)
        self._timeline(t, call.time, proc.pid, kind, f"{full} {flags or 'creat'}", True)

    def _truncate(self, proc: Process, call: _Call, t: float) -> None:
        path = _path_arg(call.args, 0)
        if path is not None and call.ret == "0":
            full = self._abs(proc, path)
            self._count(self.log.files_written, full, proc.pid)
            self._timeline(t, call.time, proc.pid, "file_write", f"{full} truncate", True)

    def _delete(self, proc: Process, call: _Call, t: float) -> None:
        path = _path_arg(call.args, _DELETE[call.name])
        if path is None:
            return
        full = self._abs(proc, path, call)
        ok = call.ret == "0"
        if ok:
            self._count(self.log.files_deleted, full, proc.pid)
        self._timeline(t, call.time, proc.pid, "file_delete", full + _err(call), ok)

    def _rename(self, proc: Process, call: _Call, t: float) -> None:
        a, b = _RENAME[call.name]
        src, dst = _path_arg(call.args, a), _path_arg(call.args, b)
        if src is None or dst is None:
            return
        src, dst = self._abs(proc, src, call), self._abs(proc, dst, call)
        ok = call.ret == "0"
        if ok:
            if len(self.log.renamed) < MAX_LIST:
                self.log.renamed.append({"from": src, "to": dst, "pid": proc.pid})
            else:
                self.log.files_truncated = True
        self._timeline(t, call.time, proc.pid, "file_rename", f"{src} → {dst}" + _err(call), ok)

    def _mkdir(self, proc: Process, call: _Call, t: float) -> None:
        path = _path_arg(call.args, _MKDIR[call.name])
        if path is None:
            return
        full = self._abs(proc, path, call)
        ok = call.ret == "0"
        if ok:
            self._count(self.log.dirs_created, full, proc.pid)
        self._timeline(t, call.time, proc.pid, "file_mkdir", full + _err(call), ok)

    def _chmod(self, proc: Process, call: _Call, t: float) -> None:
        p, m = _CHMOD[call.name]
        path = _path_arg(call.args, p)
        if path is None:
            return
        mode = call.args[m] if m < len(call.args) else "?"
        full = self._abs(proc, path, call)
        ok = call.ret == "0"
        if ok:
            if len(self.log.chmods) < MAX_LIST:
                self.log.chmods.append({"path": full, "mode": mode[:16], "pid": proc.pid})
            else:
                self.log.files_truncated = True
        self._timeline(t, call.time, proc.pid, "file_chmod", f"{full} {mode[:16]}" + _err(call),
                       ok)

    def _link(self, proc: Process, call: _Call, t: float) -> None:
        new = _path_arg(call.args, _LINK[call.name])
        old = _path_arg(call.args, 0 if call.name != "linkat" else 1)
        if new is None:
            return
        full = self._abs(proc, new, call)
        ok = call.ret == "0"
        if ok:
            self._count(self.log.files_written, full, proc.pid)
        self._timeline(t, call.time, proc.pid, "file_link",
                       f"{full} → {old or '?'}" + _err(call), ok)

    def _socket(self, proc: Process, call: _Call, t: float) -> None:
        if call.ret is None or not call.ret.isdigit() or len(call.args) < 2:
            return
        self.log.sockets += 1
        family = _FAMILIES.get(call.args[0], call.args[0].lower()[:16])
        proto = next((v for k, v in _SOCK_TYPES.items() if k in call.args[1]), "unknown")
        if family == "unix":
            proto = "unix"
        if len(proc.fds) < MAX_FDS or int(call.ret) in proc.fds:
            proc.fds[int(call.ret)] = (family, proto)

    def _connect(self, proc: Process, call: _Call, t: float) -> None:
        addr = _sockaddr(call.args[1] if len(call.args) > 1 else "")
        if addr is None:
            return
        fd = _int(call.args[0]) if call.args else None
        ok = call.ret == "0" or call.errno == "EINPROGRESS"
        if fd is not None and (len(proc.peers) < MAX_FDS or fd in proc.peers):
            proc.peers[fd] = (addr[1], addr[2])
        self._endpoint(proc, fd, addr, "connect", ok)
        kind = "dns" if addr[2] == 53 and addr[0] != "unix" else "connect"
        self._timeline(t, call.time, proc.pid, kind, _addr_text(addr) + _err(call), ok)

    def _send(self, proc: Process, call: _Call, t: float) -> None:
        addr = _sockaddr(call.raw_args)
        fd = _int(call.args[0]) if call.args else None
        if addr is None and fd is not None and fd in proc.peers:
            family = proc.fds.get(fd, ("inet", "udp"))[0]
            peer_addr, peer_port = proc.peers[fd]
            addr = (family, peer_addr, peer_port)
            explicit = False
        else:
            explicit = True
        if addr is None:
            return
        ok = call.ret is not None and not call.ret.startswith("-")
        if addr[2] == 53 and addr[0] != "unix":
            for name, qtype in _dns_names(call):
                self._dns_query(name, qtype)
                self._timeline(t, call.time, proc.pid, "dns",
                               f"{_addr_text(addr)} query {qtype} {name}", ok)
        if explicit:
            self._endpoint(proc, fd, addr, call.name, ok)
            if addr[2] != 53:
                self._timeline(t, call.time, proc.pid, "sendto", _addr_text(addr) + _err(call),
                               ok)

    def _bind(self, proc: Process, call: _Call, t: float) -> None:
        addr = _sockaddr(call.args[1] if len(call.args) > 1 else "")
        fd = _int(call.args[0]) if call.args else None
        if addr is None or call.ret != "0":
            return
        if fd is not None and (len(proc.peers) < MAX_FDS or -fd - 1 in proc.peers):
            proc.peers[-fd - 1] = (addr[1], addr[2])  # negative key: our own address
        self._timeline(t, call.time, proc.pid, "bind", _addr_text(addr), True)

    def _listen(self, proc: Process, call: _Call, t: float) -> None:
        fd = _int(call.args[0]) if call.args else None
        if fd is None or call.ret != "0":
            return
        family = proc.fds.get(fd, ("inet", "tcp"))[0]
        address, port = proc.peers.get(-fd - 1, ("?", None))
        if len(self.log.listening) < MAX_LIST:
            self.log.listening.append({"family": family, "address": address, "port": port,
                                       "pid": proc.pid})
        else:
            self.log.network_truncated = True
        self._timeline(t, call.time, proc.pid, "listen",
                       _addr_text((family, address, port)), True)

    def _accept(self, proc: Process, call: _Call, t: float) -> None:
        if call.ret is None or not call.ret.isdigit():
            return
        addr = _sockaddr(call.args[1] if len(call.args) > 1 else "")
        detail = _addr_text(addr) if addr else f"fd {call.ret}"
        self._timeline(t, call.time, proc.pid, "accept", detail, True)

    # -- bookkeeping ---------------------------------------------------------------

    def _abs(self, proc: Process, path: str, call: _Call | None = None) -> str:
        if path.startswith("/"):
            return posixpath.normpath(path) if "/." in path or "//" in path else path
        if call is not None and call.name in _DIRFD_CALLS and call.args \
                and call.args[0] != "AT_FDCWD":
            return path  # relative to a directory fd we cannot see
        if proc.cwd is None:
            return path
        return posixpath.normpath(posixpath.join(proc.cwd, path))

    def _count(self, table: dict[str, list[Any]], path: str, pid: int) -> None:
        row = table.get(path)
        if row is None:
            if len(table) >= MAX_LIST:
                self.log.files_truncated = True
                return
            row = table[path] = [0, set()]
        row[0] += 1
        if len(row[1]) < 64:
            row[1].add(pid)

    def _endpoint(self, proc: Process, fd: int | None, addr: tuple[str, str, int | None],
                  syscall: str, ok: bool) -> None:
        family = addr[0]
        proto = proc.fds.get(fd, (family, "unknown"))[1] if fd is not None else "unknown"
        if family == "unix":
            proto = "unix"
        key = (family, addr[1], addr[2], proto, syscall)
        row = self.log.endpoints.get(key)
        if row is None:
            if len(self.log.endpoints) >= MAX_LIST:
                self.log.network_truncated = True
                return
            row = self.log.endpoints[key] = {
                "family": family, "address": addr[1], "port": addr[2], "proto": proto,
                "syscall": syscall, "count": 0, "ok": False, "pids": set()}
        row["count"] += 1
        row["ok"] = row["ok"] or ok
        if len(row["pids"]) < 64:
            row["pids"].add(proc.pid)

    def _dns_query(self, name: str, qtype: str) -> None:
        entry = {"name": name, "type": qtype}
        if entry in self.log.dns_queries:
            return
        if len(self.log.dns_queries) < MAX_LIST:
            self.log.dns_queries.append(entry)
        else:
            self.log.network_truncated = True

    def _medium_attempt(self, path: str, pid: int | None, source: str) -> None:
        if len(self.log.medium_attempts) < MAX_MEDIUM_ATTEMPTS:
            self.log.medium_attempts.append({"path": path[:MAX_STR_CHARS], "pid": pid,
                                             "source": source})

    def _timeline(self, t: float | None, time: str, pid: int, kind: str, detail: str,
                  ok: bool) -> None:
        log = self.log
        if len(log.timeline) >= MAX_TIMELINE:
            log.timeline_truncated = True
            return
        log.timeline.append({"t": t, "time": time, "pid": pid, "kind": kind,
                             "detail": detail[:MAX_DETAIL_CHARS], "ok": ok})


_HANDLERS = {
    **{n: _Parser._execve for n in _EXEC},
    **{n: _Parser._fork for n in _FORK},
    **{n: _Parser._open for n in _OPEN},
    **{n: _Parser._delete for n in _DELETE},
    **{n: _Parser._rename for n in _RENAME},
    **{n: _Parser._mkdir for n in _MKDIR},
    **{n: _Parser._chmod for n in _CHMOD},
    **{n: _Parser._link for n in _LINK},
    **{n: _Parser._send for n in _SEND},
    "chdir": _Parser._chdir, "truncate": _Parser._truncate, "socket": _Parser._socket,
    "connect": _Parser._connect, "bind": _Parser._bind, "listen": _Parser._listen,
    "accept": _Parser._accept, "accept4": _Parser._accept,
}

_KNOWN_EVENTS = frozenset({"hello", "medium", "start", "write_medium_denied", "pid_limit",
                           "monitor_died", "timeout", "exit", "error", "done"})


# -- strace argument text ----------------------------------------------------------


def split_args(text: str) -> tuple[list[str], str | None]:
    """Split strace's argument text (after ``name(``) at its top-level commas.

    Returns:
        the arguments (stripped), and the text after the closing ``)`` — None when the
        line ended before it (a cut line, or the first half of an unfinished call).
    """
    args: list[str] = []
    depth = 0
    start = 0
    pos = 0
    n = len(text)
    while pos < n:
        m = _SCAN.search(text, pos)
        if m is None:
            break
        c = m.group()
        pos = m.end()
        if c == '"':
            while pos < n:
                q = text.find('"', pos)
                if q < 0:
                    pos = n
                    break
                back = q - 1
                while back >= pos and text[back] == "\\":
                    back -= 1
                pos = q + 1
                if (q - 1 - back) % 2 == 0:
                    break
        elif c == "\\":
            pos += 1
        elif c in "([{":
            depth += 1
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == ")":
            if depth == 0:
                piece = text[start:m.start()].strip()
                if piece or args:
                    args.append(piece)
                return args, text[pos:]
            depth -= 1
        elif c == "," and depth == 0:
            args.append(text[start:m.start()].strip())
            start = pos
    piece = text[start:].strip()
    if piece:
        args.append(piece)
    return args, None


def decode_c_string(token: str) -> tuple[bytes, bool] | None:
    """Decode a strace string argument (``"..."`` with C escapes, maybe followed by
    ``...`` when strace cut it). Returns (bytes, was_cut), or None if it is not one."""
    token = token.strip()
    if not token.startswith('"'):
        return None
    out = bytearray()
    i, n = 1, len(token)
    while i < n:
        c = token[i]
        if c == '"':
            return bytes(out), token[i + 1:].startswith("...")
        if c != "\\":
            out += c.encode("utf-8", "replace")
            i += 1
            continue
        if i + 1 >= n:
            break
        e = token[i + 1]
        if e == "x":
            try:
                out.append(int(token[i + 2:i + 4], 16))
                i += 4
                continue
            except ValueError:
                break
        if e in "01234567":
            j = i + 1
            while j < n and j < i + 4 and token[j] in "01234567":
                j += 1
            out.append(int(token[i + 1:j], 8) & 0xFF)
            i = j
            continue
        out.append(_ESCAPES.get(e, ord(e) & 0xFF))
        i += 2
    return bytes(out), True


def _text(token: str) -> str | None:
    decoded = decode_c_string(token)
    if decoded is None:
        return None
    raw, cut = decoded
    return raw.decode("utf-8", "replace") + ("..." if cut else "")


def _path_arg(args: list[str], index: int) -> str | None:
    if index >= len(args):
        return None
    return _text(args[index])


def _str_list(token: str) -> list[str] | None:
    token = token.strip()
    if not token.startswith("["):
        return None
    inner, _ = split_args(token[1:].rsplit("]", 1)[0] + ")")
    out: list[str] = []
    for item in inner[:MAX_EVENT_LIST]:
        value = _text(item)
        out.append(value if value is not None else item[:MAX_STR_CHARS])
    return out


def _sockaddr(text: str) -> tuple[str, str, int | None] | None:
    fm = _FAMILY.search(text)
    if fm is None:
        return None
    family = _FAMILIES.get(fm.group(1), fm.group(1).lower()[:16])
    region = text[fm.start():fm.start() + 512]
    if family == "unix":
        um = _SUN.search(region)
        path = _text(um.group(2)) if um else None
        return ("unix", (um.group(1) if um else "") + (path or "?"), None)
    pm = _PORT.search(region)
    port = int(pm.group(1)) if pm else None
    if family == "inet":
        am = _INET.search(region)
        return ("inet", am.group(1) if am else "?", port)
    if family == "inet6":
        am = _INET6.search(region)
        return ("inet6", am.group(1) if am else "?", port)
    return (family, "?", port)


def _dns_names(call: _Call) -> list[tuple[str, str]]:
    if call.name == "sendto":
        tokens = call.args[1:2]
    else:
        tokens = [m.group(1) for m in _IOV.finditer(call.raw_args)][:8]
    found: list[tuple[str, str]] = []
    for token in tokens:
        decoded = decode_c_string(token)
        if decoded is None:
            continue
        try:
            msg = dpkt.dns.DNS(decoded[0])
        except Exception:  # noqa: BLE001 — dpkt raises many kinds on bad bytes
            continue
        for q in msg.qd[:8]:
            name = q.name if isinstance(q.name, str) else str(q.name)
            found.append((printable_text(name.lower()[:255]), DNS_TYPES.get(q.type, str(q.type))))
    return found


def _int(token: str) -> int | None:
    token = token.split("<", 1)[0].strip()
    return int(token) if token.isdigit() else None


def _addr_text(addr: tuple[str, str, int | None] | None) -> str:
    if addr is None:
        return "?"
    family, address, port = addr
    if family == "unix":
        return f"unix:{address}"
    return _hostport(address, port)


def _hostport(address: str, port: int | None) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}" if port is not None else host


def _err(call: _Call) -> str:
    if call.ret is not None and call.ret.startswith("-") and call.errno:
        return f" = {call.errno}"
    return ""


def _quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./=:,@%+" for c in arg):
        return arg
    return json.dumps(arg, ensure_ascii=False)


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _norm_dir(path: str | None) -> str | None:
    if not path or not path.startswith("/"):
        return None
    return posixpath.normpath(path)


def _rows(table: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [{"path": path, "count": row[0], "pids": sorted(row[1])}
            for path, row in table.items()]


def printable_text(text: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


def _clean(value: Any, depth: int) -> Any:
    """An event's JSON value, bounded: strings cut, lists cut, depth capped, no NaN."""
    if isinstance(value, str):
        return value[:MAX_STR_CHARS]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= 4:
        return None
    if isinstance(value, list):
        return [_clean(v, depth + 1) for v in value[:MAX_EVENT_LIST]]
    if isinstance(value, dict):
        return {str(k)[:64]: _clean(v, depth + 1)
                for k, v in list(value.items())[:MAX_EVENT_LIST]}
    return None


def _event_detail(event: dict[str, Any]) -> str:
    parts = []
    for key, value in event.items():
        if key in ("event", "time"):
            continue
        parts.append(f"{key}={json.dumps(value, ensure_ascii=False)}")
    return " ".join(parts)[:MAX_DETAIL_CHARS]


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _num_or_none(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value
