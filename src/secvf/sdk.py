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
import signal
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Generic, Self, TypeVar

from secvf.exec import (
    AgentInfo,
    AttachResult,
    AttachSession,
    Command,
    DetachedProcessInfo,
    DetachedStart,
    ExecClient,
    ExecEvent,
    ExecResult,
    ExecSession,
    Exited,
    FileTransfer,
    protocol,
)
from secvf.exec.channel import CONNECT_TIMEOUT_S
from secvf.exec.stream import OutputCallback, OutputStream

T = TypeVar("T")
S = TypeVar("S", bound=OutputStream)
Connector = Callable[[], ExecClient]
"""Opens a fresh, handshaken connection to the sandbox's agent."""


class _Streamed(Generic[S]):
    """An exec or attach stream that owns its connection: iterate for its events; the
    connection closes when the stream has ended or on :meth:`close`."""

    def __init__(self, client: ExecClient, session: S) -> None:
        self._client = client
        self._session = session
        self.pid = session.pid  # guest pid

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} exited={self.exited}>"

    def __enter__(self) -> Self:
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

    def close(self) -> None:
        """Close the connection (for an exec, a command still running is killed by the
        guest; an attached background process keeps running)."""
        self._client.close()


class SandboxProcess(_Streamed[ExecSession]):
    """A command started with :meth:`Sandbox.start`; owns its connection.

    Iterate for events (``Stdout``, ``Stderr``, ``StdinError``, finally ``Exited``);
    the connection closes when the command has exited or on :meth:`close` (the guest
    then kills a command still running).
    """

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


class SandboxAttachment(_Streamed[AttachSession]):
    """An attach to a background process (:meth:`Sandbox.attach`); owns its connection.

    Iterate for events (``OutputDropped`` first if the agent's 1 MiB buffer had dropped
    output already, ``Stdout``, ``Stderr``, finally ``Exited``), or :meth:`collect`.
    :meth:`close` (or leaving the ``with`` block) detaches: the process keeps running.
    """

    def __init__(self, client: ExecClient, session: AttachSession) -> None:
        super().__init__(client, session)
        self.id = session.process_id  # the background process's id

    @property
    def dropped_bytes(self) -> int:
        """Output of the process this attach has not seen (dropped by the agent's buffer)."""
        return self._session.dropped_bytes

    def collect(self, **options: Any) -> AttachResult:
        """Follow the process to its exit and return its output; options as
        :meth:`secvf.exec.AttachSession.collect`."""
        try:
            return self._session.collect(**options)
        finally:
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

    def start_detached(
        self,
        command: Command,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> DetachedStart:
        """Start a background process that outlives this call (a dev server, a watcher);
        see :meth:`ExecClient.start_detached`. Returns its ``id`` and ``pid``.

        Raises:
            DetachedProcessError: ``limit_reached``, or ``unsupported`` (old agent).
            CommandStartFailed, AgentUnavailable, ExecRefused, ProtocolError.
        """
        return self._call(lambda c: c.start_detached(command, env=env, cwd=cwd, user=user))

    def list_detached(self) -> list[DetachedProcessInfo]:
        """The background processes, running and recently exited (``secvf vm ps``)."""
        return self._call(lambda c: c.list_detached())

    def attach(self, process_id: str) -> SandboxAttachment:
        """Follow a background process's buffered, then live output to its exit; see
        :meth:`ExecClient.attach`. Closing the attachment only detaches.

        Raises:
            DetachedProcessError: ``not_found``, ``limit_reached`` or ``unsupported``.
            AgentUnavailable, ExecRefused, ProtocolError.
        """
        client = self._connect()
        try:
            session = client.attach(process_id)
        except BaseException:
            client.close()
            raise
        return SandboxAttachment(client, session)

    def kill_detached(self, process_id: str, signum: int = signal.SIGTERM) -> None:
        """Signal a background process's process group (default SIGTERM); see
        :meth:`ExecClient.kill_detached`."""
        self._call(lambda c: c.kill_detached(process_id, signum))


P = TypeVar("P", bound=_Streamed[Any])


class _AsyncStreamed(Generic[P]):
    """Asyncio view of a stream that owns its connection (``async for event in it``)."""

    def __init__(self, process: P) -> None:
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

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def exited(self) -> Exited | None:
        """The exit event once the stream has ended, else None."""
        return self._process.exited

    async def wait(self) -> Exited:
        """Discard remaining output and return the exit event."""
        return await _in_thread(self._process.close, self._process.wait)

    def close(self) -> None:
        """Close the connection (an exec's running command is killed by the guest; an
        attached background process keeps running)."""
        self._process.close()


class AsyncSandboxProcess(_AsyncStreamed[SandboxProcess]):
    """Asyncio view of a :class:`SandboxProcess` (``async for event in proc``)."""

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


class AsyncSandboxAttachment(_AsyncStreamed[SandboxAttachment]):
    """Asyncio view of a :class:`SandboxAttachment`; cancelling an awaiting task only
    detaches (the background process keeps running)."""

    def __init__(self, attachment: SandboxAttachment) -> None:
        super().__init__(attachment)
        self.id = attachment.id  # the background process's id

    @property
    def dropped_bytes(self) -> int:
        """Output of the process this attach has not seen (dropped by the agent's buffer)."""
        return self._process.dropped_bytes

    async def collect(self, **options: Any) -> AttachResult:
        """Follow the process to its exit and return its output."""
        return await _in_thread(self._process.close, lambda: self._process.collect(**options))


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

    async def start_detached(self, command: Command, **options: Any) -> DetachedStart:
        """Start a background process; options as :meth:`Sandbox.start_detached`."""
        return await self._call(lambda c: c.start_detached(command, **options))

    async def list_detached(self) -> list[DetachedProcessInfo]:
        """The background processes, running and recently exited."""
        return await self._call(lambda c: c.list_detached())

    async def attach(self, process_id: str) -> AsyncSandboxAttachment:
        """Follow a background process (``async for event in it``, or ``await
        it.collect()``); closing it, or cancelling, only detaches."""
        attachment = await asyncio.to_thread(self.sandbox.attach, process_id)
        return AsyncSandboxAttachment(attachment)

    async def kill_detached(self, process_id: str, signum: int = signal.SIGTERM) -> None:
        """Signal a background process's process group (default SIGTERM)."""
        await self._call(lambda c: c.kill_detached(process_id, signum))


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


__all__ = [
    "Sandbox",
    "AsyncSandbox",
    "SandboxProcess",
    "AsyncSandboxProcess",
    "SandboxAttachment",
    "AsyncSandboxAttachment",
    "Connector",
]
