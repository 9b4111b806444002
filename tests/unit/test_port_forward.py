"""Port forwarding without a VM: the spec, the handshake, and the host forwarder talking
to the guest's real relay code through a stand-in for the vsock backend's socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.errors import ConfigError
from secvf.exec import forwarding
from secvf.exec.forwarder import ForwardError, PortForward
from secvf.guest.agent import forward as relay
from secvf.workflows.port_forward import parse_forward_spec


@pytest.mark.parametrize(("spec", "parsed"), [
    ("8080:80", ("127.0.0.1", 8080, 80)),
    ("0:22", ("127.0.0.1", 0, 22)),
    ("0.0.0.0:8080:80", ("0.0.0.0", 8080, 80)),
    ("[::1]:8080:80", ("::1", 8080, 80)),
])
def test_a_spec_parses_with_loopback_as_the_default_address(spec, parsed) -> None:
    assert parse_forward_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["80", "a:80", "8080:0", "8080:70000", "70000:80",
                                  "host.example:1:2", "::1:8080:80", "[::1:8080:80", ""])
def test_a_bad_spec_is_refused_with_the_expected_form(spec) -> None:
    with pytest.raises(ConfigError, match="port forward"):
        parse_forward_spec(spec)


def test_the_handshake_lines_round_trip_and_garbage_is_refused() -> None:
    assert forwarding.parse_request(forwarding.encode_request(8000)) == 8000
    forwarding.parse_reply(forwarding.encode_ok())
    with pytest.raises(forwarding.ForwardRefused) as info:
        forwarding.parse_reply(forwarding.encode_error(111, "Connection\nrefused"))
    assert (info.value.errno_name, info.value.text) == ("ECONNREFUSED", "Connection refused")
    for line in (b"TCP 0\n", b"TCP 99999\n", b"UDP 53\n", b"TCP 80", b"TCP -1\n", b"\xff\n"):
        with pytest.raises(ValueError):
            forwarding.parse_request(line)
    for reply in (b"", b"ok\n", b"ERR NOPE x\n", b"OK"):
        with pytest.raises(forwarding.ForwardRefused, match="EPROTO|answered"):
            forwarding.parse_reply(reply)
    assert len(forwarding.encode_error(5, "x" * 10_000)) <= forwarding.MAX_LINE_BYTES


class FakeBackend:
    """The vsock backend's hybrid socket, as far as a forward sees it: ``CONNECT 1022``
    is answered ``OK`` and the stream is handed to the guest relay's real code (which
    then connects to a port on this host's loopback)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.slots = threading.BoundedSemaphore(relay.MAX_FORWARDS)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            line = forwarding.read_line(conn)
            if line != f"CONNECT {forwarding.FORWARD_VSOCK_PORT}\n".encode():
                conn.close()
                continue
            conn.sendall(b"OK 1\n")
            self.slots.acquire()
            threading.Thread(target=relay._serve_one, args=(conn, self.slots),
                             daemon=True).start()


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[FakeBackend]:
    fake = FakeBackend(tmp_path / "vsock.sock")
    yield fake
    fake.listener.close()


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (the "guest service")."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def test_bytes_go_both_ways_and_are_counted(backend, echo_port) -> None:
    with PortForward(backend.path, echo_port) as forward:
        payload = bytes(range(256)) * 4096  # 1 MiB
        with socket.create_connection(("127.0.0.1", forward.host_port), timeout=10) as conn:
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                got += conn.recv(65536)
            sender.join()
            conn.shutdown(socket.SHUT_WR)  # a half-close reaches the service...
            assert conn.recv(1) == b""  # ...which closes, and that comes back
        assert bytes(got) == payload
        deadline = time.monotonic() + 5
        while forward.stats.active:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stats = forward.stats
        assert (stats.connections, stats.refused) == (1, 0)
        assert stats.bytes_to_guest == stats.bytes_from_guest == len(payload)


def test_a_closed_guest_port_resets_the_client(backend) -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nobody listens there now
    refused = []
    with PortForward(backend.path, port, on_refused=lambda n, t: refused.append(n)) as forward:
        with socket.create_connection(("127.0.0.1", forward.host_port), timeout=10) as conn:
            with pytest.raises(ConnectionResetError):
                if not conn.recv(1):
                    raise AssertionError("closed cleanly instead of reset")
        assert refused == ["ECONNREFUSED"] and forward.stats.refused == 1


def test_an_unreachable_relay_resets_too(tmp_path) -> None:
    with PortForward(tmp_path / "no-such.sock", 80) as forward:
        with socket.create_connection(("127.0.0.1", forward.host_port), timeout=10) as conn:
            with pytest.raises(ConnectionResetError):
                conn.recv(1)
        assert forward.stats.refused == 1


def test_a_port_in_use_is_a_clear_error(backend) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    with taken, pytest.raises(ForwardError, match="cannot listen on 127.0.0.1 port"):
        PortForward(backend.path, 80, host_port=taken.getsockname()[1]).start()


def test_closing_the_forward_ends_open_connections(backend, echo_port) -> None:
    forward = PortForward(backend.path, echo_port).start()
    conn = socket.create_connection(("127.0.0.1", forward.host_port), timeout=10)
    conn.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    forward.close()
    assert conn.recv(1) == b""  # ended, not left hanging
    conn.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", forward.host_port), timeout=2)


def test_the_relay_refuses_a_bad_request_line(tmp_path) -> None:
    one, other = socket.socketpair()
    slots = threading.BoundedSemaphore(1)
    slots.acquire()
    worker = threading.Thread(target=relay._serve_one, args=(other, slots))
    worker.start()
    one.sendall(b"GET / HTTP/1.0\n")
    with pytest.raises(forwarding.ForwardRefused) as info:
        forwarding.parse_reply(forwarding.read_line(one))
    assert info.value.errno_name == "EPROTO"
    worker.join(5)
    assert slots.acquire(blocking=False)  # its slot was given back
