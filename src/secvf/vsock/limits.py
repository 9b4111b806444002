"""Every tunable number of the vsock backend, with units in the names.

The relations between them are checked at import time below.
"""

from __future__ import annotations

from secvf.vsock.packet import MAX_PAYLOAD_BYTES

#: buf_alloc advertised to the guest: guest payload the backend buffers per connection.
CONN_BUF_ALLOC_BYTES = 256 * 1024
#: Send CREDIT_UPDATE once this many forwarded bytes have not been advertised yet.
CREDIT_UPDATE_THRESHOLD_BYTES = 64 * 1024
#: Host bytes read (and staged) per connection before they are packed for the guest.
HOST_READ_MAX_BYTES = 64 * 1024
#: A guest that does not answer a host CONNECT within this time is treated as refusing.
CONNECT_TIMEOUT_S = 2.0
#: A hybrid client must send its whole ``CONNECT <port>\n`` line within this time ...
CONNECT_LINE_TIMEOUT_S = 1.0
#: ... and within this many bytes.
CONNECT_LINE_MAX_BYTES = 32
#: After the guest closes, buffered data gets this long to reach the host socket.
CLOSE_FLUSH_TIMEOUT_S = 5.0
#: Live connections plus pending hybrid handshakes, unless the caller picks another limit.
DEFAULT_MAX_CONNECTIONS = 64
#: Backend-made packets (RSTs) waiting for rx buffers; at this level tx processing pauses.
MAX_CONTROL_BACKLOG = 256
#: Tx chains handled per event-loop turn, so rx and sockets get their turn too.
TX_BATCH_CHAINS = 256
#: Host ports the backend assigns to host-initiated connections start here (Firecracker).
FIRST_HOST_PORT = 2**30
#: Security events about one guest: at most this many per second (the rest are counted).
VIOLATION_EVENTS_PER_S = 3

# The guest waits at zero credit; an update must come before the backend runs dry.
assert CREDIT_UPDATE_THRESHOLD_BYTES <= CONN_BUF_ALLOC_BYTES
# One packet from the guest must fit in what the backend is willing to buffer.
assert MAX_PAYLOAD_BYTES <= CONN_BUF_ALLOC_BYTES
assert len(b"CONNECT 4294967295\n") <= CONNECT_LINE_MAX_BYTES
