"""A fake of the API layer for the TUI tests: VMs, sandboxes, networks, analyses, logs
and the audit held in memory, installed over ``secvf.api``'s functions with
``monkeypatch`` (the TUI calls ``api.NAME`` at call time). Helpers drive a headless app
and read its screen as text."""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from secvf import api
from secvf.errors import NotFound

#: Upper bound of pilot pauses a wait takes before it fails (a bound, not a timing).
MAX_PAUSES = 400


def status(name: str, *, kind: str = "generic", state: str = "stopped",
           **extra: Any) -> dict[str, Any]:
    """A ``vm_status`` dict."""
    running = state in ("running", "paused")
    base = {"name": name, "id": f"id-{name}", "kind": kind, "state": state,
            "pid": 100 if running else None, "qemu_pid": 101 if running else None,
            "accel": "tcg" if running else None, "accel_reason": None,
            "uptime_s": 65.0 if running else None, "guest_ready": running,
            "devices": [], "channels": [], "network": "nat", "nics": [], "cpus": 1,
            "memory_mib": 512, "exec_socket": None, "last_run": None, "vsock_backend": None,
            "device_errors": [], "snapshots": [], "restored_from": None, "hotplugged": []}
    return base | extra


@dataclass
class FakeAPI:
    """The VMs and what each call did; ``events`` feeds ``watch_vm_changes``."""

    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    errors: dict[str, Exception] = field(default_factory=dict)  # call name -> raised
    gates: dict[str, threading.Event] = field(default_factory=dict)  # call name -> waits
    networks: list[dict[str, Any]] = field(default_factory=list)
    network_shows: dict[str, dict[str, Any]] = field(default_factory=dict)
    analyses: list[dict[str, Any]] = field(default_factory=list)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit_result: dict[str, Any] = field(
        default_factory=lambda: {"vms": [], "stray": [], "finding_count": 0})
    logs: list[dict[str, Any]] = field(default_factory=list)
    exec_events: list[Any] = field(default_factory=list)

    def add(self, name: str, **kwargs: Any) -> None:
        """Add VM ``name`` (``status`` keywords)."""
        self.vms[name] = status(name, **kwargs)

    def called(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """The arguments of each call of API function ``name``."""
        return [(args, kwargs) for call, args, kwargs in self.calls if call == name]

    def change(self, name: str, event: str, **fields: Any) -> None:
        """VM ``name``'s status takes ``fields``, and ``event`` is written."""
        self.vms[name].update(fields)
        self.events.put({"event": event, "vm": name})

    # ---- the API -----------------------------------------------------------------

    def _record(self, call: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((call, args, kwargs))
        if call in self.gates:
            self.gates[call].wait(30)
        if call in self.errors:
            raise self.errors[call]

    def list_vms(self) -> list[Any]:
        return [SimpleNamespace(bundle=SimpleNamespace(name=n), config=object(), error=None)
                for n in sorted(self.vms)]

    def vm_status(self, name: str) -> dict[str, Any]:
        if name not in self.vms:
            raise NotFound(f"no VM named {name!r}")
        return dict(self.vms[name])

    def get_vm(self, name: str) -> Any:
        self.vm_status(name)
        return SimpleNamespace(channels=None)

    def list_sandboxes(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.vms.values() if s["kind"] == "ai-sandbox"]

    def start_vm(self, name: str, **kwargs: Any) -> dict[str, Any]:
        self._record("start_vm", name, **kwargs)
        self.vms[name].update(state="running", uptime_s=0.0, accel="tcg")
        return self.vm_status(name)

    def start_sandbox(self, name: str, **kwargs: Any) -> dict[str, Any]:
        self._record("start_sandbox", name, **kwargs)
        self.vms[name].update(state="running", uptime_s=0.0)
        return self.vm_status(name)

    def stop_vm(self, name: str, *, force: bool = False, timeout: float = 30.0,
                progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
        if progress is not None:
            progress(api.StopWaiting(left_s=timeout - 1, timeout_s=timeout))
        self._record("stop_vm", name, force=force)
        self.vms[name].update(state="stopped", uptime_s=None)
        return self.vm_status(name)

    def pause_vm(self, name: str) -> dict[str, Any]:
        self._record("pause_vm", name)
        self.vms[name]["state"] = "paused"
        return self.vm_status(name)

    def resume_vm(self, name: str) -> dict[str, Any]:
        self._record("resume_vm", name)
        self.vms[name]["state"] = "running"
        return self.vm_status(name)

    def delete_vm(self, name: str, *, force: bool = False) -> None:
        self._record("delete_vm", name, force=force)
        del self.vms[name]

    def watch_vm_changes(self, *, stop: Callable[[], bool],
                         poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
        while not stop():
            try:
                yield self.events.get(timeout=0.05)
            except queue.Empty:
                continue

    def watch_serial_log(self, name: str, *, stop: Callable[[], bool],
                         **kwargs: Any) -> Iterator[bytes]:
        yield b"boot\x1b[2Jline one\nline two\n"

    def list_networks(self) -> list[dict[str, Any]]:
        return self.networks

    def show_network(self, name: str) -> dict[str, Any]:
        self._record("show_network", name)
        return self.network_shows[name]

    def list_analyses(self) -> list[dict[str, Any]]:
        return self.analyses

    def show_analysis(self, analysis_id: str) -> dict[str, Any]:
        return self.reports[analysis_id]

    def audit(self) -> dict[str, Any]:
        return self.audit_result

    def query_logs(self, stream: str, **kwargs: Any) -> list[dict[str, Any]]:
        self._record("query_logs", stream, **kwargs)
        vm, event = kwargs.get("vm"), kwargs.get("event")
        return [r for r in self.logs if r.get("stream", "security") == stream
                and (vm is None or r.get("vm") == vm)
                and (event is None or r.get("event") == event)]

    def watch_logs(self, stream: str, *, stop: Callable[[], bool],
                   **kwargs: Any) -> Iterator[dict[str, Any]]:
        while not stop():
            threading.Event().wait(0.05)
        return
        yield

    def connect_exec(self, name: str) -> Any:
        self._record("connect_exec", name)
        return FakeExecClient(self.exec_events)

    NAMES = ("list_vms", "vm_status", "get_vm", "list_sandboxes", "start_vm",
             "start_sandbox", "stop_vm", "pause_vm", "resume_vm", "delete_vm",
             "watch_vm_changes", "watch_serial_log", "list_networks", "show_network",
             "list_analyses", "show_analysis", "audit", "query_logs", "watch_logs",
             "connect_exec")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
        """Put this fake in place of the API functions the TUI calls."""
        for name in self.NAMES:
            monkeypatch.setattr(api, name, getattr(self, name))
        return self


class FakeExecClient:
    """``connect_exec``'s client: ``start`` yields the given events."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.commands: list[str] = []

    def __enter__(self) -> FakeExecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start(self, command: str) -> Any:
        self.commands.append(command)
        events = self.events

        class Session:
            def __enter__(self) -> Session:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def __iter__(self) -> Iterator[Any]:
                return iter(events)

            def cancel(self) -> None:
                return None

            def close(self) -> None:
                return None
        return Session()


def screen_text(app: Any) -> str:
    """What the app's screen shows, as plain text (Textual's own screenshot, without
    styles)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True,
                      force_terminal=True, color_system=None, legacy_windows=False)
    console.print(app.screen._compositor.render_update(
        full=True, screen_stack=app._background_screens))
    return console.export_text()


async def until(pilot: Any, condition: Callable[[], bool], what: str,
                pauses: int = MAX_PAUSES) -> None:
    """Let the app run until ``condition()`` holds (at most ``pauses`` pauses)."""
    for _ in range(pauses):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"never happened: {what}\n{screen_text(pilot.app)}")


@pytest.fixture
def anyio_backend() -> str:
    """The TUI tests run on asyncio (Textual's loop), through anyio's pytest plugin."""
    return "asyncio"
