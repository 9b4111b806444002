"""secvf.sdk: Sandbox and AsyncSandbox over the real agent."""

from __future__ import annotations

import asyncio
import os
import pwd
import time

import pytest

from secvf.exec import CommandStartFailed, Exited, Stdout
from secvf.sdk import AsyncSandbox, Sandbox
from secvf.testing.agent import AgentProcess

CURRENT_USER = pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def agent(tmp_path):
    with AgentProcess(tmp_path, default_user=CURRENT_USER, keepalive_interval_s=0.2) as running:
        yield running


def test_sync_sandbox_run_start_files(agent, tmp_path):
    box = Sandbox.from_socket(agent.socket_path)
    assert box.run(["echo", "hi"]).stdout == b"hi\n"
    assert box.ping() > 0 and box.info().default_user == CURRENT_USER
    with box.start("echo a; echo b >&2; exit 4") as proc:
        events = list(proc)
    assert isinstance(events[-1], Exited) and events[-1].exit_code == 4
    local = tmp_path / "f.txt"
    local.write_bytes(b"payload")
    box.put_file(local, str(tmp_path / "g.txt"))
    box.get_file(str(tmp_path / "g.txt"), tmp_path / "h.txt")
    assert (tmp_path / "h.txt").read_bytes() == b"payload"


def test_sync_sandbox_wait_and_stdin(agent):
    box = Sandbox.from_socket(agent.socket_path)
    proc = box.start(["cat"], stdin=True)
    proc.write_stdin(b"abc")
    proc.close_stdin()
    assert proc.wait().exit_code == 0
    with pytest.raises(CommandStartFailed):
        box.start(["/nonexistent"])


def test_async_sandbox_runs_concurrently(agent):
    box = AsyncSandbox.from_socket(agent.socket_path)

    async def main() -> list[bytes]:
        results = await asyncio.gather(*(box.run(f"sleep 0.3; echo {i}") for i in range(6)))
        return [r.stdout for r in results]

    assert asyncio.run(main()) == [f"{i}\n".encode() for i in range(6)]


def test_async_streaming(agent):
    box = AsyncSandbox.from_socket(agent.socket_path)

    async def main() -> tuple[bytes, Exited | None]:
        proc = await box.start("for i in 1 2 3; do echo $i; done")
        out = b""
        async for event in proc:
            if isinstance(event, Stdout):
                out += event.data
        return out, proc.exited

    out, exited = asyncio.run(main())
    assert out == b"1\n2\n3\n" and exited is not None and exited.exit_code == 0


def test_async_cancellation_kills_the_guest_command(agent, tmp_path):
    box = AsyncSandbox.from_socket(agent.socket_path)
    pidfile = tmp_path / "pid"

    async def main() -> None:
        task = asyncio.create_task(box.run(f"echo $$ > {pidfile}; exec sleep 300"))
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
