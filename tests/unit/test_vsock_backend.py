"""The vsock backend as a real process, driven by a fake QEMU + guest driver over vhost-user.

Host clients are real Unix-socket clients of the hybrid socket; the guest side is
:class:`secvf.vsock.testing.FakeGuest` writing real rings in a shared memfd.
"""

import hashlib
import os
import socket
import stat
import struct
import threading
import time

import pytest

from secvf.store import events as seclog
from secvf.vsock.device import Request
from secvf.vsock.packet import HEADER_BYTES, Op, ShutdownFlag
from secvf.vsock.testing import (
    RAM_HOLE,
    RX_BUFFER_BYTES,
    BackendProcess,
    FakeGuest,
    TxQueueFull,
)
from secvf.vsock.virtqueue import DESC_F_NEXT

CID = 42
FIRST_HOST_PORT = 2**30
BUF_ALLOC = 256 * 1024


def _client(backend, line=b"CONNECT 2222\n"):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(backend.uds_path))
    client.sendall(line)
    return client


def _read_line(client):
    line = b""
    while not line.endswith(b"\n"):
        chunk = client.recv(1)
        assert chunk, f"EOF after {line!r}"
        line += chunk
    return line


def _host_connect(backend, guest, port=2222, extra=b""):
    """Open a hybrid connection the fake guest accepts; returns (client, host port)."""
    client = _client(backend, b"CONNECT %d\n" % port + extra)
    request = guest.expect(Op.REQUEST, port=port)
    guest.send(Op.RESPONSE, src_port=port, dst_port=request.header.src_port)
    assert _read_line(client) == b"OK %d\n" % request.header.src_port
    return client, request.header.src_port


def _recv_exactly(client, size):
    data = b""
    while len(data) < size:
        chunk = client.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


def _assert_closed_without_bytes(client):
    """The backend closed the client: EOF, or a reset if unread bytes were discarded."""
    try:
        assert client.recv(100) == b""
    except ConnectionResetError:
        pass


def _violations():
    return [e for e in seclog.read_events() if e["event"] == "vsock_guest_violation"]


# -- hybrid handshake ------------------------------------------------------------------------


def test_connect_handshake_keeps_bytes_sent_after_the_connect_line(backend, guest):
    client = _client(backend, b"CONNECT 2222\nearly bytes")
    request = guest.expect(Op.REQUEST)
    assert (request.header.src_cid, request.header.dst_cid) == (2, CID)
    assert (request.header.src_port, request.header.dst_port) == (FIRST_HOST_PORT, 2222)
    assert guest.drain(0.2) == []  # nothing but the REQUEST before the guest answers
    guest.send(Op.RESPONSE, src_port=2222, dst_port=FIRST_HOST_PORT)
    assert _read_line(client) == b"OK %d\n" % FIRST_HOST_PORT
    data = guest.expect(Op.RW)
    assert data.payload == b"early bytes"
    _second, port = _host_connect(backend, guest, port=2223)
    assert port == FIRST_HOST_PORT + 1


def test_refused_connect_closes_the_client_without_a_byte(backend, guest):
    client = _client(backend)
    request = guest.expect(Op.REQUEST)
    guest.send(Op.RST, src_port=2222, dst_port=request.header.src_port)
    assert client.recv(100) == b""
    # closed because of the RST, not by the unanswered-connect timeout
    assert "guest refused the connection" in backend.log()
    assert "did not answer" not in backend.log()


def test_unanswered_connect_times_out_and_resets_the_guest_side(backend, guest):
    client = _client(backend)
    request = guest.expect(Op.REQUEST)
    assert client.recv(100) == b""
    rst = guest.expect(Op.RST)
    assert rst.header.src_port == request.header.src_port
    assert "did not answer" in backend.log()


@pytest.mark.parametrize(
    "line",
    [
        b"CONNECT abc\n",
        b"CONNECT 12345678901\n",
        b"CONNECT 4294967296\n",
        b"connect 2222\n",
        b"CONNECT  2222\n",
        b"X" * 40,
        b"CONNECT 22",  # then silence: the 1 s line timeout applies
    ],
)
def test_malformed_connect_line_closes_the_client(backend, guest, line):
    client = _client(backend, line)
    _assert_closed_without_bytes(client)
    assert guest.drain(0.2) == []  # no REQUEST reached the guest


# -- data and credit ---------------------------------------------------------------------------


def test_host_to_guest_bulk_respects_guest_credit_and_arrives_intact(backend, guest):
    client, port = _host_connect(backend, guest)
    data = os.urandom(1024 * 1024)
    sender = threading.Thread(target=client.sendall, args=(data,))
    sender.start()
    guest_buf_alloc, received = 64 * 1024, bytearray()
    while len(received) < len(data):
        packet = guest.expect(Op.RW)
        assert len(packet.payload) <= RX_BUFFER_BYTES - HEADER_BYTES
        received += packet.payload
        guest.send(
            Op.CREDIT_UPDATE,
            src_port=2222,
            dst_port=port,
            buf_alloc=guest_buf_alloc,
            fwd_cnt=len(received),
        )
    sender.join(5)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_host_reads_stop_when_guest_credit_is_exhausted(backend, guest):
    client = _client(backend)
    request = guest.expect(Op.REQUEST)
    port = request.header.src_port
    guest.send(Op.RESPONSE, src_port=2222, dst_port=port, buf_alloc=8192)
    _read_line(client)
    client.sendall(os.urandom(100_000))
    payload = b"".join(p.payload for p in guest.drain(0.5) if p.header.op == Op.RW)
    assert len(payload) == 8192  # exactly the credit, then nothing
    guest.send(Op.CREDIT_UPDATE, src_port=2222, dst_port=port, buf_alloc=8192, fwd_cnt=8192)
    payload = b"".join(p.payload for p in guest.drain(0.5) if p.header.op == Op.RW)
    assert len(payload) == 8192


def test_credit_counters_wrap_around_u32(backend, guest):
    client = _client(backend)
    request = guest.expect(Op.REQUEST)
    port = request.header.src_port
    # the guest's fwd_cnt is about to wrap: in flight = (0 - (2^32 - 10)) mod 2^32 = 10
    guest.send(Op.RESPONSE, src_port=2222, dst_port=port, buf_alloc=100, fwd_cnt=2**32 - 10)
    _read_line(client)
    client.sendall(b"x" * 200)
    payload = b"".join(p.payload for p in guest.drain(0.5) if p.header.op == Op.RW)
    assert len(payload) == 90
    wrapped = (2**32 - 10 + 90) % 2**32  # = 80: the guest consumed the 90 bytes
    guest.send(Op.CREDIT_UPDATE, src_port=2222, dst_port=port, buf_alloc=100, fwd_cnt=wrapped)
    payload = b"".join(p.payload for p in guest.drain(0.5) if p.header.op == Op.RW)
    assert len(payload) == 90


def test_guest_to_host_bulk_gets_proactive_credit_updates(backend, guest):
    client, port = _host_connect(backend, guest)
    data = os.urandom(1024 * 1024)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_recv_exactly(client, len(data))))
    reader.start()
    sent, peer_fwd = 0, 0
    while sent < len(data):
        credit = BUF_ALLOC - (sent - peer_fwd)
        if credit <= 0:
            update = guest.expect(Op.CREDIT_UPDATE)  # the guest never asks; it just waits
            assert update.header.buf_alloc == BUF_ALLOC
            peer_fwd = update.header.fwd_cnt
            continue
        chunk = data[sent : sent + min(credit, 64 * 1024)]
        guest.send(Op.RW, src_port=2222, dst_port=port, payload=chunk)
        sent += len(chunk)
    reader.join(10)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_fwd_cnt_counts_only_payload_written_to_the_host(backend, guest):
    client, port = _host_connect(backend, guest)  # the OK line must not count
    guest.send(Op.RW, src_port=2222, dst_port=port, payload=b"hello")
    assert _recv_exactly(client, 5) == b"hello"
    guest.send(Op.CREDIT_REQUEST, src_port=2222, dst_port=port)
    update = guest.expect(Op.CREDIT_UPDATE)
    assert (update.header.fwd_cnt, update.header.buf_alloc) == (5, BUF_ALLOC)


def test_guest_overrunning_credit_is_reset_and_reported(backend, guest):
    client, port = _host_connect(backend, guest)  # the client never reads
    chunk = b"z" * (64 * 1024)
    for _ in range(5):  # 320 KiB > buf_alloc, in one batch: no CREDIT_UPDATE in between
        guest.send(Op.RW, src_port=2222, dst_port=port, payload=chunk, kick=False)
    guest.kick_queue(1)
    rst = guest.expect(Op.RST)
    assert rst.header.src_port == port
    assert any("credit" in e["detail"] for e in _violations())
    assert _violations()[0]["vm"] == "fake-vm"


# -- shutdown ----------------------------------------------------------------------------------


def test_host_half_close_reaches_guest_after_the_data(backend, guest):
    client, port = _host_connect(backend, guest)
    client.sendall(b"question")
    client.shutdown(socket.SHUT_WR)
    assert guest.expect(Op.RW).payload == b"question"
    shutdown = guest.expect(Op.SHUTDOWN)
    assert shutdown.header.flags == ShutdownFlag.SEND
    guest.send(Op.RW, src_port=2222, dst_port=port, payload=b"answer")
    assert _recv_exactly(client, 6) == b"answer"
    guest.send(Op.SHUTDOWN, src_port=2222, dst_port=port, flags=3)
    assert client.recv(10) == b""
    guest.expect(Op.RST)


def test_guest_half_close_shuts_the_host_socket_after_buffered_data(backend, guest):
    client, port = _host_connect(backend, guest)
    guest.send(Op.RW, src_port=2222, dst_port=port, payload=b"data")
    guest.send(Op.SHUTDOWN, src_port=2222, dst_port=port, flags=ShutdownFlag.SEND)
    assert _recv_exactly(client, 4) == b"data"
    assert client.recv(10) == b""  # EOF: SHUT_WR on the host socket
    client.sendall(b"still open")
    assert guest.expect(Op.RW).payload == b"still open"
    client.close()
    assert guest.expect(Op.SHUTDOWN).header.flags == ShutdownFlag.SEND
    guest.send(Op.SHUTDOWN, src_port=2222, dst_port=port, flags=3)
    guest.expect(Op.RST)


def test_guest_close_flushes_then_answers_rst(backend, guest):
    client, port = _host_connect(backend, guest)
    guest.send(Op.RW, src_port=2222, dst_port=port, payload=b"last words")
    guest.send(Op.SHUTDOWN, src_port=2222, dst_port=port, flags=3)
    assert _recv_exactly(client, 10) == b"last words"
    assert client.recv(10) == b""
    guest.expect(Op.RST)


def test_guest_rst_closes_the_host_socket(backend, guest):
    client, port = _host_connect(backend, guest)
    guest.send(Op.RST, src_port=2222, dst_port=port)
    assert client.recv(10) == b""


def test_packet_for_an_unknown_connection_gets_rst(backend, guest):
    guest.send(Op.RW, src_port=1111, dst_port=9999, payload=b"?")
    rst = guest.expect(Op.RST)
    assert (rst.header.src_port, rst.header.dst_port) == (9999, 1111)


# -- guest to host ---------------------------------------------------------------------------


def test_guest_connects_to_host_listener(backend, guest):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{backend.uds_path}_5000")
    listener.listen()
    listener.settimeout(5)
    guest.send(Op.REQUEST, src_port=40000, dst_port=5000)
    response = guest.expect(Op.RESPONSE)
    assert (response.header.src_port, response.header.dst_port) == (5000, 40000)
    server, _ = listener.accept()
    guest.send(Op.RW, src_port=40000, dst_port=5000, payload=b"ping")
    assert _recv_exactly(server, 4) == b"ping"
    server.sendall(b"pong")
    assert guest.expect(Op.RW).payload == b"pong"


def test_guest_connect_to_missing_listener_gets_rst(backend, guest):
    guest.send(Op.REQUEST, src_port=40001, dst_port=5001)
    rst = guest.expect(Op.RST)
    assert (rst.header.src_port, rst.header.dst_port) == (5001, 40001)


def test_connection_limit_refuses_both_directions(tmp_path, monkeypatch):
    monkeypatch.setenv("SECVF_HOME", str(tmp_path / "home"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with BackendProcess(tmp_path, CID, "--max-connections", "3") as backend:
        listener.bind(f"{backend.uds_path}_5000")
        listener.listen(10)
        with FakeGuest(backend.vhost_user_socket, CID) as guest:
            guest.start()
            for port in range(3):
                guest.send(Op.REQUEST, src_port=40000 + port, dst_port=5000)
                guest.expect(Op.RESPONSE)
            guest.send(Op.REQUEST, src_port=40003, dst_port=5000)
            assert guest.expect(Op.RST).header.dst_port == 40003
            client = _client(backend)
            _assert_closed_without_bytes(client)
            assert guest.drain(0.2) == []
            guest.send(Op.RST, src_port=40000, dst_port=5000)  # one closes: room again
            time.sleep(0.1)
            guest.send(Op.REQUEST, src_port=40004, dst_port=5000)
            assert guest.expect(Op.RESPONSE).header.dst_port == 40004


def test_rx_is_shared_round_robin_between_connections(tmp_path, monkeypatch):
    monkeypatch.setenv("SECVF_HOME", str(tmp_path / "home"))
    with BackendProcess(tmp_path, CID) as backend, FakeGuest(backend.vhost_user_socket, CID) as g:
        g.start(rx_buffers=2)
        g.auto_refill = False  # the guest hands out rx buffers only when the test says so
        first, port_a = _host_connect(backend, g, port=2222)
        second, port_b = _host_connect(backend, g, port=2223)
        first.sendall(os.urandom(60_000))
        second.sendall(os.urandom(60_000))
        time.sleep(0.3)  # both connections now have data staged
        g.post_rx_buffers(8)
        order = [p.header.src_port for p in g.drain(0.3)]
        assert len(order) == 8
        assert order == [port_a, port_b] * 4 or order == [port_b, port_a] * 4, order


# -- hostile guest -----------------------------------------------------------------------------


def _assert_backend_survives(backend, guest):
    """The process is alive and host-to-guest connects still reach the guest."""
    assert backend.process.poll() is None
    _client(backend, b"CONNECT 7777\n")
    guest.expect(Op.REQUEST, port=7777)


@pytest.mark.parametrize(
    "corrupt, detail",
    [
        (
            lambda tx: (
                tx.set_descriptor(0, 0x300000, 44, DESC_F_NEXT, 1),
                tx.set_descriptor(1, 0x300000, 44, DESC_F_NEXT, 0),
                tx.publish(0),
            ),
            "longer than the queue",
        ),
        (lambda tx: tx.publish(1000), "outside a queue"),
        (lambda tx: (tx.set_descriptor(0, 0x300000, 44, DESC_F_NEXT, 500), tx.publish(0)), "500"),
        (lambda tx: (tx.set_descriptor(0, RAM_HOLE[0], 44, 0, 0), tx.publish(0)), "outside guest"),
        (lambda tx: (tx.set_descriptor(0, 2**63, 44, 0, 0), tx.publish(0)), "outside guest"),
    ],
)
def test_corrupt_tx_ring_stops_the_queue_not_the_backend(backend, guest, corrupt, detail):
    corrupt(guest.tx)
    guest.kick_queue(1)
    time.sleep(0.3)
    assert guest.tx.take_used() == []  # the chain was not consumed
    events = _violations()
    assert len(events) == 1 and detail in events[0]["detail"]
    assert events[0]["severity"] == "CRITICAL"
    _assert_backend_survives(backend, guest)


def test_zero_length_chain_is_dropped_and_the_queue_goes_on(backend, guest):
    head = guest.tx.add_chain([(0x300000, 0, False)])
    guest.kick_queue(1)
    assert guest.wait_tx_used(1) == [(head, 0)]
    assert "shorter than the header" in _violations()[0]["detail"]
    guest.send(Op.REQUEST, src_port=1, dst_port=5555)  # later packets are still handled
    guest.expect(Op.RST)


@pytest.mark.parametrize("claimed", [65 * 1024, 2**32 - 1, 100])
def test_packet_length_beyond_its_chain_or_64k_resets_the_connection(backend, guest, claimed):
    client, port = _host_connect(backend, guest)
    guest.send(Op.RW, src_port=2222, dst_port=port, payload=b"short", length=claimed)
    assert guest.expect(Op.RST).header.src_port == port
    assert client.recv(10) == b""
    assert "claims" in _violations()[0]["detail"]


def test_oversized_payload_is_refused_even_if_present(backend, guest):
    client, port = _host_connect(backend, guest)
    guest.send(Op.RW, src_port=2222, dst_port=port, payload=b"p" * (64 * 1024 + 1))
    assert guest.expect(Op.RST).header.src_port == port
    assert client.recv(10) == b""


def test_spoofed_source_cid_is_dropped(backend, guest):
    header = struct.pack("<QQIIIHHIII", 99, 2, 1, 5000, 0, 1, Op.REQUEST, 0, 0, 0)
    guest.send_raw(header)
    assert guest.wait_tx_used(1)
    assert guest.drain(0.2) == []
    assert "from cid 99" in _violations()[0]["detail"]


def test_request_flood_without_rx_buffers_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("SECVF_HOME", str(tmp_path / "home"))
    with BackendProcess(tmp_path, CID) as backend, FakeGuest(backend.vhost_user_socket, CID) as g:
        g.start(rx_buffers=0)
        sent = 0
        with pytest.raises(TxQueueFull):  # REQUESTs to a port nobody listens on, no rx buffers
            for sent in range(2000):  # noqa: B007 - `sent` is read after the loop
                g.send(Op.REQUEST, src_port=10_000 + sent, dst_port=6000)
        # the backend stopped taking tx once 256 RSTs waited for rx buffers
        assert 256 <= len(g.wait_tx_used(sent, timeout=0.2)) <= 300
        g.post_rx_buffers(64)
        rsts = [p for p in g.drain(0.5) if p.header.op == Op.RST]
        assert len(rsts) >= 64
        assert backend.process.poll() is None


def test_credit_request_flood_yields_few_updates(backend, guest):
    _client_sock, port = _host_connect(backend, guest)
    for _ in range(5):
        for _ in range(100):
            guest.send(Op.CREDIT_REQUEST, src_port=2222, dst_port=port)
        guest.wait_tx_used(100)
    updates = [p for p in guest.drain(0.3) if p.header.op == Op.CREDIT_UPDATE]
    assert updates, "CREDIT_REQUEST was never answered"
    assert all(u.header.dst_port == 2222 and u.header.src_port == port for u in updates)
    # pending requests coalesce into one update: far fewer than the 500 requests
    assert len(updates) <= 100


def test_violation_events_are_rate_limited(backend, guest):
    for i in range(30):
        guest.send(Op.RW, src_port=i, dst_port=1, payload=b"x", length=10)
    guest.wait_tx_used(30)
    time.sleep(1.1)
    guest.send(Op.RW, src_port=99, dst_port=1, payload=b"x", length=10)
    guest.wait_tx_used(1)
    events = _violations()
    assert 3 <= len(events) <= 7
    assert events[-1]["suppressed"] >= 15


# -- device lifecycle ----------------------------------------------------------------------------


def test_driver_reset_drops_connections_and_the_device_works_again(backend, guest):
    client, _port = _host_connect(backend, guest)
    guest.reset_driver()
    assert client.recv(10) == b""
    guest.post_rx_buffers(16)
    _host_connect(backend, guest, port=3333)


def test_ring_stop_and_resume_at_the_same_index_keeps_connections(backend, guest):
    client, port = _host_connect(backend, guest)
    bases = guest.stop_queues()
    assert bases == [1, 1]  # rx: the REQUEST went out; tx: the RESPONSE came in
    guest.start_queues(bases)  # a VM pause/resume: same indices, connections survive
    client.sendall(b"after pause")
    assert guest.expect(Op.RW).payload == b"after pause"


def test_call_fd_can_be_replaced_at_any_time(backend, guest):
    client, _port = _host_connect(backend, guest)
    old = guest.call[0]
    guest.call[0] = os.eventfd(0, os.EFD_NONBLOCK)
    guest.request(Request.SET_VRING_CALL, struct.pack("<Q", 0), [guest.call[0]])
    os.close(old)
    client.sendall(b"signalled")
    assert guest.expect(Op.RW, timeout=2).payload == b"signalled"


def test_sockets_are_private_and_removed_when_qemu_disconnects(backend):
    for path in (backend.vhost_user_socket, backend.uds_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with FakeGuest(backend.vhost_user_socket, CID) as fake:
        fake.start()
    assert backend.wait() == 0
    assert not backend.vhost_user_socket.exists()
    assert not backend.uds_path.exists()


def test_sigterm_exits_cleanly_and_removes_sockets(backend, guest):
    backend.process.terminate()
    assert backend.wait() == 0
    assert not backend.vhost_user_socket.exists()
    assert not backend.uds_path.exists()
