"""``secvf net capture``: a network's frames into pcapng files, live or from its ring.

The switch streams the frames it accepts to each capture client and never waits for
one: frames a slow client could not take are counted by the switch (``Dropped``) and
shown, never lost silently. This side writes them as pcapng — one interface per switch
port, named after its VM — rotating to a new file at ``max_size`` and keeping at most
``max_files`` files, optionally only the frames a filter selects (decoded for that, so a
filtered capture costs more per frame and is likelier to fall behind). A full disk (or
any write error) ends the capture with a clear error; the switch keeps forwarding. If
the switch restarts meanwhile, the capture reconnects and carries on in the same file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from secvf.errors import NetworkError
from secvf.model.config import now_iso
from secvf.model.network import NetworkConfig, port_name
from secvf.net.capture import Dropped, Frame, Interface, Interfaces
from secvf.net.pcapng import PcapngWriter
from secvf.store import networks, paths
from secvf.store.library import get_vm
from secvf.workflows.networks import runtime_dir, switch_stats

#: How often progress is reported, and how long a reconnect to a restarted switch may take.
PROGRESS_EVERY_S = 0.5
RECONNECT_WITHIN_S = 5.0
DEFAULT_MAX_FILES = 10


@dataclass
class CaptureProgress:
    """Where a capture stands; passed to the progress callback and returned at the end."""

    network: str
    files: list[str] = field(default_factory=list)  # written so far, oldest first
    frames: int = 0  # written to the files
    bytes: int = 0  # written to the files (pcapng blocks included)
    seen: int = 0  # frames received from the switch (written or filtered out)
    switch_dropped: int = 0  # frames the switch could not hand to this capture
    reconnects: int = 0  # the switch restarted and the capture reconnected
    removed: list[str] = field(default_factory=list)  # files rotated away (max_files)
    ended: str = "running"  # duration, count, interrupted, switch-stopped


Progress = Callable[[CaptureProgress], None]


@dataclass(frozen=True)
class CaptureRequest:
    """What to capture, where to, and when to stop."""

    network: str
    path: Path | None = None  # first file (default: under $SECVF_HOME/captures)
    vm: str | None = None  # only this VM's ports
    filter: str | None = None
    duration_s: float | None = None
    max_frames: int | None = None
    max_size: int | None = None  # rotate at this many bytes per file
    max_files: int = DEFAULT_MAX_FILES
    max_bytes_total: int | None = None  # stop once the files hold this many bytes


def default_capture_path(network: str) -> Path:
    """``$SECVF_HOME/captures/<network>-<UTC time>.pcapng``."""
    stamp = now_iso().replace(":", "").replace("-", "")
    return paths.ensure_private_dir(paths.secvf_home() / "captures") / f"{network}-{stamp}.pcapng"


class RotatingPcapng:
    """pcapng output that starts a new file (same interfaces) past ``max_size`` bytes
    and keeps the newest ``max_files``: ``cap.pcapng``, ``cap.1.pcapng``, ..."""

    def __init__(self, first: Path, max_size: int | None, max_files: int,
                 progress: CaptureProgress) -> None:
        self.first, self.max_size, self.max_files = first, max_size, max(1, max_files)
        self.progress = progress
        self.interfaces: dict[str, int] = {}  # port -> pcapng interface id
        self._names: list[tuple[str, str]] = []  # (name, description) in id order
        self._fh: BinaryIO | None = None
        self._writer: PcapngWriter | None = None
        self._open(first)

    def _open(self, path: Path) -> None:
        try:  # 0600: a capture holds whatever the guests sent
            self._fh = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                                 "wb")
        except OSError as exc:
            raise NetworkError(f"cannot write capture file {path}: {exc.strerror}") from exc
        self._writer = PcapngWriter(self._fh)
        for name, description in self._names:
            self._writer.add_interface(name, description)
        self.progress.files.append(str(path))

    def interface(self, item: Interface) -> int:
        """The pcapng interface id of a switch port (added on first sight)."""
        known = self.interfaces.get(item.port)
        if known is None:
            assert self._writer is not None
            name, description = item.vm, f"VM {item.vm}, NIC {item.nic}, port {item.port}"
            known = self.interfaces[item.port] = self._guard(
                lambda w: w.add_interface(name, description))
            self._names.append((name, description))
        return known

    def write(self, ts_ns: int, interface: int, frame: bytes) -> None:
        """Write one frame (rotating first if this file is full)."""
        assert self._writer is not None
        if self.max_size is not None and self._writer.bytes_written >= self.max_size:
            self._rotate()
        self.progress.bytes += self._guard(lambda w: w.write(ts_ns, interface, frame))
        self.progress.frames += 1

    def _guard(self, step: Callable[[PcapngWriter], int]) -> int:
        assert self._writer is not None
        try:
            return step(self._writer)
        except OSError as exc:
            where = self.progress.files[-1]
            why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror
            raise NetworkError(f"capture stopped: cannot write {where}: {why} (after "
                               f"{self.progress.frames} frames; the switch keeps "
                               "forwarding)") from exc

    def _rotate(self) -> None:
        self.close()
        number = len(self.progress.files) + len(self.progress.removed)
        self._open(self.first.with_name(f"{self.first.stem}.{number}{self.first.suffix}"))
        while len(self.progress.files) > self.max_files:
            oldest = self.progress.files.pop(0)
            with contextlib.suppress(OSError):
                Path(oldest).unlink()
            self.progress.removed.append(oldest)

    def close(self) -> None:
        """Flush and close the current file.

        Raises:
            NetworkError: the last frames could not be written (disk full).
        """
        fh, self._fh = self._fh, None
        if fh is not None:
            self._guard(lambda _writer: fh.close() or 0)


@contextlib.contextmanager
def _finishing(out: RotatingPcapng) -> Iterator[None]:
    """Close ``out`` after the block; if the block failed, that error wins over one of
    closing (a full disk shows once)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(NetworkError):
            out.close()
        raise
    out.close()


def capture(request: CaptureRequest, progress: Progress | None = None,
            stop: Callable[[], bool] = lambda: False) -> CaptureProgress:
    """Capture ``request.network`` until its duration, frame count or ``stop()`` says so
    (or the switch stops for good); returns the final :class:`CaptureProgress`.

    Raises:
        NotFound: no such network or VM. NetworkError: no switch runs (no VM is on the
        network), the VM has no NIC on it, or a file cannot be written (disk full).
        InvalidFilter: the filter does not parse (before anything is captured).
    """
    config = networks.load_network(request.network)
    match = _filter(request.filter)
    ports = _ports_of(request.vm, config) if request.vm else None
    if switch_stats(config) is None:
        raise NetworkError(f"network '{config.name}' has no running switch (no running VM "
                           "is on it), so there is nothing to capture")
    state = CaptureProgress(config.name)
    out = RotatingPcapng(request.path or default_capture_path(config.name), request.max_size,
                         request.max_files, state)
    deadline = None if request.duration_s is None else time.monotonic() + request.duration_s
    def done() -> bool:
        if request.max_bytes_total is not None and state.bytes >= request.max_bytes_total:
            state.ended = "size"
            return True
        return stop()

    with _finishing(out):
        _run(config, ports, out, state, match, deadline, request.max_frames, progress, done)
    if progress is not None:
        progress(state)
    return state


def _run(config: NetworkConfig, ports: list[str] | None, out: RotatingPcapng,
         state: CaptureProgress, match: Callable[[str, int, bytes], bool] | None,
         deadline: float | None, max_frames: int | None, progress: Progress | None,
         stop: Callable[[], bool]) -> None:
    from secvf.net.capture import open_capture
    from secvf.net.control import SwitchUnavailable

    names: dict[int, Interface] = {}
    connected = False
    reported = time.monotonic()
    base_dropped = 0
    while True:
        try:
            stream = open_capture(runtime_dir(config), ports)
        except SwitchUnavailable:
            if not _wait_for_switch(config, deadline, stop):
                state.ended = "switch-stopped"
                return
            continue
        if connected:
            state.reconnects += 1
        connected = True
        with stream:
            for item in _items(stream, deadline, stop):
                if isinstance(item, Interfaces):
                    names.update({i.index: i for i in item.interfaces})
                elif isinstance(item, Dropped):
                    state.switch_dropped = base_dropped + item.total
                elif isinstance(item, Frame):
                    state.seen += 1
                    iface = names.get(item.interface)
                    if iface is not None and (match is None or
                                              match(iface.vm, item.ts_ns, item.data)):
                        out.write(item.ts_ns, out.interface(iface), item.data)
                        if max_frames is not None and state.frames >= max_frames:
                            state.ended = "count"
                            return
                now = time.monotonic()
                if progress is not None and now - reported >= PROGRESS_EVERY_S:
                    progress(state)
                    reported = now
            if stop():
                if state.ended == "running":  # not a limit of done()'s, such as "size"
                    state.ended = "interrupted"
                return
            if deadline is not None and time.monotonic() >= deadline:
                state.ended = "duration"
                return
        base_dropped = state.switch_dropped  # a new switch counts from zero
        names.clear()


def _items(stream: object, deadline: float | None, stop: Callable[[], bool]
           ) -> Iterator[Interfaces | Frame | Dropped]:
    """The stream's items until it ends, the deadline passes or ``stop()``; wakes at
    least every :data:`PROGRESS_EVERY_S` to check."""
    from secvf.net.capture import CaptureStream

    assert isinstance(stream, CaptureStream)
    yield stream.interfaces
    while not stop():
        wait = PROGRESS_EVERY_S
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                return
        try:
            item = stream.read(timeout=wait)
        except TimeoutError:
            continue
        except OSError:
            return  # the switch went away: the caller reconnects
        if item is None:
            return
        yield item


def _wait_for_switch(config: NetworkConfig, deadline: float | None,
                     stop: Callable[[], bool]) -> bool:
    """Wait (up to :data:`RECONNECT_WITHIN_S`) for a restarted switch to answer."""
    until = time.monotonic() + RECONNECT_WITHIN_S
    if deadline is not None:
        until = min(until, deadline)
    while time.monotonic() < until and not stop():
        if switch_stats(config) is not None:
            return True
        time.sleep(0.1)
    return False


def _filter(expression: str | None) -> Callable[[str, int, bytes], bool] | None:
    if not expression:
        return None
    from secvf.net.decode import decode
    from secvf.net.filters import compile_filter

    compiled = compile_filter(expression)
    return lambda vm, ts_ns, frame: compiled(decode(ts_ns / 1e9, vm, frame))


def _ports_of(vm: str, config: NetworkConfig) -> list[str]:
    _, vm_config = get_vm(vm)
    ports = [port_name(vm_config.id, i) for i, nic in enumerate(vm_config.nics)
             if nic.network == config.name]
    if not ports:
        raise NetworkError(f"VM '{vm}' has no NIC on network '{config.name}'")
    return ports


def export_ring(network: str, path: Path | None = None) -> CaptureProgress:
    """Write network ``network``'s always-on ring (its last frames) to a pcapng file.

    Raises:
        NotFound, NetworkError (no switch runs, or the file cannot be written).
    """
    config = networks.load_network(network)
    interfaces, frames = _ring(config)
    state = CaptureProgress(config.name, ended="ring")
    out = RotatingPcapng(path or default_capture_path(config.name), None, 1, state)
    by_index = {i.index: i for i in interfaces}
    with _finishing(out):
        for frame in frames:
            iface = by_index.get(frame.interface)
            if iface is not None:
                state.seen += 1
                out.write(frame.ts_ns, out.interface(iface), frame.data)
    return state


def ring_frames(network: str) -> Iterator[tuple[float, str, bytes]]:
    """Network ``network``'s ring as ``(seconds, VM, frame)`` tuples, oldest first (the
    source ``secvf packets NETWORK`` reads).

    Raises:
        NotFound, NetworkError (no switch runs).
    """
    interfaces, frames = _ring(networks.load_network(network))
    by_index = {i.index: i.vm for i in interfaces}
    for frame in frames:
        yield frame.ts_ns / 1e9, by_index.get(frame.interface, "-"), frame.data


def _ring(config: NetworkConfig) -> tuple[list[Interface], list[Frame]]:
    from secvf.net.capture import read_ring
    from secvf.net.control import SwitchUnavailable

    try:
        return read_ring(runtime_dir(config))
    except SwitchUnavailable as exc:
        raise NetworkError(f"network '{config.name}' has no running switch, so no ring "
                           f"(it lives in the switch while a VM is on the network): {exc}"
                           ) from None
