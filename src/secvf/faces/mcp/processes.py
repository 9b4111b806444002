"""Long exec commands: start, poll, write stdin, signal, close.

``exec_start`` starts a command in a sandbox and returns a process id at once; a
reader thread collects its output into bounded per-stream buffers; ``exec_poll``
returns (and drains) what arrived since the last poll, capped, with the byte counts
of what was returned, what is still buffered and what the buffer dropped; the exit
status once the command has ended. A process is forgotten after a poll has returned
its exit, or on ``exec_close`` (which kills a command that still runs); closing the
server kills them all.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from secvf import api
from secvf.errors import SecVFError, StateError

#: Bytes of output kept per stream between polls; more is dropped (and counted).
BUFFER_CAP = 4 * 1024 * 1024

#: Commands one server keeps at once (the exec bridge allows 16 connections per VM).
MAX_PROCESSES = 16


class UnknownProcess(SecVFError):
    """No exec process of that id (never started, already reaped, or closed)."""


@dataclass
class _Stream:
    data: bytearray = field(default_factory=bytearray)
    total: int = 0
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = BUFFER_CAP - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.dropped += max(len(chunk) - max(room, 0), 0)

    def take(self, cap: int) -> tuple[bytes, int]:
        """Up to ``cap`` buffered bytes (removed) and how many stay buffered."""
        out = bytes(self.data[:cap])
        del self.data[:cap]
        return out, len(self.data)


class ExecProcess:
    """One started command, its reader thread and its buffered output."""

    def __init__(self, vm: str, command: str | list[str], process: Any) -> None:
        self.id = secrets.token_hex(6)
        self.vm = vm
        self.command = command
        self._process = process
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.stdout = _Stream()
        self.stderr = _Stream()
        self.exited: dict[str, Any] | None = None
        self.error: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"mcp-exec-{self.id}",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for event in self._process:
                with self._lock:
                    if isinstance(event, api.Stdout):
                        self.stdout.add(event.data)
                    elif isinstance(event, api.Stderr):
                        self.stderr.add(event.data)
                    elif isinstance(event, api.Exited):
                        self.exited = {"exit_code": event.exit_code, "signal": event.signal,
                                       "timed_out": event.timed_out,
                                       "cancelled": event.cancelled,
                                       "duration_ms": event.duration_ms}
                    self._changed.notify_all()
        except SecVFError as exc:
            with self._lock:
                self.error = f"{type(exc).__name__}: {exc}"
                self._changed.notify_all()
        finally:
            with self._lock:
                if self.exited is None and self.error is None:
                    self.error = "the exec connection ended without an exit status"
                self._changed.notify_all()

    @property
    def done(self) -> bool:
        """The command has ended (or its connection has)."""
        return self.exited is not None or self.error is not None

    def poll(self, cap: int, wait_s: float) -> dict[str, Any]:
        """What arrived since the last poll (waiting up to ``wait_s`` for something)."""
        with self._changed:
            if not (self.stdout.data or self.stderr.data or self.done):
                self._changed.wait(wait_s)
            out, out_left = self.stdout.take(cap)
            err, err_left = self.stderr.take(cap)
            result: dict[str, Any] = {
                "process_id": self.id, "vm": self.vm, "running": not self.done,
                "stdout": out.decode("utf-8", "replace"), "stdout_bytes": len(out),
                "stdout_pending_bytes": out_left, "stdout_total_bytes": self.stdout.total,
                "stdout_dropped_bytes": self.stdout.dropped,
                "stderr": err.decode("utf-8", "replace"), "stderr_bytes": len(err),
                "stderr_pending_bytes": err_left, "stderr_total_bytes": self.stderr.total,
                "stderr_dropped_bytes": self.stderr.dropped,
                "exit": self.exited if not (out_left or err_left) else None,
                "error": self.error,
            }
        return result

    def write_stdin(self, data: bytes, *, eof: bool) -> None:
        """Send ``data`` (then EOF if ``eof``) to the command's stdin."""
        if data:
            self._process.write_stdin(data)
        if eof:
            self._process.close_stdin()

    def signal(self, signum: int) -> None:
        """Signal the command's process group in the guest."""
        self._process.send_signal(signum)

    def close(self) -> None:
        """Close the connection: the guest kills a command that still runs."""
        self._process.close()


class ExecProcesses:
    """The server's started commands, by id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, ExecProcess] = {}

    def start(self, vm: str, command: str | list[str], **options: Any) -> ExecProcess:
        """Start ``command`` in sandbox ``vm``. Raises StateError past MAX_PROCESSES."""
        with self._lock:
            if len(self._items) >= MAX_PROCESSES:
                raise StateError(f"{MAX_PROCESSES} exec processes are open; poll them to "
                                 "their end or exec_close some first")
        process = api.Sandbox.from_vm(vm).start(command, **options)
        item = ExecProcess(vm, command, process)
        with self._lock:
            self._items[item.id] = item
        return item

    def get(self, process_id: str) -> ExecProcess:
        """The process ``process_id``. Raises UnknownProcess."""
        with self._lock:
            item = self._items.get(process_id)
        if item is None:
            raise UnknownProcess(f"no exec process {process_id!r}: it was never started, was "
                                 "closed, or a poll already returned its exit")
        return item

    def forget(self, process_id: str) -> None:
        """Drop ``process_id`` from the table (it has ended or was closed)."""
        with self._lock:
            self._items.pop(process_id, None)

    def list(self) -> list[dict[str, Any]]:
        """Every open process: id, vm, command, running."""
        with self._lock:
            items = list(self._items.values())
        return [{"process_id": p.id, "vm": p.vm, "command": p.command, "running": not p.done}
                for p in items]

    def close_all(self) -> None:
        """Close every process (the server is stopping)."""
        with self._lock:
            items, self._items = list(self._items.values()), {}
        for item in items:
            item.close()
