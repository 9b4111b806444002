"""The forwarding engine: one network's ports, their rules and counters, no sockets.

Primer. The socket loop (:mod:`secvf.net.switch`) hands every datagram to
:meth:`Engine.ingress` with the sender's address and the time of the batch; the engine
applies the rules of ``docs/networks.md`` ("Files and protocol") in order and calls ``transmit``
for each port the frame goes out of:

1. sender check: only the port's ``qemu_path`` may send to it (``foreign_sender``);
2. size: ``min_frame <= len <= max_frame`` (``runt``, ``oversize``);
3. the source MAC must be the port's pinned MAC (``spoof``);
4. rate limits in fixed 1 s windows (``rate``, ``broadcast_rate``);
5. forwarding: a known unicast destination goes to its port, anything else is flooded;
   with ``isolate_guests`` a non-router port reaches router ports only (``isolation``);
6. egress: ``transmit`` returns ``tx_full`` or ``tx_error`` when the send failed.

Why pinned MACs: a port's MAC is known before its VM starts (it is on QEMU's command
line), so the MAC table is not learned from what guests claim. An entry is added when a
port first sends from its own MAC, and a frame from any other MAC is dropped. The table
therefore holds at most one entry per port however many MACs a guest invents, and no
guest can steal another's traffic by claiming its address.

Counters: ``rx``/``rx_bytes`` count frames that passed the sender check (dropped or
not), ``tx``/``tx_bytes`` frames sent out of the port, ``drops`` every drop by reason,
charged to the ingress port except ``tx_full``/``tx_error``, which are charged to the
port whose queue refused the frame.

Everything here is hot-path code run per frame: plain attributes on ``__slots__``
classes, precomputed peer lists, and no allocation on the accept path beyond what the
slices need.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from secvf.net.config import PortConfig, SwitchConfig
from secvf.net.events import (
    FOREIGN_SENDER,
    FRAME_RATE_LIMITED,
    FRAME_SIZE_DROPPED,
    MAC_SPOOF,
    OVERFLOW,
    Emit,
    EventGate,
)
from secvf.net.frame import BROADCAST, format_mac, parse_mac
from secvf.net.ratelimit import BROADCAST_RATE, RATE, RateWindow
from secvf.store.eventlog import Severity

FOREIGN = "foreign_sender"
RUNT = "runt"
OVERSIZE = "oversize"
SPOOF = "spoof"
ISOLATION = "isolation"
TX_FULL = "tx_full"
TX_ERROR = "tx_error"
DROP_REASONS = (FOREIGN, RUNT, OVERSIZE, SPOOF, RATE, BROADCAST_RATE, ISOLATION, TX_FULL,
                TX_ERROR)

#: ``transmit(port, frame)`` sends one frame out of ``port``; returns None when sent,
#: else :data:`TX_FULL` or :data:`TX_ERROR`.
Transmit = Callable[["Port", bytes], str | None]


class Tap(Protocol):
    """A capture client: takes one ``F`` message per frame and must never block."""

    def push(self, message: bytes) -> None:
        """Queue or drop ``message``; never raise, never block."""


class Port:
    """One port's configuration, learned state, counters and event gates."""

    __slots__ = ("config", "name", "serial", "mac", "qemu_path", "learned", "peers",
                 "reachable", "window", "rx", "rx_bytes", "tx", "tx_bytes", "drops",
                 "taps", "spoof_gate", "size_gate", "foreign_gate")

    def __init__(self, config: PortConfig, serial: int, limits: SwitchConfig) -> None:
        self.config = config
        self.name = config.port
        self.serial = serial  # never reused by this engine: the capture interface index
        self.mac = parse_mac(config.mac)
        self.qemu_path = config.qemu_path
        self.learned = False  # has sent a valid frame: its MAC is in the table
        self.peers: tuple[Port, ...] = ()  # where its floods go
        self.reachable: frozenset[Port] = frozenset()  # where its unicast may go
        self.window = RateWindow(limits.frames_per_s, limits.broadcast_per_s)
        self.rx = self.rx_bytes = self.tx = self.tx_bytes = 0
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.taps: tuple[Tap, ...] = ()  # capture clients that want this port's frames
        self.spoof_gate = EventGate()
        self.size_gate = EventGate()
        self.foreign_gate = EventGate()

    def __repr__(self) -> str:
        return f"Port({self.name!r}, vm={self.config.vm!r}, mac={self.config.mac})"

    def stats(self) -> dict[str, Any]:
        """The port's entry in the ``stats`` reply."""
        c = self.config
        return {"port": c.port, "vm": c.vm, "vm_id": c.vm_id, "nic": c.nic, "mac": c.mac,
                "router": c.router, "learned": self.learned, "rx": self.rx,
                "rx_bytes": self.rx_bytes, "tx": self.tx, "tx_bytes": self.tx_bytes,
                "drops": dict(self.drops)}


class Engine:
    """The rules and state of one network (see the module primer)."""

    def __init__(self, config: SwitchConfig, transmit: Transmit, emit: Emit) -> None:
        self.config = config
        self._transmit = transmit
        self._emit = emit
        self.ports: dict[str, Port] = {}
        self._by_mac: dict[bytes, Port] = {}  # pinned MAC -> port, every port
        self._table: dict[bytes, Port] = {}  # learned MAC -> port, at most one per port
        self._serials = 0

    def __repr__(self) -> str:
        return f"Engine({self.config.network!r}, ports={sorted(self.ports)})"

    # ---- configuration -------------------------------------------------------------

    def configure(self, config: SwitchConfig, ports: Iterable[PortConfig]
                  ) -> tuple[list[Port], list[Port]]:
        """Apply a (re)loaded configuration; return the ports (added, removed).

        A port whose file is unchanged keeps its counters and learned state; a changed
        one is removed and added again. Two files claiming one MAC: the first wins.
        """
        self.config = config
        wanted = {p.port: p for p in ports}
        removed = [p for name, p in self.ports.items() if wanted.get(name) != p.config]
        for port in removed:
            del self.ports[port.name]
        added = []
        for name, port_config in wanted.items():
            if name in self.ports:
                continue
            owner = self._mac_owner(port_config)
            if owner is not None:
                print(f"secvf-switch: port {name}: MAC {port_config.mac} is already port "
                      f"{owner.name}'s; skipped", file=sys.stderr, flush=True)
            else:
                self._serials += 1
                self.ports[name] = Port(port_config, self._serials, config)
                added.append(self.ports[name])
        self._rebuild()
        return added, removed

    def _mac_owner(self, config: PortConfig) -> Port | None:
        mac = parse_mac(config.mac)
        return next((p for p in self.ports.values() if p.mac == mac), None)

    def _rebuild(self) -> None:
        ports = list(self.ports.values())
        self._by_mac = {p.mac: p for p in ports}
        self._table = {p.mac: p for p in ports if p.learned}
        isolate = self.config.isolate_guests
        for port in ports:
            port.window.set_limits(self.config.frames_per_s, self.config.broadcast_per_s)
            port.peers = tuple(p for p in ports if p is not port
                               and (not isolate or port.config.router or p.config.router))
            port.reachable = frozenset(port.peers)

    # ---- the per-frame path --------------------------------------------------------

    def ingress(self, port: Port, sender: object, frame: bytes, now: float) -> bool:
        """Apply rules 1-6 to ``frame`` received on ``port`` from ``sender`` at ``now``
        (monotonic seconds); return True if it passed rules 1-4 (captured frames)."""
        if sender != port.qemu_path:
            self._foreign(port, sender, now)
            return False
        size = len(frame)
        port.rx += 1
        port.rx_bytes += size
        config = self.config
        if size < config.min_frame or size > config.max_frame:
            self._bad_size(port, size, now)
            return False
        if frame[6:12] != port.mac:
            self._spoof(port, frame[6:12], now)
            return False
        window = port.window
        if now >= window.end:
            self._close_window(port, now)
        group = frame[0] & 1
        reason = window.admit(group)
        if reason is not None:
            port.drops[reason] += 1
            return False
        if not port.learned:
            self._learn(port)
        if group:
            self._flood(port, frame, size)
            return True
        target = self._table.get(frame[0:6])
        if target is None:
            self._flood(port, frame, size)
        elif target in port.reachable:
            self._send(target, frame, size)
        elif target is not port:
            port.drops[ISOLATION] += 1
        return True

    def _flood(self, port: Port, frame: bytes, size: int) -> None:
        peers = port.peers
        if not peers and len(self.ports) > 1:
            port.drops[ISOLATION] += 1
        for target in peers:
            self._send(target, frame, size)

    def _send(self, target: Port, frame: bytes, size: int) -> None:
        failure = self._transmit(target, frame)
        if failure is None:
            target.tx += 1
            target.tx_bytes += size
        else:
            target.drops[failure] += 1

    def _learn(self, port: Port) -> None:
        port.learned = True
        self._table[port.mac] = port

    # ---- drops that write events -------------------------------------------------

    def _foreign(self, port: Port, sender: object, now: float) -> None:
        port.drops[FOREIGN] += 1
        suppressed = port.foreign_gate.passes(None, now)
        if suppressed is not None:
            self._event(FOREIGN_SENDER, Severity.CRITICAL, port, sender=repr(sender),
                        expected=port.qemu_path, suppressed=suppressed)

    def _bad_size(self, port: Port, size: int, now: float) -> None:
        reason = RUNT if size < self.config.min_frame else OVERSIZE
        port.drops[reason] += 1
        suppressed = port.size_gate.passes(None, now)
        if suppressed is not None:
            self._event(FRAME_SIZE_DROPPED, Severity.WARNING, port, reason=reason, size=size,
                        min_frame=self.config.min_frame, max_frame=self.config.max_frame,
                        suppressed=suppressed)

    def _spoof(self, port: Port, claimed: bytes, now: float) -> None:
        port.drops[SPOOF] += 1
        key = port.spoof_gate.key_for(claimed, now)
        suppressed = port.spoof_gate.passes(key, now)
        if suppressed is None:
            return
        victim = self._by_mac.get(claimed)
        fields: dict[str, Any] = {
            "claimed_mac": OVERFLOW if key == OVERFLOW else format_mac(claimed),
            "pinned_mac": port.config.mac, "suppressed": suppressed}
        if claimed == BROADCAST:
            fields["note"] = "broadcast source address"
        if victim is not None:
            fields |= {"victim_vm": victim.config.vm, "victim_vm_id": victim.config.vm_id,
                       "victim_port": victim.name}
        self._event(MAC_SPOOF, Severity.CRITICAL, port, **fields)

    def _close_window(self, port: Port, now: float) -> None:
        report = port.window.open(now)
        if report is None:
            return
        for reason, dropped in ((RATE, report.rate), (BROADCAST_RATE, report.broadcast_rate)):
            if dropped:
                self._event(FRAME_RATE_LIMITED, Severity.WARNING, port, reason=reason,
                            dropped=dropped)

    def tick(self, now: float) -> None:
        """Close every window that has ended and dropped frames, so a flood's last
        window is reported without waiting for the port's next frame."""
        for port in self.ports.values():
            window = port.window
            if now >= window.end and (window.dropped_rate or window.dropped_group):
                self._close_window(port, now)

    def network_event(self, event: str, severity: Severity, **fields: Any) -> None:
        """Emit an event about the whole network (no VM)."""
        self._emit(event, severity, {"vm": None, "vm_id": None,
                                     "network": self.config.network, **fields})

    def _event(self, event: str, severity: Severity, port: Port, **fields: Any) -> None:
        self._emit(event, severity, {"vm": port.config.vm, "vm_id": port.config.vm_id,
                                     "network": self.config.network, "port": port.name,
                                     **fields})

    # ---- reporting ---------------------------------------------------------------

    def drop_totals(self) -> dict[str, int]:
        """Every drop of every current port, by reason."""
        totals = dict.fromkeys(DROP_REASONS, 0)
        for port in self.ports.values():
            for reason, count in port.drops.items():
                totals[reason] += count
        return totals
