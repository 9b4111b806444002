"""Driver resets and awkward event orders, against the backend as a real process.

The fake QEMU here replays the message sequence QEMU 7.2 really sends around a guest reboot
(taken from a backend debug log): SET_VRING_ENABLE(0) for both rings, GET_VRING_BASE for both,
SET_VRING_CALL twice (masked notifiers); later SET_VRING_CALL twice, SET_FEATURES,
SET_MEM_TABLE, NUM/BASE/ADDR/KICK per ring, SET_VRING_ENABLE(1) twice, SET_VRING_CALL twice.
The backend is frozen with SIGSTOP while events pile up, so that they reach it in one select
batch, in the order the test wrote them.
"""

import hashlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from secvf.vsock.device import Request
from secvf.vsock.packet import Op
from secvf.vsock.testing import BackendProcess, DriverQueue, FakeGuest, TxQueueFull

CID = 42
HOST_BUF_ALLOC = 256 * 1024


@contextmanager
def frozen(backend: BackendProcess) -> Iterator[None]:
    """Stop the backend process while the body makes events pile up, then let it run."""
    assert backend.process is not None
    os.kill(backend.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(backend.process.pid, signal.SIGCONT)


def _client(backend: BackendProcess, port: int) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(backend.uds_path))
    client.sendall(b"CONNECT %d\n" % port)
    return client


def _read_line(client: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n") and (byte := client.recv(1)):
        line += byte
    return line


def _host_connect(
    backend: BackendProcess, guest: FakeGuest, port: int
) -> tuple[socket.socket, int]:
    client = _client(backend, port)
    request = guest.expect(Op.REQUEST, port=port)
    guest.send(Op.RESPONSE, src_port=port, dst_port=request.header.src_port)
    assert _read_line(client) == b"OK %d\n" % request.header.src_port
    return client, request.header.src_port


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the backend wrote before it closed ``sock`` (a reset counts as closed)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass  # closed with bytes of ours unread
    return data


def _vring_fd_payload(index: int) -> bytes:
    return struct.pack("<Q", index)


def _qemu_stop(guest: FakeGuest) -> None:
    """What QEMU 7.2 sends when the guest resets the device (sysrq-b reboot)."""
    for index in range(2):
        guest.request(Request.SET_VRING_ENABLE, struct.pack("<II", index, 0))
    guest.stop_queues()
    for index in (1, 0):  # the masked notifiers
        guest.request(Request.SET_VRING_CALL, _vring_fd_payload(index), [guest.call[index]])


def _qemu_new_driver(guest: FakeGuest) -> None:
    """The new driver's start up to SET_MEM_TABLE (which waits for its ack), fresh rings."""
    guest.rx = DriverQueue(guest.ram, guest.rx.size)
    guest.tx = DriverQueue(guest.ram, guest.tx.size)
    for index in (1, 0):
        guest.request(Request.SET_VRING_CALL, _vring_fd_payload(index), [guest.call[index]])
    guest.request(Request.SET_FEATURES, struct.pack("<Q", 1 << 32 | 1 << 30))
    guest.set_mem_table()


def _qemu_enable(guest: FakeGuest) -> None:
    for index in range(2):
        guest.request(Request.SET_VRING_ENABLE, struct.pack("<II", index, 1))
    for index in range(2):
        guest.request(Request.SET_VRING_CALL, _vring_fd_payload(index), [guest.call[index]])


def _echo_through_fake_guest(
    backend: BackendProcess, guest: FakeGuest, port: int, size: int
) -> bytes:
    """A host client echoes ``size`` bytes through a guest that plays an echo server."""
    client, host_port = _host_connect(backend, guest, port)
    blob = os.urandom(size)
    echoed = bytearray()

    def host_side() -> None:
        sender = threading.Thread(target=client.sendall, args=(blob,))
        sender.start()
        while len(echoed) < size and (chunk := client.recv(65536)):
            echoed.extend(chunk)
        sender.join(10)

    reader = threading.Thread(target=host_side)
    reader.start()
    received = sent = host_fwd_cnt = 0
    pending = bytearray()
    deadline = time.monotonic() + 30
    while sent < size:
        assert time.monotonic() < deadline, f"stalled: guest got {received}, echoed {sent}"
        for packet in guest.poll(1.0):
            assert packet.header.dst_port == port, packet
            host_fwd_cnt = packet.header.fwd_cnt
            if packet.header.op == Op.RW:
                received += len(packet.payload)
                pending += packet.payload
        if not pending and received < size:
            continue
        credit = HOST_BUF_ALLOC - (sent - host_fwd_cnt)
        chunk = bytes(pending[: max(0, min(credit, 65536))])
        if not chunk:
            continue  # wait for the host's CREDIT_UPDATE
        guest.send(Op.RW, src_port=port, dst_port=host_port, payload=chunk, fwd_cnt=received)
        del pending[: len(chunk)]
        sent += len(chunk)
    reader.join(10)
    client.close()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()
    return bytes(echoed)


# -- the reboot sequence -----------------------------------------------------------------------


def test_reboot_sequence_closes_old_streams_and_a_new_bulk_echo_works(backend, guest):
    old, old_port = _host_connect(backend, guest, 5301)
    guest.auto_refill = False
    old.sendall(os.urandom(300_000))  # staged host data the old guest never takes
    guest.send(Op.RW, src_port=5301, dst_port=old_port, payload=b"x" * 1000)
    guest.drain(0.2)
    _qemu_stop(guest)
    waiting = _client(backend, 2222)  # a client dials while the rings are stopped
    _qemu_new_driver(guest)
    guest.set_rings(with_call=False)  # QEMU sends CALL only after ENABLE
    guest.auto_refill = True
    guest.post_rx_buffers(64)  # the new driver fills rx and kicks before the backend enables
    _qemu_enable(guest)
    assert _read_until_closed(old) == b"x" * 1000
    assert _read_until_closed(waiting) == b""  # never reached the guest: no OK
    assert "closed by device reset" in backend.log()
    _echo_through_fake_guest(backend, guest, 5302, 512 * 1024)


@pytest.mark.parametrize("kick_first", [True, False])
def test_reboot_events_arriving_in_one_batch(backend, guest, kick_first):
    _host_connect(backend, guest, 5301)
    _qemu_stop(guest)  # GET_VRING_BASE and SET_MEM_TABLE wait for answers: not frozen
    _qemu_new_driver(guest)
    with frozen(backend):
        guest.set_rings(with_call=False)  # QEMU sends CALL only after ENABLE
        if kick_first:
            guest.post_rx_buffers(64)
            _qemu_enable(guest)
        else:
            _qemu_enable(guest)
            guest.post_rx_buffers(64)
        early = _client(backend, 5302)  # dialled before the rings run: dropped by the reset
    assert _read_until_closed(early) == b""
    _echo_through_fake_guest(backend, guest, 5303, 256 * 1024)


# -- event-loop ordering -----------------------------------------------------------------------


def test_kick_in_the_same_batch_as_the_message_that_closes_its_fd(backend, guest):
    """A kick event collected before its fd was replaced must not be read through a stale fd."""
    client, port = _host_connect(backend, guest, 5301)
    new_kick = os.eventfd(0, os.EFD_NONBLOCK)
    with frozen(backend):
        # the message first, then the kick: select returns them in this order
        guest.request(Request.SET_VRING_KICK, _vring_fd_payload(0), [new_kick])
        guest.kick_queue(0)
    old_kick, guest.kick[0] = guest.kick[0], new_kick
    os.close(old_kick)
    client.sendall(b"after the new kick fd")
    assert guest.expect(Op.RW).payload == b"after the new kick fd"
    assert backend.process.poll() is None, backend.log()


def test_tx_paused_by_the_rst_backlog_resumes_without_another_kick(tmp_path, monkeypatch):
    monkeypatch.setenv("SECVF_HOME", str(tmp_path / "home"))
    with BackendProcess(tmp_path, CID) as backend, FakeGuest(backend.vhost_user_socket, CID) as g:
        g.start(rx_buffers=0)
        g.auto_refill = False
        sent = 0
        with pytest.raises(TxQueueFull):  # REQUESTs nobody answers; no rx buffers for RSTs
            for sent in range(2000):  # noqa: B007 - `sent` is read after the loop
                g.send(Op.REQUEST, src_port=10_000 + sent, dst_port=6000)
        used = len(g.wait_tx_used(sent, timeout=0.2))
        assert used == 256  # tx paused with 256 RSTs waiting for rx buffers
        g.post_rx_buffers(64)  # one rx kick: 64 RSTs go out, the backlog drops below 256
        assert len([p for p in g.drain(0.3) if p.header.op == Op.RST]) == 64
        # no tx kick follows (the guest kicked when it queued them): the backend must take
        # the next 64 chains by itself, until the backlog is full again
        assert len(g.wait_tx_used(sent - used, timeout=1.0)) == 64
