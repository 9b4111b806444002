"""What SecVF's guest init does in real VMs booted from the built images: console logins
(a root password set at create, autologin, a hint without either, none at all on a
malware-analysis VM), one console at a time, the root filesystem grown to the disk, the
clock taken from the host, and shutdown: processes get TERM before the power goes, and
a forced stop of a sandbox keeps what was just written.

The VMs are created once for the module and booted together; each console is
``secvf vm console NAME`` on a pseudo-terminal, typed into like a user would.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.image import ImageInfo
from secvf.runtime.control import wait_for_ready
from secvf.store.bundle import RuntimeFiles
from tests.helpers import run_cli

pytestmark = pytest.mark.vm

PASSWORD = "guest init 7"
#: Generous bounds for a boot and for an answer on a console; reaching one fails the test.
BOOT_TIMEOUT_S = 300.0
CONSOLE_TIMEOUT_S = 120.0

PW, AUTO, PLAIN, MAL, SBX = "gi-pw", "gi-auto", "gi-plain", "gi-mal", "gi-sbx"


@pytest.fixture(scope="module")
def guests(built_images: dict[str, ImageInfo], vm_library: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Five VMs, running: a generic VM with a root password and a 3 GB disk, one with
    autologin, one with neither, a malware-analysis VM and an AI sandbox. Yields the
    session library; the VMs are deleted at the end of the module."""
    secret = tmp_path_factory.mktemp("secret") / "root-password"
    secret.write_text(PASSWORD + "\n")
    run_cli("vm", "create", PW, "--memory", "512M", "--disk", "3G",
            "--root-password-file", str(secret), check=True)
    run_cli("vm", "create", AUTO, "--memory", "512M", "--autologin", check=True)
    run_cli("vm", "create", PLAIN, "--memory", "512M", check=True)
    run_cli("vm", "create", MAL, "--kind", "malware-analysis", "--memory", "512M", check=True)
    run_cli("sandbox", "create", SBX, "--memory", "512M", check=True)
    for name in (PW, AUTO, PLAIN, MAL, SBX):
        run_cli("vm", "start", name, check=True)
    for name in (PW, AUTO, PLAIN, MAL, SBX):
        wait_for_ready(name, BOOT_TIMEOUT_S)
    yield vm_library
    for name in (PW, AUTO, PLAIN, MAL):
        run_cli("vm", "delete", "--force", name)
    run_cli("sandbox", "rm", "--purge", "--force", SBX)


def ensure_running(name: str) -> None:
    state = json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)["state"]
    if state != "running":
        run_cli("sandbox" if name == SBX else "vm", "start", name, check=True)
    wait_for_ready(name, BOOT_TIMEOUT_S)


def serial_log(library: Path, name: str) -> str:
    return (library / "vms" / name / "serial.log").read_text(errors="replace")


def sh(name: str, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run as root in the sandbox through ``vm exec`` (once its agent answers)."""
    return run_cli("vm", "exec", name, "--root", "--wait", str(BOOT_TIMEOUT_S), "-c", script)


class Console:
    """``secvf vm console NAME`` on a pseudo-terminal: what it prints, what is typed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "secvf", "vm", "console", name],
                                     stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     env=os.environ.copy(), start_new_session=True)
        os.close(slave)
        self.seen = b""

    def expect(self, pattern: bytes, timeout: float = CONSOLE_TIMEOUT_S) -> re.Match[bytes]:
        """Read until ``pattern`` appears; return its match (what follows stays unread)."""
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.seen)) is None:
            left = deadline - time.monotonic()
            assert left > 0, f"{self.name}: no {pattern!r} on the console; got {self.seen[-800:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the console process has exited
                    chunk = b""
                assert chunk, f"{self.name}: the console closed; got {self.seen[-800:]!r}"
                self.seen += chunk
        self.seen = self.seen[match.end():]
        return match

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def shell(self, command: str) -> str:
        """Run ``command`` at the guest's shell prompt; return what it printed."""
        # quoted, the markers in the echo of the typed line do not match
        self.type(f"echo '<<'BEGIN'>>'; {command}; echo '<<'DONE'>>'\r")
        found = self.expect(rb"(?s)<<BEGIN>>\r?\n(.*?)<<DONE>>")
        return found.group(1).decode(errors="replace")

    def login(self, password: str | None) -> None:
        """Get a root shell prompt: log in with ``password``, or (None) just wait for one
        (autologin)."""
        self.expect(rb"attached to")
        self.type("\r")
        if password is not None:
            self.expect(rb"login: ")
            self.type("root\r")
            self.expect(rb"Password: ")
            self.type(password + "\r")
        self.expect(rb"root@[\w-]+:~# ")

    def logout(self) -> None:
        """Leave the shell; the getty comes back (and logs in again with autologin)."""
        self.type("exit\r")
        self.expect(rb"login: ")

    def close(self) -> None:
        """Detach (Ctrl-]) and wait for ``vm console`` to exit."""
        if self.proc.poll() is None:
            self.type("\x1d")
            try:
                self.proc.wait(CONSOLE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        os.close(self.master)

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- logins ------------------------------------------------------------------------------

def test_root_logs_in_on_the_console_with_the_password_set_at_create(guests: Path) -> None:
    ensure_running(PW)
    with Console(PW) as console:
        console.expect(rb"attached to")
        console.type("\r")
        console.expect(rb"gi-pw login: ")
        console.type("root\r")
        console.expect(rb"Password: ")
        console.type("not " + PASSWORD + "\r")
        console.expect(rb"Login incorrect")
        console.expect(rb"login: ")
        console.type("root\r")
        console.expect(rb"Password: ")
        console.type(PASSWORD + "\r")
        console.expect(rb"root@gi-pw:~# ")
        assert console.shell("id -u; tty").split() == ["0", "/dev/ttyS0"]
        console.logout()
    assert "console: login as root on ttyS0" in serial_log(guests, PW)


def test_a_second_console_is_refused_while_one_is_attached(guests: Path) -> None:
    ensure_running(PW)
    with Console(PW) as first:
        first.expect(rb"attached to")
        second = run_cli("vm", "console", PW, timeout=CONSOLE_TIMEOUT_S)
        assert second.returncode == 1
        assert f"another console is attached to VM '{PW}'" in second.stderr
    with Console(PW) as again:  # the first one detached: the lock is free again
        again.expect(rb"attached to")


def test_autologin_gives_a_root_shell_with_job_control(guests: Path) -> None:
    ensure_running(AUTO)
    with Console(AUTO) as console:
        console.login(None)
        # the serial port is the shell's controlling terminal: job control, Ctrl-C work
        assert console.shell("id -u; tty; [ $(ps -o tpgid= $$) -gt 0 ] && echo ctty").split() \
            == ["0", "/dev/ttyS0", "ctty"]
        assert "no job control" not in console.seen.decode(errors="replace")
    assert "console: root shell on ttyS0 without a password (autologin)" in \
        serial_log(guests, AUTO)


def test_without_a_password_the_console_says_how_to_set_one(guests: Path) -> None:
    ensure_running(PLAIN)
    with Console(PLAIN) as console:
        console.expect(rb"attached to")
        console.type("root\r")
        console.expect(rb"has no console login: root has no password")
        console.expect(rb"--root-password-file FILE")
        console.expect(rb"--autologin")
        assert b"login:" not in console.seen
    assert "console: no login on ttyS0 (root has no password)" in serial_log(guests, PLAIN)


def test_a_malware_analysis_console_stays_output_only(guests: Path) -> None:
    ensure_running(MAL)
    log = serial_log(guests, MAL)
    assert "secvf-init: console: output only" in log
    assert "login:" not in log and "has no console login" not in log
    config = json.loads((guests / "vms" / MAL / "vm.json").read_text())
    assert config["console"] == "output-only"
    assert not RuntimeFiles(config["id"]).console_socket.exists()  # nothing to type into
    with Console(MAL) as console:
        console.expect(rb"console is output-only. Following the log")
        console.expect(rb"secvf-init: console: output only")
        os.killpg(console.proc.pid, signal.SIGINT)
        console.proc.wait(CONSOLE_TIMEOUT_S)


# ---- disk and clock ----------------------------------------------------------------------

def test_the_root_filesystem_grows_to_the_disk(guests: Path) -> None:
    ensure_running(PW)
    with Console(PW) as console:
        console.login(PASSWORD)
        size = int(console.shell("df -B1 --output=size / | tail -n 1").split()[-1])
        console.logout()
    print(f"root filesystem on a 3G disk: {size / 1e9:.2f} GB")
    assert size > 2_000_000_000
    assert "secvf-init: root filesystem grown from" in serial_log(guests, PW)


def test_the_clock_follows_the_host(guests: Path) -> None:
    ensure_running(PW)
    with Console(PW) as console:
        console.login(PASSWORD)
        param = re.search(r"secvf_time=(\d+)", console.shell("cat /proc/cmdline"))
        assert param is not None
        sent = int(param.group(1)) / 1e9
        # the guest's idea of when its kernel started: clock minus uptime
        clock, uptime = map(float, console.shell(
            "read up _ </proc/uptime; echo $(date +%s.%N) $up").split())
        before = time.time()
        guest = float(console.shell("date +%s.%N"))
        after = time.time()
        console.logout()
    offset, error = guest - (before + after) / 2, (after - before) / 2
    from_rtc = "secvf_time is behind the RTC: clock set from the RTC" in serial_log(guests, PW)
    print(f"guest clock - host clock: {offset:+.3f} s (+-{error:.3f} s); "
          f"guest boot time - secvf_time: {clock - uptime - sent:+.3f} s; "
          f"set from {'the RTC' if from_rtc else 'secvf_time'}")
    if not from_rtc:  # set from secvf_time plus the uptime (less what running date took)
        assert abs(clock - uptime - sent) < 1.0
    # from the RTC (the host's boot estimate fell short on a loaded host): the middle
    # of the RTC's 2 s window; either way within a second of the host
    assert abs(offset) < 1.0 + error


# ---- shutdown ------------------------------------------------------------------------------

def test_a_forced_stop_of_a_sandbox_keeps_what_was_just_written(guests: Path) -> None:
    ensure_running(SBX)
    assert sh(SBX, "echo written-just-before > /root/unsynced").returncode == 0
    run_cli("vm", "stop", "--force", SBX, check=True)
    run_cli("sandbox", "start", SBX, check=True)
    read = sh(SBX, "cat /root/unsynced")
    assert (read.returncode, read.stdout) == (0, "written-just-before\n"), read.stderr


def test_shutdown_sends_term_to_processes_before_powering_off(guests: Path) -> None:
    ensure_running(SBX)
    workspace = guests / "sandboxes" / SBX / "workspace"
    (workspace / "term-seen").unlink(missing_ok=True)
    (workspace / "armed").unlink(missing_ok=True)
    # The exec waits until the handler is armed: until `setsid -f`'s child has called
    # setsid it is still in the exec's session, which the agent ends when the exec does.
    started = sh(SBX, "setsid -f sh -c 'trap \"echo TERM > /workspace/term-seen; exit 0\" TERM;"
                      " : > /workspace/armed; while :; do sleep 1; done'"
                      " </dev/null >/dev/null 2>&1;"
                      f" for i in $(seq {int(CONSOLE_TIMEOUT_S * 10)}); do"
                      " [ -e /workspace/armed ] && exit 0; sleep 0.1; done; exit 1")
    assert started.returncode == 0, "the TERM handler was never armed: " + started.stderr
    run_cli("vm", "stop", SBX, check=True)
    assert (workspace / "term-seen").read_text() == "TERM\n"
    log = serial_log(guests, SBX)
    assert "secvf-init: shutting down: TERM to every process" in log
    assert "processes still running" not in log.rsplit("shutting down", 1)[-1]


def test_shutdown_hangs_up_a_console_shell(guests: Path) -> None:
    # an interactive shell ignores TERM; without the hangup it would wait out the grace
    ensure_running(AUTO)
    with Console(AUTO) as console:
        console.login(None)
    run_cli("vm", "stop", AUTO, check=True)
    tail = serial_log(guests, AUTO).rsplit("secvf-init: shutting down", 1)[-1]
    assert "reboot: Power down" in tail
    assert "processes still running" not in tail
