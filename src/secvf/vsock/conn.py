"""One vsock stream between a guest port and a host Unix socket: state and credit.

Primer
------
A connection joins a guest socket (``guest_cid:peer_port``) and a host Unix socket. The
host side is named by ``local_port``: the port the guest dialled on CID 2 for guest-initiated
connections, or a backend-assigned port (from 2^30 up) for host-initiated ones.

States (:class:`ConnState`)::

    CONNECTING --RESPONSE--> ESTABLISHED --SHUTDOWN(RCV|SEND)--> CLOSING --flushed--> CLOSED
        |                        |                                   |
        +--RST / timeout---------+--RST / host socket error----------+--flush timeout--> CLOSED

- Host-initiated: the muxer creates the connection in CONNECTING and a REQUEST goes to the
  guest. RESPONSE makes it ESTABLISHED and ``OK <local_port>\\n`` is written to the host
  socket; RST means the guest refused.
- Guest-initiated: the muxer connects ``<uds>_<port>`` first and creates the connection in
  ESTABLISHED with a RESPONSE pending.
- CLOSED is terminal. When ``rst_needed`` is set the muxer sends the guest an RST.

Credit (virtio 1.2, 5.10.6.3), all counters u32 and compared modulo 2^32:

- Guest to host. ``buf_alloc`` (:data:`CONN_BUF_ALLOC_BYTES`) is what the backend buffers;
  ``fwd_cnt`` counts guest payload bytes *written to the host socket* (never the ``OK``
  line). The guest may send ``buf_alloc - (guest tx_cnt - fwd_cnt_advertised)`` bytes, so
  the backend never holds more than ``buf_alloc``: a guest whose ``rx_cnt - fwd_cnt_advertised``
  (payload received minus forwarded count last told) would exceed it is reset. A
  CREDIT_UPDATE goes out once ``fwd_cnt - fwd_cnt_advertised >= CREDIT_UPDATE_THRESHOLD_BYTES``
  (Linux guests never ask), and every packet carries the current ``fwd_cnt``.
- Host to guest. ``peer_buf_alloc`` and ``peer_fwd_cnt`` come from every guest header;
  ``tx_cnt`` counts payload sent to the guest. The backend may send
  ``peer_credit = peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` more bytes and reads the host
  socket only while that is positive (back-pressure), at most
  :data:`HOST_READ_MAX_BYTES` at a time.

Shutdown:

- Host EOF (the client's SHUT_WR or close): after the staged bytes, SHUTDOWN(SEND) goes to
  the guest. The connection stays open for guest-to-host data.
- Guest SHUTDOWN(SEND): ``shutdown(SHUT_WR)`` on the host socket once buffered data is written.
- Guest SHUTDOWN(RCV): host bytes are no longer read or delivered.
- Guest SHUTDOWN with both flags (a guest ``close()``): CLOSING; once buffered data is
  written (or after :data:`CLOSE_FLUSH_TIMEOUT_S`) the host socket is closed and an RST
  answers the guest, which waits for it.
- RST from the guest closes the host socket at once; buffered data is dropped.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from enum import Enum

from secvf.vsock.errors import MalformedPacket
from secvf.vsock.limits import (
    CLOSE_FLUSH_TIMEOUT_S,
    CONN_BUF_ALLOC_BYTES,
    CREDIT_UPDATE_THRESHOLD_BYTES,
    HOST_READ_MAX_BYTES,
)
from secvf.vsock.packet import (
    HOST_CID,
    U32_MASK,
    Op,
    PacketHeader,
    ShutdownFlag,
    SocketType,
)

log = logging.getLogger(__name__)

#: A packet for the guest: header plus payload.
OutPacket = tuple[PacketHeader, bytes]


class ConnState(Enum):
    """Where a connection is in its life (see the module primer)."""

    CONNECTING = "connecting"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


class Connection:
    """State, buffers and credit of one guest stream joined to one host socket.

    All methods run in the backend's event loop. A violation by the guest raises
    :class:`MalformedPacket`; the muxer then resets the connection.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        guest_cid: int,
        local_port: int,
        peer_port: int,
        host_initiated: bool,
        on_close: Callable[[Connection], None],
        deadline: float | None = None,
        initial_data: bytes = b"",
    ) -> None:
        """Wrap ``sock``; ``on_close`` runs once, before the socket is closed."""
        self.sock = sock  # the host Unix socket (non-blocking)
        self.guest_cid = guest_cid  # the guest's CID, destination of our packets
        self.local_port = local_port  # the host-side vsock port
        self.peer_port = peer_port  # the guest-side vsock port
        self.host_initiated = host_initiated  # True: a hybrid CONNECT opened it
        self.state = ConnState.CONNECTING if host_initiated else ConnState.ESTABLISHED
        self.deadline = deadline  # monotonic time of the connect / flush timeout, if any
        self.rst_needed = False  # CLOSED: the guest must be sent an RST
        self._on_close = on_close  # the muxer's hook: unregister the socket, forget us
        # guest -> host
        self.to_host = bytearray()  # bytes waiting to be written to the host socket
        self._to_host_prefix = 0  # leading bytes of to_host that are the OK line (uncounted)
        self.rx_cnt = 0  # guest payload bytes received (u32)
        self.fwd_cnt = 0  # guest payload bytes written to the host socket (u32)
        self.fwd_cnt_advertised = 0  # fwd_cnt as of the last packet sent to the guest
        self._credit_update_pending = False  # a CREDIT_UPDATE must be sent
        self.guest_shut_send = False  # the guest will send no more data
        self.host_write_shut = False  # shutdown(SHUT_WR) was done on the host socket
        # host -> guest
        self.from_host = bytearray(initial_data)  # host bytes staged for the guest
        self.tx_cnt = 0  # payload bytes sent to the guest (u32)
        self.peer_buf_alloc = 0  # guest's receive buffer size, from its last header
        self.peer_fwd_cnt = 0  # guest's forwarded count, from its last header
        self.guest_shut_rcv = False  # the guest will receive no more data
        self.host_eof = False  # the host socket reached EOF
        self._shutdown_sent = False  # SHUTDOWN(SEND) went to the guest
        self._request_pending = host_initiated  # REQUEST not yet sent
        self._response_pending = not host_initiated  # RESPONSE not yet sent

    def __repr__(self) -> str:
        return (
            f"<Connection host:{self.local_port} <-> guest {self.guest_cid}:{self.peer_port} "
            f"{self.state.value}>"
        )

    @property
    def key(self) -> tuple[int, int]:
        """(local_port, peer_port): how the muxer finds this connection."""
        return self.local_port, self.peer_port

    # -- credit ----------------------------------------------------------------------------

    def peer_credit(self) -> int:
        """Bytes the guest can take now; a bogus (wrapped) count yields 0."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32_MASK
        return max(0, self.peer_buf_alloc - in_flight)

    def note_peer_credit(self, header: PacketHeader) -> None:
        """Take the guest's buf_alloc and fwd_cnt from any packet it sent."""
        self.peer_buf_alloc = header.buf_alloc
        self.peer_fwd_cnt = header.fwd_cnt

    # -- guest -> backend ------------------------------------------------------------------

    def on_guest_packet(self, header: PacketHeader, payload: bytes) -> None:
        """Apply one packet the guest sent on this connection.

        Raises:
            MalformedPacket: the packet is not allowed in this state or overruns credit.
        """
        self.note_peer_credit(header)
        op = header.op
        if op == Op.RW:
            self._on_guest_data(payload)
        elif op == Op.RESPONSE:
            self._on_response()
        elif op == Op.SHUTDOWN:
            self._on_shutdown(ShutdownFlag(header.flags & 3))
        elif op == Op.RST:
            if self.state is ConnState.CONNECTING:
                log.warning("%r: guest refused the connection (RST)", self)
            self.close(rst=False)
        elif op == Op.CREDIT_REQUEST:
            self._credit_update_pending = True
        elif op != Op.CREDIT_UPDATE:
            raise MalformedPacket(f"op {op} is not valid on an open connection")

    def _on_guest_data(self, payload: bytes) -> None:
        if self.state is not ConnState.ESTABLISHED or self.guest_shut_send:
            raise MalformedPacket(f"data on a connection that is {self.state.value} or shut")
        unacknowledged = (self.rx_cnt + len(payload) - self.fwd_cnt_advertised) & U32_MASK
        if unacknowledged > CONN_BUF_ALLOC_BYTES:
            raise MalformedPacket("guest sent more data than its credit allows")
        self.rx_cnt = (self.rx_cnt + len(payload)) & U32_MASK
        self.to_host += payload
        self.flush_to_host()

    def _on_response(self) -> None:
        if self.state is not ConnState.CONNECTING or self._request_pending:
            raise MalformedPacket(f"RESPONSE on a connection that is {self.state.value}")
        self.state = ConnState.ESTABLISHED
        self.deadline = None
        line = f"OK {self.local_port}\n".encode()
        self.to_host[:0] = line
        self._to_host_prefix = len(line)
        log.debug("%r: guest accepted", self)
        self.flush_to_host()

    def _on_shutdown(self, flags: ShutdownFlag) -> None:
        if self.state is ConnState.CONNECTING:
            raise MalformedPacket("SHUTDOWN before the connection was established")
        if flags & ShutdownFlag.RCV:
            self.guest_shut_rcv = True
            self.from_host.clear()
        if flags & ShutdownFlag.SEND:
            self.guest_shut_send = True
        if self.guest_shut_rcv and self.guest_shut_send and self.state is ConnState.ESTABLISHED:
            self.state = ConnState.CLOSING
            self.deadline = time.monotonic() + CLOSE_FLUSH_TIMEOUT_S
        self._after_write()

    # -- backend -> guest ------------------------------------------------------------------

    def has_rx_work(self) -> bool:
        """Whether :meth:`take_packet` would return a packet (given an rx buffer)."""
        if self.state is ConnState.CLOSED:
            return False
        return (
            self._request_pending
            or self._response_pending
            or self._credit_update_pending
            or self._can_send_data()
            or self._shutdown_due()
        )

    def take_packet(self, max_payload: int) -> OutPacket | None:
        """Return the next packet for the guest, its payload at most ``max_payload`` bytes.

        Control packets come first (REQUEST, RESPONSE), then data, then SHUTDOWN once the
        staged data is out, then a bare CREDIT_UPDATE if one is still owed.
        """
        if self.state is ConnState.CLOSED:
            return None
        if self._request_pending:
            self._request_pending = False
            return self._packet(Op.REQUEST)
        if self._response_pending:
            self._response_pending = False
            return self._packet(Op.RESPONSE)
        if self._can_send_data() and max_payload > 0:
            size = min(max_payload, self.peer_credit(), len(self.from_host))
            payload = bytes(self.from_host[:size])
            del self.from_host[:size]
            self.tx_cnt = (self.tx_cnt + size) & U32_MASK
            return self._packet(Op.RW, payload=payload)
        if self._shutdown_due():
            self._shutdown_sent = True
            return self._packet(Op.SHUTDOWN, flags=ShutdownFlag.SEND)
        if self._credit_update_pending:
            return self._packet(Op.CREDIT_UPDATE)
        return None

    def _can_send_data(self) -> bool:
        return (
            self.state is ConnState.ESTABLISHED
            and not self._response_pending
            and bool(self.from_host)
            and self.peer_credit() > 0
        )

    def _shutdown_due(self) -> bool:
        return (
            self.host_eof
            and not self._shutdown_sent
            and not self.from_host
            and self.state is ConnState.ESTABLISHED
        )

    def _packet(self, op: Op, *, payload: bytes = b"", flags: int = 0) -> OutPacket:
        self.fwd_cnt_advertised = self.fwd_cnt
        self._credit_update_pending = False
        header = PacketHeader(
            src_cid=HOST_CID,
            dst_cid=self.guest_cid,
            src_port=self.local_port,
            dst_port=self.peer_port,
            len=len(payload),
            type=SocketType.STREAM,
            op=op,
            flags=int(flags),
            buf_alloc=CONN_BUF_ALLOC_BYTES,
            fwd_cnt=self.fwd_cnt,
        )
        return header, payload

    # -- host socket -----------------------------------------------------------------------

    def wants_read(self) -> bool:
        """Whether the host socket should be read now (there is credit and room)."""
        return (
            self.state is ConnState.ESTABLISHED
            and not self.host_eof
            and not self.guest_shut_rcv
            and not self.from_host
            and self.peer_credit() > 0
        )

    def wants_write(self) -> bool:
        """Whether bytes are waiting for the host socket."""
        return self.state is not ConnState.CLOSED and bool(self.to_host)

    def read_from_host(self) -> None:
        """Stage up to ``min(peer_credit, HOST_READ_MAX_BYTES)`` bytes from the host socket."""
        try:
            data = self.sock.recv(min(self.peer_credit(), HOST_READ_MAX_BYTES))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("%r: host socket read failed: %s", self, exc)
            self.close(rst=True)
            return
        if data:
            self.from_host += data
        else:
            log.debug("%r: host EOF", self)
            self.host_eof = True

    def flush_to_host(self) -> None:
        """Write buffered bytes to the host socket until it would block."""
        while self.to_host and self.state is not ConnState.CLOSED:
            try:
                sent = self.sock.send(self.to_host)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("%r: host socket write failed: %s", self, exc)
                self.close(rst=True)
                return
            self._account_written(sent)
        self._after_write()

    def _account_written(self, sent: int) -> None:
        del self.to_host[:sent]
        uncounted = min(sent, self._to_host_prefix)
        self._to_host_prefix -= uncounted
        self.fwd_cnt = (self.fwd_cnt + sent - uncounted) & U32_MASK
        unadvertised = (self.fwd_cnt - self.fwd_cnt_advertised) & U32_MASK
        if unadvertised >= CREDIT_UPDATE_THRESHOLD_BYTES:
            self._credit_update_pending = True

    def _after_write(self) -> None:
        if self.to_host or self.state is ConnState.CLOSED:
            return
        if self.state is ConnState.CLOSING:
            self.close(rst=True)
        elif self.guest_shut_send and not self.host_write_shut:
            self.host_write_shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                log.debug("%r: shutdown(SHUT_WR) failed: %s", self, exc)

    # -- teardown --------------------------------------------------------------------------

    def expire(self, now: float) -> bool:
        """Close the connection if its deadline passed; returns whether it did."""
        if self.deadline is None or now < self.deadline or self.state is ConnState.CLOSED:
            return False
        if self.state is ConnState.CONNECTING:
            log.warning("%r: guest did not answer the connect request in time", self)
        else:
            log.info("%r: host socket did not take buffered data in time", self)
        self.close(rst=True)
        return True

    def close(self, *, rst: bool) -> None:
        """Close the host socket, drop the buffers; ``rst`` asks the muxer to send an RST."""
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        self.rst_needed = rst
        self.to_host.clear()
        self.from_host.clear()
        self._on_close(self)
        self.sock.close()
