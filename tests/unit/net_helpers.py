"""Shared helpers for the switch tests: frames, configs, fake QEMU peers, a live network.

:class:`LiveNetwork` runs the real watchdog and switch on a short ``/tmp`` directory
(socket paths must stay under 108 bytes) through the same launcher the VM side calls;
:class:`FakeQemu` is a bound ``AF_UNIX`` datagram socket at a port's ``.q`` path, as QEMU's
``-netdev dgram`` would be. :func:`engine_under_test` builds an engine with recording
fakes for ``transmit`` and ``emit``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secvf.net import launcher
from secvf.net.config import NetPaths, PortConfig, SwitchConfig
from secvf.net.control import query
from secvf.net.engine import Engine, Port
from secvf.store.eventlog import EventLog, Severity

VM_IDS = [f"{n:08x}-0000-4000-8000-000000000000" for n in range(0xA0000001, 0xA0000020)]
IPV4 = 0x0800


def mac(n: int) -> str:
    """The test MAC of VM number ``n``."""
    return f"52:54:00:00:00:{n:02x}"


def mac_bytes(n: int) -> bytes:
    """:func:`mac` as bytes."""
    return bytes.fromhex(mac(n).replace(":", ""))


def eth(dst: bytes, src: bytes, payload: bytes = b"x" * 50, ethertype: int = IPV4) -> bytes:
    """An Ethernet frame."""
    return dst + src + ethertype.to_bytes(2, "big") + payload


def switch_config(logs_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A ``switch.json`` object (contract defaults, then ``overrides``)."""
    return {"network": "lab", "network_id": "0f0e0d0c-0000-4000-8000-000000000000",
            "isolate_guests": False, "frames_per_s": 10000, "broadcast_per_s": 1000,
            "min_frame": 14, "max_frame": 9000, "ring_frames": 1000,
            "logs_dir": str(logs_dir)} | overrides


def port_object(paths: NetPaths, n: int, *, router: bool = False, pid: int | None = None
                ) -> dict[str, Any]:
    """The port file object for VM number ``n`` (NIC 0)."""
    name = f"{VM_IDS[n][:8]}-0"
    return {"port": name, "vm": f"vm{n}", "vm_id": VM_IDS[n], "nic": 0, "mac": mac(n),
            "router": router, "qemu_path": str(paths.qemu_path(name)),
            "switch_path": str(paths.switch_path(name)), "pid": pid or os.getpid()}


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> float:
    """Poll ``predicate`` until true; return the seconds it took. Fails after ``timeout``."""
    begin = time.monotonic()
    while not predicate():
        if time.monotonic() - begin > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.02)
    return time.monotonic() - begin


class FakeQemu:
    """A port's QEMU side: bound at ``qemu_path``, sends to ``switch_path``."""

    def __init__(self, port: dict[str, Any]) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(port["qemu_path"])
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(port["qemu_path"])
        self.sock.settimeout(2.0)

    def send(self, frame: bytes) -> None:
        """Send one frame to the switch (ignoring "not there yet")."""
        with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
            self.sock.sendto(frame, self.port["switch_path"])

    def recv(self, timeout: float = 2.0) -> bytes | None:
        """The next frame delivered to this VM, or None after ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None

    def drain(self, timeout: float = 0.2) -> list[bytes]:
        """Every frame that arrives until ``timeout`` passes with none."""
        frames = []
        while (frame := self.recv(timeout)) is not None:
            frames.append(frame)
        return frames

    def close(self) -> None:
        """Close and unlink the socket."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.port["qemu_path"])


@dataclass
class LiveNetwork:
    """A real watchdog + switch on a fresh directory, with fake QEMU peers."""

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    peers: dict[int, FakeQemu] = field(default_factory=dict)

    @property
    def netdir(self) -> Path:
        return self.root / "net"

    @property
    def paths(self) -> NetPaths:
        return NetPaths(self.netdir)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def start(self, **overrides: Any) -> None:
        """``ensure_switch`` with the test config plus ``overrides``."""
        self.logs.mkdir(mode=0o700, exist_ok=True)
        self.config = switch_config(self.logs, **overrides)
        launcher.ensure_switch(self.netdir, self.config)

    def add(self, n: int, **kwargs: Any) -> FakeQemu:
        """Bind VM ``n``'s fake QEMU and write its port (the VM side's order)."""
        port = port_object(self.paths, n, **kwargs)
        self.peers[n] = FakeQemu(port)
        launcher.write_port(self.netdir, port)
        return self.peers[n]

    def remove(self, n: int) -> None:
        """Release VM ``n``'s port and close its peer."""
        peer = self.peers.pop(n)
        launcher.release_port(self.netdir, peer.port["port"])
        peer.close()

    def query(self, op: str, **fields: Any) -> dict[str, Any]:
        """One control request."""
        return query(self.netdir, {"op": op, **fields})

    def port_stats(self, n: int) -> dict[str, Any]:
        """VM ``n``'s entry in ``stats``."""
        name = self.peers[n].port["port"]
        return next(p for p in self.query("stats")["ports"] if p["port"] == name)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Security events written so far (of kind ``name``)."""
        return [e for e in EventLog(self.logs).read() if name is None or e["event"] == name]

    def watchdog_pid(self) -> int | None:
        """The pid in ``watchdog.lock`` (None if there is none)."""
        with contextlib.suppress(OSError, ValueError):
            return int(self.paths.watchdog_lock.read_text())
        return None

    def stop(self) -> None:
        """Stop the watchdog we started (by its pid) and close every peer."""
        for peer in self.peers.values():
            peer.close()
        pid = self.watchdog_pid()
        if pid is not None and launcher.watchdog_running(self.paths):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not launcher.watchdog_running(self.paths), 5, "watchdog exit")


@contextlib.contextmanager
def live_network(**overrides: Any) -> Iterator[LiveNetwork]:
    """A started :class:`LiveNetwork`, stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="svn-", dir="/tmp"))
    net = LiveNetwork(root)
    try:
        net.start(**overrides)
        yield net
    finally:
        net.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---- the engine with fakes ------------------------------------------------------------


@dataclass
class EngineUnderTest:
    """An engine, what it transmitted and what it emitted."""

    engine: Engine
    sent: list[tuple[str, bytes]]  # (port name, frame)
    events: list[tuple[str, Severity, dict[str, Any]]]
    paths: NetPaths
    failures: dict[str, str] = field(default_factory=dict)  # port name -> drop reason

    def port(self, n: int) -> Port:
        """The engine's port for VM ``n``."""
        return self.engine.ports[f"{VM_IDS[n][:8]}-0"]

    def send(self, n: int, frame: bytes, now: float = 0.0, sender: object = None) -> bool:
        """Feed ``frame`` to VM ``n``'s port (from its QEMU path unless ``sender``)."""
        port = self.port(n)
        return self.engine.ingress(port, sender or port.qemu_path, frame, now)

    def received(self, n: int) -> list[bytes]:
        """The frames transmitted to VM ``n``."""
        return [f for name, f in self.sent if name == self.port(n).name]

    def named(self, event: str) -> list[dict[str, Any]]:
        """The emitted events called ``event`` (their fields)."""
        return [fields for name, _, fields in self.events if name == event]


def engine_under_test(vms: int = 3, routers: frozenset[int] = frozenset(),
                      **overrides: Any) -> EngineUnderTest:
    """An engine with ports for VMs 0..``vms``-1 and recording fakes."""
    paths = NetPaths(Path("/nonexistent/net"))
    config = SwitchConfig.from_json(switch_config(Path("/nonexistent/logs"), **overrides),
                                    paths.switch_json)
    sent: list[tuple[str, bytes]] = []
    events: list[tuple[str, Severity, dict[str, Any]]] = []
    failures: dict[str, str] = {}

    def transmit(port: Port, frame: bytes) -> str | None:
        if port.name in failures:
            return failures[port.name]
        sent.append((port.name, frame))
        return None

    engine = Engine(config, transmit, lambda e, s, f: events.append((e, s, f)))
    ports = [PortConfig.from_json(port_object(paths, n, router=n in routers, pid=1),
                                  paths.port_file(f"{VM_IDS[n][:8]}-0"), paths)
             for n in range(vms)]
    engine.configure(config, ports)
    return EngineUnderTest(engine, sent, events, paths, failures)


def read_json(path: Path) -> Any:
    """A JSON file's value."""
    return json.loads(path.read_text())
