"""How a supervisor starts (``secvf.runtime.supervisor_start``): forked from a
single-threaded caller, else a fresh interpreter; either way a detached process that
holds nothing of its caller's. The VMs run the real supervisor over a fake QEMU."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from secvf.errors import ConfigError
from secvf.runtime import control, supervisor_start
from secvf.runtime.supervisor_start import PROCESS_NAME, START_ENV, StartMode, choose_mode
from secvf.store import paths
from secvf.store.library import get_bundle
from tests.unit import fake_vm


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller looks single-threaded (the test runner itself may keep threads that
    earlier tests left)."""
    monkeypatch.setattr(threading, "active_count", lambda: 1)


@pytest.fixture
def extra_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller runs a second thread."""
    monkeypatch.setattr(threading, "active_count", lambda: 2)


def test_a_single_threaded_caller_forks(one_thread, monkeypatch) -> None:
    monkeypatch.delenv(START_ENV, raising=False)
    assert choose_mode() is StartMode.FORK
    monkeypatch.setenv(START_ENV, "exec")
    assert choose_mode() is StartMode.EXEC


def test_a_caller_with_threads_starts_a_fresh_interpreter(extra_thread, monkeypatch) -> None:
    monkeypatch.delenv(START_ENV, raising=False)
    assert choose_mode() is StartMode.EXEC
    monkeypatch.setenv(START_ENV, "fork")
    with pytest.raises(ConfigError, match="fork is unsafe here: the process runs 2 threads"):
        choose_mode()


def test_a_caller_inside_an_asyncio_loop_does_not_fork(one_thread, monkeypatch) -> None:
    monkeypatch.delenv(START_ENV, raising=False)

    async def inside() -> StartMode:
        return choose_mode()

    assert asyncio.run(inside()) is StartMode.EXEC


def test_a_big_caller_does_not_fork(one_thread, monkeypatch) -> None:
    monkeypatch.setenv(START_ENV, "fork")
    monkeypatch.setattr(supervisor_start, "FORK_MAX_RSS_MIB", 1)
    with pytest.raises(ConfigError, match=r"the process has \d+ MiB resident"):
        choose_mode()
    monkeypatch.delenv(START_ENV)
    assert choose_mode() is StartMode.EXEC


def test_an_unknown_start_mode_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(START_ENV, "spawn")
    with pytest.raises(ConfigError, match="expected auto, fork or exec"):
        choose_mode()


def _fd_targets(pid: int) -> dict[int, str]:
    targets = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets[int(fd.name)] = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
    return targets


def _parent_of(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text.rsplit(")", 1)[1].split()[1])


#: A caller in a fresh interpreter (one thread, as the CLI): it holds a pipe and starts
#: the VM, then reports what it sees of the supervisor from its side.
CALLER = """
import json, os, sys
from secvf.runtime import control
from secvf.store.library import get_bundle
from secvf.store.locks import FileLock
read_end, write_end = os.pipe()
status = control.start_vm("detached")
os.close(write_end)
os.set_blocking(read_end, False)
with FileLock(get_bundle("detached").edit_lock, "the VM"):  # LockBusy if the child kept it
    pass
print("caller says hello")
json.dump({"pid": status["pid"], "caller": os.getpid(), "session": os.getsid(0),
           "eof": os.read(read_end, 1) == b"",
           "pipe": f"pipe:[{os.fstat(read_end).st_ino}]"}, sys.stdout)
"""


@pytest.mark.parametrize("mode", ["fork", "exec"])
def test_the_supervisor_holds_nothing_of_its_caller(mode: str, secvf_env: Path,
                                                     tmp_path: Path, monkeypatch) -> None:
    """Whichever way it starts: its own session, stdin /dev/null, stdout and stderr its
    log, none of the caller's descriptors (a pipe's other end sees EOF, the VM's edit
    lock is free), and its output only in its log; forked, it is not the caller's child
    (no zombie of it is left to reap) and names itself."""
    fake_vm.use_fake_qemu(tmp_path, monkeypatch.setenv)
    monkeypatch.setenv(START_ENV, mode)
    fake_vm.make_vm("detached", paths.ensure_private_dir(secvf_env / "files"))
    try:
        proc = subprocess.run([sys.executable, "-c", CALLER], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        printed, _, facts_text = proc.stdout.partition("caller says hello\n")
        assert printed == "" and proc.stderr == ""  # nothing of the supervisor's
        facts = json.loads(facts_text)
        pid = facts["pid"]
        assert facts["eof"]  # nobody else holds the pipe's write end
        assert os.getsid(pid) not in (os.getsid(0), facts["session"])
        targets = _fd_targets(pid)
        bundle = get_bundle("detached")
        assert targets[0] == os.devnull
        assert targets[1] == targets[2] == str(bundle.supervisor_log)
        assert facts["pipe"] not in targets.values()
        if mode == "fork":
            assert Path(f"/proc/{pid}/comm").read_text().strip() == PROCESS_NAME[:15]
            assert _parent_of(pid) != facts["caller"]
        assert "QEMU started" in bundle.supervisor_log.read_text()
    finally:
        control.stop_vm("detached", force=True)


def test_a_forced_fork_from_a_threaded_caller_fails_before_anything_starts(
        extra_thread, secvf_env: Path, tmp_path: Path, monkeypatch) -> None:
    fake_vm.use_fake_qemu(tmp_path, monkeypatch.setenv)
    monkeypatch.setenv(START_ENV, "fork")
    fake_vm.make_vm("threaded", paths.ensure_private_dir(secvf_env / "files"))
    open_before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match=START_ENV):
        control.start_vm("threaded")
    assert control.vm_status("threaded")["state"] == "stopped"
    assert sorted(os.listdir("/proc/self/fd")) == open_before  # the report pipe is closed
