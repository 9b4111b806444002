"""vsock stress: guest reboots and device unplug/replug, each followed by a new guest listener
and an echo of a few MiB through the hybrid socket; counts rx stalls (issue 17).

It drives a plain QEMU and the vsock backend itself (never SecVF's supervisor or machine
builders): q35, TCG, 1 vCPU, guest RAM from a shared ``memory-backend-file`` on /dev/shm (so
the ring can be read from the host when a round fails), the ``sandbox`` image's kernel,
initrd and root disk with the exec agent swapped for ``vsock_stress_guest.py`` (started by
the guest init at every boot), two ``pcie-root-port`` devices, and ``vhost-user-vsock-pci``
on one of them, served by ``python -m secvf.vsock`` with ``--trace-file``.

Round kinds:

* ``echo``   — no reset: the baseline, measured in the same run on the same VM;
* ``reboot`` — ``echo b > /proc/sysrq-trigger`` in the guest (QMP ``system_reset`` if the
  channel is dead), until the guest answers with a new boot id;
* ``replug`` — QMP ``device_del`` (the guest ejects it), ``chardev-remove`` (the backend
  exits), a new backend, ``chardev-add`` and ``device_add`` on the other root port.

Then every round asks the guest for a new listener on a new port and echoes ``--mib`` MiB of
random bytes through it (sha256 compared). A round *stalls* when the echo makes no progress
for :data:`STALL_S` seconds, the channel does not come back, or the guest console prints a
dead-queue line (``is not a head``, ``broken``...). A stalled round's evidence (trace, serial
log, backend log, the rx ring read from guest memory) is kept under ``--keep``; the VM is
then recovered with ``system_reset`` and the run goes on.

    .venv/bin/python bench/vsock_stress.py [--rounds 500] [--baseline 20] [--hogs 2]
        [--kinds reboot,replug] [--mib 4] [--keep DIR] [--image DIR] [--quiet-resets]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import baseline_image
import benchlib as bl
from rich.table import Table

from secvf.image import ImageInfo, build_image
from secvf.image.store import load_image
from secvf.vsock.trace import TraceCheck, check_trace_files

GUEST_SCRIPT = Path(__file__).with_name("vsock_stress_guest.py")
CONTROL_PORT = 5100
FIRST_ECHO_PORT = 6000
#: Ports of the streams kept busy across a reset (``traffic_in_flight``).
FIRST_INFLIGHT_PORT = 7000
GUEST_CID = 3
MEMORY_MIB = 1024
#: An echo that moves no byte for this long is a stall.
STALL_S = 30.0
#: How long a reset may take until the guest's control port answers again.
RESET_TIMEOUT_S = 180.0
#: Guest console lines that mean a virtqueue died (vring BAD_RING and friends).
DEAD_QUEUE = re.compile(r"is not a head|virtio\d+: (rx|tx|event):")
ROOT_PORTS = ("rp0", "rp1")


# ---- QMP ------------------------------------------------------------------------------------


class QMP:
    """A minimal QMP client (JSON lines over QEMU's Unix socket); keeps events it reads."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("rb")
        self.events: list[dict] = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments: object) -> object:
        """Run ``command``; its ``return`` value. Raises RuntimeError on a QMP error."""
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, match: Callable[[dict], bool], timeout: float) -> dict:
        """The first (kept or new) event ``name`` for which ``match(data)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name and match(event.get("data", {})):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no QMP event {name} within {timeout} s")
            self.sock.settimeout(left)
            try:
                reply = self._read()
            except TimeoutError:
                continue
            if "event" in reply:
                self.events.append(reply)

    def close(self) -> None:
        """Close the connection."""
        self.reader.close()
        self.sock.close()


# ---- the VM ---------------------------------------------------------------------------------


@dataclass
class Backend:
    """One ``python -m secvf.vsock`` process (it serves exactly one QEMU connection)."""

    proc: subprocess.Popen
    vhost_user_socket: Path
    trace: Path
    log: Path


@dataclass
class SerialLine:
    """A guest console line and when it arrived (monotonic)."""

    at: float
    text: str


class StressVM:
    """Plain QEMU + vsock backend for the stress rounds (see the module docstring)."""

    def __init__(self, workdir: Path, image: ImageInfo, disk: Path, *, trace: bool = True) -> None:
        self.dir = workdir
        self.image = image
        self.trace_enabled = trace
        self.uds = workdir / "vsock.sock"
        self.ram = Path(tempfile.mkdtemp(prefix="svstress-", dir="/dev/shm")) / "ram"
        self.overlay = workdir / "disk.qcow2"
        self.serial: list[SerialLine] = []
        self._serial_lock = threading.Lock()
        self.backend_count = 0
        self.device_count = 0
        self.port_index = 0
        self.backend: Backend | None = None
        self.old_backends: list[Backend] = []
        self.trace_check = TraceCheck()  # over the traces of every backend so far
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(disk),
             str(self.overlay)],
            check=True,
        )  # fmt: skip
        self.backend = self._start_backend()
        self.qmp_socket = workdir / "qmp.sock"
        append = f"{image.cmdline} secvf_hostname=stress"
        self.argv = [
            bl.QEMU, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "q35,memory-backend=mem0", "-accel", bl.ACCEL, "-cpu", "max",
            "-smp", "1", "-m", f"{MEMORY_MIB}M",
            "-object", f"memory-backend-file,id=mem0,size={MEMORY_MIB}M,"
                       f"mem-path={self.ram},share=on",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            "-drive", f"file={self.overlay},if=none,id=d0,format=qcow2",
            "-device", "virtio-blk-pci,drive=d0",
            "-device", "pcie-root-port,id=rp0,chassis=1,slot=1",
            "-device", "pcie-root-port,id=rp1,chassis=2,slot=2",
            "-chardev", f"socket,id={self._chardev_id()},path={self.backend.vhost_user_socket}",
            "-device", f"vhost-user-vsock-pci,chardev={self._chardev_id()},"
                       f"id={self._device_id()},bus={ROOT_PORTS[0]}",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-serial", "stdio",
        ]  # fmt: skip
        self.qemu_log = (workdir / "qemu.log").open("wb")
        self.proc = bl.popen_owned(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.qemu_log
        )
        threading.Thread(target=self._read_serial, daemon=True).start()
        self.qmp = QMP(self.qmp_socket)

    # -- processes ----------------------------------------------------------------------------

    def _chardev_id(self) -> str:
        return f"vu{self.device_count}"

    def _device_id(self) -> str:
        return f"vsock{self.device_count}"

    def _start_backend(self) -> Backend:
        self.backend_count += 1
        n = self.backend_count
        vu = self.dir / f"vu{n}.sock"
        trace = self.dir / f"trace-{n}.log"
        log = self.dir / f"backend-{n}.log"
        ready_r, ready_w = os.pipe()
        argv = [
            sys.executable, "-m", "secvf.vsock", "--vhost-user-socket", str(vu),
            "--uds-path", str(self.uds), "--guest-cid", str(GUEST_CID),
            "--ready-fd", str(ready_w),
        ]  # fmt: skip
        if self.trace_enabled:
            argv += ["--trace-file", str(trace)]
        with log.open("wb") as logf:
            proc = bl.popen_owned(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(ready_w,)
            )
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            if ready.readline() != b"READY\n":
                raise RuntimeError(f"vsock backend did not start: {log.read_text()[-2000:]}")
        return Backend(proc, vu, trace, log)

    def _read_serial(self) -> None:
        assert self.proc.stdout is not None
        with (self.dir / "serial.log").open("wb") as logf:
            for raw in self.proc.stdout:
                logf.write(raw)
                logf.flush()
                with self._serial_lock:
                    self.serial.append(SerialLine(time.monotonic(), raw.decode(errors="replace")))

    def dead_queue_lines(self, since: float) -> list[str]:
        """Console lines since ``since`` that say a virtqueue died."""
        with self._serial_lock:
            return [
                s.text.strip() for s in self.serial if s.at >= since and DEAD_QUEUE.search(s.text)
            ]

    def close(self) -> None:
        """Kill QEMU and the backends, remove the RAM file."""
        with contextlib.suppress(Exception):
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.qemu_log.close()
        for backend in [*self.old_backends, *([self.backend] if self.backend else [])]:
            if backend.proc.poll() is None:
                backend.proc.kill()
            backend.proc.wait()
        shutil.rmtree(self.ram.parent, ignore_errors=True)

    # -- the hybrid socket and the guest's control port ---------------------------------------

    def dial(self, port: int, timeout: float = 10) -> socket.socket:
        """A raw stream to guest ``port`` (``CONNECT``/``OK``); raises OSError if refused."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.uds))
            sock.sendall(f"CONNECT {port}\n".encode())
            line = _read_line(sock)
        except BaseException:
            sock.close()
            raise
        if not line.startswith(b"OK "):
            sock.close()
            raise ConnectionRefusedError(f"vsock port {port}: {line!r}")
        return sock

    def command(self, line: str, timeout: float = 10) -> str:
        """One command to the guest's control port; its reply line."""
        with self.dial(CONTROL_PORT, timeout) as sock:
            sock.sendall(line.encode() + b"\n")
            return _read_line(sock).decode().strip()

    def wait_control(self, timeout: float, not_boot: str | None = None) -> str:
        """Until ``PING`` answers (with a boot id other than ``not_boot``); the boot id."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                reply = self.command("PING", timeout=5)
                if reply.startswith("PONG ") and reply[5:] != not_boot:
                    return reply[5:]
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"the guest's control port did not answer within {timeout} s")
            time.sleep(0.2)

    # -- resets -----------------------------------------------------------------------------

    def reboot(self, boot: str) -> str:
        """Reboot the guest (sysrq b; QMP system_reset if the channel is dead); new boot id."""
        try:
            reply = self.command("REBOOT")
            if reply != "REBOOTING":
                raise OSError(reply)
        except OSError:
            self.qmp.execute("system_reset")
        return self.wait_control(RESET_TIMEOUT_S, not_boot=boot)

    def replug(self) -> None:
        """``device_del`` the vsock device, then a new backend and device on the other port."""
        old_device, old_chardev = self._device_id(), self._chardev_id()
        self.qmp.execute("device_del", id=old_device)
        self.qmp.wait_event(
            "DEVICE_DELETED", lambda d: d.get("device") == old_device, RESET_TIMEOUT_S
        )
        self.qmp.execute("chardev-remove", id=old_chardev)
        assert self.backend is not None
        old = self.backend
        try:
            code = old.proc.wait(30)
        except subprocess.TimeoutExpired:
            old.proc.kill()
            code = old.proc.wait()
        if code != 0:
            raise RuntimeError(f"backend exited {code} after chardev-remove")
        self.old_backends.append(old)
        self.backend = self._start_backend()
        self.device_count += 1
        self.port_index = 1 - self.port_index
        self.qmp.execute(
            "chardev-add",
            id=self._chardev_id(),
            backend={
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": str(self.backend.vhost_user_socket)}},
                    "server": False,
                },
            },
        )
        self.qmp.execute(
            "device_add",
            driver="vhost-user-vsock-pci",
            id=self._device_id(),
            chardev=self._chardev_id(),
            bus=ROOT_PORTS[self.port_index],
        )

    def forget_old_backends(self, keep: Path | None) -> None:
        """Check the traces of backends that exited, then delete their files (a trace that
        breaks a lifecycle rule is first copied to ``keep``)."""
        for backend in self.old_backends:
            self._check_trace(backend, keep)
            for path in (backend.trace, backend.log, Path(f"{backend.trace}.1")):
                path.unlink(missing_ok=True)
        self.old_backends.clear()

    def check_current_trace(self, keep: Path | None) -> None:
        """At the end of a run: check the trace of the backend still serving."""
        if self.backend is not None:
            self._check_trace(self.backend, keep)

    def _check_trace(self, backend: Backend, keep: Path | None) -> None:
        if not self.trace_enabled:
            return
        found = check_trace_files([Path(f"{backend.trace}.1"), backend.trace])
        self.trace_check.merge(found)
        if found.violations:
            bl.log(f"trace {backend.trace.name}: {len(found.violations)} violations, first: "
                   f"{found.violations[0]}")
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                for path in (backend.trace, Path(f"{backend.trace}.1"), backend.log):
                    if path.exists():
                        shutil.copy2(path, keep / path.name)

    # -- evidence ---------------------------------------------------------------------------

    def rx_ring_dump(self) -> dict[str, object]:
        """The rx ring of the newest rx queue in the trace, read from guest RAM now."""
        assert self.backend is not None
        ring = _last_rx_ring(self.backend.trace)
        if ring is None:
            return {"error": "no rx ring in the trace"}
        size, desc, avail, used = ring
        with self.ram.open("rb") as ram:  # q35 with 1 GiB: GPA == offset in the RAM file
            ram.seek(avail)
            avail_raw = ram.read(4 + 2 * size)
            ram.seek(used)
            used_raw = ram.read(4 + 8 * size)
        a_flags, a_idx = struct.unpack_from("<HH", avail_raw)
        u_flags, u_idx = struct.unpack_from("<HH", used_raw)
        return {
            "size": size,
            "desc": hex(desc),
            "avail": hex(avail),
            "used": hex(used),
            "avail_flags": a_flags,
            "avail_idx": a_idx,
            "avail_ring": list(struct.unpack_from(f"<{size}H", avail_raw, 4)),
            "used_flags": u_flags,
            "used_idx": u_idx,
            "used_ring": [list(struct.unpack_from("<II", used_raw, 4 + 8 * i))
                          for i in range(size)],
        }

    def keep_evidence(self, dest: Path, label: str, detail: dict[str, object]) -> Path:
        """Copy the trace, logs and a ring dump of a failed round to ``dest/label``."""
        out = dest / label
        out.mkdir(parents=True, exist_ok=True)
        assert self.backend is not None
        with contextlib.suppress(Exception):
            detail = detail | {"rx_ring": self.rx_ring_dump()}
        (out / "round.json").write_text(json.dumps(detail, indent=1))
        for path in (self.backend.trace, Path(f"{self.backend.trace}.1"), self.backend.log,
                     self.dir / "serial.log", self.dir / "qemu.log"):  # fmt: skip
            if path.exists():
                shutil.copy2(path, out / path.name)
        return out


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"closed after {line!r}")
        line += byte
    return line


def _last_rx_ring(trace: Path) -> tuple[int, int, int, int] | None:
    """(size, desc, avail, used GPAs) of the last rx ring the trace saw built."""
    found, rx_gens = None, set()
    for path in (Path(f"{trace}.1"), trace):
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) < 2:
                continue
            fields = dict(w.split("=", 1) for w in words[2:] if "=" in w)
            if words[1] == "start" and fields.get("vq") == "0":
                rx_gens.add(fields["gen"])
            elif words[1] == "ring" and fields.get("gen") in rx_gens:
                found = (int(fields["size"]), int(fields["desc"], 16), int(fields["avail"], 16),
                         int(fields["used"], 16))  # fmt: skip
    return found


# ---- rounds ---------------------------------------------------------------------------------


@dataclass
class RoundResult:
    """What one round measured."""

    number: int
    kind: str
    ok: bool
    total_s: float  # the whole round
    reset_s: float = 0.0  # round start (busy stream set up included) until the channel is back
    echo_s: float = 0.0  # the echo after the reset
    load1: float = 0.0
    failure: str = ""
    console: list[str] = field(default_factory=list)


def echo(vm: StressVM, port: int, payload: bytes) -> float:
    """Echo ``payload`` through guest ``port``; seconds. Raises TimeoutError on a stall."""
    sock = vm.dial(port, timeout=STALL_S)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            view = memoryview(payload)
            for offset in range(0, len(payload), 64 * 1024):
                sock.sendall(view[offset : offset + 64 * 1024])
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    begin = time.perf_counter()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    digest, got = hashlib.sha256(), 0
    try:
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError as exc:
                raise TimeoutError(
                    f"echo stalled: {got} of {len(payload)} bytes back, none for {STALL_S} s"
                ) from exc
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
    finally:
        sock.close()
        sender.join(5)
    elapsed = time.perf_counter() - begin
    if errors:
        raise errors[0]
    if got != len(payload) or digest.digest() != hashlib.sha256(payload).digest():
        raise RuntimeError(f"echo came back wrong: {got} of {len(payload)} bytes")
    return elapsed


@contextlib.contextmanager
def traffic_in_flight(vm: StressVM, port: int) -> Iterator[None]:
    """An echo stream busy in both directions while the body resets the device, so the
    reset meets a ring the backend is filling. The stream dies with the reset."""
    reply = vm.command(f"LISTEN {port}")
    if reply != f"LISTENING {port}":
        raise RuntimeError(f"LISTEN {port}: {reply!r}")
    sock = vm.dial(port, timeout=5)
    stop = threading.Event()
    echoed = threading.Event()
    block = os.urandom(64 * 1024)

    def send() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(block)

    def receive() -> None:
        got = 0
        with contextlib.suppress(OSError):
            while not stop.is_set() and (chunk := sock.recv(1 << 20)):
                got += len(chunk)
                if got >= 256 * 1024:
                    echoed.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (send, receive)]
    for thread in threads:
        thread.start()
    echoed.wait(10)
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        for thread in threads:
            thread.join(10)


def one_round(vm: StressVM, number: int, kind: str, boot: str, payload: bytes,
              inflight: bool = True) -> tuple[RoundResult, str]:
    """Reset (``kind``, with an echo stream busy across it if ``inflight``), a new listener,
    one echo. Returns the result and the boot id."""
    begin = time.monotonic()
    result = RoundResult(number, kind, ok=False, total_s=0.0, load1=os.getloadavg()[0])
    try:
        busy = (
            traffic_in_flight(vm, FIRST_INFLIGHT_PORT + number % 1000)
            if inflight and kind != "echo"
            else contextlib.nullcontext()
        )
        with busy:
            if kind == "reboot":
                boot = vm.reboot(boot)
            elif kind == "replug":
                vm.replug()
        if kind != "echo":
            vm.wait_control(RESET_TIMEOUT_S)
        result.reset_s = time.monotonic() - begin
        port = FIRST_ECHO_PORT + number % 1000
        reply = vm.command(f"LISTEN {port}")
        if reply != f"LISTENING {port}":
            raise RuntimeError(f"LISTEN {port}: {reply!r}")
        result.echo_s = echo(vm, port, payload)
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - a failed round is a result
        result.failure = f"{type(exc).__name__}: {exc}"
    time.sleep(0.05)  # let a console line about the queue arrive
    result.console = vm.dead_queue_lines(begin)
    if result.console:
        result.ok = False
        result.failure = result.failure or "dead-queue line on the console"
    result.total_s = time.monotonic() - begin
    return result, boot


def recover(vm: StressVM, boot: str) -> str:
    """After a stall: ``system_reset`` (a new boot) until the control port answers."""
    vm.qmp.execute("system_reset")
    return vm.wait_control(RESET_TIMEOUT_S, not_boot=boot)


def schedule(rounds: int, kinds: Sequence[str], baseline: int) -> list[str]:
    """``baseline`` echo-only rounds, then ``rounds`` rounds cycling through ``kinds``."""
    return ["echo"] * baseline + [kinds[i % len(kinds)] for i in range(rounds)]


def run_rounds(
    vm: StressVM,
    kinds: Sequence[str],
    payload: bytes,
    keep: Path | None,
    progress: Callable[[str], None] = bl.log,
    *,
    inflight: bool = True,
) -> list[RoundResult]:
    """Run the rounds in ``kinds`` (in order) on a booted ``vm``; one result each."""
    boot = vm.wait_control(RESET_TIMEOUT_S)
    results = []
    for number, kind in enumerate(kinds, start=1):
        result, boot = one_round(vm, number, kind, boot, payload, inflight)
        results.append(result)
        if result.ok:
            vm.forget_old_backends(keep)
        else:
            progress(f"round {number} ({kind}) STALLED: {result.failure} {result.console}")
            if keep is not None:
                where = vm.keep_evidence(keep, f"round-{number:04d}-{kind}", result.__dict__)
                progress(f"evidence kept in {where}")
            boot = recover(vm, boot)
            vm.forget_old_backends(keep)
        if number % 10 == 0 or not result.ok:
            stalls = sum(not r.ok for r in results)
            progress(f"round {number}/{len(kinds)} {kind}: {result.total_s:.1f} s, "
                     f"{stalls} stalls so far, load {os.getloadavg()[0]:.2f}")
    return results


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[list[int]]:
    """``count`` busy-looping processes (killed by pid at the end)."""
    procs = [
        bl.popen_owned([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]
    try:
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def stress_disk(image: ImageInfo) -> Path:
    """The sandbox disk with the agent swapped for the stress guest script (cached)."""
    return baseline_image.tcp_server_disk(image, GUEST_SCRIPT, progress=bl.log).rootfs


# ---- the report -----------------------------------------------------------------------------


def summary_rows(results: Sequence[RoundResult]) -> list[list[str]]:
    """One row per round kind: rounds, stalls, round time, reset time, echo time, load."""
    rows = []
    for kind in dict.fromkeys(r.kind for r in results):
        mine = [r for r in results if r.kind == kind]
        ok = [r for r in mine if r.ok] or mine
        rows.append([
            kind,
            str(len(mine)),
            str(sum(not r.ok for r in mine)),
            _dist([r.total_s for r in ok]),
            _dist([r.reset_s for r in ok]) if kind != "echo" else "-",
            _dist([r.echo_s for r in ok]),
            f"{statistics.median(r.load1 for r in mine):.2f} "
            f"({min(r.load1 for r in mine):.2f}–{max(r.load1 for r in mine):.2f})",
        ])  # fmt: skip
    return rows


def _dist(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return (f"{statistics.median(values):.2f} s (p90 {bl.percentile(values, 90):.2f}, "
            f"max {max(values):.2f})")  # fmt: skip


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500, help="reset rounds (default 500)")
    parser.add_argument("--baseline", type=int, default=20,
                        help="echo-only rounds before them (default 20)")
    parser.add_argument("--kinds", default="reboot,replug",
                        help="reset kinds to cycle through (reboot, replug)")
    parser.add_argument("--hogs", type=int, default=2, help="CPU hog processes (default 2)")
    parser.add_argument("--mib", type=int, default=4, help="MiB echoed per round (default 4)")
    parser.add_argument("--keep", type=Path, default=Path("vsock-stress-evidence"),
                        help="where failed rounds' evidence goes")
    parser.add_argument("--no-trace", action="store_true", help="run the backend without a trace")
    parser.add_argument("--image", type=Path,
                        help="a built sandbox image directory to use (default: build_image)")
    parser.add_argument("--quiet-resets", action="store_true",
                        help="no echo stream busy across each reset")
    args = parser.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # end through the cleanup below
        signal.signal(sig, _exit_on_signal)
    kinds = [k for k in args.kinds.split(",") if k]
    if any(k not in ("reboot", "replug", "echo") for k in kinds):
        parser.error(f"unknown kind in {args.kinds}")
    command = " ".join(["bench/vsock_stress.py", *sys.argv[1:]])
    rep = bl.Report("vsock stress: resets, then a new listener and an echo", command)
    load_file_start = Path("/proc/loadavg").read_text().strip()
    image = load_image(args.image) if args.image else build_image("sandbox")
    disk = stress_disk(image)
    payload = os.urandom(args.mib << 20)
    work = Path(tempfile.mkdtemp(prefix="svs-", dir="/tmp"))
    began = time.monotonic()
    try:
        with cpu_hogs(args.hogs):
            vm = StressVM(work, image, disk, trace=not args.no_trace)
            try:
                results = run_rounds(
                    vm, schedule(args.rounds, kinds, args.baseline), payload, args.keep,
                    inflight=not args.quiet_resets,
                )
                vm.check_current_trace(args.keep)
            finally:
                vm.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - began
    rep.facts |= {
        "guest": f"1 vCPU, {MEMORY_MIB} MiB (memory-backend-file on /dev/shm, share=on), "
        f"-cpu max, kernel {image.kernel_version}, sandbox image {image.short_hash} "
        "with the agent swapped for bench/vsock_stress_guest.py",
        "load": f"{args.hogs} CPU hog processes on the host; /proc/loadavg at start "
        f"'{load_file_start}', at end '{Path('/proc/loadavg').read_text().strip()}'",
        "per round": ("reset" if args.quiet_resets else
                      "reset with an echo stream busy both ways across it")
        + f", LISTEN on a new port, echo of {args.mib} MiB (sha256 compared); "
        f"stall = no echo byte for {STALL_S:.0f} s, no channel after {RESET_TIMEOUT_S:.0f} s, "
        "or a dead-queue line on the console",
        "backend trace": "off" if args.no_trace else
        f"on (--trace-file), checked by secvf.vsock.trace.check_trace: "
        f"{vm.trace_check.rings} rings started, {vm.trace_check.stops} stopped, "
        f"{vm.trace_check.used_writes} used-ring writes, "
        f"{len(vm.trace_check.violations)} rule violations",
        "wall time": f"{wall / 60:.1f} min",
    }
    cond = Table(title=f"{rep.title}: conditions", show_header=False)
    for key, value in rep.conditions(os.getloadavg()).items():
        cond.add_row(key, value)
    bl.console.print(cond)
    table = Table(title=rep.title)
    for name in ("round kind", "rounds", "stalls", "round time median (p90, max)",
                 "reset → channel back", "echo", "load avg 1 min median (min–max)"):  # fmt: skip
        table.add_column(name, overflow="fold")
    for row in summary_rows(results):
        table.add_row(*row)
    bl.console.print(table)
    for r in results:
        if not r.ok:
            bl.console.print(f"- round {r.number} ({r.kind}): {r.failure} {r.console}",
                             highlight=False)
    bl.console.print("- 'echo' rounds are the baseline: same VM, same run, no reset before "
                     "the listener and the echo.", highlight=False)


if __name__ == "__main__":
    main()
