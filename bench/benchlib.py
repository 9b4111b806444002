"""Shared machinery for the benchmarks in ``bench/``: a private SecVF home, plain-QEMU
baseline VMs, SSH and QEMU-guest-agent clients, process accounting, statistics and the
result table with its conditions.

Every benchmark runs SecVF through its CLI (``secvf ...``) or its Python API against a
private ``SECVF_HOME``/``SECVF_RUNTIME_DIR`` under a short ``/tmp`` path, boots its
baselines with plain QEMU command lines built here (never through SecVF's machine
builders), and cleans up everything it started, also when it fails or is interrupted.
Numbers are reported, never asserted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.table import Table

from secvf.runtime.procutil import die_with_parent

console = Console(width=None if sys.stdout.isatty() else 170)
QEMU = "qemu-system-x86_64"
SECVF = [sys.executable, "-m", "secvf"]
ACCEL = "tcg"  # /dev/kvm exists on the dev host but guests hang under it
GUEST_MEMORY_MIB = 1024  # SecVF's default for VMs and sandboxes; baselines use the same
SSH_ROUND_TRIP_NOTE = "ssh client per call over a ControlMaster connection"

#: The NIC of a plain-QEMU baseline VM, and the kernel parameter that has SecVF's guest
#: init run DHCP on it.
NAT_NIC_MAC = "52:54:00:12:34:56"
NAT_NIC_PARAM = f"secvf_nics={NAT_NIC_MAC}+dhcp"


def log(message: str) -> None:
    """Progress line on stderr (tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(
    description: str,
    default_runs: int,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The common command line: ``--runs N``, plus what ``extra`` adds to the parser."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--runs", type=int, default=default_runs, help=f"repetitions (default {default_runs})"
    )
    if extra is not None:
        extra(parser)
    return parser.parse_args()


# ---- statistics -----------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def median(values: Sequence[float]) -> float:
    """The sample median."""
    return statistics.median(values)


def spread(values: Sequence[float], unit: str = "s", digits: int = 2) -> str:
    """``median (min–max, n=N)`` as text."""
    return (
        f"{median(values):.{digits}f} {unit} ({min(values):.{digits}f}–"
        f"{max(values):.{digits}f}, n={len(values)})"
    )


# ---- the report -----------------------------------------------------------------------


@dataclass
class Row:
    """One line of a result table: a SecVF number beside its baseline."""

    metric: str
    secvf: str
    baseline_name: str
    baseline: str
    ratio: str = ""
    note: str = ""


def ratio(
    secvf_value: float,
    baseline_value: float,
    *,
    higher_is_better: bool = False,
    words: tuple[str, str] = ("faster", "slower"),
) -> str:
    """SecVF against the baseline as text: ``4.2× faster``/``slower`` for times (``words``
    for other lower-is-better quantities, e.g. ``("less", "more")`` for memory), and
    ``2.5× higher``/``lower`` for rates (``higher_is_better``)."""
    if secvf_value <= 0 or baseline_value <= 0:
        return "n/a"
    if higher_is_better:
        if secvf_value >= baseline_value:
            return f"{secvf_value / baseline_value:.2f}× higher"
        return f"{baseline_value / secvf_value:.2f}× lower"
    factor = baseline_value / secvf_value
    if factor >= 1:
        return f"{factor:.2f}× {words[0]}"
    return f"{1 / factor:.2f}× {words[1]}"


@dataclass
class Report:
    """A benchmark's conditions and result rows; printed as a rich table."""

    title: str
    command: str
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    load_start: tuple[float, ...] = field(default_factory=os.getloadavg)
    foreign_qemu_start: int = field(default_factory=lambda: _foreign_qemu_count())
    facts: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        """Append a row."""
        self.rows.append(row)

    def print(self) -> None:
        """Print the conditions, then the table, then the notes."""
        load_end = os.getloadavg()
        cond = Table(title=f"{self.title}: conditions", show_header=False)
        for key, value in self.conditions(load_end).items():
            cond.add_row(key, value)
        console.print(cond)
        table = Table(title=self.title)
        for name in ("metric", "SecVF", "baseline", "baseline value", "ratio", "note"):
            table.add_column(name, overflow="fold")
        for row in self.rows:
            table.add_row(
                row.metric, row.secvf, row.baseline_name, row.baseline, row.ratio, row.note
            )
        console.print(table)
        for note in self.notes:
            console.print(f"- {note}", highlight=False)

    def conditions(self, load_end: tuple[float, ...]) -> dict[str, str]:
        """What the numbers depend on: machine, accelerator, images, load, date."""
        base = {
            "date (UTC)": self.started.strftime("%Y-%m-%d %H:%M:%S"),
            "command": self.command,
            "host": f"{platform.node()}, {platform.platform(terse=True)}, {os.cpu_count()} vCPU, "
            f"{_mem_total_gib():.1f} GiB RAM",
            "QEMU": _qemu_version(),
            "accelerator": f"{ACCEL} (SecVF VMs created with --accel tcg; baselines -accel tcg)",
            "load average (1/5/15 min)": f"start {_fmt_load(self.load_start)}, "
            f"end {_fmt_load(load_end)}",
            "other QEMU processes (not ours)": f"start {self.foreign_qemu_start}, "
            f"end {_foreign_qemu_count()}",
        }
        return base | self.facts


def _fmt_load(load: tuple[float, ...]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def _foreign_qemu_count() -> int:
    own = set(descendants(os.getpid()))
    count = 0
    for pid in _all_pids():
        argv = cmdline(pid)
        if pid not in own and argv and Path(argv[0]).name.startswith("qemu-system"):
            count += 1
    return count


# ---- processes ------------------------------------------------------------------------


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        children.setdefault(_ppid(pid), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cmdline(pid: int) -> list[str]:
    """A process's argv ([] if gone)."""
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (from ``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def guest_ram_resident_kib(qemu_pid: int, guest_mib: int) -> int:
    """Resident KiB of QEMU's guest-RAM mapping (the one mapping of exactly the guest's size)."""
    size_kib = guest_mib * 1024
    resident, current = 0, False
    with open(f"/proc/{qemu_pid}/smaps") as fh:
        for line in fh:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                current = (end - start) // 1024 == size_kib
            elif current and line.startswith("Rss:"):
                resident += int(line.split()[1])
    return resident


def popen_owned(argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """Start a process that is killed if this benchmark dies (PR_SET_PDEATHSIG).

    Call it from the main thread: the kernel sends the signal when the *thread* that
    forked the child exits, not only when the whole process does."""
    return subprocess.Popen(list(argv), preexec_fn=die_with_parent, **kwargs)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (only ever processes this benchmark started)."""
    for p in reversed(descendants(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


# ---- the private SecVF environment ------------------------------------------------------


@contextlib.contextmanager
def private_secvf() -> Iterator[Path]:
    """Point SecVF at a fresh ``SECVF_HOME``/``SECVF_RUNTIME_DIR`` under ``/tmp`` (short, so
    Unix socket paths stay below 108 bytes) and ``SECVF_RAM_DIR`` under ``/dev/shm``; on
    exit delete every VM in it, kill anything left running below this process, and remove
    the directories. SIGTERM/SIGHUP end the
    benchmark through the same cleanup."""
    root = Path(tempfile.mkdtemp(prefix="svb-", dir="/tmp"))
    ram = Path(tempfile.mkdtemp(prefix="svb-ram-", dir="/dev/shm"))  # guests' RAM files
    saved = {k: os.environ.get(k) for k in ("SECVF_HOME", "SECVF_RUNTIME_DIR", "SECVF_RAM_DIR")}
    os.environ["SECVF_HOME"] = str(root / "h")
    os.environ["SECVF_RUNTIME_DIR"] = str(root / "r")
    os.environ["SECVF_RAM_DIR"] = str(ram)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    try:
        yield root
    finally:
        _delete_all_vms()
        for pid in descendants(os.getpid())[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ram, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _delete_all_vms() -> None:
    from secvf import api

    for item in api.list_vms():
        supervisor = _supervisor_pid(item.bundle.name)
        try:
            api.delete_vm(item.bundle.name, force=True)
        except Exception as exc:  # noqa: BLE001 - cleanup must go on
            log(f"cleanup: could not delete VM {item.bundle.name}: {exc}")
            if supervisor:
                kill_tree(supervisor)


def _supervisor_pid(name: str) -> int | None:
    from secvf.runtime import control

    with contextlib.suppress(Exception):
        pid = control.vm_status(name).get("pid")
        return pid if isinstance(pid, int) else None
    return None


def secvf(*args: str, timeout: float = 300, input_bytes: bytes | None = None) -> tuple[float, str]:
    """Run ``secvf ARGS`` (the CLI); return (wall seconds, stdout). Raises on failure."""
    elapsed, stdout, _ = secvf_full(*args, timeout=timeout, input_bytes=input_bytes)
    return elapsed, stdout


def secvf_full(
    *args: str, timeout: float = 300, input_bytes: bytes | None = None,
    env: dict[str, str] | None = None,
) -> tuple[float, str, str]:
    """Like :func:`secvf`, also returning stderr (where the CLI's notes go); ``env`` is
    added to this process's environment."""
    begin = time.monotonic()
    proc = subprocess.run(
        [*SECVF, *args],
        capture_output=True,
        timeout=timeout,
        input=input_bytes,
        preexec_fn=die_with_parent,
        env={**os.environ, **env} if env else None,
    )
    elapsed = time.monotonic() - begin
    if proc.returncode != 0:
        raise RuntimeError(
            f"secvf {' '.join(args)} exited {proc.returncode}:\n"
            f"{proc.stderr.decode(errors='replace')[-2000:]}"
        )
    return elapsed, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def start_events(name: str) -> list[dict]:
    """The ``vm_started`` events of VM ``name`` in the private home's security log, oldest
    first; ``restored_from`` is set on a start that restored saved state (a template or a
    snapshot) and None on a cold boot."""
    from secvf.store import events

    return [e for e in events.read_events() if e.get("event") == "vm_started"
            and e.get("vm") == name]  # fmt: skip


def allocated_kib(path: Path) -> int:
    """KiB a (sparse) file occupies, e.g. a guest's RAM file on tmpfs (0 if gone)."""
    try:
        return path.stat().st_blocks // 2
    except OSError:
        return 0


def vm_processes(name: str) -> dict[str, list[int]]:
    """A running SecVF VM's processes by role: supervisor, qemu, vsock, virtiofsd."""
    from secvf.runtime import control

    status = control.vm_status(name)
    supervisor = status["pid"]
    roles: dict[str, list[int]] = {
        "supervisor": [supervisor],
        "qemu": [],
        "vsock": [],
        "virtiofsd": [],
    }
    for pid in descendants(supervisor)[1:]:
        argv = cmdline(pid)
        text = " ".join(argv)
        if pid == status["qemu_pid"]:
            roles["qemu"].append(pid)
        elif "secvf.vsock" in text:
            roles["vsock"].append(pid)
        elif "virtiofsd" in text:
            roles["virtiofsd"].append(pid)
    return roles


# ---- plain-QEMU baseline VMs ----------------------------------------------------------


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PlainVM:
    """A baseline guest: plain QEMU with our own command line, a qcow2 overlay over a
    read-only disk, SecVF's kernel + initrd, user networking with ``hostfwd`` ports and
    optionally a QEMU guest agent port. Serial output is read through a pipe and every
    line's arrival time is recorded, so boot milestones are timed from QEMU's start."""

    def __init__(
        self,
        workdir: Path,
        kernel: Path,
        initrd: Path,
        rootfs: Path,
        *,
        append: str,
        forwards: Sequence[int] = (),
        qga: bool = False,
        memory_mib: int = GUEST_MEMORY_MIB,
        name: str = "baseline",
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
        self.memory_mib = memory_mib
        self.ports = {guest: free_port() for guest in forwards}
        self.qga_socket = self.dir / "qga.sock" if qga else None
        overlay = self.dir / "disk.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(rootfs),
                str(overlay),
            ],
            check=True,
        )
        fwd = "".join(
            f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.ports.items()
        )
        self.argv = [
            QEMU,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            ACCEL,
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            str(memory_mib),
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            append,
            "-drive",
            f"file={overlay},if=none,id=d0,format=qcow2",
            "-device",
            "virtio-blk-pci,drive=d0",
            "-netdev",
            f"user,id=n0{fwd}",
            "-device",
            f"virtio-net-pci,netdev=n0,mac={NAT_NIC_MAC}",
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-pci,rng=rng0",
            "-serial",
            "stdio",
        ]
        if self.qga_socket:
            self.argv += [
                "-chardev",
                f"socket,id=qga0,path={self.qga_socket},server=on,wait=off",
                "-device",
                "virtio-serial-pci",
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]
        self.lines: list[tuple[float, str]] = []
        self._seen = threading.Condition()
        self.started = time.monotonic()
        self.proc = popen_owned(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        threading.Thread(target=self._read_serial, daemon=True).start()

    def _read_serial(self) -> None:
        assert self.proc.stdout is not None
        with (self.dir / "serial.log").open("wb") as logf:
            for raw in self.proc.stdout:
                logf.write(raw)
                with self._seen:
                    self.lines.append((time.monotonic(), raw.decode(errors="replace")))
                    self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_line(self, text: str, timeout: float) -> float:
        """Seconds from QEMU's start until a serial line containing ``text`` arrived."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for when, line in self.lines:
                    if text in line:
                        return when - self.started
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "".join(line for _, line in self.lines[-15:])
                    raise TimeoutError(
                        f"no '{text}' on the serial console after {timeout} s "
                        f"(qemu exit {self.proc.poll()}); last lines:\n{tail}"
                    )
                self._seen.wait(min(left, 1.0))

    def stop(self) -> None:
        """Kill QEMU (baselines are throwaway) and remove the overlay."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PlainVM:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


# ---- SSH ----------------------------------------------------------------------------------


class SSH:
    """OpenSSH client to a baseline guest's root account with a per-run key."""

    def __init__(self, keydir: Path, port: int) -> None:
        self.key = keydir / "id_ed25519"
        self.port = port
        self.control = keydir / f"cm-{port}"
        self.common = [
            "-i",
            str(self.key),
            "-p",
            str(port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=60",
            "-o",
            "ServerAliveInterval=15",
        ]

    @staticmethod
    def make_key(keydir: Path) -> str:
        """Generate the run's key pair in ``keydir``; return the public key line."""
        key = keydir / "id_ed25519"
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        return (keydir / "id_ed25519.pub").read_text().strip()

    def argv(self, *command: str, master: bool = False) -> list[str]:
        """An ``ssh`` command line; through the ControlMaster socket unless ``master``."""
        mux = (
            ["-o", "ControlMaster=yes", "-o", "ControlPersist=yes"]
            if master
            else ["-o", "ControlMaster=no"]
        )
        return [
            "ssh",
            *self.common,
            *mux,
            "-o",
            f"ControlPath={self.control}",
            "root@127.0.0.1",
            *command,
        ]

    def run(self, *command: str, timeout: float = 120, stdout=subprocess.DEVNULL) -> int:
        """Run ``command`` in the guest; return ssh's exit code."""
        return subprocess.run(
            self.argv(*command),
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            preexec_fn=die_with_parent,
        ).returncode

    def wait_true(self, timeout: float, started: float) -> float:
        """Retry a fresh (non-multiplexed) ``ssh true`` until it works; return seconds since
        ``started`` (monotonic)."""
        deadline = time.monotonic() + timeout
        direct = ["ssh", *self.common, "root@127.0.0.1", "true"]
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if (
                    subprocess.run(
                        direct,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        timeout=60,
                        preexec_fn=die_with_parent,
                    ).returncode
                    == 0
                ):
                    return time.monotonic() - started
            time.sleep(0.5)
        raise TimeoutError(f"ssh to port {self.port} did not work within {timeout} s")

    def start_master(self) -> None:
        """Open the ControlMaster connection (it stays in the background)."""
        subprocess.run(
            [*self.argv("-N", "-f", master=True)[:-1]],
            check=True,
            timeout=120,
            preexec_fn=die_with_parent,
            stdout=subprocess.DEVNULL,
        )

    def stop_master(self) -> None:
        """Close the ControlMaster connection."""
        subprocess.run(
            [
                "ssh",
                *self.common,
                "-o",
                f"ControlPath={self.control}",
                "-O",
                "exit",
                "root@127.0.0.1",
            ],
            capture_output=True,
            timeout=30,
        )


def wait_ssh_banner(port: int, timeout: float, started: float) -> float:
    """Seconds since ``started`` until the forwarded port sends an ``SSH-`` banner. Each
    attempt waits patiently (sshd re-execs per connection, which takes seconds on TCG)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 5) as s:
            s.settimeout(15)
            if s.recv(64).startswith(b"SSH-"):
                return time.monotonic() - started
        time.sleep(0.2)
    raise TimeoutError(f"no SSH banner on port {port} within {timeout} s")


# ---- QEMU guest agent -------------------------------------------------------------------


class GuestAgent:
    """A QEMU guest agent client (JSON commands on the virtio-serial chardev socket)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.reader: BinaryIO | None = None
        self._sync_id = int(time.time()) & 0xFFFFFF

    def wait_ready(self, timeout: float, started: float) -> float:
        """Connect and ``guest-sync`` until the agent answers; return seconds since ``started``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                self._connect()
                self._sync_id += 1
                if self.command("guest-sync", {"id": self._sync_id}, timeout=2) == self._sync_id:
                    return time.monotonic() - started
            self.close()
            time.sleep(0.2)
        raise TimeoutError(f"the QEMU guest agent did not answer within {timeout} s")

    def _connect(self) -> None:
        self.close()
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.path))
        self.reader = self.sock.makefile("rb")

    def command(self, name: str, arguments: dict | None = None, timeout: float = 60) -> object:
        """Send one command and return its ``return`` value."""
        assert self.sock is not None and self.reader is not None
        request = {"execute": name} | ({"arguments": arguments} if arguments else {})
        self.sock.settimeout(timeout)
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            line = self.reader.readline()
            if not line:
                raise OSError("guest agent connection closed")
            reply = json.loads(line)
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def exec(self, path: str, args: Sequence[str] = (), poll_s: float = 0.002) -> dict:
        """``guest-exec`` + ``guest-exec-status`` polling until it exited; the final status
        with ``out-data`` decoded into ``stdout`` (bytes)."""
        started = self.command(
            "guest-exec", {"path": path, "arg": list(args), "capture-output": True}
        )
        pid = started["pid"]  # type: ignore[index]
        while True:
            status = self.command("guest-exec-status", {"pid": pid})
            if status["exited"]:  # type: ignore[index]
                break
            time.sleep(poll_s)
        assert isinstance(status, dict)
        status["stdout"] = base64.b64decode(status.get("out-data", ""))
        return status

    def close(self) -> None:
        """Close the connection."""
        if self.sock is not None:
            self.sock.close()
        self.sock = self.reader = None


def timed(func: Callable[[], object]) -> float:
    """Seconds ``func()`` took."""
    begin = time.perf_counter()
    func()
    return time.perf_counter() - begin
