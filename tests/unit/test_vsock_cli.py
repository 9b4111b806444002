"""``python -m secvf.vsock``: argument checks, socket paths, and the public API."""

import socket
import subprocess
import sys

import secvf.vsock
from secvf.vsock.testing import BackendProcess


def _run(tmp_path, *args):
    argv = [sys.executable, "-m", "secvf.vsock", "--vhost-user-socket", str(tmp_path / "vu.sock")]
    argv += ["--uds-path", str(tmp_path / "vsock.sock"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)


def test_reserved_guest_cid_is_refused(tmp_path):
    result = _run(tmp_path, "--guest-cid", "2")
    assert result.returncode == 1
    assert "guest CID 2 is reserved" in result.stderr
    assert not (tmp_path / "vu.sock").exists()


def test_socket_of_a_live_backend_is_not_taken_over(tmp_path):
    with BackendProcess(tmp_path, 3):
        result = _run(tmp_path, "--guest-cid", "4")
        assert result.returncode == 1
        assert "another process is listening" in result.stderr
        assert (tmp_path / "vu.sock").exists()  # the first backend's socket survives


def test_stale_socket_file_is_replaced(tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "vsock.sock"))
    stale.close()  # the file stays, nobody listens
    with BackendProcess(tmp_path, 3) as backend:
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(backend.uds_path))
        assert "removing stale socket" in backend.log()


def test_path_that_is_not_a_socket_is_refused(tmp_path):
    (tmp_path / "vsock.sock").write_text("not a socket")
    result = _run(tmp_path, "--guest-cid", "3")
    assert result.returncode == 1
    assert "is not a socket" in result.stderr
    assert (tmp_path / "vsock.sock").read_text() == "not a socket"


def test_public_api_is_exported():
    for name in secvf.vsock.__all__:
        assert getattr(secvf.vsock, name) is not None
    assert secvf.vsock.serve.__module__ == "secvf.vsock.backend"
    assert secvf.vsock.FIRST_HOST_PORT == 2**30
