"""Commands as another account start through that account's spawner (real agent, real
spawner process, on the host as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from secvf.exec import CommandStartFailed, ExecClient
from secvf.guest.agent.spawner import Account, Spawner, SpawnerFailed, process_source
from secvf.guest.agent.spawner_process import program_candidates
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


def spawners_of(agent_pid: int) -> list[int]:
    """Pids of the agent's children that run the spawner (by their command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if ppid == agent_pid and b"secvf-spawner" in cmdline:
            found.append(int(entry))
    return found


def agent_pid_of(client: ExecClient) -> int:
    """The agent's pid: the parent of a root command (started by the agent itself)."""
    return int(client.run("echo $PPID", user="root").stdout)


def test_a_command_as_another_account_comes_from_its_spawner_and_is_the_agents_child(client):
    agent_pid = agent_pid_of(client)
    result = client.run("id -u; echo $PPID; cat /proc/$PPID/status | grep ^Uid", user="nobody",
                        cwd="/")
    uid, parent, uid_line = result.stdout.decode().split("\n", 2)
    assert (int(uid), int(parent)) == (NOBODY.pw_uid, agent_pid)  # its parent is the agent
    assert uid_line.split()[1] == "0"
    spawners = spawners_of(agent_pid)
    assert len(spawners) == 1
    with open(f"/proc/{spawners[0]}/status") as fh:
        assert f"Uid:\t{NOBODY.pw_uid}" in fh.read()
    client.run(["true"], user="nobody", cwd="/")
    assert spawners_of(agent_pid) == spawners  # started once, then reused


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


def test_a_killed_spawner_loses_no_exit_status_and_is_started_again(client, agent):
    agent_pid = agent_pid_of(client)
    client.run(["true"], user="nobody", cwd="/")
    (first,) = spawners_of(agent_pid)
    results = {}

    def slow() -> None:
        with ExecClient.connect(agent.socket_path, timeout=5) as other:
            results["slow"] = other.run(["sh", "-c", "sleep 1; exit 5"], user="nobody", cwd="/")

    runner = threading.Thread(target=slow)
    runner.start()
    time.sleep(0.3)
    # the account kills its own spawner while one of its commands runs
    client.run(["kill", "-KILL", str(first)], user="nobody", cwd="/")
    runner.join(10)
    assert results["slow"].exit_code == 5  # the command was the agent's child all along
    assert client.run(["true"], user="nobody", cwd="/").exit_code == 0
    assert spawners_of(agent_pid) not in ([], [first])


def test_a_reply_naming_a_process_that_is_not_the_agents_child_is_refused() -> None:
    spawner = Spawner(Account(NOBODY.pw_uid, NOBODY.pw_gid, ()))
    for pid in (1, os.getppid(), -5, "12", True):
        with pytest.raises(SpawnerFailed):
            spawner._check_child(pid)  # type: ignore[arg-type]


def test_the_spawner_source_is_self_contained() -> None:
    """The spawner runs the module's source alone: nothing from secvf may be imported."""
    source = process_source()
    assert "import secvf" not in source and "from secvf" not in source
    namespace: dict[str, object] = {}
    exec(compile(source, "secvf-spawner", "exec"), namespace)
    assert callable(namespace["serve"])


def test_a_command_starts_with_default_signals_and_an_empty_mask(client):
    status = client.run(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"], user="nobody",
                        cwd="/").stdout.decode()
    assert status.split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]  # SIGPIPE not ignored


def test_the_spawner_puts_its_own_stdio_back_after_each_command(client):
    client.run(["true"], user="nobody", cwd="/")
    (spawner,) = spawners_of(agent_pid_of(client))
    assert client.run(["sh", "-c", "echo hi"], user="nobody", cwd="/").stdout == b"hi\n"
    before = [os.readlink(f"/proc/{spawner}/fd/{fd}") for fd in (0, 1, 2)]
    assert before[:2] == [os.devnull, os.devnull]
    assert client.run(["cat"], user="nobody", cwd="/", stdin=b"z").stdout == b"z"
    assert [os.readlink(f"/proc/{spawner}/fd/{fd}") for fd in (0, 1, 2)] == before


def test_program_lookup_skips_what_the_account_cannot_run(tmp_path):
    first, second, empty = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for directory in (first, second, empty):
        directory.mkdir()
    (first / "tool").write_text("#!/bin/sh\n")  # not executable
    (first / "dir").mkdir()  # a directory is never a program
    for name in ("tool", "dir"):
        (second / name).write_text("#!/bin/sh\n")
        (second / name).chmod(0o755)
    env = {"PATH": f"{empty}:{first}:{second}"}
    assert program_candidates("tool", env) == [str(second / "tool")]
    assert program_candidates("dir", env) == [str(second / "dir")]
    assert program_candidates("nothing", env) == [str(d / "nothing") for d in (empty, first,
                                                                              second)]
    assert program_candidates("./x/tool", env) == ["./x/tool"]
    assert program_candidates("tool", {"PATH": f":{second}"}) == [str(second / "tool")]


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
