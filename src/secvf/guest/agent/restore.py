"""The ``restore`` request: make a guest restored from saved state its own machine.

After a sandbox session is restored from a template (and its vsock and virtio-fs devices
are hot-plugged), the host sends ``restore`` with its time, fresh entropy and the
session's hostname, MAC and shares. :class:`Restorer` checks the whole request first
(:func:`secvf.exec.protocol.check_restore_request`; a bad one changes nothing and is
answered ``restore_failed``), then applies it in this order and answers ``restored``:

1. **clock** - CLOCK_REALTIME set to the host's time plus the time since the request
   arrived (CLOCK_MONOTONIC), under the clock lock the restore watch takes too
   (:mod:`secvf.guest.restore_watch`), so a step the watch made meanwhile is not added;
2. **rng** - the host's bytes into the kernel pool (RNDADDENTROPY, credited) and an
   immediate CRNG reseed (RNDRESEEDCRNG); then the agent's own ``random`` is reseeded
   (everything else it uses reads the kernel: ``os.urandom``, ``secrets``, ``uuid4``);
3. **hostname** - ``/proc/sys/kernel/hostname`` and ``/etc/hosts``, as init writes them;
4. **tmp** - every entry of ``/tmp`` removed (not /tmp itself, nothing below a mount);
5. **mac** - eth0's address set with the ``SIOCSIFHWADDR`` ioctl (virtio-net takes it
   while the link is up; a driver that refuses gets it while down); eth0's IPv6 is
   switched off and on again, so its link-local and SLAAC addresses (made from the MAC)
   are made afresh; if init configured a NIC by DHCP (a ``dhcp`` entry in the kernel
   command line's ``secvf_nics``), eth0's DHCP client (the ``udhcpc -i eth0`` running)
   is restarted with its own command line, because busybox udhcpc keeps the MAC it
   started with for its renewals - in the background, a second later
   (``dhcp_restarted`` says it was begun): eth0 keeps its address meanwhile, so neither
   the reply nor the session's first commands wait for it. Templates have at most one
   NIC, so eth0 is it; the MACs of ``secvf_nics`` are the template's, not the
   session's, so they do not name the interface;
6. **shares** - each virtio-fs tag mounted with ``mount(2)`` as init's ``mount_shares``
   does (``mkdir -p``, virtiofs, ``ro`` or ``rw``), once as many virtio-fs devices are
   bound as the request has shares, retried for up to :data:`SHARE_WAIT_S` while a
   just-hot-plugged device appears.

Every step is a system call or a file write in the agent itself: no helper process is
started (under TCG, a fork + exec of ``ip`` or ``mount`` in a just-restored guest costs
tens of milliseconds each). The log line at the end gives each step's time.

A step that fails is reported in ``errors`` as ``{"item", "message"}`` (items
``clock``, ``rng``, ``hostname``, ``tmp``, ``mac``, ``dhcp``, ``share:TAG``); the
others still run. An agent that cannot apply restores (not root, or serving a Unix
socket on the host for tests, where a restore would change the *host*) answers
``restore_failed`` kind ``unsupported`` and does not list the ``restore`` capability.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from secvf.exec import protocol
from secvf.guest.restore_watch import clock_lock, reseed_kernel_rng

HOSTNAME_FILE = "/proc/sys/kernel/hostname"
HOSTS_FILE = "/etc/hosts"
TMP_DIR = "/tmp"
MOUNTINFO = "/proc/self/mountinfo"
NET_IFACE = "eth0"
#: Toggled to make the kernel drop and remake eth0's MAC-derived IPv6 addresses.
IPV6_SWITCH = "/proc/sys/net/ipv6/conf/{iface}/disable_ipv6"
#: How long the shares of one restore may take to appear (hot-plugged devices).
SHARE_WAIT_S = 10.0
#: Pause between two looks for a share device that is not there yet.
SHARE_RETRY_S = 0.01
#: Where the virtio-fs devices bound to their driver appear (one ``virtioN`` link each).
VIRTIOFS_DRIVER_DIR = "/sys/bus/virtio/drivers/virtiofs"
#: ``mount(2)`` flag for a read-only mount.
MS_RDONLY = 1
#: ioctls on a socket (linux/sockios.h) and the ARP hardware type of Ethernet.
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFHWADDR = 0x8913, 0x8914, 0x8924
ARPHRD_ETHER = 1
IFF_UP = 0x1
#: Bound on the restarted DHCP client getting its lease (it backgrounds itself then).
DHCP_TIMEOUT_S = 15.0
KERNEL_CMDLINE = "/proc/cmdline"
#: The kernel parameter that lists the NICs init configures: ``MAC+MODE[,...]``.
NICS_KERNEL_PARAM = "secvf_nics"
#: The mode of a NIC that init configures by DHCP.
DHCP_MODE = "dhcp"
#: init's DHCP script keeps eth0's address on the next ``deconfig`` if this exists.
DHCP_KEEP_ADDRESS = "/run/secvf/dhcp-keep-address"
#: How long an old DHCP client gets to exit after TERM.
DHCP_STOP_S = 2.0
#: How long the DHCP restart waits first: the MAC has changed and eth0 keeps its
#: address, so it need not compete with a session's first commands for the guest's CPU.
DHCP_RESTART_DELAY_S = 1.0
#: Longest error text per item in the reply.
MAX_ERROR_CHARS = 500

log = logging.getLogger("secvf.agent")

RestoreReply = tuple[str, dict[str, Any]]
"""A reply message: its name (``restored`` or ``restore_failed``) and its fields."""


def hosts_file_text(hostname: str) -> str:
    """``/etc/hosts`` for ``hostname``, exactly as init's ``set_hostname`` writes it."""
    return f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost\n"


def unescape_mountinfo(field_text: str) -> str:
    r"""Undo mountinfo's octal escapes (``\040`` for a space, ...)."""
    out, i = [], 0
    while i < len(field_text):
        chunk = field_text[i : i + 4]
        if chunk[:1] == "\\" and len(chunk) == 4 and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            i += 4
        else:
            out.append(field_text[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, what filesystem, from which source."""

    point: str
    fstype: str
    source: str


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts in a /proc/<pid>/mountinfo text (malformed lines skipped)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and len(tail) >= 2:
            mounts.append(
                Mount(unescape_mountinfo(fields[4]), tail[0], unescape_mountinfo(tail[1]))
            )
    return mounts


def kernel_nics(cmdline: str) -> list[tuple[str, str]]:
    """The (MAC, MODE) entries of ``secvf_nics=MAC+MODE[,...]`` on a kernel command
    line, as written (init checks them; an entry without ``+`` has mode ``""``). The last
    ``secvf_nics`` counts; none at all: no NIC, ``[]``."""
    value = None
    for word in cmdline.split():
        name, sep, rest = word.partition("=")
        if sep and name == NICS_KERNEL_PARAM:
            value = rest
    if not value:
        return []
    nics = []
    for entry in value.split(","):
        mac, _, mode = entry.partition("+")
        if entry:
            nics.append((mac.lower(), mode))
    return nics


def uses_dhcp(cmdline: str) -> bool:
    """Whether init configured a NIC by DHCP: a ``dhcp`` entry in ``secvf_nics``."""
    return any(mode == DHCP_MODE for _, mode in kernel_nics(cmdline))


def dhcp_clients(iface: str, proc: str = "/proc") -> list[tuple[int, list[str]]]:
    """(pid, argv) of every ``udhcpc -i IFACE`` (busybox applet or link) running."""
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "cmdline"), "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue
        words = argv[1:] if argv and os.path.basename(argv[0]) == "busybox" else argv
        if not words or os.path.basename(words[0]) != "udhcpc":
            continue
        if any(a == "-i" and b == iface for a, b in zip(words, words[1:], strict=False)):
            found.append((int(entry), argv))
    return found


def clean_directory(path: str, mounts: Sequence[Mount]) -> tuple[int, list[str]]:
    """Remove every entry of ``path`` (not ``path`` itself); entries with a mount point
    at or below them are left alone. Returns (entries removed, problems)."""
    prefix = path.rstrip("/") + "/"
    busy = {m.point[len(prefix) :].split("/", 1)[0] for m in mounts if m.point.startswith(prefix)}
    removed, problems = 0, []
    try:
        entries = list(os.scandir(path))
    except OSError as exc:
        return 0, [f"cannot list {path}: {exc.strerror}"]
    for entry in entries:
        if entry.name in busy:
            problems.append(f"{entry.path} has a mount point in it: left alone")
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError as exc:
            problems.append(f"cannot remove {entry.path}: {exc.strerror}")
    return removed, problems


class StepFailed(Exception):
    """One step of a restore failed (it becomes an ``errors`` entry)."""


@dataclass
class Outcome:
    """What a restore did; becomes the ``restored`` payload."""

    clock_offset_ns: int | None = None
    reseeded: bool = False
    hostname: str = ""
    mac: str | None = None
    dhcp_restarted: bool = False
    mounted: list[dict[str, Any]] = field(default_factory=list)
    tmp_entries_removed: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    step_ms: dict[str, float] = field(default_factory=dict)  # for the log line only

    def fail(self, item: str, message: str) -> None:
        """Record that ``item`` failed."""
        log.warning("restore: %s: %s", item, message)
        self.errors.append({"item": item, "message": message[:MAX_ERROR_CHARS]})

    def payload(self) -> dict[str, Any]:
        """The ``restored`` fields."""
        return {
            "clock_offset_ns": self.clock_offset_ns,
            "guest_time_ns": time.time_ns(),
            "reseeded": self.reseeded,
            "hostname": self.hostname,
            "mac": self.mac,
            "dhcp_restarted": self.dhcp_restarted,
            "mounted": self.mounted,
            "tmp_entries_removed": self.tmp_entries_removed,
            "errors": self.errors,
        }


class Restorer:
    """Checks and applies ``restore`` requests, one at a time (a lock serialises them)."""

    def __init__(self, *, enabled: bool, why_not: str = "") -> None:
        self.enabled = enabled  # False: every valid request gets restore_failed unsupported
        self.why_not = why_not  # the message sent with "unsupported"
        self._lock = threading.Lock()

    @classmethod
    def for_agent(cls, listening_on_vsock: bool) -> Restorer:
        """The restorer of an agent: enabled only as root in a guest (on vsock)."""
        if not listening_on_vsock:
            return cls(
                enabled=False,
                why_not="this agent serves a Unix socket (a host-side "
                "test): a restore would change the host",
            )
        if os.geteuid() != 0:
            return cls(enabled=False, why_not="the agent does not run as root")
        return cls(enabled=True)

    def handle(self, payload: dict[str, Any], received: float) -> RestoreReply:
        """Check and apply one request; ``received`` is ``time.monotonic()`` at its arrival."""
        try:
            protocol.check_restore_request(payload)
        except protocol.InvalidRestore as exc:
            return "restore_failed", {
                "kind": protocol.RestoreFailureKind.INVALID_REQUEST,
                "field": exc.field,
                "message": str(exc),
            }
        if not self.enabled:
            return "restore_failed", {
                "kind": protocol.RestoreFailureKind.UNSUPPORTED,
                "message": self.why_not,
            }
        with self._lock:
            return "restored", self._apply(payload, received).payload()

    def _apply(self, payload: dict[str, Any], received: float) -> Outcome:
        outcome = Outcome()
        self._step(outcome, "clock", lambda: self._set_clock(outcome, payload, received))
        self._step(outcome, "rng", lambda: self._reseed(outcome, payload["entropy"]))
        if payload["hostname"] is not None:
            self._step(outcome, "hostname", lambda: _set_hostname(payload["hostname"]))
        outcome.hostname = _current_hostname()
        if payload["clean_tmp"]:
            self._step(outcome, "tmp", lambda: self._clean_tmp(outcome))
        if payload["mac"] is not None:
            self._step(outcome, "mac", lambda: self._set_mac(outcome, payload["mac"]))
        outcome.mac = _current_mac(NET_IFACE)
        deadline = time.monotonic() + SHARE_WAIT_S
        shares = payload["shares"]
        for share in shares:
            self._step(
                outcome,
                f"share:{share['tag']}",
                functools.partial(self._mount, outcome, share, len(shares), deadline),
            )
        log.info(
            "restore: clock %+.3f s, hostname %s, mac %s, %d share(s), %d error(s) in "
            "%.0f ms (%s)",
            (outcome.clock_offset_ns or 0) / 1e9,
            outcome.hostname,
            outcome.mac,
            len(outcome.mounted),
            len(outcome.errors),
            (time.monotonic() - received) * 1e3,
            ", ".join(f"{item} {ms:.0f}" for item, ms in outcome.step_ms.items()),
        )
        return outcome

    @staticmethod
    def _step(outcome: Outcome, item: str, action: Callable[[], None]) -> None:
        """Run one step; whatever it raises becomes its ``errors`` entry."""
        began = time.monotonic()
        try:
            action()
        except (StepFailed, OSError, subprocess.SubprocessError) as exc:
            outcome.fail(item, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug fails one item, never the restore
            log.exception("restore: %s failed unexpectedly", item)
            outcome.fail(item, f"unexpected {type(exc).__name__}: {exc}")
        finally:
            outcome.step_ms[item] = (time.monotonic() - began) * 1e3

    @staticmethod
    def _set_clock(outcome: Outcome, payload: dict[str, Any], received: float) -> None:
        with clock_lock():
            host_now = payload["time_ns"] + round((time.monotonic() - received) * 1e9)
            guest_now = time.clock_gettime_ns(time.CLOCK_REALTIME)
            time.clock_settime_ns(time.CLOCK_REALTIME, host_now)
        outcome.clock_offset_ns = host_now - guest_now

    @staticmethod
    def _reseed(outcome: Outcome, entropy_hex: str) -> None:
        reseed_kernel_rng(bytes.fromhex(entropy_hex))
        random.seed()  # from os.urandom, which the kernel has just reseeded
        outcome.reseeded = True

    @staticmethod
    def _clean_tmp(outcome: Outcome) -> None:
        with open(MOUNTINFO) as fh:
            mounts = parse_mountinfo(fh.read())
        removed, problems = clean_directory(TMP_DIR, mounts)
        outcome.tmp_entries_removed = removed
        if problems:
            raise StepFailed("; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))

    def _set_mac(self, outcome: Outcome, mac: str) -> None:
        before = _current_mac(NET_IFACE)
        if before is None:
            raise StepFailed(f"the VM has no {NET_IFACE}")
        if before == mac:
            return
        try:
            set_hardware_address(NET_IFACE, mac)
        except OSError as exc:
            raise StepFailed(f"cannot set {NET_IFACE}'s address to {mac}: "
                             f"{exc.strerror or exc}") from exc
        _renew_ipv6(NET_IFACE)
        self._step(outcome, "dhcp", lambda: _restart_dhcp(outcome, NET_IFACE))

    @staticmethod
    def _mount(outcome: Outcome, share: dict[str, Any], devices: int, deadline: float) -> None:
        tag, path, read_only = share["tag"], share["path"], share["read_only"]
        with open(MOUNTINFO) as fh:
            here = [m for m in parse_mountinfo(fh.read()) if m.point == path]
        if here:
            if here[-1].fstype == "virtiofs" and here[-1].source == tag:
                outcome.mounted.append({"tag": tag, "path": path, "read_only": read_only})
                return  # already there (restore sent twice)
            raise StepFailed(
                f"{path} is already a mount point ({here[-1].fstype} {here[-1].source})"
            )
        os.makedirs(path, 0o755, exist_ok=True)  # init: mkdir -p (umask 022)
        while True:
            # a tag is known to the kernel once its device is bound: look before mounting,
            # since each mount of an unknown tag logs a kernel line on the console
            problem = (mount_virtiofs(tag, path, read_only=read_only)
                       if bound_virtiofs_devices() >= devices else "its device is not there")
            if problem is None:
                break
            if time.monotonic() >= deadline:
                raise StepFailed(f"cannot mount virtio-fs tag {tag!r} on {path} within "
                                 f"{SHARE_WAIT_S:.0f} s: {problem}")
            time.sleep(SHARE_RETRY_S)
        log.info("restore: share %s on %s (%s)", tag, path, "ro" if read_only else "rw")
        outcome.mounted.append({"tag": tag, "path": path, "read_only": read_only})


def set_hardware_address(iface: str, mac: str) -> None:
    """Set ``iface``'s Ethernet address (``SIOCSIFHWADDR``); a driver that refuses while
    the link is up (``EBUSY``) gets it while down, and the link is brought up again.

    Raises:
        OSError: the kernel refused.
    """
    name = iface.encode()
    request = struct.pack("16sH6s8x", name, ARPHRD_ETHER, bytes.fromhex(mac.replace(":", "")))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock, SIOCSIFHWADDR, request)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS,
                                                       struct.pack("16sH22x", name, 0)))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", name, flags & ~IFF_UP))
        try:
            fcntl.ioctl(sock, SIOCSIFHWADDR, request)
        finally:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", name, flags))


def bound_virtiofs_devices(driver_dir: str = VIRTIOFS_DRIVER_DIR) -> int:
    """How many virtio-fs devices the guest kernel has bound (0 before the first)."""
    try:
        return sum(1 for entry in os.listdir(driver_dir) if entry.startswith("virtio"))
    except OSError:
        return 0


def mount_virtiofs(tag: str, path: str, *, read_only: bool) -> str | None:
    """``mount -t virtiofs -o ro|rw TAG PATH`` as one ``mount(2)``; the reason it failed,
    or None."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = ctypes.c_ulong(MS_RDONLY if read_only else 0)
    if libc.mount(tag.encode(), path.encode(), b"virtiofs", flags, None) == 0:
        return None
    code = ctypes.get_errno()
    if code == errno.EINVAL:
        return f"no virtio-fs tag {tag!r} (EINVAL)"
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def _current_hostname() -> str:
    with open(HOSTNAME_FILE) as fh:
        return fh.read().strip()


def _set_hostname(name: str) -> None:
    with open(HOSTNAME_FILE, "w") as fh:
        fh.write(name + "\n")
    tmp = f"{HOSTS_FILE}.secvf-{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            fh.write(hosts_file_text(name))
            os.fchmod(fh.fileno(), 0o644)
        os.replace(tmp, HOSTS_FILE)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _current_mac(iface: str) -> str | None:
    try:
        with open(f"/sys/class/net/{iface}/address") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _renew_ipv6(iface: str) -> None:
    """Make the kernel remake ``iface``'s IPv6 addresses (link-local and SLAAC come from
    the MAC): switch IPv6 off and on again, if it is on."""
    switch = IPV6_SWITCH.format(iface=iface)
    try:
        with open(switch) as fh:
            if fh.read().strip() != "0":
                return
    except OSError:
        return  # no IPv6
    for value in ("1", "0"):
        with open(switch, "w") as fh:
            fh.write(value)


def _restart_dhcp(outcome: Outcome, iface: str) -> None:
    """Restart ``iface``'s DHCP client (its own command line) so it renews with the new
    MAC, in a thread: the reply does not wait for it.

    Whether the guest uses DHCP at all is read from the kernel command line (a ``dhcp``
    entry in init's ``secvf_nics``; no ``secvf_nics``: no NIC, nothing to restart); the
    thread looks for the client itself, the ``udhcpc -i IFACE`` that runs. The address
    stays meanwhile (init's DHCP script keeps it on the new client's first ``deconfig``
    when :data:`DHCP_KEEP_ADDRESS` exists), so the guest keeps its network, and the
    client backgrounds itself once it has the lease.
    """
    with open(KERNEL_CMDLINE) as fh:
        if not uses_dhcp(fh.read()):
            return  # no NIC configured by DHCP on this VM
    threading.Thread(target=_replace_dhcp_client, args=(iface,), name="dhcp",
                     daemon=True).start()
    outcome.dhcp_restarted = True


def _replace_dhcp_client(iface: str) -> None:
    """After :data:`DHCP_RESTART_DELAY_S`, stop ``iface``'s running DHCP clients, start
    the first one's command line again, and wait for its foreground part (it exits once
    it has a lease)."""
    time.sleep(DHCP_RESTART_DELAY_S)
    clients = dhcp_clients(iface)
    if not clients:
        log.warning("restore: no DHCP client runs on %s; none restarted", iface)
        return
    for pid, _ in clients:
        _stop(pid)
    argv = clients[0][1]
    try:
        with open(DHCP_KEEP_ADDRESS, "w"):
            pass
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("restore: cannot restart %s: %s", " ".join(argv), exc)
        with contextlib.suppress(OSError):
            os.unlink(DHCP_KEEP_ADDRESS)
        return
    try:
        code = proc.wait(DHCP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("restore: %s has no lease after %.0f s", " ".join(argv), DHCP_TIMEOUT_S)
        proc.wait()
        return
    if code != 0:
        log.warning("restore: %s exited %d", " ".join(argv), code)


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + DHCP_STOP_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
