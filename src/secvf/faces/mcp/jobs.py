"""Work that outlives a tool call: packet captures, analyses and port forwards.

Each runs in a thread of the server (or, for a forward, as the SDK's listener) and
has an id; the tools that started it report on it and stop it. Analyses are also
persisted by SecVF itself (``$SECVF_HOME/analyses/<id>/``), so their status and
report outlive the server; captures and forwards end with it.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secvf import api
from secvf.errors import NotFound, SecVFError

from .output import jsonable


@dataclass
class Capture:
    """A capture running in a thread until its limits or :meth:`stop`."""

    id: str
    network: str
    path: Path | None = None
    files: list[Path] = field(default_factory=list)  # every file it wrote, oldest first
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the capture to stop and wait for its thread."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout_s)

    def as_json(self) -> dict[str, Any]:
        """Its id, network, file, counters and state."""
        running = self.thread is not None and self.thread.is_alive()
        return {"capture_id": self.id, "network": self.network,
                "path": str(self.path) if self.path else None, "running": running,
                "progress": self.progress, "error": self.error}


@dataclass
class AnalysisRun:
    """An ``analyze`` run in a thread; ``analysis_id`` once SecVF has given it one."""

    run_id: str
    sample: Path
    analysis_id: str | None = None
    stages: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    known: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None


class Jobs:
    """The server's captures, analysis runs and port forwards."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.captures: dict[str, Capture] = {}
        self.analyses: dict[str, AnalysisRun] = {}
        self.forwards: dict[str, tuple[str, str, Any]] = {}

    # -- captures
    def start_capture(self, request: Any) -> Capture:
        """Start ``api.capture_network(request)`` in a thread."""
        capture = Capture(id=secrets.token_hex(6), network=request.network, path=request.path)

        def progress(p: Any) -> None:
            capture.progress = jsonable(p)
            files = [Path(f) for f in getattr(p, "files", None) or []]
            if files:  # the file being written (a rotating capture writes several)
                capture.path, capture.files = files[-1], files

        def run() -> None:
            try:
                progress(api.capture_network(request, progress, capture._stop.is_set))
            except SecVFError as exc:
                capture.error = f"{type(exc).__name__}: {exc}"

        capture.thread = threading.Thread(target=run, name=f"mcp-capture-{capture.id}",
                                          daemon=True)
        with self._lock:
            self.captures[capture.id] = capture
        capture.thread.start()
        return capture

    def capture(self, capture_id: str) -> Capture:
        """Capture ``capture_id``. Raises NotFound."""
        with self._lock:
            found = self.captures.get(capture_id)
        if found is None:
            raise NotFound(f"no capture {capture_id!r} was started by this server")
        return found

    def capture_paths(self) -> list[Path]:
        """The files this server's captures wrote."""
        with self._lock:
            return [f for c in self.captures.values()
                    for f in (c.files or ([c.path] if c.path is not None else []))]

    # -- analyses
    def start_analysis(self, request: Any, *, wait_for_id_s: float) -> AnalysisRun:
        """Start ``api.analyze([request])`` in a thread; returns once SecVF named the
        analysis (or ``wait_for_id_s`` passed, or it failed)."""
        run = AnalysisRun(run_id=secrets.token_hex(6), sample=request.sample)

        def progress(analysis_id: str, stage: str) -> None:
            with run.changed:
                run.analysis_id = analysis_id
                run.stages.append(stage)
                run.changed.notify_all()
            run.known.set()

        def work() -> None:
            try:
                (result,) = api.analyze([request], progress=progress)
                run.analysis_id = run.analysis_id or result.id
                run.result = {"analysis_id": result.id, "verdict": result.verdict,
                              "error": result.error, "stages_s": result.stages_s}
            except SecVFError as exc:
                run.error = f"{type(exc).__name__}: {exc}"
            finally:
                with run.changed:
                    run.changed.notify_all()
                run.known.set()

        run.thread = threading.Thread(target=work, name=f"mcp-analysis-{run.run_id}",
                                      daemon=True)
        with self._lock:
            self.analyses[run.run_id] = run
        run.thread.start()
        run.known.wait(wait_for_id_s)
        return run

    def wait_analysis(self, run: AnalysisRun, timeout_s: float,
                      on_stage: Callable[[int, str], None]) -> None:
        """Wait up to ``timeout_s`` for ``run`` to end, calling ``on_stage(n, stage)``
        for each stage it reaches."""
        seen = 0
        deadline = threading.Event()
        timer = threading.Timer(timeout_s, deadline.set)
        timer.start()
        try:
            while True:
                with run.changed:
                    while (len(run.stages) == seen and run.thread is not None
                           and run.thread.is_alive() and not deadline.is_set()):
                        run.changed.wait(0.5)
                    new = run.stages[seen:]
                for stage in new:
                    seen += 1
                    on_stage(seen, stage)
                if deadline.is_set() or run.thread is None or not run.thread.is_alive():
                    return
        finally:
            timer.cancel()

    # -- port forwards
    def add_forward(self, vm: str, spec: str, forward: Any) -> str:
        """Keep ``forward`` (a started PortForward); returns its id."""
        forward_id = secrets.token_hex(6)
        with self._lock:
            self.forwards[forward_id] = (vm, spec, forward)
        return forward_id

    def remove_forward(self, forward_id: str) -> tuple[str, str, Any]:
        """Forget and return forward ``forward_id``. Raises NotFound."""
        with self._lock:
            found = self.forwards.pop(forward_id, None)
        if found is None:
            raise NotFound(f"no port forward {forward_id!r} was started by this server")
        return found

    def close_all(self) -> None:
        """Stop every capture and forward (the server is stopping); analyses run on
        in SecVF's own records until their threads end with the process."""
        with self._lock:
            captures = list(self.captures.values())
            forwards, self.forwards = list(self.forwards.values()), {}
        for capture in captures:
            capture.stop()
        for _vm, _spec, forward in forwards:
            forward.close()
