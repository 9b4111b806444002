"""The vsock muxer: hybrid Unix-socket front end, port map, routing and fairness.

Primer
------
Host to guest (the Firecracker "hybrid vsock" contract). A host client connects to the
Unix socket at ``uds_path`` and writes ``CONNECT <port>\\n`` (1-10 digits, at most
:data:`CONNECT_LINE_MAX_BYTES` bytes, within :data:`CONNECT_LINE_TIMEOUT_S`). The muxer
assigns a host port (counting up from 2^30) and sends the guest a REQUEST. When the
guest answers RESPONSE the client reads ``OK <hostport>\\n`` and then raw bytes flow both
ways; bytes the client sent after the CONNECT line are kept and forwarded. If the guest
answers RST, or nothing within :data:`CONNECT_TIMEOUT_S`, the client socket is closed
without a byte written. A malformed line also just closes it.

Guest to host. A REQUEST to CID 2 port P is joined to the Unix socket ``<uds_path>_<P>``
when that socket accepts a connection at once; otherwise the guest gets an RST.

Routing. Connections are keyed by ``(local_port, peer_port)``. A guest packet for an
unknown connection is answered with RST (unless it is an RST). Packets not addressed from
the guest's CID to CID 2 are dropped and reported.

Fairness and bounds.

- rx (to the guest) serves backend-made control packets first, then the connections
  round-robin, one packet per connection per turn.
- tx (from the guest) handles at most :data:`TX_BATCH_CHAINS` chains per turn, and pauses
  while :data:`MAX_CONTROL_BACKLOG` control packets wait for rx buffers.
- Live connections plus pending handshakes are capped at ``max_connections``; over the cap
  a host client is closed and a guest REQUEST gets an RST.
- Per connection, at most ``buf_alloc`` bytes wait for the host socket and at most
  :data:`HOST_READ_MAX_BYTES` wait for the guest (see :mod:`secvf.vsock.conn`).

Every method here runs in the backend's event loop (handlers are marked ``_bh_``).
"""

from __future__ import annotations

import logging
import re
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from secvf.store.eventlog import Severity
from secvf.vsock.conn import Connection, ConnState, OutPacket
from secvf.vsock.errors import MalformedPacket, QueueViolation
from secvf.vsock.incidents import RateLimiter, ViolationReporter
from secvf.vsock.limits import (
    CONNECT_LINE_MAX_BYTES,
    CONNECT_LINE_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    FIRST_HOST_PORT,
    MAX_CONTROL_BACKLOG,
    TX_BATCH_CHAINS,
)
from secvf.vsock.packet import (
    HEADER_BYTES,
    HOST_CID,
    MAX_PAYLOAD_BYTES,
    U32_MASK,
    Op,
    PacketHeader,
    SocketType,
)
from secvf.vsock.virtqueue import DescriptorChain, SplitVirtqueue

log = logging.getLogger(__name__)

_CONNECT_LINE = re.compile(rb"CONNECT ([0-9]{1,10})\n")
#: Info lines the guest can trigger (refused guest connects) per second.
_GUEST_LOG_LINES_PER_S = 5


@dataclass(slots=True)
class HybridHandshake:
    """A host client that has not finished its ``CONNECT <port>`` line yet."""

    sock: socket.socket  # the accepted client socket (non-blocking)
    deadline: float  # monotonic time by which the line must be complete
    received: bytearray = field(default_factory=bytearray)  # bytes read so far


class Muxer:
    """Joins guest vsock streams to host Unix sockets.

    Example (what :mod:`secvf.vsock.backend` does)::

        muxer = Muxer(selector, listener, uds_path, guest_cid=3, max_connections=64,
                      reporter=ViolationReporter("vm", None))
        muxer.process_tx(tx_queue)      # after a tx kick
        muxer.process_rx(rx_queue)      # after an rx kick or a host socket event
        muxer.sync_interest()           # before the next select()
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        listener: socket.socket,
        uds_path: Path,
        *,
        guest_cid: int,
        max_connections: int,
        reporter: ViolationReporter,
    ) -> None:
        self._selector = selector
        self._listener = listener
        self._uds_path = uds_path
        self.guest_cid = guest_cid
        self._max_connections = max_connections
        self._reporter = reporter
        self._conns: dict[tuple[int, int], Connection] = {}
        self._rotation: deque[Connection] = deque()  # round-robin order for rx
        self._interest: dict[Connection, int] = {}  # selector events registered per conn
        self._handshakes: dict[socket.socket, HybridHandshake] = {}
        self._control: deque[OutPacket] = deque()  # backend-made packets (RSTs)
        self._next_host_port = FIRST_HOST_PORT
        self._guest_log = RateLimiter(_GUEST_LOG_LINES_PER_S)
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, self._bh_accept)

    def __repr__(self) -> str:
        return (
            f"<Muxer cid={self.guest_cid} conns={len(self._conns)} "
            f"handshakes={len(self._handshakes)} control={len(self._control)}>"
        )

    @property
    def connection_count(self) -> int:
        """Live connections plus pending hybrid handshakes (what the limit counts)."""
        return len(self._conns) + len(self._handshakes)

    @property
    def tx_backlogged(self) -> bool:
        """Whether tx processing is paused until rx drains the control backlog."""
        return len(self._control) >= MAX_CONTROL_BACKLOG

    # -- hybrid front end ------------------------------------------------------------------

    def _bh_accept(self, _mask: int) -> None:
        for _ in range(self._max_connections):
            try:
                client, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept on %s failed: %s", self._uds_path, exc)
                return
            if self.connection_count >= self._max_connections:
                log.warning("refusing host client: %d connections open", self.connection_count)
                client.close()
                continue
            client.setblocking(False)
            handshake = HybridHandshake(client, time.monotonic() + CONNECT_LINE_TIMEOUT_S)
            self._handshakes[client] = handshake
            self._selector.register(
                client, selectors.EVENT_READ, partial(self._bh_handshake, handshake)
            )

    def _bh_handshake(self, handshake: HybridHandshake, _mask: int) -> None:
        try:
            data = handshake.sock.recv(CONNECT_LINE_MAX_BYTES - len(handshake.received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("host client failed during CONNECT: %s", exc)
            self._drop_handshake(handshake)
            return
        handshake.received += data
        newline = handshake.received.find(b"\n")
        if newline < 0:
            if not data or len(handshake.received) >= CONNECT_LINE_MAX_BYTES:
                log.warning("host client sent no valid CONNECT line: %r", bytes(handshake.received))
                self._drop_handshake(handshake)
            return
        line, rest = handshake.received[: newline + 1], bytes(handshake.received[newline + 1 :])
        match = _CONNECT_LINE.fullmatch(line)
        if match is None or int(match[1]) > U32_MASK:
            log.warning("host client sent a malformed CONNECT line: %r", bytes(line))
            self._drop_handshake(handshake)
            return
        self._selector.unregister(handshake.sock)
        del self._handshakes[handshake.sock]
        self._open_host_initiated(handshake.sock, int(match[1]), rest)

    def _drop_handshake(self, handshake: HybridHandshake) -> None:
        self._selector.unregister(handshake.sock)
        del self._handshakes[handshake.sock]
        handshake.sock.close()

    def _open_host_initiated(self, sock: socket.socket, guest_port: int, rest: bytes) -> None:
        conn = Connection(
            sock,
            guest_cid=self.guest_cid,
            local_port=self._allocate_host_port(),
            peer_port=guest_port,
            host_initiated=True,
            on_close=self._on_conn_closed,
            deadline=time.monotonic() + CONNECT_TIMEOUT_S,
            initial_data=rest,
        )
        log.debug("%r: host client connecting", conn)
        self._add(conn)

    def _allocate_host_port(self) -> int:
        in_use = {local for local, _peer in self._conns}
        while True:
            port = self._next_host_port
            self._next_host_port = port + 1 if port < U32_MASK - 1 else FIRST_HOST_PORT
            if port not in in_use:
                return port

    # -- connection bookkeeping ------------------------------------------------------------

    def _add(self, conn: Connection) -> None:
        self._conns[conn.key] = conn
        self._rotation.append(conn)

    def _on_conn_closed(self, conn: Connection) -> None:
        if self._interest.pop(conn, 0):
            self._selector.unregister(conn.sock)
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        self._rotation.remove(conn)
        if conn.rst_needed:
            self._queue_rst(conn.local_port, conn.peer_port)

    def _queue_rst(self, local_port: int, peer_port: int) -> None:
        header = PacketHeader(
            src_cid=HOST_CID,
            dst_cid=self.guest_cid,
            src_port=local_port,
            dst_port=peer_port,
            len=0,
            type=SocketType.STREAM,
            op=Op.RST,
            flags=0,
            buf_alloc=0,
            fwd_cnt=0,
        )
        self._control.append((header, b""))

    def _bh_conn_event(self, conn: Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            conn.flush_to_host()
        if mask & selectors.EVENT_READ and conn.wants_read():
            conn.read_from_host()

    def sync_interest(self) -> None:
        """Register each host socket for exactly the events its connection can act on."""
        for conn in list(self._conns.values()):
            events = (selectors.EVENT_READ if conn.wants_read() else 0) | (
                selectors.EVENT_WRITE if conn.wants_write() else 0
            )
            current = self._interest.get(conn, 0)
            if events == current:
                continue
            if not events:
                self._selector.unregister(conn.sock)
                del self._interest[conn]
                continue
            handler = partial(self._bh_conn_event, conn)
            if current:
                self._selector.modify(conn.sock, events, handler)
            else:
                self._selector.register(conn.sock, events, handler)
            self._interest[conn] = events

    # -- guest -> host (tx queue) ----------------------------------------------------------

    def process_tx(self, queue: SplitVirtqueue) -> bool:
        """Handle the guest's packets; returns True if the batch limit stopped it early.

        A corrupt ring is reported as CRITICAL and the queue stays broken.
        """
        for _ in range(TX_BATCH_CHAINS):
            if self.tx_backlogged:
                return False
            try:
                chain = queue.pop()
            except QueueViolation as exc:
                self._reporter.report(f"tx queue stopped: {exc}", Severity.CRITICAL)
                return False
            if chain is None:
                return False
            self._handle_tx_chain(chain)
            queue.add_used(chain.head, 0)
        return True

    def _handle_tx_chain(self, chain: DescriptorChain) -> None:
        try:
            header = PacketHeader.unpack(chain.read(HEADER_BYTES))
        except MalformedPacket as exc:
            self._reporter.report(f"tx chain of {chain.readable_bytes} bytes: {exc}")
            return
        if header.src_cid != self.guest_cid or header.dst_cid != HOST_CID:
            self._reporter.report(
                f"packet from cid {header.src_cid} to cid {header.dst_cid} "
                f"(guest is {self.guest_cid}); dropped"
            )
            return
        available = chain.readable_bytes - HEADER_BYTES
        if (
            header.len > MAX_PAYLOAD_BYTES
            or header.len > available
            or header.type != SocketType.STREAM
        ):
            self._reporter.report(
                f"packet op {header.op} type {header.type} claims {header.len} payload bytes, "
                f"chain carries {available}; connection reset"
            )
            self._reset_for(header)
            return
        payload = chain.read(header.len, skip=HEADER_BYTES) if header.len else b""
        self._route(header, payload)

    def _reset_for(self, header: PacketHeader) -> None:
        conn = self._conns.get((header.dst_port, header.src_port))
        if conn is not None:
            conn.close(rst=True)
        elif header.op != Op.RST:
            self._queue_rst(header.dst_port, header.src_port)

    def _route(self, header: PacketHeader, payload: bytes) -> None:
        conn = self._conns.get((header.dst_port, header.src_port))
        if conn is None:
            if header.op == Op.REQUEST:
                self._open_guest_initiated(header)
            elif header.op != Op.RST:
                self._queue_rst(header.dst_port, header.src_port)
            return
        try:
            conn.on_guest_packet(header, payload)
        except MalformedPacket as exc:
            self._reporter.report(f"{conn!r}: {exc}; connection reset")
            conn.close(rst=True)

    def _open_guest_initiated(self, header: PacketHeader) -> None:
        port = header.dst_port
        if self.connection_count >= self._max_connections:
            if self._guest_log.allow():
                log.warning("guest connect to host port %d refused: connection limit", port)
            self._queue_rst(port, header.src_port)
            return
        path = f"{self._uds_path}_{port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            if self._guest_log.allow():
                log.info("guest connect to host port %d refused: %s: %s", port, path, exc)
            self._queue_rst(port, header.src_port)
            return
        conn = Connection(
            sock,
            guest_cid=self.guest_cid,
            local_port=port,
            peer_port=header.src_port,
            host_initiated=False,
            on_close=self._on_conn_closed,
        )
        conn.note_peer_credit(header)
        log.debug("%r: guest connected to %s", conn, path)
        self._add(conn)

    # -- host -> guest (rx queue) ----------------------------------------------------------

    def process_rx(self, queue: SplitVirtqueue) -> bool:
        """Fill the guest's rx buffers; returns whether any packet was delivered."""
        delivered = False
        while self._control or self._next_busy_conn(peek=True) is not None:
            try:
                chain = queue.pop()
            except QueueViolation as exc:
                self._reporter.report(f"rx queue stopped: {exc}", Severity.CRITICAL)
                break
            if chain is None:
                break
            capacity = chain.writable_bytes
            if capacity < HEADER_BYTES:
                self._reporter.report(f"rx buffer of {capacity} bytes cannot hold a header")
                queue.add_used(chain.head, 0)
                continue
            packet = self._next_rx_packet(min(capacity - HEADER_BYTES, MAX_PAYLOAD_BYTES))
            if packet is None:
                queue.undo_pop()
                break
            header, payload = packet
            queue.add_used(chain.head, chain.write(header.pack() + payload))
            delivered = True
        return delivered

    def _next_rx_packet(self, max_payload: int) -> OutPacket | None:
        if self._control:
            return self._control.popleft()
        conn = self._next_busy_conn(peek=False)
        return conn.take_packet(max_payload) if conn is not None else None

    def _next_busy_conn(self, *, peek: bool) -> Connection | None:
        for index, conn in enumerate(self._rotation):
            if conn.has_rx_work():
                if not peek:
                    self._rotation.rotate(-(index + 1))  # the next turn starts after it
                return conn
        return None

    # -- timers and teardown ---------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest monotonic time at which :meth:`expire` has work, if any."""
        deadlines = [h.deadline for h in self._handshakes.values()]
        deadlines += [c.deadline for c in self._conns.values() if c.deadline is not None]
        return min(deadlines, default=None)

    def expire(self, now: float) -> None:
        """Close handshakes and connections whose timeout has passed."""
        for handshake in list(self._handshakes.values()):
            if now >= handshake.deadline:
                log.warning("host client sent no CONNECT line within %ss", CONNECT_LINE_TIMEOUT_S)
                self._drop_handshake(handshake)
        for conn in list(self._conns.values()):
            conn.expire(now)

    def reset(self) -> None:
        """Forget every connection without telling the guest (its driver was reset)."""
        for conn in list(self._conns.values()):
            if conn.state is not ConnState.CLOSED:
                log.info("%r: closed by device reset", conn)
                conn.close(rst=False)
        self._control.clear()

    def close(self) -> None:
        """Close all sockets, including the hybrid listener."""
        self.reset()
        for handshake in list(self._handshakes.values()):
            self._drop_handshake(handshake)
        self._selector.unregister(self._listener)
        self._listener.close()
