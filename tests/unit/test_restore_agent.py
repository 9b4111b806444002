"""The agent's side of ``restore``: the real agent on a Unix socket (where it must refuse to
touch the host), its bad-input answers, and the pieces of the restore that are plain
functions (hosts file, mountinfo, /tmp cleaning, DHCP client lookup)."""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
from pathlib import Path

import pytest

import secvf
from secvf.exec import ExecClient, RestoreFailed, protocol
from secvf.guest.agent import restore as restore_mod
from secvf.guest.agent.restore import Mount, Restorer
from secvf.testing.agent import AgentProcess

CURRENT_USER = pwd.getpwuid(os.geteuid()).pw_name
INIT = Path(secvf.__file__).parent / "guest" / "init.sh"
VALID = {"time_ns": 1_800_000_000 * 10**9, "entropy": "ab" * 32}


@pytest.fixture
def agent(tmp_path):
    with AgentProcess(tmp_path, default_user=CURRENT_USER, keepalive_interval_s=0.2) as running:
        yield running


class RawPeer:
    """A protocol peer that sends what a test says, even what ExecClient would refuse."""

    def __init__(self, path: Path, generation: int = protocol.GENERATION) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.decoder = protocol.FrameDecoder()
        self.frames: list[protocol.Frame] = []
        self.sock.sendall(protocol.encode_message("hello", generation=generation))
        self.hello = self.receive()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> protocol.Message:
        while not self.frames:
            data = self.sock.recv(1 << 20)
            assert data, "the agent closed the connection"
            self.frames += self.decoder.feed(data)
        return protocol.decode_message(self.frames.pop(0))

    def restore(self, **fields: object) -> protocol.Message:
        payload = protocol.build_payload("restore", {**VALID, **fields})
        body = json.dumps({"v": 2, "t": "restore", "p": payload}).encode()
        self.send(protocol.encode_frame(protocol.FrameType.CONTROL, 0, body))
        return self.receive()

    def close(self) -> None:
        self.sock.close()


# ---- the real agent, on the host -----------------------------------------------------------


def test_an_agent_on_a_unix_socket_does_not_offer_restore(agent):
    with ExecClient.connect(agent.socket_path, timeout=5) as client:
        assert client.generation == protocol.GENERATION
        assert "restore" not in client.capabilities
        with pytest.raises(RestoreFailed) as err:
            client.restore(hostname="sbx-1")
        assert err.value.kind == "unsupported" and "rebuild the image" in str(err.value)
        assert client.ping() >= 0  # nothing was sent: the connection is fine


def test_a_valid_restore_is_refused_there_and_changes_nothing(agent, tmp_path):
    marker = Path("/tmp") / f"secvf-restore-test-{os.getpid()}"
    marker.write_text("stays")
    hostname = socket.gethostname()
    peer = RawPeer(agent.socket_path)
    try:
        reply = peer.restore(hostname="other-host", clean_tmp=True)
        assert reply.name == "restore_failed"
        assert reply["kind"] == "unsupported" and "Unix socket" in reply["message"]
        assert marker.read_text() == "stays" and socket.gethostname() == hostname
        peer.send(protocol.encode_message("ping"))
        assert peer.receive().name == "pong"  # the session goes on
    finally:
        peer.close()
        marker.unlink()


@pytest.mark.parametrize(("fields", "field"), [
    ({"hostname": "bad_name"}, "hostname"),
    ({"mac": "not-a-mac"}, "mac"),
    ({"mac": "01:00:5e:00:00:01"}, "mac"),
    ({"entropy": "xyz"}, "entropy"),
    ({"shares": [{"tag": "ro0", "path": "/etc/passwd", "read_only": True}]}, "shares[0].path"),
    ({"shares": [{"tag": "ro0", "path": "../x", "read_only": True}]}, "shares[0].path"),
    ({"hostname": "h" * 100_000}, "hostname"),
])
def test_bad_input_gets_a_typed_answer_and_the_session_goes_on(agent, fields, field):
    peer = RawPeer(agent.socket_path)
    try:
        reply = peer.restore(**fields)
        assert reply.name == "restore_failed"
        assert (reply["kind"], reply["field"]) == ("invalid_request", field)
        peer.send(protocol.encode_message("ping"))
        assert peer.receive().name == "pong"
    finally:
        peer.close()


def test_a_restore_bigger_than_a_frame_is_refused_by_the_frame_limit(agent):
    peer = RawPeer(agent.socket_path)
    try:
        header = protocol.HEADER.pack(protocol.MAGIC, protocol.FrameType.CONTROL, 0, 0,
                                      protocol.MAX_FRAME_BYTES + 1)
        peer.send(header)
        reply = peer.receive()
        assert reply.name == "error" and reply["code"] == "frame_too_large"
    finally:
        peer.close()
    with ExecClient.connect(agent.socket_path, timeout=5) as client:
        client.ping()  # the agent carries on


def test_a_malformed_share_list_is_a_bad_message(agent):
    peer = RawPeer(agent.socket_path)
    try:
        body = b'{"v":2,"t":"restore","p":{"time_ns":1,"entropy":"","shares":[["t","/w",false]]}}'
        peer.send(protocol.encode_frame(protocol.FrameType.CONTROL, 0, body))
        reply = peer.receive()
        assert reply.name == "error" and reply["code"] == "bad_message"
    finally:
        peer.close()


def test_a_generation_1_session_cannot_send_restore(agent):
    peer = RawPeer(agent.socket_path, generation=1)
    try:
        assert peer.hello["generation"] == 1 and "restore" not in peer.hello["capabilities"]
        reply = peer.restore()
        assert reply.name == "error" and reply["code"] == "bad_message"
        assert "generation 2" in reply["message"]
    finally:
        peer.close()


def test_restore_on_a_stream_is_a_bad_message(agent):
    peer = RawPeer(agent.socket_path)
    try:
        peer.send(protocol.encode_message("restore", 7, **VALID))
        reply = peer.receive()
        assert reply.name == "error" and reply["code"] == "bad_message"
    finally:
        peer.close()


def test_a_disabled_restorer_checks_first_then_refuses():
    restorer = Restorer(enabled=False, why_not="because")
    payload = protocol.build_payload("restore", {**VALID, "hostname": "x_y"})
    assert restorer.handle(payload, 0) == ("restore_failed", {
        "kind": "invalid_request", "field": "hostname",
        "message": "restore.hostname: 'x_y' is not a hostname (labels of letters, digits and "
                   "inner '-', separated by '.')"})
    name, fields = restorer.handle(protocol.build_payload("restore", VALID), 0)
    assert (name, fields["kind"], fields["message"]) == ("restore_failed", "unsupported", "because")


def test_only_a_root_agent_on_vsock_restores(monkeypatch):
    assert not Restorer.for_agent(listening_on_vsock=False).enabled
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert not Restorer.for_agent(listening_on_vsock=True).enabled
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert Restorer.for_agent(listening_on_vsock=True).enabled


# ---- the pieces ---------------------------------------------------------------------------------


def test_the_hosts_file_is_the_one_init_writes():
    printf = re.search(r"printf '([^']*)' \"\$name\" >/etc/hosts", INIT.read_text())
    assert printf is not None
    made_by_init = subprocess.run(["sh", "-c", f"printf '{printf.group(1)}' sbx-7"],
                                  capture_output=True, text=True, check=True).stdout
    assert restore_mod.hosts_file_text("sbx-7") == made_by_init


MOUNTINFO = r"""22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
25 22 0:21 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
31 22 0:30 / /workspace rw,relatime shared:9 - virtiofs workspace rw
32 25 0:31 / /tmp/held\040open/inner rw - tmpfs none rw
garbage line
"""


def test_mountinfo_is_parsed_with_its_escapes():
    mounts = restore_mod.parse_mountinfo(MOUNTINFO)
    assert Mount("/workspace", "virtiofs", "workspace") in mounts
    assert Mount("/tmp/held open/inner", "tmpfs", "none") in mounts
    assert len(mounts) == 4


def test_cleaning_a_directory_removes_everything_but_mounts_and_follows_no_link(tmp_path):
    tmp, outside = tmp_path / "tmp", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    tmp.mkdir()
    (tmp / "file").write_text("x")
    (tmp / ".hidden").write_text("x")
    (tmp / "dir" / "deep").mkdir(parents=True)
    (tmp / "dir" / "deep" / "f").write_text("x")
    (tmp / "dir" / "link-out").symlink_to(outside)
    (tmp / "link-out").symlink_to(outside)
    os.mkfifo(tmp / "fifo")
    (tmp / "held open" / "inner").mkdir(parents=True)
    mounts = [Mount(f"{tmp}/held open/inner", "tmpfs", "none")]
    removed, problems = restore_mod.clean_directory(str(tmp), mounts)
    assert removed == 5
    assert sorted(p.name for p in tmp.iterdir()) == ["held open"]
    assert problems == [f"{tmp}/held open has a mount point in it: left alone"]
    assert (outside / "keep").read_text() == "keep"


def test_a_missing_directory_is_a_problem_not_a_crash(tmp_path):
    assert restore_mod.clean_directory(str(tmp_path / "none"), [])[0] == 0


def test_dhcp_clients_are_found_by_interface(tmp_path):
    def process(pid: int, *argv: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    process(129, "/bin/busybox", "udhcpc", "-i", "eth0", "-s", "/sbin/secvf-init", "-b")
    process(130, "udhcpc", "-i", "eth1")
    process(131, "/usr/sbin/udhcpc", "-b", "-i", "eth0")
    process(132, "/bin/sh", "-c", "udhcpc -i eth0")
    (tmp_path / "self").mkdir()
    found = restore_mod.dhcp_clients("eth0", str(tmp_path))
    assert sorted(pid for pid, _ in found) == [129, 131]
    assert dict(found)[129][:2] == ["/bin/busybox", "udhcpc"]


def test_readiness_is_one_line_on_inits_fifo(tmp_path):
    from secvf.guest.agent.__main__ import signal_ready

    fifo = tmp_path / "ready"
    assert not signal_ready(str(fifo), "agent")  # not there: nobody to tell
    os.mkfifo(fifo)
    assert not signal_ready(str(fifo), "agent")  # nobody reading
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert signal_ready(str(fifo), "agent")
        assert os.read(reader, 100) == b"agent\n"
    finally:
        os.close(reader)


def test_bound_virtiofs_devices_are_counted_from_the_driver_directory(tmp_path):
    driver = tmp_path / "virtiofs"
    assert restore_mod.bound_virtiofs_devices(str(driver)) == 0  # no driver loaded yet
    driver.mkdir()
    for entry in ("bind", "unbind", "uevent", "module", "virtio3", "virtio7"):
        (driver / entry).touch()
    assert restore_mod.bound_virtiofs_devices(str(driver)) == 2


def test_a_mac_the_driver_refuses_while_up_is_set_while_down(monkeypatch):
    """SIOCSIFHWADDR with EBUSY: the link goes down, takes the address, and comes back
    up with its flags as they were."""
    calls = []

    def ioctl(sock, request, arg):
        calls.append((request, bytes(arg)))
        if request == restore_mod.SIOCSIFHWADDR and len(calls) == 1:
            raise OSError(16, "Device or resource busy")  # EBUSY
        if request == restore_mod.SIOCGIFFLAGS:
            return arg[:16] + (0x1043).to_bytes(2, "little") + arg[18:]  # UP|BROADCAST|...
        return arg

    monkeypatch.setattr(restore_mod.fcntl, "ioctl", ioctl)
    restore_mod.set_hardware_address("eth0", "52:54:00:aa:bb:cc")
    requests = [r for r, _ in calls]
    assert requests == [restore_mod.SIOCSIFHWADDR, restore_mod.SIOCGIFFLAGS,
                        restore_mod.SIOCSIFFLAGS, restore_mod.SIOCSIFHWADDR,
                        restore_mod.SIOCSIFFLAGS]
    hwaddr = calls[0][1]
    assert hwaddr[:4] == b"eth0" and hwaddr[18:24] == bytes.fromhex("525400aabbcc")
    down, up = calls[2][1], calls[4][1]
    assert int.from_bytes(down[16:18], "little") == 0x1042  # IFF_UP cleared
    assert int.from_bytes(up[16:18], "little") == 0x1043  # as it was


def test_another_mac_error_is_not_retried(monkeypatch):
    def ioctl(sock, request, arg):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(restore_mod.fcntl, "ioctl", ioctl)
    with pytest.raises(PermissionError):
        restore_mod.set_hardware_address("eth0", "52:54:00:aa:bb:cc")


# ---- DHCP after a new MAC: init's secvf_nics on the kernel command line ------------------------

CMDLINE = "console=ttyS0 root=/dev/vda ro quiet secvf_hostname=tpl {nics}secvf_time=1\n"


@pytest.mark.parametrize(("nics", "entries"), [
    ("secvf_nics=52:54:00:12:34:56+dhcp ", [("52:54:00:12:34:56", "dhcp")]),
    ("secvf_nics=52:54:00:AB:CD:EF+manual,52:54:00:12:34:56+10.0.100.5/24@10.0.100.1 ",
     [("52:54:00:ab:cd:ef", "manual"), ("52:54:00:12:34:56", "10.0.100.5/24@10.0.100.1")]),
    ("secvf_nics= ", []),
    ("", []),
    ("secvf_nics=52:54:00:12:34:56+dhcp secvf_nics=52:54:00:12:34:56+manual ",
     [("52:54:00:12:34:56", "manual")]),  # the last one counts
    ("secvf_nics=a+dhcp,,nomode ", [("a", "dhcp"), ("nomode", "")]),
    ("xsecvf_nics=52:54:00:12:34:56+dhcp ", []),
])
def test_the_nics_are_read_from_the_kernel_command_line(nics, entries):
    assert restore_mod.kernel_nics(CMDLINE.format(nics=nics)) == entries


@pytest.mark.parametrize(("nics", "dhcp"), [
    ("secvf_nics=52:54:00:12:34:56+dhcp ", True),
    ("secvf_nics=52:54:00:ab:cd:ef+10.0.100.5/24,52:54:00:12:34:56+dhcp ", True),
    ("secvf_nics=52:54:00:12:34:56+manual ", False),
    ("secvf_nics=52:54:00:12:34:56+10.0.100.5/24@10.0.100.1 ", False),
    ("secvf_nics=52:54:00:12:34:56+dhcpx ", False),
    ("secvf_nics= ", False),
    ("", False),
    ("secvf_net=nat ", False),  # the old parameter: init no longer reads it
])
def test_dhcp_is_restarted_only_for_a_dhcp_nic(monkeypatch, tmp_path, nics, dhcp):
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(CMDLINE.format(nics=nics))
    monkeypatch.setattr(restore_mod, "KERNEL_CMDLINE", str(cmdline))
    started = []

    class Thread:
        def __init__(self, *, target, args, name, daemon):
            started.append((target, args, name, daemon))

        def start(self):
            started.append("started")

    monkeypatch.setattr(restore_mod.threading, "Thread", Thread)
    outcome = restore_mod.Outcome()
    restore_mod._restart_dhcp(outcome, "eth0")
    assert outcome.dhcp_restarted is dhcp
    assert started == ([(restore_mod._replace_dhcp_client, ("eth0",), "dhcp", True), "started"]
                       if dhcp else [])


def test_the_restarted_client_is_the_one_on_the_interface_whose_mac_changed(monkeypatch):
    looked_up, popen = [], []
    monkeypatch.setattr(restore_mod, "DHCP_RESTART_DELAY_S", 0)
    monkeypatch.setattr(restore_mod, "dhcp_clients",
                        lambda iface: looked_up.append(iface) or [])
    monkeypatch.setattr(restore_mod.subprocess, "Popen", lambda *a, **k: popen.append(a))
    restore_mod._replace_dhcp_client("eth3")
    assert (looked_up, popen) == (["eth3"], [])  # none runs there: none started


def test_the_set_mac_step_restarts_dhcp_on_its_interface(monkeypatch):
    restarted = []
    monkeypatch.setattr(restore_mod, "_current_mac", lambda iface: "52:54:00:00:00:01")
    monkeypatch.setattr(restore_mod, "set_hardware_address", lambda iface, mac: None)
    monkeypatch.setattr(restore_mod, "_renew_ipv6", lambda iface: None)
    monkeypatch.setattr(restore_mod, "_restart_dhcp",
                        lambda outcome, iface: restarted.append(iface))
    outcome = restore_mod.Outcome()
    Restorer(enabled=True)._set_mac(outcome, "52:54:00:00:00:02")
    assert restarted == [restore_mod.NET_IFACE] and outcome.errors == []


@pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v dash"], capture_output=True,
                                   check=False).returncode != 0, reason="needs dash")
@pytest.mark.parametrize("nics", [
    "52:54:00:12:34:56+dhcp",
    "52:54:00:12:34:56+manual,52:54:00:ab:cd:ef+dhcp",
    "52:54:00:12:34:56+10.0.100.5/24@10.0.100.1",
    "52:54:00:12:34:56+manual",
    "",
])
def test_the_agent_and_init_agree_on_whether_a_nic_uses_dhcp(nics):
    script = (f'. {INIT}\nsay() {{ :; }}\nsecvf_nics="$1" parse_nics\n'
              'echo "${NIC_DHCP:-no}"')
    init_says = subprocess.run(["dash", "-c", script, "dash", nics], capture_output=True,
                               text=True, check=True).stdout
    agent_says = restore_mod.uses_dhcp(CMDLINE.format(nics=f"secvf_nics={nics} "))
    assert init_says == ("yes\n" if agent_says else "no\n")
