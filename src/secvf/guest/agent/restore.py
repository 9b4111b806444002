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
5. **mac** - ``ip link set dev eth0 address MAC``; eth0's IPv6 is switched off and on
   again, so its link-local and SLAAC addresses (made from the MAC) are made afresh; if a
   DHCP client runs on eth0 (``secvf_net=nat``), it is restarted with its own command
   line, because busybox udhcpc keeps the MAC it started with for its renewals (not
   waited for: eth0 keeps its address meanwhile);
6. **shares** - each virtio-fs tag mounted as init's ``mount_shares`` does
   (``mkdir -p``, ``mount -t virtiofs -o ro|rw TAG PATH``), retried for up to
   :data:`SHARE_WAIT_S` while a just-hot-plugged device appears.

A step that fails is reported in ``errors`` as ``{"item", "message"}`` (items
``clock``, ``rng``, ``hostname``, ``tmp``, ``mac``, ``dhcp``, ``share:TAG``); the
others still run. An agent that cannot apply restores (not root, or serving a Unix
socket on the host for tests, where a restore would change the *host*) answers
``restore_failed`` kind ``unsupported`` and does not list the ``restore`` capability.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import signal
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
#: Pause between two mount attempts of a tag that is not there yet.
SHARE_RETRY_S = 0.1
#: Bound on one helper command (ip, mount).
COMMAND_TIMEOUT_S = 10.0
#: Bound on the restarted DHCP client getting its lease (it backgrounds itself then).
DHCP_TIMEOUT_S = 15.0
#: init's DHCP script keeps eth0's address on the next ``deconfig`` if this exists.
DHCP_KEEP_ADDRESS = "/run/secvf/dhcp-keep-address"
#: How long an old DHCP client gets to exit after TERM.
DHCP_STOP_S = 2.0
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


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    """A failed helper's message, on one line."""
    text = " ".join(line.strip() for line in (proc.stderr or proc.stdout or "").splitlines())
    return text.strip() or f"exit status {proc.returncode}"


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
        for share in payload["shares"]:
            self._step(
                outcome,
                f"share:{share['tag']}",
                functools.partial(self._mount, outcome, share, deadline),
            )
        log.info(
            "restore: clock %+.3f s, hostname %s, mac %s, %d share(s), %d error(s)",
            (outcome.clock_offset_ns or 0) / 1e9,
            outcome.hostname,
            outcome.mac,
            len(outcome.mounted),
            len(outcome.errors),
        )
        return outcome

    @staticmethod
    def _step(outcome: Outcome, item: str, action: Callable[[], None]) -> None:
        """Run one step; whatever it raises becomes its ``errors`` entry."""
        try:
            action()
        except (StepFailed, OSError, subprocess.SubprocessError) as exc:
            outcome.fail(item, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug fails one item, never the restore
            log.exception("restore: %s failed unexpectedly", item)
            outcome.fail(item, f"unexpected {type(exc).__name__}: {exc}")

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
        proc = _run(["ip", "link", "set", "dev", NET_IFACE, "address", mac])
        if proc.returncode != 0:  # some drivers only take a new address while down
            _run(["ip", "link", "set", "dev", NET_IFACE, "down"])
            proc = _run(["ip", "link", "set", "dev", NET_IFACE, "address", mac])
            _run(["ip", "link", "set", "dev", NET_IFACE, "up"])
        if proc.returncode != 0:
            raise StepFailed(f"ip link set dev {NET_IFACE} address {mac}: {_output(proc)}")
        _renew_ipv6(NET_IFACE)
        self._step(outcome, "dhcp", lambda: _restart_dhcp(outcome))

    @staticmethod
    def _mount(outcome: Outcome, share: dict[str, Any], deadline: float) -> None:
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
        mode = "ro" if read_only else "rw"
        while True:
            proc = _run(["mount", "-t", "virtiofs", "-o", mode, tag, path])
            if proc.returncode == 0:
                break
            if time.monotonic() >= deadline:
                raise StepFailed(
                    f"cannot mount virtio-fs tag {tag!r} on {path} within "
                    f"{SHARE_WAIT_S:.0f} s: {_output(proc)}"
                )
            time.sleep(SHARE_RETRY_S)
        log.info("restore: share %s on %s (%s)", tag, path, mode)
        outcome.mounted.append({"tag": tag, "path": path, "read_only": read_only})


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


def _restart_dhcp(outcome: Outcome) -> None:
    """Restart eth0's DHCP client (its own command line) so it renews with the new MAC.

    Not waited for: the address stays meanwhile (init's DHCP script keeps it on the new
    client's first ``deconfig`` when :data:`DHCP_KEEP_ADDRESS` exists), so the guest keeps
    its network, and the client backgrounds itself once it has the lease.
    """
    clients = dhcp_clients(NET_IFACE)
    if not clients:
        return  # no DHCP on this VM (secvf_net=none, or a static address)
    for pid, _ in clients:
        _stop(pid)
    argv = clients[0][1]
    with open(DHCP_KEEP_ADDRESS, "w"):
        pass
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        os.unlink(DHCP_KEEP_ADDRESS)
        raise
    threading.Thread(target=_reap_dhcp, args=(proc, argv), name="dhcp", daemon=True).start()
    outcome.dhcp_restarted = True


def _reap_dhcp(proc: subprocess.Popen[bytes], argv: list[str]) -> None:
    """Wait for the restarted client's foreground part (it exits once it has a lease)."""
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
