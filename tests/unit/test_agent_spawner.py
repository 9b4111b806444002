"""Commands as another account start from that account's spawner thread (real agent, on
the host as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from secvf.exec import CommandStartFailed, ExecClient
from secvf.guest.agent import spawner as spawner_module
from secvf.guest.agent.spawner import Account, Spawner, SpawnerFailed
from secvf.testing.agent import AgentProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def agent(tmp_path: Path):
    with AgentProcess(tmp_path, default_user="root", keepalive_interval_s=0.2) as running:
        yield running


@pytest.fixture
def client(agent):
    with ExecClient.connect(agent.socket_path, timeout=5, silence_timeout_s=5) as connected:
        yield connected


def thread_uids(pid: int) -> dict[int, int]:
    """Real uid of each thread of ``pid`` (by thread id)."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                uid_line = next(line for line in fh if line.startswith("Uid:"))
        except OSError:
            continue  # the thread ended after the listing
        found[int(tid)] = int(uid_line.split()[1])
    return found


def agent_pid_of(client: ExecClient) -> int:
    """The agent's pid: the parent of a root command (started by the agent itself)."""
    return int(client.run("echo $PPID", user="root").stdout)


def test_a_command_as_another_account_comes_from_its_spawner_thread_as_the_agents_child(
        client):
    agent_pid = agent_pid_of(client)
    result = client.run("id -u; echo $PPID; grep -E '^(Uid|Gid|CapEff)' /proc/self/status",
                        user="nobody", cwd="/")
    uid, parent, status = result.stdout.decode().split("\n", 2)
    assert (int(uid), int(parent)) == (NOBODY.pw_uid, agent_pid)  # its parent is the agent
    assert status.split() == ["Uid:", *[str(NOBODY.pw_uid)] * 4,
                              "Gid:", *[str(NOBODY.pw_gid)] * 4, "CapEff:", "0" * 16]
    threads = thread_uids(agent_pid)
    assert threads[agent_pid] == 0  # the agent itself stays root
    (spawner,) = [tid for tid, tuid in threads.items() if tuid == NOBODY.pw_uid]
    client.run(["true"], user="nobody", cwd="/")
    assert [t for t, u in thread_uids(agent_pid).items() if u == NOBODY.pw_uid] == [spawner]


def test_the_account_cannot_read_the_agents_memory_or_environment(client):
    agent_pid = agent_pid_of(client)
    client.run(["true"], user="nobody", cwd="/")  # the spawner thread exists now
    for name in ("environ", "mem", "maps"):
        probe = client.run(["sh", "-c", f"cat /proc/{agent_pid}/{name} >/dev/null"],
                           user="nobody", cwd="/")
        assert probe.exit_code != 0 and b"ermission denied" in probe.stderr, name


def test_exit_codes_signals_stdin_and_path_lookup_through_the_spawner(client):
    assert client.run(["sh", "-c", "exit 7"], user="nobody", cwd="/").exit_code == 7
    killed = client.run(["sh", "-c", "kill -TERM $$"], user="nobody", cwd="/")
    assert killed.signal == signal.SIGTERM
    echoed = client.run(["cat"], user="nobody", cwd="/", stdin=b"through the spawner")
    assert echoed.stdout == b"through the spawner"
    env = client.run(["sh", "-c", "echo $PATH; trap -p"], user="nobody", cwd="/")
    assert env.stdout.decode().split("\n")[0]  # a PATH was given and `sh` was found on it
    with pytest.raises(CommandStartFailed) as info:
        client.run(["no-such-program-secvf"], user="nobody", cwd="/")
    assert (info.value.kind, info.value.errno_name, info.value.exit_code) == (
        "not_found", "ENOENT", 127)


def test_a_directory_the_account_cannot_enter_fails_as_the_account(client, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(CommandStartFailed) as info:
        client.run(["true"], user="nobody", cwd=str(private))
    assert (info.value.kind, info.value.errno_name) == ("bad_cwd", "EACCES")
    assert client.run(["true"], user="nobody", cwd="/").exit_code == 0


def test_a_spawner_in_this_process_leaves_the_calling_thread_root() -> None:
    spawner = Spawner(Account(NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,)))
    read_end, write_end = os.pipe()
    try:
        proc = spawner.spawn(["id", "-u"], {"PATH": "/usr/bin:/bin"}, "/",
                             (subprocess.DEVNULL, write_end, write_end))
        os.close(write_end)
        assert proc.wait() == 0 and int(os.read(read_end, 100)) == NOBODY.pw_uid
        assert proc.pid not in thread_uids(os.getpid())  # a process of its own
        assert thread_uids(os.getpid())[threading.get_native_id()] == 0
        assert os.getuid() == 0 and os.geteuid() == 0
        with pytest.raises(OSError) as info:
            spawner.spawn(["true"], {}, "/no/such/dir", (0, 1, 2))
        assert info.value.filename == "/no/such/dir"
    finally:
        os.close(read_end)
        spawner.close()
    assert _eventually(lambda: NOBODY.pw_uid not in thread_uids(os.getpid()).values())


def test_a_thread_that_cannot_become_the_account_refuses_every_job(monkeypatch) -> None:
    monkeypatch.setattr(spawner_module, "CREDENTIAL_CALLS", {})
    spawner = Spawner(Account(NOBODY.pw_uid, NOBODY.pw_gid, ()))
    for attempt in (spawner.start, lambda: spawner.spawn(["true"], {}, "/", (0, 1, 2))):
        with pytest.raises(SpawnerFailed, match="cannot run as uid"):
            attempt()


def test_credentials_that_are_not_the_accounts_are_refused() -> None:
    with pytest.raises(OSError, match="not the account's"):
        spawner_module._check_credentials(Account(NOBODY.pw_uid, NOBODY.pw_gid, ()))


def _eventually(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_command_starts_with_default_signals_and_an_empty_mask(client):
    status = client.run(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"], user="nobody",
                        cwd="/").stdout.decode()
    assert status.split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]  # SIGPIPE not ignored


def test_a_later_path_entry_runs_when_an_earlier_one_is_not_executable(client):
    # pytest's tmp_path lies under a root-only directory: the account needs a path it can walk
    shared = Path(tempfile.mkdtemp(prefix="secvf-spawner-test-"))
    shared.chmod(0o755)
    try:
        _later_path_entry_runs(client, shared)
    finally:
        shutil.rmtree(shared)


def _later_path_entry_runs(client: ExecClient, shared: Path) -> None:
    first, second = shared / "a", shared / "b"
    for directory in (first, second):
        directory.mkdir(mode=0o755)
    (first / "tool").write_text("#!/bin/sh\necho first\n")
    (second / "tool").write_text("#!/bin/sh\necho second\n")
    (second / "tool").chmod(0o755)
    result = client.run(["tool"], user="nobody", cwd="/",
                        env={"PATH": f"{first}:{second}:/usr/bin:/bin"})
    assert result.stdout == b"second\n"
    (second / "tool").chmod(0o644)
    with pytest.raises(CommandStartFailed) as info:
        client.run(["tool"], user="nobody", cwd="/", env={"PATH": f"{first}:{second}"})
    assert info.value.errno_name == "EACCES"  # as execvpe reports it
