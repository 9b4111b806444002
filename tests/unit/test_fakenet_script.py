"""The fake internet's configuration (``secvf/guest/fakenet.py``), generated on the host."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from secvf.guest import fakenet as f

ADDR = ipaddress.IPv4Interface("10.0.100.1/24")


def test_dnsmasq_answers_every_name_with_its_own_address_and_logs_queries() -> None:
    conf = f.dnsmasq_conf("eth0", ADDR).splitlines()
    for line in ("address=/#/10.0.100.1", "log-queries", "log-facility=-", "no-resolv",
                 "interface=eth0", "listen-address=10.0.100.1", "keep-in-foreground",
                 "dhcp-range=10.0.100.128,10.0.100.254,255.255.255.0,1h",
                 "dhcp-option=option:router,10.0.100.1",
                 "dhcp-option=option:dns-server,10.0.100.1"):
        assert line in conf


@pytest.mark.parametrize(("cidr", "expected"), [
    ("10.0.100.1/24", ("10.0.100.128", "10.0.100.254")),
    ("192.168.7.1/28", ("192.168.7.8", "192.168.7.14")),
    ("10.1.0.1/16", ("10.1.128.0", "10.1.255.254")),
    ("10.0.0.1/30", None),
    ("10.0.0.254/24", ("10.0.0.128", "10.0.0.253")),
])  # fmt: skip
def test_the_dhcp_pool_is_the_upper_half_without_the_routers_address(
        cidr: str, expected: tuple[str, str] | None) -> None:
    iface = ipaddress.IPv4Interface(cidr)
    pool = f.dhcp_range(iface.network, iface.ip)
    assert pool == expected
    if pool is not None:
        low, high = (ipaddress.IPv4Address(a) for a in pool)
        assert not low <= iface.ip <= high
        assert ipaddress.IPv4Address(int(iface.network.network_address) + 2) < low


def test_a_tiny_subnet_gets_no_dhcp() -> None:
    conf = f.dnsmasq_conf("eth0", ipaddress.IPv4Interface("10.0.0.1/30"))
    assert "dhcp-range" not in conf and "address=/#/10.0.0.1" in conf


def test_inetsim_binds_its_services_to_the_address_without_dns() -> None:
    conf = f.inetsim_conf(ADDR).splitlines()
    assert "service_bind_address 10.0.100.1" in conf
    assert "start_service dns" not in conf
    started = {line.split()[1] for line in conf if line.startswith("start_service ")}
    assert started == set(f.SERVICES) and {"http", "https", "smtp", "ftp", "irc"} <= started
    assert "http_fakemode yes" in conf and "https_default_fakefile sample.html text/html" in conf


def test_the_first_global_address_is_found() -> None:
    out = ("2: eth0    inet 10.0.100.1/24 scope global eth0\\       valid_lft forever\n"
           "3: eth1    inet 192.168.1.5/24 scope global eth1\n")
    assert f.find_address(out) == ("eth0", ADDR)
    assert f.find_address("") is None


def test_listening_reads_proc_net(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st\n"
    (tmp_path / "tcp").write_text(header + "   0: 0164000A:0050 00000000:0000 0A\n"
                                  "   1: 0164000A:0035 00000000:0000 0A\n"
                                  "   2: 0164000A:01BB 0A00000A:1234 01\n")
    (tmp_path / "udp").write_text(header + "   0: 0164000A:0035 00000000:0000 07\n")
    assert f.listening({80, 53}, {53}, tmp_path)
    assert not f.listening({80, 443}, {53}, tmp_path)  # 443 only has an established socket
    assert not f.listening({80}, {69}, tmp_path)


def test_the_log_follower_reads_appended_lines_and_restarts_on_a_new_file(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    follower = f.LogFollower(log)
    assert follower.read_lines() == []
    log.write_bytes(b"one\ntw")
    assert follower.read_lines() == [b"one"]
    with log.open("ab") as out:
        out.write(b"o\n")
    assert follower.read_lines() == [b"two"]
    log.unlink()
    log.write_bytes(b"new\n")
    assert follower.read_lines() == [b"new"]
