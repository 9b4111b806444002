"""Python SDK for sandbox VMs: run commands and move files, sync or asyncio.

A :class:`Sandbox` is a handle on one VM's exec channel. Every call opens its own
connection, so one Sandbox can be used from many threads at once (the bridge allows 16
connections per VM by default)::

    from secvf.sdk import Sandbox

    box = Sandbox.from_vm("my-sandbox")      # or Sandbox.from_socket(exec_socket_path)
    result = box.run(["python3", "-c", "print(6 * 7)"], timeout=60)
    assert result.ok and result.stdout == b"42\\n"

    with box.start("for i in 1 2 3; do echo $i; sleep 1; done") as proc:
        for event in proc:                    # Stdout(data=b'1\\n'), ..., then Exited(...)
            print(event)

:class:`AsyncSandbox` offers the same calls as coroutines. It drives the blocking client
in worker threads; cancelling an awaiting task closes that call's connection, which
makes the guest kill the command.

All errors are :class:`secvf.errors.SecVFError` subclasses from :mod:`secvf.exec`
(``CommandStartFailed``, ``AgentUnavailable``, ``FileTransferError``, ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from secvf.exec import protocol
from secvf.exec.channel import CONNECT_TIMEOUT_S
from secvf.exec.client import Command, ExecClient
from secvf.exec.outcome import AgentInfo, ExecEvent, ExecResult, Exited, FileTransfer
from secvf.exec.stream import ExecSession, OutputCallback

T = TypeVar("T")
Connector = Callable[[], ExecClient]
"""Opens a fresh, handshaken connection to the sandbox's agent."""


class SandboxProcess:
    """A command started with :meth:`Sandbox.start`; owns its connection.

    Iterate for events (``Stdout``, ``Stderr``, ``StdinError``, finally ``Exited``);
    the connection closes when the command has exited or on :meth:`close`.
    """

    def __init__(self, client: ExecClient, session: ExecSession) -> None:
        self._client = client
        self._session = session
        self.pid = session.pid  # guest pid

    def __repr__(self) -> str:
        return f"<SandboxProcess pid={self.pid} exited={self.exited}>"

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[ExecEvent]:
        try:
            yield from self._session.events()
        finally:
            if self._session.exited is not None:
                self._client.close()

    @property
    def exited(self) -> Exited | None:
        """The exit event once the command has ended, else None."""
        return self._session.exited

    def wait(self) -> Exited:
        """Discard remaining output and return the exit event."""
        for _ in self:
            pass
        assert self._session.exited is not None
        return self._session.exited

    def write_stdin(self, data: bytes) -> None:
        """Send bytes to the command's stdin (see :meth:`ExecSession.write_stdin`)."""
        self._session.write_stdin(data)

    def close_stdin(self) -> None:
        """Send EOF on stdin."""
        self._session.close_stdin()

    def send_signal(self, signum: int) -> None:
        """Signal the command's process group."""
        self._session.send_signal(signum)

    def resize(self, rows: int, cols: int) -> None:
        """Resize the command's PTY."""
        self._session.resize(rows, cols)

    def cancel(self) -> None:
        """Ask the guest to kill the command; iterate on to collect ``Exited``."""
        self._session.cancel()

    def close(self) -> None:
        """Close the connection; a command still running is killed by the guest."""
        self._client.close()


class Sandbox:
    """Synchronous handle on one sandbox's exec channel."""

    def __init__(self, connect: Connector, name: str = "") -> None:
        """Wrap ``connect``, a callable returning a fresh :class:`ExecClient`.

        Use :meth:`from_socket` for an exec socket path; the VM layer binds names.
        """
        self._connect = connect
        self.name = name  # for repr and logs only

    def __repr__(self) -> str:
        return f"<Sandbox {self.name or '(unnamed)'}>"

    @classmethod
    def from_socket(
        cls,
        path: Path | str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        silence_timeout_s: float = protocol.AGENT_SILENCE_TIMEOUT_S,
        name: str = "",
    ) -> Sandbox:
        """Return a Sandbox that dials the exec socket at ``path`` for every call."""
        socket_path = Path(path)

        def connect() -> ExecClient:
            return ExecClient.connect(
                socket_path, timeout=connect_timeout, silence_timeout_s=silence_timeout_s
            )

        return cls(connect, name or socket_path.name)

    @classmethod
    def from_vm(cls, name: str, **options: Any) -> Sandbox:
        """Return a Sandbox for the running AI-sandbox VM ``name`` (by library name).

        Raises:
            NoExecChannel: the VM has no exec channel by design, or is not running.
            AgentUnavailable: the VM is still starting (retry, or wait for it with
                ``secvf.api.wait_for_exec``).
            NotFound: there is no such VM.
        """
        from secvf.workflows.vm_exec import exec_socket_for

        return cls.from_socket(exec_socket_for(name), name=name, **options)

    def connect(self) -> ExecClient:
        """Open a connection for several calls in a row (close it when done).

        Raises:
            ConnectFailed, ExecRefused, AgentUnavailable, ProtocolError.
        """
        return self._connect()

    def _call(self, action: Callable[[ExecClient], T]) -> T:
        with self._connect() as client:
            return action(client)

    def run(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        stdin: bytes | BinaryIO | None = None,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        **options: Any,
    ) -> ExecResult:
        """Run a command to completion; see :meth:`ExecClient.run` for every argument.

        Raises:
            CommandStartFailed: not found (127), permission denied, bad cwd, ... (126).
            AgentUnavailable, ExecRefused, ProtocolError: the channel failed.
        """
        return self._call(
            lambda c: c.run(
                command,
                env=env,
                cwd=cwd,
                user=user,
                tty=tty,
                stdin=stdin,
                timeout=timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                **options,
            )
        )

    def start(self, command: Command, **options: Any) -> SandboxProcess:
        """Start a command and stream its events; options as :meth:`ExecClient.start`.

        Raises:
            CommandStartFailed, AgentUnavailable, ExecRefused, ProtocolError.
        """
        client = self._connect()
        try:
            session = client.start(command, **options)
        except BaseException:
            client.close()
            raise
        return SandboxProcess(client, session)

    def put_file(
        self, local: Path | str, remote: str, *, mode: int | None = None, user: str | None = None
    ) -> FileTransfer:
        """Upload a file; see :meth:`ExecClient.put_file`."""
        return self._call(lambda c: c.put_file(Path(local), remote, mode=mode, user=user))

    def get_file(
        self, remote: str, local: Path | str, *, user: str | None = None, **options: Any
    ) -> FileTransfer:
        """Download a file; see :meth:`ExecClient.get_file`."""
        return self._call(lambda c: c.get_file(remote, Path(local), user=user, **options))

    def ping(self) -> float:
        """Return the agent's round-trip time in seconds (connect not included)."""
        return self._call(lambda c: c.ping())

    def info(self) -> AgentInfo:
        """Return the agent's version, hostname, uptime and accounts."""
        return self._call(lambda c: c.info())


class AsyncSandboxProcess:
    """Asyncio view of a :class:`SandboxProcess` (``async for event in proc``)."""

    def __init__(self, process: SandboxProcess) -> None:
        self._process = process
        self._events = iter(process)
        self.pid = process.pid  # guest pid

    def __aiter__(self) -> AsyncIterator[ExecEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ExecEvent]:
        while True:
            event = await _in_thread(self._process.close, _next_or_none, self._events)
            if event is None:
                return
            yield event

    async def __aenter__(self) -> AsyncSandboxProcess:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def exited(self) -> Exited | None:
        """The exit event once the command has ended, else None."""
        return self._process.exited

    async def wait(self) -> Exited:
        """Discard remaining output and return the exit event."""
        return await _in_thread(self._process.close, self._process.wait)

    async def write_stdin(self, data: bytes) -> None:
        """Send bytes to stdin (may wait for guest back-pressure)."""
        await _in_thread(self._process.close, self._process.write_stdin, data)

    async def close_stdin(self) -> None:
        """Send EOF on stdin."""
        await _in_thread(self._process.close, self._process.close_stdin)

    async def send_signal(self, signum: int) -> None:
        """Signal the command's process group."""
        await _in_thread(self._process.close, self._process.send_signal, signum)

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the command's PTY."""
        await _in_thread(self._process.close, self._process.resize, rows, cols)

    async def cancel(self) -> None:
        """Ask the guest to kill the command."""
        await _in_thread(self._process.close, self._process.cancel)

    def close(self) -> None:
        """Close the connection; a running command is killed by the guest."""
        self._process.close()


class AsyncSandbox:
    """Asyncio handle on one sandbox's exec channel (same calls as :class:`Sandbox`).

    Example::

        box = AsyncSandbox.from_socket(path)
        results = await asyncio.gather(*(box.run(["echo", str(i)]) for i in range(8)))
    """

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox  # the synchronous handle doing the work

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.sandbox.name or '(unnamed)'}>"

    @classmethod
    def from_socket(cls, path: Path | str, **options: Any) -> AsyncSandbox:
        """Return an AsyncSandbox dialling ``path``; options as :meth:`Sandbox.from_socket`."""
        return cls(Sandbox.from_socket(path, **options))

    @classmethod
    def from_vm(cls, name: str, **options: Any) -> AsyncSandbox:
        """Return an AsyncSandbox for running AI-sandbox VM ``name``."""
        return cls(Sandbox.from_vm(name, **options))

    async def _call(self, action: Callable[[ExecClient], T]) -> T:
        client = await asyncio.to_thread(self.sandbox.connect)
        try:
            return await _in_thread(client.close, action, client)
        finally:
            client.close()

    async def run(self, command: Command, **options: Any) -> ExecResult:
        """Run a command to completion; options as :meth:`ExecClient.run`.

        Cancelling the awaiting task closes the connection, so the guest kills the
        command; the task then raises CancelledError.
        """
        return await self._call(lambda c: c.run(command, **options))

    async def start(self, command: Command, **options: Any) -> AsyncSandboxProcess:
        """Start a command; iterate the result with ``async for``."""
        process = await asyncio.to_thread(self.sandbox.start, command, **options)
        return AsyncSandboxProcess(process)

    async def put_file(self, local: Path | str, remote: str, **options: Any) -> FileTransfer:
        """Upload a file; options as :meth:`ExecClient.put_file`."""
        return await self._call(lambda c: c.put_file(Path(local), remote, **options))

    async def get_file(self, remote: str, local: Path | str, **options: Any) -> FileTransfer:
        """Download a file; options as :meth:`ExecClient.get_file`."""
        return await self._call(lambda c: c.get_file(remote, Path(local), **options))

    async def ping(self) -> float:
        """Return the agent's round-trip time in seconds."""
        return await self._call(lambda c: c.ping())

    async def info(self) -> AgentInfo:
        """Return the agent's version, hostname, uptime and accounts."""
        return await self._call(lambda c: c.info())


def _next_or_none(iterator: Iterator[ExecEvent]) -> ExecEvent | None:
    return next(iterator, None)


async def _in_thread(on_cancel: Callable[[], None], fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a worker thread; if the awaiting task is cancelled, call ``on_cancel``.

    ``on_cancel`` closes the connection, which unblocks the worker (its socket call fails)
    and makes the guest kill whatever the call was running.
    """
    try:
        return await asyncio.to_thread(fn, *args)
    except asyncio.CancelledError:
        on_cancel()
        raise


__all__ = ["Sandbox", "AsyncSandbox", "SandboxProcess", "AsyncSandboxProcess", "Connector"]
