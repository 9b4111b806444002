"""Decoding frames (secvf.net.decode): real frames built with dpkt, every cut of them,
and Hypothesis-fuzzed bytes, which must decode to what they can plus a malformed mark
and never raise. The frame builders here are shared by the filter and workflow tests."""

from __future__ import annotations

import socket
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secvf.net.decode import decode, printable

MAC_A = bytes.fromhex("525400123456")
MAC_B = bytes.fromhex("525400abcdef")
GUEST, RESOLVER = "10.0.2.15", "10.0.2.3"


def eth(payload: object, etype: int = dpkt.ethernet.ETH_TYPE_IP, src: bytes = MAC_A,
        dst: bytes = MAC_B) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(src=src, dst=dst, type=etype, data=payload))


def ipv4(l4: object, src: str = GUEST, dst: str = RESOLVER) -> dpkt.ip.IP:
    proto = {dpkt.udp.UDP: 17, dpkt.tcp.TCP: 6, dpkt.icmp.ICMP: 1}[type(l4)]
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, ttl=64,
                    data=l4)
    ip.len = len(bytes(ip))
    return ip


def udp(sport: int, dport: int, data: bytes) -> dpkt.udp.UDP:
    segment = dpkt.udp.UDP(sport=sport, dport=dport, data=data)
    segment.ulen = len(bytes(segment))
    return segment


def tcp(sport: int, dport: int, data: bytes = b"",
        flags: int = dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH) -> dpkt.tcp.TCP:
    return dpkt.tcp.TCP(sport=sport, dport=dport, flags=flags, data=data, off=5)


def dns_query(name: str = "example.com", qtype: int = dpkt.dns.DNS_A) -> bytes:
    return bytes(dpkt.dns.DNS(id=7, qd=[dpkt.dns.DNS.Q(name=name, type=qtype)]))


def dns_answer(name: str, address: str) -> bytes:
    answer = dpkt.dns.DNS.RR(name=name, type=dpkt.dns.DNS_A, ip=socket.inet_aton(address))
    return bytes(dpkt.dns.DNS(id=7, qr=1, qd=[dpkt.dns.DNS.Q(name=name)], an=[answer]))


def client_hello(sni: str | None) -> bytes:
    """A TLS 1.2-framed ClientHello, with a server_name extension if ``sni``."""
    ext = b""
    if sni is not None:
        entry = struct.pack(">BH", 0, len(sni)) + sni.encode()
        names = struct.pack(">H", len(entry)) + entry
        ext = struct.pack(">HH", 0, len(names)) + names
    ext = struct.pack(">HH", 0x000B, 2) + b"\x01\x00" + ext  # ec_point_formats first
    body = (b"\x03\x03" + b"\x11" * 32 + b"\x00" + struct.pack(">H", 2) + b"\x13\x01"
            + b"\x01\x00" + struct.pack(">H", len(ext)) + ext)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


def arp_request(sender: str = "10.0.0.1", target: str = "10.0.0.9") -> bytes:
    msg = dpkt.arp.ARP(sha=MAC_A, spa=socket.inet_aton(sender), tpa=socket.inet_aton(target),
                       op=dpkt.arp.ARP_OP_REQUEST)
    return eth(msg, dpkt.ethernet.ETH_TYPE_ARP, dst=b"\xff" * 6)


def icmp_echo() -> bytes:
    echo = dpkt.icmp.ICMP.Echo(id=1, seq=2, data=b"ping")
    return eth(ipv4(dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, data=echo), dst="10.0.2.2"))


def dhcp_discover() -> bytes:
    msg = dpkt.dhcp.DHCP(chaddr=MAC_A, opts=[(dpkt.dhcp.DHCP_OPT_MSGTYPE, b"\x01"),
                                             (dpkt.dhcp.DHCP_OPT_HOSTNAME, b"web")])
    return eth(ipv4(udp(68, 67, bytes(msg)), src="0.0.0.0", dst="255.255.255.255"),
               dst=b"\xff" * 6)


def ipv6_udp() -> bytes:
    segment = udp(5353, 5353, dns_query("printer.local"))
    ip6 = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, "fe80::1"),
                       dst=socket.inet_pton(socket.AF_INET6, "ff02::fb"), nxt=17, hlim=255,
                       data=segment, plen=len(bytes(segment)))
    return eth(ip6, dpkt.ethernet.ETH_TYPE_IP6)


#: One frame of each kind the tests use: name -> bytes.
FRAMES = {
    "dns": eth(ipv4(udp(40000, 53, dns_query()))),
    "dns_answer": eth(ipv4(udp(53, 40000, dns_answer("example.com", "93.184.216.34")),
                           src=RESOLVER, dst=GUEST)),
    "http": eth(ipv4(tcp(40001, 80, b"GET /index.html?q=1 HTTP/1.1\r\nHost: Example.COM\r\n"
                                    b"User-Agent: curl/8\r\n\r\n"), dst="93.184.216.34")),
    "tls": eth(ipv4(tcp(40002, 443, client_hello("secret.example.org")),
                    dst="93.184.216.34")),
    "tls_no_sni": eth(ipv4(tcp(40003, 443, client_hello(None)), dst="93.184.216.34")),
    "arp": arp_request(),
    "icmp": icmp_echo(),
    "syn": eth(ipv4(tcp(40004, 22, flags=dpkt.tcp.TH_SYN), dst="10.0.2.9")),
    "dhcp": dhcp_discover(),
    "ipv6": ipv6_udp(),
}


def decoded(name: str, vm: str = "web"):
    return decode(1_700_000_000.0, vm, FRAMES[name])


@pytest.mark.parametrize(("name", "protocol", "info"), [
    ("dns", "DNS", "40000 → 53 query A example.com"),
    ("dns_answer", "DNS", "response A example.com → 93.184.216.34"),
    ("http", "HTTP", "GET example.com /index.html?q=1"),
    ("tls", "TLS", "ClientHello SNI=secret.example.org"),
    ("tls_no_sni", "TLS", "ClientHello SNI=(none)"),
    ("arp", "ARP", "who-has 10.0.0.9? tell 10.0.0.1"),
    ("icmp", "ICMP", "echo request code 0"),
    ("syn", "TCP", "40004 → 22 [SYN]"),
    ("dhcp", "DHCP", "DHCP DISCOVER 52:54:00:12:34:56 host=web"),
    ("ipv6", "DNS", "query A printer.local"),
])
def test_each_kind_decodes_to_its_protocol_and_info(name, protocol, info):
    packet = decoded(name)
    assert packet.malformed is None
    assert packet.protocol == protocol
    assert info in packet.info


def test_fields_of_an_http_request_and_a_dns_answer():
    http = decoded("http")
    assert (http.http_method, http.http_host, http.http_uri, http.http_user_agent) == (
        "GET", "example.com", "/index.html?q=1", "curl/8")
    assert (http.src, http.dst, http.src_port, http.dst_port) == (
        GUEST, "93.184.216.34", 40001, 80)
    answer = decoded("dns_answer")
    assert answer.dns_response and answer.dns_answer_addrs == ("93.184.216.34",)
    v6 = decoded("ipv6")
    assert (v6.ip_version, v6.ip_src, v6.ip_dst, v6.ip_ttl) == (6, "fe80::1", "ff02::fb", 255)


def test_json_has_every_decoded_field_and_no_raw_bytes():
    data = decoded("tls").as_json()
    assert data["tls_sni"] == "secret.example.org" and data["vm"] == "web"
    assert data["layers"] == ["eth", "ip", "tcp", "tls"]
    assert data["payload"] == len(client_hello("secret.example.org"))
    assert "frame" not in data and "dns_names" not in data


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_every_cut_of_a_frame_decodes_what_it_can_and_marks_the_rest(name):
    frame = FRAMES[name]
    for size in range(len(frame)):
        packet = decode(0.0, "web", frame[:size])
        if size < 14:
            assert packet.malformed is not None and packet.layers == []
        assert packet.info is not None


def test_a_truncated_tcp_header_keeps_the_ip_layer():
    packet = decode(0.0, "web", FRAMES["syn"][:14 + 20 + 8])
    assert packet.layers == ["eth", "ip"] and packet.ip_src == GUEST
    assert packet.malformed == "tcp: truncated or invalid tcp header"
    assert "[malformed tcp:" in packet.info


def test_a_truncated_client_hello_is_tls_marked_malformed():
    frame = FRAMES["tls"]
    packet = decode(0.0, "web", frame[:-4])
    assert packet.layers[-1] == "tls" and packet.malformed and packet.malformed.startswith("tls")


def test_text_from_the_frame_cannot_drive_a_terminal():
    evil = b"GET /\x1b[2J HTTP/1.1\r\nHost: a\x07b\x9b.c\r\n\r\n"
    packet = decode(0.0, "vm\x1b]0;x\x07", eth(ipv4(tcp(1234, 80, evil))))
    shown = packet.info + packet.vm
    assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown
    assert packet.http_host == "a\\x07b\\x9b.c"
    assert printable("\u202e") == "\\u202e"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    decode(0.0, "web", data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(FRAMES)), st.data())
def test_mutated_real_frames_never_raise(name, data):
    frame = bytearray(FRAMES[name])
    for _ in range(data.draw(st.integers(1, 8))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    packet = decode(0.0, "web", bytes(frame[:cut]) + data.draw(st.binary(max_size=40)))
    assert isinstance(packet.info, str)
