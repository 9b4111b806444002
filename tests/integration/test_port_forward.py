"""Port forwarding into a booted sandbox: host urllib → guest python3 -m http.server, a
closed guest port, and a generic VM's refusal (the shared fleet of VMs)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from secvf import api
from secvf.errors import NoExecChannel
from tests.helpers import run_cli

pytestmark = pytest.mark.vm

GUEST_PORT = 8931


@pytest.fixture
def http_server(fleet: dict):
    """A python3 -m http.server on the sandbox's loopback, serving a file we wrote."""
    api.run_command("sbx", ["sh", "-c", "mkdir -p /tmp/www && echo forwarded-page "
                                        "> /tmp/www/index.html"], user="root")
    with api.connect_exec("sbx") as client:
        session = client.start(["python3", "-m", "http.server", "--bind", "127.0.0.1",
                                str(GUEST_PORT)], cwd="/tmp/www", user="root")
        deadline = time.monotonic() + 60
        while not _listening():
            assert time.monotonic() < deadline, "the guest http.server never listened"
            time.sleep(0.3)
        yield
        session.cancel()
        for _ in session:  # until it has exited: the next test's server binds the same port
            pass


def _listening() -> bool:
    probe = (f"import socket; s = socket.socket(); s.settimeout(2); "
             f"s.connect(('127.0.0.1', {GUEST_PORT}))")
    return api.run_command("sbx", ["python3", "-c", probe], user="root").exit_code == 0


def test_a_host_client_fetches_a_page_from_a_guest_server(http_server) -> None:
    with api.port_forward("sbx", f"0:{GUEST_PORT}") as forward:
        url = f"http://127.0.0.1:{forward.host_port}/index.html"
        for _ in range(3):  # one forwarded connection each
            with urllib.request.urlopen(url, timeout=30) as reply:
                assert reply.read() == b"forwarded-page\n"
        stats = forward.stats
        assert stats.connections == 3 and stats.refused == 0
        assert stats.bytes_from_guest > 3 * len(b"forwarded-page\n")
        assert stats.bytes_to_guest > 0
    with pytest.raises(OSError):  # closed: nothing listens there any more
        socket.create_connection(("127.0.0.1", forward.host_port), timeout=5)


def test_a_closed_guest_port_resets_the_host_connection(fleet: dict) -> None:
    with api.port_forward("sbx", "0:9") as forward:  # the discard port: nobody listens
        with socket.create_connection(("127.0.0.1", forward.host_port), timeout=30) as conn:
            conn.settimeout(30)
            with pytest.raises(ConnectionResetError):
                conn.sendall(b"x")
                if not conn.recv(1):
                    raise AssertionError("closed cleanly instead of reset")
        assert forward.stats.refused == 1


def test_a_generic_vm_has_no_port_forwarding(fleet: dict) -> None:
    with pytest.raises(NoExecChannel, match="no exec channel by design"):
        api.port_forward("gen", "0:80")
    result = run_cli("sandbox", "port-forward", "gen", "0:80")
    assert result.returncode == 125 and "no exec channel by design" in result.stderr  # as vm exec


def test_the_cli_forwards_until_interrupted_and_reports_its_counters(http_server) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "secvf", "sandbox", "port-forward", "sbx",
                             f"127.0.0.1:0:{GUEST_PORT}", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = json.loads(proc.stdout.readline())
        assert (started["host_addr"], started["guest_port"]) == ("127.0.0.1", GUEST_PORT)
        with urllib.request.urlopen(f"http://127.0.0.1:{started['host_port']}/",
                                    timeout=30) as reply:
            assert b"forwarded-page" in reply.read()
    finally:
        proc.send_signal(2)  # Ctrl-C
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    (final,) = json.loads(out)
    assert final["connections"] == 1 and final["bytes_from_guest"] > 0
